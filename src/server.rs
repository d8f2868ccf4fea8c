//! The HTTP side: tiny_http, answered on the main thread. Every answer comes
//! from memory (`Metrics`), so a slow or dead Prefect never slows a scrape.
//!
//! tiny_http has no limits of its own, so the robustness lives around it:
//! - the listening socket is ours, with `TCP_NODELAY`, `SO_RCVTIMEO` and
//!   `SO_SNDTIMEO`; Linux gives every accepted socket the listener's options, so
//!   small answers leave at once, a silent client is dropped after `READ_TIMEOUT`
//!   and a blocked write fails after `WRITE_TIMEOUT`;
//! - a client whose answer could not be written in time gets no second chance to
//!   hold the main thread: its later (pipelined) requests are discarded unanswered;
//! - tiny_http's accept thread ends for good on an accept error (EMFILE) and
//!   panics when a `try_clone` of an accepted socket fails: either way a new
//!   `Server` is started on a clone of the listener, so running out of file
//!   descriptors never stops the exporter for longer than the shortage;
//! - one malloc arena (set in `main`) and `malloc_trim` once a second give back
//!   what the connection threads of an attack allocated.
//!
//! What tiny_http cannot bound (the length of a header line, the number of
//! connection threads, its queue of parsed requests) is measured in
//! docs/operations.md, section "Hostile clients".

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tiny_http::{Header, Method, Request, Response, Server, StatusCode};

use crate::metrics::{Metrics, Readiness, CONTENT_TYPE};

/// `SO_RCVTIMEO`: a connection whose client sends nothing for this long is
/// answered 408 and closed by its tiny_http thread. Longer than the usual 15 s
/// scrape interval, so Prometheus keeps reusing its connection.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// `SO_SNDTIMEO`: a write that cannot make progress for this long fails. tiny_http
/// writes an answer in a few writes, so a client that never reads holds the main
/// thread up to about twice this long, once: its later requests are discarded.
/// Short, because every other scrape waits meanwhile (with 2 s, two such clients
/// delayed a scrape past Prometheus's 10 s timeout on a loaded machine); a
/// client that takes nothing from a full socket for a whole second is not
/// scraping.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the loop wakes without requests: `malloc_trim`, expiry of stalled
/// clients, and (as a fallback to `unblock`) the shutdown flag.
const TICK: Duration = Duration::from_secs(1);
/// Repeated server restarts are logged at WARN at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// How long the address of a client that did not take its answer is remembered.
/// A new connection from the very same address and port within that time would
/// be discarded too, which needs the client's ephemeral ports to wrap around.
const STALLED_FOR: Duration = Duration::from_secs(300);
const STALLED_MAX: usize = 1024;
/// Pause between attempts to start a server while descriptors are exhausted.
const RETRY: Duration = Duration::from_millis(100);

const INDEX: &str = concat!(
    "<!DOCTYPE html>\n<html><head><title>Prefect exporter</title></head><body>\n",
    "<h1>Prefect exporter</h1>\n<p>Version ",
    env!("CARGO_PKG_VERSION"),
    "</p>\n<ul>\n<li><a href=\"/metrics\">/metrics</a></li>\n",
    "<li><a href=\"/healthz\">/healthz</a></li>\n<li><a href=\"/readyz\">/readyz</a></li>\n",
    "</ul>\n</body></html>\n"
);

/// Raised by the panic hook when a thread without a name panics: only tiny_http
/// starts such threads (ours are named), and its accept thread panics when the
/// descriptors run out.
static TINY_HTTP_PANICKED: AtomicBool = AtomicBool::new(false);

/// Binds the given address, or by default every interface: IPv6 and IPv4 at once
/// where the host has IPv6, plain IPv4 otherwise. The listener carries the
/// socket options every accepted connection inherits.
pub fn bind(address: Option<IpAddr>, port: u16) -> Result<(TcpListener, SocketAddr), String> {
    let candidates: Vec<IpAddr> = match address {
        Some(a) => vec![a],
        None => vec![
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        ],
    };
    let mut last_error = String::new();
    for ip in candidates {
        let wanted = SocketAddr::new(ip, port);
        match TcpListener::bind(wanted) {
            Ok(listener) => {
                set_options(&listener).map_err(|e| format!("{wanted}: socket options: {e}"))?;
                let bound = listener.local_addr().unwrap_or(wanted);
                return Ok((listener, bound));
            }
            Err(e) => last_error = format!("{wanted}: {e}"),
        }
    }
    Err(last_error)
}

/// Sets the options accepted sockets inherit on Linux (tiny_http never sets any).
fn set_options(listener: &TcpListener) -> io::Result<()> {
    let fd = listener.as_raw_fd();
    set_option(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, &1 as &libc::c_int)?;
    set_option(
        fd,
        libc::SOL_SOCKET,
        libc::SO_RCVTIMEO,
        &timeval(READ_TIMEOUT),
    )?;
    set_option(
        fd,
        libc::SOL_SOCKET,
        libc::SO_SNDTIMEO,
        &timeval(WRITE_TIMEOUT),
    )
}

fn timeval(d: Duration) -> libc::timeval {
    libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    }
}

fn set_option<T>(
    fd: libc::c_int,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` points to a live T whose size is passed along; the kernel
    // only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How the signal side ends the request loop: a flag, and `unblock()` on the
/// server the loop is waiting on (which changes when a server is replaced).
#[derive(Default)]
pub struct Shutdown {
    stop: AtomicBool,
    current: Mutex<Option<Arc<Server>>>,
}

impl Shutdown {
    pub fn request(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(server) = self.lock().as_ref() {
            server.unblock();
        }
    }

    fn requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<Server>>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Logs a recurring problem at WARN at most once per `WARN_EVERY`, at DEBUG
/// otherwise, so an attack cannot flood the log.
struct Throttle(Option<Instant>);

impl Throttle {
    fn warn(&mut self, message: &str) {
        if self.0.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            self.0 = Some(Instant::now());
            log::warn!("{message}");
        } else {
            log::debug!("{message}");
        }
    }
}

/// Panics of tiny_http's (unnamed) threads raise `TINY_HTTP_PANICKED` for the
/// request loop; a panic of one of our own threads still ends the process, as
/// it did when the binary aborted on panic.
fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name().is_none() {
            TINY_HTTP_PANICKED.store(true, Ordering::SeqCst);
            log::debug!("an HTTP connection thread panicked: {info}");
        } else {
            previous(info);
            std::process::abort();
        }
    }));
}

/// The request loop, on the calling (main) thread, until `shutdown` is requested.
pub fn serve(listener: &TcpListener, metrics: &Metrics, shutdown: &Shutdown) {
    install_panic_hook();
    let mut restarts = Throttle(None);
    let Some(mut server) = start(listener, shutdown, &mut restarts) else {
        return;
    };
    let mut stalled = Stalled::default();
    let mut joined = Joined::default();
    let mut last_tick = Instant::now();
    while !shutdown.requested() {
        let mut broken = match server.recv_timeout(TICK) {
            Ok(Some(request)) => {
                answer(request, metrics, &mut stalled, &mut joined);
                false
            }
            Ok(None) => false,
            Err(e) => {
                restarts.warn(&format!(
                    "the HTTP server stopped accepting connections ({e}); starting a new one"
                ));
                true
            }
        };
        if TINY_HTTP_PANICKED.swap(false, Ordering::SeqCst) {
            restarts.warn(
                "an HTTP server thread panicked (out of file descriptors?); starting a new server",
            );
            broken = true;
        }
        if broken {
            *shutdown.lock() = None;
            retire(server);
            // While descriptors stay exhausted a new server fails at once: no
            // storm of servers (each starts five threads).
            std::thread::sleep(RETRY);
            match start(listener, shutdown, &mut restarts) {
                Some(s) => server = s,
                None => return,
            }
        }
        if last_tick.elapsed() >= TICK {
            last_tick = Instant::now();
            trim_malloc();
            stalled.expire();
        }
    }
}

/// Drops a server whose accept thread has ended, on a thread of its own:
/// `Server::drop` connects to the listener to wake its accept thread, and that
/// connect blocks for minutes while the listen backlog is full (as it is when
/// descriptors ran out under a flood of connections).
fn retire(server: Arc<Server>) {
    let (tx, rx) = std::sync::mpsc::channel::<Arc<Server>>();
    let spawned = std::thread::Builder::new()
        .name("http-retire".into())
        .spawn(move || drop(rx.recv()));
    match spawned {
        Ok(_) => {
            let _ = tx.send(server);
        }
        // No thread to spare: leak it (a few hundred bytes) rather than block
        // here; its accept thread has ended, so nothing needs the wake-up.
        Err(_) => std::mem::forget(server),
    }
}

/// A new tiny_http server on a clone of the listener, retried while no
/// descriptor is free; `None` when shutdown was requested meanwhile.
fn start(
    listener: &TcpListener,
    shutdown: &Shutdown,
    restarts: &mut Throttle,
) -> Option<Arc<Server>> {
    loop {
        if shutdown.requested() {
            return None;
        }
        let started = listener
            .try_clone()
            .map_err(|e| e.to_string())
            .and_then(|l| Server::from_listener(l, None).map_err(|e| e.to_string()));
        match started {
            Ok(server) => {
                let server = Arc::new(server);
                *shutdown.lock() = Some(Arc::clone(&server));
                // A request that came before the server was published.
                if shutdown.requested() {
                    return None;
                }
                return Some(server);
            }
            Err(e) => {
                restarts.warn(&format!("cannot start the HTTP server: {e}; retrying"));
                std::thread::sleep(RETRY);
            }
        }
    }
}

/// Gives the pages that freed memory leaves in the heap back to the system:
/// glibc keeps them, so after an attack's connection threads are gone the
/// resident size would stay at its peak.
fn trim_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Clients (address and port, so one connection) that did not take an answer
/// within the write timeout.
#[derive(Default)]
struct Stalled(HashMap<SocketAddr, Instant>);

impl Stalled {
    fn contains(&self, peer: &SocketAddr) -> bool {
        self.0.contains_key(peer)
    }

    fn insert(&mut self, peer: SocketAddr) {
        if self.0.len() >= STALLED_MAX {
            self.0.clear();
        }
        self.0.insert(peer, Instant::now());
    }

    fn expire(&mut self) {
        self.0.retain(|_, since| since.elapsed() < STALLED_FOR);
    }
}

fn answer(request: Request, metrics: &Metrics, stalled: &mut Stalled, joined: &mut Joined) {
    let peer = request.remote_addr().copied();
    if peer.is_some_and(|p| stalled.contains(&p)) {
        // Dropping an unanswered request would write a 500 (and block again);
        // dropping its writer writes nothing.
        drop(request.into_writer());
        return;
    }
    let reply = route(request.method(), path_of(request.url()), metrics, joined);
    log::trace!(
        "{} {} -> {}",
        request.method(),
        printable(request.url()),
        reply.status
    );
    if let Err(e) = request.respond(reply.response()) {
        log::debug!(
            "HTTP client did not take its answer in time ({e}): ignoring its later requests"
        );
        if let Some(p) = peer {
            stalled.insert(p);
        }
    }
}

/// The path of an origin-form (`/metrics?x`) or absolute-form
/// (`http://host/metrics`) target, without query or fragment.
fn path_of(target: &str) -> &str {
    let mut t = target;
    for scheme in ["http://", "https://"] {
        if t.len() >= scheme.len() && t[..scheme.len()].eq_ignore_ascii_case(scheme) {
            let rest = &t[scheme.len()..];
            t = rest.find('/').map_or("/", |i| &rest[i..]);
            break;
        }
    }
    t.find(['?', '#']).map_or(t, |end| &t[..end])
}

/// At most 100 printable characters of client input, for TRACE lines.
fn printable(v: &str) -> String {
    let s: String = v
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(100)
        .collect();
    if v.len() > 100 {
        format!("{s}...")
    } else {
        s
    }
}

/// An answer: status, content type, body, and whether it lists the allowed
/// methods.
struct Reply {
    status: u16,
    content_type: &'static str,
    body: Part,
    allow: bool,
}

enum Part {
    Static(&'static [u8]),
    Owned(Vec<u8>),
    Shared(Arc<Vec<u8>>),
}

impl AsRef<[u8]> for Part {
    fn as_ref(&self) -> &[u8] {
        match self {
            Part::Static(b) => b,
            Part::Owned(b) => b,
            Part::Shared(b) => b,
        }
    }
}

impl Reply {
    /// The body goes to tiny_http as one slice: `io::copy` from a slice is one
    /// `write_all`, so the answer leaves in two writes (head, body) rather than
    /// in 8 KiB pieces.
    fn response(&self) -> Response<&[u8]> {
        let body = self.body.as_ref();
        let mut headers = Vec::with_capacity(2);
        headers.extend(Header::from_bytes("Content-Type", self.content_type).ok());
        if self.allow {
            headers.extend(Header::from_bytes("Allow", "GET, HEAD").ok());
        }
        // A known length always goes out as Content-Length, never chunked.
        Response::new(
            StatusCode(self.status),
            headers,
            body,
            Some(body.len()),
            None,
        )
        .with_chunked_threshold(usize::MAX)
    }
}

/// The /metrics body: the last collection's rendering followed by the process
/// series, joined again only when either changes (once per collection, and at
/// most once a second for the process part), not at every scrape.
#[derive(Default)]
struct Joined {
    /// The collection's and the process part's bytes that `body` joins.
    parts: Option<[Arc<Vec<u8>>; 2]>,
    body: Arc<Vec<u8>>,
}

impl Joined {
    fn metrics(&mut self, metrics: &Metrics) -> Arc<Vec<u8>> {
        let (rendered, process) = (metrics.rendered(), metrics.process_rendered());
        let current = self
            .parts
            .as_ref()
            .is_some_and(|[r, p]| Arc::ptr_eq(r, &rendered) && Arc::ptr_eq(p, &process));
        if !current {
            let mut body = Vec::with_capacity(rendered.len() + process.len());
            body.extend_from_slice(&rendered);
            body.extend_from_slice(&process);
            self.body = Arc::new(body);
            self.parts = Some([rendered, process]);
        }
        Arc::clone(&self.body)
    }
}

fn route(method: &Method, path: &str, metrics: &Metrics, joined: &mut Joined) -> Reply {
    const KNOWN: &[&str] = &["/", "/metrics", "/healthz", "/readyz"];
    if !matches!(method, Method::Get | Method::Head) {
        return if KNOWN.contains(&path) {
            Reply {
                allow: true,
                ..text(405, "method not allowed\n")
            }
        } else {
            text(404, "not found\n")
        };
    }
    match path {
        "/metrics" => Reply {
            status: 200,
            content_type: CONTENT_TYPE,
            body: Part::Shared(joined.metrics(metrics)),
            allow: false,
        },
        "/" => Reply {
            status: 200,
            content_type: "text/html; charset=utf-8",
            body: Part::Static(INDEX.as_bytes()),
            allow: false,
        },
        "/healthz" => text(200, "ok\n"),
        "/readyz" => match metrics.readiness() {
            Readiness::Ready => text(200, "ready\n"),
            Readiness::NotReady(why) => Reply {
                body: Part::Owned(format!("not ready: {why}\n").into_bytes()),
                ..text(503, "")
            },
        },
        _ => text(404, "not found\n"),
    }
}

fn text(status: u16, body: &'static str) -> Reply {
    Reply {
        status,
        content_type: "text/plain; charset=utf-8",
        body: Part::Static(body.as_bytes()),
        allow: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;

    #[test]
    fn accepted_sockets_inherit_the_listener_options() {
        let (listener, addr) = bind(Some(IpAddr::V4(Ipv4Addr::LOCALHOST)), 0).unwrap();
        let _client = TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        // Nothing was set on the accepted socket itself.
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY");
        assert_eq!(accepted.read_timeout().unwrap(), Some(READ_TIMEOUT));
        assert_eq!(accepted.write_timeout().unwrap(), Some(WRITE_TIMEOUT));
        // A plain listener's connections have none of them.
        let plain = TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = TcpStream::connect(plain.local_addr().unwrap()).unwrap();
        let (s, _) = plain.accept().unwrap();
        assert!(!s.nodelay().unwrap());
        assert_eq!(s.read_timeout().unwrap(), None);
        assert_eq!(s.write_timeout().unwrap(), None);
    }

    #[test]
    fn paths_drop_query_fragment_and_absolute_form() {
        assert_eq!(path_of("/metrics?x=1"), "/metrics");
        assert_eq!(path_of("/readyz#top"), "/readyz");
        assert_eq!(path_of("http://host:9/metrics?a"), "/metrics");
        assert_eq!(path_of("HTTPS://host"), "/");
        assert_eq!(path_of("*"), "*");
    }

    #[test]
    fn routes_and_methods() {
        let m = Metrics::new();
        let mut j = Joined::default();
        let mut status = |method: Method, path: &str| route(&method, path, &m, &mut j).status;
        assert_eq!(status(Method::Get, "/metrics"), 200);
        assert_eq!(status(Method::Head, "/metrics"), 200);
        assert_eq!(status(Method::Get, "/healthz"), 200);
        assert_eq!(status(Method::Get, "/"), 200);
        assert_eq!(status(Method::Get, "/readyz"), 503);
        assert_eq!(status(Method::Get, "/nope"), 404);
        let r = route(&Method::Post, "/metrics", &m, &mut Joined::default());
        assert!(r.status == 405 && r.allow);
        assert_eq!(status(Method::Delete, "/nope"), 404);
    }

    #[test]
    fn the_metrics_body_is_joined_again_only_when_a_part_changes() {
        let m = Metrics::new();
        let mut j = Joined::default();
        let first = j.metrics(&m);
        assert_eq!(first.len(), m.rendered().len() + m.process_rendered().len());
        assert!(first.ends_with(&m.process_rendered()));
        // Within the process part's second, the same bytes, not a new copy.
        assert!(Arc::ptr_eq(&first, &j.metrics(&m)));
    }

    #[test]
    fn stalled_clients_expire_and_stay_bounded() {
        let mut s = Stalled::default();
        let a: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        s.insert(a);
        assert!(s.contains(&a));
        s.expire();
        assert!(s.contains(&a), "remembered for STALLED_FOR");
        for port in 0..STALLED_MAX as u16 + 10 {
            s.insert(SocketAddr::new(a.ip(), 2000 + port));
        }
        assert!(s.0.len() <= STALLED_MAX);
    }
}
