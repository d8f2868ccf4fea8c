#!/usr/bin/env python3
"""`make bench` driver (stdlib only; scripts/bench.sh builds and installs, then runs this).

Steps:
 1. Prefect databases with SMALL_RUNS flow runs filled through the REST API
    (fill.py), RUNS and XL_RUNS runs made of SQL copies of those (fill_db.py),
    and XL_RUNS plus LATE_DEPLOYMENTS deployments with a late run each, cached
    under bench/work/cache/<key>/, key = hash of the fill parameters and
    Prefect's version. A rerun copies the cached databases and skips the fill.
    Every server started on one first checks that the API's counts (total, per
    state, late runs per deployment) equal what the database holds.
 2. Two real Prefect servers (SMALL_RUNS and RUNS runs) on free loopback ports.
 3. Requests per collection at both sizes, through a counting pass-through proxy
    (proxy.py): the start-up (collections and requests until 3 collections in a
    row ask the same) and then REQ_COLLECTIONS steady collections. Only counts
    are taken through the proxy.
 4. Without the proxy, against the RUNS server, after the same warm-up:
    - exporter CPU per collection: utime+stime (and the per-thread schedstat sum)
      over COLLECTIONS collections while nothing scrapes;
    - collection wall time: prefect_exporter_collect_duration_seconds and the
      per-collector durations, sampled once per collection, COLLECTIONS samples;
    - /metrics under wrk (CONNECTIONS connections, THREADS threads, WRK_SECONDS)
      while collections keep running; RSS sampled every 100 ms;
    - wrk again, in rounds, until at least SCRAPES more requests; RSS after each.
 5. The static binary dist/prefect-exporter, if present (what the image runs):
    RSS idle and under the same wrk load.
 6. Binary and image sizes, machine description, bench/RESULTS.md (printed).
 7. The Prefect server's cost (server_cost) at SMALL_RUNS, RUNS and XL_RUNS
    runs, then with the LATE_DEPLOYMENTS: its CPU from /proc minus its idle
    rate, per steady collection and from start until steady, next to the
    exporter's own CPU, requests and wall time per collection.

Nothing here knows which collect groups the exporter has: it reads the
per-collector series the binary exposes and counts whatever requests it sends.
Every process started here is stopped at the end (also on error or Ctrl-C); their
pids are also listed in bench/work/run/pids for scripts/bench.sh's trap.

Environment (defaults): BENCH_RUNS=20000 BENCH_SMALL_RUNS=1000 BENCH_INTERVAL=2
BENCH_COLLECTIONS=30 BENCH_REQ_COLLECTIONS=5 BENCH_WRK_SECONDS=10
BENCH_SCRAPES=1000000 BENCH_CONNECTIONS=16 BENCH_THREADS=2
BENCH_SCRAPE_MAX_SECONDS=240 (time cap of the million-scrape phase)
BENCH_WARMUP_MAX_SECONDS=180 (time cap of the start-up before steady state)
BENCH_LOOKBACK=3650d (EXPORTER_LOOKBACK of the exporter)
BENCH_BINARY (default target/release/prefect-exporter: another build to compare)
BENCH_EXPORTER_ENV (extra exporter environment, e.g. "MALLOC_ARENA_MAX=1")
BENCH_NO_STATIC=1 (skip step 5)
BENCH_FILL_ONLY=1 (only fill and cache the database)
BENCH_XL_RUNS=100000 BENCH_LATE_DEPLOYMENTS=300 BENCH_COST_COLLECTIONS=30
BENCH_LATE_INTERVAL=10 BENCH_LATE_COLLECTIONS=22
BENCH_COST_ONLY=1 (only step 7, printed, RESULTS.md untouched)
BENCH_COST_CASES=small,large,xl,large-neglected,xl-neglected,xl-late (the
databases of step 7; the neglected ones keep the base's 14 % of runs in progress
and 3 % late at every size: fill_db.py)
BENCH_HTTP_ONLY=1 (only step 8, printed, RESULTS.md untouched)
BENCH_HTTP_DB (step 8's database, instead of the cached small one)
BENCH_SOAK_SECONDS=600 (step 8's soak)
BENCH_BINARY_BEFORE (another build for step 8's wrk comparison, e.g. the
  previous release)

 8. The HTTP side (http_side.py), on a real Prefect server with the small
    database: a soak with real Prometheus servers at 15 s and 60 s and a
    keep-alive client at 5 s, the cost of each hostile client, and wrk's
    throughput and p99 (of BENCH_BINARY_BEFORE too, if set).
"""

import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import fill
import fill_db
import http_side

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
WORK = BENCH / "work"
RUN = WORK / "run"
CACHE = WORK / "cache"
BINARY = Path(os.environ.get("BENCH_BINARY") or ROOT / "target" / "release" / "prefect-exporter")
VENV = Path(os.environ.get("PREFECT_VENV", ROOT / ".venv"))
PREFECT = VENV / "bin" / "prefect"
RESULTS = BENCH / "RESULTS.md"
STATIC = ROOT / "dist" / "prefect-exporter"

RSS_LIMIT = 5_000_000  # bytes: "RSS under 5 MB", taken strictly (4.77 MiB)
GROWTH_TOLERANCE = 64 * 1024  # bytes over >= 1e6 scrapes, i.e. < 0.07 B/scrape
SCRAPE_TARGET = 15_000
WALL_TARGET = 0.5
CPU_TARGET = 0.005


def env_int(name, default):
    return int(os.environ.get(name, default))


# The exporter's breakdown reuse factor (collect::flow_runs::COST_FACTOR),
# read from the source so that the derived cost follows it.
COST_FACTOR = int(re.search(
    r"pub const COST_FACTOR: u32 = (\d+);",
    (Path(__file__).resolve().parent.parent / "src/collect/flow_runs.rs").read_text()).group(1))

CFG = {
    "runs": env_int("BENCH_RUNS", 20000),
    "small_runs": env_int("BENCH_SMALL_RUNS", 1000),
    "xl_runs": env_int("BENCH_XL_RUNS", 100000),
    "late_deployments": env_int("BENCH_LATE_DEPLOYMENTS", 300),
    "cost_collections": env_int("BENCH_COST_COLLECTIONS", 30),
    "interval": env_int("BENCH_INTERVAL", 2),
    "collections": env_int("BENCH_COLLECTIONS", 30),
    "req_collections": env_int("BENCH_REQ_COLLECTIONS", 5),
    "wrk_seconds": env_int("BENCH_WRK_SECONDS", 10),
    "scrapes": env_int("BENCH_SCRAPES", 1_000_000),
    "connections": env_int("BENCH_CONNECTIONS", 16),
    "threads": env_int("BENCH_THREADS", 2),
    "scrape_max_seconds": env_int("BENCH_SCRAPE_MAX_SECONDS", 240),
    "warmup_max_seconds": env_int("BENCH_WARMUP_MAX_SECONDS", 180),
    "lookback": os.environ.get("BENCH_LOOKBACK", "3650d"),
}
# Through the proxy every answer is slower; a longer interval keeps collections
# apart so that each count belongs to one collection.
PROXY_INTERVAL = max(3, CFG["interval"])


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class Stop(Exception):
    pass


def on_signal(signum, _frame):
    raise Stop(f"signal {signum}")


# ---------------------------------------------------------------- processes


class Procs:
    """Every child started here; stopped in reverse order by stop_all()."""

    def __init__(self, pidfile):
        self.pidfile = pidfile
        self.items = []

    def start(self, name, argv, **kw):
        p = subprocess.Popen(argv, start_new_session=True, **kw)
        self.items.append((name, p))
        with open(self.pidfile, "a") as f:
            f.write(f"{p.pid} {name}\n")
        return p

    def stop(self, p, grace=15.0):
        """SIGTERM, then SIGKILL after `grace` s; returns the exit code."""
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(grace)
            except subprocess.TimeoutExpired:
                log(f"pid {p.pid} ignored SIGTERM for {grace} s: SIGKILL")
                p.kill()
                p.wait()
        self.items = [(n, q) for n, q in self.items if q is not p]
        return p.returncode

    def stop_all(self):
        for _name, p in reversed(list(self.items)):
            self.stop(p)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what, pred, timeout, step=0.05, alive=None):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {alive.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout} s")
        time.sleep(step)


def http_get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def tail(path, n=20):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------- Prefect


def prefect_env(home):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED="false",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
    )
    return env


class PrefectServer:
    def __init__(self, procs, name, home):
        self.procs, self.name, self.home = procs, name, Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = None
        self.proc = None

    @property
    def base(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self):
        return fill.Api(self.base + "/api")

    def start(self):
        self.port = free_port()
        self.log = self.home / "server.log"
        self.proc = self.procs.start(
            f"prefect-server-{self.name}",
            [str(PREFECT), "server", "start", "--host", "127.0.0.1",
             "--port", str(self.port), "--no-services"],
            env=prefect_env(self.home),
            stdout=open(self.log, "w"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.started = time.monotonic()

    def wait_ready(self):
        def healthy():
            try:
                return http_get(self.base + "/api/health", timeout=2) == b"true"
            except OSError:
                return False

        try:
            wait_until(f"Prefect server {self.name}", healthy, 180, 0.25, self.proc)
        except RuntimeError:
            log(f"server log:\n{tail(self.log)}")
            raise
        log(f"Prefect server {self.name} ready on port {self.port} "
            f"after {time.monotonic() - self.started:.0f} s")

    def stop(self):
        if self.proc is not None:
            self.procs.stop(self.proc)
            self.proc = None

    @property
    def db(self):
        return self.home / "prefect.db"


def backup_db(src, dst):
    """A consistent copy of a live SQLite database (the server is idle)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    s = sqlite3.connect(str(src))
    d = sqlite3.connect(str(dst))
    with d:
        s.backup(d)
    d.close()
    s.close()


def prefect_version():
    out = subprocess.run(
        [str(VENV / "bin" / "python"), "-c",
         "import importlib.metadata as m; print(m.version('prefect'))"],
        capture_output=True, text=True, check=True)
    return out.stdout.strip()


def ensure_cache(procs):
    """small.db (SMALL_RUNS runs through the REST API), large.db (RUNS) and
    xl.db (XL_RUNS): copies of small.db's runs (fill_db.py), and xl-late.db: xl.db
    plus LATE_DEPLOYMENTS deployments with a late run each (REST)."""
    params = fill.plan_params(CFG["runs"], CFG["small_runs"])
    params["prefect"] = prefect_version()
    params["fill"] = "rest-base-then-sql-copies-v4-neglected"
    params["xl_runs"] = CFG["xl_runs"]
    params["late_deployments"] = CFG["late_deployments"]
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    final = CACHE / key
    if (final / "meta.json").exists():
        meta = json.loads((final / "meta.json").read_text())
        log(f"cached database {final.relative_to(ROOT)} "
            f"(filled in {meta['fill_seconds']:.0f} s): no fill needed")
        return final, meta
    log(f"no cached database for these parameters (key {key}): filling "
        f"{CFG['small_runs']} runs through the REST API, then copies up to "
        f"{CFG['runs']} and {CFG['xl_runs']} runs with SQL (a few minutes, once)")
    tmp = CACHE / f"{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    server = PrefectServer(procs, "fill", tmp / "home")
    t0 = time.monotonic()
    server.start()
    server.wait_ready()
    api = server.api
    flow_ids, dep_ids = fill.setup(api)
    states = fill.state_list(CFG["small_runs"])
    fill.fill_range(api, flow_ids, dep_ids, states, 0, CFG["small_runs"], log)
    small = fill.verify(api, states)
    backup_db(server.db, tmp / "small.db")
    server.stop()
    rest_seconds = time.monotonic() - t0
    sizes_meta = {}
    for name, runs, keep_active in (
            ("large", CFG["runs"], False), ("xl", CFG["xl_runs"], False),
            ("large-neglected", CFG["runs"], True), ("xl-neglected", CFG["xl_runs"], True)):
        t1 = time.monotonic()
        shutil.copy(tmp / "small.db", tmp / f"{name}.db")
        fill_db.multiply(tmp / f"{name}.db", runs, log, keep_active=keep_active)
        sizes_meta[name] = {"runs": runs, "seconds": time.monotonic() - t1}
    t1 = time.monotonic()
    server = PrefectServer(procs, "fill-late", tmp / "home-late")
    shutil.copy(tmp / "xl.db", server.db)
    server.start()
    server.wait_ready()
    fill_db.add_late_deployments(server.api, CFG["late_deployments"], fill.WORK_POOL, log)
    backup_db(server.db, tmp / "xl-late.db")
    server.stop()
    sizes_meta["xl-late"] = {"seconds": time.monotonic() - t1}
    meta = {
        "params": params,
        "fill_seconds": time.monotonic() - t0,
        "rest_seconds": rest_seconds,
        "sizes": sizes_meta,
        "method": (f"REST: POST /api/deployments/{{id}}/create_flow_run/bulk (100 runs per "
                   f"call) + POST /api/flow_runs/ for runs without deployment, "
                   f"{CFG['small_runs']} runs in {rest_seconds:.0f} s; then SQL copies of "
                   f"those flow_run rows (bench/fill_db.py) up to {CFG['runs']:,} and "
                   f"{CFG['xl_runs']:,} runs, each checked against the API when used"),
        "small": small,
        "filled_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(tmp / "home", ignore_errors=True)
    shutil.rmtree(tmp / "home-late", ignore_errors=True)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    log(f"filled and cached in {meta['fill_seconds']:.0f} s: {final.relative_to(ROOT)}")
    return final, meta


def start_checked(procs, name, db):
    """A Prefect server on a copy of `db`, after checking that the API's counts
    equal what the database holds (fill_db.check_api)."""
    server = PrefectServer(procs, name, RUN / f"prefect-{name}")
    shutil.copy(db, server.db)
    want = fill_db.expected_counts(server.db)
    server.start()
    server.wait_ready()
    checks = fill_db.check_api(server.api, want)
    log(f"{name}: the API's counts match the database ({want['total']:,} runs, "
        f"{checks} counts compared)")
    server.want = want
    server.checks = checks
    return server


# ---------------------------------------------------------------- exporter


def parse_metrics(text):
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        try:
            out[series] = float(value)
        except ValueError:
            pass
    return out


class Exporter:
    def __init__(self, procs, name, api_url, interval=None, binary=None, extra_env=None):
        self.log = RUN / f"exporter-{name}.log"
        home = RUN / f"exporter-{name}-home"  # no user profiles.toml
        home.mkdir(parents=True, exist_ok=True)
        # A minimal, explicit environment, the same on every machine: nothing
        # inherited (e.g. SSL_CERT_FILE, set on some hosts, makes the exporter load
        # the whole CA bundle). BENCH_EXPORTER_ENV="K=V ..." adds to it.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        for kv in os.environ.get("BENCH_EXPORTER_ENV", "").split():
            k, _, v = kv.partition("=")
            env[k] = v
        env.update(
            PREFECT_HOME=str(home),
            PREFECT_API_URL=api_url,
            EXPORTER_PORT="0",
            EXPORTER_ADDRESS="127.0.0.1",
            EXPORTER_INTERVAL=str(interval or CFG["interval"]),
            EXPORTER_CHECK_DEPLOYMENTS=",".join(fill.CHECK_DEPLOYMENTS),
            # Not the 7 d default: the cached runs ended when the cache was
            # filled, and the start-up pass over ended runs must not depend on
            # the age of the cache.
            EXPORTER_LOOKBACK=CFG["lookback"],
            LOG_LEVEL="INFO",
        )
        env.update(extra_env or {})
        self.procs = procs
        self.proc = procs.start(
            f"exporter-{name}", [str(binary or BINARY)], env=env,
            stdout=subprocess.DEVNULL, stderr=open(self.log, "w"),
            stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid

        def listening():
            m = re.search(r"listening on (http://\S+/metrics)", tail(self.log, 50))
            return m and m.group(1)

        self.url = wait_until("exporter start", listening, 30, 0.02, self.proc)

    def metrics(self):
        return parse_metrics(http_get(self.url).decode())

    def collections(self):
        return int(self.metrics().get("prefect_exporter_collections_total", 0))

    def stop(self):
        return self.procs.stop(self.proc, grace=5)


def cpu_of(pid):
    """(utime+stime in s, clock-tick based; sum of the threads' schedstat run time in s)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    rest = stat[stat.rfind(")") + 2:].split()
    ticks = int(rest[11]) + int(rest[12])
    ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            ns += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK"), ns / 1e9


def mem_of(pid):
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) * 1024
        elif k == "Threads":
            out[k] = int(v)
    return out


def smaps(pid):
    """Resident KiB per mapping (file name, [heap], [stack], or "anon"), largest first."""
    out = {}
    name = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(None, 1)[0]
        if "-" in first and not first.endswith(":"):
            parts = line.split()
            name = parts[5] if len(parts) > 5 else "anon"
        elif first == "Rss:":
            out[name] = out.get(name, 0) + int(line.split()[1])
    return dict(sorted(((k, v) for k, v in out.items() if v), key=lambda kv: -kv[1]))


class RssSampler(threading.Thread):
    def __init__(self, pid, period=0.1):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.max_rss = 0
        self.max_sample = {}
        self.max_threads = 0
        self.samples = 0
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            try:
                m = mem_of(self.pid)
            except OSError:
                return
            if m["VmRSS"] > self.max_rss:
                self.max_rss, self.max_sample = m["VmRSS"], m
            self.max_threads = max(self.max_threads, m["Threads"])
            self.samples += 1
            self.halt.wait(self.period)

    def stop(self):
        self.halt.set()
        self.join()


# ---------------------------------------------------------------- measurements


def requests_per_collection(procs, server, name):
    """Counts the exporter's requests per collection through proxy.py."""
    portfile = RUN / f"proxy-{name}.port"
    proxy = procs.start(
        f"proxy-{name}", [sys.executable, str(BENCH / "proxy.py"), server.base, str(portfile)],
        stdout=subprocess.DEVNULL, stderr=open(RUN / f"proxy-{name}.log", "w"),
        stdin=subprocess.DEVNULL)
    port = wait_until("proxy start", lambda: portfile.exists() and portfile.read_text(),
                      10, 0.02, proxy)
    counts_url = f"http://127.0.0.1:{port}/__bench/counts"

    def counts():
        return json.loads(http_get(counts_url))

    # A count read right after collections_total moved belongs to exactly the
    # collections so far, provided the next one has not started yet: the next
    # starts `interval` after the start of the one that just ended and the count
    # is read within ~50 ms, so a collection is "clean" when it took less than
    # interval - 0.25 s and so did the one before it.
    interval = PROXY_INTERVAL
    exp = Exporter(procs, f"proxy-{name}", f"http://127.0.0.1:{port}/api", interval)
    k = CFG["req_collections"]
    clean_limit = interval - 0.25
    entries = []  # clean collections: (collection number, entry)
    first = None
    startup = None  # (collections, requests) before the steady state
    dropped = 0
    prev = {"total": 0, "by_path": {}}
    last_c = 0
    prev_clean = True
    deadline_s = CFG["warmup_max_seconds"] + (k + 4) * interval * 2
    deadline = time.monotonic() + deadline_s
    steady = True
    while True:
        if time.monotonic() > deadline:
            log(f"requests per collection ({name}): no {k} identical collections in a row "
                f"within {deadline_s:.0f} s; reporting the last {k} clean ones")
            steady = False
            entries = entries[-k:]
            if not entries:
                raise RuntimeError(f"requests per collection ({name}): no clean collection; "
                                   f"see {exp.log}")
            startup = (entries[0]["collection"] - 1, entries[0]["before"])
            break
        m = exp.metrics()
        c = int(m.get("prefect_exporter_collections_total", 0))
        if c > last_c:
            now = counts()
            delta = {p: n - prev["by_path"].get(p, 0) for p, n in now["by_path"].items()
                     if n - prev["by_path"].get(p, 0)}
            entry = {"collection": c, "total": now["total"] - prev["total"],
                     "by_path": delta, "before": prev["total"],
                     "bytes": now.get("bytes", 0) - prev.get("bytes", 0),
                     "duration": m["prefect_exporter_collect_duration_seconds"],
                     "up": m.get("prefect_up")}
            this_clean = entry["duration"] < clean_limit
            if first is None:
                first = entry
            elif c - last_c == 1 and this_clean and prev_clean and entry["up"] == 1:
                entries.append(entry)
            else:
                dropped += 1
            prev_clean = this_clean
            prev, last_c = now, c
            # Steady: the last k clean collections are consecutive and ask the
            # same. (Fewer is not enough: a time-sliced start-up pass over ended
            # runs can ask the same in a few collections in a row, then less.)
            if len(entries) >= k:
                last = entries[-k:]
                if (last[-1]["collection"] - last[0]["collection"] == k - 1
                        and all(e["by_path"] == last[0]["by_path"] for e in last)):
                    startup = (last[0]["collection"] - 1, last[0]["before"])
                    entries = last
                    break
        time.sleep(0.02)
    m = exp.metrics()
    exp.stop()
    procs.stop(proxy)
    per = entries
    return {
        "name": name,
        "first": first,
        "startup_collections": startup[0],
        "startup_requests": startup[1],
        "steady": [e["total"] for e in per],
        "steady_bytes": [e["bytes"] for e in per],
        "first_bytes": first["bytes"] if first else None,
        "reached_steady": steady,
        "steady_by_path": per[-1]["by_path"],
        "all_by_path_equal": all(e["by_path"] == per[0]["by_path"] for e in per),
        "dropped": dropped,
        "up": m.get("prefect_up"),
        "collect_errors": m.get("prefect_exporter_collect_errors_total"),
    }


def proc_cpu(pid):
    """utime+stime of a process in seconds (clock ticks), its exited threads included."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    rest = stat[stat.rfind(")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def history_body():
    now = time.time()
    return {
        "history_start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 630720000)),
        "history_end": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 630720000)),
        "history_interval_seconds": 1261440000,
    }


def server_cost(procs, name, db, interval, collections):
    """The Prefect server's CPU (utime+stime of its process minus its idle rate)
    while one exporter starts and collects: per collection in steady state, and
    from start until steady; plus the exporter's own CPU, its requests per
    collection (its own prefect_exporter_api_requests_total), wall times, and
    one breakdown read (POST /flow_runs/history) measured on its own."""
    server = start_checked(procs, f"cost-{name}", db)
    pid = server.proc.pid
    time.sleep(5)  # the checks' requests are over
    c0, t0 = proc_cpu(pid), time.monotonic()
    time.sleep(15)
    idle = (proc_cpu(pid) - c0) / (time.monotonic() - t0)
    log(f"{name}: server idle {idle * 1000:.1f} ms of CPU per second")
    sc0, st0 = proc_cpu(pid), time.monotonic()
    exp = Exporter(procs, f"cost-{name}", server.base + "/api", interval)
    ec0 = proc_cpu(exp.pid)
    per = []
    last_c = 0
    deadline = time.monotonic() + collections * interval * 3 + 120
    while last_c < collections:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: {collections} collections not within the time")
        m = exp.metrics()
        c = int(m.get("prefect_exporter_collections_total", 0))
        if c > last_c:
            per.append({
                "collection": c,
                "t": time.monotonic() - st0,
                "server_cpu": proc_cpu(pid) - sc0,
                "exporter_cpu": proc_cpu(exp.pid) - ec0,
                "requests": sum(v for k, v in m.items()
                                if k.startswith("prefect_exporter_api_requests_total")),
                "duration": m.get("prefect_exporter_collect_duration_seconds"),
                "age": m.get("prefect_flow_runs_age_seconds"),
                "up": m.get("prefect_up"),
                "last_runs": sum(1 for k in m
                                 if k.startswith("prefect_deployment_last_run_timestamp_seconds{")),
                "skipped": c - last_c - 1,
            })
            last_c = c
        time.sleep(0.1)
    exp.stop()
    read = breakdown_read_cost(procs, name, server, idle, interval)
    # One history read on its own: server CPU and wall time per call.
    hist = []
    for _ in range(5):
        c1, t1 = proc_cpu(pid), time.monotonic()
        server.api.post("/flow_runs/history", history_body())
        t2 = time.monotonic()
        hist.append((proc_cpu(pid) - c1 - idle * (t2 - t1), t2 - t1))
    server.stop()
    reqs = [b["requests"] - a["requests"] for a, b in zip([{"requests": 0}] + per, per)]
    for e, r in zip(per, reqs):
        e["req"] = r
    tail_reqs = sorted(reqs[len(reqs) // 2:])
    steady_req = tail_reqs[len(tail_reqs) // 2]
    # Steady from the first collection after which no one asks more than the
    # steady count plus one (a breakdown read). Fewer is steady too: the event
    # counters send nothing during EXPORTER_EVENTS_SETTLE after the start, which
    # at a 2 s interval would otherwise count 15 cheap collections as start-up.
    # A breakdown read by counts per state name adds about 21 requests to its
    # collection: such a collection is steady too.
    def read_now(e):
        return e["age"] is not None and e["age"] < interval

    s = len(per) - 1
    while s > 1 and (reqs[s - 1] <= steady_req + 1 or read_now(per[s - 1])):
        s -= 1
    s = max(s, 1)
    start = per[s - 1]
    end = per[-1]
    n = len(per) - s
    steady_cpu = end["server_cpu"] - start["server_cpu"] - idle * (end["t"] - start["t"])
    reads = sum(1 for e in per[s:] if read_now(e))
    hist_cpu = statistics.median(h[0] for h in hist)
    hist_wall = statistics.median(h[1] for h in hist)
    reuse = min(COST_FACTOR * read["wall"], 600)
    non_read = [e for e in per[s:] if not read_now(e)]
    steady_ex_read = (steady_cpu - reads * read["cpu"]) / n
    res = {
        "name": name,
        "runs": server.want["total"],
        "checks": server.checks,
        "interval": interval,
        "idle_per_s": idle,
        "startup_collections": s,
        "startup_requests": start["requests"],
        "startup_server_cpu": start["server_cpu"] - idle * start["t"],
        "startup_seconds": start["t"],
        "first_duration": per[0]["duration"],
        "first_last_runs": per[0]["last_runs"],
        "steady_last_runs": end["last_runs"],
        "steady_collections": n,
        "steady_requests": steady_req,
        "steady_requests_set": sorted(set(reqs[s:])),
        "steady_server_cpu_per_collection": steady_cpu / n,
        "steady_breakdown_reads": reads,
        "steady_server_cpu_without_read": steady_ex_read,
        "non_read_collections": len(non_read),
        "history_cpu": hist_cpu,
        "history_wall": hist_wall,
        "read": read,
        "reuse_seconds": reuse,
        # At most one read per collection: every ceil(reuse / 30 s)-th one.
        "per_collection_at_30s": steady_ex_read + read["cpu"] / math.ceil(reuse / 30),
        "exporter_cpu_per_collection": (end["exporter_cpu"] - start["exporter_cpu"]) / n,
        "duration_median": statistics.median(e["duration"] for e in per[s:]),
        "duration_max": max(e["duration"] for e in per[s:]),
        "failed": sum(1 for e in per if e["up"] != 1),
        "per": per,
    }
    log(f"{name}: start-up {s} collections, {res['startup_requests']:.0f} requests, "
        f"server {res['startup_server_cpu'] * 1000:.0f} ms; steady {steady_req} requests, "
        f"server {res['steady_server_cpu_per_collection'] * 1000:.1f} ms per collection "
        f"({reads} breakdown reads), breakdown read by {read['method']} "
        f"{read['cpu'] * 1000:.0f} ms, history {hist_cpu * 1000:.0f} ms")
    return res


def phase_cpu(procs, name, server, idle, interval, extra_env, collections=8):
    """Server CPU (minus idle) and the exporter's requests per collection, and
    the median wall time of each group, for `collections` collections after
    the first two, of an exporter with `extra_env`."""
    pid = server.proc.pid
    exp = Exporter(procs, name, server.base + "/api", interval, extra_env=extra_env)
    rows = []
    last_c = 0
    deadline = time.monotonic() + (collections + 2) * interval * 3 + 60
    while len(rows) < collections + 3:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: {collections} collections not within the time")
        m = exp.metrics()
        c = int(m.get("prefect_exporter_collections_total", 0))
        if c > last_c:
            rows.append((c, time.monotonic(), proc_cpu(pid),
                         sum(v for k, v in m.items()
                             if k.startswith("prefect_exporter_api_requests_total")),
                         collector_labels(m)))
            last_c = c
        time.sleep(0.05)
    exp.stop()
    a, b = rows[2], rows[-1]
    n = b[0] - a[0]
    walls = {}
    for r in rows[3:]:
        for k, v in r[4].items():
            walls.setdefault(k, []).append(v)
    return {
        "cpu": (b[2] - a[2] - idle * (b[1] - a[1])) / n,
        "requests": (b[3] - a[3]) / n,
        "walls": {k: statistics.median(v) for k, v in walls.items()},
    }


def breakdown_read_cost(procs, name, server, idle, interval):
    """What one per-state breakdown read costs the server as the exporter
    makes it: an exporter reading it every collection (the flow_runs group
    alone, EXPORTER_FLOW_RUNS_MAX_AGE=0) minus one without the group (the seed
    counts alone), per collection. Since issue 23 the group alone also counts
    the late runs (1 request, 2-5 ms), included here; before it, a build could
    read the breakdown by 20 counts per state name, which the request count
    tells."""
    reading = phase_cpu(procs, f"read-{name}", server, idle, interval, {
        "EXPORTER_COLLECTORS": "flow_runs", "EXPORTER_FLOW_RUNS_MAX_AGE": "0"})
    seed = phase_cpu(procs, f"seed-{name}", server, idle, interval, {
        "EXPORTER_COLLECTORS": "seed"})
    requests = reading["requests"] - seed["requests"]
    res = {
        "cpu": reading["cpu"] - seed["cpu"],
        "wall": reading["walls"].get("flow_runs", 0.0),
        "requests": requests,
        "method": "history" if requests < 5 else "names",
    }
    log(f"{name}: one breakdown read by {res['method']}: {requests:.1f} requests, server "
        f"{res['cpu'] * 1000:.1f} ms, wall {res['wall'] * 1000:.1f} ms")
    return res


def collector_labels(m):
    out = {}
    for series, v in m.items():
        mm = re.fullmatch(r'prefect_exporter_collector_duration_seconds\{collector="([^"]*)"\}',
                          series)
        if mm:
            out[mm.group(1)] = v
    return out


WRK_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def run_wrk(url, seconds):
    argv = ["wrk", f"-t{CFG['threads']}", f"-c{CFG['connections']}", f"-d{seconds}s",
            "--latency", "--timeout", "5s", url]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    r = {"raw": out, "seconds": seconds}
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    r["requests"] = int(m.group(1))
    r["elapsed"] = float(m.group(2)) * WRK_UNITS[m.group(3)]
    r["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    r["latency"] = {}
    for pct, val, unit in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M):
        r["latency"][int(pct)] = float(val) * WRK_UNITS[unit]
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    m = re.search(r"Latency\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", out)
    if m:
        r["latency_avg"] = float(m.group(1)) * WRK_UNITS[m.group(2)]
        r["latency_max"] = float(m.group(5)) * WRK_UNITS[m.group(6)]
    return r


def measure_exporter(procs, server, warmup):
    exp = Exporter(procs, "direct", server.base + "/api")
    pid = exp.pid
    n = CFG["collections"]
    interval = CFG["interval"]
    res = {"pid": pid}
    # Warm up: the first collections fetch the CSRF answer and the server version,
    # and may read a backlog (the start-up pass over ended runs). The counting
    # phase saw how many collections that took through the (slower) proxy: wait
    # at least as many here, so that the measurements below see the steady state.
    warm = max(3, warmup + 1)
    log(f"warm-up: waiting for {warm} collections")
    t = time.monotonic()
    try:
        wait_until(f"{warm} collections", lambda: exp.collections() >= warm,
                   CFG["warmup_max_seconds"], 0.1, exp.proc)
    except RuntimeError:
        log(f"warm-up cut after {CFG['warmup_max_seconds']} s (BENCH_WARMUP_MAX_SECONDS)")
    res["warmup"] = {"collections": exp.collections(), "seconds": time.monotonic() - t}
    res["rss_start"] = mem_of(pid)

    # 1. CPU per collection, no scrape inside the window.
    log(f"exporter CPU over ~{n} collections without scrapes ({n * interval} s)")
    m1 = exp.metrics()
    # perf stat, when installed, counts every thread to the nanosecond, also the
    # short-lived ones (which per-thread schedstat loses when they exit).
    perf = None
    if shutil.which("perf"):
        perf = procs.start("perf-stat",
                           ["perf", "stat", "-e", "task-clock", "-x", ",", "-p", str(pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.2)  # attached
    cpu1, t1 = cpu_of(pid), time.monotonic()
    time.sleep(n * interval + interval / 2)
    cpu2, t2 = cpu_of(pid), time.monotonic()
    perf_ms = None
    if perf is not None:
        perf.send_signal(signal.SIGINT)
        try:
            _, err = perf.communicate(timeout=10)
            mm = re.search(r"^([\d.]+),msec,task-clock", err, re.M)
            perf_ms = float(mm.group(1)) if mm else None
        except subprocess.TimeoutExpired:
            pass
        procs.stop(perf)
    m2 = exp.metrics()
    c = m2["prefect_exporter_collections_total"] - m1["prefect_exporter_collections_total"]
    res["cpu"] = {
        "collections": int(c),
        "window_s": t2 - t1,
        "ticks_s": cpu2[0] - cpu1[0],
        "sched_s": cpu2[1] - cpu1[1],
        "per_collection_ticks": (cpu2[0] - cpu1[0]) / c,
        "per_collection_sched": (cpu2[1] - cpu1[1]) / c,
        # perf's window is 0.2 s longer than the /proc one (attach), no collection
        # falls in it: the interval is >= 1 s and the window starts right after one.
        "perf_ms": perf_ms,
        "per_collection_perf": perf_ms / 1000 / c if perf_ms is not None else None,
        "errors": m2.get("prefect_exporter_collect_errors_total", 0)
        - m1.get("prefect_exporter_collect_errors_total", 0),
    }
    res["rss_idle"] = mem_of(pid)
    res["smaps_idle"] = smaps(pid)

    # 2. Wall time, sampled once per collection.
    log(f"collection wall time over {n} collections")
    samples = []
    last = int(m2["prefect_exporter_collections_total"])
    deadline = time.monotonic() + 30 + 3 * n * interval
    while len(samples) < n:
        if time.monotonic() > deadline:
            raise RuntimeError("collections stopped advancing")
        time.sleep(0.1)
        m = exp.metrics()
        cur = int(m["prefect_exporter_collections_total"])
        if cur > last:
            samples.append({
                "skipped": cur - last - 1,
                "duration": m["prefect_exporter_collect_duration_seconds"],
                "up": m.get("prefect_up"),
                "collectors": collector_labels(m),
            })
            last = cur
    res["samples"] = samples
    res["metrics_bytes"] = len(http_get(exp.url))
    res["series"] = sum(1 for _ in exp.metrics())

    # 3. Scrape load while collections keep running.
    log(f"wrk -t{CFG['threads']} -c{CFG['connections']} -d{CFG['wrk_seconds']}s on /metrics")
    mb_ = exp.metrics()
    sampler = RssSampler(pid)
    sampler.start()
    res["wrk"] = run_wrk(exp.url, CFG["wrk_seconds"])
    res["rss_load_max"] = sampler.max_rss
    res["rss_load_max_sample"] = dict(sampler.max_sample)
    res["threads_load_max"] = sampler.max_threads
    ma = exp.metrics()
    res["collections_during_load"] = int(ma["prefect_exporter_collections_total"]
                                         - mb_["prefect_exporter_collections_total"])
    res["failed_during_load"] = int(ma.get("prefect_exporter_collect_errors_total", 0)
                                    - mb_.get("prefect_exporter_collect_errors_total", 0))
    res["rss_after_load"] = mem_of(pid)

    # 4. A million scrapes (or more): wrk in about four rounds sized by the rate just
    #    measured; VmRSS after each round shows a plateau or a slope.
    target = CFG["scrapes"]
    rate = max(res["wrk"]["rps"], 1000.0)
    done, rounds = 0, []
    log(f"{target} scrapes (~{target / rate:.0f} s at {rate:.0f}/s)")
    budget_end = time.monotonic() + CFG["scrape_max_seconds"]
    while done < target:
        left = budget_end - time.monotonic()
        if left < 2:
            log(f"only {done} scrapes within BENCH_SCRAPE_MAX_SECONDS="
                f"{CFG['scrape_max_seconds']}: the scrape rate is too low; stopping there")
            break
        want = min(target - done, max(target // 4, 1))
        secs = min(int(left), max(2, math.ceil(want / rate * 1.05)))
        r = run_wrk(exp.url, secs)
        done += r["requests"]
        rounds.append({k: r[k] for k in ("requests", "elapsed", "rps", "non2xx", "socket_errors")})
        rounds[-1]["rss_after"] = mem_of(pid)["VmRSS"]
        rounds[-1]["scrapes_so_far"] = done
        rate = max(r["rps"], 1000.0)
    sampler.stop()
    res["million"] = {"requests": done, "rounds": rounds,
                      "rss_max_during": sampler.max_rss,
                      "rss_max_sample": dict(sampler.max_sample),
                      "threads_max": sampler.max_threads}
    res["rss_after_million"] = mem_of(pid)
    res["smaps_after_million"] = smaps(pid)
    m_end = exp.metrics()
    res["million"]["collections"] = int(m_end["prefect_exporter_collections_total"]
                                        - ma["prefect_exporter_collections_total"])
    res["million"]["failed"] = int(m_end.get("prefect_exporter_collect_errors_total", 0)
                                   - ma.get("prefect_exporter_collect_errors_total", 0))
    res["end"] = {
        "collections": m_end["prefect_exporter_collections_total"],
        "errors": m_end.get("prefect_exporter_collect_errors_total"),
        "up": m_end.get("prefect_up"),
    }
    t = time.monotonic()
    res["exit_code"] = exp.stop()
    res["exit_seconds"] = time.monotonic() - t
    return res


def build_revision(m):
    for series in m:
        mm = re.search(r'prefect_exporter_build_info\{.*revision="([^"]*)"', series)
        if mm:
            return mm.group(1)
    return "unknown"


def measure_static(procs, server, warm):
    """The shipped static binary (dist/, what the image runs): RSS idle and under
    the same wrk load, as a second opinion on memory (no libc.so to map)."""
    exp = Exporter(procs, "static", server.base + "/api", binary=STATIC)
    try:
        wait_until(f"{warm} collections", lambda: exp.collections() >= warm,
                   CFG["warmup_max_seconds"], 0.1, exp.proc)
    except RuntimeError:
        log("static binary: warm-up cut")
    time.sleep(CFG["interval"] + 0.5)
    res = {"idle": mem_of(exp.pid), "version": sh(str(STATIC), "--version"),
           "revision": build_revision(exp.metrics())}
    sampler = RssSampler(exp.pid)
    sampler.start()
    res["wrk"] = run_wrk(exp.url, CFG["wrk_seconds"])
    sampler.stop()
    res["load_max"] = sampler.max_rss
    res["after"] = mem_of(exp.pid)
    exp.stop()
    return res


# ---------------------------------------------------------------- report


def sh(*argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine():
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = ""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    rev = sh("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD")
    if sh("git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"):
        rev += " (+ uncommitted changes)"
    return {
        "nproc": sh("nproc"),
        "cpu": cpu,
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "rustc": sh("rustc", "--version"),
        "exporter": sh(str(BINARY), "--version") + f", git {rev}",
        "wrk": (sh("wrk", "-v") or "").splitlines()[0] if sh("wrk", "-v") else "",
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def loadavg():
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def sizes():
    out = {"release": BINARY.stat().st_size if BINARY.exists() else None}
    out["static"] = STATIC.stat().st_size if STATIC.exists() else None
    image = None
    note = "podman not installed"
    if shutil.which("podman"):
        p = subprocess.run(["podman", "image", "inspect", "prefect-exporter",
                            "--format", "{{.Size}}"], capture_output=True, text=True)
        if p.returncode == 0 and p.stdout.strip().isdigit():
            image = int(p.stdout.strip())
            tag = subprocess.run(["podman", "image", "inspect", "prefect-exporter",
                                  "--format", "{{.Created}}"], capture_output=True, text=True)
            note = f"podman image prefect-exporter, created {tag.stdout.strip()[:19]}"
        else:
            note = "no image prefect-exporter (run `make image`)"
    out["image"], out["image_note"] = image, note
    return out


def ms(s):
    return f"{s * 1000:.1f} ms"


def us(s):
    return f"{s * 1e6:.0f} µs" if s < 1e-3 else f"{s * 1000:.2f} ms"


def mb(b):
    return f"{b / 1e6:.2f} MB ({b // 1024} KiB)"


def split(m):
    return f"anon {m['RssAnon'] // 1024} + file {m['RssFile'] // 1024} KiB"


def verdict(ok):
    return "**pass**" if ok else "**MISS**"


def report(mach, load_start, load_end, pver, meta, req, perf, size, static):
    rows = []

    def row(what, value, target="", result=""):
        rows.append(f"| {what} | {value} | {target} | {result} |")

    # Requests per collection.
    small, large = req
    steady_small, steady_large = set(small["steady"]), set(large["steady"])
    constant = (small["reached_steady"] and large["reached_steady"]
                and len(steady_small) == 1 and steady_small == steady_large
                and small["all_by_path_equal"] and large["all_by_path_equal"]
                and small["steady_by_path"] == large["steady_by_path"])
    for r, runs in ((small, CFG["small_runs"]), (large, CFG["runs"])):
        vals = sorted(set(r["steady"]))
        row(f"Prefect requests per collection, {runs:,} runs (steady: {len(r['steady'])} "
            f"collections in a row{'' if r['reached_steady'] else ', NOT reached'})",
            "/".join(map(str, vals)),
            "constant, independent of run count" if r is large else "",
            verdict(constant) if r is large else "")
    row("Prefect requests in the first collection (CSRF probe, server version)",
        f"{large['first']['total']}")
    for r, runs in ((small, CFG["small_runs"]), (large, CFG["runs"])):
        row(f"Start-up before the steady state, {runs:,} runs (EXPORTER_LOOKBACK={CFG['lookback']})",
            f"{r['startup_collections']} collections, {r['startup_requests']} requests")
    by_path = ", ".join(f"`{p}` ×{n}" for p, n in sorted(large["steady_by_path"].items()))
    by_path_small = ", ".join(f"`{p}` ×{n}" for p, n in sorted(small["steady_by_path"].items()))
    # Wall time.
    samples = perf["samples"]
    durs = [s["duration"] for s in samples]
    med, mx = statistics.median(durs), max(durs)
    failed = sum(1 for s in samples if s["up"] != 1)
    row(f"Collection wall time at {CFG['runs']:,} runs, median ({len(durs)} collections)",
        ms(med), "< 500 ms", verdict(med < WALL_TARGET))
    row("Collection wall time, max", ms(mx), "< 500 ms", verdict(mx < WALL_TARGET))
    collectors = sorted({k for s in samples for k in s["collectors"]})
    for c in collectors:
        v = [s["collectors"][c] for s in samples if c in s["collectors"]]
        row(f"  collector `{c}`, median / max", f"{ms(statistics.median(v))} / {ms(max(v))}")
    row("Failed collections while sampling (prefect_up 0)", str(failed), "0", verdict(failed == 0))
    # CPU.
    cpu = perf["cpu"]
    row(f"Exporter CPU per collection, utime+stime ({cpu['collections']} collections, no scrapes)",
        ms(cpu["per_collection_ticks"]), "< 5 ms", verdict(cpu["per_collection_ticks"] < CPU_TARGET))
    if cpu.get("per_collection_perf") is not None:
        row("Exporter CPU per collection, `perf stat -e task-clock` over the same window "
            "(ns resolution, all threads)",
            ms(cpu["per_collection_perf"]), "< 5 ms",
            verdict(cpu["per_collection_perf"] < CPU_TARGET))
    # Scrapes.
    w = perf["wrk"]
    row(f"/metrics scrapes/s, wrk {CFG['connections']} connections {CFG['threads']} threads "
        f"{CFG['wrk_seconds']} s ({w['requests']:,} requests, "
        f"{perf['collections_during_load']} collections meanwhile)",
        f"{w['rps']:,.0f}", f">= {SCRAPE_TARGET:,}", verdict(w["rps"] >= SCRAPE_TARGET))
    lat = w["latency"]
    row("Collections failed during the scrape load (of those run meanwhile)",
        f"{perf['failed_during_load']} of {perf['collections_during_load']}, then "
        f"{perf['million']['failed']} of {perf['million']['collections']} during the "
        f"{perf['million']['requests']:,} scrapes")
    row("Scrape latency p50 / p75 / p90 / p99",
        " / ".join(us(lat[p]) for p in (50, 75, 90, 99) if p in lat))
    if "latency_max" in w:
        row("Scrape latency max", us(w["latency_max"]))
    errs = w["non2xx"] + w["socket_errors"] + sum(
        r["non2xx"] + r["socket_errors"] for r in perf["million"]["rounds"])
    row("Scrape errors (non-2xx, socket errors), all wrk runs", str(errs), "0", verdict(errs == 0))
    # Memory.
    idle = perf["rss_idle"]["VmRSS"]
    row(f"RSS idle (VmRSS, collections running, no scrapes; {split(perf['rss_idle'])})",
        mb(idle), "< 5 MB",
        verdict(idle < RSS_LIMIT))
    load_max = max(perf["rss_load_max"], perf["million"]["rss_max_during"])
    load_sample = (perf["rss_load_max_sample"] if perf["rss_load_max"] >= load_max
                   else perf["million"]["rss_max_sample"])
    row(f"RSS under scrape load, max of samples every 100 ms ({split(load_sample)}; "
        f"threads: up to {max(perf['threads_load_max'], perf['million']['threads_max'])})",
        mb(load_max), "< 5 MB", verdict(load_max < RSS_LIMIT))
    after = perf["rss_after_million"]
    row(f"RSS after {perf['million']['requests']:,} more scrapes (VmRSS; {split(after)})",
        mb(after["VmRSS"]),
        "< 5 MB", verdict(after["VmRSS"] < RSS_LIMIT))
    row("Peak RSS since start (VmHWM at the end)", mb(after["VmHWM"]), "< 5 MB",
        verdict(after["VmHWM"] < RSS_LIMIT))
    growth = after["VmRSS"] - perf["rss_after_load"]["VmRSS"]
    traj = " → ".join(f"{r['rss_after'] // 1024}" for r in perf["million"]["rounds"])
    row(f"VmRSS KiB after the first {w['requests']:,} scrapes, then after each wrk round",
        f"{perf['rss_after_load']['VmRSS'] // 1024} → {traj}")
    row(f"RSS growth over those {perf['million']['requests']:,} scrapes "
        f"(after vs. after the first {w['requests']:,})",
        f"{growth / 1024:+.0f} KiB", f"no growth (<= 64 KiB) after >= {CFG['scrapes']:,}",
        verdict(growth <= GROWTH_TOLERANCE and perf["million"]["requests"] >= CFG["scrapes"]))
    if static:
        head = sh("git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD")
        stale = "" if static["revision"] == head else (
            f"; **stale**: built from {static['revision']}, HEAD is {head} (run `make static`)")
        row(f"Static binary dist/ (revision {static['revision']}{stale}): RSS idle "
            f"({split(static['idle'])})",
            mb(static["idle"]["VmRSS"]), "< 5 MB", verdict(static["idle"]["VmRSS"] < RSS_LIMIT))
        row(f"Static binary: RSS under the same wrk load, max ({static['wrk']['rps']:,.0f} "
            f"scrapes/s); peak (VmHWM)",
            f"{mb(static['load_max'])}; {mb(static['after']['VmHWM'])}", "< 5 MB",
            verdict(max(static["load_max"], static["after"]["VmHWM"]) < RSS_LIMIT))
    # Sizes.
    rel = BINARY.relative_to(ROOT) if BINARY.is_relative_to(ROOT) else BINARY
    row(f"Binary size, {rel}", mb(size["release"]) if size["release"] else "not built")
    row("Binary size, dist/ static", mb(size["static"]) if size["static"] else
        "no dist/prefect-exporter (run `make static`)")
    row("Image size", (mb(size["image"]) + f" ({size['image_note']})") if size["image"]
        else f"skipped: {size['image_note']}")

    extra_env = "".join(f"`{kv}`, " for kv in os.environ.get("BENCH_EXPORTER_ENV", "").split())
    lines = [
        "# prefect-exporter benchmark",
        "",
        f"Generated by `make bench` (scripts/bench.sh, bench/bench.py) on {mach['date']}.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPUs (nproc) | {mach['nproc']} |",
        f"| CPU model | {mach['cpu']} |",
        f"| Memory | {mach['memory']} |",
        f"| Kernel | {mach['kernel']} |",
        f"| rustc | {mach['rustc']} |",
        f"| Exporter | {mach['exporter']} |",
        f"| Prefect server | {pver} (SQLite, `--no-services`) |",
        f"| wrk | {mach['wrk']} |",
        f"| Load average (1/5/15 min) at start / end | {load_start} / {load_end} |",
        "",
        "## Results",
        "",
        "| Measure | Value | Target (issue 8) | |",
        "|---|---|---|---|",
        *rows,
        "",
        "## How it was measured",
        "",
        f"- Database: {CFG['runs']:,} flow runs over all 19 state names, 4 flows, "
        f"4 deployments (1 paused), 1 work pool with 1 worker; a {CFG['small_runs']:,}-run "
        f"snapshot of the same fill for the run-count comparison. Filled once "
        f"({meta['method']}) in {meta['fill_seconds']:.0f} s on "
        f"{meta['filled_at']}, then cached in bench/work/cache/.",
        f"- Exporter: `{BINARY.relative_to(ROOT) if BINARY.is_relative_to(ROOT) else BINARY}` "
        f"with only these variables set: `PATH`, `PREFECT_HOME` (an empty directory), "
        f"`PREFECT_API_URL`, `EXPORTER_PORT=0`, `EXPORTER_ADDRESS=127.0.0.1`, "
        f"{extra_env}"
        f"`EXPORTER_INTERVAL={CFG['interval']}` ({PROXY_INTERVAL} s for the request count), "
        f"`EXPORTER_LOOKBACK={CFG['lookback']}`, "
        f"`EXPORTER_CHECK_DEPLOYMENTS={','.join(fill.CHECK_DEPLOYMENTS)}`, `LOG_LEVEL=INFO`; "
        f"{perf['series']} series, {perf['metrics_bytes']:,} bytes per /metrics answer.",
        f"- Requests per collection: counted by a pass-through proxy (bench/proxy.py) "
        f"between the exporter and Prefect, per collection; the steady state is the first "
        f"{CFG['req_collections']} consecutive collections that asked exactly the same "
        f"(collections that took nearly the whole interval are not used: the next one may "
        f"have started before the count was read). Steady collection at "
        f"{CFG['runs']:,} runs: {by_path}; at {CFG['small_runs']:,} runs: {by_path_small}. "
        f"No timing is taken through the proxy.",
        f"- Wall time: the exporter's own `prefect_exporter_collect_duration_seconds` and "
        f"`prefect_exporter_collector_duration_seconds`, read once per collection, after a "
        f"warm-up of {perf['warmup']['collections']} collections "
        f"({perf['warmup']['seconds']:.0f} s). The interval is {CFG['interval']} s: a "
        f"collection's deadline is its interval, so a shorter one would cut (and fail) the "
        f"collections it is meant to time.",
        f"- CPU: utime+stime of /proc/<pid>/stat (sampled in clock ticks of "
        f"{1000 / os.sysconf('SC_CLK_TCK'):.0f} ms, counts threads that have exited) "
        f"and, when perf is installed, `perf stat -e task-clock -p <pid>`, over "
        f"{cpu['window_s']:.1f} s ({cpu['collections']} collections) without any "
        f"scrape, divided by the number of collections.",
        f"- Scrapes: `wrk -t{CFG['threads']} -c{CFG['connections']} -d{CFG['wrk_seconds']}s "
        f"--latency` on loopback, wrk and exporter sharing the same "
        f"{mach['nproc']} CPUs; then wrk again until >= {CFG['scrapes']:,} requests "
        f"({len(perf['million']['rounds'])} run(s)). Collections kept running throughout.",
        f"- RSS: VmRSS/VmHWM of /proc/<pid>/status; sampled every 100 ms under load.",
        f"- The exporter exited with code {perf['exit_code']} "
        f"{perf['exit_seconds']:.2f} s after SIGTERM; collections at the end: "
        f"{perf['end']['collections']:.0f}, collect errors: {perf['end']['errors']:.0f}.",
        f"- Numbers taken while other work runs on the machine are noisy: see the load "
        f"average above.",
        "",
    ]
    return "\n".join(lines)


def run_cost(procs, cache):
    """server_cost at every size, then with the late deployments."""
    out = []
    interval = CFG["interval"]
    n = CFG["cost_collections"]
    cases = os.environ.get(
        "BENCH_COST_CASES", "small,large,xl,large-neglected,xl-neglected,xl-late").split(",")
    for name in ("small", "large", "xl", "large-neglected", "xl-neglected"):
        db = f"{name}.db"
        if name not in cases:
            continue
        log(f"server cost: {name}")
        out.append(server_cost(procs, name, cache / db, interval, n))
    if "xl-late" not in cases:
        return out
    # The first collections list the late runs and look up the last runs of
    # 300 more deployments: a longer interval, so that they are not cut by
    # their deadline.
    late_interval = env_int("BENCH_LATE_INTERVAL", 10)
    log(f"server cost: xl-late (interval {late_interval} s)")
    out.append(server_cost(procs, "xl-late", cache / "xl-late.db", late_interval,
                           env_int("BENCH_LATE_COLLECTIONS", 22)))
    return out


def cost_report(cost, meta):
    rows = []

    def row(*cells):
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")

    label = {"small": "1,000 runs", "large": "20,000 runs", "xl": "100,000 runs",
             "large-neglected": "20,000 runs, neglected mix",
             "xl-neglected": "100,000 runs, neglected mix",
             "xl-late": f"100,000 runs + {CFG['late_deployments']} deployments, all late"}
    for c in cost:
        row(f"{label.get(c['name'], c['name'])} ({c['runs']:,} runs in the database; "
            f"{c['checks']} API counts checked against it)",
            f"{c['steady_requests']:.0f} ({'/'.join(f'{r:.0f}' for r in c['steady_requests_set'])})",
            f"{ms(c['duration_median'])} / {ms(c['duration_max'])}",
            f"{ms(c['steady_server_cpu_per_collection'])} ({c['steady_breakdown_reads']} reads "
            f"in {c['steady_collections']})",
            ms(c["steady_server_cpu_without_read"]),
            f"by {c['read']['method']}, {c['read']['requests']:.0f} requests: "
            f"{ms(c['read']['cpu'])} (wall {ms(c['read']['wall'])}; reused "
            f"{c['reuse_seconds']:.0f} s)",
            f"{ms(c['history_cpu'])} (wall {ms(c['history_wall'])})",
            ms(c["per_collection_at_30s"]),
            ms(c["exporter_cpu_per_collection"]),
            f"{c['startup_collections']} collections, {c['startup_requests']:.0f} requests, "
            f"{c['startup_seconds']:.0f} s",
            ms(c["startup_server_cpu"]),
            f"{ms(c['first_duration'])}; last-run series {c['first_last_runs']} of "
            f"{c['steady_last_runs']}",
            c["failed"])
    lines = [
        "",
        "## Prefect server cost (issue 16)",
        "",
        "| Database | requests per steady collection (seen) | collection wall time median / max "
        "| server CPU per steady collection (breakdown reads in the window) | same without a "
        "breakdown read | one breakdown read as the exporter makes it: server CPU | "
        "one `POST /flow_runs/history` on its own: server CPU | "
        "server CPU per collection at the default 30 s interval (derived) | exporter CPU per "
        "collection | start-up until steady | server CPU from start until steady | "
        "first collection wall time; complete? | failed collections |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "- Server CPU: utime+stime of the Prefect server process (/proc/<pid>/stat, 10 ms "
        "ticks) minus its idle rate, measured for 15 s before the exporter starts "
        "(" + ", ".join(f"{c['idle_per_s'] * 1000:.1f}" for c in cost) + " ms per second).",
        f"- Exporter interval {CFG['interval']} s ({cost[-1]['interval']} s with the late "
        f"deployments, whose start-up look-ups take more than 2 s), "
        f"EXPORTER_LOOKBACK={CFG['lookback']}; the "
        "exporter's metrics are read every 100 ms (about 25 µs of exporter CPU each, "
        "included in its CPU). Requests per collection: the exporter's own "
        "`prefect_exporter_api_requests_total`.",
        "- Steady: from the first collection after which no collection asks more than the "
        "steady number of requests plus one, except those that read the breakdown (before "
        "issue 23 possibly by counts per state name, about 21 requests); fewer counts as "
        "steady (the "
        "event counters send nothing during the first EXPORTER_EVENTS_SETTLE). Start-up: the "
        "collections before it, from the exporter's start.",
        f"- The per-state breakdown is read again once its age reaches {COST_FACTOR} times "
        "its last read's wall time (at most 10 min), by the history (before issue 23, by one "
        "count per state name when that took less time): at a 2 s interval few steady windows "
        "hold a read, so "
        "its cost is measured apart, as the exporter makes it: an exporter reading it every "
        "collection (the flow_runs group alone, EXPORTER_FLOW_RUNS_MAX_AGE=0) minus one "
        "without the group (the seed counts alone), 8 collections each after 2; its wall time "
        "is the exporter's `prefect_exporter_collector_duration_seconds{collector=\"flow_runs\"}`. "
        "The per-collection cost at the default 30 s interval is derived: without-read CPU + "
        "read CPU / ceil(reuse time / 30 s) (one collection in so many reads). The history "
        "read on its own: median of 5 calls.",
        f"- Databases: {meta['method']}. In the ordinary mix the copies are never runs in "
        "progress (a copy of one is a copy of a COMPLETED run instead), so every size holds "
        "the base's runs in PENDING or RUNNING (143): what the workers run at once, not the "
        "history. The neglected mix copies them too (zombie runs left by dead "
        "infrastructure): 14 % of the runs in progress, 3 % late, at every size. No "
        "`ANALYZE`: Prefect never gathers SQLite planner statistics, and with them SQLite "
        "planned the listing of runs in progress as a scan of the whole table.",
        "",
    ]
    return "\n".join(lines)


def run_http(procs, db):
    """Step 8 (see the module's docstring) on a server of database `db`:
    figures and their Markdown."""
    server = start_checked(procs, "http", db)
    out = {}
    try:
        wrk = []
        for label, binary in (("before", os.environ.get("BENCH_BINARY_BEFORE")),
                              ("this build", str(BINARY))):
            if not binary:
                continue
            e = Exporter(procs, f"wrk-{label.replace(' ', '-')}", server.base + "/api", interval=30,
                         binary=binary)
            wait_until("first collection", lambda: e.collections() >= 1, 60, 0.2, e.proc)
            r = run_wrk(e.url, CFG["wrk_seconds"])
            wrk.append((label, r))
            log(f"wrk {label}: {r['rps']:.0f}/s, p99 {r['latency'].get(99)}")
            e.stop()
        out["wrk"] = wrk
        e = Exporter(procs, "soak", server.base + "/api", interval=30)
        wait_until("first collection", lambda: e.collections() >= 1, 60, 0.2, e.proc)
        out["soak"] = http_side.soak(procs, RUN, e, env_int("BENCH_SOAK_SECONDS", 600), log)
        out["hostile"] = http_side.hostile(e, log)
        heals = tail(e.log, 10_000).count("starting afresh")
        e.stop()
    finally:
        server.stop()
    text = http_side.report(out["soak"], out["hostile"], heals)
    text += "\n| wrk, {} connections, {} s | scrapes/s | p50 | p99 | errors |\n|---|---|---|---|---|\n".format(
        CFG["connections"], CFG["wrk_seconds"])
    for label, r in out["wrk"]:
        text += (f"| {label} | {r['rps']:,.0f} | {us(r['latency'].get(50, 0))} | "
                 f"{us(r['latency'].get(99, 0))} | {r['non2xx'] + r['socket_errors']} |\n")
    return out, text


def main():
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir(parents=True)
    procs = Procs(RUN / "pids")
    started = time.monotonic()
    try:
        load_start = loadavg()
        if os.environ.get("BENCH_HTTP_ONLY"):
            db = os.environ.get("BENCH_HTTP_DB")
            http, text = run_http(procs, Path(db) if db else ensure_cache(procs)[0] / "small.db")
            (WORK / "last-http.json").write_text(json.dumps(http, indent=1, default=str))
            print(text)
            return 0
        cache, meta = ensure_cache(procs)
        if os.environ.get("BENCH_FILL_ONLY"):
            return 0
        if os.environ.get("BENCH_COST_ONLY"):
            cost = run_cost(procs, cache)
            text = cost_report(cost, meta)
            (WORK / "last-cost.json").write_text(json.dumps(cost, indent=1, default=str))
            print(text)
            return 0
        large = start_checked(procs, "large", cache / "large.db")
        small = start_checked(procs, "small", cache / "small.db")
        pver = large.api.call("GET", "/admin/version")
        log(f"requests per collection at {CFG['small_runs']} and {CFG['runs']} runs (proxy)")
        req_small = requests_per_collection(procs, small, "small")
        small.stop()
        req_large = requests_per_collection(procs, large, "large")
        perf = measure_exporter(procs, large, req_large["startup_collections"])
        static = None
        if STATIC.exists() and not os.environ.get("BENCH_NO_STATIC"):
            log("RSS of the static binary dist/prefect-exporter")
            static = measure_static(procs, large, perf["warmup"]["collections"])
        large.stop()
        cost = run_cost(procs, cache)
        http, http_text = run_http(procs, cache / "small.db")
        load_end = loadavg()
        raw = {"cfg": CFG, "req": [req_small, req_large], "perf": perf, "meta": meta,
               "static": static}
        (WORK / "last-run.json").write_text(json.dumps(raw, indent=1, default=str))
        raw["cost"] = cost
        (WORK / "last-run.json").write_text(json.dumps(raw, indent=1, default=str))
        text = report(machine(), load_start, load_end, pver, meta,
                      (req_small, req_large), perf, sizes(), static)
        text += cost_report(cost, meta)
        text += http_text
        raw["http"] = http
        (WORK / "last-run.json").write_text(json.dumps(raw, indent=1, default=str))
        RESULTS.write_text(text)
        print(text)
        log(f"done in {time.monotonic() - started:.0f} s; raw data in "
            f"{(WORK / 'last-run.json').relative_to(ROOT)}")
        return 0
    except Stop as e:
        log(f"interrupted ({e})")
        return 130
    finally:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
