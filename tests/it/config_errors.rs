//! Issue 4: a bad setting is one clear line and exit code 2 before anything
//! listens; good settings start; --help lists every setting and --version works.
use crate::support;

use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use support::{free_port, http_request, poll, run_exporter_once, Exporter, TempDir};

/// Variables whose values must never be echoed.
const SECRET_VARS: &[&str] = &[
    "PREFECT_API_AUTH_STRING",
    "PREFECT_API_KEY",
    "PREFECT_CLIENT_CUSTOM_HEADERS",
];

fn bad_values(not_pem: &str) -> Vec<(&'static str, String)> {
    let table: &[(&str, &[&str])] = &[
        ("EXPORTER_PORT", &["abc", "70000", "-1", "8080.5"]),
        ("EXPORTER_INTERVAL", &["0", "-3", "x", "1.5"]),
        ("LOG_LEVEL", &["loud", "verbose"]),
        (
            "PREFECT_API_URL",
            &[
                "ftp://x",
                "127.0.0.1:4200/api",
                "http://",
                "http://user:pw-secret@host/api",
            ],
        ),
        ("EXPORTER_ADDRESS", &["nowhere", "999.1.1.1", "localhost"]),
        ("PREFECT_API_REQUEST_TIMEOUT", &["0", "-1", "soon", "NaN"]),
        ("PREFECT_CLIENT_MAX_RETRIES", &["many", "-1", "101"]),
        ("PREFECT_API_TLS_INSECURE_SKIP_VERIFY", &["maybe", "2"]),
        ("PREFECT_CLIENT_CSRF_SUPPORT_ENABLED", &["maybe"]),
        (
            "PREFECT_CLIENT_CUSTOM_HEADERS",
            &[
                "{bad",
                "[\"x\"]",
                "{\"X-Token\": 12345}",
                "{\"X Token\": \"secret-v\"}",
                "{\"X-Token\": \"secret\\u00e9\"}",
            ],
        ),
        ("PREFECT_API_SSL_CERT_FILE", &["/nonexistent"]),
        ("PREFECT_API_AUTH_STRING", &["no-colon-secret"]),
        ("PREFECT_API_KEY", &["key-secret\u{e9}"]),
        ("EXPORTER_COLLECTORS", &["flow_runs,bogus", "everything"]),
        ("EXPORTER_LOOKBACK", &["0", "7w", "-1d", "soon"]),
        ("EXPORTER_MAX_DEPLOYMENTS", &["0", "-5", "many"]),
        ("EXPORTER_EVENTS_SETTLE", &["-1", "2h", "soon"]),
        (
            "EXPORTER_DURATION_BUCKETS",
            &["10,5", "1,,2", "0,1", "fast"],
        ),
    ];
    let mut out: Vec<(&'static str, String)> = table
        .iter()
        .flat_map(|(var, values)| values.iter().map(move |v| (*var, v.to_string())))
        .collect();
    out.push(("PREFECT_API_SSL_CERT_FILE", not_pem.to_string()));
    out
}

/// True when something accepts connections on 127.0.0.1:port.
fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_millis(500),
    )
    .is_ok()
}

#[test]
fn every_bad_value_is_one_line_exit_2_and_nothing_listens() {
    let dir = TempDir::new("config-errors");
    let not_pem = dir.path().join("not-a-cert.pem");
    std::fs::write(&not_pem, "this is not a certificate\n").unwrap();
    let cases = bad_values(&not_pem.display().to_string());
    let mut failures = Vec::new();
    for (var, value) in &cases {
        let port = free_port();
        let port_text = port.to_string();
        let mut envs = vec![(*var, value.as_str())];
        if *var != "EXPORTER_PORT" {
            envs.push(("EXPORTER_PORT", &port_text));
        }
        let out = run_exporter_once(&[], &envs);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let mut problems = Vec::new();
        if out.status.code() != Some(2) {
            problems.push(format!("exit {:?}", out.status.code()));
        }
        if lines.len() != 1 || !lines[0].contains(var) {
            problems.push(format!("stderr is not one line naming {var}"));
        }
        if !stdout.is_empty() {
            problems.push("stdout not empty".into());
        }
        if stderr.contains("listening on") {
            problems.push("it said it was listening".into());
        }
        if *var != "EXPORTER_PORT" && listening(port) {
            problems.push(format!("port {port} is bound after exit"));
        }
        let secret = SECRET_VARS.contains(var) || value.contains("secret");
        if secret && stderr.contains("secret") {
            problems.push("the secret value was echoed".into());
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{var}={value:?}: {}\n  stderr: {stderr}",
                problems.join(", ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad values misbehaved:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn unknown_argument_is_exit_2() {
    for arg in ["--bogus", "serve", "-x"] {
        let out = run_exporter_once(&[arg], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{arg}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{arg}: {stderr}");
        assert!(
            stderr.contains(arg) && stderr.contains("--help"),
            "{arg}: {stderr}"
        );
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn port_in_use_is_exit_1_naming_the_port() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = run_exporter_once(&[], &[("EXPORTER_PORT", &port)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("EXPORTER_PORT") && stderr.contains(&port),
        "{stderr}"
    );
    assert!(!stderr.contains("listening on"), "{stderr}");
}

/// Combinations of valid values: each one starts, listens and answers.
#[test]
fn good_configurations_start() {
    let combos: Vec<Vec<(&str, &str)>> = vec![
        vec![],
        vec![
            ("PREFECT_API_URL", "https://prefect.example.invalid/api/"),
            ("PREFECT_API_KEY", "pnu_abc"),
            ("EXPORTER_INTERVAL", "5"),
            ("PREFECT_API_REQUEST_TIMEOUT", "2.5"),
            ("PREFECT_CLIENT_MAX_RETRIES", "0"),
            ("PREFECT_API_TLS_INSECURE_SKIP_VERIFY", "true"),
            ("PREFECT_CLIENT_CSRF_SUPPORT_ENABLED", "no"),
            ("PREFECT_CLIENT_CUSTOM_HEADERS", "{\"X-Team\": \"data\"}"),
            ("EXPORTER_CHECK_DEPLOYMENTS", " flow-a, ,flow-b,flow-a"),
            ("EXPORTER_COLLECTORS", "flow_runs, work_pools"),
            ("EXPORTER_LOOKBACK", "12h"),
            ("EXPORTER_MAX_DEPLOYMENTS", "25"),
            ("EXPORTER_EVENTS_SETTLE", "45s"),
            ("EXPORTER_DURATION_BUCKETS", "10,1m,1h"),
            ("LOG_LEVEL", "DEBUG"),
        ],
        vec![
            ("PREFECT_API_AUTH_STRING", "admin:pass"),
            ("PREFECT_API_KEY", "also-set"),
            ("PREFECT_CLIENT_CUSTOM_HEADERS", "{}"),
            ("LOG_LEVEL", "trace"),
            ("EXPORTER_INTERVAL", "86400"),
            ("EXPORTER_COLLECTORS", "seed"),
            ("EXPORTER_LOOKBACK", "90"),
        ],
        // Blank values count as unset.
        vec![
            ("PREFECT_API_KEY", " "),
            ("EXPORTER_CHECK_DEPLOYMENTS", ""),
            ("LOG_LEVEL", ""),
            ("PREFECT_API_REQUEST_TIMEOUT", ""),
        ],
        vec![
            ("EXPORTER_ADDRESS", "0.0.0.0"),
            ("PREFECT_CLIENT_MAX_RETRIES", "100"),
        ],
    ];
    for envs in &combos {
        let exp = Exporter::spawn(envs);
        assert_eq!(exp.get("/healthz"), (200, "ok\n".into()), "{envs:?}");
        assert!(exp.metrics().contains_key("prefect_up"), "{envs:?}");
    }
    // A CA bundle, where the system has one.
    let bundle = "/etc/ssl/certs/ca-certificates.crt";
    if std::path::Path::new(bundle).exists() {
        let exp = Exporter::spawn(&[("PREFECT_API_SSL_CERT_FILE", bundle)]);
        assert_eq!(exp.get("/healthz").0, 200);
    }
    // IPv6 loopback, where the host has it.
    if TcpListener::bind("[::1]:0").is_ok() {
        let exp = Exporter::spawn(&[("EXPORTER_ADDRESS", "::1")]);
        assert!(exp.addr().starts_with("[::1]:"), "{}", exp.addr());
        assert_eq!(exp.get("/healthz").0, 200);
    }
}

/// At LOG_LEVEL=warn a healthy start prints nothing at all, and still serves.
#[test]
fn quiet_start_at_warn_level() {
    let port = free_port();
    let port_text = port.to_string();
    let exp = std::process::Command::new(support::exporter_bin())
        .env_clear()
        .env("EXPORTER_PORT", &port_text)
        .env("EXPORTER_ADDRESS", "127.0.0.1")
        .env("LOG_LEVEL", "warn")
        // Nothing listens there: the failed collection may say so at WARN.
        .env("PREFECT_API_URL", "http://127.0.0.1:9/api")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    let answered = poll(Duration::from_secs(20), Duration::from_millis(20), || {
        http_request(&addr, "GET", "/healthz", &[], b"")
            .ok()
            .map(|r| r.status)
    });
    support::send_signal(exp.id(), support::SIGTERM);
    let out = exp.wait_with_output().unwrap();
    assert_eq!(answered, Some(200));
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .lines()
            .all(|l| l.contains("[WARN]") || l.contains("[ERROR]")),
        "{stderr}"
    );
}

/// Every line of --help comes from `config::SETTINGS`, the one table the
/// binary reads its variables from: the real binary lists each entry.
#[test]
fn help_lists_every_setting_with_its_default() {
    for flag in ["--help", "-h"] {
        let out = run_exporter_once(&[flag], &[]);
        assert_eq!(out.status.code(), Some(0));
        assert!(out.stderr.is_empty());
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.starts_with("prefect-exporter "), "{help}");
        // The table is what the binary reads: every entry, with its default.
        for setting in prefect_exporter::config::SETTINGS {
            let line = help
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{} ", setting.name)))
                .unwrap_or_else(|| {
                    panic!(
                        "{} is read but --help does not list it:\n{help}",
                        setting.name
                    )
                });
            assert!(line.contains("(default: "), "{}: {line}", setting.name);
        }
        assert!(help.contains("/healthz") && help.contains("/readyz"));
    }
}

#[test]
fn version_flag() {
    for flag in ["--version", "-V"] {
        let out = run_exporter_once(&[flag], &[]);
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("prefect-exporter {}\n", env!("CARGO_PKG_VERSION"))
        );
        assert!(out.stderr.is_empty());
    }
}
