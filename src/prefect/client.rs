//! The client: request building, auth, retries inside the collection's
//! deadline, CSRF tokens, and the count of requests by HTTP status.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::de::DeserializeOwned;
use serde::Serialize;
use ureq::tls::{parse_pem, PemItem, RootCerts, TlsConfig};
use ureq::unversioned::transport::DefaultConnector;

use super::csrf::{is_csrf_refusal, parse_rfc3339, token_lifetime, Csrf};
use super::error::ApiError;
use super::http::{decode, remaining, summarize, Answer, Call, SendError};
use super::resolver::CachingResolver;
use super::retry::{parse_retry_after, FIRST_BACKOFF, MAX_BACKOFF, RETRY_STATUSES};
use crate::config::{Auth, Config, ConfigError};

/// Answers larger than this are refused rather than buffered: a misconfigured URL
/// pointing at a file server must not eat the exporter's memory.
const MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;

/// Per-connection read and write buffers, and the largest response header.
const IO_BUFFER: usize = 16 * 1024;

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
