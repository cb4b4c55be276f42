//! One client connection: the CONNECT handshake, then a single task that reads packets, drains
//! the session's queue into the socket and enforces keep-alive, flow control and limits.
//!
//! The task never blocks on a slow client: writes go through a buffer flushed by its own
//! `select!` branch, and reading pauses while that buffer is above its high-water mark, so a
//! client that does not read cannot make the hub buffer without bound.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use ferrohub_proto::mqtt::{
    self, AckProperties, Auth, AuthProperties, ConnAck, ConnAckProperties, Connect, DecodeError,
    Disconnect, DisconnectProperties, Packet, ProtocolVersion, PubResponse, Publish,
    PublishProperties, SubAck, Subscribe, UnsubAck, Unsubscribe, reason,
};
use ferrohub_router::{Match, Subscriber, TenantRouter};
use ferrohub_store::{Commit, QueuedFor, StoreOp, SubscriptionRecord};
use ferrohub_types::lifecycle::DisconnectReason;
use ferrohub_types::{Message, MessageProperties, QoS, TopicName};
use futures_util::FutureExt;
use hashbrown::HashMap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout};

use super::auth::{
    Access, Admission, AuthExchange, AuthStep, Credentials, Grant, PeerCertificates, Refusal,
};
use super::broker::{Broker, Origin, PendingWill, SessionEvent, SinkOutcome, SinkWait, now_millis};
use super::introspect::ConnectionFacts;
use super::metrics::DropReason;
use super::session::{Inflight, InflightState, Kick, Outgoing, Session};
use super::watch::Direction;

/// Stop reading from a client while this much output is waiting for it.
const WRITE_HIGH_WATER: usize = 256 * 1024;
/// Most queued messages moved into the write buffer per pass.
const PUMP_BATCH: usize = 256;
/// Acknowledgements waiting for durability before reading pauses.
const MAX_PENDING_ACKS: usize = 4096;

/// The reading side of a transport.
pub trait ConnRead: AsyncRead + Unpin + Send {
    /// Reads what is available into `buf`, growing it by up to `chunk` bytes first. The default
    /// reserves before waiting; TCP overrides it to wait for readiness first, so that an idle
    /// connection holds no read buffer.
    // Spelled out (not `async fn`) so that the future is `Send`, which spawned tasks need.
    #[allow(clippy::manual_async_fn)]
    fn read_some<'a>(
        &'a mut self,
        buf: &'a mut BytesMut,
        chunk: usize,
    ) -> impl std::future::Future<Output = std::io::Result<usize>> + Send + 'a {
        async move {
            if buf.capacity() - buf.len() < 512 {
                buf.reserve(chunk);
            }
            self.read_buf(buf).await
        }
    }
}

impl ConnRead for tokio::net::tcp::OwnedReadHalf {
    #[allow(clippy::manual_async_fn)]
    fn read_some<'a>(
        &'a mut self,
        buf: &'a mut BytesMut,
        chunk: usize,
    ) -> impl std::future::Future<Output = std::io::Result<usize>> + Send + 'a {
        async move {
            loop {
                // `poll_read_ready` keeps no state in the future (unlike `readable()`), which
                // keeps every connection's task smaller.
                let stream: &tokio::net::TcpStream = (*self).as_ref();
                std::future::poll_fn(|cx| stream.poll_read_ready(cx)).await?;
                if buf.capacity() - buf.len() < 512 {
                    buf.reserve(chunk);
                }
                match self.try_read_buf(buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        // Readiness was stale: give the buffer back before waiting again.
                        if buf.is_empty() {
                            *buf = BytesMut::new();
                        }
                        continue;
                    }
                    other => return other,
                }
            }
        }
    }
}

impl<T: AsyncRead + Send> ConnRead for tokio::io::ReadHalf<T> {}

/// Facts about the transport a connection arrived on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Remote address.
    pub peer: SocketAddr,
    /// The client certificate chain verified in the TLS handshake (DER, leaf first).
    pub certificates: Option<Box<[Vec<u8>]>>,
    /// Transport name for connectivity records: `mqtt`, `mqtts` or `ws`.
    pub protocol: &'static str,
}

/// Why a connection ends.
#[derive(Debug)]
enum Close {
    /// The peer closed the socket or an I/O error occurred.
    Io,
    /// Normal DISCONNECT from the client.
    ClientDisconnect,
    /// We close with this reason code (sent as DISCONNECT to v5 clients).
    Reason(u8, &'static str),
    /// Another party told us to close.
    Kicked(Kick),
}

/// Runs a connection to completion.
// A plain fn returning an `async move` block: an `async fn` would store its arguments twice in
// the task (as arguments and as locals), and every idle connection pays for that task's size.
pub fn serve<R, W>(
    broker: Arc<Broker>,
    reader: R,
    writer: W,
    info: ConnInfo,
) -> impl std::future::Future<Output = ()> + Send
where
    R: ConnRead,
    W: AsyncWrite + Unpin + Send,
{
    let (mut reader, mut writer) = (reader, writer);
    // Boxed: only needed until the handshake is done.
    let info = Box::new(info);
    async move {
        let Ok(_permit) = broker.connection_slots.clone().try_acquire_owned() else {
            broker.metrics.connections_refused.fetch_add(1, Relaxed);
            tracing::warn!(peer = %info.peer, "connection refused: max_connections reached");
            return;
        };
        let mut rbuf = BytesMut::new();
        let deadline = Duration::from_secs(broker.config.connect_timeout_secs);
        let max = broker.config.max_packet_size as usize;
        let connect = match timeout(deadline, read_connect(&mut reader, &mut rbuf, max, &broker))
            .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(err)) => {
                broker.metrics.connections_refused.fetch_add(1, Relaxed);
                refuse_undecodable(&mut writer, &rbuf, err, &info).await;
                return;
            }
            Err(_) => {
                broker.metrics.connections_refused.fetch_add(1, Relaxed);
                tracing::debug!(peer = %info.peer, "closing: no CONNECT within connect_timeout");
                return;
            }
        };
        // Boxed so that the handshake's state does not inflate every connection's task for its
        // whole life (an idle connection should cost little more than its socket).
        let handshake = Box::pin(Connection::handshake(
            &broker,
            connect,
            &mut reader,
            &mut writer,
            rbuf,
            &info,
        ));
        let mut conn = match handshake.await {
            Some(c) => c,
            None => {
                broker.metrics.connections_refused.fetch_add(1, Relaxed);
                return;
            }
        };
        drop(info);
        broker.metrics.connections.fetch_add(1, Relaxed);
        broker.metrics.connections_total.fetch_add(1, Relaxed);
        let close = conn.run(&mut reader, &mut writer).await;
        broker.metrics.connections.fetch_sub(1, Relaxed);
        Box::pin(conn.finish(&mut writer, close)).await;
    }
}

async fn read_connect<R: AsyncRead + Unpin>(
    reader: &mut R,
    rbuf: &mut BytesMut,
    max: usize,
    broker: &Broker,
) -> Result<Box<Connect>, Option<DecodeError>> {
    loop {
        match mqtt::decode(rbuf, ProtocolVersion::V311, max) {
            Ok(Some(Packet::Connect(c))) => return Ok(c),
            Ok(Some(_)) => return Err(Some(DecodeError::Protocol("first packet must be CONNECT"))),
            Ok(None) => {}
            Err(e) => return Err(Some(e)),
        }
        rbuf.reserve(512);
        match reader.read_buf(rbuf).await {
            Ok(0) | Err(_) => return Err(None),
            Ok(n) => {
                broker.metrics.bytes_received.add(n as i64);
            }
        }
    }
}

/// The protocol level of a CONNECT at the front of `buf`, if it can be read.
fn peek_connect_level(buf: &[u8]) -> Option<u8> {
    let mut i = 1;
    while *buf.get(i)? & 0x80 != 0 {
        i += 1;
    }
    let name_len = u16::from_be_bytes([*buf.get(i + 1)?, *buf.get(i + 2)?]) as usize;
    buf.get(i + 3 + name_len).copied()
}

async fn refuse_undecodable<W: AsyncWrite + Unpin>(
    writer: &mut W,
    rbuf: &BytesMut,
    err: Option<DecodeError>,
    info: &ConnInfo,
) {
    let Some(err) = err else { return };
    tracing::debug!(peer = %info.peer, error = %err, "refusing connection");
    let (version, code) = match (&err, peek_connect_level(rbuf)) {
        (DecodeError::UnsupportedProtocol { .. }, _) => {
            (ProtocolVersion::V311, reason::UNSUPPORTED_PROTOCOL_VERSION)
        }
        (_, Some(5)) => (ProtocolVersion::V5, err.reason_code()),
        _ => return,
    };
    refuse(writer, version, code).await;
}

/// The enhanced-authentication method of a connection and a re-authentication in progress.
type EnhancedAuth = (String, Option<Box<dyn AuthExchange>>);

/// Topic aliases of one connection (MQTT 5).
#[derive(Default)]
struct Aliases {
    /// Server → client: topic to alias.
    outgoing: HashMap<Arc<str>, u16>,
    /// Client → server: alias to topic.
    incoming: HashMap<u16, Arc<str>>,
}

/// Per-connection state after a successful CONNECT.
struct Connection {
    broker: Arc<Broker>,
    session: Arc<Session>,
    router: Arc<TenantRouter<Session>>,
    generation: u64,
    kicked: Option<oneshot::Receiver<Kick>>,
    release: Option<oneshot::Sender<()>>,
    version: ProtocolVersion,
    /// Boxed: only logs read it, and 24 bytes of every idle connection's task are worth a
    /// small allocation.
    peer: Box<SocketAddr>,
    keep_alive: Option<Duration>,
    /// Client's Receive Maximum (capped by the server's outbound window).
    send_window: u16,
    /// Client's Maximum Packet Size.
    client_max_packet: u32,
    client_alias_max: u16,
    /// Topic alias tables, allocated on first use (most clients never use aliases).
    aliases: Option<Box<Aliases>>,
    /// Boxed: most clients have no will, and an idle connection should stay small.
    will: Option<Box<PendingWill>>,
    /// Enhanced authentication method and a re-authentication in progress.
    auth: Option<Box<EnhancedAuth>>,
    /// What a registered device may do (`None`: anything in its tenant).
    access: Option<Arc<dyn Access>>,
    problem_info: bool,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Acknowledgements in the order they must be sent, some waiting for a store commit or the
    /// message sink.
    pending_acks: VecDeque<PendingAck>,
    /// Inbound QoS 1/2 PUBLISHes not yet fully acknowledged (Receive Maximum enforcement).
    inbound_unacked: usize,
    store_ops: Vec<StoreOp>,
    scratch: Vec<Match<Session>>,
    batch: Vec<(Outgoing, u16, bool)>,
    /// In-flight PUBLISHes of a resumed session still to be resent (packet ids, in order).
    pending_resend: VecDeque<u16>,
}

impl Connection {
    async fn handshake<R, W>(
        broker: &Arc<Broker>,
        connect: Box<Connect>,
        reader: &mut R,
        writer: &mut W,
        mut rbuf: BytesMut,
        info: &ConnInfo,
    ) -> Option<Connection>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let connect = *connect;
        let version = connect.protocol;
        let v5 = version.is_v5();
        let cfg = &broker.config;
        // Client identifier.
        let mut assigned = None;
        let client_id: Arc<str> = if connect.client_id.is_empty() {
            if !v5 && !connect.clean_start {
                refuse(writer, version, reason::CLIENT_IDENTIFIER_NOT_VALID).await;
                return None;
            }
            let id = broker.assign_client_id();
            assigned = Some(id.clone());
            Arc::from(id)
        } else if cfg.client_id_ok(&connect.client_id) {
            Arc::from(connect.client_id.as_str())
        } else {
            tracing::debug!(peer = %info.peer, "refusing connection: client id not valid");
            refuse(writer, version, reason::CLIENT_IDENTIFIER_NOT_VALID).await;
            return None;
        };
        // Will.
        let will = match &connect.will {
            None => None,
            Some(w) => {
                let Ok(topic) = TopicName::new(&w.topic, &cfg.topic_limits()) else {
                    refuse(writer, version, reason::TOPIC_NAME_INVALID).await;
                    return None;
                };
                if w.retain && !cfg.retain_available {
                    refuse(writer, version, reason::RETAIN_NOT_SUPPORTED).await;
                    return None;
                }
                if w.properties.payload_format_indicator == Some(1)
                    && std::str::from_utf8(&w.payload).is_err()
                {
                    refuse(writer, version, reason::PAYLOAD_FORMAT_INVALID).await;
                    return None;
                }
                let p = &w.properties;
                let props = MessageProperties {
                    payload_is_utf8: p.payload_format_indicator == Some(1),
                    expires_at: None,
                    content_type: p.content_type.clone(),
                    response_topic: p.response_topic.clone(),
                    correlation_data: p.correlation_data.clone(),
                    user_properties: p.user_properties.clone(),
                };
                Some((topic, w.clone(), props))
            }
        };
        // Authentication: enhanced (AUTH exchange) or credentials.
        let props = &connect.properties;
        let mut auth_data_out = None;
        let grant = if let Some(method_name) = props.authentication_method.as_deref().filter(|_| v5)
        {
            let Some(method) = broker.auth.method(method_name).cloned() else {
                refuse(writer, version, reason::BAD_AUTHENTICATION_METHOD).await;
                return None;
            };
            let (mut step, mut exchange) =
                method.start(&client_id, props.authentication_data.as_deref());
            loop {
                match step {
                    AuthStep::Success(tenant, data) => {
                        auth_data_out = data;
                        break Grant {
                            tenant,
                            access: None,
                        };
                    }
                    AuthStep::Failure => {
                        refuse(writer, version, reason::NOT_AUTHORIZED).await;
                        return None;
                    }
                    AuthStep::Continue(data) => {
                        let mut buf = BytesMut::new();
                        let auth = Packet::Auth(Auth {
                            code: reason::CONTINUE_AUTHENTICATION,
                            properties: AuthProperties {
                                authentication_method: Some(method_name.to_string()),
                                authentication_data: Some(data),
                                ..AuthProperties::default()
                            },
                        });
                        if mqtt::encode(&auth, version, &mut buf).is_err()
                            || writer.write_all(&buf).await.is_err()
                        {
                            return None;
                        }
                        let next = timeout(
                            Duration::from_secs(cfg.connect_timeout_secs),
                            read_packet(reader, &mut rbuf, version, cfg.max_packet_size as usize),
                        )
                        .await;
                        match next {
                            Ok(Some(Packet::Auth(a)))
                                if a.code == reason::CONTINUE_AUTHENTICATION
                                    && a.properties.authentication_method.as_deref()
                                        == Some(method_name) =>
                            {
                                step = exchange.step(a.properties.authentication_data.as_deref());
                            }
                            _ => {
                                refuse(writer, version, reason::PROTOCOL_ERROR).await;
                                return None;
                            }
                        }
                    }
                }
            }
        } else {
            let chain;
            let creds = Credentials {
                client_id: &client_id,
                username: connect.username.as_deref(),
                password: connect.password.as_deref(),
                peer: info.peer,
                certificates: match &info.certificates {
                    Some(c) => {
                        chain = c;
                        Some(PeerCertificates { chain })
                    }
                    None => None,
                },
                protocol: info.protocol,
            };
            match broker.auth.authenticator.authenticate(creds).await {
                Ok(grant) => grant,
                Err(refusal) => {
                    let code = match refusal {
                        Refusal::BadCredentials => reason::BAD_USER_NAME_OR_PASSWORD,
                        Refusal::NotAuthorized => reason::NOT_AUTHORIZED,
                        Refusal::QuotaExceeded => reason::QUOTA_EXCEEDED,
                        Refusal::Unavailable => reason::SERVER_UNAVAILABLE,
                    };
                    tracing::info!(peer = %info.peer, client_id = %client_id, reason = reason::name(code), "refusing connection");
                    refuse(writer, version, code).await;
                    return None;
                }
            }
        };
        // A will is a publication like any other: the policy must allow its topic.
        if let (Some((topic, _, _)), Some(access)) = (&will, &grant.access)
            && !access.can_publish(topic.as_str())
        {
            tracing::info!(peer = %info.peer, client_id = %client_id, topic = %topic.as_str(), "refusing connection: will topic not allowed");
            refuse(writer, version, reason::NOT_AUTHORIZED).await;
            return None;
        }
        if broker.shutdown.is_triggered() {
            refuse(writer, version, reason::SERVER_SHUTTING_DOWN).await;
            return None;
        }
        // Session expiry and keep-alive.
        let requested_expiry = if v5 {
            props.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            cfg.v3_persistent_session_expiry_secs
        };
        let expiry = requested_expiry.min(cfg.max_session_expiry_secs);
        let mut keep_alive = connect.keep_alive;
        let mut server_keep_alive = None;
        if v5
            && cfg.max_keep_alive_secs > 0
            && (keep_alive == 0 || keep_alive > cfg.max_keep_alive_secs)
        {
            keep_alive = cfg.max_keep_alive_secs;
            server_keep_alive = Some(keep_alive);
        }
        let attached = broker
            .attach(&grant.tenant, &client_id, connect.clean_start, expiry)
            .await;
        let session = attached.session;
        session.control.lock().connection = Some(Box::new(ConnectionFacts {
            protocol: if v5 { "5.0" } else { "3.1.1" },
            transport: ConnectionFacts::transport_of(info.protocol),
            remote: info.peer,
            connected_at: now_millis(),
            keep_alive_secs: keep_alive,
            clean_start: connect.clean_start,
            device_id: grant.access.as_ref().map(|a| Arc::from(a.device_id())),
        }));
        let ack = ConnAck {
            session_present: attached.session_present,
            code: reason::SUCCESS,
            properties: if v5 {
                ConnAckProperties {
                    session_expiry_interval: (expiry != requested_expiry).then_some(expiry),
                    receive_maximum: Some(cfg.max_inflight),
                    maximum_packet_size: Some(cfg.max_packet_size),
                    assigned_client_identifier: assigned,
                    topic_alias_maximum: (cfg.topic_alias_maximum > 0)
                        .then_some(cfg.topic_alias_maximum),
                    retain_available: (!cfg.retain_available).then_some(0),
                    server_keep_alive,
                    authentication_method: props.authentication_method.clone(),
                    authentication_data: auth_data_out,
                    ..ConnAckProperties::default()
                }
            } else {
                ConnAckProperties::default()
            },
        };
        let will = will.map(|(topic, w, props)| PendingWill {
            delay_secs: w.properties.delay_interval.unwrap_or(0),
            message: Message {
                topic,
                payload: w.payload,
                qos: w.qos,
                retain: w.retain,
                received_at: 0,
                properties: if props.is_empty() && w.properties.message_expiry_interval.is_none() {
                    None
                } else {
                    let mut props = props;
                    // The expiry of a will counts from its publication; stored relative here.
                    props.expires_at = w.properties.message_expiry_interval.map(u64::from);
                    Some(Arc::new(props))
                },
            },
        });
        let router = broker.router.tenant(&session.tenant);
        let mut conn = Connection {
            broker: broker.clone(),
            router,
            generation: attached.generation,
            kicked: Some(attached.kicked),
            release: Some(attached.release),
            version,
            peer: Box::new(info.peer),
            keep_alive: (keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
            send_window: props
                .receive_maximum
                .unwrap_or(u16::MAX)
                .min(cfg.max_outbound_inflight),
            // u32::MAX means "no limit": the protocol caps packets far below it.
            client_max_packet: props.maximum_packet_size.unwrap_or(u32::MAX),
            client_alias_max: if v5 {
                props.topic_alias_maximum.unwrap_or(0)
            } else {
                0
            },
            aliases: None,
            will: will.map(Box::new),
            auth: props
                .authentication_method
                .clone()
                .map(|m| Box::new((m, None))),
            access: grant.access,
            problem_info: props.request_problem_information != Some(0),
            rbuf,
            wbuf: BytesMut::new(),
            pending_acks: VecDeque::new(),
            inbound_unacked: 0,
            store_ops: Vec::new(),
            scratch: Vec::new(),
            batch: Vec::new(),
            pending_resend: VecDeque::new(),
            session,
        };
        conn.write(&Packet::ConnAck(ack));
        // The CONNECT's read buffer is usually empty now: do not keep it for an idle client.
        if conn.rbuf.is_empty() {
            conn.rbuf = BytesMut::new();
        }
        // Resume: resend what was in flight (DUP set) before anything new.
        if attached.session_present {
            conn.enforce_policy_on_resume();
            conn.resend_inflight();
        }
        tracing::debug!(peer = %info.peer, client_id = %conn.session.client_id, version = ?version, "client connected");
        broker
            .session_event(SessionEvent::Connected {
                tenant: conn.session.tenant.clone(),
                origin: conn.origin(),
                session_present: attached.session_present,
                at: now_millis(),
            })
            .await;
        Some(conn)
    }

    fn write(&mut self, packet: &Packet) {
        if self.client_max_packet != u32::MAX
            && !matches!(packet, Packet::Publish(_))
            && mqtt::encoded_len(packet, self.version)
                .is_ok_and(|len| len > self.client_max_packet as usize)
        {
            // Reason strings and user properties are optional: drop them rather than exceed the
            // client's Maximum Packet Size (MQTT 5 §3.1.2.11.4).
            let stripped = without_optional_properties(packet);
            if let Err(e) = mqtt::encode(&stripped, self.version, &mut self.wbuf) {
                tracing::warn!(error = %e, packet = packet.name(), "could not encode packet");
            }
            return;
        }
        if let Err(e) = mqtt::encode(packet, self.version, &mut self.wbuf) {
            tracing::warn!(error = %e, packet = packet.name(), "could not encode packet");
        }
    }

    /// A resumed session was built under another connection's grant (an earlier policy, or
    /// another identity using the same client id): subscriptions this client may no longer hold
    /// are removed, and deliveries (queued ones included) are checked from now on.
    fn enforce_policy_on_resume(&mut self) {
        let Some(access) = self.access.clone() else {
            return;
        };
        access.session_resumed();
        let refused: Vec<Arc<str>> = self
            .session
            .control
            .lock()
            .subscriptions
            .keys()
            .filter(|f| !access.can_subscribe(f))
            .cloned()
            .collect();
        let persistent = self.session.is_persistent() && self.broker.store.is_persistent();
        for f in refused {
            tracing::info!(client_id = %self.session.client_id, filter = %f, "subscription removed: no longer allowed");
            self.session.control.lock().subscriptions.remove(&f);
            if let Some(parsed) = self.broker.parse_filter(&f) {
                self.router.unsubscribe(
                    self.session.id(),
                    parsed.filter.as_str(),
                    parsed.group.as_deref(),
                );
            }
            if persistent {
                self.store_ops.push(StoreOp::DeleteSubscription {
                    tenant: self.session.tenant.clone(),
                    client_id: self.session.client_id.clone(),
                    filter: f,
                });
            }
        }
    }

    /// On resumption: PUBRELs are resent at once; unacknowledged PUBLISHes are queued for resending
    /// (DUP set, original packet ids) as the new connection's Receive Maximum allows.
    fn resend_inflight(&mut self) {
        let ob = self.session.outbox.lock();
        let mut pubrels = Vec::new();
        for (pid, inflight) in ob.inflight.iter() {
            match inflight.state {
                InflightState::AwaitingAck => self.pending_resend.push_back(*pid),
                InflightState::AwaitingComp => pubrels.push(*pid),
            }
        }
        drop(ob);
        for pid in pubrels {
            self.write(&Packet::PubRel(PubResponse {
                packet_id: pid,
                ..Default::default()
            }));
        }
    }

    /// The PUBLISH for a delivery (topic aliases are applied separately, to fresh sends only).
    fn publish_packet(&self, out: &Outgoing, packet_id: u16, dup: bool) -> Publish {
        let m = &out.message;
        let mut properties = PublishProperties::default();
        if self.version.is_v5() {
            if let Some(p) = m.properties.as_deref() {
                properties.payload_format_indicator = p.payload_is_utf8.then_some(1);
                properties.message_expiry_interval = m.remaining_expiry_secs(now_millis());
                properties.content_type = p.content_type.clone();
                properties.response_topic = p.response_topic.clone();
                properties.correlation_data = p.correlation_data.clone();
                properties.user_properties = p.user_properties.clone();
            }
            properties.subscription_identifiers = out.subscription_ids.to_vec();
        }
        Publish {
            dup,
            qos: out.qos,
            retain: out.retain,
            topic: m.topic.as_arc().clone(),
            packet_id,
            properties,
            payload: m.payload.clone(),
        }
    }

    async fn run<R, W>(&mut self, reader: &mut R, writer: &mut W) -> Close
    where
        R: ConnRead,
        W: AsyncWrite + Unpin,
    {
        let mut kicked = match self.kicked.take() {
            Some(k) => k,
            None => return Close::Io,
        };
        // A client that connected while shutdown began may have missed the broadcast kick.
        if self.broker.shutdown.is_triggered() {
            return Close::Kicked(Kick::Shutdown);
        }
        // Likewise a device revoked between its authentication and its attachment.
        if self.access.as_ref().is_some_and(|a| a.revoked()) {
            return Close::Kicked(Kick::NotAuthorized);
        }
        let mut last_read = Instant::now();
        // One timer for the connection's life, re-armed lazily: resetting a timer on every
        // packet would cost a timer-wheel update per message.
        let keep_alive_timer =
            tokio::time::sleep(self.keep_alive.unwrap_or(Duration::from_secs(86_400)));
        tokio::pin!(keep_alive_timer);
        let mut read_chunk = 4096usize;
        // Packets that arrived together with CONNECT.
        if let Err(close) = Box::pin(self.process_input()).await {
            return close;
        }
        loop {
            self.pump();
            if !self.store_ops.is_empty() {
                let ops = std::mem::take(&mut self.store_ops);
                Box::pin(self.broker.submit(ops)).await;
            }
            if let Err(close) = self.flush_ready_acks() {
                return close;
            }
            let commit_waiting = self.pending_acks.front().is_some_and(PendingAck::waits);
            let can_read =
                self.wbuf.len() < WRITE_HIGH_WATER && self.pending_acks.len() < MAX_PENDING_ACKS;
            tokio::select! {
                biased;
                k = &mut kicked => {
                    return Close::Kicked(k.unwrap_or(Kick::TakenOver));
                }
                res = std::future::poll_fn(|cx| match self.pending_acks.front_mut() {
                    Some(p) => p.poll_settle(cx),
                    None => std::task::Poll::Pending,
                }), if commit_waiting => {
                    if let Err(close) = self.apply_settled(res) {
                        return close;
                    }
                }
                res = writer.write(&self.wbuf), if !self.wbuf.is_empty() => {
                    match res {
                        Ok(0) | Err(_) => return Close::Io,
                        Ok(n) => {
                            self.wbuf.advance(n);
                            self.broker.metrics.bytes_sent.add(n as i64);
                            if self.wbuf.is_empty() && self.wbuf.capacity() > 64 * 1024 {
                                self.wbuf = BytesMut::new();
                            }
                        }
                    }
                }
                res = reader.read_some(&mut self.rbuf, read_chunk), if can_read => {
                    match res {
                        Ok(0) | Err(_) => return Close::Io,
                        Ok(n) => {
                            self.broker.metrics.bytes_received.add(n as i64);
                            // Busy publishers get bigger reads (fewer syscalls); idle ones stay small.
                            if n >= read_chunk / 2 {
                                read_chunk = (read_chunk * 2).min(64 * 1024);
                            }
                            match Box::pin(self.process_input()).await {
                                // Keep-alive counts complete Control Packets, not bytes (MQTT-3.1.2-22).
                                Ok(true) => last_read = Instant::now(),
                                Ok(false) => {}
                                Err(close) => return close,
                            }
                            // An idle connection gives its read buffer back.
                            if self.rbuf.is_empty() && read_chunk <= 4096 {
                                self.rbuf = BytesMut::new();
                            }
                        }
                    }
                }
                _ = self.session.wake.notified() => {}
                _ = &mut keep_alive_timer, if self.keep_alive.is_some() => {
                    let ka = self.keep_alive.unwrap_or_default();
                    if last_read + ka > Instant::now() {
                        keep_alive_timer.as_mut().reset(last_read + ka);
                    } else {
                        return Close::Reason(reason::KEEP_ALIVE_TIMEOUT, "keep alive timeout");
                    }
                }
            }
        }
    }

    /// Decodes and handles every complete packet in the read buffer; tells whether there was one.
    async fn process_input(&mut self) -> Result<bool, Close> {
        let mut any = false;
        loop {
            let packet = match mqtt::decode(
                &mut self.rbuf,
                self.version,
                self.broker.config.max_packet_size as usize,
            ) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(peer = %self.peer, client_id = %self.session.client_id, error = %e, "closing connection: bad packet");
                    self.broker.metrics.protocol_errors.fetch_add(1, Relaxed);
                    return Err(Close::Reason(e.reason_code(), decode_error_text(&e)));
                }
            };
            any = true;
            self.handle(packet).await?;
        }
        // Give memory back when idle: an empty buffer that grew for a burst is released.
        if self.rbuf.is_empty() && self.rbuf.capacity() > 64 * 1024 {
            self.rbuf = BytesMut::new();
        }
        Ok(any)
    }

    async fn handle(&mut self, packet: Packet) -> Result<(), Close> {
        match packet {
            Packet::Publish(p) => self.handle_publish(p).await,
            Packet::PubAck(a) => {
                self.finish_delivery(a.packet_id, InflightState::AwaitingAck, QoS::AtLeastOnce);
                Ok(())
            }
            Packet::PubRec(a) => {
                self.handle_pubrec(a);
                Ok(())
            }
            Packet::PubComp(a) => {
                self.finish_delivery(a.packet_id, InflightState::AwaitingComp, QoS::ExactlyOnce);
                Ok(())
            }
            Packet::PubRel(r) => {
                self.handle_pubrel(r);
                Ok(())
            }
            Packet::Subscribe(s) => self.handle_subscribe(s).await,
            Packet::Unsubscribe(u) => self.handle_unsubscribe(u).await,
            Packet::PingReq => {
                self.queue_ack(Packet::PingResp, None);
                Ok(())
            }
            Packet::Disconnect(d) => self.handle_disconnect(d),
            Packet::Auth(a) => self.handle_auth(a),
            other => {
                self.broker.metrics.protocol_errors.fetch_add(1, Relaxed);
                tracing::debug!(peer = %self.peer, packet = other.name(), "closing connection: unexpected packet");
                Err(Close::Reason(
                    reason::PROTOCOL_ERROR,
                    "unexpected packet from client",
                ))
            }
        }
    }

    /// Sends an acknowledgement in order: immediately if nothing is waiting before it.
    fn queue_ack(&mut self, packet: Packet, commit: Option<Commit>) {
        self.queue_ack_after(packet, commit, None);
    }

    fn queue_ack_after(&mut self, packet: Packet, commit: Option<Commit>, sink: Option<SinkWait>) {
        if commit.is_none() && sink.is_none() && self.pending_acks.is_empty() {
            self.write_ack(packet);
        } else {
            self.pending_acks.push_back(PendingAck {
                packet,
                commit,
                sink,
            });
        }
    }

    fn write_ack(&mut self, packet: Packet) {
        if matches!(packet, Packet::PubAck(_)) {
            self.inbound_unacked = self.inbound_unacked.saturating_sub(1);
        }
        self.write(&packet);
    }

    /// Applies what the head acknowledgement waited for: a failed commit or sink closes the
    /// connection (the client resends); an unusable payload or a busy sink changes the reason code.
    fn apply_settled(&mut self, res: Result<Option<SinkOutcome>, Close>) -> Result<(), Close> {
        let outcome = res?;
        let v5 = self.version.is_v5();
        let (code, why) = match outcome {
            None | Some(SinkOutcome::Stored) => return Ok(()),
            Some(SinkOutcome::Invalid(why)) => (reason::PAYLOAD_FORMAT_INVALID, why),
            Some(SinkOutcome::Busy) if v5 => (
                reason::QUOTA_EXCEEDED,
                "telemetry ingest is overloaded; retry later".to_string(),
            ),
            Some(SinkOutcome::Busy) => {
                return Err(Close::Reason(
                    reason::QUOTA_EXCEEDED,
                    "telemetry ingest is overloaded",
                ));
            }
            Some(SinkOutcome::Failed(why)) => {
                tracing::error!(error = %why, "storing telemetry failed; closing connection so the client retries");
                return Err(Close::Reason(
                    reason::UNSPECIFIED_ERROR,
                    "message could not be persisted",
                ));
            }
        };
        let problem_info = self.problem_info;
        let Some(front) = self.pending_acks.front_mut() else {
            return Ok(());
        };
        let failed_pubrec = matches!(front.packet, Packet::PubRec(_));
        if let Packet::PubAck(r) | Packet::PubRec(r) = &mut front.packet
            && r.code < 0x80
        {
            r.code = code;
            if problem_info {
                r.properties.reason_string = Some(why);
            }
            if failed_pubrec {
                // A failed PUBREC ends the exchange.
                let id = r.packet_id;
                self.session.control.lock().inbound_qos2.remove(&id);
                self.inbound_unacked = self.inbound_unacked.saturating_sub(1);
            }
        }
        Ok(())
    }

    /// Writes acknowledgements at the head of the queue whose waits have resolved.
    fn flush_ready_acks(&mut self) -> Result<(), Close> {
        while let Some(front) = self.pending_acks.front_mut() {
            if front.waits() {
                match std::future::poll_fn(|cx| front.poll_settle(cx)).now_or_never() {
                    Some(res) => self.apply_settled(res)?,
                    None => return Ok(()),
                }
            }
            if let Some(p) = self.pending_acks.pop_front() {
                self.write_ack(p.packet);
            }
        }
        Ok(())
    }

    async fn handle_publish(&mut self, p: Publish) -> Result<(), Close> {
        let v5 = self.version.is_v5();
        let cfg = &self.broker.config;
        self.broker.metrics.received[p.qos as usize].add(1);
        self.session.count_in();
        // Topic, resolving v5 topic aliases.
        let topic_str: Arc<str> = match p.properties.topic_alias {
            Some(_) if !v5 => {
                return Err(Close::Reason(
                    reason::PROTOCOL_ERROR,
                    "topic alias in 3.1.1",
                ));
            }
            Some(alias) if alias == 0 || alias > cfg.topic_alias_maximum => {
                return Err(Close::Reason(
                    reason::TOPIC_ALIAS_INVALID,
                    "topic alias out of range",
                ));
            }
            Some(alias) if p.topic.is_empty() => {
                match self.aliases.as_ref().and_then(|a| a.incoming.get(&alias)) {
                    Some(t) => t.clone(),
                    None => {
                        return Err(Close::Reason(reason::PROTOCOL_ERROR, "unknown topic alias"));
                    }
                }
            }
            Some(alias) => {
                self.aliases
                    .get_or_insert_with(Default::default)
                    .incoming
                    .insert(alias, p.topic.clone());
                p.topic.clone()
            }
            None => p.topic.clone(),
        };
        let topic = match TopicName::from_arc(topic_str, &cfg.topic_limits()) {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(peer = %self.peer, error = %e, "closing connection: invalid topic name");
                return Err(Close::Reason(
                    reason::TOPIC_NAME_INVALID,
                    "invalid topic name",
                ));
            }
        };
        if !p.properties.subscription_identifiers.is_empty() {
            return Err(Close::Reason(
                reason::PROTOCOL_ERROR,
                "subscription identifier in PUBLISH from client",
            ));
        }
        if p.retain && !cfg.retain_available {
            return Err(Close::Reason(
                reason::RETAIN_NOT_SUPPORTED,
                "retain not supported",
            ));
        }
        let ack_for = |code: u8| -> Option<Packet> {
            let r = PubResponse {
                packet_id: p.packet_id,
                code,
                properties: AckProperties::default(),
            };
            match p.qos {
                QoS::AtMostOnce => None,
                QoS::AtLeastOnce => Some(Packet::PubAck(r)),
                QoS::ExactlyOnce => Some(Packet::PubRec(r)),
            }
        };
        if p.qos != QoS::AtMostOnce {
            if p.qos == QoS::ExactlyOnce
                && self
                    .session
                    .control
                    .lock()
                    .inbound_qos2
                    .contains(&p.packet_id)
            {
                // A retransmission of a message we already took: acknowledge again, route nothing.
                if let Some(ack) = ack_for(reason::SUCCESS) {
                    self.queue_ack(ack, None);
                }
                return Ok(());
            }
            if self.inbound_unacked >= usize::from(cfg.max_inflight) {
                return Err(Close::Reason(
                    reason::RECEIVE_MAXIMUM_EXCEEDED,
                    "receive maximum exceeded",
                ));
            }
        }
        if p.properties.payload_format_indicator == Some(1)
            && std::str::from_utf8(&p.payload).is_err()
        {
            return match ack_for(reason::PAYLOAD_FORMAT_INVALID).filter(|_| v5) {
                Some(ack) => {
                    self.inbound_unacked += usize::from(p.qos == QoS::AtLeastOnce);
                    self.queue_ack(ack, None);
                    Ok(())
                }
                None => Err(Close::Reason(
                    reason::PAYLOAD_FORMAT_INVALID,
                    "payload is not valid UTF-8",
                )),
            };
        }
        if let Some(access) = &self.access {
            let refused = if !access.can_publish(topic.as_str()) {
                Some((reason::NOT_AUTHORIZED, DropReason::NotAuthorized))
            } else if access.admit(p.payload.len()) == Admission::QuotaExceeded {
                Some((reason::QUOTA_EXCEEDED, DropReason::RateLimited))
            } else {
                None
            };
            if let Some((code, why)) = refused {
                self.broker.metrics.drop_message(why);
                tracing::debug!(peer = %self.peer, client_id = %self.session.client_id, topic = %topic.as_str(), reason = reason::name(code), "publish refused");
                // 3.1.1 has no negative acknowledgement: the message is acknowledged and dropped,
                // as Mosquitto and AWS IoT do.
                if let Some(ack) = ack_for(if v5 { code } else { reason::SUCCESS }) {
                    self.inbound_unacked += usize::from(p.qos == QoS::AtLeastOnce);
                    if !v5 && p.qos == QoS::ExactlyOnce {
                        // The PUBREL that follows a successful PUBREC must find the packet id.
                        self.session.control.lock().inbound_qos2.insert(p.packet_id);
                    }
                    self.queue_ack(ack, None);
                }
                return Ok(());
            }
        }
        let now = now_millis();
        let pp = p.properties;
        let properties = if v5
            && (pp.payload_format_indicator.is_some()
                || pp.message_expiry_interval.is_some()
                || pp.content_type.is_some()
                || pp.response_topic.is_some()
                || pp.correlation_data.is_some()
                || !pp.user_properties.is_empty())
        {
            if let Some(rt) = &pp.response_topic
                && TopicName::new(rt, &cfg.topic_limits()).is_err()
            {
                return Err(Close::Reason(
                    reason::PROTOCOL_ERROR,
                    "response topic is not a valid topic name",
                ));
            }
            Some(Arc::new(MessageProperties {
                payload_is_utf8: pp.payload_format_indicator == Some(1),
                expires_at: pp
                    .message_expiry_interval
                    .map(|s| now + u64::from(s) * 1000),
                content_type: pp.content_type,
                response_topic: pp.response_topic,
                correlation_data: pp.correlation_data,
                user_properties: pp.user_properties,
            }))
        } else {
            None
        };
        let message = Arc::new(Message {
            topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            received_at: now,
            properties,
        });
        let mut extra = Vec::new();
        let persistent = self.session.is_persistent() && self.broker.store.is_persistent();
        if p.qos == QoS::ExactlyOnce && persistent {
            extra.push(StoreOp::InboundQos2 {
                tenant: self.session.tenant.clone(),
                client_id: self.session.client_id.clone(),
                packet_id: p.packet_id,
            });
        }
        // A live tail (console) sees what the device published; unwatched: one relaxed load.
        if self.broker.watches.any() {
            self.broker.watches.offer(
                &self.session.tenant,
                self.acting_device(),
                &message,
                message.qos,
                message.retain,
                Direction::In,
            );
        }
        // Services hear reserved topics only; only they need to know who published.
        let origin = (message.topic.as_str().starts_with('$') || self.broker.has_sink())
            .then(|| self.origin());
        let published = self
            .broker
            .publish(
                &self.router,
                self.session.id(),
                origin.as_ref(),
                message,
                extra,
                &mut self.scratch,
            )
            .await;
        if p.qos == QoS::AtMostOnce {
            return Ok(());
        }
        let code = if published.refused {
            if !v5 {
                // 3.1.1 has no negative acknowledgement: closing without one makes the client
                // send the message again later instead of believing it was delivered.
                return Err(Close::Reason(
                    reason::QUOTA_EXCEEDED,
                    "subscriber queue full",
                ));
            }
            reason::QUOTA_EXCEEDED
        } else if !published.matched && v5 {
            reason::NO_MATCHING_SUBSCRIBERS
        } else {
            reason::SUCCESS
        };
        if p.qos == QoS::ExactlyOnce && code < 0x80 {
            self.session.control.lock().inbound_qos2.insert(p.packet_id);
        }
        self.inbound_unacked += 1;
        if let Some(mut ack) = ack_for(code) {
            if code >= 0x80
                && self.problem_info
                && let Packet::PubAck(r) | Packet::PubRec(r) = &mut ack
            {
                r.properties.reason_string =
                    Some("a subscriber's queue is full; retry later".into());
            }
            if p.qos == QoS::ExactlyOnce && code >= 0x80 {
                // A failed PUBREC ends the exchange.
                self.inbound_unacked -= 1;
            }
            self.queue_ack_after(ack, published.commit, published.sink);
        }
        Ok(())
    }

    fn handle_pubrel(&mut self, r: PubResponse) {
        let known = self
            .session
            .control
            .lock()
            .inbound_qos2
            .remove(&r.packet_id);
        if known {
            self.inbound_unacked = self.inbound_unacked.saturating_sub(1);
            if self.session.is_persistent() && self.broker.store.is_persistent() {
                self.store_ops.push(StoreOp::InboundQos2Done {
                    tenant: self.session.tenant.clone(),
                    client_id: self.session.client_id.clone(),
                    packet_id: r.packet_id,
                });
            }
        }
        let code = if known || !self.version.is_v5() {
            reason::SUCCESS
        } else {
            reason::PACKET_IDENTIFIER_NOT_FOUND
        };
        self.queue_ack(
            Packet::PubComp(PubResponse {
                packet_id: r.packet_id,
                code,
                properties: AckProperties::default(),
            }),
            None,
        );
    }

    fn handle_pubrec(&mut self, a: PubResponse) {
        let mut ob = self.session.outbox.lock();
        let Some(inflight) = ob.inflight.get_mut(&a.packet_id) else {
            drop(ob);
            let code = if self.version.is_v5() {
                reason::PACKET_IDENTIFIER_NOT_FOUND
            } else {
                reason::SUCCESS
            };
            self.write(&Packet::PubRel(PubResponse {
                packet_id: a.packet_id,
                code,
                properties: AckProperties::default(),
            }));
            return;
        };
        if inflight.out.qos != QoS::ExactlyOnce {
            return;
        }
        if a.code >= 0x80 {
            // The receiver refused the message: the exchange ends here.
            drop(ob);
            self.finish_delivery(a.packet_id, InflightState::AwaitingAck, QoS::ExactlyOnce);
            return;
        }
        inflight.state = InflightState::AwaitingComp;
        let message_id = inflight.out.message_id;
        drop(ob);
        if message_id != 0 {
            self.store_ops.push(StoreOp::Released {
                tenant: self.session.tenant.clone(),
                client_id: self.session.client_id.clone(),
                message_id,
            });
        }
        self.write(&Packet::PubRel(PubResponse {
            packet_id: a.packet_id,
            ..Default::default()
        }));
    }

    /// Completes an outbound delivery on PUBACK / PUBCOMP (or a failed PUBREC).
    fn finish_delivery(&mut self, packet_id: u16, expected: InflightState, qos: QoS) {
        let mut ob = self.session.outbox.lock();
        let matches = ob
            .inflight
            .get(&packet_id)
            .is_some_and(|i| i.out.qos == qos && (i.state == expected || qos == QoS::ExactlyOnce));
        if !matches {
            return;
        }
        let Some(done) = ob.inflight.shift_remove(&packet_id) else {
            return;
        };
        drop(ob);
        self.broker.metrics.inflight.sub(1);
        // Services that asked for receipts (the command service: `delivered`) hear of it.
        if self.broker.wants_receipt(done.out.message.topic.as_str()) {
            self.broker.notify_observers(SessionEvent::Delivered {
                tenant: self.session.tenant.clone(),
                origin: self.origin(),
                topic: done.out.message.topic.as_arc().clone(),
            });
        }
        if done.out.message_id != 0 {
            self.store_ops.push(StoreOp::Dequeue {
                tenant: self.session.tenant.clone(),
                client_id: self.session.client_id.clone(),
                message_id: done.out.message_id,
            });
        }
    }

    /// Moves queued messages into the write buffer while the client's window has room.
    fn pump(&mut self) {
        if self.wbuf.len() >= WRITE_HIGH_WATER {
            return;
        }
        let now = now_millis();
        {
            let session = self.session.clone();
            let mut ob = session.outbox.lock();
            while self.batch.len() < PUMP_BATCH
                && ob.inflight.len() - self.pending_resend.len() < usize::from(self.send_window)
                && let Some(pid) = self.pending_resend.pop_front()
            {
                if let Some(i) = ob.inflight.get(&pid) {
                    self.batch.push((i.out.clone(), pid, true));
                }
            }
            while self.batch.len() < PUMP_BATCH {
                let Some(front) = ob.queue.front() else { break };
                if front.qos != QoS::AtMostOnce
                    && ob.inflight.len() - self.pending_resend.len()
                        >= usize::from(self.send_window)
                {
                    break;
                }
                let Some(out) = ob.queue.pop_front() else {
                    break;
                };
                self.broker.metrics.queued.sub(1);
                if out.qos == QoS::AtMostOnce {
                    ob.qos0_queued -= 1;
                }
                if out.message.is_expired(now) {
                    self.broker.metrics.drop_message(DropReason::Expired);
                    self.dequeue_op(&out);
                    continue;
                }
                if let Some(access) = &self.access
                    && access.check_deliveries()
                    && !access.can_receive(out.message.topic.as_str())
                {
                    self.broker.metrics.drop_message(DropReason::NotAuthorized);
                    self.dequeue_op(&out);
                    continue;
                }
                let pid = if out.qos == QoS::AtMostOnce {
                    0
                } else {
                    let Some(pid) = ob.allocate_packet_id() else {
                        ob.queue.push_front(out);
                        break;
                    };
                    ob.inflight.insert(
                        pid,
                        Inflight {
                            out: out.clone(),
                            state: InflightState::AwaitingAck,
                        },
                    );
                    self.broker.metrics.inflight.add(1);
                    pid
                };
                self.batch.push((out, pid, false));
            }
        }
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        let mut too_large = Vec::new();
        let watched = self.broker.watches.any();
        for (out, pid, dup) in &batch {
            let mut publish = self.publish_packet(out, *pid, *dup);
            // Aliases go on fresh sends only, and are registered only if the packet is sent.
            let alias = if *dup {
                None
            } else {
                self.plan_alias(&publish.topic)
            };
            let topic = publish.topic.clone();
            if let Some((alias, known)) = alias {
                publish.properties.topic_alias = Some(alias);
                if known {
                    publish.topic = Arc::from("");
                }
            }
            let mut packet = Packet::Publish(publish);
            let mut alias = alias;
            let mut fits = self.fits_client(&packet);
            if !fits && alias.is_some() {
                // The alias property can tip a packet over the limit; try without it.
                if let Packet::Publish(p) = &mut packet {
                    p.properties.topic_alias = None;
                    p.topic = topic.clone();
                }
                alias = None;
                fits = self.fits_client(&packet);
            }
            match fits {
                true => {
                    if let Some((alias, false)) = alias {
                        self.aliases
                            .get_or_insert_with(Default::default)
                            .outgoing
                            .insert(topic, alias);
                    }
                    self.write(&packet);
                    self.broker.metrics.sent[out.qos as usize].add(1);
                    if watched {
                        self.broker.watches.offer(
                            &self.session.tenant,
                            self.acting_device(),
                            &out.message,
                            out.qos,
                            out.retain,
                            Direction::Out,
                        );
                    }
                    self.session.count_out();
                    // Recording the packet id lets a restarted hub resend with the same id and DUP.
                    if out.qos != QoS::AtMostOnce && out.message_id != 0 {
                        self.store_ops.push(StoreOp::Sent {
                            tenant: self.session.tenant.clone(),
                            client_id: self.session.client_id.clone(),
                            message_id: out.message_id,
                            packet_id: *pid,
                        });
                    }
                }
                false => {
                    // Larger than the client accepts: dropped as if delivered (MQTT 5 §3.1.2.11.4).
                    self.broker
                        .metrics
                        .drop_message(DropReason::TooLargeForClient);
                    too_large.push(*pid);
                    self.dequeue_op(out);
                }
            }
        }
        if !too_large.is_empty() {
            let mut ob = self.session.outbox.lock();
            for pid in too_large.into_iter().filter(|p| *p != 0) {
                if ob.inflight.shift_remove(&pid).is_some() {
                    self.broker.metrics.inflight.sub(1);
                }
            }
        }
        self.batch = batch;
        self.batch.clear();
    }

    fn dequeue_op(&mut self, out: &Outgoing) {
        if out.message_id != 0 {
            self.store_ops.push(StoreOp::Dequeue {
                tenant: self.session.tenant.clone(),
                client_id: self.session.client_id.clone(),
                message_id: out.message_id,
            });
        }
    }

    /// Whether `packet` respects the client's Maximum Packet Size.
    fn fits_client(&self, packet: &Packet) -> bool {
        self.client_max_packet == u32::MAX
            || mqtt::encoded_len(packet, self.version)
                .is_ok_and(|len| len <= self.client_max_packet as usize)
    }

    /// The alias to use for `topic`: `(alias, true)` if the client already knows it,
    /// `(alias, false)` for a new one (send the topic too), `None` when aliases are off or full.
    fn plan_alias(&self, topic: &Arc<str>) -> Option<(u16, bool)> {
        if self.client_alias_max == 0 {
            return None;
        }
        let known = self.aliases.as_ref().map_or(0, |a| a.outgoing.len());
        if let Some(alias) = self.aliases.as_ref().and_then(|a| a.outgoing.get(topic)) {
            return Some((*alias, true));
        }
        (known < usize::from(self.client_alias_max)).then(|| (known as u16 + 1, false))
    }

    async fn handle_subscribe(&mut self, s: Subscribe) -> Result<(), Close> {
        let v5 = self.version.is_v5();
        if s.subscription_identifier == Some(0) {
            return Err(Close::Reason(
                reason::PROTOCOL_ERROR,
                "subscription identifier 0",
            ));
        }
        let persistent = self.session.is_persistent() && self.broker.store.is_persistent();
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut ops = Vec::new();
        let mut retained_to_send = Vec::new();
        for req in &s.filters {
            let record = SubscriptionRecord {
                filter: Arc::from(req.filter.as_str()),
                qos: req.options.qos,
                no_local: req.options.no_local,
                retain_as_published: req.options.retain_as_published,
                retain_handling: req.options.retain_handling,
                subscription_id: s.subscription_identifier,
            };
            let Some(sub) = self.broker.router_subscription(&record) else {
                codes.push(if v5 {
                    reason::TOPIC_FILTER_INVALID
                } else {
                    reason::UNSPECIFIED_ERROR
                });
                continue;
            };
            if let Some(access) = &self.access
                && !access.can_subscribe(&req.filter)
            {
                tracing::debug!(peer = %self.peer, client_id = %self.session.client_id, filter = %req.filter, "subscription refused by policy");
                codes.push(if v5 {
                    reason::NOT_AUTHORIZED
                } else {
                    reason::UNSPECIFIED_ERROR
                });
                continue;
            }
            let shared = sub.share_group.is_some();
            if shared && req.options.no_local {
                return Err(Close::Reason(
                    reason::PROTOCOL_ERROR,
                    "No Local on a shared subscription",
                ));
            }
            let filter = sub.filter.clone();
            let outcome = self.router.subscribe(&self.session, sub);
            codes.push(req.options.qos.as_u8());
            let send_retained = !shared
                && match req.options.retain_handling {
                    0 => true,
                    1 => outcome == ferrohub_router::SubscribeOutcome::New,
                    _ => false,
                };
            if send_retained {
                let mut found = Vec::new();
                self.router.retained_matching(filter.as_str(), &mut found);
                for m in found {
                    retained_to_send.push((m, req.options.qos, s.subscription_identifier));
                }
            }
            if persistent {
                ops.push(StoreOp::PutSubscription {
                    tenant: self.session.tenant.clone(),
                    client_id: self.session.client_id.clone(),
                    subscription: record.clone(),
                });
            }
            self.session
                .control
                .lock()
                .subscriptions
                .insert(record.filter.clone(), record);
        }
        // Retained messages for the new subscriptions; a persistent session persists its copies in
        // the same commit as the subscription, so an unacknowledged one survives a restart.
        let now = now_millis();
        let mut retained_out = Vec::with_capacity(retained_to_send.len());
        for (m, qos, sub_id) in retained_to_send {
            if m.is_expired(now) {
                continue;
            }
            let qos = qos.min(m.qos);
            let mut out = Outgoing {
                message: m,
                qos,
                retain: true,
                subscription_ids: sub_id.into_iter().collect(),
                message_id: 0,
                share: None,
            };
            if persistent && qos != QoS::AtMostOnce {
                out.message_id = self.broker.allocate_message_id();
                ops.push(StoreOp::Enqueue {
                    tenant: self.session.tenant.clone(),
                    message_id: out.message_id,
                    message: (*out.message).clone(),
                    recipients: vec![QueuedFor {
                        client_id: self.session.client_id.clone(),
                        qos,
                        retain: true,
                        subscription_ids: out.subscription_ids.to_vec(),
                    }],
                });
            }
            retained_out.push(out);
        }
        let commit = if ops.is_empty() {
            None
        } else {
            self.submit_for_ack(ops).await?
        };
        let reserved: Vec<Arc<str>> = s
            .filters
            .iter()
            .zip(&codes)
            .filter(|(req, code)| req.filter.starts_with('$') && **code < 0x80)
            .map(|(req, _)| Arc::from(req.filter.as_str()))
            .collect();
        self.queue_ack(
            Packet::SubAck(SubAck {
                packet_id: s.packet_id,
                codes,
                properties: AckProperties::default(),
            }),
            commit,
        );
        for out in retained_out {
            let _ = self.session.push(out);
        }
        if !reserved.is_empty() {
            self.broker
                .session_event(SessionEvent::Subscribed {
                    tenant: self.session.tenant.clone(),
                    origin: self.origin(),
                    filters: reserved,
                })
                .await;
        }
        Ok(())
    }

    /// The device this connection acts as: the registered device, else its client id.
    fn acting_device(&self) -> &str {
        self.access
            .as_ref()
            .map_or(&*self.session.client_id, |a| a.device_id())
    }

    /// Who this connection is, for services.
    fn origin(&self) -> Origin {
        Origin {
            client_id: Some(self.session.client_id.clone()),
            device_id: self.access.as_ref().map(|a| Arc::from(a.device_id())),
        }
    }

    async fn submit_for_ack(&mut self, ops: Vec<StoreOp>) -> Result<Option<Commit>, Close> {
        match self.broker.store.submit(ops).await {
            Ok(c) => Ok(Some(c)),
            Err(e) => {
                tracing::error!(error = %e, "persisting a subscription change failed");
                Err(Close::Reason(
                    reason::UNSPECIFIED_ERROR,
                    "state could not be persisted",
                ))
            }
        }
    }

    async fn handle_unsubscribe(&mut self, u: Unsubscribe) -> Result<(), Close> {
        let persistent = self.session.is_persistent() && self.broker.store.is_persistent();
        let mut codes = Vec::with_capacity(u.filters.len());
        let mut ops = Vec::new();
        for f in &u.filters {
            let existed = match self.broker.parse_filter(f) {
                Some(parsed) => {
                    self.session.control.lock().subscriptions.remove(f.as_str());
                    self.router.unsubscribe(
                        self.session.id(),
                        parsed.filter.as_str(),
                        parsed.group.as_deref(),
                    )
                }
                None => false,
            };
            if existed && persistent {
                ops.push(StoreOp::DeleteSubscription {
                    tenant: self.session.tenant.clone(),
                    client_id: self.session.client_id.clone(),
                    filter: Arc::from(f.as_str()),
                });
            }
            codes.push(if existed {
                reason::SUCCESS
            } else {
                reason::NO_SUBSCRIPTION_EXISTED
            });
        }
        let commit = if ops.is_empty() {
            None
        } else {
            self.submit_for_ack(ops).await?
        };
        let codes = if self.version.is_v5() {
            codes
        } else {
            Vec::new()
        };
        self.queue_ack(
            Packet::UnsubAck(UnsubAck {
                packet_id: u.packet_id,
                codes,
                properties: AckProperties::default(),
            }),
            commit,
        );
        Ok(())
    }

    fn handle_disconnect(&mut self, d: Disconnect) -> Result<(), Close> {
        if let Some(expiry) = d.properties.session_expiry_interval {
            if self.session.expiry_secs.load(Relaxed) == 0 && expiry != 0 {
                return Err(Close::Reason(
                    reason::PROTOCOL_ERROR,
                    "session expiry set on DISCONNECT after 0 at CONNECT",
                ));
            }
            self.session.expiry_secs.store(
                expiry.min(self.broker.config.max_session_expiry_secs),
                Relaxed,
            );
        }
        if d.code != reason::DISCONNECT_WITH_WILL {
            self.will = None;
        }
        Err(Close::ClientDisconnect)
    }

    fn handle_auth(&mut self, a: Auth) -> Result<(), Close> {
        let Some(method_name) = self.auth.as_ref().map(|a| a.0.clone()) else {
            return Err(Close::Reason(
                reason::PROTOCOL_ERROR,
                "AUTH without an authentication method",
            ));
        };
        if a.properties.authentication_method.as_deref() != Some(method_name.as_str()) {
            return Err(Close::Reason(
                reason::PROTOCOL_ERROR,
                "AUTH with a different method",
            ));
        }
        let reauth = self.auth.as_mut().and_then(|a| a.1.as_mut());
        let step = match (a.code, reauth) {
            (reason::REAUTHENTICATE, _) => {
                let Some(method) = self.broker.auth.method(&method_name).cloned() else {
                    return Err(Close::Reason(
                        reason::BAD_AUTHENTICATION_METHOD,
                        "method no longer available",
                    ));
                };
                let (step, exchange) = method.start(
                    &self.session.client_id,
                    a.properties.authentication_data.as_deref(),
                );
                if let Some(auth) = self.auth.as_mut() {
                    auth.1 = Some(exchange);
                }
                step
            }
            (reason::CONTINUE_AUTHENTICATION, Some(exchange)) => {
                exchange.step(a.properties.authentication_data.as_deref())
            }
            _ => return Err(Close::Reason(reason::PROTOCOL_ERROR, "unexpected AUTH")),
        };
        let (code, data) = match step {
            AuthStep::Continue(data) => (reason::CONTINUE_AUTHENTICATION, Some(data)),
            AuthStep::Success(tenant, data) => {
                if let Some(auth) = self.auth.as_mut() {
                    auth.1 = None;
                }
                if tenant != self.session.tenant {
                    return Err(Close::Reason(
                        reason::NOT_AUTHORIZED,
                        "re-authentication changed tenant",
                    ));
                }
                (reason::SUCCESS, data)
            }
            AuthStep::Failure => {
                return Err(Close::Reason(
                    reason::NOT_AUTHORIZED,
                    "re-authentication failed",
                ));
            }
        };
        self.write(&Packet::Auth(Auth {
            code,
            properties: AuthProperties {
                authentication_method: Some(method_name),
                authentication_data: data,
                ..AuthProperties::default()
            },
        }));
        Ok(())
    }

    /// Says goodbye (v5 DISCONNECT where the spec wants one), flushes, and detaches the session.
    async fn finish<W: AsyncWrite + Unpin>(mut self, writer: &mut W, close: Close) {
        let (code, text, kick) = match &close {
            Close::Io | Close::ClientDisconnect => (None, "", None),
            Close::Reason(code, text) => (Some(*code), *text, None),
            Close::Kicked(k) => {
                let code = match k {
                    Kick::TakenOver => reason::SESSION_TAKEN_OVER,
                    Kick::Shutdown => reason::SERVER_SHUTTING_DOWN,
                    Kick::Administrative => reason::ADMINISTRATIVE_ACTION,
                    Kick::NotAuthorized => reason::NOT_AUTHORIZED,
                };
                (Some(code), "", Some(*k))
            }
        };
        if let Some(code) = code {
            tracing::debug!(peer = %self.peer, client_id = %self.session.client_id, reason = reason::name(code), detail = text, "closing connection");
            if self.version.is_v5() {
                let reason_string =
                    (self.problem_info && !text.is_empty()).then(|| text.to_string());
                self.write(&Packet::Disconnect(Disconnect {
                    code,
                    properties: DisconnectProperties {
                        reason_string,
                        ..Default::default()
                    },
                }));
            }
        }
        if !matches!(close, Close::Io) && !self.wbuf.is_empty() {
            let _ = timeout(Duration::from_secs(2), async {
                let _ = writer.write_all(&self.wbuf).await;
                let _ = writer.flush().await;
            })
            .await;
        }
        let _ = timeout(Duration::from_secs(1), writer.shutdown()).await;
        if !self.store_ops.is_empty() {
            let ops = std::mem::take(&mut self.store_ops);
            self.broker.submit(ops).await;
        }
        // The policy may have changed since CONNECT: a will it no longer allows is dropped.
        let will = self.will.take().filter(|w| {
            self.access
                .as_ref()
                .is_none_or(|a| a.can_publish(w.message.topic.as_str()))
        });
        let will = will.map(|mut w| {
            // Expiry of a will counts from when it is published.
            if let Some(props) = w.message.properties.as_mut()
                && let Some(secs) = props.expires_at
            {
                Arc::make_mut(props).expires_at =
                    Some(now_millis() + u64::from(w.delay_secs) * 1000 + secs * 1000);
            }
            w
        });
        let reason = disconnect_reason(&close);
        if let Some(access) = &self.access {
            access.closing(reason);
        }
        self.broker
            .session_event(SessionEvent::Disconnected {
                tenant: self.session.tenant.clone(),
                origin: self.origin(),
                reason,
                at: now_millis(),
            })
            .await;
        if let Some(release) = self.release.take() {
            self.broker
                .detach(
                    &self.session,
                    self.generation,
                    kick,
                    will.map(|w| *w),
                    release,
                )
                .await;
        }
        tracing::debug!(peer = %self.peer, client_id = %self.session.client_id, "client disconnected");
    }
}

/// How a [`Close`] is reported in connectivity records and lifecycle events.
fn disconnect_reason(close: &Close) -> DisconnectReason {
    match close {
        Close::Io => DisconnectReason::ConnectionLost,
        Close::ClientDisconnect => DisconnectReason::ClientDisconnect,
        Close::Reason(code, _) if *code == reason::KEEP_ALIVE_TIMEOUT => {
            DisconnectReason::KeepAliveTimeout
        }
        Close::Reason(code, _) if *code == reason::SERVER_SHUTTING_DOWN => {
            DisconnectReason::ServerShutdown
        }
        Close::Reason(..) => DisconnectReason::ProtocolError,
        Close::Kicked(Kick::TakenOver) => DisconnectReason::TakenOver,
        Close::Kicked(Kick::Shutdown) => DisconnectReason::ServerShutdown,
        Close::Kicked(Kick::Administrative) => DisconnectReason::Kicked,
        Close::Kicked(Kick::NotAuthorized) => DisconnectReason::NotAuthorized,
    }
}

/// Sends a refusing CONNACK (the v5 code mapped to 3.1.1 where needed).
async fn refuse<W: AsyncWrite + Unpin>(writer: &mut W, version: ProtocolVersion, code: u8) {
    let code = if version.is_v5() {
        code
    } else {
        reason::connack_v3(code)
    };
    let mut buf = BytesMut::new();
    let ack = Packet::ConnAck(ConnAck {
        session_present: false,
        code,
        properties: ConnAckProperties::default(),
    });
    if mqtt::encode(&ack, version, &mut buf).is_ok() {
        let _ = writer.write_all(&buf).await;
        let _ = writer.flush().await;
    }
}

async fn read_packet<R: AsyncRead + Unpin>(
    reader: &mut R,
    rbuf: &mut BytesMut,
    version: ProtocolVersion,
    max: usize,
) -> Option<Packet> {
    loop {
        match mqtt::decode(rbuf, version, max) {
            Ok(Some(p)) => return Some(p),
            Ok(None) => {}
            Err(_) => return None,
        }
        rbuf.reserve(512);
        match reader.read_buf(rbuf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// `packet` without its Reason String and User Properties.
fn without_optional_properties(packet: &Packet) -> Packet {
    let mut p = packet.clone();
    match &mut p {
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
            r.properties = AckProperties::default();
        }
        Packet::SubAck(a) => a.properties = AckProperties::default(),
        Packet::UnsubAck(a) => a.properties = AckProperties::default(),
        Packet::ConnAck(c) => {
            c.properties.reason_string = None;
            c.properties.user_properties.clear();
        }
        Packet::Disconnect(d) => {
            d.properties.reason_string = None;
            d.properties.user_properties.clear();
        }
        Packet::Auth(a) => {
            a.properties.reason_string = None;
            a.properties.user_properties.clear();
        }
        _ => {}
    }
    p
}

fn decode_error_text(e: &DecodeError) -> &'static str {
    match e {
        DecodeError::Malformed(s) | DecodeError::Protocol(s) => s,
        DecodeError::TooLarge { .. } => "packet exceeds maximum packet size",
        DecodeError::UnsupportedProtocol { .. } => "unsupported protocol",
    }
}

/// An acknowledgement waiting for what it promises: the store commit of what the broker must not
/// lose, and the message sink's storage (telemetry).
struct PendingAck {
    packet: Packet,
    commit: Option<Commit>,
    sink: Option<SinkWait>,
}

impl PendingAck {
    fn waits(&self) -> bool {
        self.commit.is_some() || self.sink.is_some()
    }

    /// Polls the commit, then the sink; each is cleared once resolved (so waiting resumes where
    /// it stopped). A poll function rather than an `async fn`: its state would be stored in every
    /// connection's task.
    fn poll_settle(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<Option<SinkOutcome>, Close>> {
        use std::future::Future;
        use std::task::Poll;
        if let Some(commit) = &mut self.commit {
            match std::pin::Pin::new(commit).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    tracing::error!(error = %e, "store commit failed; closing connection so the client retries");
                    return Poll::Ready(Err(Close::Reason(
                        reason::UNSPECIFIED_ERROR,
                        "message could not be persisted",
                    )));
                }
                Poll::Ready(Ok(())) => self.commit = None,
            }
        }
        match &mut self.sink {
            Some(sink) => match sink.as_mut().poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(outcome) => {
                    self.sink = None;
                    Poll::Ready(Ok(Some(outcome)))
                }
            },
            None => Poll::Ready(Ok(None)),
        }
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;
    use crate::mqtt::{AuthConfig, MqttConfig};
    use crate::shutdown::Shutdown;
    use ferrohub_store::{BrokerStore, RecoveredState};

    /// Every idle connection holds its task's future: keep it small (measured, not guessed).
    #[tokio::test]
    async fn connection_task_is_small() {
        let (_trigger, shutdown) = Shutdown::new();
        let broker = Broker::new(
            MqttConfig::default(),
            AuthConfig::anonymous(),
            BrokerStore::in_memory(),
            RecoveredState::default(),
            shutdown,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let (r, w) = stream.into_split();
        let fut = serve(
            broker,
            r,
            w,
            ConnInfo {
                peer,
                certificates: None,
                protocol: "mqtt",
            },
        );
        let size = std::mem::size_of_val(&fut);
        eprintln!(
            "Connection: {} bytes, serve future: {size} bytes",
            std::mem::size_of::<Connection>()
        );
        // tokio aligns task cells to 128 bytes and adds 80 bytes of header and trailer: at most
        // 920 bytes of future keeps a connection's task in one 1 KiB cell instead of 1152 bytes.
        assert!(size <= 920, "the connection task grew to {size} bytes");
        drop(client);
    }
}
