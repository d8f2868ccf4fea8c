//! The six specified metrics: four flow-run counts and the watched flows that
//! have no deployment. Each is one count/filter request, so the cost does not
//! grow with the number of runs.

use std::collections::HashSet;
use std::time::Instant;

use serde::Deserialize;

use super::family::Family;
use super::listing::{self, Filter, FlowsWhere, Match, Page, StateWhere, Where, PAGE};
use crate::prefect::{ApiError, Client};

/// State names, as Prefect stores them (exact and case-sensitive).
pub const SUCCESS_STATES: &[&str] = &["Completed", "Cached"];
pub const ERROR_STATES: &[&str] = &["RolledBack", "Failed", "TimedOut", "Crashed", "Suspended"];
pub const WARNING_STATES: &[&str] = &["Cancelling", "Cancelled", "Paused", "Retrying"];

#[derive(Deserialize)]
struct Flow {
    name: String,
}

/// The six specified metrics keep their names and carry no labels (the error
/// counter is the exporter's own, in metrics.rs).
pub fn collect(
    client: &mut Client,
    watched: &[String],
    deadline: Instant,
) -> Result<Vec<Family>, ApiError> {
    let mut count = |states| count(client, states, deadline).map(|n| n as f64);
    Ok(vec![
        Family::single(
            "prefect_flow_runs_total",
            "Flow runs known to Prefect, in any state.",
            count(None)?,
        ),
        Family::single(
            "prefect_flow_runs_successes_total",
            "Flow runs whose state name is Completed or Cached.",
            count(Some(SUCCESS_STATES))?,
        ),
        Family::single(
            "prefect_flow_runs_in_error_total",
            "Flow runs whose state name is RolledBack, Failed, TimedOut, Crashed or Suspended.",
            count(Some(ERROR_STATES))?,
        ),
        Family::single(
            "prefect_flow_runs_in_warning_total",
            "Flow runs whose state name is Cancelling, Cancelled, Paused or Retrying.",
            count(Some(WARNING_STATES))?,
        ),
        Family::single(
            "prefect_missing_deployments_total",
            "Flow names of EXPORTER_CHECK_DEPLOYMENTS that have no deployment.",
            missing_deployments(client, watched, deadline)? as f64,
        ),
    ])
}

fn count(
    client: &mut Client,
    states: Option<&'static [&'static str]>,
    deadline: Instant,
) -> Result<u64, ApiError> {
    listing::count_where(client, &count_filter(states), deadline)
}

/// Everything (`{}`), or the runs in these state names.
fn count_filter(states: Option<&'static [&'static str]>) -> Filter<'static> {
    match states {
        None => Filter::default(),
        Some(names) => Filter::runs(Where {
            state: StateWhere::names(Match::Any(names)),
            ..Where::default()
        }),
    }
}

/// The watched flows that have a deployment, among `names` (one page).
fn with_deployment<'a>(names: &'a [&'a str]) -> Filter<'a> {
    Filter {
        flows: Some(FlowsWhere {
            name: Some(Match::Any(names)),
            deployment: Some(Match::IsNull(false)),
            ..FlowsWhere::default()
        }),
        ..Filter::default()
    }
}

/// Asks which of the watched flows have at least one deployment, 200 names per
/// request; no request at all when nothing is watched.
fn missing_deployments(
    client: &mut Client,
    watched: &[String],
    deadline: Instant,
) -> Result<u64, ApiError> {
    let mut found = Vec::new();
    for page in watched.chunks(PAGE) {
        let names: Vec<&str> = page.iter().map(String::as_str).collect();
        let filter = with_deployment(&names);
        let body = Page {
            filter: &filter,
            sort: None,
            limit: PAGE,
            offset: None,
        };
        let flows: Vec<Flow> = client.post("/flows/filter", &body, deadline)?;
        found.extend(flows.into_iter().map(|f| f.name));
    }
    Ok(count_missing(watched, &found))
}

/// A flow that does not exist at all is missing too: only names the server
/// returned as having a deployment count as present.
pub fn count_missing(watched: &[String], found: &[String]) -> u64 {
    let found: HashSet<&str> = found.iter().map(String::as_str).collect();
    watched
        .iter()
        .filter(|n| !found.contains(n.as_str()))
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn missing_counts_unknown_and_undeployed_flows() {
        let watched = names(&["flow-a", "flow-b", "flow-nope"]);
        assert_eq!(count_missing(&watched, &names(&["flow-a"])), 2);
        assert_eq!(
            count_missing(&watched, &names(&["flow-a", "flow-b", "flow-nope"])),
            0
        );
        assert_eq!(count_missing(&[], &[]), 0);
        // An unexpected extra name from the server cannot make the count negative.
        assert_eq!(count_missing(&names(&["a"]), &names(&["a", "b"])), 0);
    }

    #[test]
    fn state_lists_match_the_specification() {
        assert_eq!(
            SUCCESS_STATES.len() + ERROR_STATES.len() + WARNING_STATES.len(),
            11
        );
        let all: HashSet<_> = SUCCESS_STATES
            .iter()
            .chain(ERROR_STATES)
            .chain(WARNING_STATES)
            .collect();
        assert_eq!(all.len(), 11, "a state name is in two groups");
    }

    #[test]
    fn count_bodies_are_the_documented_filters() {
        let body = |states| serde_json::to_string(&count_filter(states)).unwrap();
        assert_eq!(body(None), "{}");
        assert_eq!(
            body(Some(SUCCESS_STATES)),
            r#"{"flow_runs":{"state":{"name":{"any_":["Completed","Cached"]}}}}"#
        );
        let filter = with_deployment(&["flow-a"]);
        let flows = serde_json::to_string(&Page {
            filter: &filter,
            sort: None,
            limit: PAGE,
            offset: None,
        })
        .unwrap();
        assert_eq!(
            flows,
            r#"{"flows":{"name":{"any_":["flow-a"]},"deployment":{"is_null_":false}},"limit":200}"#
        );
    }
}
