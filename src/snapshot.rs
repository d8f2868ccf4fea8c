//! The plain data of one collection. Collect groups fill it, `Metrics::update`
//! reads it: nothing in here talks to Prefect or to Prometheus, so both sides
//! can be tested on their own.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

mod ops;
pub use ops::*;

/// The six specified values (the error counter lives in `Metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeedCounts {
    pub total: u64,
    pub successes: u64,
    pub errors: u64,
    pub warnings: u64,
    pub missing_deployments: u64,
}

/// Flow runs of one (state type, state name) pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateCount {
    pub state_type: String,
    pub state_name: String,
    pub count: u64,
}

/// The state types whose newest run per deployment is tracked.
pub const TRACKED_END_STATES: [&str; 3] = ["COMPLETED", "FAILED", "CRASHED"];

/// One deployment, labelled by its name and its flow's name (a deployment name
/// alone is only unique within its flow).
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

/// The deployments group: inventory counts and per-deployment series.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeploymentsPart {
    pub flows: u64,
    pub deployments: u64,
    /// At most EXPORTER_MAX_DEPLOYMENTS entries.
    pub items: Vec<DeploymentSeries>,
    /// Duration and start-delay histograms of listed deployments with a
    /// finished run observed since the exporter started.
    pub histograms: Vec<RunHistograms>,
}

/// Observations of one histogram: `counts[i]` values fell at or below
/// `bounds[i]` and above the bound before it (not cumulative).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    /// One more than `bounds`: the last is above every bound (`+Inf`).
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

/// The histograms of one deployment, labelled like `DeploymentSeries`.
#[derive(Debug, Clone, PartialEq)]
pub struct RunHistograms {
    pub deployment: String,
    pub flow: String,
    /// Run durations by end state, in `TRACKED_END_STATES` order.
    pub duration: [Option<Histogram>; 3],
    pub start_delay: Option<Histogram>,
}

/// Totals of state changes since the exporter started, by state name.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StateChanges {
    pub flow_runs: BTreeMap<String, u64>,
    pub task_runs: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkPoolSeries {
    pub name: String,
    pub pool_type: String,
    pub status: String,
    pub paused: bool,
    /// Workers per status; ONLINE and OFFLINE are always present.
    pub workers: Vec<(String, u64)>,
    /// Seconds since the newest worker heartbeat, when a worker ever beat.
    pub last_heartbeat_age: Option<f64>,
    /// The pool's limit and slots in use, when the answer carries them.
    pub concurrency_limit: Option<u64>,
    pub active_slots: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct WorkPoolsPart {
    pub count: u64,
    pub pools: Vec<WorkPoolSeries>,
}

/// How one collect group fared in this collection.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupOutcome {
    pub name: &'static str,
    pub duration: Duration,
    /// `None` when the group succeeded.
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// `None` when the group failed: its series keep their last good values.
    pub seed: Option<SeedCounts>,
    /// The optional groups: `None` when the group failed or is turned off.
    pub flow_runs: Option<Vec<StateCount>>,
    /// Seconds since `flow_runs` was read from Prefect (it is reused for a
    /// while: collect::flow_runs); with `flow_runs`.
    pub flow_runs_age: Option<f64>,
    pub deployments: Option<DeploymentsPart>,
    pub work_pools: Option<WorkPoolsPart>,
    /// Work queues, runs in progress, concurrency limits, late-run summary.
    pub ops: OpsParts,
    /// `None` also when the server has no events API.
    pub state_changes: Option<StateChanges>,
    /// Prefect's own version, when the server tells it.
    pub server_version: Option<String>,
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

    /// The first failure, for logs and /readyz.
    pub fn first_error(&self) -> Option<String> {
        self.groups
            .iter()
            .find_map(|g| g.error.as_ref().map(|e| format!("{}: {e}", g.name)))
    }
}

#[cfg(test)]
pub mod test_fixtures {
    use super::StateCount;

    pub fn count(state_type: &str, state_name: &str, count: u64) -> StateCount {
        StateCount {
            state_type: state_type.into(),
            state_name: state_name.into(),
            count,
        }
    }
}
