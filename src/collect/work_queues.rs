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
    Ok(families(&queues, late_by_queue))
}

/// Absent fields (an older server: no `active_slots`, no `status`) leave their
/// series out or their label empty, never an error.
fn families(queues: &[Queue], late_by_queue: &HashMap<String, u64>) -> Vec<Family> {
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
        let pool = q.work_pool_name.as_deref().unwrap_or_default();
        let status = q.status.as_deref().unwrap_or_default();
        let paused = bool_label(q.is_paused);
        info.set(&[pool, &q.name, status, paused, &priority], 1.0);
        let labels = [pool, q.name.as_str()];
        if let Some(t) = polled(q) {
            last_polled.set(&labels, t);
        }
        let n = late_by_queue.get(&q.id).copied().unwrap_or(0);
        late.set(&labels, n as f64);
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

/// Unix time of the last poll by a worker; `None` when never polled.
fn polled(q: &Queue) -> Option<f64> {
    let t = q.last_polled.as_deref()?;
    let parsed = rfc3339::parse(t);
    if parsed.is_none() {
        log::debug!("work queue {}: unreadable last_polled {t:?}", q.name);
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::family::{len, value};

    fn recorded() -> Vec<Queue> {
        let v: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/work_queues_filter.json"))
                .unwrap();
        serde_json::from_value(v["response"].clone()).unwrap()
    }

    #[test]
    fn recorded_queues_give_status_poll_limit_slots_and_late_runs() {
        let late = HashMap::from([("9d5ce0cf-0900-4420-8b28-444e01d3fcef".to_string(), 2)]);
        let f = families(&recorded(), &late);
        assert_eq!(value(&f, "prefect_work_queues", &[]), Some(3.0));
        assert_eq!(len(&f, "prefect_work_queue_info"), 3);
        let get = |name: &str, queue: &str| value(&f, name, &["pool-ops", queue]);
        let info = |queue: &str, status: &str, paused: &str, priority: &str| {
            let l = ["pool-ops", queue, status, paused, priority];
            value(&f, "prefect_work_queue_info", &l)
        };
        assert_eq!(info("default", "READY", "false", "1"), Some(1.0));
        assert_eq!(
            get(
                "prefect_work_queue_last_polled_timestamp_seconds",
                "default"
            ),
            rfc3339::parse("2026-12-01T06:17:31.279727Z")
        );
        assert_eq!(get("prefect_work_queue_concurrency_limit", "default"), None);
        assert_eq!(get("prefect_work_queue_active_slots", "default"), None);
        assert_eq!(
            get("prefect_work_queue_late_flow_runs", "default"),
            Some(0.0)
        );
        assert_eq!(
            get("prefect_work_queue_concurrency_limit", "ops-limited"),
            Some(3.0)
        );
        assert_eq!(
            get("prefect_work_queue_active_slots", "ops-limited"),
            Some(4.0)
        );
        assert_eq!(
            get("prefect_work_queue_late_flow_runs", "ops-limited"),
            Some(2.0)
        );
        assert_eq!(
            get(
                "prefect_work_queue_last_polled_timestamp_seconds",
                "ops-limited"
            ),
            None,
            "never polled"
        );
        assert_eq!(info("ops-limited", "NOT_READY", "false", "5"), Some(1.0));
        assert_eq!(info("ops-paused", "NOT_READY", "true", "2"), Some(1.0));
    }

    #[test]
    fn an_older_server_without_active_slots_or_status_still_parses() {
        let q: Vec<Queue> = serde_json::from_str(
            r#"[{"id":"q1","name":"default","is_paused":false,"concurrency_limit":null,
                 "priority":1,"work_pool_id":"p","filter":null,"last_polled":null}]"#,
        )
        .unwrap();
        let f = families(&q, &HashMap::new());
        assert_eq!(len(&f, "prefect_work_queue_active_slots"), 0);
        let info = ["", "default", "", "false", "1"];
        assert_eq!(value(&f, "prefect_work_queue_info", &info), Some(1.0));
    }
}
