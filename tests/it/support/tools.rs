//! Outside tools the tests run (promtool, prometheus, podman, systemd-analyze, ...).

use super::*;

/// True when `sh` finds `tool` (`command -v`).
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The executable `name` from PATH (or /usr/bin). None, after a visible skip
/// message naming `test`, when it is missing; under CI=true a missing tool fails
/// the test.
pub fn tool(name: &str, test: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push(PathBuf::from("/usr/bin"));
    let found = dirs.into_iter().map(|d| d.join(name)).find(|p| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    });
    if found.is_none() {
        assert!(
            !is_ci(),
            "{test}: `{name}` not found (CI=true: install Debian's `prometheus` package; scripts/test.sh does)"
        );
        eprintln!("SKIPPED {test}: `{name}` not found (install Debian's `prometheus` package)");
    }
    found
}

/// `promtool check metrics` on `text`: its exit code and its report (stdout and
/// stderr). promtool prints one finding per line, "<metric> <text>", and exits 3
/// when it found any (1 is a failure to read or parse the input).
pub fn promtool_check_metrics(promtool: &Path, text: &str) -> (Option<i32>, String) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", promtool.display()));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write /metrics to promtool");
    let out = child.wait_with_output().expect("promtool check metrics");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), report)
}

/// `monitoring/`: the alert rules, their unit tests and the dashboard.
pub fn monitoring_dir() -> PathBuf {
    project_root().join("monitoring")
}
