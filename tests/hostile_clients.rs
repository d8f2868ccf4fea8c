//! Issues 4 and 12: hostile HTTP clients against tiny_http on the main thread.
//! Idle connections, slow senders, huge header lines, pipelining clients that
//! never read and garbage must never stop /metrics for a well-behaved scraper,
//! memory must come back after the attack, running out of file descriptors must
//! not stop the exporter, and keep-alive scrapes must not pay a Nagle stall.
//! No Prefect needed: a stub keeps the exporter's data realistic.
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use support::{http_request, poll, Exporter, Stub};

/// Prometheus's default scrape timeout: every scrape must be answered within it.
const SCRAPE_LIMIT: Duration = Duration::from_secs(10);
/// A scrape is served from memory: the median during the attack stays under this.
const MEDIAN_LIMIT: Duration = Duration::from_millis(50);
/// The well-behaved scraper opens a new connection this often.
const SCRAPE_EVERY: Duration = Duration::from_millis(250);
/// After the attack, resident memory comes back within this of its level before.
const RSS_RETURN_KB: u64 = 3 * 1024;
/// Keep-alive scrapes on one connection: no 40 ms Nagle/delayed-ACK stall.
const KEEP_ALIVE_MEDIAN: Duration = Duration::from_millis(5);

fn proc_status(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn rss_kb(pid: u32) -> u64 {
    proc_status(pid, "VmRSS:")
}

fn threads(pid: u32) -> u64 {
    proc_status(pid, "Threads:")
}

fn ready_exporter(stub: &Stub) -> Exporter {
    let url = stub.api_url();
    let exp = Exporter::spawn(&[("PREFECT_API_URL", &url)]);
    exp.wait_for(
        |m| m.get("prefect_up") == Some(&1.0),
        Duration::from_secs(20),
    );
    exp
}

/// One scrape on a new connection: 200 with the exporter's series, in time.
fn scrape(addr: &str, exp: &Exporter) -> Duration {
    let t = Instant::now();
    let r = http_request(addr, "GET", "/metrics", &[], b"").unwrap_or_else(|e| {
        panic!(
            "/metrics failed after {:?} during the attack: {e}\nstderr:\n{}",
            t.elapsed(),
            exp.stderr()
        )
    });
    let took = t.elapsed();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("prefect_up 1"), "{}", r.body);
    assert!(
        took < SCRAPE_LIMIT,
        "/metrics took {took:?} during the attack\nstderr:\n{}",
        exp.stderr()
    );
    took
}

/// Sends `data` and returns the first line of the answer (or why there is none).
fn exchange(addr: &str, data: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    if let Err(e) = s.write_all(data) {
        return format!("(write failed: {e})");
    }
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&chunk[..n]);
                if answer.windows(2).any(|w| w == b"\r\n") {
                    break;
                }
            }
            Err(e) => return format!("(no answer: {e})"),
        }
    }
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("(closed without an answer)")
        .to_string()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A small deterministic generator for the garbage.
fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn hostile_clients_never_stop_metrics_and_memory_comes_back() {
    let stub = Stub::standard();
    let exp = ready_exporter(&stub);
    let addr = exp.addr().to_string();
    let pid = exp.pid();
    // The level before the attack, after a few scrapes like the ones to come.
    for _ in 0..5 {
        scrape(&addr, &exp);
    }
    thread::sleep(Duration::from_millis(1500));
    let rss_before = rss_kb(pid);
    let threads_before = threads(pid);

    let stop = Arc::new(AtomicBool::new(false));
    // 200 idle connections.
    let idle: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(&addr).expect("idle connect"))
        .collect();
    // 5 slow-loris senders: one header byte every 100 ms, never finishing.
    let mut attackers: Vec<JoinHandle<()>> = (0..5)
        .map(|_| {
            let (addr, stop) = (addr.clone(), Arc::clone(&stop));
            thread::spawn(move || {
                let mut s = TcpStream::connect(&addr).unwrap();
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ");
                while !stop.load(Ordering::SeqCst) {
                    if s.write_all(b"z").is_err() {
                        break;
                    }
                    thread::sleep(Duration::from_millis(100));
                }
            })
        })
        .collect();
    // Two clients pipelining thousands of /metrics requests and never reading.
    let mut flooders: Vec<JoinHandle<usize>> = (0..2)
        .map(|_| {
            let (addr, stop) = (addr.clone(), Arc::clone(&stop));
            thread::spawn(move || {
                let mut s = TcpStream::connect(&addr).unwrap();
                s.set_write_timeout(Some(Duration::from_millis(200)))
                    .unwrap();
                let burst = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(4000);
                let mut sent = 0;
                while sent < burst.len() && !stop.load(Ordering::SeqCst) {
                    match s.write(&burst[sent..]) {
                        Ok(n) => sent += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => break,
                    }
                }
                // Hold the connection, unread, until the attack ends.
                while !stop.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(50));
                }
                sent
            })
        })
        .collect();
    // Ten 1 MB header lines, and garbage.
    let mut big_header = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big_header.extend(std::iter::repeat_n(b'a', 1 << 20));
    big_header.extend_from_slice(b"\r\n\r\n");
    let mut payloads: Vec<Vec<u8>> = vec![big_header; 10];
    payloads.push(garbage(1, 4096));
    payloads.push(garbage(2, 64 * 1024));
    payloads.push(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec());
    payloads.push(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec());
    payloads.push(b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n".to_vec());
    payloads.push(b"\r\n\r\n\r\nGET\r\n\r\n".to_vec());
    let workers: Vec<JoinHandle<String>> = payloads
        .into_iter()
        .map(|data| {
            let addr = addr.clone();
            thread::spawn(move || exchange(&addr, &data, Duration::from_secs(40)))
        })
        .collect();

    // Meanwhile a well-behaved scraper, on a new connection every 250 ms.
    let mut latencies = Vec::new();
    let (mut rss_peak, mut threads_peak) = (0, 0);
    let started = Instant::now();
    // At least 15 s (60 scrapes): long enough for both pipelining clients to
    // stall an answer, and until the huge header lines are answered.
    while latencies.len() < 60 || !workers[..10].iter().all(|w| w.is_finished()) {
        let next = Instant::now() + SCRAPE_EVERY;
        latencies.push(scrape(&addr, &exp));
        rss_peak = rss_peak.max(rss_kb(pid));
        threads_peak = threads_peak.max(threads(pid));
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the huge header lines are still being read after 90 s"
        );
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let attack = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let flooded: Vec<usize> = flooders.drain(..).map(|f| f.join().unwrap()).collect();
    for a in attackers.drain(..) {
        a.join().unwrap();
    }
    drop(idle);
    let answers: Vec<String> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    assert!(
        flooded.iter().all(|&n| n > 64 * 1024),
        "the pipelining clients sent only {flooded:?} bytes"
    );

    // Still alive, still serving.
    assert_eq!(exp.get("/healthz"), (200, "ok\n".to_string()));
    scrape(&addr, &exp);
    latencies.sort();
    let median = percentile(&latencies, 0.5);
    assert!(
        median < MEDIAN_LIMIT,
        "median /metrics latency {median:?} during the attack: {latencies:?}"
    );

    // Memory comes back once the clients are gone (idle connection threads end,
    // tiny_http's spare threads retire after 5 s, malloc_trim runs every second).
    let t = Instant::now();
    let rss_after = poll(Duration::from_secs(30), Duration::from_millis(250), || {
        let r = rss_kb(pid);
        (r <= rss_before + RSS_RETURN_KB).then_some(r)
    })
    .unwrap_or_else(|| {
        panic!(
            "RSS {} kB 30 s after the attack, {rss_before} kB before (peak {rss_peak} kB)",
            rss_kb(pid)
        )
    });
    eprintln!(
        "hostile clients: {} scrapes over {attack:.1?}: median {:?}, p95 {:?}, max {:?}; \
         RSS before {rss_before} kB, peak {rss_peak} kB, after {rss_after} kB (back in {:.1?}); \
         threads {threads_before} -> peak {threads_peak}; answers to the huge/garbage requests: {answers:?}",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.95),
        latencies.last().unwrap(),
        t.elapsed(),
    );
}

#[test]
fn running_out_of_descriptors_does_not_stop_the_exporter() {
    let stub = Stub::standard();
    let mut exp = ready_exporter(&stub);
    let addr = exp.addr().to_string();
    let pid = exp.pid();
    // RLIMIT_NOFILE 64 on the running exporter (as if started with ulimit -n 64).
    let limit = libc::rlimit {
        rlim_cur: 64,
        rlim_max: 64,
    };
    // SAFETY: prlimit reads `limit` and writes nothing (null old limit).
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    scrape(&addr, &exp);

    // More connections than descriptors (each takes two in tiny_http).
    let conns: Vec<TcpStream> = (0..120)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    poll(Duration::from_secs(20), Duration::from_millis(50), || {
        exp.stderr().contains("starting a new").then_some(())
    })
    .unwrap_or_else(|| panic!("no sign of descriptor exhaustion:\n{}", exp.stderr()));
    thread::sleep(Duration::from_secs(2));
    assert!(
        exp.wait_exit(Duration::from_millis(100)).is_none(),
        "the exporter exited:\n{}",
        exp.stderr()
    );

    drop(conns);
    let t = Instant::now();
    poll(Duration::from_secs(30), Duration::from_millis(100), || {
        http_request(&addr, "GET", "/metrics", &[], b"")
            .ok()
            .filter(|r| r.status == 200 && r.body.contains("process_open_fds"))
    })
    .unwrap_or_else(|| {
        panic!(
            "no answer 30 s after the connections closed:\n{}",
            exp.stderr()
        )
    });
    let back = t.elapsed();
    scrape(&addr, &exp);
    let stderr = exp.stderr();
    let warnings = stderr
        .lines()
        .filter(|l| l.contains("[WARN]") && l.contains("HTTP server"))
        .count();
    assert_eq!(warnings, 1, "one WARN per minute at most:\n{stderr}");
    eprintln!("descriptor exhaustion: answering again {back:.1?} after the connections closed");
}

/// Reads one answer with a Content-Length body from a keep-alive connection.
fn read_answer(s: &mut TcpStream, buf: &mut Vec<u8>) -> u16 {
    let mut chunk = [0u8; 16 * 1024];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).expect("read");
        assert!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    let status = head[9..12].parse().expect("status");
    while buf.len() < end + length {
        let n = s.read(&mut chunk).expect("read");
        assert!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.drain(..end + length);
    status
}

#[test]
fn keep_alive_scrapes_pay_no_nagle_stall() {
    let stub = Stub::standard();
    let exp = ready_exporter(&stub);
    let mut s = TcpStream::connect(exp.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let mut latencies = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        assert_eq!(read_answer(&mut s, &mut buf), 200);
        latencies.push(t.elapsed());
    }
    latencies.sort();
    let median = percentile(&latencies, 0.5);
    eprintln!(
        "keep-alive: 200 scrapes on one connection: median {median:?}, p99 {:?}",
        percentile(&latencies, 0.99)
    );
    assert!(
        median < KEEP_ALIVE_MEDIAN,
        "median {median:?} over 200 keep-alive scrapes: {latencies:?}"
    );
}

#[test]
fn sigterm_while_an_answer_is_stuck_exits_0_within_a_second() {
    let stub = Stub::standard();
    let mut exp = ready_exporter(&stub);
    // A client that pipelines requests and never reads: the main thread is
    // soon blocked writing to it, for up to twice the write timeout.
    let mut s = TcpStream::connect(exp.addr()).unwrap();
    s.write_all(&b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(3000))
        .unwrap();
    thread::sleep(Duration::from_millis(1000));
    let t = Instant::now();
    assert!(exp.signal(support::SIGTERM));
    let status = exp
        .wait_exit(Duration::from_secs(10))
        .expect("still running 10 s after SIGTERM");
    let took = t.elapsed();
    assert_eq!(status.code(), Some(0), "{status}\n{}", exp.stderr());
    assert!(
        took < Duration::from_secs(1),
        "SIGTERM took {took:?}\n{}",
        exp.stderr()
    );
    drop(s);
}
