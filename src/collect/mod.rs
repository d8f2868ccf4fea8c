//! One collection: every group asks Prefect for its part, each succeeding or
//! failing on its own, and the result is one `Snapshot`.

pub mod deployments;
pub mod flow_runs;
pub mod rfc3339;
pub mod seed;
pub mod work_pools;

use std::time::{Duration, Instant, SystemTime};

use crate::config::Config;
use crate::prefect::{ApiError, Client};
use crate::snapshot::{GroupOutcome, Snapshot};

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
    deployments: deployments::State,
    flow_runs: flow_runs::State,
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
    let flow_runs = if on.flow_runs {
        run_group("flow_runs", &mut groups, || {
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
        };
        run_group("deployments", &mut groups, || {
            deployments::collect(client, &settings, &mut state.deployments, deadline)
        })
    } else {
        None
    };
    let work_pools = if on.work_pools {
        run_group("work_pools", &mut groups, || {
            work_pools::collect(client, deadline)
        })
    } else {
        None
    };

    let snapshot = Snapshot {
        seed,
        flow_runs,
        flow_runs_age,
        deployments,
        work_pools,
        server_version: state.server_version.clone(),
        groups,
        requests: client.take_request_counts(),
        duration: started.elapsed(),
        finished: SystemTime::now(),
    };
    state.last_failed = !snapshot.succeeded();
    snapshot
}
