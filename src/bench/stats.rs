//! Latency accounting for the load generator: a lock-free log-linear histogram and percentiles.
//!
//! Values are recorded in nanoseconds into 3,776 buckets: exact below 128 ns, then 64 buckets
//! per power of two, so every reported percentile is within 1/64 (1.6 %) of the true value
//! while memory stays fixed however many samples a run takes. Min, max, sum and count are exact.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Value};

/// Values below this are their own bucket.
const LINEAR: u64 = 128;
/// Buckets per power of two above `LINEAR`.
const PER_OCTAVE: u64 = 64;
const BUCKETS: usize = (LINEAR + 56 * PER_OCTAVE + PER_OCTAVE) as usize;

fn bucket_of(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let msb = 63 - u64::from(v.leading_zeros());
    let shift = msb - 6;
    let mantissa = (v >> shift) - PER_OCTAVE;
    (LINEAR + (shift - 1) * PER_OCTAVE + mantissa) as usize
}

/// The smallest and largest value that land in bucket `i`.
fn bucket_bounds(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < LINEAR {
        return (i, i);
    }
    let k = i - LINEAR;
    let shift = k / PER_OCTAVE + 1;
    let low = (k % PER_OCTAVE + PER_OCTAVE) << shift;
    (low, low.saturating_add((1u64 << shift) - 1))
}

/// A histogram many tasks record into at once (relaxed atomics; read it after they are done).
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum: AtomicU64,
    min: AtomicU64,
    max: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            min: AtomicU64::new(u64::MAX),
            max: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn record(&self, nanos: u64) {
        self.buckets[bucket_of(nanos)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(nanos, Ordering::Relaxed);
        self.min.fetch_min(nanos, Ordering::Relaxed);
        self.max.fetch_max(nanos, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The value at quantile `q` (0–1) in nanoseconds: the middle of its bucket, clamped to the
    /// exact min and max. `None` when nothing was recorded.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let (min, max) = (
            self.min.load(Ordering::Relaxed),
            self.max.load(Ordering::Relaxed),
        );
        if q >= 1.0 {
            return Some(max);
        }
        if q <= 0.0 {
            return Some(min);
        }
        let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
        let mut seen = 0u64;
        for (i, bucket) in self.buckets.iter().enumerate() {
            seen += bucket.load(Ordering::Relaxed);
            if seen >= rank {
                let (low, high) = bucket_bounds(i);
                let mid = low + (high - low) / 2;
                return Some(mid.clamp(min, max));
            }
        }
        Some(max)
    }

    pub fn summary(&self) -> Summary {
        let count = self.count();
        let q = |x| self.quantile(x).unwrap_or(0);
        Summary {
            count,
            min: if count == 0 {
                0
            } else {
                self.min.load(Ordering::Relaxed)
            },
            mean: self
                .sum
                .load(Ordering::Relaxed)
                .checked_div(count)
                .unwrap_or(0),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: self.max.load(Ordering::Relaxed),
        }
    }
}

/// Percentiles of one histogram, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub count: u64,
    pub min: u64,
    pub mean: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Summary {
    /// The JSON form: microseconds, rounded to 0.1 µs.
    pub fn to_json(&self) -> Value {
        let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
        json!({
            "count": self.count,
            "min_us": us(self.min),
            "mean_us": us(self.mean),
            "p50_us": us(self.p50),
            "p90_us": us(self.p90),
            "p99_us": us(self.p99),
            "p99_9_us": us(self.p999),
            "max_us": us(self.max),
        })
    }
}

/// A duration in nanoseconds, human-readable with three significant digits.
pub fn human_ns(ns: u64) -> String {
    let ns = ns as f64;
    if ns >= 1e9 {
        format!("{:.3} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.3} ms", ns / 1e6)
    } else {
        format!("{:.1} µs", ns / 1e3)
    }
}

/// A rate with a k/M suffix.
pub fn human_rate(per_second: f64) -> String {
    if per_second >= 1e6 {
        format!("{:.2}M", per_second / 1e6)
    } else if per_second >= 1e4 {
        format!("{:.1}k", per_second / 1e3)
    } else {
        format!("{per_second:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut previous = 0;
        for v in (0..5000u64).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let i = bucket_of(v);
            assert!(i < BUCKETS, "{v}");
            assert!(i >= previous, "bucket order at {v}");
            previous = i;
            let (low, high) = bucket_bounds(i);
            assert!(low <= v && v <= high, "{v} not in [{low}, {high}]");
            assert!(high - low <= low / 64 + 1, "bucket too wide at {v}");
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn percentiles_are_within_bucket_precision() {
        let h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        // 1..=10_000 µs, each once.
        for us in 1..=10_000u64 {
            h.record(us * 1000);
        }
        let s = h.summary();
        assert_eq!(s.count, 10_000);
        assert_eq!(s.min, 1000);
        assert_eq!(s.max, 10_000_000);
        assert_eq!(s.mean, 5_000_500);
        for (got, want) in [
            (s.p50, 5_000_000.0),
            (s.p90, 9_000_000.0),
            (s.p99, 9_900_000.0),
            (s.p999, 9_990_000.0),
        ] {
            let err = (got as f64 - want).abs() / want;
            assert!(err < 0.016, "{got} vs {want}");
        }
        assert_eq!(h.quantile(1.0), Some(10_000_000));
        assert_eq!(h.quantile(0.0), Some(1000));
    }

    #[test]
    fn single_value_is_exact() {
        let h = Histogram::default();
        h.record(123_456_789);
        let s = h.summary();
        assert_eq!(
            (s.p50, s.p99, s.max, s.min),
            (123_456_789, 123_456_789, 123_456_789, 123_456_789)
        );
        assert_eq!(s.to_json()["p50_us"], 123_456.8);
    }
}
