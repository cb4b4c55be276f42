//! Latency histograms: one per subscriber task, merged at the end of a run.

use hdrhistogram::Histogram;

/// Highest latency tracked exactly (larger values are clamped): 10 minutes, in microseconds.
const MAX_MICROS: u64 = 600_000_000;

/// A latency histogram in microseconds.
#[derive(Debug, Clone)]
pub struct Latency {
    h: Histogram<u64>,
}

impl Latency {
    /// An empty histogram with `sigfig` significant decimal digits (clamped to 1..=5). Two digits
    /// (1 % error) take ~20 KiB, three ~140 KiB: use two when there are hundreds of subscribers.
    pub fn new(sigfig: u8) -> Result<Latency, hdrhistogram::CreationError> {
        let h = Histogram::new_with_bounds(1, MAX_MICROS, sigfig.clamp(1, 5))?;
        Ok(Latency { h })
    }

    /// Records one latency given in nanoseconds (values below 1 µs count as 1 µs).
    #[inline]
    pub fn record_ns(&mut self, ns: u64) {
        self.h.saturating_record((ns / 1000).clamp(1, MAX_MICROS));
    }

    /// Adds every sample of `other` to this histogram.
    pub fn merge(&mut self, other: &Latency) {
        if self.h.add(&other.h).is_err() {
            // Differently-configured histograms: fall back to re-recording (never happens within
            // a run, where every histogram has the same bounds).
            for v in other.h.iter_recorded() {
                self.h
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }

    /// The recorded latencies as (microseconds, count) pairs, for sending to another process.
    pub fn pairs(&self) -> Vec<(u64, u64)> {
        self.h
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect()
    }

    /// Adds latencies given as [`pairs`](Self::pairs).
    pub fn add_pairs(&mut self, pairs: &[(u64, u64)]) {
        for &(us, n) in pairs {
            self.h.saturating_record_n(us.clamp(1, MAX_MICROS), n);
        }
    }

    /// Number of samples.
    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.h.len()
    }

    /// The latency at quantile `q` (0..=1) in milliseconds; 0 when empty.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.h.is_empty() {
            return 0.0;
        }
        self.h.value_at_quantile(q) as f64 / 1000.0
    }

    /// The largest latency in milliseconds; 0 when empty.
    pub fn max_ms(&self) -> f64 {
        if self.h.is_empty() {
            return 0.0;
        }
        self.h.max() as f64 / 1000.0
    }

    /// The mean latency in milliseconds; 0 when empty.
    pub fn mean_ms(&self) -> f64 {
        if self.h.is_empty() {
            return 0.0;
        }
        self.h.mean() / 1000.0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn merged_percentiles() {
        // Subscriber A saw 99 fast messages, subscriber B one slow one and 100 medium ones.
        let mut a = Latency::new(3).unwrap();
        for _ in 0..99 {
            a.record_ns(200_000); // 0.2 ms
        }
        let mut b = Latency::new(3).unwrap();
        for _ in 0..100 {
            b.record_ns(2_000_000); // 2 ms
        }
        b.record_ns(50_000_000); // 50 ms
        let mut all = Latency::new(3).unwrap();
        all.merge(&a);
        all.merge(&b);
        assert_eq!(all.count(), 200);
        assert!((all.quantile_ms(0.25) - 0.2).abs() < 0.001);
        assert!((all.quantile_ms(0.45) - 0.2).abs() < 0.001);
        assert!((all.quantile_ms(0.5) - 2.0).abs() < 0.01);
        assert!((all.quantile_ms(0.75) - 2.0).abs() < 0.01);
        assert!((all.quantile_ms(0.99) - 2.0).abs() < 0.01);
        assert!((all.max_ms() - 50.0).abs() < 0.1);
        // Sub-microsecond and absurd values are clamped, not dropped.
        let mut c = Latency::new(2).unwrap();
        c.record_ns(10);
        c.record_ns(u64::MAX);
        assert_eq!(c.count(), 2);
        all.merge(&c);
        assert_eq!(all.count(), 202);
        assert_eq!(Latency::new(2).unwrap().quantile_ms(0.99), 0.0);
    }

    #[test]
    fn pairs_carry_a_histogram_to_another_process() {
        let mut a = Latency::new(2).unwrap();
        for ms in [1, 1, 2, 3, 5, 8, 13, 200] {
            a.record_ns(ms * 1_000_000);
        }
        let mut b = Latency::new(2).unwrap();
        b.add_pairs(&a.pairs());
        assert_eq!(b.count(), a.count());
        for q in [0.0, 0.5, 0.9, 0.99, 1.0] {
            assert_eq!(b.quantile_ms(q), a.quantile_ms(q), "q {q}");
        }
        assert_eq!(b.max_ms(), a.max_ms());
    }
}
