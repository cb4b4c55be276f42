//! Will messages: sent on abnormal disconnect, not on a normal DISCONNECT, sent on v5
//! DISCONNECT 0x04, Will Delay Interval (cancelled by resuming the session, capped by session
//! expiry, cut short by a clean start), will retain, will QoS and properties.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use ferrohub_proto::mqtt::{Disconnect, Packet, ProtocolVersion, Will, WillProperties};
use ferrohub_testkit::TestHub;
use ferrohub_types::QoS as FQoS;
use rumqttc::QoS;

fn will(topic: &str, payload: &str) -> Will {
    Will {
        topic: Arc::from(topic),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        qos: FQoS::AtLeastOnce,
        retain: false,
        properties: WillProperties::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_sent_when_the_socket_drops() {
    let hub = TestHub::start().await.unwrap();
    let mut sub = V4::connect(v4_opts(&hub, &uid("sub"))).await;
    sub.subscribe("will/drop/#", QoS::AtLeastOnce).await;

    // rumqttc 3.1.1 client with a last will, killed without DISCONNECT.
    let mut opts = v4_opts(&hub, &uid("dying"));
    opts.set_last_will(rumqttc::LastWill::new(
        "will/drop/v4",
        "bye4",
        QoS::AtLeastOnce,
        false,
    ));
    let dying = V4::connect(opts).await;
    drop(dying);
    let p = sub.recv_publish().await;
    assert_eq!(p.topic, "will/drop/v4");
    assert_eq!(p.payload.as_ref(), b"bye4");
    assert_eq!(p.qos, QoS::AtLeastOnce);

    // Byte-level 5.0 client.
    let (raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("raw"), |c| {
        c.will = Some(will("will/drop/v5", "bye5"));
    })
    .await;
    drop(raw);
    let p = sub.recv_publish().await;
    assert_eq!(p.topic, "will/drop/v5");
    assert_eq!(p.payload.as_ref(), b"bye5");
    sub.expect_no_publish(QUIET).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_not_sent_after_normal_disconnect() {
    let hub = TestHub::start().await.unwrap();
    let mut sub = V4::connect(v4_opts(&hub, &uid("sub"))).await;
    sub.subscribe("will/normal/#", QoS::AtLeastOnce).await;

    let mut opts = v4_opts(&hub, &uid("v4"));
    opts.set_last_will(rumqttc::LastWill::new(
        "will/normal/v4",
        "no",
        QoS::AtLeastOnce,
        false,
    ));
    V4::connect(opts).await.disconnect().await;

    let mut opts = v5_opts(&hub, &uid("v5"));
    opts.set_last_will(m5::LastWill::new(
        "will/normal/v5",
        "no",
        m5::QoS::AtLeastOnce,
        false,
        None,
    ));
    V5::connect(opts).await.disconnect().await;

    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("raw"), |c| {
        c.will = Some(will("will/normal/raw", "no"));
    })
    .await;
    raw.send(&Packet::Disconnect(Disconnect::default()))
        .await
        .unwrap();
    raw.expect_close(WAIT).await.unwrap();

    sub.expect_no_publish(Duration::from_millis(800)).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_disconnect_with_will_message_sends_the_will() {
    let hub = TestHub::start().await.unwrap();
    let mut sub = V5::connect(v5_opts(&hub, &uid("sub"))).await;
    sub.subscribe("will/x04", m5::QoS::AtLeastOnce).await;
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("raw"), |c| {
        let mut w = will("will/x04", "as asked");
        w.properties.content_type = Some(Arc::from("text/plain"));
        w.properties.user_properties = vec![(Arc::from("k"), Arc::from("v"))];
        w.properties.payload_format_indicator = Some(1);
        c.will = Some(w);
    })
    .await;
    raw.send(&Packet::Disconnect(Disconnect {
        code: 0x04,
        ..Disconnect::default()
    }))
    .await
    .unwrap();
    raw.expect_close(WAIT).await.unwrap();
    let p = sub.recv_publish().await;
    assert_eq!(p.payload.as_ref(), b"as asked");
    let props = p.properties.unwrap_or_default();
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        props.user_properties,
        vec![("k".to_string(), "v".to_string())]
    );
    assert_eq!(props.payload_format_indicator, Some(1));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_retain_and_qos() {
    let hub = TestHub::start().await.unwrap();
    let (raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V311, &uid("raw"), |c| {
        let mut w = will("will/ret", "last words");
        w.retain = true;
        w.qos = FQoS::ExactlyOnce;
        c.will = Some(w);
    })
    .await;
    let mut live = V4::connect(v4_opts(&hub, &uid("live"))).await;
    live.subscribe("will/ret", QoS::ExactlyOnce).await;
    drop(raw);
    let p = live.recv_publish().await;
    assert_eq!(p.qos, QoS::ExactlyOnce, "will published at its QoS");
    assert!(!p.retain, "3.1.1 live subscription sees RETAIN=0");

    // The will was retained.
    let mut late = V4::connect(v4_opts(&hub, &uid("late"))).await;
    late.subscribe("will/ret", QoS::AtLeastOnce).await;
    let p = late.recv_publish().await;
    assert!(p.retain);
    assert_eq!(p.payload.as_ref(), b"last words");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_delay_is_cancelled_when_the_session_resumes() {
    let hub = TestHub::start().await.unwrap();
    let mut sub = V5::connect(v5_opts(&hub, &uid("sub"))).await;
    sub.subscribe("will/delay", m5::QoS::AtLeastOnce).await;
    let id = uid("delayed");
    let connect = |clean: bool| {
        let id = id.clone();
        move |c: &mut ferrohub_proto::mqtt::Connect| {
            c.client_id = id;
            c.clean_start = clean;
            c.properties.session_expiry_interval = Some(60);
            let mut w = will("will/delay", "late");
            w.properties.delay_interval = Some(2);
            c.will = Some(w);
        }
    };
    let (raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, connect(true)).await;
    drop(raw);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, connect(false)).await;
    assert!(ack.session_present);
    // Past the delay: nothing, the session was resumed in time.
    sub.expect_no_publish(Duration::from_millis(2500)).await;

    // Now drop it for good: the will comes after ~2 s, not before.
    drop(raw);
    let started = std::time::Instant::now();
    sub.expect_no_publish(Duration::from_millis(1200)).await;
    let p = sub.recv_publish().await;
    assert_eq!(p.payload.as_ref(), b"late");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "will sent after {waited:?}, delay is 2 s"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_delay_longer_than_session_expiry_fires_at_session_end() {
    let hub = TestHub::start().await.unwrap();
    let mut sub = V5::connect(v5_opts(&hub, &uid("sub"))).await;
    sub.subscribe("will/expiry", m5::QoS::AtLeastOnce).await;
    let (raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("w"), |c| {
        c.properties.session_expiry_interval = Some(1);
        let mut w = will("will/expiry", "session over");
        w.properties.delay_interval = Some(30);
        c.will = Some(w);
    })
    .await;
    drop(raw);
    let started = std::time::Instant::now();
    let p = sub.recv_publish().await;
    assert_eq!(p.payload.as_ref(), b"session over");
    assert!(started.elapsed() < Duration::from_secs(4));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn will_is_sent_at_once_when_a_clean_start_ends_the_delayed_session() {
    let hub = TestHub::start().await.unwrap();
    let mut sub = V5::connect(v5_opts(&hub, &uid("sub"))).await;
    sub.subscribe("will/clean", m5::QoS::AtLeastOnce).await;
    let id = uid("w");
    let (raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, |c| {
        c.properties.session_expiry_interval = Some(60);
        let mut w = will("will/clean", "ended");
        w.properties.delay_interval = Some(5);
        c.will = Some(w);
    })
    .await;
    drop(raw);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Clean Start ends the old session, and with it the will delay [MQTT-3.1.3-9 / 3.1.2.5].
    let (_raw2, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, |c| {
        c.clean_start = true;
    })
    .await;
    assert!(!ack.session_present);
    let p = tokio::time::timeout(Duration::from_millis(2000), sub.recv_publish())
        .await
        .expect("will not published when the session ended (clean start)");
    assert_eq!(p.payload.as_ref(), b"ended");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_sent_when_the_connection_is_taken_over() {
    let hub = TestHub::start().await.unwrap();
    let mut sub = V4::connect(v4_opts(&hub, &uid("sub"))).await;
    sub.subscribe("will/takeover", QoS::AtLeastOnce).await;
    let id = uid("dup");
    let (mut first, _) = raw_connect(hub.mqtt, ProtocolVersion::V311, &id, |c| {
        c.will = Some(will("will/takeover", "replaced"));
    })
    .await;
    let (_second, _) = raw_connect(hub.mqtt, ProtocolVersion::V311, &id, |_| {}).await;
    first.expect_close(WAIT).await.unwrap();
    let p = sub.recv_publish().await;
    assert_eq!(p.payload.as_ref(), b"replaced");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_with_invalid_utf8_payload_is_refused() {
    let hub = TestHub::start().await.unwrap();
    let mut c = connect_packet(ProtocolVersion::V5, &uid("badwill"));
    let mut w = will("will/bad", "");
    w.payload = Bytes::from_static(&[0xff, 0xfe, 0x00]);
    w.properties.payload_format_indicator = Some(1);
    c.will = Some(w);
    let (_raw, ack) = raw_connect_with(hub.mqtt, c).await;
    assert_eq!(ack.code, 0x99, "CONNACK Payload format invalid");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_with_invalid_topic_is_refused() {
    let hub = TestHub::start().await.unwrap();
    for topic in ["will/+", "will/#", ""] {
        let mut c = connect_packet(ProtocolVersion::V5, &uid("badtopic"));
        c.will = Some(will(topic, "x"));
        let mut raw = ferrohub_testkit::RawClient::connect(hub.mqtt, ProtocolVersion::V5)
            .await
            .unwrap();
        raw.send(&Packet::Connect(Box::new(c))).await.unwrap();
        let seen = raw.expect_close(WAIT).await.unwrap();
        for p in &seen {
            match p {
                Packet::ConnAck(a) => assert!(a.code >= 0x80, "will topic {topic:?} accepted"),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_that_resumes_the_session_cancels_a_delayed_will() {
    let hub = TestHub::start().await.unwrap();
    let mut sub = V5::connect(v5_opts(&hub, &uid("sub"))).await;
    sub.subscribe("will/resume", m5::QoS::AtLeastOnce).await;
    let id = uid("w");
    let (mut first, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, |c| {
        c.properties.session_expiry_interval = Some(60);
        let mut w = will("will/resume", "should not appear");
        w.properties.delay_interval = Some(1);
        c.will = Some(w);
    })
    .await;
    let (_second, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, |c| {
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(60);
    })
    .await;
    assert!(ack.session_present);
    assert_eq!(raw_expect_disconnect(&mut first, WAIT).await, Some(0x8E));
    sub.expect_no_publish(Duration::from_millis(2000)).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_with_clean_start_publishes_a_delayed_will_at_once() {
    let hub = TestHub::start().await.unwrap();
    let mut sub = V5::connect(v5_opts(&hub, &uid("sub"))).await;
    sub.subscribe("will/cleantake", m5::QoS::AtLeastOnce).await;
    let id = uid("w");
    let (_first, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, |c| {
        c.properties.session_expiry_interval = Some(60);
        let mut w = will("will/cleantake", "session replaced");
        w.properties.delay_interval = Some(30);
        c.will = Some(w);
    })
    .await;
    let (_second, ack) =
        raw_connect(hub.mqtt, ProtocolVersion::V5, &id, |c| c.clean_start = true).await;
    assert!(!ack.session_present);
    let p = tokio::time::timeout(Duration::from_secs(2), sub.recv_publish())
        .await
        .expect("the old session ended: its will must be published without waiting 30 s");
    assert_eq!(p.payload.as_ref(), b"session replaced");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_message_expiry_applies() {
    let hub = TestHub::start().await.unwrap();
    let sub_id = uid("offline-sub");
    let mut o = v5_opts(&hub, &sub_id);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(60));
    let mut sub = V5::connect(o.clone()).await;
    sub.subscribe("will/exp/#", m5::QoS::AtLeastOnce).await;
    sub.disconnect().await;
    wait_connections(&hub, 0).await;
    for (topic, secs) in [("will/exp/short", 1), ("will/exp/long", 30)] {
        let (raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("w"), |c| {
            let mut w = will(topic, "bye");
            w.properties.message_expiry_interval = Some(secs);
            c.will = Some(w);
        })
        .await;
        drop(raw);
    }
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let mut sub = V5::connect(o).await;
    let p = sub.recv_publish().await;
    assert_eq!(
        topic5(&p),
        "will/exp/long",
        "the expired will is not delivered"
    );
    let left = p.properties.unwrap_or_default().message_expiry_interval;
    assert!(
        matches!(left, Some(25..=29)),
        "remaining will expiry, got {left:?}"
    );
    sub.expect_no_publish(QUIET).await;
    hub.stop().await;
}
