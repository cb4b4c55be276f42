//! Helpers shared by the broker integration tests: rumqttc wrappers that turn the event loop
//! into a queue of incoming packets, byte-level helpers around [`RawClient`], and HTTP helpers.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use ferrohub_proto::mqtt::{
    ConnAck, Connect, ConnectProperties, Packet, ProtocolVersion, PubResponse, Publish,
    PublishProperties, Subscribe, SubscribeFilter, SubscriptionOptions,
};
use ferrohub_testkit::{RawClient, TestHub};
use ferrohub_types::QoS as FQoS;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Default bound for anything we wait for.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long we listen to conclude that something does *not* arrive.
pub const QUIET: Duration = Duration::from_millis(500);

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A client identifier unique within the test binary.
pub fn uid(prefix: &str) -> String {
    format!("{prefix}-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed))
}

/// Polls `f` until it returns true, every 20 ms, for at most `within`.
pub async fn wait_until(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if f() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// rumqttc 3.1.1
// ---------------------------------------------------------------------------------------------

/// rumqttc 3.1.1 options for `hub` with a 30 s keep-alive.
pub fn v4_opts(hub: &TestHub, id: &str) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(id, hub.mqtt.ip().to_string(), hub.mqtt.port());
    o.set_keep_alive(Duration::from_secs(30));
    o
}

/// A rumqttc 3.1.1 client whose event loop runs in a task; incoming packets are queued.
/// The event loop stops at the first connection error (no automatic reconnection).
pub struct V4 {
    /// The client handle.
    pub client: rumqttc::AsyncClient,
    /// The CONNACK received.
    pub connack: rumqttc::ConnAck,
    rx: mpsc::UnboundedReceiver<Result<rumqttc::Packet, rumqttc::ConnectionError>>,
    stash: VecDeque<rumqttc::Packet>,
    closed: Option<String>,
    task: JoinHandle<()>,
}

impl Drop for V4 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl V4 {
    /// Connects; panics if the broker refuses.
    pub async fn connect(opts: rumqttc::MqttOptions) -> V4 {
        match Self::try_connect(opts).await {
            Ok(c) => c,
            Err(e) => panic!("3.1.1 connect failed: {e:?}"),
        }
    }

    /// Connects, returning the connection error if there is one before CONNACK.
    pub async fn try_connect(opts: rumqttc::MqttOptions) -> Result<V4, rumqttc::ConnectionError> {
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 100);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(p)) => {
                        if tx.send(Ok(p)).is_err() {
                            break;
                        }
                    }
                    Ok(rumqttc::Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        break;
                    }
                }
            }
        });
        let first = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("no CONNACK within 5 s")
            .expect("event loop ended");
        match first {
            Ok(rumqttc::Packet::ConnAck(connack)) => Ok(V4 {
                client,
                connack,
                rx,
                stash: VecDeque::new(),
                closed: None,
                task,
            }),
            Ok(other) => panic!("expected CONNACK, got {other:?}"),
            Err(e) => {
                task.abort();
                Err(e)
            }
        }
    }

    /// The next incoming packet (stashed ones first), or `None` after `within` or once closed.
    pub async fn next(&mut self, within: Duration) -> Option<rumqttc::Packet> {
        if let Some(p) = self.stash.pop_front() {
            return Some(p);
        }
        if self.closed.is_some() {
            return None;
        }
        match tokio::time::timeout(within, self.rx.recv()).await {
            Ok(Some(Ok(p))) => Some(p),
            Ok(Some(Err(e))) => {
                self.closed = Some(format!("{e:?}"));
                None
            }
            Ok(None) => {
                self.closed = Some("event loop ended".into());
                None
            }
            Err(_) => None,
        }
    }

    /// Waits for the first packet matching `f`, keeping the others for later.
    pub async fn wait_for(
        &mut self,
        what: &str,
        mut f: impl FnMut(&rumqttc::Packet) -> bool,
    ) -> rumqttc::Packet {
        if let Some(i) = self.stash.iter().position(&mut f) {
            return self.stash.remove(i).unwrap();
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut skipped = VecDeque::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if self.closed.is_some() {
                panic!(
                    "connection closed ({:?}) while waiting for {what}",
                    self.closed
                );
            }
            let p = match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(Ok(p))) => p,
                Ok(Some(Err(e))) => {
                    self.closed = Some(format!("{e:?}"));
                    continue;
                }
                Ok(None) => {
                    self.closed = Some("event loop ended".into());
                    continue;
                }
                Err(_) => panic!("timed out waiting for {what}"),
            };
            if f(&p) {
                self.stash.extend(skipped);
                return p;
            }
            skipped.push_back(p);
        }
    }

    /// The next PUBLISH.
    pub async fn recv_publish(&mut self) -> rumqttc::Publish {
        match self
            .wait_for("PUBLISH", |p| matches!(p, rumqttc::Packet::Publish(_)))
            .await
        {
            rumqttc::Packet::Publish(p) => p,
            _ => unreachable!(),
        }
    }

    /// Asserts that no PUBLISH arrives for `within`.
    pub async fn expect_no_publish(&mut self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            match self.next(left).await {
                Some(rumqttc::Packet::Publish(p)) => panic!("unexpected PUBLISH {p:?}"),
                Some(_) => {}
                None => return,
            }
        }
    }

    /// Subscribes and returns the SUBACK codes.
    pub async fn subscribe(
        &mut self,
        filter: &str,
        qos: rumqttc::QoS,
    ) -> Vec<rumqttc::SubscribeReasonCode> {
        self.client.subscribe(filter, qos).await.unwrap();
        match self
            .wait_for("SUBACK", |p| matches!(p, rumqttc::Packet::SubAck(_)))
            .await
        {
            rumqttc::Packet::SubAck(s) => s.return_codes,
            _ => unreachable!(),
        }
    }

    /// Publishes and, for QoS 1/2, waits for the PUBACK/PUBCOMP.
    pub async fn publish(&mut self, topic: &str, qos: rumqttc::QoS, retain: bool, payload: &[u8]) {
        self.client
            .publish(topic, qos, retain, payload.to_vec())
            .await
            .unwrap();
        match qos {
            rumqttc::QoS::AtMostOnce => {}
            rumqttc::QoS::AtLeastOnce => {
                self.wait_for("PUBACK", |p| matches!(p, rumqttc::Packet::PubAck(_)))
                    .await;
            }
            rumqttc::QoS::ExactlyOnce => {
                self.wait_for("PUBCOMP", |p| matches!(p, rumqttc::Packet::PubComp(_)))
                    .await;
            }
        }
    }

    /// Sends DISCONNECT and waits for the broker to close the connection.
    pub async fn disconnect(mut self) {
        self.client.disconnect().await.unwrap();
        self.wait_closed(WAIT).await;
    }

    /// Makes sure the broker processed everything sent so far: a QoS 1 round trip on a topic
    /// nobody subscribes to (packets of one connection are handled in order).
    pub async fn barrier(&mut self) {
        self.publish("barrier/unmatched", rumqttc::QoS::AtLeastOnce, false, b"")
            .await;
    }

    /// Waits for the connection to end; returns the error text.
    pub async fn wait_closed(&mut self, within: Duration) -> String {
        let deadline = tokio::time::Instant::now() + within;
        while self.closed.is_none() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(Ok(p))) => self.stash.push_back(p),
                Ok(Some(Err(e))) => self.closed = Some(format!("{e:?}")),
                Ok(None) => self.closed = Some("event loop ended".into()),
                Err(_) => panic!("connection still open after {within:?}"),
            }
        }
        self.closed.clone().unwrap_or_default()
    }

    /// Whether the connection ended.
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }
}

// ---------------------------------------------------------------------------------------------
// rumqttc 5.0
// ---------------------------------------------------------------------------------------------

/// rumqttc's MQTT 5 packet types, with its QoS.
pub mod m5 {
    pub use rumqttc::v5::mqttbytes::QoS;
    pub use rumqttc::v5::mqttbytes::v5::*;
}

/// rumqttc 5.0 options for `hub` with a 30 s keep-alive.
pub fn v5_opts(hub: &TestHub, id: &str) -> rumqttc::v5::MqttOptions {
    let mut o = rumqttc::v5::MqttOptions::new(id, hub.mqtt.ip().to_string(), hub.mqtt.port());
    o.set_keep_alive(Duration::from_secs(30));
    o
}

/// 5.0 options for a registered device: user name and client id = `id`, a persistent session
/// (expiry one hour), clean start as asked.
pub fn device_session_opts(
    hub: &TestHub,
    id: &str,
    secret: &str,
    clean: bool,
) -> rumqttc::v5::MqttOptions {
    let mut o = v5_opts(hub, id);
    o.set_credentials(id, secret);
    o.set_clean_start(clean);
    let mut props = rumqttc::v5::mqttbytes::v5::ConnectProperties::new();
    props.session_expiry_interval = Some(3600);
    o.set_connect_properties(props);
    o
}

/// A rumqttc 5.0 client; see [`V4`].
pub struct V5 {
    /// The client handle.
    pub client: rumqttc::v5::AsyncClient,
    /// The CONNACK received.
    pub connack: m5::ConnAck,
    rx: mpsc::UnboundedReceiver<Result<m5::Packet, rumqttc::v5::ConnectionError>>,
    stash: VecDeque<m5::Packet>,
    closed: Option<rumqttc::v5::ConnectionError>,
    closed_text: Option<String>,
    task: JoinHandle<()>,
}

impl Drop for V5 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl V5 {
    /// Connects; panics if the broker refuses.
    pub async fn connect(opts: rumqttc::v5::MqttOptions) -> V5 {
        match Self::try_connect(opts).await {
            Ok(c) => c,
            Err(e) => panic!("5.0 connect failed: {e:?}"),
        }
    }

    /// Connects, returning the connection error if there is one before CONNACK.
    pub async fn try_connect(
        opts: rumqttc::v5::MqttOptions,
    ) -> Result<V5, rumqttc::v5::ConnectionError> {
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 100);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::v5::Event::Incoming(p)) => {
                        if tx.send(Ok(p)).is_err() {
                            break;
                        }
                    }
                    Ok(rumqttc::v5::Event::Outgoing(_)) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        break;
                    }
                }
            }
        });
        let first = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("no CONNACK within 5 s")
            .expect("event loop ended");
        match first {
            Ok(m5::Packet::ConnAck(connack)) => Ok(V5 {
                client,
                connack,
                rx,
                stash: VecDeque::new(),
                closed: None,
                closed_text: None,
                task,
            }),
            Ok(other) => panic!("expected CONNACK, got {other:?}"),
            Err(e) => {
                task.abort();
                Err(e)
            }
        }
    }

    fn set_closed(&mut self, e: Option<rumqttc::v5::ConnectionError>) {
        self.closed_text = Some(match &e {
            Some(e) => format!("{e:?}"),
            None => "event loop ended".into(),
        });
        self.closed = e;
    }

    /// The next incoming packet (stashed ones first), or `None` after `within` or once closed.
    pub async fn next(&mut self, within: Duration) -> Option<m5::Packet> {
        if let Some(p) = self.stash.pop_front() {
            return Some(p);
        }
        if self.closed_text.is_some() {
            return None;
        }
        match tokio::time::timeout(within, self.rx.recv()).await {
            Ok(Some(Ok(p))) => Some(p),
            Ok(Some(Err(e))) => {
                self.set_closed(Some(e));
                None
            }
            Ok(None) => {
                self.set_closed(None);
                None
            }
            Err(_) => None,
        }
    }

    /// Waits for the first packet matching `f`, keeping the others for later.
    pub async fn wait_for(
        &mut self,
        what: &str,
        mut f: impl FnMut(&m5::Packet) -> bool,
    ) -> m5::Packet {
        if let Some(i) = self.stash.iter().position(&mut f) {
            return self.stash.remove(i).unwrap();
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut skipped = VecDeque::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if self.closed_text.is_some() {
                panic!(
                    "connection closed ({:?}) while waiting for {what}",
                    self.closed_text
                );
            }
            let p = match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(Ok(p))) => p,
                Ok(Some(Err(e))) => {
                    self.set_closed(Some(e));
                    continue;
                }
                Ok(None) => {
                    self.set_closed(None);
                    continue;
                }
                Err(_) => panic!("timed out waiting for {what}"),
            };
            if f(&p) {
                self.stash.extend(skipped);
                return p;
            }
            skipped.push_back(p);
        }
    }

    /// The next PUBLISH.
    pub async fn recv_publish(&mut self) -> m5::Publish {
        match self
            .wait_for("PUBLISH", |p| matches!(p, m5::Packet::Publish(_)))
            .await
        {
            m5::Packet::Publish(p) => p,
            _ => unreachable!(),
        }
    }

    /// Asserts that no PUBLISH arrives for `within`.
    pub async fn expect_no_publish(&mut self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            match self.next(left).await {
                Some(m5::Packet::Publish(p)) => panic!("unexpected PUBLISH {p:?}"),
                Some(_) => {}
                None => return,
            }
        }
    }

    /// Subscribes to one filter and returns the SUBACK.
    pub async fn subscribe_filter(
        &mut self,
        filter: m5::Filter,
        props: Option<m5::SubscribeProperties>,
    ) -> m5::SubAck {
        match props {
            Some(p) => self
                .client
                .subscribe_many_with_properties([filter], p)
                .await
                .unwrap(),
            None => self.client.subscribe_many([filter]).await.unwrap(),
        }
        match self
            .wait_for("SUBACK", |p| matches!(p, m5::Packet::SubAck(_)))
            .await
        {
            m5::Packet::SubAck(s) => s,
            _ => unreachable!(),
        }
    }

    /// Subscribes with default options and returns the SUBACK reason codes.
    pub async fn subscribe(&mut self, filter: &str, qos: m5::QoS) -> Vec<m5::SubscribeReasonCode> {
        self.subscribe_filter(m5::Filter::new(filter, qos), None)
            .await
            .return_codes
    }

    /// Subscribes with a subscription identifier.
    pub async fn subscribe_with_id(&mut self, filter: &str, qos: m5::QoS, id: usize) -> m5::SubAck {
        let props = m5::SubscribeProperties {
            id: Some(id),
            user_properties: Vec::new(),
        };
        self.subscribe_filter(m5::Filter::new(filter, qos), Some(props))
            .await
    }

    /// Publishes and, for QoS 1, returns the PUBACK reason; for QoS 2 waits for PUBCOMP (or a
    /// failed PUBREC) and returns its reason code as a number; `None` for QoS 0.
    pub async fn publish_props(
        &mut self,
        topic: &str,
        qos: m5::QoS,
        retain: bool,
        payload: &[u8],
        props: Option<m5::PublishProperties>,
    ) -> Option<m5::PubAckReason> {
        match props {
            Some(p) => self
                .client
                .publish_with_properties(topic, qos, retain, payload.to_vec(), p)
                .await
                .unwrap(),
            None => self
                .client
                .publish(topic, qos, retain, payload.to_vec())
                .await
                .unwrap(),
        }
        match qos {
            m5::QoS::AtMostOnce => None,
            m5::QoS::AtLeastOnce => match self
                .wait_for("PUBACK", |p| matches!(p, m5::Packet::PubAck(_)))
                .await
            {
                m5::Packet::PubAck(a) => Some(a.reason),
                _ => unreachable!(),
            },
            m5::QoS::ExactlyOnce => {
                self.wait_for("PUBCOMP", |p| matches!(p, m5::Packet::PubComp(_)))
                    .await;
                Some(m5::PubAckReason::Success)
            }
        }
    }

    /// Publishes without properties; see [`V5::publish_props`].
    pub async fn publish(
        &mut self,
        topic: &str,
        qos: m5::QoS,
        retain: bool,
        payload: &[u8],
    ) -> Option<m5::PubAckReason> {
        self.publish_props(topic, qos, retain, payload, None).await
    }

    /// Sends DISCONNECT (normal) and waits for the broker to close the connection.
    pub async fn disconnect(mut self) {
        self.client.disconnect().await.unwrap();
        self.wait_closed(WAIT).await;
    }

    /// See [`V4::barrier`].
    pub async fn barrier(&mut self) {
        self.publish("barrier/unmatched", m5::QoS::AtLeastOnce, false, b"")
            .await;
    }

    /// Waits for the connection to end; returns the error (None if the loop just ended).
    pub async fn wait_closed(&mut self, within: Duration) -> Option<&rumqttc::v5::ConnectionError> {
        let deadline = tokio::time::Instant::now() + within;
        while self.closed_text.is_none() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(Ok(p))) => self.stash.push_back(p),
                Ok(Some(Err(e))) => self.set_closed(Some(e)),
                Ok(None) => self.set_closed(None),
                Err(_) => panic!("connection still open after {within:?}"),
            }
        }
        self.closed.as_ref()
    }

    /// Whether the connection ended.
    pub fn is_closed(&self) -> bool {
        self.closed_text.is_some()
    }
}

/// The reason code of a server DISCONNECT that ended a rumqttc 5.0 connection.
pub fn server_disconnect_reason(e: Option<&rumqttc::v5::ConnectionError>) -> Option<u8> {
    match e {
        Some(rumqttc::v5::ConnectionError::MqttState(
            rumqttc::v5::StateError::ServerDisconnect { reason_code, .. },
        )) => Some(*reason_code as u8),
        _ => None,
    }
}

/// The topic of a rumqttc 5.0 PUBLISH as a string.
pub fn topic5(p: &m5::Publish) -> String {
    String::from_utf8(p.topic.to_vec()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Byte level
// ---------------------------------------------------------------------------------------------

/// A CONNECT with a 30 s keep-alive and clean start.
pub fn connect_packet(version: ProtocolVersion, id: &str) -> Connect {
    Connect {
        protocol: version,
        clean_start: true,
        keep_alive: 30,
        client_id: id.to_string(),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }
}

/// Connects a [`RawClient`] with `connect` and returns it with the CONNACK.
pub async fn raw_connect_with(addr: SocketAddr, connect: Connect) -> (RawClient, ConnAck) {
    let mut raw = RawClient::connect(addr, connect.protocol).await.unwrap();
    raw.send(&Packet::Connect(Box::new(connect))).await.unwrap();
    match raw.recv(WAIT).await.unwrap() {
        Packet::ConnAck(c) => (raw, c),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// Connects a [`RawClient`] with a default CONNECT adjusted by `f`; asserts success.
pub async fn raw_connect(
    addr: SocketAddr,
    version: ProtocolVersion,
    id: &str,
    f: impl FnOnce(&mut Connect),
) -> (RawClient, ConnAck) {
    let mut c = connect_packet(version, id);
    f(&mut c);
    let (raw, ack) = raw_connect_with(addr, c).await;
    assert_eq!(ack.code, 0, "CONNACK refused: {ack:?}");
    (raw, ack)
}

/// A PUBLISH packet.
pub fn publish_packet(topic: &str, qos: FQoS, packet_id: u16, payload: &[u8]) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: Arc::from(topic),
        packet_id,
        properties: PublishProperties::default(),
        payload: Bytes::copy_from_slice(payload),
    })
}

/// A SUBSCRIBE for one filter.
pub fn subscribe_packet(packet_id: u16, filter: &str, qos: FQoS) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id,
        subscription_identifier: None,
        user_properties: Vec::new(),
        filters: vec![SubscribeFilter {
            filter: filter.to_string(),
            options: SubscriptionOptions {
                qos,
                ..SubscriptionOptions::default()
            },
        }],
    })
}

/// Subscribes a raw client and returns the SUBACK codes.
pub async fn raw_subscribe(
    raw: &mut RawClient,
    packet_id: u16,
    filter: &str,
    qos: FQoS,
) -> Vec<u8> {
    raw.send(&subscribe_packet(packet_id, filter, qos))
        .await
        .unwrap();
    match raw_wait(raw, "SUBACK", |p| matches!(p, Packet::SubAck(_))).await {
        Packet::SubAck(s) => {
            assert_eq!(s.packet_id, packet_id);
            s.codes
        }
        _ => unreachable!(),
    }
}

/// A PUBACK.
pub fn puback(packet_id: u16) -> Packet {
    Packet::PubAck(PubResponse {
        packet_id,
        ..PubResponse::default()
    })
}

/// Receives packets until one matches `f` (others are discarded); panics on close/timeout.
pub async fn raw_wait(
    raw: &mut RawClient,
    what: &str,
    mut f: impl FnMut(&Packet) -> bool,
) -> Packet {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match raw.recv_or_close(left).await {
            Ok(Some(p)) if f(&p) => return p,
            Ok(Some(_)) => {}
            Ok(None) => panic!("connection closed while waiting for {what}"),
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    }
}

/// The next PUBLISH on a raw connection.
pub async fn raw_recv_publish(raw: &mut RawClient) -> Publish {
    match raw_wait(raw, "PUBLISH", |p| matches!(p, Packet::Publish(_))).await {
        Packet::Publish(p) => p,
        _ => unreachable!(),
    }
}

/// Asserts nothing arrives on a raw connection for `within` (and it is not closed).
pub async fn raw_expect_silence(raw: &mut RawClient, within: Duration) {
    match raw.recv_or_close(within).await {
        Err(_) => {}
        Ok(Some(p)) => panic!("unexpected packet {p:?}"),
        Ok(None) => panic!("connection closed unexpectedly"),
    }
}

/// Waits for the server to close a raw connection; returns the reason code of the DISCONNECT
/// it sent before, if any.
pub async fn raw_expect_disconnect(raw: &mut RawClient, within: Duration) -> Option<u8> {
    let packets = raw
        .expect_close(within)
        .await
        .unwrap_or_else(|e| panic!("connection not closed: {e}"));
    packets.iter().rev().find_map(|p| match p {
        Packet::Disconnect(d) => Some(d.code),
        _ => None,
    })
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// GET `path` on the hub's HTTP listener: status and body.
pub async fn http_get(hub: &TestHub, path: &str) -> (u16, String) {
    let url = format!("http://{}{}", hub.http, path);
    let resp = tokio::time::timeout(WAIT, reqwest::get(&url))
        .await
        .expect("HTTP timeout")
        .expect("HTTP request failed");
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap();
    (status, body)
}

/// The /metrics text.
pub async fn metrics(hub: &TestHub) -> String {
    let (status, body) = http_get(hub, "/metrics").await;
    assert_eq!(status, 200);
    body
}

/// The value of the sample `name` (with labels, exactly as rendered) in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.rsplit_once(' ')?;
        (n == name).then(|| v.parse().ok())?
    })
}

/// Polls /metrics until the sample `name` satisfies `pred`; returns its value.
pub async fn wait_metric(hub: &TestHub, name: &str, pred: impl Fn(f64) -> bool) -> f64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = metrics(hub).await;
        let v = metric(&text, name);
        if let Some(v) = v
            && pred(v)
        {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("metric {name} never reached the expected value (last {v:?})");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the hub counts `n` open MQTT connections, then gives the connections that just
/// ended a moment to detach from their sessions (the gauge drops before the detach).
pub async fn wait_connections(hub: &TestHub, n: usize) {
    wait_metric(hub, "ferrohub_mqtt_connections", |v| v == n as f64).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
}

/// Like [`raw_subscribe`], but also returns the PUBLISHes that arrived before the SUBACK (a
/// server may start sending matching messages before it acknowledges [MQTT-3.8.4]).
pub async fn raw_subscribe_collect(
    raw: &mut RawClient,
    packet_id: u16,
    filter: &str,
    qos: FQoS,
) -> (Vec<u8>, Vec<Publish>) {
    raw.send(&subscribe_packet(packet_id, filter, qos))
        .await
        .unwrap();
    let mut early = Vec::new();
    loop {
        match raw.recv(WAIT).await.unwrap() {
            Packet::SubAck(s) => {
                assert_eq!(s.packet_id, packet_id);
                return (s.codes, early);
            }
            Packet::Publish(p) => early.push(p),
            other => panic!("unexpected {other:?} while waiting for SUBACK"),
        }
    }
}

/// Every point the hub's telemetry engine holds for a series of the default tenant.
pub fn stored_points(
    hub: &TestHub,
    device: &str,
    metric: &str,
) -> Vec<(i64, ferrohub_types::telemetry::Value)> {
    let engine = hub.hub().telemetry.as_ref().unwrap().engine().clone();
    engine
        .raw(
            &ferrohub_types::TenantId::default_tenant(),
            &ferrohub_tsdb::RawQuery {
                device: device.into(),
                metric: metric.into(),
                from: 0,
                to: i64::MAX / 2,
                limit: 100_000,
                descending: false,
            },
        )
        .unwrap()
        .points
}

/// `ferrohub sim run` flags against the broker at `addr` (no progress line); `flags` is split at
/// whitespace.
pub fn sim_args(addr: SocketAddr, flags: &str) -> ferrohub_sim::sim::RunArgs {
    let port = addr.port().to_string();
    let mut v = vec![
        "--host",
        "127.0.0.1",
        "--port",
        port.as_str(),
        "--no-progress",
    ];
    v.extend(flags.split_whitespace());
    ferrohub_sim::sim::RunArgs::try_parse_from(v).expect("sim run flags")
}

/// Runs `a`, which must stop by itself within `bound`.
pub async fn try_sim_run(
    a: &ferrohub_sim::sim::RunArgs,
    bound: Duration,
) -> anyhow::Result<ferrohub_sim::sim::Summary> {
    tokio::time::timeout(
        bound,
        ferrohub_sim::sim::run_args(a, std::future::pending()),
    )
    .await
    .expect("the run did not stop by itself")
}
