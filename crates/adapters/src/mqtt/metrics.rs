//! Broker counters: plain atomics on the hot path, rendered as Prometheus text on scrape and
//! published on `$SYS` topics. (A metrics facade with labelled keys costs a hash lookup per
//! increment, too much at hundreds of thousands of messages per second.)

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};

use crossbeam_utils::CachePadded;

const STRIPES: usize = 8;

/// A counter split over cache-line-padded cells, one per worker thread (modulo), so that
/// connections on different cores do not fight over one cache line on every message.
#[derive(Debug, Default)]
pub struct Striped {
    cells: [CachePadded<AtomicI64>; STRIPES],
}

fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Relaxed) % STRIPES;
    }
    INDEX.with(|i| *i)
}

impl Striped {
    /// Adds `v` (may be negative).
    #[inline]
    pub fn add(&self, v: i64) {
        self.cells[stripe()].fetch_add(v, Relaxed);
    }

    /// Subtracts `v`.
    #[inline]
    pub fn sub(&self, v: i64) {
        self.add(-v);
    }

    /// The current total.
    pub fn get(&self) -> i64 {
        self.cells.iter().map(|c| c.load(Relaxed)).sum()
    }
}

/// Why a message was not delivered to a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// QoS 0 message for an offline session.
    OfflineQos0,
    /// Session queue full (QoS 0 dropped first).
    QueueFull,
    /// QoS 1/2 refused to the publisher with Quota exceeded.
    QuotaRefused,
    /// Message Expiry Interval elapsed before delivery.
    Expired,
    /// Larger than the client's Maximum Packet Size.
    TooLargeForClient,
    /// Non-persistent session ended with messages still queued.
    SessionEnded,
    /// Refused by the publisher's or receiver's authorization policy.
    NotAuthorized,
    /// Over the device's or tenant's message or byte rate (v5: PUBACK 0x97 Quota exceeded).
    RateLimited,
    /// A hub service's queue was full.
    ServiceBusy,
}

impl DropReason {
    const ALL: [DropReason; 9] = [
        DropReason::OfflineQos0,
        DropReason::QueueFull,
        DropReason::QuotaRefused,
        DropReason::Expired,
        DropReason::TooLargeForClient,
        DropReason::SessionEnded,
        DropReason::NotAuthorized,
        DropReason::RateLimited,
        DropReason::ServiceBusy,
    ];

    fn label(self) -> &'static str {
        match self {
            DropReason::OfflineQos0 => "offline_qos0",
            DropReason::QueueFull => "queue_full",
            DropReason::QuotaRefused => "quota_refused",
            DropReason::Expired => "expired",
            DropReason::NotAuthorized => "not_authorized",
            DropReason::RateLimited => "rate_limited",
            DropReason::ServiceBusy => "service_busy",
            DropReason::TooLargeForClient => "too_large_for_client",
            DropReason::SessionEnded => "session_ended",
        }
    }
}

/// All broker counters and gauges.
#[derive(Debug, Default)]
pub struct BrokerMetrics {
    /// Open MQTT connections (authenticated).
    pub connections: AtomicI64,
    /// Connections ever accepted.
    pub connections_total: AtomicU64,
    /// Connections refused (limit, auth, protocol) before CONNACK success.
    pub connections_refused: AtomicU64,
    /// Sessions known (online and offline).
    pub sessions: AtomicI64,
    /// Persistent sessions known.
    pub persistent_sessions: AtomicI64,
    /// PUBLISH received, by QoS.
    pub received: [Striped; 3],
    /// PUBLISH sent, by QoS.
    pub sent: [Striped; 3],
    /// Bytes read from clients.
    pub bytes_received: Striped,
    /// Bytes written to clients.
    pub bytes_sent: Striped,
    dropped: [AtomicU64; DropReason::ALL.len()],
    /// Messages waiting in session queues (not yet in flight).
    pub queued: Striped,
    /// Unacknowledged QoS 1/2 deliveries.
    pub inflight: Striped,
    /// Retained messages.
    pub retained: AtomicI64,
    /// Connections closed for protocol violations or malformed packets.
    pub protocol_errors: AtomicU64,
}

impl BrokerMetrics {
    /// Counts a dropped delivery.
    pub fn drop_message(&self, reason: DropReason) {
        self.dropped[reason as usize].fetch_add(1, Relaxed);
    }

    /// Dropped deliveries for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].load(Relaxed)
    }

    /// Dropped deliveries, all reasons.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().map(|d| d.load(Relaxed)).sum()
    }

    /// PUBLISH received, all QoS.
    pub fn received_total(&self) -> u64 {
        self.received.iter().map(|d| d.get() as u64).sum()
    }

    /// PUBLISH sent, all QoS.
    pub fn sent_total(&self) -> u64 {
        self.sent.iter().map(|d| d.get() as u64).sum()
    }

    /// Appends the Prometheus text exposition of every metric to `out`.
    pub fn render_prometheus(&self, out: &mut String, subscriptions: usize) {
        let g = |out: &mut String, name: &str, help: &str, kind: &str, v: i128| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        g(
            out,
            "ferrohub_mqtt_connections",
            "Open MQTT connections.",
            "gauge",
            self.connections.load(Relaxed).into(),
        );
        g(
            out,
            "ferrohub_mqtt_connections_total",
            "MQTT connections accepted.",
            "counter",
            self.connections_total.load(Relaxed).into(),
        );
        g(
            out,
            "ferrohub_mqtt_connections_refused_total",
            "MQTT connections refused before a successful CONNACK.",
            "counter",
            self.connections_refused.load(Relaxed).into(),
        );
        g(
            out,
            "ferrohub_mqtt_sessions",
            "MQTT sessions (online and offline).",
            "gauge",
            self.sessions.load(Relaxed).into(),
        );
        g(
            out,
            "ferrohub_mqtt_persistent_sessions",
            "Persistent MQTT sessions.",
            "gauge",
            self.persistent_sessions.load(Relaxed).into(),
        );
        g(
            out,
            "ferrohub_mqtt_subscriptions",
            "Subscriptions.",
            "gauge",
            subscriptions as i128,
        );
        g(
            out,
            "ferrohub_mqtt_retained_messages",
            "Retained messages.",
            "gauge",
            self.retained.load(Relaxed).into(),
        );
        g(
            out,
            "ferrohub_mqtt_queued_messages",
            "Messages queued in sessions, not yet in flight.",
            "gauge",
            self.queued.get().into(),
        );
        g(
            out,
            "ferrohub_mqtt_inflight_messages",
            "Unacknowledged QoS 1/2 deliveries.",
            "gauge",
            self.inflight.get().into(),
        );
        g(
            out,
            "ferrohub_mqtt_bytes_received_total",
            "Bytes received from MQTT clients.",
            "counter",
            self.bytes_received.get().into(),
        );
        g(
            out,
            "ferrohub_mqtt_bytes_sent_total",
            "Bytes sent to MQTT clients.",
            "counter",
            self.bytes_sent.get().into(),
        );
        g(
            out,
            "ferrohub_mqtt_protocol_errors_total",
            "Connections closed for malformed packets or protocol violations.",
            "counter",
            self.protocol_errors.load(Relaxed).into(),
        );
        for (name, help, arr) in [
            (
                "ferrohub_mqtt_messages_received_total",
                "PUBLISH packets received, by QoS.",
                &self.received,
            ),
            (
                "ferrohub_mqtt_messages_sent_total",
                "PUBLISH packets sent, by QoS.",
                &self.sent,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (qos, v) in arr.iter().enumerate() {
                let _ = writeln!(out, "{name}{{qos=\"{qos}\"}} {}", v.get());
            }
        }
        let name = "ferrohub_mqtt_messages_dropped_total";
        let _ = writeln!(
            out,
            "# HELP {name} Deliveries dropped, by reason.\n# TYPE {name} counter"
        );
        for r in DropReason::ALL {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{}\"}} {}",
                r.label(),
                self.dropped(r)
            );
        }
    }
}
