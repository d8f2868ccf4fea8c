//! The timestamps Prefect speaks (`2026-11-24T20:19:28.070645Z`), to and from
//! Unix seconds, with the `time` crate (already in the tree through simplelog).

use std::time::{SystemTime, UNIX_EPOCH};

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::OffsetDateTime;

/// Now, as Unix seconds.
pub fn now() -> f64 {
    unix(SystemTime::now())
}

pub fn unix(t: SystemTime) -> f64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`; a space may stand for the `T`
/// (RFC 3339 allows it; the `time` crate wants the `T`).
pub fn parse(s: &str) -> Option<f64> {
    let s = s.trim();
    let t = match s.as_bytes().get(10) {
        Some(b' ') => OffsetDateTime::parse(&format!("{}T{}", &s[..10], &s[11..]), &Rfc3339),
        _ => OffsetDateTime::parse(s, &Rfc3339),
    }
    .ok()?;
    Some(t.unix_timestamp() as f64 + f64::from(t.nanosecond()) / 1e9)
}

/// Formats Unix seconds as UTC with microseconds, the precision Prefect stores.
/// Empty outside the years 0 to 9999, which no Prefect timestamp leaves.
pub fn format(secs: f64) -> String {
    let micros = (secs * 1e6).round() as i128;
    OffsetDateTime::from_unix_timestamp_nanos(micros * 1000)
        .ok()
        .and_then(|t| {
            t.format(format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
            ))
            .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_prefect_sends() {
        assert_eq!(parse("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(parse("2000-03-01T00:00:00Z"), Some(951_868_800.0));
        let t = parse("2026-11-24T20:19:28.070645Z").unwrap();
        assert!((t - 1_795_551_568.070645).abs() < 1e-6, "{t}");
        assert_eq!(
            parse("2026-11-24T21:19:28+01:00"),
            parse("2026-11-24T20:19:28Z")
        );
        assert_eq!(
            parse("2026-11-24 20:19:28.5-00:30"),
            Some(parse("2026-11-24T20:49:28Z").unwrap() + 0.5)
        );
        // Before the epoch, and leap years.
        assert_eq!(parse("1969-12-31T23:59:59Z"), Some(-1.0));
        assert_eq!(parse("2024-02-29T00:00:00Z"), Some(1_709_164_800.0));
    }

    #[test]
    fn refuses_what_is_not_a_timestamp() {
        for s in [
            "",
            "2026-11-24",
            "2026-11-24T20:19:28",
            "2026-13-24T20:19:28Z",
            "2026-11-24T20:19:28.Z",
            "2026-11-24T20:19:28+0100",
            "2026-11-24T2x:19:28Z",
            "yesterday at noon, roughly",
        ] {
            assert_eq!(parse(s), None, "{s}");
        }
    }

    #[test]
    fn format_round_trips_with_microseconds() {
        for s in [
            "1970-01-01T00:00:00.000000Z",
            "2026-11-24T20:19:28.070645Z",
            "2024-02-29T23:59:59.999999Z",
            "1900-03-01T12:00:00.000001Z",
            "2046-11-19T21:43:21.226768Z",
        ] {
            assert_eq!(format(parse(s).unwrap()), s);
        }
    }
}
