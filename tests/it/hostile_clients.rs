//! Issues 4 and 12: hostile HTTP clients against tiny_http on the main thread.
//! Idle connections, slow senders, huge header lines, pipelining clients that
//! never read and garbage must never stop /metrics for a well-behaved scraper,
//! memory must come back after the attack, running out of file descriptors must
//! not stop the exporter, and keep-alive scrapes must not pay a Nagle stall.
//! No Prefect needed: a stub keeps the exporter's data realistic. Every test
//! holds `support::heavy()`: the attacks load both cores, and the bounds are
//! latencies.
use crate::support;

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
    let exp = Exporter::spawn(&[("PREFECT_API_URL", &url), ("LOG_LEVEL", "debug")]);
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
    let _heavy = support::heavy();
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
    let _heavy = support::heavy();
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

#[test]
fn keep_alive_scrapes_pay_no_nagle_stall() {
    let _heavy = support::heavy();
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
        assert_eq!(
            support::read_answer(&mut s, &mut buf).expect("an answer"),
            200
        );
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
    let _heavy = support::heavy();
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

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

/// A well-behaved scraper on a new connection every 250 ms, in the background,
/// until stopped: how long each scrape took, and what failed.
struct Scraper {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(Vec<Duration>, Vec<String>)>,
}

impl Scraper {
    fn start(addr: &str) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let (addr, flag) = (addr.to_string(), Arc::clone(&stop));
        let handle = thread::spawn(move || {
            let (mut took, mut failed) = (Vec::new(), Vec::new());
            while !flag.load(Ordering::SeqCst) {
                let t = Instant::now();
                match http_request(&addr, "GET", "/metrics", &[], b"") {
                    Ok(r) if r.status == 200 && r.body.contains("prefect_up") => {
                        took.push(t.elapsed())
                    }
                    Ok(r) => failed.push(format!("status {} after {:?}", r.status, t.elapsed())),
                    Err(e) => failed.push(format!(
                        "{e} after {:?}, begun at {:?}",
                        t.elapsed(),
                        std::time::SystemTime::now() - t.elapsed()
                    )),
                }
                thread::sleep(SCRAPE_EVERY);
            }
            (took, failed)
        });
        Scraper { stop, handle }
    }

    /// Stops; every scrape answered, the slowest within `limit`. Returns the
    /// number of scrapes and the slowest.
    fn finish(self, limit: Duration, exp: &Exporter) -> (usize, Duration) {
        self.stop.store(true, Ordering::SeqCst);
        let (mut took, failed) = self.handle.join().unwrap();
        assert!(
            failed.is_empty(),
            "scrapes failed: {failed:?}\nstderr:\n{}",
            exp.stderr()
        );
        took.sort();
        let worst = *took.last().expect("no scrape at all");
        assert!(
            worst < limit,
            "a scrape took {worst:?} (limit {limit:?}): {took:?}\nstderr:\n{}",
            exp.stderr()
        );
        (took.len(), worst)
    }
}

/// Connects and sends `head`, then `trickle` one byte every 200 ms until
/// `stop`; returns the first line of whatever came back.
fn trickler(
    addr: &str,
    head: &'static [u8],
    trickle: &'static [u8],
    stop: &Arc<AtomicBool>,
) -> JoinHandle<String> {
    let (addr, stop) = (addr.to_string(), Arc::clone(stop));
    thread::spawn(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        s.write_all(head).unwrap();
        let mut answer = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut bytes = trickle.iter().cycle();
        while !stop.load(Ordering::SeqCst) {
            match s.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
                Err(_) => {}
            }
            if !trickle.is_empty() {
                let b = [*bytes.next().unwrap()];
                if s.write_all(&b).is_err() {
                    break;
                }
            }
        }
        let text = String::from_utf8_lossy(&answer);
        text.lines()
            .next()
            .unwrap_or("(closed without an answer)")
            .to_string()
    })
}

#[test]
fn bodies_expect_and_slow_clients_never_hold_up_a_scrape() {
    let _heavy = support::heavy();
    let stub = Stub::standard();
    let mut exp = ready_exporter(&stub);
    let addr = exp.addr().to_string();
    let pid = exp.pid();
    let scraper = Scraper::start(&addr);
    let stop = Arc::new(AtomicBool::new(false));
    let cases: Vec<(&str, JoinHandle<String>)> = vec![
        (
            "a body announced and never sent",
            trickler(
                &addr,
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n",
                b"",
                &stop,
            ),
        ),
        (
            "a body too large to ever drain",
            trickler(
                &addr,
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000000\r\n\r\n",
                b"",
                &stop,
            ),
        ),
        (
            "a GET body trickled",
            trickler(
                &addr,
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n",
                b"z",
                &stop,
            ),
        ),
        (
            "a POST body trickled",
            trickler(
                &addr,
                b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n",
                b"z",
                &stop,
            ),
        ),
        (
            "a chunked body trickled",
            trickler(
                &addr,
                b"POST /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"1\r\nz\r\n",
                &stop,
            ),
        ),
        (
            "Expect: 100-continue and no body",
            trickler(
                &addr,
                b"POST /metrics HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n",
                b"",
                &stop,
            ),
        ),
        (
            "a header trickled",
            trickler(&addr, b"GET /metrics HTTP/1.1\r\nX-Slow: ", b"z", &stop),
        ),
    ];
    // A pipelining client that reads, and HTTP/1.0 clients, meanwhile.
    let pipelined = {
        let addr = addr.clone();
        thread::spawn(move || {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(&b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(50))
                .unwrap();
            let mut buf = Vec::new();
            (0..50)
                .map(|_| support::read_answer(&mut s, &mut buf).expect("an answer"))
                .collect::<Vec<u16>>()
        })
    };
    for _ in 0..10 {
        let r = http_request(&addr, "GET", "/metrics", &[], b"").unwrap();
        assert_eq!(r.status, 200);
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"),
            "{answer}"
        );
        thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(pipelined.join().unwrap(), vec![200; 50]);
    // Long enough for the trickles to outlast a drain's read timeout of old.
    thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::SeqCst);
    let answers: Vec<(&str, String)> = cases
        .into_iter()
        .map(|(name, h)| (name, h.join().unwrap()))
        .collect();
    let (scrapes, worst) = scraper.finish(Duration::from_secs(1), &exp);
    assert!(scrapes >= 20, "only {scrapes} scrapes");
    let first = |name: &str| answers.iter().find(|(n, _)| *n == name).unwrap().1.clone();
    for refused in [
        "a GET body trickled",
        "a POST body trickled",
        "Expect: 100-continue and no body",
    ] {
        assert!(
            first(refused).starts_with("HTTP/1.1 413"),
            "{refused}: {answers:?}"
        );
    }
    assert!(
        first("a chunked body trickled").starts_with("HTTP/1.1 405"),
        "{answers:?}"
    );
    assert!(
        exp.wait_exit(Duration::from_millis(100)).is_none(),
        "the exporter died:\n{}",
        exp.stderr()
    );
    assert_eq!(exp.pid(), pid);
    eprintln!("slow bodies: {scrapes} scrapes, worst {worst:?}; answers: {answers:?}");
}

/// The process's descriptors, threads and resident memory.
fn footprint(pid: u32) -> (u64, u64, u64) {
    (open_fds(pid), threads(pid), rss_kb(pid))
}

/// Where each of the process's threads waits, for a failure's message.
fn thread_waits(pid: u32) -> Vec<String> {
    let mut waits: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .map(|t| {
                    let read =
                        |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
                    format!("{} {}", read("comm").trim(), read("wchan"))
                })
                .collect()
        })
        .unwrap_or_default();
    waits.sort();
    waits
}

/// Within 60 s of the clients closing, the process is back within 10
/// descriptors, 4 threads and 2 MB of resident memory of `before`.
fn back_to(pid: u32, before: (u64, u64, u64), case: &str, exp: &Exporter) -> Duration {
    let t = Instant::now();
    poll(Duration::from_secs(60), Duration::from_millis(500), || {
        let (fds, threads, rss) = footprint(pid);
        (fds <= before.0 + 10 && threads <= before.1 + 4 && rss <= before.2 + 2048).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{case}: 60 s after the clients closed, (descriptors, threads, RSS kB) = {:?}, before {before:?}\nthreads waiting in: {:?}\nstderr:\n{}",
            footprint(pid),
            thread_waits(pid),
            exp.stderr()
        )
    });
    t.elapsed()
}

#[test]
fn what_tiny_http_cannot_give_back_is_given_back_in_the_same_process() {
    let _heavy = support::heavy();
    support::raise_descriptor_limit();
    let stub = Stub::standard();
    let mut exp = ready_exporter(&stub);
    let addr = exp.addr().to_string();
    let pid = exp.pid();
    for _ in 0..5 {
        scrape(&addr, &exp);
    }
    thread::sleep(Duration::from_millis(1500));
    let before = footprint(pid);
    let scraper = Scraper::start(&addr);
    let mut report = Vec::new();

    // 1,000 connections sending the HTTP/2 preface (tiny_http deadlocks each).
    for batch in 0..20 {
        let conns: Vec<TcpStream> = (0..50)
            .map(|_| {
                let mut s = TcpStream::connect(&addr).expect("connect");
                s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
                s
            })
            .collect();
        if batch == 19 {
            thread::sleep(Duration::from_millis(500));
            let (fds, ..) = footprint(pid);
            assert!(
                fds > before.0 + 50,
                "the prefaces cost nothing? {fds} descriptors"
            );
        }
        drop(conns);
    }
    report.push((
        "1,000 HTTP/2 prefaces",
        back_to(pid, before, "prefaces", &exp),
    ));

    // 100,000 pipelined requests, never read.
    {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        let burst = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(100_000);
        s.write_all(&burst).expect("the flood was not taken");
        thread::sleep(Duration::from_secs(3));
    }
    report.push((
        "100,000 pipelined requests",
        back_to(pid, before, "pipelined", &exp),
    ));

    // 1,000 idle connections.
    {
        let idle: Vec<TcpStream> = (0..1000)
            .map(|_| TcpStream::connect(&addr).expect("idle connect"))
            .collect();
        // Accepted: two descriptors each (tiny_http's pool may queue some
        // without a thread for a while).
        poll(Duration::from_secs(30), Duration::from_millis(200), || {
            (open_fds(pid) > before.0 + 1800).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "the idle connections were never accepted: (descriptors, threads, RSS kB) = {:?}\nstderr:\n{}",
                footprint(pid),
                exp.stderr()
            )
        });
        drop(idle);
    }
    report.push(("1,000 idle connections", back_to(pid, before, "idle", &exp)));

    let (scrapes, worst) = scraper.finish(SCRAPE_LIMIT, &exp);
    assert!(
        exp.wait_exit(Duration::from_millis(100)).is_none(),
        "the exporter exited:\n{}",
        exp.stderr()
    );
    assert_eq!(exp.pid(), pid);
    let stderr = exp.stderr();
    assert!(stderr.contains("starting afresh"), "{stderr}");
    assert_eq!(
        support::listening_addr(&stderr).as_deref(),
        Some(addr.as_str())
    );
    eprintln!(
        "given back: {report:?}; {scrapes} scrapes meanwhile, worst {worst:?}; before {before:?}, after {:?}",
        footprint(pid)
    );
}

/// A pids cgroup (v1 here) holding one process, so that no more threads than
/// `pids.max` can be started in it; the process goes back to the root on drop.
struct PidsCgroup {
    dir: std::path::PathBuf,
    root: std::path::PathBuf,
    pid: u32,
}

impl PidsCgroup {
    fn new(pid: u32) -> Option<PidsCgroup> {
        let root = std::path::PathBuf::from("/sys/fs/cgroup/pids");
        let dir = root.join(format!("prefect-exporter-test-{pid}"));
        std::fs::create_dir(&dir).ok()?;
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).ok()?;
        Some(PidsCgroup { dir, root, pid })
    }

    fn state(&self) -> Vec<String> {
        ["pids.current", "pids.max", "pids.events", "cgroup.procs"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default())
            .collect()
    }

    fn limit(&self, max: u64) {
        std::fs::write(self.dir.join("pids.max"), max.to_string()).expect("pids.max");
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("pids.max"), "max");
        let _ = std::fs::write(self.root.join("cgroup.procs"), self.pid.to_string());
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn no_thread_to_start_never_stops_the_exporter() {
    let _heavy = support::heavy();
    let stub = Stub::standard();
    let mut exp = ready_exporter(&stub);
    let addr = exp.addr().to_string();
    let pid = exp.pid();
    let Some(cgroup) = PidsCgroup::new(pid) else {
        assert!(
            !support::is_ci(),
            "CI=true: cannot make a pids cgroup under /sys/fs/cgroup/pids (root needed)"
        );
        eprintln!("SKIPPED no_thread_to_start_never_stops_the_exporter: no pids cgroup");
        return;
    };
    scrape(&addr, &exp);
    // Two threads more than it has: tiny_http's pool soon cannot start one
    // for a new connection, and a new server cannot start its accept thread.
    cgroup.limit(threads(pid) + 2);
    // One at a time: tiny_http's pool queues a connection that comes while a
    // thread it woke has not yet taken the previous one, instead of starting
    // a thread for it.
    let conns: Vec<TcpStream> = (0..30)
        .map(|_| {
            let c = TcpStream::connect(&addr).expect("connect");
            thread::sleep(Duration::from_millis(50));
            c
        })
        .collect();
    poll(Duration::from_secs(20), Duration::from_millis(100), || {
        exp.stderr().contains("panicked").then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "no thread ever failed to start ({} threads {:?}; cgroup {:?}; descriptors {}):\n{}",
            threads(pid),
            thread_waits(pid),
            cgroup.state(),
            open_fds(pid),
            exp.stderr()
        )
    });
    thread::sleep(Duration::from_secs(2));
    assert!(
        exp.wait_exit(Duration::from_millis(100)).is_none(),
        "the exporter died:\n{}",
        exp.stderr()
    );
    drop(conns);
    // The limit stays: answering again once the connections' threads are gone.
    poll(Duration::from_secs(30), Duration::from_millis(200), || {
        http_request(&addr, "GET", "/metrics", &[], b"")
            .ok()
            .filter(|r| r.status == 200 && r.body.contains("prefect_up 1"))
    })
    .unwrap_or_else(|| {
        panic!(
            "no answer 30 s after the connections closed:\n{}",
            exp.stderr()
        )
    });
    assert_eq!(exp.pid(), pid);
    drop(cgroup);
    scrape(&addr, &exp);
}

#[test]
fn a_burst_of_connections_is_answered_even_when_tiny_http_queues_some() {
    let _heavy = support::heavy();
    let stub = Stub::standard();
    let exp = ready_exporter(&stub);
    let addr = exp.addr().to_string();
    // 200 connections at once, each with a request, each kept open after its
    // answer: tiny_http's pool queues some of them instead of starting a
    // thread, behind threads that then wait on kept connections.
    let mut conns: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).expect("connect");
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    let t = Instant::now();
    let mut slowest = Duration::ZERO;
    for (i, s) in conns.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while !buf.ends_with(b"ok\n") {
            match s.read(&mut chunk) {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                other => {
                    let after = t.elapsed();
                    thread::sleep(Duration::from_millis(500));
                    panic!(
                        "connection {i} of the burst got no answer after {after:?} ({other:?})\nstderr:\n{}",
                        exp.stderr()
                    )
                }
            }
        }
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        slowest < Duration::from_secs(5),
        "the burst's last answer came after {slowest:?}\nstderr:\n{}",
        exp.stderr()
    );
    eprintln!("burst of 200: every answer within {slowest:?}");
}
