#!/usr/bin/env bash
# `make demo`: a throw-away local Prefect server with sample flow runs, and the
# exporter on it. Ctrl-C stops both and removes the server's data.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/prefect-venv.sh
cargo build --release

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PREFECT_PORT=$(free_port)
EXPORTER_PORT=${EXPORTER_PORT:-8080}
home=$(mktemp -d -t prefect-demo.XXXXXX)
server_pid=""
cleanup() {
    # Ctrl-C reaches every process of the group, make included, and make follows
    # up with SIGTERM: ignore both here so the clean-up always finishes.
    trap '' INT TERM
    trap - EXIT
    set +e
    if [ -n "$server_pid" ]; then
        kill -TERM -- "-$server_pid" 2>/dev/null
        wait "$server_pid" 2>/dev/null
    fi
    rm -rf "$home"
    echo "demo stopped"
}
trap cleanup INT TERM EXIT

echo "starting Prefect on 127.0.0.1:$PREFECT_PORT (data in $home)"
PREFECT_HOME=$home PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_SERVER_UI_ENABLED=false \
PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED=false \
    setsid .venv/bin/prefect server start --host 127.0.0.1 --port "$PREFECT_PORT" --no-services \
    >"$home/server.log" 2>&1 &
server_pid=$!
api="http://127.0.0.1:$PREFECT_PORT/api"
for _ in $(seq 1 240); do
    if python3 -c "import urllib.request,sys; urllib.request.urlopen('$api/health', timeout=2)" 2>/dev/null; then
        break
    fi
    kill -0 "$server_pid" 2>/dev/null || { cat "$home/server.log"; exit 1; }
    sleep 0.5
done
python3 scripts/demo_seed.py "$api"

cat <<MSG

  Exporter: http://127.0.0.1:$EXPORTER_PORT/metrics
  Try:      curl -s http://127.0.0.1:$EXPORTER_PORT/metrics | grep ^prefect_
  Ctrl-C stops the exporter and the demo Prefect server.

MSG
PREFECT_API_URL=$api EXPORTER_PORT=$EXPORTER_PORT EXPORTER_INTERVAL=${EXPORTER_INTERVAL:-5} \
EXPORTER_CHECK_DEPLOYMENTS=${EXPORTER_CHECK_DEPLOYMENTS:-etl-daily,reports,missing-flow} \
    ./target/release/prefect-exporter &
exporter_pid=$!
wait "$exporter_pid" || true
