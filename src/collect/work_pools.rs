//! Work pools: `prefect_work_pools`, `prefect_work_pool_info`,
//! `prefect_work_pool_workers{status}` and the age of the newest worker
//! heartbeat per pool, and the pool's concurrency limit and slots in use when
//! the listing carries them (`active_slots` is recent: absent, not an error).
//!
//! Cost per collection with P pools: ceil((P+1)/200) listing pages + one
//! workers request per pool (200 workers per page; Prefect has no request for
//! the workers of several pools at once). `prefect_work_pools` is the number
//! listed: the listing is never capped, so a count request would only repeat it.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Deserialize;

use super::family::{bool_label, Family};
use super::listing::all_pages;
use crate::prefect::{ApiError, Client};
use crate::rfc3339;

/// Always shown per pool, at 0 when no worker has that status.
pub const WORKER_STATUSES: &[&str] = &["ONLINE", "OFFLINE"];

#[derive(Deserialize)]
struct Pool {
    name: String,
    #[serde(rename = "type", default)]
    pool_type: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    is_paused: bool,
    #[serde(default)]
    concurrency_limit: Option<u64>,
    #[serde(default)]
    active_slots: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
struct WorkPoolSeries {
    name: String,
    pool_type: String,
    status: String,
    paused: bool,
    /// Workers per status; ONLINE and OFFLINE are always present.
    workers: Vec<(String, u64)>,
    /// Seconds since the newest worker heartbeat, when a worker ever beat.
    last_heartbeat_age: Option<f64>,
    /// The pool's limit and slots in use, when the answer carries them.
    concurrency_limit: Option<u64>,
    active_slots: Option<u64>,
}

#[derive(Deserialize)]
struct Worker {
    /// Unique within the pool: drops a repeat when paging meets a change.
    #[serde(default)]
    name: String,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    last_heartbeat_time: Option<String>,
}

pub fn collect(client: &mut Client, deadline: Instant) -> Result<Vec<Family>, ApiError> {
    // Pools are listed by name, which is unique: pages neither overlap nor
    // skip while the set is unchanged; a pool created meanwhile may repeat one.
    let pools: Vec<Pool> = all_pages(client, "/work_pools/filter", |p: &Pool| &p.name, deadline)?;
    let mut out = Vec::with_capacity(pools.len());
    for pool in pools {
        let workers = list_workers(client, &pool.name, deadline)?;
        out.push(pool_series(pool, &workers, rfc3339::now()));
    }
    Ok(families(&out))
}

fn families(pools: &[WorkPoolSeries]) -> Vec<Family> {
    const POOL: &[&str] = &["work_pool"];
    let mut info = Family::gauge(
        "prefect_work_pool_info",
        "One series per work pool; always 1.",
        &["work_pool", "type", "status", "paused"],
    );
    let mut workers = Family::gauge(
        "prefect_work_pool_workers",
        "Workers of the work pool per status (ONLINE, OFFLINE).",
        &["work_pool", "status"],
    );
    let mut heartbeat_age = Family::gauge(
        "prefect_work_pool_last_heartbeat_age_seconds",
        "Seconds from the newest worker heartbeat of the pool to the last collection.",
        POOL,
    );
    let mut limit = Family::gauge(
        "prefect_work_pool_concurrency_limit",
        "Concurrency limit of the work pool (absent: no limit).",
        POOL,
    );
    let mut slots = Family::gauge(
        "prefect_work_pool_active_slots",
        "Flow runs of the work pool holding a slot, as Prefect reports it.",
        POOL,
    );
    for p in pools {
        let name = p.name.as_str();
        info.set(&[name, &p.pool_type, &p.status, bool_label(p.paused)], 1.0);
        for (status, n) in &p.workers {
            workers.set(&[name, status], *n as f64);
        }
        if let Some(age) = p.last_heartbeat_age {
            heartbeat_age.set(&[name], age);
        }
        if let Some(l) = p.concurrency_limit {
            limit.set(&[name], l as f64);
        }
        if let Some(a) = p.active_slots {
            slots.set(&[name], a as f64);
        }
    }
    vec![
        Family::single(
            "prefect_work_pools",
            "Work pools known to Prefect.",
            pools.len() as f64,
        ),
        info,
        workers,
        heartbeat_age,
        limit,
        slots,
    ]
}

fn list_workers(
    client: &mut Client,
    pool: &str,
    deadline: Instant,
) -> Result<Vec<Worker>, ApiError> {
    let path = format!("/work_pools/{}/workers/filter", encode_segment(pool));
    all_pages(client, &path, |w: &Worker| &w.name, deadline)
}

fn pool_series(pool: Pool, workers: &[Worker], now: f64) -> WorkPoolSeries {
    let mut by_status: BTreeMap<String, u64> =
        WORKER_STATUSES.iter().map(|s| (s.to_string(), 0)).collect();
    let mut newest: Option<f64> = None;
    for w in workers {
        if let Some(s) = &w.status {
            *by_status.entry(s.clone()).or_insert(0) += 1;
        }
        if let Some(t) = w.last_heartbeat_time.as_deref().and_then(rfc3339::parse) {
            newest = Some(newest.map_or(t, |n| n.max(t)));
        }
    }
    WorkPoolSeries {
        name: pool.name,
        pool_type: pool.pool_type.unwrap_or_default(),
        status: pool.status.unwrap_or_default(),
        paused: pool.is_paused,
        workers: by_status.into_iter().collect(),
        // A heartbeat stamped a little ahead of the exporter's clock is fresh, not negative.
        last_heartbeat_age: newest.map(|t| (now - t).max(0.0)),
        concurrency_limit: pool.concurrency_limit,
        active_slots: pool.active_slots,
    }
}

/// Percent-encodes a path segment: pool names may hold spaces, `?`, `#` or
/// any Unicode (Prefect only forbids `/ % & > <`).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workers(json: &str) -> Vec<Worker> {
        serde_json::from_str(json).unwrap()
    }

    fn recorded_pool() -> Pool {
        let v: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/work_pools_filter.json"))
                .unwrap();
        let mut pools: Vec<Pool> = serde_json::from_value(v["response"].clone()).unwrap();
        pools.remove(0)
    }

    #[test]
    fn pool_without_workers_shows_zero_online() {
        let s = pool_series(recorded_pool(), &[], 0.0);
        assert_eq!(s.name, "lab-pool");
        assert_eq!(s.pool_type, "process");
        assert_eq!(s.status, "NOT_READY");
        assert!(!s.paused);
        assert_eq!(
            s.workers,
            vec![("OFFLINE".to_string(), 0), ("ONLINE".to_string(), 0)]
        );
        assert_eq!(s.last_heartbeat_age, None);
        // A pool without a limit.
        assert_eq!(s.concurrency_limit, None);
        assert_eq!(s.active_slots, None);
    }

    #[test]
    fn recorded_pool_limit_and_slots_are_read() {
        let v: serde_json::Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/work_pools_filter_limits.json"
        ))
        .unwrap();
        let mut pools: Vec<Pool> = serde_json::from_value(v["response"].clone()).unwrap();
        let s = pool_series(pools.remove(0), &[], 0.0);
        assert_eq!(s.name, "pool-ops");
        assert_eq!(s.concurrency_limit, Some(10));
        assert_eq!(s.active_slots, Some(4));
    }

    #[test]
    fn workers_are_counted_per_status_with_the_newest_heartbeat() {
        let w = workers(
            r#"[{"name":"w1","status":"ONLINE","last_heartbeat_time":"2026-11-24T21:43:35.708423Z"},
                {"name":"w2","status":"OFFLINE","last_heartbeat_time":"2026-11-24T20:00:00Z"},
                {"name":"w3","status":"ONLINE","last_heartbeat_time":null}]"#,
        );
        let now = rfc3339::parse("2026-11-24T21:44:35.708423Z").unwrap();
        let s = pool_series(recorded_pool(), &w, now);
        assert_eq!(
            s.workers,
            vec![("OFFLINE".to_string(), 1), ("ONLINE".to_string(), 2)]
        );
        let age = s.last_heartbeat_age.unwrap();
        assert!((age - 60.0).abs() < 1e-3, "{age}");
        // A clock a little behind the server's never shows a negative age.
        let s = pool_series(recorded_pool(), &w, now - 3600.0);
        assert_eq!(s.last_heartbeat_age, Some(0.0));
    }

    #[test]
    fn pool_names_are_encoded_for_the_path() {
        assert_eq!(encode_segment("lab-pool_1.x~"), "lab-pool_1.x~");
        assert_eq!(encode_segment("pool é? #x"), "pool%20%C3%A9%3F%20%23x");
    }
}
