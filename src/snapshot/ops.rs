//! The plain data of the operator groups (issue 13): late runs, work queues,
//! runs in progress and concurrency limits.

/// The shared listing of late runs: what the deployments and work queues
/// groups show per deployment and per queue, and how complete it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LateRunsSummary {
    /// Late runs on the server, from one count: exact whatever the cap.
    pub total: u64,
    /// Late runs listed, and so counted per deployment and per queue.
    pub listed: u64,
    /// True when EXPORTER_MAX_LISTED_RUNS stopped the listing.
    pub capped: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkQueueSeries {
    pub work_pool: String,
    pub name: String,
    pub status: String,
    pub paused: bool,
    pub priority: Option<i64>,
    /// Unix time of the last poll by a worker; `None` when never polled.
    pub last_polled: Option<f64>,
    pub late_runs: u64,
    pub concurrency_limit: Option<u64>,
    /// Only on servers that give it (3.6.23 and later) and queues with a limit.
    pub active_slots: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct WorkQueuesPart {
    pub queues: Vec<WorkQueueSeries>,
}

/// Runs of one deployment in one state type (PENDING or RUNNING).
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveRunsSeries {
    pub deployment: String,
    pub flow: String,
    pub state_type: &'static str,
    pub count: u64,
    /// Unix time at which the longest-waiting of them entered the state
    /// (RUNNING: its start time; PENDING: its state's timestamp).
    pub oldest: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ActiveRunsPart {
    pub items: Vec<ActiveRunsSeries>,
    /// Runs in progress listed (of any deployment, or none).
    pub listed: u64,
    /// True when EXPORTER_MAX_LISTED_RUNS stopped the listing.
    pub capped: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConcurrencyLimitSeries {
    /// The limit's name; a deployment's limit reads `flow/deployment`.
    pub name: String,
    pub limit: u64,
    pub active_slots: u64,
    pub enabled: bool,
}

/// The operator groups of one collection: `None` when the group failed or is
/// turned off (its series keep their last good values).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OpsParts {
    pub late_runs: Option<LateRunsSummary>,
    pub work_queues: Option<WorkQueuesPart>,
    pub active_flow_runs: Option<ActiveRunsPart>,
    pub concurrency_limits: Option<Vec<ConcurrencyLimitSeries>>,
}
