//! Issue 2: what a real Prefect cannot be made to do (a 500, a non-JSON body, a
//! request that hangs past the timeout), played by the stub. Each fault leaves
//! /metrics answering with the last good values, bumps the error counter, and the
//! next good collection brings fresh values back.
use crate::support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use support::{Exporter, Mode, Stub, StubData};

const ERRORS: &str = "prefect_exporter_collect_errors_total";
const TOTAL: &str = "prefect_flow_runs_total";
const CHECK: &str = "flow-a,flow-b,flow-nope";
const CHECK_LIST: &[&str] = &["flow-a", "flow-b", "flow-nope"];
const WAIT: Duration = Duration::from_secs(20);

fn gauges_equal(m: &HashMap<String, f64>, data: &StubData) -> bool {
    data.seed_gauges(CHECK_LIST)
        .iter()
        .all(|(n, v)| m.get(*n) == Some(v))
}

fn assert_gauges(m: &HashMap<String, f64>, data: &StubData, exp: &Exporter, when: &str) {
    for (name, want) in data.seed_gauges(CHECK_LIST) {
        assert_eq!(
            m.get(name).copied(),
            Some(want),
            "{when}: {name} should be {want}\nstderr:\n{}",
            exp.stderr()
        );
    }
}

/// Good data -> values; `fault` -> the counter rises by `rises`, the gauges keep the
/// last good values on every scrape, /metrics answers 200 within `max_scrape`;
/// good again (with one more Failed run) -> the new values and `prefect_up` 1.
/// The faulty answers show in `prefect_exporter_api_requests_total{code=fault_code}`.
fn fault_cycle(
    fault: Mode,
    fault_code: &str,
    extra_env: &[(&str, &str)],
    rises: f64,
    max_scrape: Duration,
) {
    let good = StubData::standard();
    let stub = Stub::start(Mode::Good(good.clone()));
    let url = stub.api_url();
    let mut envs = vec![
        ("PREFECT_API_URL", url.as_str()),
        ("EXPORTER_CHECK_DEPLOYMENTS", CHECK),
    ];
    envs.extend_from_slice(extra_env);
    let exp = Exporter::spawn(&envs);

    let m = exp.wait_for(|m| m.get(TOTAL).is_some_and(|v| *v > 0.0), WAIT);
    assert_gauges(&m, &good, &exp, "first collection");
    assert_eq!(m.get(ERRORS).copied(), Some(0.0), "{}", exp.stderr());
    assert_eq!(m.get("prefect_up").copied(), Some(1.0));
    let before = m[ERRORS];

    stub.set_mode(fault);
    let deadline = Instant::now() + WAIT;
    loop {
        let t = Instant::now();
        let (status, body) = exp.get("/metrics");
        let took = t.elapsed();
        assert_eq!(status, 200, "/metrics during the fault: {body}");
        assert!(took < max_scrape, "/metrics took {took:?} during the fault");
        let m = support::parse_metrics(&body);
        assert_gauges(&m, &good, &exp, "during the fault");
        if m[ERRORS] >= before + rises {
            assert_eq!(
                m.get("prefect_up").copied(),
                Some(0.0),
                "prefect_up during the fault"
            );
            let series = format!("prefect_exporter_api_requests_total{{code=\"{fault_code}\"}}");
            assert!(
                m.get(&series).is_some_and(|v| *v >= rises),
                "{series} during the fault: {body}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{ERRORS} did not rise by {rises} within {WAIT:?}: {}\nstderr:\n{}",
            m[ERRORS],
            exp.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let mut fresh = good.clone();
    fresh.add("FAILED", "Failed", 1);
    stub.set_mode(Mode::Good(fresh.clone()));
    let m = exp.wait_for(
        |m| gauges_equal(m, &fresh) && m.get("prefect_up") == Some(&1.0),
        WAIT,
    );
    assert_gauges(&m, &fresh, &exp, "after recovery");
}

#[test]
fn status_500_keeps_last_values_and_counts_errors() {
    fault_cycle(Mode::Status(500), "500", &[], 2.0, Duration::from_secs(1));
}

#[test]
fn garbage_body_keeps_last_values_and_counts_errors() {
    fault_cycle(Mode::Garbage, "200", &[], 2.0, Duration::from_secs(1));
}

#[test]
fn hang_past_the_timeout_never_blocks_metrics() {
    fault_cycle(
        Mode::Hang,
        "none",
        &[
            ("PREFECT_API_REQUEST_TIMEOUT", "1"),
            ("EXPORTER_INTERVAL", "1"),
        ],
        1.0,
        Duration::from_millis(500),
    );
}

#[test]
fn good_stub_values_and_json_requests() {
    let data = StubData::standard();
    let stub = Stub::start(Mode::Good(data.clone()));
    let url = stub.api_url();
    let exp = Exporter::spawn(&[
        ("PREFECT_API_URL", &url),
        ("EXPORTER_CHECK_DEPLOYMENTS", CHECK),
        ("PREFECT_API_AUTH_STRING", "user:pw"),
    ]);
    let m = exp.wait_for(|m| m.get(TOTAL).is_some_and(|v| *v > 0.0), WAIT);
    assert_gauges(&m, &data, &exp, "good stub");
    for r in stub.requests() {
        if r.method == "POST" {
            assert_eq!(
                r.header("content-type")
                    .map(|v| v.split(';').next().unwrap_or("").trim()),
                Some("application/json"),
                "{} {} without a JSON content type",
                r.method,
                r.path
            );
        }
        assert_eq!(
            r.header("authorization"),
            Some(format!("Basic {}", support::base64(b"user:pw")).as_str()),
            "{} {}",
            r.method,
            r.path
        );
    }
}

/// The number of Prefect requests per collection is constant: 5 with a deployment
/// list, 4 without (counted by the stub between two observed collections).
#[test]
fn requests_per_collection_are_constant() {
    const COLLECTIONS: &str = "prefect_exporter_collections_total";
    for (check, per_collection) in [(CHECK, 5), ("", 4)] {
        let stub = Stub::standard();
        let url = stub.api_url();
        // Interval 2 s: a scrape (every 100 ms) sees a finished collection long
        // before the next one starts.
        let exp = Exporter::spawn(&[
            ("PREFECT_API_URL", &url),
            ("EXPORTER_CHECK_DEPLOYMENTS", check),
            ("EXPORTER_INTERVAL", "2"),
            // The seed group's cost; the breakdown groups' is tests/it/request_cost.rs'.
            ("EXPORTER_COLLECTORS", "seed"),
        ]);
        let n0 = exp.wait_for(|m| m.get(COLLECTIONS).is_some_and(|v| *v >= 1.0), WAIT)[COLLECTIONS];
        let r0 = stub.request_count();
        let n1 =
            exp.wait_for(|m| m.get(COLLECTIONS).is_some_and(|v| *v >= n0 + 2.0), WAIT)[COLLECTIONS];
        let r1 = stub.request_count();
        let seen: Vec<String> = stub.requests()[r0..r1]
            .iter()
            .map(|r| format!("{} {} {}", r.method, r.api_path(), r.body_str()))
            .collect();
        assert_eq!(
            (r1 - r0) as f64,
            (n1 - n0) * per_collection as f64,
            "check list {check:?}: {} requests in {} collections:\n{}",
            r1 - r0,
            n1 - n0,
            seen.join("\n")
        );
    }
}
