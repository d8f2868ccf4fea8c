//! `prefect_flow_runs{state_type, state_name}`: flow runs per state, every name
//! the server knows (custom ones included), read one of two ways, whichever
//! took less time the last time each was used:
//!
//! - ONE `POST /flow_runs/history` request whose single bucket spans forty
//!   years. It names every state, custom ones included, but costs the server
//!   CPU in proportion to the run history (50 ms at 20,000 runs, 260 ms at
//!   100,000, measured on SQLite without planner statistics, as Prefect runs
//!   it).
//! - One `POST /flow_runs/count` per state name (the 19 Prefect uses and the
//!   custom ones the last history read showed), then one count of the runs in
//!   any other name: 60-70 ms at either size, so it wins on large histories.
//!   When that last count is not 0, a run is in a name not yet seen and the
//!   history is read in the same collection to name it.
//!
//! The first read is by both, to know what each costs. The breakdown is read
//! again only once its age reaches `COST_FACTOR` times the wall time of its
//! last read, and at most `EXPORTER_FLOW_RUNS_MAX_AGE` (default 10 minutes;
//! 0: every collection). The reading so costs the server about 1/`COST_FACTOR`
//! of one CPU (about 10 ms per collection at a 30 s interval), whatever the
//! history holds: read again about every 30 s at 1,000 runs, 150 s at 20,000
//! and 200-250 s at 100,000 (by names). In between, the last counts are shown
//! again and `prefect_flow_runs_age_seconds` says how old they are. The seed
//! counts (`prefect_flow_runs_total` and the three sums) stay fresh every
//! collection.
//!
//! The history buckets runs by `expected_start_time`. Prefect sets it on every
//! run's first state (the scheduled time for a scheduled run, else the state's
//! time) and the REST API offers no way to clear it, so no run is left out; the
//! integration tests check that the per-state counts add up to the total count.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::listing::{self, Match, RunsFilter, StateWhere, Where};
use super::rfc3339;
use crate::config::FlowRunsRead;
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
/// time of its last read (a read that took 0.1 s is reused for 300 s).
pub const COST_FACTOR: u32 = 3000;

/// The last breakdown read and when, and what the next read needs to choose
/// between the history and the counts by name.
#[derive(Default)]
pub struct State {
    last: Option<Reading>,
    /// Wall time of the last read by history and by names: the cheaper one
    /// is used (module doc).
    history_took: Option<Duration>,
    names_took: Option<Duration>,
    /// Custom state names the last history read showed, with their type.
    custom: Vec<(String, String)>,
    /// A state name showed under two types (or a name Prefect uses under
    /// another type): counts by name cannot tell them apart.
    ambiguous: bool,
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

    /// Counts by name are used once known to cost less than the history.
    fn names_first(&self) -> bool {
        match (self.names_took, self.history_took) {
            (Some(n), Some(h)) => !self.ambiguous && n < h,
            _ => false,
        }
    }

    /// After a history read: the custom names it showed, and whether a name
    /// showed under more than one type.
    fn learn(&mut self, counts: &[StateCount]) {
        let seen: Vec<(&str, &str)> = counts
            .iter()
            .filter(|c| c.count > 0)
            .map(|c| (c.state_type.as_str(), c.state_name.as_str()))
            .collect();
        self.custom = seen
            .iter()
            .filter(|p| !KNOWN_STATES.contains(p))
            .map(|(t, n)| (t.to_string(), n.to_string()))
            .collect();
        self.ambiguous = self.custom.iter().enumerate().any(|(i, (_, n))| {
            KNOWN_STATES.iter().any(|(_, k)| k == n) || self.custom[..i].iter().any(|(_, m)| m == n)
        });
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
    how: FlowRunsRead,
    state: &mut State,
    deadline: Instant,
) -> Result<(Vec<StateCount>, f64), ApiError> {
    let reading = match state.last.take() {
        Some(r) if !State::expired(&r, max_age) => r,
        before => match read(client, how, state, deadline) {
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

/// One read by the method `how` asks for, `Auto`: the cheaper one (module
/// doc). Auto's first read is by both, to know their costs: the history names
/// the custom states, the counts by name give the breakdown when they cover
/// every run.
fn read(
    client: &mut Client,
    how: FlowRunsRead,
    state: &mut State,
    deadline: Instant,
) -> Result<Reading, ApiError> {
    let names_first = match how {
        FlowRunsRead::Auto => state.names_first(),
        FlowRunsRead::History => false,
        FlowRunsRead::Names => !state.ambiguous,
    };
    if names_first {
        let started = Instant::now();
        let counts = by_names(client, &state.custom, deadline)?;
        state.names_took = Some(started.elapsed());
        if let Some(counts) = counts {
            // A custom name emptied is no longer counted (nor shown).
            state.custom.retain(|(t, n)| {
                counts
                    .iter()
                    .any(|c| &c.state_type == t && &c.state_name == n)
            });
            return Ok(reading(counts, started));
        }
        // A run in a state name not counted: the history names it.
    }
    let started = Instant::now();
    let counts = by_history(client, deadline)?;
    state.history_took = Some(started.elapsed());
    state.learn(&counts);
    let mut out = reading(counts, started);
    if how == FlowRunsRead::Auto && state.names_took.is_none() && !state.ambiguous {
        let started = Instant::now();
        let counts = by_names(client, &state.custom, deadline)?;
        let took = started.elapsed();
        state.names_took = Some(took);
        if let Some(counts) = counts {
            out = reading(counts, started);
        }
        // Reused as long as a read by the cheaper method allows.
        out.took = state.history_took.map_or(took, |h| h.min(took));
    }
    Ok(out)
}

fn reading(counts: Vec<StateCount>, started: Instant) -> Reading {
    Reading {
        counts,
        at: Instant::now(),
        took: started.elapsed(),
    }
}

fn by_history(client: &mut Client, deadline: Instant) -> Result<Vec<StateCount>, ApiError> {
    let body = history_request(rfc3339::now());
    let buckets: Vec<Bucket> = client.post("/flow_runs/history", &body, deadline)?;
    Ok(state_counts(&buckets))
}

/// Runs whose state name `m` matches.
fn name_count(m: Match<'_>) -> RunsFilter<'_> {
    RunsFilter::new(Where {
        state: StateWhere::names(m),
        ..Where::default()
    })
}

/// One `POST /flow_runs/count` per state name (Prefect's and the `custom`
/// ones), then one of the runs in any other name: None when there are some,
/// whose names only the history gives. A name filter alone: SQLite answers it
/// from the state name index, while a state type filter would read every run
/// of that type. Custom names at 0 are left out.
fn by_names(
    client: &mut Client,
    custom: &[(String, String)],
    deadline: Instant,
) -> Result<Option<Vec<StateCount>>, ApiError> {
    let all: Vec<(&str, &str)> = KNOWN_STATES
        .iter()
        .copied()
        .chain(custom.iter().map(|(t, n)| (t.as_str(), n.as_str())))
        .collect();
    let mut counts: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (t, n) in &all {
        let c = listing::count_where(client, &name_count(Match::Any(&[n])), deadline)?;
        if c > 0 || KNOWN_STATES.contains(&(t, n)) {
            counts.insert((t.to_string(), n.to_string()), c);
        }
    }
    let names: Vec<&str> = all.iter().map(|(_, n)| *n).collect();
    let others = listing::count_where(client, &name_count(Match::NotAny(&names)), deadline)?;
    Ok((others == 0).then(|| listed(counts)))
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
    listed(counts)
}

/// Counts by (state type, state name), in that order.
fn listed(counts: BTreeMap<(String, String), u64>) -> Vec<StateCount> {
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
        let mut state = State::default();
        assert!(state.due(ten_min), "never read: due");
        state.last = Some(Reading {
            counts: Vec::new(),
            at: Instant::now(),
            took: Duration::from_millis(100),
        });
        assert!(!state.due(ten_min), "read just now, reused for 300 s");
        assert!(state.due(Duration::ZERO));
    }

    use crate::snapshot::test_fixtures::count;

    #[test]
    fn the_cheaper_method_is_used_once_both_are_known() {
        let ms = Duration::from_millis;
        let mut state = State::default();
        assert!(!state.names_first(), "first read: history (and names)");
        state.history_took = Some(ms(260));
        assert!(!state.names_first());
        state.names_took = Some(ms(70));
        assert!(state.names_first(), "100,000 runs");
        state.history_took = Some(ms(10));
        assert!(!state.names_first(), "1,000 runs");
        state.history_took = Some(ms(260));
        state.ambiguous = true;
        assert!(!state.names_first(), "a name under two types");
    }

    #[test]
    fn a_history_read_names_the_custom_states() {
        let mut state = State::default();
        state.learn(&[
            count("COMPLETED", "Completed", 5),
            count("FAILED", "MyCustomFail", 2),
            count("FAILED", "Emptied", 0),
            count("PENDING", "Pending", 0),
        ]);
        assert_eq!(
            state.custom,
            vec![("FAILED".to_string(), "MyCustomFail".to_string())]
        );
        assert!(!state.ambiguous);
        // The same name under two types, or a Prefect name under another type.
        state.learn(&[count("FAILED", "Odd", 1), count("CRASHED", "Odd", 1)]);
        assert!(state.ambiguous);
        state.learn(&[count("COMPLETED", "Running", 1)]);
        assert!(state.ambiguous);
        state.learn(&[count("RUNNING", "Running", 1)]);
        assert!(!state.ambiguous && state.custom.is_empty());
    }

    #[test]
    fn counts_by_name_filter_on_the_name_alone() {
        assert_eq!(
            serde_json::to_string(&name_count(Match::Any(&["Late"]))).unwrap(),
            r#"{"flow_runs":{"state":{"name":{"any_":["Late"]}}}}"#
        );
        assert_eq!(
            serde_json::to_string(&name_count(Match::NotAny(&["Late", "Custom"]))).unwrap(),
            r#"{"flow_runs":{"state":{"name":{"not_any_":["Late","Custom"]}}}}"#
        );
    }

    #[test]
    fn known_states_are_distinct() {
        let set: std::collections::HashSet<_> = KNOWN_STATES.iter().collect();
        assert_eq!(set.len(), KNOWN_STATES.len());
    }
}
