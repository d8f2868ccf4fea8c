//! The Prefect REST client: one place that knows how to talk to Prefect safely
//! (auth, JSON content type, timeouts bounded by the collection's deadline,
//! retries, CSRF), so the collect groups only say *what* to ask.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::de::DeserializeOwned;
use serde::Serialize;
use ureq::tls::{parse_pem, PemItem, RootCerts, TlsConfig};
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

use crate::config::{Auth, Config, ConfigError};

/// Answers larger than this are refused rather than buffered: a misconfigured URL
/// pointing at a file server must not eat the exporter's memory.
const MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;
/// Backoff between retries when the server gives no `Retry-After`.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Longest `Retry-After` taken at its word; longer ones stop retrying anyway,
/// since no collection lasts an hour.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Answers worth another try: the request may succeed later (rate limit, a proxy
/// or load balancer between restarts, a server that timed out reading). Prefect's
/// own client retries the same codes.
const RETRY_STATUSES: &[u16] = &[408, 429, 502, 503];

#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// No HTTP answer: refused connection, unknown host, reset.
    Transport { path: String, detail: String },
    /// The TLS handshake failed: an unknown CA, a wrong host name, no TLS.
    Tls { path: String, detail: String },
    /// No answer within the time left.
    Timeout { path: String, after: Duration },
    /// An HTTP answer that is not a success.
    Status {
        path: String,
        status: u16,
        detail: String,
    },
    /// A success whose body is not what the API documents.
    Decode { path: String, detail: String },
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Transport { path, detail } => {
                write!(
                    f,
                    "{path}: cannot reach Prefect: {detail} (check PREFECT_API_URL)"
                )
            }
            ApiError::Tls { path, detail } => write!(
                f,
                "{path}: TLS problem with Prefect: {detail} (for a private CA set \
                 PREFECT_API_SSL_CERT_FILE; PREFECT_API_TLS_INSECURE_SKIP_VERIFY=true skips the check)"
            ),
            ApiError::Timeout { path, after } => {
                write!(f, "{path}: no answer within {:.1}s", after.as_secs_f64())
            }
            ApiError::Status {
                path,
                status,
                detail,
            } => {
                let hint = match status {
                    403 if is_csrf_refusal(detail) => {
                        " (the server wants CSRF tokens: PREFECT_CLIENT_CSRF_SUPPORT_ENABLED must not be false)"
                    }
                    429 => " (rate limited: a longer EXPORTER_INTERVAL asks less often)",
                    401 | 403 => " (check PREFECT_API_AUTH_STRING or PREFECT_API_KEY)",
                    404 | 405 => {
                        " (check PREFECT_API_URL: it should end in /api or a workspace path)"
                    }
                    _ => "",
                };
                write!(f, "{path}: HTTP {status}{hint}")?;
                if !detail.is_empty() {
                    write!(f, ": {detail}")?;
                }
                Ok(())
            }
            ApiError::Decode { path, detail } => {
                write!(f, "{path}: unexpected answer: {detail}")
            }
        }
    }
}

impl std::error::Error for ApiError {}

enum Csrf {
    /// At the start: POSTs go without a token, and the first one tells whether the
    /// server wants tokens. Accepted: it has CSRF protection off (Prefect's
    /// default), learnt at no extra request and with nothing refused. Refused for
    /// want of a token: fetch one and repeat the POST. (Asking `GET /csrf-token`
    /// first, as Prefect's client does, gets a 422 from every server with CSRF
    /// protection off, which would show as a 4xx on each healthy start.)
    Untested,
    /// A token is wanted but none is held: the next POST fetches one first.
    Unknown,
    /// The server said it has no CSRF protection, or the user turned support off.
    Disabled,
    Token {
        token: String,
        /// When to fetch a new one before the server starts refusing it.
        refresh_at: Option<Instant>,
    },
}

/// Per-connection read and write buffers, and the largest response header.
const IO_BUFFER: usize = 16 * 1024;

/// How long a host name's addresses are reused.
const DNS_TTL: Duration = Duration::from_secs(30);

/// ureq resolves the host before every request, even one sent on a kept-alive
/// connection, and when the request has a timeout (all of ours do) it resolves in
/// a new thread: one thread started and ended per request. This resolver answers
/// an IP address at once and reuses a host name's addresses for `DNS_TTL`, so a
/// steady collection starts no thread.
#[derive(Debug, Default)]
struct CachingResolver {
    inner: DefaultResolver,
    cache: Mutex<Option<(String, Instant, ResolvedSocketAddrs)>>,
}

impl Resolver for CachingResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let port = match (uri.port_u16(), uri.scheme_str()) {
            (Some(p), _) => p,
            (None, Some("http")) => 80,
            (None, Some("https")) => 443,
            // Anything else (a SOCKS proxy): ureq's own rules.
            _ => return self.inner.resolve(uri, config, timeout),
        };
        let Some(host) = uri.host() else {
            return self.inner.resolve(uri, config, timeout);
        };
        if let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            let mut out = self.empty();
            out.push(SocketAddr::new(ip, port));
            return Ok(out);
        }
        let key = format!("{host}:{port}");
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((k, at, addrs)) = cache.as_ref() {
            if *k == key && at.elapsed() < DNS_TTL {
                return Ok(addrs.clone());
            }
        }
        let addrs = self.inner.resolve(uri, config, timeout)?;
        *cache = Some((key, Instant::now(), addrs.clone()));
        Ok(addrs)
    }
}

pub struct Client {
    agent: ureq::Agent,
    base: String,
    auth_header: Option<String>,
    custom_headers: Vec<(String, String)>,
    request_timeout: Duration,
    max_retries: u32,
    /// `PREFECT_CLIENT_CSRF_SUPPORT_ENABLED` (and not Prefect Cloud).
    csrf_allowed: bool,
    csrf: Csrf,
    csrf_client_id: String,
    /// Requests sent since the last `take_request_counts`, by HTTP status; 0 for
    /// those that got no answer (timeout, refused or reset connection, TLS).
    sent: BTreeMap<u16, u64>,
}

/// A request the client may send: method, path below the API base, JSON body.
struct Call<'a> {
    method: &'static str,
    path: &'a str,
    body: Option<Vec<u8>>,
}

impl Client {
    pub fn new(config: &Config) -> Result<Client, ConfigError> {
        let mut tls = TlsConfig::builder().disable_verification(config.tls_insecure_skip_verify);
        if let Some(path) = &config.ssl_cert_file {
            let var = config.ssl_cert_var;
            let shown = path.display().to_string();
            let pem = std::fs::read(path).map_err(|_| ConfigError::Invalid {
                var,
                value: shown.clone(),
                expected: "cannot read this file: expected a readable PEM file of CA certificates",
            })?;
            let certs: Vec<_> = parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                return Err(ConfigError::Invalid {
                    var,
                    value: shown,
                    expected: "no certificate found: expected a PEM file of CA certificates",
                });
            }
            // Like Prefect's client (`ssl.create_default_context(cafile=...)`), the
            // file replaces the built-in roots rather than adding to them.
            tls = tls.root_certs(RootCerts::new_with_certs(&certs));
        }
        let proxy = match &config.proxy {
            Some(p) => Some(ureq::Proxy::new(&p.url).map_err(|_| ConfigError::Invalid {
                var: p.var,
                value: crate::config::mask_userinfo(&p.url),
                expected: "expected a proxy URL such as http://proxy.example.com:3128",
            })?),
            None => None,
        };
        let agent_config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .user_agent(concat!("prefect-exporter/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls.build())
            // Chosen once from the environment in `proxy` (ureq's own default
            // reads it differently from curl and Prefect's client).
            .proxy(proxy)
            // The server closes idle keep-alive connections after 5 s; a small pool
            // is all one sequential collector needs.
            .max_idle_connections(2)
            .max_idle_connections_per_host(2)
            .max_idle_age(Duration::from_secs(4))
            // ureq's defaults are 128 KiB in and 128 KiB out per connection: most
            // of the exporter's memory. Prefect's answers have small headers and
            // bodies stream through the buffer.
            .input_buffer_size(IO_BUFFER)
            .output_buffer_size(IO_BUFFER)
            .max_response_header_size(IO_BUFFER)
            .build();
        let agent = ureq::Agent::with_parts(
            agent_config,
            DefaultConnector::default(),
            CachingResolver::default(),
        );
        let auth_header = match &config.auth {
            Auth::None => None,
            Auth::Basic(s) => Some(format!("Basic {}", BASE64.encode(s.as_bytes()))),
            Auth::Bearer(k) => Some(format!("Bearer {k}")),
        };
        Ok(Client {
            agent,
            base: config.api_url.clone(),
            auth_header,
            custom_headers: config.custom_headers.clone(),
            request_timeout: config.request_timeout,
            max_retries: config.max_retries,
            csrf_allowed: config.csrf_enabled,
            csrf: if config.csrf_enabled {
                Csrf::Untested
            } else {
                Csrf::Disabled
            },
            csrf_client_id: uuid::Uuid::new_v4().to_string(),
            sent: BTreeMap::new(),
        })
    }

    /// `POST path` with a typed JSON body, answer decoded as `T`.
    pub fn post<B: Serialize, T: DeserializeOwned>(
        &mut self,
        path: &str,
        body: &B,
        deadline: Instant,
    ) -> Result<T, ApiError> {
        let body = serde_json::to_vec(body).map_err(|e| ApiError::Decode {
            path: format!("POST {path}"),
            detail: format!("cannot encode request: {e}"),
        })?;
        let call = Call {
            method: "POST",
            path,
            body: Some(body),
        };
        let answer = self.send(&call, deadline)?;
        decode(&call, &answer.body)
    }

    /// `GET path`, answer decoded as `T`.
    pub fn get<T: DeserializeOwned>(
        &mut self,
        path: &str,
        deadline: Instant,
    ) -> Result<T, ApiError> {
        let call = Call {
            method: "GET",
            path,
            body: None,
        };
        let answer = self.send(&call, deadline)?;
        decode(&call, &answer.body)
    }

    /// Every request sent since the last call (retries and CSRF token fetches
    /// included), by the `code` label of `prefect_exporter_api_requests_total`: the
    /// HTTP status, or `none` when no answer came.
    pub fn take_request_counts(&mut self) -> Vec<(String, u64)> {
        std::mem::take(&mut self.sent)
            .into_iter()
            .map(|(status, n)| {
                let code = match status {
                    0 => "none".to_string(),
                    s => s.to_string(),
                };
                (code, n)
            })
            .collect()
    }

    /// Sends with retries, all inside `deadline`, and returns a 2xx answer.
    fn send(&mut self, call: &Call, deadline: Instant) -> Result<Answer, ApiError> {
        let what = format!("{} {}", call.method, call.path);
        let mut retries_left = self.max_retries;
        let mut backoff = FIRST_BACKOFF;
        let mut reset_retried = false;
        let mut csrf_retried = false;
        loop {
            if call.method == "POST" {
                self.ensure_csrf_token(deadline);
            }
            let started = Instant::now();
            let timeout = remaining(deadline).min(self.request_timeout);
            if timeout.is_zero() {
                return Err(ApiError::Timeout {
                    path: what,
                    after: Duration::ZERO,
                });
            }
            log::trace!("{what}");
            let outcome = self.send_once(call, timeout);
            let status = outcome.as_ref().map_or(0, |a| a.status);
            *self.sent.entry(status).or_insert(0) += 1;
            match outcome {
                Err(SendError::Reset(detail)) => {
                    // A keep-alive connection the server already closed: the
                    // request never ran, so one immediate retry is safe.
                    if !reset_retried {
                        reset_retried = true;
                        log::debug!("{what}: connection reset ({detail}), retrying once");
                        continue;
                    }
                    return Err(ApiError::Transport { path: what, detail });
                }
                Err(SendError::Timeout) => {
                    return Err(ApiError::Timeout {
                        path: what,
                        after: started.elapsed(),
                    })
                }
                Err(SendError::Tls(detail)) => return Err(ApiError::Tls { path: what, detail }),
                Err(SendError::Other(detail)) => {
                    return Err(ApiError::Transport { path: what, detail })
                }
                Ok(answer) if (200..300).contains(&answer.status) => {
                    if call.method == "POST" && matches!(self.csrf, Csrf::Untested) {
                        log::debug!("CSRF protection is off on the server: {what} needed no token");
                        self.csrf = Csrf::Disabled;
                    }
                    if call.method == "POST" && matches!(self.csrf, Csrf::Unknown) {
                        // The token fetch failed, yet a POST without a token was
                        // accepted: the server does not enforce CSRF. Stop asking
                        // (a later CSRF 403 turns asking back on).
                        log::debug!("{what} accepted without a CSRF token; not asking for one");
                        self.csrf = Csrf::Disabled;
                    }
                    return Ok(answer);
                }
                Ok(answer) => {
                    if answer.status == 403
                        && call.method == "POST"
                        && self.csrf_allowed
                        && !csrf_retried
                        && is_csrf_refusal(&answer.body)
                    {
                        // The first POST to a server with CSRF protection on,
                        // expired, never fetched (the fetch failed), or the server
                        // turned CSRF protection on since it was seen off.
                        log::debug!("{what}: CSRF token refused, fetching a new one");
                        self.csrf = Csrf::Unknown;
                        csrf_retried = true;
                        continue;
                    }
                    let mut detail = summarize(&answer.body);
                    if RETRY_STATUSES.contains(&answer.status) && retries_left > 0 {
                        let wait = answer.retry_after.unwrap_or(backoff);
                        // Never sleep past the collection's deadline: better to fail
                        // this collection than to run into the next one.
                        if Instant::now() + wait < deadline {
                            retries_left -= 1;
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                            log::debug!(
                                "{what}: HTTP {}, retrying in {:.1}s",
                                answer.status,
                                wait.as_secs_f64()
                            );
                            std::thread::sleep(wait);
                            continue;
                        }
                        detail = format!(
                            "{detail} (not retried: waiting {:.1}s would pass the end of this collection)",
                            wait.as_secs_f64()
                        );
                    }
                    return Err(ApiError::Status {
                        path: what,
                        status: answer.status,
                        detail: detail.trim().to_string(),
                    });
                }
            }
        }
    }

    fn send_once(&self, call: &Call, timeout: Duration) -> Result<Answer, SendError> {
        let url = format!("{}{}", self.base, call.path);
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(a) = &self.auth_header {
            headers.push(("Authorization", a));
        }
        for (k, v) in &self.custom_headers {
            headers.push((k, v));
        }
        if let (Csrf::Token { token, .. }, "POST") = (&self.csrf, call.method) {
            headers.push(("Prefect-Csrf-Token", token));
            headers.push(("Prefect-Csrf-Client", &self.csrf_client_id));
        }
        let result = match &call.body {
            Some(body) => {
                let mut req = self
                    .agent
                    .post(&url)
                    .config()
                    .timeout_global(Some(timeout))
                    .build()
                    // Without it Prefect silently ignores the filter and counts everything.
                    .header("Content-Type", "application/json")
                    .header("Accept", "application/json");
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                req.send(&body[..])
            }
            None => {
                let mut req = self
                    .agent
                    .get(&url)
                    .config()
                    .timeout_global(Some(timeout))
                    .build()
                    .header("Accept", "application/json");
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                req.call()
            }
        };
        let mut response = result.map_err(SendError::from)?;
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let date = header("date").and_then(|d| httpdate::parse_http_date(d.trim()).ok());
        let retry_after = header("retry-after")
            .and_then(|v| parse_retry_after(&v, date.unwrap_or_else(SystemTime::now)));
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_BODY_BYTES)
            .read_to_string()
            .map_err(SendError::from)?;
        Ok(Answer {
            status,
            retry_after,
            date,
            body,
        })
    }

    /// Fetches a CSRF token when one is wanted and there is none or it is about to
    /// expire. A server that says it has no CSRF protection is not asked again; a failed
    /// fetch leaves the state unknown (the POST then reports the problem, and
    /// a 403 for a missing token makes it fetch again).
    fn ensure_csrf_token(&mut self, deadline: Instant) {
        match &self.csrf {
            Csrf::Untested | Csrf::Disabled => return,
            Csrf::Token {
                refresh_at: Some(at),
                ..
            } if Instant::now() >= *at => log::debug!("CSRF token about to expire, renewing"),
            Csrf::Token { .. } => return,
            Csrf::Unknown => {}
        }
        #[derive(serde::Deserialize)]
        struct Token {
            token: String,
            #[serde(default)]
            expiration: Option<String>,
        }
        let path = format!("/csrf-token?client={}", self.csrf_client_id);
        let call = Call {
            method: "GET",
            path: &path,
            body: None,
        };
        let asked = Instant::now();
        match self.send(&call, deadline) {
            Ok(answer) => match serde_json::from_str::<Token>(&answer.body) {
                Ok(t) => {
                    let lifetime = t
                        .expiration
                        .as_deref()
                        .and_then(parse_rfc3339)
                        .and_then(|exp| token_lifetime(exp, answer.date));
                    log::debug!(
                        "CSRF protection is on: token received{}",
                        lifetime
                            .map(|l| format!(", valid {:.0}s", l.as_secs_f64()))
                            .unwrap_or_default()
                    );
                    self.csrf = Csrf::Token {
                        token: t.token,
                        // Renew at 90% of its life: never send one the server
                        // may already consider expired.
                        refresh_at: lifetime.map(|l| asked + l.mul_f64(0.9)),
                    };
                }
                Err(e) => {
                    log::debug!("CSRF token answer not understood ({e}); sending none");
                    self.csrf = Csrf::Disabled;
                }
            },
            // 404: a server older than CSRF support (or not Prefect's API);
            // 422: "CSRF protection is disabled."
            Err(ApiError::Status { status, .. }) if status == 404 || status == 422 => {
                log::debug!("CSRF protection is off on the server");
                self.csrf = Csrf::Disabled;
            }
            Err(e) => {
                log::debug!("CSRF token not available: {e}");
                self.csrf = Csrf::Unknown;
            }
        }
    }
}

/// The server's refusals for a missing, expired or unknown token (its messages:
/// "Missing CSRF token.", "Missing client identifier.", "Invalid CSRF token or
/// client identifier.").
fn is_csrf_refusal(body: &str) -> bool {
    body.contains("CSRF token") || body.contains("client identifier")
}

/// How long a token lives, as the shorter of two estimates, so that neither a
/// skewed clock nor a stale `Date` makes the exporter send an expired token:
/// - on the server's clock: expiration minus the answer's `Date`, less the
///   second `Date` rounds away (uvicorn also refreshes its `Date` only once a
///   second, later under load: it was seen 2 s old on a busy test machine);
/// - on ours: expiration minus now (meaningless when the clocks differ by more
///   than the token's life, so then only the first counts).
fn token_lifetime(expiration: SystemTime, server_date: Option<SystemTime>) -> Option<Duration> {
    let positive = |d: Option<Duration>| d.filter(|d| !d.is_zero());
    let by_server = positive(server_date.and_then(|date| {
        expiration
            .duration_since(date + Duration::from_secs(1))
            .ok()
    }));
    let by_ours = positive(expiration.duration_since(SystemTime::now()).ok());
    match (by_server, by_ours) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `Retry-After` as RFC 9110 allows it: delay-seconds (fractions accepted, as
/// Prefect's client does) or an HTTP-date, measured against `now` (the answer's
/// own `Date` when it has one, so clock skew does not matter).
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<f64>() {
        Ok(s) if s.is_finite() => Duration::from_secs_f64(s.clamp(0.0, 1e9)),
        Ok(_) => return None,
        Err(_) => {
            let at = httpdate::parse_http_date(value).ok()?;
            at.duration_since(now).unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// An RFC 3339 timestamp as Prefect writes them (`2024-05-01T12:00:00.123456Z`).
fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let secs = crate::collect::rfc3339::parse(s)?;
    (secs >= 0.0 && secs.is_finite()).then(|| UNIX_EPOCH + Duration::from_secs_f64(secs))
}

struct Answer {
    status: u16,
    retry_after: Option<Duration>,
    /// The server's `Date`, when it sent one.
    date: Option<SystemTime>,
    body: String,
}

enum SendError {
    Reset(String),
    Timeout,
    Tls(String),
    Other(String),
}

impl From<ureq::Error> for SendError {
    fn from(e: ureq::Error) -> Self {
        if let Some(detail) = tls_failure(&e) {
            return SendError::Tls(detail);
        }
        match e {
            ureq::Error::Timeout(_) => SendError::Timeout,
            ureq::Error::Io(ref io)
                if matches!(
                    io.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::ConnectionAborted
                ) =>
            {
                SendError::Reset(e.to_string())
            }
            ureq::Error::Io(ref io) if io.kind() == io::ErrorKind::TimedOut => SendError::Timeout,
            ureq::Error::HostNotFound => SendError::Other("host not found".into()),
            other => SendError::Other(other.to_string()),
        }
    }
}

/// A TLS failure, told apart from other transport errors so the log can point at
/// the TLS settings. rustls reports handshake failures (an unknown issuer, a
/// wrong name) as an I/O error wrapping its own error.
fn tls_failure(e: &ureq::Error) -> Option<String> {
    match e {
        ureq::Error::Rustls(r) => Some(r.to_string()),
        ureq::Error::Tls(s) => Some((*s).to_string()),
        ureq::Error::Pem(p) => Some(p.to_string()),
        ureq::Error::TlsRequired => Some("the server requires TLS".into()),
        ureq::Error::Io(io) => io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .map(|r| r.to_string()),
        _ => None,
    }
}

fn decode<T: DeserializeOwned>(call: &Call, text: &str) -> Result<T, ApiError> {
    serde_json::from_str(text).map_err(|e| ApiError::Decode {
        path: format!("{} {}", call.method, call.path),
        detail: format!("{e}; body starts with {}", summarize(text)),
    })
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// A short, single-line, printable excerpt of a body for logs.
fn summarize(body: &str) -> String {
    let one_line: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(160)
        .collect();
    let trimmed = one_line.trim();
    if body.chars().count() > 160 {
        format!("{trimmed}...")
    } else {
        trimmed.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_are_short_single_lines() {
        let s = summarize(&format!("line1\nline2{}", "x".repeat(500)));
        assert!(!s.contains('\n'));
        assert!(s.len() < 200);
        assert!(s.ends_with("..."));
    }

    #[test]
    fn retry_after_seconds_and_http_dates() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(parse_retry_after("1", now), Some(Duration::from_secs(1)));
        assert_eq!(
            parse_retry_after(" 0.5 ", now),
            Some(Duration::from_millis(500))
        );
        assert_eq!(parse_retry_after("-3", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now),
            Some(Duration::from_secs(10))
        );
        // The obsolete forms RFC 9110 still asks recipients to accept.
        assert_eq!(
            parse_retry_after("Sunday, 06-Nov-94 08:49:40 GMT", now),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            parse_retry_after("Sun Nov  6 08:49:39 1994", now),
            Some(Duration::from_secs(2))
        );
        // A date in the past: retry at once.
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("NaN", now), None);
    }

    #[test]
    fn rfc3339_timestamps() {
        let at = |s| parse_rfc3339(s).map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64());
        assert_eq!(at("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(at("2024-02-29T12:30:15Z"), Some(1_709_209_815.0));
        assert_eq!(at("2024-02-29T12:30:15.250000Z"), Some(1_709_209_815.25));
        assert_eq!(at("2024-02-29T14:30:15+02:00"), Some(1_709_209_815.0));
        assert_eq!(at("2024-02-29T10:30:15.5-02:00"), Some(1_709_209_815.5));
        assert_eq!(at("2000-03-01T00:00:00+00:00"), Some(951_868_800.0));
        for bad in [
            "",
            "2024-02-29",
            "2024-13-01T00:00:00Z",
            "2024-02-29T12:30:15",
            "x024-02-29T12:30:15Z",
            "2024-02-29T12:30:15.Z",
        ] {
            assert_eq!(at(bad), None, "{bad}");
        }
    }

    #[test]
    fn token_lifetime_takes_the_safer_of_both_clocks() {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let close = |got: Option<Duration>, want: u64| {
            let got = got.expect("a lifetime").as_secs_f64();
            assert!((got - want as f64).abs() < 2.0, "{got} vs {want}");
        };
        // Clocks agree, Date fresh: an hour less the rounding second.
        close(token_lifetime(now + hour, Some(now)), 3599);
        // Clocks agree, Date 2 s stale (a busy server): ours is shorter, and used.
        close(
            token_lifetime(
                now + Duration::from_secs(4),
                Some(now - Duration::from_secs(2)),
            ),
            4,
        );
        // The server's clock an hour behind ours: its own Date decides.
        let server_now = now - hour;
        close(
            token_lifetime(server_now + Duration::from_secs(60), Some(server_now)),
            59,
        );
        // The server's clock an hour ahead: ours would say 61 min; Date says 1 min.
        let server_now = now + hour;
        close(
            token_lifetime(server_now + Duration::from_secs(60), Some(server_now)),
            59,
        );
        // No Date: our clock only.
        close(token_lifetime(now + hour, None), 3600);
        // Already expired by both.
        assert_eq!(token_lifetime(now - hour, Some(now)), None);
    }

    #[test]
    fn csrf_refusals_are_recognised() {
        for body in [
            r#"{"detail":"Missing CSRF token."}"#,
            r#"{"detail":"Missing client identifier."}"#,
            r#"{"detail":"Invalid CSRF token or client identifier."}"#,
        ] {
            assert!(is_csrf_refusal(body), "{body}");
        }
        assert!(!is_csrf_refusal(r#"{"detail":"Forbidden"}"#));
    }

    #[test]
    fn error_messages_point_at_the_setting_to_fix() {
        let e = ApiError::Status {
            path: "POST /flow_runs/count".into(),
            status: 401,
            detail: String::new(),
        };
        assert!(e.to_string().contains("PREFECT_API_AUTH_STRING"));
        let e = ApiError::Status {
            path: "POST /flow_runs/count".into(),
            status: 404,
            detail: "Not Found".into(),
        };
        assert!(e.to_string().contains("PREFECT_API_URL"));
        let e = ApiError::Status {
            path: "POST /flow_runs/count".into(),
            status: 403,
            detail: r#"{"detail":"Missing CSRF token."}"#.into(),
        };
        assert!(e
            .to_string()
            .contains("PREFECT_CLIENT_CSRF_SUPPORT_ENABLED"));
        let e = ApiError::Tls {
            path: "POST /flow_runs/count".into(),
            detail: "invalid peer certificate: UnknownIssuer".into(),
        };
        assert!(e.to_string().contains("PREFECT_API_SSL_CERT_FILE"));
    }
}
