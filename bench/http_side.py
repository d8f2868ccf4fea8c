"""The HTTP side of `make bench` (issue "every scrape answered"): a soak with real
Prometheus servers and a keep-alive client, the cost of each hostile client, and
wrk throughput, each against the release binary and a real Prefect server.

Used by bench.py (BENCH_HTTP_ONLY=1 runs only this part):
- soak(): Prometheus at 15 s and at 60 s (scrape timeout 10 s) and a keep-alive
  client at 5 s that behaves as Go's transport (a GET whose kept connection the
  server closed is sent once more on a new one) for BENCH_SOAK_SECONDS (600);
  scrapes sent and answered, the worst latency, RSS, descriptors and threads at
  the start and at the end.
- hostile(): each hostile case alone, while a scraper opens a new connection
  every 250 ms: the process's peak, how long until it is back within 10
  descriptors, 4 threads and 2 MB of its level before, and the slowest scrape.
"""

import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import json
import urllib.request
from pathlib import Path


def proc_status(pid):
    text = Path(f"/proc/{pid}/status").read_text()
    field = {l.split(":")[0]: l.split(":")[1].split() for l in text.splitlines() if ":" in l}
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return {"rss_kb": int(field["VmRSS"][0]), "threads": int(field["Threads"][0]), "fds": fds}


def host_port(url):
    u = urllib.parse.urlparse(url)
    return u.hostname, u.port


class KeepAlive:
    """One kept connection; a GET the server closed the connection under is sent
    once more on a new one, as Go's transport and curl do."""

    def __init__(self, url, timeout=10.0):
        self.addr = host_port(url)
        self.timeout = timeout
        self.sock = None
        self.reconnects = 0

    def _once(self):
        if self.sock is None:
            self.sock = socket.create_connection(self.addr, timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s = self.sock
        try:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        except OSError:
            raise ConnectionResetError("closed before the request")
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                if not buf:
                    raise ConnectionResetError("closed before an answer")
                raise OSError("closed in the middle of an answer")
            buf += chunk
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                continue
            head = buf[:end].decode("latin-1").lower()
            length = int(head.split("content-length:")[1].split("\r\n")[0])
            if len(buf) >= end + 4 + length:
                if not head.startswith("http/1.1 200"):
                    raise OSError(head.splitlines()[0])
                return

    def scrape(self):
        t = time.monotonic()
        fresh = self.sock is None
        try:
            self._once()
        except ConnectionResetError:
            self.sock = None
            if fresh:
                raise
            self.reconnects += 1
            self._once()
        except OSError:
            self.sock = None
            raise
        return time.monotonic() - t


def scrape_new(url, timeout=10.0):
    t = time.monotonic()
    with urllib.request.urlopen(url, timeout=timeout) as r:
        r.read()
    return time.monotonic() - t


class Scraper(threading.Thread):
    """A scrape on a new connection every `every` s, until stopped."""

    def __init__(self, url, every=0.25):
        super().__init__(daemon=True)
        self.url, self.every = url, every
        self.took, self.failed = [], []
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            try:
                self.took.append(scrape_new(self.url))
            except OSError as e:
                self.failed.append(str(e))
            self.stopping.wait(self.every)

    def finish(self):
        self.stopping.set()
        self.join()
        return {"scrapes": len(self.took), "failed": len(self.failed),
                "worst_s": max(self.took, default=None)}


def start_prometheus(procs, run, name, target, interval):
    d = run / f"prometheus-{name}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    port = free_port()
    (d / "prometheus.yml").write_text(
        f"global:\n  scrape_interval: {interval}s\n  scrape_timeout: 10s\n"
        f"scrape_configs:\n  - job_name: prefect\n    static_configs:\n"
        f"      - targets: ['{target}']\n")
    p = procs.start(f"prometheus-{name}", [
        "prometheus", f"--config.file={d / 'prometheus.yml'}",
        f"--storage.tsdb.path={d / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=open(d / "log", "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        cwd=d)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(base + "/-/ready", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline or p.poll() is not None:
            raise RuntimeError(f"prometheus {name} did not start")
        time.sleep(0.2)
    return p, base


def prom_value(base, expr):
    q = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{base}/api/v1/query?{q}", timeout=10) as r:
        data = json.loads(r.read())
    res = data["data"]["result"]
    return float(res[0]["value"][1]) if res else None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def soak(procs, run, exporter, seconds, log):
    """The exporter's url and pid; Prometheus at 15 s and 60 s and a keep-alive
    client at 5 s for `seconds`."""
    target = "%s:%d" % host_port(exporter.url)
    proms = {iv: start_prometheus(procs, run, f"soak-{iv}s", target, iv) for iv in (15, 60)}
    start = proc_status(exporter.pid)
    log(f"soak: {seconds} s with Prometheus at 15 s and 60 s and a keep-alive client at 5 s")
    client = KeepAlive(exporter.url)
    sent, took, failures = 0, [], []
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        nxt = time.monotonic() + 5
        sent += 1
        try:
            took.append(client.scrape())
        except OSError as e:
            failures.append(f"{time.monotonic() - t0:.0f} s: {e}")
        time.sleep(max(0.0, nxt - time.monotonic()))
    elapsed = time.monotonic() - t0
    end = proc_status(exporter.pid)
    out = {"seconds": round(elapsed), "keepalive": {
        "sent": sent, "answered": len(took), "failures": failures[:5],
        "reconnects": client.reconnects, "worst_s": max(took, default=None),
        "median_s": sorted(took)[len(took) // 2] if took else None},
        "start": start, "end": end, "prometheus": {}}
    window = int(elapsed)
    for iv, (p, base) in proms.items():
        out["prometheus"][iv] = {
            "expected": int(elapsed // iv),
            "samples": prom_value(base, f"count_over_time(up[{window}s])"),
            "up": prom_value(base, f"sum_over_time(up[{window}s])"),
            "worst_s": prom_value(base, f"max_over_time(scrape_duration_seconds[{window}s])"),
        }
        procs.stop(p)
    return out


def back_to(pid, before, limit=60.0):
    t = time.monotonic()
    while time.monotonic() - t < limit:
        now = proc_status(pid)
        if (now["fds"] <= before["fds"] + 10 and now["threads"] <= before["threads"] + 4
                and now["rss_kb"] <= before["rss_kb"] + 2048):
            return round(time.monotonic() - t, 1)
        time.sleep(0.25)
    return None


class Peak(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak = pid, {"rss_kb": 0, "threads": 0, "fds": 0}
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            try:
                s = proc_status(self.pid)
            except OSError:
                break
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s[k])
            self.stopping.wait(0.1)

    def finish(self):
        self.stopping.set()
        self.join()
        return self.peak


def _connect(addr):
    s = socket.create_connection(addr, timeout=30)
    return s


def case_prefaces(addr):
    for _ in range(20):
        conns = [_connect(addr) for _ in range(50)]
        for c in conns:
            c.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        time.sleep(0.05)
        for c in conns:
            c.close()


def case_pipelined(addr):
    s = _connect(addr)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 100_000)
    time.sleep(3)
    s.close()


def case_idle(addr):
    conns = [_connect(addr) for _ in range(1000)]
    time.sleep(5)
    for c in conns:
        c.close()


def case_never_reads(addr):
    """Two clients that pipeline requests and never read: what the main thread
    waits on them shows in the scraper's slowest scrape."""
    conns = [_connect(addr) for _ in range(2)]
    for c in conns:
        c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 2000)
    time.sleep(6)
    for c in conns:
        c.close()


def case_header_line(addr, mb=10):
    s = _connect(addr)
    s.sendall(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * (mb << 20))
    time.sleep(2)
    s.close()


def case_huge_body(addr):
    s = _connect(addr)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000000\r\n\r\n")
    time.sleep(2)
    s.close()


def case_trickled_body(addr):
    s = _connect(addr)
    s.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
    for _ in range(20):
        try:
            s.sendall(b"z")
        except OSError:
            break
        time.sleep(0.2)
    s.close()


CASES = [
    ("1,000 HTTP/2 prefaces", case_prefaces),
    ("100,000 pipelined requests never read", case_pipelined),
    ("1,000 idle connections", case_idle),
    ("2 clients pipelining 2,000 requests, never reading", case_never_reads),
    ("a 10 MB header line", case_header_line),
    ("Content-Length: 100000000000, no body", case_huge_body),
    ("a POST body trickled, a byte every 200 ms", case_trickled_body),
]


def hostile(exporter, log):
    addr = host_port(exporter.url)
    out = []
    for name, case in CASES:
        time.sleep(3)
        before = proc_status(exporter.pid)
        peak = Peak(exporter.pid)
        peak.start()
        scraper = Scraper(exporter.url)
        scraper.start()
        t = time.monotonic()
        case(addr)
        lasted = time.monotonic() - t
        back = back_to(exporter.pid, before)
        time.sleep(1)
        sc = scraper.finish()
        out.append({"case": name, "lasted_s": round(lasted, 1), "before": before,
                    "peak": peak.finish(), "back_after_close_s": back,
                    "after": proc_status(exporter.pid), **sc})
        log(f"hostile: {out[-1]}")
    return out


def report(soaked, cases, heals):
    k = soaked["keepalive"]
    lines = ["", "## The HTTP side: soak and hostile clients (release build)", ""]
    lines.append(
        f"Soak, {soaked['seconds']} s against a real Prefect server: the keep-alive client "
        f"(every 5 s) sent {k['sent']} scrapes, {k['answered']} answered, worst "
        f"{k['worst_s'] * 1000:.1f} ms, median {k['median_s'] * 1000:.2f} ms, "
        f"{k['reconnects']} new connections after the first; failures: {k['failures'] or 'none'}.")
    lines.append("")
    lines.append("| Prometheus | scrapes expected | samples of `up` | of them up | slowest scrape |")
    lines.append("|---|---|---|---|---|")
    for iv, p in soaked["prometheus"].items():
        w = p["worst_s"]
        lines.append(f"| every {iv} s | {p['expected']} | {p['samples']:.0f} | {p['up']:.0f} | "
                     f"{w * 1000:.1f} ms |" if w is not None else f"| every {iv} s | - | - | - | - |")
    s, e = soaked["start"], soaked["end"]
    lines.append("")
    lines.append(f"Exporter at the start / end: RSS {s['rss_kb']} / {e['rss_kb']} kB, "
                 f"descriptors {s['fds']} / {e['fds']}, threads {s['threads']} / {e['threads']}.")
    lines.append("")
    lines.append("Each hostile case alone, a scraper on a new connection every 250 ms meanwhile; "
                 "\"back\" is the time from the clients' close until the process is within 10 "
                 "descriptors, 4 threads and 2 MB of its level before:")
    lines.append("")
    lines.append("| case | peak RSS kB / threads / descriptors | before | back after | "
                 "scrapes (failed) | slowest scrape |")
    lines.append("|---|---|---|---|---|---|")
    for c in cases:
        p, b = c["peak"], c["before"]
        worst = f"{c['worst_s'] * 1000:.0f} ms" if c["worst_s"] is not None else "-"
        back = f"{c['back_after_close_s']} s" if c["back_after_close_s"] is not None else "not in 60 s"
        lines.append(f"| {c['case']} | {p['rss_kb']} / {p['threads']} / {p['fds']} | "
                     f"{b['rss_kb']} / {b['threads']} / {b['fds']} | {back} | "
                     f"{c['scrapes']} ({c['failed']}) | {worst} |")
    lines.append("")
    lines.append(f"Starts afresh during the hostile cases (same PID): {heals}.")
    return "\n".join(lines) + "\n"
