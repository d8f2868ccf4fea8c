//! One request and its answer: the call, the answer, transport errors told
//! apart (reset, timeout, TLS), and decoding of the JSON body.

use std::io;
use std::time::{Duration, Instant, SystemTime};

use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A request the client may send: method, path below the API base, JSON body.
pub(super) struct Call<'a> {
    pub(super) method: &'static str,
    pub(super) path: &'a str,
    pub(super) body: Option<Vec<u8>>,
}

pub(super) struct Answer {
    pub(super) status: u16,
    pub(super) retry_after: Option<Duration>,
    /// The server's `Date`, when it sent one.
    pub(super) date: Option<SystemTime>,
    pub(super) body: String,
}

pub(super) enum SendError {
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
pub(super) fn tls_failure(e: &ureq::Error) -> Option<String> {
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

pub(super) fn decode<T: DeserializeOwned>(call: &Call, text: &str) -> Result<T, ApiError> {
    serde_json::from_str(text).map_err(|e| ApiError::Decode {
        path: format!("{} {}", call.method, call.path),
        detail: format!("{e}; body starts with {}", summarize(text)),
    })
}

pub(super) fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// A short, single-line, printable excerpt of a body for logs.
pub(super) fn summarize(body: &str) -> String {
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
}
