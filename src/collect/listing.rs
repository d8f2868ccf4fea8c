//! Listings of flow runs by state with a request budget, shared by the late
//! runs and the runs in progress: one page per 200 runs, never more pages than
//! EXPORTER_MAX_LISTED_RUNS allows, so an incident (every deployment late, a
//! thousand runs stuck) cannot multiply the requests sent to Prefect.

use std::collections::HashSet;
use std::time::Instant;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::prefect::{ApiError, Client};

/// Prefect refuses list requests with a larger limit (422).
pub const PAGE: usize = 200;
/// Run ids are unique, so pages sorted by id neither overlap nor skip while
/// the set is unchanged (a sort on times would tie on runs created together).
const SORT: &str = "ID_DESC";

/// Known run ids per `id.any_` count (late_runs, active_runs): one request
/// with the default cap, and a bound on each request's size (39 kB) and on
/// the SQL parameters it takes.
pub const IDS_PER_COUNT: usize = 1000;

/// Which runs: by state names (exact, case-sensitive) or by state types.
#[derive(Clone, Copy)]
pub enum States {
    Names(&'static [&'static str]),
    Types(&'static [&'static str]),
}

/// The body of Prefect's flow-run endpoints (`/flow_runs/filter`, `/count`):
/// `{"flow_runs": {...}}`, with the fields the collectors ask on. The one
/// place these bodies are spelled; each module fills in its fields.
#[derive(Serialize)]
pub struct RunsFilter<'a> {
    pub flow_runs: Where<'a>,
}

/// Fields left at None are left out of the body.
#[derive(Serialize, Default)]
pub struct Where<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Match<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<StateWhere<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<Match<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_time: Option<After>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_start_time: Option<After>,
}

#[derive(Serialize, Default)]
pub struct StateWhere<'a> {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub state_type: Option<Match<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<Match<'a>>,
}

/// One condition on a field: `{"any_": [...]}`, `{"not_any_": [...]}` or
/// `{"is_null_": b}`.
#[derive(Serialize)]
pub enum Match<'a> {
    #[serde(rename = "any_")]
    Any(&'a [&'a str]),
    #[serde(rename = "not_any_")]
    NotAny(&'a [&'a str]),
    #[serde(rename = "is_null_")]
    IsNull(bool),
}

/// `{"after_": t}`: at or after `t` (Prefect includes the bound).
#[derive(Serialize)]
pub struct After {
    pub after_: String,
}

impl<'a> RunsFilter<'a> {
    pub fn new(flow_runs: Where<'a>) -> RunsFilter<'a> {
        RunsFilter { flow_runs }
    }
}

impl<'a> StateWhere<'a> {
    pub fn types(m: Match<'a>) -> Option<StateWhere<'a>> {
        Some(StateWhere {
            state_type: Some(m),
            name: None,
        })
    }

    pub fn names(m: Match<'a>) -> Option<StateWhere<'a>> {
        Some(StateWhere {
            state_type: None,
            name: Some(m),
        })
    }
}

#[derive(Serialize)]
pub struct RunsPage<'a> {
    #[serde(flatten)]
    filter: &'a RunsFilter<'a>,
    sort: &'static str,
    limit: usize,
    offset: usize,
}

impl States {
    pub fn state(self) -> Option<StateWhere<'static>> {
        match self {
            States::Names(n) => StateWhere::names(Match::Any(n)),
            States::Types(t) => StateWhere::types(Match::Any(t)),
        }
    }
}

pub fn filter(states: States) -> RunsFilter<'static> {
    RunsFilter::new(Where {
        state: states.state(),
        ..Where::default()
    })
}

pub fn page_body<'a>(filter: &'a RunsFilter<'a>, limit: usize, offset: usize) -> RunsPage<'a> {
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
    count_where(client, &filter(states), deadline)
}

/// `POST /flow_runs/count` of the runs `filter` matches.
pub fn count_where(
    client: &mut Client,
    filter: &RunsFilter<'_>,
    deadline: Instant,
) -> Result<u64, ApiError> {
    client.post("/flow_runs/count", filter, deadline)
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

/// [`runs`] for any flow-run filter.
pub fn runs_where<T: DeserializeOwned>(
    client: &mut Client,
    filter: &RunsFilter<'_>,
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
