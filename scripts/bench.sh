#!/usr/bin/env bash
# make bench: how cheap the exporter is for Prefect and how fast for Prometheus.
# Results: bench/RESULTS.md (also printed). Scratch and caches: bench/work/ (git-ignored).
#
# 1. builds the release binary; ensures the Prefect venv (scripts/prefect-venv.sh)
#    and wrk (apt-get install wrk, as root);
# 2. runs bench/bench.py: fills (once, then cached under bench/work/cache/) a real
#    Prefect server with 20,000 flow runs, and measures requests, wall time and CPU
#    per collection, /metrics under wrk, RSS, sizes. See bench/bench.py's docstring
#    for the steps and the BENCH_* settings.
#
# Every process it starts is stopped at the end, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
python="${PYTHON:-python3}"

cargo build --release
scripts/prefect-venv.sh

if ! command -v wrk >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        echo "bench.sh: installing wrk (apt-get install wrk)" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
    else
        echo "bench.sh: wrk missing and not root: sudo apt-get install wrk" >&2
        exit 1
    fi
fi

# Belt and braces: bench.py stops its children itself; this catches the case where
# bench.py is killed before it can (its children run in their own sessions). Only
# pids bench.py recorded, and only while they still run one of our programs.
pidfile="$root/bench/work/run/pids"
cleanup() {
    [ -f "$pidfile" ] || return 0
    while read -r pid name; do
        [ -r "/proc/$pid/cmdline" ] || continue
        if tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qE 'prefect|proxy\.py|perf stat'; then
            echo "bench.sh: stopping leftover $name (pid $pid)" >&2
            kill "$pid" 2>/dev/null || true
        fi
    done <"$pidfile"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

"$python" bench/bench.py
