//! The container image: `scripts/image.sh` builds the `prebuilt` stage (the static
//! binary in a `FROM scratch` image); the image runs against the real Prefect test
//! server, serves the seed values, and as PID 1 exits 0 on `podman stop` (SIGTERM)
//! within 2 s.
//!
//! Runs under `CI=true` or `PREFECT_EXPORTER_CONTAINER_TEST=1` (then every failure,
//! a missing podman included, is a failure: image.sh installs podman when it can),
//! and elsewhere when podman is installed; `PREFECT_EXPORTER_CONTAINER_TEST=0` skips.

use crate::support;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::{have, is_ci, parse_metrics, poll, project_root, PrefectServer};

/// Writes straight to the process's stderr: unlike `eprintln!`, libtest does not
/// capture it, so a skip or warning is visible in a normal `cargo test` run.
macro_rules! skip_note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
const IMAGE: &str = "prefect-exporter:latest";
const MAX_IMAGE_BYTES: u64 = 4_000_000;
/// Was 3,000,000 until the HTTP side moved to tiny_http: surviving descriptor
/// exhaustion there needs `panic = "unwind"`, and the unwind tables and landing
/// pads cost about 0.6 MB (shared/tiny-http.md: keep unwinding, keep the image
/// under 4 MB). This bound still catches a dependency that bloats the binary.
/// 3,600,000 until stop 26: 3,559,344 bytes before it, 3,613,904 after (the
/// HTTP side's look at its own connections, the refusing thread and the start
/// afresh on the same socket, and issue 23's proofs of the late runs and runs
/// in progress), with no new dependency. 3,650,000 until stop 27: issue 24's
/// shape, measured commit by commit with scripts/static.sh: 3,614,160 bytes
/// before it, +8.6 kB for the library target, +13.5 kB for the groups'
/// families, +3.3 kB for the one pager, +15.5 kB for the settings table (its
/// meanings now print in --help) and the new families: 3,655,056. No new
/// dependency; the image stays under 4 MB.
const MAX_BINARY_BYTES: u64 = 3_700_000;

/// `scripts/podman.sh ARGS`: podman with this machine's flags (cgroupfs, runc, ulimits).
fn podman(args: &[&str]) -> Output {
    Command::new(project_root().join("scripts/podman.sh"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/podman.sh {args:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A started container, removed (forcibly) on drop, also when the test fails.
struct Container {
    name: String,
}

impl Container {
    fn logs(&self) -> String {
        text(&podman(&["logs", &self.name]))
    }

    fn inspect(&self, format: &str) -> String {
        let o = podman(&["inspect", "--format", format, &self.name]);
        assert!(o.status.success(), "podman inspect: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", "--time", "0", &self.name]);
    }
}

/// `ip:port` from the exporter's `listening on http://IP:PORT/metrics` line.
fn listening_addr(log: &str) -> Option<String> {
    let rest = &log[log.find("listening on http://")? + "listening on http://".len()..];
    let end = rest.find("/metrics")?;
    Some(rest[..end].to_string())
}

fn number_after(out: &str, prefix: &str) -> Option<u64> {
    let line = out.lines().rev().find(|l| l.starts_with(prefix))?;
    let rest = line.split_once(": ")?.1;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn image_serves_seed_metrics_and_stops_on_sigterm() {
    let setting = std::env::var("PREFECT_EXPORTER_CONTAINER_TEST").unwrap_or_default();
    let required = is_ci() || setting == "1";
    if !required {
        if setting == "0" {
            skip_note!("SKIPPED: container test (PREFECT_EXPORTER_CONTAINER_TEST=0)");
            return;
        }
        if !have("podman") {
            skip_note!(
                "SKIPPED: container test: podman not found (apt-get install podman runc, \
                 or run with CI=true / PREFECT_EXPORTER_CONTAINER_TEST=1 to install it)"
            );
            return;
        }
    }
    support::require_prefect!();

    // 1. Build the image (and the static binary when dist/ is missing or stale).
    let started = Instant::now();
    // The build (a static release binary when dist/ is stale) takes both cores
    // for a minute or more: at the lowest priority, it takes only what the tests
    // running beside it leave (the hostile clients' latency bounds among them).
    let build = Command::new("nice")
        .args(["-n", "19", "bash", "-c"])
        .arg("scripts/image.sh 2>&1")
        .current_dir(project_root())
        .output()
        .expect("run scripts/image.sh");
    let build_out = text(&build);
    assert!(
        build.status.success(),
        "scripts/image.sh failed:\n{build_out}"
    );
    eprintln!(
        "image.sh took {:.1?}; last lines:\n{}",
        started.elapsed(),
        build_out
            .lines()
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let image_bytes = podman(&["image", "inspect", "--format", "{{.Size}}", IMAGE]);
    let image_bytes: u64 = String::from_utf8_lossy(&image_bytes.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("image size of {IMAGE}: {}", text(&image_bytes)));
    let binary_bytes = std::fs::metadata(project_root().join("dist/prefect-exporter"))
        .expect("dist/prefect-exporter")
        .len();
    eprintln!("binary {binary_bytes} bytes, image {image_bytes} bytes");
    assert_eq!(
        number_after(&build_out, "image prefect-exporter:latest"),
        Some(image_bytes),
        "image.sh reports the image's size"
    );
    assert!(
        image_bytes < MAX_IMAGE_BYTES,
        "image is {image_bytes} bytes, target < {MAX_IMAGE_BYTES}"
    );
    // scripts/static.sh only warns over its target; here the project's own build
    // is held to MAX_BINARY_BYTES.
    assert!(
        binary_bytes < MAX_BINARY_BYTES,
        "static binary is {binary_bytes} bytes, target < {MAX_BINARY_BYTES} \
         (see scripts/static.sh)"
    );
    // Only the binary is in the image: its size is the binary's plus metadata.
    assert!(
        image_bytes < binary_bytes + 100_000,
        "image has more than the binary"
    );

    // 2. Run it against the real Prefect server, on the host network.
    let server = PrefectServer::shared();
    let expected = support::shared_expected();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let container = Container {
        name: format!("prefect-exporter-test-{}-{nanos}", std::process::id()),
    };
    // The API by a name only /etc/hosts knows: the static glibc in the scratch image
    // must resolve it without NSS plugins.
    let api_url = format!(
        "PREFECT_API_URL=http://prefect-test.internal:{}/api",
        server.port()
    );
    let run = podman(&[
        "run",
        "--detach",
        "--name",
        &container.name,
        "--network",
        "host",
        "--add-host",
        "prefect-test.internal:127.0.0.1",
        "--env",
        &api_url,
        // Port 0: the exporter picks a free port and logs it (no port race).
        "--env",
        "EXPORTER_PORT=0",
        "--env",
        "EXPORTER_ADDRESS=127.0.0.1",
        "--env",
        "EXPORTER_INTERVAL=1",
        IMAGE,
    ]);
    assert!(run.status.success(), "podman run failed:\n{}", text(&run));

    let addr = poll(Duration::from_secs(30), Duration::from_millis(100), || {
        listening_addr(&container.logs())
    })
    .unwrap_or_else(|| {
        panic!(
            "no `listening on` line after 30 s; state {}; logs:\n{}",
            container.inspect("{{.State.Status}} {{.State.ExitCode}}"),
            container.logs()
        )
    });
    assert!(addr.starts_with("127.0.0.1:"), "listening on {addr}");

    // 3. Scrape until a collection has succeeded, then compare the seed values.
    let want = expected.seed_gauges(&[]);
    let mut last = String::new();
    let metrics = poll(Duration::from_secs(60), Duration::from_millis(200), || {
        let r = support::http_request(&addr, "GET", "/metrics", &[], b"").ok()?;
        last = r.body.clone();
        let m = parse_metrics(&r.body);
        (r.status == 200 && m.get("prefect_up") == Some(&1.0)).then_some(m)
    })
    .unwrap_or_else(|| {
        panic!(
            "prefect_up never became 1; last /metrics:\n{last}\nlogs:\n{}",
            container.logs()
        )
    });
    for (name, value) in &want {
        assert_eq!(
            metrics.get(*name),
            Some(value),
            "{name} in the container's /metrics\n{last}"
        );
    }
    assert_eq!(
        metrics.get("prefect_exporter_collect_errors_total"),
        Some(&0.0),
        "no collection errors\n{last}"
    );
    let ready = support::http_request(&addr, "GET", "/readyz", &[], b"").expect("GET /readyz");
    assert_eq!(ready.status, 200, "/readyz: {}", ready.body);
    let health = support::http_request(&addr, "GET", "/healthz", &[], b"").expect("GET /healthz");
    assert_eq!(health.status, 200, "/healthz: {}", health.body);

    // The image runs as nobody, with the exporter as PID 1 of its PID namespace.
    assert_eq!(container.inspect("{{.Config.User}}"), "65534:65534");
    let host_pid = container.inspect("{{.State.Pid}}");
    if let Ok(status) = std::fs::read_to_string(format!("/proc/{host_pid}/status")) {
        let nspid = status
            .lines()
            .find(|l| l.starts_with("NSpid:"))
            .unwrap_or("");
        assert_eq!(
            nspid.split_whitespace().last(),
            Some("1"),
            "the exporter is PID 1 in the container ({nspid})"
        );
    }

    // 4. podman stop sends SIGTERM, and SIGKILL after 2 s: exit code 0 means PID 1
    // handled SIGTERM and exited before the kill. The time from calling podman stop
    // to the exit (FinishedAt) must also be under 2 s; podman's own clean-up after
    // the exit is not the exporter's and is only reported.
    let unix_nanos = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos()
    };
    let stop_called = unix_nanos();
    let t = Instant::now();
    let stop = podman(&["stop", "--time", "2", &container.name]);
    let took = t.elapsed();
    assert!(
        stop.status.success(),
        "podman stop failed:\n{}",
        text(&stop)
    );
    let state =
        container.inspect("{{.State.Status}} {{.State.ExitCode}} {{.State.FinishedAt.UnixNano}}");
    let parts: Vec<&str> = state.split_whitespace().collect();
    assert_eq!(
        parts[..2],
        ["exited", "0"],
        "the container did not exit 0 on SIGTERM (podman stop took {took:.2?}); logs:\n{}",
        container.logs()
    );
    let finished: u128 = parts[2].parse().expect("FinishedAt.UnixNano");
    let to_exit = Duration::from_nanos(finished.saturating_sub(stop_called) as u64);
    eprintln!("podman stop: exited 0 {to_exit:.2?} after the call; the command took {took:.2?}");
    assert!(
        to_exit < Duration::from_secs(2),
        "the container exited {to_exit:.2?} after podman stop (limit 2 s)"
    );
    let logs = container.logs();
    assert!(
        logs.contains("SIGTERM"),
        "the exporter logged no SIGTERM:\n{logs}"
    );
}
