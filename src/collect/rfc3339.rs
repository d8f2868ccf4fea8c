//! The timestamps Prefect speaks (`2026-11-24T20:19:28.070645Z`), to and from
//! Unix seconds. Small enough not to need a date crate: UTC only, which is all
//! the API sends (offsets are accepted and applied all the same).

use std::time::{SystemTime, UNIX_EPOCH};

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

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`; a space may stand for the `T`.
pub fn parse(s: &str) -> Option<f64> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        let part = s.get(from..to)?;
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    // Leap seconds (60) are folded into the next second.
    if second > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut fraction = 0.0;
    if let Some(r) = rest.strip_prefix('.') {
        let digits = r.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        fraction = format!("0.{}", &r[..digits]).parse().ok()?;
        rest = &r[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let o = rest.as_bytes();
            if o.len() != 6 || !matches!(o[0], b'+' | b'-') || o[3] != b':' {
                return None;
            }
            let h: i64 = rest[1..3].parse().ok()?;
            let m: i64 = rest[4..6].parse().ok()?;
            let sign = if o[0] == b'-' { -1 } else { 1 };
            sign * (h * 3600 + m * 60)
        }
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset;
    Some(secs as f64 + fraction)
}

/// Formats Unix seconds as UTC with microseconds, the precision Prefect stores.
pub fn format(secs: f64) -> String {
    let micros_total = (secs * 1e6).round() as i64;
    let whole = micros_total.div_euclid(1_000_000);
    let micros = micros_total.rem_euclid(1_000_000);
    let days = whole.div_euclid(86_400);
    let of_day = whole.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
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
