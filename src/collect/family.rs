//! One metric family as a collect group builds it from the answer it read:
//! name, HELP, type and label names are written where the data is walked, and
//! a group's families are replaced whole by each of its successes
//! (`metrics.rs`), so a series that is gone in Prefect is gone from /metrics in
//! the same collection. A family without series is not rendered, as
//! `Registry::gather` leaves out a vector without children.

use prometheus::proto::{self, MetricFamily, MetricType};

use crate::collect::durations::Histogram;

pub struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    labels: &'static [&'static str],
    metrics: Vec<proto::Metric>,
}

impl Family {
    pub fn gauge(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Self {
        Family::new(name, help, MetricType::GAUGE, labels)
    }

    pub fn counter(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> Self {
        Family::new(name, help, MetricType::COUNTER, labels)
    }

    pub fn histogram(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> Self {
        Family::new(name, help, MetricType::HISTOGRAM, labels)
    }

    fn new(
        name: &'static str,
        help: &'static str,
        kind: MetricType,
        labels: &'static [&'static str],
    ) -> Self {
        Family {
            name,
            help,
            kind,
            labels,
            metrics: Vec::new(),
        }
    }

    /// A family of one series without labels.
    pub fn single(name: &'static str, help: &'static str, v: f64) -> Self {
        let mut f = Family::gauge(name, help, &[]);
        f.set(&[], v);
        f
    }

    /// One series of a gauge or counter; `values` follow the label names.
    pub fn set(&mut self, values: &[&str], v: f64) {
        let mut m = self.metric(values);
        if self.kind == MetricType::COUNTER {
            let mut c = proto::Counter::default();
            c.set_value(v);
            m.set_counter(c);
        } else {
            let mut g = proto::Gauge::default();
            g.set_value(v);
            m.set_gauge(g);
        }
        self.metrics.push(m);
    }

    /// One series of a histogram.
    pub fn observe(&mut self, values: &[&str], h: &Histogram) {
        let mut cumulative = 0;
        let buckets = h
            .bounds
            .iter()
            .zip(&h.counts)
            .map(|(bound, n)| {
                cumulative += n;
                let mut b = proto::Bucket::default();
                b.set_upper_bound(*bound);
                b.set_cumulative_count(cumulative);
                b
            })
            .collect();
        let mut hist = proto::Histogram::default();
        hist.set_bucket(buckets);
        hist.set_sample_count(h.count);
        hist.set_sample_sum(h.sum);
        let mut m = self.metric(values);
        m.set_histogram(hist);
        self.metrics.push(m);
    }

    fn metric(&self, values: &[&str]) -> proto::Metric {
        debug_assert_eq!(values.len(), self.labels.len(), "{}", self.name);
        let mut pairs: Vec<proto::LabelPair> = self
            .labels
            .iter()
            .zip(values)
            .map(|(k, v)| {
                let mut p = proto::LabelPair::default();
                p.set_name((*k).into());
                p.set_value((*v).into());
                p
            })
            .collect();
        pairs.sort_by(|a, b| a.name().cmp(b.name()));
        let mut m = proto::Metric::default();
        m.set_label(pairs);
        m
    }

    /// The family as the encoder takes it, its series in the order
    /// `Registry::gather` gives (by label values, label names sorted); a
    /// label set written twice keeps its last value. `None` without series.
    pub fn finish(self) -> Option<MetricFamily> {
        if self.metrics.is_empty() {
            return None;
        }
        let values = |m: &proto::Metric| -> Vec<String> {
            m.get_label()
                .iter()
                .map(|p| p.value().to_string())
                .collect()
        };
        let mut metrics = self.metrics;
        metrics.reverse();
        metrics.sort_by_cached_key(values);
        metrics.dedup_by(|a, b| values(a) == values(b));
        let mut f = MetricFamily::default();
        f.set_name(self.name.into());
        f.set_help(self.help.into());
        f.set_field_type(self.kind);
        f.set_metric(metrics);
        Some(f)
    }
}

pub fn bool_label(b: bool) -> &'static str {
    if b {
        "true"
    } else {
        "false"
    }
}

/// The value of one series (label values in the family's label order), for
/// the groups' unit tests.
#[cfg(test)]
pub fn value(families: &[Family], name: &str, values: &[&str]) -> Option<f64> {
    let f = families.iter().find(|f| f.name == name)?;
    let wanted = f.metric(values);
    f.metrics
        .iter()
        .rev()
        .find(|m| m.get_label() == wanted.get_label())
        .map(|m| {
            if f.kind == MetricType::COUNTER {
                m.get_counter().get_value()
            } else {
                m.get_gauge().get_value()
            }
        })
}

/// The series of one family, for the groups' unit tests.
#[cfg(test)]
pub fn len(families: &[Family], name: &str) -> usize {
    families
        .iter()
        .find(|f| f.name == name)
        .map_or(0, |f| f.metrics.len())
}
