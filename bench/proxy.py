#!/usr/bin/env python3
"""Counting pass-through HTTP proxy for the benchmark (stdlib only).

    proxy.py UPSTREAM_BASE PORTFILE      e.g. proxy.py http://127.0.0.1:4200 /tmp/port

Listens on 127.0.0.1 (a free port, written to PORTFILE once listening) and
forwards every request unchanged (method, path, body, headers except hop-by-hop
ones) to UPSTREAM_BASE, counting requests per "METHOD /path". The exporter is
pointed at it with PREFECT_API_URL=http://127.0.0.1:<port>/api.

GET /__bench/counts answers the counts as JSON ({"total": n, "by_path": {...},
"bytes": answer bytes in all}) and is neither forwarded nor counted.

Only the request COUNT is taken through this proxy: it adds latency, so the
timing figures of the benchmark are measured without it.
"""

import http.client
import json
import os
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}

LOCK = threading.Lock()
COUNTS = {}
TOTAL = 0
BYTES = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream = None  # (host, port), set in main

    def log_message(self, *args):  # quiet
        pass

    def _conn(self, fresh=False):
        conn = getattr(self, "_upstream_conn", None)
        if conn is None or fresh:
            if conn is not None:
                conn.close()
            conn = http.client.HTTPConnection(*self.upstream, timeout=120)
            self._upstream_conn = conn
        return conn

    def _handle(self):
        global TOTAL, BYTES
        path_only = self.path.split("?", 1)[0]
        if path_only == "/__bench/counts":
            with LOCK:
                body = json.dumps({"total": TOTAL, "by_path": COUNTS,
                                   "bytes": BYTES}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        key = f"{self.command} {path_only}"
        with LOCK:
            COUNTS[key] = COUNTS.get(key, 0) + 1
            TOTAL += 1
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Host"] = "%s:%d" % self.upstream
        # A reused upstream connection may have been closed by Prefect (idle
        # keep-alive timeout): retry once on a fresh one.
        for attempt in (0, 1):
            conn = self._conn(fresh=attempt == 1)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (http.client.HTTPException, OSError):
                if attempt == 1:
                    self.send_error(502, "upstream failed")
                    return
        with LOCK:
            BYTES += len(data)
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP and k.lower() not in ("date", "server"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle


def main():
    upstream, portfile = sys.argv[1], sys.argv[2]
    u = urllib.parse.urlsplit(upstream)
    Handler.upstream = (u.hostname, u.port or 80)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    with open(portfile + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    # Rename: the reader never sees a half-written file.
    os.replace(portfile + ".tmp", portfile)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
