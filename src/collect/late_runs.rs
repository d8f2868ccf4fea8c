//! Late runs, one shared listing for the deployments and work queues groups.
//!
//! Cost per collection, with L late runs on the server and a cap C
//! (EXPORTER_MAX_LISTED_RUNS, default 1,000): one `POST /flow_runs/count`
//! (2-5 ms of server CPU), and only when L > 0 and it equals the last
//! listing's count, one fingerprint: a count of the late runs whose expected
//! start time is later than that of the newest run listed (4 ms at 100,000
//! runs, where the newest late run itself, sorted from thousands, costs
//! 9-13 ms). The listing itself, min(ceil(L/200), ceil(C/200)) pages of `POST
//! /flow_runs/filter` (80-160 ms of server CPU each for full pages), is sent
//! only when the late set may have changed: the count or the fingerprint
//! differs from the last listing's, the last collection's late-run requests
//! failed, or the listing is older than `listing::LISTING_MAX_AGE` (10 min). A
//! listing stopped by the cap may leave out the newest run, so it is followed
//! by the fingerprint count that the next collections compare with. A server
//! that just holds a thousand old late runs so costs 2 cheap requests per
//! collection, not 5 full pages. A healthy server costs one count. The cost
//! never depends on how many deployments or queues are late.
//!
//! What the reuse cannot see: between two collections, a late run leaving the
//! state (started, cancelled, deleted) while another one whose expected start
//! time is not later than the newest listed run's enters it leaves the count
//! and the fingerprint unchanged, so the per-deployment and per-queue split
//! stays the old one until the listing's maximum age. Runs become late in the order of
//! their expected start times, so a run entering Late is almost always the
//! newest one; the total (`prefect_late_flow_runs`) is counted every
//! collection and always exact.
//!
//! Below the cap, the counts per deployment and per queue are exact. Past it,
//! they count the listed runs only; the exact total still comes from the count,
//! and `prefect_late_flow_runs_capped` says that the cap was hit.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::listing::{self, After, RunsFilter, States, Where};
use super::rfc3339;
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
    #[serde(default)]
    expected_start_time: Option<String>,
}

/// What the collector remembers between collections: the last good listing
/// and what it was taken under.
#[derive(Default)]
pub struct State {
    last: Option<Listed>,
}

struct Listed {
    key: Key,
    /// The fingerprint's bound (`after_newest`); None: no reuse.
    after: Option<String>,
    at: Instant,
    late: LateRuns,
}

/// What must be unchanged for a listing to be reused.
#[derive(Debug, Clone, PartialEq)]
struct Key {
    total: u64,
    /// Late runs expected to start after `after` (the fingerprint).
    newer: u64,
    /// The cap the listing was taken with.
    max: usize,
}

/// The fingerprint request: late runs whose expected start time is at or
/// after `after` (Prefect's `after_` includes the bound).
fn newer_body(after: &str) -> RunsFilter<'static> {
    RunsFilter::new(Where {
        state: LATE.state(),
        expected_start_time: Some(After {
            after_: after.to_string(),
        }),
        ..Where::default()
    })
}

fn count_newer(client: &mut Client, after: &str, deadline: Instant) -> Result<u64, ApiError> {
    listing::count_where(client, &newer_body(after), deadline)
}

/// One microsecond (Prefect's precision) after the latest expected start
/// time among `runs`: the bound of the fingerprint. None without any time.
fn after_newest(runs: &[LateRun]) -> Option<String> {
    let newest = runs
        .iter()
        .filter_map(|r| r.expected_start_time.as_deref().and_then(rfc3339::parse))
        .reduce(f64::max)?;
    Some(rfc3339::format(newest + 1e-6))
}

/// Whether the last listing still stands for the late set described by
/// `key`: same count, same fingerprint, same cap, and younger than `max_age`.
fn reusable(last: Option<(&Key, Instant)>, key: &Key, now: Instant, max_age: Duration) -> bool {
    match last {
        Some((k, at)) => k == key && now.saturating_duration_since(at) < max_age,
        None => false,
    }
}

pub fn collect(
    client: &mut Client,
    max: usize,
    max_age: Duration,
    state: &mut State,
    deadline: Instant,
) -> Result<LateRuns, ApiError> {
    // Taken out: any failure below leaves no listing to reuse.
    let last = state.last.take();
    let total = listing::count(client, LATE, deadline)?;
    if total == 0 {
        return Ok(LateRuns::default());
    }
    let now = Instant::now();
    if let Some(l) = last {
        // The fingerprint is asked only when all else allows a reuse: the
        // count, the cap, the age.
        let if_no_newer = Key {
            total,
            newer: l.key.newer,
            max,
        };
        if let (true, Some(after)) = (
            reusable(Some((&l.key, l.at)), &if_no_newer, now, max_age),
            &l.after,
        ) {
            if count_newer(client, after, deadline)? == l.key.newer {
                let mut late = l.late.clone();
                late.summary.listing_age = now.saturating_duration_since(l.at);
                state.last = Some(l);
                return Ok(late);
            }
        }
    }
    let (runs, capped) = listing::runs(client, LATE, max, |r: &LateRun| &r.id, deadline)?;
    let late = tally(total, &runs, capped);
    let after = after_newest(&runs);
    // Complete, the listing holds the newest run: none is later. Capped, it
    // may not: the count now is what the next collections compare with.
    let newer = match (&after, capped) {
        (Some(a), true) => count_newer(client, a, deadline)?,
        _ => 0,
    };
    state.last = Some(Listed {
        key: Key { total, newer, max },
        after,
        at: now,
        late: late.clone(),
    });
    Ok(late)
}

fn tally(total: u64, runs: &[LateRun], capped: bool) -> LateRuns {
    let mut out = LateRuns {
        summary: LateRunsSummary {
            total,
            listed: runs.len() as u64,
            capped,
            listing_age: Duration::ZERO,
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
    use crate::collect::test_fixtures::response;

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
                capped: false,
                listing_age: Duration::ZERO,
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
    fn the_listing_is_reused_only_while_count_fingerprint_and_cap_hold() {
        let key = |total: u64, newer: u64, max: usize| Key { total, newer, max };
        let at = Instant::now();
        let age = Duration::from_secs(600);
        let last = key(300, 0, 1000);
        let reuse = |k: &Key, now: Instant| reusable(Some((&last, at)), k, now, age);
        assert!(reuse(&key(300, 0, 1000), at + Duration::from_secs(30)));
        assert!(!reuse(&key(301, 0, 1000), at), "count changed");
        assert!(!reuse(&key(299, 0, 1000), at), "count changed");
        assert!(!reuse(&key(300, 1, 1000), at), "a later run is late");
        assert!(!reuse(&key(300, 0, 200), at), "cap changed");
        assert!(!reuse(&key(300, 0, 1000), at + age), "too old");
        assert!(
            !reusable(None, &key(300, 0, 1000), at, age),
            "no good listing"
        );
        assert!(
            !reusable(Some((&last, at)), &last, at, Duration::ZERO),
            "max age 0: list every collection"
        );
    }

    #[test]
    fn the_fingerprint_counts_late_runs_after_the_newest_listed_one() {
        let run = |id: &str, t: Option<&str>| LateRun {
            id: id.into(),
            deployment_id: None,
            work_queue_id: None,
            expected_start_time: t.map(Into::into),
        };
        let runs = [
            run("1", Some("2026-12-03T07:10:23.772622Z")),
            run("2", Some("2026-12-03T09:00:00.000001+01:00")),
            run("3", None),
            run("4", Some("2026-12-02T23:59:59Z")),
        ];
        // 08:00:00.000001 UTC is the newest; one microsecond later is the bound.
        let after = after_newest(&runs).unwrap();
        assert_eq!(after, "2026-12-03T08:00:00.000002Z");
        assert_eq!(after_newest(&[run("3", None)]), None);
        assert_eq!(
            serde_json::to_string(&newer_body(&after)).unwrap(),
            r#"{"flow_runs":{"state":{"name":{"any_":["Late"]}},"expected_start_time":{"after_":"2026-12-03T08:00:00.000002Z"}}}"#
        );
    }

    #[test]
    fn runs_without_deployment_or_queue_count_in_the_total_only() {
        let runs = vec![
            LateRun {
                id: "1".into(),
                deployment_id: Some("d".into()),
                work_queue_id: Some("q".into()),
                expected_start_time: None,
            },
            LateRun {
                id: "2".into(),
                deployment_id: Some("d".into()),
                work_queue_id: None,
                expected_start_time: None,
            },
            LateRun {
                id: "3".into(),
                deployment_id: None,
                work_queue_id: None,
                expected_start_time: None,
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
