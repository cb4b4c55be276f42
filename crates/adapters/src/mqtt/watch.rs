//! Live tails of one device's traffic (the console's "Recent messages"): copies of every PUBLISH a
//! device's connection sends and every one delivered to it, while someone watches.
//!
//! Watches are keyed by (tenant, device): a connection of a registered device matches on the
//! device it authenticated as (whatever its client id), an anonymous client or static user on its
//! client id (the device it acts as, see [`super::Origin::acting_device`]).
//!
//! Cost when nobody watches: one relaxed load of [`Watches::active`] per PUBLISH (and one per
//! batch of deliveries) before any map lookup. Each watcher has a bounded queue; a copy that does
//! not fit is dropped and counted, both for the watcher (reported with its next message) and in
//! `ferrohub_watch_dropped_total`. At most [`MAX_WATCHERS`] watchers are open per hub.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use bytes::Bytes;
use ferrohub_types::{Message, QoS, TenantId};
use hashbrown::HashMap;
use parking_lot::RwLock;
use tokio::sync::mpsc;

/// How many watchers may be open at once in a hub.
pub const MAX_WATCHERS: usize = 64;
/// Payload bytes a watched copy keeps (the original size is reported).
pub const WATCH_PAYLOAD_CAP: usize = 4096;
/// Largest queue a watcher may ask for.
pub const MAX_WATCH_CAPACITY: usize = 4096;

/// Which way a watched message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Published by the device.
    In,
    /// Delivered to the device.
    Out,
}

impl Direction {
    /// `in` or `out`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

/// A copy of one message a watched device sent or was sent.
#[derive(Debug, Clone)]
pub struct WatchedMessage {
    /// The topic.
    pub topic: Arc<str>,
    /// The first [`WATCH_PAYLOAD_CAP`] bytes of the payload.
    pub payload: Bytes,
    /// The payload's full size in bytes.
    pub size: usize,
    /// QoS it was published (in) or delivered (out) with.
    pub qos: QoS,
    /// The retain flag.
    pub retain: bool,
    /// In (published by the device) or out (delivered to it).
    pub direction: Direction,
    /// When (ms since the epoch).
    pub at: u64,
}

/// Why a watch could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    /// [`MAX_WATCHERS`] watchers are open.
    #[error("{MAX_WATCHERS} message watchers are open in this hub; close one")]
    TooMany,
}

type Key = (TenantId, Arc<str>);

/// Looks a [`Key`] up without allocating one: hashes like the tuple (each field in order).
#[derive(Hash)]
struct KeyRef<'a>(&'a TenantId, &'a str);

impl hashbrown::Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        *self.0 == key.0 && self.1 == &*key.1
    }
}

struct Watcher {
    id: u64,
    tx: mpsc::Sender<WatchedMessage>,
    skipped: Arc<AtomicU64>,
}

/// The watch table of a broker.
#[derive(Default)]
pub(crate) struct Watches {
    /// Open watchers, all devices: the publish path's gate.
    active: AtomicUsize,
    /// Read-locked by the message path (many connections at once), written by (un)watching.
    map: RwLock<HashMap<Key, Vec<Watcher>>>,
    next_id: AtomicU64,
    /// Copies dropped because a watcher's queue was full.
    dropped: AtomicU64,
    /// Map lookups made by the message path (tests check that none happen unwatched).
    lookups: AtomicU64,
}

/// Receives a watched device's messages; dropping it (or its [`WatchGuard`]) ends the watch.
pub struct WatchReceiver {
    rx: mpsc::Receiver<WatchedMessage>,
    skipped: Arc<AtomicU64>,
}

impl WatchReceiver {
    /// The next copy; `None` once the watch is gone.
    pub async fn recv(&mut self) -> Option<WatchedMessage> {
        self.rx.recv().await
    }

    /// Copies dropped since the last call (the queue was full).
    pub fn take_skipped(&self) -> u64 {
        self.skipped.swap(0, Relaxed)
    }
}

/// Keeps a watch registered; dropping it unregisters the watcher.
pub struct WatchGuard {
    watches: Arc<Watches>,
    key: Key,
    id: u64,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let mut map = self.watches.map.write();
        if let Some(list) = map.get_mut(&self.key) {
            let before = list.len();
            list.retain(|w| w.id != self.id);
            if list.len() < before {
                self.watches.active.fetch_sub(1, Relaxed);
            }
            if list.is_empty() {
                map.remove(&self.key);
            }
        }
    }
}

impl Watches {
    /// Opens a watcher of `device` in `tenant` with a queue of `capacity` (1 to
    /// [`MAX_WATCH_CAPACITY`]).
    pub(crate) fn watch(
        self: &Arc<Self>,
        tenant: &TenantId,
        device: &str,
        capacity: usize,
    ) -> Result<(WatchReceiver, WatchGuard), WatchError> {
        let key: Key = (tenant.clone(), Arc::from(device));
        let mut map = self.map.write();
        // Counted under the map's lock, so that concurrent opens cannot pass the cap together.
        if self.active.load(Relaxed) >= MAX_WATCHERS {
            return Err(WatchError::TooMany);
        }
        let (tx, rx) = mpsc::channel(capacity.clamp(1, MAX_WATCH_CAPACITY));
        let skipped = Arc::new(AtomicU64::new(0));
        let id = self.next_id.fetch_add(1, Relaxed);
        map.entry(key.clone()).or_default().push(Watcher {
            id,
            tx,
            skipped: skipped.clone(),
        });
        self.active.fetch_add(1, Relaxed);
        Ok((
            WatchReceiver { rx, skipped },
            WatchGuard {
                watches: self.clone(),
                key,
                id,
            },
        ))
    }

    /// Whether anyone watches any device (the gate before [`Watches::offer`]).
    #[inline]
    pub(crate) fn any(&self) -> bool {
        self.active.load(Relaxed) != 0
    }

    /// Hands a copy of `message` to the watchers of `device`, if any. Call only when
    /// [`Watches::any`] said so. Never blocks: a full watcher queue drops the copy and counts it.
    pub(crate) fn offer(
        &self,
        tenant: &TenantId,
        device: &str,
        message: &Message,
        qos: QoS,
        retain: bool,
        direction: Direction,
    ) {
        self.lookups.fetch_add(1, Relaxed);
        let map = self.map.read();
        let Some(list) = map.get(&KeyRef(tenant, device)) else {
            return;
        };
        let payload = &message.payload;
        let copy = WatchedMessage {
            topic: message.topic.as_arc().clone(),
            payload: payload.slice(..payload.len().min(WATCH_PAYLOAD_CAP)),
            size: payload.len(),
            qos,
            retain,
            direction,
            at: super::broker::now_millis(),
        };
        for w in list {
            if w.tx.try_send(copy.clone()).is_err() {
                w.skipped.fetch_add(1, Relaxed);
                self.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// Map lookups the message path made so far.
    pub(crate) fn lookups(&self) -> u64 {
        self.lookups.load(Relaxed)
    }

    /// Prometheus text of the watch figures.
    pub(crate) fn render(&self, out: &mut String) {
        let _ = write!(
            out,
            "# HELP ferrohub_watchers Open live message watchers (console device tails).\n\
             # TYPE ferrohub_watchers gauge\nferrohub_watchers {}\n\
             # HELP ferrohub_watch_dropped_total Watched message copies dropped: the watcher's queue was full.\n\
             # TYPE ferrohub_watch_dropped_total counter\nferrohub_watch_dropped_total {}\n",
            self.active.load(Relaxed),
            self.dropped.load(Relaxed),
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use ferrohub_types::{TopicLimits, TopicName};

    fn message(payload: &'static [u8]) -> Message {
        Message {
            topic: TopicName::new("devices/d1/telemetry", &TopicLimits::default()).unwrap(),
            payload: Bytes::from_static(payload),
            qos: QoS::AtMostOnce,
            retain: false,
            received_at: 0,
            properties: None,
        }
    }

    /// The gate the connection takes before offering: unwatched traffic makes no lookup.
    fn publish(w: &Watches, tenant: &TenantId, device: &str, m: &Message) {
        if w.any() {
            w.offer(tenant, device, m, m.qos, m.retain, Direction::In);
        }
    }

    #[tokio::test]
    async fn unwatched_publish_does_not_touch_the_map_and_a_watch_ends_with_its_guard() {
        let w = Arc::new(Watches::default());
        let t = TenantId::new("t1");
        let m = message(b"hello");
        for _ in 0..100 {
            publish(&w, &t, "d1", &m);
        }
        assert_eq!(w.lookups(), 0, "nobody watches: no lookup");

        let (mut rx, guard) = w.watch(&t, "d1", 8).unwrap();
        publish(&w, &t, "d1", &m);
        publish(&w, &t, "d2", &m);
        assert_eq!(w.lookups(), 2);
        let got = rx.recv().await.unwrap();
        assert_eq!(&*got.topic, "devices/d1/telemetry");
        assert_eq!(&got.payload[..], b"hello");
        assert_eq!(got.direction, Direction::In);
        assert!(rx.rx.try_recv().is_err(), "d2's message is not d1's");

        drop(guard);
        assert!(!w.any());
        publish(&w, &t, "d1", &m);
        assert_eq!(w.lookups(), 2, "the watch is gone: back to no lookups");
        assert!(
            rx.recv().await.is_none(),
            "the receiver ends with its guard"
        );
    }

    #[tokio::test]
    async fn a_full_queue_counts_skipped_copies_and_payloads_are_capped() {
        let w = Arc::new(Watches::default());
        let t = TenantId::new("t1");
        let (mut rx, _guard) = w.watch(&t, "d1", 2).unwrap();
        static BIG: [u8; 10_000] = [7; 10_000];
        let m = message(&BIG);
        for _ in 0..5 {
            publish(&w, &t, "d1", &m);
        }
        assert_eq!(rx.take_skipped(), 3);
        assert_eq!(rx.take_skipped(), 0, "taken once");
        let got = rx.recv().await.unwrap();
        assert_eq!(got.payload.len(), WATCH_PAYLOAD_CAP);
        assert_eq!(got.size, 10_000);
        let mut text = String::new();
        w.render(&mut text);
        assert!(text.contains("ferrohub_watch_dropped_total 3"), "{text}");
    }

    #[test]
    fn the_hub_cap_refuses_more_watchers_until_one_goes() {
        let w = Arc::new(Watches::default());
        let t = TenantId::new("t1");
        let mut open = Vec::new();
        for i in 0..MAX_WATCHERS {
            open.push(w.watch(&t, &format!("d{i}"), 1).unwrap());
        }
        assert_eq!(w.watch(&t, "x", 1).err(), Some(WatchError::TooMany));
        open.pop();
        assert!(w.watch(&t, "x", 1).is_ok());
    }
}
