//! The stub Prefect API: a programmable HTTP/1.1 server for what a real Prefect
//! cannot do (500s, garbage bodies, hangs); it records every request it sees.

use super::*;

// ---------------------------------------------------------------------------
// Stub: a programmable HTTP/1.1 server
// ---------------------------------------------------------------------------

/// A request as the stub saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// Path with the query string, as sent (`/api/flow_runs/count`).
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (`Value::Null` when empty or not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The path below `/api`, without query string and trailing slash (`/flow_runs/count`).
    pub fn api_path(&self) -> &str {
        let p = self.path.split('?').next().unwrap_or_default();
        let p = p.strip_prefix("/api").unwrap_or(p);
        if p.len() > 1 {
            p.trim_end_matches('/')
        } else {
            p
        }
    }
}

#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(status: u16, v: &Value) -> Response {
        Response::raw(status, "application/json", v.to_string())
    }

    pub fn raw(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: body.into(),
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.into(), value.into()));
        self
    }
}

pub type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// How the stub answers, changeable at any time with [`Stub::set_mode`].
#[derive(Clone)]
pub enum Mode {
    /// Plausible Prefect answers computed from the data (see [`StubData::answer`]).
    Good(StubData),
    /// Any answer you like.
    Handler(Handler),
    /// Every request gets this status with `{"detail":"stub error"}`.
    Status(u16),
    /// 200, `Content-Type: application/json`, a body that is not JSON.
    Garbage,
    /// Reads the request and never answers (until the mode changes or the stub is
    /// dropped; then the connection is closed without an answer).
    Hang,
}

/// The data behind [`Mode::Good`].
#[derive(Clone, Debug)]
pub struct StubData {
    /// Runs per (state_type, state_name).
    pub counts: BTreeMap<(String, String), u64>,
    /// Flows that have at least one deployment.
    pub flows_with_deployments: Vec<String>,
    pub version: String,
}

impl StubData {
    /// The standard counts ([`standard_counts`]); flow-a and flow-c have deployments.
    pub fn standard() -> StubData {
        StubData {
            counts: standard_counts(),
            flows_with_deployments: vec!["flow-a".into(), "flow-c".into()],
            version: "3.9.1".into(),
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }
    pub fn successes(&self) -> u64 {
        sum_names(&self.counts, SUCCESS_NAMES)
    }
    pub fn errors(&self) -> u64 {
        sum_names(&self.counts, ERROR_NAMES)
    }
    pub fn warnings(&self) -> u64 {
        sum_names(&self.counts, WARNING_NAMES)
    }
    pub fn missing(&self, names: &[&str]) -> u64 {
        distinct_names(names)
            .iter()
            .filter(|n| !self.flows_with_deployments.iter().any(|f| f == *n))
            .count() as u64
    }

    /// Adds runs in a state.
    pub fn add(&mut self, state_type: &str, state_name: &str, n: u64) {
        *self
            .counts
            .entry((state_type.into(), state_name.into()))
            .or_default() += n;
    }

    /// The five seed gauges for a check list, as (metric name, value).
    pub fn seed_gauges(&self, check_deployments: &[&str]) -> Vec<(&'static str, f64)> {
        vec![
            ("prefect_flow_runs_total", self.total() as f64),
            ("prefect_flow_runs_successes_total", self.successes() as f64),
            ("prefect_flow_runs_in_error_total", self.errors() as f64),
            ("prefect_flow_runs_in_warning_total", self.warnings() as f64),
            (
                "prefect_missing_deployments_total",
                self.missing(check_deployments) as f64,
            ),
        ]
    }

    /// - `POST /flow_runs/count`: the sum of the counts matching the body's
    ///   `flow_runs.state.name.any_` and/or `flow_runs.state.type.any_` (ANDed;
    ///   other filter keys are ignored);
    /// - `POST /flows/filter`: the asked flows (`flows.name.any_`) that have a
    ///   deployment, honouring `offset`/`limit` (limit > 200 is a 422 like Prefect);
    /// - `POST /flow_runs/history`: one bucket with every (type, name) count;
    /// - `POST /{flows,deployments,work_pools}/count`: 0; other `POST .../filter`: [];
    /// - `GET /admin/version`: the version; `GET /health`: true; `GET /version`: "0.8.4";
    ///   `GET /csrf-token`: 422 "CSRF protection is disabled.";
    /// - anything else: 404 `{"detail":"Not Found"}`.
    pub fn answer(&self, req: &Request) -> Response {
        let body = req.json();
        let path = req.api_path();
        match (req.method.as_str(), path) {
            ("POST", "/flow_runs/count") => {
                let names = string_list(&body["flow_runs"]["state"]["name"]["any_"]);
                let types = string_list(&body["flow_runs"]["state"]["type"]["any_"]);
                let n: u64 = self
                    .counts
                    .iter()
                    .filter(|((t, n), _)| {
                        names.as_ref().is_none_or(|l| l.contains(n))
                            && types.as_ref().is_none_or(|l| l.contains(t))
                    })
                    .map(|(_, c)| c)
                    .sum();
                Response::json(200, &json!(n))
            }
            ("POST", "/flows/filter") => {
                let limit = body["limit"].as_u64().unwrap_or(200);
                if limit > 200 {
                    return Response::json(
                        422,
                        &json!({"detail": "Invalid limit: must be less than or equal to 200."}),
                    );
                }
                let offset = body["offset"].as_u64().unwrap_or(0) as usize;
                let asked = string_list(&body["flows"]["name"]["any_"]);
                let found: Vec<Value> = self
                    .flows_with_deployments
                    .iter()
                    .filter(|f| asked.as_ref().is_none_or(|l| l.contains(*f)))
                    .skip(offset)
                    .take(limit as usize)
                    .map(|f| json!({ "id": fake_uuid(f), "name": f, "tags": [], "labels": {} }))
                    .collect();
                Response::json(200, &Value::Array(found))
            }
            ("POST", "/flow_runs/history") => {
                let states: Vec<Value> = self
                    .counts
                    .iter()
                    .map(|((t, n), c)| {
                        json!({ "state_type": t, "state_name": n, "count_runs": c,
                                "sum_estimated_run_time": 0.0, "sum_estimated_lateness": 0.0 })
                    })
                    .collect();
                Response::json(
                    200,
                    &json!([{
                        "interval_start": body["history_start"],
                        "interval_end": body["history_end"],
                        "states": states,
                    }]),
                )
            }
            ("POST", p) if p.ends_with("/count") => Response::json(200, &json!(0)),
            ("POST", p) if p.ends_with("/filter") => Response::json(200, &json!([])),
            ("GET", "/admin/version") => Response::json(200, &json!(self.version)),
            ("GET", "/health") => Response::json(200, &json!(true)),
            ("GET", "/version") => Response::json(200, &json!("0.8.4")),
            ("GET", "/csrf-token") => {
                Response::json(422, &json!({ "detail": "CSRF protection is disabled." }))
            }
            _ => Response::json(404, &json!({ "detail": "Not Found" })),
        }
    }
}

pub(crate) fn string_list(v: &Value) -> Option<Vec<String>> {
    v.as_array().map(|a| {
        a.iter()
            .filter_map(|s| s.as_str().map(String::from))
            .collect()
    })
}

pub(crate) fn fake_uuid(seed: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    format!(
        "{:08x}-0000-4000-8000-{:012x}",
        h >> 32,
        h & 0xffff_ffff_ffff
    )
}

pub(crate) struct StubState {
    mode: Mutex<(Mode, u64)>,
    changed: Condvar,
    requests: Mutex<Vec<Request>>,
    shutdown: AtomicBool,
}

/// A programmable HTTP/1.1 server on 127.0.0.1 (keep-alive supported), stopped on drop.
pub struct Stub {
    addr: SocketAddr,
    state: Arc<StubState>,
    accept: Option<JoinHandle<()>>,
}

impl Stub {
    pub fn start(mode: Mode) -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("stub: bind");
        let addr = listener.local_addr().expect("stub: addr");
        let state = Arc::new(StubState {
            mode: Mutex::new((mode, 0)),
            changed: Condvar::new(),
            requests: Mutex::new(Vec::new()),
            shutdown: AtomicBool::new(false),
        });
        let st = state.clone();
        let accept = thread::spawn(move || {
            for conn in listener.incoming() {
                if st.shutdown.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(stream) = conn {
                    let st = st.clone();
                    thread::spawn(move || serve_connection(stream, st));
                }
            }
        });
        Stub {
            addr,
            state,
            accept: Some(accept),
        }
    }

    /// A stub answering [`StubData::standard`].
    pub fn standard() -> Stub {
        Stub::start(Mode::Good(StubData::standard()))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/api` (use as PREFECT_API_URL).
    pub fn api_url(&self) -> String {
        format!("http://{}/api", self.addr)
    }

    /// Changes how later (and hanging) requests are answered.
    pub fn set_mode(&self, mode: Mode) {
        let mut guard = self.state.mode.lock().unwrap_or_else(|e| e.into_inner());
        guard.0 = mode;
        guard.1 += 1;
        self.state.changed.notify_all();
    }

    /// Every request seen so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.state
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn request_count(&self) -> usize {
        self.state
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub fn clear_requests(&self) {
        self.state
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Waits until at least `n` requests were seen in total; returns them.
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> Vec<Request> {
        poll(timeout, Duration::from_millis(20), || {
            let reqs = self.requests();
            (reqs.len() >= n).then_some(reqs)
        })
        .unwrap_or_else(|| {
            panic!(
                "stub: fewer than {n} requests within {timeout:?}: {:?}",
                self.requests()
            )
        })
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.state.shutdown.store(true, Ordering::SeqCst);
        {
            let _g = self.state.mode.lock().unwrap_or_else(|e| e.into_inner());
            self.state.changed.notify_all();
        }
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Reads one request from `stream` (with `buf` holding bytes already read).
/// None on EOF, error or shutdown.
pub(crate) fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    st: &StubState,
) -> Option<Request> {
    let mut chunk = [0u8; 8192];
    let mut fill = |buf: &mut Vec<u8>| -> Option<()> {
        loop {
            if st.shutdown.load(Ordering::SeqCst) {
                return None;
            }
            match stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    return Some(());
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(_) => return None,
            }
        }
    };
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i;
        }
        fill(buf)?;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    buf.drain(..head_end + 4);
    let body = if header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        loop {
            if let Some(end) = find(buf, b"0\r\n\r\n") {
                if let Some(decoded) = decode_chunked(&buf[..end + 5]) {
                    buf.drain(..end + 5);
                    break decoded;
                }
            }
            fill(buf)?;
        }
    } else {
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < len {
            fill(buf)?;
        }
        buf.drain(..len).collect()
    };
    Some(Request {
        method,
        path,
        headers,
        body,
        at: Instant::now(),
    })
}

pub(crate) fn serve_connection(mut stream: TcpStream, st: Arc<StubState>) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut stream, &mut buf, &st) {
        st.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(req.clone());
        let (mode, generation) = st.mode.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let resp = match mode {
            Mode::Good(data) => data.answer(&req),
            Mode::Handler(h) => h(&req),
            Mode::Status(code) => Response::json(code, &json!({ "detail": "stub error" })),
            Mode::Garbage => Response::raw(200, "application/json", "<html>this is not JSON{"),
            Mode::Hang => {
                let mut guard = st.mode.lock().unwrap_or_else(|e| e.into_inner());
                while guard.1 == generation && !st.shutdown.load(Ordering::SeqCst) {
                    guard = st.changed.wait(guard).unwrap_or_else(|e| e.into_inner());
                }
                return; // close without answering
            }
        };
        let close = req
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let mut out = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
        for (k, v) in &resp.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str(&format!("Content-Length: {}\r\n", resp.body.len()));
        if close {
            out.push_str("Connection: close\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if req.method != "HEAD" {
            bytes.extend_from_slice(&resp.body);
        }
        if stream.write_all(&bytes).is_err() || close {
            return;
        }
    }
}

pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}
