//! `prefect_flow_run_duration_seconds{deployment,flow,state_type}` and
//! `prefect_flow_run_start_delay_seconds{deployment,flow}`, histograms fed by
//! the runs the deployments group already reads for the last-run times (runs
//! that ended in COMPLETED, FAILED or CRASHED, by `end_time`): no request of
//! their own.
//!
//! - Only runs that ended after the exporter started are observed, once each:
//!   the passes overlap (see deployments.rs), so the ids observed are kept
//!   until their end time falls before the lower bound of the pass, after
//!   which no pass can return them again. Memory is bounded by the runs that
//!   end within the overlap.
//! - The duration is `end_time - start_time`: the wall time from the run's
//!   first Running state to its end, retries and the waits between them
//!   included, which is what a user waiting for the run (or an SLA) sees.
//!   `total_run_time` counts only the time spent Running, so a run that spent
//!   an hour in AwaitingRetry would look fast. A run that never started (no
//!   `start_time`: Cached, or crashed before running) is observed as 0, so
//!   that `_count` counts every finished run: its rate by `state_type` is the
//!   deployment's rate of successes and failures.
//! - The start delay is `start_time - expected_start_time` (its scheduled
//!   time), 0 when it started early; none for a run that never started.

use std::collections::{HashMap, HashSet};

use super::deployments::TRACKED_END_STATES;
use super::family::Family;
use crate::rfc3339;

/// Observations of one histogram: `counts[i]` values fell at or below
/// `bounds[i]` and above the bound before it (not cumulative).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    /// One more than `bounds`: the last is above every bound (`+Inf`).
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

/// The histograms of one listed deployment.
struct RunHistograms {
    deployment: String,
    flow: String,
    /// Run durations by end state, in `TRACKED_END_STATES` order.
    duration: [Option<Histogram>; 3],
    start_delay: Option<Histogram>,
}

/// The fields of an ended run that the histograms need.
pub struct Ended<'a> {
    pub id: &'a str,
    pub deployment_id: Option<&'a str>,
    pub state_type: &'a str,
    pub start_time: Option<&'a str>,
    pub end_time: Option<&'a str>,
    pub expected_start_time: Option<&'a str>,
}

/// What this module remembers between collections.
pub struct Durations {
    /// Unix time of the exporter's start: runs that ended before are not observed.
    started: f64,
    /// Observed run id -> its end time.
    seen: HashMap<String, f64>,
    by_deployment: HashMap<String, DeploymentHistograms>,
}

#[derive(Default, Clone)]
struct DeploymentHistograms {
    duration: [Option<Histogram>; 3],
    start_delay: Option<Histogram>,
}

impl Default for Durations {
    fn default() -> Self {
        Durations::new(rfc3339::now())
    }
}

fn observe_into(slot: &mut Option<Histogram>, bounds: &[f64], v: f64) {
    let h = slot.get_or_insert_with(|| Histogram {
        bounds: bounds.to_vec(),
        counts: vec![0; bounds.len() + 1],
        sum: 0.0,
        count: 0,
    });
    let i = h
        .bounds
        .iter()
        .position(|b| v <= *b)
        .unwrap_or(h.bounds.len());
    h.counts[i] += 1;
    h.sum += v;
    h.count += 1;
}

impl Durations {
    pub fn new(started: f64) -> Durations {
        Durations {
            started,
            seen: HashMap::new(),
            by_deployment: HashMap::new(),
        }
    }

    /// One page of a pass whose lower bound is `after`.
    pub fn observe<'a>(
        &mut self,
        after: f64,
        runs: impl Iterator<Item = Ended<'a>>,
        bounds: &[f64],
    ) {
        self.seen.retain(|_, end| *end >= after);
        for run in runs {
            let Some(dep) = run.deployment_id else {
                continue;
            };
            let Some(slot) = TRACKED_END_STATES.iter().position(|t| *t == run.state_type) else {
                continue;
            };
            let Some(end) = run.end_time.and_then(rfc3339::parse) else {
                continue;
            };
            if end < self.started || self.seen.contains_key(run.id) {
                continue;
            }
            self.seen.insert(run.id.to_string(), end);
            let start = run.start_time.and_then(rfc3339::parse);
            let expected = run.expected_start_time.and_then(rfc3339::parse);
            let h = self.by_deployment.entry(dep.to_string()).or_default();
            let duration = start.map_or(0.0, |s| (end - s).max(0.0));
            observe_into(&mut h.duration[slot], bounds, duration);
            if let (Some(start), Some(expected)) = (start, expected) {
                observe_into(&mut h.start_delay, bounds, (start - expected).max(0.0));
            }
        }
    }

    /// The families of the listed deployments (id, name, flow name),
    /// cumulative since the exporter started.
    pub fn families<'a>(
        &mut self,
        listed: impl Iterator<Item = (&'a str, &'a str, &'a str)>,
        capped: bool,
    ) -> Vec<Family> {
        let mut duration = Family::histogram(
            "prefect_flow_run_duration_seconds",
            "Wall time from start_time to end_time (0 if never started) of the \
             deployment's flow runs that ended in this state type since the exporter \
             started; _count is every such run.",
            &["deployment", "flow", "state_type"],
        );
        let mut delay = Family::histogram(
            "prefect_flow_run_start_delay_seconds",
            "Seconds from expected_start_time to start_time of the deployment's flow runs \
             that ended since the exporter started (0 when early).",
            &["deployment", "flow"],
        );
        for h in self.series(listed, capped) {
            let (dep, flow) = (h.deployment.as_str(), h.flow.as_str());
            for (state_type, d) in TRACKED_END_STATES.iter().zip(&h.duration) {
                if let Some(d) = d {
                    duration.observe(&[dep, flow, state_type], d);
                }
            }
            if let Some(d) = &h.start_delay {
                delay.observe(&[dep, flow], d);
            }
        }
        vec![duration, delay]
    }

    /// The histograms of the listed deployments. Unless the list was cut by
    /// EXPORTER_MAX_DEPLOYMENTS, a deployment that is not listed is gone, and
    /// so are its histograms.
    fn series<'a>(
        &mut self,
        listed: impl Iterator<Item = (&'a str, &'a str, &'a str)>,
        capped: bool,
    ) -> Vec<RunHistograms> {
        let mut out = Vec::new();
        let mut keep = HashSet::new();
        for (id, name, flow) in listed {
            keep.insert(id);
            if let Some(h) = self.by_deployment.get(id) {
                out.push(RunHistograms {
                    deployment: name.to_string(),
                    flow: flow.to_string(),
                    duration: h.duration.clone(),
                    start_delay: h.start_delay.clone(),
                });
            }
        }
        if !capped {
            self.by_deployment
                .retain(|id, _| keep.contains(id.as_str()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> f64 {
        rfc3339::parse(s).unwrap()
    }

    fn run<'a>(
        id: &'a str,
        state_type: &'a str,
        start: Option<&'a str>,
        end: &'a str,
        expected: Option<&'a str>,
    ) -> Ended<'a> {
        Ended {
            id,
            deployment_id: Some("d1"),
            state_type,
            start_time: start,
            end_time: Some(end),
            expected_start_time: expected,
        }
    }

    const BOUNDS: [f64; 3] = [1.0, 60.0, 3600.0];

    #[test]
    fn recorded_run_is_observed_by_end_minus_start() {
        let v: serde_json::Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/flow_runs_filter_failed_run.json"
        ))
        .unwrap();
        let r = &v["response"][0];
        let s = |k: &str| r[k].as_str();
        let ended = Ended {
            id: s("id").unwrap(),
            deployment_id: s("deployment_id"),
            state_type: s("state_type").unwrap(),
            start_time: s("start_time"),
            end_time: s("end_time"),
            expected_start_time: s("expected_start_time"),
        };
        let mut d = Durations::new(t("2026-12-01T06:00:00Z"));
        d.observe(0.0, [ended].into_iter(), &BOUNDS);
        let dep = s("deployment_id").unwrap();
        let out = d.series([(dep, "tdep", "tflow")].into_iter(), false);
        assert_eq!(out.len(), 1);
        let failed = out[0].duration[1].as_ref().expect("a FAILED duration");
        // 06:20:06.430699 -> 06:20:08.176983 (total_run_time says 1.746284 too).
        assert!((failed.sum - 1.746284).abs() < 1e-6, "{}", failed.sum);
        assert_eq!(failed.counts, [0, 1, 0, 0]);
        assert!(out[0].duration[0].is_none() && out[0].duration[2].is_none());
        // Scheduled for 06:00:00, started 06:20:06.430699.
        let delay = out[0].start_delay.as_ref().unwrap();
        assert!((delay.sum - 1206.430699).abs() < 1e-6, "{}", delay.sum);
        assert_eq!(delay.counts, [0, 0, 1, 0]);
    }

    #[test]
    fn each_run_once_after_the_start_and_bounded_memory() {
        let mut d = Durations::new(t("2026-12-01T10:00:00Z"));
        let page = || {
            [
                // 30 s, in the 60 s bucket.
                run(
                    "a",
                    "COMPLETED",
                    Some("2026-12-01T10:00:00Z"),
                    "2026-12-01T10:00:30Z",
                    Some("2026-12-01T09:59:59.5Z"),
                ),
                // Exactly on a bound: in that bucket (le).
                run(
                    "b",
                    "COMPLETED",
                    Some("2026-12-01T10:00:00Z"),
                    "2026-12-01T10:01:00Z",
                    None,
                ),
                // Ended before the exporter started: not observed.
                run(
                    "c",
                    "FAILED",
                    Some("2026-12-01T09:00:00Z"),
                    "2026-12-01T09:59:59Z",
                    None,
                ),
                // Never started: a duration of 0 (counted), no delay.
                run("d", "COMPLETED", None, "2026-12-01T10:02:00Z", None),
                // Untracked type.
                run(
                    "e",
                    "CANCELLED",
                    Some("2026-12-01T10:00:00Z"),
                    "2026-12-01T10:03:00Z",
                    None,
                ),
                // Two hours, started early.
                run(
                    "f",
                    "CRASHED",
                    Some("2026-12-01T10:00:00Z"),
                    "2026-12-01T12:00:00Z",
                    Some("2026-12-01T10:00:10Z"),
                ),
            ]
        };
        let after = t("2026-12-01T09:00:00Z");
        d.observe(after, page().into_iter(), &BOUNDS);
        // The next, overlapping pass sees them all again: nothing changes.
        d.observe(after, page().into_iter(), &BOUNDS);
        let out = d.series([("d1", "daily", "etl")].into_iter(), false);
        let done = out[0].duration[0].as_ref().unwrap();
        assert_eq!(done.counts, [1, 2, 0, 0]);
        assert_eq!(done.count, 3);
        assert_eq!(done.sum, 90.0);
        assert!(out[0].duration[1].is_none());
        let crashed = out[0].duration[2].as_ref().unwrap();
        assert_eq!(crashed.counts, [0, 0, 0, 1]);
        let delay = out[0].start_delay.as_ref().unwrap();
        assert_eq!(delay.counts, [2, 0, 0, 0]);
        assert_eq!(delay.sum, 0.5);
        assert_eq!(d.seen.len(), 4, "{:?}", d.seen);
        // A pass starting later forgets the ids that ended before it.
        d.observe(t("2026-12-01T10:01:30Z"), std::iter::empty(), &BOUNDS);
        let mut left: Vec<&String> = d.seen.keys().collect();
        left.sort();
        assert_eq!(left, ["d", "f"]);
        // An unlisted deployment loses its histograms, unless the list was capped.
        assert!(d.series(std::iter::empty(), true).is_empty());
        assert_eq!(d.by_deployment.len(), 1);
        assert!(d.series(std::iter::empty(), false).is_empty());
        assert!(d.by_deployment.is_empty());
    }
}
