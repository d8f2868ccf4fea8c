#!/usr/bin/env bash
# podman with the settings this project's machines need; used by scripts/image.sh and
# tests/it/container.rs, handy by hand: `scripts/podman.sh run --rm prefect-exporter --help`.
#
# - no systemd as PID 1 (sandboxes, CI containers): cgroupfs cgroups, events to a file;
# - runc as the OCI runtime when it is installed (crun does not work in every sandbox);
# - `run`, `create` and `build` get `--ulimit nofile=1024:1024 --ulimit nproc=1024:1024`:
#   the runtime may not raise the limits above the sandbox's own, and podman's
#   defaults (nproc 32768, nofile 1048576) do exactly that.
# Nothing on the system is changed. PODMAN_GLOBAL_FLAGS adds global flags
# (e.g. "--storage-driver vfs" where overlay mounts are not allowed).
set -euo pipefail

global=()
if [ ! -d /run/systemd/system ]; then
    global+=(--cgroup-manager=cgroupfs --events-backend=file)
fi
if command -v runc >/dev/null 2>&1; then
    global+=(--runtime "$(command -v runc)")
fi
# shellcheck disable=SC2206 # word splitting intended
global+=(${PODMAN_GLOBAL_FLAGS:-})

if [ $# -gt 0 ]; then
    case "$1" in
        run | create | build)
            sub="$1"
            shift
            set -- "$sub" --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 "$@"
            ;;
    esac
fi
exec podman "${global[@]}" "$@"
