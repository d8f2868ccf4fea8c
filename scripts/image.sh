#!/usr/bin/env bash
# make image: the container image prefect-exporter:latest (and :VERSION), built from
# the prebuilt static binary (Containerfile's `prebuilt` stage), so that no base image
# has to be pulled. Runs scripts/static.sh first when dist/ is missing or stale.
#
# Uses podman, or buildah when podman is missing; installs podman and runc with
# apt-get when neither is there (as root).
#
# Environment:
#   IMAGE             image name (default prefect-exporter)
#   MAX_IMAGE_BYTES   size target; a bigger image only warns here (default 4000000)
#   PODMAN_GLOBAL_FLAGS  extra global flags for podman (see scripts/podman.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

image="${IMAGE:-prefect-exporter}"
max_bytes="${MAX_IMAGE_BYTES:-4000000}"

# --- tools -------------------------------------------------------------------
apt_install() {
    if [ "$(id -u)" != 0 ]; then
        echo "image.sh: need $* but not root: install them (apt-get install $*)" >&2
        exit 1
    fi
    echo "image.sh: installing $* with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "$@" >/dev/null 2>&1 || {
        apt-get update -q >/dev/null
        apt-get install -y -q "$@"
    }
}
if ! command -v podman >/dev/null 2>&1 && ! command -v buildah >/dev/null 2>&1; then
    apt_install podman buildah runc
fi
# Podman/buildah need an OCI runtime; runc is the one that works in this sandbox.
if ! command -v runc >/dev/null 2>&1; then
    apt_install runc
fi

# --- binary --------------------------------------------------------------------
bin=dist/prefect-exporter
stale=no
if [ ! -x "$bin" ]; then
    stale=yes
elif [ -n "$(find src Cargo.toml Cargo.lock build.rs scripts/static.sh -newer "$bin" -print -quit 2>/dev/null)" ]; then
    stale=yes
fi
if [ "$stale" = yes ]; then
    echo "image.sh: $bin missing or older than the sources: running scripts/static.sh"
    scripts/static.sh
fi

# --- build ---------------------------------------------------------------------
version="$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n 1)"
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null || true)" ]; then
    revision="$revision-dirty"
fi
# Reproducible: the image's dates come from the last commit (or SOURCE_DATE_EPOCH),
# so the same binary gives the same image ID.
epoch="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}"
created="$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)"

build_args=(
    --target prebuilt
    --layers=false
    --timestamp "$epoch"
    --build-arg "VERSION=$version"
    --build-arg "REVISION=$revision"
    --build-arg "CREATED=$created"
    -f Containerfile
    -t "$image:latest"
    -t "$image:$version"
)
if command -v podman >/dev/null 2>&1; then
    # scripts/podman.sh: this machine's flags (cgroupfs, runc, ulimits; see there).
    engine=(scripts/podman.sh)
    old_id="$("${engine[@]}" image inspect --format '{{.Id}}' "$image:latest" 2>/dev/null || true)"
    "${engine[@]}" build --skip-unused-stages=true "${build_args[@]}" .
    new_id="$("${engine[@]}" image inspect --format '{{.Id}}' "$image:latest")"
    # The image the tags pointed at before is now untagged: remove it (if unused).
    if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
        "${engine[@]}" rmi "$old_id" >/dev/null 2>&1 || true
    fi
    size="$("${engine[@]}" image inspect --format '{{.Size}}' "$image:latest")"
else
    buildah build --skip-unused-stages=true \
        --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 "${build_args[@]}" .
    size="$(buildah inspect --type image --format '{{.Size}}' "$image:latest" 2>/dev/null || echo 0)"
fi

echo "image $image:latest ($image:$version): $size bytes ($(awk -v s="$size" 'BEGIN { printf "%.2f MB", s / 1000000 }'), target < $max_bytes)"
if [ "$size" -ge "$max_bytes" ]; then
    echo "image.sh: WARNING: image is over the size target ($size >= $max_bytes bytes)" >&2
fi
