//! Starting afresh in the same process: `exec` of the exporter's own binary,
//! with the listening socket kept open across it.
//!
//! Some of what tiny_http holds can never be given back from outside it: a
//! connection thread deadlocked on an HTTP/2 request line (it waits for a
//! writer its own stack holds), a request whose unread body it would drain by
//! allocating the whole announced length at once, the capacity of a queue that
//! once held a flood of pipelined requests. `exec` frees all of it, keeps the
//! PID (the exporter may be PID 1 in a container, and a supervisor sees no
//! restart) and keeps the port: connections that arrive meanwhile wait in the
//! socket's backlog, none is refused.
//!
//! What resets: every series starts again from the first collection of the new
//! image (counters from 0, which `rate()` takes as a reset); the process start
//! time stays. The listening socket is handed over the way systemd's socket
//! activation hands one (descriptor 3, `LISTEN_FDS=1`, `LISTEN_PID` = this PID),
//! so the new image needs nothing of its own to take it.

use std::ffi::CString;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;

/// The first descriptor of socket activation.
const LISTEN_FD: libc::c_int = 3;
/// How many times this process started afresh: carried across `exec` so the
/// log can say which time it is.
const HEALS: &str = "PREFECT_EXPORTER_HEALS";

/// The listening socket handed over by a previous image of this process (or by
/// systemd), if any. Clears the variables, so nothing started later sees them.
pub fn inherited_listener() -> Option<TcpListener> {
    let fds = std::env::var("LISTEN_FDS").ok();
    let pid = std::env::var("LISTEN_PID").ok();
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_PID");
    if fds.as_deref() != Some("1") || pid.and_then(|p| p.parse().ok()) != Some(std::process::id()) {
        return None;
    }
    // SAFETY: socket activation passes descriptor 3 to this process alone, and
    // nothing here has opened or taken it yet (this runs before any socket).
    let listener = unsafe { TcpListener::from_raw_fd(LISTEN_FD) };
    // A descriptor that is not a listening TCP socket is not ours to use.
    match listener.local_addr() {
        Ok(_) => {
            set_cloexec(LISTEN_FD, true).ok()?;
            Some(listener)
        }
        Err(_) => {
            std::mem::forget(listener);
            None
        }
    }
}

/// How many times this process has started afresh so far.
pub fn heals_so_far() -> u64 {
    std::env::var(HEALS)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Replaces this process's image with a new one of the same binary, arguments
/// and environment, handing `listener` over. Returns only on failure.
pub fn exec_again(listener: &TcpListener) -> io::Error {
    let fd = listener.as_raw_fd();
    // Descriptor 3 may hold anything of ours (it is closed by exec anyway, as
    // every descriptor here is close-on-exec); the listener takes its place.
    if fd != LISTEN_FD {
        // SAFETY: dup2 closes whatever 3 was and makes it the listener; the
        // copy is not close-on-exec.
        if unsafe { libc::dup2(fd, LISTEN_FD) } < 0 {
            return io::Error::last_os_error();
        }
    } else if let Err(e) = set_cloexec(LISTEN_FD, false) {
        return e;
    }
    // The binary's own path keeps the process name. When that file is no
    // longer the running binary (replaced by an upgrade, or removed), the new
    // image is still the running one, through /proc/self/exe.
    let running = std::fs::metadata("/proc/self/exe").ok();
    let binary = std::env::current_exe()
        .ok()
        .filter(|path| {
            let same = |a: &std::fs::Metadata, b: &std::fs::Metadata| {
                (a.dev(), a.ino()) == (b.dev(), b.ino())
            };
            matches!((std::fs::metadata(path).ok(), &running), (Some(a), Some(b)) if same(&a, b))
        })
        .unwrap_or_else(|| "/proc/self/exe".into());
    // execve by hand rather than std's `Command`, whose process spawning
    // machinery this one call does not need (about 30 kB of static binary).
    let cstring = |b: Vec<u8>| CString::new(b).ok();
    let handed = [
        ("LISTEN_FDS".to_string(), "1".to_string()),
        ("LISTEN_PID".to_string(), std::process::id().to_string()),
        (HEALS.to_string(), (heals_so_far() + 1).to_string()),
    ];
    let args: Option<Vec<CString>> = std::env::args_os().map(|a| cstring(a.into_vec())).collect();
    let env: Option<Vec<CString>> = std::env::vars_os()
        .filter(|(k, _)| !handed.iter().any(|(h, _)| k.as_bytes() == h.as_bytes()))
        .map(|(k, v)| cstring([k.as_bytes(), b"=", v.as_bytes()].concat()))
        .chain(
            handed
                .iter()
                .map(|(k, v)| cstring(format!("{k}={v}").into_bytes())),
        )
        .collect();
    let (Some(path), Some(args), Some(env)) =
        (cstring(binary.into_os_string().into_vec()), args, env)
    else {
        return io::Error::other("an argument or variable holds a NUL byte");
    };
    let pointers = |v: &[CString]| -> Vec<*const libc::c_char> {
        v.iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect()
    };
    let (argv, envp) = (pointers(&args), pointers(&env));
    // SAFETY: path, argv and envp are NUL-terminated strings and
    // null-terminated arrays that live until the call, which returns only on
    // failure.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    io::Error::last_os_error()
}

fn set_cloexec(fd: libc::c_int, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD read and set the descriptor's flags only.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if on {
            flags | libc::FD_CLOEXEC
        } else {
            flags & !libc::FD_CLOEXEC
        };
        if libc::fcntl(fd, libc::F_SETFD, flags) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
