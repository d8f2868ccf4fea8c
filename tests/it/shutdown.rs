//! Issue 4: SIGTERM and SIGINT stop the exporter with exit code 0 within one
//! second, whether a collection is blocked on a Prefect that never answers or the
//! collector is waiting for its next turn. (The same with a real frozen Prefect
//! server is in tests/it/faults.rs.)
use crate::support;

use std::time::{Duration, Instant};

use support::{Exporter, Mode, Stub, SIGINT, SIGTERM};

const LIMIT: Duration = Duration::from_secs(1);

/// Sends `sig` and returns how long the exporter took to exit 0.
fn stop_with(exp: &mut Exporter, sig: i32, name: &str) -> Duration {
    let t = Instant::now();
    assert!(exp.signal(sig), "cannot send {name}");
    let status = exp
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("still running 10 s after {name}\n{}", exp.stderr()));
    let took = t.elapsed();
    assert_eq!(status.code(), Some(0), "{name}: {status}\n{}", exp.stderr());
    assert!(
        took < LIMIT,
        "{name} took {took:?} to stop\nstderr:\n{}",
        exp.stderr()
    );
    // The reader thread may lag a moment behind the exit.
    let stderr = support::poll(Duration::from_secs(2), Duration::from_millis(10), || {
        let s = exp.stderr();
        s.contains("stopped").then_some(s)
    })
    .unwrap_or_else(|| panic!("no `stopped` line:\n{}", exp.stderr()));
    assert!(
        stderr.contains(&format!("{name} received, shutting down")),
        "{stderr}"
    );
    eprintln!("{name}: exit 0 after {took:?}");
    took
}

#[test]
fn sigterm_while_a_collection_is_blocked_exits_0_within_a_second() {
    let stub = Stub::start(Mode::Hang);
    let url = stub.api_url();
    // Long interval and timeout: nothing ends the blocked request but the signal.
    let mut exp = Exporter::spawn(&[
        ("PREFECT_API_URL", &url),
        ("EXPORTER_INTERVAL", "60"),
        ("PREFECT_API_REQUEST_TIMEOUT", "60"),
    ]);
    stub.wait_requests(1, Duration::from_secs(10));
    let m = exp.metrics();
    assert_eq!(
        m.get("prefect_exporter_collections_total"),
        Some(&0.0),
        "the first collection should still be blocked"
    );
    assert_eq!(exp.get("/readyz").0, 503);
    stop_with(&mut exp, SIGTERM, "SIGTERM");
}

#[test]
fn sigint_and_sigterm_while_idle_between_collections_exit_0() {
    for (sig, name) in [(SIGINT, "SIGINT"), (SIGTERM, "SIGTERM")] {
        let stub = Stub::standard();
        let url = stub.api_url();
        let mut exp = Exporter::spawn(&[("PREFECT_API_URL", &url), ("EXPORTER_INTERVAL", "60")]);
        exp.wait_for(
            |m| m.get("prefect_up") == Some(&1.0),
            Duration::from_secs(20),
        );
        // Only one collection ran: the collector is in its 60 s wait.
        assert_eq!(
            exp.metrics().get("prefect_exporter_collections_total"),
            Some(&1.0)
        );
        stop_with(&mut exp, sig, name);
    }
}

#[test]
fn sigterm_while_clients_are_connected_exits_0() {
    let stub = Stub::standard();
    let url = stub.api_url();
    let mut exp = Exporter::spawn(&[("PREFECT_API_URL", &url)]);
    exp.wait_for(
        |m| m.get("prefect_up") == Some(&1.0),
        Duration::from_secs(20),
    );
    // Idle keep-alive connections and a half-sent request do not hold it up.
    let idle: Vec<_> = (0..20)
        .map(|_| std::net::TcpStream::connect(exp.addr()).unwrap())
        .collect();
    let mut half = std::net::TcpStream::connect(exp.addr()).unwrap();
    std::io::Write::write_all(&mut half, b"GET /metrics HTTP/1.1\r\n").unwrap();
    stop_with(&mut exp, SIGTERM, "SIGTERM");
    drop(idle);
}

/// Kills the process group's members it knows on drop, if a test fails midway.
struct Reap(Vec<u32>, std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        for pid in &self.0 {
            support::send_signal(*pid, support::SIGKILL);
        }
        let _ = self.1.kill();
        let _ = self.1.wait();
    }
}

/// As PID 1 of its own PID namespace (as in a container without an init), the
/// kernel drops every signal that has no handler: the exporter must install its
/// own. Needs `unshare --pid` (root or user namespaces); skipped without it.
#[test]
fn sigterm_as_pid_1_exits_0() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let usable = Command::new("unshare")
        .args(["--pid", "--fork", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !usable {
        eprintln!("SKIPPED: `unshare --pid --fork` is not available here");
        return;
    }
    let stub = Stub::standard();
    let mut child = Command::new("unshare")
        .args(["--pid", "--fork"])
        .arg(support::exporter_bin())
        .env_clear()
        .env("EXPORTER_PORT", "0")
        .env("EXPORTER_ADDRESS", "127.0.0.1")
        .env("EXPORTER_INTERVAL", "60")
        .env("PREFECT_API_URL", stub.api_url())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = std::sync::Arc::clone(&log);
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let unshare = child.id();
    let mut reap = Reap(Vec::new(), child);
    let children = format!("/proc/{unshare}/task/{unshare}/children");
    let pid: u32 = support::poll(Duration::from_secs(10), Duration::from_millis(10), || {
        std::fs::read_to_string(&children)
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
    })
    .expect("no exporter under unshare");
    reap.0.push(pid);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid = status
        .lines()
        .find(|l| l.starts_with("NSpid:"))
        .unwrap_or_default();
    assert!(
        nspid.ends_with("\t1"),
        "not PID 1 in its namespace: {nspid}"
    );
    support::poll(Duration::from_secs(20), Duration::from_millis(10), || {
        log.lock().unwrap().contains("listening on").then_some(())
    })
    .unwrap_or_else(|| panic!("not listening:\n{}", log.lock().unwrap()));

    let t = Instant::now();
    assert!(support::send_signal(pid, SIGTERM));
    let exit = support::poll(Duration::from_secs(10), Duration::from_millis(5), || {
        reap.1.try_wait().ok().flatten()
    })
    .unwrap_or_else(|| panic!("PID 1 ignored SIGTERM:\n{}", log.lock().unwrap()));
    let took = t.elapsed();
    assert_eq!(exit.code(), Some(0), "{}", log.lock().unwrap());
    assert!(took < LIMIT, "took {took:?}");
    eprintln!("SIGTERM as PID 1: exit 0 after {took:?}");
}
