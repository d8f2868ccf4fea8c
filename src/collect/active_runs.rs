//! Runs in progress per deployment, for "stuck run" alerts:
//! `prefect_deployment_active_flow_runs{state_type}` for PENDING and RUNNING
//! and `prefect_deployment_oldest_active_flow_run_timestamp_seconds`, the time
//! at which the longest-waiting run still in that state entered it (RUNNING:
//! its `start_time`; PENDING: its state's `timestamp`, as a PENDING run has no
//! start).
//!
//! Cost per collection with A runs in PENDING or RUNNING: max(1, ceil(A/200))
//! pages of `POST /flow_runs/filter`, at most ceil(C/200) with the cap C
//! (EXPORTER_MAX_LISTED_RUNS). A is bounded by what the workers run at once,
//! not by the run history. Past the cap, the series cover the listed runs and
//! `prefect_active_flow_runs_capped` is 1.
//!
//! Series exist for the deployments that get per-deployment series (at most
//! EXPORTER_MAX_DEPLOYMENTS), both state types always (0 when none), so an
//! alert needs no `absent()`; the oldest time only while a run is there.

use std::collections::HashMap;
use std::time::Instant;

use serde::Deserialize;

use super::listing::{self, States};
use super::rfc3339;
use crate::prefect::{ApiError, Client};
use crate::snapshot::{ActiveRunsPart, ActiveRunsSeries, DeploymentSeries};

pub const ACTIVE_TYPES: [&str; 2] = ["PENDING", "RUNNING"];
const ACTIVE: States = States::Types(&ACTIVE_TYPES);

#[derive(Deserialize)]
struct ActiveRun {
    id: String,
    #[serde(default)]
    deployment_id: Option<String>,
    state_type: String,
    #[serde(default)]
    start_time: Option<String>,
    #[serde(default)]
    state: Option<RunState>,
}

#[derive(Deserialize)]
struct RunState {
    #[serde(default)]
    timestamp: Option<String>,
}

/// Count and oldest entry time per state type of `ACTIVE_TYPES`.
type PerType = [(u64, Option<f64>); 2];

pub fn collect(
    client: &mut Client,
    deployments: &[DeploymentSeries],
    max: usize,
    deadline: Instant,
) -> Result<ActiveRunsPart, ApiError> {
    let (runs, capped) = listing::runs(client, ACTIVE, max, |r: &ActiveRun| &r.id, deadline)?;
    Ok(part(&runs, capped, deployments))
}

/// When the run entered its current state type, as the module doc says.
fn entered(run: &ActiveRun) -> Option<f64> {
    let state_time = run.state.as_ref().and_then(|s| s.timestamp.as_deref());
    let t = match run.state_type.as_str() {
        "RUNNING" => run.start_time.as_deref().or(state_time),
        _ => state_time,
    }?;
    rfc3339::parse(t)
}

fn part(runs: &[ActiveRun], capped: bool, deployments: &[DeploymentSeries]) -> ActiveRunsPart {
    let mut by_deployment: HashMap<&str, PerType> = HashMap::new();
    for run in runs {
        let Some(dep) = run.deployment_id.as_deref() else {
            continue;
        };
        let Some(slot) = ACTIVE_TYPES.iter().position(|t| *t == run.state_type) else {
            continue;
        };
        let entry = &mut by_deployment.entry(dep).or_default()[slot];
        entry.0 += 1;
        if let Some(t) = entered(run) {
            entry.1 = Some(entry.1.map_or(t, |o: f64| o.min(t)));
        }
    }
    let mut items = Vec::with_capacity(deployments.len() * 2);
    for d in deployments {
        let per = by_deployment
            .get(d.id.as_str())
            .copied()
            .unwrap_or_default();
        for (state_type, (count, oldest)) in ACTIVE_TYPES.iter().zip(per) {
            items.push(ActiveRunsSeries {
                deployment: d.name.clone(),
                flow: d.flow.clone(),
                state_type,
                count,
                oldest,
            });
        }
    }
    ActiveRunsPart {
        items,
        listed: runs.len() as u64,
        capped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::test_fixtures::deployment;

    fn t(s: &str) -> f64 {
        rfc3339::parse(s).unwrap()
    }

    #[test]
    fn recorded_runs_give_counts_and_oldest_times_per_state_type() {
        let v: serde_json::Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/flow_runs_filter_active.json"
        ))
        .unwrap();
        let runs: Vec<ActiveRun> = serde_json::from_value(v["response"].clone()).unwrap();
        assert_eq!(runs.len(), 4);
        let deps = [
            deployment("c081ea7b-51f1-4697-b825-5c31969c75a4", "ops-etl"),
            deployment("other", "idle"),
        ];
        let p = part(&runs, false, &deps);
        assert_eq!(p.listed, 4);
        assert!(!p.capped);
        assert_eq!(p.items.len(), 4, "two state types per deployment");
        let get = |dep: &str, st: &str| {
            p.items
                .iter()
                .find(|i| i.deployment == dep && i.state_type == st)
                .unwrap()
                .clone()
        };
        // Pending: forced at 06:17:23.716196, created Pending at 06:17:24.735175.
        let pending = get("ops-etl", "PENDING");
        assert_eq!(pending.count, 2);
        assert_eq!(pending.oldest, Some(t("2026-12-01T06:17:23.716196Z")));
        // Running: started 06:17:23.845390 (forced) and 06:17:24.648592.
        let running = get("ops-etl", "RUNNING");
        assert_eq!(running.count, 2);
        assert_eq!(running.oldest, Some(t("2026-12-01T06:17:23.845390Z")));
        let idle = get("idle", "RUNNING");
        assert_eq!((idle.count, idle.oldest), (0, None));
    }

    #[test]
    fn running_uses_the_start_pending_the_state_time() {
        let runs: Vec<ActiveRun> = serde_json::from_str(
            r#"[{"id":"1","deployment_id":"d","state_type":"RUNNING",
                 "start_time":"2026-01-01T00:00:00Z","state":{"timestamp":"2026-01-01T05:00:00Z"}},
                {"id":"2","deployment_id":"d","state_type":"PENDING","start_time":null,
                 "state":{"timestamp":"2026-01-01T03:00:00Z"}},
                {"id":"3","deployment_id":"d","state_type":"PENDING","start_time":null,
                 "state":{"timestamp":"2026-01-01T02:00:00Z"}},
                {"id":"4","deployment_id":null,"state_type":"RUNNING","start_time":null},
                {"id":"5","deployment_id":"d","state_type":"RUNNING","start_time":null,
                 "state":{"timestamp":"2026-01-01T04:00:00Z"}}]"#,
        )
        .unwrap();
        let p = part(&runs, true, &[deployment("d", "daily")]);
        assert!(p.capped);
        assert_eq!(p.listed, 5);
        assert_eq!(p.items[0].state_type, "PENDING");
        assert_eq!(
            (p.items[0].count, p.items[0].oldest),
            (2, Some(t("2026-01-01T02:00:00Z")))
        );
        // A RUNNING run without a start falls back to its state's time.
        assert_eq!(
            (p.items[1].count, p.items[1].oldest),
            (2, Some(t("2026-01-01T00:00:00Z")))
        );
    }
}
