#!/usr/bin/env bash
# Ensure a project-local Python venv with Prefect in it, for the real-server tests
# and `make demo`. Idempotent and safe to call concurrently (flock).
#
#   scripts/prefect-venv.sh            -> <repo>/.venv (git-ignored)
#   PREFECT_VENV=/tmp/x scripts/...    -> another location
#   PREFECT_PIP_SPEC='prefect==3.9.1'  -> pin another version (default: prefect>=3,<4)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${PREFECT_VENV:-$root/.venv}"
spec="${PREFECT_PIP_SPEC:-prefect>=3,<4}"
python="${PYTHON:-python3}"

if [ -x "$venv/bin/prefect" ]; then
    echo "prefect-venv: $venv/bin/prefect present, nothing to do" >&2
    exit 0
fi

# One installer at a time; the second caller waits, then finds the venv ready.
lockdir="$root/target"
mkdir -p "$lockdir"
exec 9>"$lockdir/.prefect-venv.lock"
if ! flock -n 9; then
    echo "prefect-venv: another install is running, waiting for it" >&2
    flock 9
fi

if [ -x "$venv/bin/prefect" ]; then
    echo "prefect-venv: $venv/bin/prefect was installed meanwhile, nothing to do" >&2
    exit 0
fi

if ! command -v "$python" >/dev/null 2>&1; then
    echo "prefect-venv: $python not found; install Python 3 (and python3-venv on Debian)" >&2
    exit 1
fi

if [ ! -x "$venv/bin/pip" ]; then
    echo "prefect-venv: creating venv $venv" >&2
    rm -rf "$venv"
    if ! "$python" -m venv "$venv"; then
        echo "prefect-venv: '$python -m venv' failed (on Debian: apt-get install python3-venv)" >&2
        rm -rf "$venv"
        exit 1
    fi
fi

echo "prefect-venv: pip install '$spec' into $venv (takes 30-60 s)" >&2
start=$(date +%s)
"$venv/bin/pip" install --quiet --disable-pip-version-check "$spec"
"$venv/bin/prefect" --version >/dev/null
echo "prefect-venv: installed prefect $("$venv/bin/prefect" --version) in $(( $(date +%s) - start )) s" >&2
