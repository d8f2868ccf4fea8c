//! The exporter binary as a child process on a free port: its output captured,
//! scrapes parsed, polling helpers; `run_exporter_once`.

use super::*;

// ---------------------------------------------------------------------------
// Exporter
// ---------------------------------------------------------------------------

pub(crate) type Buffer = Arc<Mutex<String>>;

pub(crate) fn capture<R: Read + Send + 'static>(mut src: R, buf: Buffer) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        loop {
            match src.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&String::from_utf8_lossy(&chunk[..n])),
            }
        }
    })
}

/// The environment every exporter run starts from: nothing but PATH and a fresh,
/// empty HOME (so neither PREFECT_* variables nor ~/.prefect of the developer leak in).
pub(crate) fn exporter_command(
    args: &[&str],
    envs: &[(&str, &str)],
    home: &Path,
    defaults: &[(&str, &str)],
) -> Command {
    let mut cmd = watched_command(&exporter_bin(), None);
    cmd.args(args).env_clear().env("HOME", home);
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    for (k, v) in defaults {
        if !envs.iter().any(|(ek, _)| ek == k) {
            cmd.env(k, v);
        }
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// A collection's deadline is its interval: 2 s leaves room for the first
/// collection (every group, the start-up look-ups) on a loaded 2-core machine,
/// where 1 s sometimes missed it.
pub(crate) const EXPORTER_DEFAULTS: &[(&str, &str)] = &[
    ("EXPORTER_PORT", "0"),
    ("EXPORTER_ADDRESS", "127.0.0.1"),
    ("EXPORTER_INTERVAL", "2"),
];

/// The exporter binary as a child process, killed on drop.
pub struct Exporter {
    child: Child,
    addr: String,
    stdout: Buffer,
    stderr: Buffer,
    _home: TempDir,
}

impl Exporter {
    /// Starts the exporter with EXPORTER_PORT=0, EXPORTER_ADDRESS=127.0.0.1 and
    /// EXPORTER_INTERVAL=1 (each overridable by `envs`) and waits (20 s) for its
    /// `listening on http://ADDR/metrics` line.
    pub fn spawn(envs: &[(&str, &str)]) -> Exporter {
        Self::spawn_with(&[], envs, EXPORTER_DEFAULTS)
    }

    /// Like [`spawn`](Self::spawn) with command-line arguments and explicit defaults
    /// (pass `&[]` to start from PATH and HOME only).
    pub fn spawn_with(args: &[&str], envs: &[(&str, &str)], defaults: &[(&str, &str)]) -> Exporter {
        let home = TempDir::new("exporter-home");
        let mut child = exporter_command(args, envs, home.path(), defaults)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", exporter_bin().display()));
        let stdout: Buffer = Arc::default();
        let stderr: Buffer = Arc::default();
        capture(child.stdout.take().expect("stdout"), stdout.clone());
        capture(child.stderr.take().expect("stderr"), stderr.clone());
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr = loop {
            let text = stderr.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(addr) = listening_addr(&text) {
                break addr;
            }
            if let Ok(Some(status)) = child.try_wait() {
                // Let the reader threads drain what is left.
                thread::sleep(Duration::from_millis(50));
                panic!(
                    "exporter exited before listening ({status}); envs {envs:?}\nstderr:\n{}\nstdout:\n{}",
                    stderr.lock().unwrap_or_else(|e| e.into_inner()),
                    stdout.lock().unwrap_or_else(|e| e.into_inner())
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("exporter not listening after 20 s; envs {envs:?}\nstderr:\n{text}");
            }
            thread::sleep(Duration::from_millis(10));
        };
        Exporter {
            child,
            addr,
            stdout,
            stderr,
            _home: home,
        }
    }

    /// `ip:port` it listens on.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn stdout(&self) -> String {
        self.stdout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Any request; panics on a transport error (with the exporter's stderr).
    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
        http_request(&self.addr, method, path, headers, b"").unwrap_or_else(|e| {
            panic!(
                "{method} {path} on the exporter failed: {e}\nstderr:\n{}",
                self.stderr()
            )
        })
    }

    /// GET; returns (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        let r = self.request("GET", path, &[]);
        (r.status, r.body)
    }

    /// The raw /metrics text (asserts 200).
    pub fn metrics_text(&self) -> String {
        let (status, body) = self.get("/metrics");
        assert_eq!(
            status,
            200,
            "/metrics answered {status}: {body}\nstderr:\n{}",
            self.stderr()
        );
        body
    }

    /// One scrape, parsed (asserts 200).
    pub fn metrics(&self) -> HashMap<String, f64> {
        parse_metrics(&self.metrics_text())
    }

    /// Scrapes every 100 ms until `cond` holds; panics after `timeout` with the last
    /// scrape and stderr.
    pub fn wait_for(
        &self,
        cond: impl Fn(&HashMap<String, f64>) -> bool,
        timeout: Duration,
    ) -> HashMap<String, f64> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            if let Ok(r) = http_request(&self.addr, "GET", "/metrics", &[], b"") {
                if r.status == 200 {
                    let m = parse_metrics(&r.body);
                    if cond(&m) {
                        return m;
                    }
                }
                last = format!("status {}\n{}", r.status, r.body);
            }
            if Instant::now() > deadline {
                panic!(
                    "condition not met within {timeout:?}\nlast scrape: {last}\nstderr:\n{}",
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Asserts that the scrape `m` shows each of `gauges` (name, value; e.g.
    /// `Expected::seed_gauges`) and no failed collection, naming this exporter's
    /// log in a failure.
    pub fn assert_gauges(&self, m: &HashMap<String, f64>, gauges: &[(&str, f64)]) {
        for (name, want) in gauges {
            assert_eq!(
                m.get(*name),
                Some(want),
                "{name}: the server has {want}, the exporter shows {:?}\nstderr:\n{}",
                m.get(*name),
                self.stderr()
            );
        }
        assert_eq!(
            m.get("prefect_exporter_collect_errors_total"),
            Some(&0.0),
            "a collection failed\nstderr:\n{}",
            self.stderr()
        );
    }

    /// Polls the exporter's log until `cond` holds and returns it; panics with the
    /// log after 5 s. A collection's log line is written just after its metrics
    /// are published, so a scrape can show a collection whose line is not there yet.
    pub fn wait_log(&self, what: &str, cond: impl Fn(&str) -> bool) -> String {
        poll(Duration::from_secs(5), Duration::from_millis(20), || {
            let log = self.stderr();
            cond(&log).then_some(log)
        })
        .unwrap_or_else(|| {
            panic!(
                "not in the log within 5 s: {what}\nstderr:\n{}",
                self.stderr()
            )
        })
    }

    /// Waits for the first collection, successful or not, and returns its scrape.
    pub fn first_collection(&self, timeout: Duration) -> HashMap<String, f64> {
        self.wait_for(|m| collections(m) >= 1.0, timeout)
    }

    pub fn signal(&self, sig: i32) -> bool {
        send_signal(self.child.id(), sig)
    }

    /// Waits for the process to end; None when it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_child(&mut self.child, timeout)
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Extracts `ADDR` from a `listening on http://ADDR/metrics` log line.
pub fn listening_addr(log: &str) -> Option<String> {
    let start = log.find("listening on http://")? + "listening on http://".len();
    let rest = &log[start..];
    let end = rest.find("/metrics")?;
    Some(rest[..end].to_string())
}

/// Runs the exporter to completion (for --help, --version, configuration errors):
/// clean environment (PATH, empty HOME, EXPORTER_PORT=0, EXPORTER_ADDRESS=127.0.0.1
/// unless given). Panics if it is still running after 10 s.
pub fn run_exporter_once(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let home = TempDir::new("exporter-home");
    let mut child = exporter_command(args, envs, home.path(), &EXPORTER_DEFAULTS[..2])
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", exporter_bin().display()));
    let stdout: Buffer = Arc::default();
    let stderr: Buffer = Arc::default();
    let t1 = capture(child.stdout.take().expect("stdout"), stdout.clone());
    let t2 = capture(child.stderr.take().expect("stderr"), stderr.clone());
    let Some(status) = wait_child(&mut child, Duration::from_secs(10)) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "exporter {args:?} {envs:?} still running after 10 s\nstderr:\n{}",
            stderr.lock().unwrap_or_else(|e| e.into_inner())
        );
    };
    let _ = t1.join();
    let _ = t2.join();
    let out = |b: &Buffer| {
        b.lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .into_bytes()
    };
    Output {
        status,
        stdout: out(&stdout),
        stderr: out(&stderr),
    }
}
