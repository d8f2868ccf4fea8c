//! `prefect_flow_runs{state_type, state_name}`: flow runs per state, every name
//! the server knows (custom ones included), from ONE `POST /flow_runs/history`
//! request whose single bucket spans forty years, whatever the number of runs.
//!
//! The history buckets runs by `expected_start_time`. Prefect sets it on every
//! run's first state (the scheduled time for a scheduled run, else the state's
//! time) and the REST API offers no way to clear it, so no run is left out; the
//! integration tests check that the per-state counts add up to the total count.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::rfc3339;
use crate::prefect::{ApiError, Client};
use crate::snapshot::StateCount;

/// Twenty years either side of now: runs scheduled further out are not counted.
const HALF_SPAN_SECS: u64 = 20 * 365 * 86_400;

/// The states Prefect itself uses, always shown (at 0 when no run is in them) so
/// that a state emptying reads as 0 and alerts need no `absent()`. Custom names
/// are shown while at least one run is in them.
pub const KNOWN_STATES: &[(&str, &str)] = &[
    ("SCHEDULED", "Scheduled"),
    ("SCHEDULED", "Late"),
    ("SCHEDULED", "AwaitingRetry"),
    ("SCHEDULED", "AwaitingConcurrencySlot"),
    ("PENDING", "Pending"),
    ("PENDING", "Submitting"),
    ("PENDING", "InfrastructurePending"),
    ("RUNNING", "Running"),
    ("RUNNING", "Retrying"),
    ("PAUSED", "Paused"),
    ("PAUSED", "Suspended"),
    ("CANCELLING", "Cancelling"),
    ("CANCELLED", "Cancelled"),
    ("COMPLETED", "Completed"),
    ("COMPLETED", "Cached"),
    ("COMPLETED", "RolledBack"),
    ("FAILED", "Failed"),
    ("FAILED", "TimedOut"),
    ("CRASHED", "Crashed"),
];

#[derive(Serialize)]
struct HistoryRequest {
    history_start: String,
    history_end: String,
    history_interval_seconds: u64,
}

#[derive(Deserialize)]
struct Bucket {
    states: Vec<BucketState>,
}

#[derive(Deserialize)]
struct BucketState {
    state_type: String,
    state_name: String,
    count_runs: u64,
}

pub fn collect(client: &mut Client, deadline: Instant) -> Result<Vec<StateCount>, ApiError> {
    let body = history_request(rfc3339::now());
    let buckets: Vec<Bucket> = client.post("/flow_runs/history", &body, deadline)?;
    Ok(state_counts(&buckets))
}

fn history_request(now: f64) -> HistoryRequest {
    let start = now - HALF_SPAN_SECS as f64;
    HistoryRequest {
        history_start: rfc3339::format(start),
        history_end: rfc3339::format(start + 2.0 * HALF_SPAN_SECS as f64),
        history_interval_seconds: 2 * HALF_SPAN_SECS,
    }
}

/// Sums the buckets (there is one, but a server may split it) over the known
/// states at zero.
fn state_counts(buckets: &[Bucket]) -> Vec<StateCount> {
    let mut counts: BTreeMap<(String, String), u64> = KNOWN_STATES
        .iter()
        .map(|(t, n)| ((t.to_string(), n.to_string()), 0))
        .collect();
    for s in buckets.iter().flat_map(|b| &b.states) {
        *counts
            .entry((s.state_type.clone(), s.state_name.clone()))
            .or_insert(0) += s.count_runs;
    }
    counts
        .into_iter()
        .map(|((state_type, state_name), count)| StateCount {
            state_type,
            state_name,
            count,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("../../tests/fixtures/flow_runs_history_20000.json");

    fn sample_buckets() -> Vec<Bucket> {
        let v: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
        serde_json::from_value(v["response"].clone()).unwrap()
    }

    fn get(counts: &[StateCount], t: &str, n: &str) -> Option<u64> {
        counts
            .iter()
            .find(|c| c.state_type == t && c.state_name == n)
            .map(|c| c.count)
    }

    #[test]
    fn the_recorded_answer_gives_every_state() {
        let counts = state_counts(&sample_buckets());
        assert_eq!(counts.iter().map(|c| c.count).sum::<u64>(), 20_000);
        assert_eq!(get(&counts, "SCHEDULED", "Late"), Some(632));
        assert_eq!(get(&counts, "COMPLETED", "Cached"), Some(1263));
        assert_eq!(get(&counts, "FAILED", "TimedOut"), Some(423));
        // Known but absent from the answer: shown as 0.
        assert_eq!(get(&counts, "PENDING", "Submitting"), Some(0));
        assert_eq!(counts.len(), KNOWN_STATES.len());
    }

    #[test]
    fn custom_names_appear_and_buckets_add_up() {
        let buckets: Vec<Bucket> = serde_json::from_str(
            r#"[{"states":[{"state_type":"FAILED","state_name":"MyCustomFail","count_runs":2,
                 "sum_estimated_run_time":0.0,"sum_estimated_lateness":0.0},
                {"state_type":"COMPLETED","state_name":"Completed","count_runs":3}]},
                {"interval_start":"x","states":[{"state_type":"COMPLETED","state_name":"Completed","count_runs":4}]}]"#,
        )
        .unwrap();
        let counts = state_counts(&buckets);
        assert_eq!(get(&counts, "FAILED", "MyCustomFail"), Some(2));
        assert_eq!(get(&counts, "COMPLETED", "Completed"), Some(7));
        assert_eq!(counts.len(), KNOWN_STATES.len() + 1);
        // An empty history still shows the known states, at 0.
        let counts = state_counts(&[]);
        assert!(counts.iter().all(|c| c.count == 0));
    }

    #[test]
    fn one_bucket_spans_forty_years_around_now() {
        let now = rfc3339::parse("2026-11-24T20:48:50Z").unwrap();
        let body = serde_json::to_value(history_request(now)).unwrap();
        assert_eq!(body["history_start"], "2006-11-29T20:48:50.000000Z");
        assert_eq!(body["history_end"], "2046-11-19T20:48:50.000000Z");
        assert_eq!(body["history_interval_seconds"], 1_261_440_000u64);
    }

    #[test]
    fn known_states_are_distinct() {
        let set: std::collections::HashSet<_> = KNOWN_STATES.iter().collect();
        assert_eq!(set.len(), KNOWN_STATES.len());
    }
}
