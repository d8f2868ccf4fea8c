//! The HTTP side: tiny_http, answered on the main thread. Every answer comes
//! from memory (`Metrics`), so a slow or dead Prefect never slows a scrape.
//!
//! tiny_http has no limits of its own, so the robustness lives around it:
//! - the listening socket is ours, with `TCP_NODELAY` and `SO_SNDTIMEO`; Linux
//!   gives every accepted socket the listener's options, so small answers leave
//!   at once and a blocked write fails after `WRITE_TIMEOUT`. It has no
//!   `SO_RCVTIMEO`: on a listener that also bounds `accept()`, and tiny_http's
//!   accept loop ends on the first accept error, which stranded every
//!   keep-alive connection of the old server after 30 s without a new one;
//! - idle connections are closed from outside tiny_http instead
//!   (`connections`: after `READ_TIMEOUT` without data either way);
//! - a client whose answer could not be written in time gets no second chance to
//!   hold the main thread: its later (pipelined) requests are discarded unanswered;
//! - a request with a body that tiny_http would drain when it is dropped (a
//!   large `Content-Length`, `Expect: 100-continue`) never reaches the main
//!   thread's drop: it is refused on a thread of its own (`refuse`);
//! - tiny_http's accept thread ends for good on an accept error (EMFILE) and
//!   panics when a `try_clone` of an accepted socket fails: either way a new
//!   `Server` is started on a clone of the listener, and the old one is still
//!   read until its connections are gone, so running out of file descriptors
//!   never stops the exporter for longer than the shortage;
//! - what tiny_http can never give back (a connection deadlocked on an HTTP/2
//!   request line, a request it would drain by allocating its whole announced
//!   body, a queue grown by a flood) is freed by starting afresh (`heal`);
//! - one malloc arena (set in `main`) and `malloc_trim` once a second give back
//!   what the connection threads of an attack allocated.
//!
//! What tiny_http cannot bound (the length of a header line, the number of
//! connection threads, its queue of parsed requests) is measured in
//! docs/operations.md, section "Hostile clients".

mod connections;
mod heal;

pub use connections::raise_descriptor_limit;

use std::cell::Cell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown as Close, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tiny_http::{Header, Method, Request, Response, Server, StatusCode};

use crate::metrics::{Metrics, Readiness, CONTENT_TYPE};

/// A connection with no data either way for this long is shut down (its
/// tiny_http thread then reads end of file and closes it, without an answer).
/// Longer than the usual 15 s scrape interval, so Prometheus keeps reusing its
/// connection; a client that scrapes less often opens a new one, as Go's and
/// curl's clients do when the server closed an idle connection.
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
/// A connection whose request has waited unread this long has no thread:
/// tiny_http's pool queues a connection that comes while a thread it woke has
/// not yet taken the previous one, instead of starting a thread, and the
/// queued one waits until a thread is free, which a kept connection may never
/// make it.
const UNSERVED_AFTER: Duration = Duration::from_secs(1);
/// Connections to ourselves made at most per look, for connections waiting:
/// each takes the first one queued, which may be ahead of a scrape (an HTTP/2
/// preface of a flood, whose thread then deadlocks too).
const WAKES_AT_MOST: usize = 1024;
/// How often the connections are looked at (idle ones closed, stuck ones
/// counted): a directory listing and five system calls per connection.
const WATCH_EVERY: Duration = Duration::from_secs(2);
/// A connection that has begun to close but is still open after this long is
/// held by a tiny_http thread that will never close it. tiny_http closes a
/// finished connection at once; the longest it may wait is the main thread
/// writing to a client that does not read (twice `WRITE_TIMEOUT`).
const STUCK_AFTER: Duration = Duration::from_secs(10);
/// tiny_http's queue of parsed requests has no bound and never shrinks: a
/// client that pipelines a flood faster than it is answered (or than the main
/// thread gives up on it) grows it by about 200 bytes a request, for good.
/// Requests answered in a row without the queue running empty, past which
/// the queue may have grown that much.
const FLOOD: u64 = 10_000;
/// Resident memory that stays this far above its lowest of the minute before
/// such a flood is that queue, given back by starting afresh.
const FLOOD_KEPT: u64 = 4 << 20;
/// Looks whose resident memory the flood is compared with.
const RECENT_LOOKS: usize = 30;
/// Looks in a row that see it, with no more than `QUIET` connections open:
/// the flood is over, and few connections are cut.
const FLOOD_LOOKS: u32 = 3;
const QUIET: usize = 8;
/// Threads beyond one per open connection: the exporter's own (main,
/// collector, signals, refuser, a DNS look-up), tiny_http's accept thread and
/// the 4 idle ones its pool keeps, and a margin. More, on `SPARE_LOOKS` looks
/// in a row (longer than the 5 s an idle pool thread waits before it ends),
/// are pool threads that tiny_http's pool left waiting for good (it does, when
/// a thousand connections end at once).
const SPARE_THREADS: u64 = 12;
const SPARE_LOOKS: u32 = 6;
/// While an older server is still read, the current one is waited on this
/// long at a time, so the old server's requests wait no longer than this.
const RETIRED_POLL: Duration = Duration::from_millis(2);
/// Bodies tiny_http drains on drop are refused once the read side is shut
/// (the drain then ends at once); the drain still allocates the whole unread
/// length first, so a longer announced body is never dropped at all.
const DRAIN_AT_MOST: usize = 64 << 20;
/// Repeated server restarts are logged at WARN at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// How long the address of a client that did not take its answer is remembered.
/// A new connection from the very same address and port within that time would
/// be discarded too, which needs the client's ephemeral ports to wrap around.
const STALLED_FOR: Duration = Duration::from_secs(300);
const STALLED_MAX: usize = 1024;
/// The listen backlog asked for (the kernel takes at most net.core.somaxconn).
const BACKLOG: libc::c_int = 4096;
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
/// descriptors run out or no thread can be started.
static TINY_HTTP_PANICKED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Set while this thread is inside tiny_http (starting a server spawns its
    /// accept thread, which panics when no thread can be started).
    static IN_TINY_HTTP: Cell<bool> = const { Cell::new(false) };
}

/// The listening socket a previous image of this process handed over (see
/// `heal`), with its options set again.
pub fn inherited() -> Option<Result<(TcpListener, SocketAddr), String>> {
    let listener = heal::inherited_listener()?;
    let bound = listener.local_addr().map_err(|e| e.to_string());
    Some(bound.and_then(|bound| {
        set_options(&listener).map_err(|e| format!("{bound}: socket options: {e}"))?;
        log::info!(
            "started afresh in the same process (time {}), on the same socket",
            heal::heals_so_far()
        );
        Ok((listener, bound))
    }))
}

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
/// No receive timeout: on the listener it would bound `accept()` too.
fn set_options(listener: &TcpListener) -> io::Result<()> {
    let fd = listener.as_raw_fd();
    set_option(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, &1 as &libc::c_int)?;
    set_option(
        fd,
        libc::SOL_SOCKET,
        libc::SO_SNDTIMEO,
        &timeval(WRITE_TIMEOUT),
    )?;
    // std listens with a backlog of 128. A burst of connections (a flood, or
    // a restart of many clients at once) that overflows it makes the kernel
    // drop handshakes, and a scrape caught in it waits for the retransmissions
    // (1, 3, 7 s...). The kernel caps this at net.core.somaxconn, as Go asks.
    // SAFETY: listen on a listening socket only changes its backlog.
    if unsafe { libc::listen(fd, BACKLOG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
        if std::thread::current().name().is_none() || IN_TINY_HTTP.with(Cell::get) {
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
    let port = listener.local_addr().map_or(0, |a| a.port());
    // Where a connection to ourselves goes: the listener's address, or
    // loopback when it listens on every interface.
    let wake_to = listener.local_addr().ok().map(|mut a| {
        if a.ip().is_unspecified() {
            a.set_ip(match a {
                SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        a
    });
    let mut restarts = Throttle(None);
    let Some(server) = start(listener, shutdown, &mut restarts) else {
        return;
    };
    let mut servers = Servers {
        current: server,
        retired: Vec::new(),
    };
    let mut http = Http {
        metrics,
        port,
        stalled: Stalled::default(),
        joined: Joined::default(),
        refuser: None,
        in_a_row: 0,
    };
    let mut watch = Watch::default();
    // The level before any flood, should one come before the first look.
    watch.resident.extend(crate::process::read().resident_bytes);
    let mut last_tick = Instant::now();
    while !shutdown.requested() {
        let wait = if servers.retired.is_empty() {
            TICK
        } else {
            RETIRED_POLL
        };
        // Whether the queue ran empty, before waiting on it.
        let next = match servers.current.try_recv() {
            Ok(None) => {
                http.in_a_row = 0;
                servers.current.recv_timeout(wait)
            }
            other => other,
        };
        let mut broken = match next {
            Ok(Some(request)) => {
                http.answer(request);
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
        servers.read_retired(&mut http);
        if http.in_a_row == FLOOD {
            watch.flooded();
        }
        if TINY_HTTP_PANICKED.swap(false, Ordering::SeqCst) {
            restarts.warn(
                "an HTTP server thread panicked (out of file descriptors or threads?); \
                 starting a new server",
            );
            broken = true;
        }
        if broken {
            *shutdown.lock() = None;
            // While descriptors stay exhausted a new server fails at once: no
            // storm of servers (each starts five threads).
            std::thread::sleep(RETRY);
            match start(listener, shutdown, &mut restarts) {
                Some(s) => servers.replace(s),
                None => return,
            }
        }
        if last_tick.elapsed() >= TICK {
            last_tick = Instant::now();
            trim_malloc();
            http.stalled.expire();
            servers.forget_idle();
            if let Some(why) = watch.look(port, wake_to) {
                heal_now(listener, &servers, &mut http, &why);
                watch.heal_failed();
            }
        }
    }
}

/// The server accepting connections now, and the older ones whose accept
/// thread has ended but whose connections may still send requests: those go
/// to the queue of the server that accepted them, so it is read until it has
/// had no request for longer than an idle connection is kept.
struct Servers {
    current: Arc<Server>,
    retired: Vec<(Arc<Server>, Instant)>,
}

/// More old servers than this are not read (a storm of failed accepts).
const RETIRED_MAX: usize = 16;

impl Servers {
    fn replace(&mut self, new: Arc<Server>) {
        let old = std::mem::replace(&mut self.current, new);
        self.retired.push((old, Instant::now()));
        if self.retired.len() > RETIRED_MAX {
            retire(self.retired.remove(0).0);
        }
    }

    fn read_retired(&mut self, http: &mut Http) {
        for (server, last) in &mut self.retired {
            while let Ok(Some(request)) = server.try_recv() {
                *last = Instant::now();
                http.answer(request);
            }
        }
    }

    fn forget_idle(&mut self) {
        let idle_for = READ_TIMEOUT + 2 * WATCH_EVERY;
        let (gone, kept) = std::mem::take(&mut self.retired)
            .into_iter()
            .partition(|(_, last)| last.elapsed() >= idle_for);
        self.retired = kept;
        for (server, _) in gone {
            retire(server);
        }
    }

    fn all(&self) -> impl Iterator<Item = &Arc<Server>> {
        std::iter::once(&self.current).chain(self.retired.iter().map(|(s, _)| s))
    }
}

/// What answering needs beside the request.
struct Http<'a> {
    metrics: &'a Metrics,
    port: u16,
    stalled: Stalled,
    joined: Joined,
    /// The thread that refuses requests with a body, once one came.
    refuser: Option<mpsc::Sender<(Request, usize)>>,
    /// Requests answered since the queue last ran empty.
    in_a_row: u64,
}

impl Http<'_> {
    fn answer(&mut self, request: Request) {
        self.in_a_row += 1;
        if let Some(length) = drained_on_drop(&request) {
            self.refuse(request, length);
            return;
        }
        let peer = request.remote_addr().copied();
        if peer.is_some_and(|p| self.stalled.contains(&p)) {
            // Dropping an unanswered request would write a 500 (and block again);
            // dropping its writer writes nothing.
            drop(request.into_writer());
            return;
        }
        let reply = route(
            request.method(),
            path_of(request.url()),
            self.metrics,
            &mut self.joined,
        );
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
                self.stalled.insert(p);
            }
        }
    }

    /// Hands the request to the refusing thread, started at the first such
    /// request; without one, the request is kept for good (see `refuse`).
    fn refuse(&mut self, request: Request, length: usize) {
        if self.refuser.is_none() {
            let (tx, rx) = mpsc::channel::<(Request, usize)>();
            let port = self.port;
            let spawned = std::thread::Builder::new()
                .name("http-refuse".into())
                .spawn(move || {
                    for (request, length) in rx {
                        refuse(port, request, length);
                    }
                });
            if spawned.is_ok() {
                self.refuser = Some(tx);
            }
        }
        let unsent = match &self.refuser {
            Some(tx) => tx.send((request, length)).err().map(|e| e.0),
            None => Some((request, length)),
        };
        if let Some((request, _)) = unsent {
            self.refuser = None;
            keep_for_good(self.port, request);
        }
    }
}

/// The body length tiny_http would read and throw away when `request` is
/// dropped, on the dropping thread, for as long as the client takes to send
/// it (`EqualReader::drop`): a `Content-Length` over the 1 kB it reads itself
/// beforehand, or any with `Expect: 100-continue`. `None` when a drop is
/// safe: no body, a small one already read, a chunked one (dropped unread),
/// or `Connection: upgrade` (the stream itself is handed over).
fn drained_on_drop(request: &Request) -> Option<usize> {
    // A scrape has no body: its headers are not looked at.
    let length = request.body_length().filter(|&n| n > 0)?;
    let header = |name: &'static str| {
        request
            .headers()
            .iter()
            .find(|h| h.field.equiv(name))
            .map(|h| h.value.as_str().as_bytes())
    };
    let upgrade = header("Connection")
        .is_some_and(|v| v.windows(7).any(|w| w.eq_ignore_ascii_case(b"upgrade")));
    let drained = length > 1024 || header("Expect").is_some();
    (drained && !upgrade).then_some(length)
}

/// Answers 413 to a request whose body tiny_http would drain, off the main
/// thread. The read side is shut down first, so the drain that follows the
/// answer ends at once, whether the body is trickled or never sent; the
/// connection ends with it.
fn refuse(port: u16, request: Request, length: usize) {
    let Some(peer) = request.remote_addr().copied() else {
        return keep_for_good(port, request);
    };
    if length > DRAIN_AT_MOST
        || !matches!(connections::shut_down(port, peer, Close::Read), Ok(true))
    {
        return keep_for_good(port, request);
    }
    log::debug!("refused a request with a body of {length} bytes from {peer}");
    let reply = Reply {
        close: true,
        ..text(413, "request bodies are not accepted\n")
    };
    let _ = request.respond(reply.response());
}

/// A request that can never be dropped safely: its connection is shut down,
/// so the client sees the end, and the request is never freed. Its tiny_http
/// thread then waits for good, and the connection shows as stuck until the
/// next start afresh (`heal`) frees it.
fn keep_for_good(port: u16, request: Request) {
    if let Some(peer) = request.remote_addr().copied() {
        let _ = connections::shut_down(port, peer, Close::Both);
    }
    log::debug!("dropped a connection whose request announced a body too large to discard");
    std::mem::forget(request);
}

/// The look at the connections every `WATCH_EVERY`: closes idle ones and
/// decides when only starting afresh can give back what tiny_http holds.
#[derive(Default)]
struct Watch {
    last: Option<Instant>,
    /// Connections (by socket inode) seen closing, since when.
    closing: HashMap<u64, Instant>,
    /// Resident memory at the last looks, newest last.
    resident: std::collections::VecDeque<u64>,
    /// The lowest of those before a flood, while the flood's memory may still
    /// be the queue's to give back.
    before_flood: Option<u64>,
    /// Looks in a row with that memory still kept.
    kept_looks: u32,
    /// Looks in a row with more than `SPARE_THREADS` threads to spare.
    spare_looks: u32,
    /// Looks in a row that found requests waiting for a thread.
    unserved_looks: u32,
    /// No new attempt to start afresh before this, after one failed.
    not_before: Option<Instant>,
}

impl Watch {
    fn flooded(&mut self) {
        let low = self.resident.iter().min().copied();
        self.before_flood = low.min(self.before_flood).or(low);
    }

    fn heal_failed(&mut self) {
        self.not_before = Some(Instant::now() + WARN_EVERY);
    }

    /// Why the exporter must start afresh now, if it must.
    fn look(&mut self, port: u16, wake_to: Option<SocketAddr>) -> Option<String> {
        if self.last.is_some_and(|t| t.elapsed() < WATCH_EVERY) {
            return None;
        }
        self.last = Some(Instant::now());
        let (mut open, mut idle, mut unserved) = (0usize, 0usize, 0usize);
        let mut present = Vec::new();
        let looked = connections::each(port, |conn, socket| {
            open += 1;
            present.push(conn.inode);
            // Queued ones count whether or not their client has gone: each
            // is ahead of the next in the pool's queue.
            if conn.unread && conn.since_received >= UNSERVED_AFTER {
                unserved += 1;
            }
            if !conn.established {
                self.closing.entry(conn.inode).or_insert_with(Instant::now);
            } else if conn.idle >= READ_TIMEOUT && socket.shutdown(Close::Both).is_ok() {
                idle += 1;
            }
        });
        if let Err(e) = looked {
            // Out of descriptors: the server restarts tell already.
            log::debug!("cannot look at the HTTP connections: {e}");
            return None;
        }
        if unserved > 0 {
            // Their connections wait in tiny_http's pool for a thread. A
            // connection to ourselves that ends at once makes the pool start
            // (or wake) a thread for it, which then takes the first one
            // waiting. Should that not do, every thread is held for good (a
            // deadlock), and only starting afresh frees one.
            log::debug!("{unserved} HTTP connections wait for a thread of tiny_http's pool");
            // The first failed connection ends the wakes: each may take up to
            // TICK, and every scrape waits on this thread meanwhile.
            for _ in 0..unserved.min(WAKES_AT_MOST) {
                let Some(to) = wake_to else { break };
                match std::net::TcpStream::connect_timeout(&to, TICK) {
                    Ok(s) => drop(s.shutdown(Close::Both)),
                    Err(e) => {
                        log::debug!("cannot connect to {to} to wake a thread: {e}");
                        break;
                    }
                }
            }
            self.unserved_looks += 1;
        } else {
            self.unserved_looks = 0;
        }
        if idle > 0 {
            log::debug!("closed {idle} idle HTTP connections");
        }
        self.closing.retain(|inode, _| present.contains(inode));
        let process = crate::process::read();
        let resident = process.resident_bytes;
        if let Some(r) = resident {
            if self.resident.len() == RECENT_LOOKS {
                self.resident.pop_front();
            }
            self.resident.push_back(r);
        }
        if self.not_before.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        if self.unserved_looks >= 3 {
            return Some(format!(
                "{unserved} HTTP requests wait for a thread, and every thread of tiny_http's \
                 pool is held"
            ));
        }
        let stuck = self
            .closing
            .values()
            .filter(|since| since.elapsed() >= STUCK_AFTER)
            .count();
        if stuck > 0 {
            return Some(format!(
                "{stuck} HTTP connections stay open that tiny_http will never close"
            ));
        }
        let spare = process.threads.map_or(0, |t| t.saturating_sub(open as u64));
        if spare > SPARE_THREADS {
            self.spare_looks += 1;
            if self.spare_looks >= SPARE_LOOKS {
                return Some(format!(
                    "{spare} threads beyond one per connection, which tiny_http keeps for good"
                ));
            }
        } else {
            self.spare_looks = 0;
        }
        let (Some(now), Some(before)) = (resident, self.before_flood) else {
            return None;
        };
        if now <= before + FLOOD_KEPT {
            self.before_flood = None;
            self.kept_looks = 0;
            return None;
        }
        if open <= QUIET {
            self.kept_looks += 1;
        }
        (self.kept_looks >= FLOOD_LOOKS).then(|| {
            format!(
                "resident memory stays {} MB above its level before a flood of pipelined \
                 requests (tiny_http's queue keeps the room they took)",
                (now - before) >> 20
            )
        })
    }
}

/// Answers what is already queued, then starts afresh (returns only if that
/// failed).
fn heal_now(listener: &TcpListener, servers: &Servers, http: &mut Http, why: &str) {
    log::warn!("starting afresh in this process: {why} (same PID and port; counters start again)");
    for server in servers.all() {
        while let Ok(Some(request)) = server.try_recv() {
            http.answer(request);
        }
    }
    let e = heal::exec_again(listener);
    log::warn!("cannot start afresh ({e}); trying again in a minute");
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
            .and_then(|l| {
                // tiny_http starts its accept thread with `thread::spawn`, which
                // panics when no thread can be started.
                IN_TINY_HTTP.with(|f| f.set(true));
                let server = std::panic::catch_unwind(|| Server::from_listener(l, None));
                IN_TINY_HTTP.with(|f| f.set(false));
                match server {
                    Ok(s) => s.map_err(|e| e.to_string()),
                    Err(_) => {
                        // Caught here: not a server to replace.
                        TINY_HTTP_PANICKED.store(false, Ordering::SeqCst);
                        Err("no thread could be started".into())
                    }
                }
            });
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
    /// Tells the client the connection ends after this answer.
    close: bool,
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
        if self.close {
            headers.extend(Header::from_bytes("Connection", "close").ok());
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
            close: false,
        },
        "/" => Reply {
            status: 200,
            content_type: "text/html; charset=utf-8",
            body: Part::Static(INDEX.as_bytes()),
            allow: false,
            close: false,
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
        close: false,
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
        // No receive timeout: on the listener it would end accept() too.
        assert_eq!(accepted.read_timeout().unwrap(), None);
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
    fn requests_whose_drop_would_drain_a_body_are_told_apart() {
        use tiny_http::TestRequest;
        let drained = |headers: &[(&'static str, &'static str)], body: &'static str| {
            let mut t = TestRequest::new().with_path("/metrics").with_body(body);
            for (k, v) in headers {
                t = t.with_header(Header::from_bytes(*k, *v).unwrap());
            }
            drained_on_drop(&Request::from(t))
        };
        let big: &'static str = "x".repeat(2000).leak();
        assert_eq!(drained(&[], ""), None);
        assert_eq!(drained(&[], "small"), None, "read beforehand by tiny_http");
        assert_eq!(drained(&[], big), Some(2000));
        assert_eq!(drained(&[("Expect", "100-continue")], "small"), Some(5));
        assert_eq!(drained(&[("Connection", "Upgrade")], big), None);
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
