//! Listings of flow runs by state with a request budget, shared by the late
//! runs and the runs in progress: one page per 200 runs, never more pages than
//! EXPORTER_MAX_LISTED_RUNS allows, so an incident (every deployment late, a
//! thousand runs stuck) cannot multiply the requests sent to Prefect.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::prefect::{ApiError, Client};

/// Prefect refuses list requests with a larger limit (422).
pub const PAGE: usize = 200;
/// Run ids are unique, so pages sorted by id neither overlap nor skip while
/// the set is unchanged (a sort on times would tie on runs created together).
const SORT: &str = "ID_DESC";

/// Longest time a listing is reused or updated in place before it is taken
/// again whole: bounds what the reuse cannot see (late_runs, active_runs).
/// 10 min, the default of EXPORTER_FLOW_RUNS_MAX_AGE, but not that setting
/// itself, which users set to 0 to read the cheap per-state counts every
/// collection and which would then bring back the full pages.
pub const LISTING_MAX_AGE: Duration = Duration::from_secs(600);

/// Which runs: by state names (exact, case-sensitive) or by state types.
#[derive(Clone, Copy)]
pub enum States {
    Names(&'static [&'static str]),
    Types(&'static [&'static str]),
}

#[derive(Serialize)]
pub struct RunsFilter {
    flow_runs: RunStates,
}

#[derive(Serialize)]
struct RunStates {
    state: StateFilter,
}

#[derive(Serialize)]
struct StateFilter {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    state_type: Option<AnyOf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<AnyOf>,
}

#[derive(Serialize)]
struct AnyOf {
    any_: &'static [&'static str],
}

#[derive(Serialize)]
pub struct RunsPage<'a, F: Serialize> {
    #[serde(flatten)]
    filter: &'a F,
    sort: &'static str,
    limit: usize,
    offset: usize,
}

pub fn filter(states: States) -> RunsFilter {
    let state = match states {
        States::Names(n) => StateFilter {
            state_type: None,
            name: Some(AnyOf { any_: n }),
        },
        States::Types(t) => StateFilter {
            state_type: Some(AnyOf { any_: t }),
            name: None,
        },
    };
    RunsFilter {
        flow_runs: RunStates { state },
    }
}

pub fn page_body<F: Serialize>(filter: &F, limit: usize, offset: usize) -> RunsPage<'_, F> {
    RunsPage {
        filter,
        sort: SORT,
        limit,
        offset,
    }
}

/// `POST /flow_runs/count` of the runs in these states: 2-5 ms of server CPU
/// whatever their number.
pub fn count(client: &mut Client, states: States, deadline: Instant) -> Result<u64, ApiError> {
    client.post("/flow_runs/count", &filter(states), deadline)
}

/// The runs in these states, 200 per request, at most `max` of them. Returns
/// them (each once) and whether the cap stopped the listing.
pub fn runs<T: DeserializeOwned>(
    client: &mut Client,
    states: States,
    max: usize,
    id: impl Fn(&T) -> &str,
    deadline: Instant,
) -> Result<(Vec<T>, bool), ApiError> {
    runs_where(client, &filter(states), max, id, deadline)
}

/// [`runs`] for any flow-run filter body (`{"flow_runs": {...}}`).
pub fn runs_where<T: DeserializeOwned, F: Serialize>(
    client: &mut Client,
    filter: &F,
    max: usize,
    id: impl Fn(&T) -> &str,
    deadline: Instant,
) -> Result<(Vec<T>, bool), ApiError> {
    let mut out: Vec<T> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut offset = 0;
    loop {
        if offset >= max {
            // Full pages up to the cap: there may be more.
            return Ok((out, true));
        }
        let limit = PAGE.min(max - offset);
        let page: Vec<T> = client.post(
            "/flow_runs/filter",
            &page_body(filter, limit, offset),
            deadline,
        )?;
        let short = page.len() < limit;
        offset += limit;
        for run in page {
            if seen.insert(id(&run).to_string()) {
                out.push(run);
            }
        }
        if short {
            return Ok((out, false));
        }
    }
}

#[derive(Serialize)]
struct Paging {
    limit: usize,
    offset: usize,
}

/// Every page of a listing, 200 at a time, until a short page. Offset paging
/// can repeat an item when the set changes between pages: an item whose `key`
/// was seen already is dropped.
pub fn all_pages<T: DeserializeOwned>(
    client: &mut Client,
    path: &str,
    key: impl Fn(&T) -> &str,
    deadline: Instant,
) -> Result<Vec<T>, ApiError> {
    let mut out: Vec<T> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut offset = 0;
    loop {
        let page: Vec<T> = client.post(
            path,
            &Paging {
                limit: PAGE,
                offset,
            },
            deadline,
        )?;
        let short = page.len() < PAGE;
        out.extend(page.into_iter().filter(|x| seen.insert(key(x).to_string())));
        if short {
            return Ok(out);
        }
        offset += PAGE;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn page_body_is_limit_and_offset() {
        let b = serde_json::to_string(&Paging {
            limit: 200,
            offset: 400,
        })
        .unwrap();
        assert_eq!(b, r#"{"limit":200,"offset":400}"#);
    }

    use super::*;

    #[test]
    fn bodies_are_the_documented_filters() {
        let late =
            serde_json::to_string(&page_body(&filter(States::Names(&["Late"])), 200, 400)).unwrap();
        assert_eq!(
            late,
            r#"{"flow_runs":{"state":{"name":{"any_":["Late"]}}},"sort":"ID_DESC","limit":200,"offset":400}"#
        );
        let active =
            serde_json::to_string(&filter(States::Types(&["PENDING", "RUNNING"]))).unwrap();
        assert_eq!(
            active,
            r#"{"flow_runs":{"state":{"type":{"any_":["PENDING","RUNNING"]}}}}"#
        );
    }
}
