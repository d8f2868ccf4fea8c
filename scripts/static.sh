#!/usr/bin/env bash
# make static: a fully static x86_64 binary in dist/prefect-exporter.
#
# glibc is linked statically (`+crt-static`); `--target` is given explicitly so that
# RUSTFLAGS apply to the exporter only and not to build scripts and proc-macros
# (which cannot be static). glibc >= 2.34 has its "files" and "dns" name services
# built in, so the static binary resolves /etc/hosts names and DNS names without
# loading any libnss_*.so plugin (see deploy/README.md, "Static binary").
#
# Size: Cargo.toml's [profile.release] already has LTO, one codegen unit and
# stripping. On top of that this build uses:
#   - opt-level "z" (the exporter is I/O-bound: one collection per interval,
#     /metrics served from memory, so "z" costs nothing measurable);
#   - a non-PIE static executable (`-C relocation-model=static`): gives up address
#     randomisation of the executable image only (heap, stacks and mmaps stay
#     randomised); STATIC_PIE=1 keeps PIE (+115 kB).
# The unwind tables (.eh_frame) stay: the release profile unwinds on panic so the
# exporter survives tiny_http's accept thread panicking when file descriptors run
# out (src/server.rs); the build-by-build sizes are in deploy/README.md.
#
# Usage: scripts/static.sh [extra cargo build arguments, e.g. --locked]
# Environment:
#   TARGET            target triple (default x86_64-unknown-linux-gnu)
#   OPT_LEVEL         opt-level of this build (default z)
#   STATIC_PIE        1: static-pie instead of a plain static executable
#   MAX_BINARY_BYTES  size target; a bigger binary only warns here (default 3700000: unwinding, see tests/it/container.rs)
set -euo pipefail
cd "$(dirname "$0")/.."

target="${TARGET:-x86_64-unknown-linux-gnu}"
opt_level="${OPT_LEVEL:-z}"
flags=(-C target-feature=+crt-static)
if [ "${STATIC_PIE:-0}" != 1 ]; then
    flags+=(-C relocation-model=static)
fi
max_bytes="${MAX_BINARY_BYTES:-3700000}"
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"

# The target is normally the host's own; add it only when it is not installed.
host="$(rustc -vV | sed -n 's/^host: //p')"
if [ "$target" != "$host" ] && command -v rustup >/dev/null 2>&1; then
    if ! rustup target list --installed | grep -qx "$target"; then
        rustup target add "$target"
    fi
fi

# Flags from the caller's environment (e.g. a cargo that runs this script) would
# override or mix with ours. CARGO_ENCODED_RUSTFLAGS (flags separated by 0x1f) wins
# over RUSTFLAGS and keeps a project path with spaces in one flag.
unset RUSTFLAGS CARGO_BUILD_RUSTFLAGS
encoded="$(IFS=$'\x1f'; echo "${flags[*]}")"
echo "static.sh: rustflags '${flags[*]}' opt-level=$opt_level cargo build --release --target $target $*"
CARGO_ENCODED_RUSTFLAGS="$encoded" CARGO_PROFILE_RELEASE_OPT_LEVEL="$opt_level" \
    cargo build --release --target "$target" "$@"

bin="$target_dir/$target/release/prefect-exporter"
[ -x "$bin" ] || { echo "static.sh: $bin was not built" >&2; exit 1; }

# Static means: no program interpreter and no shared-library dependencies.
is_static=yes
if command -v readelf >/dev/null 2>&1; then
    if readelf -lW "$bin" | grep -q 'INTERP' || readelf -dW "$bin" | grep -q '(NEEDED)'; then
        is_static=no
    fi
fi
if command -v file >/dev/null 2>&1; then
    desc="$(file -b "$bin")"
    echo "file: $desc"
    case "$desc" in
        *"dynamically linked"*) is_static=no ;;
    esac
fi
if command -v ldd >/dev/null 2>&1; then
    # ldd exits 1 with "not a dynamic executable" or prints "statically linked".
    ldd_out="$(ldd "$bin" 2>&1 || true)"
    echo "ldd: $ldd_out"
    case "$ldd_out" in
        *"statically linked"* | *"not a dynamic executable"*) ;;
        *) is_static=no ;;
    esac
fi
if [ "$is_static" != yes ]; then
    echo "static.sh: $bin is not statically linked" >&2
    exit 1
fi

mkdir -p dist
cp "$bin" dist/prefect-exporter.tmp
mv -f dist/prefect-exporter.tmp dist/prefect-exporter
dist/prefect-exporter --version

size="$(stat -c %s dist/prefect-exporter)"
echo "dist/prefect-exporter: $size bytes ($(awk -v s="$size" 'BEGIN { printf "%.2f MB", s / 1000000 }'), target < $max_bytes)"
if [ "$size" -ge "$max_bytes" ]; then
    echo "static.sh: WARNING: binary is over the size target ($size >= $max_bytes bytes)" >&2
fi
