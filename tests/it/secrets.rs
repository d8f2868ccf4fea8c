//! Issue 4: secrets (auth string, API key, custom header values) never appear
//! in the exporter's output at any log level, TRACE included, nor on any HTTP
//! answer, through success, failure (server stopped) and refusal (401).
use crate::support;

use std::time::Duration;

use support::{base64, Exporter, PrefectServer, ServerOptions, SIGTERM};

const PASSWORD: &str = "Pa55-wordS3cret-0451";
const WRONG_PASSWORD: &str = "Wr0ng-S3cret-9876";
const API_KEY: &str = "pnu_K3ySecretValue0123456789";
const HEADER_VALUE: &str = "Hdr-S3cretToken-ABCDEF";
const WAIT: Duration = Duration::from_secs(30);

/// Every form in which a secret could leak: as given, as sent on the wire, and
/// any 8-character piece of one (a hex dump or a truncated line splits a secret;
/// the HTTP library's TRACE output is such a dump, 16 bytes per line).
fn forbidden(auth: &str) -> Vec<String> {
    let (_user, password) = auth.split_once(':').unwrap();
    let wire = base64(auth.as_bytes());
    let mut out = vec![
        auth.to_string(),
        format!("Basic {wire}"),
        format!("Bearer {API_KEY}"),
    ];
    for secret in [password, wire.as_str(), API_KEY, HEADER_VALUE] {
        let chars: Vec<char> = secret.chars().collect();
        out.extend(chars.windows(8).map(|w| w.iter().collect::<String>()));
    }
    out
}

/// Every answer the exporter gives, concatenated with its headers.
fn all_answers(exp: &Exporter) -> String {
    let mut out = String::new();
    for (method, path) in [
        ("GET", "/metrics"),
        ("HEAD", "/metrics"),
        ("GET", "/"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/no-such-page"),
        ("POST", "/metrics"),
        ("GET", "/metrics?x=1"),
    ] {
        let r = exp.request(method, path, &[]);
        out.push_str(&format!("{method} {path} -> {}\n", r.status));
        for (k, v) in &r.headers {
            out.push_str(&format!("{k}: {v}\n"));
        }
        out.push_str(&r.body);
        out.push('\n');
    }
    out
}

fn stop(mut exp: Exporter) -> (String, String) {
    assert!(exp.signal(SIGTERM));
    let status = exp.wait_exit(WAIT).expect("exporter did not stop");
    assert_eq!(status.code(), Some(0));
    // Let the capture threads take the last lines.
    support::poll(WAIT, Duration::from_millis(10), || {
        exp.stderr().contains("stopped").then_some(())
    })
    .expect("no final line");
    (exp.stderr(), exp.stdout())
}

fn assert_clean(what: &str, text: &str, auth: &str) {
    for secret in forbidden(auth) {
        assert!(
            !text.contains(&secret),
            "{what} contains the secret {secret:?}:\n{text}"
        );
    }
}

#[test]
fn secrets_never_leak_at_trace_level() {
    support::require_prefect!();
    let auth = format!("exporter:{PASSWORD}");
    // Private: basic auth is a server setting.
    let server = PrefectServer::start(ServerOptions {
        auth_string: Some(auth.clone()),
        ..Default::default()
    });
    let url = server.api_url();
    let headers = format!("{{\"X-Api-Token\": \"{HEADER_VALUE}\"}}");
    let secret_envs = |auth: &str| {
        vec![
            ("PREFECT_API_URL".to_string(), url.clone()),
            ("PREFECT_API_AUTH_STRING".to_string(), auth.to_string()),
            ("PREFECT_API_KEY".to_string(), API_KEY.to_string()),
            ("PREFECT_CLIENT_CUSTOM_HEADERS".to_string(), headers.clone()),
            ("LOG_LEVEL".to_string(), "trace".to_string()),
            ("PREFECT_API_REQUEST_TIMEOUT".to_string(), "1".to_string()),
        ]
    };
    let good_env = secret_envs(&auth);
    let good_refs: Vec<(&str, &str)> = good_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let wrong_auth = format!("exporter:{WRONG_PASSWORD}");
    let wrong_env = secret_envs(&wrong_auth);
    let wrong_refs: Vec<(&str, &str)> = wrong_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();

    // Success.
    let exp = Exporter::spawn(&good_refs);
    exp.wait_for(|m| m.get("prefect_up") == Some(&1.0), WAIT);
    let mut answers = all_answers(&exp);
    // Refusal: the same secrets but a wrong password (a 401 from the server).
    let refused = Exporter::spawn(&wrong_refs);
    refused.wait_for(
        |m| m.get("prefect_exporter_collect_errors_total") >= Some(&2.0),
        WAIT,
    );
    // Ready all the same (it has a finished collection to show); the 401 is logged.
    assert_eq!(refused.get("/readyz"), (200, "ready\n".into()));
    answers.push_str(&all_answers(&refused));

    // Failure: the server goes away.
    server.stop();
    exp.wait_for(
        |m| {
            m.get("prefect_up") == Some(&0.0)
                && m.get("prefect_exporter_collect_errors_total") >= Some(&2.0)
        },
        WAIT,
    );
    answers.push_str(&all_answers(&exp));

    let (stderr, stdout) = stop(exp);
    let (refused_stderr, refused_stdout) = stop(refused);
    // TRACE really was on, and the outputs went through success and failure.
    assert!(stderr.contains("[TRACE]"), "{stderr}");
    assert!(stderr.contains("first collection succeeded"), "{stderr}");
    assert!(stderr.contains("[WARN] collection failed"), "{stderr}");
    assert!(refused_stderr.contains("HTTP 401"), "{refused_stderr}");
    assert!(stderr.contains("X-Api-Token: ***"), "{stderr}");

    assert_clean("stderr", &stderr, &auth);
    assert_clean("stdout", &stdout, &auth);
    assert_clean("stderr (401)", &refused_stderr, &wrong_auth);
    assert_clean("stdout (401)", &refused_stdout, &wrong_auth);
    assert_clean("HTTP answers", &answers, &auth);
    assert_clean("HTTP answers", &answers, &wrong_auth);
}
