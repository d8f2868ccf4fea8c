//! Plumbing every helper shares: signals and child processes (with a watchdog
//! that stops them when the test process dies), project paths, temp folders,
//! free ports, polling.

use super::*;

// ---------------------------------------------------------------------------
// Small OS helpers (libc is always linked by std; no extra crate needed)
// ---------------------------------------------------------------------------

pub(crate) mod sys {
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
pub(crate) struct FileLock(fs::File);

impl FileLock {
    pub(crate) fn acquire(path: &Path) -> FileLock {
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
pub(crate) const WATCHDOG: &str = r#"parent=$1; cleanup=$2; shift 2; me=$$
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
pub(crate) fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
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

/// Every metric family the exporter can show, with its type, from the golden
/// render (`tests/fixtures/golden/metrics.prom`): the one list of families
/// outside `src/`, which the end-to-end lint, the dashboard check and
/// docs/metrics.md are checked against.
pub fn golden_families() -> Vec<(String, String)> {
    let path = project_root().join("tests/fixtures/golden/metrics.prom");
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_string(), kind.to_string()))
        .collect()
}

/// Raises this test process's soft descriptor limit to its hard limit (for the
/// tests that hold a thousand connections), once; asserts room for 2,500.
/// Every process the tests start afterwards inherits it, the exporter too.
pub fn raise_descriptor_limit() {
    static RAISED: OnceLock<u64> = OnceLock::new();
    let limit = *RAISED.get_or_init(|| {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit read and write `limit` only.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
            limit.rlim_cur = limit.rlim_max;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
        limit.rlim_cur
    });
    assert!(limit >= 2500, "descriptor limit {limit}");
}

/// Held for the whole of a test that loads both cores and bounds latencies
/// meanwhile (every test of hostile_clients.rs): no two of them overlap, so that
/// one's load does not count against another's bounds. The many tests that
/// mostly wait on intervals run beside them (scripts/test.sh runs the binary on
/// more threads than cores); loads without bounds of their own (the image build,
/// promtool's rule tests) run at nice 19 instead, taking what the others leave.
pub fn heavy() -> MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY.lock().unwrap_or_else(|p| p.into_inner())
}
