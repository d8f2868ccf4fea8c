//! `prefect_flow_runs{state_type, state_name}`: flow runs per state, every name
//! the server knows (custom ones included), from ONE `POST /flow_runs/history`
//! request whose single bucket spans forty years, whatever the number of runs.
//!
//! That request costs the server CPU in proportion to the run history (79 ms
//! at 20,000 runs, 406-515 ms at 100,000, measured), while a count costs 2-9 ms
//! at either size. Counting each state name instead was measured too: 19 counts
//! cost 118 ms at 20,000 runs and 240 ms at 100,000, more than the history read
//! now and then. So the breakdown is read again only once its age reaches
//! `COST_FACTOR` times the wall time of its last read, and at most
//! `EXPORTER_FLOW_RUNS_MAX_AGE` (default 10 minutes; 0: every collection).
//! The reading costs the server about 1/`COST_FACTOR` of one CPU, whatever the
//! history holds: about 15 s between reads at 1,000 runs, 90 s at 20,000 and
//! 500 s at 100,000. In between, the last counts are shown again and
//! `prefect_flow_runs_age_seconds` says how old they are. The seed counts
//! (`prefect_flow_runs_total` and the three sums) stay fresh every collection.
//!
//! The history buckets runs by `expected_start_time`. Prefect sets it on every
//! run's first state (the scheduled time for a scheduled run, else the state's
//! time) and the REST API offers no way to clear it, so no run is left out; the
//! integration tests check that the per-state counts add up to the total count.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

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

/// The breakdown is read again once its age reaches this many times the wall
/// time of its last read (a read that took 0.5 s is reused for 500 s).
pub const COST_FACTOR: u32 = 1000;

/// The last breakdown read and when.
#[derive(Default)]
pub struct State {
    last: Option<Reading>,
}

struct Reading {
    counts: Vec<StateCount>,
    at: Instant,
    took: Duration,
}

impl State {
    /// Whether the breakdown must be read again now.
    #[cfg(test)]
    fn due(&self, max_age: Duration) -> bool {
        self.last.as_ref().is_none_or(|r| Self::expired(r, max_age))
    }

    fn expired(r: &Reading, max_age: Duration) -> bool {
        r.at.elapsed() >= reuse_for(r.took, max_age)
    }
}

/// How long a breakdown whose reading took `took` is shown again.
fn reuse_for(took: Duration, max_age: Duration) -> Duration {
    took.saturating_mul(COST_FACTOR).min(max_age)
}

/// The per-state counts and their age in seconds (0 when read just now). A
/// failed read fails the group: the series keep the values (and the age) of
/// the last success, and the next collection tries again.
pub fn collect(
    client: &mut Client,
    max_age: Duration,
    state: &mut State,
    deadline: Instant,
) -> Result<(Vec<StateCount>, f64), ApiError> {
    let reading = match state.last.take() {
        Some(r) if !State::expired(&r, max_age) => r,
        before => match read(client, deadline) {
            Ok(r) => r,
            Err(e) => {
                state.last = before;
                return Err(e);
            }
        },
    };
    let out = (reading.counts.clone(), reading.at.elapsed().as_secs_f64());
    state.last = Some(reading);
    Ok(out)
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
    fn a_costly_breakdown_is_reused_longer_up_to_the_maximum_age() {
        let ten_min = Duration::from_secs(600);
        // 1,000 runs (15 ms), 20,000 (90 ms), 100,000 (500 ms).
        assert_eq!(
            reuse_for(Duration::from_millis(15), ten_min),
            Duration::from_secs(15)
        );
        assert_eq!(
            reuse_for(Duration::from_millis(90), ten_min),
            Duration::from_secs(90)
        );
        assert_eq!(
            reuse_for(Duration::from_millis(500), ten_min),
            Duration::from_secs(500)
        );
        // Past the maximum age (a slow link, a huge history): the maximum.
        assert_eq!(reuse_for(Duration::from_secs(3), ten_min), ten_min);
        // 0: every collection reads it.
        assert_eq!(
            reuse_for(Duration::from_millis(500), Duration::ZERO),
            Duration::ZERO
        );
        let mut state = State::default();
        assert!(state.due(ten_min), "never read: due");
        state.last = Some(Reading {
            counts: Vec::new(),
            at: Instant::now(),
            took: Duration::from_millis(100),
        });
        assert!(!state.due(ten_min), "read just now, reused for 100 s");
        assert!(state.due(Duration::ZERO));
    }

    #[test]
    fn known_states_are_distinct() {
        let set: std::collections::HashSet<_> = KNOWN_STATES.iter().collect();
        assert_eq!(set.len(), KNOWN_STATES.len());
    }
}
