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
//! Each run listed costs the server about 0.3 ms of CPU (a full run, with its
//! state and parameters), so many runs in progress make the listing the
//! largest request of a collection (44 ms for 143 runs, measured). Runs in
//! progress mostly stay so from one collection to the next, so once the last
//! listing holds enough of them (`pays_to_update`), it is updated in place
//! instead: one count of the runs in progress, the runs in progress not among
//! those known (`id.not_any_`), and per state name among the known runs, those
//! of them now in another state name (`id.any_` and `state.name.not_any_`,
//! one request per 200). Only what changed comes back, 3-4 ms of server CPU
//! per request. When the updated set does not add up to the count (a run
//! deleted, or one that changed between two of these requests), past the cap,
//! after a failure, and once the listing is `LISTING_MAX_AGE` old, the runs are
//! listed whole again. A run's deployment never changes, a RUNNING run's start
//! time neither, and a run changing state gets a new state name or type
//! (Prefect refuses PENDING to PENDING), so the update sees every change the
//! series show, except a round trip back to the same state name between two
//! collections (a PENDING run's time of entry then moves on), which the next
//! whole listing corrects.
//!
//! Series exist for the deployments that get per-deployment series (at most
//! EXPORTER_MAX_DEPLOYMENTS), both state types always (0 when none), so an
//! alert needs no `absent()`; the oldest time only while a run is there.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use serde::Deserialize;

use super::listing::{self, Match, RunsFilter, StateWhere, States, Where, LISTING_MAX_AGE, PAGE};
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
    state_name: Option<String>,
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

/// What the collector remembers between collections: the runs in progress of
/// the last complete listing, by id, kept up to date in place.
#[derive(Default)]
pub struct State {
    known: Option<Known>,
}

struct Known {
    runs: HashMap<String, ActiveRun>,
    /// When the runs were last listed whole.
    listed_at: Instant,
}

/// The new runs are asked with every known id in one `not_any_` list: a
/// bound on that request's size (39 kB) and on the SQL parameters it takes.
const MAX_UPDATED: usize = 1000;

/// Whether updating `runs` in place costs the server less than listing them:
/// a listing costs about 4 ms plus 0.3 ms per run, an update about 3 ms (the
/// count) + 4 ms (the new runs) + 4 ms per state name among the known runs
/// (measured on Prefect 3.9.1 with SQLite). Break-even is near 12 + 12 per
/// name; the margin keeps a listing below that. A run without a state name
/// cannot be checked by name, so such a set is listed. So is a set larger
/// than `MAX_UPDATED`.
fn pays_to_update(runs: &HashMap<String, ActiveRun>) -> bool {
    if runs.len() > MAX_UPDATED {
        return false;
    }
    let mut names: Vec<&str> = Vec::new();
    for r in runs.values() {
        match r.state_name.as_deref() {
            Some(n) if !names.contains(&n) => names.push(n),
            Some(_) => {}
            None => return false,
        }
    }
    runs.len() >= 20 + 15 * names.len()
}

/// The runs in progress that are not among `known`.
fn new_runs_filter<'a>(known: &'a [&'a str]) -> RunsFilter<'a> {
    RunsFilter::new(Where {
        id: Some(Match::NotAny(known)),
        state: StateWhere::types(Match::Any(&ACTIVE_TYPES)),
        ..Where::default()
    })
}

/// The runs among `ids` whose state name is no longer `name`.
fn moved_filter<'a>(ids: &'a [&'a str], name: &'a [&'a str; 1]) -> RunsFilter<'a> {
    RunsFilter::new(Where {
        id: Some(Match::Any(ids)),
        state: StateWhere::names(Match::NotAny(name)),
        ..Where::default()
    })
}

pub fn collect(
    client: &mut Client,
    deployments: &[DeploymentSeries],
    max: usize,
    state: &mut State,
    deadline: Instant,
) -> Result<ActiveRunsPart, ApiError> {
    // Taken out: any failure below leaves nothing to update next time.
    let known = state
        .known
        .take()
        .filter(|k| k.listed_at.elapsed() < LISTING_MAX_AGE && pays_to_update(&k.runs));
    let updated = match known {
        Some(k) => update(client, k, max, deadline)?,
        None => None,
    };
    let known = match updated {
        Some(k) => k,
        None => {
            let (runs, capped) =
                listing::runs(client, ACTIVE, max, |r: &ActiveRun| &r.id, deadline)?;
            if capped {
                return Ok(part(runs.iter(), true, deployments));
            }
            Known {
                runs: runs.into_iter().map(|r| (r.id.clone(), r)).collect(),
                listed_at: Instant::now(),
            }
        }
    };
    let out = part(known.runs.values(), false, deployments);
    state.known = Some(known);
    Ok(out)
}

/// The known runs brought up to date (module doc), or None when they must be
/// listed whole: more runs in progress than `max`, or an update that does not
/// add up to the count.
fn update(
    client: &mut Client,
    mut known: Known,
    max: usize,
    deadline: Instant,
) -> Result<Option<Known>, ApiError> {
    let total = listing::count(client, ACTIVE, deadline)?;
    if total > max as u64 {
        return Ok(None);
    }
    // By state name, sorted: the requests go out in the same order each time.
    let mut by_name: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in known.runs.values() {
        let name = r.state_name.clone().unwrap_or_default();
        by_name.entry(name).or_default().push(r.id.clone());
    }
    let ids: Vec<&str> = known.runs.keys().map(String::as_str).collect();
    let (new, _) = listing::runs_where(
        client,
        &new_runs_filter(&ids),
        max,
        |r: &ActiveRun| &r.id,
        deadline,
    )?;
    let mut moved: Vec<ActiveRun> = Vec::new();
    for (name, ids) in &by_name {
        let name = [name.as_str()];
        for chunk in ids.chunks(PAGE) {
            let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let (runs, _) = listing::runs_where(
                client,
                &moved_filter(&chunk, &name),
                PAGE,
                |r: &ActiveRun| &r.id,
                deadline,
            )?;
            moved.extend(runs);
        }
    }
    for run in moved.into_iter().chain(new) {
        if ACTIVE_TYPES.contains(&run.state_type.as_str()) {
            known.runs.insert(run.id.clone(), run);
        } else {
            known.runs.remove(&run.id);
        }
    }
    Ok((known.runs.len() as u64 == total).then_some(known))
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

fn part<'a>(
    runs: impl Iterator<Item = &'a ActiveRun>,
    capped: bool,
    deployments: &[DeploymentSeries],
) -> ActiveRunsPart {
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
        listed,
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
        let p = part(runs.iter(), false, &deps);
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
        let p = part(runs.iter(), true, &[deployment("d", "daily")]);
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

    fn runs(names: &[(&str, usize)]) -> HashMap<String, ActiveRun> {
        let mut out = HashMap::new();
        for (name, n) in names {
            for i in 0..*n {
                let id = format!("{name}-{i}");
                let run: ActiveRun = serde_json::from_value(serde_json::json!({
                    "id": id, "state_type": "RUNNING", "state_name": name,
                }))
                .unwrap();
                out.insert(id, run);
            }
        }
        out
    }

    #[test]
    fn a_set_is_updated_in_place_only_when_that_costs_less_than_listing_it() {
        assert!(!pays_to_update(&runs(&[])));
        assert!(!pays_to_update(&runs(&[("Running", 34)])));
        assert!(pays_to_update(&runs(&[("Running", 35)])));
        assert!(!pays_to_update(&runs(&[("Running", 40), ("Pending", 9)])));
        assert!(pays_to_update(&runs(&[("Running", 40), ("Pending", 10)])));
        // 143 runs in five state names, as in the benchmark.
        assert!(pays_to_update(&runs(&[
            ("Pending", 41),
            ("Submitting", 10),
            ("InfrastructurePending", 10),
            ("Retrying", 21),
            ("Running", 61),
        ])));
        let mut unnamed = runs(&[("Running", 100)]);
        unnamed.get_mut("Running-0").unwrap().state_name = None;
        assert!(!pays_to_update(&unnamed), "a run without a state name");
        assert!(pays_to_update(&runs(&[("Running", 1000)])));
        assert!(!pays_to_update(&runs(&[("Running", 1001)])), "too many ids");
    }

    #[test]
    fn update_bodies_ask_for_what_changed_only() {
        let known = ["a", "b"];
        assert_eq!(
            serde_json::to_string(&listing::page_body(&new_runs_filter(&known), 200, 0)).unwrap(),
            r#"{"flow_runs":{"id":{"not_any_":["a","b"]},"state":{"type":{"any_":["PENDING","RUNNING"]}}},"sort":"ID_DESC","limit":200,"offset":0}"#
        );
        assert_eq!(
            serde_json::to_string(&moved_filter(&known, &["Running"])).unwrap(),
            r#"{"flow_runs":{"id":{"any_":["a","b"]},"state":{"name":{"not_any_":["Running"]}}}}"#
        );
    }
}
