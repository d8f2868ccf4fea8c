#!/usr/bin/env bash
# `make test` (and CI via .ci/run): unit and integration tests, including the
# ones against a real Prefect server. Under CI=true nothing may be skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

# Prefect for the real-server tests (project-local, git-ignored .venv).
scripts/prefect-venv.sh
# helm-python-sdk and kubernetes-validate for the chart tests (.venv-helm).
scripts/helm-venv.sh

# promtool (Debian's prometheus package) checks the exposition format in tests.
if ! command -v promtool >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        echo "test.sh: installing promtool (apt-get install prometheus)" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
    elif [ "${CI:-}" = true ] && command -v sudo >/dev/null 2>&1; then
        echo "test.sh: installing promtool with sudo (apt-get install prometheus)" >&2
        sudo -n apt-get update -qq
        sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
    elif [ "${CI:-}" = true ]; then
        echo "test.sh: promtool missing and cannot install it (not root, no sudo) under CI" >&2
        exit 1
    else
        echo "test.sh: WARNING: promtool not installed and not root: promtool checks will be skipped" >&2
        echo "test.sh:          (install it with: sudo apt-get install prometheus)" >&2
    fi
fi

# One integration-test binary (tests/it/main.rs). Most of its tests wait on real
# intervals (exporters collecting, Prometheus scraping) rather than use CPU, so
# they run on more threads than cores; those that load both cores and bound
# latencies take a lock (tests/it/support/common.rs, `heavy`), loads without
# bounds run at nice 19. TEST_THREADS overrides the number.
cargo build
cargo test --no-fail-fast -- --test-threads="${TEST_THREADS:-8}"
echo "test.sh: all tests passed in $(( $(date +%s) - start )) s" >&2
