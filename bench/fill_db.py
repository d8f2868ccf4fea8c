"""Large benchmark databases in seconds instead of hours (stdlib only).

A REST fill runs Prefect's state orchestration per run (10-40 runs/s on SQLite:
9 minutes for 20,000 runs, most of an hour for 100,000). Here a small base of
runs is created through the REST API (fill.py), then the `flow_run` rows are
copied with SQL until the database holds the wanted number of runs:
- every copy keeps all columns of its original except `id` (a new UUID) and
  `name` (a suffix), so the copies are runs exactly as the API created them;
- the copies are spread in time: `expected_start_time`, `start_time`,
  `end_time`, `next_scheduled_start_time` and `created`/`updated` move back by
  a whole number of minutes per copy round, so the end times of a large
  history are spread over days as in a real one, and the newest run is one the
  REST fill made;
- the copies share their original's `state_id` (the state row), which the API
  only reads;
- runs in progress (PENDING, RUNNING) are not copied: each one's copies are
  copies of a run that ended in COMPLETED instead. What runs at once is bounded
  by the workers, not by the history, so every size holds the base's runs in
  progress. With `keep_active` (the neglected mix of issue 23) they are copied
  like the others: a server whose dead infrastructure left runs in Running or
  Pending for good holds about 14 % of its history in progress (2,860 of
  20,000 runs) and 3 % late, as the base does.

The caller then starts a server on the database and checks that the API's
counts (per state name, total, per deployment) equal what was written
(`expected_counts`): the bench refuses a database whose counts do not match.
"""

import sqlite3

# Columns that hold a time a copy moves back.
TIME_COLUMNS = (
    "expected_start_time",
    "next_scheduled_start_time",
    "start_time",
    "end_time",
    "created",
    "updated",
)
UUID_SQL = (
    "lower(hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' || "
    "substr(hex(randomblob(2)), 2) || '-' || substr('89ab', 1 + (abs(random()) % 4), 1) || "
    "substr(hex(randomblob(2)), 2) || '-' || hex(randomblob(6)))"
)


def _shift(col, minutes):
    """`col` moved back `minutes` minutes, in the text format Prefect stores in
    SQLite ('YYYY-MM-DD HH:MM:SS.ffffff' with or without '+00:00')."""
    # strftime keeps the fraction with %f (seconds.millis): take the micros of
    # the original instead, so a copy keeps microsecond precision.
    return (
        f"CASE WHEN {col} IS NULL THEN NULL ELSE "
        f"strftime('%Y-%m-%d %H:%M:%S', {col}, '-{minutes} minutes') || "
        f"substr({col}, 20) END"
    )


def multiply(db_path, runs, log, keep_active=False):
    """Copies the runs in `db_path` until there are `runs`; returns the factor
    by which every per-state and per-deployment count grew (runs must be a
    multiple of the base count). Runs in progress are copied as COMPLETED
    runs, unless `keep_active`."""
    con = sqlite3.connect(str(db_path))
    try:
        base = con.execute("SELECT count(*) FROM flow_run").fetchone()[0]
        if runs % base:
            raise RuntimeError(f"{runs} runs is not a multiple of the {base} base runs")
        factor = runs // base
        cols = [r[1] for r in con.execute("PRAGMA table_info(flow_run)")]
        sample = con.execute("SELECT end_time FROM flow_run WHERE end_time IS NOT NULL "
                             "LIMIT 1").fetchone()
        if sample and len(sample[0]) < 19:
            raise RuntimeError(f"unexpected time format in flow_run.end_time: {sample[0]!r}")
        if keep_active:
            con.execute("CREATE TEMP TABLE base AS SELECT * FROM flow_run")
            active = 0
        else:
            con.execute("CREATE TEMP TABLE base AS SELECT * FROM flow_run "
                        "WHERE state_type NOT IN ('PENDING', 'RUNNING')")
            active = con.execute("SELECT count(*) FROM flow_run "
                                 "WHERE state_type IN ('PENDING', 'RUNNING')").fetchone()[0]
        completed = [r[0] for r in con.execute(
            "SELECT rowid FROM flow_run WHERE state_type = 'COMPLETED' ORDER BY rowid")]
        if active and not completed:
            raise RuntimeError("fill_db: runs in progress but no COMPLETED run to copy instead")
        for i in range(active):
            con.execute("INSERT INTO base SELECT * FROM flow_run WHERE rowid = ?",
                        (completed[i % len(completed)],))
        for k in range(1, factor):
            # 7 minutes per round: 100 rounds span about half a day.
            minutes = 7 * k
            exprs = []
            for c in cols:
                if c == "id":
                    exprs.append(UUID_SQL)
                elif c == "name":
                    exprs.append(f"name || '-c{k}'")
                elif c in TIME_COLUMNS:
                    exprs.append(_shift(c, minutes))
                else:
                    exprs.append(c)
            con.execute(
                f"INSERT INTO flow_run ({', '.join(cols)}) "
                f"SELECT {', '.join(exprs)} FROM base"
            )
            if k % 10 == 0:
                log(f"fill_db: {base * (k + 1)} runs")
        con.commit()
        con.execute("DROP TABLE base")
        # No ANALYZE: Prefect never gathers SQLite planner statistics, and with
        # them SQLite plans some queries differently (a listing of runs in
        # progress then read the whole table): the copies must be planned as a
        # real server's database is.
        con.commit()
        got = con.execute("SELECT count(*) FROM flow_run").fetchone()[0]
        if got != runs:
            raise RuntimeError(f"fill_db: {got} rows written, wanted {runs}")
        return factor
    finally:
        con.close()


def expected_counts(db_path):
    """What the database holds, read with SQL: total, per (type, name), per
    deployment id (late runs too). The bench compares the API's answers to it."""
    con = sqlite3.connect(str(db_path))
    try:
        total = con.execute("SELECT count(*) FROM flow_run").fetchone()[0]
        by_state = {
            f"{t}/{n}": c
            for t, n, c in con.execute(
                "SELECT state_type, state_name, count(*) FROM flow_run "
                "GROUP BY state_type, state_name")
        }
        late = {
            d: c
            for d, c in con.execute(
                "SELECT deployment_id, count(*) FROM flow_run WHERE state_name = 'Late' "
                "AND deployment_id IS NOT NULL GROUP BY deployment_id")
        }
        return {"total": total, "by_state": by_state, "late_by_deployment": late}
    finally:
        con.close()


LATE_FLOW = "flow-late"


def add_late_deployments(api, n, work_pool, log):
    """`n` more deployments of one more flow, each with one late run and one
    run that ended in COMPLETED and in FAILED (so that the look-ups of the
    last runs before the start find something): 3 n runs, through the REST
    API (one bulk call per deployment)."""
    flow_id = api.post("/flows/", {"name": LATE_FLOW})["id"]
    t0 = __import__("time").monotonic()
    for i in range(n):
        d = api.post("/deployments/", {
            "name": f"late-{i:03d}", "flow_id": flow_id, "work_pool_name": work_pool,
            "enforce_parameter_schema": False,
        })
        runs = [
            {"name": f"late-{i:03d}-{k}", "state": {"type": t, "name": nm, "message": "bench"}}
            for k, (t, nm) in enumerate((("SCHEDULED", "Late"), ("COMPLETED", "Completed"),
                                         ("FAILED", "Failed")))
        ]
        res = api.post(f"/deployments/{d['id']}/create_flow_run/bulk", runs)
        bad = [r for r in res["results"] if r["status"] != "CREATED"]
        if bad:
            raise RuntimeError(f"bulk create failed: {bad[0]}")
        if (i + 1) % 50 == 0:
            log(f"fill_db: {i + 1}/{n} late deployments "
                f"({__import__('time').monotonic() - t0:.0f} s)")


def check_api(api, want):
    """The API's counts equal what the database holds (expected_counts): total,
    per state (/flow_runs/count per state type and name) and late runs per
    deployment. Raises otherwise; returns the number of checks."""
    checks = 0
    total = api.post("/flow_runs/count", {})
    if total != want["total"]:
        raise RuntimeError(f"API counts {total} runs, the database holds {want['total']}")
    checks += 1
    for key, n in want["by_state"].items():
        t, name = key.split("/", 1)
        got = api.post("/flow_runs/count", {
            "flow_runs": {"state": {"type": {"any_": [t]}, "name": {"any_": [name]}}}})
        if got != n:
            raise RuntimeError(f"{key}: API counts {got}, the database holds {n}")
        checks += 1
    for dep, n in want["late_by_deployment"].items():
        got = api.post("/flow_runs/count", {
            "flow_runs": {"state": {"name": {"any_": ["Late"]}},
                          "deployment_id": {"any_": [dep]}}})
        if got != n:
            raise RuntimeError(f"late runs of {dep}: API counts {got}, the database holds {n}")
        checks += 1
    return checks
