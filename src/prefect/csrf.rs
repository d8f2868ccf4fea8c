//! CSRF tokens: the client's state, the server's refusals, and how long a token
//! may be used.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub(super) enum Csrf {
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

/// The server's refusals for a missing, expired or unknown token (its messages:
/// "Missing CSRF token.", "Missing client identifier.", "Invalid CSRF token or
/// client identifier.").
pub(super) fn is_csrf_refusal(body: &str) -> bool {
    body.contains("CSRF token") || body.contains("client identifier")
}

/// How long a token lives, as the shorter of two estimates, so that neither a
/// skewed clock nor a stale `Date` makes the exporter send an expired token:
/// - on the server's clock: expiration minus the answer's `Date`, less the
///   second `Date` rounds away (uvicorn also refreshes its `Date` only once a
///   second, later under load: it was seen 2 s old on a busy test machine);
/// - on ours: expiration minus now (meaningless when the clocks differ by more
///   than the token's life, so then only the first counts).
pub(super) fn token_lifetime(
    expiration: SystemTime,
    server_date: Option<SystemTime>,
) -> Option<Duration> {
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

/// An RFC 3339 timestamp as Prefect writes them (`2024-05-01T12:00:00.123456Z`).
pub(super) fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let secs = crate::rfc3339::parse(s)?;
    (secs >= 0.0 && secs.is_finite()).then(|| UNIX_EPOCH + Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
