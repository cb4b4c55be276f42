//! Per-rule counters and a small lock-free latency histogram.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

/// Buckets of the latency histogram: bucket `i` holds evaluations under `2^i` µs (the last one
/// everything above), so p50/p99 are upper bounds within a factor of two.
const BUCKETS: usize = 24;

/// Evaluation latency, in power-of-two microsecond buckets.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    counts: [AtomicU64; BUCKETS],
}

impl LatencyHistogram {
    /// Records one evaluation.
    pub fn record(&self, micros: u64) {
        let i = (64 - micros.leading_zeros() as usize).min(BUCKETS - 1);
        self.counts[i].fetch_add(1, Relaxed);
    }

    /// The upper bound (µs) of the bucket holding quantile `q` (0 when empty).
    pub fn quantile_micros(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return 1u64 << i;
            }
        }
        1u64 << (BUCKETS - 1)
    }
}

/// Counters of one action of a rule.
#[derive(Debug, Default)]
pub struct ActionCounters {
    /// Deliveries that succeeded.
    pub successes: AtomicU64,
    /// Attempts that failed (each failed attempt counts).
    pub errors: AtomicU64,
    /// Attempts after the first.
    pub retries: AtomicU64,
    /// Messages given up on (attempts exhausted, not retryable, or queue full).
    pub dead_letters: AtomicU64,
    /// Jobs waiting in the action's queue.
    pub queued: AtomicU64,
}

/// Counters of one rule.
#[derive(Debug, Default)]
pub struct RuleCounters {
    /// Messages whose topic matched the rule.
    pub matched: AtomicU64,
    /// Evaluations that produced an output (WHERE passed; window outputs count too).
    pub passed: AtomicU64,
    /// Evaluations that failed.
    pub failed: AtomicU64,
    /// Matching messages not evaluated because the rules input queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Times the error action was invoked.
    pub error_actions: AtomicU64,
    /// Evaluation latency.
    pub latency: LatencyHistogram,
}

/// A snapshot of one action's counters (API).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ActionStats {
    /// `republish` or `webhook`.
    pub kind: &'static str,
    /// Deliveries that succeeded.
    pub successes: u64,
    /// Failed attempts.
    pub errors: u64,
    /// Attempts after the first.
    pub retries: u64,
    /// Messages that became dead letters.
    pub dead_letters: u64,
    /// Jobs in the queue now.
    pub queued: u64,
}

impl ActionCounters {
    pub(crate) fn snapshot(&self, kind: &'static str) -> ActionStats {
        ActionStats {
            kind,
            successes: self.successes.load(Relaxed),
            errors: self.errors.load(Relaxed),
            retries: self.retries.load(Relaxed),
            dead_letters: self.dead_letters.load(Relaxed),
            queued: self.queued.load(Relaxed),
        }
    }
}

/// A snapshot of one rule's counters (API: `GET …/rules/{id}/stats`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RuleStats {
    /// Messages whose topic matched.
    pub matched: u64,
    /// Evaluations with an output.
    pub passed: u64,
    /// Evaluations that failed.
    pub failed: u64,
    /// Matching messages dropped because the rules queue was full.
    pub dropped_queue_full: u64,
    /// Error action invocations.
    pub error_actions: u64,
    /// Evaluation latency p50, µs (upper bound of a power-of-two bucket).
    pub latency_p50_us: u64,
    /// Evaluation latency p99, µs.
    pub latency_p99_us: u64,
    /// Per action, in the rule's order.
    pub actions: Vec<ActionStats>,
    /// Dead letters currently held.
    pub dead_letters_held: usize,
    /// Dead letters evicted (oldest first) because the list was full.
    pub dead_letters_evicted: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_bucket_bounds() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile_micros(0.5), 0);
        for _ in 0..99 {
            h.record(10);
        }
        h.record(5000);
        assert_eq!(h.quantile_micros(0.5), 16);
        assert_eq!(h.quantile_micros(0.99), 16);
        assert_eq!(h.quantile_micros(1.0), 8192);
    }
}
