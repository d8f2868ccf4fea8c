//! The series of the operator groups (issue 13): late-run summary, work
//! queues, runs in progress, concurrency limits, and the work pools' limits.
//! Like the other breakdowns, each is a vector that appears with its group's
//! first success and is replaced whole by each success of the group.

use prometheus::{GaugeVec, IntGaugeVec, Opts, Registry};

use super::{bool_label, clamp, register};
use crate::snapshot::{
    ActiveRunsPart, ConcurrencyLimitSeries, LateRunsSummary, WorkPoolsPart, WorkQueuesPart,
};

pub(super) struct OpsSeries {
    late_total: IntGaugeVec,
    late_listed: IntGaugeVec,
    late_capped: IntGaugeVec,
    work_queues: IntGaugeVec,
    queue_info: IntGaugeVec,
    queue_last_polled: GaugeVec,
    queue_late: IntGaugeVec,
    queue_limit: IntGaugeVec,
    queue_slots: IntGaugeVec,
    active: IntGaugeVec,
    active_oldest: GaugeVec,
    active_listed: IntGaugeVec,
    active_capped: IntGaugeVec,
    limit_slots: IntGaugeVec,
    limit_active: IntGaugeVec,
    limit_enabled: IntGaugeVec,
    pool_limit: IntGaugeVec,
    pool_slots: IntGaugeVec,
}

const QUEUE: &[&str] = &["work_pool", "work_queue"];
const ACTIVE: &[&str] = &["deployment", "flow", "state_type"];

impl OpsSeries {
    pub(super) fn new(registry: &Registry) -> OpsSeries {
        let int = |name: &str, help: &str, labels: &[&str]| {
            let v =
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            register(registry, &v);
            v
        };
        let float = |name: &str, help: &str, labels: &[&str]| {
            let v = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            register(registry, &v);
            v
        };
        OpsSeries {
            late_total: int(
                "prefect_late_flow_runs",
                "Flow runs in the state Late, from one count: exact whatever the listing cap.",
                &[],
            ),
            late_listed: int(
                "prefect_late_flow_runs_listed",
                "Late flow runs listed and counted per deployment and per work queue.",
                &[],
            ),
            late_capped: int(
                "prefect_late_flow_runs_capped",
                "1 when EXPORTER_MAX_LISTED_RUNS stopped the late-run listing: the per-deployment \
                 and per-queue late counts then cover only the listed runs.",
                &[],
            ),
            work_queues: int("prefect_work_queues", "Work queues known to Prefect.", &[]),
            queue_info: int(
                "prefect_work_queue_info",
                "One series per work queue; always 1.",
                &["work_pool", "work_queue", "status", "paused", "priority"],
            ),
            queue_last_polled: float(
                "prefect_work_queue_last_polled_timestamp_seconds",
                "Unix time of the last poll of the work queue by a worker (absent: never polled).",
                QUEUE,
            ),
            queue_late: int(
                "prefect_work_queue_late_flow_runs",
                "Flow runs of the work queue in the state Late.",
                QUEUE,
            ),
            queue_limit: int(
                "prefect_work_queue_concurrency_limit",
                "Concurrency limit of the work queue (absent: no limit).",
                QUEUE,
            ),
            queue_slots: int(
                "prefect_work_queue_active_slots",
                "Slots of the work queue's limit in use (Prefect 3.6.23 and later, limited queues).",
                QUEUE,
            ),
            active: int(
                "prefect_deployment_active_flow_runs",
                "Flow runs of the deployment in progress, per state type (PENDING, RUNNING).",
                ACTIVE,
            ),
            active_oldest: float(
                "prefect_deployment_oldest_active_flow_run_timestamp_seconds",
                "Unix time at which the longest-waiting run still in this state type entered it \
                 (RUNNING: its start; PENDING: its Pending state's time).",
                ACTIVE,
            ),
            active_listed: int(
                "prefect_active_flow_runs_listed",
                "Flow runs in PENDING or RUNNING listed in the last collection.",
                &[],
            ),
            active_capped: int(
                "prefect_active_flow_runs_capped",
                "1 when EXPORTER_MAX_LISTED_RUNS stopped the listing of runs in progress.",
                &[],
            ),
            limit_slots: int(
                "prefect_concurrency_limit_slots",
                "Slots of the global concurrency limit (deployment limits named flow/deployment).",
                &["name"],
            ),
            limit_active: int(
                "prefect_concurrency_limit_active_slots",
                "Slots of the global concurrency limit in use.",
                &["name"],
            ),
            limit_enabled: int(
                "prefect_concurrency_limit_enabled",
                "1 when the global concurrency limit is active, else 0.",
                &["name"],
            ),
            pool_limit: int(
                "prefect_work_pool_concurrency_limit",
                "Concurrency limit of the work pool (absent: no limit).",
                &["work_pool"],
            ),
            pool_slots: int(
                "prefect_work_pool_active_slots",
                "Flow runs of the work pool holding a slot, as Prefect reports it.",
                &["work_pool"],
            ),
        }
    }

    /// Applies the groups that succeeded; the others keep their last values.
    pub(super) fn apply(&self, parts: &crate::snapshot::OpsParts) {
        if let Some(s) = &parts.late_runs {
            self.apply_late(s);
        }
        if let Some(p) = &parts.work_queues {
            self.apply_work_queues(p);
        }
        if let Some(p) = &parts.active_flow_runs {
            self.apply_active(p);
        }
        if let Some(l) = &parts.concurrency_limits {
            self.apply_limits(l);
        }
    }

    pub(super) fn apply_late(&self, s: &LateRunsSummary) {
        let none: &[&str] = &[];
        self.late_total.with_label_values(none).set(clamp(s.total));
        self.late_listed
            .with_label_values(none)
            .set(clamp(s.listed));
        self.late_capped
            .with_label_values(none)
            .set(i64::from(s.capped));
    }

    pub(super) fn apply_work_queues(&self, part: &WorkQueuesPart) {
        let none: &[&str] = &[];
        self.work_queues
            .with_label_values(none)
            .set(clamp(part.queues.len() as u64));
        for v in [
            &self.queue_info,
            &self.queue_late,
            &self.queue_limit,
            &self.queue_slots,
        ] {
            v.reset();
        }
        self.queue_last_polled.reset();
        for q in &part.queues {
            let priority = q.priority.map(|p| p.to_string()).unwrap_or_default();
            self.queue_info
                .with_label_values(&[
                    &q.work_pool,
                    &q.name,
                    &q.status,
                    bool_label(q.paused),
                    &priority,
                ])
                .set(1);
            let labels = [q.work_pool.as_str(), q.name.as_str()];
            if let Some(t) = q.last_polled {
                self.queue_last_polled.with_label_values(&labels).set(t);
            }
            self.queue_late
                .with_label_values(&labels)
                .set(clamp(q.late_runs));
            if let Some(l) = q.concurrency_limit {
                self.queue_limit.with_label_values(&labels).set(clamp(l));
            }
            if let Some(a) = q.active_slots {
                self.queue_slots.with_label_values(&labels).set(clamp(a));
            }
        }
    }

    pub(super) fn apply_active(&self, part: &ActiveRunsPart) {
        let none: &[&str] = &[];
        self.active.reset();
        self.active_oldest.reset();
        for i in &part.items {
            let labels = [i.deployment.as_str(), i.flow.as_str(), i.state_type];
            self.active.with_label_values(&labels).set(clamp(i.count));
            if let Some(t) = i.oldest {
                self.active_oldest.with_label_values(&labels).set(t);
            }
        }
        self.active_listed
            .with_label_values(none)
            .set(clamp(part.listed));
        self.active_capped
            .with_label_values(none)
            .set(i64::from(part.capped));
    }

    pub(super) fn apply_limits(&self, limits: &[ConcurrencyLimitSeries]) {
        self.limit_slots.reset();
        self.limit_active.reset();
        self.limit_enabled.reset();
        for l in limits {
            let labels = [l.name.as_str()];
            self.limit_slots
                .with_label_values(&labels)
                .set(clamp(l.limit));
            self.limit_active
                .with_label_values(&labels)
                .set(clamp(l.active_slots));
            self.limit_enabled
                .with_label_values(&labels)
                .set(i64::from(l.enabled));
        }
    }

    /// Part of the work pools group: from the pool listing it already reads.
    pub(super) fn apply_pool_limits(&self, part: &WorkPoolsPart) {
        self.pool_limit.reset();
        self.pool_slots.reset();
        for p in &part.pools {
            if let Some(l) = p.concurrency_limit {
                self.pool_limit.with_label_values(&[&p.name]).set(clamp(l));
            }
            if let Some(a) = p.active_slots {
                self.pool_slots.with_label_values(&[&p.name]).set(clamp(a));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::{Duration, SystemTime};

    use crate::metrics::Metrics;
    use crate::snapshot::*;

    fn snap(ops: OpsParts, failed: &[&'static str]) -> Snapshot {
        Snapshot {
            seed: None,
            flow_runs: None,
            flow_runs_age: None,
            deployments: None,
            work_pools: None,
            ops,
            state_changes: None,
            server_version: None,
            groups: failed
                .iter()
                .map(|g| GroupOutcome {
                    name: g,
                    duration: Duration::ZERO,
                    error: Some("HTTP 500".into()),
                })
                .collect(),
            requests: vec![],
            duration: Duration::ZERO,
            finished: SystemTime::now(),
        }
    }

    fn metrics(m: &Metrics) -> HashMap<String, f64> {
        String::from_utf8(m.rendered().to_vec())
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    fn full() -> OpsParts {
        OpsParts {
            late_runs: Some(LateRunsSummary {
                total: 1500,
                listed: 1000,
                capped: true,
            }),
            work_queues: Some(WorkQueuesPart {
                queues: vec![WorkQueueSeries {
                    work_pool: "pool-ops".into(),
                    name: "ops-limited".into(),
                    status: "NOT_READY".into(),
                    paused: false,
                    priority: Some(5),
                    last_polled: None,
                    late_runs: 2,
                    concurrency_limit: Some(3),
                    active_slots: None,
                }],
            }),
            active_flow_runs: Some(ActiveRunsPart {
                items: vec![
                    ActiveRunsSeries {
                        deployment: "etl".into(),
                        flow: "f".into(),
                        state_type: "PENDING",
                        count: 0,
                        oldest: None,
                    },
                    ActiveRunsSeries {
                        deployment: "etl".into(),
                        flow: "f".into(),
                        state_type: "RUNNING",
                        count: 2,
                        oldest: Some(1_700_000_000.25),
                    },
                ],
                listed: 2,
                capped: false,
            }),
            concurrency_limits: Some(vec![ConcurrencyLimitSeries {
                name: "f/etl".into(),
                limit: 2,
                active_slots: 1,
                enabled: true,
            }]),
        }
    }

    #[test]
    fn ops_series_show_what_was_read_and_keep_it_when_a_group_fails() {
        let m = Metrics::new();
        let before = metrics(&m);
        assert!(!before.keys().any(|k| k.starts_with("prefect_work_queue")));
        assert!(!before.contains_key("prefect_late_flow_runs"));
        m.update(&snap(full(), &[]));
        let t = metrics(&m);
        let q = "{work_pool=\"pool-ops\",work_queue=\"ops-limited\"}";
        assert_eq!(t["prefect_late_flow_runs"], 1500.0);
        assert_eq!(t["prefect_late_flow_runs_listed"], 1000.0);
        assert_eq!(t["prefect_late_flow_runs_capped"], 1.0);
        assert_eq!(t["prefect_work_queues"], 1.0);
        assert_eq!(
            t["prefect_work_queue_info{paused=\"false\",priority=\"5\",status=\"NOT_READY\",work_pool=\"pool-ops\",work_queue=\"ops-limited\"}"],
            1.0
        );
        assert_eq!(t[&format!("prefect_work_queue_late_flow_runs{q}")], 2.0);
        assert_eq!(t[&format!("prefect_work_queue_concurrency_limit{q}")], 3.0);
        assert!(!t.contains_key(&format!("prefect_work_queue_active_slots{q}")));
        assert!(!t.contains_key(&format!(
            "prefect_work_queue_last_polled_timestamp_seconds{q}"
        )));
        let a = |st: &str| format!("{{deployment=\"etl\",flow=\"f\",state_type=\"{st}\"}}");
        assert_eq!(
            t[&format!("prefect_deployment_active_flow_runs{}", a("PENDING"))],
            0.0
        );
        assert_eq!(
            t[&format!("prefect_deployment_active_flow_runs{}", a("RUNNING"))],
            2.0
        );
        assert_eq!(
            t[&format!(
                "prefect_deployment_oldest_active_flow_run_timestamp_seconds{}",
                a("RUNNING")
            )],
            1_700_000_000.25
        );
        assert!(!t.contains_key(&format!(
            "prefect_deployment_oldest_active_flow_run_timestamp_seconds{}",
            a("PENDING")
        )));
        assert_eq!(t["prefect_active_flow_runs_capped"], 0.0);
        assert_eq!(t["prefect_concurrency_limit_slots{name=\"f/etl\"}"], 2.0);
        assert_eq!(
            t["prefect_concurrency_limit_active_slots{name=\"f/etl\"}"],
            1.0
        );
        assert_eq!(t["prefect_concurrency_limit_enabled{name=\"f/etl\"}"], 1.0);

        // Every group fails: the series keep their values.
        m.update(&snap(
            OpsParts::default(),
            &["work_queues", "active_flow_runs", "concurrency_limits"],
        ));
        let kept = metrics(&m);
        for (k, v) in &t {
            if k.starts_with("prefect_work_queue") || k.starts_with("prefect_concurrency") {
                assert_eq!(kept.get(k), Some(v), "{k}");
            }
        }
        // A success with nothing in it empties the series.
        m.update(&snap(
            OpsParts {
                work_queues: Some(WorkQueuesPart::default()),
                concurrency_limits: Some(vec![]),
                ..OpsParts::default()
            },
            &[],
        ));
        let t = metrics(&m);
        assert_eq!(t["prefect_work_queues"], 0.0);
        assert!(!t.keys().any(|k| k.starts_with("prefect_work_queue_")));
        assert!(!t.keys().any(|k| k.starts_with("prefect_concurrency_limit")));
    }
}
