//! Records the source revision for `prefect_exporter_build_info`; builds from a
//! tarball or a container context without `.git` say so instead of failing.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=PREFECT_EXPORTER_REVISION");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs");
    let revision = std::env::var("PREFECT_EXPORTER_REVISION")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(|| {
            Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=PREFECT_EXPORTER_REVISION={revision}");
}
