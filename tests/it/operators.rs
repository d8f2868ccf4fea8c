//! Issue 13: work queues, runs in progress, concurrency limits and the late-run
//! summary, checked against the shared seeded REAL Prefect server
//! (tests/it/support/ops.rs seeds them): every new series equals what was created.
use crate::support;

use prefect_exporter::rfc3339;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::{json, Value};
use support::{groups_ok, series, Api, Exporter, PrefectServer};

const WAIT: Duration = Duration::from_secs(30);
const GROUPS: &[&str] = &[
    "seed",
    "deployments",
    "work_pools",
    "work_queues",
    "active_flow_runs",
    "concurrency_limits",
];
const ACTIVE_TYPES: &[&str] = &["PENDING", "RUNNING"];

type Metrics = HashMap<String, f64>;

fn family<'a>(m: &'a Metrics, name: &str) -> BTreeMap<&'a str, f64> {
    let prefix = format!("{name}{{");
    m.iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .map(|(k, v)| (k.as_str(), *v))
        .collect()
}

fn list(api: &Api, path: &str, body: Value) -> Vec<Value> {
    api.ok("POST", path, Some(&body))
        .as_array()
        .cloned()
        .expect("a list")
}

fn time(v: &Value) -> Option<f64> {
    v.as_str().and_then(rfc3339::parse)
}

/// What the server says, computed here from every run in progress: the
/// oldest entry time per (deployment id, state type).
fn oldest_active(api: &Api) -> HashMap<(String, String), f64> {
    let runs = list(
        api,
        "/flow_runs/filter",
        json!({"flow_runs": {"state": {"type": {"any_": ACTIVE_TYPES}}}, "limit": 200}),
    );
    assert!(runs.len() < 200, "the seed has fewer than a page");
    let mut out: HashMap<(String, String), f64> = HashMap::new();
    for r in runs {
        let Some(dep) = r["deployment_id"].as_str() else {
            continue;
        };
        let t = r["state_type"].as_str().unwrap_or_default().to_string();
        let entered = if t == "RUNNING" {
            time(&r["start_time"])
        } else {
            time(&r["state"]["timestamp"])
        }
        .expect("an entry time");
        let e = out.entry((dep.to_string(), t)).or_insert(entered);
        *e = e.min(entered);
    }
    out
}

#[test]
fn operator_series_equal_the_seeded_server() {
    support::require_prefect!();
    let server = PrefectServer::shared();
    let expected = support::shared_expected();
    let ops = &expected.ops;
    let api = server.api();
    let exp = Exporter::spawn(&[
        ("PREFECT_API_URL", &server.api_url()),
        ("EXPORTER_INTERVAL", "2"),
    ]);
    let m = exp.wait_for(|m| groups_ok(m, GROUPS), WAIT);
    let ops_prefixes = [
        "prefect_late_flow_runs",
        "prefect_work_queue",
        "prefect_deployment_active_flow_runs",
        "prefect_deployment_oldest_active",
        "prefect_active_flow_runs",
        "prefect_concurrency_limit",
        "prefect_deployment_concurrency_limit",
        "prefect_work_pool_concurrency_limit",
        "prefect_work_pool_active_slots",
    ];
    let ops_series = m
        .keys()
        .filter(|k| ops_prefixes.iter().any(|p| k.starts_with(p)))
        .count();
    eprintln!(
        "seeded server: {} series on /metrics, {ops_series} of them from the operator groups",
        m.len()
    );

    assert_eq!(m["prefect_deployments_capped"], 0.0);
    // Late-run summary: the exact total, all listed, no cap hit.
    let late_total = support::sum_names(&expected.by_state, &["Late"]) as f64;
    assert_eq!(m["prefect_late_flow_runs"], late_total);
    assert_eq!(m["prefect_late_flow_runs_listed"], late_total);
    assert_eq!(m["prefect_late_flow_runs_capped"], 0.0);

    // Work queues: every pool has its default queue, pool-ops two more.
    let queues = list(&api, "/work_queues/filter", json!({}));
    let other_pools = expected.work_pools.len() - 1;
    assert_eq!(queues.len(), other_pools + ops.queues.len());
    assert_eq!(m["prefect_work_queues"], queues.len() as f64);
    assert_eq!(family(&m, "prefect_work_queue_info").len(), queues.len());
    let late_of = |dep: &str| {
        expected
            .deployment_runs(dep)
            .get(&("SCHEDULED".to_string(), "Late".to_string()))
            .copied()
            .unwrap_or(0)
    };
    for q in &queues {
        let pool = q["work_pool_name"].as_str().expect("work_pool_name");
        let name = q["name"].as_str().expect("name");
        let key = [("work_pool", pool), ("work_queue", name)];
        let seeded = ops.queues.iter().find(|s| s.pool == pool && s.name == name);
        let (paused, limit, late, polled, slots) = match seeded {
            Some(s) => (
                s.paused,
                s.concurrency_limit,
                s.late,
                s.polled,
                s.concurrency_limit.map(|_| s.active),
            ),
            // The standard pools' default queues: a-daily's late runs are in
            // pool-a's; nothing is limited or polled there.
            None => {
                let late: u64 = expected
                    .deployments
                    .iter()
                    .filter(|d| d.work_pool.as_deref() == Some(pool))
                    .map(|d| late_of(&d.name))
                    .sum();
                (false, None, late, false, None)
            }
        };
        let status = if polled { "READY" } else { "NOT_READY" };
        assert_eq!(q["status"], status, "{pool}/{name} on the server");
        let priority = q["priority"].as_i64().expect("priority").to_string();
        let info = series(
            "prefect_work_queue_info",
            &[
                ("work_pool", pool),
                ("work_queue", name),
                ("status", status),
                ("paused", if paused { "true" } else { "false" }),
                ("priority", &priority),
            ],
        );
        assert_eq!(m.get(&info), Some(&1.0), "{info}");
        let get = |n: &str| m.get(&series(n, &key)).copied();
        assert_eq!(
            get("prefect_work_queue_late_flow_runs"),
            Some(late as f64),
            "{pool}/{name} late"
        );
        assert_eq!(
            get("prefect_work_queue_concurrency_limit"),
            limit.map(|l| l as f64),
            "{pool}/{name} limit"
        );
        assert_eq!(
            get("prefect_work_queue_active_slots"),
            slots.map(|s| s as f64),
            "{pool}/{name} active slots"
        );
        let polled_at = get("prefect_work_queue_last_polled_timestamp_seconds");
        if polled {
            let server_time = time(&q["last_polled"]).expect("a polled queue has last_polled");
            assert_eq!(polled_at, Some(server_time), "{pool}/{name} last poll");
        } else {
            assert_eq!(polled_at, None, "{pool}/{name} was never polled");
        }
    }

    // Runs in progress per deployment, both state types always shown.
    let oldest = oldest_active(&api);
    assert_eq!(
        family(&m, "prefect_deployment_active_flow_runs").len(),
        expected.deployments.len() * 2
    );
    for d in &expected.deployments {
        for t in ACTIVE_TYPES {
            let labels = [
                ("deployment", d.name.as_str()),
                ("flow", &d.flow),
                ("state_type", t),
            ];
            let count = expected
                .runs
                .iter()
                .filter(|r| r.deployment.as_deref() == Some(&d.name) && r.state_type == *t)
                .count();
            let key = series("prefect_deployment_active_flow_runs", &labels);
            assert_eq!(m.get(&key), Some(&(count as f64)), "{key}");
            let key = series(
                "prefect_deployment_oldest_active_flow_run_timestamp_seconds",
                &labels,
            );
            let want = oldest.get(&(d.id.clone(), t.to_string())).copied();
            assert_eq!(want.is_some(), count > 0, "{key}: server");
            assert_eq!(m.get(&key).copied(), want, "{key}");
        }
    }
    // The forced runs: the only runs in progress of their deployment, so the
    // oldest time is the one the server stamped when they were forced.
    assert_eq!(ops.active.len(), 2);
    for a in &ops.active {
        let key = series(
            "prefect_deployment_oldest_active_flow_run_timestamp_seconds",
            &[
                ("deployment", &a.deployment),
                ("flow", &a.flow),
                ("state_type", &a.state_type),
            ],
        );
        assert_eq!(m.get(&key).copied(), rfc3339::parse(&a.entered), "{key}");
    }
    let active_total = expected
        .runs
        .iter()
        .filter(|r| ACTIVE_TYPES.contains(&r.state_type.as_str()))
        .count();
    assert_eq!(m["prefect_active_flow_runs_listed"], active_total as f64);
    assert_eq!(m["prefect_active_flow_runs_capped"], 0.0);

    // Global concurrency limits by name; the deployment's own limit (seeded
    // as `flow/deployment`) in the per-deployment families; nothing else.
    let (own, global): (Vec<_>, Vec<_>) = ops.limits.iter().partition(|l| l.name.contains('/'));
    assert_eq!(
        family(&m, "prefect_concurrency_limit_slots").len(),
        global.len()
    );
    assert_eq!(
        family(&m, "prefect_deployment_concurrency_limit_slots").len(),
        own.len()
    );
    for l in &ops.limits {
        let (prefix, key) = match l.name.split_once('/') {
            Some((flow, deployment)) => (
                "prefect_deployment_concurrency_limit",
                vec![("deployment", deployment), ("flow", flow)],
            ),
            None => ("prefect_concurrency_limit", vec![("name", l.name.as_str())]),
        };
        let get = |n: &str| m.get(&series(&format!("{prefix}{n}"), &key)).copied();
        assert_eq!(get("_slots"), Some(l.limit as f64), "{}", l.name);
        assert_eq!(
            get("_active_slots"),
            Some(l.active_slots as f64),
            "{}",
            l.name
        );
        assert_eq!(
            get("_enabled"),
            Some(if l.enabled { 1.0 } else { 0.0 }),
            "{}",
            l.name
        );
    }

    // Work pools: the limit where one is set, slots as the server reports.
    for p in &expected.work_pools {
        let pool = api.ok("GET", &format!("/work_pools/{}", p.name), None);
        let key = [("work_pool", p.name.as_str())];
        let get = |n: &str| m.get(&series(n, &key)).copied();
        let limit = (p.name == support::ops::OPS_POOL).then_some(ops.pool_limit as f64);
        assert_eq!(
            get("prefect_work_pool_concurrency_limit"),
            limit,
            "{}",
            p.name
        );
        assert_eq!(
            pool["concurrency_limit"].as_f64(),
            limit,
            "{} on the server",
            p.name
        );
        assert_eq!(
            get("prefect_work_pool_active_slots"),
            pool["active_slots"].as_f64(),
            "{}",
            p.name
        );
    }
    let slots = series(
        "prefect_work_pool_active_slots",
        &[("work_pool", support::ops::OPS_POOL)],
    );
    assert_eq!(
        m.get(&slots),
        Some(&2.0),
        "pool-ops: one pending, one running"
    );
    assert_eq!(m["prefect_exporter_collect_errors_total"], 0.0);
}

/// With the deployments group off, the runs in progress and the deployment
/// limit are still labelled by name (the groups list the deployments
/// themselves), and EXPORTER_MAX_DEPLOYMENTS bounds the per-deployment series.
#[test]
fn groups_label_deployments_without_the_deployments_group() {
    support::require_prefect!();
    let server = PrefectServer::shared();
    let expected = support::shared_expected();
    let exp = Exporter::spawn(&[
        ("PREFECT_API_URL", &server.api_url()),
        ("EXPORTER_INTERVAL", "2"),
        ("EXPORTER_COLLECTORS", "active_flow_runs,concurrency_limits"),
    ]);
    let m = exp.wait_for(
        |m| groups_ok(m, &["active_flow_runs", "concurrency_limits"]),
        WAIT,
    );
    assert!(family(&m, "prefect_deployment_info").is_empty());
    assert_eq!(
        family(&m, "prefect_deployment_active_flow_runs").len(),
        expected.deployments.len() * 2
    );
    assert!(m.contains_key(&series(
        "prefect_deployment_concurrency_limit_slots",
        &[("deployment", "ops-etl"), ("flow", "flow-ops")]
    )));

    // One deployment shown: the newest, ops-report (no limit of its own), so
    // the limit of ops-etl keeps Prefect's name.
    let exp = Exporter::spawn(&[
        ("PREFECT_API_URL", &server.api_url()),
        ("EXPORTER_INTERVAL", "2"),
        ("EXPORTER_MAX_DEPLOYMENTS", "1"),
    ]);
    let m = exp.wait_for(|m| groups_ok(m, GROUPS), WAIT);
    assert_eq!(m["prefect_deployments_capped"], 1.0);
    let active = family(&m, "prefect_deployment_active_flow_runs");
    assert_eq!(active.len(), 2, "{active:?}");
    assert!(active
        .keys()
        .all(|k| k.contains("deployment=\"ops-report\"")));
    let etl = expected
        .deployments
        .iter()
        .find(|d| d.name == "ops-etl")
        .expect("ops-etl");
    assert!(m.contains_key(&series(
        "prefect_concurrency_limit_slots",
        &[("name", &format!("deployment:{}", etl.id))]
    )));
}
