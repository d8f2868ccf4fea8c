//! The settings table and `Config`: every variable read once from the
//! environment (and the active Prefect profile) and validated before anything
//! starts.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use log::LevelFilter;

use super::collectors::{parse_collectors, Collectors};
use super::error::{invalid, ConfigError};
use super::parse::{
    env_value, is_header_value, parse_bool, parse_buckets, parse_headers, parse_log_level,
    parse_lookback, parse_max_age, parse_name_list, parse_positive_int, parse_seconds,
    parse_settle, parse_url,
};
use super::profiles::{self, env_then_profile};
use super::proxy::{self, ProxyChoice};

pub const DEFAULT_API_URL: &str = "http://127.0.0.1:4200/api";
pub const DEFAULT_PORT: u16 = 8080;
pub const DEFAULT_INTERVAL_SECS: u64 = 30;
pub const DEFAULT_MAX_REQUEST_TIMEOUT_SECS: f64 = 60.0;
pub const DEFAULT_MAX_RETRIES: u32 = 5;
/// Prefect Cloud's API: CSRF tokens are a self-hosted feature, Prefect's own
/// client never asks Cloud for one, and neither does the exporter.
pub const PREFECT_CLOUD_API_URL: &str = "https://api.prefect.cloud/";
pub const DEFAULT_LOOKBACK_SECS: u64 = 7 * 86_400;
pub const DEFAULT_FLOW_RUNS_MAX_AGE_SECS: u64 = 600;
pub const DEFAULT_MAX_DEPLOYMENTS: usize = 1000;
pub const DEFAULT_MAX_LISTED_RUNS: usize = 1000;
/// How long a window of events waits before it is counted (see collect/events.rs).
pub const DEFAULT_EVENTS_SETTLE_SECS: u64 = 30;
/// Seconds to a day in 13 steps.
pub const DEFAULT_DURATION_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0,
];

/// Every variable the exporter reads, with its default and meaning: the single
/// source for `--help` and the table of docs/settings.md.
pub const SETTINGS: &[(&str, &str, &str)] = &[
    (
        "PREFECT_API_URL",
        DEFAULT_API_URL,
        "Prefect API base URL (self-hosted .../api or a Prefect Cloud workspace URL)",
    ),
    (
        "PREFECT_API_AUTH_STRING",
        "unset",
        "user:pass for a self-hosted server with basic auth (wins over the key)",
    ),
    (
        "PREFECT_API_KEY",
        "unset",
        "Prefect Cloud API key, sent as a Bearer token",
    ),
    (
        "PREFECT_API_REQUEST_TIMEOUT",
        "min(60, EXPORTER_INTERVAL)",
        "seconds one request to Prefect may take",
    ),
    (
        "PREFECT_CLIENT_MAX_RETRIES",
        "5",
        "retries on 408/429/502/503 (honouring Retry-After) and on a reset reused connection, within the collection",
    ),
    (
        "PREFECT_CLIENT_CUSTOM_HEADERS",
        "{}",
        "JSON object of extra headers sent to Prefect",
    ),
    (
        "PREFECT_API_SSL_CERT_FILE",
        "SSL_CERT_FILE, else built-in roots",
        "PEM file of CA certificates to trust for https",
    ),
    (
        "PREFECT_API_TLS_INSECURE_SKIP_VERIFY",
        "false",
        "true to skip certificate checks (logged as a warning)",
    ),
    (
        "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED",
        "true",
        "fetch and send CSRF tokens when the server asks for them",
    ),
    (
        "PREFECT_PROFILES_PATH",
        "$PREFECT_HOME/profiles.toml",
        "Prefect profiles file; its active profile fills the PREFECT_* client settings the environment lacks",
    ),
    ("PREFECT_HOME", "~/.prefect", "Prefect home directory (holds profiles.toml)"),
    (
        "PREFECT_PROFILE",
        "the file's `active`",
        "name of the profile to read from the profiles file",
    ),
    (
        "HTTPS_PROXY / HTTP_PROXY",
        "unset",
        "proxy for https / http Prefect URLs (also lower case, ALL_PROXY as a fallback)",
    ),
    (
        "NO_PROXY",
        "unset",
        "comma-separated hosts, domains, IPs or CIDR blocks reached without the proxy",
    ),
    (
        "EXPORTER_ADDRESS",
        "all interfaces",
        "IP address to listen on",
    ),
    (
        "EXPORTER_PORT",
        "8080",
        "TCP port of the /metrics endpoint (0: any free port)",
    ),
    ("EXPORTER_INTERVAL", "30", "seconds between two collections"),
    (
        "LOG_LEVEL",
        "INFO",
        "trace, debug, info, warn(ing), error or off",
    ),
    (
        "EXPORTER_CHECK_DEPLOYMENTS",
        "empty",
        "comma-separated flow names that must have a deployment",
    ),
    (
        "EXPORTER_COLLECTORS",
        "flow_runs,deployments,work_pools,work_queues,active_flow_runs,concurrency_limits,events",
        "comma-separated breakdown groups (the six specified metrics are always collected)",
    ),
    (
        "EXPORTER_LOOKBACK",
        "7d",
        "how far back the first collection reads runs that ended (seconds, or with s, m, h or d)",
    ),
    (
        "EXPORTER_FLOW_RUNS_MAX_AGE",
        "10m",
        "longest reuse of prefect_flow_runs (read again after 3000 times its read time; 0: every collection)",
    ),
    (
        "EXPORTER_MAX_DEPLOYMENTS",
        "1000",
        "most deployments that get per-deployment series (the newest created first)",
    ),
    (
        "EXPORTER_MAX_LISTED_RUNS",
        "1000",
        "most late runs, and most runs in progress, known and counted per deployment (listed 200 per request when they change); past it the totals stay exact and the series say so",
    ),
    (
        "EXPORTER_EVENTS_SETTLE",
        "30s",
        "how long Prefect's events get to be stored before a window of them is counted (seconds, or with s, m or h)",
    ),
    (
        "EXPORTER_DURATION_BUCKETS",
        "1,5,15,30,60,300,600,1800,3600,7200,14400,43200,86400",
        "upper bounds in seconds (or with s, m, h or d) of the run duration and start delay histogram buckets",
    ),
];

/// Settings that no longer exist, with what replaced them: a user may still
/// have one set, which costs one WARN line at start, not exit 2.
pub const REMOVED_SETTINGS: &[(&str, &str)] = &[(
    "EXPORTER_FLOW_RUNS_READ",
    "prefect_flow_runs is read by the history only: counts by state name could \
     attribute a name to the wrong state type",
)];

/// How the exporter proves who it is to Prefect.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    None,
    /// `user:pass` of a self-hosted server started with an auth string.
    Basic(String),
    /// A Prefect Cloud API key.
    Bearer(String),
}

#[derive(Clone)]
pub struct Config {
    /// Without a trailing slash, so paths can be appended as `/flow_runs/count`.
    pub api_url: String,
    pub auth: Auth,
    pub request_timeout: Duration,
    pub max_retries: u32,
    pub custom_headers: Vec<(String, String)>,
    pub ssl_cert_file: Option<PathBuf>,
    /// The variable `ssl_cert_file` came from, for error messages.
    pub ssl_cert_var: &'static str,
    pub tls_insecure_skip_verify: bool,
    pub csrf_enabled: bool,
    pub proxy: Option<ProxyChoice>,
    /// The active Prefect profile that filled settings missing from the environment.
    pub profile: Option<String>,
    pub address: Option<IpAddr>,
    pub port: u16,
    pub interval: Duration,
    pub log_level: LevelFilter,
    pub check_deployments: Vec<String>,
    pub collectors: Collectors,
    /// How far back the first collection looks for runs that ended.
    pub lookback: Duration,
    /// Cap on the deployments that get per-deployment series.
    pub max_deployments: usize,
    /// Cap on the late runs and on the runs in progress known (and listed when they change).
    pub max_listed_runs: usize,
    /// Settle delay of the state-change counters.
    pub events_settle: Duration,
    /// Bucket upper bounds of the duration histograms, increasing.
    pub duration_buckets: Vec<f64>,
    /// Longest time the per-state breakdown is reused (collect::flow_runs).
    pub flow_runs_max_age: Duration,
    /// How the per-state breakdown is read (collect::flow_runs).
    /// Things worth telling the user that are not errors; logged once logging is up.
    pub warnings: Vec<String>,
}

impl Config {
    /// Reads the settings from the environment, and the Prefect client settings
    /// it lacks from the active Prefect profile (see `profiles`).
    pub fn load(env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let profile = profiles::load(env)?;
        let lookup = env_then_profile(env, profile.as_ref());
        let mut config = Config::from_lookup(&lookup).map_err(|e| match (&e, &profile) {
            (ConfigError::Invalid { var, .. }, Some(p))
                if env_value(env, var).is_none() && p.get(var).is_some() =>
            {
                ConfigError::FromProfile {
                    error: Box::new(e),
                    profile: p.name.clone(),
                    path: p.path.display().to_string(),
                }
            }
            _ => e,
        })?;
        config.profile = profile.as_ref().map(|p| p.to_string());
        Ok(config)
    }

    /// Reads the settings through `lookup` (the process environment in production,
    /// a map in tests). Empty values count as unset, as compose files often leave
    /// `VAR=` lines behind.
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let mut warnings = Vec::new();

        let api_url = match get("PREFECT_API_URL") {
            Some(v) => parse_url(&v)?,
            None => DEFAULT_API_URL.to_string(),
        };

        warnings.extend(cloud_url_warning(
            &api_url,
            get("PREFECT_API_KEY").is_some(),
        ));

        let auth = match (get("PREFECT_API_AUTH_STRING"), get("PREFECT_API_KEY")) {
            (Some(s), key) => {
                if !s.contains(':') {
                    return Err(invalid(
                        "PREFECT_API_AUTH_STRING",
                        "***".into(),
                        "expected user:pass",
                    ));
                }
                if key.is_some() {
                    warnings.push(
                        "both PREFECT_API_AUTH_STRING and PREFECT_API_KEY are set: using the auth string"
                            .to_string(),
                    );
                }
                Auth::Basic(s)
            }
            (None, Some(k)) => {
                let k = k.trim().to_string();
                if !is_header_value(&k) {
                    return Err(invalid(
                        "PREFECT_API_KEY",
                        "***".into(),
                        "expected printable ASCII characters only",
                    ));
                }
                Auth::Bearer(k)
            }
            (None, None) => Auth::None,
        };

        let interval = match get("EXPORTER_INTERVAL") {
            Some(v) => Duration::from_secs(parse_positive_int(
                "EXPORTER_INTERVAL",
                &v,
                "expected a whole number of seconds, at least 1",
            )?),
            None => Duration::from_secs(DEFAULT_INTERVAL_SECS),
        };

        let request_timeout = match get("PREFECT_API_REQUEST_TIMEOUT") {
            Some(v) => parse_seconds("PREFECT_API_REQUEST_TIMEOUT", &v)?,
            None => interval.min(Duration::from_secs_f64(DEFAULT_MAX_REQUEST_TIMEOUT_SECS)),
        };

        let max_retries = match get("PREFECT_CLIENT_MAX_RETRIES") {
            Some(v) => v
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|n| *n <= 100)
                .ok_or_else(|| {
                    invalid(
                        "PREFECT_CLIENT_MAX_RETRIES",
                        v.clone(),
                        "expected a whole number from 0 to 100",
                    )
                })?,
            None => DEFAULT_MAX_RETRIES,
        };

        let custom_headers = match get("PREFECT_CLIENT_CUSTOM_HEADERS") {
            Some(v) => parse_headers(&v, &mut warnings)?,
            None => Vec::new(),
        };

        let (ssl_cert_file, ssl_cert_var) = match get("PREFECT_API_SSL_CERT_FILE") {
            Some(v) => (Some(PathBuf::from(v)), "PREFECT_API_SSL_CERT_FILE"),
            // SSL_CERT_FILE is a machine-wide variable, often inherited from a host
            // that has the file when the exporter's container does not: a missing
            // file there falls back to the built-in roots instead of stopping.
            None => match get("SSL_CERT_FILE").map(PathBuf::from) {
                Some(p) if !p.exists() => {
                    warnings.push(format!(
                        "SSL_CERT_FILE={}: no such file, using the built-in CA roots",
                        p.display()
                    ));
                    (None, "SSL_CERT_FILE")
                }
                other => (other, "SSL_CERT_FILE"),
            },
        };
        let tls_insecure_skip_verify = match get("PREFECT_API_TLS_INSECURE_SKIP_VERIFY") {
            Some(v) => parse_bool("PREFECT_API_TLS_INSECURE_SKIP_VERIFY", &v)?,
            None => false,
        };
        if tls_insecure_skip_verify {
            warnings.push(
                "PREFECT_API_TLS_INSECURE_SKIP_VERIFY=true: TLS certificates of Prefect are NOT checked"
                    .to_string(),
            );
        }
        let csrf_enabled = match get("PREFECT_CLIENT_CSRF_SUPPORT_ENABLED") {
            Some(v) => parse_bool("PREFECT_CLIENT_CSRF_SUPPORT_ENABLED", &v)?,
            None => true,
        } && !api_url.starts_with(PREFECT_CLOUD_API_URL);
        let proxy = proxy::choose(&api_url, lookup)?;

        let address = match get("EXPORTER_ADDRESS") {
            Some(v) => Some(
                v.trim()
                    .trim_matches(['[', ']'])
                    .parse::<IpAddr>()
                    .map_err(|_| {
                        invalid(
                            "EXPORTER_ADDRESS",
                            v.clone(),
                            "expected an IP address such as 0.0.0.0, 127.0.0.1 or ::",
                        )
                    })?,
            ),
            None => None,
        };

        let port = match get("EXPORTER_PORT") {
            Some(v) => v.trim().parse::<u16>().map_err(|_| {
                invalid(
                    "EXPORTER_PORT",
                    v.clone(),
                    "not a port number (expected 0 to 65535)",
                )
            })?,
            None => DEFAULT_PORT,
        };

        let log_level = match get("LOG_LEVEL") {
            Some(v) => parse_log_level(&v)?,
            None => LevelFilter::Info,
        };

        let check_deployments = get("EXPORTER_CHECK_DEPLOYMENTS")
            .map(|v| parse_name_list(&v))
            .unwrap_or_default();

        let collectors = match get("EXPORTER_COLLECTORS") {
            Some(v) => parse_collectors(&v)?,
            None => Collectors::default(),
        };

        let lookback = match get("EXPORTER_LOOKBACK") {
            Some(v) => parse_lookback(&v)?,
            None => Duration::from_secs(DEFAULT_LOOKBACK_SECS),
        };

        let max_deployments = match get("EXPORTER_MAX_DEPLOYMENTS") {
            Some(v) => parse_positive_int(
                "EXPORTER_MAX_DEPLOYMENTS",
                &v,
                "expected a whole number of deployments, at least 1",
            )? as usize,
            None => DEFAULT_MAX_DEPLOYMENTS,
        };

        let max_listed_runs = match get("EXPORTER_MAX_LISTED_RUNS") {
            Some(v) => parse_positive_int(
                "EXPORTER_MAX_LISTED_RUNS",
                &v,
                "expected a whole number of runs, at least 1",
            )? as usize,
            None => DEFAULT_MAX_LISTED_RUNS,
        };

        let events_settle = match get("EXPORTER_EVENTS_SETTLE") {
            Some(v) => parse_settle(&v)?,
            None => Duration::from_secs(DEFAULT_EVENTS_SETTLE_SECS),
        };

        let duration_buckets = match get("EXPORTER_DURATION_BUCKETS") {
            Some(v) => parse_buckets(&v)?,
            None => DEFAULT_DURATION_BUCKETS.to_vec(),
        };

        let flow_runs_max_age = match get("EXPORTER_FLOW_RUNS_MAX_AGE") {
            Some(v) => parse_max_age(&v)?,
            None => Duration::from_secs(DEFAULT_FLOW_RUNS_MAX_AGE_SECS),
        };

        for (name, instead) in REMOVED_SETTINGS {
            if get(name).is_some() {
                warnings.push(format!("{name} is no longer read, and ignored: {instead}"));
            }
        }

        Ok(Config {
            api_url,
            auth,
            request_timeout,
            max_retries,
            custom_headers,
            ssl_cert_file,
            ssl_cert_var,
            tls_insecure_skip_verify,
            csrf_enabled,
            proxy,
            profile: None,
            address,
            port,
            interval,
            log_level,
            check_deployments,
            collectors,
            lookback,
            max_deployments,
            max_listed_runs,
            events_settle,
            duration_buckets,
            flow_runs_max_age,
            warnings,
        })
    }
}

/// What start-up logs print: every setting, secrets as `***`.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth = match self.auth {
            Auth::None => "none",
            Auth::Basic(_) => "basic ***",
            Auth::Bearer(_) => "bearer ***",
        };
        let address = self
            .address
            .map(|a| a.to_string())
            .unwrap_or_else(|| "all interfaces".into());
        let headers: Vec<String> = self
            .custom_headers
            .iter()
            .map(|(k, _)| format!("{k}: ***"))
            .collect();
        write!(
            f,
            "api_url={} auth={} request_timeout={}s max_retries={} custom_headers=[{}] \
             ca_file={} tls_skip_verify={} csrf={} proxy={} profile={} address={} port={} \
             interval={}s log_level={} check_deployments=[{}] collectors=[{}] lookback={}s \
             max_deployments={} max_listed_runs={} events_settle={}s duration_buckets=[{}] \
             flow_runs_max_age={}s",
            self.api_url,
            auth,
            self.request_timeout.as_secs_f64(),
            self.max_retries,
            headers.join(", "),
            self.ssl_cert_file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "built-in".into()),
            self.tls_insecure_skip_verify,
            self.csrf_enabled,
            self.proxy
                .as_ref()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "none".into()),
            self.profile.as_deref().unwrap_or("none"),
            address,
            self.port,
            self.interval.as_secs(),
            self.log_level,
            self.check_deployments.join(","),
            self.collectors.names().join(","),
            self.lookback.as_secs(),
            self.max_deployments,
            self.max_listed_runs,
            self.events_settle.as_secs(),
            self.duration_buckets
                .iter()
                .map(f64::to_string)
                .collect::<Vec<_>>()
                .join(","),
            self.flow_runs_max_age.as_secs(),
        )
    }
}

/// Prefect Cloud mistakes that otherwise show up only as 404s or 401s: the UI's
/// address instead of the API's, a URL without the workspace, no API key.
fn cloud_url_warning(url: &str, has_key: bool) -> Option<String> {
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("https://app.prefect.cloud") {
        return Some(format!(
            "PREFECT_API_URL={url} is the Prefect Cloud UI; the API is \
             https://api.prefect.cloud/api/accounts/<account id>/workspaces/<workspace id>"
        ));
    }
    if !lower.starts_with(PREFECT_CLOUD_API_URL) {
        return None;
    }
    let path = &lower[PREFECT_CLOUD_API_URL.len()..];
    let parts: Vec<&str> = path.split('/').collect();
    if !matches!(parts.as_slice(), ["api", "accounts", a, "workspaces", w] if !a.is_empty() && !w.is_empty())
    {
        return Some(format!(
            "PREFECT_API_URL={url} is not a Prefect Cloud workspace URL \
             (https://api.prefect.cloud/api/accounts/<account id>/workspaces/<workspace id>)"
        ));
    }
    (!has_key)
        .then(|| "PREFECT_API_URL is Prefect Cloud but PREFECT_API_KEY is not set".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(&move |k: &str| map.get(k).cloned())
    }

    fn err_var(pairs: &[(&str, &str)]) -> &'static str {
        match parse(pairs) {
            Err(ConfigError::Invalid { var, .. }) => var,
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("{pairs:?} should be rejected"),
        }
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.api_url, DEFAULT_API_URL);
        assert!(c.auth == Auth::None);
        assert_eq!(c.port, 8080);
        assert_eq!(c.interval, Duration::from_secs(30));
        assert_eq!(c.request_timeout, Duration::from_secs(30));
        assert_eq!(c.log_level, LevelFilter::Info);
        assert!(c.check_deployments.is_empty());
        assert!(c.address.is_none());
        assert_eq!(c.max_retries, 5);
        assert!(c.csrf_enabled);
        assert_eq!(c.collectors, Collectors::default());
        assert_eq!(c.lookback, Duration::from_secs(7 * 86_400));
        assert_eq!(c.max_deployments, 1000);
        assert_eq!(c.events_settle, Duration::from_secs(30));
        assert_eq!(c.duration_buckets, DEFAULT_DURATION_BUCKETS);
    }

    #[test]
    fn events_settle_and_duration_buckets() {
        for (v, secs) in [
            ("0", 0.0),
            ("45", 45.0),
            ("2.5s", 2.5),
            ("2m", 120.0),
            ("1h", 3600.0),
        ] {
            let c = parse(&[("EXPORTER_EVENTS_SETTLE", v)]).unwrap();
            assert_eq!(c.events_settle, Duration::from_secs_f64(secs), "{v}");
        }
        for v in ["-1", "2h", "soon", "1w", "NaN"] {
            assert_eq!(
                err_var(&[("EXPORTER_EVENTS_SETTLE", v)]),
                "EXPORTER_EVENTS_SETTLE",
                "{v}"
            );
        }
        let c = parse(&[("EXPORTER_DURATION_BUCKETS", "0.5, 10,1m,1h ,1d")]).unwrap();
        assert_eq!(c.duration_buckets, [0.5, 10.0, 60.0, 3600.0, 86_400.0]);
        let many = (1..=51)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        for v in [
            "1,1",
            "10,5",
            "0,1",
            "-1,2",
            "1,,2",
            "1,x",
            "inf",
            many.as_str(),
        ] {
            assert_eq!(
                err_var(&[("EXPORTER_DURATION_BUCKETS", v)]),
                "EXPORTER_DURATION_BUCKETS",
                "{v}"
            );
        }
    }

    #[test]
    fn collectors_select_groups_and_reject_unknown_names() {
        let c = parse(&[("EXPORTER_COLLECTORS", " deployments, seed ,")]).unwrap();
        assert_eq!(
            c.collectors,
            Collectors {
                flow_runs: false,
                deployments: true,
                work_pools: false,
                work_queues: false,
                active_flow_runs: false,
                concurrency_limits: false,
                events: false,
            }
        );
        assert_eq!(c.collectors.names(), vec!["deployments"]);
        let c = parse(&[("EXPORTER_COLLECTORS", "seed")]).unwrap();
        assert!(c.collectors.names().is_empty());
        let c = parse(&[(
            "EXPORTER_COLLECTORS",
            "work_pools,flow_runs,deployments,concurrency_limits,active_flow_runs,work_queues,events",
        )])
        .unwrap();
        assert_eq!(c.collectors, Collectors::default());
        for v in ["flowruns", "flow_runs,pools", "all"] {
            assert_eq!(
                err_var(&[("EXPORTER_COLLECTORS", v)]),
                "EXPORTER_COLLECTORS"
            );
        }
    }

    #[test]
    fn lookback_takes_seconds_or_a_unit() {
        for (v, secs) in [
            ("3600", 3600),
            ("90s", 90),
            ("15m", 900),
            ("12h", 43_200),
            ("7d", 604_800),
            (" 2D ", 172_800),
        ] {
            assert_eq!(
                parse(&[("EXPORTER_LOOKBACK", v)]).unwrap().lookback,
                Duration::from_secs(secs),
                "{v}"
            );
        }
        for v in ["0", "-1d", "1w", "d", "1.5h", "99999d"] {
            assert_eq!(
                err_var(&[("EXPORTER_LOOKBACK", v)]),
                "EXPORTER_LOOKBACK",
                "{v}"
            );
        }
    }

    #[test]
    fn max_listed_runs_is_a_positive_count() {
        assert_eq!(parse(&[]).unwrap().max_listed_runs, 1000);
        let c = parse(&[("EXPORTER_MAX_LISTED_RUNS", "200")]).unwrap();
        assert_eq!(c.max_listed_runs, 200);
        for v in ["0", "-5", "many"] {
            assert_eq!(
                err_var(&[("EXPORTER_MAX_LISTED_RUNS", v)]),
                "EXPORTER_MAX_LISTED_RUNS"
            );
        }
    }

    #[test]
    fn a_removed_setting_is_one_warning_not_an_error() {
        for v in ["names", "history", "anything"] {
            let c = parse(&[("EXPORTER_FLOW_RUNS_READ", v)]).unwrap();
            let hits: Vec<&String> = c
                .warnings
                .iter()
                .filter(|w| w.contains("EXPORTER_FLOW_RUNS_READ"))
                .collect();
            assert_eq!(hits.len(), 1, "{v}: {:?}", c.warnings);
        }
        assert!(parse(&[]).unwrap().warnings.is_empty());
    }

    #[test]
    fn flow_runs_max_age_takes_a_duration_or_zero() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.flow_runs_max_age, Duration::from_secs(600));
        for (v, secs) in [("0", 0), ("0s", 0), ("90", 90), ("15m", 900), ("1h", 3600)] {
            assert_eq!(
                parse(&[("EXPORTER_FLOW_RUNS_MAX_AGE", v)])
                    .unwrap()
                    .flow_runs_max_age,
                Duration::from_secs(secs),
                "{v}"
            );
        }
        for v in ["-1", "soon", "5w", "00x"] {
            assert_eq!(
                err_var(&[("EXPORTER_FLOW_RUNS_MAX_AGE", v)]),
                "EXPORTER_FLOW_RUNS_MAX_AGE",
                "{v}"
            );
        }
    }

    #[test]
    fn max_deployments_is_a_positive_count() {
        let c = parse(&[("EXPORTER_MAX_DEPLOYMENTS", "25")]).unwrap();
        assert_eq!(c.max_deployments, 25);
        for v in ["0", "-5", "many"] {
            assert_eq!(
                err_var(&[("EXPORTER_MAX_DEPLOYMENTS", v)]),
                "EXPORTER_MAX_DEPLOYMENTS"
            );
        }
    }

    #[test]
    fn request_timeout_defaults_to_smaller_of_60_and_interval() {
        let c = parse(&[("EXPORTER_INTERVAL", "300")]).unwrap();
        assert_eq!(c.request_timeout, Duration::from_secs(60));
        let c = parse(&[("EXPORTER_INTERVAL", "5")]).unwrap();
        assert_eq!(c.request_timeout, Duration::from_secs(5));
        let c = parse(&[("PREFECT_API_REQUEST_TIMEOUT", "2.5")]).unwrap();
        assert_eq!(c.request_timeout, Duration::from_millis(2500));
    }

    #[test]
    fn url_trailing_slash_is_tolerated() {
        let c = parse(&[("PREFECT_API_URL", "https://prefect.example.com/api/")]).unwrap();
        assert_eq!(c.api_url, "https://prefect.example.com/api");
    }

    #[test]
    fn bad_values_name_their_variable() {
        assert_eq!(err_var(&[("EXPORTER_PORT", "abc")]), "EXPORTER_PORT");
        assert_eq!(err_var(&[("EXPORTER_PORT", "70000")]), "EXPORTER_PORT");
        assert_eq!(err_var(&[("EXPORTER_PORT", "-1")]), "EXPORTER_PORT");
        for v in ["0", "-3", "x", "1.5"] {
            assert_eq!(err_var(&[("EXPORTER_INTERVAL", v)]), "EXPORTER_INTERVAL");
        }
        assert_eq!(err_var(&[("LOG_LEVEL", "loud")]), "LOG_LEVEL");
        for v in [
            "ftp://x/api",
            "127.0.0.1:4200/api",
            "http://",
            "http:///api",
        ] {
            assert_eq!(err_var(&[("PREFECT_API_URL", v)]), "PREFECT_API_URL");
        }
        assert_eq!(
            err_var(&[("EXPORTER_ADDRESS", "nowhere")]),
            "EXPORTER_ADDRESS"
        );
        assert_eq!(
            err_var(&[("PREFECT_API_REQUEST_TIMEOUT", "0")]),
            "PREFECT_API_REQUEST_TIMEOUT"
        );
        assert_eq!(
            err_var(&[("PREFECT_CLIENT_MAX_RETRIES", "many")]),
            "PREFECT_CLIENT_MAX_RETRIES"
        );
        assert_eq!(
            err_var(&[("PREFECT_CLIENT_CUSTOM_HEADERS", "{not json")]),
            "PREFECT_CLIENT_CUSTOM_HEADERS"
        );
        assert_eq!(
            err_var(&[("PREFECT_API_TLS_INSECURE_SKIP_VERIFY", "maybe")]),
            "PREFECT_API_TLS_INSECURE_SKIP_VERIFY"
        );
    }

    #[test]
    fn error_line_names_variable_value_and_expectation() {
        let e = parse(&[("EXPORTER_PORT", "abc")]).err().unwrap();
        assert_eq!(
            e.to_string(),
            "EXPORTER_PORT=abc: not a port number (expected 0 to 65535)"
        );
    }

    #[test]
    fn secrets_never_appear_in_errors_or_display() {
        let e = parse(&[("PREFECT_API_AUTH_STRING", "nocolonsecret")])
            .err()
            .unwrap();
        assert!(!e.to_string().contains("nocolonsecret"));
        let e = parse(&[(
            "PREFECT_CLIENT_CUSTOM_HEADERS",
            "{\"X\": 1, \"t\":\"tok3n\"",
        )])
        .err()
        .unwrap();
        assert!(!e.to_string().contains("tok3n"));
        let c = parse(&[
            ("PREFECT_API_AUTH_STRING", "admin:hunter2"),
            (
                "PREFECT_CLIENT_CUSTOM_HEADERS",
                "{\"X-Token\": \"abcsecret\"}",
            ),
        ])
        .unwrap();
        let shown = c.to_string();
        assert!(!shown.contains("hunter2") && !shown.contains("abcsecret"));
        assert!(shown.contains("X-Token: ***"));
        let c = parse(&[("PREFECT_API_KEY", "pnu_key123")]).unwrap();
        assert!(!c.to_string().contains("pnu_key123"));
        let e = parse(&[("PREFECT_API_URL", "http://u:pw1@host/api")])
            .err()
            .unwrap();
        assert!(!e.to_string().contains("pw1"));
    }

    #[test]
    fn header_values_must_be_printable_ascii() {
        for v in [
            "{\"X-A\": \"caf\u{e9}\"}",
            "{\"X-A\": \"a\\u0001b\"}",
            "{\"X-A\": \"a\\nb\"}",
        ] {
            let e = parse(&[("PREFECT_CLIENT_CUSTOM_HEADERS", v)])
                .err()
                .unwrap();
            assert!(
                e.to_string()
                    .starts_with("PREFECT_CLIENT_CUSTOM_HEADERS=***"),
                "{v}"
            );
        }
        let e = parse(&[("PREFECT_API_KEY", "k\u{e9}y")]).err().unwrap();
        assert_eq!(
            e.to_string(),
            "PREFECT_API_KEY=***: expected printable ASCII characters only"
        );
        let c = parse(&[("PREFECT_CLIENT_CUSTOM_HEADERS", "{\"X-A\": \"a b\\tc\"}")]).unwrap();
        assert_eq!(c.custom_headers[0].1, "a b\tc");
    }

    #[test]
    fn auth_string_wins_over_key() {
        let c = parse(&[("PREFECT_API_AUTH_STRING", "a:b"), ("PREFECT_API_KEY", "k")]).unwrap();
        assert!(c.auth == Auth::Basic("a:b".into()));
        assert_eq!(c.warnings.len(), 1);
        let c = parse(&[("PREFECT_API_KEY", "k")]).unwrap();
        assert!(c.auth == Auth::Bearer("k".into()));
    }

    #[test]
    fn log_levels_any_case() {
        for (v, l) in [
            ("TRACE", LevelFilter::Trace),
            ("debug", LevelFilter::Debug),
            ("Info", LevelFilter::Info),
            ("WARNING", LevelFilter::Warn),
            ("warn", LevelFilter::Warn),
            ("error", LevelFilter::Error),
            ("OFF", LevelFilter::Off),
        ] {
            assert_eq!(parse(&[("LOG_LEVEL", v)]).unwrap().log_level, l, "{v}");
        }
    }

    #[test]
    fn deployment_list_drops_blanks_and_duplicates() {
        let c = parse(&[("EXPORTER_CHECK_DEPLOYMENTS", " flow-a, ,flow-b,flow-a,,")]).unwrap();
        assert_eq!(c.check_deployments, vec!["flow-a", "flow-b"]);
    }

    #[test]
    fn empty_values_count_as_unset() {
        let c = parse(&[("EXPORTER_PORT", ""), ("PREFECT_API_KEY", " ")]).unwrap();
        assert_eq!(c.port, 8080);
        assert!(c.auth == Auth::None);
    }

    #[test]
    fn custom_headers_cannot_replace_auth_or_user_agent() {
        let c = parse(&[(
            "PREFECT_CLIENT_CUSTOM_HEADERS",
            "{\"Authorization\": \"x\", \"user-agent\": \"y\", \"X-Team\": \"data\"}",
        )])
        .unwrap();
        assert_eq!(
            c.custom_headers,
            vec![("X-Team".to_string(), "data".to_string())]
        );
        assert_eq!(c.warnings.len(), 2);
    }

    /// A test's own folder under the temp dir, removed when the guard drops, so
    /// that no run leaves folders (holding fake secrets) behind, even when an
    /// assertion fails.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "pe-config-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A profiles file in its own temp folder; keep the guard alive while it is used.
    fn write_profiles(text: &str) -> (TempDir, PathBuf, String) {
        let dir = TempDir::new();
        let path = dir.0.join("profiles.toml");
        std::fs::write(&path, text).unwrap();
        let shown = path.display().to_string();
        (dir, path, shown)
    }

    #[test]
    fn temp_folders_are_removed_when_the_test_is_done() {
        let (dir, path, _) = write_profiles(PROFILES);
        let folder = dir.0.clone();
        assert!(path.is_file());
        drop(dir);
        assert!(!folder.exists(), "{} left behind", folder.display());
        // Also when the test fails while holding it.
        let folder = std::panic::catch_unwind(|| {
            let (dir, _, _) = write_profiles(PROFILES);
            let folder = dir.0.clone();
            std::panic::panic_any(folder);
        })
        .err()
        .and_then(|p| p.downcast::<PathBuf>().ok())
        .expect("the panic carries the folder");
        assert!(!folder.exists(), "{} left behind", folder.display());
    }

    fn load(path: &std::path::Path, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        map.insert("PREFECT_PROFILES_PATH".into(), path.display().to_string());
        Config::load(&move |k: &str| map.get(k).cloned())
    }

    const PROFILES: &str = r#"
active = "dev"
[profiles.dev]
PREFECT_API_URL = "http://dev.example:4200/api"
PREFECT_API_AUTH_STRING = "admin:pr0file"
PREFECT_CLIENT_MAX_RETRIES = 2
PREFECT_API_TLS_INSECURE_SKIP_VERIFY = false
EXPORTER_INTERVAL = 5
[profiles.broken]
PREFECT_API_URL = "dev.example/api"
PREFECT_CLIENT_MAX_RETRIES = "lots"
"#;

    #[test]
    fn profile_fills_what_the_environment_lacks() {
        let (_dir, path, shown) = write_profiles(PROFILES);
        let c = load(&path, &[]).unwrap();
        assert_eq!(c.api_url, "http://dev.example:4200/api");
        assert!(c.auth == Auth::Basic("admin:pr0file".into()));
        assert_eq!(c.max_retries, 2);
        // Only Prefect client settings come from a profile.
        assert_eq!(c.interval, Duration::from_secs(30));
        let display = c.to_string();
        assert!(
            display.contains(&format!("profile=dev ({shown}")),
            "{display}"
        );
        assert!(!display.contains("pr0file"), "{display}");
    }

    #[test]
    fn environment_wins_over_the_profile() {
        let (_dir, path, _) = write_profiles(PROFILES);
        let c = load(
            &path,
            &[
                ("PREFECT_API_URL", "http://env:4200/api"),
                ("PREFECT_CLIENT_MAX_RETRIES", "0"),
                // Empty counts as unset: the profile's value applies.
                ("PREFECT_API_AUTH_STRING", ""),
            ],
        )
        .unwrap();
        assert_eq!(c.api_url, "http://env:4200/api");
        assert_eq!(c.max_retries, 0);
        assert!(c.auth == Auth::Basic("admin:pr0file".into()));
        // An API key in the environment does not beat an auth string in the
        // profile: the auth string wins over a key wherever each comes from.
        let c = load(&path, &[("PREFECT_API_KEY", "pnu_x")]).unwrap();
        assert!(matches!(c.auth, Auth::Basic(_)));
    }

    #[test]
    fn bad_profile_values_name_variable_profile_and_file() {
        let (_dir, path, shown) = write_profiles(PROFILES);
        let e = load(&path, &[("PREFECT_PROFILE", "broken")]).err().unwrap();
        let text = e.to_string();
        assert!(
            text.starts_with("PREFECT_API_URL=dev.example/api"),
            "{text}"
        );
        assert!(
            text.contains(&format!("profile \"broken\" of {shown}")),
            "{text}"
        );
        // The same bad value from the environment is reported as such.
        let e = load(
            &path,
            &[
                ("PREFECT_PROFILE", "broken"),
                ("PREFECT_API_URL", "http://ok/api"),
                ("PREFECT_CLIENT_MAX_RETRIES", "x"),
            ],
        )
        .err()
        .unwrap();
        assert!(matches!(
            e,
            ConfigError::Invalid {
                var: "PREFECT_CLIENT_MAX_RETRIES",
                ..
            }
        ));
    }

    #[test]
    fn unusable_profiles_files_stop_the_start() {
        let (_dir, path, shown) = write_profiles("active = \"dev\"\n[profiles.dev\n");
        let e = load(&path, &[]).err().unwrap().to_string();
        assert!(e.contains(&shown) && e.contains("TOML"), "{e}");
        let (_dir, path, shown) = write_profiles(PROFILES);
        let e = load(&path, &[("PREFECT_PROFILE", "nope")])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains(&shown) && e.contains("nope"), "{e}");
        let missing = path.with_file_name("absent.toml");
        assert!(load(&missing, &[]).is_ok());
    }

    #[test]
    fn ca_file_remembers_its_variable() {
        let c = parse(&[("SSL_CERT_FILE", "/etc/ca.pem")]).unwrap();
        assert_eq!(c.ssl_cert_var, "SSL_CERT_FILE");
        let c = parse(&[
            ("SSL_CERT_FILE", "/etc/ca.pem"),
            ("PREFECT_API_SSL_CERT_FILE", "/etc/prefect-ca.pem"),
        ])
        .unwrap();
        assert_eq!(c.ssl_cert_var, "PREFECT_API_SSL_CERT_FILE");
        assert_eq!(c.ssl_cert_file, Some(PathBuf::from("/etc/prefect-ca.pem")));
    }

    #[test]
    fn inherited_ssl_cert_file_that_is_missing_falls_back_to_built_in_roots() {
        let c = parse(&[("SSL_CERT_FILE", "/nonexistent/ca.pem")]).unwrap();
        assert_eq!(c.ssl_cert_file, None);
        assert!(c.warnings.iter().any(|w| w.contains("/nonexistent/ca.pem")));
        let present = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let c = parse(&[("SSL_CERT_FILE", present)]).unwrap();
        assert_eq!(c.ssl_cert_file, Some(PathBuf::from(present)));
        // The Prefect setting names a file on purpose: missing stays an error later.
        let c = parse(&[("PREFECT_API_SSL_CERT_FILE", "/nonexistent/ca.pem")]).unwrap();
        assert_eq!(c.ssl_cert_file, Some(PathBuf::from("/nonexistent/ca.pem")));
    }

    #[test]
    fn csrf_is_never_asked_of_prefect_cloud() {
        let c = parse(&[(
            "PREFECT_API_URL",
            "https://api.prefect.cloud/api/accounts/a/workspaces/w",
        )])
        .unwrap();
        assert!(!c.csrf_enabled);
        assert!(
            parse(&[("PREFECT_API_URL", "https://prefect.example/api")])
                .unwrap()
                .csrf_enabled
        );
    }

    #[test]
    fn prefect_cloud_url_mistakes_are_warned_about() {
        let ws = "https://api.prefect.cloud/api/accounts/0a1b/workspaces/2c3d";
        let c = parse(&[("PREFECT_API_URL", ws), ("PREFECT_API_KEY", "pnu_x")]).unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let c = parse(&[("PREFECT_API_URL", ws)]).unwrap();
        assert!(
            c.warnings[0].contains("PREFECT_API_KEY"),
            "{:?}",
            c.warnings
        );
        for url in [
            "https://api.prefect.cloud/api",
            "https://api.prefect.cloud/api/accounts/0a1b",
            "https://app.prefect.cloud/account/0a1b/workspace/2c3d/dashboard",
        ] {
            let c = parse(&[("PREFECT_API_URL", url), ("PREFECT_API_KEY", "k")]).unwrap();
            assert!(
                c.warnings.len() == 1 && c.warnings[0].contains("workspaces/<workspace id>"),
                "{url}: {:?}",
                c.warnings
            );
        }
        let c = parse(&[("PREFECT_API_URL", "https://prefect.example.com/api")]).unwrap();
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn proxy_is_chosen_for_the_api_url() {
        let c = parse(&[
            ("PREFECT_API_URL", "https://prefect.example/api"),
            ("HTTPS_PROXY", "http://u:pw5@proxy:3128"),
        ])
        .unwrap();
        assert_eq!(c.proxy.as_ref().unwrap().var, "HTTPS_PROXY");
        let shown = c.to_string();
        assert!(
            shown.contains("proxy=http://***@proxy:3128 (from HTTPS_PROXY)"),
            "{shown}"
        );
        assert!(!shown.contains("pw5"));
        assert_eq!(err_var(&[("HTTP_PROXY", "socks5://s:1080")]), "HTTP_PROXY");
    }

    #[test]
    fn port_zero_and_ipv6_address() {
        let c = parse(&[("EXPORTER_PORT", "0"), ("EXPORTER_ADDRESS", "[::1]")]).unwrap();
        assert_eq!(c.port, 0);
        assert_eq!(c.address, Some("::1".parse().unwrap()));
    }
}
