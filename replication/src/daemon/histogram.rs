//! A latency histogram that is cheap enough for every FUSE op: three relaxed atomic adds
//! per observation, no lock, fixed buckets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Upper bounds of the buckets, in nanoseconds (10 µs … 10 s).
const BOUNDS_NS: [u64; 19] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

#[derive(Debug)]
pub struct Histogram {
    /// Per-bucket counts (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; BOUNDS_NS.len() + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }
}

/// What a histogram held at one instant: sum in seconds, count, and cumulative buckets
/// (upper bound in seconds, count), ending with +Inf.
pub struct Snapshot {
    pub sum: f64,
    pub count: u64,
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    pub fn observe_ns(&self, ns: u64) {
        let i = BOUNDS_NS.partition_point(|&b| b < ns);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Records the time since `t0`.
    pub fn observe_since(&self, t0: Instant) {
        self.observe_ns(t0.elapsed().as_nanos().min(u64::MAX as u128) as u64);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut cum = 0;
        let mut buckets = Vec::with_capacity(BOUNDS_NS.len() + 1);
        for (i, b) in self.buckets.iter().enumerate() {
            cum += b.load(Ordering::Relaxed);
            let bound = BOUNDS_NS
                .get(i)
                .map_or(f64::INFINITY, |&ns| ns as f64 / 1e9);
            buckets.push((bound, cum));
        }
        Snapshot {
            sum: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            // The buckets were read one by one: report their total so the count and the
            // +Inf bucket always agree.
            count: cum,
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe_ns(5_000);
        h.observe_ns(10_000);
        h.observe_ns(2_000_000);
        h.observe_ns(u64::MAX / 2);
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets[0], (10e-6, 2));
        assert_eq!(s.buckets.last().unwrap().1, 4);
        assert!(s.buckets.last().unwrap().0.is_infinite());
        assert_eq!(s.buckets[BOUNDS_NS.len() - 1].1, 3);
    }
}
