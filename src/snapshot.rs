//! The plain data of one collection. Collect groups fill it, `Metrics::update`
//! reads it: nothing in here talks to Prefect or to Prometheus, so both sides
//! can be tested on their own.

use std::time::{Duration, SystemTime};

/// The six specified values (the error counter lives in `Metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeedCounts {
    pub total: u64,
    pub successes: u64,
    pub errors: u64,
    pub warnings: u64,
    pub missing_deployments: u64,
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
    /// Prefect's own version, when the server tells it.
    pub server_version: Option<String>,
    pub groups: Vec<GroupOutcome>,
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
