#!/usr/bin/env bash
# Ensure a project-local Python venv with the chart tools of tests/it/deploy.rs:
# helm-python-sdk (Helm 4 as a library: render and lint offline, no helm binary)
# and kubernetes-validate (the Kubernetes API schemas, offline). Idempotent and
# safe to call concurrently (flock), like scripts/prefect-venv.sh.
#
#   scripts/helm-venv.sh            -> <repo>/.venv-helm (git-ignored)
#   HELM_VENV=/tmp/x scripts/...    -> another location
#
# Pinned: the Kubernetes versions the chart is validated against come with
# kubernetes-validate, and the rendering with helm-python-sdk's Helm; a new
# release of either is taken by changing the pins here (a venv with other pins
# is reinstalled).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${HELM_VENV:-$root/.venv-helm}"
spec="helm-python-sdk==0.2.2 kubernetes-validate==1.37.0"
python="${PYTHON:-python3}"

ready() {
    [ -x "$venv/bin/kubernetes-validate" ] && [ "$(cat "$venv/.pins" 2>/dev/null)" = "$spec" ] &&
        "$venv/bin/python" -c 'import helm_python' 2>/dev/null
}

if ready; then
    echo "helm-venv: $venv present, nothing to do" >&2
    exit 0
fi

lockdir="$root/target"
mkdir -p "$lockdir"
exec 9>"$lockdir/.helm-venv.lock"
if ! flock -n 9; then
    echo "helm-venv: another install is running, waiting for it" >&2
    flock 9
fi

if ready; then
    echo "helm-venv: $venv was installed meanwhile, nothing to do" >&2
    exit 0
fi

if ! command -v "$python" >/dev/null 2>&1; then
    echo "helm-venv: $python not found; install Python 3 (and python3-venv on Debian)" >&2
    exit 1
fi

if [ ! -x "$venv/bin/pip" ]; then
    echo "helm-venv: creating venv $venv" >&2
    rm -rf "$venv"
    if ! "$python" -m venv "$venv"; then
        echo "helm-venv: '$python -m venv' failed (on Debian: apt-get install python3-venv)" >&2
        rm -rf "$venv"
        exit 1
    fi
fi

echo "helm-venv: pip install $spec into $venv" >&2
start=$(date +%s)
# shellcheck disable=SC2086 # $spec is a list of requirements
"$venv/bin/pip" install --quiet --disable-pip-version-check $spec
"$venv/bin/python" -c 'import helm_python'
"$venv/bin/kubernetes-validate" --version >/dev/null
echo "$spec" >"$venv/.pins"
echo "helm-venv: installed in $(( $(date +%s) - start )) s" >&2
