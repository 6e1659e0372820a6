//! Series whose labels come from the configuration — domains, tags, backends — kept by the
//! layer that owns them and rendered in the Prometheus text format at scrape time.
//!
//! Where it sits: a leaf crate under the health checker, the Pingora adapter and the server.
//! The `metrics` facade's recorder never forgets a series, so a deleted domain or backend would
//! stay in `/metrics` forever (and an alert on it would fire forever). Series kept here belong
//! to a table their owner rebuilds when the configuration changes (off the request path) and
//! renders from: a series leaves the exposition when its domain or backend leaves the
//! configuration. Recording is an atomic add; nothing locks or allocates.

use std::fmt::{Display, Write};
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The count now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Latency buckets, in seconds: 0.5 ms to 10 s (upper bounds; `+Inf` is implicit).
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A histogram of durations over [`LATENCY_BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one observation of `seconds`.
    pub fn observe(&self, seconds: f64) {
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        if let Some(bucket) = self.buckets.get(i) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        // Saturating float-to-int cast: a negative or NaN duration counts as 0.
        let nanos = (seconds * 1e9) as u64;
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Observations per bucket of [`LATENCY_BUCKETS`] (not cumulative), the last one above
    /// every bound.
    pub fn bucket_counts(&self) -> [u64; LATENCY_BUCKETS.len() + 1] {
        std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed))
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

/// The type of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A monotonically increasing count.
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// Bucketed observations.
    Histogram,
}

/// Writes the text exposition format into a string.
#[derive(Debug)]
pub struct Exposition<'a> {
    out: &'a mut String,
}

impl<'a> Exposition<'a> {
    /// Appends to `out`.
    pub fn new(out: &'a mut String) -> Self {
        Self { out }
    }

    /// `# HELP` and `# TYPE` of a family; call once, before its samples.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample: `name{labels} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.out.push_str(name);
        self.labels(labels, None);
        let _ = writeln!(self.out, " {value}");
    }

    /// The `_bucket`, `_sum` and `_count` samples of `histogram`.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], histogram: &Histogram) {
        let mut cumulative = 0u64;
        for (i, bucket) in histogram.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = LATENCY_BUCKETS
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), f64::to_string);
            let _ = write!(self.out, "{name}_bucket");
            self.labels(labels, Some(&le));
            let _ = writeln!(self.out, " {cumulative}");
        }
        let sum = histogram.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = write!(self.out, "{name}_sum");
        self.labels(labels, None);
        let _ = writeln!(self.out, " {sum}");
        let _ = write!(self.out, "{name}_count");
        self.labels(labels, None);
        let _ = writeln!(self.out, " {cumulative}");
    }

    fn labels(&mut self, labels: &[(&str, &str)], le: Option<&str>) {
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.out.push('{');
        let all = labels.iter().copied().chain(le.map(|le| ("le", le)));
        for (i, (key, value)) in all.enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            self.out.push_str(key);
            self.out.push_str("=\"");
            for c in value.chars() {
                match c {
                    '\\' => self.out.push_str("\\\\"),
                    '"' => self.out.push_str("\\\""),
                    '\n' => self.out.push_str("\\n"),
                    c => self.out.push(c),
                }
            }
            self.out.push('"');
        }
        self.out.push('}');
    }
}

fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_labels_escaped() {
        let h = Histogram::default();
        h.observe(0.0001);
        h.observe(0.003);
        h.observe(42.0);
        assert_eq!(h.count(), 3);
        let mut out = String::new();
        let mut e = Exposition::new(&mut out);
        e.family("lat_seconds", Kind::Histogram, "Latency");
        e.histogram("lat_seconds", &[("domain", "a\"b")], &h);
        assert!(out.contains("# TYPE lat_seconds histogram\n"), "{out}");
        assert!(
            out.contains("lat_seconds_bucket{domain=\"a\\\"b\",le=\"0.0005\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("lat_seconds_bucket{domain=\"a\\\"b\",le=\"0.005\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("lat_seconds_bucket{domain=\"a\\\"b\",le=\"10\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("lat_seconds_bucket{domain=\"a\\\"b\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("lat_seconds_count{domain=\"a\\\"b\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("lat_seconds_sum{domain=\"a\\\"b\"} 42.0031\n"),
            "{out}"
        );
    }

    #[test]
    fn samples_without_labels() {
        let c = Counter::default();
        c.add(2);
        let mut out = String::new();
        Exposition::new(&mut out).sample("x_total", &[], c.get());
        assert_eq!(out, "x_total 2\n");
    }
}
