//! Issue 23: every series is Prefect's state as of the collection that
//! produced it. Each case happens between two collections, against a REAL
//! Prefect server (one for this file, its tests on data of their own), and is
//! checked series by series at the next collections:
//! - one late run starts while a run of another deployment enters Late with
//!   an expected start a day ago: the late counts per deployment and queue;
//! - runs enter a custom state name under a second state type: each (type,
//!   name) pair on its own;
//! - a run goes Pending -> Running -> Pending (forced): its new entry time.
use crate::support;

use prefect_exporter::rfc3339;

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value};
use support::{all_groups_ok, collections, series, Api, Exporter, PrefectServer, ServerOptions};

type Metrics = HashMap<String, f64>;

const WAIT: Duration = Duration::from_secs(60);

/// One server for the tests of this file; each test uses its own flow,
/// deployments and state names, so they run side by side. Not the shared one:
/// they add (late, custom-named, active) runs and assert server-wide counts
/// (late runs, the per-state sum equal to the total) that the shared server's
/// tests count too. Statics are never
/// dropped: the harness's watchdog stops it when the test process exits.
fn server() -> &'static PrefectServer {
    static SERVER: OnceLock<PrefectServer> = OnceLock::new();
    SERVER.get_or_init(|| PrefectServer::start(ServerOptions::default()))
}

fn spawn(extra: &[(&str, &str)]) -> Exporter {
    let url = server().api_url();
    let mut envs = vec![("PREFECT_API_URL", url.as_str())];
    envs.extend_from_slice(extra);
    Exporter::spawn(&envs)
}

/// Waits for a collection to be published, then runs `change` at once, in
/// the quiet time before the next one: the change lands between two
/// collections.
fn between_collections(exp: &Exporter, change: impl FnOnce()) {
    let m = exp.wait_for(all_groups_ok, WAIT);
    let n = collections(&m);
    exp.wait_for(|m| collections(m) > n && all_groups_ok(m), WAIT);
    change();
}

/// A scrape of two collections after this call, both successful: the first
/// one after a change is the one that must show it.
fn after_next_collections(exp: &Exporter) -> Metrics {
    let n = collections(&exp.metrics());
    exp.wait_for(|m| collections(m) >= n + 2.0 && all_groups_ok(m), WAIT)
}

fn iso(secs_from_now: f64) -> String {
    rfc3339::format(rfc3339::now() + secs_from_now)
}

fn late_state(scheduled: &str) -> Value {
    json!({"type": "SCHEDULED", "name": "Late", "state_details": {"scheduled_time": scheduled}})
}

fn create_run(api: &Api, deployment: &str, state: Value) -> String {
    let v = api.ok(
        "POST",
        &format!("/deployments/{deployment}/create_flow_run"),
        Some(&json!({ "state": state })),
    );
    v["id"].as_str().expect("run id").to_string()
}

fn set_state(api: &Api, run: &str, state: Value) {
    let r = api.ok(
        "POST",
        &format!("/flow_runs/{run}/set_state"),
        Some(&json!({ "state": state, "force": true })),
    );
    assert_eq!(r["status"], "ACCEPT", "{r}");
}

#[test]
fn late_counts_per_deployment_and_queue_follow_a_backdated_late_run() {
    support::require_prefect!();
    let api = server().api();
    let flow = api.create_flow("exact-late");
    api.create_work_pool("exact-pool", "process");
    api.create_work_queue("exact-pool", "qa", false, None);
    api.create_work_queue("exact-pool", "qb", false, None);
    let a = api.create_deployment_in_queue(&flow, "late-a", "exact-pool", "qa");
    let b = api.create_deployment_in_queue(&flow, "late-b", "exact-pool", "qb");
    // Two runs of A late since a minute; one of B scheduled a day ago.
    let a_runs: Vec<String> = (0..2)
        .map(|_| create_run(&api, &a, late_state(&iso(-60.0))))
        .collect();
    let day_ago = iso(-86_400.0);
    let b_run = create_run(
        &api,
        &b,
        json!({"type": "SCHEDULED", "name": "Scheduled",
               "state_details": {"scheduled_time": day_ago}}),
    );

    let exp = spawn(&[
        ("EXPORTER_INTERVAL", "2"),
        (
            "EXPORTER_COLLECTORS",
            "flow_runs,deployments,work_pools,work_queues",
        ),
    ]);
    let dep = |name: &str| {
        series(
            "prefect_deployment_late_flow_runs",
            &[("deployment", name), ("flow", "exact-late")],
        )
    };
    let queue = |name: &str| {
        series(
            "prefect_work_queue_late_flow_runs",
            &[("work_pool", "exact-pool"), ("work_queue", name)],
        )
    };
    let m = exp.wait_for(
        |m| m.get(&dep("late-a")) == Some(&2.0) && all_groups_ok(m),
        WAIT,
    );
    assert_eq!(m.get(&dep("late-b")), Some(&0.0));
    assert_eq!(m.get(&queue("qa")), Some(&2.0));
    assert_eq!(m.get(&queue("qb")), Some(&0.0));
    assert_eq!(m.get("prefect_late_flow_runs"), Some(&2.0));

    // The late count stays 2, and B's run is expected before every run listed.
    between_collections(&exp, || {
        set_state(
            &api,
            &a_runs[0],
            json!({"type": "RUNNING", "name": "Running"}),
        );
        set_state(&api, &b_run, late_state(&day_ago));
    });
    let m = after_next_collections(&exp);
    assert_eq!(m.get("prefect_late_flow_runs"), Some(&2.0));
    assert_eq!(m.get(&dep("late-a")), Some(&1.0), "A: one late run left");
    assert_eq!(m.get(&dep("late-b")), Some(&1.0), "B: its run is late");
    assert_eq!(m.get(&queue("qa")), Some(&1.0));
    assert_eq!(m.get(&queue("qb")), Some(&1.0));
    assert_eq!(m.get("prefect_late_flow_runs_listed"), Some(&2.0));
    assert_eq!(m.get("prefect_late_flow_runs_capped"), Some(&0.0));

    // A deletion and a new late run in the same interval: the same total again.
    between_collections(&exp, || {
        api.delete_flow_run(&a_runs[1]);
        create_run(&api, &a, late_state(&iso(-120.0)));
    });
    let m = after_next_collections(&exp);
    assert_eq!(m.get("prefect_late_flow_runs"), Some(&2.0));
    assert_eq!(m.get(&dep("late-a")), Some(&1.0));
    assert_eq!(m.get(&dep("late-b")), Some(&1.0));
    assert_eq!(m.get(&queue("qa")), Some(&1.0));
    assert_eq!(m.get(&queue("qb")), Some(&1.0));
    drop(exp);

    // The alerts read the total: it is there with the flow_runs group alone.
    let exp = spawn(&[
        ("EXPORTER_INTERVAL", "2"),
        ("EXPORTER_COLLECTORS", "flow_runs"),
    ]);
    let m = exp.wait_for(all_groups_ok, WAIT);
    assert_eq!(m.get("prefect_late_flow_runs"), Some(&2.0));
}

/// `prefect_flow_runs` by (type, name), for the names given.
fn per_state(m: &Metrics, names: &[&str]) -> BTreeMap<(String, String), f64> {
    let mut out = BTreeMap::new();
    for (k, v) in m {
        let Some(labels) = k.strip_prefix("prefect_flow_runs{") else {
            continue;
        };
        let get = |key: &str| {
            let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
            let end = labels[start..].find('"')? + start;
            Some(labels[start..end].to_string())
        };
        if let (Some(t), Some(n)) = (get("state_type"), get("state_name")) {
            if names.contains(&n.as_str()) {
                out.insert((t, n), *v);
            }
        }
    }
    out
}

#[test]
fn a_custom_name_under_a_second_state_type_is_counted_on_its_own() {
    support::require_prefect!();
    let api = server().api();
    let flow = api.create_flow("exact-names");
    let d = api.create_deployment(&flow, "names", None);
    api.create_flow_runs_bulk(&d, &[("COMPLETED", "Skipped"), ("COMPLETED", "Skipped")]);
    // Reuse off, and the method a high-latency link would pick
    // (EXPORTER_FLOW_RUNS_READ was removed; it is accepted with a warning).
    let exp = spawn(&[
        ("EXPORTER_INTERVAL", "2"),
        ("EXPORTER_COLLECTORS", "flow_runs"),
        ("EXPORTER_FLOW_RUNS_MAX_AGE", "0"),
        ("EXPORTER_FLOW_RUNS_READ", "names"),
    ]);
    let pair = |t: &str| (t.to_string(), "Skipped".to_string());
    let m = exp.wait_for(
        |m| per_state(m, &["Skipped"]).get(&pair("COMPLETED")) == Some(&2.0),
        WAIT,
    );
    assert_eq!(
        per_state(&m, &["Skipped"]),
        BTreeMap::from([(pair("COMPLETED"), 2.0)])
    );
    between_collections(&exp, || {
        api.create_flow_runs_bulk(&d, &[("CANCELLED", "Skipped"); 3]);
    });
    let m = after_next_collections(&exp);
    assert_eq!(
        per_state(&m, &["Skipped"]),
        BTreeMap::from([(pair("CANCELLED"), 3.0), (pair("COMPLETED"), 2.0)]),
        "each (type, name) pair on its own"
    );
    assert!(
        m["prefect_flow_runs_age_seconds"] < 1.0,
        "read in each collection"
    );
    // The per-state counts add up to the total, as the server counts it.
    let sum: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("prefect_flow_runs{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(Some(&sum), m.get("prefect_flow_runs_total"));
    let stderr = exp.stderr();
    let warned: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("EXPORTER_FLOW_RUNS_READ"))
        .collect();
    assert_eq!(
        warned.len(),
        1,
        "one WARN line for the removed setting:\n{stderr}"
    );
}

fn time(v: &Value) -> Option<f64> {
    v.as_str().and_then(rfc3339::parse)
}

/// The server's runs in progress of one deployment: per state type, the
/// count and the oldest entry time (RUNNING: the start; PENDING: the state's
/// time).
fn active_truth(api: &Api, deployment: &str) -> BTreeMap<String, (f64, f64)> {
    let runs = api.ok(
        "POST",
        "/flow_runs/filter",
        Some(
            &json!({"flow_runs": {"deployment_id": {"any_": [deployment]},
                     "state": {"type": {"any_": ["PENDING", "RUNNING"]}}}, "limit": 200}),
        ),
    );
    let mut out: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for r in runs.as_array().expect("runs") {
        let t = r["state_type"].as_str().expect("type").to_string();
        let entered = if t == "RUNNING" {
            time(&r["start_time"])
        } else {
            time(&r["state"]["timestamp"])
        }
        .expect("an entry time");
        let e = out.entry(t).or_insert((0.0, entered));
        e.0 += 1.0;
        e.1 = e.1.min(entered);
    }
    out
}

fn assert_active(m: &Metrics, api: &Api, deployment_id: &str) {
    let truth = active_truth(api, deployment_id);
    for t in ["PENDING", "RUNNING"] {
        let labels = [
            ("deployment", "active"),
            ("flow", "exact-active"),
            ("state_type", t),
        ];
        let (count, oldest) = truth[t];
        assert_eq!(
            m.get(&series("prefect_deployment_active_flow_runs", &labels)),
            Some(&count),
            "{t} count"
        );
        let shown = m
            .get(&series(
                "prefect_deployment_oldest_active_flow_run_timestamp_seconds",
                &labels,
            ))
            .copied()
            .unwrap_or_else(|| panic!("no oldest {t} time"));
        assert!(
            (shown - oldest).abs() < 1e-3,
            "{t}: oldest entry shown {shown}, the server's {oldest}"
        );
    }
}

#[test]
fn a_run_back_in_pending_shows_its_new_entry_time() {
    support::require_prefect!();
    let api = server().api();
    let flow = api.create_flow("exact-active");
    let d = api.create_deployment(&flow, "active", None);
    // The oldest pending run first, then enough runs in progress for the
    // previous update in place to start.
    let oldest = create_run(&api, &d, json!({"type": "PENDING", "name": "Pending"}));
    let mut states = vec![("PENDING", "Pending"); 30];
    states.extend([("RUNNING", "Running"); 30]);
    let ids = api.create_flow_runs_bulk(&d, &states);
    let exp = spawn(&[
        ("EXPORTER_INTERVAL", "3"),
        ("EXPORTER_COLLECTORS", "active_flow_runs"),
    ]);
    let m = exp.wait_for(all_groups_ok, WAIT);
    assert_active(&m, &api, &d);
    // The oldest pending run goes round to Pending again.
    between_collections(&exp, || {
        set_state(&api, &oldest, json!({"type": "RUNNING", "name": "Running"}));
        set_state(&api, &oldest, json!({"type": "PENDING", "name": "Pending"}));
    });
    let m = after_next_collections(&exp);
    assert_active(&m, &api, &d);

    // Runs end, start, go away and arrive in the same interval.
    between_collections(&exp, || {
        set_state(
            &api,
            &ids[1],
            json!({"type": "COMPLETED", "name": "Completed"}),
        );
        set_state(&api, &ids[2], json!({"type": "RUNNING", "name": "Running"}));
        set_state(
            &api,
            &ids[40],
            json!({"type": "PENDING", "name": "Pending"}),
        );
        api.delete_flow_run(&ids[3]);
        create_run(&api, &d, json!({"type": "PENDING", "name": "Pending"}));
    });
    let m = after_next_collections(&exp);
    assert_active(&m, &api, &d);
    assert_eq!(m.get("prefect_active_flow_runs_capped"), Some(&0.0));
}
