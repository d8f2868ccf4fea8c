//! One collection: every group asks Prefect for its part, each succeeding or
//! failing on its own, and the result is one `Snapshot`.

pub mod active_runs;
pub mod concurrency_limits;
pub mod deployments;
pub mod durations;
pub mod events;
pub mod flow_runs;
pub mod late_runs;
pub mod listing;
pub mod seed;
pub mod work_pools;
pub mod work_queues;

use std::time::{Duration, Instant, SystemTime};

use crate::config::Config;
use crate::prefect::{ApiError, Client};
use crate::snapshot::{DeploymentSeries, GroupOutcome, OpsParts, Snapshot};

/// The server version rarely changes: ask for it at start, after a failure (the
/// server may have been upgraded while it was away) and then hourly, so a
/// steady-state collection costs no extra request.
const VERSION_REFRESH: Duration = Duration::from_secs(3600);

/// What the collector remembers between collections.
#[derive(Default)]
pub struct State {
    server_version: Option<String>,
    version_checked: Option<Instant>,
    last_failed: bool,
    directory: Directory,
    /// Whether the cap on listed late runs / runs in progress was logged.
    late_cap_warned: bool,
    active_cap_warned: bool,
    late_runs: late_runs::State,
    active_runs: active_runs::State,
    events: events::State,
    flow_runs: flow_runs::State,
}

/// The deployments group's state and the deployments of its last good
/// listing: names for the runs in progress and the deployment limits, bounded
/// by EXPORTER_MAX_DEPLOYMENTS.
#[derive(Default)]
struct Directory {
    deployments: deployments::State,
    items: Vec<DeploymentSeries>,
}

/// One WARN line when a listing first hits EXPORTER_MAX_LISTED_RUNS, one INFO
/// line when it fits again: the series say it at every collection.
fn log_cap(warned: &mut bool, capped: Option<bool>, what: &str, max: usize) {
    match capped {
        Some(true) if !*warned => {
            log::warn!(
                "more than {max} {what}: only the first {max} are counted per deployment \
                 (EXPORTER_MAX_LISTED_RUNS)"
            );
            *warned = true;
        }
        Some(false) if *warned => {
            log::info!("{what} fit in EXPORTER_MAX_LISTED_RUNS again");
            *warned = false;
        }
        _ => {}
    }
}

/// The late runs, asked for once per collection by the first group that
/// shows them (flow_runs: the total; deployments and work_queues: the split
/// too); a failure fails every group that needs them.
fn shared_late<'a>(
    slot: &'a mut Option<Result<late_runs::LateRuns, ApiError>>,
    client: &mut Client,
    config: &Config,
    state: &mut late_runs::State,
    deadline: Instant,
) -> Result<&'a late_runs::LateRuns, ApiError> {
    slot.get_or_insert_with(|| {
        let split = config.collectors.deployments || config.collectors.work_queues;
        late_runs::collect(client, config.max_listed_runs, split, state, deadline)
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// The deployment directory for the groups that label by deployment: the
/// deployments group fills it; when that group is off, it is listed once per
/// collection here.
fn shared_directory<'a>(
    slot: &mut Option<Result<(), ApiError>>,
    client: &mut Client,
    config: &Config,
    directory: &'a mut Directory,
    deadline: Instant,
) -> Result<&'a [DeploymentSeries], ApiError> {
    if !config.collectors.deployments {
        slot.get_or_insert_with(|| {
            deployments::directory(
                client,
                config.max_deployments,
                &mut directory.deployments,
                deadline,
            )
            .map(|d| directory.items = d)
        })
        .clone()?;
    }
    Ok(&directory.items)
}

/// Runs one group, timed, and records how it fared.
fn run_group<T>(
    name: &'static str,
    groups: &mut Vec<GroupOutcome>,
    f: impl FnOnce() -> Result<T, ApiError>,
) -> Option<T> {
    let t = Instant::now();
    let result = f();
    groups.push(GroupOutcome {
        name,
        duration: t.elapsed(),
        error: result.as_ref().err().map(ToString::to_string),
    });
    result.ok()
}

pub fn collect_all(
    client: &mut Client,
    config: &Config,
    state: &mut State,
    deadline: Instant,
) -> Snapshot {
    let started = Instant::now();
    let mut groups = Vec::new();

    let seed = run_group("seed", &mut groups, || {
        seed::collect(client, &config.check_deployments, deadline)
    });

    let stale = state
        .version_checked
        .is_none_or(|at| at.elapsed() >= VERSION_REFRESH);
    if seed.is_some() && (stale || state.last_failed) {
        // Not every deployment answers (Prefect Cloud has no admin API): a missing
        // version is no failure, the series is simply absent.
        match client.get::<String>("/admin/version", deadline) {
            Ok(v) => {
                state.server_version = Some(v);
                state.version_checked = Some(Instant::now());
            }
            // The API answered no: ask again in an hour, not every collection.
            Err(e @ ApiError::Status { .. }) => {
                log::debug!("Prefect server version unavailable: {e}");
                state.version_checked = Some(Instant::now());
            }
            // No answer in the time left (a slow first collection, a blip): ask
            // again next collection rather than showing no version for an hour.
            Err(e) => log::debug!("Prefect server version not read this time: {e}"),
        }
    }

    let on = config.collectors;
    let mut late = None;
    // Whether the directory was listed this collection (deployments group off).
    let mut listed = None;
    let flow_runs = if on.flow_runs {
        run_group("flow_runs", &mut groups, || {
            shared_late(&mut late, client, config, &mut state.late_runs, deadline)?;
            flow_runs::collect(
                client,
                config.flow_runs_max_age,
                &mut state.flow_runs,
                deadline,
            )
        })
    } else {
        None
    };
    let (flow_runs, flow_runs_age) = match flow_runs {
        Some((counts, age)) => (Some(counts), Some(age)),
        None => (None, None),
    };
    let deployments = if on.deployments {
        let settings = deployments::Settings {
            lookback: config.lookback,
            max_deployments: config.max_deployments,
            duration_buckets: config.duration_buckets.clone(),
        };
        run_group("deployments", &mut groups, || {
            let late = shared_late(&mut late, client, config, &mut state.late_runs, deadline)?;
            deployments::collect(
                client,
                &settings,
                &mut state.directory.deployments,
                &late.by_deployment,
                deadline,
            )
        })
    } else {
        None
    };
    if let Some(part) = &deployments {
        state.directory.items = part.items.clone();
    }
    let work_pools = if on.work_pools {
        run_group("work_pools", &mut groups, || {
            work_pools::collect(client, deadline)
        })
    } else {
        None
    };
    let work_queues = if on.work_queues {
        run_group("work_queues", &mut groups, || {
            let late = shared_late(&mut late, client, config, &mut state.late_runs, deadline)?;
            work_queues::collect(client, &late.by_queue, deadline)
        })
    } else {
        None
    };
    let active_flow_runs = if on.active_flow_runs {
        run_group("active_flow_runs", &mut groups, || {
            let dir =
                shared_directory(&mut listed, client, config, &mut state.directory, deadline)?;
            active_runs::collect(
                client,
                dir,
                config.max_listed_runs,
                &mut state.active_runs,
                deadline,
            )
        })
    } else {
        None
    };
    let concurrency_limits = if on.concurrency_limits {
        run_group("concurrency_limits", &mut groups, || {
            let dir =
                shared_directory(&mut listed, client, config, &mut state.directory, deadline)?;
            concurrency_limits::collect(client, dir, deadline)
        })
    } else {
        None
    };
    let ops = OpsParts {
        late_runs: late.and_then(Result::ok).map(|l| l.summary),
        work_queues,
        active_flow_runs,
        concurrency_limits,
    };

    let max = config.max_listed_runs;
    let late_capped = ops.late_runs.map(|l| l.capped);
    log_cap(&mut state.late_cap_warned, late_capped, "late runs", max);
    let active_capped = ops.active_flow_runs.as_ref().map(|a| a.capped);
    log_cap(
        &mut state.active_cap_warned,
        active_capped,
        "runs in progress",
        max,
    );

    let state_changes = if on.events {
        run_group("events", &mut groups, || {
            events::collect(client, config.events_settle, &mut state.events, deadline)
        })
        .flatten()
    } else {
        None
    };

    let snapshot = Snapshot {
        seed,
        flow_runs,
        flow_runs_age,
        deployments,
        work_pools,
        ops,
        state_changes,
        server_version: state.server_version.clone(),
        groups,
        requests: client.take_request_counts(),
        duration: started.elapsed(),
        finished: SystemTime::now(),
    };
    state.last_failed = !snapshot.succeeded();
    snapshot
}

/// Fixtures shared by the groups' unit tests.
#[cfg(test)]
pub(crate) mod test_fixtures {
    use crate::snapshot::DeploymentSeries;

    /// The answer of a recorded request/answer pair from tests/fixtures/.
    pub fn response<T: serde::de::DeserializeOwned>(sample: &str) -> T {
        let v: serde_json::Value = serde_json::from_str(sample).unwrap();
        serde_json::from_value(v["response"].clone()).unwrap()
    }

    /// A deployment of flow `flow-ops` known only by its id and name.
    pub fn deployment(id: &str, name: &str) -> DeploymentSeries {
        DeploymentSeries {
            id: id.into(),
            name: name.into(),
            flow: "flow-ops".into(),
            work_pool: String::new(),
            paused: false,
            status: String::new(),
            last_run: [None; 3],
            late_runs: 0,
        }
    }
}
