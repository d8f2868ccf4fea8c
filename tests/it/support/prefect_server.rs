//! A real Prefect server: the project venv, a free loopback port, a temporary
//! `PREFECT_HOME` copied from a migrated template database, the shared
//! server, `require_prefect!`, and servers started on a chosen port.

use super::*;

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

pub(crate) fn ensure_venv() -> Result<(), String> {
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

pub(crate) const START_DEADLINE: Duration = Duration::from_secs(120);

pub(crate) fn server_env(cmd: &mut Command, home: &Path, opts: &ServerOptions) {
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
pub(crate) fn launch_server(home: &Path, port: u16, opts: &ServerOptions, cleanup: bool) -> Child {
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

pub(crate) enum StartError {
    PortInUse(String),
    Failed(String),
}

/// Waits for `GET /api/health` to answer 200 `true` while the process lives.
pub(crate) fn wait_healthy(
    child: &mut Child,
    home: &Path,
    port: u16,
) -> Result<Duration, StartError> {
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
pub(crate) fn prefect_dist_key() -> String {
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

pub(crate) const TEMPLATE_FILES: &[&str] = &["prefect.db", "memo_store.toml"];

/// A migrated, checkpointed database (plus the block-registration memo) made once
/// per machine and Prefect version under `target/prefect-template/`, guarded by a
/// file lock. Each new server copies it and skips migrations (~4 s instead of ~12 s).
/// `PREFECT_TEST_NO_TEMPLATE=1` turns it off (cold starts, for measurements).
pub(crate) fn template_dir() -> Option<PathBuf> {
    static TEMPLATE: OnceLock<Option<PathBuf>> = OnceLock::new();
    TEMPLATE.get_or_init(build_template).clone()
}

pub(crate) fn build_template() -> Option<PathBuf> {
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

/// Servers start one at a time: a start takes a core for seconds (Python
/// imports, the app's start-up), and tests that begin together would otherwise
/// start theirs together, slowing the collections of every test running then.
fn one_start_at_a_time() -> MutexGuard<'static, ()> {
    static STARTING: Mutex<()> = Mutex::new(());
    STARTING.lock().unwrap_or_else(|p| p.into_inner())
}

/// In-process serialisation of template building (the file lock covers processes).
pub(crate) static TEMPLATE_MUTEX: Mutex<()> = Mutex::new(());

/// A new `PREFECT_HOME` holding a copy of the template database (if there is
/// one), to be owned (and removed) by a [`PrefectServer`].
fn new_home() -> PathBuf {
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
    home_path
}

impl PrefectServer {
    /// Starts a fresh server (panics when it cannot; call `require_prefect!()` first).
    pub fn start(opts: ServerOptions) -> PrefectServer {
        let mut last_err = String::new();
        for _attempt in 0..3 {
            let home_path = new_home();
            let port = free_port();
            let starting = one_start_at_a_time();
            let mut child = launch_server(&home_path, port, &opts, true);
            let ready = wait_healthy(&mut child, &home_path, port);
            drop(starting);
            match ready {
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

    /// The server shared by all tests of the binary: started once, seeded with
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
    pub(crate) fn stop_at_exit(&self) {
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

pub(crate) struct Shared {
    server: PrefectServer,
    expected: Expected,
}

pub(crate) static SHARED: OnceLock<Result<Shared, String>> = OnceLock::new();

pub(crate) fn shared_state() -> &'static Shared {
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
// Issue 4 additions: a server on a port chosen before it starts (Prefect not yet
// up when the exporter starts) and credential rotation (a real 401 that ends).
// ---------------------------------------------------------------------------

impl PrefectServer {
    /// Starts a fresh server on `port` (e.g. one an exporter already points at);
    /// panics if the port is taken or the server does not become healthy.
    pub fn start_on(port: u16, opts: ServerOptions) -> PrefectServer {
        let home_path = new_home();
        let starting = one_start_at_a_time();
        let mut child = launch_server(&home_path, port, &opts, true);
        let ready = wait_healthy(&mut child, &home_path, port);
        drop(starting);
        match ready {
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
