//! `EXPORTER_COLLECTORS`: which optional collect groups run.

use super::error::{invalid, ConfigError};
use super::parse::parse_name_list;

/// Which optional collect groups run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Collectors {
    pub flow_runs: bool,
    pub deployments: bool,
    pub work_pools: bool,
    pub work_queues: bool,
    pub active_flow_runs: bool,
    pub concurrency_limits: bool,
    pub events: bool,
}

impl Default for Collectors {
    fn default() -> Self {
        Collectors {
            flow_runs: true,
            deployments: true,
            work_pools: true,
            work_queues: true,
            active_flow_runs: true,
            concurrency_limits: true,
            events: true,
        }
    }
}

impl Collectors {
    /// The enabled group names, in collection order, for logs.
    pub fn names(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        for (on, name) in [
            (self.flow_runs, "flow_runs"),
            (self.deployments, "deployments"),
            (self.work_pools, "work_pools"),
            (self.work_queues, "work_queues"),
            (self.active_flow_runs, "active_flow_runs"),
            (self.concurrency_limits, "concurrency_limits"),
            (self.events, "events"),
        ] {
            if on {
                out.push(name);
            }
        }
        out
    }
}

/// `seed` is accepted (it always runs); an unknown name is an error rather than
/// a group silently missing from the dashboards.
pub(super) fn parse_collectors(v: &str) -> Result<Collectors, ConfigError> {
    let mut c = Collectors {
        flow_runs: false,
        deployments: false,
        work_pools: false,
        work_queues: false,
        active_flow_runs: false,
        concurrency_limits: false,
        events: false,
    };
    for name in parse_name_list(v) {
        match name.to_ascii_lowercase().as_str() {
            "flow_runs" => c.flow_runs = true,
            "deployments" => c.deployments = true,
            "work_pools" => c.work_pools = true,
            "work_queues" => c.work_queues = true,
            "active_flow_runs" => c.active_flow_runs = true,
            "concurrency_limits" => c.concurrency_limits = true,
            "events" => c.events = true,
            "seed" => {}
            _ => {
                return Err(invalid(
                    "EXPORTER_COLLECTORS",
                    v.to_string(),
                    "expected a comma list of flow_runs, deployments, work_pools, work_queues, \
                     active_flow_runs, concurrency_limits, events",
                ))
            }
        }
    }
    Ok(c)
}
