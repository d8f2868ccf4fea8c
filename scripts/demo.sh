#!/usr/bin/env bash
# `make demo`: a throw-away local Prefect server with sample flow runs, and the
# exporter on it. Ctrl-C stops both and removes the server's data.
#
# Environment: EXPORTER_PORT (default 8080), EXPORTER_ADDRESS (default: all
# interfaces), EXPORTER_INTERVAL (default 5), EXPORTER_CHECK_DEPLOYMENTS.
set -euo pipefail
cd "$(dirname "$0")/.."

EXPORTER_PORT=${EXPORTER_PORT:-8080}
# The exporter's port is checked first, before the slow steps (venv, build,
# Prefect's start), with the exporter's own rules: EXPORTER_ADDRESS, or else
# [::] (both IPv4 and IPv6) and 0.0.0.0 when IPv6 is off. Prints where it will
# listen, for the banner.
if ! listen_at=$(python3 - "${EXPORTER_ADDRESS:-}" "$EXPORTER_PORT" <<'PY'
import socket, sys
address, port = sys.argv[1].strip().strip("[]"), sys.argv[2]
if not port.isdigit() or int(port) > 65535:
    print(f"EXPORTER_PORT={port} is not a port number (0 to 65535)", file=sys.stderr)
    sys.exit(2)
candidates = [address] if address else ["::", "0.0.0.0"]
error = None
for ip in candidates:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, int(port)))
        s.close()
        print(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
        sys.exit(0)
    except OSError as e:
        error = e
print(f"port {port} is taken ({error.strerror}): another program listens on it", file=sys.stderr)
sys.exit(1)
PY
); then
    echo "demo: cannot run the exporter on port $EXPORTER_PORT; choose another port, e.g." \
        "EXPORTER_PORT=9100 make demo" >&2
    exit 1
fi

scripts/prefect-venv.sh
cargo build --release

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PREFECT_PORT=$(free_port)
home=$(mktemp -d -t prefect-demo.XXXXXX)
server_pid=""
exporter_pid=""
cleanup() {
    # Ctrl-C reaches every process of the group, make included, and make follows
    # up with SIGTERM: ignore both here so the clean-up always finishes.
    trap '' INT TERM
    trap - EXIT
    set +e
    if [ -n "$exporter_pid" ]; then
        kill -TERM "$exporter_pid" 2>/dev/null
        wait "$exporter_pid" 2>/dev/null
    fi
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
    setsid "${PREFECT_VENV:-.venv}/bin/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" --no-services \
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

case "$listen_at" in
    "[::]:"* | "0.0.0.0:"*) where="all interfaces"; local_url="http://127.0.0.1:$EXPORTER_PORT" ;;
    *) where="this address only"; local_url="http://$listen_at" ;;
esac
cat <<MSG

  Exporter: http://$listen_at/metrics ($where)
  Try:      curl -s $local_url/metrics | grep ^prefect_
  Ctrl-C stops the exporter and the demo Prefect server.

MSG
PREFECT_API_URL=$api EXPORTER_PORT=$EXPORTER_PORT EXPORTER_INTERVAL=${EXPORTER_INTERVAL:-5} \
EXPORTER_CHECK_DEPLOYMENTS=${EXPORTER_CHECK_DEPLOYMENTS:-etl-daily,reports,missing-flow} \
    ./target/release/prefect-exporter &
exporter_pid=$!
status=0
wait "$exporter_pid" || status=$?
# Ctrl-C: the exporter stops cleanly (0) and the trap has cleaned up; anything
# else (the port taken meanwhile, a bad setting) is the demo's failure too.
if [ "$status" -ne 0 ] && [ "$status" -ne 130 ] && [ "$status" -ne 143 ]; then
    echo "demo: the exporter stopped with exit code $status (see its log above)" >&2
    exit "$status"
fi
