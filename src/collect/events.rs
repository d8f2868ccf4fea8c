//! `prefect_flow_run_state_changes_total{state_name}` and
//! `prefect_task_run_state_changes_total{state_name}`: state changes counted by
//! Prefect itself, from its events (`prefect.flow-run.<state name>`,
//! `prefect.task-run.<state name>`), ONE `POST /events/count-by/event` per
//! collection for both families (the answer is per event name), whatever the
//! number of events.
//!
//! The counts cover consecutive windows of `occurred` times: a window starts
//! one microsecond (Prefect's precision; both ends of its filter are inclusive)
//! after the end of the last window that was counted, and ends at now minus the
//! settle delay. A failed request leaves the window where it was, so the next
//! collection counts it with the time since: no event is counted twice or lost
//! across failed collections or a Prefect restart. The first window starts when
//! the exporter starts, so the counters start at 0 then.
//!
//! Prefect stores events asynchronously (its event persister writes batches at
//! least every 5 s; SDK clients send them from the flow's process, and replay
//! them after a lost connection). An event stored after its window was counted
//! is never counted: the settle delay is how long a window waits for them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::family::Family;
use crate::prefect::{ApiError, Client};

/// How often a server that lacks the endpoint (404, 405) is asked again.
const UNSUPPORTED_RECHECK: Duration = Duration::from_secs(3600);

/// The state names Prefect itself uses: shown at 0 from the first count, so
/// that the first change of each is an increase `rate()` sees.
pub const KNOWN_STATE_NAMES: &[&str] = &[
    "Scheduled",
    "Late",
    "AwaitingRetry",
    "AwaitingConcurrencySlot",
    "Pending",
    "Submitting",
    "InfrastructurePending",
    "Running",
    "Retrying",
    "Paused",
    "Suspended",
    "Cancelling",
    "Cancelled",
    "Completed",
    "Cached",
    "RolledBack",
    "Failed",
    "TimedOut",
    "Crashed",
];

/// The two counted families: event name prefix, and the name left out (a
/// running flow's heartbeat is no state change).
const FAMILIES: [(&str, &str); 2] = [
    ("prefect.flow-run.", "prefect.flow-run.heartbeat"),
    ("prefect.task-run.", "prefect.task-run.heartbeat"),
];

/// The counter of each of `FAMILIES`, in that order.
const COUNTERS: [(&str, &str); 2] = [
    (
        "prefect_flow_run_state_changes_total",
        "Flow-run state changes into each state since the exporter started, counted \
         from Prefect's events (EXPORTER_EVENTS_SETTLE behind).",
    ),
    (
        "prefect_task_run_state_changes_total",
        "Task-run state changes into each state since the exporter started, counted \
         from Prefect's events (EXPORTER_EVENTS_SETTLE behind; sent by the Prefect SDK).",
    ),
];

/// What this group remembers between collections.
pub struct State {
    /// Unix microseconds of the end of the last counted window (inclusive).
    counted_until: i64,
    /// Per family of `FAMILIES`; `None` until the first window was counted.
    totals: Option<[BTreeMap<String, u64>; 2]>,
    /// Set while the server answered 404/405: ask again after this.
    unsupported_until: Option<Instant>,
}

impl State {
    /// The first window starts at `start`, the exporter's start.
    pub fn new(start: SystemTime) -> State {
        State {
            counted_until: unix_micros(start) - 1,
            totals: None,
            unsupported_until: None,
        }
    }
}

impl Default for State {
    fn default() -> Self {
        State::new(SystemTime::now())
    }
}

// ---- request and answer ----

#[derive(Serialize)]
struct CountRequest {
    filter: EventFilter,
    time_unit: &'static str,
    time_interval: u64,
}

#[derive(Serialize)]
struct EventFilter {
    occurred: Occurred,
    event: NameFilter,
}

#[derive(Serialize)]
struct Occurred {
    since: String,
    until: String,
}

#[derive(Serialize)]
struct NameFilter {
    prefix: [&'static str; 2],
    exclude_name: [&'static str; 2],
}

#[derive(Deserialize)]
struct EventCount {
    value: String,
    count: u64,
}

const WEEK_MICROS: i64 = 7 * 86_400 * 1_000_000;

/// The events of both families in `[since, until]` (microseconds, inclusive).
/// The buckets are weeks, as many per bucket as the window spans, so any
/// window, even one that reaches back over a long outage, is one bucket
/// (Prefect refuses more than 1,000); the count by event name ignores the
/// buckets.
fn count_request(since: i64, until: i64) -> CountRequest {
    let weeks = (until - since).max(0) / WEEK_MICROS + 1;
    CountRequest {
        filter: EventFilter {
            occurred: Occurred {
                since: format_micros(since),
                until: format_micros(until),
            },
            event: NameFilter {
                prefix: FAMILIES.map(|(prefix, _)| prefix),
                exclude_name: FAMILIES.map(|(_, heartbeat)| heartbeat),
            },
        },
        time_unit: "week",
        time_interval: weeks as u64,
    }
}

/// Adds one window's counts to the totals, by state name (the event name
/// without the family prefix).
fn add_counts(totals: &mut BTreeMap<String, u64>, prefix: &str, rows: &[EventCount]) {
    for row in rows {
        let Some(name) = row.value.strip_prefix(prefix) else {
            continue;
        };
        if name.is_empty() {
            continue;
        }
        *totals.entry(name.to_string()).or_default() += row.count;
    }
}

fn initial_totals() -> BTreeMap<String, u64> {
    KNOWN_STATE_NAMES
        .iter()
        .map(|n| (n.to_string(), 0))
        .collect()
}

/// Counts the windows that have settled. `None`: the server has no events API
/// (the series stay absent, the collection does not fail).
pub fn collect(
    client: &mut Client,
    settle: Duration,
    state: &mut State,
    deadline: Instant,
) -> Result<Option<Vec<Family>>, ApiError> {
    if state.unsupported_until.is_some_and(|t| Instant::now() < t) {
        return Ok(None);
    }
    let until = unix_micros(SystemTime::now()) - settle.as_micros() as i64;
    // The first window is counted at once, even if empty, so that the series
    // appear (at 0) with the first collection.
    let since = state.counted_until + 1;
    let until = if state.totals.is_none() {
        Some(until.max(since))
    } else {
        (until >= since).then_some(until)
    };
    if let Some(until) = until {
        let body = count_request(since, until);
        let rows: Vec<EventCount> = match client.post("/events/count-by/event", &body, deadline) {
            Ok(rows) => rows,
            Err(ApiError::Status { status, .. }) if matches!(status, 404 | 405) => {
                if state.unsupported_until.is_none() {
                    log::info!(
                        "this Prefect server has no events API (HTTP {status}): \
                         no state-change counters"
                    );
                }
                state.unsupported_until = Some(Instant::now() + UNSUPPORTED_RECHECK);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let totals = state
            .totals
            .get_or_insert_with(|| [0, 1].map(|_| initial_totals()));
        for (family, (prefix, _)) in totals.iter_mut().zip(FAMILIES) {
            add_counts(family, prefix, &rows);
        }
        state.counted_until = until;
    }
    state.unsupported_until = None;
    let totals = state.totals.as_ref().map_or(&[][..], |t| &t[..]);
    let families = COUNTERS
        .iter()
        .zip(totals)
        .map(|((name, help), totals)| {
            let mut f = Family::counter(name, help, &["state_name"]);
            for (state_name, total) in totals {
                f.set(&[state_name], *total as f64);
            }
            f
        })
        .collect();
    Ok(Some(families))
}

fn unix_micros(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_micros() as i64,
        Err(e) => -(e.duration().as_micros() as i64),
    }
}

/// Exact to the microsecond (no float on the way), so that consecutive windows
/// neither overlap nor leave a gap.
fn format_micros(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let frac = us.rem_euclid(1_000_000);
    let whole = crate::rfc3339::format(secs as f64);
    // `format` renders whole seconds as `...SS.000000Z`.
    format!("{}{frac:06}Z", &whole[..whole.len() - 7])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::test_fixtures::response;

    #[test]
    fn recorded_answers_add_up_by_state_name() {
        let rows: Vec<EventCount> = response(include_str!(
            "../../tests/fixtures/events_count_by_event_flow_run.json"
        ));
        let mut totals = initial_totals();
        add_counts(&mut totals, FAMILIES[0].0, &rows);
        assert_eq!(totals["Pending"], 4);
        assert_eq!(totals["Completed"], 3);
        assert_eq!(totals["Running"], 3);
        assert_eq!(totals["Scheduled"], 1);
        assert_eq!(totals["Failed"], 0);
        // A second window adds to the first.
        add_counts(&mut totals, FAMILIES[0].0, &rows);
        assert_eq!(totals["Pending"], 8);
        let rows: Vec<EventCount> = response(include_str!(
            "../../tests/fixtures/events_count_by_event_task_run.json"
        ));
        let mut totals = initial_totals();
        add_counts(&mut totals, FAMILIES[1].0, &rows);
        assert_eq!(totals["Retrying"], 3);
        assert_eq!(totals["Completed"], 15);
        // Rows of another family, or without a name, are ignored; custom
        // names are kept.
        add_counts(
            &mut totals,
            FAMILIES[1].0,
            &[
                EventCount {
                    value: "prefect.flow-run.Failed".into(),
                    count: 2,
                },
                EventCount {
                    value: "prefect.task-run.".into(),
                    count: 2,
                },
                EventCount {
                    value: "prefect.task-run.MyState".into(),
                    count: 1,
                },
            ],
        );
        assert_eq!(totals["Failed"], 0);
        assert_eq!(totals["MyState"], 1);
        assert_eq!(totals.len(), KNOWN_STATE_NAMES.len() + 1);
    }

    #[test]
    fn the_request_is_the_documented_one_bucket_count() {
        let since = 1_795_551_568_070_645; // 2026-11-24T20:19:28.070645Z
        let body = count_request(since, since + 29_999_999);
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"filter":{"occurred":{"since":"2026-11-24T20:19:28.070645Z","until":"2026-11-24T20:19:58.070644Z"},"event":{"prefix":["prefect.flow-run.","prefect.task-run."],"exclude_name":["prefect.flow-run.heartbeat","prefect.task-run.heartbeat"]}},"time_unit":"week","time_interval":1}"#
        );
        // A window after a 30-day outage is still one bucket.
        let long = count_request(since, since + 30 * 86_400_000_000);
        assert_eq!(long.time_interval, 5);
    }

    #[test]
    fn micro_timestamps_are_exact() {
        assert_eq!(format_micros(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(format_micros(-1), "1969-12-31T23:59:59.999999Z");
        assert_eq!(
            format_micros(1_795_551_568_999_999),
            "2026-11-24T20:19:28.999999Z"
        );
        let t = UNIX_EPOCH + Duration::from_micros(1_795_551_568_070_645);
        assert_eq!(unix_micros(t), 1_795_551_568_070_645);
    }

    #[test]
    fn the_first_window_starts_at_the_exporter_start() {
        let start = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let s = State::new(start);
        assert_eq!(s.counted_until + 1, 1_800_000_000_000_000);
        assert!(s.totals.is_none());
    }
}
