//! Seeding for the operator groups (issue 13): a second work pool with three
//! queues (one paused, one limited, one polled as a worker does), late runs in
//! two of them, runs forced into PENDING and RUNNING (their entry times read
//! back from the server), two global concurrency limits (one with slots
//! taken) and one deployment concurrency limit.

use serde_json::{json, Value};

use super::{Api, Expected, SeededDeployment, SeededPool, SeededRun};

pub const OPS_POOL: &str = "pool-ops";
/// (state_type, state_name)
type States = (&'static str, &'static str);
pub const OPS_FLOW: &str = "flow-ops";

#[derive(Clone, Debug, Default)]
pub struct SeededQueue {
    pub pool: String,
    pub name: String,
    pub paused: bool,
    pub concurrency_limit: Option<u64>,
    pub polled: bool,
    /// Late runs in the queue and runs holding a slot (PENDING or RUNNING).
    pub late: u64,
    pub active: u64,
}

/// A global concurrency limit, named as the exporter shows it.
#[derive(Clone, Debug)]
pub struct SeededLimit {
    pub name: String,
    pub limit: u64,
    pub active_slots: u64,
    pub enabled: bool,
}

/// A run forced into PENDING or RUNNING, with the time the server stamped.
#[derive(Clone, Debug)]
pub struct SeededActive {
    pub deployment: String,
    pub flow: String,
    pub state_type: String,
    pub entered: String,
}

#[derive(Clone, Debug, Default)]
pub struct SeededOps {
    pub pool_limit: u64,
    /// The queues of `OPS_POOL` (its default queue included).
    pub queues: Vec<SeededQueue>,
    pub limits: Vec<SeededLimit>,
    pub active: Vec<SeededActive>,
}

impl Api {
    pub fn create_work_pool_with_limit(&self, name: &str, pool_type: &str, limit: u64) {
        self.ok(
            "POST",
            "/work_pools/",
            Some(&json!({ "name": name, "type": pool_type, "concurrency_limit": limit })),
        );
    }

    /// `POST /work_pools/{pool}/queues` (no trailing slash: with one it is a 307).
    pub fn create_work_queue(&self, pool: &str, name: &str, paused: bool, limit: Option<u64>) {
        self.ok(
            "POST",
            &format!("/work_pools/{pool}/queues"),
            Some(&json!({ "name": name, "is_paused": paused, "concurrency_limit": limit })),
        );
    }

    pub fn create_deployment_in_queue(
        &self,
        flow_id: &str,
        name: &str,
        pool: &str,
        queue: &str,
    ) -> String {
        let v = self.ok(
            "POST",
            "/deployments/",
            Some(&json!({
                "name": name, "flow_id": flow_id,
                "work_pool_name": pool, "work_queue_name": queue,
            })),
        );
        v["id"].as_str().expect("deployment id").to_string()
    }

    /// What a worker does: ask the pool for scheduled runs of these queues.
    pub fn poll_work_queues(&self, pool: &str, queues: &[&str]) {
        self.ok(
            "POST",
            &format!("/work_pools/{pool}/get_scheduled_flow_runs"),
            Some(&json!({ "work_queue_names": queues })),
        );
    }

    pub fn create_global_limit(&self, name: &str, limit: u64, active: bool, slots: u64) {
        let v = self.ok(
            "POST",
            "/v2/concurrency_limits/",
            Some(&json!({ "name": name, "limit": limit, "active": active })),
        );
        if slots > 0 {
            let id = v["id"].as_str().expect("limit id");
            self.ok(
                "PATCH",
                &format!("/v2/concurrency_limits/{id}"),
                Some(&json!({ "active_slots": slots })),
            );
        }
    }

    pub fn set_deployment_concurrency_limit(&self, id: &str, limit: u64) {
        self.ok(
            "PATCH",
            &format!("/deployments/{id}"),
            Some(&json!({ "concurrency_limit": limit })),
        );
    }

    /// Forces a run into a state; returns the state's timestamp as stamped.
    pub fn force_state(&self, run_id: &str, state_type: &str, state_name: &str) -> String {
        let r: Value = self.set_flow_run_state(run_id, state_type, state_name, true);
        assert_eq!(r["status"], "ACCEPT", "forced {state_name}: {r}");
        r["state"]["timestamp"]
            .as_str()
            .unwrap_or_else(|| panic!("no state timestamp: {r}"))
            .to_string()
    }
}

/// Seeds the operator data set on top of the standard one and records it in
/// `exp` (flows, deployments, pools and runs too, so the counts stay exact).
pub fn seed_ops(api: &Api, exp: &mut Expected) {
    let flow = api.create_flow(OPS_FLOW);
    exp.flows.insert(OPS_FLOW.into(), flow.clone());
    let pool_limit = 10;
    api.create_work_pool_with_limit(OPS_POOL, "process", pool_limit);
    api.create_work_queue(OPS_POOL, "ops-paused", true, None);
    api.create_work_queue(OPS_POOL, "ops-limited", false, Some(3));
    exp.work_pools.push(SeededPool {
        name: OPS_POOL.into(),
        pool_type: "process".into(),
        workers: vec![],
    });

    // ops-etl (queue ops-limited): 2 late, 1 pending, 1 running, 1 completed,
    // and a deployment concurrency limit of 2. ops-report (the default queue,
    // polled): 3 late, 1 completed.
    let plan: [(&str, &str, &[States]); 2] = [
        (
            "ops-etl",
            "ops-limited",
            &[
                ("COMPLETED", "Completed"),
                ("SCHEDULED", "Late"),
                ("SCHEDULED", "Late"),
                ("SCHEDULED", "Scheduled"),
                ("SCHEDULED", "Scheduled"),
            ],
        ),
        (
            "ops-report",
            "default",
            &[
                ("COMPLETED", "Completed"),
                ("SCHEDULED", "Late"),
                ("SCHEDULED", "Late"),
                ("SCHEDULED", "Late"),
            ],
        ),
    ];
    let mut ops = SeededOps {
        pool_limit,
        ..SeededOps::default()
    };
    for (name, queue, states) in plan {
        let id = api.create_deployment_in_queue(&flow, name, OPS_POOL, queue);
        let ids = api.create_flow_runs_bulk(&id, states);
        for (run, (t, n)) in ids.iter().zip(states) {
            exp.runs.push(SeededRun {
                id: run.clone(),
                flow: OPS_FLOW.into(),
                deployment: Some(name.into()),
                state_type: t.to_string(),
                state_name: n.to_string(),
            });
        }
        exp.deployments.push(SeededDeployment {
            id: id.clone(),
            name: name.into(),
            flow: OPS_FLOW.into(),
            work_pool: Some(OPS_POOL.into()),
        });
        if name == "ops-etl" {
            api.set_deployment_concurrency_limit(&id, 2);
            ops.limits.push(SeededLimit {
                name: format!("{OPS_FLOW}/{name}"),
                limit: 2,
                active_slots: 0,
                enabled: true,
            });
            // The two Scheduled runs: forced into PENDING, then RUNNING.
            for (run, (t, n)) in ids[3..]
                .iter()
                .zip([("PENDING", "Pending"), ("RUNNING", "Running")])
            {
                let entered = api.force_state(run, t, n);
                exp.set_state(run, t, n);
                ops.active.push(SeededActive {
                    deployment: name.into(),
                    flow: OPS_FLOW.into(),
                    state_type: t.into(),
                    entered,
                });
            }
        }
    }
    api.poll_work_queues(OPS_POOL, &["default"]);
    ops.queues = vec![
        SeededQueue {
            pool: OPS_POOL.into(),
            name: "default".into(),
            polled: true,
            late: 3,
            ..SeededQueue::default()
        },
        SeededQueue {
            pool: OPS_POOL.into(),
            name: "ops-limited".into(),
            concurrency_limit: Some(3),
            late: 2,
            active: 2,
            ..SeededQueue::default()
        },
        SeededQueue {
            pool: OPS_POOL.into(),
            name: "ops-paused".into(),
            paused: true,
            ..SeededQueue::default()
        },
    ];
    api.create_global_limit("ops-db", 4, true, 4);
    api.create_global_limit("ops-api", 10, false, 0);
    ops.limits.push(SeededLimit {
        name: "ops-db".into(),
        limit: 4,
        active_slots: 4,
        enabled: true,
    });
    ops.limits.push(SeededLimit {
        name: "ops-api".into(),
        limit: 10,
        active_slots: 0,
        enabled: false,
    });
    exp.ops = ops;
    exp.recompute();
}
