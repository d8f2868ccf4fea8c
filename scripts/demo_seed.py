"""Fills a demo Prefect server with a few flows, deployments and flow runs in
many states, over the REST API (standard library only)."""
import json
import sys
import urllib.request

API = sys.argv[1].rstrip("/")


def call(method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(API + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read()
        return json.loads(text) if text else None


RUNS = {  # (state type, state name): runs per flow
    ("COMPLETED", "Completed"): 5, ("COMPLETED", "Cached"): 2,
    ("FAILED", "Failed"): 2, ("CRASHED", "Crashed"): 1,
    ("CANCELLED", "Cancelled"): 1, ("PAUSED", "Paused"): 1,
    ("RUNNING", "Running"): 1, ("SCHEDULED", "Scheduled"): 2,
    ("SCHEDULED", "Late"): 1,
}

call("POST", "/work_pools/", {"name": "demo-pool", "type": "process"})
for flow in ("etl-daily", "reports"):
    flow_id = call("POST", "/flows/", {"name": flow})["id"]
    dep_id = call("POST", "/deployments/", {"name": "prod", "flow_id": flow_id,
                                            "work_pool_name": "demo-pool"})["id"]
    for (stype, sname), n in RUNS.items():
        for _ in range(n):
            call("POST", "/flow_runs/", {"flow_id": flow_id, "deployment_id": dep_id,
                                         "state": {"type": stype, "name": sname}})
total = sum(RUNS.values()) * 2
print(f"demo data: 2 flows with a deployment each, {total} flow runs")
