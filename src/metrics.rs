//! Every series the exporter shows, defined in one place. A whole collection is
//! applied under one lock and rendered once, in the collector thread, so a scrape
//! only copies ready bytes: it never waits on Prefect, never sees half of a
//! collection, and costs the same whatever the number of series.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, UNIX_EPOCH};

use prometheus::{
    Encoder, Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

mod ops;

use crate::process::{self, ProcessStats};
use crate::snapshot::{
    DeploymentsPart, Histogram, RunHistograms, Snapshot, StateChanges, StateCount, WorkPoolsPart,
    TRACKED_END_STATES,
};

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
    api_requests: IntCounterVec,
    breakdowns: Breakdowns,
    ops: ops::OpsSeries,
}

/// The series of the optional groups (issue 5). Vectors without children are
/// not rendered, so a group's series appear with its first success; the
/// label-less ones are vectors with no labels for the same reason.
struct Breakdowns {
    flow_runs: IntGaugeVec,
    flow_runs_age: GaugeVec,
    flows: IntGaugeVec,
    deployments: IntGaugeVec,
    work_pools: IntGaugeVec,
    deployment_info: IntGaugeVec,
    deployment_last_run: GaugeVec,
    deployment_late: IntGaugeVec,
    work_pool_info: IntGaugeVec,
    work_pool_workers: IntGaugeVec,
    work_pool_heartbeat_age: GaugeVec,
    flow_run_state_changes: IntCounterVec,
    task_run_state_changes: IntCounterVec,
    /// The duration histograms, kept as plain data by the deployments group
    /// (cumulative since the exporter started) and rendered from it.
    histograms: Vec<prometheus::proto::MetricFamily>,
}

impl Breakdowns {
    fn new(registry: &Registry) -> Breakdowns {
        let int_vec = |name: &str, help: &str, labels: &[&str]| {
            let v =
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            register(registry, &v);
            v
        };
        let float_vec = |name: &str, help: &str, labels: &[&str]| {
            let v = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            register(registry, &v);
            v
        };
        let counter_vec = |name: &str, help: &str| {
            let v = IntCounterVec::new(Opts::new(name, help), &["state_name"])
                .expect("valid metric definition");
            register(registry, &v);
            v
        };
        Breakdowns {
            flow_run_state_changes: counter_vec(
                "prefect_flow_run_state_changes_total",
                "Flow-run state changes into each state since the exporter started, counted \
                 from Prefect's events (EXPORTER_EVENTS_SETTLE behind).",
            ),
            task_run_state_changes: counter_vec(
                "prefect_task_run_state_changes_total",
                "Task-run state changes into each state since the exporter started, counted \
                 from Prefect's events (EXPORTER_EVENTS_SETTLE behind; sent by the Prefect SDK).",
            ),
            histograms: Vec::new(),
            flow_runs: int_vec(
                "prefect_flow_runs",
                "Flow runs per state type and state name (custom names included).",
                &["state_type", "state_name"],
            ),
            flow_runs_age: float_vec(
                "prefect_flow_runs_age_seconds",
                "Seconds between the reading of prefect_flow_runs from Prefect and the last \
                 collection (the breakdown is read again after 3000 times its read time, \
                 at most EXPORTER_FLOW_RUNS_MAX_AGE).",
                &[],
            ),
            flows: int_vec("prefect_flows", "Flows known to Prefect.", &[]),
            deployments: int_vec("prefect_deployments", "Deployments known to Prefect.", &[]),
            work_pools: int_vec("prefect_work_pools", "Work pools known to Prefect.", &[]),
            deployment_info: int_vec(
                "prefect_deployment_info",
                "One series per deployment (at most EXPORTER_MAX_DEPLOYMENTS); always 1.",
                &["deployment", "flow", "work_pool", "paused", "status"],
            ),
            deployment_last_run: float_vec(
                "prefect_deployment_last_run_timestamp_seconds",
                "Unix time at which the newest run of the deployment ended in this state type.",
                &["deployment", "flow", "state_type"],
            ),
            deployment_late: int_vec(
                "prefect_deployment_late_flow_runs",
                "Flow runs of the deployment in the state Late.",
                &["deployment", "flow"],
            ),
            work_pool_info: int_vec(
                "prefect_work_pool_info",
                "One series per work pool; always 1.",
                &["work_pool", "type", "status", "paused"],
            ),
            work_pool_workers: int_vec(
                "prefect_work_pool_workers",
                "Workers of the work pool per status (ONLINE, OFFLINE).",
                &["work_pool", "status"],
            ),
            work_pool_heartbeat_age: float_vec(
                "prefect_work_pool_last_heartbeat_age_seconds",
                "Seconds from the newest worker heartbeat of the pool to the last collection.",
                &["work_pool"],
            ),
        }
    }

    /// Each apply replaces the group's series whole, so a state, deployment or
    /// pool that is gone loses its series in the same collection.
    fn apply_flow_runs(&self, counts: &[StateCount]) {
        self.flow_runs.reset();
        for c in counts {
            self.flow_runs
                .with_label_values(&[&c.state_type, &c.state_name])
                .set(clamp(c.count));
        }
    }

    fn apply_deployments(&self, part: &DeploymentsPart) {
        self.flows.reset();
        self.flows
            .with_label_values(&[] as &[&str])
            .set(clamp(part.flows));
        self.deployments.reset();
        self.deployments
            .with_label_values(&[] as &[&str])
            .set(clamp(part.deployments));
        self.deployment_info.reset();
        self.deployment_last_run.reset();
        self.deployment_late.reset();
        for d in &part.items {
            self.deployment_info
                .with_label_values(&[
                    &d.name,
                    &d.flow,
                    &d.work_pool,
                    bool_label(d.paused),
                    &d.status,
                ])
                .set(1);
            for (state_type, at) in TRACKED_END_STATES.iter().zip(d.last_run) {
                if let Some(at) = at {
                    self.deployment_last_run
                        .with_label_values(&[d.name.as_str(), d.flow.as_str(), state_type])
                        .set(at);
                }
            }
            self.deployment_late
                .with_label_values(&[&d.name, &d.flow])
                .set(clamp(d.late_runs));
        }
    }

    /// The totals only grow: each counter is raised to its total.
    fn apply_state_changes(&self, changes: &StateChanges) {
        for (vec, totals) in [
            (&self.flow_run_state_changes, &changes.flow_runs),
            (&self.task_run_state_changes, &changes.task_runs),
        ] {
            for (name, total) in totals {
                let c = vec.with_label_values(&[name]);
                c.inc_by(total.saturating_sub(c.get()));
            }
        }
    }

    fn apply_histograms(&mut self, items: &[RunHistograms]) {
        let mut duration = Vec::new();
        let mut delay = Vec::new();
        for h in items {
            let labels = [
                ("deployment", h.deployment.as_str()),
                ("flow", h.flow.as_str()),
            ];
            for (state_type, d) in TRACKED_END_STATES.iter().zip(&h.duration) {
                if let Some(d) = d {
                    let mut l = labels.to_vec();
                    l.push(("state_type", state_type));
                    duration.push(histogram_metric(&l, d));
                }
            }
            if let Some(d) = &h.start_delay {
                delay.push(histogram_metric(&labels, d));
            }
        }
        self.histograms.clear();
        for (name, help, metrics) in [
            (
                "prefect_flow_run_duration_seconds",
                "Wall time from start_time to end_time (0 if never started) of the \
                 deployment's flow runs that ended in this state type since the exporter \
                 started; _count is every such run.",
                duration,
            ),
            (
                "prefect_flow_run_start_delay_seconds",
                "Seconds from expected_start_time to start_time of the deployment's flow runs \
                 that ended since the exporter started (0 when early).",
                delay,
            ),
        ] {
            if metrics.is_empty() {
                continue;
            }
            let mut f = prometheus::proto::MetricFamily::default();
            f.set_name(name.into());
            f.set_help(help.into());
            f.set_field_type(prometheus::proto::MetricType::HISTOGRAM);
            f.set_metric(metrics);
            self.histograms.push(f);
        }
    }

    fn apply_work_pools(&self, part: &WorkPoolsPart) {
        self.work_pools.reset();
        self.work_pools
            .with_label_values(&[] as &[&str])
            .set(clamp(part.count));
        self.work_pool_info.reset();
        self.work_pool_workers.reset();
        self.work_pool_heartbeat_age.reset();
        for p in &part.pools {
            self.work_pool_info
                .with_label_values(&[&p.name, &p.pool_type, &p.status, bool_label(p.paused)])
                .set(1);
            for (status, n) in &p.workers {
                self.work_pool_workers
                    .with_label_values(&[&p.name, status])
                    .set(clamp(*n));
            }
            if let Some(age) = p.last_heartbeat_age {
                self.work_pool_heartbeat_age
                    .with_label_values(&[&p.name])
                    .set(age);
            }
        }
    }
}

fn histogram_metric(labels: &[(&str, &str)], h: &Histogram) -> prometheus::proto::Metric {
    let mut cumulative = 0;
    let buckets = h
        .bounds
        .iter()
        .zip(&h.counts)
        .map(|(bound, n)| {
            cumulative += n;
            let mut b = prometheus::proto::Bucket::default();
            b.set_upper_bound(*bound);
            b.set_cumulative_count(cumulative);
            b
        })
        .collect();
    let mut hist = prometheus::proto::Histogram::default();
    hist.set_bucket(buckets);
    hist.set_sample_count(h.count);
    hist.set_sample_sum(h.sum);
    let mut m = prometheus::proto::Metric::default();
    m.set_label(
        labels
            .iter()
            .map(|(k, v)| {
                let mut p = prometheus::proto::LabelPair::default();
                p.set_name((*k).into());
                p.set_value((*v).into());
                p
            })
            .collect(),
    );
    m.set_histogram(hist);
    m
}

fn bool_label(b: bool) -> &'static str {
    if b {
        "true"
    } else {
        "false"
    }
}

// Metric definitions are static and valid: a failure here is a programming error
// caught by the first test, never an input from outside.
fn int_gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("valid metric definition")
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
            api_requests: IntCounterVec::new(
                Opts::new(
                    "prefect_exporter_api_requests_total",
                    "Requests sent to the Prefect API, retries included, by HTTP status \
                     (code=\"none\": no answer, e.g. timeout or refused connection).",
                ),
                &["code"],
            )
            .expect("valid metric definition"),
            breakdowns: Breakdowns::new(&registry),
            ops: ops::OpsSeries::new(&registry),
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
        register(&registry, &series.api_requests);
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
        for (code, n) in &snap.requests {
            s.api_requests.with_label_values(&[code]).inc_by(*n);
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
        let b = &mut inner.series.breakdowns;
        if let Some(counts) = &snap.flow_runs {
            b.apply_flow_runs(counts);
        }
        if let Some(age) = snap.flow_runs_age {
            b.flow_runs_age.with_label_values(&[] as &[&str]).set(age);
        }
        if let Some(part) = &snap.deployments {
            b.apply_deployments(part);
            b.apply_histograms(&part.histograms);
        }
        if let Some(changes) = &snap.state_changes {
            b.apply_state_changes(changes);
        }
        if let Some(part) = &snap.work_pools {
            b.apply_work_pools(part);
        }
        inner.series.ops.apply(&snap.ops);
        if let Some(part) = &snap.work_pools {
            inner.series.ops.apply_pool_limits(part);
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
    fn render(&mut self) {
        let mut buf = Vec::with_capacity(self.rendered.len().max(4096));
        let mut families = self.registry.gather();
        families.extend(self.series.breakdowns.histograms.iter().cloned());
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
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
    use crate::snapshot::{DeploymentsPart, StateCount, WorkPoolsPart};
    use crate::snapshot::{GroupOutcome, SeedCounts};
    use std::time::SystemTime;

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
            flow_runs: None,
            flow_runs_age: None,
            deployments: None,
            work_pools: None,
            ops: Default::default(),
            state_changes: None,
            server_version: Some("3.9.1".into()),
            requests: if seed.is_some() {
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
    fn ready_once_the_first_collection_ends_even_when_it_failed() {
        let m = Metrics::new();
        match m.readiness() {
            Readiness::NotReady(r) => assert!(r.contains("no collection"), "{r}"),
            Readiness::Ready => panic!("ready before any collection ended"),
        }
        m.update(&snap(None));
        assert_eq!(value(&text(&m), "prefect_up"), Some(0.0));
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
        // A failed collection leaves the exporter ready: it still has /metrics to
        // show, and the failure is in prefect_up (see `Readiness`).
        assert_eq!(m.readiness(), Readiness::Ready);
        // Request counts add up across collections, by code.
        m.update(&snap(Some(COUNTS)));
        let t = text(&m);
        for (code, n) in [("200", 8.0), ("500", 1.0), ("none", 2.0)] {
            assert_eq!(
                value(
                    &t,
                    &format!("prefect_exporter_api_requests_total{{code=\"{code}\"}}")
                ),
                Some(n),
                "{code}"
            );
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

    fn part(names: &[&str]) -> DeploymentsPart {
        use crate::snapshot::DeploymentSeries;
        DeploymentsPart {
            flows: 3,
            deployments: names.len() as u64,
            items: names
                .iter()
                .map(|n| DeploymentSeries {
                    id: format!("id-{n}"),
                    name: n.to_string(),
                    flow: "etl".into(),
                    work_pool: String::new(),
                    paused: false,
                    status: "READY".into(),
                    last_run: [Some(1_700_000_000.5), None, Some(1_600_000_000.0)],
                    late_runs: 4,
                })
                .collect(),
            histograms: Vec::new(),
        }
    }

    fn breakdown_snap(
        flow_runs: Option<Vec<StateCount>>,
        deployments: Option<DeploymentsPart>,
        work_pools: Option<WorkPoolsPart>,
    ) -> Snapshot {
        let mut s = snap(Some(COUNTS));
        for (name, ok) in [
            ("flow_runs", flow_runs.is_some()),
            ("deployments", deployments.is_some()),
            ("work_pools", work_pools.is_some()),
        ] {
            s.groups.push(GroupOutcome {
                name,
                duration: Duration::from_millis(1),
                error: (!ok).then(|| "HTTP 500".to_string()),
            });
        }
        s.flow_runs_age = flow_runs.as_ref().map(|_| 12.5);
        s.flow_runs = flow_runs;
        s.deployments = deployments;
        s.work_pools = work_pools;
        s
    }

    use crate::snapshot::test_fixtures::count;

    #[test]
    fn breakdowns_are_absent_until_their_group_succeeds() {
        let m = Metrics::new();
        m.update(&snap(Some(COUNTS)));
        let t = text(&m);
        for name in [
            "prefect_flow_runs{",
            "prefect_flows ",
            "prefect_deployments ",
            "prefect_work_pools ",
            "prefect_deployment_info",
            "prefect_work_pool_info",
        ] {
            assert!(!t.contains(name), "{name} shown before its group ran");
        }
    }

    #[test]
    fn breakdowns_are_replaced_whole_and_kept_when_a_group_fails() {
        use crate::snapshot::WorkPoolSeries;
        let m = Metrics::new();
        let pools = WorkPoolsPart {
            count: 1,
            pools: vec![WorkPoolSeries {
                name: "pool-a".into(),
                pool_type: "process".into(),
                status: "READY".into(),
                paused: true,
                workers: vec![("OFFLINE".into(), 0), ("ONLINE".into(), 1)],
                last_heartbeat_age: Some(2.5),
                concurrency_limit: Some(5),
                active_slots: None,
            }],
        };
        m.update(&breakdown_snap(
            Some(vec![
                count("FAILED", "MyCustomFail", 2),
                count("COMPLETED", "Completed", 5),
            ]),
            Some(part(&["daily", "hourly"])),
            Some(pools.clone()),
        ));
        let t = text(&m);
        assert_eq!(
            value(
                &t,
                "prefect_flow_runs{state_name=\"MyCustomFail\",state_type=\"FAILED\"}"
            ),
            Some(2.0)
        );
        assert_eq!(value(&t, "prefect_flows"), Some(3.0));
        assert_eq!(value(&t, "prefect_deployments"), Some(2.0));
        assert_eq!(value(&t, "prefect_work_pools"), Some(1.0));
        assert_eq!(
            value(
                &t,
                "prefect_deployment_info{deployment=\"daily\",flow=\"etl\",paused=\"false\",status=\"READY\",work_pool=\"\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &t,
                "prefect_deployment_last_run_timestamp_seconds{deployment=\"daily\",flow=\"etl\",state_type=\"COMPLETED\"}"
            ),
            Some(1_700_000_000.5)
        );
        assert!(
            !t.contains("flow=\"etl\",state_type=\"FAILED\"}"),
            "no FAILED time known"
        );
        assert_eq!(
            value(
                &t,
                "prefect_deployment_late_flow_runs{deployment=\"hourly\",flow=\"etl\"}"
            ),
            Some(4.0)
        );
        assert_eq!(
            value(
                &t,
                "prefect_work_pool_info{paused=\"true\",status=\"READY\",type=\"process\",work_pool=\"pool-a\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &t,
                "prefect_work_pool_workers{status=\"ONLINE\",work_pool=\"pool-a\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &t,
                "prefect_work_pool_last_heartbeat_age_seconds{work_pool=\"pool-a\"}"
            ),
            Some(2.5)
        );

        // flow_runs and work_pools fail: their series keep their values; the
        // deployments group succeeds without "hourly", whose series go.
        m.update(&breakdown_snap(None, Some(part(&["daily"])), None));
        let t = text(&m);
        assert_eq!(
            value(
                &t,
                "prefect_flow_runs{state_name=\"Completed\",state_type=\"COMPLETED\"}"
            ),
            Some(5.0)
        );
        assert_eq!(
            value(
                &t,
                "prefect_work_pool_workers{status=\"ONLINE\",work_pool=\"pool-a\"}"
            ),
            Some(1.0)
        );
        assert!(!t.contains("hourly"), "{t}");
        assert!(t.contains("deployment=\"daily\""));
        assert_eq!(
            value(
                &t,
                "prefect_exporter_collector_success{collector=\"flow_runs\"}"
            ),
            Some(0.0)
        );
        assert_eq!(
            value(
                &t,
                "prefect_exporter_collector_success{collector=\"deployments\"}"
            ),
            Some(1.0)
        );

        // A state that empties disappears instead of keeping a stale count.
        m.update(&breakdown_snap(
            Some(vec![count("COMPLETED", "Completed", 6)]),
            Some(part(&[])),
            Some(WorkPoolsPart::default()),
        ));
        let t = text(&m);
        assert!(!t.contains("MyCustomFail"));
        assert!(!t.contains("pool-a"));
        assert!(!t.contains("prefect_deployment_info{"));
        assert_eq!(value(&t, "prefect_deployments"), Some(0.0));
    }

    #[test]
    fn state_changes_rise_to_their_totals_and_histograms_render() {
        use crate::snapshot::{Histogram, RunHistograms, StateChanges};
        use std::collections::BTreeMap;
        let changes = |failed: u64, custom: Option<u64>| {
            let mut flow_runs = BTreeMap::from([("Failed".to_string(), failed)]);
            if let Some(n) = custom {
                flow_runs.insert("MyState".into(), n);
            }
            StateChanges {
                flow_runs,
                task_runs: BTreeMap::from([("Completed".to_string(), 7)]),
            }
        };
        let m = Metrics::new();
        let mut s = breakdown_snap(None, Some(part(&["daily"])), None);
        s.state_changes = Some(changes(0, None));
        s.deployments.as_mut().unwrap().histograms = vec![RunHistograms {
            deployment: "daily".into(),
            flow: "etl".into(),
            duration: [
                Some(Histogram {
                    bounds: vec![1.0, 60.0],
                    counts: vec![1, 0, 2],
                    sum: 7200.5,
                    count: 3,
                }),
                None,
                None,
            ],
            start_delay: None,
        }];
        m.update(&s);
        let t = text(&m);
        let failed = "prefect_flow_run_state_changes_total{state_name=\"Failed\"}";
        assert_eq!(value(&t, failed), Some(0.0));
        assert_eq!(
            value(
                &t,
                "prefect_task_run_state_changes_total{state_name=\"Completed\"}"
            ),
            Some(7.0)
        );
        assert!(t.contains("# TYPE prefect_flow_run_state_changes_total counter"));
        assert!(t.contains("# TYPE prefect_flow_run_duration_seconds histogram"));
        let b = |le: &str| {
            format!(
                "prefect_flow_run_duration_seconds_bucket{{deployment=\"daily\",flow=\"etl\",state_type=\"COMPLETED\",le=\"{le}\"}}"
            )
        };
        assert_eq!(value(&t, &b("1")), Some(1.0));
        assert_eq!(value(&t, &b("60")), Some(1.0));
        assert_eq!(value(&t, &b("+Inf")), Some(3.0));
        assert_eq!(
            value(
                &t,
                "prefect_flow_run_duration_seconds_sum{deployment=\"daily\",flow=\"etl\",state_type=\"COMPLETED\"}"
            ),
            Some(7200.5)
        );
        assert!(!t.contains("prefect_flow_run_start_delay_seconds"), "{t}");
        // Later totals raise the counters; a failed group keeps them.
        s.state_changes = Some(changes(3, Some(1)));
        m.update(&s);
        s.state_changes = None;
        s.deployments.as_mut().unwrap().histograms.clear();
        m.update(&s);
        let t = text(&m);
        assert_eq!(value(&t, failed), Some(3.0));
        assert_eq!(
            value(
                &t,
                "prefect_flow_run_state_changes_total{state_name=\"MyState\"}"
            ),
            Some(1.0)
        );
        // No histogram left: the families go with them.
        assert!(!t.contains("prefect_flow_run_duration_seconds"), "{t}");
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
