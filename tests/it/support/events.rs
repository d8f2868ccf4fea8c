//! Events in the harness: the server's own count of stored events, and a real
//! Prefect SDK flow run (only the SDK emits task-run events).

use std::collections::BTreeMap;
use std::fs;
use std::process::{Command, Output, Stdio};

use serde_json::json;

use super::{venv_dir, Api, TempDir};

/// A flow of `tasks` quick tasks plus one task that fails once and succeeds on
/// its retry. Per run, Prefect 3.9 emits: flow-run Pending, Running, Completed;
/// task-run Pending, Running, Completed for each of the tasks + 1, and one
/// task-run Retrying.
const FLOW: &str = r#"
import sys
from prefect import flow, task

@task
def step(x):
    return x + 1

attempts = {"n": 0}

@task(retries=1, retry_delay_seconds=0)
def flaky():
    attempts["n"] += 1
    if attempts["n"] == 1:
        raise ValueError("first attempt fails")
    return 1

@flow(name="sdk-flow")
def sdk_flow(n):
    for i in range(n):
        step(i)
    flaky()

if __name__ == "__main__":
    sdk_flow(int(sys.argv[1]))
"#;

/// The state changes one run of [`run_sdk_flow`] makes: (flow-run, task-run)
/// counts by state name.
pub fn sdk_flow_changes(tasks: u64) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let flow = [("Pending", 1), ("Running", 1), ("Completed", 1)];
    let task = [
        ("Pending", tasks + 1),
        ("Running", tasks + 1),
        ("Completed", tasks + 1),
        ("Retrying", 1),
    ];
    let map = |v: &[(&str, u64)]| v.iter().map(|(k, n)| (k.to_string(), *n)).collect();
    (map(&flow), map(&task))
}

/// Runs the flow from the test venv against `api_url`, with nothing of the
/// developer's Prefect settings; panics when it fails.
pub fn run_sdk_flow(api_url: &str, tasks: u64) -> Output {
    let home = TempDir::new("sdk-flow");
    let script = home.path().join("flow.py");
    fs::write(&script, FLOW).expect("write flow.py");
    let mut cmd = Command::new(venv_dir().join("bin").join("python"));
    cmd.arg(&script)
        .arg(tasks.to_string())
        .env_clear()
        .env("HOME", home.path())
        .env("PREFECT_HOME", home.path().join(".prefect"))
        .env("PREFECT_API_URL", api_url)
        .env("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        .env("DO_NOT_TRACK", "1")
        .stdin(Stdio::null());
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    let out = cmd.output().expect("run the SDK flow");
    assert!(
        out.status.success(),
        "SDK flow failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Api {
    /// Events stored by the server whose name starts with `prefix` (heartbeats
    /// left out), that occurred at or after `since`, by the rest of the name.
    pub fn count_events(&self, prefix: &str, since: &str) -> BTreeMap<String, u64> {
        let until = "2100-01-01T00:00:00Z";
        let body = json!({
            "filter": {
                "occurred": {"since": since, "until": until},
                "event": {"prefix": [prefix], "exclude_name": [format!("{prefix}heartbeat")]},
            },
            "time_unit": "week",
            "time_interval": 10000,
        });
        let rows = self.ok("POST", "/events/count-by/event", Some(&body));
        rows.as_array()
            .unwrap_or_else(|| panic!("count-by/event: {rows}"))
            .iter()
            .map(|r| {
                let name = r["value"].as_str().unwrap_or_default();
                (
                    name.strip_prefix(prefix).unwrap_or(name).to_string(),
                    r["count"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    }
}
