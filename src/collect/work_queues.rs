//! Work queues: `prefect_work_queues`, `prefect_work_queue_info`, the last poll
//! by a worker, the late runs per queue (from the shared late-run listing: no
//! request per queue), and the queue's limit and slots in use where Prefect
//! gives them (`active_slots` came with 3.6.23 and only on queues with a
//! limit: absent otherwise, never an error).
//!
//! Cost per collection with Q queues: ceil((Q+1)/200) `POST /work_queues/filter`
//! pages (2-5 ms of server CPU each).

use std::collections::HashMap;
use std::time::Instant;

use serde::Deserialize;

use super::family::{bool_label, Family};
use super::listing::all_pages;
use crate::prefect::{ApiError, Client};
use crate::rfc3339;

#[derive(Debug, Clone, PartialEq)]
struct WorkQueueSeries {
    work_pool: String,
    name: String,
    status: String,
    paused: bool,
    priority: Option<i64>,
    /// Unix time of the last poll by a worker; `None` when never polled.
    last_polled: Option<f64>,
    late_runs: u64,
    concurrency_limit: Option<u64>,
    /// Only on servers that give it (3.6.23 and later) and queues with a limit.
    active_slots: Option<u64>,
}

#[derive(Deserialize)]
struct Queue {
    id: String,
    name: String,
    #[serde(default)]
    work_pool_name: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    is_paused: bool,
    #[serde(default)]
    priority: Option<i64>,
    #[serde(default)]
    concurrency_limit: Option<u64>,
    #[serde(default)]
    last_polled: Option<String>,
    #[serde(default)]
    active_slots: Option<u64>,
}

/// `late_by_queue`: listed late runs per work queue id.
pub fn collect(
    client: &mut Client,
    late_by_queue: &HashMap<String, u64>,
    deadline: Instant,
) -> Result<Vec<Family>, ApiError> {
    let queues: Vec<Queue> = all_pages(client, "/work_queues/filter", |q: &Queue| &q.id, deadline)?;
    let queues: Vec<WorkQueueSeries> = queues
        .into_iter()
        .map(|q| queue_series(q, late_by_queue))
        .collect();
    Ok(families(&queues))
}

fn families(queues: &[WorkQueueSeries]) -> Vec<Family> {
    const QUEUE: &[&str] = &["work_pool", "work_queue"];
    let mut info = Family::gauge(
        "prefect_work_queue_info",
        "One series per work queue; always 1.",
        &["work_pool", "work_queue", "status", "paused", "priority"],
    );
    let mut last_polled = Family::gauge(
        "prefect_work_queue_last_polled_timestamp_seconds",
        "Unix time of the last poll of the work queue by a worker (absent: never polled).",
        QUEUE,
    );
    let mut late = Family::gauge(
        "prefect_work_queue_late_flow_runs",
        "Flow runs of the work queue in the state Late.",
        QUEUE,
    );
    let mut limit = Family::gauge(
        "prefect_work_queue_concurrency_limit",
        "Concurrency limit of the work queue (absent: no limit).",
        QUEUE,
    );
    let mut slots = Family::gauge(
        "prefect_work_queue_active_slots",
        "Slots of the work queue's limit in use (Prefect 3.6.23 and later, limited queues).",
        QUEUE,
    );
    for q in queues {
        let priority = q.priority.map(|p| p.to_string()).unwrap_or_default();
        let paused = bool_label(q.paused);
        info.set(&[&q.work_pool, &q.name, &q.status, paused, &priority], 1.0);
        let labels = [q.work_pool.as_str(), q.name.as_str()];
        if let Some(t) = q.last_polled {
            last_polled.set(&labels, t);
        }
        late.set(&labels, q.late_runs as f64);
        if let Some(l) = q.concurrency_limit {
            limit.set(&labels, l as f64);
        }
        if let Some(a) = q.active_slots {
            slots.set(&labels, a as f64);
        }
    }
    vec![
        Family::single(
            "prefect_work_queues",
            "Work queues known to Prefect.",
            queues.len() as f64,
        ),
        info,
        last_polled,
        late,
        limit,
        slots,
    ]
}

fn queue_series(q: Queue, late_by_queue: &HashMap<String, u64>) -> WorkQueueSeries {
    let last_polled = q.last_polled.as_deref().and_then(|t| {
        let parsed = rfc3339::parse(t);
        if parsed.is_none() {
            log::debug!("work queue {}: unreadable last_polled {t:?}", q.name);
        }
        parsed
    });
    WorkQueueSeries {
        work_pool: q.work_pool_name.unwrap_or_default(),
        late_runs: late_by_queue.get(&q.id).copied().unwrap_or(0),
        name: q.name,
        status: q.status.unwrap_or_default(),
        paused: q.is_paused,
        priority: q.priority,
        last_polled,
        concurrency_limit: q.concurrency_limit,
        active_slots: q.active_slots,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded() -> Vec<Queue> {
        let v: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/work_queues_filter.json"))
                .unwrap();
        serde_json::from_value(v["response"].clone()).unwrap()
    }

    #[test]
    fn recorded_queues_give_status_poll_limit_slots_and_late_runs() {
        let late = HashMap::from([("9d5ce0cf-0900-4420-8b28-444e01d3fcef".to_string(), 2)]);
        let q: Vec<WorkQueueSeries> = recorded()
            .into_iter()
            .map(|q| queue_series(q, &late))
            .collect();
        assert_eq!(q.len(), 3);
        let by_name = |n: &str| q.iter().find(|s| s.name == n).unwrap();
        let default = by_name("default");
        assert_eq!(default.work_pool, "pool-ops");
        assert_eq!(default.status, "READY");
        assert_eq!(
            default.last_polled,
            rfc3339::parse("2026-12-01T06:17:31.279727Z")
        );
        assert_eq!(default.concurrency_limit, None);
        assert_eq!(default.active_slots, None);
        assert_eq!(default.late_runs, 0);
        assert_eq!(default.priority, Some(1));
        let limited = by_name("ops-limited");
        assert_eq!(limited.concurrency_limit, Some(3));
        assert_eq!(limited.active_slots, Some(4));
        assert_eq!(limited.late_runs, 2);
        assert_eq!(limited.last_polled, None, "never polled");
        assert_eq!(limited.priority, Some(5));
        let paused = by_name("ops-paused");
        assert!(paused.paused);
        assert_eq!(paused.status, "NOT_READY");
    }

    #[test]
    fn an_older_server_without_active_slots_or_status_still_parses() {
        let q: Vec<Queue> = serde_json::from_str(
            r#"[{"id":"q1","name":"default","is_paused":false,"concurrency_limit":null,
                 "priority":1,"work_pool_id":"p","filter":null,"last_polled":null}]"#,
        )
        .unwrap();
        let s = queue_series(q.into_iter().next().unwrap(), &HashMap::new());
        assert_eq!(s.active_slots, None);
        assert_eq!(s.work_pool, "");
        assert_eq!(s.status, "");
    }
}
