//! Wiring only: configuration (exit 2 on error), logging, client, collector
//! thread, then the HTTP request loop on this main thread until SIGTERM/SIGINT,
//! then a clean exit 0.

use std::sync::{mpsc, Arc};
use std::time::Duration;

use prefect_exporter::config::{plain, Config, ConfigError, SETTINGS};
use prefect_exporter::{collector, metrics, prefect, server};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Exit codes: 2 for anything the user must fix in the settings, 1 for a
/// failure at run time (the port is taken).
const EXIT_CONFIG: i32 = 2;
const EXIT_RUNTIME: i32 = 1;

/// How long shutdown waits for a collection in flight: its requests only read,
/// so abandoning one loses nothing.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(300);
/// Longest a shutdown may take, whatever the request loop is doing.
const SHUTDOWN_DEADLINE: Duration = Duration::from_millis(800);

fn main() {
    limit_malloc_arenas();
    std::process::exit(run());
}

/// glibc gives every thread that allocates its own malloc arena (up to 8 per
/// core) and keeps an arena's memory mapped: with a thread per scrape connection
/// that is most of the resident size under load. One arena is plenty for one
/// collector and small scrape answers (measured: no loss of scrapes/s).
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: first thing in main, before any other thread exists; mallopt only
    // sets a parameter of the allocator.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn run() -> i32 {
    if let Some(arg) = std::env::args().nth(1) {
        match arg.as_str() {
            "-h" | "--help" => {
                print!("{}", help());
                return 0;
            }
            "-V" | "--version" => {
                println!("prefect-exporter {}", env!("CARGO_PKG_VERSION"));
                return 0;
            }
            _ => return fail(&ConfigError::UnknownArgument(arg)),
        }
    }
    let config = match Config::load(&|name| std::env::var(name).ok()) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let client = match prefect::Client::new(&config) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    init_logging(config.log_level.0);
    log::info!(
        "prefect-exporter {} starting: {config}",
        env!("CARGO_PKG_VERSION")
    );
    for w in &config.warnings {
        log::warn!("{w}");
    }

    match server::raise_descriptor_limit() {
        Ok((before, after)) if before != after => {
            log::debug!("open files limit raised from {before} to {after}")
        }
        Ok(_) => {}
        Err(e) => log::debug!("cannot raise the open files limit: {e}"),
    }
    let listening =
        server::inherited().unwrap_or_else(|| server::bind(config.address, config.port));
    let (listener, bound) = match listening {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot listen on {e} (check EXPORTER_ADDRESS and EXPORTER_PORT)");
            return EXIT_RUNTIME;
        }
    };
    // Installed before anything runs, so a signal is never missed or fatal.
    let mut signals = match Signals::new([SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot install signal handlers: {e}");
            return EXIT_RUNTIME;
        }
    };

    let metrics = Arc::new(metrics::Metrics::new());
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let collector_metrics = Arc::clone(&metrics);
    let spawned = std::thread::Builder::new()
        .name("collector".into())
        .spawn(move || {
            collector::run(client, config, collector_metrics, stop_rx);
            let _ = done_tx.send(());
        });
    if let Err(e) = spawned {
        log::error!("cannot start the collector thread: {e}");
        return EXIT_RUNTIME;
    }
    // The signal side only ends the request loop; the main thread does the rest.
    let shutdown = Arc::new(server::Shutdown::default());
    let on_signal = Arc::clone(&shutdown);
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let name = match signals.forever().next() {
                Some(SIGTERM) => "SIGTERM",
                Some(_) => "SIGINT",
                None => "end of signal stream",
            };
            log::info!("{name} received, shutting down");
            on_signal.request();
            // The request loop ends at once, unless it is writing to a client
            // that does not read (up to twice the write timeout): exit within
            // one second all the same.
            std::thread::sleep(SHUTDOWN_DEADLINE);
            log::info!("stopped (an HTTP answer was still being written)");
            std::process::exit(0);
        });
    if let Err(e) = spawned {
        log::error!("cannot start the signal thread: {e}");
        return EXIT_RUNTIME;
    }
    log::info!("listening on http://{bound}/metrics");
    server::serve(&listener, &metrics, &shutdown);

    // Wakes the collector from its wait between collections at once.
    drop(stop_tx);
    if done_rx.recv_timeout(SHUTDOWN_GRACE).is_err() {
        log::debug!("a collection was still in flight at shutdown; abandoned");
    }
    log::info!("stopped");
    0
}

fn fail(e: &ConfigError) -> i32 {
    eprintln!("prefect-exporter: {e}");
    EXIT_CONFIG
}

fn init_logging(level: log::LevelFilter) {
    let config = simplelog::ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_thread_level(log::LevelFilter::Off)
        .set_target_level(log::LevelFilter::Off)
        .set_location_level(log::LevelFilter::Off)
        // Only our own lines: the HTTP and TLS libraries log request headers at
        // TRACE, and headers carry the credentials.
        .add_filter_allow_str("prefect_exporter")
        .build();
    // Fails only if a logger is already set, which cannot happen here.
    let _ = simplelog::WriteLogger::init(level, config, std::io::stderr());
}

fn help() -> String {
    let mut out = format!(
        "prefect-exporter {}\n\
         Prometheus exporter for Prefect: collects flow-run counts from the Prefect REST API\n\
         every EXPORTER_INTERVAL seconds and serves them on /metrics.\n\n\
         Usage: prefect-exporter [--help | --version]\n\n\
         Settings (environment variables):\n",
        env!("CARGO_PKG_VERSION")
    );
    let width = SETTINGS.iter().map(|s| s.name.len()).max().unwrap_or(0);
    for s in SETTINGS {
        out.push_str(&format!(
            "  {:width$}  {} (default: {})\n",
            s.name,
            plain(s.meaning),
            plain(s.default)
        ));
    }
    out.push_str(
        "\nEndpoints: /metrics, /healthz (liveness), /readyz (readiness), / (index).\n\
         Exit codes: 0 after SIGTERM/SIGINT, 2 for a bad setting, 1 when the port cannot be bound.\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_has_a_line_with_the_default_for_every_setting() {
        let help = help();
        for s in SETTINGS {
            let (name, default) = (s.name, plain(s.default));
            let line = help
                .lines()
                .find(|l| {
                    l.trim_start()
                        .strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with(' '))
                })
                .unwrap_or_else(|| panic!("--help does not list {name}"));
            assert!(line.contains(&format!("(default: {default})")), "{line}");
        }
    }
}
