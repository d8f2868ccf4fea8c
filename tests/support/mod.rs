//! Shared integration-test harness, used by every `tests/*.rs` through `mod support;`.
//!
//! - [`PrefectServer`]: a real Prefect 3 server (project venv, free loopback port,
//!   temporary `PREFECT_HOME` copied from a migrated template database), always
//!   stopped: by `Drop`, by an `atexit` hook for the per-binary shared server, and by
//!   a shell watchdog when the test process dies without running either.
//! - [`Api`]: a small REST client to seed flows, deployments, work pools and runs;
//!   [`seed_standard`] creates the standard data set and returns [`Expected`].
//! - [`Exporter`]: the built binary as a child process on a free port, with its
//!   output captured, a scrape parser and polling helpers; [`run_exporter_once`].
//! - [`Stub`]: a programmable HTTP/1.1 server for what a real Prefect cannot do
//!   (500s, garbage bodies, hangs); it records every request it sees.
//!
//! Real-server tests start with `support::require_prefect!();`: outside CI a missing
//! venv (and a failed install) skips the test with a message; under `CI=true` it panics.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

pub mod ops;
pub use ops::{seed_ops, SeededOps};
pub mod events;

// ---------------------------------------------------------------------------
// Small OS helpers (libc is always linked by std; no extra crate needed)
// ---------------------------------------------------------------------------

mod sys {
    extern "C" {
        pub fn kill(pid: i32, sig: i32) -> i32;
        pub fn atexit(cb: extern "C" fn()) -> i32;
        pub fn flock(fd: i32, operation: i32) -> i32;
    }
    pub const LOCK_EX: i32 = 2;
}

pub const SIGINT: i32 = 2;
pub const SIGKILL: i32 = 9;
pub const SIGTERM: i32 = 15;
pub const SIGCONT: i32 = 18;
pub const SIGSTOP: i32 = 19;

/// Sends `sig` to `pid`; true when the signal was delivered.
pub fn send_signal(pid: u32, sig: i32) -> bool {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { sys::kill(pid as i32, sig) == 0 }
}

/// An exclusive advisory lock on a file, held until dropped (cross-process).
struct FileLock(fs::File);

impl FileLock {
    fn acquire(path: &Path) -> FileLock {
        use std::os::unix::io::AsRawFd;
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("cannot open lock file {}: {e}", path.display()));
        // SAFETY: the descriptor is valid for the lifetime of `file`.
        let rc = unsafe { sys::flock(file.as_raw_fd(), sys::LOCK_EX) };
        assert_eq!(rc, 0, "flock({}) failed", path.display());
        FileLock(file) // closing the file releases the lock
    }
}

/// Runs the command's program through `sh`, which forks a watcher and then `exec`s
/// the program (so the child's pid IS the program's). The watcher polls the test
/// process once a second; when the test process is gone (even after SIGKILL), it
/// sends SIGTERM, then SIGKILL after 5 s, and removes `cleanup_dir` (if not empty).
/// It ends by itself within a second once the program has exited and been reaped.
const WATCHDOG: &str = r#"parent=$1; cleanup=$2; shift 2; me=$$
(
  while kill -0 "$parent" 2>/dev/null && kill -0 "$me" 2>/dev/null; do sleep 1; done
  if ! kill -0 "$parent" 2>/dev/null; then
    kill -CONT "$me" 2>/dev/null; kill -TERM "$me" 2>/dev/null
    i=0
    while kill -0 "$me" 2>/dev/null && [ "$i" -lt 10 ]; do sleep 0.5; i=$((i+1)); done
    kill -KILL "$me" 2>/dev/null
    if [ -n "$cleanup" ]; then rm -rf "$cleanup"; fi
  fi
) </dev/null >/dev/null 2>&1 &
exec "$@""#;

pub fn watched_command(program: &Path, cleanup_dir: Option<&Path>) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(WATCHDOG)
        .arg("sh")
        .arg(std::process::id().to_string())
        .arg(cleanup_dir.map(|p| p.as_os_str()).unwrap_or_default())
        .arg(program);
    cmd
}

/// Polls `child` until it exits or `timeout` passes.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}

/// SIGTERM (after SIGCONT, in case it is frozen), up to `grace`, then SIGKILL; reaps.
pub fn terminate(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    send_signal(child.id(), SIGCONT);
    send_signal(child.id(), SIGTERM);
    if let Some(status) = wait_child(child, grace) {
        return Some(status);
    }
    let _ = child.kill();
    child.wait().ok()
}

// ---------------------------------------------------------------------------
// Paths, environment, temporary directories
// ---------------------------------------------------------------------------

pub fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn exporter_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_prefect-exporter"))
}

/// Cargo's target directory (the parent of the profile directory of the binary).
pub fn target_dir() -> PathBuf {
    let bin = exporter_bin();
    bin.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| project_root().join("target"))
}

pub fn is_ci() -> bool {
    matches!(
        std::env::var("CI")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Ok("true" | "1" | "yes")
    )
}

/// A directory under the system temp dir, removed (recursively) on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A free TCP port on 127.0.0.1 (bind to port 0, read it, release it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot bind 127.0.0.1:0")
}

/// Polls `cond` every `every` until it returns Some or `timeout` passes.
pub fn poll<T>(
    timeout: Duration,
    every: Duration,
    mut cond: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(every);
    }
}

// ---------------------------------------------------------------------------
// The Prefect venv
// ---------------------------------------------------------------------------

/// The venv holding Prefect: `$PREFECT_VENV`, else `<repo>/.venv`.
pub fn venv_dir() -> PathBuf {
    std::env::var_os("PREFECT_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join(".venv"))
}

pub fn prefect_bin() -> PathBuf {
    venv_dir().join("bin").join("prefect")
}

fn ensure_venv() -> Result<(), String> {
    if prefect_bin().exists() {
        return Ok(());
    }
    eprintln!(
        "support: {} missing, running scripts/prefect-venv.sh",
        prefect_bin().display()
    );
    let status = Command::new(project_root().join("scripts/prefect-venv.sh"))
        .env("PREFECT_VENV", venv_dir())
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run scripts/prefect-venv.sh: {e}"))?;
    if !status.success() {
        return Err(format!("scripts/prefect-venv.sh failed ({status})"));
    }
    if !prefect_bin().exists() {
        return Err(format!(
            "{} still missing after install",
            prefect_bin().display()
        ));
    }
    Ok(())
}

/// True when a Prefect server can be started (installing the venv once if needed).
/// Under `CI=true` an unavailable Prefect is a panic, never a skip.
pub fn prefect_available() -> bool {
    static AVAILABLE: OnceLock<Result<(), String>> = OnceLock::new();
    match AVAILABLE.get_or_init(ensure_venv) {
        Ok(()) => true,
        Err(e) if is_ci() => panic!("CI=true: a real Prefect server is required: {e}"),
        Err(e) => {
            eprintln!("SKIPPED: no Prefect venv ({e}); run scripts/prefect-venv.sh");
            false
        }
    }
}

/// First line of a real-server test: returns from the test (skips, with a message)
/// when Prefect is unavailable outside CI; panics under `CI=true`.
#[allow(unused_macros)]
macro_rules! require_prefect {
    () => {
        if !$crate::support::prefect_available() {
            return;
        }
    };
}
#[allow(unused_imports)]
pub(crate) use require_prefect;

// ---------------------------------------------------------------------------
// PrefectServer
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, Default)]
pub struct ServerOptions {
    /// `user:pass`: the server requires HTTP basic auth (PREFECT_SERVER_API_AUTH_STRING).
    pub auth_string: Option<String>,
    /// Turn on the server's CSRF protection.
    pub csrf: bool,
    /// More environment for the server (applied last).
    pub extra_env: Vec<(String, String)>,
    /// Store events: run the event persister (which `--no-services` leaves
    /// out) with every other service off, so that counts stay deterministic.
    pub events: bool,
}

/// The server services other than the event persister, all off when
/// [`ServerOptions::events`] is set.
const NON_EVENT_SERVICES: &[&str] = &[
    "CANCELLATION_CLEANUP",
    "DB_VACUUM",
    "EVENT_LOGGER",
    "FOREMAN",
    "LATE_RUNS",
    "SCHEDULER",
    "PAUSE_EXPIRATIONS",
    "REPOSSESSOR",
    "CLEANUP_RECONCILER",
    "TASK_RUN_RECORDER",
    "TRIGGERS",
];

/// A real `prefect server start --no-services` on a free loopback port.
pub struct PrefectServer {
    port: u16,
    home: PathBuf,
    opts: ServerOptions,
    child: Mutex<Option<Child>>,
    pid: AtomicI32,
}

const START_DEADLINE: Duration = Duration::from_secs(120);

fn server_env(cmd: &mut Command, home: &Path, opts: &ServerOptions) {
    // Never let the developer's Prefect settings reach the test server.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PREFECT_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("PREFECT_HOME", home)
        .env("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        .env("PREFECT_SERVER_UI_ENABLED", "false")
        .env(
            "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED",
            "false",
        )
        .env(
            "PREFECT_SERVER_CSRF_PROTECTION_ENABLED",
            if opts.csrf { "true" } else { "false" },
        )
        .env("DO_NOT_TRACK", "1");
    if let Some(auth) = &opts.auth_string {
        cmd.env("PREFECT_SERVER_API_AUTH_STRING", auth);
    }
    if opts.events {
        for s in NON_EVENT_SERVICES {
            cmd.env(format!("PREFECT_SERVER_SERVICES_{s}_ENABLED"), "false");
        }
        cmd.env("PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED", "true");
    }
    for (k, v) in &opts.extra_env {
        cmd.env(k, v);
    }
}

/// Starts the server process (through the watchdog) with its output appended to
/// `$home/server.log`.
fn launch_server(home: &Path, port: u16, opts: &ServerOptions, cleanup: bool) -> Child {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(home.join("server.log"))
        .expect("cannot open server.log");
    let mut cmd = watched_command(&prefect_bin(), cleanup.then_some(home));
    cmd.args(["server", "start", "--host", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .args((!opts.events).then_some("--no-services"))
        .current_dir(home)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log);
    server_env(&mut cmd, home, opts);
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", prefect_bin().display()))
}

enum StartError {
    PortInUse(String),
    Failed(String),
}

/// Waits for `GET /api/health` to answer 200 `true` while the process lives.
fn wait_healthy(child: &mut Child, home: &Path, port: u16) -> Result<Duration, StartError> {
    let started = Instant::now();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(2)))
        .max_idle_connections(0)
        .build()
        .into();
    let url = format!("http://127.0.0.1:{port}/api/health");
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = fs::read_to_string(home.join("server.log")).unwrap_or_default();
            let tail = tail_lines(&log, 40);
            return Err(
                if log.contains("address already in use") || log.contains("Errno 98") {
                    StartError::PortInUse(tail)
                } else {
                    StartError::Failed(format!("prefect server exited ({status}):\n{tail}"))
                },
            );
        }
        if let Ok(mut resp) = agent.get(&url).call() {
            let body = resp.body_mut().read_to_string().unwrap_or_default();
            if resp.status().as_u16() == 200 && body.trim() == "true" {
                return Ok(started.elapsed());
            }
        }
        if started.elapsed() > START_DEADLINE {
            let log = fs::read_to_string(home.join("server.log")).unwrap_or_default();
            return Err(StartError::Failed(format!(
                "prefect server not healthy after {START_DEADLINE:?}:\n{}",
                tail_lines(&log, 40)
            )));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The `prefect-X.Y.Z.dist-info` directory name of the venv (keys the template).
fn prefect_dist_key() -> String {
    let lib = venv_dir().join("lib");
    let mut key = String::from("unknown");
    if let Ok(pys) = fs::read_dir(&lib) {
        for py in pys.flatten() {
            if let Ok(entries) = fs::read_dir(py.path().join("site-packages")) {
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.starts_with("prefect-") && name.ends_with(".dist-info") {
                        key = name;
                    }
                }
            }
        }
    }
    key
}

const TEMPLATE_FILES: &[&str] = &["prefect.db", "memo_store.toml"];

/// A migrated, checkpointed database (plus the block-registration memo) made once
/// per machine and Prefect version under `target/prefect-template/`, guarded by a
/// file lock. Each new server copies it and skips migrations (~4 s instead of ~12 s).
/// `PREFECT_TEST_NO_TEMPLATE=1` turns it off (cold starts, for measurements).
fn template_dir() -> Option<PathBuf> {
    static TEMPLATE: OnceLock<Option<PathBuf>> = OnceLock::new();
    TEMPLATE.get_or_init(build_template).clone()
}

fn build_template() -> Option<PathBuf> {
    if std::env::var_os("PREFECT_TEST_NO_TEMPLATE").is_some_and(|v| v != "0" && !v.is_empty()) {
        return None;
    }
    let base = target_dir().join("prefect-template");
    fs::create_dir_all(&base).ok()?;
    let dir = base.join(prefect_dist_key());
    if dir.join("prefect.db").exists() {
        return Some(dir);
    }
    let _lock = FileLock::acquire(&base.join(".lock"));
    if dir.join("prefect.db").exists() {
        return Some(dir);
    }
    let started = Instant::now();
    let build = base.join(format!(".build-{}", std::process::id()));
    let _ = fs::remove_dir_all(&build);
    fs::create_dir_all(&build).ok()?;
    let result = (|| -> Result<(), String> {
        let opts = ServerOptions::default();
        let port = free_port();
        let mut child = launch_server(&build, port, &opts, true);
        let ready = wait_healthy(&mut child, &build, port);
        terminate(&mut child, Duration::from_secs(10));
        match ready {
            Ok(_) => {}
            Err(StartError::PortInUse(log)) | Err(StartError::Failed(log)) => return Err(log),
        }
        // Fold the WAL into the database file so one file is a complete copy.
        let py = venv_dir().join("bin").join("python");
        let out = Command::new(py)
            .arg("-c")
            .arg("import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('PRAGMA wal_checkpoint(TRUNCATE)'); c.close()")
            .arg(build.join("prefect.db"))
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let staged = base.join(format!(".staged-{}", std::process::id()));
        let _ = fs::remove_dir_all(&staged);
        fs::create_dir_all(&staged).map_err(|e| e.to_string())?;
        for f in TEMPLATE_FILES {
            if build.join(f).exists() {
                fs::copy(build.join(f), staged.join(f)).map_err(|e| e.to_string())?;
            }
        }
        fs::rename(&staged, &dir).map_err(|e| e.to_string())
    })();
    let _ = fs::remove_dir_all(&build);
    match result {
        Ok(()) => {
            eprintln!(
                "support: built Prefect template database {} in {:.1} s",
                dir.display(),
                started.elapsed().as_secs_f64()
            );
            Some(dir)
        }
        Err(e) => {
            eprintln!("support: no template database (cold starts instead): {e}");
            None
        }
    }
}

/// In-process serialisation of template building (the file lock covers processes).
static TEMPLATE_MUTEX: Mutex<()> = Mutex::new(());

impl PrefectServer {
    /// Starts a fresh server (panics when it cannot; call `require_prefect!()` first).
    pub fn start(opts: ServerOptions) -> PrefectServer {
        assert!(
            prefect_available(),
            "Prefect is not available (the test should start with support::require_prefect!())"
        );
        let template = {
            let _g = TEMPLATE_MUTEX.lock().unwrap_or_else(|e| e.into_inner());
            template_dir()
        };
        let mut last_err = String::new();
        for _attempt in 0..3 {
            let home = TempDir::new("prefect-home");
            let home_path = home.path().to_path_buf();
            std::mem::forget(home); // owned by the PrefectServer from here on
            if let Some(t) = &template {
                for f in TEMPLATE_FILES {
                    if t.join(f).exists() {
                        fs::copy(t.join(f), home_path.join(f)).expect("copy template database");
                    }
                }
            }
            let port = free_port();
            let mut child = launch_server(&home_path, port, &opts, true);
            match wait_healthy(&mut child, &home_path, port) {
                Ok(took) => {
                    if std::env::var_os("SUPPORT_VERBOSE").is_some() {
                        eprintln!("support: prefect server on :{port} ready in {took:.1?}");
                    }
                    let pid = child.id() as i32;
                    return PrefectServer {
                        port,
                        home: home_path,
                        opts,
                        child: Mutex::new(Some(child)),
                        pid: AtomicI32::new(pid),
                    };
                }
                Err(e) => {
                    terminate(&mut child, Duration::from_secs(5));
                    let _ = fs::remove_dir_all(&home_path);
                    match e {
                        StartError::PortInUse(log) => last_err = log,
                        StartError::Failed(log) => panic!("{log}"),
                    }
                }
            }
        }
        panic!("prefect server: port always in use:\n{last_err}");
    }

    /// The server shared by all tests of this test binary: started once, seeded with
    /// [`seed_standard`], stopped when the process exits. Treat it as read-only.
    pub fn shared() -> &'static PrefectServer {
        &shared_state().server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT/api`
    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}/api", self.port)
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    pub fn auth_string(&self) -> Option<&str> {
        self.opts.auth_string.as_deref()
    }

    /// A REST client with this server's credentials.
    pub fn api(&self) -> Api {
        Api::new(&self.api_url(), self.auth_string())
    }

    /// The server's combined stdout/stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.home.join("server.log")).unwrap_or_default()
    }

    /// The pid of the running server process (0 when stopped).
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::SeqCst) as u32
    }

    /// Stops the server (SIGTERM, SIGKILL after 10 s); the home is kept for `restart`.
    pub fn stop(&self) {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut child) = guard.take() {
            terminate(&mut child, Duration::from_secs(10));
        }
        self.pid.store(0, Ordering::SeqCst);
    }

    /// SIGSTOP: the port stays open but nothing answers (connect, then hang).
    pub fn freeze(&self) {
        let pid = self.pid();
        assert!(
            pid != 0 && send_signal(pid, SIGSTOP),
            "freeze: server not running"
        );
    }

    /// SIGCONT after [`freeze`](Self::freeze).
    pub fn thaw(&self) {
        let pid = self.pid();
        assert!(
            pid != 0 && send_signal(pid, SIGCONT),
            "thaw: server not running"
        );
    }

    /// Stops (if running) and starts again on the same port with the same home
    /// (data kept); returns when healthy again.
    pub fn restart(&self) {
        self.stop();
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let mut last = String::new();
        for _ in 0..20 {
            let mut child = launch_server(&self.home, self.port, &self.opts, true);
            match wait_healthy(&mut child, &self.home, self.port) {
                Ok(_) => {
                    self.pid.store(child.id() as i32, Ordering::SeqCst);
                    *guard = Some(child);
                    return;
                }
                Err(StartError::PortInUse(log)) => {
                    // The old socket may linger for a moment; try again shortly.
                    terminate(&mut child, Duration::from_secs(5));
                    last = log;
                    thread::sleep(Duration::from_millis(250));
                }
                Err(StartError::Failed(log)) => {
                    terminate(&mut child, Duration::from_secs(5));
                    panic!("restart failed: {log}");
                }
            }
        }
        panic!("restart: port {} stayed in use:\n{last}", self.port);
    }

    /// Stops the server without blocking on a lock (for the atexit hook).
    fn stop_at_exit(&self) {
        match self.child.try_lock() {
            Ok(mut guard) => {
                if let Some(mut child) = guard.take() {
                    terminate(&mut child, Duration::from_secs(5));
                }
            }
            Err(_) => {
                let pid = self.pid();
                if pid != 0 {
                    send_signal(pid, SIGCONT);
                    send_signal(pid, SIGKILL);
                }
            }
        }
        let _ = fs::remove_dir_all(&self.home);
    }
}

impl Drop for PrefectServer {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.home);
    }
}

struct Shared {
    server: PrefectServer,
    expected: Expected,
}

static SHARED: OnceLock<Result<Shared, String>> = OnceLock::new();

fn shared_state() -> &'static Shared {
    let state = SHARED.get_or_init(|| {
        let started = Instant::now();
        let result = std::panic::catch_unwind(|| {
            let server = PrefectServer::start(ServerOptions::default());
            let t = Instant::now();
            let expected = seed_standard(&server.api());
            if std::env::var_os("SUPPORT_VERBOSE").is_some() {
                eprintln!(
                    "support: shared server seeded in {:.1?} ({} runs)",
                    t.elapsed(),
                    expected.total
                );
            }
            Shared { server, expected }
        });
        match result {
            Ok(shared) => {
                // SAFETY: registering a plain extern "C" fn with atexit(3).
                unsafe { sys::atexit(stop_shared_at_exit) };
                if std::env::var_os("SUPPORT_VERBOSE").is_some() {
                    eprintln!("support: shared server ready in {:.1?}", started.elapsed());
                }
                Ok(shared)
            }
            Err(panic) => Err(panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into())),
        }
    });
    match state {
        Ok(s) => s,
        Err(e) => panic!("the shared Prefect server failed to start earlier: {e}"),
    }
}

/// Runs at process exit (statics are never dropped): stops the shared server.
extern "C" fn stop_shared_at_exit() {
    if let Some(Ok(shared)) = SHARED.get() {
        shared.server.stop_at_exit();
    }
}

/// The [`Expected`] of the shared server's standard data set.
pub fn shared_expected() -> &'static Expected {
    &shared_state().expected
}

// ---------------------------------------------------------------------------
// Api: a REST client for seeding
// ---------------------------------------------------------------------------

/// Minimal standard base64 (for HTTP basic auth).
pub fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A REST client for one Prefect API base URL (`.../api`). Every body is sent as
/// `Content-Type: application/json`. Use one writer per server (SQLite).
pub struct Api {
    base: String,
    auth: Option<String>,
    agent: ureq::Agent,
    /// (client id, token) once a CSRF-protected server asked for one.
    csrf: Mutex<Option<(String, String)>>,
}

impl Api {
    pub fn new(api_url: &str, auth_string: Option<&str>) -> Api {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            // Prefect drops idle keep-alive connections after 5 s.
            .max_idle_age(Duration::from_secs(2))
            .build()
            .into();
        Api {
            base: api_url.trim_end_matches('/').to_string(),
            auth: auth_string.map(|a| format!("Basic {}", base64(a.as_bytes()))),
            agent,
            csrf: Mutex::new(None),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// One request; `path` is relative to the API base (`/flows/`). Returns the
    /// status and the JSON body (`Value::Null` when empty, a string when not JSON).
    /// Retries transport errors and 503 ("database is locked") a few times; on a
    /// CSRF-protected server it fetches a token (on the first 403) and resends.
    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let (status, value) = self.request_once(method, path, body);
        let csrf_refused = status == 403 && value.to_string().to_lowercase().contains("csrf");
        if csrf_refused && method != "GET" {
            self.fetch_csrf_token();
            return self.request_once(method, path, body);
        }
        (status, value)
    }

    fn fetch_csrf_token(&self) {
        let client = fake_uuid(&format!("{}-{:?}", std::process::id(), Instant::now()));
        let (status, v) = self.request_once("GET", &format!("/csrf-token?client={client}"), None);
        assert_eq!(status, 200, "GET /csrf-token: {v}");
        let token = v["token"]
            .as_str()
            .unwrap_or_else(|| panic!("csrf token: {v}"));
        *self.csrf.lock().unwrap_or_else(|e| e.into_inner()) = Some((client, token.into()));
    }

    fn request_once(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let url = format!("{}{}", self.base, path);
        let csrf = self.csrf.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut last_err = String::new();
        for attempt in 0..6 {
            if attempt > 0 {
                thread::sleep(Duration::from_millis(100 * attempt));
            }
            let result = match (method, body) {
                ("GET", _) => self.with_auth_get(self.agent.get(&url)).call(),
                ("DELETE", _) => {
                    let mut b = self.with_auth_get(self.agent.delete(&url));
                    if let Some((client, token)) = &csrf {
                        b = b
                            .header("Prefect-Csrf-Token", token)
                            .header("Prefect-Csrf-Client", client);
                    }
                    b.call()
                }
                (m, b) => {
                    let mut builder = match m {
                        "POST" => self.agent.post(&url),
                        "PATCH" => self.agent.patch(&url),
                        "PUT" => self.agent.put(&url),
                        other => panic!("Api::request: unsupported method {other}"),
                    };
                    if let Some(a) = &self.auth {
                        builder = builder.header("Authorization", a);
                    }
                    if let Some((client, token)) = &csrf {
                        builder = builder
                            .header("Prefect-Csrf-Token", token)
                            .header("Prefect-Csrf-Client", client);
                    }
                    let text = b.map(|v| v.to_string()).unwrap_or_else(|| "{}".into());
                    builder
                        .header("Content-Type", "application/json")
                        .send(text)
                }
            };
            match result {
                Ok(mut resp) => {
                    let status = resp.status().as_u16();
                    let text = resp.body_mut().read_to_string().unwrap_or_default();
                    if status == 503 && attempt < 5 {
                        last_err = format!("503 {text}");
                        continue;
                    }
                    let value = if text.trim().is_empty() {
                        Value::Null
                    } else {
                        serde_json::from_str(&text).unwrap_or(Value::String(text))
                    };
                    return (status, value);
                }
                Err(e) => last_err = e.to_string(),
            }
        }
        panic!("{method} {url}: {last_err}");
    }

    fn with_auth_get(
        &self,
        b: ureq::RequestBuilder<ureq::typestate::WithoutBody>,
    ) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        match &self.auth {
            Some(a) => b.header("Authorization", a),
            None => b,
        }
    }

    /// Like [`request`](Self::request) but panics unless the status is 2xx.
    pub fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, value) = self.request(method, path, body);
        assert!(
            (200..300).contains(&status),
            "{method} {}{path} -> {status}: {value}",
            self.base
        );
        value
    }

    fn id_of(v: &Value) -> String {
        v["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no id in {v}"))
            .to_string()
    }

    /// Creates (or finds: upsert) a flow; returns its id.
    pub fn create_flow(&self, name: &str) -> String {
        Self::id_of(&self.ok("POST", "/flows/", Some(&json!({ "name": name }))))
    }

    /// Creates (upsert by flow and name) a deployment; returns its id.
    pub fn create_deployment(&self, flow_id: &str, name: &str, work_pool: Option<&str>) -> String {
        let mut body = json!({ "name": name, "flow_id": flow_id });
        if let Some(pool) = work_pool {
            body["work_pool_name"] = json!(pool);
        }
        Self::id_of(&self.ok("POST", "/deployments/", Some(&body)))
    }

    pub fn delete_deployment(&self, id: &str) {
        self.ok("DELETE", &format!("/deployments/{id}"), None);
    }

    /// Pauses (true) or resumes (false) a deployment.
    pub fn set_deployment_paused(&self, id: &str, paused: bool) {
        self.ok(
            "PATCH",
            &format!("/deployments/{id}"),
            Some(&json!({ "paused": paused })),
        );
    }

    /// Creates a work pool (or returns the existing one's id).
    pub fn create_work_pool(&self, name: &str, pool_type: &str) -> String {
        let (status, v) = self.request(
            "POST",
            "/work_pools/",
            Some(&json!({ "name": name, "type": pool_type })),
        );
        match status {
            200 | 201 => Self::id_of(&v),
            409 => Self::id_of(&self.ok("GET", &format!("/work_pools/{name}"), None)),
            _ => panic!("POST /work_pools/ {name} -> {status}: {v}"),
        }
    }

    /// A worker heartbeat: the worker appears (ONLINE) in the pool.
    pub fn worker_heartbeat(&self, pool: &str, worker: &str) {
        self.ok(
            "POST",
            &format!("/work_pools/{pool}/workers/heartbeat"),
            Some(&json!({ "name": worker, "heartbeat_interval_seconds": 30 })),
        );
    }

    /// Creates a flow run stored in exactly the given state; returns its id.
    pub fn create_flow_run(
        &self,
        flow_id: &str,
        deployment_id: Option<&str>,
        state_type: &str,
        state_name: &str,
    ) -> String {
        let mut body = json!({
            "flow_id": flow_id,
            "state": { "type": state_type, "name": state_name },
        });
        if let Some(d) = deployment_id {
            body["deployment_id"] = json!(d);
        }
        Self::id_of(&self.ok("POST", "/flow_runs/", Some(&body)))
    }

    /// Creates runs of a deployment in bulk (100 per request), one per given
    /// (state_type, state_name); returns their ids in order.
    pub fn create_flow_runs_bulk(
        &self,
        deployment_id: &str,
        states: &[(&str, &str)],
    ) -> Vec<String> {
        let mut ids = Vec::with_capacity(states.len());
        for chunk in states.chunks(100) {
            let body: Vec<Value> = chunk
                .iter()
                .map(|(t, n)| json!({ "state": { "type": t, "name": n } }))
                .collect();
            let v = self.ok(
                "POST",
                &format!("/deployments/{deployment_id}/create_flow_run/bulk"),
                Some(&Value::Array(body)),
            );
            let results = v["results"]
                .as_array()
                .unwrap_or_else(|| panic!("bulk: {v}"));
            assert_eq!(results.len(), chunk.len(), "bulk create: {v}");
            for r in results {
                assert!(
                    r["status"].as_str() != Some("FAILED"),
                    "bulk create: a run failed: {r}"
                );
                let id = r["flow_run_id"]
                    .as_str()
                    .or_else(|| r["id"].as_str())
                    .or_else(|| r["flow_run"]["id"].as_str())
                    .unwrap_or_else(|| panic!("bulk create: no id in {r}"));
                ids.push(id.to_string());
            }
        }
        ids
    }

    /// Sets a run's state (`force` skips orchestration rules); returns the
    /// orchestration result (`status` ACCEPT/REJECT/...).
    pub fn set_flow_run_state(
        &self,
        id: &str,
        state_type: &str,
        state_name: &str,
        force: bool,
    ) -> Value {
        self.ok(
            "POST",
            &format!("/flow_runs/{id}/set_state"),
            Some(&json!({ "state": { "type": state_type, "name": state_name }, "force": force })),
        )
    }

    pub fn delete_flow_run(&self, id: &str) {
        self.ok("DELETE", &format!("/flow_runs/{id}"), None);
    }

    /// `POST /flow_runs/count` with a filter body: what the server says.
    pub fn count_flow_runs(&self, filter: &Value) -> u64 {
        let v = self.ok("POST", "/flow_runs/count", Some(filter));
        v.as_u64()
            .unwrap_or_else(|| panic!("count: not an integer: {v}"))
    }

    /// Runs whose state name is one of `names`, as counted by the server.
    pub fn count_by_names(&self, names: &[&str]) -> u64 {
        self.count_flow_runs(&json!({ "flow_runs": { "state": { "name": { "any_": names } } } }))
    }

    /// `GET /admin/version` (Prefect's version, e.g. "3.9.1").
    pub fn server_version(&self) -> String {
        self.ok("GET", "/admin/version", None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

// ---------------------------------------------------------------------------
// The standard data set
// ---------------------------------------------------------------------------

/// Every (state_type, state_name) of prefect-api.md's table, in table order.
pub const STATES: &[(&str, &str)] = &[
    ("SCHEDULED", "Scheduled"),
    ("SCHEDULED", "Late"),
    ("SCHEDULED", "AwaitingRetry"),
    ("SCHEDULED", "AwaitingConcurrencySlot"),
    ("PENDING", "Pending"),
    ("PENDING", "Submitting"),
    ("PENDING", "InfrastructurePending"),
    ("RUNNING", "Running"),
    ("RUNNING", "Retrying"),
    ("PAUSED", "Paused"),
    ("PAUSED", "Suspended"),
    ("CANCELLING", "Cancelling"),
    ("CANCELLED", "Cancelled"),
    ("COMPLETED", "Completed"),
    ("COMPLETED", "Cached"),
    ("COMPLETED", "RolledBack"),
    ("FAILED", "Failed"),
    ("FAILED", "TimedOut"),
    ("CRASHED", "Crashed"),
];

pub const SUCCESS_NAMES: &[&str] = &["Completed", "Cached"];
pub const ERROR_NAMES: &[&str] = &["RolledBack", "Failed", "TimedOut", "Crashed", "Suspended"];
pub const WARNING_NAMES: &[&str] = &["Cancelling", "Cancelled", "Paused", "Retrying"];

/// A state name outside the table (counted in the total only).
pub const CUSTOM_STATE: (&str, &str) = ("COMPLETED", "Archived");

/// The standard run counts: the i-th state of [`STATES`] gets i+1 runs (all different,
/// so a name counted in the wrong group changes a sum), plus one run in [`CUSTOM_STATE`].
pub fn standard_counts() -> BTreeMap<(String, String), u64> {
    let mut m: BTreeMap<(String, String), u64> = STATES
        .iter()
        .enumerate()
        .map(|(i, (t, n))| ((t.to_string(), n.to_string()), i as u64 + 1))
        .collect();
    m.insert((CUSTOM_STATE.0.into(), CUSTOM_STATE.1.into()), 1);
    m
}

/// Sum of the counts whose state name is in `names`.
pub fn sum_names(by_state: &BTreeMap<(String, String), u64>, names: &[&str]) -> u64 {
    by_state
        .iter()
        .filter(|((_, n), _)| names.contains(&n.as_str()))
        .map(|(_, c)| c)
        .sum()
}

#[derive(Clone, Debug)]
pub struct SeededRun {
    pub id: String,
    pub flow: String,
    pub deployment: Option<String>,
    pub state_type: String,
    pub state_name: String,
}

#[derive(Clone, Debug)]
pub struct SeededDeployment {
    pub id: String,
    pub name: String,
    pub flow: String,
    pub work_pool: Option<String>,
}

#[derive(Clone, Debug)]
pub struct SeededPool {
    pub name: String,
    pub pool_type: String,
    pub workers: Vec<String>,
}

/// What a seeded server holds, and the values the exporter must show for it.
#[derive(Clone, Debug, Default)]
pub struct Expected {
    pub total: u64,
    pub successes: u64,
    pub errors: u64,
    pub warnings: u64,
    /// Runs per (state_type, state_name).
    pub by_state: BTreeMap<(String, String), u64>,
    /// Flow name -> id.
    pub flows: BTreeMap<String, String>,
    pub deployments: Vec<SeededDeployment>,
    pub work_pools: Vec<SeededPool>,
    pub runs: Vec<SeededRun>,
    /// Work queues, runs in progress and concurrency limits (support/ops.rs).
    pub ops: SeededOps,
}

/// `EXPORTER_CHECK_DEPLOYMENTS` as the exporter reads it: trimmed, blanks and
/// repeats dropped.
pub fn distinct_names<'a>(names: &[&'a str]) -> Vec<&'a str> {
    let mut seen: Vec<&str> = Vec::new();
    for n in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        if !seen.contains(&n) {
            seen.push(n);
        }
    }
    seen
}

impl Expected {
    fn recompute(&mut self) {
        self.by_state.clear();
        for r in &self.runs {
            *self
                .by_state
                .entry((r.state_type.clone(), r.state_name.clone()))
                .or_default() += 1;
        }
        self.total = self.runs.len() as u64;
        self.successes = sum_names(&self.by_state, SUCCESS_NAMES);
        self.errors = sum_names(&self.by_state, ERROR_NAMES);
        self.warnings = sum_names(&self.by_state, WARNING_NAMES);
    }

    /// Records a run created after seeding.
    pub fn add_run(&mut self, run: SeededRun) {
        self.runs.push(run);
        self.recompute();
    }

    /// Records a state change of a seeded run.
    pub fn set_state(&mut self, run_id: &str, state_type: &str, state_name: &str) {
        let run = self
            .runs
            .iter_mut()
            .find(|r| r.id == run_id)
            .unwrap_or_else(|| panic!("no seeded run {run_id}"));
        run.state_type = state_type.into();
        run.state_name = state_name.into();
        self.recompute();
    }

    /// How many of `names` have no deployment (unknown flows count as missing).
    pub fn missing(&self, names: &[&str]) -> u64 {
        distinct_names(names)
            .iter()
            .filter(|n| !self.deployments.iter().any(|d| d.flow == **n))
            .count() as u64
    }

    /// Runs per (state_type, state_name) of one deployment.
    pub fn deployment_runs(&self, deployment: &str) -> BTreeMap<(String, String), u64> {
        let mut m = BTreeMap::new();
        for r in self
            .runs
            .iter()
            .filter(|r| r.deployment.as_deref() == Some(deployment))
        {
            *m.entry((r.state_type.clone(), r.state_name.clone()))
                .or_default() += 1;
        }
        m
    }

    /// The first seeded run in the given state name.
    pub fn run_in(&self, state_name: &str) -> &SeededRun {
        self.runs
            .iter()
            .find(|r| r.state_name == state_name)
            .unwrap_or_else(|| panic!("no seeded run in {state_name}"))
    }

    /// The five seed gauges (without the error counter) for a check list, as
    /// (metric name, value).
    pub fn seed_gauges(&self, check_deployments: &[&str]) -> Vec<(&'static str, f64)> {
        vec![
            ("prefect_flow_runs_total", self.total as f64),
            ("prefect_flow_runs_successes_total", self.successes as f64),
            ("prefect_flow_runs_in_error_total", self.errors as f64),
            ("prefect_flow_runs_in_warning_total", self.warnings as f64),
            (
                "prefect_missing_deployments_total",
                self.missing(check_deployments) as f64,
            ),
        ]
    }
}

/// Seeds the standard data set and checks the server counts it as intended:
/// flows `flow-a` (deployment `a-daily` in work pool `pool-a`, which has worker
/// `worker-1`), `flow-b` (no deployment), `flow-c` (deployment `c-hourly`, no pool);
/// an empty work pool `pool-idle`; runs per [`standard_counts`]: for each state its
/// runs alternate between a-daily and c-hourly, except that the third run of each
/// state (and the custom-state run) belongs to flow-b without a deployment.
pub fn seed_standard(api: &Api) -> Expected {
    let mut exp = Expected::default();
    for f in ["flow-a", "flow-b", "flow-c"] {
        exp.flows.insert(f.into(), api.create_flow(f));
    }
    api.create_work_pool("pool-a", "process");
    api.create_work_pool("pool-idle", "process");
    api.worker_heartbeat("pool-a", "worker-1");
    exp.work_pools = vec![
        SeededPool {
            name: "pool-a".into(),
            pool_type: "process".into(),
            workers: vec!["worker-1".into()],
        },
        SeededPool {
            name: "pool-idle".into(),
            pool_type: "process".into(),
            workers: vec![],
        },
    ];
    let a = SeededDeployment {
        id: api.create_deployment(&exp.flows["flow-a"], "a-daily", Some("pool-a")),
        name: "a-daily".into(),
        flow: "flow-a".into(),
        work_pool: Some("pool-a".into()),
    };
    let c = SeededDeployment {
        id: api.create_deployment(&exp.flows["flow-c"], "c-hourly", None),
        name: "c-hourly".into(),
        flow: "flow-c".into(),
        work_pool: None,
    };

    let mut for_a: Vec<(String, String)> = Vec::new();
    let mut for_c: Vec<(String, String)> = Vec::new();
    let mut for_b: Vec<(String, String)> = Vec::new();
    for ((t, n), count) in standard_counts() {
        if (t.as_str(), n.as_str()) == CUSTOM_STATE {
            for_b.push((t, n));
            continue;
        }
        for j in 0..count {
            let s = (t.clone(), n.clone());
            match j {
                2 => for_b.push(s),
                j if j % 2 == 0 => for_a.push(s),
                _ => for_c.push(s),
            }
        }
    }
    for (dep, states) in [(&a, &for_a), (&c, &for_c)] {
        let refs: Vec<(&str, &str)> = states
            .iter()
            .map(|(t, n)| (t.as_str(), n.as_str()))
            .collect();
        let ids = api.create_flow_runs_bulk(&dep.id, &refs);
        for (id, (t, n)) in ids.into_iter().zip(states) {
            exp.runs.push(SeededRun {
                id,
                flow: dep.flow.clone(),
                deployment: Some(dep.name.clone()),
                state_type: t.clone(),
                state_name: n.clone(),
            });
        }
    }
    for (t, n) in &for_b {
        let id = api.create_flow_run(&exp.flows["flow-b"], None, t, n);
        exp.runs.push(SeededRun {
            id,
            flow: "flow-b".into(),
            deployment: None,
            state_type: t.clone(),
            state_name: n.clone(),
        });
    }
    exp.deployments = vec![a, c];
    exp.recompute();
    assert_eq!(exp.by_state, standard_counts(), "seeding bookkeeping");
    seed_ops(api, &mut exp);
    verify_counts(api, &exp);
    exp
}

/// Asserts that the server counts exactly `exp` (total and per state name), so a
/// later mismatch is the exporter's, not the seeding's.
pub fn verify_counts(api: &Api, exp: &Expected) {
    let total = api.count_flow_runs(&json!({}));
    assert_eq!(total, exp.total, "server total after seeding");
    let mut by_name: BTreeMap<&str, u64> = BTreeMap::new();
    for ((_, n), c) in &exp.by_state {
        *by_name.entry(n.as_str()).or_default() += c;
    }
    for (name, count) in by_name {
        assert_eq!(
            api.count_by_names(&[name]),
            count,
            "server count of state {name}"
        );
    }
}

// ---------------------------------------------------------------------------
// Raw HTTP client (for the exporter and the stub)
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request with `Connection: close`; reads the whole answer
/// (chunked bodies decoded). Timeouts: connect 5 s, read 10 s.
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let sock: SocketAddr = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("cannot resolve {addr}")))?;
    let mut stream = TcpStream::connect_timeout(&sock, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PUT" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw, method == "HEAD")
}

fn parse_response(raw: &[u8], head: bool) -> std::io::Result<HttpResponse> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let end = find(raw, b"\r\n\r\n").ok_or_else(|| bad("no end of headers"))?;
    let head_text = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head_text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(&format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
    });
    if chunked && !head {
        body = decode_chunked(&body).ok_or_else(|| bad("bad chunked body"))?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn decode_chunked(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = find(data, b"\r\n")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

// ---------------------------------------------------------------------------
// Prometheus text format
// ---------------------------------------------------------------------------

/// Parses the text exposition format into `series -> value`, where the series is
/// the metric name with its labels exactly as printed (`name{a="x",b="y"}`).
/// The sum of every series of a labelled family in a parsed scrape.
pub fn family_sum(m: &HashMap<String, f64>, family: &str) -> f64 {
    let prefix = format!("{family}{{");
    m.iter()
        .filter(|(k, _)| k.starts_with(&prefix))
        .map(|(_, v)| v)
        .sum()
}

pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, rest) = match line.find('{') {
            Some(open) if line[..open].chars().all(|c| !c.is_whitespace()) => {
                // Find the closing brace outside quoted label values.
                let mut in_quotes = false;
                let mut escaped = false;
                let mut close = None;
                for (i, c) in line.char_indices().skip(open) {
                    match c {
                        _ if escaped => escaped = false,
                        '\\' if in_quotes => escaped = true,
                        '"' => in_quotes = !in_quotes,
                        '}' if !in_quotes => {
                            close = Some(i);
                            break;
                        }
                        _ => {}
                    }
                }
                match close {
                    Some(c) => (&line[..=c], &line[c + 1..]),
                    None => continue,
                }
            }
            _ => match line.split_once(char::is_whitespace) {
                Some((s, r)) => (s, r),
                None => continue,
            },
        };
        if let Some(v) = rest.split_whitespace().next().and_then(parse_value) {
            out.insert(series.to_string(), v);
        }
    }
    out
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

// ---------------------------------------------------------------------------
// Exporter
// ---------------------------------------------------------------------------

type Buffer = Arc<Mutex<String>>;

fn capture<R: Read + Send + 'static>(mut src: R, buf: Buffer) -> JoinHandle<()> {
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
fn exporter_command(
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

const EXPORTER_DEFAULTS: &[(&str, &str)] = &[
    ("EXPORTER_PORT", "0"),
    ("EXPORTER_ADDRESS", "127.0.0.1"),
    ("EXPORTER_INTERVAL", "1"),
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

// ---------------------------------------------------------------------------
// Stub: a programmable HTTP/1.1 server
// ---------------------------------------------------------------------------

/// A request as the stub saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// Path with the query string, as sent (`/api/flow_runs/count`).
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (`Value::Null` when empty or not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The path below `/api`, without query string and trailing slash (`/flow_runs/count`).
    pub fn api_path(&self) -> &str {
        let p = self.path.split('?').next().unwrap_or_default();
        let p = p.strip_prefix("/api").unwrap_or(p);
        if p.len() > 1 {
            p.trim_end_matches('/')
        } else {
            p
        }
    }
}

#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(status: u16, v: &Value) -> Response {
        Response::raw(status, "application/json", v.to_string())
    }

    pub fn raw(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: body.into(),
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.into(), value.into()));
        self
    }
}

pub type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// How the stub answers, changeable at any time with [`Stub::set_mode`].
#[derive(Clone)]
pub enum Mode {
    /// Plausible Prefect answers computed from the data (see [`StubData::answer`]).
    Good(StubData),
    /// Any answer you like.
    Handler(Handler),
    /// Every request gets this status with `{"detail":"stub error"}`.
    Status(u16),
    /// 200, `Content-Type: application/json`, a body that is not JSON.
    Garbage,
    /// Reads the request and never answers (until the mode changes or the stub is
    /// dropped; then the connection is closed without an answer).
    Hang,
}

/// The data behind [`Mode::Good`].
#[derive(Clone, Debug)]
pub struct StubData {
    /// Runs per (state_type, state_name).
    pub counts: BTreeMap<(String, String), u64>,
    /// Flows that have at least one deployment.
    pub flows_with_deployments: Vec<String>,
    pub version: String,
}

impl StubData {
    /// The standard counts ([`standard_counts`]); flow-a and flow-c have deployments.
    pub fn standard() -> StubData {
        StubData {
            counts: standard_counts(),
            flows_with_deployments: vec!["flow-a".into(), "flow-c".into()],
            version: "3.9.1".into(),
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }
    pub fn successes(&self) -> u64 {
        sum_names(&self.counts, SUCCESS_NAMES)
    }
    pub fn errors(&self) -> u64 {
        sum_names(&self.counts, ERROR_NAMES)
    }
    pub fn warnings(&self) -> u64 {
        sum_names(&self.counts, WARNING_NAMES)
    }
    pub fn missing(&self, names: &[&str]) -> u64 {
        distinct_names(names)
            .iter()
            .filter(|n| !self.flows_with_deployments.iter().any(|f| f == *n))
            .count() as u64
    }

    /// Adds runs in a state.
    pub fn add(&mut self, state_type: &str, state_name: &str, n: u64) {
        *self
            .counts
            .entry((state_type.into(), state_name.into()))
            .or_default() += n;
    }

    /// The five seed gauges for a check list, as (metric name, value).
    pub fn seed_gauges(&self, check_deployments: &[&str]) -> Vec<(&'static str, f64)> {
        vec![
            ("prefect_flow_runs_total", self.total() as f64),
            ("prefect_flow_runs_successes_total", self.successes() as f64),
            ("prefect_flow_runs_in_error_total", self.errors() as f64),
            ("prefect_flow_runs_in_warning_total", self.warnings() as f64),
            (
                "prefect_missing_deployments_total",
                self.missing(check_deployments) as f64,
            ),
        ]
    }

    /// - `POST /flow_runs/count`: the sum of the counts matching the body's
    ///   `flow_runs.state.name.any_` and/or `flow_runs.state.type.any_` (ANDed;
    ///   other filter keys are ignored);
    /// - `POST /flows/filter`: the asked flows (`flows.name.any_`) that have a
    ///   deployment, honouring `offset`/`limit` (limit > 200 is a 422 like Prefect);
    /// - `POST /flow_runs/history`: one bucket with every (type, name) count;
    /// - `POST /{flows,deployments,work_pools}/count`: 0; other `POST .../filter`: [];
    /// - `GET /admin/version`: the version; `GET /health`: true; `GET /version`: "0.8.4";
    ///   `GET /csrf-token`: 422 "CSRF protection is disabled.";
    /// - anything else: 404 `{"detail":"Not Found"}`.
    pub fn answer(&self, req: &Request) -> Response {
        let body = req.json();
        let path = req.api_path();
        match (req.method.as_str(), path) {
            ("POST", "/flow_runs/count") => {
                let names = string_list(&body["flow_runs"]["state"]["name"]["any_"]);
                let types = string_list(&body["flow_runs"]["state"]["type"]["any_"]);
                let n: u64 = self
                    .counts
                    .iter()
                    .filter(|((t, n), _)| {
                        names.as_ref().is_none_or(|l| l.contains(n))
                            && types.as_ref().is_none_or(|l| l.contains(t))
                    })
                    .map(|(_, c)| c)
                    .sum();
                Response::json(200, &json!(n))
            }
            ("POST", "/flows/filter") => {
                let limit = body["limit"].as_u64().unwrap_or(200);
                if limit > 200 {
                    return Response::json(
                        422,
                        &json!({"detail": "Invalid limit: must be less than or equal to 200."}),
                    );
                }
                let offset = body["offset"].as_u64().unwrap_or(0) as usize;
                let asked = string_list(&body["flows"]["name"]["any_"]);
                let found: Vec<Value> = self
                    .flows_with_deployments
                    .iter()
                    .filter(|f| asked.as_ref().is_none_or(|l| l.contains(*f)))
                    .skip(offset)
                    .take(limit as usize)
                    .map(|f| json!({ "id": fake_uuid(f), "name": f, "tags": [], "labels": {} }))
                    .collect();
                Response::json(200, &Value::Array(found))
            }
            ("POST", "/flow_runs/history") => {
                let states: Vec<Value> = self
                    .counts
                    .iter()
                    .map(|((t, n), c)| {
                        json!({ "state_type": t, "state_name": n, "count_runs": c,
                                "sum_estimated_run_time": 0.0, "sum_estimated_lateness": 0.0 })
                    })
                    .collect();
                Response::json(
                    200,
                    &json!([{
                        "interval_start": body["history_start"],
                        "interval_end": body["history_end"],
                        "states": states,
                    }]),
                )
            }
            ("POST", p) if p.ends_with("/count") => Response::json(200, &json!(0)),
            ("POST", p) if p.ends_with("/filter") => Response::json(200, &json!([])),
            ("GET", "/admin/version") => Response::json(200, &json!(self.version)),
            ("GET", "/health") => Response::json(200, &json!(true)),
            ("GET", "/version") => Response::json(200, &json!("0.8.4")),
            ("GET", "/csrf-token") => {
                Response::json(422, &json!({ "detail": "CSRF protection is disabled." }))
            }
            _ => Response::json(404, &json!({ "detail": "Not Found" })),
        }
    }
}

fn string_list(v: &Value) -> Option<Vec<String>> {
    v.as_array().map(|a| {
        a.iter()
            .filter_map(|s| s.as_str().map(String::from))
            .collect()
    })
}

fn fake_uuid(seed: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    format!(
        "{:08x}-0000-4000-8000-{:012x}",
        h >> 32,
        h & 0xffff_ffff_ffff
    )
}

struct StubState {
    mode: Mutex<(Mode, u64)>,
    changed: Condvar,
    requests: Mutex<Vec<Request>>,
    shutdown: AtomicBool,
}

/// A programmable HTTP/1.1 server on 127.0.0.1 (keep-alive supported), stopped on drop.
pub struct Stub {
    addr: SocketAddr,
    state: Arc<StubState>,
    accept: Option<JoinHandle<()>>,
}

impl Stub {
    pub fn start(mode: Mode) -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("stub: bind");
        let addr = listener.local_addr().expect("stub: addr");
        let state = Arc::new(StubState {
            mode: Mutex::new((mode, 0)),
            changed: Condvar::new(),
            requests: Mutex::new(Vec::new()),
            shutdown: AtomicBool::new(false),
        });
        let st = state.clone();
        let accept = thread::spawn(move || {
            for conn in listener.incoming() {
                if st.shutdown.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(stream) = conn {
                    let st = st.clone();
                    thread::spawn(move || serve_connection(stream, st));
                }
            }
        });
        Stub {
            addr,
            state,
            accept: Some(accept),
        }
    }

    /// A stub answering [`StubData::standard`].
    pub fn standard() -> Stub {
        Stub::start(Mode::Good(StubData::standard()))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/api` (use as PREFECT_API_URL).
    pub fn api_url(&self) -> String {
        format!("http://{}/api", self.addr)
    }

    /// Changes how later (and hanging) requests are answered.
    pub fn set_mode(&self, mode: Mode) {
        let mut guard = self.state.mode.lock().unwrap_or_else(|e| e.into_inner());
        guard.0 = mode;
        guard.1 += 1;
        self.state.changed.notify_all();
    }

    /// Every request seen so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.state
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn request_count(&self) -> usize {
        self.state
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub fn clear_requests(&self) {
        self.state
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Waits until at least `n` requests were seen in total; returns them.
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> Vec<Request> {
        poll(timeout, Duration::from_millis(20), || {
            let reqs = self.requests();
            (reqs.len() >= n).then_some(reqs)
        })
        .unwrap_or_else(|| {
            panic!(
                "stub: fewer than {n} requests within {timeout:?}: {:?}",
                self.requests()
            )
        })
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.state.shutdown.store(true, Ordering::SeqCst);
        {
            let _g = self.state.mode.lock().unwrap_or_else(|e| e.into_inner());
            self.state.changed.notify_all();
        }
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Reads one request from `stream` (with `buf` holding bytes already read).
/// None on EOF, error or shutdown.
fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>, st: &StubState) -> Option<Request> {
    let mut chunk = [0u8; 8192];
    let mut fill = |buf: &mut Vec<u8>| -> Option<()> {
        loop {
            if st.shutdown.load(Ordering::SeqCst) {
                return None;
            }
            match stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    return Some(());
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(_) => return None,
            }
        }
    };
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i;
        }
        fill(buf)?;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    buf.drain(..head_end + 4);
    let body = if header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        loop {
            if let Some(end) = find(buf, b"0\r\n\r\n") {
                if let Some(decoded) = decode_chunked(&buf[..end + 5]) {
                    buf.drain(..end + 5);
                    break decoded;
                }
            }
            fill(buf)?;
        }
    } else {
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < len {
            fill(buf)?;
        }
        buf.drain(..len).collect()
    };
    Some(Request {
        method,
        path,
        headers,
        body,
        at: Instant::now(),
    })
}

fn serve_connection(mut stream: TcpStream, st: Arc<StubState>) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut stream, &mut buf, &st) {
        st.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(req.clone());
        let (mode, generation) = st.mode.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let resp = match mode {
            Mode::Good(data) => data.answer(&req),
            Mode::Handler(h) => h(&req),
            Mode::Status(code) => Response::json(code, &json!({ "detail": "stub error" })),
            Mode::Garbage => Response::raw(200, "application/json", "<html>this is not JSON{"),
            Mode::Hang => {
                let mut guard = st.mode.lock().unwrap_or_else(|e| e.into_inner());
                while guard.1 == generation && !st.shutdown.load(Ordering::SeqCst) {
                    guard = st.changed.wait(guard).unwrap_or_else(|e| e.into_inner());
                }
                return; // close without answering
            }
        };
        let close = req
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let mut out = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
        for (k, v) in &resp.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str(&format!("Content-Length: {}\r\n", resp.body.len()));
        if close {
            out.push_str("Connection: close\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if req.method != "HEAD" {
            bytes.extend_from_slice(&resp.body);
        }
        if stream.write_all(&bytes).is_err() || close {
            return;
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

// ---------------------------------------------------------------------------
// Issue 4 additions: a server on a port chosen before it starts (Prefect not yet
// up when the exporter starts) and credential rotation (a real 401 that ends).
// ---------------------------------------------------------------------------

impl PrefectServer {
    /// Starts a fresh server on `port` (e.g. one an exporter already points at);
    /// panics if the port is taken or the server does not become healthy.
    pub fn start_on(port: u16, opts: ServerOptions) -> PrefectServer {
        assert!(
            prefect_available(),
            "Prefect is not available (the test should start with support::require_prefect!())"
        );
        let template = {
            let _g = TEMPLATE_MUTEX.lock().unwrap_or_else(|e| e.into_inner());
            template_dir()
        };
        let home = TempDir::new("prefect-home");
        let home_path = home.path().to_path_buf();
        std::mem::forget(home); // owned by the PrefectServer from here on
        if let Some(t) = &template {
            for f in TEMPLATE_FILES {
                if t.join(f).exists() {
                    fs::copy(t.join(f), home_path.join(f)).expect("copy template database");
                }
            }
        }
        let mut child = launch_server(&home_path, port, &opts, true);
        match wait_healthy(&mut child, &home_path, port) {
            Ok(_) => {
                let pid = child.id() as i32;
                PrefectServer {
                    port,
                    home: home_path,
                    opts,
                    child: Mutex::new(Some(child)),
                    pid: AtomicI32::new(pid),
                }
            }
            Err(StartError::PortInUse(log)) | Err(StartError::Failed(log)) => {
                terminate(&mut child, Duration::from_secs(5));
                let _ = fs::remove_dir_all(&home_path);
                panic!("prefect server on port {port} did not start:\n{log}");
            }
        }
    }

    /// The auth string the server requires from its next [`restart`](Self::restart)
    /// on (`None`: no auth); data and port are kept.
    pub fn set_auth_string(&mut self, auth: Option<&str>) {
        self.opts.auth_string = auth.map(String::from);
    }
}
