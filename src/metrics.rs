//! Every series the exporter shows, defined in one place. A whole collection is
//! applied under one lock and rendered once, in the collector thread, so a scrape
//! only copies ready bytes: it never waits on Prefect, never sees half of a
//! collection, and costs the same whatever the number of series.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::UNIX_EPOCH;

use prometheus::{
    Encoder, Gauge, GaugeVec, IntCounter, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::snapshot::Snapshot;

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Why /readyz says no, or nothing when it says yes.
#[derive(Clone, Debug, PartialEq)]
pub enum Readiness {
    Ready,
    NotReady(String),
}

pub struct Metrics {
    inner: Mutex<Inner>,
}

struct Inner {
    registry: Registry,
    series: Series,
    /// The seed gauges appear with the first good collection: a 0 shown before
    /// Prefect was ever reached would read as "no runs in error".
    seed_registered: bool,
    rendered: Arc<Vec<u8>>,
    readiness: Readiness,
}

struct Series {
    collect_errors: IntCounter,
    flow_runs_total: IntGauge,
    successes: IntGauge,
    in_error: IntGauge,
    in_warning: IntGauge,
    missing_deployments: IntGauge,
    up: IntGauge,
    last_success: Gauge,
    collect_duration: Gauge,
    collections: IntCounter,
    server_info: IntGaugeVec,
    collector_success: IntGaugeVec,
    collector_duration: GaugeVec,
}

// Metric definitions are static and valid: a failure here is a programming error
// caught by the first test, never an input from outside.
fn int_gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("valid metric definition")
}

fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: &C) {
    registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let series = Series {
            collect_errors: IntCounter::new(
                "prefect_exporter_collect_errors_total",
                "Collections in which at least one request to Prefect failed.",
            )
            .expect("valid metric definition"),
            flow_runs_total: int_gauge(
                "prefect_flow_runs_total",
                "Flow runs known to Prefect, in any state.",
            ),
            successes: int_gauge(
                "prefect_flow_runs_successes_total",
                "Flow runs whose state name is Completed or Cached.",
            ),
            in_error: int_gauge(
                "prefect_flow_runs_in_error_total",
                "Flow runs whose state name is RolledBack, Failed, TimedOut, Crashed or Suspended.",
            ),
            in_warning: int_gauge(
                "prefect_flow_runs_in_warning_total",
                "Flow runs whose state name is Cancelling, Cancelled, Paused or Retrying.",
            ),
            missing_deployments: int_gauge(
                "prefect_missing_deployments_total",
                "Flow names of EXPORTER_CHECK_DEPLOYMENTS that have no deployment.",
            ),
            up: int_gauge(
                "prefect_up",
                "1 when the last collection from the Prefect API succeeded, else 0.",
            ),
            last_success: Gauge::new(
                "prefect_exporter_last_success_timestamp_seconds",
                "Unix time of the end of the last successful collection.",
            )
            .expect("valid metric definition"),
            collect_duration: Gauge::new(
                "prefect_exporter_collect_duration_seconds",
                "Wall time of the last collection, in seconds.",
            )
            .expect("valid metric definition"),
            collections: IntCounter::new(
                "prefect_exporter_collections_total",
                "Collections run since the exporter started.",
            )
            .expect("valid metric definition"),
            server_info: IntGaugeVec::new(
                Opts::new(
                    "prefect_server_info",
                    "Version of the Prefect server, as the API reports it.",
                ),
                &["version"],
            )
            .expect("valid metric definition"),
            collector_success: IntGaugeVec::new(
                Opts::new(
                    "prefect_exporter_collector_success",
                    "1 when the collect group succeeded in the last collection, else 0.",
                ),
                &["collector"],
            )
            .expect("valid metric definition"),
            collector_duration: GaugeVec::new(
                Opts::new(
                    "prefect_exporter_collector_duration_seconds",
                    "Wall time of the collect group in the last collection, in seconds.",
                ),
                &["collector"],
            )
            .expect("valid metric definition"),
        };
        let build_info = IntGaugeVec::new(
            Opts::new(
                "prefect_exporter_build_info",
                "Version and source revision of the running exporter; always 1.",
            ),
            &["version", "revision"],
        )
        .expect("valid metric definition");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("PREFECT_EXPORTER_REVISION")])
            .set(1);

        register(&registry, &series.collect_errors);
        register(&registry, &series.up);
        register(&registry, &series.last_success);
        register(&registry, &series.collect_duration);
        register(&registry, &series.collections);
        register(&registry, &series.server_info);
        register(&registry, &series.collector_success);
        register(&registry, &series.collector_duration);
        register(&registry, &build_info);

        let mut inner = Inner {
            registry,
            series,
            seed_registered: false,
            rendered: Arc::new(Vec::new()),
            readiness: Readiness::NotReady("no collection has finished yet".into()),
        };
        inner.render();
        Metrics {
            inner: Mutex::new(inner),
        }
    }

    /// Applies one whole collection and renders the text that scrapes will serve.
    pub fn update(&self, snap: &Snapshot) {
        let mut inner = self.lock();
        let ok = snap.succeeded();
        let s = &inner.series;
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
        if let Some(v) = &snap.server_version {
            s.server_info.reset();
            s.server_info.with_label_values(&[v]).set(1);
        }
        if let Some(seed) = &snap.seed {
            s.flow_runs_total.set(clamp(seed.total));
            s.successes.set(clamp(seed.successes));
            s.in_error.set(clamp(seed.errors));
            s.in_warning.set(clamp(seed.warnings));
            s.missing_deployments.set(clamp(seed.missing_deployments));
            if !inner.seed_registered {
                let s = &inner.series;
                for g in [
                    &s.flow_runs_total,
                    &s.successes,
                    &s.in_error,
                    &s.in_warning,
                    &s.missing_deployments,
                ] {
                    register(&inner.registry, g);
                }
                inner.seed_registered = true;
            }
        }
        inner.readiness = match (ok, snap.first_error()) {
            (true, _) => Readiness::Ready,
            (false, Some(e)) => Readiness::NotReady(format!("last collection failed: {e}")),
            (false, None) => Readiness::NotReady("last collection failed".into()),
        };
        inner.render();
    }

    /// The bytes of the last rendering; cheap enough for every scrape.
    pub fn rendered(&self) -> Arc<Vec<u8>> {
        Arc::clone(&self.lock().rendered)
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
    fn render(&mut self) {
        let mut buf = Vec::with_capacity(self.rendered.len().max(4096));
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            log::error!("cannot render metrics: {e}");
            return;
        }
        self.rendered = Arc::new(buf);
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{GroupOutcome, SeedCounts};
    use std::time::{Duration, SystemTime};

    fn snap(seed: Option<SeedCounts>) -> Snapshot {
        Snapshot {
            groups: vec![GroupOutcome {
                name: "seed",
                duration: Duration::from_millis(12),
                error: if seed.is_some() {
                    None
                } else {
                    Some("POST /flow_runs/count: HTTP 500".into())
                },
            }],
            seed,
            server_version: Some("3.9.1".into()),
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

    const COUNTS: SeedCounts = SeedCounts {
        total: 100,
        successes: 40,
        errors: 7,
        warnings: 3,
        missing_deployments: 2,
    };

    #[test]
    fn seed_values_appear_after_first_success() {
        let m = Metrics::new();
        let t = text(&m);
        assert!(value(&t, "prefect_flow_runs_total").is_none());
        assert_eq!(value(&t, "prefect_up"), Some(0.0));
        assert!(matches!(m.readiness(), Readiness::NotReady(_)));
        m.update(&snap(Some(COUNTS)));
        let t = text(&m);
        assert_eq!(value(&t, "prefect_flow_runs_total"), Some(100.0));
        assert_eq!(value(&t, "prefect_flow_runs_successes_total"), Some(40.0));
        assert_eq!(value(&t, "prefect_flow_runs_in_error_total"), Some(7.0));
        assert_eq!(value(&t, "prefect_flow_runs_in_warning_total"), Some(3.0));
        assert_eq!(value(&t, "prefect_missing_deployments_total"), Some(2.0));
        assert_eq!(value(&t, "prefect_up"), Some(1.0));
        assert_eq!(
            value(&t, "prefect_exporter_collect_errors_total"),
            Some(0.0)
        );
        assert_eq!(
            value(&t, "prefect_server_info{version=\"3.9.1\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&t, "prefect_exporter_collector_success{collector=\"seed\"}"),
            Some(1.0)
        );
        assert_eq!(m.readiness(), Readiness::Ready);
    }

    #[test]
    fn failed_collection_keeps_last_good_values_and_counts_once() {
        let m = Metrics::new();
        m.update(&snap(Some(COUNTS)));
        m.update(&snap(None));
        let t = text(&m);
        assert_eq!(value(&t, "prefect_flow_runs_total"), Some(100.0));
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
        match m.readiness() {
            Readiness::NotReady(r) => assert!(r.contains("HTTP 500"), "{r}"),
            Readiness::Ready => panic!("must not be ready after a failure"),
        }
    }

    #[test]
    fn types_and_help_are_declared() {
        let m = Metrics::new();
        m.update(&snap(Some(COUNTS)));
        let t = text(&m);
        assert!(t.contains("# TYPE prefect_exporter_collect_errors_total counter"));
        for g in [
            "prefect_flow_runs_total",
            "prefect_flow_runs_successes_total",
            "prefect_flow_runs_in_error_total",
            "prefect_flow_runs_in_warning_total",
            "prefect_missing_deployments_total",
            "prefect_up",
        ] {
            assert!(t.contains(&format!("# TYPE {g} gauge")), "{g}");
            assert!(t.contains(&format!("# HELP {g} ")), "{g}");
        }
        assert!(t.contains("prefect_exporter_build_info{revision="));
    }
}
