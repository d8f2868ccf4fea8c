//! Late runs, one shared listing for the deployments and work queues groups,
//! and the server-wide late count for every group that shows it.
//!
//! Every collection is exact as of that collection: the listing is never
//! reused on a guess. A run's deployment and work queue are set when it is
//! created and never change (Prefect's `FlowRunUpdate` has neither), so the
//! per-deployment and per-queue split only changes when a run enters or
//! leaves Late. The collector keeps the late runs it knows (id, deployment,
//! queue) and proves at each collection, with counts, that they are still the
//! late set:
//! - T = `POST /flow_runs/count` of the `Late` runs (2-5 ms of server CPU);
//! - S = the same count restricted to the known ids (`id.any_`, 1,000 ids per
//!   request; a count, so a few ms whatever it matches).
//!
//! The known runs are distinct, so S of them are still late and T - S late
//! runs are not known. When S equals the number known and T - S is 0 (or the
//! cap is already full), the set is the known one, exactly: 2 requests. When
//! S is smaller, the known runs that left Late come back from a listing of
//! the known ids in another state name (only those runs, one page per 200);
//! when T - S is not 0 and the cap allows, the late runs not known come back
//! from a listing `id.not_any_` the known ones (only those runs). A result
//! that does not add
//! up (a run deleted, or a change between two of these requests) lists the
//! late runs whole, as does the first collection and the one after a failure:
//! min(ceil(T/200), ceil(C/200)) pages of `POST /flow_runs/filter`, with the
//! cap C (EXPORTER_MAX_LISTED_RUNS, default 1,000). A server that just holds
//! a thousand old late runs so costs 2 counts per collection, not 5 full
//! pages (80-160 ms of server CPU each); a healthy server costs one count.
//! The cost never depends on how many deployments or queues are late.
//!
//! Below the cap, the counts per deployment and per queue are exact. Past it,
//! they count the known runs only (at most C, the first listed and then the
//! ones that replaced those that left); the exact total still comes from the
//! count, and `prefect_late_flow_runs_capped` says that the cap was hit.

use std::collections::HashMap;
use std::time::Instant;

use serde::Deserialize;

use super::family::Family;
use super::listing::{self, Filter, Match, StateWhere, States, Where, IDS_PER_COUNT};
use crate::prefect::{ApiError, Client};

/// How complete the late-run split of the deployments and work queues groups is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LateRunsSummary {
    /// Late runs on the server, from one count: exact whatever the cap.
    pub total: u64,
    /// Late runs listed, and so counted per deployment and per queue.
    pub listed: u64,
    /// True when EXPORTER_MAX_LISTED_RUNS stopped the listing.
    pub capped: bool,
}

impl LateRunsSummary {
    /// Shown whenever a group that needs the late runs is on: the paging
    /// alerts read `prefect_late_flow_runs`.
    pub fn families(&self) -> Vec<Family> {
        vec![
            Family::single(
                "prefect_late_flow_runs",
                "Flow runs in the state Late, from one count: exact whatever the listing cap.",
                self.total as f64,
            ),
            Family::single(
                "prefect_late_flow_runs_listed",
                "Late flow runs listed and counted per deployment and per work queue.",
                self.listed as f64,
            ),
            Family::single(
                "prefect_late_flow_runs_capped",
                "1 when EXPORTER_MAX_LISTED_RUNS stopped the late-run listing: the per-deployment \
                 and per-queue late counts then cover only the listed runs.",
                f64::from(u8::from(self.capped)),
            ),
        ]
    }
}

const LATE_NAME: [&str; 1] = ["Late"];
const LATE: States = States::Names(&LATE_NAME);

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

/// Where a late run counts: both fixed when the run is created.
struct Placed {
    deployment_id: Option<String>,
    work_queue_id: Option<String>,
}

/// What the collector remembers between collections: the late runs known,
/// by id, from the last good collection.
#[derive(Default)]
pub struct State {
    known: Option<HashMap<String, Placed>>,
}

/// The late runs among `ids`.
fn known_late<'a>(ids: &'a [&'a str]) -> Filter<'a> {
    Filter::runs(Where {
        id: Some(Match::Any(ids)),
        state: LATE.state(),
        ..Where::default()
    })
}

/// The runs among `ids` no longer late.
fn left_late<'a>(ids: &'a [&'a str]) -> Filter<'a> {
    Filter::runs(Where {
        id: Some(Match::Any(ids)),
        state: StateWhere::names(Match::NotAny(&LATE_NAME)),
        ..Where::default()
    })
}

/// The late runs not among `ids`.
fn new_late<'a>(ids: &'a [&'a str]) -> Filter<'a> {
    Filter::runs(Where {
        id: Some(Match::NotAny(ids)),
        state: LATE.state(),
        ..Where::default()
    })
}

/// The server-wide late count, and with `split` the late runs per deployment
/// and per queue (module doc). Without `split` (no group shows the split),
/// one count.
pub fn collect(
    client: &mut Client,
    max: usize,
    split: bool,
    state: &mut State,
    deadline: Instant,
) -> Result<LateRuns, ApiError> {
    // Taken out: any failure below leaves nothing to prove next time.
    let known = state.known.take();
    let total = listing::count(client, LATE, deadline)?;
    if !split {
        return Ok(tally(total, &HashMap::new(), false));
    }
    if total == 0 {
        state.known = Some(HashMap::new());
        return Ok(LateRuns::default());
    }
    let known = match known {
        Some(k) if !k.is_empty() => update(client, k, total, max, deadline)?,
        _ => None,
    };
    let known = match known {
        Some(k) => k,
        None => {
            let (runs, _) = listing::runs(client, LATE, max, |r: &LateRun| &r.id, deadline)?;
            placed(runs)
        }
    };
    let late = tally(total, &known, (known.len() as u64) < total);
    state.known = Some(known);
    Ok(late)
}

fn placed(runs: Vec<LateRun>) -> HashMap<String, Placed> {
    runs.into_iter()
        .map(|r| {
            let p = Placed {
                deployment_id: r.deployment_id,
                work_queue_id: r.work_queue_id,
            };
            (r.id, p)
        })
        .collect()
}

/// The known late runs brought up to date with `total` late runs on the
/// server, or None when they must be listed whole (module doc).
fn update(
    client: &mut Client,
    mut known: HashMap<String, Placed>,
    total: u64,
    max: usize,
    deadline: Instant,
) -> Result<Option<HashMap<String, Placed>>, ApiError> {
    let mut ids: Vec<&str> = known.keys().map(String::as_str).collect();
    ids.sort_unstable();
    let mut still = 0;
    for chunk in ids.chunks(IDS_PER_COUNT) {
        still += listing::count_where(client, &known_late(chunk), deadline)?;
    }
    let Some(unknown) = total.checked_sub(still) else {
        return Ok(None);
    };
    let mut left: Vec<String> = Vec::new();
    if still < ids.len() as u64 {
        for chunk in ids.chunks(IDS_PER_COUNT) {
            let (runs, _) = listing::runs_where(
                client,
                &left_late(chunk),
                chunk.len(),
                |r: &LateRun| &r.id,
                deadline,
            )?;
            left.extend(runs.into_iter().map(|r| r.id));
        }
    }
    for id in &left {
        known.remove(id);
    }
    if known.len() as u64 != still {
        // A known run is gone (deleted), or moved between two requests.
        return Ok(None);
    }
    if unknown > 0 && known.len() < max {
        let mut ids: Vec<&str> = known.keys().map(String::as_str).collect();
        ids.sort_unstable();
        let room = max - known.len();
        let (runs, _) =
            listing::runs_where(client, &new_late(&ids), room, |r: &LateRun| &r.id, deadline)?;
        known.extend(placed(runs));
    }
    Ok((known.len() as u64 == total.min(max as u64)).then_some(known))
}

fn tally(total: u64, runs: &HashMap<String, Placed>, capped: bool) -> LateRuns {
    let mut out = LateRuns {
        summary: LateRunsSummary {
            total,
            listed: runs.len() as u64,
            capped,
        },
        ..LateRuns::default()
    };
    for r in runs.values() {
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
        let late = tally(total, &placed(runs), false);
        assert_eq!(
            late.summary,
            LateRunsSummary {
                total: 1,
                listed: 1,
                capped: false,
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
    fn the_proof_and_update_bodies_ask_by_id() {
        let ids = ["a", "b"];
        assert_eq!(
            serde_json::to_string(&known_late(&ids)).unwrap(),
            r#"{"flow_runs":{"id":{"any_":["a","b"]},"state":{"name":{"any_":["Late"]}}}}"#
        );
        assert_eq!(
            serde_json::to_string(&left_late(&ids)).unwrap(),
            r#"{"flow_runs":{"id":{"any_":["a","b"]},"state":{"name":{"not_any_":["Late"]}}}}"#
        );
        assert_eq!(
            serde_json::to_string(&new_late(&ids)).unwrap(),
            r#"{"flow_runs":{"id":{"not_any_":["a","b"]},"state":{"name":{"any_":["Late"]}}}}"#
        );
    }

    #[test]
    fn runs_without_deployment_or_queue_count_in_the_total_only() {
        let runs: Vec<LateRun> = serde_json::from_str(
            r#"[{"id":"1","deployment_id":"d","work_queue_id":"q"},
                {"id":"2","deployment_id":"d","work_queue_id":null},
                {"id":"3"}]"#,
        )
        .unwrap();
        let late = tally(1500, &placed(runs), true);
        assert_eq!(late.by_deployment["d"], 2);
        assert_eq!(late.by_queue["q"], 1);
        assert_eq!(late.summary.listed, 3);
        assert!(late.summary.capped);
        assert_eq!(late.summary.total, 1500);
    }
}
