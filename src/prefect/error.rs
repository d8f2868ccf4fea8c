//! `ApiError`: what went wrong with a request, and which setting to check.

use std::fmt;
use std::time::Duration;

use super::csrf::is_csrf_refusal;

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

#[cfg(test)]
mod tests {
    use super::*;

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
