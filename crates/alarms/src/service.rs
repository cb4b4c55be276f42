//! [`AlarmService`]: raise, acknowledge, clear, query and stream alarms, and notify channels.
//!
//! Writes go through one lock (SQLite has one writer anyway), so the events a tenant's stream
//! sees are in commit order. An operation returns only after its transaction committed; events
//! are published to streams and notification channels after that, never before.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{broadcast, watch};

use crate::error::{AlarmError, Result};
use crate::model::{
    Alarm, AlarmCounts, AlarmEvent, AlarmPage, AlarmQuery, Channel, ChannelSpec, Delivery,
    EventKind, MAX_KEY_CHARS, RaiseAlarm, validate_channel_id, validate_note,
};
use crate::notify::{ChannelDeliveries, Notifier, now_ms, validate_spec};
use crate::store::{AlarmStore, Target, Transition};

/// Bounds of the alarms service (`[alarms]` in the hub's configuration).
#[derive(Debug, Clone)]
pub struct AlarmsConfig {
    /// History rows kept per alarm (the oldest are deleted).
    pub history_per_alarm: usize,
    /// Notifications waiting for a worker, all tenants; when full, a notification is recorded
    /// as a failed delivery (`queue full`) and counted as dropped.
    pub notification_queue: usize,
    /// Notification workers (concurrent webhook calls).
    pub workers: usize,
    /// Deliveries kept per channel (in memory).
    pub deliveries_per_channel: usize,
    /// Events buffered per tenant for event streams; a slower reader is told it lagged.
    pub stream_buffer: usize,
    /// Cleared alarms (with their history) are deleted this many days after they were cleared;
    /// 0 keeps them forever. Open alarms are never deleted.
    pub cleared_retention_days: u64,
}

impl Default for AlarmsConfig {
    fn default() -> Self {
        AlarmsConfig {
            history_per_alarm: 1000,
            notification_queue: 1000,
            workers: 4,
            deliveries_per_channel: 100,
            stream_buffer: 256,
            cleared_retention_days: 90,
        }
    }
}

/// What an event stream yields.
#[derive(Debug, Clone)]
pub enum StreamItem {
    /// An alarm event.
    Event(Arc<AlarmEvent>),
    /// The reader fell behind: this many events were skipped.
    Lagged(u64),
}

/// A tenant's alarm events from the moment of subscribing (see [`AlarmService::subscribe`]).
pub struct AlarmSubscription {
    rx: broadcast::Receiver<Arc<AlarmEvent>>,
}

impl AlarmSubscription {
    /// The next event; `None` once the service is gone.
    pub async fn next(&mut self) -> Option<StreamItem> {
        match self.rx.recv().await {
            Ok(e) => Some(StreamItem::Event(e)),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(StreamItem::Lagged(n)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    raised: AtomicU64,
    reraised: AtomicU64,
    acknowledged: AtomicU64,
    cleared: AtomicU64,
    open: AtomicI64,
}

/// The alarms of every tenant.
pub struct AlarmService {
    store: Arc<dyn AlarmStore>,
    config: AlarmsConfig,
    notifier: Arc<Notifier>,
    streams: Mutex<HashMap<String, broadcast::Sender<Arc<AlarmEvent>>>>,
    write: tokio::sync::Mutex<()>,
    counters: Counters,
    stop: watch::Sender<bool>,
}

/// A new ULID: 48 bits of Unix ms and 80 random bits in Crockford base32 (sorts by time).
fn new_id(now_ms: i64) -> String {
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let random: u128 = rand::random::<u128>() & ((1u128 << 80) - 1);
    let v = ((now_ms.max(0) as u128 & 0xFFFF_FFFF_FFFF) << 80) | random;
    (0..26)
        .map(|i| ALPHABET[((v >> (125 - 5 * i)) & 31) as usize] as char)
        .collect()
}

impl AlarmService {
    /// Loads the channels and the open-alarm count from `store`. Notifications are sent once
    /// [`AlarmService::start`] has run.
    pub async fn open(
        store: Arc<dyn AlarmStore>,
        config: AlarmsConfig,
    ) -> Result<Arc<AlarmService>> {
        let notifier = Arc::new(Notifier::new(
            config.notification_queue,
            config.workers,
            config.deliveries_per_channel,
        ));
        notifier.load(store.list_channels(None).await?);
        let open = store.open_total().await?;
        let counters = Counters::default();
        counters.open.store(open as i64, Relaxed);
        Ok(Arc::new(AlarmService {
            store,
            config,
            notifier,
            streams: Mutex::new(HashMap::new()),
            write: tokio::sync::Mutex::new(()),
            counters,
            stop: watch::channel(false).0,
        }))
    }

    /// Starts the notification workers and the hourly retention sweep of cleared alarms; they
    /// stop when `shutdown` resolves (an attempt in hand gets up to 3 s, then it is aborted).
    pub fn start(
        self: &Arc<Self>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let workers = self
            .notifier
            .start(self.stop.subscribe(), Duration::from_secs(3));
        let stop = self.stop.clone();
        let me = self.clone();
        tokio::spawn(async move {
            let mut shutdown = std::pin::pin!(shutdown);
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = &mut shutdown => break,
                    _ = tick.tick() => {
                        if let Err(e) = me.apply_retention(now_ms()).await {
                            tracing::error!(error = %e, "deleting old cleared alarms failed");
                        }
                    }
                }
            }
            let _ = stop.send(true);
            let _ = workers.await;
        })
    }

    /// Deletes alarms cleared more than `cleared_retention_days` before `now_ms`, in batches
    /// of 1000 (each one transaction); how many were deleted.
    pub async fn apply_retention(&self, now_ms: i64) -> Result<u64> {
        let days = self.config.cleared_retention_days;
        if days == 0 {
            return Ok(0);
        }
        let before = now_ms.saturating_sub((days.min(1_000_000) * 86_400_000) as i64);
        let mut total = 0;
        loop {
            let n = {
                let _w = self.write.lock().await;
                self.store.delete_cleared_before(before, 1000).await?
            };
            total += n;
            if n < 1000 {
                break;
            }
        }
        if total > 0 {
            tracing::info!(
                alarms = total,
                days,
                "deleted cleared alarms past retention"
            );
        }
        Ok(total)
    }

    /// Stops the notification workers now (as when the start's `shutdown` resolves).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// After a commit: counts, streams and notifications.
    fn publish(&self, event: AlarmEvent) -> Arc<AlarmEvent> {
        let c = &self.counters;
        match event.kind {
            EventKind::Raised => {
                c.raised.fetch_add(1, Relaxed);
                c.open.fetch_add(1, Relaxed);
            }
            EventKind::Updated => {
                c.reraised.fetch_add(1, Relaxed);
            }
            EventKind::Acknowledged => {
                c.acknowledged.fetch_add(1, Relaxed);
            }
            EventKind::Cleared => {
                c.cleared.fetch_add(1, Relaxed);
                c.open.fetch_sub(1, Relaxed);
            }
        }
        let event = Arc::new(event);
        {
            let mut streams = self.streams.lock();
            if let Some(tx) = streams.get(&event.alarm.tenant)
                && tx.send(event.clone()).is_err()
            {
                // Nobody listens any more.
                streams.remove(&event.alarm.tenant);
            }
        }
        self.notifier.dispatch(&event);
        event
    }

    /// Raises an alarm: folds into the tenant's not-cleared alarm with the same key (count + 1,
    /// severity raised if higher, message and details replaced) or opens a new one. A new alarm
    /// has `count == 1`.
    pub async fn raise(&self, tenant: &str, raise: RaiseAlarm) -> Result<Alarm, AlarmError> {
        raise.validate()?;
        let _w = self.write.lock().await;
        let now = now_ms();
        let event = self
            .store
            .raise(
                tenant,
                &raise,
                &new_id(now),
                now,
                self.config.history_per_alarm,
            )
            .await?;
        Ok(self.publish(event).alarm.clone())
    }

    async fn step(
        &self,
        tenant: &str,
        target: Target<'_>,
        step: Transition,
        by: &str,
        note: Option<String>,
    ) -> Result<Option<Alarm>> {
        validate_note(note.as_deref())?;
        let _w = self.write.lock().await;
        let event = self
            .store
            .transition(
                tenant,
                target,
                step,
                by,
                note.as_deref(),
                now_ms(),
                self.config.history_per_alarm,
            )
            .await?;
        Ok(event.map(|e| self.publish(e).alarm.clone()))
    }

    /// Acknowledges an active alarm ([`AlarmError::Conflict`] if it is acknowledged or cleared
    /// already).
    pub async fn acknowledge(
        &self,
        tenant: &str,
        id: &str,
        by: &str,
        note: Option<String>,
    ) -> Result<Alarm> {
        self.step(tenant, Target::Id(id), Transition::Acknowledge, by, note)
            .await?
            .ok_or_else(|| AlarmError::NotFound(format!("alarm `{id}`")))
    }

    /// Clears an alarm ([`AlarmError::Conflict`] if it is cleared already).
    pub async fn clear(
        &self,
        tenant: &str,
        id: &str,
        by: &str,
        note: Option<String>,
    ) -> Result<Alarm> {
        self.step(tenant, Target::Id(id), Transition::Clear, by, note)
            .await?
            .ok_or_else(|| AlarmError::NotFound(format!("alarm `{id}`")))
    }

    /// Clears the not-cleared alarm with dedup key `key`; `None` when there is none (clearing
    /// a condition that is not alarmed is not an error: rules clear on every good reading).
    pub async fn clear_by_key(
        &self,
        tenant: &str,
        key: &str,
        by: &str,
        note: Option<String>,
    ) -> Result<Option<Alarm>, AlarmError> {
        let chars = key.chars().count();
        if chars == 0 || chars > MAX_KEY_CHARS {
            return Err(AlarmError::Invalid(format!(
                "key: give 1 to {MAX_KEY_CHARS} characters"
            )));
        }
        self.step(tenant, Target::Key(key), Transition::Clear, by, note)
            .await
    }

    /// One alarm.
    pub async fn get(&self, tenant: &str, id: &str) -> Result<Alarm> {
        self.store
            .get(tenant, id)
            .await?
            .ok_or_else(|| AlarmError::NotFound(format!("alarm `{id}`")))
    }

    /// A page of alarms, newest first.
    pub async fn list(&self, tenant: &str, query: &AlarmQuery) -> Result<AlarmPage> {
        self.store.list(tenant, query).await
    }

    /// An alarm's history, oldest first (at most `history_per_alarm` rows).
    pub async fn history(&self, tenant: &str, id: &str) -> Result<Vec<AlarmEvent>> {
        let events = self.store.history(tenant, id).await?;
        if events.is_empty() {
            // Distinguish "no such alarm" from an empty history.
            self.get(tenant, id).await?;
        }
        Ok(events)
    }

    /// Open alarms by severity.
    pub async fn counts(&self, tenant: &str) -> Result<AlarmCounts> {
        self.store.counts(tenant).await
    }

    /// The tenant's events from now on. The buffer is bounded: a reader that falls
    /// `stream_buffer` events behind gets [`StreamItem::Lagged`], and raisers never wait.
    pub fn subscribe(&self, tenant: &str) -> AlarmSubscription {
        let mut streams = self.streams.lock();
        let rx = match streams.get(tenant) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(self.config.stream_buffer.max(1));
                streams.insert(tenant.to_string(), tx);
                rx
            }
        };
        AlarmSubscription { rx }
    }

    /// Creates or replaces a channel after checking it (templates included); whether it is new.
    pub async fn put_channel(
        &self,
        tenant: &str,
        id: &str,
        spec: ChannelSpec,
    ) -> Result<(Channel, bool)> {
        validate_channel_id(id)?;
        validate_spec(&spec)?;
        let channel = Channel {
            tenant: tenant.to_string(),
            id: id.to_string(),
            spec,
            updated_ms: now_ms(),
        };
        let _w = self.write.lock().await;
        let created = !self.notifier.channels(tenant).iter().any(|c| c.id == id);
        self.store.put_channel(&channel).await?;
        self.notifier.set(tenant, id, Some(channel.clone()));
        Ok((channel, created))
    }

    /// The tenant's channels, by id.
    pub fn channels(&self, tenant: &str) -> Vec<Channel> {
        self.notifier
            .channels(tenant)
            .iter()
            .map(|c| (**c).clone())
            .collect()
    }

    /// One channel.
    pub fn channel(&self, tenant: &str, id: &str) -> Result<Channel> {
        self.notifier
            .channels(tenant)
            .iter()
            .find(|c| c.id == id)
            .map(|c| (**c).clone())
            .ok_or_else(|| AlarmError::NotFound(format!("alarm channel `{id}`")))
    }

    /// Deletes a channel with its delivery log.
    pub async fn delete_channel(&self, tenant: &str, id: &str) -> Result<()> {
        let _w = self.write.lock().await;
        if !self.store.delete_channel(tenant, id).await? {
            return Err(AlarmError::NotFound(format!("alarm channel `{id}`")));
        }
        self.notifier.set(tenant, id, None);
        Ok(())
    }

    /// Sends a sample notification through a channel now (one attempt), and records it.
    pub async fn test_channel(&self, tenant: &str, id: &str) -> Result<Delivery> {
        let channel = self.channel(tenant, id)?;
        Ok(self.notifier.test(&channel).await)
    }

    /// A channel's counters and last deliveries (newest first).
    pub fn deliveries(&self, tenant: &str, id: &str) -> Result<ChannelDeliveries> {
        self.channel(tenant, id)?;
        Ok(self.notifier.deliveries(tenant, id))
    }

    /// Deletes a deleted tenant's alarms, history and channels.
    pub async fn forget_tenant(&self, tenant: &str) -> Result<()> {
        let _w = self.write.lock().await;
        let open = self.store.delete_tenant(tenant).await?;
        self.counters.open.fetch_sub(open as i64, Relaxed);
        self.notifier.forget_tenant(tenant);
        self.streams.lock().remove(tenant);
        Ok(())
    }

    /// Prometheus text of the alarms and notifications.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let c = &self.counters;
        let n = &self.notifier.counters;
        let _ = writeln!(
            out,
            "# HELP ferrohub_alarms_raised_total Alarms opened (raises that folded into an open alarm are in ferrohub_alarms_reraised_total).\n\
             # TYPE ferrohub_alarms_raised_total counter\n\
             ferrohub_alarms_raised_total {}\n\
             # HELP ferrohub_alarms_reraised_total Raises folded into an open alarm with the same key.\n\
             # TYPE ferrohub_alarms_reraised_total counter\n\
             ferrohub_alarms_reraised_total {}\n\
             # HELP ferrohub_alarms_acknowledged_total Alarms acknowledged.\n\
             # TYPE ferrohub_alarms_acknowledged_total counter\n\
             ferrohub_alarms_acknowledged_total {}\n\
             # HELP ferrohub_alarms_cleared_total Alarms cleared.\n\
             # TYPE ferrohub_alarms_cleared_total counter\n\
             ferrohub_alarms_cleared_total {}\n\
             # HELP ferrohub_alarms_open Alarms not cleared, all tenants.\n\
             # TYPE ferrohub_alarms_open gauge\n\
             ferrohub_alarms_open {}\n\
             # HELP ferrohub_alarm_notifications_total Alarm notifications by outcome: sent, failed (after retries), suppressed (rate limit), dropped (queue full).\n\
             # TYPE ferrohub_alarm_notifications_total counter\n\
             ferrohub_alarm_notifications_total{{outcome=\"sent\"}} {}\n\
             ferrohub_alarm_notifications_total{{outcome=\"failed\"}} {}\n\
             ferrohub_alarm_notifications_total{{outcome=\"suppressed\"}} {}\n\
             ferrohub_alarm_notifications_total{{outcome=\"dropped\"}} {}\n\
             # HELP ferrohub_alarm_notification_retries_total Webhook attempts after the first.\n\
             # TYPE ferrohub_alarm_notification_retries_total counter\n\
             ferrohub_alarm_notification_retries_total {}\n\
             # HELP ferrohub_alarm_notification_queue Notifications waiting for a worker.\n\
             # TYPE ferrohub_alarm_notification_queue gauge\n\
             ferrohub_alarm_notification_queue {}",
            c.raised.load(Relaxed),
            c.reraised.load(Relaxed),
            c.acknowledged.load(Relaxed),
            c.cleared.load(Relaxed),
            c.open.load(Relaxed).max(0),
            n.sent.load(Relaxed),
            n.failed.load(Relaxed),
            n.suppressed.load(Relaxed),
            n.dropped.load(Relaxed),
            n.retries.load(Relaxed),
            self.notifier.queued(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AlarmState, Severity, StateFilter};
    use crate::store::SqliteAlarmStore;
    use serde_json::json;

    async fn service() -> Arc<AlarmService> {
        let store = SqliteAlarmStore::in_memory().await.unwrap();
        AlarmService::open(Arc::new(store), AlarmsConfig::default())
            .await
            .unwrap()
    }

    fn raise(key: &str, severity: Severity, message: &str) -> RaiseAlarm {
        RaiseAlarm {
            key: key.into(),
            severity,
            device: Some("dev-1".into()),
            message: message.into(),
            details: json!({"m": message}),
            source: "rule:r1".into(),
        }
    }

    #[test]
    fn ids_are_ulids_in_time_order() {
        let a = new_id(1_700_000_000_000);
        let b = new_id(1_700_000_000_001);
        assert_eq!(a.len(), 26);
        assert!(a < b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
    }

    #[tokio::test]
    async fn dedup_folds_and_escalates() {
        let s = service().await;
        let a = s
            .raise("t1", raise("hot:1", Severity::Minor, "a"))
            .await
            .unwrap();
        assert_eq!((a.count, a.state), (1, AlarmState::Active));
        let b = s
            .raise("t1", raise("hot:1", Severity::Critical, "b"))
            .await
            .unwrap();
        assert_eq!(b.id, a.id);
        assert_eq!(
            (b.count, b.severity, b.message.as_str()),
            (2, Severity::Critical, "b")
        );
        // A lower severity does not de-escalate.
        let c = s
            .raise("t1", raise("hot:1", Severity::Info, "c"))
            .await
            .unwrap();
        assert_eq!(
            (c.count, c.severity, c.details.clone()),
            (3, Severity::Critical, json!({"m": "c"}))
        );
        // Another key, another tenant: other alarms.
        let d = s
            .raise("t1", raise("hot:2", Severity::Info, "d"))
            .await
            .unwrap();
        let e = s
            .raise("t2", raise("hot:1", Severity::Info, "e"))
            .await
            .unwrap();
        assert_ne!(d.id, a.id);
        assert_ne!(e.id, a.id);
        let counts = s.counts("t1").await.unwrap();
        assert_eq!((counts.total, counts.critical, counts.info), (2, 1, 1));
    }

    #[tokio::test]
    async fn lifecycle_and_conflicts() {
        let s = service().await;
        let a = s
            .raise("t1", raise("k", Severity::Major, "x"))
            .await
            .unwrap();
        let ack = s
            .acknowledge("t1", &a.id, "token:op", Some("on it".into()))
            .await
            .unwrap();
        assert_eq!(ack.state, AlarmState::Acknowledged);
        assert_eq!(ack.acknowledged_by.as_deref(), Some("token:op"));
        assert!(matches!(
            s.acknowledge("t1", &a.id, "token:op", None).await,
            Err(AlarmError::Conflict(m)) if m.contains("already acknowledged")
        ));
        // Raising while acknowledged folds into it and keeps it acknowledged.
        let f = s
            .raise("t1", raise("k", Severity::Major, "y"))
            .await
            .unwrap();
        assert_eq!(
            (f.id.as_str(), f.state, f.count),
            (a.id.as_str(), AlarmState::Acknowledged, 2)
        );
        let cl = s.clear("t1", &a.id, "token:op", None).await.unwrap();
        assert_eq!(cl.state, AlarmState::Cleared);
        assert!(matches!(
            s.clear("t1", &a.id, "token:op", None).await,
            Err(AlarmError::Conflict(m)) if m.contains("already cleared")
        ));
        assert!(matches!(
            s.acknowledge("t1", &a.id, "token:op", None).await,
            Err(AlarmError::Conflict(_))
        ));
        assert!(matches!(
            s.clear("t2", &a.id, "x", None).await,
            Err(AlarmError::NotFound(_))
        ));
        // After a clear the key opens a new alarm.
        let n = s
            .raise("t1", raise("k", Severity::Minor, "z"))
            .await
            .unwrap();
        assert_ne!(n.id, a.id);
        assert_eq!(n.count, 1);
        // Clear by key: the open one; nothing open → None.
        let c = s
            .clear_by_key("t1", "k", "rule:r1", None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.id, n.id);
        assert!(
            s.clear_by_key("t1", "k", "rule:r1", None)
                .await
                .unwrap()
                .is_none()
        );
        let h = s.history("t1", &a.id).await.unwrap();
        let kinds: Vec<_> = h.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                EventKind::Raised,
                EventKind::Acknowledged,
                EventKind::Updated,
                EventKind::Cleared
            ]
        );
        assert_eq!(h[1].note.as_deref(), Some("on it"));
        assert!(matches!(
            s.history("t1", "nope").await,
            Err(AlarmError::NotFound(_))
        ));
        assert_eq!(s.counts("t1").await.unwrap().total, 0);
    }

    #[tokio::test]
    async fn list_filters_and_pages() {
        let s = service().await;
        for i in 0..7 {
            let sev = if i % 2 == 0 {
                Severity::Major
            } else {
                Severity::Minor
            };
            s.raise("t1", raise(&format!("k{i}"), sev, "m"))
                .await
                .unwrap();
        }
        let first = s
            .list(
                "t1",
                &AlarmQuery {
                    key: Some("k0".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        s.clear("t1", &first.items[0].id, "x", None).await.unwrap();
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let q = AlarmQuery {
                limit: Some(3),
                cursor: cursor.clone(),
                ..Default::default()
            };
            let p = s.list("t1", &q).await.unwrap();
            seen.extend(p.items.iter().map(|a| a.key.clone()));
            match p.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(seen.len(), 7);
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 7, "no alarm twice across pages");
        let q = AlarmQuery {
            state: Some(StateFilter::Open),
            severity: Some(Severity::Major),
            ..Default::default()
        };
        assert_eq!(s.list("t1", &q).await.unwrap().items.len(), 3);
        let q = AlarmQuery {
            state: Some(StateFilter::Is(AlarmState::Cleared)),
            ..Default::default()
        };
        assert_eq!(s.list("t1", &q).await.unwrap().items.len(), 1);
        let q = AlarmQuery {
            device: Some("other".into()),
            ..Default::default()
        };
        assert!(s.list("t1", &q).await.unwrap().items.is_empty());
        let q = AlarmQuery {
            since_ms: Some(now_ms() + 60_000),
            ..Default::default()
        };
        assert!(s.list("t1", &q).await.unwrap().items.is_empty());
        let q = AlarmQuery {
            cursor: Some("garbage".into()),
            ..Default::default()
        };
        assert!(matches!(
            s.list("t1", &q).await,
            Err(AlarmError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn history_is_bounded() {
        let store = SqliteAlarmStore::in_memory().await.unwrap();
        let cfg = AlarmsConfig {
            history_per_alarm: 5,
            ..Default::default()
        };
        let s = AlarmService::open(Arc::new(store), cfg).await.unwrap();
        let mut id = String::new();
        for i in 0..12 {
            id = s
                .raise("t1", raise("k", Severity::Info, &format!("m{i}")))
                .await
                .unwrap()
                .id;
        }
        let h = s.history("t1", &id).await.unwrap();
        assert_eq!(h.len(), 5);
        assert_eq!(h.last().unwrap().alarm.message, "m11");
        assert_eq!(h.last().unwrap().alarm.count, 12);
    }

    #[tokio::test]
    async fn streams_see_their_tenant_and_lag_without_blocking() {
        let store = SqliteAlarmStore::in_memory().await.unwrap();
        let cfg = AlarmsConfig {
            stream_buffer: 2,
            ..Default::default()
        };
        let s = AlarmService::open(Arc::new(store), cfg).await.unwrap();
        let mut sub = s.subscribe("t1");
        s.raise("t2", raise("other", Severity::Info, "x"))
            .await
            .unwrap();
        let a = s
            .raise("t1", raise("k", Severity::Info, "x"))
            .await
            .unwrap();
        match sub.next().await {
            Some(StreamItem::Event(e)) => assert_eq!(
                (e.kind, e.alarm.id.as_str()),
                (EventKind::Raised, a.id.as_str())
            ),
            other => panic!("{other:?}"),
        }
        // Nobody reads: raises still complete, and the reader learns it lagged.
        for i in 0..5 {
            tokio::time::timeout(
                Duration::from_secs(5),
                s.raise("t1", raise("k", Severity::Info, &i.to_string())),
            )
            .await
            .unwrap()
            .unwrap();
        }
        assert!(matches!(sub.next().await, Some(StreamItem::Lagged(3))));
    }

    #[tokio::test]
    async fn retention_deletes_only_old_cleared_alarms() {
        let s = service().await;
        let old = s
            .raise("t1", raise("old", Severity::Info, "x"))
            .await
            .unwrap();
        s.clear("t1", &old.id, "x", None).await.unwrap();
        let open = s
            .raise("t1", raise("open", Severity::Info, "x"))
            .await
            .unwrap();
        // Not 90 days yet: nothing goes.
        assert_eq!(s.apply_retention(now_ms()).await.unwrap(), 0);
        let later = now_ms() + 91 * 86_400_000;
        assert_eq!(s.apply_retention(later).await.unwrap(), 1);
        assert!(matches!(
            s.get("t1", &old.id).await,
            Err(AlarmError::NotFound(_))
        ));
        assert!(matches!(
            s.history("t1", &old.id).await,
            Err(AlarmError::NotFound(_))
        ));
        assert_eq!(
            s.get("t1", &open.id).await.unwrap().state,
            AlarmState::Active
        );
    }

    #[tokio::test]
    async fn invalid_input_is_refused() {
        let s = service().await;
        assert!(matches!(
            s.raise("t1", raise("", Severity::Info, "x")).await,
            Err(AlarmError::Invalid(_))
        ));
        assert!(matches!(
            s.clear_by_key("t1", "", "x", None).await,
            Err(AlarmError::Invalid(_))
        ));
        let a = s
            .raise("t1", raise("k", Severity::Info, "x"))
            .await
            .unwrap();
        let note = "n".repeat(5000);
        assert!(matches!(
            s.clear("t1", &a.id, "x", Some(note)).await,
            Err(AlarmError::Invalid(_))
        ));
    }
}
