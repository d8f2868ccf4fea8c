//! Late runs, one shared listing for the deployments and work queues groups.
//!
//! Cost per collection, with L late runs on the server and a cap C
//! (EXPORTER_MAX_LISTED_RUNS, default 1,000): one `POST /flow_runs/count`
//! (2-5 ms of server CPU), and only when L > 0, min(ceil(L/200), ceil(C/200))
//! pages of `POST /flow_runs/filter` (80-100 ms each for full pages). A healthy
//! server costs one count. The cost never depends on how many deployments or
//! queues are late, only on one page per 200 late runs, and stops at the cap.
//!
//! Below the cap, the counts per deployment and per queue are exact. Past it,
//! they count the listed runs only; the exact total still comes from the count,
//! and `prefect_late_flow_runs_capped` says that the cap was hit.

use std::collections::HashMap;
use std::time::Instant;

use serde::Deserialize;

use super::listing::{self, States};
use crate::prefect::{ApiError, Client};
use crate::snapshot::LateRunsSummary;

const LATE: States = States::Names(&["Late"]);

#[derive(Debug, Default, Clone, PartialEq)]
pub struct LateRuns {
    pub summary: LateRunsSummary,
    /// Listed late runs per deployment id.
    pub by_deployment: HashMap<String, u64>,
    /// Listed late runs per work queue id.
    pub by_queue: HashMap<String, u64>,
}

/// Only the fields used; a run's queue is its id, which every Prefect 3
/// server gives (`work_pool_name` on a run is recent).
#[derive(Deserialize)]
struct LateRun {
    id: String,
    #[serde(default)]
    deployment_id: Option<String>,
    #[serde(default)]
    work_queue_id: Option<String>,
}

pub fn collect(client: &mut Client, max: usize, deadline: Instant) -> Result<LateRuns, ApiError> {
    let total = listing::count(client, LATE, deadline)?;
    if total == 0 {
        return Ok(LateRuns::default());
    }
    let (runs, capped) = listing::runs(client, LATE, max, |r: &LateRun| &r.id, deadline)?;
    Ok(tally(total, &runs, capped))
}

fn tally(total: u64, runs: &[LateRun], capped: bool) -> LateRuns {
    let mut out = LateRuns {
        summary: LateRunsSummary {
            total,
            listed: runs.len() as u64,
            capped,
        },
        ..LateRuns::default()
    };
    for r in runs {
        if let Some(d) = &r.deployment_id {
            *out.by_deployment.entry(d.clone()).or_default() += 1;
        }
        if let Some(q) = &r.work_queue_id {
            *out.by_queue.entry(q.clone()).or_default() += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response<T: serde::de::DeserializeOwned>(sample: &str) -> T {
        let v: serde_json::Value = serde_json::from_str(sample).unwrap();
        serde_json::from_value(v["response"].clone()).unwrap()
    }

    #[test]
    fn recorded_late_runs_count_per_deployment_and_queue() {
        let total: u64 = response(include_str!(
            "../../tests/fixtures/flow_runs_count_late.json"
        ));
        let runs: Vec<LateRun> = response(include_str!(
            "../../tests/fixtures/flow_runs_filter_late.json"
        ));
        assert_eq!(total, 1);
        let late = tally(total, &runs, false);
        assert_eq!(
            late.summary,
            LateRunsSummary {
                total: 1,
                listed: 1,
                capped: false
            }
        );
        assert_eq!(
            late.by_deployment,
            HashMap::from([("c081ea7b-51f1-4697-b825-5c31969c75a4".to_string(), 1)])
        );
        assert_eq!(
            late.by_queue,
            HashMap::from([("9d5ce0cf-0900-4420-8b28-444e01d3fcef".to_string(), 1)])
        );
    }

    #[test]
    fn runs_without_deployment_or_queue_count_in_the_total_only() {
        let runs = vec![
            LateRun {
                id: "1".into(),
                deployment_id: Some("d".into()),
                work_queue_id: Some("q".into()),
            },
            LateRun {
                id: "2".into(),
                deployment_id: Some("d".into()),
                work_queue_id: None,
            },
            LateRun {
                id: "3".into(),
                deployment_id: None,
                work_queue_id: None,
            },
        ];
        let late = tally(1500, &runs, true);
        assert_eq!(late.by_deployment["d"], 2);
        assert_eq!(late.by_queue["q"], 1);
        assert_eq!(late.summary.listed, 3);
        assert!(late.summary.capped);
        assert_eq!(late.summary.total, 1500);
    }
}
