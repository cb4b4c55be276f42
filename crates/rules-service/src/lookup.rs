//! Twin and registry records for rules' `twin(…)` and `device(…)`.
//!
//! The rule language's `Lookup` is synchronous, the stores are not. So before evaluating a
//! message, the evaluation task asks each matching rule which records it will look up
//! (`CompiledRule::lookup_keys`: those whose device id depends only on the message), fetches
//! the missing or stale ones through the [`HubLink`], and evaluation then reads this cache.
//!
//! Freshness: an entry is used for at most `ttl`; a committed twin change evicts the device's
//! twin at once ([`LookupCache::forget`], called by the binary from the twin change stream).
//! Bounded: at most `capacity` entries (expired ones evicted first, then the oldest).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use ferrohub_rules::{Lookup, LookupKind};
use parking_lot::Mutex;
use serde_json::Value as Json;

use crate::actions::HubLink;

/// How long one fetch may take before the lookup is treated as not found.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

type Key = (LookupKind, Arc<str>, String);

/// Cached lookups of all tenants (touched by the evaluation task; the lock is uncontended
/// except for [`LookupCache::forget`]).
pub(crate) struct LookupCache {
    hub: Arc<dyn HubLink>,
    ttl: Duration,
    capacity: usize,
    entries: Mutex<HashMap<Key, (Instant, Option<Json>)>>,
    /// Records fetched from the stores.
    pub fetches: AtomicU64,
    /// Lookups answered from the cache.
    pub hits: AtomicU64,
}

impl LookupCache {
    pub(crate) fn new(hub: Arc<dyn HubLink>, ttl: Duration, capacity: usize) -> LookupCache {
        LookupCache {
            hub,
            ttl,
            capacity: capacity.max(1),
            entries: Mutex::new(HashMap::new()),
            fetches: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        }
    }

    /// Makes sure every record in `keys` is cached and fresh.
    pub(crate) async fn prefetch(&self, tenant: &Arc<str>, keys: &[(LookupKind, String)]) {
        for (kind, device) in keys {
            let key: Key = (*kind, tenant.clone(), device.clone());
            let fresh = self
                .entries
                .lock()
                .get(&key)
                .is_some_and(|(at, _)| at.elapsed() < self.ttl);
            if fresh {
                self.hits.fetch_add(1, Relaxed);
                continue;
            }
            self.fetches.fetch_add(1, Relaxed);
            let fetch = async {
                match kind {
                    LookupKind::Twin => self.hub.twin(tenant, device).await,
                    LookupKind::Device => self.hub.device(tenant, device).await,
                }
            };
            let value = tokio::time::timeout(FETCH_TIMEOUT, fetch)
                .await
                .unwrap_or_default();
            self.insert(key, value);
        }
    }

    fn insert(&self, key: Key, value: Option<Json>) {
        let mut entries = self.entries.lock();
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            let ttl = self.ttl;
            entries.retain(|_, (at, _)| at.elapsed() < ttl);
            if entries.len() >= self.capacity {
                let oldest = entries
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    entries.remove(&k);
                }
            }
        }
        entries.insert(key, (Instant::now(), value));
    }

    /// Drops a device's cached twin (it changed); without a device, everything of the tenant;
    /// without a tenant, everything.
    pub(crate) fn forget(&self, tenant: Option<&str>, device: Option<&str>) {
        let Some(tenant) = tenant else {
            self.entries.lock().clear();
            return;
        };
        self.entries.lock().retain(|(kind, t, d), _| {
            &**t != tenant || device.is_some_and(|dev| d != dev || *kind != LookupKind::Twin)
        });
    }

    /// Entries held.
    pub(crate) fn len(&self) -> usize {
        self.entries.lock().len()
    }

    fn get(&self, kind: LookupKind, tenant: &str, device: &str) -> Option<Json> {
        // A borrowed key would need a custom Borrow impl; lookups are per message, not per row.
        self.entries
            .lock()
            .get(&(kind, Arc::from(tenant), device.to_string()))
            .and_then(|(_, v)| v.clone())
    }
}

impl Lookup for LookupCache {
    fn twin(&self, tenant: &str, device: &str) -> Option<Json> {
        self.get(LookupKind::Twin, tenant, device)
    }
    fn device(&self, tenant: &str, device: &str) -> Option<Json> {
        self.get(LookupKind::Device, tenant, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::ActionError;
    use bytes::Bytes;

    struct Fake(AtomicU64);

    #[async_trait::async_trait]
    impl HubLink for Fake {
        async fn publish(&self, _: &str, _: &str, _: Bytes, _: u8) -> Result<(), ActionError> {
            Ok(())
        }
        async fn twin(&self, _: &str, device: &str) -> Option<Json> {
            let n = self.0.fetch_add(1, Relaxed);
            Some(serde_json::json!({"device": device, "n": n}))
        }
    }

    #[tokio::test]
    async fn fetches_once_per_ttl_and_forgets_on_change() {
        let cache = LookupCache::new(
            Arc::new(Fake(AtomicU64::new(0))),
            Duration::from_secs(60),
            2,
        );
        let t: Arc<str> = Arc::from("t1");
        let keys = [(LookupKind::Twin, "d1".to_string())];
        cache.prefetch(&t, &keys).await;
        cache.prefetch(&t, &keys).await;
        assert_eq!(cache.fetches.load(Relaxed), 1);
        assert_eq!(
            cache.twin("t1", "d1").and_then(|v| v["n"].as_u64()),
            Some(0)
        );
        assert_eq!(cache.twin("t2", "d1"), None, "tenants are separate");
        assert_eq!(cache.device("t1", "d1"), None, "not fetched: not found");
        cache.forget(Some("t1"), Some("d1"));
        cache.prefetch(&t, &keys).await;
        assert_eq!(
            cache.twin("t1", "d1").and_then(|v| v["n"].as_u64()),
            Some(1)
        );
        // Bounded.
        for d in ["d2", "d3", "d4"] {
            cache
                .prefetch(&t, &[(LookupKind::Twin, d.to_string())])
                .await;
        }
        assert!(cache.len() <= 2);
    }
}
