//! One MQTT client connection (over TCP, TLS or WebSocket: [`super::transport`]), spoken with
//! `ferrohub-proto`'s codec: connecting, subscribing, pre-encoded PUBLISH templates and QoS 1
//! packet-identifier bookkeeping.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferrohub_proto::mqtt::{
    self, ConnectProperties, DecodeError, EncodeError, Packet, ProtocolVersion, Publish,
    PublishProperties, Subscribe, SubscribeFilter, SubscriptionOptions,
};
use ferrohub_types::QoS;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::payload::{self, STAMP_LEN, Stamp};
use super::transport::{self, TransportError};
pub use super::transport::{DeviceTls, MqttStream, Transport};

/// Largest packet the harness accepts from a broker (payloads are at most this minus headers).
pub const MAX_INBOUND_PACKET: usize = 16 * 1024 * 1024;

/// Why a connection could not be set up or failed while running.
#[derive(Debug, Error)]
pub enum ConnError {
    /// TCP connect, TLS or WebSocket handshake failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Read or write failed.
    #[error("{stage} {addr}: {source}")]
    Io {
        /// What we were doing.
        stage: &'static str,
        /// Broker address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The broker answered CONNECT with a non-zero return/reason code.
    #[error("broker refused CONNECT: code {code:#04x} ({name})")]
    Refused {
        /// Return (3.1.1) or reason (5.0) code.
        code: u8,
        /// Its meaning.
        name: &'static str,
    },
    /// The broker refused a subscription.
    #[error("broker refused SUBSCRIBE to {filter:?}: code {code:#04x}")]
    SubscribeRefused {
        /// The filter.
        filter: String,
        /// The SUBACK code.
        code: u8,
    },
    /// No answer in time.
    #[error("timed out waiting for {0} from the broker")]
    Timeout(&'static str),
    /// The broker closed the connection.
    #[error("the broker closed the connection{0}")]
    Closed(String),
    /// The broker sent something unexpected.
    #[error("protocol violation by the broker: {0}")]
    Protocol(String),
    /// The broker sent bytes our codec rejects.
    #[error("undecodable packet from the broker: {0}")]
    Decode(#[from] DecodeError),
    /// We could not encode a packet (e.g. a topic longer than 65,535 bytes).
    #[error("cannot encode packet: {0}")]
    Encode(#[from] EncodeError),
}

/// Everything needed to open client connections to the broker under test.
#[derive(Debug, Clone)]
pub struct ClientOpts {
    /// Broker address (resolved once).
    pub addr: SocketAddr,
    /// MQTT version spoken.
    pub version: ProtocolVersion,
    /// Optional user name.
    pub username: Option<String>,
    /// Optional password.
    pub password: Option<Bytes>,
    /// Keep Alive sent in CONNECT (seconds); connections ping at half this period.
    pub keep_alive: u16,
    /// How long to wait for CONNACK / SUBACK / the TCP (TLS, WebSocket) handshake.
    pub timeout: Duration,
    /// TCP (the default), TLS or WebSocket.
    pub transport: Transport,
}

/// Credentials of one connection, overriding [`ClientOpts`]' user name and password.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Creds {
    /// User name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<Bytes>,
    /// Its own TLS configuration (a client certificate), used when the transport is TLS.
    pub tls: Option<DeviceTls>,
}

impl ClientOpts {
    /// Interval at which an otherwise silent connection sends PINGREQ.
    pub fn ping_every(&self) -> Duration {
        Duration::from_secs(u64::from(self.keep_alive.max(2)) / 2)
    }
}

/// An established MQTT connection with its own read and write buffers.
#[derive(Debug)]
pub struct Session {
    /// The connection.
    pub stream: MqttStream,
    /// Bytes read but not yet decoded.
    pub rbuf: BytesMut,
    /// Bytes encoded but not yet written.
    pub wbuf: BytesMut,
    /// The protocol version of the connection.
    pub version: ProtocolVersion,
    /// Receive Maximum announced by the broker in CONNACK (v5), else 65,535.
    pub server_receive_max: u16,
    /// Broker address, for error messages.
    pub addr: SocketAddr,
    /// CONNACK's Session Present flag: the broker resumed a session of this client id.
    pub session_present: bool,
}

/// What one connection asks for: its session, and where it connects from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Clean Start (5.0) / Clean Session (3.1.1).
    pub clean_start: bool,
    /// Session Expiry Interval in seconds (5.0 only; 3.1.1 brokers keep a Clean Session = 0
    /// session by their own rules).
    pub expiry_secs: Option<u32>,
    /// Local address to connect from (`None`: the system's choice). Each source address has its
    /// own ephemeral ports towards one broker address.
    pub source: Option<std::net::IpAddr>,
}

impl ConnectRequest {
    /// A fresh session that ends with the connection.
    pub const CLEAN: ConnectRequest = ConnectRequest {
        clean_start: true,
        expiry_secs: None,
        source: None,
    };
}

impl Session {
    /// Opens a connection over the options' transport, sends CONNECT (clean start) and waits
    /// for a successful CONNACK.
    pub async fn connect(
        opts: &ClientOpts,
        client_id: String,
        buf_capacity: usize,
    ) -> Result<Session, ConnError> {
        Session::connect_as(opts, client_id, None, buf_capacity).await
    }

    /// [`connect`](Self::connect) with this connection's own credentials (`None`: the options').
    pub async fn connect_as(
        opts: &ClientOpts,
        client_id: String,
        creds: Option<&Creds>,
        buf_capacity: usize,
    ) -> Result<Session, ConnError> {
        Session::connect_session(opts, client_id, creds, buf_capacity, ConnectRequest::CLEAN).await
    }

    /// [`connect_as`](Self::connect_as) asking for the session `request` describes.
    pub async fn connect_session(
        opts: &ClientOpts,
        client_id: String,
        creds: Option<&Creds>,
        buf_capacity: usize,
        request: ConnectRequest,
    ) -> Result<Session, ConnError> {
        let addr = opts.addr;
        let device_tls = creds.and_then(|c| c.tls.as_ref());
        let stream = tokio::time::timeout(
            opts.timeout,
            transport::open(addr, &opts.transport, device_tls, request.source),
        )
        .await
        .map_err(|_| {
            ConnError::Timeout(match opts.transport {
                Transport::Tcp => "the TCP handshake",
                Transport::Tls(_) => "the TCP and TLS handshakes",
                Transport::Ws { .. } => "the TCP and WebSocket handshakes",
            })
        })??;
        let mut s = Session {
            stream,
            rbuf: BytesMut::with_capacity(buf_capacity),
            wbuf: BytesMut::with_capacity(buf_capacity.min(4096)),
            version: opts.version,
            server_receive_max: u16::MAX,
            addr,
            session_present: false,
        };
        let properties = if opts.version.is_v5() {
            ConnectProperties {
                receive_maximum: Some(u16::MAX),
                session_expiry_interval: request.expiry_secs,
                ..ConnectProperties::default()
            }
        } else {
            ConnectProperties::default()
        };
        let (username, password) = match creds {
            Some(c) => (c.username.clone(), c.password.clone()),
            None => (opts.username.clone(), opts.password.clone()),
        };
        let connect = mqtt::Connect {
            protocol: opts.version,
            clean_start: request.clean_start,
            keep_alive: opts.keep_alive,
            client_id,
            will: None,
            username,
            password,
            properties,
        };
        s.send(&Packet::Connect(Box::new(connect))).await?;
        let reply = tokio::time::timeout(opts.timeout, s.read_packet())
            .await
            .map_err(|_| ConnError::Timeout("CONNACK"))??;
        match reply {
            Packet::ConnAck(ack) if ack.code == 0 => {
                if let Some(m) = ack.properties.receive_maximum {
                    s.server_receive_max = m.max(1);
                }
                s.session_present = ack.session_present;
                Ok(s)
            }
            Packet::ConnAck(ack) => Err(ConnError::Refused {
                code: ack.code,
                name: connack_name(opts.version, ack.code),
            }),
            other => Err(ConnError::Protocol(format!(
                "expected CONNACK, got {}",
                other.name()
            ))),
        }
    }

    /// Encodes `packet` and writes everything buffered.
    pub async fn send(&mut self, packet: &Packet) -> Result<(), ConnError> {
        mqtt::encode(packet, self.version, &mut self.wbuf)?;
        self.flush().await
    }

    /// Writes everything buffered.
    pub async fn flush(&mut self) -> Result<(), ConnError> {
        let addr = self.addr;
        self.stream
            .write_all(&self.wbuf)
            .await
            .map_err(|source| ConnError::Io {
                stage: "writing to",
                addr,
                source,
            })?;
        self.wbuf.clear();
        Ok(())
    }

    /// Reads until one whole packet is buffered and returns it.
    pub async fn read_packet(&mut self) -> Result<Packet, ConnError> {
        loop {
            if let Some(p) = mqtt::decode(&mut self.rbuf, self.version, MAX_INBOUND_PACKET)? {
                return Ok(p);
            }
            self.rbuf.reserve(4096);
            let addr = self.addr;
            let n = self
                .stream
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|source| ConnError::Io {
                    stage: "reading from",
                    addr,
                    source,
                })?;
            if n == 0 {
                return Err(ConnError::Closed(String::new()));
            }
        }
    }

    /// Subscribes to `filters` at `qos` and waits for a SUBACK granting all of them.
    pub async fn subscribe(
        &mut self,
        filters: &[String],
        qos: QoS,
        timeout: Duration,
    ) -> Result<(), ConnError> {
        let packet_id = 1;
        let sub = Subscribe {
            packet_id,
            subscription_identifier: None,
            user_properties: Vec::new(),
            filters: filters
                .iter()
                .map(|f| SubscribeFilter {
                    filter: f.clone(),
                    options: SubscriptionOptions {
                        qos,
                        ..SubscriptionOptions::default()
                    },
                })
                .collect(),
        };
        self.send(&Packet::Subscribe(sub)).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let p = tokio::time::timeout_at(deadline, self.read_packet())
                .await
                .map_err(|_| ConnError::Timeout("SUBACK"))??;
            match p {
                Packet::SubAck(ack) if ack.packet_id == packet_id => {
                    for (f, code) in filters.iter().zip(ack.codes.iter()) {
                        if *code >= 0x80 {
                            return Err(ConnError::SubscribeRefused {
                                filter: f.clone(),
                                code: *code,
                            });
                        }
                    }
                    return Ok(());
                }
                Packet::Disconnect(d) => {
                    return Err(ConnError::Closed(format!(
                        " with DISCONNECT {:#04x} ({})",
                        d.code,
                        mqtt::reason::name(d.code)
                    )));
                }
                // Anything else (e.g. a stray retained message) is ignored while we wait.
                _ => {}
            }
        }
    }
}

/// The meaning of a CONNACK code in `version`.
pub fn connack_name(version: ProtocolVersion, code: u8) -> &'static str {
    if version.is_v5() {
        return mqtt::reason::name(code);
    }
    match code {
        0 => "accepted",
        1 => "unacceptable protocol version",
        2 => "identifier rejected",
        3 => "server unavailable",
        4 => "bad user name or password",
        5 => "not authorized",
        _ => "unknown return code",
    }
}

/// Why a PUBLISH template could not be built.
#[derive(Debug, Error)]
pub enum TemplateError {
    /// The codec refused the packet.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The encoded packet did not have the layout we patch (a codec change?).
    #[error("PUBLISH template self-check failed: {0}")]
    Layout(&'static str),
}

/// A PUBLISH encoded once by the codec, copied into the write buffer per message with its packet
/// identifier and payload stamp patched in place: no per-message allocation or re-encoding.
#[derive(Debug, Clone)]
pub struct PublishTemplate {
    bytes: Vec<u8>,
    pid_at: Option<usize>,
    stamp_at: usize,
}

impl PublishTemplate {
    /// Encodes a PUBLISH of `topic` with a `payload_len`-byte payload.
    pub fn new(
        topic: &str,
        qos: QoS,
        payload_len: usize,
        version: ProtocolVersion,
    ) -> Result<PublishTemplate, TemplateError> {
        let payload_len = payload_len.max(STAMP_LEN);
        let publish = Publish {
            dup: false,
            qos,
            retain: false,
            topic: Arc::from(topic),
            packet_id: if qos == QoS::AtMostOnce { 0 } else { 1 },
            properties: PublishProperties::default(),
            payload: Bytes::from(payload::template(payload_len)),
        };
        let mut buf = BytesMut::new();
        mqtt::encode(&Packet::Publish(publish.clone()), version, &mut buf)?;
        let bytes = buf.to_vec();
        // Fixed header: type byte, then a Variable Byte Integer (continuation bit 0x80).
        let mut h = 1;
        while bytes.get(h).ok_or(TemplateError::Layout("header"))? & 0x80 != 0 {
            h += 1;
        }
        h += 1;
        let tlen = match (bytes.get(h), bytes.get(h + 1)) {
            (Some(a), Some(b)) => usize::from(u16::from_be_bytes([*a, *b])),
            _ => return Err(TemplateError::Layout("topic length")),
        };
        let pid_at = (qos != QoS::AtMostOnce).then_some(h + 2 + tlen);
        let stamp_at = bytes
            .len()
            .checked_sub(payload_len)
            .ok_or(TemplateError::Layout("payload"))?;
        let t = PublishTemplate {
            bytes,
            pid_at,
            stamp_at,
        };
        t.self_check(&publish, version)?;
        Ok(t)
    }

    /// Patches a copy and decodes it back, proving the offsets right.
    fn self_check(
        &self,
        original: &Publish,
        version: ProtocolVersion,
    ) -> Result<(), TemplateError> {
        let stamp = Stamp {
            sent_ns: 0x1122_3344_5566_7788,
            publisher: 0xA1B2_C3D4,
            seq: 0x0F0E_0D0C,
        };
        let mut buf = BytesMut::new();
        self.append(&mut buf, 0xBEEF, &stamp);
        match mqtt::decode(&mut buf, version, MAX_INBOUND_PACKET) {
            Ok(Some(Packet::Publish(p))) => {
                let want_pid = if self.pid_at.is_some() { 0xBEEF } else { 0 };
                if p.packet_id != want_pid {
                    return Err(TemplateError::Layout("packet identifier"));
                }
                if Stamp::read(&p.payload) != Some(stamp)
                    || p.payload.len() != original.payload.len()
                    || p.topic != original.topic
                    || !buf.is_empty()
                {
                    return Err(TemplateError::Layout("payload"));
                }
                Ok(())
            }
            _ => Err(TemplateError::Layout("decode")),
        }
    }

    /// Encoded size of one message.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Appends one message with packet identifier `pid` (ignored at QoS 0) and `stamp`.
    #[inline]
    pub fn append(&self, buf: &mut BytesMut, pid: u16, stamp: &Stamp) {
        let start = buf.len();
        buf.extend_from_slice(&self.bytes);
        let msg = &mut buf[start..];
        if let Some(at) = self.pid_at {
            msg[at..at + 2].copy_from_slice(&pid.to_be_bytes());
        }
        stamp.write(&mut msg[self.stamp_at..]);
    }
}

/// Packet identifiers in use by one QoS 1 publisher (a 65,536-bit set).
#[derive(Debug, Clone)]
pub struct IdPool {
    bits: Vec<u64>,
    next: u16,
    in_use: usize,
}

impl Default for IdPool {
    fn default() -> Self {
        IdPool {
            bits: vec![0; 1024],
            next: 1,
            in_use: 0,
        }
    }
}

impl IdPool {
    /// Identifiers currently awaiting PUBACK.
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// Takes a free identifier (1..=65535); `None` if all are in use.
    #[inline]
    pub fn alloc(&mut self) -> Option<u16> {
        if self.in_use >= 65_535 {
            return None;
        }
        loop {
            let id = self.next;
            self.next = if id == u16::MAX { 1 } else { id + 1 };
            let (w, b) = (usize::from(id) / 64, id % 64);
            if self.bits[w] & (1 << b) == 0 {
                self.bits[w] |= 1 << b;
                self.in_use += 1;
                return Some(id);
            }
        }
    }

    /// Releases `id`; false if it was not in use (an unexpected PUBACK).
    #[inline]
    pub fn release(&mut self, id: u16) -> bool {
        let (w, b) = (usize::from(id) / 64, id % 64);
        if self.bits[w] & (1 << b) == 0 {
            return false;
        }
        self.bits[w] &= !(1 << b);
        self.in_use -= 1;
        true
    }
}

/// Spawns a task that reads `rd` until it closes, decoding packets (from what `rbuf` already
/// holds, then the socket) and handing each to `on_packet`. Undecodable input ends the task.
pub fn spawn_packet_reader(
    mut rd: impl AsyncRead + Unpin + Send + 'static,
    mut rbuf: BytesMut,
    version: ProtocolVersion,
    mut on_packet: impl FnMut(Packet) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            loop {
                match mqtt::decode(&mut rbuf, version, MAX_INBOUND_PACKET) {
                    Ok(Some(p)) => on_packet(p),
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
            rbuf.reserve(64 * 1024);
            match rd.read_buf(&mut rbuf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
}

/// What waiting for room in an in-flight window gave.
pub enum WindowSlot {
    /// A slot (its permit is consumed; give it back with `add_permits(1)` on the answer).
    Taken,
    /// The window was closed.
    Closed,
    /// No answer freed a slot within the timeout.
    TimedOut,
}

/// Takes a slot of `window`; when it is full, first writes out what `wbuf` holds (the answers
/// that free slots may be waiting for it), then waits up to `timeout`.
pub async fn take_window_slot(
    window: &tokio::sync::Semaphore,
    wr: &mut (impl AsyncWrite + Unpin),
    wbuf: &mut BytesMut,
    timeout: Duration,
) -> std::io::Result<WindowSlot> {
    if let Ok(p) = window.try_acquire() {
        p.forget();
        return Ok(WindowSlot::Taken);
    }
    if !wbuf.is_empty() {
        wr.write_all(wbuf).await?;
        wbuf.clear();
    }
    Ok(
        match tokio::time::timeout(timeout, window.acquire()).await {
            Ok(Ok(p)) => {
                p.forget();
                WindowSlot::Taken
            }
            Ok(Err(_)) => WindowSlot::Closed,
            Err(_) => WindowSlot::TimedOut,
        },
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn templates_patch_the_right_bytes() {
        for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
            for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
                for len in [16, 100, 300] {
                    let t = PublishTemplate::new("bench/pairs/12", qos, len, version);
                    assert!(t.is_ok(), "{version:?} {qos:?} {len}");
                }
            }
        }
    }

    #[test]
    fn id_pool_skips_ids_in_use() {
        let mut p = IdPool::default();
        assert_eq!(p.alloc(), Some(1));
        assert_eq!(p.alloc(), Some(2));
        assert!(p.release(1));
        assert!(!p.release(1));
        assert_eq!(p.in_use(), 1);
        // Wrap around: 2 is still in use and must be skipped.
        p.next = u16::MAX;
        assert_eq!(p.alloc(), Some(u16::MAX));
        assert_eq!(p.alloc(), Some(1));
        assert_eq!(p.alloc(), Some(3));
    }
}
