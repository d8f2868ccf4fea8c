//! Issue 2: the six specified metrics, right, from a REAL Prefect server.
use crate::support;

use std::collections::HashMap;
use std::time::Duration;

use support::{
    run_exporter_once, Expected, Exporter, PrefectServer, SeededDeployment, SeededRun,
    ServerOptions,
};

const ERRORS: &str = "prefect_exporter_collect_errors_total";
const TOTAL: &str = "prefect_flow_runs_total";
const CHECK: &str = "flow-a,flow-b,flow-c,flow-nope";
const CHECK_LIST: &[&str] = &["flow-a", "flow-b", "flow-c", "flow-nope"];
const WAIT: Duration = Duration::from_secs(20);
/// The values, not the timing, are what these tests check: a collection's
/// deadline is its interval, and at the harness's 2 s a first collection (every
/// group, the start-up look-ups) sometimes missed it on a loaded 2-core machine,
/// which counted an error (seen again in the auth test's first collection, with
/// the tests of the one binary running side by side).
const INTERVAL: (&str, &str) = ("EXPORTER_INTERVAL", "10");

/// Waits for a first collection (the total is never 0 on a seeded server), then
/// asserts the five gauges and a zero error counter, naming server vs. exporter.
fn assert_seed_values(exp: &Exporter, expected: &Expected, check: &[&str]) -> HashMap<String, f64> {
    let m = exp.wait_for(|m| m.get(TOTAL).is_some_and(|v| *v > 0.0), WAIT);
    exp.assert_gauges(&m, &expected.seed_gauges(check));
    m
}

#[test]
fn six_metrics_equal_the_seeded_server() {
    support::require_prefect!();
    let server = PrefectServer::shared();
    let expected = support::shared_expected();
    let url = server.api_url();
    let exp = Exporter::spawn(&[
        ("PREFECT_API_URL", &url),
        ("EXPORTER_CHECK_DEPLOYMENTS", CHECK),
        INTERVAL,
    ]);
    let m = assert_seed_values(&exp, expected, CHECK_LIST);
    assert_eq!(
        m["prefect_missing_deployments_total"], 2.0,
        "flow-b and flow-nope"
    );
}

#[test]
fn missing_deployments_is_zero_without_a_list() {
    support::require_prefect!();
    let server = PrefectServer::shared();
    let expected = support::shared_expected();
    let url = server.api_url();
    let unset = Exporter::spawn(&[("PREFECT_API_URL", &url), INTERVAL]);
    let empty = Exporter::spawn(&[
        ("PREFECT_API_URL", &url),
        ("EXPORTER_CHECK_DEPLOYMENTS", ""),
        INTERVAL,
    ]);
    for exp in [&unset, &empty] {
        let m = assert_seed_values(exp, expected, &[]);
        assert_eq!(m["prefect_missing_deployments_total"], 0.0);
    }
}

/// One server with basic auth on, for two promises in turn (a server start is the
/// expensive part on 2 cores): (1) the right auth string gives the exact values, a
/// wrong one makes the error counter rise while /metrics keeps answering; (2) then,
/// with the right exporter, runs whose state changes between collections move the
/// values (the shared server stays read-only).
#[test]
fn auth_server_values_errors_then_state_changes() {
    support::require_prefect!();
    // Private: basic auth is a server setting, and part (2) changes the totals.
    let server = PrefectServer::start(ServerOptions {
        auth_string: Some("admin:s3cret-pass".into()),
        ..Default::default()
    });
    let api = server.api();
    let mut expected = support::seed_standard(&api);
    let url = server.api_url();

    // (1) Basic auth.
    let right = Exporter::spawn(&[
        ("PREFECT_API_URL", &url),
        ("PREFECT_API_AUTH_STRING", "admin:s3cret-pass"),
        ("EXPORTER_CHECK_DEPLOYMENTS", CHECK),
        INTERVAL,
    ]);
    let wrong = Exporter::spawn(&[
        ("PREFECT_API_URL", &url),
        ("PREFECT_API_AUTH_STRING", "admin:wrong"),
        ("EXPORTER_CHECK_DEPLOYMENTS", CHECK),
    ]);
    assert_seed_values(&right, &expected, CHECK_LIST);

    // Wrong credentials: every collection fails (401), the process keeps serving.
    let m = wrong.wait_for(|m| m.get(ERRORS).is_some_and(|v| *v >= 2.0), WAIT);
    // Nothing was ever collected: the gauges must not show numbers from a 401 body.
    for (name, _) in expected.seed_gauges(CHECK_LIST) {
        let v = m.get(name).copied().unwrap_or(0.0);
        assert_eq!(
            v, 0.0,
            "wrong auth: {name} shows {v} without any successful collection"
        );
    }
    if let Some(up) = m.get("prefect_up") {
        assert_eq!(*up, 0.0, "prefect_up with wrong credentials");
    }
    let (status, _) = wrong.get("/metrics");
    assert_eq!(status, 200);
    drop(wrong);
    assert!(
        !right.stderr().contains("s3cret-pass"),
        "a secret reached the logs"
    );

    // (2) State changes between collections move the values.
    let check = |expected: &Expected, what: &str| {
        let want = expected.seed_gauges(CHECK_LIST);
        let m = right.wait_for(
            |m| want.iter().all(|(n, v)| m.get(*n) == Some(v)) || m.get(ERRORS) != Some(&0.0),
            WAIT,
        );
        for (name, v) in &want {
            assert_eq!(
                m.get(*name),
                Some(v),
                "after {what}: {name}: the server has {v}\nstderr:\n{}",
                right.stderr()
            );
        }
        assert_eq!(
            m[ERRORS],
            0.0,
            "after {what}: collection errors\n{}",
            right.stderr()
        );
    };

    // A new Failed run: total and errors +1.
    let flow_b = expected.flows["flow-b"].clone();
    let id = api.create_flow_run(&flow_b, None, "FAILED", "Failed");
    expected.add_run(SeededRun {
        id,
        flow: "flow-b".into(),
        deployment: None,
        state_type: "FAILED".into(),
        state_name: "Failed".into(),
    });
    check(&expected, "a new Failed run");

    // Completed -> Crashed: successes -1, errors +1.
    let run = expected.run_in("Completed").id.clone();
    api.set_flow_run_state(&run, "CRASHED", "Crashed", true);
    expected.set_state(&run, "CRASHED", "Crashed");
    check(&expected, "Completed -> Crashed");

    // Running -> Retrying: warnings +1 (Running counts in no group).
    let run = expected.run_in("Running").id.clone();
    api.set_flow_run_state(&run, "RUNNING", "Retrying", true);
    expected.set_state(&run, "RUNNING", "Retrying");
    check(&expected, "Running -> Retrying");

    // flow-b gets a deployment: one missing less.
    let dep = api.create_deployment(&flow_b, "b-weekly", None);
    expected.deployments.push(SeededDeployment {
        id: dep,
        name: "b-weekly".into(),
        flow: "flow-b".into(),
        work_pool: None,
    });
    assert_eq!(expected.missing(CHECK_LIST), 1);
    check(&expected, "flow-b got a deployment");
}

#[test]
fn help_lists_every_setting_and_version_prints_it() {
    let out = run_exporter_once(&["--help"], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "--help: {out:?}");
    for needle in [
        "PREFECT_API_URL",
        "http://127.0.0.1:4200/api",
        "PREFECT_API_AUTH_STRING",
        "PREFECT_API_KEY",
        "EXPORTER_PORT",
        "8080",
        "EXPORTER_INTERVAL",
        "30",
        "LOG_LEVEL",
        "INFO",
        "EXPORTER_CHECK_DEPLOYMENTS",
    ] {
        assert!(
            stdout.to_uppercase().contains(&needle.to_uppercase()),
            "--help does not mention {needle}:\n{stdout}"
        );
    }

    let out = run_exporter_once(&["--version"], &[]);
    assert_eq!(out.status.code(), Some(0), "--version: {out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("prefect-exporter {}", env!("CARGO_PKG_VERSION"))
    );
}

/// The harness writes the specified state lists out on its own (from
/// prefect-api.md and the specification), to seed and to count; the
/// exporter's lists must be the same ones.
#[test]
fn the_harness_and_the_exporter_know_the_same_states() {
    use prefect_exporter::collect::{flow_runs, seed};
    assert_eq!(support::STATES, flow_runs::KNOWN_STATES);
    assert_eq!(support::SUCCESS_NAMES, seed::SUCCESS_STATES);
    assert_eq!(support::ERROR_NAMES, seed::ERROR_STATES);
    assert_eq!(support::WARNING_NAMES, seed::WARNING_STATES);
}
