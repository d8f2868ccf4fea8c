//! Concurrency limits (`POST /v2/concurrency_limits/filter`): the global
//! ones as `prefect_concurrency_limit_slots{name}`, `_active_slots{name}` and
//! `_enabled{name}`, and a deployment's own limit, which Prefect stores as a
//! global limit named `deployment:<id>`, as
//! `prefect_deployment_concurrency_limit_slots{deployment,flow}` and its
//! `_active_slots` and `_enabled`, the labels every per-deployment series
//! carries. A deployment limit whose deployment is not among those with
//! per-deployment series (EXPORTER_MAX_DEPLOYMENTS) cannot be labelled so: it
//! stays a global limit under Prefect's name, still one series per limit.
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
    Ok(families(&limits, deployments))
}

fn families(limits: &[Limit], deployments: &[DeploymentSeries]) -> Vec<Family> {
    const NAME: &[&str] = &["name"];
    const DEPLOYMENT: &[&str] = &["deployment", "flow"];
    let mut global = [
        Family::gauge(
            "prefect_concurrency_limit_slots",
            "Slots of the global concurrency limit.",
            NAME,
        ),
        Family::gauge(
            "prefect_concurrency_limit_active_slots",
            "Slots of the global concurrency limit in use.",
            NAME,
        ),
        Family::gauge(
            "prefect_concurrency_limit_enabled",
            "1 when the global concurrency limit is active, else 0.",
            NAME,
        ),
    ];
    let mut own = [
        Family::gauge(
            "prefect_deployment_concurrency_limit_slots",
            "Slots of the deployment's own concurrency limit.",
            DEPLOYMENT,
        ),
        Family::gauge(
            "prefect_deployment_concurrency_limit_active_slots",
            "Slots of the deployment's own concurrency limit in use.",
            DEPLOYMENT,
        ),
        Family::gauge(
            "prefect_deployment_concurrency_limit_enabled",
            "1 when the deployment's own concurrency limit is active, else 0.",
            DEPLOYMENT,
        ),
    ];
    let by_id: HashMap<&str, &DeploymentSeries> =
        deployments.iter().map(|d| (d.id.as_str(), d)).collect();
    for l in limits {
        let values = [
            l.limit as f64,
            l.active_slots as f64,
            f64::from(u8::from(l.active)),
        ];
        let deployment = l
            .name
            .strip_prefix(DEPLOYMENT_PREFIX)
            .and_then(|id| by_id.get(id));
        match deployment {
            Some(d) => {
                for (f, v) in own.iter_mut().zip(values) {
                    f.set(&[&d.name, &d.flow], v);
                }
            }
            None => {
                for (f, v) in global.iter_mut().zip(values) {
                    f.set(&[&l.name], v);
                }
            }
        }
    }
    global.into_iter().chain(own).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::family::{len, value};
    use crate::collect::test_fixtures::deployment;

    fn recorded() -> Vec<Limit> {
        let v: serde_json::Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/concurrency_limits_v2_filter.json"
        ))
        .unwrap();
        serde_json::from_value(v["response"].clone()).unwrap()
    }

    #[test]
    fn a_deployment_limit_is_labelled_by_its_deployment() {
        let deps = [deployment(
            "c081ea7b-51f1-4697-b825-5c31969c75a4",
            "ops-etl",
        )];
        let f = families(&recorded(), &deps);
        let global = |name: &str, limit: &str| value(&f, name, &[limit]);
        assert_eq!(
            global("prefect_concurrency_limit_slots", "api-calls"),
            Some(10.0)
        );
        assert_eq!(
            global("prefect_concurrency_limit_enabled", "api-calls"),
            Some(0.0)
        );
        assert_eq!(
            global("prefect_concurrency_limit_slots", "db-writes"),
            Some(4.0)
        );
        assert_eq!(
            global("prefect_concurrency_limit_active_slots", "db-writes"),
            Some(4.0)
        );
        assert_eq!(len(&f, "prefect_concurrency_limit_slots"), 2);
        let own = |name: &str| value(&f, name, &["ops-etl", "flow-ops"]);
        assert_eq!(own("prefect_deployment_concurrency_limit_slots"), Some(2.0));
        assert_eq!(
            own("prefect_deployment_concurrency_limit_active_slots"),
            Some(0.0)
        );
        assert_eq!(
            own("prefect_deployment_concurrency_limit_enabled"),
            Some(1.0)
        );
    }

    #[test]
    fn an_unknown_deployment_keeps_prefects_name() {
        let f = families(&recorded(), &[]);
        let name = "deployment:c081ea7b-51f1-4697-b825-5c31969c75a4";
        assert_eq!(
            value(&f, "prefect_concurrency_limit_slots", &[name]),
            Some(2.0)
        );
        assert_eq!(len(&f, "prefect_deployment_concurrency_limit_slots"), 0);
    }
}
