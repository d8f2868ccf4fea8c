//! `prefect_flow_runs{state_type, state_name}`: flow runs per state, every
//! (type, name) pair the server knows (custom names included), from ONE
//! `POST /flow_runs/history` request whose single bucket spans forty years.
//! Each pair is counted on its own, so a custom name used under two state
//! types shows twice. Its server CPU grows with the run history (50-80 ms at
//! 20,000 runs, 250-400 ms at 100,000, on SQLite without planner statistics,
//! as Prefect runs it).
//!
//! So the breakdown is reused, and its age exported beside it
//! (`prefect_flow_runs_age_seconds`): it is read again once its age reaches
//! `COST_FACTOR` times the wall time of its last read, and at most
//! `EXPORTER_FLOW_RUNS_MAX_AGE` (default 10 minutes; 0: every collection). A
//! reused breakdown is the server's state at its reading: its error is
//! staleness, bounded by that setting, never a wrong attribution. The reading
//! costs the server about 1/`COST_FACTOR` of one CPU (about 10 ms per
//! collection at a 30 s interval) while the maximum age does not cut in: read
//! again about every 30 s at 1,000 runs and every 150 s at 20,000, every 10
//! minutes past about 65,000 runs. The seed counts (`prefect_flow_runs_total`
//! and the three sums) and `prefect_late_flow_runs` are fresh every
//! collection.
//!
//! Counts by state name (one `POST /flow_runs/count` per name) were tried and
//! removed: a name filter cannot tell the type, and a name first seen under
//! one type was counted under it for good once runs entered it under another.
//!
//! The history buckets runs by `expected_start_time`. Prefect sets it on every
//! run's first state (the scheduled time for a scheduled run, else the state's
//! time) and the REST API offers no way to clear it, so no run is left out; the
//! integration tests check that the per-state counts add up to the total count.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::family::Family;
use crate::prefect::{ApiError, Client};
use crate::rfc3339;

/// Runs per (state type, state name).
type Counts = BTreeMap<(String, String), u64>;

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

/// The breakdown is read again once its age reaches this many times the wall
/// time of its last read (a read that took 0.1 s is reused for 300 s), at
/// most EXPORTER_FLOW_RUNS_MAX_AGE: the server spends about 1/3000 of a CPU
/// on it, and small histories, cheap to read, are read often.
pub const COST_FACTOR: u32 = 3000;

/// The last breakdown read, and when.
#[derive(Default)]
pub struct State {
    last: Option<Reading>,
}

struct Reading {
    counts: Counts,
    at: Instant,
    took: Duration,
}

impl Reading {
    fn expired(&self, max_age: Duration) -> bool {
        self.at.elapsed() >= reuse_for(self.took, max_age)
    }
}

/// How long a breakdown whose reading took `took` is shown again.
fn reuse_for(took: Duration, max_age: Duration) -> Duration {
    took.saturating_mul(COST_FACTOR).min(max_age)
}

/// The per-state counts and their age (0 when read just now). A failed read
/// fails the group: the series keep the values (and the age) of the last
/// success, and the next collection tries again.
pub fn collect(
    client: &mut Client,
    max_age: Duration,
    state: &mut State,
    deadline: Instant,
) -> Result<Vec<Family>, ApiError> {
    let reading = match state.last.take() {
        Some(r) if !r.expired(max_age) => r,
        _ => read(client, deadline)?,
    };
    let mut runs = Family::gauge(
        "prefect_flow_runs",
        "Flow runs per state type and state name (custom names included).",
        &["state_type", "state_name"],
    );
    for ((state_type, state_name), n) in &reading.counts {
        runs.set(&[state_type, state_name], *n as f64);
    }
    let age = Family::single(
        "prefect_flow_runs_age_seconds",
        "Seconds between the reading of prefect_flow_runs from Prefect and the last \
         collection (the breakdown is read again after 3000 times its read time, \
         at most EXPORTER_FLOW_RUNS_MAX_AGE).",
        reading.at.elapsed().as_secs_f64(),
    );
    state.last = Some(reading);
    Ok(vec![runs, age])
}

fn read(client: &mut Client, deadline: Instant) -> Result<Reading, ApiError> {
    let started = Instant::now();
    let body = history_request(rfc3339::now());
    let buckets: Vec<Bucket> = client.post("/flow_runs/history", &body, deadline)?;
    Ok(Reading {
        counts: state_counts(&buckets),
        at: Instant::now(),
        took: started.elapsed(),
    })
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
fn state_counts(buckets: &[Bucket]) -> Counts {
    let mut counts: Counts = KNOWN_STATES
        .iter()
        .map(|(t, n)| ((t.to_string(), n.to_string()), 0))
        .collect();
    for s in buckets.iter().flat_map(|b| &b.states) {
        *counts
            .entry((s.state_type.clone(), s.state_name.clone()))
            .or_insert(0) += s.count_runs;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("../../tests/fixtures/flow_runs_history_20000.json");

    fn sample_buckets() -> Vec<Bucket> {
        let v: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
        serde_json::from_value(v["response"].clone()).unwrap()
    }

    fn get(counts: &Counts, t: &str, n: &str) -> Option<u64> {
        counts.get(&(t.to_string(), n.to_string())).copied()
    }

    #[test]
    fn the_recorded_answer_gives_every_state() {
        let counts = state_counts(&sample_buckets());
        assert_eq!(counts.values().sum::<u64>(), 20_000);
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
        assert!(counts.values().all(|c| *c == 0));
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
    fn a_costly_breakdown_is_reused_longer_up_to_the_maximum_age() {
        let ten_min = Duration::from_secs(600);
        // 1,000 runs by history (10 ms), 20,000 (50 ms), 100,000 by names (70 ms).
        assert_eq!(
            reuse_for(Duration::from_millis(10), ten_min),
            Duration::from_secs(30)
        );
        assert_eq!(
            reuse_for(Duration::from_millis(50), ten_min),
            Duration::from_secs(150)
        );
        assert_eq!(
            reuse_for(Duration::from_millis(70), ten_min),
            Duration::from_secs(210)
        );
        // Past the maximum age (a slow link, a huge history): the maximum.
        assert_eq!(reuse_for(Duration::from_millis(300), ten_min), ten_min);
        // 0: every collection reads it.
        assert_eq!(
            reuse_for(Duration::from_millis(500), Duration::ZERO),
            Duration::ZERO
        );
        let read = |ago: u64, took_ms: u64| Reading {
            counts: Counts::new(),
            at: Instant::now() - Duration::from_secs(ago),
            took: Duration::from_millis(took_ms),
        };
        assert!(
            !read(0, 100).expired(ten_min),
            "read just now, reused for 300 s"
        );
        assert!(!read(299, 100).expired(ten_min));
        assert!(read(300, 100).expired(ten_min));
        assert!(
            read(600, 1000).expired(ten_min),
            "never older than the maximum age"
        );
        assert!(read(0, 100).expired(Duration::ZERO), "0: every collection");
    }

    #[test]
    fn known_states_are_distinct() {
        let set: std::collections::HashSet<_> = KNOWN_STATES.iter().collect();
        assert_eq!(set.len(), KNOWN_STATES.len());
    }
}
