//! What /metrics shows: the exporter's own series, and each collect group's
//! last good families (`collect::family`). A whole collection is applied under
//! one lock and rendered once, in the collector thread, so a scrape only copies
//! ready bytes: it never waits on Prefect, never sees half of a collection, and
//! costs the same whatever the number of series.
//!
//! A group's success replaces its families, a failure keeps them: last good
//! values are kept, a vanished series goes in the same collection, and a group
//! is absent until its first success (a 0 shown before Prefect was ever
//! reached would read as "no runs in error").

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, UNIX_EPOCH};

use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::collect::Snapshot;
use crate::process::{self, ProcessStats};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Why /readyz says no, or nothing when it says yes. Ready means "/metrics has
/// a finished collection to show", whatever its result: a pod that turned unready
/// while Prefect is down would leave its Service, and Prometheus would stop
/// scraping it exactly when `prefect_up 0` and the PrefectDown alert matter. Why
/// a collection failed is in `prefect_up`, the error counter and the log.
#[derive(Clone, Debug, PartialEq)]
pub enum Readiness {
    Ready,
    NotReady(String),
}

pub struct Metrics {
    inner: Mutex<Inner>,
    process: Mutex<ProcessText>,
}

/// The `process_*` series are read at scrape time, as every Prometheus client
/// library does, so CPU and memory are current rather than as old as the last
/// collection; one reading serves all scrapes for `PROCESS_MAX_AGE`, so a scrape
/// flood costs no more /proc reads than one scraper.
struct ProcessText {
    read_at: Option<Instant>,
    text: Arc<Vec<u8>>,
}

const PROCESS_MAX_AGE: Duration = Duration::from_secs(1);

struct Inner {
    /// The exporter's own series.
    registry: Registry,
    own: Own,
    /// Each group's families from its last success.
    groups: BTreeMap<&'static str, Vec<MetricFamily>>,
    rendered: Arc<Vec<u8>>,
    readiness: Readiness,
}

/// How the collections went: present from the start, whatever Prefect does.
struct Own {
    collect_errors: IntCounter,
    up: IntGauge,
    last_success: Gauge,
    collect_duration: Gauge,
    collections: IntCounter,
    collector_success: IntGaugeVec,
    collector_duration: GaugeVec,
    api_requests: IntCounterVec,
}

// Metric definitions are static and valid: a failure here is a programming error
// caught by the first test, never an input from outside.
fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    c: prometheus::Result<C>,
) -> C {
    let c = c.expect("valid metric definition");
    registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

impl Own {
    fn new(r: &Registry) -> Own {
        let opts = |name, help| Opts::new(name, help);
        let build_info = register(
            r,
            IntGaugeVec::new(
                opts(
                    "prefect_exporter_build_info",
                    "Version and source revision of the running exporter; always 1.",
                ),
                &["version", "revision"],
            ),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("PREFECT_EXPORTER_REVISION")])
            .set(1);
        Own {
            collect_errors: register(
                r,
                IntCounter::new(
                    "prefect_exporter_collect_errors_total",
                    "Collections in which at least one request to Prefect failed.",
                ),
            ),
            up: register(
                r,
                IntGauge::new(
                    "prefect_up",
                    "1 when the last collection from the Prefect API succeeded, else 0.",
                ),
            ),
            last_success: register(
                r,
                Gauge::new(
                    "prefect_exporter_last_success_timestamp_seconds",
                    "Unix time of the end of the last successful collection.",
                ),
            ),
            collect_duration: register(
                r,
                Gauge::new(
                    "prefect_exporter_collect_duration_seconds",
                    "Wall time of the last collection, in seconds.",
                ),
            ),
            collections: register(
                r,
                IntCounter::new(
                    "prefect_exporter_collections_total",
                    "Collections run since the exporter started.",
                ),
            ),
            collector_success: register(
                r,
                IntGaugeVec::new(
                    opts(
                        "prefect_exporter_collector_success",
                        "1 when the collect group succeeded in the last collection, else 0.",
                    ),
                    &["collector"],
                ),
            ),
            collector_duration: register(
                r,
                GaugeVec::new(
                    opts(
                        "prefect_exporter_collector_duration_seconds",
                        "Wall time of the collect group in the last collection, in seconds.",
                    ),
                    &["collector"],
                ),
            ),
            api_requests: register(
                r,
                IntCounterVec::new(
                    opts(
                        "prefect_exporter_api_requests_total",
                        "Requests sent to the Prefect API, retries included, by HTTP status \
                         (code=\"none\": no answer, e.g. timeout or refused connection).",
                    ),
                    &["code"],
                ),
            ),
        }
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let own = Own::new(&registry);
        let mut inner = Inner {
            registry,
            own,
            groups: BTreeMap::new(),
            rendered: Arc::new(Vec::new()),
            readiness: Readiness::NotReady("no collection has finished yet".into()),
        };
        inner.render();
        Metrics {
            inner: Mutex::new(inner),
            process: Mutex::new(ProcessText {
                read_at: None,
                text: Arc::new(Vec::new()),
            }),
        }
    }

    /// Applies one whole collection and renders the text that scrapes will serve.
    pub fn update(&self, snap: &Snapshot) {
        let mut inner = self.lock();
        let ok = snap.succeeded();
        let s = &inner.own;
        s.collections.inc();
        s.collect_duration.set(snap.duration.as_secs_f64());
        s.up.set(i64::from(ok));
        if ok {
            let secs = snap
                .finished
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            s.last_success.set(secs);
        } else {
            s.collect_errors.inc();
        }
        for g in &snap.groups {
            s.collector_success
                .with_label_values(&[g.name])
                .set(i64::from(g.error.is_none()));
            s.collector_duration
                .with_label_values(&[g.name])
                .set(g.duration.as_secs_f64());
        }
        for (code, n) in &snap.requests {
            s.api_requests.with_label_values(&[code]).inc_by(*n);
        }
        for (group, families) in &snap.families {
            inner.groups.insert(group, families.clone());
        }
        inner.readiness = Readiness::Ready;
        inner.render();
    }

    /// The bytes of the last rendering; cheap enough for every scrape.
    pub fn rendered(&self) -> Arc<Vec<u8>> {
        Arc::clone(&self.lock().rendered)
    }

    /// The `process_*` series, to serve after `rendered()`.
    pub fn process_rendered(&self) -> Arc<Vec<u8>> {
        let mut p = self.process.lock().unwrap_or_else(|e| e.into_inner());
        if p.read_at.is_none_or(|t| t.elapsed() >= PROCESS_MAX_AGE) {
            p.text = Arc::new(render_process(&process::read()));
            p.read_at = Some(Instant::now());
        }
        Arc::clone(&p.text)
    }

    pub fn readiness(&self) -> Readiness {
        self.lock().readiness.clone()
    }

    /// A panic while holding the lock cannot leave the data half-written in a
    /// way that matters more than stopping to serve: keep serving.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Inner {
    /// Every family sorted by name, as `Registry::gather` sorts its own.
    fn render(&mut self) {
        let mut buf = Vec::with_capacity(self.rendered.len().max(4096));
        let mut families = self.registry.gather();
        families.extend(self.groups.values().flatten().cloned());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            log::error!("cannot render metrics: {e}");
            return;
        }
        self.rendered = Arc::new(buf);
    }
}

/// The exposition text of a reading; the fields that could not be read are left
/// out.
fn render_process(stats: &ProcessStats) -> Vec<u8> {
    let int = |v: Option<u64>| v.map(|v| v.to_string());
    let float = |v: Option<f64>| v.map(|v| v.to_string());
    let max_fds = stats.max_fds.map(|v| match v {
        v if v == usize::MAX as u64 => "+Inf".to_string(),
        v => v.to_string(),
    });
    let families = [
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            float(stats.cpu_seconds),
        ),
        (
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max_fds,
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            int(stats.open_fds),
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            int(stats.resident_bytes),
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            float(stats.start_time_seconds),
        ),
        (
            "process_threads",
            "gauge",
            "Number of OS threads in the process.",
            int(stats.threads),
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            int(stats.virtual_bytes),
        ),
    ];
    let mut out = String::with_capacity(1024);
    for (name, kind, help, value) in families {
        if let Some(v) = value {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            ));
        }
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::family::Family;
    use crate::collect::GroupOutcome;
    use std::time::SystemTime;

    /// A collection in which `seed` succeeded with `total` runs (or failed),
    /// and `deployments` with these deployment names (or failed).
    fn snap(total: Option<u64>, deployments: Option<&[&str]>) -> Snapshot {
        let outcome = |name, ok: bool| GroupOutcome {
            name,
            duration: Duration::from_millis(12),
            error: (!ok).then(|| "POST /flow_runs/count: HTTP 500".into()),
        };
        let mut families = Vec::new();
        if let Some(n) = total {
            let f = Family::single("prefect_flow_runs_total", "Flow runs.", n as f64);
            families.push(("seed", f.finish().into_iter().collect()));
        }
        if let Some(names) = deployments {
            let mut f = Family::gauge("prefect_deployment_info", "One per deployment.", &["d"]);
            for n in names {
                f.set(&[n], 1.0);
            }
            families.push(("deployments", f.finish().into_iter().collect()));
        }
        Snapshot {
            families,
            groups: vec![
                outcome("seed", total.is_some()),
                outcome("deployments", deployments.is_some()),
            ],
            requests: if total.is_some() {
                vec![("200".into(), 4)]
            } else {
                vec![("500".into(), 1), ("none".into(), 2)]
            },
            duration: Duration::from_millis(15),
            finished: SystemTime::now(),
        }
    }

    fn text(m: &Metrics) -> String {
        String::from_utf8(m.rendered().to_vec()).unwrap()
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.split(' ').next() == Some(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn a_group_appears_with_its_first_success() {
        let m = Metrics::new();
        let t = text(&m);
        assert!(value(&t, "prefect_flow_runs_total").is_none());
        assert!(
            !t.contains("prefect_flow_runs_total"),
            "no HELP either: {t}"
        );
        assert_eq!(value(&t, "prefect_up"), Some(0.0));
        assert_eq!(
            value(&t, "prefect_exporter_collect_errors_total"),
            Some(0.0)
        );
        assert!(matches!(m.readiness(), Readiness::NotReady(_)));
        m.update(&snap(Some(100), None));
        let t = text(&m);
        assert_eq!(value(&t, "prefect_flow_runs_total"), Some(100.0));
        assert!(!t.contains("prefect_deployment_info"), "{t}");
        assert_eq!(value(&t, "prefect_up"), Some(0.0), "deployments failed");
        assert_eq!(
            value(&t, "prefect_exporter_collector_success{collector=\"seed\"}"),
            Some(1.0)
        );
        assert_eq!(m.readiness(), Readiness::Ready);
    }

    #[test]
    fn ready_once_the_first_collection_ends_even_when_it_failed() {
        let m = Metrics::new();
        match m.readiness() {
            Readiness::NotReady(r) => assert!(r.contains("no collection"), "{r}"),
            Readiness::Ready => panic!("ready before any collection ended"),
        }
        m.update(&snap(None, None));
        assert_eq!(value(&text(&m), "prefect_up"), Some(0.0));
        assert_eq!(m.readiness(), Readiness::Ready);
    }

    #[test]
    fn a_success_replaces_a_groups_families_and_a_failure_keeps_them() {
        let m = Metrics::new();
        m.update(&snap(Some(100), Some(&["a", "b"])));
        let t = text(&m);
        assert_eq!(value(&t, "prefect_up"), Some(1.0));
        assert_eq!(value(&t, "prefect_deployment_info{d=\"b\"}"), Some(1.0));
        // Failed: last good values, counted once.
        m.update(&snap(None, None));
        let t = text(&m);
        assert_eq!(value(&t, "prefect_flow_runs_total"), Some(100.0));
        assert_eq!(value(&t, "prefect_deployment_info{d=\"b\"}"), Some(1.0));
        assert_eq!(value(&t, "prefect_up"), Some(0.0));
        assert_eq!(
            value(&t, "prefect_exporter_collect_errors_total"),
            Some(1.0)
        );
        assert_eq!(value(&t, "prefect_exporter_collections_total"), Some(2.0));
        assert_eq!(
            value(&t, "prefect_exporter_collector_success{collector=\"seed\"}"),
            Some(0.0)
        );
        assert_eq!(m.readiness(), Readiness::Ready);
        // A deployment gone in Prefect is gone in the same collection.
        m.update(&snap(Some(101), Some(&["a"])));
        let t = text(&m);
        assert_eq!(value(&t, "prefect_flow_runs_total"), Some(101.0));
        assert_eq!(value(&t, "prefect_deployment_info{d=\"a\"}"), Some(1.0));
        assert!(
            value(&t, "prefect_deployment_info{d=\"b\"}").is_none(),
            "{t}"
        );
        // Request counts add up across collections, by code.
        for (code, n) in [("200", 8.0), ("500", 1.0), ("none", 2.0)] {
            let series = format!("prefect_exporter_api_requests_total{{code=\"{code}\"}}");
            assert_eq!(value(&t, &series), Some(n), "{code}");
        }
    }

    #[test]
    fn families_render_sorted_by_name_with_their_help_and_type() {
        let m = Metrics::new();
        m.update(&snap(Some(100), Some(&["a"])));
        let t = text(&m);
        assert!(t.contains("# TYPE prefect_exporter_collect_errors_total counter"));
        assert!(t.contains("# HELP prefect_flow_runs_total Flow runs.\n"));
        assert!(t.contains("# TYPE prefect_flow_runs_total gauge\n"));
        let names: Vec<&str> = t
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
        assert!(names.contains(&"prefect_deployment_info"), "{names:?}");
    }

    #[test]
    fn rendering_leaves_out_what_was_not_read() {
        let text = String::from_utf8(render_process(&ProcessStats {
            resident_bytes: Some(4_300_000),
            max_fds: Some(usize::MAX as u64),
            cpu_seconds: Some(0.25),
            ..ProcessStats::default()
        }))
        .expect("utf-8");
        assert!(text.contains("# TYPE process_cpu_seconds_total counter\n"));
        assert!(text.contains("\nprocess_cpu_seconds_total 0.25\n"));
        assert!(text.contains("\nprocess_resident_memory_bytes 4300000\n"));
        assert!(text.contains("\nprocess_max_fds +Inf\n"));
        assert!(!text.contains("process_threads"));
        assert!(!text.contains("process_open_fds"));
        assert_eq!(render_process(&ProcessStats::default()), Vec::<u8>::new());
    }
}
