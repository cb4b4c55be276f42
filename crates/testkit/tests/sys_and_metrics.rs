//! `$SYS` statistics and the HTTP endpoints: `$SYS/#` receives broker stats, `#` and `+/...`
//! never match `$SYS` topics, /healthz and /readyz answer 200, /metrics exposes the broker's
//! gauges and counters and they move with traffic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use ferrohub_testkit::TestHub;
use rumqttc::QoS;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_topics_publish_broker_stats() {
    let hub = TestHub::start().await.unwrap();
    let mut sub = V4::connect(v4_opts(&hub, &uid("sys"))).await;
    sub.subscribe("$SYS/#", QoS::AtMostOnce).await;
    let mut stats = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    // The first tick may predate this subscriber (its retained value then says 0 clients):
    // wait for a tick that counts it.
    let counts_me = |stats: &HashMap<String, String>| {
        stats
            .get("$SYS/broker/clients/connected")
            .and_then(|v| v.trim().parse::<i64>().ok())
            .is_some_and(|n| n >= 1)
    };
    while !(stats.contains_key("$SYS/broker/uptime")
        && stats.contains_key("$SYS/broker/messages/received")
        && counts_me(&stats))
    {
        assert!(tokio::time::Instant::now() < deadline, "only got {stats:?}");
        if let Some(rumqttc::Packet::Publish(p)) = sub.next(Duration::from_millis(200)).await {
            assert!(p.topic.starts_with("$SYS/"), "{}", p.topic);
            stats.insert(
                p.topic.clone(),
                String::from_utf8(p.payload.to_vec()).unwrap(),
            );
        }
    }

    // Values follow the traffic: connect two more clients and watch the count go up.
    let _a = V4::connect(v4_opts(&hub, &uid("a"))).await;
    let _b = V5::connect(v5_opts(&hub, &uid("b"))).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "clients/connected never reached 3"
        );
        if let Some(rumqttc::Packet::Publish(p)) = sub.next(Duration::from_millis(200)).await
            && p.topic == "$SYS/broker/clients/connected"
            && p.payload.as_ref() == b"3"
        {
            break;
        }
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_topics_are_retained_for_late_subscribers() {
    let hub = TestHub::start().await.unwrap();
    // Wait for a first tick.
    wait_metric(&hub, "ferrohub_mqtt_retained_messages", |v| v >= 1.0).await;
    let mut sub = V5::connect(v5_opts(&hub, &uid("late"))).await;
    sub.subscribe("$SYS/broker/version", m5::QoS::AtMostOnce)
        .await;
    let p = sub.recv_publish().await;
    assert!(p.retain);
    assert!(
        String::from_utf8(p.payload.to_vec())
            .unwrap()
            .contains("ferrohub")
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_at_the_root_do_not_match_sys() {
    let hub = TestHub::start().await.unwrap();
    let mut all = V4::connect(v4_opts(&hub, &uid("all"))).await;
    all.subscribe("#", QoS::AtMostOnce).await;
    let mut plus = V5::connect(v5_opts(&hub, &uid("plus"))).await;
    plus.subscribe("+/broker/#", m5::QoS::AtMostOnce).await;
    let mut sys = V4::connect(v4_opts(&hub, &uid("sys"))).await;
    sys.subscribe("$SYS/#", QoS::AtMostOnce).await;
    // Let at least two $SYS ticks happen, and some ordinary traffic.
    sys.recv_publish().await;
    let mut publ = V4::connect(v4_opts(&hub, &uid("pub"))).await;
    publ.publish("normal/topic", QoS::AtLeastOnce, false, b"x")
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(2200);
    let mut normal = 0;
    while tokio::time::Instant::now() < deadline {
        if let Some(rumqttc::Packet::Publish(p)) = all.next(Duration::from_millis(100)).await {
            assert!(!p.topic.starts_with('$'), "`#` matched {}", p.topic);
            normal += 1;
        }
        if let Some(m5::Packet::Publish(p)) = plus.next(Duration::from_millis(10)).await {
            panic!("`+/broker/#` matched {}", topic5(&p));
        }
    }
    assert!(normal >= 1, "`#` must still get ordinary messages");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness() {
    let hub = TestHub::start().await.unwrap();
    assert_eq!(http_get(&hub, "/healthz").await.0, 200);
    assert_eq!(http_get(&hub, "/readyz").await.0, 200);
    // Other paths serve the web console's shell (its routes live in the page); unknown API paths
    // are still 404.
    assert_eq!(http_get(&hub, "/no-such-page").await.0, 200);
    assert_eq!(http_get(&hub, "/api/v1/no-such-route").await.0, 404);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_traffic() {
    let hub = TestHub::start_with(|cfg| cfg.mqtt.sys_interval_secs = 0)
        .await
        .unwrap();
    let text = metrics(&hub).await;
    for name in [
        "ferrohub_mqtt_connections",
        "ferrohub_mqtt_connections_total",
        "ferrohub_mqtt_sessions",
        "ferrohub_mqtt_subscriptions",
        "ferrohub_mqtt_retained_messages",
        "ferrohub_mqtt_messages_received_total{qos=\"0\"}",
        "ferrohub_mqtt_messages_received_total{qos=\"1\"}",
        "ferrohub_mqtt_messages_received_total{qos=\"2\"}",
        "ferrohub_mqtt_messages_sent_total{qos=\"1\"}",
        "ferrohub_mqtt_bytes_received_total",
        "ferrohub_mqtt_bytes_sent_total",
        "ferrohub_twin_store_commits_total",
        "ferrohub_twin_store_jobs_total",
        "ferrohub_commands_direct_total{outcome=\"timeout\"}",
        "ferrohub_commands_direct_waiting",
        "ferrohub_commands_queued_sends_total",
        "ferrohub_device_requests_dropped_total",
    ] {
        assert!(metric(&text, name).is_some(), "missing {name} in\n{text}");
    }
    assert!(text.contains("# TYPE ferrohub_mqtt_connections gauge"));
    assert_eq!(metric(&text, "ferrohub_mqtt_connections"), Some(0.0));
    let received1 = metric(&text, "ferrohub_mqtt_messages_received_total{qos=\"1\"}").unwrap();
    let sent1 = metric(&text, "ferrohub_mqtt_messages_sent_total{qos=\"1\"}").unwrap();
    let bytes_in = metric(&text, "ferrohub_mqtt_bytes_received_total").unwrap();

    let mut sub = V5::connect(v5_opts(&hub, &uid("sub"))).await;
    sub.subscribe("met/t", m5::QoS::AtLeastOnce).await;
    let mut publ = V4::connect(v4_opts(&hub, &uid("pub"))).await;
    publ.publish("met/t", QoS::AtLeastOnce, false, b"count me")
        .await;
    publ.publish("met/r", QoS::AtLeastOnce, true, b"retained")
        .await;
    sub.recv_publish().await;

    let text = metrics(&hub).await;
    assert_eq!(metric(&text, "ferrohub_mqtt_connections"), Some(2.0));
    assert_eq!(
        metric(&text, "ferrohub_mqtt_messages_received_total{qos=\"1\"}"),
        Some(received1 + 2.0)
    );
    assert!(metric(&text, "ferrohub_mqtt_messages_sent_total{qos=\"1\"}").unwrap() >= sent1 + 1.0);
    assert!(metric(&text, "ferrohub_mqtt_bytes_received_total").unwrap() > bytes_in);
    assert_eq!(metric(&text, "ferrohub_mqtt_subscriptions"), Some(1.0));
    assert_eq!(metric(&text, "ferrohub_mqtt_retained_messages"), Some(1.0));
    assert!(metric(&text, "ferrohub_mqtt_connections_total").unwrap() >= 2.0);

    sub.disconnect().await;
    publ.disconnect().await;
    wait_metric(&hub, "ferrohub_mqtt_connections", |v| v == 0.0).await;
    wait_metric(&hub, "ferrohub_mqtt_subscriptions", |v| v == 0.0).await;
    wait_metric(&hub, "ferrohub_mqtt_sessions", |v| v == 0.0).await;
    let text = metrics(&hub).await;
    assert_eq!(metric(&text, "ferrohub_mqtt_queued_messages"), Some(0.0));
    assert_eq!(metric(&text, "ferrohub_mqtt_inflight_messages"), Some(0.0));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gauges_return_to_zero_after_mixed_traffic() {
    let hub = TestHub::start_with(|cfg| cfg.mqtt.sys_interval_secs = 0)
        .await
        .unwrap();
    // A slow subscriber with messages queued and in flight, then it leaves.
    let (raw, _) = raw_connect(
        hub.mqtt,
        ferrohub_proto::mqtt::ProtocolVersion::V5,
        &uid("slow"),
        |c| c.properties.receive_maximum = Some(1),
    )
    .await;
    let mut raw = raw;
    raw_subscribe(&mut raw, 1, "gz/t", ferrohub_types::QoS::AtLeastOnce).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    for i in 0..5 {
        publ.publish(
            "gz/t",
            m5::QoS::AtLeastOnce,
            false,
            format!("{i}").as_bytes(),
        )
        .await;
    }
    // The slow subscriber's connection moves one message in flight, the rest stay queued.
    wait_metric(&hub, "ferrohub_mqtt_inflight_messages", |v| v == 1.0).await;
    let text = metrics(&hub).await;
    assert_eq!(metric(&text, "ferrohub_mqtt_queued_messages"), Some(4.0));
    drop(raw);
    publ.disconnect().await;
    wait_metric(&hub, "ferrohub_mqtt_connections", |v| v == 0.0).await;
    wait_metric(&hub, "ferrohub_mqtt_sessions", |v| v == 0.0).await;
    let text = metrics(&hub).await;
    assert_eq!(metric(&text, "ferrohub_mqtt_queued_messages"), Some(0.0));
    assert_eq!(metric(&text, "ferrohub_mqtt_inflight_messages"), Some(0.0));
    assert_eq!(
        metric(
            &text,
            "ferrohub_mqtt_messages_dropped_total{reason=\"session_ended\"}"
        ),
        Some(5.0)
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_sys_messages_are_not_sent_to_root_wildcards() {
    let hub = TestHub::start().await.unwrap();
    // The $SYS statistics are retained: wait until they exist.
    wait_metric(&hub, "ferrohub_mqtt_retained_messages", |v| v >= 5.0).await;
    let mut publ = V4::connect(v4_opts(&hub, &uid("pub"))).await;
    publ.publish("visible/retained", QoS::AtLeastOnce, true, b"r")
        .await;
    for filter in ["#", "+/broker/#", "+/+/+"] {
        let mut sub = V5::connect(v5_opts(&hub, &uid("root"))).await;
        let f = m5::Filter {
            retain_forward_rule: m5::RetainForwardRule::OnEverySubscribe,
            ..m5::Filter::new(filter, m5::QoS::AtMostOnce)
        };
        sub.subscribe_filter(f, None).await;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(600);
        while tokio::time::Instant::now() < deadline {
            if let Some(m5::Packet::Publish(p)) = sub.next(Duration::from_millis(50)).await {
                let t = topic5(&p);
                assert!(!t.starts_with('$'), "{filter:?} got retained {t}");
            }
        }
    }
    hub.stop().await;
}
