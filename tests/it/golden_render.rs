//! The `/metrics` text of recorded real answers stays the same: every family
//! name, HELP, TYPE, label name and value, in the same order for the same data.
//!
//! `tests/fixtures/golden/answers.json` holds what a real Prefect server answered
//! to four collections of the full default set (recorded with `GOLDEN_RECORD=1`
//! against a seeded server, with runs ending and changing state between
//! collections, so every family has series). The test replays them to the built
//! exporter from a stub and compares the scrape after the fourth collection with
//! `tests/fixtures/golden/metrics.prom`. Timestamps in the answers are moved by
//! the time elapsed since the recording, so ages and "ended since the exporter
//! started" come out as they did; the values that depend on the clock or the
//! machine (durations, ages, absolute times, the build) are masked.
//!
//! Re-record only on purpose (`GOLDEN_RECORD=1 cargo test --test golden_render`):
//! a change of the text is a change for every user's dashboards.

use crate::support;

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prefect_exporter::rfc3339;
use serde_json::{json, Value};
use support::{Exporter, Mode, PrefectServer, Response, ServerOptions, Stub};

/// Collections recorded and replayed; the scrape follows the last one.
const COLLECTIONS: f64 = 4.0;

const ENV: &[(&str, &str)] = &[
    ("EXPORTER_INTERVAL", "2"),
    // Read every collection, so the requests do not depend on timing.
    ("EXPORTER_FLOW_RUNS_MAX_AGE", "0"),
    ("EXPORTER_EVENTS_SETTLE", "1s"),
    ("EXPORTER_CHECK_DEPLOYMENTS", "flow-a,flow-b,flow-missing"),
];

fn golden_dir() -> PathBuf {
    support::project_root().join("tests/fixtures/golden")
}

/// Masks what depends on the clock or the build, keeps everything else.
fn masked(text: &str) -> String {
    const CLOCK: &[&str] = &[
        "prefect_exporter_collect_duration_seconds",
        "prefect_exporter_collector_duration_seconds",
        "prefect_exporter_last_success_timestamp_seconds",
        "prefect_exporter_build_info",
    ];
    let mut out = String::new();
    for line in text.lines() {
        // The process series are read at scrape time, outside the render.
        let family = line
            .trim_start_matches("# HELP ")
            .trim_start_matches("# TYPE ");
        if family.starts_with("process_") {
            continue;
        }
        if line.starts_with('#') {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        let clock = CLOCK.contains(&name)
            || name.ends_with("_timestamp_seconds")
            || name.ends_with("_age_seconds")
            || name.ends_with("_sum");
        match line.rsplit_once(' ') {
            Some((series, _)) if clock => {
                let series = if name == "prefect_exporter_build_info" {
                    "prefect_exporter_build_info{...}"
                } else {
                    series
                };
                out.push_str(&format!("{series} <masked>\n"));
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Timestamps in a JSON value, each passed through `f`.
fn map_times(v: &Value, f: &dyn Fn(f64) -> String) -> Value {
    match v {
        Value::String(s) => match rfc3339::parse(s) {
            Some(t) if s.len() >= 20 => Value::String(f(t)),
            _ => v.clone(),
        },
        Value::Array(a) => Value::Array(a.iter().map(|x| map_times(x, f)).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| (k.clone(), map_times(x, f)))
                .collect(),
        ),
        _ => v.clone(),
    }
}

/// What identifies a request across runs: method, path and body with its
/// timestamps masked (a collection asks for windows relative to now).
fn key(method: &str, path: &str, body: &Value) -> String {
    let body = map_times(body, &|_| "<t>".into());
    format!("{method} {path} {body}")
}

/// The exporter with the golden settings, against the stub.
fn exporter_of(stub: &Stub) -> Exporter {
    let url = stub.api_url();
    let mut env = ENV.to_vec();
    env.push(("PREFECT_API_URL", &url));
    Exporter::spawn(&env)
}

fn scrape_after_last_collection(exp: &Exporter) -> String {
    let m = exp.wait_for(
        |m| m.get("prefect_exporter_collections_total") == Some(&COLLECTIONS),
        Duration::from_secs(60),
    );
    assert_eq!(m["prefect_up"], 1.0, "{}", exp.stderr());
    exp.metrics_text()
}

#[test]
fn the_rendering_of_recorded_answers_is_unchanged() {
    if std::env::var_os("GOLDEN_RECORD").is_some() {
        record();
    }
    let dir = golden_dir();
    let recorded: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("answers.json")).expect("answers.json"))
            .expect("answers.json is JSON");
    let recorded_at = recorded["exporter_started"]
        .as_f64()
        .expect("exporter_started");
    let mut answers: BTreeMap<String, VecDeque<(u16, Value)>> = BTreeMap::new();
    for a in recorded["answers"].as_array().expect("answers") {
        let k = key(
            a["method"].as_str().unwrap_or_default(),
            a["path"].as_str().unwrap_or_default(),
            &a["body"],
        );
        let status = a["status"].as_u64().unwrap_or(500) as u16;
        answers
            .entry(k)
            .or_default()
            .push_back((status, a["answer"].clone()));
    }
    let answers = Arc::new(Mutex::new(answers));
    let unknown = Arc::new(Mutex::new(Vec::new()));
    let offset = Arc::new(Mutex::new(0.0));
    let (a, u, o) = (answers.clone(), unknown.clone(), offset.clone());
    let stub = Stub::start(Mode::Handler(Arc::new(move |req| {
        let path = req.path.strip_prefix("/api").unwrap_or(&req.path);
        let k = key(&req.method, path, &req.json());
        let mut all = a.lock().unwrap_or_else(|e| e.into_inner());
        let Some(queue) = all.get_mut(&k) else {
            u.lock().unwrap_or_else(|e| e.into_inner()).push(k);
            return Response::json(404, &json!({"detail": "not recorded"}));
        };
        // The last answer stands for any later asking.
        let (status, answer) = if queue.len() > 1 {
            queue.pop_front().unwrap_or_default()
        } else {
            queue.front().cloned().unwrap_or_default()
        };
        let shift = *o.lock().unwrap_or_else(|e| e.into_inner());
        let answer = map_times(&answer, &|t| rfc3339::format(t + shift));
        Response::json(status, &answer)
    })));
    *offset.lock().unwrap_or_else(|e| e.into_inner()) = rfc3339::now() - recorded_at;
    let exp = exporter_of(&stub);
    let text = masked(&scrape_after_last_collection(&exp));
    let unknown = unknown.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(unknown.is_empty(), "requests never recorded: {unknown:#?}");
    let golden = fs::read_to_string(dir.join("metrics.prom")).expect("metrics.prom");
    if text != golden {
        let out = support::target_dir().join("golden-render-actual.prom");
        let _ = fs::write(&out, &text);
        panic!(
            "the /metrics text differs from tests/fixtures/golden/metrics.prom \
             (actual: {}; diff them)",
            out.display()
        );
    }
}

/// Flow runs are kept with the fields the exporter may read: whole, the
/// recording would weigh 1.2 MB (parameters, state details, policies).
fn slim_runs(answer: &Value) -> Value {
    const KEPT: &[&str] = &[
        "id",
        "name",
        "flow_id",
        "deployment_id",
        "work_queue_id",
        "work_queue_name",
        "state_type",
        "state_name",
        "start_time",
        "end_time",
        "expected_start_time",
        "next_scheduled_start_time",
        "total_run_time",
    ];
    let Some(runs) = answer.as_array() else {
        return answer.clone();
    };
    let slim = |run: &Value| {
        let mut out = serde_json::Map::new();
        for k in KEPT {
            if let Some(v) = run.get(*k) {
                out.insert((*k).into(), v.clone());
            }
        }
        if let Some(state) = run.get("state").filter(|s| s.is_object()) {
            let mut st = serde_json::Map::new();
            for k in ["type", "name", "timestamp"] {
                if let Some(v) = state.get(k) {
                    st.insert(k.into(), v.clone());
                }
            }
            out.insert("state".into(), Value::Object(st));
        }
        Value::Object(out)
    };
    Value::Array(runs.iter().map(slim).collect())
}

/// Records four collections of a seeded real server through a pass-through
/// stub, with runs ending and moving between collections.
fn record() {
    support::require_prefect!();
    let server = PrefectServer::start(ServerOptions {
        events: true,
        ..ServerOptions::default()
    });
    let api = server.api();
    let expected = support::seed_standard(&api);
    let log: Arc<Mutex<Vec<Value>>> = Arc::default();
    let (l, forward) = (log.clone(), server.api());
    let stub = Stub::start(Mode::Handler(Arc::new(move |req| {
        let path = req
            .path
            .strip_prefix("/api")
            .unwrap_or(&req.path)
            .to_string();
        let body = req.json();
        let (status, answer) =
            forward.request(&req.method, &path, (!body.is_null()).then_some(&body));
        let kept = if path.starts_with("/flow_runs/filter") {
            slim_runs(&answer)
        } else {
            answer.clone()
        };
        l.lock().unwrap_or_else(|e| e.into_inner()).push(json!({
            "method": req.method, "path": path, "body": body,
            "status": status, "answer": kept,
        }));
        Response::json(status, &answer)
    })));
    let started = rfc3339::now();
    let exp = exporter_of(&stub);
    // Between collections: a scheduled run starts, another ends, one fails.
    let runs: Vec<_> = expected
        .runs
        .iter()
        .filter(|r| r.deployment.is_some() && r.state_type == "SCHEDULED")
        .map(|r| r.id.clone())
        .collect();
    assert!(runs.len() >= 2, "the standard data set has scheduled runs");
    let steps: [&[(&str, &str, &str)]; 3] = [
        &[(&runs[0], "RUNNING", "Running")],
        &[
            (&runs[0], "COMPLETED", "Completed"),
            (&runs[1], "RUNNING", "Running"),
        ],
        &[(&runs[1], "FAILED", "Failed")],
    ];
    for (n, step) in steps.iter().enumerate() {
        exp.wait_for(
            |m| {
                m.get("prefect_exporter_collections_total")
                    .is_some_and(|c| *c >= n as f64 + 1.0)
            },
            Duration::from_secs(60),
        );
        for (id, t, name) in *step {
            api.set_flow_run_state(id, t, name, true);
        }
    }
    let text = masked(&scrape_after_last_collection(&exp));
    drop(exp);
    let answers = log.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let dir = golden_dir();
    fs::create_dir_all(&dir).expect("golden dir");
    let recorded = json!({ "exporter_started": started, "answers": answers });
    fs::write(
        dir.join("answers.json"),
        serde_json::to_string(&recorded).expect("json") + "\n",
    )
    .expect("write answers.json");
    fs::write(dir.join("metrics.prom"), text).expect("write metrics.prom");
}
