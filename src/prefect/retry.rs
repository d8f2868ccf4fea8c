//! When to try a request again, and how long to wait first.

use std::time::{Duration, SystemTime};

/// Backoff between retries when the server gives no `Retry-After`.
pub(super) const FIRST_BACKOFF: Duration = Duration::from_millis(500);
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Longest `Retry-After` taken at its word; longer ones stop retrying anyway,
/// since no collection lasts an hour.
pub(super) const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Answers worth another try: the request may succeed later (rate limit, a proxy
/// or load balancer between restarts, a server that timed out reading). Prefect's
/// own client retries the same codes.
pub(super) const RETRY_STATUSES: &[u16] = &[408, 429, 502, 503];

/// `Retry-After` as RFC 9110 allows it: delay-seconds (fractions accepted, as
/// Prefect's client does) or an HTTP-date, measured against `now` (the answer's
/// own `Date` when it has one, so clock skew does not matter).
pub(super) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

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
}
