//! The deployment files under deploy/ and the Containerfile: each is checked by a
//! tool where one exists (`systemd-analyze verify` and `security` for the unit) and
//! otherwise parsed, with the image, port, probes and paths they must agree on.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_norway::Value;

use crate::support::{have, is_ci, project_root, TempDir};

/// Writes straight to the process's stderr: unlike `eprintln!`, libtest does not
/// capture it, so a skip is visible in a normal `cargo test` run.
macro_rules! skip_note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
const PORT: u64 = 8080;
const IMAGE: &str = "prefect-exporter";

fn read(rel: &str) -> String {
    let path = project_root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn yaml(rel: &str) -> Value {
    serde_norway::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

/// `v[k1][k2]...`, failing with the path when a key is missing.
fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    let mut cur = v;
    for (i, k) in path.iter().enumerate() {
        cur = cur
            .get(*k)
            .unwrap_or_else(|| panic!("missing key {}", path[..=i].join(".")));
    }
    cur
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{} is not a string", path.join(".")))
}

fn seq<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    at(v, path)
        .as_sequence()
        .unwrap_or_else(|| panic!("{} is not a list", path.join(".")))
}

/// Parses `Key=Value` lines of a unit file (comments and sections ignored).
fn unit_settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

const UNIT: &str = "deploy/systemd/prefect-exporter.service";

#[test]
fn systemd_unit_is_hardened() {
    let settings = unit_settings(&read(UNIT));
    let get = |key: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    for (key, want) in [
        ("ExecStart", "/usr/local/bin/prefect-exporter"),
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6"),
        ("EnvironmentFile", "-/etc/prefect-exporter/env"),
        ("Restart", "on-failure"),
        ("RestartPreventExitStatus", "2"),
    ] {
        assert_eq!(get(key), vec![want], "{UNIT}: {key}");
    }
    // 1,000 connections at once: a thread and two descriptors each, beside
    // the exporter's own dozen threads and descriptors.
    let number = |key: &str| -> u64 {
        get(key)
            .first()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{UNIT}: {key} is not one number"))
    };
    assert!(number("TasksMax") >= 1000 + 16, "{UNIT}: TasksMax");
    assert!(
        number("LimitNOFILE") >= 2 * 1000 + 64,
        "{UNIT}: LimitNOFILE"
    );
    let mem = get("MemoryMax");
    assert_eq!(mem.len(), 1, "{UNIT}: one MemoryMax");
    assert!(
        mem[0].ends_with('M'),
        "{UNIT}: MemoryMax in MiB, got {}",
        mem[0]
    );

    // The example env file sets only variables the exporter knows, and the port.
    let env = read("deploy/systemd/prefect-exporter.env");
    let known = [
        "PREFECT_API_URL",
        "PREFECT_API_AUTH_STRING",
        "PREFECT_API_KEY",
        "PREFECT_API_REQUEST_TIMEOUT",
        "PREFECT_CLIENT_MAX_RETRIES",
        "PREFECT_CLIENT_CUSTOM_HEADERS",
        "PREFECT_API_SSL_CERT_FILE",
        "PREFECT_API_TLS_INSECURE_SKIP_VERIFY",
        "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED",
        "EXPORTER_PORT",
        "EXPORTER_ADDRESS",
        "EXPORTER_INTERVAL",
        "LOG_LEVEL",
        "EXPORTER_CHECK_DEPLOYMENTS",
    ];
    for line in env.lines().map(|l| l.trim_start_matches('#')) {
        if let Some((name, _)) = line.split_once('=') {
            if name.chars().all(|c| c.is_ascii_uppercase() || c == '_') && !name.is_empty() {
                assert!(known.contains(&name), "env file: unknown variable {name}");
            }
        }
    }
    assert!(
        env.contains(&format!("\nEXPORTER_PORT={PORT}\n")),
        "env file: EXPORTER_PORT={PORT}"
    );
}

/// A copy of the unit whose ExecStart is the binary cargo built: verify checks that
/// the command exists.
fn unit_copy(dir: &Path) -> PathBuf {
    let text = read(UNIT).replace(
        "ExecStart=/usr/local/bin/prefect-exporter",
        &format!("ExecStart={}", env!("CARGO_BIN_EXE_prefect-exporter")),
    );
    let path = dir.join("prefect-exporter.service");
    std::fs::write(&path, text).unwrap();
    path
}

fn skip_without_systemd_analyze() -> bool {
    if have("systemd-analyze") {
        return false;
    }
    assert!(
        !is_ci(),
        "CI=true but systemd-analyze is missing (Debian package systemd)"
    );
    skip_note!("SKIPPED: systemd-analyze not found; the unit was not verified");
    true
}

#[test]
fn systemd_unit_verifies() {
    if skip_without_systemd_analyze() {
        return;
    }
    let tmp = TempDir::new("deploy-verify");
    let dir = tmp.path();
    let unit = unit_copy(dir);
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("run systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on unknown keys and only warns: any line about our unit fails.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("prefect-exporter"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify failed ({}):\n{stderr}",
        out.status
    );
}

#[test]
fn systemd_unit_exposure_is_low() {
    if skip_without_systemd_analyze() {
        return;
    }
    let tmp = TempDir::new("deploy-security");
    let dir = tmp.path();
    let unit = unit_copy(dir);
    // --threshold is the overall exposure x10: 20 means "at most 2.0 of 10".
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=20", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("run systemd-analyze security");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exposure above 2.0:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn container(deployment: &Value) -> &Value {
    let containers = seq(deployment, &["spec", "template", "spec", "containers"]);
    containers
        .iter()
        .find(|c| c.get("name").and_then(Value::as_str) == Some(IMAGE))
        .expect("a container named prefect-exporter")
}

#[test]
fn kubernetes_deployment() {
    let d = yaml("deploy/kubernetes/deployment.yaml");
    assert_eq!(s(&d, &["apiVersion"]), "apps/v1");
    assert_eq!(s(&d, &["kind"]), "Deployment");
    let labels = at(&d, &["spec", "template", "metadata", "labels"]);
    assert_eq!(at(&d, &["spec", "selector", "matchLabels"]), labels);

    let c = container(&d);
    let image = s(c, &["image"]);
    assert!(
        image
            .rsplit('/')
            .next()
            .unwrap()
            .starts_with(&format!("{IMAGE}:")),
        "image {image}"
    );
    let ports = seq(c, &["ports"]);
    assert_eq!(ports.len(), 1);
    assert_eq!(at(&ports[0], &["containerPort"]).as_u64(), Some(PORT));
    let port_name = s(&ports[0], &["name"]);

    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(s(c, &[probe, "httpGet", "path"]), path, "{probe}");
        let port = at(c, &[probe, "httpGet", "port"]);
        assert!(
            port.as_str() == Some(port_name) || port.as_u64() == Some(PORT),
            "{probe} port {port:?}"
        );
    }

    // Resources: a memory limit (sized from measured RSS) and a request below it.
    let limit = s(c, &["resources", "limits", "memory"]);
    let request = s(c, &["resources", "requests", "memory"]);
    let mib = |q: &str| -> u64 {
        q.strip_suffix("Mi")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("memory quantity {q} not in Mi"))
    };
    assert!(
        mib(request) <= mib(limit) && mib(limit) <= 256,
        "{request} / {limit}"
    );

    // Security: non-root, read-only root, no capabilities, no escalation.
    let sc = at(c, &["securityContext"]);
    assert_eq!(at(sc, &["runAsNonRoot"]).as_bool(), Some(true));
    assert_eq!(at(sc, &["readOnlyRootFilesystem"]).as_bool(), Some(true));
    assert_eq!(at(sc, &["allowPrivilegeEscalation"]).as_bool(), Some(false));
    let drop: Vec<&str> = seq(sc, &["capabilities", "drop"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(drop, ["ALL"]);
    assert_eq!(
        at(
            &d,
            &["spec", "template", "spec", "securityContext", "runAsUser"]
        )
        .as_u64(),
        Some(65534)
    );

    // Credentials come from a Secret, never from a literal value.
    let env = seq(c, &["env"]);
    for name in ["PREFECT_API_KEY", "PREFECT_API_AUTH_STRING"] {
        let e = env
            .iter()
            .find(|e| e.get("name").and_then(Value::as_str) == Some(name))
            .unwrap_or_else(|| panic!("env {name}"));
        assert!(e.get("value").is_none(), "{name} must not be a literal");
        assert_eq!(s(e, &["valueFrom", "secretKeyRef", "key"]), name);
    }
    let port_env = env
        .iter()
        .find(|e| e.get("name").and_then(Value::as_str) == Some("EXPORTER_PORT"))
        .expect("env EXPORTER_PORT");
    assert_eq!(s(port_env, &["value"]), PORT.to_string());
}

#[test]
fn kubernetes_service_and_servicemonitor() {
    let d = yaml("deploy/kubernetes/deployment.yaml");
    let pod_labels = at(&d, &["spec", "template", "metadata", "labels"]);
    let port_name = s(&seq(container(&d), &["ports"])[0], &["name"]).to_string();

    let svc = yaml("deploy/kubernetes/service.yaml");
    assert_eq!(s(&svc, &["kind"]), "Service");
    // The selector picks the Deployment's pods.
    let selector = at(&svc, &["spec", "selector"]).as_mapping().unwrap();
    for (k, v) in selector {
        assert_eq!(pod_labels.get(k), Some(v), "service selector {k:?}");
    }
    let ports = seq(&svc, &["spec", "ports"]);
    assert_eq!(ports.len(), 1);
    assert_eq!(at(&ports[0], &["port"]).as_u64(), Some(PORT));
    let target = at(&ports[0], &["targetPort"]);
    assert!(target.as_str() == Some(port_name.as_str()) || target.as_u64() == Some(PORT));
    let svc_port_name = s(&ports[0], &["name"]);

    let sm = yaml("deploy/kubernetes/servicemonitor.yaml");
    assert_eq!(s(&sm, &["apiVersion"]), "monitoring.coreos.com/v1");
    assert_eq!(s(&sm, &["kind"]), "ServiceMonitor");
    let svc_labels = at(&svc, &["metadata", "labels"]);
    let match_labels = at(&sm, &["spec", "selector", "matchLabels"])
        .as_mapping()
        .unwrap();
    for (k, v) in match_labels {
        assert_eq!(svc_labels.get(k), Some(v), "servicemonitor selector {k:?}");
    }
    let endpoints = seq(&sm, &["spec", "endpoints"]);
    assert_eq!(endpoints.len(), 1);
    assert_eq!(s(&endpoints[0], &["path"]), "/metrics");
    assert_eq!(s(&endpoints[0], &["port"]), svc_port_name);
    // The target's job is the one the alert rules select (else: the Service name).
    let job = seq(&endpoints[0], &["relabelings"])
        .iter()
        .find(|r| r.get("targetLabel").and_then(Value::as_str) == Some("job"))
        .expect("a relabeling that sets job");
    assert_eq!(s(job, &["replacement"]), alerts_job());
}

#[test]
fn compose_stack() {
    let c = yaml("deploy/compose.yaml");
    let services = at(&c, &["services"]).as_mapping().unwrap();
    let mut names: Vec<&str> = services.keys().filter_map(Value::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["prefect-exporter", "prefect-server", "prometheus"]);

    let server = at(&c, &["services", "prefect-server"]);
    assert!(s(server, &["image"]).contains("prefecthq/prefect:3"));

    let exporter = at(&c, &["services", "prefect-exporter"]);
    let image = s(exporter, &["image"]);
    assert!(
        image.ends_with(&format!("/{IMAGE}:latest")),
        "image {image}"
    );
    assert_eq!(s(exporter, &["build", "dockerfile"]), "Containerfile");
    assert_eq!(s(exporter, &["build", "context"]), "..");
    let ports: Vec<&str> = seq(exporter, &["ports"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        ports.contains(&format!("{PORT}:{PORT}").as_str()),
        "ports {ports:?}"
    );
    assert_eq!(
        s(exporter, &["environment", "PREFECT_API_URL"]),
        "http://prefect-server:4200/api"
    );
    assert_eq!(
        s(exporter, &["environment", "EXPORTER_PORT"]),
        PORT.to_string()
    );
    assert_eq!(at(exporter, &["read_only"]).as_bool(), Some(true));

    // Prometheus mounts the project's monitoring/ files, which must exist.
    let prom = at(&c, &["services", "prometheus"]);
    assert!(s(prom, &["image"]).contains("prom/prometheus"));
    // monitoring/prometheus.yml scrapes localhost:8080: Prometheus runs in the
    // exporter's network namespace, whose ports publish Prometheus' 9090 too.
    assert_eq!(s(prom, &["network_mode"]), "service:prefect-exporter");
    assert!(
        ports.contains(&"9090:9090"),
        "exporter service publishes 9090"
    );
    let scrape = read("monitoring/prometheus.yml");
    assert!(
        scrape.contains(&format!("localhost:{PORT}")),
        "monitoring/prometheus.yml no longer scrapes localhost:{PORT}: fix deploy/compose.yaml"
    );
    let volumes: Vec<&str> = seq(prom, &["volumes"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for file in ["prometheus.yml", "alerts.yaml"] {
        let mount = volumes
            .iter()
            .find(|v| v.starts_with(&format!("../monitoring/{file}:")))
            .unwrap_or_else(|| panic!("prometheus mounts ../monitoring/{file}"));
        assert!(
            mount.contains(&format!(":/etc/prometheus/{file}")),
            "mount {mount}"
        );
        assert!(
            project_root().join("monitoring").join(file).is_file(),
            "monitoring/{file} missing"
        );
    }
}

#[test]
fn containerfile_stages() {
    let text = read("Containerfile");
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert!(
        froms[0].contains(" AS builder"),
        "first stage is the builder: {froms:?}"
    );
    assert!(froms.contains(&"FROM scratch AS base"), "{froms:?}");
    assert!(froms.contains(&"FROM base AS prebuilt"), "{froms:?}");
    // The last stage (the default target) is built from source, also FROM scratch.
    assert!(froms.last().unwrap().starts_with("FROM base"), "{froms:?}");
    for line in [
        "USER 65534:65534",
        &format!("EXPOSE {PORT}"),
        "ENTRYPOINT [\"/prefect-exporter\"]",
        "COPY dist/prefect-exporter /prefect-exporter",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "Containerfile lacks `{line}`"
        );
    }
    // The context excludes the build tree and the virtualenv.
    let ignore = read(".containerignore");
    for entry in ["target/", ".venv/", ".venv-helm/", ".git/"] {
        assert!(
            ignore.lines().any(|l| l == entry),
            ".containerignore lacks {entry}"
        );
    }
}

#[test]
fn kubernetes_networkpolicy_admits_only_prometheus() {
    let d = yaml("deploy/kubernetes/deployment.yaml");
    let pod_labels = at(&d, &["spec", "template", "metadata", "labels"]);
    let port_name = s(&seq(container(&d), &["ports"])[0], &["name"]).to_string();

    let np = yaml("deploy/kubernetes/networkpolicy.yaml");
    assert_eq!(s(&np, &["apiVersion"]), "networking.k8s.io/v1");
    assert_eq!(s(&np, &["kind"]), "NetworkPolicy");
    // It applies to the exporter's pods.
    let selector = at(&np, &["spec", "podSelector", "matchLabels"])
        .as_mapping()
        .expect("podSelector.matchLabels");
    assert!(
        !selector.is_empty(),
        "an empty podSelector selects every pod"
    );
    for (k, v) in selector {
        assert_eq!(pod_labels.get(k), Some(v), "podSelector {k:?}");
    }
    // Ingress only: the exporter must still reach Prefect.
    let types: Vec<&str> = seq(&np, &["spec", "policyTypes"])
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    assert_eq!(types, ["Ingress"]);
    // One rule: one peer that must match both a namespace and Prometheus's pods
    // (two peers would be an OR), on the metrics port only.
    let rules = seq(&np, &["spec", "ingress"]);
    assert_eq!(rules.len(), 1, "exactly one ingress rule");
    let peers = seq(&rules[0], &["from"]);
    assert_eq!(peers.len(), 1, "one peer: namespace AND pod selector");
    let ns = at(&peers[0], &["namespaceSelector", "matchLabels"])
        .as_mapping()
        .expect("namespaceSelector.matchLabels");
    let pods = at(&peers[0], &["podSelector", "matchLabels"])
        .as_mapping()
        .expect("podSelector.matchLabels");
    assert!(
        !ns.is_empty() && !pods.is_empty(),
        "empty selectors admit all"
    );
    assert!(
        pods.values().any(|v| v.as_str() == Some("prometheus")),
        "the peer is Prometheus: {pods:?}"
    );
    assert!(peers[0].get("ipBlock").is_none());
    let ports = seq(&rules[0], &["ports"]);
    assert_eq!(ports.len(), 1);
    let port = at(&ports[0], &["port"]);
    assert!(
        port.as_str() == Some(port_name.as_str()) || port.as_u64() == Some(PORT),
        "the metrics port: {port:?}"
    );
    assert_eq!(s(&ports[0], &["protocol"]), "TCP");
}

// --- The Helm chart ----------------------------------------------------------------
//
// Rendered and linted by Helm 4 as a library (tests/helm_chart.py, in the venv of
// scripts/helm-venv.sh), the manifests validated by kubernetes-validate, offline.

const CHART: &str = "deploy/helm/prefect-exporter";
/// The chart's custom resources: kubernetes-validate has no schema for them, so
/// they are checked here by hand.
const CRDS: [&str; 2] = ["ServiceMonitor", "PrometheusRule"];
/// Where tests/helm_chart.py installs the chart.
const RELEASE: &str = "prefect-exporter";
const NAMESPACE: &str = "monitoring";

/// The chart tools' venv: `$HELM_VENV`, else `<repo>/.venv-helm`.
fn helm_venv() -> PathBuf {
    std::env::var_os("HELM_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join(".venv-helm"))
}

/// The venv's python once scripts/helm-venv.sh has made sure of the venv (once per
/// test binary; the script itself is idempotent). None, a skip, when it cannot be
/// installed, which under CI=true is a failure instead.
fn helm_tools() -> Option<PathBuf> {
    static READY: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let ready = READY.get_or_init(|| {
        let out = Command::new(project_root().join("scripts/helm-venv.sh"))
            .env("HELM_VENV", helm_venv())
            .output()
            .map_err(|e| format!("cannot run scripts/helm-venv.sh: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "scripts/helm-venv.sh failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    match ready {
        Ok(()) => Some(helm_venv().join("bin").join("python")),
        Err(e) => {
            assert!(!is_ci(), "CI=true but the chart tools are missing: {e}");
            skip_note!("SKIPPED: no chart tools ({e}); the Helm chart was not checked");
            None
        }
    }
}

/// One run of tests/helm_chart.py; its JSON answer.
fn helm(python: &Path, command: &str, values: &serde_json::Value) -> serde_json::Value {
    let out = Command::new(python)
        .arg(project_root().join("tests/helm_chart.py"))
        .arg(command)
        .arg(project_root().join(CHART))
        .arg(values.to_string())
        .output()
        .expect("run tests/helm_chart.py");
    assert!(
        out.status.success(),
        "helm_chart.py {command} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "helm_chart.py {command}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// What an install would create, and the NOTES it would print.
struct Rendered {
    docs: Vec<Value>,
    notes: String,
}

impl Rendered {
    fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs
            .iter()
            .filter(|d| d.get("kind").and_then(Value::as_str) == Some(kind))
            .collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let all = self.all(kind);
        assert_eq!(all.len(), 1, "one {kind} expected, got {}", all.len());
        all[0]
    }
}

/// The chart rendered with `values` over its defaults; Err: Helm's refusal (the
/// schema, or a template's `fail`).
fn render(python: &Path, values: &serde_json::Value) -> Result<Rendered, String> {
    use serde::Deserialize as _;
    let answer = helm(python, "render", values);
    if let Some(e) = answer.get("error") {
        return Err(e.as_str().unwrap_or_default().to_string());
    }
    let manifests = answer["manifests"].as_object().expect("manifests");
    let mut docs = Vec::new();
    let mut notes = String::new();
    for (path, text) in manifests {
        let text = text.as_str().expect("a manifest is text");
        if path.ends_with("/NOTES.txt") {
            notes = text.to_string();
            continue;
        }
        for doc in serde_norway::Deserializer::from_str(text) {
            let v = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{path} is not YAML: {e}\n{text}"));
            if !v.is_null() {
                docs.push(v);
            }
        }
    }
    Ok(Rendered { docs, notes })
}

fn rendered(python: &Path, values: &serde_json::Value) -> Rendered {
    render(python, values).unwrap_or_else(|e| panic!("render {values}: {e}"))
}

/// ci/all-on-values.yaml: every optional part of the chart turned on.
fn all_on_values() -> serde_json::Value {
    serde_json::to_value(yaml(&format!("{CHART}/ci/all-on-values.yaml"))).unwrap()
}

fn env_of<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    seq(c, &["env"])
        .iter()
        .find(|e| e.get("name").and_then(Value::as_str) == Some(name))
}

/// The names and defaults of the exporter's settings, read from the table of
/// docs/settings.md (a unit test holds it to src/config/settings.rs's SETTINGS).
/// "`A` / `B`" rows name two variables.
fn exporter_settings() -> Vec<(String, String)> {
    let text = read("docs/settings.md");
    let start = text
        .find("| variable | default | meaning |")
        .expect("the settings table in docs/settings.md");
    let mut out = Vec::new();
    for row in text[start..].lines().skip(2) {
        let Some(row) = row.strip_prefix("| ") else {
            break;
        };
        let cells: Vec<&str> = row.splitn(3, " | ").collect();
        assert_eq!(cells.len(), 3, "a settings row has 3 cells: {row}");
        let default = cells[1].replace('`', "");
        for name in cells[0].split(" / ") {
            out.push((name.trim_matches('`').to_string(), default.clone()));
        }
    }
    assert!(out.len() > 20, "the settings table parsed to {out:?}");
    out
}

/// The variables the chart sets itself: the `$reserved` list of its Deployment
/// template, which refuses them in `config`.
fn chart_reserved_settings() -> Vec<String> {
    let text = read(&format!("{CHART}/templates/deployment.yaml"));
    let line = text
        .lines()
        .find(|l| l.contains("$reserved := list"))
        .expect("$reserved in templates/deployment.yaml");
    line.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// The job that monitoring/alerts.yaml's PrefectExporterDown expects: `up{job="..."}`.
fn alerts_job() -> String {
    let text = read("monitoring/alerts.yaml");
    let at = text
        .find("up{job=\"")
        .expect("up{job=\"...\"} in alerts.yaml")
        + 8;
    text[at..].split('"').next().unwrap().to_string()
}

#[test]
fn helm_chart_versions() {
    let chart = yaml(&format!("{CHART}/Chart.yaml"));
    assert_eq!(s(&chart, &["apiVersion"]), "v2");
    assert_eq!(s(&chart, &["name"]), IMAGE);
    assert_eq!(
        s(&chart, &["appVersion"]),
        env!("CARGO_PKG_VERSION"),
        "Chart.yaml appVersion must be the crate version (Cargo.toml)"
    );
    // The default image is the one `make image` builds, tagged with appVersion.
    let values = yaml(&format!("{CHART}/values.yaml"));
    let image_sh = read("scripts/image.sh");
    assert!(
        image_sh.contains(&format!(
            "image=\"${{IMAGE:-{}}}\"",
            s(&values, &["image", "repository"])
        )),
        "values.yaml image.repository is not scripts/image.sh's default image name"
    );
    assert!(
        image_sh.contains("-t \"$image:$version\""),
        "make image tags the version"
    );
    assert_eq!(s(&values, &["image", "tag"]), "", "empty tag: appVersion");
}

#[test]
fn helm_chart_config_keys_are_exporter_settings() {
    let settings = exporter_settings();
    let names: Vec<&str> = settings.iter().map(|(n, _)| n.as_str()).collect();
    let reserved = chart_reserved_settings();
    for r in &reserved {
        assert!(
            names.contains(&r.as_str()),
            "reserved {r} is no exporter setting"
        );
    }
    // The schema admits exactly the exporter's settings less those the chart sets.
    let schema: serde_json::Value =
        serde_json::from_str(&read(&format!("{CHART}/values.schema.json"))).unwrap();
    let allowed: Vec<&str> = schema["properties"]["config"]["propertyNames"]["enum"]
        .as_array()
        .expect("config.propertyNames.enum in values.schema.json")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let want: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !reserved.iter().any(|r| r == n))
        .collect();
    assert_eq!(
        allowed, want,
        "values.schema.json config keys vs the settings"
    );
    // values.yaml's config sets known settings, each to the exporter's own default
    // (the chart adds no second default).
    let values = yaml(&format!("{CHART}/values.yaml"));
    let config = at(&values, &["config"]).as_mapping().expect("config");
    assert!(
        config.contains_key("EXPORTER_INTERVAL"),
        "config.EXPORTER_INTERVAL"
    );
    for (k, v) in config {
        let k = k.as_str().expect("config key");
        assert!(
            allowed.contains(&k),
            "config.{k} is not an exporter setting"
        );
        let default = &settings.iter().find(|(n, _)| n == k).unwrap().1;
        let v = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => panic!("config.{k}: {other:?}"),
        };
        assert!(
            v.eq_ignore_ascii_case(default),
            "config.{k} is {v}, the exporter's default {default}"
        );
    }
}

#[test]
fn helm_chart_lints_clean() {
    let Some(py) = helm_tools() else { return };
    for (name, values) in [
        ("defaults", serde_json::json!({})),
        ("all-on", all_on_values()),
    ] {
        let report = helm(&py, "lint", &values);
        assert_eq!(
            report["messages"],
            serde_json::json!([]),
            "helm lint --strict ({name}): {report}"
        );
        assert_eq!(report["errors"], serde_json::json!([]), "{name}: {report}");
        assert_eq!(report["total_charts_linted"], 1, "{name}: {report}");
    }
}

/// The Kubernetes versions the chart is validated against: the lowest its
/// kubeVersion admits and the newest kubernetes-validate knows (its default).
fn kube_versions(validate: &Path) -> [String; 2] {
    let chart = yaml(&format!("{CHART}/Chart.yaml"));
    let kube = s(&chart, &["kubeVersion"]);
    let lowest = kube
        .strip_prefix(">=")
        .and_then(|v| v.strip_suffix("-0"))
        .unwrap_or_else(|| panic!("kubeVersion {kube:?} is not \">=X.Y.Z-0\""));
    let help = Command::new(validate).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let words: Vec<&str> = help.split_whitespace().collect();
    let newest = words
        .windows(3)
        .find(|w| w[0] == "Defaults" && w[1] == "to")
        .map(|w| w[2].trim_end_matches('.'))
        .unwrap_or_else(|| panic!("no default version in kubernetes-validate --help:\n{help}"));
    [lowest.to_string(), newest.to_string()]
}

/// Runs kubernetes-validate --strict on `docs` at `version`: (success, output).
fn kube_validate(validate: &Path, version: &str, docs: &[&Value], tag: &str) -> (bool, String) {
    let tmp = TempDir::new(&format!("deploy-{tag}"));
    let dir = tmp.path();
    let files: Vec<PathBuf> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let path = dir.join(format!("{i:02}.yaml"));
            std::fs::write(&path, serde_norway::to_string(d).unwrap()).unwrap();
            path
        })
        .collect();
    let out = Command::new(validate)
        .args(["--strict", "--kubernetes-version", version])
        .args(&files)
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn helm_chart_validates_against_kubernetes() {
    let Some(py) = helm_tools() else { return };
    let validate = helm_venv().join("bin").join("kubernetes-validate");
    let versions = kube_versions(&validate);
    for (name, values) in [
        ("defaults", serde_json::json!({})),
        ("all-on", all_on_values()),
    ] {
        let r = rendered(&py, &values);
        let docs: Vec<&Value> = r.docs.iter().collect();
        for version in &versions {
            let (ok, out) = kube_validate(&validate, version, &docs, &format!("kv-{name}"));
            assert!(
                ok,
                "kubernetes-validate --strict -k {version} ({name}):\n{out}"
            );
            // Every built-in kind really was checked (a kind without a schema only
            // warns): only the custom resources may go unchecked.
            for d in &docs {
                let kind = s(d, &["kind"]);
                if CRDS.contains(&kind) {
                    continue;
                }
                let line = format!(
                    "passed for resource {}/{}",
                    kind.to_lowercase(),
                    s(d, &["metadata", "name"])
                );
                assert!(
                    out.contains(&line),
                    "{name} at {version}: no `{line}`:\n{out}"
                );
            }
        }
        eprintln!(
            "chart ({name}): {} manifests valid for Kubernetes {versions:?}",
            docs.len()
        );
    }
    // --strict refuses what the API does not know (so a pass means something).
    let r = rendered(&py, &serde_json::json!({}));
    let mut bad = r.one("Deployment").clone();
    let c = &mut bad["spec"]["template"]["spec"]["containers"][0];
    c.as_mapping_mut()
        .unwrap()
        .insert("readynessProbe".into(), Value::Null);
    let (ok, out) = kube_validate(&validate, &versions[1], &[&bad], "kv-bad");
    assert!(!ok, "an unknown field passed --strict:\n{out}");
}

#[test]
fn helm_chart_secret_reaches_the_container() {
    let Some(py) = helm_tools() else { return };
    // An existing Secret, with keys of its own.
    let r = rendered(
        &py,
        &serde_json::json!({"prefect": {
            "apiUrl": "https://prefect.example.com/api",
            "existingSecret": {"name": "my-prefect", "apiKeyKey": "cloud-key", "authStringKey": "basic"}
        }}),
    );
    let c = container(r.one("Deployment"));
    for (name, key) in [
        ("PREFECT_API_KEY", "cloud-key"),
        ("PREFECT_API_AUTH_STRING", "basic"),
    ] {
        let e = env_of(c, name).unwrap_or_else(|| panic!("env {name}"));
        assert!(e.get("value").is_none(), "{name} must not be a literal");
        let sel = at(e, &["valueFrom", "secretKeyRef"]);
        assert_eq!(s(sel, &["name"]), "my-prefect", "{name}");
        assert_eq!(s(sel, &["key"]), key, "{name}");
        assert_eq!(at(sel, &["optional"]).as_bool(), Some(true), "{name}");
    }
    assert_eq!(
        s(
            env_of(c, "PREFECT_API_URL").expect("PREFECT_API_URL"),
            &["value"]
        ),
        "https://prefect.example.com/api"
    );
    assert!(r.all("Secret").is_empty(), "no chart-made Secret");
    assert!(
        !r.notes.contains("MISSING") && !r.notes.contains("WARNING"),
        "{}",
        r.notes
    );

    // A chart-made Secret: the env refers to it, NOTES warns.
    let r = rendered(
        &py,
        &serde_json::json!({"prefect": {"secret": {"apiKey": "pnu_test"}}}),
    );
    let secret = r.one("Secret");
    assert_eq!(s(secret, &["metadata", "name"]), RELEASE);
    assert_eq!(s(secret, &["data", "PREFECT_API_KEY"]), "cG51X3Rlc3Q=");
    assert!(secret["data"].get("PREFECT_API_AUTH_STRING").is_none());
    let d = r.one("Deployment");
    let e = env_of(container(d), "PREFECT_API_KEY").expect("env PREFECT_API_KEY");
    assert_eq!(s(e, &["valueFrom", "secretKeyRef", "name"]), RELEASE);
    assert_eq!(
        s(e, &["valueFrom", "secretKeyRef", "key"]),
        "PREFECT_API_KEY"
    );
    assert!(
        at(d, &["spec", "template", "metadata", "annotations"])
            .get("checksum/secret")
            .is_some(),
        "a changed credential restarts the pod"
    );
    assert!(
        r.notes
            .contains("WARNING: the credential is in a Secret made by the chart"),
        "{}",
        r.notes
    );

    // Nothing set: no credential env at all, and NOTES says what is missing.
    let r = rendered(&py, &serde_json::json!({}));
    let c = container(r.one("Deployment"));
    for name in [
        "PREFECT_API_URL",
        "PREFECT_API_KEY",
        "PREFECT_API_AUTH_STRING",
    ] {
        assert!(env_of(c, name).is_none(), "{name} set without a value");
    }
    assert!(
        r.notes.contains("MISSING: prefect.apiUrl is not set"),
        "{}",
        r.notes
    );
    assert!(r.notes.contains("MISSING: no credential"), "{}", r.notes);
    assert!(
        r.notes
            .contains(&format!("{RELEASE}.{NAMESPACE}.svc:{PORT}/metrics")),
        "{}",
        r.notes
    );

    // Both kinds of Secret, or a setting the chart owns, are refused.
    let both = serde_json::json!({"prefect": {"existingSecret": {"name": "x"}, "secret": {"authString": "u:p"}}});
    let err = render(&py, &both).err().expect("both Secrets refused");
    assert!(err.contains("choose one"), "{err}");
    for key in chart_reserved_settings() {
        let v = serde_json::json!({"config": {key.as_str(): "x"}});
        assert!(render(&py, &v).is_err(), "config.{key} accepted");
    }
}

#[test]
fn helm_chart_security_and_probes() {
    let Some(py) = helm_tools() else { return };
    let r = rendered(&py, &serde_json::json!({}));
    let d = r.one("Deployment");
    let pod = at(d, &["spec", "template", "spec"]);
    let psc = at(pod, &["securityContext"]);
    assert_eq!(at(psc, &["runAsNonRoot"]).as_bool(), Some(true));
    assert_eq!(at(psc, &["runAsUser"]).as_u64(), Some(65534));
    assert_eq!(at(psc, &["runAsGroup"]).as_u64(), Some(65534));
    assert_eq!(s(psc, &["seccompProfile", "type"]), "RuntimeDefault");
    assert_eq!(
        at(pod, &["automountServiceAccountToken"]).as_bool(),
        Some(false)
    );
    let c = container(d);
    let sc = at(c, &["securityContext"]);
    assert_eq!(at(sc, &["readOnlyRootFilesystem"]).as_bool(), Some(true));
    assert_eq!(at(sc, &["allowPrivilegeEscalation"]).as_bool(), Some(false));
    assert_eq!(at(sc, &["runAsNonRoot"]).as_bool(), Some(true));
    let drop: Vec<&str> = seq(sc, &["capabilities", "drop"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(drop, ["ALL"]);
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(s(c, &[probe, "httpGet", "path"]), path, "{probe}");
        assert_eq!(s(c, &[probe, "httpGet", "port"]), "http-metrics", "{probe}");
    }
    assert_eq!(
        s(c, &["image"]),
        format!("{IMAGE}:{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        at(&seq(c, &["ports"])[0], &["containerPort"]).as_u64(),
        Some(PORT)
    );
    assert_eq!(
        s(
            env_of(c, "EXPORTER_PORT").expect("EXPORTER_PORT"),
            &["value"]
        ),
        PORT.to_string()
    );

    // The all-on values reach the pod.
    let r = rendered(&py, &all_on_values());
    let d = r.one("Deployment");
    let pod = at(d, &["spec", "template", "spec"]);
    let c = container(d);
    assert_eq!(
        s(c, &["image"]),
        "registry.example.com/prefect-exporter:0.1.0-test"
    );
    assert_eq!(s(pod, &["priorityClassName"]), "system-cluster-critical");
    assert_eq!(
        s(&seq(pod, &["imagePullSecrets"])[0], &["name"]),
        "registry-credentials"
    );
    assert_eq!(s(pod, &["nodeSelector", "kubernetes.io/os"]), "linux");
    assert_eq!(seq(pod, &["tolerations"]).len(), 1);
    assert!(pod.get("affinity").is_some());
    assert_eq!(
        s(
            d,
            &[
                "spec",
                "template",
                "metadata",
                "labels",
                "example.com/cost-centre"
            ]
        ),
        "42"
    );
    assert_eq!(
        s(
            d,
            &[
                "spec",
                "template",
                "metadata",
                "annotations",
                "example.com/team"
            ]
        ),
        "data"
    );
    assert_eq!(
        s(env_of(c, "HTTPS_PROXY").expect("extraEnv"), &["value"]),
        "http://proxy.internal:3128"
    );
    assert_eq!(
        s(&seq(c, &["envFrom"])[0], &["secretRef", "name"]),
        "prefect-extra-headers"
    );
    // config values are strings in the env, whatever their YAML type.
    assert_eq!(
        s(env_of(c, "EXPORTER_MAX_DEPLOYMENTS").unwrap(), &["value"]),
        "500"
    );
    assert_eq!(
        s(
            env_of(c, "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED").unwrap(),
            &["value"]
        ),
        "true"
    );
    let svc = r.one("Service");
    assert_eq!(
        at(&seq(svc, &["spec", "ports"])[0], &["port"]).as_u64(),
        Some(9100)
    );
    assert_eq!(
        s(svc, &["metadata", "annotations", "example.com/owner"]),
        "data-platform"
    );
}

#[test]
fn helm_chart_schema_refuses_wrong_types() {
    let Some(py) = helm_tools() else { return };
    for (values, path) in [
        (
            serde_json::json!({"service": {"port": "eighty"}}),
            "/service/port",
        ),
        (
            serde_json::json!({"serviceMonitor": {"enabled": "yes"}}),
            "/serviceMonitor/enabled",
        ),
        (
            serde_json::json!({"config": {"EXPORTER_INTERVAL": "thirty"}}),
            "/config/EXPORTER_INTERVAL",
        ),
        (
            serde_json::json!({"config": {"EXPORTER_INTERVALS": 30}}),
            "EXPORTER_INTERVALS",
        ),
        (
            serde_json::json!({"image": {"pullPolicy": "Sometimes"}}),
            "/image/pullPolicy",
        ),
        (
            serde_json::json!({"imagePullSecrets": "registry"}),
            "/imagePullSecrets",
        ),
        (serde_json::json!({"replicas": 2}), "replicas"),
    ] {
        let err = render(&py, &values)
            .err()
            .unwrap_or_else(|| panic!("{values} was accepted"));
        assert!(
            err.contains("don't meet the specifications of the schema") && err.contains(path),
            "{values}: {err}"
        );
    }
}

#[test]
fn helm_chart_service_monitor_and_rules() {
    let Some(py) = helm_tools() else { return };
    let r = rendered(&py, &serde_json::json!({}));
    for kind in CRDS {
        assert!(r.all(kind).is_empty(), "{kind} rendered though disabled");
    }
    assert!(
        r.all("NetworkPolicy").is_empty(),
        "NetworkPolicy rendered though disabled"
    );
    // Each switch alone turns its object off, whatever else is on.
    for (switch, kind) in [
        ("serviceMonitor", "ServiceMonitor"),
        ("prometheusRule", "PrometheusRule"),
        ("networkPolicy", "NetworkPolicy"),
    ] {
        let mut values = all_on_values();
        values[switch]["enabled"] = false.into();
        let r = rendered(&py, &values);
        assert!(
            r.all(kind).is_empty(),
            "{switch}.enabled=false renders a {kind}"
        );
        assert_eq!(r.docs.len(), rendered(&py, &all_on_values()).docs.len() - 1);
    }

    // Enabled: the interval follows config.EXPORTER_INTERVAL unless set.
    let job = alerts_job();
    for (values, interval) in [
        (
            serde_json::json!({"serviceMonitor": {"enabled": true}}),
            "30s",
        ),
        (
            serde_json::json!({"serviceMonitor": {"enabled": true}, "config": {"EXPORTER_INTERVAL": 45}}),
            "45s",
        ),
        (
            serde_json::json!({"serviceMonitor": {"enabled": true, "interval": "1m"}}),
            "1m",
        ),
    ] {
        let r = rendered(&py, &values);
        let sm = r.one("ServiceMonitor");
        let svc = r.one("Service");
        assert_eq!(s(sm, &["apiVersion"]), "monitoring.coreos.com/v1");
        let ep = &seq(sm, &["spec", "endpoints"])[0];
        assert_eq!(s(ep, &["interval"]), interval, "{values}");
        assert_eq!(s(ep, &["path"]), "/metrics");
        assert_eq!(
            s(ep, &["port"]),
            s(&seq(svc, &["spec", "ports"])[0], &["name"])
        );
        assert!(ep.get("scrapeTimeout").is_none(), "Prometheus' own timeout");
        // The job is the one the alerts expect, not the Service's name.
        let first = &seq(ep, &["relabelings"])[0];
        assert_eq!(s(first, &["targetLabel"]), "job");
        assert_eq!(s(first, &["replacement"]), job);
        // It selects the Service, in its namespace.
        for (k, v) in at(sm, &["spec", "selector", "matchLabels"])
            .as_mapping()
            .unwrap()
        {
            assert_eq!(svc["metadata"]["labels"].get(k), Some(v), "selector {k:?}");
        }
        let ns: Vec<&str> = seq(sm, &["spec", "namespaceSelector", "matchNames"])
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(ns, [NAMESPACE]);
    }

    // All on: labels, timeout, relabelings after the chart's own; the rules.
    let r = rendered(&py, &all_on_values());
    let sm = r.one("ServiceMonitor");
    assert_eq!(
        s(sm, &["metadata", "labels", "release"]),
        "kube-prometheus-stack"
    );
    let ep = &seq(sm, &["spec", "endpoints"])[0];
    assert_eq!(s(ep, &["interval"]), "60s", "config.EXPORTER_INTERVAL 60");
    assert_eq!(s(ep, &["scrapeTimeout"]), "10s");
    let relabel = seq(ep, &["relabelings"]);
    assert_eq!(relabel.len(), 2);
    assert_eq!(s(&relabel[1], &["targetLabel"]), "cluster");
    assert_eq!(s(&seq(ep, &["metricRelabelings"])[0], &["action"]), "drop");

    // The PrometheusRule has monitoring/alerts.yaml's groups, the same data, then
    // the additional rules in a group of their own.
    let pr = r.one("PrometheusRule");
    assert_eq!(s(pr, &["apiVersion"]), "monitoring.coreos.com/v1");
    assert_eq!(
        s(pr, &["metadata", "labels", "release"]),
        "kube-prometheus-stack"
    );
    let groups = seq(pr, &["spec", "groups"]);
    let alerts = yaml("monitoring/alerts.yaml");
    let want = seq(&alerts, &["groups"]);
    assert_eq!(groups.len(), want.len() + 1);
    assert_eq!(
        &groups[..want.len()],
        want,
        "PrometheusRule groups vs monitoring/alerts.yaml"
    );
    let extra = &groups[want.len()];
    assert_eq!(s(extra, &["name"]), format!("{RELEASE}-additional"));
    assert_eq!(
        s(&seq(extra, &["rules"])[0], &["alert"]),
        "PrefectManyFailedRuns"
    );
    for g in groups {
        for rule in seq(g, &["rules"]) {
            assert!(rule.get("expr").is_some(), "rule without expr: {rule:?}");
            assert!(
                rule.get("alert").is_some() != rule.get("record").is_some(),
                "{rule:?}"
            );
        }
    }
    // And Prometheus accepts them.
    if !have("promtool") {
        assert!(
            !is_ci(),
            "CI=true but promtool is missing (Debian package prometheus)"
        );
        skip_note!("SKIPPED: promtool not found; the rendered rules were not checked by it");
        return;
    }
    let tmp = TempDir::new("deploy-rules");
    let dir = tmp.path();
    let file = dir.join("rules.yaml");
    let mut doc = serde_norway::Mapping::new();
    doc.insert("groups".into(), Value::Sequence(groups.to_vec()));
    std::fs::write(&file, serde_norway::to_string(&doc).unwrap()).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules on the PrometheusRule:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn helm_chart_rules_are_monitoring_alerts() {
    // One file: the chart's alerts.yaml is a link to monitoring/alerts.yaml (Helm
    // follows it, and `helm package` stores its content), so they cannot drift.
    let link = project_root().join(CHART).join("alerts.yaml");
    let meta = std::fs::symlink_metadata(&link).expect("the chart's alerts.yaml");
    assert!(
        meta.file_type().is_symlink(),
        "{} must be a link",
        link.display()
    );
    assert_eq!(
        std::fs::canonicalize(&link).unwrap(),
        std::fs::canonicalize(project_root().join("monitoring/alerts.yaml")).unwrap()
    );
    // And the templates take the rules from it, not from a copy.
    let template = read(&format!("{CHART}/templates/prometheusrule.yaml"));
    assert!(
        template.contains(".Files.Get \"alerts.yaml\""),
        "{template}"
    );
}

#[test]
fn helm_chart_matches_plain_manifests() {
    let Some(py) = helm_tools() else { return };
    // The chart, set up as deploy/kubernetes/ is: its API URL, its Secret, all on.
    let manifest = yaml("deploy/kubernetes/deployment.yaml");
    let mc = container(&manifest);
    let url = s(
        env_of(mc, "PREFECT_API_URL").expect("PREFECT_API_URL"),
        &["value"],
    );
    let secret = s(
        env_of(mc, "PREFECT_API_KEY").expect("PREFECT_API_KEY"),
        &["valueFrom", "secretKeyRef", "name"],
    );
    let r = rendered(
        &py,
        &serde_json::json!({
            "prefect": {"apiUrl": url, "existingSecret": {"name": secret}},
            "serviceMonitor": {"enabled": true},
            "networkPolicy": {"enabled": true},
        }),
    );
    let chart = r.one("Deployment");
    let cc = container(chart);
    let sorted_env = |c: &Value| {
        let mut env = seq(c, &["env"]).to_vec();
        env.sort_by_key(|e| s(e, &["name"]).to_string());
        env
    };
    assert_eq!(sorted_env(cc), sorted_env(mc), "env");
    for key in [
        "image",
        "imagePullPolicy",
        "ports",
        "livenessProbe",
        "readinessProbe",
        "resources",
        "securityContext",
    ] {
        assert_eq!(
            cc.get(key),
            mc.get(key),
            "container {key}: chart vs deploy/kubernetes"
        );
    }
    for key in ["securityContext", "automountServiceAccountToken"] {
        assert_eq!(
            chart["spec"]["template"]["spec"].get(key),
            manifest["spec"]["template"]["spec"].get(key),
            "pod {key}"
        );
    }
    assert_eq!(
        chart["spec"].get("replicas"),
        manifest["spec"].get("replicas")
    );

    let svc = yaml("deploy/kubernetes/service.yaml");
    let csvc = r.one("Service");
    assert_eq!(csvc["spec"]["ports"], svc["spec"]["ports"], "Service ports");
    assert_eq!(
        s(csvc, &["metadata", "name"]),
        s(&svc, &["metadata", "name"])
    );

    let sm = yaml("deploy/kubernetes/servicemonitor.yaml");
    assert_eq!(
        r.one("ServiceMonitor")["spec"]["endpoints"],
        sm["spec"]["endpoints"],
        "ServiceMonitor endpoints"
    );

    let np = yaml("deploy/kubernetes/networkpolicy.yaml");
    let cnp = r.one("NetworkPolicy");
    for key in ["policyTypes", "ingress"] {
        assert_eq!(cnp["spec"][key], np["spec"][key], "NetworkPolicy {key}");
    }
}
