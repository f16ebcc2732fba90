//! The metric families of `/metrics` as data, encoded by the `prometheus-client` crate in the
//! Prometheus text format (0.0.4, what Prometheus scrapes from the agent today): the agent keeps
//! its own bounded, expiring state and hands its families to one collector per scrape.
//!
//! A label value is a [`LabelValue`], which cannot be empty: an empty value is no label to
//! Prometheus (`{x=""}` selects series without `x`), so [`Labels::with`] leaves the label out
//! instead, and no sample ever carries `x=""`.

use std::{borrow::Cow, fmt};

use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelSetEncoder,
        LabelValueEncoder,
    },
    metrics::{
        MetricType,
        counter::ConstCounter,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// The `Content-Type` of what [`text`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A label value that is never empty.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LabelValue(Cow<'static, str>);

impl LabelValue {
    /// `None` for an empty value.
    pub fn new(value: impl Into<Cow<'static, str>>) -> Option<Self> {
        let value = value.into();
        (!value.is_empty()).then_some(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl EncodeLabelValue for LabelValue {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
        fmt::Write::write_str(encoder, &self.0)
    }
}

/// The labels of one sample, in order; only non-empty values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels(Vec<(&'static str, LabelValue)>);

impl Labels {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `name="value"`, or nothing when `value` is empty.
    pub fn with(mut self, name: &'static str, value: impl Into<Cow<'static, str>>) -> Self {
        if let Some(v) = LabelValue::new(value) {
            self.0.push((name, v));
        }
        self
    }

    /// These labels, in order (values copied).
    pub fn of<const N: usize>(pairs: [(&'static str, &String); N]) -> Self {
        pairs
            .into_iter()
            .fold(Self::new(), |l, (name, value)| l.with(name, value.clone()))
    }

    /// One label.
    pub fn one(name: &'static str, value: impl Into<Cow<'static, str>>) -> Self {
        Self::new().with(name, value)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.0.iter().map(|(k, v)| (*k, v.as_str()))
    }
}

impl EncodeLabelSet for Labels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> fmt::Result {
        for (name, value) in &self.0 {
            prometheus_client::encoding::EncodeLabel::encode(
                &(*name, value.as_str()),
                encoder.encode_label(),
            )?;
        }
        Ok(())
    }
}

/// The samples of one family.
#[derive(Debug)]
pub enum Samples {
    Counter(Vec<(Labels, u64)>),
    /// A counter of seconds (or another fractional unit).
    CounterF64(Vec<(Labels, f64)>),
    Gauge(Vec<(Labels, i64)>),
    GaugeF64(Vec<(Labels, f64)>),
    Histogram(Histogram),
}

/// One metric family: name (counters with their `_total`), help and samples.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub help: Cow<'static, str>,
    pub samples: Samples,
}

impl Family {
    pub fn new(name: &'static str, help: impl Into<Cow<'static, str>>, samples: Samples) -> Self {
        Self {
            name,
            help: help.into(),
            samples,
        }
    }

    /// A counter without labels.
    pub fn counter(name: &'static str, help: impl Into<Cow<'static, str>>, value: u64) -> Self {
        Self::new(name, help, Samples::Counter(vec![(Labels::new(), value)]))
    }

    /// A gauge without labels.
    pub fn gauge(name: &'static str, help: impl Into<Cow<'static, str>>, value: i64) -> Self {
        Self::new(name, help, Samples::Gauge(vec![(Labels::new(), value)]))
    }

    /// A counter by labels.
    pub fn counters(
        name: &'static str,
        help: impl Into<Cow<'static, str>>,
        samples: impl IntoIterator<Item = (Labels, u64)>,
    ) -> Self {
        Self::new(name, help, Samples::Counter(samples.into_iter().collect()))
    }

    /// A gauge by labels.
    pub fn gauges(
        name: &'static str,
        help: impl Into<Cow<'static, str>>,
        samples: impl IntoIterator<Item = (Labels, i64)>,
    ) -> Self {
        Self::new(name, help, Samples::Gauge(samples.into_iter().collect()))
    }

    fn metric_type(&self) -> MetricType {
        match self.samples {
            Samples::Counter(_) | Samples::CounterF64(_) => MetricType::Counter,
            Samples::Gauge(_) | Samples::GaugeF64(_) => MetricType::Gauge,
            Samples::Histogram(_) => MetricType::Histogram,
        }
    }

    /// The name the encoder is given: it appends `_total` to counters itself.
    fn base_name(&self) -> &'static str {
        match self.metric_type() {
            MetricType::Counter => self.name.strip_suffix("_total").unwrap_or(self.name),
            _ => self.name,
        }
    }

    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let mut metric =
            encoder.encode_descriptor(self.base_name(), &self.help, None, self.metric_type())?;
        match &self.samples {
            Samples::Counter(s) => each(&mut metric, s, |v| ConstCounter::new(*v)),
            Samples::CounterF64(s) => each(&mut metric, s, |v| ConstCounter::new(*v)),
            Samples::Gauge(s) => each(&mut metric, s, |v| ConstGauge::new(*v)),
            Samples::GaugeF64(s) => each(&mut metric, s, |v| ConstGauge::new(*v)),
            Samples::Histogram(h) => h.encode(metric),
        }
    }
}

/// Encodes each sample of a family with its labels.
fn each<V, M: EncodeMetric>(
    metric: &mut prometheus_client::encoding::MetricEncoder,
    samples: &[(Labels, V)],
    value: impl Fn(&V) -> M,
) -> fmt::Result {
    for (labels, v) in samples {
        value(v).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

/// One scrape's families, as a collector the crate's registry encodes.
#[derive(Debug)]
struct Scrape(Vec<Family>);

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        self.0.iter().try_for_each(|f| f.encode(&mut encoder))
    }
}

/// The families in the Prometheus text format ([`CONTENT_TYPE`]).
pub fn text(families: Vec<Family>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(families)));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        .expect("formatting into a String does not fail");
    out
}

/// Buckets from `start` seconds, each `factor` times the last.
pub fn seconds_histogram(start: f64, factor: f64, count: u16) -> Histogram {
    Histogram::new(exponential_buckets(start, factor, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_label_values_are_left_out_and_counters_keep_their_total_suffix() {
        let f = Family::counters(
            "netprobe_x_total",
            "Help with a \\ and\na newline.",
            [(
                Labels::new()
                    .with("a", "1")
                    .with("empty", "")
                    .with("q", "say \"hi\""),
                3,
            )],
        );
        let out = text(vec![f, Family::gauge("netprobe_y", "A gauge.", -1)]);
        assert_eq!(
            out,
            "# HELP netprobe_x_total Help with a \\\\ and\\na newline.\n# TYPE netprobe_x_total counter\n\
             netprobe_x_total{a=\"1\",q=\"say \\\"hi\\\"\"} 3\n\
             # HELP netprobe_y A gauge.\n# TYPE netprobe_y gauge\nnetprobe_y -1\n"
        );
        assert_eq!(LabelValue::new(""), None);
    }

    #[test]
    fn a_histogram_has_buckets_sum_and_count() {
        let h = seconds_histogram(0.001, 2.0, 3);
        h.observe(0.0015);
        h.observe(10.0);
        let out = text(vec![Family::new(
            "netprobe_h_seconds",
            "H.",
            Samples::Histogram(h),
        )]);
        for line in [
            "netprobe_h_seconds_bucket{le=\"0.001\"} 0\n",
            "netprobe_h_seconds_bucket{le=\"0.002\"} 1\n",
            "netprobe_h_seconds_bucket{le=\"+Inf\"} 2\n",
            "netprobe_h_seconds_sum 10.0015\n",
            "netprobe_h_seconds_count 2\n",
        ] {
            assert!(out.contains(line), "{line} in:\n{out}");
        }
    }
}
