//! Parsing of the variables' values: one function per kind of value, each
//! naming the variable and what it expected when a value is unusable.

use std::time::Duration;

use log::LevelFilter;

use super::error::{invalid, ConfigError};

/// Headers that the exporter sets itself; a custom header must not replace them,
/// or a stray setting could silently change who the exporter authenticates as.
const PROTECTED_HEADERS: &[&str] = &[
    "authorization",
    "user-agent",
    "prefect-csrf-token",
    "prefect-csrf-client",
    "content-type",
    "content-length",
    "host",
];

pub(super) fn env_value(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    env(name).filter(|v| !v.trim().is_empty())
}

pub(super) fn parse_url(v: &str) -> Result<String, ConfigError> {
    let bad = || {
        invalid(
            "PREFECT_API_URL",
            v.to_string(),
            "expected an http:// or https:// URL such as http://127.0.0.1:4200/api",
        )
    };
    let v = v.trim();
    let rest = v
        .strip_prefix("http://")
        .or_else(|| v.strip_prefix("https://"))
        .ok_or_else(bad)?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || host.starts_with(':') || v.chars().any(char::is_whitespace) {
        return Err(bad());
    }
    // Credentials in the URL would end up in logs; they belong in the auth string.
    if host.contains('@') {
        return Err(invalid(
            "PREFECT_API_URL",
            "***".into(),
            "credentials in the URL are not supported: use PREFECT_API_AUTH_STRING",
        ));
    }
    Ok(v.trim_end_matches('/').to_string())
}

pub(super) fn parse_positive_int(
    var: &'static str,
    v: &str,
    expected: &'static str,
) -> Result<u64, ConfigError> {
    v.trim()
        .parse::<u64>()
        .ok()
        .filter(|n| *n >= 1 && *n <= 86_400 * 365)
        .ok_or_else(|| invalid(var, v.to_string(), expected))
}

pub(super) fn parse_seconds(var: &'static str, v: &str) -> Result<Duration, ConfigError> {
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s <= 86_400.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| invalid(var, v.to_string(), "expected a number of seconds above 0"))
}

pub(super) fn parse_bool(var: &'static str, v: &str) -> Result<bool, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(invalid(var, v.to_string(), "expected true or false")),
    }
}

pub(super) fn parse_log_level(v: &str) -> Result<LevelFilter, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "trace" => Ok(LevelFilter::Trace),
        "debug" => Ok(LevelFilter::Debug),
        "info" => Ok(LevelFilter::Info),
        "warn" | "warning" => Ok(LevelFilter::Warn),
        "error" | "critical" => Ok(LevelFilter::Error),
        "off" => Ok(LevelFilter::Off),
        _ => Err(invalid(
            "LOG_LEVEL",
            v.to_string(),
            "expected trace, debug, info, warn, error or off",
        )),
    }
}

/// Blank entries and repeats are dropped: `a,,b,a` watches a and b once each,
/// so the missing count can never exceed the number of distinct names.
pub fn parse_name_list(v: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if !out.iter().any(|n| n == name) {
            out.push(name.to_string());
        }
    }
    out
}

/// What an HTTP header value may hold: printable ASCII, spaces and tabs. Anything
/// else would make every request fail, so it is refused at start instead.
pub(super) fn is_header_value(v: &str) -> bool {
    v.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
}

/// A number of seconds with an optional unit (`90`, `1.5m`, `2h`, `1d`).
fn seconds_with_unit(v: &str) -> Option<f64> {
    let t = v.trim();
    let (digits, factor) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (
            &t[..i],
            match c.to_ascii_lowercase() {
                's' => 1.0,
                'm' => 60.0,
                'h' => 3600.0,
                'd' => 86_400.0,
                _ => return None,
            },
        ),
        _ => (t, 1.0),
    };
    let n: f64 = digits.trim().parse().ok()?;
    Some(n * factor).filter(|s| s.is_finite())
}

/// From 0 (count up to now: for servers known to store events at once) to an hour.
pub(super) fn parse_settle(v: &str) -> Result<Duration, ConfigError> {
    seconds_with_unit(v)
        .filter(|s| (0.0..=3600.0).contains(s))
        .map(Duration::from_secs_f64)
        .ok_or_else(|| {
            invalid(
                "EXPORTER_EVENTS_SETTLE",
                v.to_string(),
                "expected seconds or a number with s, m or h (e.g. 30s), from 0 to 1h",
            )
        })
}

/// Increasing upper bounds (`+Inf` is implied), at most 50 of them.
pub(super) fn parse_buckets(v: &str) -> Result<Vec<f64>, ConfigError> {
    let bad = || {
        invalid(
            "EXPORTER_DURATION_BUCKETS",
            v.to_string(),
            "expected increasing positive seconds separated by commas, at most 50 \
             (e.g. 1,10,60,10m,1h,1d)",
        )
    };
    let mut out: Vec<f64> = Vec::new();
    for part in v.split(',') {
        let b = seconds_with_unit(part)
            .filter(|b| *b > 0.0)
            .ok_or_else(bad)?;
        if out.last().is_some_and(|last| b <= *last) {
            return Err(bad());
        }
        out.push(b);
    }
    if out.len() > 50 {
        return Err(bad());
    }
    Ok(out)
}

/// Seconds, or a number with a unit: `90`, `90s`, `15m`, `12h`, `7d`.
pub(super) fn parse_lookback(v: &str) -> Result<Duration, ConfigError> {
    let t = v.trim();
    let (digits, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c.to_ascii_lowercase()),
        _ => (t, 's'),
    };
    let factor = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => 0,
    };
    digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(factor))
        .filter(|s| *s >= 1 && *s <= 86_400 * 3650)
        .map(Duration::from_secs)
        .ok_or_else(|| {
            invalid(
                "EXPORTER_LOOKBACK",
                v.to_string(),
                "expected seconds or a number with s, m, h or d (e.g. 7d), from 1s to 3650d",
            )
        })
}

/// Like EXPORTER_LOOKBACK, and 0 (every collection) is allowed.
pub(super) fn parse_max_age(v: &str) -> Result<Duration, ConfigError> {
    let zero = v.trim().trim_end_matches(|c: char| "smhdSMHD".contains(c));
    if zero.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_lookback(v).map_err(|_| {
        invalid(
            "EXPORTER_FLOW_RUNS_MAX_AGE",
            v.to_string(),
            "expected seconds or a number with s, m, h or d (e.g. 10m), from 0 to 3650d",
        )
    })
}

pub(super) fn parse_headers(
    v: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let expected =
        "expected a JSON object of header names to string values, e.g. {\"X-Team\": \"data\"}";
    // The value may hold tokens: never echo it.
    let bad = || invalid("PREFECT_CLIENT_CUSTOM_HEADERS", "***".into(), expected);
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(v).map_err(|_| bad())?;
    let mut out = Vec::new();
    for (name, value) in map {
        let value = value.as_str().ok_or_else(bad)?.to_string();
        let valid_name = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !valid_name || !is_header_value(&value) {
            return Err(bad());
        }
        if PROTECTED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            warnings.push(format!(
                "PREFECT_CLIENT_CUSTOM_HEADERS: header {name} is set by the exporter itself and is ignored"
            ));
            continue;
        }
        out.push((name, value));
    }
    Ok(out)
}
