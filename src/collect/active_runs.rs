//! Runs in progress per deployment, for "stuck run" alerts:
//! `prefect_deployment_active_flow_runs{state_type}` for PENDING and RUNNING
//! and `prefect_deployment_oldest_active_flow_run_timestamp_seconds`, the time
//! at which the longest-waiting run still in that state entered it (RUNNING:
//! its `start_time`; PENDING: its state's `timestamp`, as a PENDING run has no
//! start).
//!
//! Each run listed costs the server about 0.3-0.5 ms of CPU and 2 kB (a full
//! run, with its state and parameters), and a neglected server holds
//! thousands of runs left in progress by dead infrastructure, so listing them
//! every collection (up to the cap, 5 pages) was most of a collection's cost.
//! Instead the collector keeps the runs in progress it knows (id, deployment,
//! state type, entry time) and proves at each collection that they are still
//! what the series show, exactly:
//! - T = one count of the runs in PENDING or RUNNING;
//! - per state type, the count of the known runs of that type still in it
//!   (`id.any_`, 1,000 ids per request);
//! - the entry time of the oldest known run per deployment and state type,
//!   read again (`id.any_`, one page per 200 such runs), unless it is a RUNNING
//!   run's `start_time`, which Prefect sets once and never moves.
//!
//! The known runs are distinct, so when both counts equal the runs known of
//! each type and T equals them together, the set and the types are the
//! server's. Entry times only move forward (the server stamps every state it
//! stores, and a request cannot give one), so while the oldest known run of a
//! deployment and type keeps its entry time, no other run of it can be older:
//! that minimum is exact without reading them. That covers a run that goes
//! round to the same state between two collections (Pending -> Running ->
//! Pending), which no filter can see.
//!
//! What changed costs only what changed: the known runs no longer in their
//! type come back from one listing (`id.any_` + `state.type.not_any_`), the
//! runs in progress not known from one listing (`id.not_any_`), and a
//! deployment whose oldest run moved on is listed again (`deployment_id.any_`).
//! A result that does not add up (a run deleted, or a change between two of
//! these requests) lists the runs in progress whole, as do the first
//! collection, the one after a failure, and every collection while fewer
//! than `PROVE_FROM` runs are in progress (one page costs less then): max(1, ceil(A/200)) pages of `POST
//! /flow_runs/filter`, at most ceil(C/200) with the cap C
//! (EXPORTER_MAX_LISTED_RUNS). Past the cap, the series cover the known runs
//! (at most C) and `prefect_active_flow_runs_capped` is 1.
//!
//! Series exist for the deployments that get per-deployment series (at most
//! EXPORTER_MAX_DEPLOYMENTS), both state types always (0 when none), so an
//! alert needs no `absent()`; the oldest time only while a run is there.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use serde::Deserialize;

use super::deployments::DeploymentSeries;
use super::family::Family;
use super::listing::{self, Filter, Match, StateWhere, States, Where, IDS_PER_COUNT, PAGE};
use crate::prefect::{ApiError, Client};
use crate::rfc3339;

pub const ACTIVE_TYPES: [&str; 2] = ["PENDING", "RUNNING"];
const ACTIVE: States = States::Types(&ACTIVE_TYPES);

#[derive(Deserialize, Clone, PartialEq)]
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

#[derive(Deserialize, Clone, PartialEq)]
struct RunState {
    #[serde(default)]
    timestamp: Option<String>,
}

/// Count and oldest entry time per state type of `ACTIVE_TYPES`.
type PerType = [(u64, Option<f64>); 2];

/// What the collector remembers between collections: the runs in progress
/// known from the last good collection, by id.
#[derive(Default)]
pub struct State {
    known: Option<Known>,
}

struct Known {
    runs: HashMap<String, ActiveRun>,
    /// Runs in progress on the server: more than `runs` past the cap.
    total: u64,
}

/// Fewer known runs in progress are listed whole, in one request: the proof
/// costs 3-4 requests of 3-4 ms of server CPU, a listing about 0.3 ms per run
/// (both exact; prefect-api.md, bench/RESULTS.md).
const PROVE_FROM: usize = 40;

/// Runs of `ids` in state type `t`.
fn still_in<'a>(ids: &'a [&'a str], t: &'a [&'a str; 1]) -> Filter<'a> {
    Filter::runs(Where {
        id: Some(Match::Any(ids)),
        state: StateWhere::types(Match::Any(t)),
        ..Where::default()
    })
}

/// Runs of `ids` no longer in state type `t`.
fn moved_from<'a>(ids: &'a [&'a str], t: &'a [&'a str; 1]) -> Filter<'a> {
    Filter::runs(Where {
        id: Some(Match::Any(ids)),
        state: StateWhere::types(Match::NotAny(t)),
        ..Where::default()
    })
}

/// The runs in progress that are not among `known`.
fn new_runs_filter<'a>(known: &'a [&'a str]) -> Filter<'a> {
    Filter::runs(Where {
        id: Some(Match::NotAny(known)),
        state: ACTIVE.state(),
        ..Where::default()
    })
}

/// The runs in progress of `deployments`.
fn of_deployments<'a>(deployments: &'a [&'a str]) -> Filter<'a> {
    Filter::runs(Where {
        deployment_id: Some(Match::Any(deployments)),
        state: ACTIVE.state(),
        ..Where::default()
    })
}

/// The runs `ids`, whatever their state.
fn by_id<'a>(ids: &'a [&'a str]) -> Filter<'a> {
    Filter::runs(Where {
        id: Some(Match::Any(ids)),
        ..Where::default()
    })
}

pub fn collect(
    client: &mut Client,
    deployments: &[DeploymentSeries],
    max: usize,
    state: &mut State,
    deadline: Instant,
) -> Result<(Vec<Family>, bool), ApiError> {
    // Taken out: any failure below leaves nothing to prove next time.
    let known = match state.known.take() {
        Some(k) if k.runs.len() >= PROVE_FROM => update(client, k, max, deadline)?,
        _ => None,
    };
    let known = match known {
        Some(k) => k,
        None => {
            let (runs, capped) =
                listing::runs(client, ACTIVE, max, |r: &ActiveRun| &r.id, deadline)?;
            let total = if capped {
                listing::count(client, ACTIVE, deadline)?
            } else {
                runs.len() as u64
            };
            Known {
                runs: by_ids(runs),
                total,
            }
        }
    };
    let capped = known.total > known.runs.len() as u64;
    let out = (families(known.runs.values(), capped, deployments), capped);
    state.known = Some(known);
    Ok(out)
}

fn by_ids(runs: Vec<ActiveRun>) -> HashMap<String, ActiveRun> {
    runs.into_iter().map(|r| (r.id.clone(), r)).collect()
}

fn sorted_ids<'a>(runs: impl Iterator<Item = &'a ActiveRun>) -> Vec<&'a str> {
    let mut ids: Vec<&str> = runs.map(|r| r.id.as_str()).collect();
    ids.sort_unstable();
    ids
}

/// Puts `run` in place of the known one: kept while in progress, else dropped.
fn apply(runs: &mut HashMap<String, ActiveRun>, run: ActiveRun) {
    if ACTIVE_TYPES.contains(&run.state_type.as_str()) {
        runs.insert(run.id.clone(), run);
    } else {
        runs.remove(&run.id);
    }
}

/// The known runs brought up to date (module doc), or None when they must be
/// listed whole.
fn update(
    client: &mut Client,
    known: Known,
    max: usize,
    deadline: Instant,
) -> Result<Option<Known>, ApiError> {
    let mut runs = known.runs;
    let total = listing::count(client, ACTIVE, deadline)?;
    // Runs read in this collection: their entry times are the server's.
    let mut fresh: BTreeSet<String> = BTreeSet::new();
    let mut confirmed = 0u64;
    // Both types are checked against the known runs as they were: a run
    // that moved from one to the other is counted once, as moved.
    let mut moved: Vec<ActiveRun> = Vec::new();
    for t in ACTIVE_TYPES {
        let t = [t];
        let ids = sorted_ids(runs.values().filter(|r| r.state_type == t[0]));
        let mut still = 0;
        for chunk in ids.chunks(IDS_PER_COUNT) {
            still += listing::count_where(client, &still_in(chunk, &t), deadline)?;
        }
        confirmed += still;
        if still < ids.len() as u64 {
            for chunk in ids.chunks(IDS_PER_COUNT) {
                let (page, _) = listing::runs_where(
                    client,
                    &moved_from(chunk, &t),
                    chunk.len(),
                    |r: &ActiveRun| &r.id,
                    deadline,
                )?;
                moved.extend(page);
            }
        }
    }
    for run in moved {
        if ACTIVE_TYPES.contains(&run.state_type.as_str()) {
            confirmed += 1;
        }
        fresh.insert(run.id.clone());
        apply(&mut runs, run);
    }
    if runs.len() as u64 != confirmed || confirmed > total {
        // A known run is gone (deleted), or moved between two requests.
        return Ok(None);
    }
    if total > confirmed && runs.len() < max {
        let ids = sorted_ids(runs.values());
        let (new, _) = listing::runs_where(
            client,
            &new_runs_filter(&ids),
            max - runs.len(),
            |r: &ActiveRun| &r.id,
            deadline,
        )?;
        let new = by_ids(new);
        fresh.extend(new.keys().cloned());
        runs.extend(new);
    }
    // The oldest known run per deployment and type, when its time may move.
    let mut oldest: BTreeMap<(&str, &str), (&ActiveRun, f64)> = BTreeMap::new();
    for r in runs.values() {
        let (Some(dep), Some(t)) = (r.deployment_id.as_deref(), entered(r)) else {
            continue;
        };
        let slot = oldest.entry((dep, r.state_type.as_str())).or_insert((r, t));
        if t < slot.1 {
            *slot = (r, t);
        }
    }
    let check: Vec<&str> = oldest
        .values()
        .filter(|(r, _)| !fixed_entry(r) && !fresh.contains(&r.id))
        .map(|(r, _)| r.id.as_str())
        .collect();
    let mut read: Vec<ActiveRun> = Vec::new();
    for chunk in check.chunks(PAGE) {
        let (page, _) =
            listing::runs_where(client, &by_id(chunk), PAGE, |r: &ActiveRun| &r.id, deadline)?;
        read.extend(page);
    }
    if read.len() != check.len() {
        return Ok(None);
    }
    let moved_on: Vec<String> = read
        .into_iter()
        .filter(|r| runs.get(&r.id) != Some(r))
        .filter_map(|r| r.deployment_id)
        .collect::<BTreeSet<String>>()
        .into_iter()
        .collect();
    if !moved_on.is_empty() {
        // Their oldest run moved on: the others' times may be older than
        // known; the deployment's runs in progress are read again.
        let deps: Vec<&str> = moved_on.iter().map(String::as_str).collect();
        let (again, capped) = listing::runs_where(
            client,
            &of_deployments(&deps),
            max,
            |r: &ActiveRun| &r.id,
            deadline,
        )?;
        if capped {
            return Ok(None);
        }
        runs.retain(|_, r| {
            r.deployment_id
                .as_deref()
                .is_none_or(|d| !moved_on.iter().any(|m| m == d))
        });
        runs.extend(by_ids(again));
    }
    if runs.len() as u64 != total.min(max as u64) {
        return Ok(None);
    }
    Ok(Some(Known { runs, total }))
}

/// A RUNNING run's entry is its `start_time`, which Prefect sets the first
/// time a run enters RUNNING and never moves.
fn fixed_entry(run: &ActiveRun) -> bool {
    run.state_type == "RUNNING" && run.start_time.is_some()
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

/// The runs in progress of each listed deployment, per state type (at 0 when
/// none), and how complete the listing was.
fn families<'a>(
    runs: impl Iterator<Item = &'a ActiveRun>,
    capped: bool,
    deployments: &[DeploymentSeries],
) -> Vec<Family> {
    let mut by_deployment: HashMap<&str, PerType> = HashMap::new();
    let mut listed = 0;
    for run in runs {
        listed += 1;
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
    const LABELS: &[&str] = &["deployment", "flow", "state_type"];
    let mut active = Family::gauge(
        "prefect_deployment_active_flow_runs",
        "Flow runs of the deployment in progress, per state type (PENDING, RUNNING).",
        LABELS,
    );
    let mut oldest = Family::gauge(
        "prefect_deployment_oldest_active_flow_run_timestamp_seconds",
        "Unix time at which the longest-waiting run still in this state type entered it \
         (RUNNING: its start; PENDING: its Pending state's time).",
        LABELS,
    );
    for d in deployments {
        let per = by_deployment
            .get(d.id.as_str())
            .copied()
            .unwrap_or_default();
        for (state_type, (count, first)) in ACTIVE_TYPES.iter().zip(per) {
            let labels = [d.name.as_str(), d.flow.as_str(), state_type];
            active.set(&labels, count as f64);
            if let Some(t) = first {
                oldest.set(&labels, t);
            }
        }
    }
    vec![
        active,
        oldest,
        Family::single(
            "prefect_active_flow_runs_listed",
            "Flow runs in PENDING or RUNNING listed in the last collection.",
            listed as f64,
        ),
        Family::single(
            "prefect_active_flow_runs_capped",
            "1 when EXPORTER_MAX_LISTED_RUNS stopped the listing of runs in progress.",
            f64::from(u8::from(capped)),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::family::{len, value};
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
        let f = families(runs.iter(), false, &deps);
        assert_eq!(value(&f, "prefect_active_flow_runs_listed", &[]), Some(4.0));
        assert_eq!(value(&f, "prefect_active_flow_runs_capped", &[]), Some(0.0));
        assert_eq!(
            len(&f, "prefect_deployment_active_flow_runs"),
            4,
            "two state types per deployment"
        );
        let get = |dep: &str, flow: &str, st: &str| {
            let l = [dep, flow, st];
            (
                value(&f, "prefect_deployment_active_flow_runs", &l),
                value(
                    &f,
                    "prefect_deployment_oldest_active_flow_run_timestamp_seconds",
                    &l,
                ),
            )
        };
        // Pending: forced at 06:17:23.716196, created Pending at 06:17:24.735175.
        assert_eq!(
            get("ops-etl", "flow-ops", "PENDING"),
            (Some(2.0), Some(t("2026-12-01T06:17:23.716196Z")))
        );
        // Running: started 06:17:23.845390 (forced) and 06:17:24.648592.
        assert_eq!(
            get("ops-etl", "flow-ops", "RUNNING"),
            (Some(2.0), Some(t("2026-12-01T06:17:23.845390Z")))
        );
        assert_eq!(get("idle", "flow-ops", "RUNNING"), (Some(0.0), None));
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
        let f = families(runs.iter(), true, &[deployment("d", "daily")]);
        assert_eq!(value(&f, "prefect_active_flow_runs_capped", &[]), Some(1.0));
        assert_eq!(value(&f, "prefect_active_flow_runs_listed", &[]), Some(5.0));
        let get = |st: &str| {
            let l = ["daily", "flow-ops", st];
            (
                value(&f, "prefect_deployment_active_flow_runs", &l),
                value(
                    &f,
                    "prefect_deployment_oldest_active_flow_run_timestamp_seconds",
                    &l,
                ),
            )
        };
        assert_eq!(get("PENDING"), (Some(2.0), Some(t("2026-01-01T02:00:00Z"))));
        // A RUNNING run without a start falls back to its state's time.
        assert_eq!(get("RUNNING"), (Some(2.0), Some(t("2026-01-01T00:00:00Z"))));
    }

    #[test]
    fn proof_and_update_bodies_ask_by_id() {
        let known = ["a", "b"];
        assert_eq!(
            serde_json::to_string(&still_in(&known, &["PENDING"])).unwrap(),
            r#"{"flow_runs":{"id":{"any_":["a","b"]},"state":{"type":{"any_":["PENDING"]}}}}"#
        );
        assert_eq!(
            serde_json::to_string(&moved_from(&known, &["RUNNING"])).unwrap(),
            r#"{"flow_runs":{"id":{"any_":["a","b"]},"state":{"type":{"not_any_":["RUNNING"]}}}}"#
        );
        assert_eq!(
            serde_json::to_string(&listing::page_body(&new_runs_filter(&known), 200, 0)).unwrap(),
            r#"{"flow_runs":{"id":{"not_any_":["a","b"]},"state":{"type":{"any_":["PENDING","RUNNING"]}}},"sort":"ID_DESC","limit":200,"offset":0}"#
        );
        assert_eq!(
            serde_json::to_string(&of_deployments(&["d"])).unwrap(),
            r#"{"flow_runs":{"state":{"type":{"any_":["PENDING","RUNNING"]}},"deployment_id":{"any_":["d"]}}}"#
        );
        assert_eq!(
            serde_json::to_string(&by_id(&known)).unwrap(),
            r#"{"flow_runs":{"id":{"any_":["a","b"]}}}"#
        );
    }

    #[test]
    fn only_a_running_runs_start_is_a_fixed_entry() {
        let run = |t: &str, start: Option<&str>| ActiveRun {
            id: "1".into(),
            deployment_id: None,
            state_type: t.into(),
            start_time: start.map(Into::into),
            state: None,
        };
        assert!(fixed_entry(&run("RUNNING", Some("2026-01-01T00:00:00Z"))));
        assert!(
            !fixed_entry(&run("RUNNING", None)),
            "falls back to the state's time"
        );
        assert!(!fixed_entry(&run("PENDING", Some("2026-01-01T00:00:00Z"))));
    }
}
