//! One collection: every group asks Prefect for its part and builds its own
//! families from the answers, each succeeding or failing on its own; the
//! result is one `Snapshot`. A new group is a file here and one `run_group`
//! call in `collect_all`.

pub mod active_runs;
pub mod concurrency_limits;
pub mod deployments;
pub mod durations;
pub mod events;
pub mod family;
pub mod flow_runs;
pub mod late_runs;
pub mod listing;
pub mod seed;
pub mod work_pools;
pub mod work_queues;

use std::time::{Duration, Instant, SystemTime};

use prometheus::proto::MetricFamily;

use crate::config::Config;
use crate::prefect::{ApiError, Client};
use deployments::DeploymentSeries;
use family::Family;

/// How one collect group fared in this collection.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupOutcome {
    pub name: &'static str,
    pub duration: Duration,
    /// `None` when the group succeeded.
    pub error: Option<String>,
}

/// What one collection gives `Metrics::update`.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The families of each group that succeeded, by group: they replace the
    /// group's last ones. A group that failed or is off is not here, and its
    /// series keep their last good values.
    pub families: Vec<(&'static str, Vec<MetricFamily>)>,
    pub groups: Vec<GroupOutcome>,
    /// Requests sent to Prefect during the collection, by `code` label.
    pub requests: Vec<(String, u64)>,
    pub duration: Duration,
    pub finished: SystemTime,
}

impl Snapshot {
    /// A collection succeeds only when every group did.
    pub fn succeeded(&self) -> bool {
        self.groups.iter().all(|g| g.error.is_none())
    }

    /// The six specified values for the log, as `name value` pairs.
    pub fn seed_summary(&self) -> String {
        let seed = self.families.iter().find(|(g, _)| *g == "seed");
        seed.map(|(_, families)| {
            let pairs: Vec<String> = families
                .iter()
                .filter_map(|f| {
                    let v = f.get_metric().first()?.get_gauge().get_value();
                    Some(format!("{} {v}", f.name()))
                })
                .collect();
            pairs.join(", ")
        })
        .unwrap_or_default()
    }

    /// The first failure, for logs and /readyz.
    pub fn first_error(&self) -> Option<String> {
        self.groups
            .iter()
            .find_map(|g| g.error.as_ref().map(|e| format!("{}: {e}", g.name)))
    }
}

/// The families of one group, as the encoder takes them.
fn finished(families: Vec<Family>) -> Vec<MetricFamily> {
    families.into_iter().filter_map(Family::finish).collect()
}

fn server_info(version: &str) -> Vec<Family> {
    let mut f = Family::gauge(
        "prefect_server_info",
        "Version of the Prefect server, as the API reports it.",
        &["version"],
    );
    f.set(&[version], 1.0);
    vec![f]
}

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
    let mut families = Vec::new();

    let seed = run_group("seed", &mut groups, || {
        seed::collect(client, &config.check_deployments, deadline)
    });
    let seed_ok = seed.is_some();
    families.extend(seed.map(|f| ("seed", finished(f))));

    let stale = state
        .version_checked
        .is_none_or(|at| at.elapsed() >= VERSION_REFRESH);
    if seed_ok && (stale || state.last_failed) {
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
    if let Some(v) = &state.server_version {
        families.push(("server_info", finished(server_info(v))));
    }

    let on = config.collectors;
    let mut late = None;
    // Whether the directory was listed this collection (deployments group off).
    let mut listed = None;
    let mut add = |name: &'static str, f: Option<Vec<Family>>| {
        if let Some(f) = f {
            families.push((name, finished(f)));
        }
    };
    if on.flow_runs {
        add(
            "flow_runs",
            run_group("flow_runs", &mut groups, || {
                shared_late(&mut late, client, config, &mut state.late_runs, deadline)?;
                flow_runs::collect(
                    client,
                    config.flow_runs_max_age,
                    &mut state.flow_runs,
                    deadline,
                )
            }),
        );
    }
    if on.deployments {
        let settings = deployments::Settings {
            lookback: config.lookback,
            max_deployments: config.max_deployments,
            duration_buckets: config.duration_buckets.clone(),
        };
        let part = run_group("deployments", &mut groups, || {
            let late = shared_late(&mut late, client, config, &mut state.late_runs, deadline)?;
            deployments::collect(
                client,
                &settings,
                &mut state.directory.deployments,
                &late.by_deployment,
                deadline,
            )
        });
        if let Some((f, items)) = part {
            state.directory.items = items;
            add("deployments", Some(f));
        }
    }
    if on.work_pools {
        add(
            "work_pools",
            run_group("work_pools", &mut groups, || {
                work_pools::collect(client, deadline)
            }),
        );
    }
    if on.work_queues {
        add(
            "work_queues",
            run_group("work_queues", &mut groups, || {
                let late = shared_late(&mut late, client, config, &mut state.late_runs, deadline)?;
                work_queues::collect(client, &late.by_queue, deadline)
            }),
        );
    }
    let max = config.max_listed_runs;
    if on.active_flow_runs {
        let part = run_group("active_flow_runs", &mut groups, || {
            let dir =
                shared_directory(&mut listed, client, config, &mut state.directory, deadline)?;
            active_runs::collect(client, dir, max, &mut state.active_runs, deadline)
        });
        let capped = part.as_ref().map(|(_, capped)| *capped);
        log_cap(
            &mut state.active_cap_warned,
            capped,
            "runs in progress",
            max,
        );
        add("active_flow_runs", part.map(|(f, _)| f));
    }
    if on.concurrency_limits {
        add(
            "concurrency_limits",
            run_group("concurrency_limits", &mut groups, || {
                let dir =
                    shared_directory(&mut listed, client, config, &mut state.directory, deadline)?;
                concurrency_limits::collect(client, dir, deadline)
            }),
        );
    }
    let late = late.and_then(Result::ok).map(|l| l.summary);
    log_cap(
        &mut state.late_cap_warned,
        late.map(|l| l.capped),
        "late runs",
        max,
    );
    add("late_runs", late.map(|l| l.families()));
    if on.events {
        add(
            "events",
            run_group("events", &mut groups, || {
                events::collect(client, config.events_settle, &mut state.events, deadline)
            })
            .flatten(),
        );
    }

    let snapshot = Snapshot {
        families,
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
    use super::DeploymentSeries;

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
