//! The collection loop: collect, publish, log what changed, wait. It owns the
//! Prefect client; the only things it shares are the metrics and the stop channel.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::collect;
use crate::collect::Snapshot;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::prefect::Client;

/// A failure in progress: logged at WARN when it starts, at DEBUG while it lasts,
/// at INFO when it ends, so a long outage is three lines, not thousands.
struct Outage {
    since: Instant,
    failures: u64,
}

/// Runs until `stop` is dropped or sent to; the wait between collections wakes
/// at once on either, so shutdown never waits for the interval.
pub fn run(mut client: Client, config: Config, metrics: Arc<Metrics>, stop: Receiver<()>) {
    let mut state = collect::State::default();
    let mut outage: Option<Outage> = None;
    let mut first_success = true;
    loop {
        let started = Instant::now();
        // The collection must end before the next one is due.
        let deadline = started + config.interval;
        let snap = collect::collect_all(&mut client, &config, &mut state, deadline);
        metrics.update(&snap);
        log_outcome(&snap, &mut outage, &mut first_success);
        drop(snap);
        release_free_memory();

        let wait = (started + config.interval).saturating_duration_since(Instant::now());
        match stop.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => continue,
            Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    log::debug!("collector stopped");
}

fn log_outcome(snap: &Snapshot, outage: &mut Option<Outage>, first_success: &mut bool) {
    match (snap.first_error(), outage.as_mut()) {
        (Some(err), None) => {
            log::warn!("collection failed: {err}");
            *outage = Some(Outage {
                since: Instant::now(),
                failures: 1,
            });
        }
        (Some(err), Some(o)) => {
            o.failures += 1;
            log::debug!("collection still failing ({} in a row): {err}", o.failures);
        }
        (None, o) => {
            if let Some(o) = o {
                log::info!(
                    "collection recovered after {} ({} failed collections)",
                    human(o.since.elapsed()),
                    o.failures
                );
            }
            *outage = None;
            let summary = snap.seed_summary();
            if *first_success {
                log::info!(
                    "first collection succeeded in {}: {summary}",
                    human(snap.duration)
                );
                *first_success = false;
            } else {
                log::debug!(
                    "collection succeeded in {}: {summary}",
                    human(snap.duration)
                );
            }
        }
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{:.0}ms", s * 1000.0)
    } else if s < 120.0 {
        format!("{s:.1}s")
    } else {
        format!("{:.0}m", s / 60.0)
    }
}

/// A collection reads answers of up to a few hundred KB (pages of runs at
/// start-up) and glibc's malloc keeps freed memory mapped, in one arena per
/// thread: without this the resident size stays at the high-water mark of the
/// largest collection and of the busiest scrape burst. `malloc_trim` returns the
/// free pages of every arena to the kernel; it costs tens of microseconds once
/// per collection.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
