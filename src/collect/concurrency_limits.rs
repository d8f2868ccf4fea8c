//! Global concurrency limits (`POST /v2/concurrency_limits/filter`):
//! `prefect_concurrency_limit_slots{name}`, `_active_slots{name}` and
//! `_enabled{name}`. A deployment's own limit is stored by Prefect as a limit
//! named `deployment:<id>`; it is shown as `flow/deployment` when the
//! deployment is among those with per-deployment series, else by Prefect's
//! name (one series per limited deployment: still bounded).
//!
//! Cost per collection: ceil((G+1)/200) requests for G limits, one in practice
//! (2-5 ms of server CPU).

use std::collections::HashMap;
use std::time::Instant;

use serde::Deserialize;

use super::deployments::DeploymentSeries;
use super::family::Family;
use super::listing::all_pages;
use crate::prefect::{ApiError, Client};

struct ConcurrencyLimitSeries {
    /// The limit's name; a deployment's limit reads `flow/deployment`.
    name: String,
    limit: u64,
    active_slots: u64,
    enabled: bool,
}

const DEPLOYMENT_PREFIX: &str = "deployment:";

#[derive(Deserialize)]
struct Limit {
    id: String,
    name: String,
    limit: u64,
    #[serde(default)]
    active_slots: u64,
    #[serde(default = "enabled_by_default")]
    active: bool,
}

fn enabled_by_default() -> bool {
    true
}

pub fn collect(
    client: &mut Client,
    deployments: &[DeploymentSeries],
    deadline: Instant,
) -> Result<Vec<Family>, ApiError> {
    let limits: Vec<Limit> = all_pages(
        client,
        "/v2/concurrency_limits/filter",
        |l: &Limit| &l.id,
        deadline,
    )?;
    Ok(families(&series(limits, deployments)))
}

fn families(limits: &[ConcurrencyLimitSeries]) -> Vec<Family> {
    const NAME: &[&str] = &["name"];
    let mut slots = Family::gauge(
        "prefect_concurrency_limit_slots",
        "Slots of the global concurrency limit (deployment limits named flow/deployment).",
        NAME,
    );
    let mut active = Family::gauge(
        "prefect_concurrency_limit_active_slots",
        "Slots of the global concurrency limit in use.",
        NAME,
    );
    let mut enabled = Family::gauge(
        "prefect_concurrency_limit_enabled",
        "1 when the global concurrency limit is active, else 0.",
        NAME,
    );
    for l in limits {
        slots.set(&[&l.name], l.limit as f64);
        active.set(&[&l.name], l.active_slots as f64);
        enabled.set(&[&l.name], f64::from(u8::from(l.enabled)));
    }
    vec![slots, active, enabled]
}

fn series(limits: Vec<Limit>, deployments: &[DeploymentSeries]) -> Vec<ConcurrencyLimitSeries> {
    let names: HashMap<&str, String> = deployments
        .iter()
        .map(|d| (d.id.as_str(), format!("{}/{}", d.flow, d.name)))
        .collect();
    limits
        .into_iter()
        .map(|l| {
            let name = l
                .name
                .strip_prefix(DEPLOYMENT_PREFIX)
                .and_then(|id| names.get(id).cloned())
                .unwrap_or(l.name);
            ConcurrencyLimitSeries {
                name,
                limit: l.limit,
                active_slots: l.active_slots,
                enabled: l.active,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::test_fixtures::deployment;

    fn recorded() -> Vec<Limit> {
        let v: serde_json::Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/concurrency_limits_v2_filter.json"
        ))
        .unwrap();
        serde_json::from_value(v["response"].clone()).unwrap()
    }

    #[test]
    fn recorded_limits_with_the_deployment_limit_named() {
        let deps = [deployment(
            "c081ea7b-51f1-4697-b825-5c31969c75a4",
            "ops-etl",
        )];
        let s = series(recorded(), &deps);
        let want = [
            ("api-calls", 10, 0, false),
            ("db-writes", 4, 4, true),
            ("flow-ops/ops-etl", 2, 0, true),
        ];
        let got: Vec<(&str, u64, u64, bool)> = s
            .iter()
            .map(|l| (l.name.as_str(), l.limit, l.active_slots, l.enabled))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn an_unknown_deployment_keeps_prefects_name() {
        let s = series(recorded(), &[]);
        assert_eq!(s[2].name, "deployment:c081ea7b-51f1-4697-b825-5c31969c75a4");
    }
}
