//! The seeding REST `Api`: flows, deployments, work pools and runs created over
//! Prefect's REST API, the standard data set (`seed_standard`) and what the
//! exporter must then show (`Expected`).

use super::*;

// ---------------------------------------------------------------------------
// Api: a REST client for seeding
// ---------------------------------------------------------------------------

/// Minimal standard base64 (for HTTP basic auth).
pub fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A REST client for one Prefect API base URL (`.../api`). Every body is sent as
/// `Content-Type: application/json`. Use one writer per server (SQLite).
pub struct Api {
    base: String,
    auth: Option<String>,
    agent: ureq::Agent,
    /// (client id, token) once a CSRF-protected server asked for one.
    csrf: Mutex<Option<(String, String)>>,
}

impl Api {
    pub fn new(api_url: &str, auth_string: Option<&str>) -> Api {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            // Prefect drops idle keep-alive connections after 5 s.
            .max_idle_age(Duration::from_secs(2))
            .build()
            .into();
        Api {
            base: api_url.trim_end_matches('/').to_string(),
            auth: auth_string.map(|a| format!("Basic {}", base64(a.as_bytes()))),
            agent,
            csrf: Mutex::new(None),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// One request; `path` is relative to the API base (`/flows/`). Returns the
    /// status and the JSON body (`Value::Null` when empty, a string when not JSON).
    /// Retries transport errors and 503 ("database is locked") a few times; on a
    /// CSRF-protected server it fetches a token (on the first 403) and resends.
    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let (status, value) = self.request_once(method, path, body);
        let csrf_refused = status == 403 && value.to_string().to_lowercase().contains("csrf");
        if csrf_refused && method != "GET" {
            self.fetch_csrf_token();
            return self.request_once(method, path, body);
        }
        (status, value)
    }

    pub(crate) fn fetch_csrf_token(&self) {
        let client = fake_uuid(&format!("{}-{:?}", std::process::id(), Instant::now()));
        let (status, v) = self.request_once("GET", &format!("/csrf-token?client={client}"), None);
        assert_eq!(status, 200, "GET /csrf-token: {v}");
        let token = v["token"]
            .as_str()
            .unwrap_or_else(|| panic!("csrf token: {v}"));
        *self.csrf.lock().unwrap_or_else(|e| e.into_inner()) = Some((client, token.into()));
    }

    pub(crate) fn request_once(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let url = format!("{}{}", self.base, path);
        let csrf = self.csrf.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut last_err = String::new();
        // Transport errors: 6 tries over 1.5 s. 503s (SQLite busy under writes
        // from several tests at once, on a loaded machine): 16 tries over 10 s.
        let mut transport_errors = 0;
        for attempt in 0..16u64 {
            if attempt > 0 {
                thread::sleep(Duration::from_millis((100 * attempt).min(1000)));
            }
            let result = match (method, body) {
                ("GET", _) => self.with_auth_get(self.agent.get(&url)).call(),
                ("DELETE", _) => {
                    let mut b = self.with_auth_get(self.agent.delete(&url));
                    if let Some((client, token)) = &csrf {
                        b = b
                            .header("Prefect-Csrf-Token", token)
                            .header("Prefect-Csrf-Client", client);
                    }
                    b.call()
                }
                (m, b) => {
                    let mut builder = match m {
                        "POST" => self.agent.post(&url),
                        "PATCH" => self.agent.patch(&url),
                        "PUT" => self.agent.put(&url),
                        other => panic!("Api::request: unsupported method {other}"),
                    };
                    if let Some(a) = &self.auth {
                        builder = builder.header("Authorization", a);
                    }
                    if let Some((client, token)) = &csrf {
                        builder = builder
                            .header("Prefect-Csrf-Token", token)
                            .header("Prefect-Csrf-Client", client);
                    }
                    let text = b.map(|v| v.to_string()).unwrap_or_else(|| "{}".into());
                    builder
                        .header("Content-Type", "application/json")
                        .send(text)
                }
            };
            match result {
                Ok(mut resp) => {
                    let status = resp.status().as_u16();
                    let text = resp.body_mut().read_to_string().unwrap_or_default();
                    if status == 503 && attempt < 15 {
                        last_err = format!("503 {text}");
                        continue;
                    }
                    let value = if text.trim().is_empty() {
                        Value::Null
                    } else {
                        serde_json::from_str(&text).unwrap_or(Value::String(text))
                    };
                    return (status, value);
                }
                Err(e) => {
                    last_err = e.to_string();
                    transport_errors += 1;
                    if transport_errors == 6 {
                        break;
                    }
                }
            }
        }
        panic!("{method} {url}: {last_err}");
    }

    pub(crate) fn with_auth_get(
        &self,
        b: ureq::RequestBuilder<ureq::typestate::WithoutBody>,
    ) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        match &self.auth {
            Some(a) => b.header("Authorization", a),
            None => b,
        }
    }

    /// Like [`request`](Self::request) but panics unless the status is 2xx.
    pub fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, value) = self.request(method, path, body);
        assert!(
            (200..300).contains(&status),
            "{method} {}{path} -> {status}: {value}",
            self.base
        );
        value
    }

    pub(crate) fn id_of(v: &Value) -> String {
        v["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no id in {v}"))
            .to_string()
    }

    /// Creates (or finds: upsert) a flow; returns its id.
    pub fn create_flow(&self, name: &str) -> String {
        Self::id_of(&self.ok("POST", "/flows/", Some(&json!({ "name": name }))))
    }

    /// Creates (upsert by flow and name) a deployment; returns its id.
    pub fn create_deployment(&self, flow_id: &str, name: &str, work_pool: Option<&str>) -> String {
        let mut body = json!({ "name": name, "flow_id": flow_id });
        if let Some(pool) = work_pool {
            body["work_pool_name"] = json!(pool);
        }
        Self::id_of(&self.ok("POST", "/deployments/", Some(&body)))
    }

    pub fn delete_deployment(&self, id: &str) {
        self.ok("DELETE", &format!("/deployments/{id}"), None);
    }

    /// Pauses (true) or resumes (false) a deployment.
    pub fn set_deployment_paused(&self, id: &str, paused: bool) {
        self.ok(
            "PATCH",
            &format!("/deployments/{id}"),
            Some(&json!({ "paused": paused })),
        );
    }

    /// Creates a work pool (or returns the existing one's id).
    pub fn create_work_pool(&self, name: &str, pool_type: &str) -> String {
        let (status, v) = self.request(
            "POST",
            "/work_pools/",
            Some(&json!({ "name": name, "type": pool_type })),
        );
        match status {
            200 | 201 => Self::id_of(&v),
            409 => Self::id_of(&self.ok("GET", &format!("/work_pools/{name}"), None)),
            _ => panic!("POST /work_pools/ {name} -> {status}: {v}"),
        }
    }

    /// A worker heartbeat: the worker appears (ONLINE) in the pool.
    pub fn worker_heartbeat(&self, pool: &str, worker: &str) {
        self.ok(
            "POST",
            &format!("/work_pools/{pool}/workers/heartbeat"),
            Some(&json!({ "name": worker, "heartbeat_interval_seconds": 30 })),
        );
    }

    /// Creates a flow run stored in exactly the given state; returns its id.
    pub fn create_flow_run(
        &self,
        flow_id: &str,
        deployment_id: Option<&str>,
        state_type: &str,
        state_name: &str,
    ) -> String {
        let mut body = json!({
            "flow_id": flow_id,
            "state": { "type": state_type, "name": state_name },
        });
        if let Some(d) = deployment_id {
            body["deployment_id"] = json!(d);
        }
        Self::id_of(&self.ok("POST", "/flow_runs/", Some(&body)))
    }

    /// Creates runs of a deployment in bulk (100 per request), one per given
    /// (state_type, state_name); returns their ids in order.
    pub fn create_flow_runs_bulk(
        &self,
        deployment_id: &str,
        states: &[(&str, &str)],
    ) -> Vec<String> {
        let mut ids = Vec::with_capacity(states.len());
        for chunk in states.chunks(100) {
            // A run the server could not write ("database is locked": SQLite
            // busy with another test's writes) is sent again, up to 10 times.
            let mut chunk_ids: Vec<Option<String>> = vec![None; chunk.len()];
            for attempt in 0..10u64 {
                let todo: Vec<usize> = (0..chunk.len())
                    .filter(|i| chunk_ids[*i].is_none())
                    .collect();
                if todo.is_empty() {
                    break;
                }
                if attempt > 0 {
                    thread::sleep(Duration::from_millis(200 * attempt));
                }
                let body: Vec<Value> = todo
                    .iter()
                    .map(|i| json!({ "state": { "type": chunk[*i].0, "name": chunk[*i].1 } }))
                    .collect();
                let v = self.ok(
                    "POST",
                    &format!("/deployments/{deployment_id}/create_flow_run/bulk"),
                    Some(&Value::Array(body)),
                );
                let results = v["results"]
                    .as_array()
                    .unwrap_or_else(|| panic!("bulk: {v}"));
                assert_eq!(results.len(), todo.len(), "bulk create: {v}");
                for (i, r) in todo.iter().zip(results) {
                    if r["status"].as_str() == Some("FAILED") {
                        assert!(
                            r.to_string().contains("database is locked") && attempt < 9,
                            "bulk create: a run failed: {r}"
                        );
                        continue;
                    }
                    let id = r["flow_run_id"]
                        .as_str()
                        .or_else(|| r["id"].as_str())
                        .or_else(|| r["flow_run"]["id"].as_str())
                        .unwrap_or_else(|| panic!("bulk create: no id in {r}"));
                    chunk_ids[*i] = Some(id.to_string());
                }
            }
            ids.extend(
                chunk_ids
                    .into_iter()
                    .map(|id| id.expect("bulk create: a run was never written")),
            );
        }
        ids
    }

    /// Sets a run's state (`force` skips orchestration rules); returns the
    /// orchestration result (`status` ACCEPT/REJECT/...).
    pub fn set_flow_run_state(
        &self,
        id: &str,
        state_type: &str,
        state_name: &str,
        force: bool,
    ) -> Value {
        self.ok(
            "POST",
            &format!("/flow_runs/{id}/set_state"),
            Some(&json!({ "state": { "type": state_type, "name": state_name }, "force": force })),
        )
    }

    pub fn delete_flow_run(&self, id: &str) {
        self.ok("DELETE", &format!("/flow_runs/{id}"), None);
    }

    /// `POST /flow_runs/count` with a filter body: what the server says.
    pub fn count_flow_runs(&self, filter: &Value) -> u64 {
        let v = self.ok("POST", "/flow_runs/count", Some(filter));
        v.as_u64()
            .unwrap_or_else(|| panic!("count: not an integer: {v}"))
    }

    /// Runs whose state name is one of `names`, as counted by the server.
    pub fn count_by_names(&self, names: &[&str]) -> u64 {
        self.count_flow_runs(&json!({ "flow_runs": { "state": { "name": { "any_": names } } } }))
    }

    /// `GET /admin/version` (Prefect's version, e.g. "3.9.1").
    pub fn server_version(&self) -> String {
        self.ok("GET", "/admin/version", None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

// ---------------------------------------------------------------------------
// The standard data set
// ---------------------------------------------------------------------------

/// Every (state_type, state_name) of prefect-api.md's table, in table order.
pub const STATES: &[(&str, &str)] = &[
    ("SCHEDULED", "Scheduled"),
    ("SCHEDULED", "Late"),
    ("SCHEDULED", "AwaitingRetry"),
    ("SCHEDULED", "AwaitingConcurrencySlot"),
    ("PENDING", "Pending"),
    ("PENDING", "Submitting"),
    ("PENDING", "InfrastructurePending"),
    ("RUNNING", "Running"),
    ("RUNNING", "Retrying"),
    ("PAUSED", "Paused"),
    ("PAUSED", "Suspended"),
    ("CANCELLING", "Cancelling"),
    ("CANCELLED", "Cancelled"),
    ("COMPLETED", "Completed"),
    ("COMPLETED", "Cached"),
    ("COMPLETED", "RolledBack"),
    ("FAILED", "Failed"),
    ("FAILED", "TimedOut"),
    ("CRASHED", "Crashed"),
];

pub const SUCCESS_NAMES: &[&str] = &["Completed", "Cached"];

pub const ERROR_NAMES: &[&str] = &["RolledBack", "Failed", "TimedOut", "Crashed", "Suspended"];

pub const WARNING_NAMES: &[&str] = &["Cancelling", "Cancelled", "Paused", "Retrying"];

/// A state name outside the table (counted in the total only).
pub const CUSTOM_STATE: (&str, &str) = ("COMPLETED", "Archived");

/// The standard run counts: the i-th state of [`STATES`] gets i+1 runs (all different,
/// so a name counted in the wrong group changes a sum), plus one run in [`CUSTOM_STATE`].
pub fn standard_counts() -> BTreeMap<(String, String), u64> {
    let mut m: BTreeMap<(String, String), u64> = STATES
        .iter()
        .enumerate()
        .map(|(i, (t, n))| ((t.to_string(), n.to_string()), i as u64 + 1))
        .collect();
    m.insert((CUSTOM_STATE.0.into(), CUSTOM_STATE.1.into()), 1);
    m
}

/// Sum of the counts whose state name is in `names`.
pub fn sum_names(by_state: &BTreeMap<(String, String), u64>, names: &[&str]) -> u64 {
    by_state
        .iter()
        .filter(|((_, n), _)| names.contains(&n.as_str()))
        .map(|(_, c)| c)
        .sum()
}

#[derive(Clone, Debug)]
pub struct SeededRun {
    pub id: String,
    pub flow: String,
    pub deployment: Option<String>,
    pub state_type: String,
    pub state_name: String,
}

#[derive(Clone, Debug)]
pub struct SeededDeployment {
    pub id: String,
    pub name: String,
    pub flow: String,
    pub work_pool: Option<String>,
}

#[derive(Clone, Debug)]
pub struct SeededPool {
    pub name: String,
    pub pool_type: String,
    pub workers: Vec<String>,
}

/// What a seeded server holds, and the values the exporter must show for it.
#[derive(Clone, Debug, Default)]
pub struct Expected {
    pub total: u64,
    pub successes: u64,
    pub errors: u64,
    pub warnings: u64,
    /// Runs per (state_type, state_name).
    pub by_state: BTreeMap<(String, String), u64>,
    /// Flow name -> id.
    pub flows: BTreeMap<String, String>,
    pub deployments: Vec<SeededDeployment>,
    pub work_pools: Vec<SeededPool>,
    pub runs: Vec<SeededRun>,
    /// Work queues, runs in progress and concurrency limits (support/ops.rs).
    pub ops: SeededOps,
}

/// `EXPORTER_CHECK_DEPLOYMENTS` as the exporter reads it: trimmed, blanks and
/// repeats dropped.
pub fn distinct_names<'a>(names: &[&'a str]) -> Vec<&'a str> {
    let mut seen: Vec<&str> = Vec::new();
    for n in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        if !seen.contains(&n) {
            seen.push(n);
        }
    }
    seen
}

impl Expected {
    pub(crate) fn recompute(&mut self) {
        self.by_state.clear();
        for r in &self.runs {
            *self
                .by_state
                .entry((r.state_type.clone(), r.state_name.clone()))
                .or_default() += 1;
        }
        self.total = self.runs.len() as u64;
        self.successes = sum_names(&self.by_state, SUCCESS_NAMES);
        self.errors = sum_names(&self.by_state, ERROR_NAMES);
        self.warnings = sum_names(&self.by_state, WARNING_NAMES);
    }

    /// Records a run created after seeding.
    pub fn add_run(&mut self, run: SeededRun) {
        self.runs.push(run);
        self.recompute();
    }

    /// Records a state change of a seeded run.
    pub fn set_state(&mut self, run_id: &str, state_type: &str, state_name: &str) {
        let run = self
            .runs
            .iter_mut()
            .find(|r| r.id == run_id)
            .unwrap_or_else(|| panic!("no seeded run {run_id}"));
        run.state_type = state_type.into();
        run.state_name = state_name.into();
        self.recompute();
    }

    /// How many of `names` have no deployment (unknown flows count as missing).
    pub fn missing(&self, names: &[&str]) -> u64 {
        distinct_names(names)
            .iter()
            .filter(|n| !self.deployments.iter().any(|d| d.flow == **n))
            .count() as u64
    }

    /// Runs per (state_type, state_name) of one deployment.
    pub fn deployment_runs(&self, deployment: &str) -> BTreeMap<(String, String), u64> {
        let mut m = BTreeMap::new();
        for r in self
            .runs
            .iter()
            .filter(|r| r.deployment.as_deref() == Some(deployment))
        {
            *m.entry((r.state_type.clone(), r.state_name.clone()))
                .or_default() += 1;
        }
        m
    }

    /// The first seeded run in the given state name.
    pub fn run_in(&self, state_name: &str) -> &SeededRun {
        self.runs
            .iter()
            .find(|r| r.state_name == state_name)
            .unwrap_or_else(|| panic!("no seeded run in {state_name}"))
    }

    /// The five seed gauges (without the error counter) for a check list, as
    /// (metric name, value).
    pub fn seed_gauges(&self, check_deployments: &[&str]) -> Vec<(&'static str, f64)> {
        vec![
            ("prefect_flow_runs_total", self.total as f64),
            ("prefect_flow_runs_successes_total", self.successes as f64),
            ("prefect_flow_runs_in_error_total", self.errors as f64),
            ("prefect_flow_runs_in_warning_total", self.warnings as f64),
            (
                "prefect_missing_deployments_total",
                self.missing(check_deployments) as f64,
            ),
        ]
    }
}

/// Seeds the standard data set and checks the server counts it as intended:
/// flows `flow-a` (deployment `a-daily` in work pool `pool-a`, which has worker
/// `worker-1`), `flow-b` (no deployment), `flow-c` (deployment `c-hourly`, no pool);
/// an empty work pool `pool-idle`; runs per [`standard_counts`]: for each state its
/// runs alternate between a-daily and c-hourly, except that the third run of each
/// state (and the custom-state run) belongs to flow-b without a deployment.
pub fn seed_standard(api: &Api) -> Expected {
    let mut exp = Expected::default();
    for f in ["flow-a", "flow-b", "flow-c"] {
        exp.flows.insert(f.into(), api.create_flow(f));
    }
    api.create_work_pool("pool-a", "process");
    api.create_work_pool("pool-idle", "process");
    api.worker_heartbeat("pool-a", "worker-1");
    exp.work_pools = vec![
        SeededPool {
            name: "pool-a".into(),
            pool_type: "process".into(),
            workers: vec!["worker-1".into()],
        },
        SeededPool {
            name: "pool-idle".into(),
            pool_type: "process".into(),
            workers: vec![],
        },
    ];
    let a = SeededDeployment {
        id: api.create_deployment(&exp.flows["flow-a"], "a-daily", Some("pool-a")),
        name: "a-daily".into(),
        flow: "flow-a".into(),
        work_pool: Some("pool-a".into()),
    };
    let c = SeededDeployment {
        id: api.create_deployment(&exp.flows["flow-c"], "c-hourly", None),
        name: "c-hourly".into(),
        flow: "flow-c".into(),
        work_pool: None,
    };

    let mut for_a: Vec<(String, String)> = Vec::new();
    let mut for_c: Vec<(String, String)> = Vec::new();
    let mut for_b: Vec<(String, String)> = Vec::new();
    for ((t, n), count) in standard_counts() {
        if (t.as_str(), n.as_str()) == CUSTOM_STATE {
            for_b.push((t, n));
            continue;
        }
        for j in 0..count {
            let s = (t.clone(), n.clone());
            match j {
                2 => for_b.push(s),
                j if j % 2 == 0 => for_a.push(s),
                _ => for_c.push(s),
            }
        }
    }
    for (dep, states) in [(&a, &for_a), (&c, &for_c)] {
        let refs: Vec<(&str, &str)> = states
            .iter()
            .map(|(t, n)| (t.as_str(), n.as_str()))
            .collect();
        let ids = api.create_flow_runs_bulk(&dep.id, &refs);
        for (id, (t, n)) in ids.into_iter().zip(states) {
            exp.runs.push(SeededRun {
                id,
                flow: dep.flow.clone(),
                deployment: Some(dep.name.clone()),
                state_type: t.clone(),
                state_name: n.clone(),
            });
        }
    }
    for (t, n) in &for_b {
        let id = api.create_flow_run(&exp.flows["flow-b"], None, t, n);
        exp.runs.push(SeededRun {
            id,
            flow: "flow-b".into(),
            deployment: None,
            state_type: t.clone(),
            state_name: n.clone(),
        });
    }
    exp.deployments = vec![a, c];
    exp.recompute();
    assert_eq!(exp.by_state, standard_counts(), "seeding bookkeeping");
    seed_ops(api, &mut exp);
    verify_counts(api, &exp);
    exp
}

/// Asserts that the server counts exactly `exp` (total and per state name), so a
/// later mismatch is the exporter's, not the seeding's.
pub fn verify_counts(api: &Api, exp: &Expected) {
    let total = api.count_flow_runs(&json!({}));
    assert_eq!(total, exp.total, "server total after seeding");
    let mut by_name: BTreeMap<&str, u64> = BTreeMap::new();
    for ((_, n), c) in &exp.by_state {
        *by_name.entry(n.as_str()).or_default() += c;
    }
    for (name, count) in by_name {
        assert_eq!(
            api.count_by_names(&[name]),
            count,
            "server count of state {name}"
        );
    }
}
