//! The HTTP side: a deliberately small HTTP/1.1 server. Every answer comes from
//! memory (`Metrics`), so a slow or dead Prefect never slows a scrape, and every
//! resource a client can make it spend is bounded:
//!
//! - at most `max_connections` connections (one thread each, small stacks); when
//!   full, the connection that has waited longest for its request is closed to
//!   make room, so idle clients can never lock a scraper out;
//! - a request head (request line and headers) is at most `MAX_HEAD` bytes,
//!   read into one fixed buffer: 414/431 beyond it, never a growing buffer;
//! - a request head must arrive within `HEAD_TIMEOUT` of its first byte and an
//!   idle connection is closed after `IDLE_TIMEOUT` (slow-loris clients);
//! - an answer must be written within `WRITE_TIMEOUT`, else the connection is
//!   dropped (clients that never read); one connection's requests are answered
//!   in order on its own thread, so such a client only ever blocks itself;
//! - request bodies are never buffered: a request with one is answered and the
//!   connection closed;
//! - accept errors (file descriptors exhausted) and thread spawn failures are
//!   logged and survived, never fatal.
//!
//! It replaces tiny_http 0.12, which has none of these bounds: unlimited header
//! lines and threads, no timeouts, an unbounded queue that pipelined requests fill,
//! and an accept thread that ends for good on EMFILE (the exporter then exits).

use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::metrics::{Metrics, Readiness, CONTENT_TYPE};
use crate::process;

/// Request line plus headers. Prometheus sends about 300 bytes; browsers and curl
/// well under 2 KiB. nginx's default for one header line is 1 KiB, its large
/// buffers 8 KiB.
pub const MAX_HEAD: usize = 8 * 1024;
/// The whole request head must arrive within this time after its first byte.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no request in progress is closed after this; longer than
/// the 15 s default scrape interval, so Prometheus keeps reusing its connection.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// One whole answer must be written within this time.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections served at once; lowered when the file descriptor limit is
/// low, so the limit is reached before the descriptors run out.
pub const MAX_CONNECTIONS: usize = 512;
/// After an answer that closes the connection, unread input is drained for at
/// most this long (and `LINGER_BYTES`) so the client gets the answer rather than
/// a reset.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 4 * 1024 * 1024;
/// Connection threads only parse a small buffer and write prepared bytes.
const THREAD_STACK: usize = 128 * 1024;
/// Repeated accept or spawn failures are logged at WARN at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

const INDEX: &str = concat!(
    "<!DOCTYPE html>\n<html><head><title>Prefect exporter</title></head><body>\n",
    "<h1>Prefect exporter</h1>\n<p>Version ",
    env!("CARGO_PKG_VERSION"),
    "</p>\n<ul>\n<li><a href=\"/metrics\">/metrics</a></li>\n",
    "<li><a href=\"/healthz\">/healthz</a></li>\n<li><a href=\"/readyz\">/readyz</a></li>\n",
    "</ul>\n</body></html>\n"
);

/// Binds the given address, or by default every interface: IPv6 and IPv4 at once
/// where the host has IPv6, plain IPv4 otherwise.
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
                let bound = listener.local_addr().unwrap_or(wanted);
                return Ok((listener, bound));
            }
            Err(e) => last_error = format!("{wanted}: {e}"),
        }
    }
    Err(last_error)
}

/// Starts the accept loop on its own thread; it serves until the process exits.
pub fn spawn(listener: TcpListener, metrics: Arc<Metrics>) -> io::Result<()> {
    let max = connection_limit();
    log::debug!("serving at most {max} connections at once");
    let registry = Arc::new(Registry::new(max));
    thread::Builder::new()
        .name("http-accept".into())
        .spawn(move || accept_loop(&listener, &metrics, &registry))
        .map(|_| ())
}

/// `MAX_CONNECTIONS`, or fewer when the soft limit on open files would be hit
/// first (the exporter needs a few descriptors of its own).
fn connection_limit() -> usize {
    match process::open_files_limit() {
        Some(n) => MAX_CONNECTIONS.min(n.saturating_sub(32).max(16)),
        None => MAX_CONNECTIONS,
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

fn accept_loop(listener: &TcpListener, metrics: &Arc<Metrics>, registry: &Arc<Registry>) {
    let mut full = Throttle(None);
    let mut failing = Throttle(None);
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                match e.raw_os_error() {
                    // Out of file descriptors (process or system): free one by
                    // closing the connection that has waited longest, then retry.
                    Some(23 | 24) => {
                        full.warn(&format!(
                            "cannot accept a connection: {e}; closing the longest-idle one"
                        ));
                        registry.evict_one();
                        thread::sleep(Duration::from_millis(10));
                    }
                    // The client gave up before we accepted: nothing to do.
                    Some(4 | 103) => {}
                    _ => {
                        failing.warn(&format!("cannot accept a connection: {e}"));
                        thread::sleep(Duration::from_millis(100));
                    }
                }
                continue;
            }
        };
        let stream = Arc::new(stream);
        let id = match registry.admit(&stream) {
            Admitted::Yes(id) => id,
            Admitted::AfterEviction(id) => {
                full.warn(&format!(
                    "connection limit ({}) reached: closing the longest-idle connections",
                    registry.max
                ));
                id
            }
            Admitted::No => {
                full.warn(&format!(
                    "connection limit ({}) reached and every connection is busy: refusing one",
                    registry.max
                ));
                continue;
            }
        };
        let conn = Connection {
            id,
            stream,
            registry: Arc::clone(registry),
        };
        let metrics = Arc::clone(metrics);
        let spawned = thread::Builder::new()
            .name("http".into())
            .stack_size(THREAD_STACK)
            .spawn(move || serve_connection(&conn, &metrics));
        if let Err(e) = spawned {
            // The closure (and so the connection) was dropped: it is closed and
            // unregistered already.
            failing.warn(&format!("cannot start a connection thread: {e}"));
        }
    }
}

/// The open connections, to enforce the limit and to pick which one to close
/// when it is reached.
struct Registry {
    max: usize,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, Entry>>,
}

struct Entry {
    stream: Arc<TcpStream>,
    /// Since when the connection has been waiting for (the rest of) a request;
    /// `None` while an answer is being written.
    waiting_since: Option<Instant>,
}

impl Registry {
    fn new(max: usize) -> Registry {
        Registry {
            max,
            next_id: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection, closing the longest-waiting one if the limit
    /// is reached; refused when every connection is busy writing an answer.
    fn admit(&self, stream: &Arc<TcpStream>) -> Admitted {
        let mut conns = self.lock();
        let full = conns.len() >= self.max;
        if full && !Self::evict_from(&mut conns) {
            return Admitted::No;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        conns.insert(
            id,
            Entry {
                stream: Arc::clone(stream),
                waiting_since: Some(Instant::now()),
            },
        );
        if full {
            Admitted::AfterEviction(id)
        } else {
            Admitted::Yes(id)
        }
    }

    fn evict_one(&self) -> bool {
        Self::evict_from(&mut self.lock())
    }

    fn evict_from(conns: &mut HashMap<u64, Entry>) -> bool {
        let oldest = conns
            .iter()
            .filter_map(|(id, e)| e.waiting_since.map(|t| (t, *id)))
            .min();
        match oldest.and_then(|(_, id)| conns.remove(&id)) {
            Some(e) => {
                // Its thread wakes from its read with end-of-file and ends.
                let _ = e.stream.shutdown(Shutdown::Both);
                true
            }
            None => false,
        }
    }

    fn set_waiting(&self, id: u64, since: Option<Instant>) {
        if let Some(e) = self.lock().get_mut(&id) {
            e.waiting_since = since;
        }
    }
}

enum Admitted {
    Yes(u64),
    AfterEviction(u64),
    No,
}

/// A registered connection; unregisters itself however its thread ends.
struct Connection {
    id: u64,
    stream: Arc<TcpStream>,
    registry: Arc<Registry>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

/// What a request head parses to; the target is kept as bytes (it is only
/// compared with our fixed paths, never echoed or logged in full).
#[derive(Debug, PartialEq, Eq)]
struct Head<'a> {
    method: &'a [u8],
    path: &'a [u8],
    /// HTTP/1.1 (true) or HTTP/1.0 (false).
    http11: bool,
    close: bool,
    has_body: bool,
}

/// An answer: status, content type, body, and whether to close afterwards.
struct Answer {
    status: u16,
    content_type: &'static str,
    body: Body,
    allow: bool,
}

enum Body {
    Static(&'static [u8]),
    Owned(Vec<u8>),
    /// /metrics: the last collection's rendering, then the process series; sent
    /// as they are, without copying them into one buffer.
    Metrics(Arc<Vec<u8>>, Arc<Vec<u8>>),
}

impl Body {
    fn parts(&self) -> [&[u8]; 2] {
        match self {
            Body::Static(b) => [b, &[]],
            Body::Owned(b) => [b, &[]],
            Body::Metrics(a, b) => [a, b],
        }
    }

    fn len(&self) -> usize {
        self.parts().iter().map(|p| p.len()).sum()
    }
}

/// Why reading a request head stopped.
enum ReadOutcome {
    /// A complete head ends at this offset of the buffer.
    Head(usize),
    /// The client closed, reset, or stayed idle past `IDLE_TIMEOUT`: close quietly.
    Gone,
    /// The client started a request and did not finish it in time.
    TooSlow,
    /// The head does not fit in `MAX_HEAD`.
    TooLarge,
}

fn serve_connection(conn: &Connection, metrics: &Metrics) {
    let stream: &TcpStream = &conn.stream;
    // Small answers go out at once rather than waiting for an ACK (Nagle).
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; MAX_HEAD];
    let mut filled = 0;
    // The first wait counts from the accept (set by `admit`), so connections are
    // evicted in the order they came, however late their threads start.
    loop {
        let end = match read_head(stream, &mut buf, &mut filled) {
            ReadOutcome::Head(end) => end,
            ReadOutcome::Gone => return,
            ReadOutcome::TooSlow => {
                log::debug!("HTTP client too slow to send its request: closing");
                return refuse(conn, 408, "request timeout\n");
            }
            ReadOutcome::TooLarge => {
                let line_fits = buf.contains(&b'\n');
                log::debug!("HTTP request head over {MAX_HEAD} bytes: refused");
                return if line_fits {
                    refuse(conn, 431, "request header fields too large\n")
                } else {
                    refuse(conn, 414, "URI too long\n")
                };
            }
        };
        conn.registry.set_waiting(conn.id, None);
        let head = match parse_head(&buf[..end]) {
            Ok(h) => h,
            Err((status, why)) => {
                log::debug!("malformed HTTP request: {why}");
                return refuse(conn, status, "bad request\n");
            }
        };
        let answer = route(&head, metrics);
        log::trace!(
            "{} {} -> {}",
            String::from_utf8_lossy(head.method),
            printable(head.path),
            answer.status
        );
        // HTTP/1.0 clients are answered and closed; so is any request that comes
        // with a body, which is never read.
        let close = head.close || head.has_body || !head.http11;
        let is_head = head.method == b"HEAD";
        if write_answer(stream, &answer, is_head, close).is_err() {
            log::debug!("HTTP client did not take its answer in time: closing");
            return;
        }
        if close {
            return linger(stream);
        }
        // Pipelined requests: keep what follows this head.
        buf.copy_within(end..filled, 0);
        filled -= end;
        conn.registry.set_waiting(conn.id, Some(Instant::now()));
    }
}

/// Reads until `buf[..filled]` holds a whole request head.
fn read_head(stream: &TcpStream, buf: &mut [u8], filled: &mut usize) -> ReadOutcome {
    let idle_deadline = Instant::now() + IDLE_TIMEOUT;
    let mut head_deadline = None;
    loop {
        // Empty lines before a request line are allowed (RFC 9112, 2.2).
        let start = buf[..*filled]
            .iter()
            .position(|b| !matches!(b, b'\r' | b'\n'))
            .unwrap_or(*filled);
        if start > 0 {
            buf.copy_within(start..*filled, 0);
            *filled -= start;
        }
        if *filled > 0 {
            if let Some(end) = head_end(&buf[..*filled]) {
                return ReadOutcome::Head(end);
            }
            if hopeless(&buf[..*filled]) {
                // `parse_head` rejects it with the right status.
                return ReadOutcome::Head(*filled);
            }
            if *filled == buf.len() {
                return ReadOutcome::TooLarge;
            }
            head_deadline.get_or_insert_with(|| Instant::now() + HEAD_TIMEOUT);
        }
        let deadline = head_deadline.unwrap_or(idle_deadline);
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return if *filled > 0 {
                ReadOutcome::TooSlow
            } else {
                ReadOutcome::Gone
            };
        }
        if stream.set_read_timeout(Some(left)).is_err() {
            return ReadOutcome::Gone;
        }
        match (&*stream).read(&mut buf[*filled..]) {
            Ok(0) => return ReadOutcome::Gone,
            Ok(n) => *filled += n,
            Err(e) if is_retry(&e) => {}
            Err(_) => return ReadOutcome::Gone,
        }
    }
}

/// Read/write timeouts surface as WouldBlock or TimedOut; the deadline decides.
fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// The offset just past the blank line ending a head (CRLF or bare LF lines).
fn head_end(data: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(pos) = data[i..].iter().position(|&b| b == b'\n') {
        let nl = i + pos;
        let rest = &data[nl + 1..];
        if rest.starts_with(b"\n") {
            return Some(nl + 2);
        }
        if rest.starts_with(b"\r\n") {
            return Some(nl + 3);
        }
        i = nl + 1;
    }
    None
}

/// The method, target and version of a request line.
type RequestLine<'a> = (&'a [u8], &'a [u8], bool);

fn parse_request_line(line: &[u8]) -> Result<RequestLine<'_>, (u16, &'static str)> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err((400, "request line is not METHOD TARGET VERSION"));
    };
    if method.is_empty() || !method.iter().all(|&b| is_token(b)) {
        return Err((400, "bad method"));
    }
    let http11 = match version {
        b"HTTP/1.1" => true,
        b"HTTP/1.0" => false,
        v if v.starts_with(b"HTTP/") && v.len() == 8 => {
            return Err((505, "unsupported HTTP version"))
        }
        _ => return Err((400, "bad HTTP version")),
    };
    if target.is_empty() || target.iter().any(|b| b.is_ascii_control() || *b == b' ') {
        return Err((400, "bad request target"));
    }
    Ok((method, target, http11))
}

/// True when the start of a request already shows it cannot be valid (binary
/// garbage, a TLS handshake, a broken request line): it is answered at once
/// rather than after waiting for the rest.
fn hopeless(start: &[u8]) -> bool {
    match start.iter().position(|&b| b == b'\n') {
        Some(nl) => {
            let line = &start[..nl];
            parse_request_line(line.strip_suffix(b"\r").unwrap_or(line)).is_err()
        }
        None => {
            let method_end = start.iter().position(|&b| b == b' ').unwrap_or(start.len());
            method_end > 32 || !start[..method_end].iter().all(|&b| is_token(b))
        }
    }
}

fn parse_head(data: &[u8]) -> Result<Head<'_>, (u16, &'static str)> {
    let mut lines = data
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let (method, target, http11) = parse_request_line(lines.next().unwrap_or_default())?;
    let path = path_of(target);
    let (mut close, mut has_body) = (false, false);
    for line in lines {
        if line.is_empty() {
            break;
        }
        if line.starts_with(b" ") || line.starts_with(b"\t") {
            return Err((400, "folded header line"));
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err((400, "header line without a colon"));
        };
        let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
        if name.is_empty() || !name.iter().all(|&b| is_token(b)) {
            return Err((400, "bad header name"));
        }
        if name.eq_ignore_ascii_case(b"connection") {
            close |= value
                .split(|&b| b == b',')
                .any(|option| trim(option).eq_ignore_ascii_case(b"close"));
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            has_body = true;
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or((400, "bad Content-Length"))?;
            has_body |= n > 0;
        }
    }
    Ok(Head {
        method,
        path,
        http11,
        close,
        has_body,
    })
}

/// The path of an origin-form (`/metrics?x`) or absolute-form
/// (`http://host/metrics`) target, without query or fragment.
fn path_of(target: &[u8]) -> &[u8] {
    let mut t = target;
    for scheme in [&b"http://"[..], b"https://"] {
        if t.len() >= scheme.len() && t[..scheme.len()].eq_ignore_ascii_case(scheme) {
            let rest = &t[scheme.len()..];
            t = match rest.iter().position(|&b| b == b'/') {
                Some(i) => &rest[i..],
                None => b"/",
            };
            break;
        }
    }
    let end = t
        .iter()
        .position(|&b| b == b'?' || b == b'#')
        .unwrap_or(t.len());
    &t[..end]
}

fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |i| i + 1);
    &v[start..end.max(start)]
}

/// At most 100 printable characters of client input, for TRACE lines.
fn printable(v: &[u8]) -> String {
    let s: String = String::from_utf8_lossy(v)
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

fn route(head: &Head, metrics: &Metrics) -> Answer {
    const KNOWN: &[&[u8]] = &[b"/", b"/metrics", b"/healthz", b"/readyz"];
    if head.method != b"GET" && head.method != b"HEAD" {
        return if KNOWN.contains(&head.path) {
            Answer {
                allow: true,
                ..text(405, "method not allowed\n")
            }
        } else {
            text(404, "not found\n")
        };
    }
    match head.path {
        b"/metrics" => Answer {
            status: 200,
            content_type: CONTENT_TYPE,
            body: Body::Metrics(metrics.rendered(), metrics.process_rendered()),
            allow: false,
        },
        b"/" => Answer {
            status: 200,
            content_type: "text/html; charset=utf-8",
            body: Body::Static(INDEX.as_bytes()),
            allow: false,
        },
        b"/healthz" => text(200, "ok\n"),
        b"/readyz" => match metrics.readiness() {
            Readiness::Ready => text(200, "ready\n"),
            Readiness::NotReady(why) => Answer {
                body: Body::Owned(format!("not ready: {why}\n").into_bytes()),
                ..text(503, "")
            },
        },
        _ => text(404, "not found\n"),
    }
}

fn text(status: u16, body: &'static str) -> Answer {
    Answer {
        status,
        content_type: "text/plain; charset=utf-8",
        body: Body::Static(body.as_bytes()),
        allow: false,
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

fn response_head(answer: &Answer, close: bool) -> String {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
        answer.status,
        reason(answer.status),
        answer.content_type,
        answer.body.len()
    );
    if answer.allow {
        head.push_str("Allow: GET, HEAD\r\n");
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    head
}

fn write_answer(
    stream: &TcpStream,
    answer: &Answer,
    head_only: bool,
    close: bool,
) -> io::Result<()> {
    let deadline = Instant::now() + WRITE_TIMEOUT;
    let head = response_head(answer, close);
    let [body1, body2] = if head_only {
        [&[][..], &[][..]]
    } else {
        answer.body.parts()
    };
    write_all_by(stream, [head.as_bytes(), body1, body2], deadline)
}

/// Writes the parts in order with one deadline for all, whatever pace the client
/// reads at; one `writev` each time, so a small answer (head and body) leaves in
/// a single segment.
fn write_all_by(stream: &TcpStream, mut parts: [&[u8]; 3], deadline: Instant) -> io::Result<()> {
    while parts.iter().any(|p| !p.is_empty()) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_write_timeout(Some(left))?;
        let slices = parts.map(IoSlice::new);
        match (&*stream).write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(mut n) => {
                for part in &mut parts {
                    let taken = n.min(part.len());
                    *part = &part[taken..];
                    n -= taken;
                }
            }
            Err(e) if is_retry(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Answers with an error and closes the connection.
fn refuse(conn: &Connection, status: u16, body: &'static str) {
    if write_answer(&conn.stream, &text(status, body), false, true).is_ok() {
        linger(&conn.stream);
    }
}

/// Closes after an answer without losing it: stop sending, then read and drop
/// what the client still sends for a bounded time, so closing does not turn into
/// a reset that would discard our answer on the client's side.
fn linger(stream: &TcpStream) {
    if stream.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER_TIME;
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match (&*stream).read(&mut sink) {
            Ok(0) => return,
            Ok(n) => drained += n,
            Err(e) if is_retry(&e) => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Head<'_>, u16> {
        parse_head(s.as_bytes()).map_err(|(status, _)| status)
    }

    #[test]
    fn parses_a_prometheus_request() {
        let h = parse(
            "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:9\r\nUser-Agent: Prometheus/2.53\r\n\
             Accept: text/plain;version=0.0.4\r\n\r\n",
        )
        .unwrap();
        assert_eq!(h.method, b"GET");
        assert_eq!(h.path, b"/metrics");
        assert!(h.http11 && !h.close && !h.has_body);
    }

    #[test]
    fn paths_drop_query_fragment_and_absolute_form() {
        assert_eq!(path_of(b"/metrics?x=1"), b"/metrics");
        assert_eq!(path_of(b"/readyz#top"), b"/readyz");
        assert_eq!(path_of(b"http://host:9/metrics?a"), b"/metrics");
        assert_eq!(path_of(b"HTTPS://host"), b"/");
        assert_eq!(path_of(b"*"), b"*");
    }

    #[test]
    fn connection_options_and_bodies() {
        let h = parse("GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n").unwrap();
        assert!(h.close);
        let h = parse("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap();
        assert!(!h.http11 && !h.close);
        let h = parse("POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\n").unwrap();
        assert!(h.has_body);
        let h = parse("POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n").unwrap();
        assert!(h.has_body);
        let h = parse("GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert!(!h.has_body);
    }

    #[test]
    fn malformed_heads_are_rejected() {
        assert_eq!(parse("GET /metrics\r\n\r\n").err(), Some(400));
        assert_eq!(parse("GET  /metrics HTTP/1.1\r\n\r\n").err(), Some(400));
        assert_eq!(parse("GET /metrics HTTP/2.0\r\n\r\n").err(), Some(505));
        assert_eq!(parse("GET /metrics FTP/1.0\r\n\r\n").err(), Some(400));
        assert_eq!(parse("G(T /metrics HTTP/1.1\r\n\r\n").err(), Some(400));
        assert_eq!(parse("\u{1}\u{2}garbage\r\n\r\n").err(), Some(400));
        assert_eq!(parse("GET /a\u{7}b HTTP/1.1\r\n\r\n").err(), Some(400));
        assert_eq!(parse("GET / HTTP/1.1\r\nNoColon\r\n\r\n").err(), Some(400));
        assert_eq!(parse("GET / HTTP/1.1\r\nA b: c\r\n\r\n").err(), Some(400));
        assert_eq!(
            parse("GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n").err(),
            Some(400)
        );
        assert_eq!(
            parse("GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n").err(),
            Some(400)
        );
        assert_eq!(
            parse("GET / HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n").err(),
            Some(400)
        );
    }

    #[test]
    fn hopeless_starts_are_seen_before_the_head_ends() {
        assert!(hopeless(b"\x16\x03\x01\x02\x00\x01"));
        assert!(hopeless(&[0u8, 1, 2, 3]));
        assert!(hopeless(b"GET /metrics\r\nHost"));
        assert!(hopeless(b"GET /metrics HTTP/9.9\r\n"));
        assert!(hopeless(&[b'A'; 40]));
        assert!(!hopeless(b"GE"));
        assert!(!hopeless(b"GET /metr"));
        assert!(!hopeless(b"GET /metrics HTTP/1.1\r\nHost: x"));
    }

    #[test]
    fn head_end_accepts_crlf_and_bare_lf() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\nrest"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1"), None);
    }

    #[test]
    fn routes_and_methods() {
        let m = Metrics::new();
        let answer = |s: &str| route(&parse(s).unwrap(), &m);
        assert_eq!(answer("GET /metrics HTTP/1.1\r\n\r\n").status, 200);
        assert_eq!(answer("HEAD /metrics HTTP/1.1\r\n\r\n").status, 200);
        assert_eq!(answer("GET /healthz HTTP/1.1\r\n\r\n").status, 200);
        assert_eq!(answer("GET /readyz HTTP/1.1\r\n\r\n").status, 503);
        assert_eq!(answer("GET /nope HTTP/1.1\r\n\r\n").status, 404);
        let a = answer("POST /metrics HTTP/1.1\r\n\r\n");
        assert!(a.status == 405 && a.allow);
        assert_eq!(answer("DELETE /nope HTTP/1.1\r\n\r\n").status, 404);
        let head = response_head(&answer("GET /healthz HTTP/1.1\r\n\r\n"), true);
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 3\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn registry_evicts_the_longest_waiting_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let pair = || {
            let client = TcpStream::connect(addr).unwrap();
            let (server, _) = listener.accept().unwrap();
            (client, Arc::new(server))
        };
        let r = Registry::new(2);
        let (mut c1, s1) = pair();
        let (_c2, s2) = pair();
        let (_c3, s3) = pair();
        let Admitted::Yes(id1) = r.admit(&s1) else {
            panic!("room for the first")
        };
        let Admitted::Yes(id2) = r.admit(&s2) else {
            panic!("room for the second")
        };
        r.set_waiting(id2, None); // busy writing: not evictable
        let Admitted::AfterEviction(id3) = r.admit(&s3) else {
            panic!("the third evicts the first")
        };
        assert_eq!(r.lock().len(), 2);
        // The first one was closed by the server side.
        let mut byte = [0u8; 1];
        assert_eq!(c1.read(&mut byte).unwrap(), 0);
        assert!(!r.lock().contains_key(&id1));
        r.set_waiting(id3, None);
        let (_c4, s4) = pair();
        assert!(
            matches!(r.admit(&s4), Admitted::No),
            "all busy: the newcomer is refused"
        );
    }
}
