//! The registry behind the `metrics` facade, and its Prometheus text exposition.
//!
//! Why not metrics-exporter-prometheus' own recorder: it cannot delete a series, and a
//! backend that a reload (or discovery) removes must not leave its ~70 series behind for
//! ever. The one way it offers is `idle_timeout` (metrics-util's `Recency`): a series whose
//! generation did not move between two renders further apart than the timeout is deleted.
//! Counters and gauges of a live but idle backend could be kept by touching them, but a
//! histogram's generation moves only when a sample is recorded: an idle live backend would
//! lose its histograms (their buckets with them) while its handle goes on recording into a
//! series nobody renders any more. Deleting by name needs its registry, which it keeps
//! private. So this is the smallest thing that deletes correctly: a map from key to atomic
//! storage per kind, histograms with fixed buckets as atomics, and the text format written
//! with the exporter's own `formatting` helpers (same output as before).
//!
//! Handles are `Arc`s into the maps: the data path bumps atomics and never takes a lock.
//! A lock is taken to register a handle (once per backend or listener), to render, and to
//! delete.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use metrics::{Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, SharedString, Unit};
use metrics_exporter_prometheus::LabelSet;
use metrics_exporter_prometheus::formatting::{
    sanitize_metric_name, write_help_line, write_metric_line, write_type_line,
};

/// Prometheus' default buckets, for a histogram registered without its own.
const DEFAULT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A histogram: a count per bucket (the last one above every bound, `+Inf`) and the sum.
pub struct Buckets {
    bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    /// An `f64`, as bits.
    sum: AtomicU64,
}

impl Buckets {
    fn new(bounds: &'static [f64]) -> Self {
        Buckets {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }
}

impl HistogramFn for Buckets {
    fn record(&self, value: f64) {
        // Prometheus buckets are `le`: a value equal to a bound belongs to it.
        let bucket = self.bounds.partition_point(|bound| *bound < value);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Default)]
pub struct Registry {
    counters: Mutex<BTreeMap<Key, Arc<AtomicU64>>>,
    gauges: Mutex<BTreeMap<Key, Arc<AtomicU64>>>,
    histograms: Mutex<BTreeMap<Key, Arc<Buckets>>>,
    help: Mutex<BTreeMap<String, SharedString>>,
    /// Bucket bounds by metric name.
    bounds: BTreeMap<&'static str, &'static [f64]>,
}

/// Whether `key` carries every label of `labels`.
fn has_labels(key: &Key, labels: &[(&str, &str)]) -> bool {
    labels
        .iter()
        .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v))
}

impl Registry {
    pub fn new(bounds: &[(&'static str, &'static [f64])]) -> Self {
        Registry {
            bounds: bounds.iter().copied().collect(),
            ..Registry::default()
        }
    }

    /// Deletes every series (of every kind) named `name` (any name when None) whose labels
    /// include all of `labels`. A handle still held for one of them goes on counting into
    /// storage nobody renders: call this only for series nobody will write again.
    pub fn forget(&self, name: Option<&str>, labels: &[(&str, &str)]) {
        let doomed = |key: &Key| name.is_none_or(|n| key.name() == n) && has_labels(key, labels);
        lock(&self.counters).retain(|key, _| !doomed(key));
        lock(&self.gauges).retain(|key, _| !doomed(key));
        lock(&self.histograms).retain(|key, _| !doomed(key));
    }

    /// Every series in the Prometheus text format, metric by metric in name order.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let help = lock(&self.help).clone();
        let counters: Vec<(Key, u64)> = lock(&self.counters)
            .iter()
            .map(|(k, v)| (k.clone(), v.load(Ordering::Relaxed)))
            .collect();
        write_family(
            &mut out,
            &help,
            "counter",
            &counters,
            |out, name, labels, v| {
                write_metric_line::<&str, u64>(out, name, None, labels, None, *v, None);
            },
        );
        let gauges: Vec<(Key, f64)> = lock(&self.gauges)
            .iter()
            .map(|(k, v)| (k.clone(), f64::from_bits(v.load(Ordering::Relaxed))))
            .collect();
        write_family(&mut out, &help, "gauge", &gauges, |out, name, labels, v| {
            write_metric_line::<&str, f64>(out, name, None, labels, None, *v, None);
        });
        let histograms: Vec<(Key, Arc<Buckets>)> = lock(&self.histograms)
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        write_family(&mut out, &help, "histogram", &histograms, write_histogram);
        out
    }
}

/// Writes the series of one kind, grouped by name (the keys come sorted by name): HELP and
/// TYPE once per name, then each series, then a blank line.
fn write_family<V>(
    out: &mut String,
    help: &BTreeMap<String, SharedString>,
    kind: &str,
    series: &[(Key, V)],
    mut line: impl FnMut(&mut String, &str, &LabelSet, &V),
) {
    let mut current: Option<String> = None;
    for (key, value) in series {
        let name = sanitize_metric_name(key.name());
        if current.as_deref() != Some(name.as_str()) {
            if current.is_some() {
                out.push('\n');
            }
            if let Some(text) = help.get(&name) {
                write_help_line(out, &name, None, None, text);
            }
            write_type_line(out, &name, None, None, kind);
            current = Some(name.clone());
        }
        let labels = LabelSet::from_key_and_global(key, &Default::default());
        line(out, &name, &labels, value);
    }
    if current.is_some() {
        out.push('\n');
    }
}

fn write_histogram(out: &mut String, name: &str, labels: &LabelSet, buckets: &Arc<Buckets>) {
    // Read once: the cumulative buckets, `+Inf` and `_count` agree with each other even
    // while samples arrive.
    let counts: Vec<u64> = buckets
        .counts
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    let mut cumulative = 0;
    for (bound, count) in buckets.bounds.iter().zip(&counts) {
        cumulative += count;
        write_metric_line(
            out,
            name,
            Some("bucket"),
            labels,
            Some(("le", bound)),
            cumulative,
            None,
        );
    }
    cumulative += counts.last().copied().unwrap_or(0);
    write_metric_line(
        out,
        name,
        Some("bucket"),
        labels,
        Some(("le", "+Inf")),
        cumulative,
        None,
    );
    let sum = f64::from_bits(buckets.sum.load(Ordering::Relaxed));
    write_metric_line::<&str, f64>(out, name, Some("sum"), labels, None, sum, None);
    write_metric_line::<&str, u64>(out, name, Some("count"), labels, None, cumulative, None);
}

impl metrics::Recorder for Registry {
    fn describe_counter(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        self.describe(key, description);
    }

    fn describe_gauge(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        self.describe(key, description);
    }

    fn describe_histogram(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        self.describe(key, description);
    }

    fn register_counter(&self, key: &Key, _metadata: &Metadata<'_>) -> Counter {
        let mut counters = lock(&self.counters);
        let storage = counters.entry(key.clone()).or_default();
        Counter::from_arc(Arc::clone(storage))
    }

    fn register_gauge(&self, key: &Key, _metadata: &Metadata<'_>) -> Gauge {
        let mut gauges = lock(&self.gauges);
        let storage = gauges
            .entry(key.clone())
            .or_insert_with(|| Arc::new(AtomicU64::new(0f64.to_bits())));
        Gauge::from_arc(Arc::clone(storage))
    }

    fn register_histogram(&self, key: &Key, _metadata: &Metadata<'_>) -> Histogram {
        let bounds = self
            .bounds
            .get(key.name())
            .copied()
            .unwrap_or(DEFAULT_BUCKETS);
        let mut histograms = lock(&self.histograms);
        let storage = histograms
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Buckets::new(bounds)));
        Histogram::from_arc(Arc::clone(storage))
    }
}

impl Registry {
    /// The first description of a name wins, as with the exporter's recorder.
    fn describe(&self, key: KeyName, description: SharedString) {
        let name = sanitize_metric_name(key.as_str());
        lock(&self.help).entry(name).or_insert(description);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics::Recorder as _;

    fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
        let labels: Vec<metrics::Label> = labels
            .iter()
            .map(|(k, v)| metrics::Label::new(*k, *v))
            .collect();
        Key::from_parts(name, labels)
    }

    const META: Metadata<'static> = Metadata::new("t", metrics::Level::INFO, None);

    #[test]
    fn renders_counters_gauges_and_cumulative_histograms() {
        let registry = Registry::new(&[("t_seconds", &[0.1, 1.0])]);
        registry.describe_counter("t_total".into(), None, "Things.".into());
        let c = registry.register_counter(&key("t_total", &[("pool", "p")]), &META);
        c.increment(3);
        let g = registry.register_gauge(&key("t_up", &[("pool", "p")]), &META);
        g.set(1.0);
        let h = registry.register_histogram(&key("t_seconds", &[("pool", "p")]), &META);
        for v in [0.05, 0.1, 0.5, 5.0] {
            h.record(v);
        }
        let text = registry.render();
        let expected = "\
# HELP t_total Things.
# TYPE t_total counter
t_total{pool=\"p\"} 3

# TYPE t_up gauge
t_up{pool=\"p\"} 1

# TYPE t_seconds histogram
t_seconds_bucket{pool=\"p\",le=\"0.1\"} 2
t_seconds_bucket{pool=\"p\",le=\"1\"} 3
t_seconds_bucket{pool=\"p\",le=\"+Inf\"} 4
t_seconds_sum{pool=\"p\"} 5.65
t_seconds_count{pool=\"p\"} 4

";
        assert_eq!(text, expected);
    }

    #[test]
    fn forget_deletes_every_kind_of_the_matching_series_only() {
        let registry = Registry::new(&[]);
        let gone = [("pool", "p"), ("backend", "gone")];
        let live = [("pool", "p"), ("backend", "live")];
        for labels in [&gone, &live] {
            registry
                .register_counter(&key("t_total", labels), &META)
                .increment(1);
            registry
                .register_gauge(&key("t_up", labels), &META)
                .set(1.0);
            registry
                .register_histogram(&key("t_seconds", labels), &META)
                .record(0.2);
        }
        registry
            .register_counter(
                &key(
                    "t_checks_total",
                    &[("pool", "p"), ("backend", "gone"), ("result", "pass")],
                ),
                &META,
            )
            .increment(1);
        registry.forget(None, &gone);
        let text = registry.render();
        assert!(!text.contains("\"gone\""), "{text}");
        assert_eq!(
            text.matches("backend=\"live\"").count(),
            2 + DEFAULT_BUCKETS.len() + 1 + 2
        );
        // A name gone entirely leaves no TYPE line behind.
        assert!(!text.contains("t_checks_total"), "{text}");
        // Registering again starts a fresh series.
        let again = registry.register_counter(&key("t_total", &gone), &META);
        again.increment(2);
        assert!(
            registry
                .render()
                .contains("t_total{pool=\"p\",backend=\"gone\"} 2")
        );
    }
}
