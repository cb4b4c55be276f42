//! Transports: MQTT over WebSocket at `/mqtt` with subprotocol `mqtt` (tokio-tungstenite with
//! hand-framed packets, and rumqttc's websocket transport), wrong paths refused; MQTT over TLS
//! with a self-signed certificate (rumqttc + rustls), untrusted clients failing cleanly, and
//! mutual TLS with a required client certificate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use ferrohub_proto::mqtt::{self, Packet, ProtocolVersion};
use ferrohub_testkit::TestHub;
use ferrohub_types::QoS as FQoS;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn encode(p: &Packet, v: ProtocolVersion) -> Vec<u8> {
    let mut b = BytesMut::new();
    mqtt::encode(p, v, &mut b).unwrap();
    b.to_vec()
}

async fn ws_connect(
    hub: &TestHub,
    path: &str,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut req = format!("ws://{}{}", hub.ws, path)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let (ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("WebSocket handshake timed out")?;
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("mqtt"),
        "server must select the mqtt subprotocol"
    );
    Ok(ws)
}

/// Reads binary frames into `buf` until a whole packet decodes.
async fn ws_recv(ws: &mut Ws, buf: &mut BytesMut, v: ProtocolVersion) -> Packet {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(p) = mqtt::decode(buf, v, usize::MAX).unwrap() {
                return p;
            }
            match ws.next().await {
                Some(Ok(WsMessage::Binary(b))) => buf.extend_from_slice(&b),
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                other => panic!("unexpected WebSocket event {other:?}"),
            }
        }
    })
    .await
    .expect("timed out waiting for a packet over WebSocket")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_with_hand_framed_packets() {
    let hub = TestHub::start().await.unwrap();
    let v = ProtocolVersion::V5;
    let mut ws = ws_connect(&hub, "/mqtt").await.unwrap();
    let mut buf = BytesMut::new();
    // CONNECT split across two frames.
    let connect = encode(&Packet::Connect(Box::new(connect_packet(v, &uid("ws")))), v);
    let (a, b) = connect.split_at(5);
    ws.send(WsMessage::Binary(a.to_vec().into())).await.unwrap();
    ws.send(WsMessage::Binary(b.to_vec().into())).await.unwrap();
    match ws_recv(&mut ws, &mut buf, v).await {
        Packet::ConnAck(c) => assert_eq!(c.code, 0),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    // SUBSCRIBE and PINGREQ in one frame.
    let mut both = encode(&subscribe_packet(1, "ws/t", FQoS::AtLeastOnce), v);
    both.extend(encode(&Packet::PingReq, v));
    ws.send(WsMessage::Binary(both.into())).await.unwrap();
    assert!(matches!(
        ws_recv(&mut ws, &mut buf, v).await,
        Packet::SubAck(_)
    ));
    assert!(matches!(
        ws_recv(&mut ws, &mut buf, v).await,
        Packet::PingResp
    ));

    // A TCP publisher reaches the WebSocket subscriber, and the other way round.
    let mut tcp = V5::connect(v5_opts(&hub, &uid("tcp"))).await;
    tcp.subscribe("tcp/t", m5::QoS::AtLeastOnce).await;
    tcp.publish("ws/t", m5::QoS::AtLeastOnce, false, &[7u8; 3000])
        .await;
    match ws_recv(&mut ws, &mut buf, v).await {
        Packet::Publish(p) => {
            assert_eq!(p.payload.len(), 3000);
            ws.send(WsMessage::Binary(encode(&puback(p.packet_id), v).into()))
                .await
                .unwrap();
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    ws.send(WsMessage::Binary(
        encode(
            &publish_packet("tcp/t", FQoS::AtLeastOnce, 5, b"from ws"),
            v,
        )
        .into(),
    ))
    .await
    .unwrap();
    match ws_recv(&mut ws, &mut buf, v).await {
        Packet::PubAck(a) => assert_eq!(a.packet_id, 5),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    assert_eq!(tcp.recv_publish().await.payload.as_ref(), b"from ws");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_with_rumqttc() {
    let hub = TestHub::start().await.unwrap();
    let url = format!("ws://{}/mqtt", hub.ws);
    let mut o = rumqttc::MqttOptions::new(uid("ws4"), url.clone(), hub.ws.port());
    o.set_transport(rumqttc::Transport::Ws);
    let mut sub = V4::connect(o).await;
    sub.subscribe("ws4/t", rumqttc::QoS::ExactlyOnce).await;
    let mut o = rumqttc::v5::MqttOptions::new(uid("ws5"), url, hub.ws.port());
    o.set_transport(rumqttc::Transport::Ws);
    let mut publ = V5::connect(o).await;
    for qos in [
        m5::QoS::AtMostOnce,
        m5::QoS::AtLeastOnce,
        m5::QoS::ExactlyOnce,
    ] {
        publ.publish("ws4/t", qos, false, b"over ws").await;
        assert_eq!(sub.recv_publish().await.payload.as_ref(), b"over ws");
    }
    sub.disconnect().await;
    publ.disconnect().await;
    wait_metric(&hub, "ferrohub_mqtt_connections", |v| v == 0.0).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_wrong_path_is_refused() {
    let hub = TestHub::start().await.unwrap();
    for path in ["/", "/mqtt/x", "/MQTT", "/ws"] {
        match ws_connect(&hub, path).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), 404, "{path}")
            }
            Err(e) => panic!("{path}: unexpected error {e}"),
            Ok(_) => panic!("{path}: WebSocket accepted"),
        }
    }
    // Still serving the right path.
    let mut ws = ws_connect(&hub, "/mqtt").await.unwrap();
    let v = ProtocolVersion::V311;
    ws.send(WsMessage::Binary(
        encode(&Packet::Connect(Box::new(connect_packet(v, &uid("ok")))), v).into(),
    ))
    .await
    .unwrap();
    assert!(
        matches!(ws_recv(&mut ws, &mut BytesMut::new(), v).await, Packet::ConnAck(c) if c.code == 0)
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_text_frame_closes_the_connection() {
    let hub = TestHub::start().await.unwrap();
    let mut ws = ws_connect(&hub, "/mqtt").await.unwrap();
    let v = ProtocolVersion::V311;
    ws.send(WsMessage::Binary(
        encode(
            &Packet::Connect(Box::new(connect_packet(v, &uid("txt")))),
            v,
        )
        .into(),
    ))
    .await
    .unwrap();
    assert!(matches!(
        ws_recv(&mut ws, &mut BytesMut::new(), v).await,
        Packet::ConnAck(_)
    ));
    ws.send(WsMessage::Text("hello".into())).await.unwrap();
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(WsMessage::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "text frame did not close the connection");
    hub.stop().await;
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate, as PEM files.
fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "ferrohub test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(vec!["device-1".to_string()]).unwrap();
    client_params
        .distinguished_name
        .push(DnType::CommonName, "device-1");
    let client = client_params.signed_by(&client_key, &ca).unwrap();

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.path().join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();
    Pki {
        dir,
        ca_pem: ca.pem(),
        client_cert_pem: client.pem(),
        client_key_pem: client_key.serialize_pem(),
    }
}

fn tls_v4_opts(hub: &TestHub, pki: &Pki, id: &str, client_auth: bool) -> rumqttc::MqttOptions {
    let addr = hub.mqtts.expect("TLS listener");
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1 << 20, 1 << 20);
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Simple {
            ca: pki.ca_pem.clone().into_bytes(),
            alpn: None,
            client_auth: client_auth.then(|| {
                (
                    pki.client_cert_pem.clone().into_bytes(),
                    pki.client_key_pem.clone().into_bytes(),
                )
            }),
        },
    ));
    o
}

fn install_crypto_provider() {
    let _ = rumqttc::tokio_rustls::rustls::crypto::aws_lc_rs::default_provider().install_default();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_round_trip() {
    install_crypto_provider();
    let pki = pki();
    let hub = TestHub::start_with(|cfg| {
        cfg.tls.cert_file = Some(pki.path("server.pem"));
        cfg.tls.key_file = Some(pki.path("server.key"));
    })
    .await
    .unwrap();
    assert!(hub.mqtts.is_some());
    let mut sub = V4::connect(tls_v4_opts(&hub, &pki, &uid("tls-sub"), false)).await;
    sub.subscribe("tls/t", rumqttc::QoS::AtLeastOnce).await;
    // A plain TCP publisher reaches the TLS subscriber.
    let mut publ = V5::connect(v5_opts(&hub, &uid("tcp-pub"))).await;
    publ.publish("tls/t", m5::QoS::AtLeastOnce, false, &[1u8; 20_000])
        .await;
    assert_eq!(sub.recv_publish().await.payload.len(), 20_000);
    // And the TLS client publishes.
    publ.subscribe("tls/back", m5::QoS::AtLeastOnce).await;
    sub.publish("tls/back", rumqttc::QoS::AtLeastOnce, false, b"secure")
        .await;
    assert_eq!(publ.recv_publish().await.payload.as_ref(), b"secure");
    sub.disconnect().await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshake_failures_do_not_hurt_the_listener() {
    install_crypto_provider();
    let pki = pki();
    let other = self::pki();
    let hub = TestHub::start_with(|cfg| {
        cfg.tls.cert_file = Some(pki.path("server.pem"));
        cfg.tls.key_file = Some(pki.path("server.key"));
    })
    .await
    .unwrap();
    // A client trusting another CA fails the handshake.
    let e = V4::try_connect(tls_v4_opts(&hub, &other, &uid("untrusting"), false)).await;
    assert!(e.is_err(), "handshake with an unknown CA succeeded");
    // Plain MQTT bytes on the TLS port are not a handshake.
    let addr = hub.mqtts.unwrap();
    let (mut raw, _) = {
        let mut raw = ferrohub_testkit::RawClient::connect(addr, ProtocolVersion::V311)
            .await
            .unwrap();
        raw.send(&Packet::Connect(Box::new(connect_packet(
            ProtocolVersion::V311,
            "plain",
        ))))
        .await
        .unwrap();
        (raw, ())
    };
    let seen = raw.expect_close(WAIT).await;
    assert!(matches!(seen.as_deref(), Ok([]) | Err(_)), "{seen:?}");
    // A good client still connects.
    let mut ok = V4::connect(tls_v4_opts(&hub, &pki, &uid("ok"), false)).await;
    ok.subscribe("x", rumqttc::QoS::AtMostOnce).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate() {
    install_crypto_provider();
    let pki = pki();
    let hub = TestHub::start_with(|cfg| {
        cfg.tls.cert_file = Some(pki.path("server.pem"));
        cfg.tls.key_file = Some(pki.path("server.key"));
        cfg.tls.client_ca_file = Some(pki.path("ca.pem"));
        cfg.tls.require_client_cert = true;
    })
    .await
    .unwrap();
    // A certificate names a registered device: unknown, it is refused even in anonymous mode.
    assert!(
        V4::try_connect(tls_v4_opts(&hub, &pki, "device-1", true))
            .await
            .is_err(),
        "certificate of an unregistered device accepted"
    );
    hub.hub()
        .registry
        .create_device(
            &ferrohub_registry::Actor::system(),
            "default",
            ferrohub_registry::model::DeviceSpec {
                id: "device-1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut with_cert = V4::connect(tls_v4_opts(&hub, &pki, "device-1", true)).await;
    with_cert
        .subscribe("devices/device-1/t", rumqttc::QoS::AtLeastOnce)
        .await;
    let e = V4::try_connect(tls_v4_opts(&hub, &pki, &uid("nocert"), false)).await;
    assert!(e.is_err(), "client without certificate accepted");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_frame_may_carry_more_than_max_packet_size_in_small_packets() {
    // [MQTT-6.0.0-2]: packets are not aligned on frame boundaries; the packet size limit is per
    // MQTT packet, not per WebSocket frame.
    let hub = TestHub::start_with(|cfg| cfg.mqtt.max_packet_size = 1024)
        .await
        .unwrap();
    let v = ProtocolVersion::V5;
    let mut ws = ws_connect(&hub, "/mqtt").await.unwrap();
    let mut buf = BytesMut::new();
    ws.send(WsMessage::Binary(
        encode(
            &Packet::Connect(Box::new(connect_packet(v, &uid("batch")))),
            v,
        )
        .into(),
    ))
    .await
    .unwrap();
    assert!(matches!(ws_recv(&mut ws, &mut buf, v).await, Packet::ConnAck(c) if c.code == 0));
    let mut batch = Vec::new();
    for pid in 1..=20u16 {
        batch.extend(encode(
            &publish_packet("batch/t", FQoS::AtLeastOnce, pid, &[b'x'; 100]),
            v,
        ));
    }
    assert!(batch.len() > 2000);
    ws.send(WsMessage::Binary(batch.into())).await.unwrap();
    for pid in 1..=20u16 {
        match ws_recv(&mut ws, &mut buf, v).await {
            Packet::PubAck(a) => assert_eq!(a.packet_id, pid),
            other => panic!("expected PUBACK {pid}, got {other:?}"),
        }
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_oversized_packet_gets_0x95() {
    let hub = TestHub::start_with(|cfg| cfg.mqtt.max_packet_size = 1024)
        .await
        .unwrap();
    let v = ProtocolVersion::V5;
    let mut ws = ws_connect(&hub, "/mqtt").await.unwrap();
    let mut buf = BytesMut::new();
    ws.send(WsMessage::Binary(
        encode(
            &Packet::Connect(Box::new(connect_packet(v, &uid("big")))),
            v,
        )
        .into(),
    ))
    .await
    .unwrap();
    assert!(matches!(ws_recv(&mut ws, &mut buf, v).await, Packet::ConnAck(c) if c.code == 0));
    ws.send(WsMessage::Binary(
        encode(
            &publish_packet("big/t", FQoS::AtLeastOnce, 1, &[0u8; 4000]),
            v,
        )
        .into(),
    ))
    .await
    .unwrap();
    // Same behaviour as over TCP: DISCONNECT 0x95, then close.
    let mut code = None;
    let _ = tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(WsMessage::Binary(b))) => {
                    buf.extend_from_slice(&b);
                    while let Ok(Some(p)) = mqtt::decode(&mut buf, v, usize::MAX) {
                        if let Packet::Disconnect(d) = p {
                            code = Some(d.code);
                        }
                    }
                }
                None | Some(Err(_)) | Some(Ok(WsMessage::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert_eq!(code, Some(0x95));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_ping_is_answered() {
    let hub = TestHub::start().await.unwrap();
    let v = ProtocolVersion::V311;
    let mut ws = ws_connect(&hub, "/mqtt").await.unwrap();
    ws.send(WsMessage::Binary(
        encode(
            &Packet::Connect(Box::new(connect_packet(v, &uid("ping")))),
            v,
        )
        .into(),
    ))
    .await
    .unwrap();
    assert!(matches!(
        ws_recv(&mut ws, &mut BytesMut::new(), v).await,
        Packet::ConnAck(_)
    ));
    ws.send(WsMessage::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match ws.next().await {
                Some(Ok(WsMessage::Pong(p))) => return p,
                Some(Ok(_)) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .expect("no WebSocket pong within 2 s");
    assert_eq!(pong.as_ref(), b"are you there");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_tls_and_websocket_sockets_are_closed_after_connect_timeout() {
    install_crypto_provider();
    let pki = pki();
    let hub = TestHub::start_with(|cfg| {
        cfg.mqtt.connect_timeout_secs = 1;
        cfg.tls.cert_file = Some(pki.path("server.pem"));
        cfg.tls.key_file = Some(pki.path("server.key"));
    })
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let mut tls = ferrohub_testkit::RawClient::connect(hub.mqtts.unwrap(), ProtocolVersion::V311)
        .await
        .unwrap();
    let mut ws = ferrohub_testkit::RawClient::connect(hub.ws, ProtocolVersion::V311)
        .await
        .unwrap();
    // WebSocket upgraded, but no CONNECT.
    let mut upgraded = ws_connect(&hub, "/mqtt").await.unwrap();
    let r = tls.expect_close(Duration::from_secs(4)).await;
    assert!(matches!(r.as_deref(), Ok([])), "TLS: {r:?}");
    let r = ws.expect_close(Duration::from_secs(4)).await;
    assert!(r.is_ok(), "WebSocket handshake never sent: {r:?}");
    let closed = tokio::time::timeout(Duration::from_secs(4), async {
        loop {
            match upgraded.next().await {
                None | Some(Err(_)) | Some(Ok(WsMessage::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "upgraded WebSocket without CONNECT stays open"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    hub.stop().await;
}
