//! Issue 14: state-change counters from Prefect's events and the duration and
//! start-delay histograms, against REAL Prefect servers (an SDK flow from the
//! test venv for the task-run events).
use crate::support;

use prefect_exporter::rfc3339;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::events::{run_sdk_flow, sdk_flow_changes};
use support::{collections, Api, Exporter, PrefectServer, ServerOptions, Stub};

type Metrics = HashMap<String, f64>;
type Counts = BTreeMap<String, u64>;

const FLOW_FAMILY: &str = "prefect_flow_run_state_changes_total";
const TASK_FAMILY: &str = "prefect_task_run_state_changes_total";

/// Non-zero counters of a family, by state name.
fn counters(m: &Metrics, family: &str) -> Counts {
    let prefix = format!("{family}{{state_name=\"");
    m.iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
            (*v > 0.0).then(|| (name.to_string(), *v as u64))
        })
        .collect()
}

fn add(into: &mut Counts, from: &Counts) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

fn errors(m: &Metrics) -> f64 {
    m.get("prefect_exporter_collect_errors_total")
        .copied()
        .unwrap_or(0.0)
}

/// Drives one run of `deployment` through `states` (forced, so that every
/// transition is accepted as sent) and counts them.
fn transitions(api: &Api, deployment: &str, states: &[(&str, &str)], made: &mut Counts) -> String {
    let run = api.ok(
        "POST",
        &format!("/deployments/{deployment}/create_flow_run"),
        Some(&json!({"state": {"type": "SCHEDULED", "name": "Scheduled"}})),
    );
    let id = run["id"].as_str().expect("run id").to_string();
    *made.entry("Scheduled".into()).or_default() += 1;
    for (t, n) in states {
        let r = api.set_flow_run_state(&id, t, n, true);
        assert_eq!(r["status"], "ACCEPT", "{t}/{n}: {r}");
        *made.entry(n.to_string()).or_default() += 1;
    }
    id
}

/// Waits for the next collection that failed (the error counter went up).
fn wait_failed_collection(exp: &Exporter) {
    let before = errors(&exp.metrics());
    exp.wait_for(|m| errors(m) > before, Duration::from_secs(30));
}

#[test]
fn every_transition_is_counted_once_across_failed_collections() {
    support::require_prefect!();
    // Private: the event persister runs (events are counted server-wide), and
    // the server is frozen for the failed collections.
    let server = PrefectServer::start(ServerOptions {
        events: true,
        ..Default::default()
    });
    let api = server.api();
    let flow = api.create_flow("etl");
    let deployment = api.create_deployment(&flow, "daily", None);
    // Changes made before the exporter starts are not counted.
    let mut made = Counts::new();
    transitions(&api, &deployment, &[("PENDING", "Pending")], &mut made);
    let mut flow_made = Counts::new();
    let mut task_made = Counts::new();

    // The default settle delay: what the SDK's events need.
    let exp = Exporter::spawn(&[
        ("PREFECT_API_URL", &server.api_url()),
        ("EXPORTER_INTERVAL", "2"),
    ]);
    let m = exp.wait_for(
        |m| m.contains_key(&format!("{TASK_FAMILY}{{state_name=\"Completed\"}}")),
        Duration::from_secs(30),
    );
    let started = Instant::now();
    // Every known state starts at 0.
    for family in [FLOW_FAMILY, TASK_FAMILY] {
        for name in [
            "Scheduled",
            "Failed",
            "AwaitingRetry",
            "Crashed",
            "Completed",
        ] {
            assert_eq!(
                m.get(&format!("{family}{{state_name=\"{name}\"}}")),
                Some(&0.0),
                "{family} {name}"
            );
        }
    }
    assert_eq!(
        m["prefect_exporter_collector_success{collector=\"events\"}"],
        1.0
    );

    // From the API: a failure retried to success, and a crash.
    transitions(
        &api,
        &deployment,
        &[
            ("PENDING", "Pending"),
            ("RUNNING", "Running"),
            ("FAILED", "Failed"),
            ("SCHEDULED", "AwaitingRetry"),
            ("RUNNING", "Running"),
            ("COMPLETED", "Completed"),
        ],
        &mut flow_made,
    );
    transitions(
        &api,
        &deployment,
        &[("RUNNING", "Running"), ("CRASHED", "Crashed")],
        &mut flow_made,
    );
    // From the SDK: flow-run and task-run events, sent by the flow's process.
    let sdk_tasks = 2;
    run_sdk_flow(&server.api_url(), sdk_tasks);
    let (sdk_flow, sdk_task) = sdk_flow_changes(sdk_tasks);
    add(&mut flow_made, &sdk_flow);
    add(&mut task_made, &sdk_task);

    // Prefect frozen (connect, then no answer) right after more changes:
    // collections fail, and nothing is lost.
    transitions(
        &api,
        &deployment,
        &[("RUNNING", "Running"), ("FAILED", "Failed")],
        &mut flow_made,
    );
    server.freeze();
    wait_failed_collection(&exp);
    server.thaw();

    // Prefect stopped and started again once the changes are stored.
    transitions(
        &api,
        &deployment,
        &[("RUNNING", "Running"), ("CANCELLED", "Cancelled")],
        &mut flow_made,
    );
    let since = rfc3339::format(rfc3339::now() - 3600.0);
    support::poll(Duration::from_secs(30), Duration::from_millis(200), || {
        (api.count_events("prefect.flow-run.", &since)
            .get("Cancelled")
            == Some(&1))
        .then_some(())
    })
    .expect("the server stores the Cancelled event");
    server.stop();
    wait_failed_collection(&exp);
    server.restart();

    // The server's own count agrees with what was made (the first run's
    // Scheduled and Pending, before the exporter started, aside).
    let mut stored = api.count_events("prefect.flow-run.", &since);
    for (k, v) in &made {
        *stored.get_mut(k).expect("stored") -= v;
    }
    stored.retain(|_, v| *v > 0);
    assert_eq!(stored, flow_made, "what Prefect stored");
    assert_eq!(
        api.count_events("prefect.task-run.", &since),
        task_made,
        "what Prefect stored"
    );

    // Every change is counted once the settle delay has passed.
    let m = exp.wait_for(
        |m| counters(m, FLOW_FAMILY) == flow_made && counters(m, TASK_FAMILY) == task_made,
        Duration::from_secs(90),
    );
    eprintln!(
        "counted {} flow-run and {} task-run changes {:.1} s after the exporter's first count",
        flow_made.values().sum::<u64>(),
        task_made.values().sum::<u64>(),
        started.elapsed().as_secs_f64()
    );
    assert!(errors(&m) >= 2.0, "the outages failed collections");
    // ... and never again: three more collections change nothing.
    let n = collections(&m);
    let m = exp.wait_for(|m| collections(m) >= n + 3.0, Duration::from_secs(30));
    assert_eq!(counters(&m, FLOW_FAMILY), flow_made);
    assert_eq!(counters(&m, TASK_FAMILY), task_made);
    assert_eq!(m["prefect_up"], 1.0);
}

/// A server without the events API (Prefect answers 404): no counters, and
/// the collections do not fail.
#[test]
fn a_server_without_events_has_no_counters_and_no_failures() {
    let stub = Stub::standard();
    let exp = Exporter::spawn(&[("PREFECT_API_URL", &stub.api_url())]);
    let m = exp.wait_for(|m| collections(m) >= 3.0, Duration::from_secs(30));
    assert_eq!(errors(&m), 0.0);
    assert_eq!(m["prefect_up"], 1.0);
    assert!(
        !m.keys().any(|k| k.contains("state_changes_total")),
        "{m:?}"
    );
    // Asked once, not at every collection.
    let asked = stub
        .requests()
        .iter()
        .filter(|r| r.api_path() == "/events/count-by/event")
        .count();
    assert_eq!(asked, 1);
}

/// The recorded fields of one run, as Prefect stored them.
fn read_run(api: &Api, id: &str) -> Value {
    api.ok("GET", &format!("/flow_runs/{id}"), None)
}

fn secs(v: &Value, field: &str) -> f64 {
    rfc3339::parse(v[field].as_str().unwrap_or_else(|| panic!("{field}: {v}")))
        .unwrap_or_else(|| panic!("{field}: {v}"))
}

#[test]
fn finished_runs_land_in_their_buckets_once() {
    support::require_prefect!();
    // Private: runs end under the exporter's eyes, which would change the
    // flow-run totals the shared server's tests count.
    let server = PrefectServer::start(ServerOptions::default());
    let api = server.api();
    let flow = api.create_flow("etl");
    let daily = api.create_deployment(&flow, "daily", None);
    let hourly = api.create_deployment(&flow, "hourly", None);
    // A run that ended before the exporter started is not observed.
    let mut ignored = Counts::new();
    transitions(
        &api,
        &daily,
        &[("RUNNING", "Running"), ("COMPLETED", "Completed")],
        &mut ignored,
    );
    let exp = Exporter::spawn(&[
        ("PREFECT_API_URL", &server.api_url()),
        ("EXPORTER_INTERVAL", "1"),
        ("EXPORTER_DURATION_BUCKETS", "0.5,1s,2,1m"),
    ]);
    exp.wait_for(|m| collections(m) >= 1.0, Duration::from_secs(30));

    // Runs scheduled a known time ago, driven through Running to an end
    // state, some after a wait so that they land in another bucket.
    let scheduled = rfc3339::format(rfc3339::now() - 30.0);
    let mut ids = Vec::new();
    for (dep, end, wait) in [
        (&daily, ("COMPLETED", "Completed"), 0.0),
        (&daily, ("COMPLETED", "Completed"), 1.2),
        (&daily, ("FAILED", "Failed"), 0.0),
        (&hourly, ("CRASHED", "Crashed"), 0.0),
    ] {
        let run = api.ok(
            "POST",
            &format!("/deployments/{dep}/create_flow_run"),
            Some(&json!({"state": {"type": "SCHEDULED", "name": "Scheduled",
                                   "state_details": {"scheduled_time": scheduled}}})),
        );
        let id = run["id"].as_str().unwrap().to_string();
        api.set_flow_run_state(&id, "RUNNING", "Running", true);
        std::thread::sleep(Duration::from_secs_f64(wait));
        api.set_flow_run_state(&id, end.0, end.1, true);
        let name = if dep == &daily { "daily" } else { "hourly" };
        ids.push((name, end.0, id));
    }
    // What the histograms must hold, from the times Prefect recorded.
    let bounds = [0.5, 1.0, 2.0, 60.0];
    let mut want: BTreeMap<String, f64> = BTreeMap::new();
    for (dep, state_type, id) in &ids {
        let run = read_run(&api, id);
        let duration = secs(&run, "end_time") - secs(&run, "start_time");
        let delay = secs(&run, "start_time") - secs(&run, "expected_start_time");
        for (family, labels, v) in [
            (
                "prefect_flow_run_duration_seconds",
                format!("deployment=\"{dep}\",flow=\"etl\",state_type=\"{state_type}\""),
                duration,
            ),
            (
                "prefect_flow_run_start_delay_seconds",
                format!("deployment=\"{dep}\",flow=\"etl\""),
                delay,
            ),
        ] {
            for b in bounds {
                let le = format!("{family}_bucket{{{labels},le=\"{b}\"}}");
                *want.entry(le).or_default() += f64::from(u8::from(v <= b));
            }
            *want
                .entry(format!("{family}_bucket{{{labels},le=\"+Inf\"}}"))
                .or_default() += 1.0;
            *want.entry(format!("{family}_sum{{{labels}}}")).or_default() += v;
            *want
                .entry(format!("{family}_count{{{labels}}}"))
                .or_default() += 1.0;
        }
    }
    // The slow run is in the (1, 2] bucket, the quick ones below 0.5 s.
    assert_eq!(
        want["prefect_flow_run_duration_seconds_bucket{deployment=\"daily\",flow=\"etl\",state_type=\"COMPLETED\",le=\"1\"}"],
        1.0
    );
    let got = |m: &Metrics| -> BTreeMap<String, f64> {
        m.iter()
            .filter(|(k, _)| {
                k.starts_with("prefect_flow_run_duration_seconds")
                    || k.starts_with("prefect_flow_run_start_delay_seconds")
            })
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    };
    let close = |a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>| {
        a.len() == b.len()
            && a.iter()
                .all(|(k, v)| b.get(k).is_some_and(|w| (v - w).abs() < 1e-5))
    };
    let m = exp.wait_for(|m| close(&got(m), &want), Duration::from_secs(30));
    // The passes overlap by 30 s: a few more of them re-read these runs, and
    // nothing changes.
    let n = collections(&m);
    let m = exp.wait_for(|m| collections(m) >= n + 4.0, Duration::from_secs(30));
    assert!(close(&got(&m), &want), "{:#?}\nwant {want:#?}", got(&m));
    assert_eq!(m["prefect_up"], 1.0);
}
