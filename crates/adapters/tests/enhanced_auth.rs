//! The MQTT 5 enhanced-authentication hook: a challenge/response method plugged into the broker
//! runs its AUTH exchange before CONNACK, refuses a wrong answer, and supports re-authentication.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferrohub_adapters::mqtt::auth::{AuthExchange, AuthMethod, AuthStep};
use ferrohub_adapters::mqtt::{AuthConfig, Broker, MqttConfig, Transport, run_listener};
use ferrohub_adapters::shutdown::Shutdown;
use ferrohub_proto::mqtt::{
    self, Auth, AuthProperties, Connect, ConnectProperties, Packet, ProtocolVersion, reason,
};
use ferrohub_store::{BrokerStore, RecoveredState};
use ferrohub_types::TenantId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Challenge "nonce", expected answer "nonce-signed".
struct Challenge;
struct ChallengeExchange;

impl AuthMethod for Challenge {
    fn name(&self) -> &str {
        "TEST-CHALLENGE"
    }
    fn start(&self, _client_id: &str, _data: Option<&[u8]>) -> (AuthStep, Box<dyn AuthExchange>) {
        (
            AuthStep::Continue(Bytes::from_static(b"nonce")),
            Box::new(ChallengeExchange),
        )
    }
}

impl AuthExchange for ChallengeExchange {
    fn step(&mut self, data: Option<&[u8]>) -> AuthStep {
        if data == Some(b"nonce-signed".as_slice()) {
            AuthStep::Success(
                TenantId::default_tenant(),
                Some(Bytes::from_static(b"welcome")),
            )
        } else {
            AuthStep::Failure
        }
    }
}

async fn start() -> std::net::SocketAddr {
    let (trigger, shutdown) = Shutdown::new();
    // Kept alive for the test's duration by leaking the trigger (the runtime ends with the test).
    std::mem::forget(trigger);
    let auth = AuthConfig {
        methods: vec![Arc::new(Challenge)],
        ..AuthConfig::anonymous()
    };
    let broker = Broker::new(
        MqttConfig::default(),
        auth,
        BrokerStore::in_memory(),
        RecoveredState::default(),
        shutdown,
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(run_listener(broker, listener, Transport::Tcp));
    addr
}

struct Client {
    stream: TcpStream,
    buf: BytesMut,
}

impl Client {
    async fn send(&mut self, p: &Packet) {
        let mut out = BytesMut::new();
        mqtt::encode(p, ProtocolVersion::V5, &mut out).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }
    async fn recv(&mut self) -> Option<Packet> {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(p) =
                    mqtt::decode(&mut self.buf, ProtocolVersion::V5, usize::MAX).unwrap()
                {
                    return Some(p);
                }
                let mut chunk = [0u8; 1024];
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .expect("server answered within 5 s")
    }
}

fn auth(code: u8, data: &'static [u8]) -> Packet {
    Packet::Auth(Auth {
        code,
        properties: AuthProperties {
            authentication_method: Some("TEST-CHALLENGE".into()),
            authentication_data: Some(Bytes::from_static(data)),
            ..AuthProperties::default()
        },
    })
}

async fn connect(addr: std::net::SocketAddr) -> Client {
    let mut c = Client {
        stream: TcpStream::connect(addr).await.unwrap(),
        buf: BytesMut::new(),
    };
    c.send(&Packet::Connect(Box::new(Connect {
        protocol: ProtocolVersion::V5,
        clean_start: true,
        keep_alive: 30,
        client_id: "enhanced".into(),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties {
            authentication_method: Some("TEST-CHALLENGE".into()),
            ..ConnectProperties::default()
        },
    })))
    .await;
    c
}

#[tokio::test]
async fn challenge_response_before_connack_and_reauthentication() {
    let addr = start().await;
    let mut c = connect(addr).await;
    let Some(Packet::Auth(challenge)) = c.recv().await else {
        panic!("expected AUTH challenge")
    };
    assert_eq!(challenge.code, reason::CONTINUE_AUTHENTICATION);
    assert_eq!(
        challenge.properties.authentication_data.as_deref(),
        Some(b"nonce".as_slice())
    );
    c.send(&auth(reason::CONTINUE_AUTHENTICATION, b"nonce-signed"))
        .await;
    let Some(Packet::ConnAck(ack)) = c.recv().await else {
        panic!("expected CONNACK")
    };
    assert_eq!(ack.code, reason::SUCCESS);
    assert_eq!(
        ack.properties.authentication_method.as_deref(),
        Some("TEST-CHALLENGE")
    );
    assert_eq!(
        ack.properties.authentication_data.as_deref(),
        Some(b"welcome".as_slice())
    );

    // Re-authentication on the live connection.
    c.send(&auth(reason::REAUTHENTICATE, b"")).await;
    let Some(Packet::Auth(again)) = c.recv().await else {
        panic!("expected AUTH challenge")
    };
    assert_eq!(again.code, reason::CONTINUE_AUTHENTICATION);
    c.send(&auth(reason::CONTINUE_AUTHENTICATION, b"nonce-signed"))
        .await;
    let Some(Packet::Auth(done)) = c.recv().await else {
        panic!("expected AUTH success")
    };
    assert_eq!(done.code, reason::SUCCESS);

    // A failed re-authentication disconnects with Not authorized.
    c.send(&auth(reason::REAUTHENTICATE, b"")).await;
    let _ = c.recv().await;
    c.send(&auth(reason::CONTINUE_AUTHENTICATION, b"wrong"))
        .await;
    match c.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.code, reason::NOT_AUTHORIZED),
        other => panic!("expected DISCONNECT 0x87, got {other:?}"),
    }
}

#[tokio::test]
async fn wrong_answer_is_refused_with_not_authorized() {
    let addr = start().await;
    let mut c = connect(addr).await;
    let Some(Packet::Auth(_)) = c.recv().await else {
        panic!("expected AUTH challenge")
    };
    c.send(&auth(reason::CONTINUE_AUTHENTICATION, b"guess"))
        .await;
    let Some(Packet::ConnAck(ack)) = c.recv().await else {
        panic!("expected CONNACK")
    };
    assert_eq!(ack.code, reason::NOT_AUTHORIZED);
    assert!(
        c.recv().await.is_none(),
        "connection closed after the refusal"
    );
}
