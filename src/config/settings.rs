//! The settings table and `Config`: every variable read once from the
//! environment (and the active Prefect profile) and validated before anything
//! starts.
//!
//! Each setting is one entry of `SETTINGS`: its name, default, meaning, reader
//! and how the start-up log shows it. That entry is all of it: `--help`, the
//! profile keys, `Config`'s Display and docs/settings.md (held to the table by
//! a unit test) follow from it, so none of them can forget or misstate one.

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

/// Prefect Cloud's API: CSRF tokens are a self-hosted feature, Prefect's own
/// client never asks Cloud for one, and neither does the exporter.
pub const PREFECT_CLOUD_API_URL: &str = "https://api.prefect.cloud/";
/// Also bounds the request timeout's default, whose entry comes first.
const DEFAULT_INTERVAL: &str = "30";

/// The variables as every reader sees them: an empty value is unset.
type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// One variable (or, as `A / B`, two read together).
pub struct Setting {
    pub name: &'static str,
    /// Markdown (backquotes) where `read` is not `Value`: docs/settings.md shows
    /// it as is, `--help` as plain text.
    pub default: &'static str,
    /// The cell of docs/settings.md, in Markdown: `--help` prints it as plain text.
    pub meaning: &'static str,
    /// Its value may hold a credential: an error shows it as `***`, whatever
    /// the reader put there (and its `shown` hides it).
    pub secret: bool,
    /// A Prefect profile may set it: Prefect's own client settings. The
    /// exporter's own settings, the proxies and the profile choice are
    /// environment-only.
    pub profile: bool,
    read: Read,
    /// Key and value in the start-up log line (`None`: shown with another).
    shown: Option<(&'static str, Show)>,
}

/// A setting's value for the start-up log line, secrets as `***`.
type Show = fn(&Config) -> String;

/// How an entry writes its field(s) of `Config`, in table order: a reader may
/// use the fields of the entries above it.
enum Read {
    /// Unset reads as `default`, so the default shown is the default used.
    Value(fn(&mut Config, &str, Lookup) -> Result<(), ConfigError>),
    /// Unset is `None`, and `default` says in words what that means. `A / B`
    /// names are always `None`: their reader looks up its variables itself.
    Optional(fn(&mut Config, Option<&str>, Lookup) -> Result<(), ConfigError>),
    /// Read before the table (the profile settings: they choose where the
    /// others come from) or by another entry (`NO_PROXY`, by the proxy's).
    Elsewhere,
}

impl Setting {
    /// The variables of the entry: one, or two for `A / B`.
    pub fn names(&self) -> impl Iterator<Item = &'static str> {
        self.name.split(" / ")
    }
}

/// Every variable the exporter reads, in the order of `--help` and
/// docs/settings.md.
pub const SETTINGS: &[Setting] = &[
    Setting {
        name: "PREFECT_API_URL",
        default: "http://127.0.0.1:4200/api",
        meaning: "Prefect API base URL: `https://host/api` for self-hosted, the workspace URL for \
                  Prefect Cloud. A trailing `/` is fine.",
        secret: false,
        profile: true,
        read: Read::Value(|c, v, get| {
            c.api_url = parse_url(v)?;
            let has_key = get("PREFECT_API_KEY").is_some();
            c.warnings.extend(cloud_url_warning(&c.api_url, has_key));
            Ok(())
        }),
        shown: Some(("api_url", |c| c.api_url.clone())),
    },
    Setting {
        name: "PREFECT_API_AUTH_STRING",
        default: "unset",
        meaning: "`user:pass` of a self-hosted server with basic auth; sent as HTTP Basic. Wins \
                  over the key when both are set.",
        secret: true,
        profile: true,
        read: Read::Optional(|c, v, get| {
            let Some(s) = v else { return Ok(()) };
            if !s.contains(':') {
                return Err(invalid("PREFECT_API_AUTH_STRING", s.into(), "expected user:pass"));
            }
            if get("PREFECT_API_KEY").is_some() {
                c.warnings.push(
                    "both PREFECT_API_AUTH_STRING and PREFECT_API_KEY are set: using the auth string"
                        .to_string(),
                );
            }
            c.auth = Auth::Basic(s.to_string());
            Ok(())
        }),
        shown: Some(("auth", |c| {
            match c.auth {
                Auth::None => "none",
                Auth::Basic(_) => "basic ***",
                Auth::Bearer(_) => "bearer ***",
            }
            .to_string()
        })),
    },
    Setting {
        name: "PREFECT_API_KEY",
        default: "unset",
        meaning: "Prefect Cloud API key, sent as `Authorization: Bearer`.",
        secret: true,
        profile: true,
        read: Read::Optional(|c, v, _| {
            let (Some(k), Auth::None) = (v, &c.auth) else {
                return Ok(());
            };
            let k = k.trim();
            if !is_header_value(k) {
                return Err(invalid(
                    "PREFECT_API_KEY",
                    k.into(),
                    "expected printable ASCII characters only",
                ));
            }
            c.auth = Auth::Bearer(k.to_string());
            Ok(())
        }),
        shown: None,
    },
    Setting {
        name: "PREFECT_API_REQUEST_TIMEOUT",
        default: "smaller of 60 and `EXPORTER_INTERVAL`",
        meaning: "seconds one request may take (never past the end of the collection).",
        secret: false,
        profile: true,
        read: Read::Optional(|c, v, get| {
            c.request_timeout = match v {
                Some(v) => parse_seconds("PREFECT_API_REQUEST_TIMEOUT", v)?,
                // EXPORTER_INTERVAL's entry is further down: read it here too (a
                // bad one is reported here, with its own message).
                None => {
                    let interval = get("EXPORTER_INTERVAL");
                    parse_interval(interval.as_deref().unwrap_or(DEFAULT_INTERVAL))?
                        .min(Duration::from_secs(60))
                }
            };
            Ok(())
        }),
        shown: Some(("request_timeout", |c| {
            format!("{}s", c.request_timeout.as_secs_f64())
        })),
    },
    Setting {
        name: "PREFECT_CLIENT_MAX_RETRIES",
        default: "5",
        meaning: "retries of a request answered 408/429/502/503 (honouring `Retry-After`), always \
                  inside the collection's time.",
        secret: false,
        profile: true,
        read: Read::Value(|c, v, _| {
            c.max_retries = v
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|n| *n <= 100)
                .ok_or_else(|| {
                    invalid(
                        "PREFECT_CLIENT_MAX_RETRIES",
                        v.into(),
                        "expected a whole number from 0 to 100",
                    )
                })?;
            Ok(())
        }),
        shown: Some(("max_retries", |c| c.max_retries.to_string())),
    },
    Setting {
        name: "PREFECT_CLIENT_CUSTOM_HEADERS",
        default: "{}",
        meaning: "JSON object of extra headers. `Authorization`, `User-Agent` and the CSRF \
                  headers cannot be overridden.",
        secret: true,
        profile: true,
        read: Read::Value(|c, v, _| {
            c.custom_headers = parse_headers(v, &mut c.warnings)?;
            Ok(())
        }),
        shown: Some(("custom_headers", |c| {
            let names: Vec<String> = c
                .custom_headers
                .iter()
                .map(|(k, _)| format!("{k}: ***"))
                .collect();
            format!("[{}]", names.join(", "))
        })),
    },
    Setting {
        name: "PREFECT_API_SSL_CERT_FILE",
        default: "`SSL_CERT_FILE`, else built-in Mozilla roots",
        meaning: "PEM file of CA certificates for https.",
        secret: false,
        profile: true,
        read: Read::Optional(|c, v, get| {
            (c.ssl_cert_file, c.ssl_cert_var) = match v {
                Some(v) => (Some(PathBuf::from(v)), "PREFECT_API_SSL_CERT_FILE"),
                // SSL_CERT_FILE is a machine-wide variable, often inherited from a
                // host that has the file when the exporter's container does not: a
                // missing file there falls back to the built-in roots instead of
                // stopping.
                None => match get("SSL_CERT_FILE").map(PathBuf::from) {
                    Some(p) if !p.exists() => {
                        c.warnings.push(format!(
                            "SSL_CERT_FILE={}: no such file, using the built-in CA roots",
                            p.display()
                        ));
                        (None, "SSL_CERT_FILE")
                    }
                    other => (other, "SSL_CERT_FILE"),
                },
            };
            Ok(())
        }),
        shown: Some(("ca_file", |c| match &c.ssl_cert_file {
            Some(p) => p.display().to_string(),
            None => "built-in".into(),
        })),
    },
    Setting {
        name: "PREFECT_API_TLS_INSECURE_SKIP_VERIFY",
        default: "false",
        meaning: "`true` skips certificate checks (logged as a warning).",
        secret: false,
        profile: true,
        read: Read::Value(|c, v, _| {
            c.tls_insecure_skip_verify = parse_bool("PREFECT_API_TLS_INSECURE_SKIP_VERIFY", v)?;
            if c.tls_insecure_skip_verify {
                c.warnings.push(
                    "PREFECT_API_TLS_INSECURE_SKIP_VERIFY=true: TLS certificates of Prefect are NOT checked"
                        .to_string(),
                );
            }
            Ok(())
        }),
        shown: Some(("tls_skip_verify", |c| c.tls_insecure_skip_verify.to_string())),
    },
    Setting {
        name: "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED",
        default: "true",
        meaning: "fetch and send CSRF tokens when the server has CSRF protection on.",
        secret: false,
        profile: true,
        read: Read::Value(|c, v, _| {
            c.csrf_enabled = parse_bool("PREFECT_CLIENT_CSRF_SUPPORT_ENABLED", v)?
                && !c.api_url.starts_with(PREFECT_CLOUD_API_URL);
            Ok(())
        }),
        shown: Some(("csrf", |c| c.csrf_enabled.to_string())),
    },
    Setting {
        name: "PREFECT_PROFILES_PATH",
        default: "`$PREFECT_HOME/profiles.toml`",
        meaning: "Prefect profiles file: its active profile fills the `PREFECT_*` client settings \
                  the environment lacks ([Profiles](connecting.md#profiles)).",
        secret: false,
        profile: false,
        read: Read::Elsewhere,
        shown: None,
    },
    Setting {
        name: "PREFECT_HOME",
        default: "`~/.prefect`",
        meaning: "Prefect's home directory (holds `profiles.toml`).",
        secret: false,
        profile: false,
        read: Read::Elsewhere,
        shown: None,
    },
    Setting {
        name: "PREFECT_PROFILE",
        default: "the file's `active`",
        meaning: "the profile to read.",
        secret: false,
        profile: false,
        read: Read::Elsewhere,
        shown: Some(("profile", |c| c.profile.as_deref().unwrap_or("none").into())),
    },
    Setting {
        name: "HTTPS_PROXY / HTTP_PROXY",
        default: "unset",
        meaning: "proxy for https / http Prefect URLs (also lower case, `ALL_PROXY` as a \
                  fallback), as curl and Prefect's client use them (see **Proxies** under \
                  [Self-hosted Prefect server](connecting.md#self-hosted-prefect-server)).",
        secret: false,
        profile: false,
        read: Read::Optional(|c, _, get| {
            c.proxy = proxy::choose(&c.api_url, get)?;
            Ok(())
        }),
        shown: Some(("proxy", |c| match &c.proxy {
            Some(p) => p.to_string(),
            None => "none".into(),
        })),
    },
    Setting {
        name: "NO_PROXY",
        default: "unset",
        meaning: "comma-separated hosts, domains, IPs or CIDR blocks reached without the proxy \
                  (also lower case).",
        secret: false,
        profile: false,
        read: Read::Elsewhere,
        shown: None,
    },
    Setting {
        name: "EXPORTER_ADDRESS",
        default: "all interfaces (IPv6 and IPv4)",
        meaning: "IP address to listen on, e.g. `127.0.0.1`.",
        secret: false,
        profile: false,
        read: Read::Optional(|c, v, _| {
            let Some(v) = v else { return Ok(()) };
            let ip = v.trim().trim_matches(['[', ']']).parse::<IpAddr>();
            c.address = Some(ip.map_err(|_| {
                invalid(
                    "EXPORTER_ADDRESS",
                    v.into(),
                    "expected an IP address such as 0.0.0.0, 127.0.0.1 or ::",
                )
            })?);
            Ok(())
        }),
        shown: Some(("address", |c| match c.address {
            Some(a) => a.to_string(),
            None => "all interfaces".into(),
        })),
    },
    Setting {
        name: "EXPORTER_PORT",
        default: "8080",
        meaning: "port of the HTTP server (`0`: any free port, printed in the log).",
        secret: false,
        profile: false,
        read: Read::Value(|c, v, _| {
            c.port = v.trim().parse().map_err(|_| {
                invalid(
                    "EXPORTER_PORT",
                    v.into(),
                    "not a port number (expected 0 to 65535)",
                )
            })?;
            Ok(())
        }),
        shown: Some(("port", |c| c.port.to_string())),
    },
    Setting {
        name: "EXPORTER_INTERVAL",
        default: DEFAULT_INTERVAL,
        meaning: "seconds between collections (whole number, at least 1). Scrape at the same \
                  interval.",
        secret: false,
        profile: false,
        read: Read::Value(|c, v, _| {
            c.interval = parse_interval(v)?;
            Ok(())
        }),
        shown: Some(("interval", |c| format!("{}s", c.interval.as_secs()))),
    },
    Setting {
        name: "LOG_LEVEL",
        default: "INFO",
        meaning: "`trace`, `debug`, `info`, `warn`/`warning`, `error` or `off`, any case.",
        secret: false,
        profile: false,
        read: Read::Value(|c, v, _| {
            c.log_level = LogLevel(parse_log_level(v)?);
            Ok(())
        }),
        shown: Some(("log_level", |c| c.log_level.0.to_string())),
    },
    Setting {
        name: "EXPORTER_CHECK_DEPLOYMENTS",
        default: "empty",
        meaning: "comma-separated flow names that must have at least one deployment. Blanks and \
                  repeats are ignored.",
        secret: false,
        profile: false,
        read: Read::Optional(|c, v, _| {
            c.check_deployments = v.map(parse_name_list).unwrap_or_default();
            Ok(())
        }),
        shown: Some(("check_deployments", |c| {
            format!("[{}]", c.check_deployments.join(","))
        })),
    },
    Setting {
        name: "EXPORTER_COLLECTORS",
        default: "flow_runs,deployments,work_pools,work_queues,active_flow_runs,concurrency_limits,events",
        meaning: "breakdown groups to collect ([Breakdowns](metrics.md#breakdowns)); the six \
                  original metrics are always collected. An unknown name is a configuration error.",
        secret: false,
        profile: false,
        read: Read::Value(|c, v, _| {
            c.collectors = parse_collectors(v)?;
            Ok(())
        }),
        shown: Some(("collectors", |c| {
            format!("[{}]", c.collectors.names().join(","))
        })),
    },
    Setting {
        name: "EXPORTER_LOOKBACK",
        default: "7d",
        meaning: "how far back the last-run times reach at start (one look-up per deployment and \
                  state type): seconds, or a number with `s`, `m`, `h` or `d`.",
        secret: false,
        profile: false,
        read: Read::Value(|c, v, _| {
            c.lookback = parse_lookback(v)?;
            Ok(())
        }),
        shown: Some(("lookback", |c| format!("{}s", c.lookback.as_secs()))),
    },
    Setting {
        name: "EXPORTER_FLOW_RUNS_MAX_AGE",
        default: "10m",
        meaning: "longest time `prefect_flow_runs` is reused: the per-state counts (one `POST \
                  /flow_runs/history`, whose server cost grows with the run history) are read \
                  again once their age reaches 3000 times their last read time, and at most this \
                  old (`0`: every collection). `prefect_flow_runs_age_seconds` says how old they \
                  are; a reused breakdown is the server's state at its reading, never a mix. Same \
                  units as `EXPORTER_LOOKBACK`.",
        secret: false,
        profile: false,
        read: Read::Value(|c, v, _| {
            c.flow_runs_max_age = parse_max_age(v)?;
            Ok(())
        }),
        shown: Some(("flow_runs_max_age", |c| {
            format!("{}s", c.flow_runs_max_age.as_secs())
        })),
    },
    Setting {
        name: "EXPORTER_MAX_DEPLOYMENTS",
        default: "1000",
        meaning: "most deployments that get per-deployment series (newest created first); a WARN \
                  line says once when the cap cuts.",
        secret: false,
        profile: false,
        read: Read::Value(|c, v, _| {
            let expected = "expected a whole number of deployments, at least 1";
            c.max_deployments = parse_positive_int("EXPORTER_MAX_DEPLOYMENTS", v, expected)? as usize;
            Ok(())
        }),
        shown: Some(("max_deployments", |c| c.max_deployments.to_string())),
    },
    Setting {
        name: "EXPORTER_MAX_LISTED_RUNS",
        default: "1000",
        meaning: "most late runs, and most runs in progress, known and counted per deployment: \
                  listed 200 per request (at most 5 requests each by default) when they change, \
                  else proved unchanged by counts. Past it the totals stay exact, the \
                  per-deployment and per-queue counts cover the listed runs, and \
                  `prefect_late_flow_runs_capped` / `prefect_active_flow_runs_capped` say so \
                  ([Request cost](metrics.md#request-cost-1)).",
        secret: false,
        profile: false,
        read: Read::Value(|c, v, _| {
            let expected = "expected a whole number of runs, at least 1";
            c.max_listed_runs = parse_positive_int("EXPORTER_MAX_LISTED_RUNS", v, expected)? as usize;
            Ok(())
        }),
        shown: Some(("max_listed_runs", |c| c.max_listed_runs.to_string())),
    },
    Setting {
        name: "EXPORTER_EVENTS_SETTLE",
        default: "30s",
        meaning: "how long Prefect's events get to be stored before a window of them is counted \
                  by the state-change counters ([Rates and \
                  durations](metrics.md#rates-and-durations)): seconds (fractions allowed) or \
                  with `s`, `m`, `h`; 0 to 1 h.",
        secret: false,
        profile: false,
        read: Read::Value(|c, v, _| {
            c.events_settle = parse_settle(v)?;
            Ok(())
        }),
        shown: Some(("events_settle", |c| format!("{}s", c.events_settle.as_secs()))),
    },
    Setting {
        name: "EXPORTER_DURATION_BUCKETS",
        default: "1,5,15,30,60,300,600,1800,3600,7200,14400,43200,86400",
        meaning: "upper bounds of the run duration and start delay histogram buckets, \
                  increasing, in seconds or with `s`, `m`, `h`, `d` (e.g. `10,1m,10m,1h,1d`); at \
                  most 50.",
        secret: false,
        profile: false,
        read: Read::Value(|c, v, _| {
            c.duration_buckets = parse_buckets(v)?;
            Ok(())
        }),
        shown: Some(("duration_buckets", |c| {
            let bounds: Vec<String> = c.duration_buckets.iter().map(f64::to_string).collect();
            format!("[{}]", bounds.join(","))
        })),
    },
];

/// Settings that no longer exist, with what replaced them: a user may still
/// have one set, which costs one WARN line at start, not exit 2.
pub const REMOVED_SETTINGS: &[(&str, &str)] = &[(
    "EXPORTER_FLOW_RUNS_READ",
    "prefect_flow_runs is read by the history only: counts by state name could \
     attribute a name to the wrong state type",
)];

/// The settings a Prefect profile may provide.
pub(super) fn profile_keys() -> Vec<&'static str> {
    SETTINGS
        .iter()
        .filter(|s| s.profile)
        .map(|s| s.name)
        .collect()
}

/// Text for `--help` out of the table's Markdown: no backquotes or bold, and a
/// link as its text and the page it leads to (`docs/connecting.md`).
pub fn plain(markdown: &str) -> String {
    let mut out = String::with_capacity(markdown.len());
    let mut rest = markdown;
    while let Some(at) = rest.find("](") {
        let Some(end) = rest[at..].find(')') else {
            break;
        };
        let page = rest[at + 2..at + end].split('#').next().unwrap_or("");
        out.push_str(&rest[..at]);
        out.push_str(&format!(" in docs/{page}"));
        rest = &rest[at + end + 1..];
    }
    out.push_str(rest);
    out.replace(['`', '['], "").replace("**", "")
}

/// Shared by the interval's entry and the request timeout's default.
fn parse_interval(v: &str) -> Result<Duration, ConfigError> {
    let expected = "expected a whole number of seconds, at least 1";
    Ok(Duration::from_secs(parse_positive_int(
        "EXPORTER_INTERVAL",
        v,
        expected,
    )?))
}

/// How the exporter proves who it is to Prefect.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Auth {
    #[default]
    None,
    /// `user:pass` of a self-hosted server started with an auth string.
    Basic(String),
    /// A Prefect Cloud API key.
    Bearer(String),
}

/// `LevelFilter` has no `Default`, which the table's readers start from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogLevel(pub LevelFilter);

impl Default for LogLevel {
    fn default() -> Self {
        LogLevel(LevelFilter::Info)
    }
}

/// The settings as their users read them. Every field is written by the
/// reader of its entry in `SETTINGS`; `Default` is only the blank those
/// readers start from, not a usable configuration.
#[derive(Clone, Default)]
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
    pub log_level: LogLevel,
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
    /// Things worth telling the user that are not errors; logged once logging is up.
    pub warnings: Vec<String>,
}

impl Config {
    /// Reads the settings from the environment, and the Prefect client settings
    /// it lacks from the active Prefect profile (see `profiles`).
    pub fn load(env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let profile = profiles::load(env, &profile_keys())?;
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
        let mut config = Config::default();
        for s in SETTINGS {
            let value = get(s.name);
            let read = match s.read {
                Read::Value(read) => read(&mut config, value.as_deref().unwrap_or(s.default), &get),
                Read::Optional(read) => read(&mut config, value.as_deref(), &get),
                Read::Elsewhere => Ok(()),
            };
            read.map_err(|e| match e {
                ConfigError::Invalid { var, expected, .. } if s.secret => ConfigError::Invalid {
                    var,
                    value: "***".into(),
                    expected,
                },
                e => e,
            })?;
        }
        for (name, instead) in REMOVED_SETTINGS {
            if get(name).is_some() {
                config
                    .warnings
                    .push(format!("{name} is no longer read, and ignored: {instead}"));
            }
        }
        Ok(config)
    }
}

/// What start-up logs print: every setting, secrets as `***`.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        for (key, show) in SETTINGS.iter().filter_map(|s| s.shown) {
            write!(f, "{sep}{key}={}", show(self))?;
            sep = " ";
        }
        Ok(())
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
        assert_eq!(c.api_url, "http://127.0.0.1:4200/api");
        assert!(c.auth == Auth::None);
        assert_eq!(c.port, 8080);
        assert_eq!(c.interval, Duration::from_secs(30));
        assert_eq!(c.request_timeout, Duration::from_secs(30));
        assert_eq!(c.log_level.0, LevelFilter::Info);
        assert!(c.check_deployments.is_empty());
        assert!(c.address.is_none());
        assert_eq!(c.max_retries, 5);
        assert!(c.csrf_enabled);
        assert_eq!(c.collectors, Collectors::default());
        assert_eq!(c.lookback, Duration::from_secs(7 * 86_400));
        assert_eq!(c.max_deployments, 1000);
        assert_eq!(c.events_settle, Duration::from_secs(30));
        assert_eq!(
            c.duration_buckets,
            [
                1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0,
                86400.0
            ]
        );
    }

    /// The page users read is this table: same rows, same order, same words. On a
    /// difference the message holds the table to paste into the page.
    #[test]
    fn docs_settings_md_is_the_table() {
        let docs = include_str!("../../docs/settings.md");
        let mut table = String::from("| variable | default | meaning |\n|---|---|---|\n");
        for s in SETTINGS {
            let names: Vec<String> = s.names().map(|n| format!("`{n}`")).collect();
            let default = match s.read {
                Read::Value(_) => format!("`{}`", s.default),
                _ => s.default.to_string(),
            };
            table.push_str(&format!(
                "| {} | {default} | {} |\n",
                names.join(" / "),
                s.meaning
            ));
        }
        assert!(
            docs.contains(&table),
            "docs/settings.md and SETTINGS differ; the page's table should read:\n\n{table}"
        );
        for (name, _) in REMOVED_SETTINGS {
            assert!(
                docs.contains(&format!("`{name}`")),
                "{name} is not in the page"
            );
        }
    }

    /// A value few settings accept: each refuses it naming itself (a secret
    /// without showing it), or (the paths, the lists) takes it.
    #[test]
    fn each_setting_reports_its_own_bad_values_and_hides_secrets() {
        let bad = "s3cr3t\u{1}";
        for s in SETTINGS {
            for name in s.names() {
                match parse(&[(name, bad)]) {
                    Err(ConfigError::Invalid { var, value, .. }) => {
                        assert_eq!(var, name);
                        assert_eq!(value == "***", s.secret, "{name}: {value}");
                    }
                    Err(e) => panic!("{name}: {e}"),
                    Ok(_) => assert!(!s.secret, "{name} took {bad:?}"),
                }
            }
        }
    }

    #[test]
    fn profile_keys_are_prefect_client_settings() {
        // Prefect's client settings are PREFECT_API_* and PREFECT_CLIENT_*; the
        // profile choice (PREFECT_HOME, ...) cannot come from a profile.
        for s in SETTINGS {
            let client = ["PREFECT_API_", "PREFECT_CLIENT_"]
                .iter()
                .any(|p| s.name.starts_with(p));
            assert_eq!(s.profile, client, "{}", s.name);
        }
    }

    #[test]
    fn plain_text_of_markdown() {
        assert_eq!(
            plain("see **Proxies** under [Self-hosted](connecting.md#x) (`0`: off)."),
            "see Proxies under Self-hosted in docs/connecting.md (0: off)."
        );
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
            assert_eq!(parse(&[("LOG_LEVEL", v)]).unwrap().log_level.0, l, "{v}");
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
