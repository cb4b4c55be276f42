//! Authentication with the static user list: right password connects, wrong password and
//! missing credentials are refused with the right CONNACK codes in 3.1.1 and 5.0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use ferrohub::config::UserEntry;
use ferrohub_proto::mqtt::ProtocolVersion;
use ferrohub_testkit::TestHub;

async fn secured() -> TestHub {
    TestHub::start_with(|cfg| {
        cfg.allow_anonymous = false;
        cfg.users = vec![
            UserEntry {
                username: "alice".into(),
                password: "s3cret".into(),
            },
            UserEntry {
                username: "bob".into(),
                password: "hunter2".into(),
            },
        ];
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn right_password_connects() {
    let hub = secured().await;
    let mut o4 = v4_opts(&hub, &uid("alice4"));
    o4.set_credentials("alice", "s3cret");
    let mut a = V4::connect(o4).await;
    let mut o5 = v5_opts(&hub, &uid("bob5"));
    o5.set_credentials("bob", "hunter2");
    let mut b = V5::connect(o5).await;
    a.subscribe("auth/t", rumqttc::QoS::AtLeastOnce).await;
    b.publish("auth/t", m5::QoS::AtLeastOnce, false, b"in")
        .await;
    assert_eq!(a.recv_publish().await.payload.as_ref(), b"in");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_refused() {
    let hub = secured().await;
    let mut o4 = v4_opts(&hub, &uid("x"));
    o4.set_credentials("alice", "wrong");
    match V4::try_connect(o4).await {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, rumqttc::ConnectReturnCode::BadUserNamePassword)
        }
        Err(e) => panic!("unexpected error {e:?}"),
        Ok(_) => panic!("wrong password accepted"),
    }
    let mut o5 = v5_opts(&hub, &uid("y"));
    o5.set_credentials("alice", "wrong");
    match V5::try_connect(o5).await {
        Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, m5::ConnectReturnCode::BadUserNamePassword)
        }
        Err(e) => panic!("unexpected error {e:?}"),
        Ok(_) => panic!("wrong password accepted"),
    }
    // Another user's password, a prefix, an unknown user: all refused with 0x86.
    for (user, pass) in [
        ("alice", "hunter2"),
        ("alice", "s3cre"),
        ("alice", "s3cret "),
        ("mallory", "s3cret"),
    ] {
        let mut c = connect_packet(ProtocolVersion::V5, &uid("z"));
        c.username = Some(user.into());
        c.password = Some(Bytes::copy_from_slice(pass.as_bytes()));
        let (mut raw, ack) = raw_connect_with(hub.mqtt, c).await;
        assert_eq!(ack.code, 0x86, "{user}/{pass}");
        raw.expect_close(WAIT).await.unwrap();
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_credentials_are_refused() {
    let hub = secured().await;
    match V4::try_connect(v4_opts(&hub, &uid("anon4"))).await {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => assert!(
            matches!(
                code,
                rumqttc::ConnectReturnCode::BadUserNamePassword
                    | rumqttc::ConnectReturnCode::NotAuthorized
            ),
            "{code:?}"
        ),
        Err(e) => panic!("unexpected error {e:?}"),
        Ok(_) => panic!("anonymous client accepted"),
    }
    match V5::try_connect(v5_opts(&hub, &uid("anon5"))).await {
        Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => assert!(
            matches!(
                code,
                m5::ConnectReturnCode::BadUserNamePassword | m5::ConnectReturnCode::NotAuthorized
            ),
            "{code:?}"
        ),
        Err(e) => panic!("unexpected error {e:?}"),
        Ok(_) => panic!("anonymous client accepted"),
    }
    // User name without password; v5 password without user name.
    let mut c = connect_packet(ProtocolVersion::V5, &uid("nopass"));
    c.username = Some("alice".into());
    let (_raw, ack) = raw_connect_with(hub.mqtt, c).await;
    assert!(matches!(ack.code, 0x86 | 0x87), "{ack:?}");
    let mut c = connect_packet(ProtocolVersion::V5, &uid("nouser"));
    c.password = Some(Bytes::from_static(b"s3cret"));
    let (_raw, ack) = raw_connect_with(hub.mqtt, c).await;
    assert!(matches!(ack.code, 0x86 | 0x87), "{ack:?}");
    let mut c = connect_packet(ProtocolVersion::V311, &uid("nopass4"));
    c.username = Some("alice".into());
    let (_raw, ack) = raw_connect_with(hub.mqtt, c).await;
    assert!(matches!(ack.code, 4 | 5), "{ack:?}");
    let text = metrics(&hub).await;
    assert!(metric(&text, "ferrohub_mqtt_connections_refused_total").unwrap() >= 5.0);
    assert_eq!(metric(&text, "ferrohub_mqtt_connections"), Some(0.0));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_client_leaves_no_trace() {
    let hub = secured().await;
    // A refused client must not take over (kick) the session of a legitimate one.
    let id = uid("victim");
    let mut o = v5_opts(&hub, &id);
    o.set_credentials("alice", "s3cret");
    let mut victim = V5::connect(o).await;
    let mut c = connect_packet(ProtocolVersion::V5, &id);
    c.username = Some("alice".into());
    c.password = Some(Bytes::from_static(b"guess"));
    let (_raw, ack) = raw_connect_with(hub.mqtt, c).await;
    assert_eq!(ack.code, 0x86);
    victim.subscribe("victim/t", m5::QoS::AtLeastOnce).await;
    assert!(
        !victim.is_closed(),
        "legitimate client kicked by a refused one"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_mode_still_checks_presented_credentials() {
    let hub = TestHub::start_with(|cfg| {
        cfg.allow_anonymous = true;
        cfg.users = vec![UserEntry {
            username: "alice".into(),
            password: "s3cret".into(),
        }];
    })
    .await
    .unwrap();
    let (_a, ack) =
        raw_connect_with(hub.mqtt, connect_packet(ProtocolVersion::V5, &uid("anon"))).await;
    assert_eq!(ack.code, 0);
    let mut c = connect_packet(ProtocolVersion::V5, &uid("liar"));
    c.username = Some("alice".into());
    c.password = Some(Bytes::from_static(b"wrong"));
    let (_b, ack) = raw_connect_with(hub.mqtt, c).await;
    assert_eq!(
        ack.code, 0x86,
        "wrong credentials are refused even when anonymous access is on"
    );
    hub.stop().await;
}
