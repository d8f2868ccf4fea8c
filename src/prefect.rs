//! The Prefect REST client: one place that knows how to talk to Prefect safely
//! (auth, JSON content type, timeouts bounded by the collection's deadline,
//! retries, CSRF), so the collect groups only say *what* to ask.

use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use ureq::tls::{parse_pem, PemItem, RootCerts, TlsConfig};

use crate::config::{Auth, Config, ConfigError};

/// Answers larger than this are refused rather than buffered: a misconfigured URL
/// pointing at a file server must not eat the exporter's memory.
const MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;
/// Backoff between retries when the server gives no `Retry-After`.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// No HTTP answer: refused connection, unknown host, TLS failure, reset.
    Transport { path: String, detail: String },
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
            ApiError::Timeout { path, after } => {
                write!(f, "{path}: no answer within {:.1}s", after.as_secs_f64())
            }
            ApiError::Status {
                path,
                status,
                detail,
            } => {
                let hint = match status {
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
    /// Not asked yet: the first POST will ask.
    Unknown,
    /// The server said it has no CSRF protection, or the user turned support off.
    Disabled,
    Token(String),
}

pub struct Client {
    agent: ureq::Agent,
    base: String,
    auth_header: Option<String>,
    custom_headers: Vec<(String, String)>,
    request_timeout: Duration,
    max_retries: u32,
    csrf: Csrf,
    csrf_client_id: String,
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
            let var = if std::env::var_os("PREFECT_API_SSL_CERT_FILE").is_some() {
                "PREFECT_API_SSL_CERT_FILE"
            } else {
                "SSL_CERT_FILE"
            };
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
            tls = tls.root_certs(RootCerts::new_with_certs(&certs));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .user_agent(concat!("prefect-exporter/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls.build())
            // The server closes idle keep-alive connections after 5 s; a small pool
            // is all one sequential collector needs.
            .max_idle_connections(2)
            .max_idle_connections_per_host(2)
            .max_idle_age(Duration::from_secs(4))
            .build()
            .into();
        let auth_header = match &config.auth {
            Auth::None => None,
            Auth::Basic(s) => Some(format!("Basic {}", base64(s.as_bytes()))),
            Auth::Bearer(k) => Some(format!("Bearer {k}")),
        };
        Ok(Client {
            agent,
            base: config.api_url.clone(),
            auth_header,
            custom_headers: config.custom_headers.clone(),
            request_timeout: config.request_timeout,
            max_retries: config.max_retries,
            csrf: if config.csrf_enabled {
                Csrf::Unknown
            } else {
                Csrf::Disabled
            },
            csrf_client_id: random_uuid(),
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
        let text = self.send(&call, deadline)?;
        decode(&call, &text)
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
        let text = self.send(&call, deadline)?;
        decode(&call, &text)
    }

    /// Sends with retries, all inside `deadline`, and returns the body of a 2xx.
    fn send(&mut self, call: &Call, deadline: Instant) -> Result<String, ApiError> {
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
            match self.send_once(call, timeout) {
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
                Err(SendError::Other(detail)) => {
                    return Err(ApiError::Transport { path: what, detail })
                }
                Ok(answer) if (200..300).contains(&answer.status) => return Ok(answer.body),
                Ok(answer) => {
                    if answer.status == 403
                        && matches!(self.csrf, Csrf::Token(_))
                        && !csrf_retried
                        && answer.body.contains("CSRF")
                    {
                        log::debug!("{what}: CSRF token refused, fetching a new one");
                        self.csrf = Csrf::Unknown;
                        csrf_retried = true;
                        continue;
                    }
                    if matches!(answer.status, 429 | 502 | 503) && retries_left > 0 {
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
                    }
                    return Err(ApiError::Status {
                        path: what,
                        status: answer.status,
                        detail: summarize(&answer.body),
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
        if let (Csrf::Token(token), "POST") = (&self.csrf, call.method) {
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
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Duration::from_secs_f64(s.min(3600.0)));
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_BODY_BYTES)
            .read_to_string()
            .map_err(SendError::from)?;
        Ok(Answer {
            status,
            retry_after,
            body,
        })
    }

    /// Asks for a CSRF token once; a server without CSRF protection says so and
    /// is never asked again.
    fn ensure_csrf_token(&mut self, deadline: Instant) {
        if !matches!(self.csrf, Csrf::Unknown) {
            return;
        }
        #[derive(serde::Deserialize)]
        struct Token {
            token: String,
        }
        let path = format!("/csrf-token?client={}", self.csrf_client_id);
        let timeout = remaining(deadline).min(self.request_timeout);
        let call = Call {
            method: "GET",
            path: &path,
            body: None,
        };
        match self.send_once(&call, timeout) {
            Ok(a) if a.status == 200 => match serde_json::from_str::<Token>(&a.body) {
                Ok(t) => {
                    log::debug!("CSRF protection is on: token received");
                    self.csrf = Csrf::Token(t.token);
                }
                Err(_) => self.csrf = Csrf::Disabled,
            },
            Ok(a) if a.status == 422 || a.status == 404 => {
                log::debug!("CSRF protection is off on the server");
                self.csrf = Csrf::Disabled;
            }
            // Transient: leave Unknown, the POST itself will report the problem.
            _ => {}
        }
    }
}

struct Answer {
    status: u16,
    retry_after: Option<Duration>,
    body: String,
}

enum SendError {
    Reset(String),
    Timeout,
    Other(String),
}

impl From<ureq::Error> for SendError {
    fn from(e: ureq::Error) -> Self {
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

fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A random v4 UUID for the CSRF client id, from the standard library's
/// randomly seeded hasher (no extra crate for 16 random bytes).
fn random_uuid() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut bytes = [0u8; 16];
    for half in bytes.chunks_mut(8) {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"admin:pass"), "YWRtaW46cGFzcw==");
    }

    #[test]
    fn uuid_has_v4_shape_and_differs() {
        let a = random_uuid();
        let b = random_uuid();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert_ne!(a, b);
    }

    #[test]
    fn summaries_are_short_single_lines() {
        let s = summarize(&format!("line1\nline2{}", "x".repeat(500)));
        assert!(!s.contains('\n'));
        assert!(s.len() < 200);
        assert!(s.ends_with("..."));
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
    }
}
