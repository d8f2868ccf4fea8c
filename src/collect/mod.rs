//! One collection: every group asks Prefect for its part, each succeeding or
//! failing on its own, and the result is one `Snapshot`.

pub mod seed;

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
}

pub fn collect_all(
    client: &mut Client,
    config: &Config,
    state: &mut State,
    deadline: Instant,
) -> Snapshot {
    let started = Instant::now();
    let mut groups = Vec::new();

    let t = Instant::now();
    let seed = seed::collect(client, &config.check_deployments, deadline);
    groups.push(GroupOutcome {
        name: "seed",
        duration: t.elapsed(),
        error: seed.as_ref().err().map(ToString::to_string),
    });

    let stale = state
        .version_checked
        .is_none_or(|at| at.elapsed() >= VERSION_REFRESH);
    if seed.is_ok() && (stale || state.last_failed) {
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

    let snapshot = Snapshot {
        seed: seed.ok(),
        server_version: state.server_version.clone(),
        groups,
        duration: started.elapsed(),
        finished: SystemTime::now(),
    };
    state.last_failed = !snapshot.succeeded();
    snapshot
}
