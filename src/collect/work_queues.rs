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

use super::listing::all_pages;
use crate::prefect::{ApiError, Client};
use crate::rfc3339;
use crate::snapshot::{WorkQueueSeries, WorkQueuesPart};

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
) -> Result<WorkQueuesPart, ApiError> {
    let queues: Vec<Queue> = all_pages(client, "/work_queues/filter", |q: &Queue| &q.id, deadline)?;
    Ok(WorkQueuesPart {
        queues: queues
            .into_iter()
            .map(|q| queue_series(q, late_by_queue))
            .collect(),
    })
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
