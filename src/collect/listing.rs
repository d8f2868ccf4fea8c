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

/// The body of Prefect's filter and count endpoints: each resource's
/// conditions under its key (`{"flow_runs": {...}, "flows": {...}}`), with
/// the fields the collectors ask on. The one place these bodies are spelled;
/// each module fills in its fields, and what is left at None is left out (so
/// `Filter::default()` is `{}`, everything).
#[derive(Serialize, Default)]
pub struct Filter<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow_runs: Option<Where<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flows: Option<FlowsWhere<'a>>,
}

/// Conditions on flow runs.
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

/// Conditions on flows; `deployment: IsNull(false)` is "has a deployment".
#[derive(Serialize, Default)]
pub struct FlowsWhere<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Match<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<Match<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployment: Option<Match<'a>>,
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

impl<'a> Filter<'a> {
    pub fn runs(flow_runs: Where<'a>) -> Filter<'a> {
        Filter {
            flow_runs: Some(flow_runs),
            flows: None,
        }
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

/// One page of a listing: the filter, the order and the window.
#[derive(Serialize)]
pub struct Page<'a> {
    #[serde(flatten)]
    pub filter: &'a Filter<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sort: Option<&'static str>,
    pub limit: usize,
    /// Left out for a request that is one page by construction.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<usize>,
}

impl States {
    pub fn state(self) -> Option<StateWhere<'static>> {
        match self {
            States::Names(n) => StateWhere::names(Match::Any(n)),
            States::Types(t) => StateWhere::types(Match::Any(t)),
        }
    }
}

pub fn filter(states: States) -> Filter<'static> {
    Filter::runs(Where {
        state: states.state(),
        ..Where::default()
    })
}

/// A page of runs in the listings' order.
pub fn page_body<'a>(filter: &'a Filter<'a>, limit: usize, offset: usize) -> Page<'a> {
    Page {
        filter,
        sort: Some(SORT),
        limit,
        offset: Some(offset),
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
    filter: &Filter<'_>,
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
    filter: &Filter<'_>,
    max: usize,
    id: impl Fn(&T) -> &str,
    deadline: Instant,
) -> Result<(Vec<T>, bool), ApiError> {
    pages(
        client,
        "/flow_runs/filter",
        filter,
        Some(SORT),
        max,
        id,
        deadline,
    )
}

/// Every page of a listing, 200 at a time, until a short page.
pub fn all_pages<T: DeserializeOwned>(
    client: &mut Client,
    path: &str,
    key: impl Fn(&T) -> &str,
    deadline: Instant,
) -> Result<Vec<T>, ApiError> {
    let everything = Filter::default();
    let (out, _) = pages(client, path, &everything, None, usize::MAX, key, deadline)?;
    Ok(out)
}

/// The one pager: pages of `path` for `filter` in `sort` order, 200 at a time
/// and never past `max` items, until a short page. Returns the items and
/// whether `max` stopped the listing (there may be more). Offset paging can
/// repeat an item when the set changes between pages: an item whose `key` was
/// seen already is dropped.
pub fn pages<T: DeserializeOwned>(
    client: &mut Client,
    path: &str,
    filter: &Filter<'_>,
    sort: Option<&'static str>,
    max: usize,
    key: impl Fn(&T) -> &str,
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
        let body = Page {
            filter,
            sort,
            limit,
            offset: Some(offset),
        };
        let page: Vec<T> = client.post(path, &body, deadline)?;
        let short = page.len() < limit;
        offset += limit;
        out.extend(page.into_iter().filter(|x| seen.insert(key(x).to_string())));
        if short {
            return Ok((out, false));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_the_documented_filters() {
        let everything = Filter::default();
        let b = serde_json::to_string(&Page {
            filter: &everything,
            sort: None,
            limit: 200,
            offset: Some(400),
        })
        .unwrap();
        assert_eq!(b, r#"{"limit":200,"offset":400}"#);
        assert_eq!(serde_json::to_string(&everything).unwrap(), "{}");
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
        let flows = Filter {
            flows: Some(FlowsWhere {
                name: Some(Match::Any(&["a"])),
                deployment: Some(Match::IsNull(false)),
                ..FlowsWhere::default()
            }),
            ..Filter::default()
        };
        assert_eq!(
            serde_json::to_string(&flows).unwrap(),
            r#"{"flows":{"name":{"any_":["a"]},"deployment":{"is_null_":false}}}"#
        );
    }
}
