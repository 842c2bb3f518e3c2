//! Metrics that every run writes, kept per thread slot ([`per_thread`](crate::per_thread)) and
//! summed when rendered: recording takes no lock and writes only the recording thread's cache
//! line, where one shared atomic or lock would move its line between the cores at each run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

use crate::per_thread::{SLOTS, slot};

/// One value per thread slot, each on cache lines of its own; clones share them.
#[derive(Debug)]
struct Slots<T>(Arc<[Padded<T>; SLOTS]>);

#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

impl<T> Clone for Slots<T> {
    fn clone(&self) -> Self {
        Slots(Arc::clone(&self.0))
    }
}

impl<T: Default> Default for Slots<T> {
    fn default() -> Self {
        Slots(Arc::new(std::array::from_fn(|_| Padded::default())))
    }
}

impl<T> Slots<T> {
    /// The calling thread's value.
    fn mine(&self) -> &T {
        &self.0[slot()].0
    }

    /// Every slot's value.
    fn all(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|padded| &padded.0)
    }
}

/// A Prometheus counter.
#[derive(Debug, Clone, Default)]
pub struct Counter(Slots<AtomicU64>);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.inc_by(1);
    }

    /// Adds `by`.
    pub fn inc_by(&self, by: u64) {
        self.0.mine().fetch_add(by, Ordering::Relaxed);
    }

    /// The total.
    pub fn get(&self) -> u64 {
        self.0.all().map(|count| count.load(Ordering::Relaxed)).fold(0, u64::wrapping_add)
    }
}

impl TypedMetric for Counter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for Counter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Upper bounds in seconds: 100 µs times powers of 4, up to about 7 minutes, then +Inf.
const BOUNDS: [f64; 13] = {
    let mut bounds = [f64::MAX; 13];
    let mut at = 0;
    let mut bound = 0.0001;
    while at < 12 {
        bounds[at] = bound;
        bound *= 4.0;
        at += 1;
    }
    bounds
};

/// One slot's observations.
#[derive(Debug, Default)]
struct Buckets {
    /// The sum's `f64` bits.
    sum: AtomicU64,
    /// Observations per bucket (not cumulative).
    counts: [AtomicU64; BOUNDS.len()],
}

/// A Prometheus histogram of durations in seconds.
#[derive(Debug, Clone, Default)]
pub struct DurationHistogram(Slots<Buckets>);

impl DurationHistogram {
    /// Records one duration of `seconds`.
    pub fn observe(&self, seconds: f64) {
        let mine = self.0.mine();
        let bucket = BOUNDS.iter().position(|bound| seconds <= *bound).unwrap_or(BOUNDS.len() - 1);
        mine.counts[bucket].fetch_add(1, Ordering::Relaxed);
        // Only threads sharing a slot compete here.
        let _ =
            mine.sum.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |sum| Some((f64::from_bits(sum) + seconds).to_bits()));
    }

    /// The sum of every observation, their count, and each bucket's bound and count.
    fn totals(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut sum = 0.0;
        let mut buckets: Vec<(f64, u64)> = BOUNDS.iter().map(|bound| (*bound, 0)).collect();
        for slot in self.0.all() {
            sum += f64::from_bits(slot.sum.load(Ordering::Relaxed));
            for (total, count) in buckets.iter_mut().zip(&slot.counts) {
                total.1 += count.load(Ordering::Relaxed);
            }
        }
        let count = buckets.iter().map(|(_, count)| count).sum();
        (sum, count, buckets)
    }
}

impl TypedMetric for DurationHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for DurationHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.totals();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_from_every_thread_are_counted_in_their_buckets() {
        let histogram = DurationHistogram::default();
        std::thread::scope(|scope| {
            for _ in 0..20 {
                let histogram = histogram.clone();
                scope.spawn(move || {
                    for _ in 0..1000 {
                        histogram.observe(0.00005);
                        histogram.observe(0.001);
                    }
                    histogram.observe(1e9);
                });
            }
        });
        let (sum, count, buckets) = histogram.totals();
        assert_eq!(count, 20 * 2001);
        assert_eq!(buckets[0], (0.0001, 20 * 1000), "0.05 ms is within the first bound");
        assert_eq!(buckets[2], (0.0016, 20 * 1000), "1 ms is within the third (1.6 ms)");
        assert_eq!(buckets[12], (f64::MAX, 20), "beyond every bound: +Inf");
        let expected = 20.0 * (1000.0 * 0.00105 + 1e9);
        assert!((sum - expected).abs() < 1e-6 * expected, "{sum} vs {expected}");
    }

    #[test]
    fn counters_add_up_across_threads() {
        let counter = Counter::default();
        std::thread::scope(|scope| {
            for _ in 0..20 {
                let counter = counter.clone();
                scope.spawn(move || (0..1000).for_each(|_| counter.inc_by(3)));
            }
        });
        assert_eq!(counter.get(), 60_000);
    }

    #[test]
    fn renders_as_a_prometheus_histogram() {
        let histogram = DurationHistogram::default();
        histogram.observe(0.0002);
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("step_seconds", "Step durations", histogram);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("# TYPE step_seconds histogram"), "{text}");
        assert!(text.contains("step_seconds_bucket{le=\"0.0001\"} 0"), "{text}");
        assert!(text.contains("step_seconds_bucket{le=\"0.0004\"} 1"), "{text}");
        assert!(text.contains("step_seconds_count 1"), "{text}");
    }
}
