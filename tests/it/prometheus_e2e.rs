//! Issue 7: the Prometheus side, proven with the real tools instead of by reading YAML.
//!
//! - `promtool check metrics` on a real /metrics output (the exporter reading the
//!   shared seeded Prefect server) reports the `_total` suffix of the five seed gauges,
//!   whose names are kept for compatibility, and nothing else.
//! - End to end: a real Prometheus server (free loopback port, temporary storage)
//!   scrapes the exporter every second and loads monitoring/alerts.yaml. The test
//!   waits for `up{job="prefect"} == 1`, asserts the seed metrics Prometheus stored
//!   equal what the seeding created, that EVERY PromQL expression of
//!   monitoring/dashboard.json (and every `label_values` variable query) returns data,
//!   and that every rule group of alerts.yaml is loaded and evaluates without error
//!   on the real series.
//!
//! promtool and prometheus come from Debian's `prometheus` package (`scripts/test.sh`
//! installs it). When one is missing, its test prints `SKIPPED`, except under CI=true,
//! where it fails. Prometheus and the exporter are stopped, and Prometheus's temporary
//! directory removed, also when a test fails (Drop guards; the harness's watchdog
//! covers a killed test process).
use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Exporter, PrefectServer, ServerOptions, TempDir};

/// Watched flows: flow-b (no deployment) and flow-nope (unknown) are missing.
const CHECK: &str = "flow-a,flow-b,flow-c,flow-nope";
const CHECK_LIST: &[&str] = &["flow-a", "flow-b", "flow-c", "flow-nope"];
const JOB: &str = "prefect";

/// The five gauges whose `_total` suffix is kept for compatibility with the exporter
/// this project replaces (see monitoring/README.md).
const TOTAL_GAUGES: &[&str] = &[
    "prefect_flow_runs_total",
    "prefect_flow_runs_successes_total",
    "prefect_flow_runs_in_error_total",
    "prefect_flow_runs_in_warning_total",
    "prefect_missing_deployments_total",
];
const TOTAL_SUFFIX_FINDING: &str = "non-counter metrics should not have \"_total\" suffix";

/// Families of the golden render that the seeded server cannot show here: the
/// histograms observe runs that end while the exporter runs, and none does.
const NOT_SEEN_HERE: &[&str] = &[
    "prefect_flow_run_duration_seconds",
    "prefect_flow_run_start_delay_seconds",
];

/// Every metric family of the contract (the golden render's), which the lint
/// must see, but those of `NOT_SEEN_HERE`.
fn families_to_lint() -> Vec<String> {
    let all: Vec<String> = support::golden_families()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    for f in NOT_SEEN_HERE {
        assert!(all.iter().any(|a| a == f), "{f} is not a golden family");
    }
    all.into_iter()
        .filter(|f| !NOT_SEEN_HERE.contains(&f.as_str()))
        .collect()
}

const EXPORTER_WAIT: Duration = Duration::from_secs(30);
/// How long the dashboard queries may take to all return data.
const DASHBOARD_DEADLINE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// The Prometheus tools
// ---------------------------------------------------------------------------

/// Starts the exporter against the shared seeded server with the watch list, and
/// waits for a first fully successful collection. It collects every second (the
/// harness's default); the request timeout is raised from its default (the interval,
/// 1 s) because a loaded 2-core machine sometimes needs more: data, not the
/// exporter's timeout handling, is what this file tests.
fn seeded_exporter() -> Exporter {
    let url = PrefectServer::shared().api_url();
    let exp = Exporter::spawn(&[
        ("PREFECT_API_URL", &url),
        ("EXPORTER_CHECK_DEPLOYMENTS", CHECK),
        ("PREFECT_API_REQUEST_TIMEOUT", "10"),
    ]);
    exp.wait_for(
        |m| {
            m.get("prefect_up") == Some(&1.0)
                && m.get("prefect_flow_runs_total").is_some_and(|v| *v > 0.0)
        },
        EXPORTER_WAIT,
    );
    exp
}

// ---------------------------------------------------------------------------
// 1. promtool check metrics
// ---------------------------------------------------------------------------

/// The `# TYPE` families of an exposition text.
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn promtool_check_metrics_reports_only_the_five_total_gauges() {
    let test = "promtool_check_metrics_reports_only_the_five_total_gauges";
    let Some(promtool) = support::tool("promtool", test) else {
        return;
    };
    support::require_prefect!();
    let exp = seeded_exporter();
    let text = exp.metrics_text();

    // The lint must see every family (a missing one would go unchecked).
    let seen = families(&text);
    let absent: Vec<String> = families_to_lint()
        .into_iter()
        .filter(|f| !seen.contains(f))
        .collect();
    assert!(
        absent.is_empty(),
        "/metrics lacks these families, so promtool could not check them: {absent:?}\n{text}"
    );

    let (code, report) = support::promtool_check_metrics(&promtool, &text);
    // promtool exits 3 when it found anything (1: it could not read the input).
    assert!(
        matches!(code, Some(0 | 3)),
        "promtool check metrics failed ({code:?}):\n{report}\ninput:\n{text}"
    );
    let findings: BTreeSet<(String, String)> = report
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| match l.split_once(' ') {
            Some((metric, finding)) => (metric.to_string(), finding.trim().to_string()),
            None => (l.to_string(), String::new()),
        })
        .collect();
    let allowed: BTreeSet<(String, String)> = TOTAL_GAUGES
        .iter()
        .map(|m| (m.to_string(), TOTAL_SUFFIX_FINDING.to_string()))
        .collect();
    let unexpected: Vec<_> = findings.difference(&allowed).collect();
    let missing: Vec<_> = allowed.difference(&findings).collect();
    assert!(
        unexpected.is_empty() && missing.is_empty(),
        "promtool check metrics must report exactly the `_total` suffix of the five seed gauges\n\
         unexpected findings: {unexpected:#?}\nexpected but not reported: {missing:#?}\n\
         full report:\n{report}"
    );
    assert_eq!(code, Some(3), "findings but exit code 0?");
}

// ---------------------------------------------------------------------------
// 2. A real Prometheus server
// ---------------------------------------------------------------------------

/// A Prometheus server on a free loopback port with its config, TSDB and log in a
/// temporary directory; stopped (and the directory removed) on drop.
struct Prometheus {
    child: Child,
    addr: String,
    dir: TempDir,
}

impl Prometheus {
    const READY_DEADLINE: Duration = Duration::from_secs(60);

    fn start(bin: &Path, config: &str) -> Prometheus {
        let mut last_log = String::new();
        for _attempt in 0..3 {
            let dir = TempDir::new("prometheus-e2e");
            let config_path = dir.path().join("prometheus.yml");
            fs::write(&config_path, config).expect("write prometheus.yml");
            let log = fs::File::create(dir.path().join("prometheus.log")).expect("log file");
            let addr = format!("127.0.0.1:{}", support::free_port());
            // Through the harness's watchdog: if the test process is killed, the
            // server is stopped and its directory removed anyway.
            let mut cmd = support::watched_command(bin, Some(dir.path()));
            cmd.arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("dup log"))
                .stderr(log);
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            let mut prom = Prometheus { child, addr, dir };
            match prom.wait_ready() {
                Ok(()) => return prom,
                Err(log) if log.contains("address already in use") => last_log = log,
                Err(log) => panic!("prometheus did not start:\n{log}"),
            }
        }
        panic!("prometheus: the port was always taken:\n{last_log}");
    }

    /// Polls `GET /-/ready` while the process lives.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Self::READY_DEADLINE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited ({status}):\n{}", self.log_tail()));
            }
            if support::http_request(&self.addr, "GET", "/-/ready", &[], b"")
                .is_ok_and(|r| r.status == 200)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not ready after {:?}:\n{}",
                    Self::READY_DEADLINE,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default();
        support::tail_lines(&log, 30)
    }

    /// GET an API path; the decoded JSON envelope (`status`, `data`, `error`).
    fn api(&self, path_and_query: &str) -> Value {
        let r = support::http_request(&self.addr, "GET", path_and_query, &[], b"")
            .unwrap_or_else(|e| panic!("GET {path_and_query}: {e}\n{}", self.log_tail()));
        serde_json::from_str(&r.body).unwrap_or_else(|e| {
            panic!(
                "GET {path_and_query}: {} not JSON ({e}): {}",
                r.status, r.body
            )
        })
    }

    /// An instant query; Ok(result) (a vector's samples, or `[scalar]`), or Err with
    /// Prometheus's error.
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let v = self.api(&format!("/api/v1/query?query={}", urlencode(expr)));
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        match (&v["data"]["resultType"], &v["data"]["result"]) {
            (_, Value::Array(samples)) => Ok(samples.clone()),
            (_, Value::Null) => Ok(Vec::new()),
            (_, other) => Ok(vec![other.clone()]),
        }
    }

    /// The single value of an instant vector query, when it has exactly one sample.
    fn value(&self, expr: &str) -> Option<f64> {
        match self.query(expr).ok()?.as_slice() {
            [sample] => sample["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SIGTERM, then SIGKILL after the grace period; the TempDir goes after this.
        support::terminate(&mut self.child, Duration::from_secs(10));
    }
}

fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The generated config: scrape the exporter every second as job "prefect",
/// evaluate monitoring/alerts.yaml every second.
fn prometheus_config(exporter_addr: &str) -> String {
    let rules = support::monitoring_dir().join("alerts.yaml");
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {rules:?}\n\
         scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: [{exporter_addr:?}]\n",
        rules = rules.display().to_string(),
    )
}

// ---------------------------------------------------------------------------
// The dashboard's queries
// ---------------------------------------------------------------------------

/// One dashboard query: where it is and its PromQL.
#[derive(Clone, Debug)]
struct DashQuery {
    place: String,
    expr: String,
}

/// Every target `expr` of every panel, recursively through rows and collapsed rows.
fn dashboard_queries(dashboard: &Value) -> Vec<DashQuery> {
    fn walk(panels: &Value, path: &str, out: &mut Vec<DashQuery>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("(untitled)");
            let here = if path.is_empty() {
                title.to_string()
            } else {
                format!("{path} / {title}")
            };
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap_or_else(|| {
                    panic!("dashboard panel {here:?}: a target without expr: {t}")
                });
                out.push(DashQuery {
                    place: format!("{here} [{}]", t["refId"].as_str().unwrap_or("?")),
                    expr: expr.to_string(),
                });
            }
            walk(&p["panels"], &here, out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], "", &mut out);
    out
}

/// Grafana's substitutions for a test against one Prometheus: interval variables
/// become `1m`, the `$job`/`$instance` selectors their "All" value `.*`. Those are
/// only correct inside a regex matcher (`=~"$job"`), so anything else is an error.
fn substitute(expr: &str) -> Result<String, String> {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in {expr:?}"))?;
            (&braced[..end], end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        let name = name.split(':').next().unwrap_or(name); // ${job:regex}
        match name {
            "__rate_interval" | "__interval" | "__range" => out.push_str("1m"),
            "" => return Err(format!("a lone `$` in {expr:?}")),
            _ if out.ends_with("=~\"") => out.push_str(".*"),
            other => {
                return Err(format!(
                    "${other} outside a regex matcher (=~\"${other}\") in {expr:?}: \
                     a multi-value variable only works there"
                ))
            }
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `label_values(<selector>, <label>)` variable queries of the dashboard.
fn label_values_queries(dashboard: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] != "query" {
            continue;
        }
        let name = var["name"].as_str().unwrap_or("?").to_string();
        let q = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .or_else(|| var["definition"].as_str())
            .unwrap_or_else(|| panic!("variable {name}: no query: {var}"));
        let inner = q
            .trim()
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {name}: only label_values() is supported: {q}"));
        let (selector, label) = inner
            .rsplit_once(',')
            .unwrap_or_else(|| panic!("variable {name}: label_values without a label: {q}"));
        out.push((name, selector.trim().to_string(), label.trim().to_string()));
    }
    out
}

fn sample_labels(sample: &Value) -> String {
    sample["metric"].to_string()
}

#[test]
fn prometheus_scrapes_the_exporter_and_every_dashboard_query_has_data() {
    let test = "prometheus_scrapes_the_exporter_and_every_dashboard_query_has_data";
    let Some(prometheus_bin) = support::tool("prometheus", test) else {
        return;
    };
    support::require_prefect!();
    let expected = support::shared_expected();
    let dashboard: Value = serde_json::from_str(
        &fs::read_to_string(support::monitoring_dir().join("dashboard.json"))
            .expect("dashboard.json"),
    )
    .expect("dashboard.json is JSON");
    // The histogram panels need runs that ended while the exporter ran, which
    // the shared server must not get: run_histogram_panels_have_data checks them.
    let queries: Vec<DashQuery> = dashboard_queries(&dashboard)
        .into_iter()
        .filter(|q| !is_histogram_query(&q.expr))
        .collect();
    assert!(
        queries.len() >= 20,
        "only {} dashboard queries found",
        queries.len()
    );
    let substituted: Vec<(DashQuery, String)> = queries
        .iter()
        .map(|q| {
            let s = substitute(&q.expr).unwrap_or_else(|e| panic!("{}: {e}", q.place));
            (q.clone(), s)
        })
        .collect();

    // The exporter reads the shared real Prefect server; Prometheus scrapes it.
    let exporter = seeded_exporter();
    let prom = Prometheus::start(&prometheus_bin, &prometheus_config(exporter.addr()));
    let started = Instant::now();
    let context = |prom: &Prometheus| {
        format!(
            "\nprometheus log:\n{}\nexporter stderr:\n{}",
            prom.log_tail(),
            support::tail_lines(&exporter.stderr(), 30)
        )
    };

    // up{job="prefect"} == 1
    let up = format!("up{{job=\"{JOB}\"}} == 1");
    support::poll(Duration::from_secs(30), Duration::from_millis(200), || {
        prom.query(&up).ok().filter(|r| !r.is_empty())
    })
    .unwrap_or_else(|| {
        panic!(
            "{up} never true; targets: {}{}",
            prom.api("/api/v1/targets")["data"],
            context(&prom)
        )
    });
    eprintln!("{test}: up after {:.1?}", started.elapsed());

    // The seed metrics as Prometheus stored them equal what the seeding created.
    // (prefect_up too; not the error counter: one collection that timed out on a
    // loaded machine would keep it above 0 for good.)
    let mut want: Vec<(&str, f64)> = expected.seed_gauges(CHECK_LIST);
    want.push(("prefect_up", 1.0));
    let got_of = |prom: &Prometheus| -> Vec<(&str, Option<f64>)> {
        want.iter()
            .map(|(name, _)| (*name, prom.value(&format!("{name}{{job=\"{JOB}\"}}"))))
            .collect()
    };
    let matched = support::poll(Duration::from_secs(20), Duration::from_millis(250), || {
        let got = got_of(&prom);
        got.iter()
            .zip(&want)
            .all(|((_, g), (_, w))| *g == Some(*w))
            .then_some(())
    });
    if matched.is_none() {
        let got = got_of(&prom);
        let lines: Vec<String> = got
            .iter()
            .zip(&want)
            .map(|((name, g), (_, w))| format!("  {name}: seeded {w}, Prometheus has {g:?}"))
            .collect();
        panic!(
            "seed metrics in Prometheus differ from the seeded server:\n{}{}",
            lines.join("\n"),
            context(&prom)
        );
    }
    assert_eq!(
        prom.value(&format!(
            "prefect_missing_deployments_total{{job=\"{JOB}\"}}"
        )),
        Some(2.0),
        "flow-b and flow-nope have no deployment"
    );

    // EVERY dashboard query returns data (once enough scrapes happened).
    let deadline = Instant::now() + DASHBOARD_DEADLINE;
    let mut empty: Vec<&(DashQuery, String)>;
    loop {
        empty = Vec::new();
        let mut errors = Vec::new();
        for q in &substituted {
            match prom.query(&q.1) {
                Ok(r) if !r.is_empty() => {}
                Ok(_) => empty.push(q),
                Err(e) => errors.push(format!("  {}: {}\n    {}", q.0.place, e, q.1)),
            }
        }
        // A query Prometheus rejects never gets better: report it at once.
        assert!(
            errors.is_empty(),
            "dashboard queries Prometheus rejects:\n{}{}",
            errors.join("\n"),
            context(&prom)
        );
        if empty.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    if !empty.is_empty() {
        let series: BTreeSet<String> = prom.api(&format!(
            "/api/v1/label/__name__/values?match[]={}",
            urlencode(&format!("{{job=\"{JOB}\"}}"))
        ))["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        let lines: Vec<String> = empty
            .iter()
            .map(|(q, s)| format!("  {}:\n    {}", q.place, s))
            .collect();
        panic!(
            "{} of {} dashboard queries stayed empty for {DASHBOARD_DEADLINE:?}:\n{}\n\
             metric names Prometheus has for job {JOB}: {series:?}{}",
            empty.len(),
            substituted.len(),
            lines.join("\n"),
            context(&prom)
        );
    }
    eprintln!(
        "{test}: all {} dashboard queries have data after {:.1?}",
        substituted.len(),
        started.elapsed()
    );

    // Spot checks: a few panels show the seeded values, not just some data.
    assert_panel_values(&prom, &substituted, expected);

    // The dashboard's variables: label_values(selector, label) has values.
    for (name, selector, label) in label_values_queries(&dashboard) {
        let selector = substitute(&selector).unwrap_or_else(|e| panic!("variable {name}: {e}"));
        let v = prom.api(&format!(
            "/api/v1/label/{label}/values?match[]={}",
            urlencode(&selector)
        ));
        let values = v["data"].as_array().cloned().unwrap_or_default();
        assert!(
            !values.is_empty(),
            "dashboard variable ${name} = label_values({selector}, {label}) is empty: {v}"
        );
        if label == "job" {
            assert!(
                values.iter().any(|x| x == JOB),
                "${name} does not offer job {JOB}: {values:?}"
            );
        }
    }

    assert_rules_loaded_and_healthy(&prom, &context);

    // The alert fed by the watch list is pending (for: 10m), with the real series.
    let pending = prom
        .query("ALERTS{alertname=\"PrefectWatchedDeploymentsMissing\"}")
        .unwrap_or_else(|e| panic!("ALERTS: {e}"));
    assert!(
        !pending.is_empty(),
        "PrefectWatchedDeploymentsMissing is neither pending nor firing with 2 missing deployments{}",
        context(&prom)
    );
    let active: Vec<String> = prom
        .query("ALERTS")
        .unwrap_or_default()
        .iter()
        .map(sample_labels)
        .collect();
    eprintln!("{test}: active alerts on the seeded server: {active:#?}");
}

/// A query of the run duration and start delay histograms (issue 14).
fn is_histogram_query(expr: &str) -> bool {
    expr.contains("prefect_flow_run_duration_seconds")
        || expr.contains("prefect_flow_run_start_delay_seconds")
}

/// The dashboard's histogram panels, on a server of their own whose runs end
/// while the exporter runs: every query has data, and the exposition with the
/// histograms passes `promtool check metrics`.
#[test]
fn run_histogram_panels_have_data() {
    let test = "run_histogram_panels_have_data";
    let Some(prometheus_bin) = support::tool("prometheus", test) else {
        return;
    };
    let Some(promtool) = support::tool("promtool", test) else {
        return;
    };
    support::require_prefect!();
    let dashboard: Value = serde_json::from_str(
        &fs::read_to_string(support::monitoring_dir().join("dashboard.json"))
            .expect("dashboard.json"),
    )
    .expect("dashboard.json is JSON");
    let queries: Vec<(String, String)> = dashboard_queries(&dashboard)
        .into_iter()
        .filter(|q| is_histogram_query(&q.expr))
        .map(|q| {
            let s = substitute(&q.expr).unwrap_or_else(|e| panic!("{}: {e}", q.place));
            (q.place, s)
        })
        .collect();
    assert!(queries.len() >= 3, "histogram panels: {queries:?}");

    // Private: runs end while Prometheus scrapes, which would change the flow-run
    // totals the shared server's tests count.
    let server = PrefectServer::start(ServerOptions::default());
    let api = server.api();
    let flow = api.create_flow("etl");
    let deployment = api.create_deployment(&flow, "daily", None);
    let exporter = Exporter::spawn(&[
        ("PREFECT_API_URL", &server.api_url()),
        ("EXPORTER_COLLECTORS", "deployments"),
        ("PREFECT_API_REQUEST_TIMEOUT", "10"),
    ]);
    let prom = Prometheus::start(&prometheus_bin, &prometheus_config(exporter.addr()));
    // Runs end (completed and failed) while Prometheus scrapes, so that the
    // rates over the histograms have increases.
    let finish = |end: (&str, &str)| {
        let run = api.ok(
            "POST",
            &format!("/deployments/{deployment}/create_flow_run"),
            Some(&serde_json::json!({"state": {"type": "SCHEDULED", "name": "Scheduled"}})),
        );
        let id = run["id"].as_str().expect("run id").to_string();
        api.set_flow_run_state(&id, "RUNNING", "Running", true);
        api.set_flow_run_state(&id, end.0, end.1, true);
    };
    let deadline = Instant::now() + DASHBOARD_DEADLINE;
    let mut empty: Vec<&(String, String)>;
    loop {
        finish(("COMPLETED", "Completed"));
        finish(("FAILED", "Failed"));
        empty = queries
            .iter()
            .filter(|(_, expr)| {
                let r = prom.query(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
                !r.iter().any(|s| {
                    s["value"][1]
                        .as_str()
                        .and_then(|v| v.parse::<f64>().ok())
                        .is_some_and(f64::is_finite)
                })
            })
            .collect();
        if empty.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(1000));
    }
    assert!(
        empty.is_empty(),
        "histogram panels without a finite value for {DASHBOARD_DEADLINE:?}: {empty:#?}
{}",
        prom.log_tail()
    );

    let text = exporter.metrics_text();
    assert!(text.contains("# TYPE prefect_flow_run_duration_seconds histogram"));
    assert!(text.contains("# TYPE prefect_flow_run_start_delay_seconds histogram"));
    let (_, report) = support::promtool_check_metrics(&promtool, &text);
    let findings: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("duration_seconds") || l.contains("delay_seconds"))
        .collect();
    assert!(findings.is_empty(), "{report}");
}

/// The substituted expression of a dashboard query by its place (`title [refId]`).
fn dashboard_expr<'a>(queries: &'a [(DashQuery, String)], place: &str) -> &'a str {
    queries
        .iter()
        .find(|(q, _)| q.place == place || q.place.ends_with(&format!(" / {place}")))
        .map(|(_, s)| s.as_str())
        .unwrap_or_else(|| panic!("no dashboard query {place:?} (renamed? update this test)"))
}

/// `{label values...} -> value` of a query's samples, keyed by `labels`.
fn samples_by(prom: &Prometheus, expr: &str, labels: &[&str]) -> BTreeMap<Vec<String>, f64> {
    prom.query(expr)
        .unwrap_or_else(|e| panic!("{expr}: {e}"))
        .iter()
        .map(|s| {
            let key = labels
                .iter()
                .map(|l| s["metric"][*l].as_str().unwrap_or_default().to_string())
                .collect();
            let v = s["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN);
            (key, v)
        })
        .collect()
}

/// Panels whose numbers follow directly from the seed: runs per state (custom state
/// included), late runs, and online workers per pool (the empty pool-idle shown as 0).
fn assert_panel_values(
    prom: &Prometheus,
    queries: &[(DashQuery, String)],
    expected: &support::Expected,
) {
    let per_state = samples_by(
        prom,
        dashboard_expr(queries, "Flow runs per state [A]"),
        &["state_type", "state_name"],
    );
    let want: BTreeMap<Vec<String>, f64> = expected
        .by_state
        .iter()
        .map(|((t, n), c)| (vec![t.clone(), n.clone()], *c as f64))
        .collect();
    assert_eq!(
        per_state, want,
        "panel \"Flow runs per state\" vs. the seed"
    );

    let late = expected
        .by_state
        .iter()
        .filter(|((_, n), _)| n == "Late")
        .map(|(_, c)| *c as f64)
        .sum::<f64>();
    assert_eq!(
        prom.value(dashboard_expr(queries, "Late runs [A]")),
        Some(late),
        "panel \"Late runs\""
    );

    let online = samples_by(
        prom,
        dashboard_expr(queries, "Online workers [A]"),
        &["work_pool"],
    );
    let want: BTreeMap<Vec<String>, f64> = expected
        .work_pools
        .iter()
        .map(|p| (vec![p.name.clone()], p.workers.len() as f64))
        .collect();
    assert_eq!(
        online, want,
        "panel \"Online workers\" (pool-idle must show 0)"
    );
}

/// Every group of alerts.yaml is loaded from that file, and every rule has been
/// evaluated on the real series (again, after the dashboard check) with health "ok".
fn assert_rules_loaded_and_healthy(prom: &Prometheus, context: &dyn Fn(&Prometheus) -> String) {
    let rules_path = support::monitoring_dir().join("alerts.yaml");
    let yaml: serde_norway::Value =
        serde_norway::from_str(&fs::read_to_string(&rules_path).expect("alerts.yaml"))
            .expect("alerts.yaml is YAML");
    let mut want: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for g in yaml["groups"].as_sequence().into_iter().flatten() {
        let rules = g["rules"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|r| r["alert"].as_str().or_else(|| r["record"].as_str()))
            .map(str::to_string)
            .collect();
        want.insert(g["name"].as_str().expect("group name").to_string(), rules);
    }
    assert!(!want.is_empty(), "alerts.yaml has no groups");

    let groups = |prom: &Prometheus| -> Vec<Value> {
        prom.api("/api/v1/rules")["data"]["groups"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let evaluations = |gs: &[Value]| -> BTreeMap<String, String> {
        gs.iter()
            .map(|g| {
                (
                    g["name"].as_str().unwrap_or_default().to_string(),
                    g["lastEvaluation"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    };
    let before = evaluations(&groups(prom));
    // Wait for one more evaluation of every group, so all rules ran on full data.
    let gs = support::poll(Duration::from_secs(20), Duration::from_millis(200), || {
        let gs = groups(prom);
        let now = evaluations(&gs);
        (now.len() == want.len() && now.iter().all(|(name, t)| before.get(name) != Some(t)))
            .then_some(gs)
    })
    .unwrap_or_else(|| {
        panic!(
            "rule groups not (re)evaluated: loaded {:?}, want {:?}{}",
            evaluations(&groups(prom)),
            want.keys(),
            context(prom)
        )
    });

    let mut problems = Vec::new();
    let mut loaded: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for g in &gs {
        let name = g["name"].as_str().unwrap_or_default().to_string();
        let file = g["file"].as_str().unwrap_or_default();
        if Path::new(file) != rules_path {
            problems.push(format!("group {name} comes from {file}"));
        }
        let rules = loaded.entry(name.clone()).or_default();
        for r in g["rules"].as_array().into_iter().flatten() {
            let rule = r["name"].as_str().unwrap_or_default();
            rules.insert(rule.to_string());
            if r["health"] != "ok" {
                problems.push(format!(
                    "{name}/{rule}: health {} {}",
                    r["health"], r["lastError"]
                ));
            }
        }
    }
    if loaded != want {
        problems.push(format!("loaded rules {loaded:?}\nalerts.yaml has {want:?}"));
    }
    assert!(
        problems.is_empty(),
        "rules of monitoring/alerts.yaml:\n{}{}",
        problems.join("\n"),
        context(prom)
    );
}

#[test]
fn substitution_follows_grafana() {
    assert_eq!(
        substitute(r#"rate(x{job=~"$job", instance=~"${instance}"}[$__rate_interval])"#),
        Ok(r#"rate(x{job=~".*", instance=~".*"}[1m])"#.to_string())
    );
    assert!(substitute(r#"x{job="$job"}"#).is_err());
    assert!(substitute("x $").is_err());
}

#[test]
fn dashboard_queries_are_found_in_rows_and_collapsed_rows() {
    let dashboard = serde_json::json!({
        "panels": [
            { "type": "stat", "title": "top", "targets": [{ "refId": "A", "expr": "a" }] },
            { "type": "row", "title": "open row", "panels": [] },
            { "type": "timeseries", "title": "under open row",
              "targets": [{ "refId": "A", "expr": "b" }, { "refId": "B", "expr": "c" }] },
            { "type": "row", "title": "collapsed", "collapsed": true, "panels": [
                { "type": "table", "title": "inside", "targets": [{ "refId": "A", "expr": "d" }] }
            ] }
        ]
    });
    let found: Vec<(String, String)> = dashboard_queries(&dashboard)
        .into_iter()
        .map(|q| (q.place, q.expr))
        .collect();
    let want: Vec<(String, String)> = [
        ("top [A]", "a"),
        ("under open row [A]", "b"),
        ("under open row [B]", "c"),
        ("collapsed / inside [A]", "d"),
    ]
    .iter()
    .map(|(p, e)| (p.to_string(), e.to_string()))
    .collect();
    assert_eq!(found, want);
}

// ---------------------------------------------------------------------------
// 3. Scrapes on kept connections, for longer than the idle timeout
// ---------------------------------------------------------------------------

/// Every scrape must be answered within this, on an idle machine.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);
/// Longer than the exporter's idle timeout (30 s) and a look at its connections.
const PAST_IDLE_TIMEOUT: Duration = Duration::from_secs(35);

/// A client that keeps one connection, as Prometheus's Go transport and curl do:
/// when the server has closed it (end of file or reset before any byte of an
/// answer), the GET is sent once more on a new connection; a timeout is a
/// failure.
struct KeepAliveClient {
    addr: String,
    conn: Option<std::net::TcpStream>,
    /// New connections opened after the first.
    reconnects: usize,
}

impl KeepAliveClient {
    fn scrape(&mut self) -> Result<Duration, String> {
        let t = Instant::now();
        let fresh = self.conn.is_none();
        match self.try_once() {
            Ok(()) => Ok(t.elapsed()),
            Err((closed, _)) if closed && !fresh => {
                self.reconnects += 1;
                self.try_once().map_err(|(_, e)| format!("retry: {e}"))?;
                Ok(t.elapsed())
            }
            Err((_, e)) => Err(e),
        }
    }

    /// One request and its answer; on failure, whether the connection had
    /// been closed by the server before any byte came.
    fn try_once(&mut self) -> Result<(), (bool, String)> {
        if self.conn.is_none() {
            let s = std::net::TcpStream::connect(&self.addr).map_err(|e| (false, e.to_string()))?;
            s.set_read_timeout(Some(ANSWER_WITHIN)).unwrap();
            self.conn = Some(s);
        }
        let s = self.conn.as_mut().unwrap();
        let result = s
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .map_err(|e| (true, e.to_string()))
            .and_then(|()| {
                let mut buf = Vec::new();
                match support::read_answer(s, &mut buf) {
                    Ok(200) => Ok(()),
                    Ok(status) => Err((false, format!("status {status}"))),
                    Err(e) => Err((e.closed_before_answer, e.what)),
                }
            });
        if result.is_err() {
            self.conn = None;
        }
        result
    }
}

#[test]
fn keep_alive_scrapes_are_all_answered_past_the_idle_timeout() {
    let test = "keep_alive_scrapes_are_all_answered_past_the_idle_timeout";
    let Some(prometheus_bin) = support::tool("prometheus", test) else {
        return;
    };
    support::require_prefect!();
    let exporter = seeded_exporter();
    let config = format!(
        "global:\n  scrape_interval: 5s\n  scrape_timeout: 1s\n\
         scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: [{:?}]\n",
        exporter.addr()
    );
    let prom = Prometheus::start(&prometheus_bin, &config);
    let mut client = KeepAliveClient {
        addr: exporter.addr().to_string(),
        conn: None,
        reconnects: 0,
    };
    // Every 5 s for 80 s, past the exporter's 30 s idle timeout and past the
    // 30 s after which, with a receive timeout on the listener, its accept
    // loop ended and stranded every kept connection.
    let started = Instant::now();
    let mut took = Vec::new();
    let scrape = |client: &mut KeepAliveClient, took: &mut Vec<Duration>| {
        let t = client.scrape().unwrap_or_else(|e| {
            panic!(
                "keep-alive scrape {} at {:?} failed: {e}\nexporter stderr:\n{}",
                took.len() + 1,
                started.elapsed(),
                exporter.stderr()
            )
        });
        assert!(t < ANSWER_WITHIN, "a keep-alive scrape took {t:?}");
        took.push(t);
    };
    while started.elapsed() < Duration::from_secs(80) {
        let next = Instant::now() + Duration::from_secs(5);
        scrape(&mut client, &mut took);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    assert_eq!(
        client.reconnects, 0,
        "the kept connection was closed while in use"
    );
    // Idle for longer than the idle timeout: the server closes the connection,
    // and the next GET goes once more on a new one.
    std::thread::sleep(PAST_IDLE_TIMEOUT);
    scrape(&mut client, &mut took);
    assert_eq!(client.reconnects, 1, "the idle connection was never closed");
    scrape(&mut client, &mut took);

    // Prometheus scraped all along: every sample of `up` is 1, none missing.
    let window = started.elapsed().as_secs() + 5;
    let count = |expr: &str| -> f64 {
        prom.query(expr)
            .ok()
            .and_then(|s| s.first().cloned())
            .and_then(|s| s["value"][1].as_str().and_then(|v| v.parse().ok()))
            .unwrap_or(-1.0)
    };
    let samples = count(&format!("count_over_time(up{{job=\"{JOB}\"}}[{window}s])"));
    let lowest = count(&format!("min_over_time(up{{job=\"{JOB}\"}}[{window}s])"));
    let slowest = count(&format!(
        "max_over_time(scrape_duration_seconds{{job=\"{JOB}\"}}[{window}s])"
    ));
    let expected = (started.elapsed().as_secs() / 5) as f64 - 2.0;
    assert!(
        samples >= expected && lowest == 1.0 && slowest < ANSWER_WITHIN.as_secs_f64(),
        "Prometheus: {samples} samples of up (at least {expected} expected), lowest {lowest}, \
         slowest scrape {slowest} s\nprometheus log:\n{}\nexporter stderr:\n{}",
        prom.log_tail(),
        exporter.stderr()
    );
    took.sort();
    eprintln!(
        "keep-alive: {} scrapes, median {:?}, worst {:?}; Prometheus: {samples} samples, all up, slowest {slowest} s",
        took.len(),
        took[took.len() / 2],
        took.last().unwrap()
    );
}
