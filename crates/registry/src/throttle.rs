//! Rate limits: token buckets for quotas and exponential back-off after failed authentication.
//!
//! Both are in memory and bounded: the back-off table forgets the oldest half when it is full, so
//! a flood of distinct source addresses cannot grow it without limit.

use std::hash::Hash;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use parking_lot::Mutex;

/// A token bucket refilled continuously at `rate` per second, holding at most `burst` tokens.
///
/// Lock-free (two atomics updated with compare-and-swap): it sits on the publish path. The
/// balance may go negative: a request larger than the burst is admitted only on a full bucket
/// and charged in full, so the debt it leaves keeps the long-run rate exact.
#[derive(Debug)]
pub struct TokenBucket {
    rate_milli_per_ms: i64,
    burst_milli: i64,
    epoch: Instant,
    /// Last refill, in ms since `epoch`.
    last_ms: AtomicU64,
    tokens_milli: AtomicI64,
}

impl TokenBucket {
    /// A bucket allowing `per_sec` units per second with a burst of one second's worth.
    pub fn per_second(per_sec: u64) -> TokenBucket {
        let per_sec = i64::try_from(per_sec).unwrap_or(i64::MAX / 1000);
        let burst_milli = per_sec.saturating_mul(1000).max(1000);
        TokenBucket {
            // per_sec units/s = per_sec milli-units per ms.
            rate_milli_per_ms: per_sec,
            burst_milli,
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            tokens_milli: AtomicI64::new(burst_milli),
        }
    }

    fn refill(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.last_ms.load(Ordering::Relaxed);
        if now > last
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let elapsed = i64::try_from(now - last).unwrap_or(i64::MAX);
            let add = elapsed.saturating_mul(self.rate_milli_per_ms);
            let _ = self
                .tokens_milli
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                    Some(t.saturating_add(add).min(self.burst_milli))
                });
        }
    }

    /// Takes `units`; false when the bucket does not hold that many (nothing is taken then).
    /// A request larger than the burst needs a full bucket and leaves it in debt.
    pub fn try_take(&self, units: u64) -> bool {
        self.refill();
        let cost = i64::try_from(units)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        let need = cost.min(self.burst_milli);
        self.tokens_milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                (t >= need).then(|| t.saturating_sub(cost))
            })
            .is_ok()
    }

    /// Returns `units` taken by a request that was refused further on.
    pub fn give_back(&self, units: u64) {
        let cost = i64::try_from(units)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        let _ = self
            .tokens_milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_add(cost).min(self.burst_milli))
            });
    }
}

/// Back-off settings for failed authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackoffConfig {
    /// Failures allowed before back-off starts: after this many, the next attempt is refused.
    pub free_failures: u32,
    /// First back-off, in milliseconds; doubles with every further failure.
    pub initial_ms: u64,
    /// Longest back-off, in milliseconds.
    pub max_ms: u64,
    /// How many keys (addresses, device ids) are tracked at most.
    pub max_entries: usize,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            free_failures: 5,
            initial_ms: 1000,
            max_ms: 300_000,
            max_entries: 100_000,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    blocked_until: Instant,
    last: Instant,
}

/// Exponential back-off per key after repeated failures.
#[derive(Debug)]
pub struct Backoff<K> {
    config: BackoffConfig,
    entries: Mutex<HashMap<K, Failures>>,
}

impl<K: Hash + Eq + Clone> Backoff<K> {
    /// An empty table.
    pub fn new(config: BackoffConfig) -> Self {
        Backoff {
            config,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// How long `key` must still wait, if it is blocked.
    pub fn blocked(&self, key: &K) -> Option<Duration> {
        let now = Instant::now();
        let entries = self.entries.lock();
        let f = entries.get(key)?;
        (f.blocked_until > now).then(|| f.blocked_until - now)
    }

    /// Records a failure; returns the back-off now in force (if any).
    pub fn failure(&self, key: &K) -> Option<Duration> {
        let now = Instant::now();
        let mut entries = self.entries.lock();
        if entries.len() >= self.config.max_entries.max(1) && !entries.contains_key(key) {
            // Forget the half whose back-off ends first rather than grow (never more than
            // `max_entries`, even when most keys are blocked).
            let mut ends: Vec<Instant> = entries
                .values()
                .map(|f| f.blocked_until.max(f.last))
                .collect();
            // Not empty: it holds at least `max_entries.max(1)` keys.
            let mid = ends.len() / 2;
            let (_, cut, _) = ends.select_nth_unstable(mid);
            let cut = *cut;
            entries.retain(|_, f| f.blocked_until.max(f.last) > cut);
        }
        let f = entries.entry(key.clone()).or_insert(Failures {
            count: 0,
            blocked_until: now,
            last: now,
        });
        // A long quiet period resets the count.
        if now.duration_since(f.last) > Duration::from_millis(self.config.max_ms.max(1) * 2) {
            f.count = 0;
        }
        f.count = f.count.saturating_add(1);
        f.last = now;
        // `free_failures` failures are free: the one that reaches the count starts the back-off.
        let free = self.config.free_failures.max(1);
        if f.count < free {
            return None;
        }
        let over = f.count - free + 1;
        let delay = self
            .config
            .initial_ms
            .saturating_mul(1u64 << (over - 1).min(20))
            .min(self.config.max_ms);
        let delay = Duration::from_millis(delay);
        f.blocked_until = now + delay;
        Some(delay)
    }

    /// Clears `key` after a success.
    pub fn success(&self, key: &K) {
        let mut entries = self.entries.lock();
        if !entries.is_empty() {
            entries.remove(key);
        }
    }

    /// Tracked keys.
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    /// Whether nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_admits_up_to_the_burst_then_refuses() {
        let b = TokenBucket::per_second(10);
        let admitted = (0..100).filter(|_| b.try_take(1)).count();
        assert!((10..=11).contains(&admitted), "admitted {admitted}");
        std::thread::sleep(Duration::from_millis(250));
        assert!(b.try_take(1), "refilled after 250 ms");
    }

    #[test]
    fn oversized_request_passes_only_on_a_full_bucket_and_leaves_a_debt() {
        let b = TokenBucket::per_second(100);
        assert!(b.try_take(1_000_000));
        assert!(!b.try_take(1_000_000));
        // The debt (10,000 s at 100/s) refuses even small requests for a long time.
        std::thread::sleep(Duration::from_millis(50));
        assert!(!b.try_take(1));
    }

    #[test]
    fn given_back_tokens_are_usable_again() {
        let b = TokenBucket::per_second(2);
        assert!(b.try_take(2));
        assert!(!b.try_take(1));
        b.give_back(1);
        assert!(b.try_take(1));
    }

    #[test]
    fn backoff_grows_exponentially_and_resets_on_success() {
        let cfg = BackoffConfig {
            free_failures: 2,
            initial_ms: 100,
            max_ms: 350,
            max_entries: 10,
        };
        let b = Backoff::new(cfg);
        assert_eq!(b.failure(&"a"), None);
        assert!(b.blocked(&"a").is_none(), "one failure is free");
        assert_eq!(b.failure(&"a"), Some(Duration::from_millis(100)));
        assert_eq!(b.failure(&"a"), Some(Duration::from_millis(200)));
        assert_eq!(b.failure(&"a"), Some(Duration::from_millis(350)));
        assert!(b.blocked(&"a").is_some());
        assert!(b.blocked(&"b").is_none());
        b.success(&"a");
        assert!(b.blocked(&"a").is_none());
    }

    #[test]
    fn backoff_table_stays_bounded_when_every_key_is_blocked_and_with_no_room() {
        for max_entries in [0, 1, 100] {
            let b = Backoff::new(BackoffConfig {
                max_entries,
                free_failures: 1,
                initial_ms: 60_000,
                ..BackoffConfig::default()
            });
            for i in 0..5_000 {
                b.failure(&i);
            }
            assert!(b.len() <= max_entries.max(1), "{max_entries}: {}", b.len());
        }
    }

    #[test]
    fn backoff_table_is_bounded() {
        let b = Backoff::new(BackoffConfig {
            max_entries: 100,
            free_failures: 100,
            ..BackoffConfig::default()
        });
        for i in 0..10_000 {
            b.failure(&i);
        }
        assert!(b.len() <= 100, "{}", b.len());
    }
}
