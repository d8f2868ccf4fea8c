//! `make demo` (scripts/demo.sh) as a new user meets it: a taken exporter port is
//! named at once, before the slow steps (venv, build, Prefect's start), with the
//! way out, and the demo fails.

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn a_taken_exporter_port_stops_the_demo_before_prefect_starts() {
    // Held the way another exporter would hold it: on all interfaces.
    let holder = TcpListener::bind("[::]:0")
        .or_else(|_| TcpListener::bind("0.0.0.0:0"))
        .expect("a listener on a free port");
    let port = holder.local_addr().unwrap().port();
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/demo.sh"))
        .env("EXPORTER_PORT", port.to_string())
        .env_remove("EXPORTER_ADDRESS")
        .output()
        .expect("bash runs scripts/demo.sh");
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!("port {port} is taken")),
        "names the port: {stderr}"
    );
    assert!(
        stderr.contains("EXPORTER_PORT=9100 make demo"),
        "says how to choose another: {stderr}"
    );
    assert!(!stdout.contains("starting Prefect"), "{stdout}");
    // The venv, the release build and Prefect's start take tens of seconds.
    assert!(took < Duration::from_secs(10), "took {took:?}");
    drop(holder);
}

#[test]
fn a_port_that_is_not_a_number_stops_the_demo() {
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/demo.sh"))
        .env("EXPORTER_PORT", "80a")
        .env_remove("EXPORTER_ADDRESS")
        .output()
        .expect("bash runs scripts/demo.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("EXPORTER_PORT=80a is not a port number"),
        "{stderr}"
    );
}
