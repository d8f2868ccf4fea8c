//! Inventory counts and per-deployment series: `prefect_flows`,
//! `prefect_deployments`, `prefect_deployment_info`,
//! `prefect_deployment_last_run_timestamp_seconds` and
//! `prefect_deployment_late_flow_runs`.
//!
//! Cost per collection, with N deployments shown (at most
//! EXPORTER_MAX_DEPLOYMENTS), E runs that ended since the previous collection
//! (plus the overlap) and K deployments with at least one late run: 1 count
//! (flows), ceil((N+1)/200) listing pages (and the deployments' count only when
//! the listing reaches EXPORTER_MAX_DEPLOYMENTS), ceil(new flows/200) flow lookups (0 once the
//! flows are known) and max(1, ceil(E/200)) ended-run pages (at most `MAX_PAGES`,
//! the rest at the next collection). The late runs per deployment come from
//! the shared listing of `late_runs.rs` (its cost is given there).
//! Nothing here grows with the run history: the last-run times are kept between
//! collections and only runs that ended since are asked for.
//!
//! The last-run times come from two sources:
//! - What ended before the exporter started: per listed deployment and tracked
//!   state type, the newest run that ended within EXPORTER_LOOKBACK before the
//!   first collection, from the deployment's `PRIME_RUNS` newest ended runs
//!   and a `limit: 1` look-up per type not among them (`prime_last_runs`): 1
//!   to 4 requests per deployment, once, at most `MAX_PRIME_REQUESTS` per
//!   collection, so that a start with many deployments spreads over a few
//!   collections instead of a burst against the server's rate limit; a
//!   deployment listed later (a new one, or one the cap hid) gets its own then.
//!   Reading every run that ended within the lookback instead cost 5.5 s of
//!   server CPU at 20,000 runs and 78 s at 100,000.
//! - What ended since: the incremental passes below.
//!
//! The incremental scheme for the last-run times is a series of passes over
//! the runs of a deployment in COMPLETED, FAILED or CRASHED whose `end_time` is
//! at or after a lower bound, newest first, 200 per page:
//! - The first pass starts OVERLAP before the first collection (older runs
//!   are the one-run look-ups' part).
//! - Each later pass starts at `min(start of the previous pass - OVERLAP,
//!   newest end time seen)`. Prefect stamps `end_time` with its own clock when
//!   a run enters a final state, so the runs that finished since the previous
//!   pass are exactly those with a newer end time; Prefect has no filter on a
//!   run's `updated` time, and none is needed. OVERLAP covers a transaction that
//!   commits after a later one was read and a small clock difference between
//!   the exporter and Prefect; the newest end time seen covers an exporter clock
//!   running ahead of Prefect's. Once nothing has ended for OVERLAP, a pass is
//!   one request answered with the newest run alone.
//! - A pass reads at most `MAX_PAGES` pages and half of the time left in a
//!   collection; a longer one (a long first pass, a burst of runs ending) goes
//!   on at the next collection from where it stopped, and so does one cut by a
//!   failed request, so a slow server never makes it start over. Newest first
//!   means the first run seen per (deployment, state type) is the newest one:
//!   a pass cut short only shows true values, some of them not yet updated.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::durations::{Durations, Ended};
use super::family::{bool_label, Family};
use super::listing::{self, After, Filter, FlowsWhere, Match, Page, StateWhere, Where, PAGE};
use crate::prefect::{ApiError, Client};
use crate::rfc3339;

/// The state types whose newest run per deployment is tracked.
pub const TRACKED_END_STATES: [&str; 3] = ["COMPLETED", "FAILED", "CRASHED"];

/// One deployment, labelled by its name and its flow's name (a deployment name
/// alone is only unique within its flow): the directory that the runs in
/// progress and the deployment limits are labelled from.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentSeries {
    /// Prefect's id: joins the runs in progress and the deployment limits.
    pub id: String,
    pub name: String,
    pub flow: String,
    /// Empty when the deployment has no work pool.
    pub work_pool: String,
    pub paused: bool,
    pub status: String,
    /// Unix time of the newest run that ended in each of `TRACKED_END_STATES`,
    /// in that order; `None` when none is known.
    pub last_run: [Option<f64>; 3],
    pub late_runs: u64,
}

/// How far before the previous collection's start runs are asked for again.
pub const OVERLAP: Duration = Duration::from_secs(30);
/// Pages a pass may read per collection (10,000 runs), so that a long history
/// is read over a few collections instead of failing the first one.
pub const MAX_PAGES: usize = 50;
/// Look-ups of the runs that ended before the start, per collection (22 to
/// 90 deployments' worth).
pub const MAX_PRIME_REQUESTS: usize = 90;
/// Newest ended runs read per deployment at start; a tracked type not among
/// them gets its own `limit: 1` look-up.
const PRIME_RUNS: usize = 20;

/// What this group remembers between collections.
#[derive(Default)]
pub struct State {
    /// Flow id -> flow name: names never change, so each flow is looked up once.
    flow_names: HashMap<String, String>,
    last_runs: LastRuns,
    /// The pass over ended runs in progress, if one was cut short.
    pass: Option<Pass>,
    /// Exporter time at the start of the last pass that was read to its end.
    cursor: Option<f64>,
    cap_warned: bool,
    /// The histograms fed by the passes (durations.rs).
    durations: Durations,
    /// Deployment ids whose newest runs before the start have been looked up.
    primed: HashSet<String>,
    /// Exporter time of the first collection: look-ups reach back
    /// EXPORTER_LOOKBACK from it.
    first_collection: Option<f64>,
}

/// One look at the runs that ended at or after `after`, newest first.
struct Pass {
    after: f64,
    offset: usize,
    /// Exporter time when the pass began.
    started: f64,
}

/// Newest end time per deployment id and tracked state type, and the newest
/// end time seen at all.
#[derive(Default, Debug, PartialEq)]
struct LastRuns {
    by_deployment: HashMap<String, [Option<f64>; 3]>,
    newest: Option<f64>,
}

impl LastRuns {
    fn apply(&mut self, runs: &[EndedRun]) {
        for run in runs {
            let (Some(dep), Some(end)) = (&run.deployment_id, run.end_time.as_deref()) else {
                continue;
            };
            let Some(end) = rfc3339::parse(end) else {
                log::debug!("flow run {}: unreadable end_time {end:?}", run.id);
                continue;
            };
            let Some(slot) = TRACKED_END_STATES.iter().position(|t| *t == run.state_type) else {
                continue;
            };
            let entry = self.by_deployment.entry(dep.clone()).or_default();
            if entry[slot].is_none_or(|t| end > t) {
                entry[slot] = Some(end);
            }
            if self.newest.is_none_or(|t| end > t) {
                self.newest = Some(end);
            }
        }
    }

    /// The newest run of one deployment in one tracked state type, found by a
    /// look-up: unlike `apply`, it leaves `newest` (the incremental passes'
    /// lower bound) alone.
    fn prime(&mut self, deployment: &str, slot: usize, run: &EndedRun) {
        let Some(end) = run.end_time.as_deref().and_then(rfc3339::parse) else {
            return;
        };
        let entry = self
            .by_deployment
            .entry(deployment.to_string())
            .or_default();
        if entry[slot].is_none_or(|t| end > t) {
            entry[slot] = Some(end);
        }
    }

    /// Lower bound of the next incremental request.
    fn lower_bound(&self, cursor: f64) -> f64 {
        let by_clock = cursor - OVERLAP.as_secs_f64();
        match self.newest {
            Some(n) => by_clock.min(n),
            None => by_clock,
        }
    }
}

// ---- answers (only the fields used) ----

#[derive(Deserialize)]
struct Deployment {
    id: String,
    name: String,
    flow_id: String,
    #[serde(default)]
    paused: bool,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    work_pool_name: Option<String>,
}

#[derive(Deserialize)]
struct Flow {
    id: String,
    name: String,
}

#[derive(Deserialize)]
struct EndedRun {
    id: String,
    deployment_id: Option<String>,
    state_type: String,
    end_time: Option<String>,
    #[serde(default)]
    start_time: Option<String>,
    #[serde(default)]
    expected_start_time: Option<String>,
}

impl EndedRun {
    fn ended(&self) -> Ended<'_> {
        Ended {
            id: &self.id,
            deployment_id: self.deployment_id.as_deref(),
            state_type: &self.state_type,
            start_time: self.start_time.as_deref(),
            end_time: self.end_time.as_deref(),
            expected_start_time: self.expected_start_time.as_deref(),
        }
    }
}

pub struct Settings {
    pub lookback: Duration,
    pub max_deployments: usize,
    pub duration_buckets: Vec<f64>,
}

pub fn collect(
    client: &mut Client,
    settings: &Settings,
    state: &mut State,
    late: &HashMap<String, u64>,
    deadline: Instant,
) -> Result<(Vec<Family>, Vec<DeploymentSeries>), ApiError> {
    let flows: u64 = client.post("/flows/count", &Filter::default(), deadline)?;
    let max = settings.max_deployments;
    let (listed, all) = list_deployments(client, max, deadline)?;
    // A listing that stopped short holds every deployment: only one that
    // reached the cap needs the server's count.
    let total = if all {
        listed.len() as u64
    } else {
        client.post("/deployments/count", &Filter::default(), deadline)?
    };
    let capped = total > max as u64;
    if capped && !state.cap_warned {
        log::warn!(
            "{total} deployments: per-deployment series are limited to the {} newest \
             (EXPORTER_MAX_DEPLOYMENTS)",
            settings.max_deployments
        );
        state.cap_warned = true;
    }
    resolve_flow_names(client, &listed, &mut state.flow_names, deadline)?;
    let ids: Vec<&str> = listed.iter().map(|d| d.id.as_str()).collect();
    prime_last_runs(client, &ids, settings.lookback, state, deadline)?;
    // Last: it may use the time that is left.
    update_last_runs(client, settings, state, deadline)?;

    let items = build_items(&listed, &state.flow_names, &state.last_runs, late);
    let mut families = families(flows, total, capped, &items);
    families.extend(
        state.durations.families(
            items
                .iter()
                .zip(&listed)
                .map(|(i, d)| (d.id.as_str(), i.name.as_str(), i.flow.as_str())),
            capped,
        ),
    );
    // Forget what belongs to deleted deployments. When the cap cuts, a
    // deployment that is not listed may still exist: keep its times.
    let listed_ids: HashSet<&str> = ids.iter().copied().collect();
    if !capped {
        state
            .last_runs
            .by_deployment
            .retain(|id, _| listed_ids.contains(id.as_str()));
        state.primed.retain(|id| listed_ids.contains(id.as_str()));
    }
    let flow_ids: HashSet<&str> = listed.iter().map(|d| d.flow_id.as_str()).collect();
    state
        .flow_names
        .retain(|id, _| flow_ids.contains(id.as_str()));
    Ok((families, items))
}

fn families(flows: u64, deployments: u64, capped: bool, items: &[DeploymentSeries]) -> Vec<Family> {
    let mut info = Family::gauge(
        "prefect_deployment_info",
        "One series per deployment (at most EXPORTER_MAX_DEPLOYMENTS); always 1.",
        &["deployment", "flow", "work_pool", "paused", "status"],
    );
    let mut last_run = Family::gauge(
        "prefect_deployment_last_run_timestamp_seconds",
        "Unix time at which the newest run of the deployment ended in this state type.",
        &["deployment", "flow", "state_type"],
    );
    let mut late = Family::gauge(
        "prefect_deployment_late_flow_runs",
        "Flow runs of the deployment in the state Late.",
        &["deployment", "flow"],
    );
    for d in items {
        let paused = bool_label(d.paused);
        info.set(&[&d.name, &d.flow, &d.work_pool, paused, &d.status], 1.0);
        for (state_type, at) in TRACKED_END_STATES.iter().zip(d.last_run) {
            if let Some(at) = at {
                last_run.set(&[&d.name, &d.flow, state_type], at);
            }
        }
        late.set(&[&d.name, &d.flow], d.late_runs as f64);
    }
    vec![
        Family::single("prefect_flows", "Flows known to Prefect.", flows as f64),
        Family::single(
            "prefect_deployments",
            "Deployments known to Prefect.",
            deployments as f64,
        ),
        Family::single(
            "prefect_deployments_capped",
            "1 when EXPORTER_MAX_DEPLOYMENTS cut the per-deployment series: the oldest \
             deployments beyond it have none.",
            f64::from(u8::from(capped)),
        ),
        info,
        last_run,
        late,
    ]
}

/// The newest `wanted` deployments, 200 per request, each once, and whether
/// the pages stopped short of `wanted` (then they hold every deployment).
/// Creation times are unique in practice, so pages neither overlap nor skip;
/// a deployment created while paging only shifts the others later.
fn list_deployments(
    client: &mut Client,
    wanted: usize,
    deadline: Instant,
) -> Result<(Vec<Deployment>, bool), ApiError> {
    let everything = Filter::default();
    let sort = Some("CREATED_DESC");
    let (listed, capped) = listing::pages(
        client,
        "/deployments/filter",
        &everything,
        sort,
        wanted,
        |d: &Deployment| &d.id,
        deadline,
    )?;
    Ok((listed, !capped))
}

/// Looks up the names of flows not seen before, 200 ids per request.
fn resolve_flow_names(
    client: &mut Client,
    listed: &[Deployment],
    names: &mut HashMap<String, String>,
    deadline: Instant,
) -> Result<(), ApiError> {
    let mut unknown: Vec<&str> = listed
        .iter()
        .map(|d| d.flow_id.as_str())
        .filter(|id| !names.contains_key(*id))
        .collect();
    unknown.sort_unstable();
    unknown.dedup();
    for chunk in unknown.chunks(PAGE) {
        let filter = flows_by_id(chunk);
        let body = Page {
            filter: &filter,
            sort: None,
            limit: PAGE,
            offset: Some(0),
        };
        let flows: Vec<Flow> = client.post("/flows/filter", &body, deadline)?;
        names.extend(flows.into_iter().map(|f| (f.id, f.name)));
    }
    Ok(())
}

fn flows_by_id<'a>(ids: &'a [&'a str]) -> Filter<'a> {
    Filter {
        flows: Some(FlowsWhere {
            id: Some(Match::Any(ids)),
            ..FlowsWhere::default()
        }),
        ..Filter::default()
    }
}

/// Every run that ended at or after `after`, whatever its state: the tracked
/// state types are picked here, not by Prefect. On a SQLite server (which
/// never gathers planner statistics) a state type filter makes SQLite read
/// every run of those types, the whole history (43 ms at 100,000 runs, and
/// growing), where the end time alone reads only the runs that just ended.
fn ended_runs(after: f64) -> Filter<'static> {
    Filter::runs(Where {
        deployment_id: Some(Match::IsNull(false)),
        end_time: Some(After {
            after_: rfc3339::format(after),
        }),
        ..Where::default()
    })
}

/// The newest runs of one deployment that ended after `after`: of any state,
/// or with `state_type` of that type.
fn newest_runs<'a>(
    deployment: &'a [&'a str],
    state_type: Option<&'a [&'a str]>,
    after: f64,
) -> Filter<'a> {
    Filter::runs(Where {
        state: state_type.and_then(|t| StateWhere::types(Match::Any(t))),
        deployment_id: Some(Match::Any(deployment)),
        end_time: Some(After {
            after_: rfc3339::format(after),
        }),
        ..Where::default()
    })
}

/// Newest end time first.
fn by_end_time<'a>(filter: &'a Filter<'a>, limit: usize, offset: usize) -> Page<'a> {
    Page {
        filter,
        sort: Some("END_TIME_DESC"),
        limit,
        offset: Some(offset),
    }
}

/// Looks up, for listed deployments not seen before, the newest run per
/// tracked state type that ended within the lookback: first the deployment's
/// `PRIME_RUNS` newest ended runs, whatever their state, then one `limit: 1`
/// look-up per tracked type not among them. At most `MAX_PRIME_REQUESTS` and a
/// quarter of the time left per collection; the rest at the next collections.
///
/// Why not one look-up per type: SQLite (Prefect's default database, which
/// never gathers planner statistics) answers a filter on state type AND
/// deployment from the state type index, reading every run of that type in
/// the history (32 ms at 100,000 runs for COMPLETED, measured), while a filter
/// on the deployment alone reads that deployment's runs only.
fn prime_last_runs(
    client: &mut Client,
    ids: &[&str],
    lookback: Duration,
    state: &mut State,
    deadline: Instant,
) -> Result<(), ApiError> {
    let started_at = Instant::now();
    // A quarter of the time left: the look-ups can wait for the next
    // collection, the pass and the groups after this one cannot.
    let soft_deadline = started_at + deadline.saturating_duration_since(started_at) / 4;
    let first = *state.first_collection.get_or_insert_with(rfc3339::now);
    let after = first - lookback.as_secs_f64();
    let mut sent = 0;
    for id in ids {
        if state.primed.contains(*id) {
            continue;
        }
        // Room for the worst case of one deployment: its runs and one
        // look-up per tracked type.
        if sent + 1 + TRACKED_END_STATES.len() > MAX_PRIME_REQUESTS
            || (sent > 0 && Instant::now() >= soft_deadline)
        {
            log::debug!("last runs before the start: more deployments next collection");
            return Ok(());
        }
        let one = [*id];
        let newest: Vec<EndedRun> = client.post(
            "/flow_runs/filter",
            &by_end_time(&newest_runs(&one, None, after), PRIME_RUNS, 0),
            deadline,
        )?;
        sent += 1;
        let short = newest.len() < PRIME_RUNS;
        for (slot, t) in TRACKED_END_STATES.iter().enumerate() {
            // Newest first: the first of the type is the newest one.
            if let Some(run) = newest.iter().find(|r| r.state_type == *t) {
                state.last_runs.prime(id, slot, run);
                continue;
            }
            if short {
                // Every run of the deployment that ended in the lookback was
                // in the answer: none of this type.
                continue;
            }
            let types = [*t];
            let runs: Vec<EndedRun> = client.post(
                "/flow_runs/filter",
                &by_end_time(&newest_runs(&one, Some(&types), after), 1, 0),
                deadline,
            )?;
            sent += 1;
            if let Some(run) = runs.first() {
                state.last_runs.prime(id, slot, run);
            }
        }
        state.primed.insert(id.to_string());
    }
    Ok(())
}

fn update_last_runs(
    client: &mut Client,
    settings: &Settings,
    state: &mut State,
    deadline: Instant,
) -> Result<(), ApiError> {
    let started_at = Instant::now();
    // Leave time for the groups after this one.
    let soft_deadline = started_at + deadline.saturating_duration_since(started_at) / 2;
    let pass = match state.pass.take() {
        Some(p) => p,
        None => {
            let now = rfc3339::now();
            // The first pass starts at the exporter's start (minus the
            // overlap): what ended before is `prime_last_runs`' part.
            let after = match state.cursor {
                Some(cursor) => state.last_runs.lower_bound(cursor),
                None => now - OVERLAP.as_secs_f64(),
            };
            Pass {
                after,
                offset: 0,
                started: now,
            }
        }
    };
    let pass = state.pass.insert(pass);
    for i in 0..MAX_PAGES {
        if i > 0 && Instant::now() >= soft_deadline {
            log::debug!(
                "ended runs: pass cut after {} runs, goes on next time",
                pass.offset
            );
            return Ok(());
        }
        let page: Vec<EndedRun> = client.post(
            "/flow_runs/filter",
            &by_end_time(&ended_runs(pass.after), PAGE, pass.offset),
            deadline,
        )?;
        state.last_runs.apply(&page);
        state.durations.observe(
            pass.after,
            page.iter().map(EndedRun::ended),
            &settings.duration_buckets,
        );
        pass.offset += page.len();
        if page.len() < PAGE {
            state.cursor = Some(pass.started);
            state.pass = None;
            return Ok(());
        }
    }
    Ok(())
}

/// The newest `max` deployments with their flow names, for the groups that
/// label series by deployment while the deployments group is turned off.
pub fn directory(
    client: &mut Client,
    max: usize,
    state: &mut State,
    deadline: Instant,
) -> Result<Vec<DeploymentSeries>, ApiError> {
    let (listed, _) = list_deployments(client, max, deadline)?;
    resolve_flow_names(client, &listed, &mut state.flow_names, deadline)?;
    let items = build_items(
        &listed,
        &state.flow_names,
        &LastRuns::default(),
        &HashMap::new(),
    );
    let flow_ids: HashSet<&str> = listed.iter().map(|d| d.flow_id.as_str()).collect();
    state
        .flow_names
        .retain(|id, _| flow_ids.contains(id.as_str()));
    Ok(items)
}

fn build_items(
    listed: &[Deployment],
    flow_names: &HashMap<String, String>,
    last_runs: &LastRuns,
    late: &HashMap<String, u64>,
) -> Vec<DeploymentSeries> {
    listed
        .iter()
        .map(|d| DeploymentSeries {
            id: d.id.clone(),
            name: d.name.clone(),
            flow: flow_names.get(&d.flow_id).cloned().unwrap_or_default(),
            work_pool: d.work_pool_name.clone().unwrap_or_default(),
            paused: d.paused,
            status: d.status.clone().unwrap_or_default(),
            last_run: last_runs
                .by_deployment
                .get(&d.id)
                .copied()
                .unwrap_or_default(),
            late_runs: late.get(&d.id).copied().unwrap_or(0),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::test_fixtures::response;

    fn run(id: &str, dep: Option<&str>, state_type: &str, end: Option<&str>) -> EndedRun {
        EndedRun {
            id: id.into(),
            deployment_id: dep.map(Into::into),
            state_type: state_type.into(),
            end_time: end.map(Into::into),
            start_time: None,
            expected_start_time: None,
        }
    }

    fn t(s: &str) -> f64 {
        rfc3339::parse(s).unwrap()
    }

    #[test]
    fn recorded_answers_parse() {
        let deps: Vec<Deployment> = response(include_str!(
            "../../tests/fixtures/deployments_filter_all.json"
        ));
        assert_eq!(deps.len(), 2);
        assert_eq!(deps[1].name, "daily");
        assert_eq!(deps[1].work_pool_name.as_deref(), Some("lab-pool"));
        assert_eq!(deps[1].status.as_deref(), Some("NOT_READY"));
        let flows: Vec<Flow> = response(include_str!("../../tests/fixtures/flows_filter.json"));
        let names: HashMap<String, String> = flows.into_iter().map(|f| (f.id, f.name)).collect();
        let runs: Vec<EndedRun> = response(include_str!(
            "../../tests/fixtures/flow_runs_filter_limit2.json"
        ));
        assert_eq!(runs.len(), 2);
        let mut last = LastRuns::default();
        // CANCELLED and PAUSED runs are not tracked.
        last.apply(&runs);
        assert_eq!(last, LastRuns::default());
        let late = HashMap::from([(deps[0].id.clone(), 3)]);
        let items = build_items(&deps, &names, &last, &late);
        assert_eq!(items[0].name, "a-deploy");
        assert_eq!(items[0].flow, "flow-a");
        assert_eq!(items[1].flow, "etl-daily");
        assert_eq!(items[0].late_runs, 3);
        assert_eq!(items[1].late_runs, 0);
        assert!(!items[0].paused);
        assert_eq!(items[0].last_run, [None, None, None]);
    }

    #[test]
    fn newest_end_time_wins_per_deployment_and_state_type() {
        let mut last = LastRuns::default();
        last.apply(&[
            run("1", Some("d1"), "COMPLETED", Some("2026-11-24T10:00:00Z")),
            run("2", Some("d1"), "COMPLETED", Some("2026-11-24T12:00:00Z")),
            run("3", Some("d1"), "FAILED", Some("2026-11-24T11:00:00Z")),
            run("4", Some("d2"), "CRASHED", Some("2026-11-24T09:00:00Z")),
            // Ignored: no deployment, no end time, untracked type, bad time.
            run("5", None, "COMPLETED", Some("2026-11-25T00:00:00Z")),
            run("6", Some("d2"), "COMPLETED", None),
            run("7", Some("d2"), "CANCELLED", Some("2026-11-25T00:00:00Z")),
            run("8", Some("d2"), "FAILED", Some("not a time")),
        ]);
        // An older run read later changes nothing.
        last.apply(&[run(
            "9",
            Some("d1"),
            "COMPLETED",
            Some("2026-11-24T11:00:00Z"),
        )]);
        assert_eq!(
            last.by_deployment["d1"],
            [
                Some(t("2026-11-24T12:00:00Z")),
                Some(t("2026-11-24T11:00:00Z")),
                None
            ]
        );
        assert_eq!(
            last.by_deployment["d2"],
            [None, None, Some(t("2026-11-24T09:00:00Z"))]
        );
        assert_eq!(last.newest, Some(t("2026-11-24T12:00:00Z")));
    }

    #[test]
    fn incremental_bound_uses_the_earlier_of_clock_and_newest_seen() {
        let mut last = LastRuns::default();
        let cursor = t("2026-11-24T12:00:00Z");
        // Nothing seen: the exporter's clock minus the overlap.
        assert_eq!(last.lower_bound(cursor), cursor - 30.0);
        // Runs ended long ago and nothing since: only runs at or after the
        // newest one are asked for again, however long ago the burst was.
        last.newest = Some(t("2026-11-20T00:00:00Z"));
        assert_eq!(last.lower_bound(cursor), t("2026-11-20T00:00:00Z"));
        // An exporter clock behind Prefect's never skips anything either.
        last.newest = Some(cursor + 600.0);
        assert_eq!(last.lower_bound(cursor), cursor - 30.0);
    }

    #[test]
    fn request_bodies_are_the_documented_filters() {
        let ended = ended_runs(t("2026-11-24T12:00:00Z"));
        let b = serde_json::to_string(&by_end_time(&ended, PAGE, 400)).unwrap();
        assert_eq!(
            b,
            r#"{"flow_runs":{"deployment_id":{"is_null_":false},"end_time":{"after_":"2026-11-24T12:00:00.000000Z"}},"sort":"END_TIME_DESC","limit":200,"offset":400}"#
        );
        let ids = ["f1", "f2"];
        let by_id = flows_by_id(&ids);
        let flows = serde_json::to_string(&Page {
            filter: &by_id,
            sort: None,
            limit: PAGE,
            offset: Some(0),
        })
        .unwrap();
        assert_eq!(
            flows,
            r#"{"flows":{"id":{"any_":["f1","f2"]}},"limit":200,"offset":0}"#
        );
    }

    #[test]
    fn a_look_up_sets_the_deployment_but_not_the_incremental_bound() {
        let mut last = LastRuns::default();
        let old = run("1", Some("d1"), "FAILED", Some("2026-11-20T00:00:00Z"));
        last.prime("d1", 1, &old);
        assert_eq!(
            last.by_deployment["d1"],
            [None, Some(t("2026-11-20T00:00:00Z")), None]
        );
        assert_eq!(
            last.newest, None,
            "the passes start at the exporter's start"
        );
        // A newer end time from a pass wins; an older look-up changes nothing.
        last.apply(&[run("2", Some("d1"), "FAILED", Some("2026-11-24T00:00:00Z"))]);
        last.prime("d1", 1, &old);
        assert_eq!(last.by_deployment["d1"][1], Some(t("2026-11-24T00:00:00Z")));
        // No end time: nothing.
        last.prime("d2", 0, &run("3", Some("d2"), "COMPLETED", None));
        assert!(!last.by_deployment.contains_key("d2"));
        let crashed = newest_runs(&["d1"], Some(&["CRASHED"]), t("2026-11-17T12:00:00Z"));
        let body = serde_json::to_string(&by_end_time(&crashed, 1, 0)).unwrap();
        assert_eq!(
            body,
            r#"{"flow_runs":{"state":{"type":{"any_":["CRASHED"]}},"deployment_id":{"any_":["d1"]},"end_time":{"after_":"2026-11-17T12:00:00.000000Z"}},"sort":"END_TIME_DESC","limit":1,"offset":0}"#
        );
        let any = newest_runs(&["d1"], None, t("2026-11-17T12:00:00Z"));
        let body = serde_json::to_string(&by_end_time(&any, PRIME_RUNS, 0)).unwrap();
        assert_eq!(
            body,
            r#"{"flow_runs":{"deployment_id":{"any_":["d1"]},"end_time":{"after_":"2026-11-17T12:00:00.000000Z"}},"sort":"END_TIME_DESC","limit":20,"offset":0}"#
        );
    }
}
