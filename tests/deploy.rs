//! The deployment files under deploy/ and the Containerfile: each is checked by a
//! tool where one exists (`systemd-analyze verify` and `security` for the unit) and
//! otherwise parsed, with the image, port, probes and paths they must agree on.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_norway::Value;

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

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
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

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
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
        !ci(),
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
    let dir = tempdir("verify");
    let unit = unit_copy(&dir);
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("run systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
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
    let dir = tempdir("security");
    let unit = unit_copy(&dir);
    // --threshold is the overall exposure x10: 20 means "at most 2.0 of 10".
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=20", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("run systemd-analyze security");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exposure above 2.0:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "prefect-exporter-deploy-{tag}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
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
            root().join("monitoring").join(file).is_file(),
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
    for entry in ["target/", ".venv/", ".git/"] {
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

/// The job that monitoring/alerts.yaml's PrefectExporterDown expects: `up{job="..."}`.
fn alerts_job() -> String {
    let text = read("monitoring/alerts.yaml");
    let at = text
        .find("up{job=\"")
        .expect("up{job=\"...\"} in alerts.yaml")
        + 8;
    text[at..].split('"').next().unwrap().to_string()
}
