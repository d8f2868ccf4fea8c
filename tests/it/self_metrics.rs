//! Issue 4: the exporter tells the truth about itself. Against the real shared
//! Prefect server: every self-metric is there with the right type and a sensible
//! value, `promtool check metrics` finds nothing but the five `_total` gauges the
//! specification imposes, /healthz and /readyz answer, HEAD matches GET; the
//! `process_*` series follow the exporter's process.
use crate::support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::{Exporter, PrefectServer};

const WAIT: Duration = Duration::from_secs(30);

/// The specified seed gauges keep their `_total` names (issue 1): promtool's
/// only complaint, and an expected one.
const SPECIFIED_TOTAL_GAUGES: &[&str] = &[
    "prefect_flow_runs_total",
    "prefect_flow_runs_successes_total",
    "prefect_flow_runs_in_error_total",
    "prefect_flow_runs_in_warning_total",
    "prefect_missing_deployments_total",
];

fn type_of<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let prefix = format!("# TYPE {name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map(str::trim)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// Each family has its `# TYPE` (of that kind) and a `# HELP`.
fn assert_declared(text: &str, families: &[(&str, &str)]) {
    for &(name, kind) in families {
        assert_eq!(type_of(text, name), Some(kind), "{name}:\n{text}");
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
    }
}

#[test]
fn self_metrics_on_a_real_server() {
    support::require_prefect!();
    let server = PrefectServer::shared();
    let url = server.api_url();
    let exp = Exporter::spawn(&[("PREFECT_API_URL", &url)]);
    let m = exp.wait_for(
        |m| {
            m.get("prefect_up") == Some(&1.0)
                && m.get("prefect_exporter_collections_total") >= Some(&2.0)
        },
        WAIT,
    );
    let text = exp.metrics_text();

    assert_declared(
        &text,
        &[
            ("prefect_up", "gauge"),
            ("prefect_exporter_last_success_timestamp_seconds", "gauge"),
            ("prefect_exporter_collect_duration_seconds", "gauge"),
            ("prefect_exporter_collections_total", "counter"),
            ("prefect_exporter_collect_errors_total", "counter"),
            ("prefect_exporter_build_info", "gauge"),
            ("prefect_server_info", "gauge"),
            ("prefect_exporter_collector_success", "gauge"),
            ("prefect_exporter_collector_duration_seconds", "gauge"),
        ],
    );
    let now = unix_now();
    let last = m["prefect_exporter_last_success_timestamp_seconds"];
    assert!(
        (now - 30.0..=now + 1.0).contains(&last),
        "last success {last}, now {now}"
    );
    let took = m["prefect_exporter_collect_duration_seconds"];
    assert!(took > 0.0 && took < 1.0, "collect duration {took}");
    assert_eq!(m["prefect_exporter_collect_errors_total"], 0.0);
    // A healthy start asks nothing the server refuses: no 4xx (the CSRF check of
    // a server with CSRF protection off used to show code="422").
    let codes: Vec<(&String, &f64)> = m
        .iter()
        .filter(|(k, _)| k.starts_with("prefect_exporter_api_requests_total{"))
        .collect();
    assert!(!codes.is_empty(), "{text}");
    for (series, n) in &codes {
        assert!(series.contains("code=\"2"), "{series} {n}: {codes:?}");
    }
    assert_eq!(
        m.get("prefect_exporter_collector_success{collector=\"seed\"}"),
        Some(&1.0)
    );
    let seed_took = m["prefect_exporter_collector_duration_seconds{collector=\"seed\"}"];
    assert!(
        seed_took > 0.0 && seed_took <= took,
        "{seed_took} vs {took}"
    );
    let version = server.api().server_version();
    assert_eq!(
        m.get(&format!("prefect_server_info{{version=\"{version}\"}}")),
        Some(&1.0),
        "{text}"
    );
    let build = m
        .iter()
        .find(|(k, _)| k.starts_with("prefect_exporter_build_info{"))
        .map(|(k, v)| (k.clone(), *v))
        .expect("build_info");
    assert_eq!(build.1, 1.0);
    assert!(
        build
            .0
            .contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{}",
        build.0
    );
    assert!(
        !build.0.contains("revision=\"\""),
        "empty revision: {}",
        build.0
    );
    // The counter counts: later scrapes see more collections.
    let before = m["prefect_exporter_collections_total"];
    exp.wait_for(
        |m| m.get("prefect_exporter_collections_total") > Some(&before),
        WAIT,
    );

    // Probes and HEAD.
    assert_eq!(exp.get("/healthz"), (200, "ok\n".into()));
    assert_eq!(exp.get("/readyz"), (200, "ready\n".into()));
    let get = exp.request("GET", "/metrics", &[]);
    let head = exp.request("HEAD", "/metrics", &[]);
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(
        head.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(get.header("content-type"), head.header("content-type"));
    assert!(head.header("content-length").is_some());

    // promtool: nothing but the five specified `_total` gauges.
    let Some(promtool) = support::tool("promtool", "self_metrics_on_a_real_server") else {
        return;
    };
    let (_, report) = support::promtool_check_metrics(&promtool, &text);
    let mut complaints: Vec<&str> = report.lines().filter(|l| !l.trim().is_empty()).collect();
    complaints.sort();
    let mut expected: Vec<String> = SPECIFIED_TOTAL_GAUGES
        .iter()
        .map(|n| format!("{n} non-counter metrics should not have \"_total\" suffix"))
        .collect();
    expected.sort();
    assert_eq!(
        complaints, expected,
        "promtool check metrics:\n{report}\n{text}"
    );
}

/// `prefect_server_info` when the version request is slow once: asked again at
/// the next collection, not an hour later. When the API has no version (Prefect
/// Cloud answers 404), the series is absent, nothing fails, and the version is
/// not asked at every collection.
#[test]
fn server_version_retried_after_a_timeout_not_after_a_refusal() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use support::{Mode, Response, Stub, StubData};

    let data = StubData::standard();
    let asked = Arc::new(AtomicUsize::new(0));
    let (d, a) = (data.clone(), Arc::clone(&asked));
    let slow_once: support::Handler = Arc::new(move |req: &support::Request| {
        if req.api_path() == "/admin/version" && a.fetch_add(1, Ordering::SeqCst) == 0 {
            // Longer than the exporter's 1 s request timeout: a slow server, not
            // a synchronisation.
            std::thread::sleep(Duration::from_millis(1500));
        }
        d.answer(req)
    });
    let stub = Stub::start(Mode::Handler(slow_once));
    let url = stub.api_url();
    let exp = Exporter::spawn(&[
        ("PREFECT_API_URL", &url),
        ("PREFECT_API_REQUEST_TIMEOUT", "1"),
    ]);
    let m = exp.wait_for(
        |m| m.get("prefect_server_info{version=\"3.9.1\"}") == Some(&1.0),
        Duration::from_secs(15),
    );
    assert!(asked.load(Ordering::SeqCst) >= 2);
    assert_eq!(m["prefect_up"], 1.0);

    let no_version: support::Handler = Arc::new(move |req: &support::Request| {
        if req.api_path() == "/admin/version" {
            Response::json(404, &serde_json::json!({"detail": "Not Found"}))
        } else {
            data.answer(req)
        }
    });
    let cloud = Stub::start(Mode::Handler(no_version));
    let url = cloud.api_url();
    let exp = Exporter::spawn(&[("PREFECT_API_URL", &url)]);
    let m = exp.wait_for(
        |m| m.get("prefect_exporter_collections_total") >= Some(&4.0),
        Duration::from_secs(20),
    );
    assert_eq!(m["prefect_up"], 1.0, "a missing version is no failure");
    assert_eq!(m["prefect_exporter_collect_errors_total"], 0.0);
    assert!(
        !m.keys().any(|k| k.starts_with("prefect_server_info")),
        "{m:?}"
    );
    let version_requests = cloud
        .requests()
        .iter()
        .filter(|r| r.api_path() == "/admin/version")
        .count();
    assert_eq!(version_requests, 1, "asked once, then hourly");
}

/// A number from `/proc/PID/FILE`: the first value on the line starting with `key`.
fn proc_value(pid: u32, file: &str, key: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let value = line[key.len()..].split_whitespace().next()?;
    if value == "unlimited" {
        return Some(f64::INFINITY);
    }
    value.parse().ok()
}

/// The `process_*` series describe the exporter's own process as /proc sees it,
/// and follow it: 24 idle connections show as 24 more descriptors and threads
/// (one thread per connection), and go away again when closed. Needs no Prefect.
#[test]
fn process_metrics_follow_the_exporter_process() {
    if !std::path::Path::new("/proc/self/stat").exists() {
        eprintln!("SKIPPED: no /proc");
        return;
    }
    let before_start = unix_now();
    let url = format!("http://127.0.0.1:{}/api", support::free_port());
    let exp = Exporter::spawn(&[("PREFECT_API_URL", &url)]);
    let pid = exp.pid();
    let text = exp.metrics_text();
    assert_declared(
        &text,
        &[
            ("process_cpu_seconds_total", "counter"),
            ("process_max_fds", "gauge"),
            ("process_open_fds", "gauge"),
            ("process_resident_memory_bytes", "gauge"),
            ("process_start_time_seconds", "gauge"),
            ("process_threads", "gauge"),
            ("process_virtual_memory_bytes", "gauge"),
        ],
    );
    let m = support::parse_metrics(&text);
    let now = unix_now();
    // The boot time in /proc/stat is whole seconds: up to 1 s early.
    let start = m["process_start_time_seconds"];
    assert!(
        (before_start - 2.0..=now).contains(&start),
        "start {start}, spawned at {before_start}, now {now}"
    );
    assert_eq!(
        Some(m["process_max_fds"]),
        proc_value(pid, "limits", "Max open files"),
        "soft limit on open files"
    );
    let rss = m["process_resident_memory_bytes"];
    let kib = proc_value(pid, "status", "VmRSS:").expect("VmRSS");
    assert!(
        (rss - kib * 1024.0).abs() < 4e6 && rss > 1e6,
        "rss {rss} vs VmRSS {kib} kB"
    );
    assert!(m["process_virtual_memory_bytes"] >= rss);
    assert!(m["process_cpu_seconds_total"] >= 0.0);

    // Idle connections: each is a descriptor and a thread in the exporter.
    let base_fds = m["process_open_fds"];
    let base_threads = m["process_threads"];
    assert!(base_fds >= 3.0, "open fds {base_fds}");
    assert!(base_threads >= 3.0, "threads {base_threads}");
    const IDLE: usize = 24;
    // One at a time: tiny_http's pool queues, without a thread, a connection
    // that comes while a thread it woke has not yet taken the previous one.
    let idle: Vec<std::net::TcpStream> = (0..IDLE)
        .map(|_| {
            let c = std::net::TcpStream::connect(exp.addr()).expect("connect");
            std::thread::sleep(Duration::from_millis(20));
            c
        })
        .collect();
    // tiny_http holds two descriptors per connection, and keeps up to
    // `SPARE_THREADS` idle threads (counted in the base) that take the first
    // connections.
    const SPARE_THREADS: f64 = 4.0;
    let busy = exp.wait_for(
        |m| {
            m.get("process_open_fds") >= Some(&(base_fds + 2.0 * IDLE as f64))
                && m.get("process_threads") >= Some(&(base_threads + IDLE as f64 - SPARE_THREADS))
        },
        WAIT,
    );
    assert!(busy["process_cpu_seconds_total"] >= m["process_cpu_seconds_total"]);
    drop(idle);
    exp.wait_for(
        |m| m.get("process_open_fds") < Some(&(base_fds + IDLE as f64 / 2.0)),
        WAIT,
    );

    // The two-part body (collection, then process series) is one answer whose
    // length the header tells right.
    let get = exp.request("GET", "/metrics", &[]);
    assert_eq!(
        get.header("content-length"),
        Some(get.body.len().to_string().as_str())
    );
    let last_line = get.body.trim_end_matches('\n').rsplit('\n').next();
    assert!(
        last_line.is_some_and(|l| l.starts_with("process_virtual_memory_bytes ")),
        "the process series end the answer: {last_line:?}"
    );
    let head = exp.request("HEAD", "/metrics", &[]);
    let head_len: usize = head
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .expect("HEAD content-length");
    assert!(
        head_len.abs_diff(get.body.len()) < 64,
        "HEAD says {head_len}, GET sent {}",
        get.body.len()
    );
}
