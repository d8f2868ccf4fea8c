//! Issue 5: the breakdown series, checked against a REAL Prefect server.
//! Read-only checks use the shared seeded server; everything that changes data
//! runs on a server of its own.
use crate::support;

use prefect_exporter::rfc3339;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use support::{run_exporter_once, series, Api, Exporter, PrefectServer, ServerOptions};

const WAIT: Duration = Duration::from_secs(30);
/// Two seconds: a one-second deadline is tight on two shared cores.
const INTERVAL: &str = "2";
const GROUPS: &[&str] = &["seed", "flow_runs", "deployments", "work_pools"];
const TRACKED: &[&str] = &["COMPLETED", "FAILED", "CRASHED"];

type Metrics = HashMap<String, f64>;

fn with_prefix<'a>(m: &'a Metrics, prefix: &str) -> Vec<(&'a String, f64)> {
    let mut v: Vec<_> = m
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(k, v)| (k, *v))
        .collect();
    v.sort_by(|a, b| a.0.cmp(b.0));
    v
}

fn all_groups_ok(m: &Metrics) -> bool {
    support::groups_ok(m, GROUPS)
}

fn spawn(api_url: &str, extra: &[(&str, &str)]) -> Exporter {
    let mut envs = vec![
        ("PREFECT_API_URL", api_url),
        ("EXPORTER_INTERVAL", INTERVAL),
    ];
    envs.extend_from_slice(extra);
    Exporter::spawn(&envs)
}

/// A scrape taken after a collection that started after this call: the data
/// changed before it is in.
fn fresh_metrics(exp: &Exporter) -> Metrics {
    let key = "prefect_exporter_collections_total";
    let now = exp.wait_for(|m| m.contains_key(key), WAIT)[key];
    exp.wait_for(
        |m| m.get(key).is_some_and(|v| *v >= now + 2.0) && all_groups_ok(m),
        WAIT,
    )
}

/// What the server says: the newest end time per tracked state type of one
/// deployment's runs, computed here from all of its runs.
fn newest_end_times(api: &Api, deployment_id: &str) -> HashMap<String, f64> {
    let mut out: HashMap<String, f64> = HashMap::new();
    let mut offset = 0;
    loop {
        let page = api.ok(
            "POST",
            "/flow_runs/filter",
            Some(&json!({
                "flow_runs": {"deployment_id": {"any_": [deployment_id]}},
                "limit": 200,
                "offset": offset,
            })),
        );
        let runs = page.as_array().expect("a list of runs");
        for r in runs {
            let t = r["state_type"].as_str().unwrap_or_default();
            if !TRACKED.contains(&t) {
                continue;
            }
            let end = rfc3339::parse(r["end_time"].as_str().expect("a final run has an end_time"))
                .expect("an RFC 3339 end_time");
            let e = out.entry(t.to_string()).or_insert(end);
            *e = e.max(end);
        }
        if runs.len() < 200 {
            return out;
        }
        offset += 200;
    }
}

fn get(api: &Api, path: &str) -> Value {
    api.ok("GET", path, None)
}

/// The last-run series of one deployment equal the server's newest end times
/// (to the microsecond), and there is none for a state type without runs.
fn assert_last_runs(m: &Metrics, api: &Api, id: &str, name: &str, flow: &str) {
    let want = newest_end_times(api, id);
    assert!(
        !want.is_empty(),
        "{name}/{flow}: every test deployment has final runs"
    );
    for t in TRACKED {
        let key = series(
            "prefect_deployment_last_run_timestamp_seconds",
            &[("deployment", name), ("flow", flow), ("state_type", t)],
        );
        match (want.get(*t), m.get(&key)) {
            (Some(w), Some(got)) => {
                assert!((w - got).abs() < 1e-3, "{key}: server {w}, exporter {got}")
            }
            (None, None) => {}
            (w, got) => panic!("{key}: server {w:?}, exporter {got:?}"),
        }
    }
}

#[test]
fn breakdowns_equal_the_seeded_server() {
    support::require_prefect!();
    let server = PrefectServer::shared();
    let expected = support::shared_expected();
    let api = server.api();
    let exp = spawn(&server.api_url(), &[]);
    let m = exp.wait_for(all_groups_ok, WAIT);

    // Runs per state, the custom name included, and nothing else.
    let shown = with_prefix(&m, "prefect_flow_runs{");
    for ((t, n), count) in &expected.by_state {
        let key = series("prefect_flow_runs", &[("state_type", t), ("state_name", n)]);
        assert_eq!(m.get(&key).copied(), Some(*count as f64), "{key}");
    }
    assert!(expected.by_state.contains_key(&(
        support::CUSTOM_STATE.0.into(),
        support::CUSTOM_STATE.1.into()
    )));
    assert_eq!(shown.len(), expected.by_state.len(), "{shown:?}");
    // Every run is in one bucket: none is lost to the history's time range.
    let sum: f64 = shown.iter().map(|(_, v)| v).sum();
    assert_eq!(sum, m["prefect_flow_runs_total"]);

    assert_eq!(m["prefect_flows"], expected.flows.len() as f64);
    assert_eq!(m["prefect_deployments"], expected.deployments.len() as f64);
    assert_eq!(m["prefect_work_pools"], expected.work_pools.len() as f64);

    assert_eq!(
        with_prefix(&m, "prefect_deployment_info{").len(),
        expected.deployments.len()
    );
    for d in &expected.deployments {
        let info = get(&api, &format!("/deployments/{}", d.id));
        let key = series(
            "prefect_deployment_info",
            &[
                ("deployment", &d.name),
                ("flow", &d.flow),
                ("work_pool", d.work_pool.as_deref().unwrap_or("")),
                ("paused", "false"),
                ("status", info["status"].as_str().unwrap_or("")),
            ],
        );
        assert_eq!(m.get(&key), Some(&1.0), "{key}");
        let late = expected
            .deployment_runs(&d.name)
            .get(&("SCHEDULED".to_string(), "Late".to_string()))
            .copied()
            .unwrap_or(0);
        assert!(late > 0, "the standard set has late runs per deployment");
        let key = series(
            "prefect_deployment_late_flow_runs",
            &[("deployment", &d.name), ("flow", &d.flow)],
        );
        assert_eq!(m.get(&key), Some(&(late as f64)), "{key}");
        assert_last_runs(&m, &api, &d.id, &d.name, &d.flow);
    }

    for p in &expected.work_pools {
        let pool = get(&api, &format!("/work_pools/{}", p.name));
        let key = series(
            "prefect_work_pool_info",
            &[
                ("work_pool", &p.name),
                ("type", &p.pool_type),
                ("status", pool["status"].as_str().unwrap_or("")),
                ("paused", "false"),
            ],
        );
        assert_eq!(m.get(&key), Some(&1.0), "{key}");
        let online = series(
            "prefect_work_pool_workers",
            &[("work_pool", &p.name), ("status", "ONLINE")],
        );
        let offline = series(
            "prefect_work_pool_workers",
            &[("work_pool", &p.name), ("status", "OFFLINE")],
        );
        assert_eq!(m.get(&online), Some(&(p.workers.len() as f64)), "{online}");
        assert_eq!(m.get(&offline), Some(&0.0), "{offline}");
        let age = m
            .get(&series(
                "prefect_work_pool_last_heartbeat_age_seconds",
                &[("work_pool", &p.name)],
            ))
            .copied();
        if p.workers.is_empty() {
            assert_eq!(age, None, "{}: no worker, no heartbeat age", p.name);
        } else {
            let age = age.expect("a pool with a worker has a heartbeat age");
            assert!((0.0..3600.0).contains(&age), "{}: age {age}", p.name);
        }
    }
    assert_eq!(m["prefect_exporter_collect_errors_total"], 0.0);
}

/// Runs that end between two collections move the timestamps, late runs and
/// states follow, deleted deployments and pools lose their series, and a
/// worker heartbeat turns a pool's ONLINE count from 0 to 1.
#[test]
fn breakdowns_follow_changes_between_collections() {
    support::require_prefect!();
    // Private: it adds, ends and deletes runs, deployments and pools, and asserts
    // server-wide counts (per-state totals, deployments, pools) that the shared
    // server's tests count too.
    let server = PrefectServer::start(ServerOptions::default());
    let api = server.api();
    let etl = api.create_flow("etl");
    let other = api.create_flow("other");
    api.create_work_pool("pool-busy", "process");
    api.create_work_pool("pool-quiet", "process");
    api.worker_heartbeat("pool-busy", "worker-1");
    // The same deployment name under two flows: two deployments.
    let daily_etl = api.create_deployment(&etl, "daily", Some("pool-busy"));
    let daily_other = api.create_deployment(&other, "daily", None);
    api.create_flow_runs_bulk(
        &daily_etl,
        &[
            ("COMPLETED", "Completed"),
            ("FAILED", "Failed"),
            ("COMPLETED", "Completed"),
            ("CRASHED", "Crashed"),
            ("SCHEDULED", "Late"),
            ("SCHEDULED", "Late"),
        ],
    );
    api.create_flow_runs_bulk(
        &daily_other,
        &[("FAILED", "Exploded"), ("COMPLETED", "Cached")],
    );
    let running = api.create_flow_run(&etl, Some(&daily_etl), "RUNNING", "Running");
    let late_other = api.create_flow_run(&other, Some(&daily_other), "SCHEDULED", "Late");

    // The per-state counts are read every collection (by default they are
    // reused while reading them again would be costly: see the next test).
    let exp = spawn(&server.api_url(), &[("EXPORTER_FLOW_RUNS_MAX_AGE", "0")]);
    let m = exp.wait_for(all_groups_ok, WAIT);
    fn daily(flow: &str) -> [(&'static str, &str); 2] {
        [("deployment", "daily"), ("flow", flow)]
    }
    let late_series = |flow: &str| series("prefect_deployment_late_flow_runs", &daily(flow));
    let state =
        |t: &str, n: &str| series("prefect_flow_runs", &[("state_type", t), ("state_name", n)]);
    assert_eq!(m[&late_series("etl")], 2.0);
    assert_eq!(m[&late_series("other")], 1.0);
    assert_eq!(m[&state("FAILED", "Exploded")], 1.0, "a custom state name");
    assert_eq!(m[&state("SCHEDULED", "Late")], 3.0);
    assert_eq!(m[&state("RUNNING", "Running")], 1.0);
    assert_last_runs(&m, &api, &daily_etl, "daily", "etl");
    assert_last_runs(&m, &api, &daily_other, "daily", "other");
    let ts = |flow: &str, t: &str| {
        let mut l = daily(flow).to_vec();
        l.push(("state_type", t));
        series("prefect_deployment_last_run_timestamp_seconds", &l)
    };
    assert!(
        m.contains_key(&ts("other", "FAILED")),
        "Exploded is of type FAILED"
    );
    assert!(!m.contains_key(&ts("other", "CRASHED")));
    let before = m[&ts("etl", "COMPLETED")];
    let online = |pool: &str| {
        series(
            "prefect_work_pool_workers",
            &[("work_pool", pool), ("status", "ONLINE")],
        )
    };
    assert_eq!(m[&online("pool-busy")], 1.0);
    assert_eq!(m[&online("pool-quiet")], 0.0);

    // Between two collections: the running run completes, a new run fails,
    // a late run starts, a deployment is deleted, the quiet pool gets a worker.
    let r = api.set_flow_run_state(&running, "COMPLETED", "Completed", false);
    assert_eq!(r["status"], "ACCEPT", "{r}");
    api.create_flow_run(&etl, Some(&daily_etl), "FAILED", "Failed");
    api.create_flow_run(&other, Some(&daily_other), "CRASHED", "Crashed");
    api.set_flow_run_state(&late_other, "RUNNING", "Running", true);
    api.worker_heartbeat("pool-quiet", "worker-2");
    let m = fresh_metrics(&exp);
    assert!(
        m[&ts("etl", "COMPLETED")] > before,
        "the completion moved the time"
    );
    assert_last_runs(&m, &api, &daily_etl, "daily", "etl");
    assert_last_runs(&m, &api, &daily_other, "daily", "other");
    assert!(m.contains_key(&ts("other", "CRASHED")));
    assert_eq!(m[&late_series("other")], 0.0);
    assert_eq!(m[&state("SCHEDULED", "Late")], 2.0);
    assert_eq!(m[&state("RUNNING", "Running")], 1.0);
    assert!(
        m["prefect_flow_runs_age_seconds"] < 1.0,
        "read this collection"
    );
    assert_eq!(m[&online("pool-quiet")], 1.0);

    // Deleted deployment and pool: their series go, the others stay.
    api.delete_deployment(&daily_other);
    api.ok("DELETE", "/work_pools/pool-quiet", None);
    let m = fresh_metrics(&exp);
    assert_eq!(m["prefect_deployments"], 1.0);
    assert_eq!(m["prefect_work_pools"], 1.0);
    let gone: Vec<_> = m
        .keys()
        .filter(|k| k.contains("flow=\"other\"") || k.contains("pool-quiet"))
        .collect();
    assert!(
        gone.is_empty(),
        "series of deleted objects remain: {gone:?}"
    );
    assert_eq!(m[&late_series("etl")], 2.0);
    assert_eq!(m[&online("pool-busy")], 1.0);
    assert_last_runs(&m, &api, &daily_etl, "daily", "etl");
    assert_eq!(m["prefect_exporter_collect_errors_total"], 0.0);
}

/// By default the per-state counts are reused for 3000 times the time their
/// reading took (at most EXPORTER_FLOW_RUNS_MAX_AGE), and their age says so:
/// a reading of the small shared server takes a few ms (8 s of reuse from
/// 2.7 ms on), so the next collections 2 and 4 s later show the same counts,
/// older. Runs changed meanwhile appear once the counts are read again (here
/// within EXPORTER_FLOW_RUNS_MAX_AGE=8s).
#[test]
fn per_state_counts_are_reused_with_their_age() {
    support::require_prefect!();
    // Private: it adds runs mid-test and asserts server-wide per-state counts and
    // the success total.
    let server = PrefectServer::start(ServerOptions::default());
    let api = server.api();
    let etl = api.create_flow("etl");
    let daily = api.create_deployment(&etl, "daily", None);
    api.create_flow_runs_bulk(&daily, &[("COMPLETED", "Completed"), ("FAILED", "Failed")]);
    let exp = spawn(&server.api_url(), &[("EXPORTER_FLOW_RUNS_MAX_AGE", "8")]);
    let key = "prefect_exporter_collections_total";
    let age = "prefect_flow_runs_age_seconds";
    let completed = series(
        "prefect_flow_runs",
        &[("state_type", "COMPLETED"), ("state_name", "Completed")],
    );
    let m = exp.wait_for(all_groups_ok, WAIT);
    let first = m[key];
    assert!(m[age] < 1.0, "read in the first collection: {}", m[age]);
    assert_eq!(m[&completed], 1.0);
    // A run completes: the seed counts see it at once, the breakdown once it
    // is read again.
    api.create_flow_run(&etl, Some(&daily), "COMPLETED", "Completed");
    let m = exp.wait_for(|m| m.get(key).is_some_and(|v| *v >= first + 2.0), WAIT);
    assert_eq!(m["prefect_flow_runs_successes_total"], 2.0);
    assert!(
        m[age] >= 1.0,
        "the next collection reuses the counts: age {}",
        m[age]
    );
    assert_eq!(m[&completed], 1.0, "reused, not read again");
    // Within the maximum age of 8 s the counts are read again.
    let m = exp.wait_for(|m| m.get(&completed) == Some(&2.0), WAIT);
    assert!(m[age] < 8.0, "age {}", m[age]);
    assert_eq!(
        m["prefect_exporter_collect_errors_total"],
        0.0,
        "{}",
        exp.stderr()
    );
}

#[test]
fn collectors_setting_turns_groups_off() {
    support::require_prefect!();
    let server = PrefectServer::shared();
    let exp = spawn(&server.api_url(), &[("EXPORTER_COLLECTORS", "deployments")]);
    let ok = |g: &str| series("prefect_exporter_collector_success", &[("collector", g)]);
    let m = exp.wait_for(|m| m.get(&ok("deployments")) == Some(&1.0), WAIT);
    assert_eq!(m.get(&ok("seed")), Some(&1.0), "the seed group always runs");
    assert!(!m.contains_key(&ok("flow_runs")) && !m.contains_key(&ok("work_pools")));
    assert!(with_prefix(&m, "prefect_flow_runs{").is_empty());
    assert!(with_prefix(&m, "prefect_work_pool").is_empty());
    assert!(!with_prefix(&m, "prefect_deployment_info{").is_empty());
    assert!(m.contains_key("prefect_flow_runs_total"));

    for bad in ["flow_runs,pools", "everything"] {
        let out = run_exporter_once(&[], &[("EXPORTER_COLLECTORS", bad)]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("EXPORTER_COLLECTORS"));
    }
    for (var, bad) in [
        ("EXPORTER_LOOKBACK", "1w"),
        ("EXPORTER_MAX_DEPLOYMENTS", "0"),
    ] {
        let out = run_exporter_once(&[], &[(var, bad)]);
        assert_eq!(out.status.code(), Some(2), "{var}={bad}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(var));
    }
}

#[test]
fn max_deployments_caps_series_and_warns_once() {
    support::require_prefect!();
    let server = PrefectServer::shared();
    let expected = support::shared_expected();
    assert!(expected.deployments.len() >= 2);
    let exp = spawn(
        &server.api_url(),
        &[
            ("EXPORTER_MAX_DEPLOYMENTS", "1"),
            ("EXPORTER_COLLECTORS", "deployments"),
        ],
    );
    let key = "prefect_exporter_collections_total";
    let m = exp.wait_for(|m| m.get(key).is_some_and(|v| *v >= 3.0), WAIT);
    assert_eq!(with_prefix(&m, "prefect_deployment_info{").len(), 1);
    assert_eq!(
        with_prefix(&m, "prefect_deployment_late_flow_runs{").len(),
        1
    );
    // The inventory count is the server's, not the cap.
    assert_eq!(m["prefect_deployments"], expected.deployments.len() as f64);
    let warnings = exp
        .stderr()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("EXPORTER_MAX_DEPLOYMENTS"))
        .count();
    assert_eq!(warnings, 1, "{}", exp.stderr());
}

/// `promtool check metrics` has nothing to say about the new series (it only
/// flags the `_total` suffix of the five specified gauges, kept as specified).
#[test]
fn promtool_accepts_the_new_series() {
    support::require_prefect!();
    let Some(promtool) = support::tool("promtool", "promtool_accepts_the_new_series") else {
        return;
    };
    let server = PrefectServer::shared();
    let exp = spawn(&server.api_url(), &[]);
    exp.wait_for(all_groups_ok, WAIT);
    let text = exp.metrics_text();
    let (_, report) = support::promtool_check_metrics(&promtool, &text);
    let kept = [
        "prefect_flow_runs_total ",
        "prefect_flow_runs_successes_total ",
        "prefect_flow_runs_in_error_total ",
        "prefect_flow_runs_in_warning_total ",
        "prefect_missing_deployments_total ",
    ];
    let other: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !(kept.iter().any(|k| l.starts_with(k)) && l.contains("_total\" suffix")))
        .collect();
    assert!(other.is_empty(), "promtool: {other:?}\n{text}");
}
