"""What the benchmark's Prefect database holds, and how it is filled (stdlib only).

Everything is created through Prefect's own REST API, as a user or a worker would:
- one work pool (`bench-pool`, type process) with one worker heartbeat;
- four flows; three of them have deployments (four deployments, one paused), all
  in `bench-pool`; `flow-nodeploy` has runs but no deployment;
- RUNS flow runs spread over all 19 state names of prefect-api.md's table, in a
  fixed shuffled order (seeded), so every prefix of the run list holds every
  state. 99 % are created through the bulk endpoint
  `POST /api/deployments/{id}/create_flow_run/bulk` (100 runs per call, round-robin
  over the deployments), 1 % one by one through `POST /api/flow_runs/` (runs
  without a deployment). A state given at creation is stored as sent.

Why REST and not SQL: a bulk call costs about 10-20 ms per run, and calling the same
endpoint function in-process (no HTTP) measured no faster, because nearly all of
the time is Prefect's state orchestration (set_flow_run_state) per run. Rows written
with SQL would skip that orchestration and could differ from what the API creates,
so the fill stays on the API and its result is cached (bench.py) instead.
"""

import json
import random
import time
import urllib.error
import urllib.request

# Bump when anything below changes what the database holds: it is part of the
# cache key.
FILL_VERSION = 1

# (type, name, weight): roughly the mix of flow_runs_history_20000.json, plus the
# names it lacks, so that every name of the table occurs.
STATES = [
    ("SCHEDULED", "Scheduled", 1262),
    ("SCHEDULED", "Late", 316),
    ("SCHEDULED", "AwaitingRetry", 212),
    ("SCHEDULED", "AwaitingConcurrencySlot", 100),
    ("PENDING", "Pending", 420),
    ("PENDING", "Submitting", 100),
    ("PENDING", "InfrastructurePending", 100),
    ("RUNNING", "Running", 630),
    ("RUNNING", "Retrying", 212),
    ("PAUSED", "Paused", 212),
    ("PAUSED", "Suspended", 106),
    ("CANCELLING", "Cancelling", 106),
    ("CANCELLED", "Cancelled", 316),
    ("COMPLETED", "Completed", 4200),
    ("COMPLETED", "Cached", 630),
    ("COMPLETED", "RolledBack", 106),
    ("FAILED", "Failed", 840),
    ("FAILED", "TimedOut", 212),
    ("CRASHED", "Crashed", 212),
]

WORK_POOL = "bench-pool"
FLOWS = ["flow-a", "flow-b", "flow-c", "flow-nodeploy"]
# (flow, deployment name, paused)
DEPLOYMENTS = [
    ("flow-a", "a-hourly", False),
    ("flow-a", "a-daily", False),
    ("flow-b", "b-daily", False),
    ("flow-c", "c-manual", True),
]
# Watched by the exporter: two of them have no deployment (flow-nodeploy exists,
# flow-unknown does not).
CHECK_DEPLOYMENTS = ["flow-a", "flow-b", "flow-c", "flow-nodeploy", "flow-unknown"]
NO_DEPLOYMENT_EVERY = 100  # every 100th run has no deployment
BULK = 100
SEED = 8


def plan_params(runs, small_runs):
    """Everything that determines the filled database: the cache key is its hash."""
    return {
        "fill_version": FILL_VERSION,
        "runs": runs,
        "small_runs": small_runs,
        "states": STATES,
        "work_pool": WORK_POOL,
        "flows": FLOWS,
        "deployments": DEPLOYMENTS,
        "no_deployment_every": NO_DEPLOYMENT_EVERY,
        "seed": SEED,
    }


def state_list(n):
    """n (type, name) pairs with the STATES proportions (largest remainder), shuffled
    with a fixed seed."""
    total = sum(w for _, _, w in STATES)
    exact = [n * w / total for _, _, w in STATES]
    counts = [int(x) for x in exact]
    order = sorted(range(len(STATES)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    out = []
    for (t, name, _), c in zip(STATES, counts):
        out += [(t, name)] * c
    random.Random(SEED).shuffle(out)
    return out


class Api:
    def __init__(self, base):
        self.base = base.rstrip("/")

    def call(self, method, path, body=None, timeout=300):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        for attempt in range(5):
            try:
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    raw = r.read()
                    return json.loads(raw) if raw else None
            except urllib.error.HTTPError as e:
                # SQLite under a busy machine: "database is locked" is a 503.
                if e.code in (502, 503) and attempt < 4:
                    time.sleep(1 + attempt)
                    continue
                detail = e.read()[:500]
                raise RuntimeError(f"{method} {path}: HTTP {e.code}: {detail!r}") from None

    def post(self, path, body):
        return self.call("POST", path, body)


def setup(api):
    """The work pool, flows and deployments; returns {deployment name: id} and flow ids."""
    api.post("/work_pools/", {"name": WORK_POOL, "type": "process", "description": "bench"})
    flow_ids = {f: api.post("/flows/", {"name": f})["id"] for f in FLOWS}
    dep_ids = {}
    for flow, name, paused in DEPLOYMENTS:
        d = api.post(
            "/deployments/",
            {
                "name": name,
                "flow_id": flow_ids[flow],
                "work_pool_name": WORK_POOL,
                "paused": paused,
                "tags": ["bench"],
                "enforce_parameter_schema": False,
            },
        )
        dep_ids[name] = d["id"]
    api.post(f"/work_pools/{WORK_POOL}/workers/heartbeat", {"name": "bench-worker"})
    return flow_ids, dep_ids


def fill_range(api, flow_ids, dep_ids, states, start, end, log):
    """Creates runs start..end-1 of the plan."""
    dep_names = [name for _, name, _ in DEPLOYMENTS]
    per_dep = {name: [] for name in dep_names}
    loose = []
    k = 0
    for i in range(start, end):
        t, name = states[i]
        run = {
            "name": f"bench-{i:05d}-{name.lower()}",
            "state": {"type": t, "name": name, "message": "bench"},
            "tags": ["bench"],
        }
        if i % NO_DEPLOYMENT_EVERY == NO_DEPLOYMENT_EVERY - 1:
            loose.append(run)
        else:
            per_dep[dep_names[k % len(dep_names)]].append(run)
            k += 1
    todo = end - start
    done = 0
    t0 = time.monotonic()
    for name, runs in per_dep.items():
        for j in range(0, len(runs), BULK):
            chunk = runs[j : j + BULK]
            res = api.post(f"/deployments/{dep_ids[name]}/create_flow_run/bulk", chunk)
            bad = [r for r in res["results"] if r["status"] != "CREATED"]
            if bad:
                raise RuntimeError(f"bulk create failed: {bad[0]}")
            done += len(chunk)
            el = time.monotonic() - t0
            log(
                f"fill: {start + done}/{end} runs "
                f"({done / el:.0f} runs/s, ~{(todo - done) * el / done:.0f} s left)"
            )
    for run in loose:
        run["flow_id"] = flow_ids["flow-nodeploy"]
        api.post("/flow_runs/", run)
        done += 1
    log(f"fill: {end} runs in the database ({time.monotonic() - t0:.0f} s for this stage)")


def verify(api, states):
    """Checks the server's counts per state name against the plan (`states`: the
    (type, name) pairs created so far); returns them."""
    total = api.post("/flow_runs/count", {})
    if total != len(states):
        raise RuntimeError(f"expected {len(states)} flow runs, the server counts {total}")
    now = time.time()
    hist = api.post(
        "/flow_runs/history",
        {
            "history_start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 315360000)),
            "history_end": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 315360000)),
            "history_interval_seconds": 630720000,
        },
    )
    got = {}
    for b in hist:
        for s in b["states"]:
            got[(s["state_type"], s["state_name"])] = s["count_runs"]
    want = {}
    for t, name in states:
        want[(t, name)] = want.get((t, name), 0) + 1
    if got != want:
        raise RuntimeError(f"counts per state differ from the plan: server {got}, plan {want}")
    return {"total": total, "by_state": {f"{t}/{n}": c for (t, n), c in sorted(got.items())}}
