//! Retained messages: stored and sent on subscribe with the retain flag, replaced, deleted by an
//! empty payload, wildcard matching, QoS of retained deliveries, v5 Retain Handling 0/1/2,
//! Retain As Published and expiry of retained messages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use ferrohub_testkit::TestHub;
use rumqttc::QoS;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_message_is_sent_on_subscribe_with_retain_flag() {
    let hub = TestHub::start().await.unwrap();
    let mut publ = V4::connect(v4_opts(&hub, &uid("pub"))).await;
    publ.publish("ret/a", QoS::AtLeastOnce, true, b"kept").await;

    let mut sub = V4::connect(v4_opts(&hub, &uid("sub"))).await;
    sub.subscribe("ret/a", QoS::AtLeastOnce).await;
    let p = sub.recv_publish().await;
    assert_eq!(p.topic, "ret/a");
    assert_eq!(p.payload.as_ref(), b"kept");
    assert!(p.retain, "retained delivery on subscribe carries RETAIN=1");
    assert_eq!(p.qos, QoS::AtLeastOnce);
    sub.expect_no_publish(QUIET).await;

    // A v5 subscriber too.
    let mut sub5 = V5::connect(v5_opts(&hub, &uid("sub5"))).await;
    sub5.subscribe("ret/a", m5::QoS::AtMostOnce).await;
    let p = sub5.recv_publish().await;
    assert!(p.retain);
    assert_eq!(p.payload.as_ref(), b"kept");
    assert_eq!(
        p.qos,
        m5::QoS::AtMostOnce,
        "retained delivery downgraded to the subscription QoS"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn established_subscription_gets_retain_flag_cleared_in_311() {
    let hub = TestHub::start().await.unwrap();
    let mut sub = V4::connect(v4_opts(&hub, &uid("sub"))).await;
    sub.subscribe("ret/live", QoS::AtLeastOnce).await;
    let mut publ = V4::connect(v4_opts(&hub, &uid("pub"))).await;
    publ.publish("ret/live", QoS::AtLeastOnce, true, b"x").await;
    let p = sub.recv_publish().await;
    assert!(
        !p.retain,
        "3.1.1 [MQTT-3.3.1-9]: RETAIN=0 for an established subscription"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_message_is_replaced() {
    let hub = TestHub::start().await.unwrap();
    let mut publ = V4::connect(v4_opts(&hub, &uid("pub"))).await;
    publ.publish("ret/r", QoS::AtLeastOnce, true, b"one").await;
    publ.publish("ret/r", QoS::AtLeastOnce, true, b"two").await;
    // A non-retained publish does not replace it.
    publ.publish("ret/r", QoS::AtLeastOnce, false, b"three")
        .await;
    let mut sub = V4::connect(v4_opts(&hub, &uid("sub"))).await;
    sub.subscribe("ret/r", QoS::AtLeastOnce).await;
    let p = sub.recv_publish().await;
    assert_eq!(p.payload.as_ref(), b"two");
    assert!(p.retain);
    sub.expect_no_publish(QUIET).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_retained_payload_deletes_and_is_still_forwarded() {
    let hub = TestHub::start().await.unwrap();
    let mut publ = V4::connect(v4_opts(&hub, &uid("pub"))).await;
    publ.publish("ret/del", QoS::AtLeastOnce, true, b"soon gone")
        .await;

    let mut live = V4::connect(v4_opts(&hub, &uid("live"))).await;
    live.subscribe("ret/del", QoS::AtLeastOnce).await;
    assert_eq!(live.recv_publish().await.payload.as_ref(), b"soon gone");

    publ.publish("ret/del", QoS::AtLeastOnce, true, b"").await;
    // Existing subscribers still get the (empty) publication.
    let p = live.recv_publish().await;
    assert!(p.payload.is_empty());

    let mut sub = V4::connect(v4_opts(&hub, &uid("sub"))).await;
    sub.subscribe("ret/del", QoS::AtLeastOnce).await;
    sub.subscribe("ret/#", QoS::AtLeastOnce).await;
    sub.expect_no_publish(QUIET).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_subscription_gets_every_matching_retained_message() {
    let hub = TestHub::start().await.unwrap();
    let mut publ = V4::connect(v4_opts(&hub, &uid("pub"))).await;
    for t in ["wr/a/1", "wr/a/2", "wr/a/b/c", "wr/b/1", "wr/a"] {
        publ.publish(t, QoS::AtLeastOnce, true, t.as_bytes()).await;
    }
    let mut sub = V4::connect(v4_opts(&hub, &uid("sub"))).await;
    sub.subscribe("wr/a/#", QoS::AtLeastOnce).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        let p = sub.recv_publish().await;
        assert!(p.retain);
        assert_eq!(p.payload.as_ref(), p.topic.as_bytes());
        got.push(p.topic);
    }
    got.sort();
    assert_eq!(got, vec!["wr/a", "wr/a/1", "wr/a/2", "wr/a/b/c"]);
    sub.expect_no_publish(QUIET).await;

    let mut sub2 = V4::connect(v4_opts(&hub, &uid("sub2"))).await;
    sub2.subscribe("wr/+/1", QoS::AtMostOnce).await;
    let mut got = vec![
        sub2.recv_publish().await.topic,
        sub2.recv_publish().await.topic,
    ];
    got.sort();
    assert_eq!(got, vec!["wr/a/1", "wr/b/1"]);
    sub2.expect_no_publish(QUIET).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_qos_is_min_of_publish_and_subscription() {
    let hub = TestHub::start().await.unwrap();
    let mut publ = V4::connect(v4_opts(&hub, &uid("pub"))).await;
    publ.publish("rq/one", QoS::AtLeastOnce, true, b"1").await;
    let mut sub = V4::connect(v4_opts(&hub, &uid("sub"))).await;
    sub.subscribe("rq/one", QoS::ExactlyOnce).await;
    assert_eq!(sub.recv_publish().await.qos, QoS::AtLeastOnce);
    hub.stop().await;
}

fn filter(path: &str, rh: m5::RetainForwardRule, rap: bool) -> m5::Filter {
    let mut f = m5::Filter::new(path, m5::QoS::AtLeastOnce);
    f.retain_forward_rule = rh;
    f.preserve_retain = rap;
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_retain_handling_0_1_2() {
    let hub = TestHub::start().await.unwrap();
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("rh/t", m5::QoS::AtLeastOnce, true, b"r").await;

    // 0: on every subscribe, including a repeated one.
    let mut s0 = V5::connect(v5_opts(&hub, &uid("rh0"))).await;
    s0.subscribe_filter(
        filter("rh/t", m5::RetainForwardRule::OnEverySubscribe, false),
        None,
    )
    .await;
    assert!(s0.recv_publish().await.retain);
    s0.subscribe_filter(
        filter("rh/t", m5::RetainForwardRule::OnEverySubscribe, false),
        None,
    )
    .await;
    assert!(
        s0.recv_publish().await.retain,
        "Retain Handling 0 resends on re-subscribe"
    );

    // 1: only when the subscription is new.
    let mut s1 = V5::connect(v5_opts(&hub, &uid("rh1"))).await;
    s1.subscribe_filter(
        filter("rh/t", m5::RetainForwardRule::OnNewSubscribe, false),
        None,
    )
    .await;
    assert!(s1.recv_publish().await.retain);
    s1.subscribe_filter(
        filter("rh/t", m5::RetainForwardRule::OnNewSubscribe, false),
        None,
    )
    .await;
    s1.expect_no_publish(QUIET).await;

    // 2: never.
    let mut s2 = V5::connect(v5_opts(&hub, &uid("rh2"))).await;
    s2.subscribe_filter(filter("rh/t", m5::RetainForwardRule::Never, false), None)
        .await;
    s2.expect_no_publish(QUIET).await;
    // ... but live messages still flow.
    publ.publish("rh/t", m5::QoS::AtLeastOnce, false, b"live")
        .await;
    assert_eq!(s2.recv_publish().await.payload.as_ref(), b"live");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_retain_as_published() {
    let hub = TestHub::start().await.unwrap();
    let mut keep = V5::connect(v5_opts(&hub, &uid("rap1"))).await;
    keep.subscribe_filter(filter("rap/t", m5::RetainForwardRule::Never, true), None)
        .await;
    let mut clear = V5::connect(v5_opts(&hub, &uid("rap0"))).await;
    clear
        .subscribe_filter(filter("rap/t", m5::RetainForwardRule::Never, false), None)
        .await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("rap/t", m5::QoS::AtLeastOnce, true, b"r")
        .await;
    assert!(
        keep.recv_publish().await.retain,
        "RAP=1 keeps the publisher's RETAIN=1"
    );
    assert!(!clear.recv_publish().await.retain, "RAP=0 clears RETAIN");
    publ.publish("rap/t", m5::QoS::AtLeastOnce, false, b"n")
        .await;
    assert!(!keep.recv_publish().await.retain);
    assert!(!clear.recv_publish().await.retain);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_retained_message_is_not_sent() {
    let hub = TestHub::start().await.unwrap();
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    let props = m5::PublishProperties {
        message_expiry_interval: Some(1),
        ..Default::default()
    };
    publ.publish_props("rexp/t", m5::QoS::AtLeastOnce, true, b"short", Some(props))
        .await;
    let props = m5::PublishProperties {
        message_expiry_interval: Some(60),
        ..Default::default()
    };
    publ.publish_props(
        "rexp/long",
        m5::QoS::AtLeastOnce,
        true,
        b"long",
        Some(props),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    let mut sub = V5::connect(v5_opts(&hub, &uid("sub"))).await;
    sub.subscribe("rexp/#", m5::QoS::AtLeastOnce).await;
    let p = sub.recv_publish().await;
    assert_eq!(p.payload.as_ref(), b"long");
    let left = p.properties.unwrap_or_default().message_expiry_interval;
    assert!(
        matches!(left, Some(55..=59)),
        "remaining expiry forwarded, got {left:?}"
    );
    sub.expect_no_publish(QUIET).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_retain_handling_1_counts_a_resubscribe_after_unsubscribe_as_new() {
    let hub = TestHub::start().await.unwrap();
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("rh1/t", m5::QoS::AtLeastOnce, true, b"r")
        .await;
    let mut s = V5::connect(v5_opts(&hub, &uid("s"))).await;
    s.subscribe_filter(
        filter("rh1/t", m5::RetainForwardRule::OnNewSubscribe, false),
        None,
    )
    .await;
    assert!(s.recv_publish().await.retain);
    s.client.unsubscribe("rh1/t").await.unwrap();
    s.wait_for("UNSUBACK", |p| matches!(p, m5::Packet::UnsubAck(_)))
        .await;
    s.subscribe_filter(
        filter("rh1/t", m5::RetainForwardRule::OnNewSubscribe, false),
        None,
    )
    .await;
    assert!(
        s.recv_publish().await.retain,
        "a subscription made again is new"
    );
    hub.stop().await;
}
