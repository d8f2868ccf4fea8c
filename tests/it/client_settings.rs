//! Issue 3: the Prefect client settings a Prefect user already has work for the
//! exporter too: auth (Basic, Bearer), User-Agent, custom headers, JSON POSTs,
//! retries on 429/502/503 honouring Retry-After and always inside the collection's
//! deadline, CSRF tokens (fetch, renew before expiry, refetch on 403, "disabled"),
//! proxies, and Prefect's profiles file.
//!
//! Against a real Prefect server: CSRF protection on; a profiles file with the URL
//! and auth string and nothing in the environment; the environment over the
//! profile. The rest is played by the harness stub, which records every request.
use crate::support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use prefect_exporter::rfc3339;
use serde_json::json;
use support::{
    run_exporter_once, Exporter, Mode, PrefectServer, Request, Response, ServerOptions, Stub,
    StubData, TempDir,
};

const ERRORS: &str = "prefect_exporter_collect_errors_total";
const COLLECTIONS: &str = "prefect_exporter_collections_total";
const TOTAL: &str = "prefect_flow_runs_total";
const WAIT: Duration = Duration::from_secs(30);
/// For real-server tests: room for every collect group on a loaded machine.
const SLOW: (&str, &str) = ("EXPORTER_INTERVAL", "3");
const USER_AGENT: &str = concat!("prefect-exporter/", env!("CARGO_PKG_VERSION"));

fn handler(f: impl Fn(&Request) -> Response + Send + Sync + 'static) -> Mode {
    Mode::Handler(Arc::new(f))
}

/// The seed group's counts (the late-run count of the breakdown groups, issue
/// 13, is another group's request).
fn count_requests(stub: &Stub) -> Vec<Request> {
    stub.requests()
        .into_iter()
        .filter(|r| r.api_path() == "/flow_runs/count" && !r.body_str().contains("\"Late\""))
        .collect()
}

// ---------------------------------------------------------------------------
// Headers: auth, User-Agent, custom headers, JSON POSTs
// ---------------------------------------------------------------------------

#[test]
fn api_key_arrives_as_bearer_with_user_agent_and_json_posts() {
    let data = StubData::standard();
    let stub = Stub::start(Mode::Good(data.clone()));
    let url = stub.api_url();
    let exp = Exporter::spawn(&[
        ("PREFECT_API_URL", &url),
        ("PREFECT_API_KEY", "pnu_test_key_123"),
    ]);
    let m = exp.wait_for(|m| m.get(COLLECTIONS).is_some_and(|v| *v >= 2.0), WAIT);
    exp.assert_gauges(&m, &data.seed_gauges(&[]));
    let reqs = stub.requests();
    assert!(reqs.iter().any(|r| r.method == "POST"));
    for r in &reqs {
        assert_eq!(
            r.header("authorization"),
            Some("Bearer pnu_test_key_123"),
            "{} {}",
            r.method,
            r.path
        );
        assert_eq!(r.header("user-agent"), Some(USER_AGENT), "{}", r.path);
        if r.method == "POST" {
            // Without it Prefect ignores the filter and counts everything.
            assert_eq!(
                r.header("content-type"),
                Some("application/json"),
                "{}",
                r.path
            );
            // Prefect Cloud refuses POSTs without a length.
            let len: usize = r
                .header("content-length")
                .unwrap_or_else(|| panic!("POST {} without Content-Length", r.path))
                .parse()
                .unwrap();
            assert_eq!(len, r.body.len(), "{}", r.path);
            assert!(r.header("transfer-encoding").is_none());
            serde_json::from_slice::<serde_json::Value>(&r.body)
                .unwrap_or_else(|e| panic!("POST {} body is not JSON: {e}", r.path));
        }
    }
    // POSTs without a token are accepted (CSRF protection off): never asked.
    let csrf = reqs
        .iter()
        .filter(|r| r.api_path() == "/csrf-token")
        .count();
    assert_eq!(csrf, 0, "CSRF token requests");
    assert!(!exp.stderr().contains("pnu_test_key_123"), "key in the log");
}

#[test]
fn a_cloud_style_workspace_url_with_an_api_key_works() {
    // Prefect Cloud's shape: the API below /api/accounts/<id>/workspaces/<id>,
    // Bearer keys only, no admin API, no CSRF endpoint, a rate limit now and then.
    const WS: &str = "/api/accounts/6f1c0a4e-0000-4000-8000-000000000001/workspaces/9b2d7e3f-0000-4000-8000-000000000002";
    let data = StubData::standard();
    let good = data.clone();
    let limited = AtomicBool::new(false);
    let stub = Stub::start(handler(move |r| {
        if r.header("authorization") != Some("Bearer pnu_cloudkey") {
            return Response::json(
                401,
                &json!({"detail": "Invalid authentication credentials"}),
            );
        }
        let Some(rest) = r.path.strip_prefix(WS) else {
            return Response::json(404, &json!({"detail": "Not Found"}));
        };
        if rest.starts_with("/admin") || rest.starts_with("/csrf-token") {
            return Response::json(404, &json!({"detail": "Not Found"}));
        }
        if r.method == "POST" && !limited.swap(true, Ordering::SeqCst) {
            return Response::json(429, &json!({"detail": "Rate limit exceeded"}))
                .with_header("Retry-After", "1");
        }
        let mut inner = r.clone();
        inner.path = format!("/api{rest}");
        good.answer(&inner)
    }));
    let url = format!("http://{}{WS}", stub.addr());
    let exp = Exporter::spawn(&[
        ("PREFECT_API_URL", &url),
        ("PREFECT_API_KEY", "pnu_cloudkey"),
        ("EXPORTER_INTERVAL", "5"),
    ]);
    let m = exp.first_collection(WAIT);
    exp.assert_gauges(&m, &data.seed_gauges(&[]));
    assert!(
        !m.keys().any(|k| k.starts_with("prefect_server_info")),
        "no version without an admin API"
    );
    assert!(stub.requests().iter().all(|r| r.path.starts_with(WS)));
}

#[test]
fn auth_string_arrives_as_basic_and_wins_over_the_key() {
    let data = StubData::standard();
    let stub = Stub::start(Mode::Good(data.clone()));
    let url = stub.api_url();
    let exp = Exporter::spawn(&[
        ("PREFECT_API_URL", &url),
        ("PREFECT_API_KEY", "pnu_unused"),
        ("PREFECT_API_AUTH_STRING", "admin:s3cret:with-colon"),
    ]);
    let m = exp.first_collection(WAIT);
    exp.assert_gauges(&m, &data.seed_gauges(&[]));
    let want = format!("Basic {}", support::base64(b"admin:s3cret:with-colon"));
    for r in stub.requests() {
        assert_eq!(r.header("authorization"), Some(want.as_str()), "{}", r.path);
    }
    let log = exp.stderr();
    assert!(log.contains("using the auth string"), "{log}");
    assert!(
        !log.contains("s3cret") && !log.contains("pnu_unused"),
        "{log}"
    );
}

#[test]
fn custom_headers_arrive_but_cannot_replace_auth_or_user_agent() {
    let data = StubData::standard();
    let stub = Stub::start(Mode::Good(data.clone()));
    let url = stub.api_url();
    let headers = json!({
        "X-Team": "data-platform",
        "CF-Access-Client-Id": "abc.access",
        "Authorization": "Bearer evil",
        "user-agent": "evil/1.0",
        "Prefect-Csrf-Token": "evil",
    })
    .to_string();
    let exp = Exporter::spawn(&[
        ("PREFECT_API_URL", &url),
        ("PREFECT_API_KEY", "pnu_good"),
        ("PREFECT_CLIENT_CUSTOM_HEADERS", &headers),
    ]);
    let m = exp.first_collection(WAIT);
    exp.assert_gauges(&m, &data.seed_gauges(&[]));
    for r in stub.requests() {
        assert_eq!(r.header("x-team"), Some("data-platform"), "{}", r.path);
        assert_eq!(r.header("cf-access-client-id"), Some("abc.access"));
        let auth: Vec<&str> = r
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(auth, ["Bearer pnu_good"], "{}", r.path);
        let ua: Vec<&str> = r
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("user-agent"))
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(ua, [USER_AGENT], "{}", r.path);
        assert!(r.header("prefect-csrf-token").is_none());
    }
    let log = exp.stderr();
    for name in ["Authorization", "user-agent", "Prefect-Csrf-Token"] {
        assert!(
            log.contains(&format!("header {name} is set by the exporter itself")),
            "{log}"
        );
    }
    assert!(
        !log.contains("abc.access"),
        "header values are never logged"
    );
}

#[test]
fn invalid_custom_headers_stop_the_start_naming_the_variable() {
    for bad in [
        "{not json",
        "[\"X-Team\", \"data\"]",
        "{\"X-Team\": 3}",
        "{\"Bad Name\": \"x\"}",
    ] {
        let out = run_exporter_once(&[], &[("PREFECT_CLIENT_CUSTOM_HEADERS", bad)]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(
            err.contains("PREFECT_CLIENT_CUSTOM_HEADERS"),
            "{bad}: {err}"
        );
        assert!(!err.contains("listening on"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
}

// ---------------------------------------------------------------------------
// Retries
// ---------------------------------------------------------------------------

/// A stub answering the first `n` POST /flow_runs/count with `fault`, then good data.
fn fail_first(n: usize, fault: Response) -> (Stub, StubData) {
    let data = StubData::standard();
    let good = data.clone();
    let seen = AtomicUsize::new(0);
    let stub = Stub::start(handler(move |r| {
        if r.api_path() == "/flow_runs/count" && seen.fetch_add(1, Ordering::SeqCst) < n {
            return fault.clone();
        }
        good.answer(r)
    }));
    (stub, data)
}

/// The retried request came `at_least` after the refused one, within the first
/// collection, which succeeded.
fn assert_retried_within_one_collection(
    stub: &Stub,
    exp: &Exporter,
    data: &StubData,
    at_least: Duration,
) {
    let m = exp.first_collection(WAIT);
    assert_eq!(m[COLLECTIONS], 1.0, "one collection so far");
    exp.assert_gauges(&m, &data.seed_gauges(&[]));
    assert_eq!(m.get("prefect_up").copied(), Some(1.0));
    let counts = count_requests(stub);
    assert!(counts.len() >= 2, "{counts:?}");
    let gap = counts[1].at.duration_since(counts[0].at);
    assert_eq!(counts[0].body, counts[1].body, "the same request again");
    assert!(
        gap >= at_least,
        "retried after {gap:?}, expected at least {at_least:?}"
    );
    assert!(
        gap < at_least + Duration::from_secs(1),
        "retried after {gap:?}"
    );
}

#[test]
fn rate_limit_429_with_retry_after_is_honoured_within_one_collection() {
    let fault =
        Response::json(429, &json!({"detail": "rate limited"})).with_header("Retry-After", "1");
    let (stub, data) = fail_first(1, fault);
    let url = stub.api_url();
    let exp = Exporter::spawn(&[("PREFECT_API_URL", &url), ("EXPORTER_INTERVAL", "5")]);
    assert_retried_within_one_collection(&stub, &exp, &data, Duration::from_millis(950));
}

#[test]
fn retry_after_as_an_http_date_is_honoured() {
    // Two seconds after the answer's own Date (the stub's clock, which a skewed
    // exporter clock must not matter to): a wait of 2 s.
    let data = StubData::standard();
    let good = data.clone();
    let seen = AtomicUsize::new(0);
    let stub = Stub::start(handler(move |r| {
        if r.api_path() == "/flow_runs/count" && seen.fetch_add(1, Ordering::SeqCst) == 0 {
            let now = SystemTime::now();
            return Response::json(503, &json!({"detail": "maintenance"}))
                .with_header("Date", &httpdate::fmt_http_date(now))
                .with_header(
                    "Retry-After",
                    &httpdate::fmt_http_date(now + Duration::from_secs(2)),
                );
        }
        good.answer(r)
    }));
    let url = stub.api_url();
    let exp = Exporter::spawn(&[("PREFECT_API_URL", &url), ("EXPORTER_INTERVAL", "6")]);
    assert_retried_within_one_collection(&stub, &exp, &data, Duration::from_millis(1950));
}

#[test]
fn bad_gateway_and_unavailable_are_retried_with_backoff() {
    for status in [503, 502] {
        let (stub, data) = fail_first(2, Response::json(status, &json!({"detail": "down"})));
        let url = stub.api_url();
        let exp = Exporter::spawn(&[("PREFECT_API_URL", &url), ("EXPORTER_INTERVAL", "5")]);
        // No Retry-After: 0.5 s, then 1 s.
        assert_retried_within_one_collection(&stub, &exp, &data, Duration::from_millis(450));
        let counts = count_requests(&stub);
        let second_gap = counts[2].at.duration_since(counts[1].at);
        assert!(
            second_gap >= Duration::from_millis(950),
            "{status}: backoff did not grow: {second_gap:?}"
        );
        // The exporter counts every attempt by status: the two refusals among
        // all that the stub received, and no 4xx (POSTs need no CSRF token here).
        let m = exp.first_collection(WAIT);
        let sent = |code: &str| {
            m.get(&format!(
                "prefect_exporter_api_requests_total{{code=\"{code}\"}}"
            ))
            .copied()
        };
        assert_eq!(sent(&status.to_string()), Some(2.0), "{status}");
        assert_eq!(sent("422"), None, "{status}: no CSRF token request");
        let all = support::family_sum(&m, "prefect_exporter_api_requests_total");
        assert_eq!(
            all,
            stub.requests().len() as f64,
            "{status}: {:?}",
            stub.requests()
                .iter()
                .map(|r| r.api_path().to_string())
                .collect::<Vec<_>>()
        );
        assert_eq!(sent("none"), None);
    }
}

#[test]
fn max_retries_zero_fails_at_once() {
    let fault =
        Response::json(429, &json!({"detail": "rate limited"})).with_header("Retry-After", "1");
    let (stub, _) = fail_first(1, fault);
    let url = stub.api_url();
    let exp = Exporter::spawn(&[
        ("PREFECT_API_URL", &url),
        ("EXPORTER_INTERVAL", "5"),
        ("PREFECT_CLIENT_MAX_RETRIES", "0"),
    ]);
    let m = exp.first_collection(WAIT);
    assert_eq!(m[ERRORS], 1.0, "{}", exp.stderr());
    // The refused count was not sent again.
    let counts = count_requests(&stub);
    let refused = counts[0].body_str();
    let again = counts.iter().filter(|r| r.body_str() == refused).count();
    assert_eq!(again, 1, "{refused}");
    exp.wait_log("HTTP 429", |log| log.contains("HTTP 429"));
}

/// Records when each collection ends (its counter rising) and its duration.
fn watch_collections(exp: &Exporter, n: usize) -> Vec<(Instant, f64)> {
    let mut seen: Vec<(Instant, f64)> = Vec::new();
    let mut last = 0.0;
    let deadline = Instant::now() + WAIT;
    while seen.len() < n {
        assert!(
            Instant::now() < deadline,
            "collections stalled\n{}",
            exp.stderr()
        );
        let m = exp.metrics();
        let c = m.get(COLLECTIONS).copied().unwrap_or(0.0);
        if c > last {
            assert_eq!(
                c,
                last + 1.0,
                "a collection went by unseen (polling too slow)"
            );
            last = c;
            seen.push((
                Instant::now(),
                m["prefect_exporter_collect_duration_seconds"],
            ));
        }
        thread::sleep(Duration::from_millis(25));
    }
    seen
}

#[test]
fn retries_never_run_past_the_collection_deadline() {
    // Interval 2 s, every POST answered 503 with Retry-After 0.5: the default 5
    // retries would take 2.5 s; the deadline stops them before 2 s.
    let stub = Stub::start(handler(|r| {
        if r.api_path() == "/csrf-token" {
            return Response::json(422, &json!({"detail": "CSRF protection is disabled."}));
        }
        Response::json(503, &json!({"detail": "busy"})).with_header("Retry-After", "0.5")
    }));
    let url = stub.api_url();
    let exp = Exporter::spawn(&[("PREFECT_API_URL", &url), ("EXPORTER_INTERVAL", "2")]);
    let seen = watch_collections(&exp, 4);
    for (_, took) in &seen {
        assert!(
            *took <= 2.05,
            "a collection took {took}s with a 2 s interval"
        );
        assert!(*took >= 1.4, "retries stopped early: {took}s");
    }
    // The next collection starts on time: one every 2 s.
    for w in seen.windows(2) {
        let gap = w[1].0.duration_since(w[0].0).as_secs_f64();
        assert!((1.6..=2.4).contains(&gap), "collections {gap}s apart");
    }
    let m = exp.metrics();
    assert!(m[ERRORS] >= 4.0);
    // At most 4 attempts (0, 0.5, 1.0, 1.5 s) per collection.
    let attempts = count_requests(&stub).len() as f64;
    assert!(
        attempts <= 4.0 * m[COLLECTIONS] + 4.0,
        "{attempts} attempts"
    );
}

#[test]
fn a_retry_after_longer_than_the_time_left_stops_retrying_at_once() {
    let stub = Stub::start(handler(|r| {
        if r.api_path() == "/csrf-token" {
            return Response::json(422, &json!({"detail": "CSRF protection is disabled."}));
        }
        Response::json(429, &json!({"detail": "slow down"})).with_header("Retry-After", "5")
    }));
    let url = stub.api_url();
    let exp = Exporter::spawn(&[("PREFECT_API_URL", &url), ("EXPORTER_INTERVAL", "2")]);
    let seen = watch_collections(&exp, 3);
    for (_, took) in &seen {
        assert!(*took < 0.5, "the collection waited: {took}s");
    }
    for w in seen.windows(2) {
        let gap = w[1].0.duration_since(w[0].0).as_secs_f64();
        assert!((1.6..=2.4).contains(&gap), "collections {gap}s apart");
    }
    let counts = count_requests(&stub).len();
    assert!(
        counts <= seen.len() + 1,
        "{counts} requests for {} collections",
        seen.len()
    );
    let log = exp.stderr();
    assert!(
        log.contains("HTTP 429") && log.contains("not retried"),
        "{log}"
    );
}

// ---------------------------------------------------------------------------
// CSRF
// ---------------------------------------------------------------------------

/// A CSRF-protected stub: tokens live `lifetime` on the stub's clock, which runs
/// `skew` behind the exporter's; POSTs need a live token of their client.
struct CsrfStub {
    stub: Stub,
    data: StubData,
    fetches: Arc<AtomicUsize>,
    refusals: Arc<AtomicUsize>,
    /// Forget every token (a server restart with a fresh token table).
    forget: Arc<AtomicBool>,
}

fn csrf_stub(lifetime: Duration, skew: Duration) -> CsrfStub {
    let data = StubData::standard();
    let good = data.clone();
    let fetches = Arc::new(AtomicUsize::new(0));
    let refusals = Arc::new(AtomicUsize::new(0));
    let forget = Arc::new(AtomicBool::new(false));
    let tokens: Mutex<HashMap<String, (String, Instant)>> = Mutex::new(HashMap::new());
    let (f, r, fg) = (fetches.clone(), refusals.clone(), forget.clone());
    let stub = Stub::start(handler(move |req| {
        let mut tokens = tokens.lock().unwrap();
        if fg.swap(false, Ordering::SeqCst) {
            tokens.clear();
        }
        let server_now = SystemTime::now() - skew;
        if req.api_path() == "/csrf-token" {
            let client = req.path.split("client=").nth(1).unwrap_or("").to_string();
            let n = f.fetch_add(1, Ordering::SeqCst);
            let token = format!("token-{n}");
            tokens.insert(client.clone(), (token.clone(), Instant::now() + lifetime));
            return Response::json(
                200,
                &json!({"token": token, "client": client, "expiration": rfc3339::format(rfc3339::unix(server_now + lifetime))}),
            )
            .with_header("Date", &httpdate::fmt_http_date(server_now));
        }
        if req.method == "POST" {
            let client = req.header("prefect-csrf-client").unwrap_or("");
            let token = req.header("prefect-csrf-token");
            let valid = tokens
                .get(client)
                .is_some_and(|(t, until)| Some(t.as_str()) == token && Instant::now() < *until);
            if !valid {
                r.fetch_add(1, Ordering::SeqCst);
                let detail = if token.is_none() {
                    "Missing CSRF token."
                } else {
                    "Invalid CSRF token or client identifier."
                };
                return Response::json(403, &json!({ "detail": detail }));
            }
        }
        good.answer(req)
    }));
    CsrfStub {
        stub,
        data,
        fetches,
        refusals,
        forget,
    }
}

#[test]
fn csrf_token_is_sent_and_renewed_before_it_expires_despite_clock_skew() {
    // Tokens live 3 s; the stub's clock is an hour behind the exporter's. Judged
    // by its own clock the exporter would think every token long expired; judged
    // by the answer's Date it renews each one before the server refuses it.
    let cs = csrf_stub(Duration::from_secs(3), Duration::from_secs(3600));
    let url = cs.stub.api_url();
    let exp = Exporter::spawn(&[("PREFECT_API_URL", &url), ("EXPORTER_INTERVAL", "1")]);
    let m = exp.wait_for(|m| m.get(COLLECTIONS).is_some_and(|v| *v >= 8.0), WAIT);
    exp.assert_gauges(&m, &cs.data.seed_gauges(&[]));
    // Only the first POST, sent without a token, which tells the exporter that
    // this server wants them.
    assert_eq!(
        cs.refusals.load(Ordering::SeqCst),
        1,
        "a token was refused\n{}",
        exp.stderr()
    );
    let fetches = cs.fetches.load(Ordering::SeqCst);
    assert!(
        fetches >= 3,
        "tokens were not renewed: {fetches} fetches in 8 s"
    );
    assert!(fetches <= 6, "tokens fetched too often: {fetches} in 8 s");
    for r in cs
        .stub
        .requests()
        .iter()
        .filter(|r| r.method == "POST")
        .skip(1)
    {
        assert!(r
            .header("prefect-csrf-token")
            .is_some_and(|t| t.starts_with("token-")));
    }
}

#[test]
fn a_refused_csrf_token_is_fetched_again_within_the_collection() {
    let cs = csrf_stub(Duration::from_secs(3600), Duration::ZERO);
    let url = cs.stub.api_url();
    let exp = Exporter::spawn(&[("PREFECT_API_URL", &url), ("EXPORTER_INTERVAL", "1")]);
    let m = exp.first_collection(WAIT);
    exp.assert_gauges(&m, &cs.data.seed_gauges(&[]));
    assert_eq!(cs.fetches.load(Ordering::SeqCst), 1);
    // The server forgets its tokens (restart): the next POST is refused once, a
    // new token is fetched and the request repeated, and the collection succeeds.
    let at_forget = exp.metrics()[COLLECTIONS];
    cs.forget.store(true, Ordering::SeqCst);
    let m = exp.wait_for(|m| m[COLLECTIONS] >= at_forget + 2.0, WAIT);
    assert_eq!(m[ERRORS], 0.0, "{}", exp.stderr());
    // The first POST at the start (no token yet), and the one after the restart.
    assert_eq!(cs.refusals.load(Ordering::SeqCst), 2, "{}", exp.stderr());
    assert_eq!(cs.fetches.load(Ordering::SeqCst), 2);
    // The refused request was repeated with the new token.
    let posts: Vec<Request> = cs
        .stub
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .collect();
    let tokens: Vec<&str> = posts
        .iter()
        .filter_map(|r| r.header("prefect-csrf-token"))
        .collect();
    assert!(
        tokens.contains(&"token-0") && tokens.contains(&"token-1"),
        "{tokens:?}"
    );
}

#[test]
fn a_broken_token_endpoint_is_asked_once_when_posts_work_without_a_token() {
    let data = StubData::standard();
    let good = data.clone();
    // The first POST is refused for want of a token; the token endpoint is broken;
    // later POSTs pass without a token (CSRF protection turned off meanwhile).
    let refused = AtomicBool::new(false);
    let stub = Stub::start(handler(move |r| {
        if r.api_path() == "/csrf-token" {
            return Response::json(500, &json!({"detail": "Internal Server Error"}));
        }
        if r.method == "POST" && !refused.swap(true, Ordering::SeqCst) {
            return Response::json(403, &json!({"detail": "Missing CSRF token."}));
        }
        good.answer(r)
    }));
    let url = stub.api_url();
    let exp = Exporter::spawn(&[("PREFECT_API_URL", &url)]);
    let m = exp.wait_for(|m| m.get(COLLECTIONS).is_some_and(|v| *v >= 3.0), WAIT);
    exp.assert_gauges(&m, &data.seed_gauges(&[]));
    let asked = stub
        .requests()
        .iter()
        .filter(|r| r.api_path() == "/csrf-token")
        .count();
    assert_eq!(asked, 1, "token endpoint asked {asked} times");
}

#[test]
fn csrf_support_can_be_turned_off() {
    let data = StubData::standard();
    let stub = Stub::start(Mode::Good(data.clone()));
    let url = stub.api_url();
    let exp = Exporter::spawn(&[
        ("PREFECT_API_URL", &url),
        ("PREFECT_CLIENT_CSRF_SUPPORT_ENABLED", "false"),
    ]);
    let m = exp.wait_for(|m| m.get(COLLECTIONS).is_some_and(|v| *v >= 2.0), WAIT);
    exp.assert_gauges(&m, &data.seed_gauges(&[]));
    assert!(stub
        .requests()
        .iter()
        .all(|r| r.api_path() != "/csrf-token"));
}

// ---------------------------------------------------------------------------
// Proxies
// ---------------------------------------------------------------------------

/// A tiny forward proxy: CONNECT host:port tunnels (what ureq sends, for http
/// URLs too); any other request is recorded and refused with 502.
struct ConnectProxy {
    addr: String,
    seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    accept: Option<thread::JoinHandle<()>>,
}

impl ConnectProxy {
    fn start() -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        let accept = thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(c) = conn {
                    let s = s.clone();
                    thread::spawn(move || proxy_connection(c, s));
                }
            }
        });
        ConnectProxy {
            addr,
            seen,
            stop,
            accept: Some(accept),
        }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn proxy_connection(mut client: TcpStream, seen: Arc<Mutex<Vec<String>>>) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(10)));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match client.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let line = head.lines().next().unwrap_or_default().to_string();
    seen.lock().unwrap().push(line.clone());
    let mut parts = line.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (parts.next(), parts.next()) else {
        let _ = client.write_all(
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        return;
    };
    let Ok(upstream) = TcpStream::connect(target) else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n");
        return;
    };
    let _ = client.set_read_timeout(None);
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .is_err()
    {
        return;
    }
    let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    let (mut c1, mut u1) = (client, upstream);
    let t = thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut u2);
        let _ = u2.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut u1, &mut c1);
    let _ = c1.shutdown(std::net::Shutdown::Write);
    let _ = t.join();
}

#[test]
fn proxies_from_the_environment_are_used_as_other_clients_use_them() {
    let data = StubData::standard();
    let stub = Stub::start(Mode::Good(data.clone()));
    let url = stub.api_url();
    let target = stub.addr().to_string();
    let proxy = ConnectProxy::start();
    let proxy_url = format!("http://{}", proxy.addr);

    // http URL + HTTP_PROXY (either case): through the proxy.
    for var in ["HTTP_PROXY", "http_proxy", "ALL_PROXY"] {
        let before = proxy.seen().len();
        let exp = Exporter::spawn(&[("PREFECT_API_URL", &url), (var, &proxy_url)]);
        let m = exp.first_collection(WAIT);
        exp.assert_gauges(&m, &data.seed_gauges(&[]));
        let seen = proxy.seen();
        assert!(
            seen.len() > before,
            "{var}: the proxy saw nothing\n{}",
            exp.stderr()
        );
        for line in &seen[before..] {
            assert_eq!(line, &format!("CONNECT {target} HTTP/1.1"), "{var}");
        }
        assert!(
            exp.stderr()
                .contains(&format!("proxy={proxy_url} (from {var})")),
            "{}",
            exp.stderr()
        );
    }

    // NO_PROXY naming the host (with spaces, either case), or HTTPS_PROXY alone
    // for an http URL: straight to Prefect.
    for extra in [
        [
            ("HTTP_PROXY", proxy_url.as_str()),
            ("NO_PROXY", "example.com, 127.0.0.1"),
        ],
        [("http_proxy", proxy_url.as_str()), ("no_proxy", "*")],
        [("HTTPS_PROXY", proxy_url.as_str()), ("NO_PROXY", "")],
    ] {
        let before = proxy.seen().len();
        let mut envs = vec![("PREFECT_API_URL", url.as_str())];
        envs.extend_from_slice(&extra);
        let exp = Exporter::spawn(&envs);
        let m = exp.first_collection(WAIT);
        exp.assert_gauges(&m, &data.seed_gauges(&[]));
        assert_eq!(proxy.seen().len(), before, "{extra:?}: the proxy was used");
        assert!(exp.stderr().contains("proxy=none"), "{}", exp.stderr());
    }
}

#[test]
fn a_proxy_with_credentials_gets_them_and_the_log_does_not() {
    let data = StubData::standard();
    let stub = Stub::start(Mode::Good(data.clone()));
    let url = stub.api_url();
    let proxy = ConnectProxy::start();
    let proxy_url = format!("http://puser:ppass77@{}", proxy.addr);
    let exp = Exporter::spawn(&[("PREFECT_API_URL", &url), ("HTTP_PROXY", &proxy_url)]);
    let m = exp.first_collection(WAIT);
    exp.assert_gauges(&m, &data.seed_gauges(&[]));
    assert!(!proxy.seen().is_empty());
    let log = exp.stderr();
    assert!(!log.contains("ppass77"), "{log}");
    assert!(
        log.contains(&format!(
            "proxy=http://***@{} (from HTTP_PROXY)",
            proxy.addr
        )),
        "{log}"
    );
}

// ---------------------------------------------------------------------------
// Profiles: start-up errors (no server needed)
// ---------------------------------------------------------------------------

fn write_profiles(dir: &Path, text: &str) -> String {
    let prefect = dir.join(".prefect");
    std::fs::create_dir_all(&prefect).unwrap();
    let path = prefect.join("profiles.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn unusable_profiles_stop_the_start_naming_the_file() {
    let home = TempDir::new("issue3-profiles");
    let home_s = home.path().display().to_string();
    let path = write_profiles(
        home.path(),
        "active = \"dev\"\n[profiles.dev]\nPREFECT_API_KEY = pnu_unquoted_secret\n",
    );
    let out = run_exporter_once(&[], &[("HOME", &home_s)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&path) && err.contains("not valid TOML (line 3"),
        "{err}"
    );
    assert!(!err.contains("pnu_unquoted_secret"), "{err}");

    // A PREFECT_PROFILE that names no profile of a good file.
    let path = write_profiles(
        home.path(),
        "active = \"dev\"\n[profiles.dev]\nPREFECT_API_URL = \"http://dev/api\"\n",
    );
    let out = run_exporter_once(&[], &[("HOME", &home_s), ("PREFECT_PROFILE", "prod")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&path) && err.contains("PREFECT_PROFILE=prod"),
        "{err}"
    );

    // A bad value in the profile: the variable, the profile and the file.
    let path = write_profiles(
        home.path(),
        "active = \"dev\"\n[profiles.dev]\nPREFECT_CLIENT_MAX_RETRIES = \"lots\"\n",
    );
    let out = run_exporter_once(&[], &[("HOME", &home_s)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("PREFECT_CLIENT_MAX_RETRIES=lots")
            && err.contains(&path)
            && err.contains("\"dev\""),
        "{err}"
    );

    // PREFECT_PROFILES_PATH to a missing file: fine, defaults apply.
    let missing = home.path().join("nowhere.toml").display().to_string();
    let out = run_exporter_once(&["--version"], &[("PREFECT_PROFILES_PATH", &missing)]);
    assert_eq!(out.status.code(), Some(0));
}

// ---------------------------------------------------------------------------
// Against a real Prefect server
// ---------------------------------------------------------------------------

#[test]
fn real_server_with_csrf_protection_gives_correct_values() {
    support::require_prefect!();
    // Private: CSRF protection is a server setting. Tokens expire after 4 s: over
    // 8 collections (24 s) the exporter renews several.
    let server = PrefectServer::start(ServerOptions {
        csrf: true,
        extra_env: vec![("PREFECT_SERVER_CSRF_TOKEN_EXPIRATION".into(), "PT4S".into())],
        ..Default::default()
    });
    let api = server.api();
    let expected = support::seed_standard(&api);
    // The server really refuses a POST without a token.
    let refused = support::http_request(
        &format!("127.0.0.1:{}", server.port()),
        "POST",
        "/api/flow_runs/count",
        &[("Content-Type", "application/json")],
        b"{}",
    )
    .unwrap();
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(refused.body.contains("CSRF"), "{}", refused.body);

    let url = server.api_url();
    let exp = Exporter::spawn(&[
        ("PREFECT_API_URL", &url),
        ("EXPORTER_CHECK_DEPLOYMENTS", "flow-a,flow-b,flow-nope"),
        ("LOG_LEVEL", "debug"),
        // Room for every collect group on a loaded test machine (the interval
        // is each collection's deadline; 2 s was missed once with the tests of
        // the one binary running side by side).
        ("EXPORTER_INTERVAL", "3"),
    ]);
    let m = exp.wait_for(
        |m| m.get(COLLECTIONS).is_some_and(|v| *v >= 8.0),
        Duration::from_secs(60),
    );
    exp.assert_gauges(
        &m,
        &expected.seed_gauges(&["flow-a", "flow-b", "flow-nope"]),
    );
    let log = exp.stderr();
    assert!(log.contains("CSRF protection is on"), "{log}");
    assert!(
        log.contains("CSRF token about to expire, renewing"),
        "{log}"
    );
    assert!(
        log.matches("token received").count() >= 3,
        "the 4 s tokens were not renewed:\n{log}"
    );
}

#[test]
fn real_server_settings_from_a_profile_and_the_environment_over_it() {
    support::require_prefect!();
    // Private: basic auth is a server setting.
    let server = PrefectServer::start(ServerOptions {
        auth_string: Some("admin:pr0file-pass".into()),
        ..Default::default()
    });
    let expected = support::seed_standard(&server.api());
    let url = server.api_url();
    let home = TempDir::new("issue3-profile-home");
    let home_s = home.path().display().to_string();
    write_profiles(
        home.path(),
        &format!(
            "active = \"selfhosted\"\n\n\
             [profiles.selfhosted]\n\
             PREFECT_API_URL = \"{url}\"\n\
             PREFECT_API_AUTH_STRING = \"admin:pr0file-pass\"\n\
             PREFECT_API_REQUEST_TIMEOUT = 20\n\
             PREFECT_CLIENT_CSRF_SUPPORT_ENABLED = true\n\n\
             [profiles.stale]\n\
             PREFECT_API_URL = \"http://127.0.0.1:9/api\"\n\
             PREFECT_API_AUTH_STRING = \"admin:pr0file-pass\"\n"
        ),
    );
    let check = |exp: &Exporter| {
        let m = exp.wait_for(|m| m.get(TOTAL).is_some_and(|v| *v > 0.0), WAIT);
        exp.assert_gauges(&m, &expected.seed_gauges(&[]));
        assert!(!exp.stderr().contains("pr0file-pass"), "{}", exp.stderr());
    };

    // Nothing Prefect in the environment (only HOME and the exporter's own port
    // settings): URL and credentials come from ~/.prefect/profiles.toml.
    let exp = Exporter::spawn(&[("HOME", &home_s), SLOW]);
    check(&exp);
    let log = exp.stderr();
    assert!(log.contains(&format!("api_url={url}")), "{log}");
    assert!(log.contains("profile=selfhosted ("), "{log}");
    drop(exp);

    // The profile's URL is wrong; the environment's is right and wins.
    let exp = Exporter::spawn(&[
        ("HOME", &home_s),
        ("PREFECT_PROFILE", "stale"),
        ("PREFECT_API_URL", &url),
        SLOW,
    ]);
    check(&exp);
    drop(exp);

    // And the other way round: the environment's wrong credentials beat the
    // profile's right ones (the environment always wins).
    let exp = Exporter::spawn(&[
        ("HOME", &home_s),
        ("PREFECT_API_AUTH_STRING", "admin:wrong"),
    ]);
    // Every collection fails: the error counter equals the collection counter
    // (both are published together by each collection). Not `== 1`: at the
    // harness's 2 s interval a second failed collection may be counted before
    // this scrape. The log line of the failure may come just after the scrape.
    let m = exp.first_collection(WAIT);
    assert!(m[ERRORS] >= 1.0, "{}", exp.stderr());
    assert_eq!(m[ERRORS], m[COLLECTIONS], "{}", exp.stderr());
    assert_eq!(m.get("prefect_up"), Some(&0.0), "{}", exp.stderr());
    exp.wait_log("HTTP 401", |log| log.contains("HTTP 401"));
}
