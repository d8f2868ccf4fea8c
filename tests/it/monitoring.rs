//! The Prometheus side shipped in monitoring/: alert rules, their unit tests, the
//! example scrape configuration and the Grafana dashboard.
//!
//! - `promtool check rules` and `promtool test rules` pass;
//! - `promtool check config` accepts monitoring/prometheus.yml, with its rule_files
//!   path resolved relative to the config file (promtool is run from another
//!   directory);
//! - every alert has a severity, a summary, a description, an explicit `for:`,
//!   and a unit test where it fires and one where it does not;
//! - dashboard.json is valid JSON, every panel query has an `expr` and uses the
//!   `${datasource}` variable, and only the template variables the end-to-end test
//!   knows how to substitute.
//!
//! promtool comes from Debian's `prometheus` package and is looked up in PATH. When
//! it is missing the promtool tests print a skip message, except under CI=true,
//! where they fail.

use crate::support;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn read(name: &str) -> String {
    let path = support::monitoring_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Runs promtool with `args` in `dir`, asserts success, returns stdout + stderr.
/// At the lowest priority: the rules' unit tests take a core for most of a
/// minute, and they bound no time, unlike the collections of the tests beside.
fn run_promtool(promtool: &Path, dir: &Path, args: &[&str]) -> String {
    let out = Command::new("nice")
        .args(["-n", "19"])
        .arg(promtool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("run {} {args:?}: {e}", promtool.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {args:?} failed ({}):\n{text}",
        out.status
    );
    text
}

#[test]
fn alert_rules_pass_promtool_check() {
    let Some(promtool) = support::tool("promtool", "alert_rules_pass_promtool_check") else {
        return;
    };
    let out = run_promtool(
        &promtool,
        &support::monitoring_dir(),
        &["check", "rules", "alerts.yaml"],
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    let Some(promtool) = support::tool("promtool", "alert_rules_pass_their_unit_tests") else {
        return;
    };
    let out = run_promtool(
        &promtool,
        &support::monitoring_dir(),
        &["test", "rules", "alerts.test.yaml"],
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn example_prometheus_config_is_valid_and_finds_the_rules() {
    let Some(promtool) = support::tool(
        "promtool",
        "example_prometheus_config_is_valid_and_finds_the_rules",
    ) else {
        return;
    };
    // Run from another directory: rule_files must resolve relative to the config
    // file, not to the working directory.
    let config = support::monitoring_dir().join("prometheus.yml");
    let out = run_promtool(
        &promtool,
        &std::env::temp_dir(),
        &["check", "config", config.to_str().expect("UTF-8 path")],
    );
    assert!(out.contains("1 rule files found"), "{out}");
    assert!(
        out.contains(
            &support::monitoring_dir()
                .join("alerts.yaml")
                .display()
                .to_string()
        ),
        "promtool did not check monitoring/alerts.yaml:\n{out}"
    );
}

fn yaml(name: &str) -> serde_norway::Value {
    serde_norway::from_str(&read(name)).unwrap_or_else(|e| panic!("{name} is not valid YAML: {e}"))
}

fn seq(v: &serde_norway::Value) -> &[serde_norway::Value] {
    v.as_sequence().map_or(&[], Vec::as_slice)
}

#[test]
fn every_alert_is_documented_and_has_a_firing_and_a_silent_unit_test() {
    let rules = yaml("alerts.yaml");
    let mut names = Vec::new();
    for rule in seq(&rules["groups"]).iter().flat_map(|g| seq(&g["rules"])) {
        let Some(name) = rule["alert"].as_str() else {
            continue;
        };
        let severity = rule["labels"]["severity"].as_str();
        assert!(
            matches!(severity, Some("critical" | "warning")),
            "{name}: severity label must be critical or warning, is {severity:?}"
        );
        for key in ["summary", "description"] {
            let text = rule["annotations"][key].as_str().unwrap_or("");
            assert!(!text.trim().is_empty(), "{name}: no {key} annotation");
        }
        assert!(rule["for"].is_string(), "{name}: no explicit for: duration");
        names.push(name.to_string());
    }
    assert!(names.len() >= 10, "too few alerts found: {names:?}");

    let tests = yaml("alerts.test.yaml");
    assert!(
        seq(&tests["rule_files"]).iter().any(|f| f == "alerts.yaml"),
        "alerts.test.yaml does not load alerts.yaml"
    );
    let cases: Vec<(&str, usize)> = seq(&tests["tests"])
        .iter()
        .flat_map(|t| seq(&t["alert_rule_test"]))
        .map(|c| {
            let name = c["alertname"]
                .as_str()
                .expect("alert_rule_test without alertname");
            (name, seq(&c["exp_alerts"]).len())
        })
        .collect();
    for (name, _) in &cases {
        assert!(
            names.iter().any(|n| n == name),
            "test of unknown alert {name}"
        );
    }
    for name in &names {
        let firing = cases.iter().filter(|(n, k)| n == name && *k > 0).count();
        let silent = cases.iter().filter(|(n, k)| n == name && *k == 0).count();
        assert!(
            firing > 0 && silent > 0,
            "{name}: {firing} firing and {silent} silent test case(s); need one of each"
        );
    }
}

/// Every panel, rows' nested panels included, except the rows themselves.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            if let Some(nested) = p.get("panels") {
                walk(nested, out);
            }
            if p["type"] != "row" {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn uses_datasource_variable(v: &Value) -> bool {
    v["datasource"]["uid"] == "${datasource}"
        && (v["datasource"]["type"] == "prometheus" || v["datasource"]["type"].is_null())
}

/// The `$name` / `${name}` variables an expression refers to.
fn variables(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(pos) = rest.find('$') {
        rest = &rest[pos + 1..];
        let braced = rest.starts_with('{');
        let body = if braced { &rest[1..] } else { rest };
        let name: String = body
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        out.push(name);
    }
    out
}

#[test]
fn dashboard_is_valid_and_every_query_uses_the_datasource_variable() {
    let dashboard: Value =
        serde_json::from_str(&read("dashboard.json")).expect("dashboard.json is not valid JSON");

    assert!(dashboard["title"].is_string(), "dashboard has no title");
    assert!(
        dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion missing or too old"
    );
    let vars = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let ds = vars
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a template variable named datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert!(
            uses_datasource_variable(v),
            "variable {} does not use ${{datasource}}",
            v["name"]
        );
    }

    let panels = panels(&dashboard);
    assert!(panels.len() >= 10, "only {} panels", panels.len());
    let mut ids = std::collections::HashSet::new();
    let mut exprs = 0;
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("<untitled>");
        assert!(
            ids.insert(p["id"].to_string()),
            "duplicate panel id in {title}"
        );
        assert!(p["gridPos"].is_object(), "{title}: no gridPos");
        assert!(
            uses_datasource_variable(p),
            "{title}: panel datasource is not ${{datasource}}: {}",
            p["datasource"]
        );
        let targets = p["targets"].as_array().filter(|t| !t.is_empty());
        let targets = targets.unwrap_or_else(|| panic!("{title}: no targets"));
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or("").trim();
            assert!(!expr.is_empty(), "{title}: a target has no expr: {t}");
            assert!(
                uses_datasource_variable(t),
                "{title}: target datasource is not ${{datasource}}: {}",
                t["datasource"]
            );
            // The end-to-end test substitutes exactly these variables.
            for var in variables(expr) {
                assert!(
                    ["job", "instance", "__rate_interval"].contains(&var.as_str()),
                    "{title}: {expr} uses ${var}; allowed: $job, $instance, $__rate_interval"
                );
            }
            assert!(
                expr.contains("job=~\"$job\"") && expr.contains("instance=~\"$instance\""),
                "{title}: {expr} does not filter on $job and $instance"
            );
            exprs += 1;
        }
    }
    // The five seed gauges, the counter and the health series all appear.
    let all: String = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let golden = support::golden_families();
    for metric in [
        "prefect_flow_runs_total",
        "prefect_flow_runs_successes_total",
        "prefect_flow_runs_in_error_total",
        "prefect_flow_runs_in_warning_total",
        "prefect_missing_deployments_total",
        "prefect_exporter_collect_errors_total",
        "prefect_up",
        "prefect_exporter_last_success_timestamp_seconds",
        "prefect_exporter_collect_duration_seconds",
        "prefect_exporter_collector_success",
        "prefect_exporter_build_info",
        "prefect_server_info",
        "prefect_flow_runs{",
        "prefect_deployment_last_run_timestamp_seconds",
        "prefect_deployment_late_flow_runs",
        "prefect_work_pool_workers",
        // Issue 13: every operator series has a panel.
        "prefect_late_flow_runs{",
        "prefect_late_flow_runs_listed",
        "prefect_late_flow_runs_capped",
        "prefect_work_queues{",
        "prefect_work_queue_info",
        "prefect_work_queue_last_polled_timestamp_seconds",
        "prefect_work_queue_late_flow_runs",
        "prefect_work_queue_concurrency_limit",
        "prefect_work_queue_active_slots",
        "prefect_deployment_active_flow_runs",
        "prefect_deployment_oldest_active_flow_run_timestamp_seconds",
        "prefect_active_flow_runs_listed",
        "prefect_active_flow_runs_capped",
        "prefect_concurrency_limit_slots",
        "prefect_concurrency_limit_active_slots",
        "prefect_concurrency_limit_enabled",
        "prefect_work_pool_concurrency_limit",
        "prefect_work_pool_active_slots",
        "prefect_deployment_concurrency_limit_slots",
        "prefect_deployment_concurrency_limit_active_slots",
        "prefect_deployment_concurrency_limit_enabled",
    ] {
        assert!(all.contains(metric), "no panel queries {metric}");
        // The list names families of the golden render, the one list of them.
        let family = metric.trim_end_matches('{');
        assert!(
            golden.iter().any(|(name, _)| name == family),
            "{family} is not a family of tests/fixtures/golden/metrics.prom"
        );
    }
    assert!(exprs >= 20, "only {exprs} queries");
}

/// docs/metrics.md documents every family of the golden render with its type,
/// and no family that the exporter does not have (the `process_*` series are
/// rendered at scrape time, outside the golden render).
#[test]
fn docs_metrics_lists_exactly_the_golden_families() {
    let path = support::project_root().join("docs/metrics.md");
    let docs = std::fs::read_to_string(&path).expect("docs/metrics.md");
    let mut documented = std::collections::BTreeMap::new();
    for line in docs.lines() {
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        let Some(kind) = cells.get(1).and_then(|k| k.split_whitespace().next()) else {
            continue;
        };
        if !["gauge", "counter", "histogram"].contains(&kind) {
            continue;
        }
        for name in cells[0].split('`').skip(1).step_by(2) {
            let name = name.split('{').next().unwrap_or_default();
            if !name.starts_with("process_") {
                documented.insert(name.to_string(), kind.to_string());
            }
        }
    }
    let golden: std::collections::BTreeMap<String, String> =
        support::golden_families().into_iter().collect();
    assert_eq!(
        documented, golden,
        "docs/metrics.md (left) and tests/fixtures/golden/metrics.prom (right) disagree"
    );
}
