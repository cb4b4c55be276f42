//! Telemetry end to end: devices publish over MQTT 5 and 3.1.1 (rumqttc) in JSON, CBOR and
//! MessagePack; the points are read back from the hub's time-series engine. Covers the publisher's
//! acknowledgement (after the engine's commit; MQTT 5 0x99 for an unusable payload), device
//! timestamps (kept within the skew window, replaced outside it), out-of-order and duplicate
//! points, topic-derived metric names and per-tenant topic overrides.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use ferrohub_testkit::TestHub;
use ferrohub_tsdb::{AggFn, AggregateQuery, SeriesGroup};
use ferrohub_types::TenantId;
use ferrohub_types::telemetry::Value;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5 as m5;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn cbor(v: &serde_json::Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).unwrap();
    out
}

#[tokio::test]
async fn every_payload_format_round_trips_over_mqtt5_and_311() {
    let hub = TestHub::start().await.unwrap();
    let t0 = now_ms() - 60_000;
    let mut v5 = V5::connect(v5_opts(&hub, "dev-a")).await;
    // JSON with a device timestamp, acknowledged only once stored.
    let json = format!(
        r#"{{"ts": {t0}, "temp": 21.5, "ok": true, "state": "idle", "env": {{"hum": 40}}}}"#
    );
    assert_eq!(
        v5.publish(
            "devices/dev-a/telemetry",
            Q5::AtLeastOnce,
            false,
            json.as_bytes()
        )
        .await,
        Some(m5::PubAckReason::Success)
    );
    assert_eq!(
        stored_points(&hub, "dev-a", "temp"),
        vec![(t0, Value::Float(21.5))]
    );
    assert_eq!(
        stored_points(&hub, "dev-a", "ok"),
        vec![(t0, Value::Bool(true))]
    );
    assert_eq!(
        stored_points(&hub, "dev-a", "state"),
        vec![(t0, Value::Str("idle".into()))]
    );
    assert_eq!(
        stored_points(&hub, "dev-a", "env.hum"),
        vec![(t0, Value::Int(40))]
    );
    // CBOR named by the MQTT 5 content type; a topic suffix prefixes the metric names.
    let body =
        cbor(&serde_json::json!([{"ts": t0 + 1000, "rpm": 1500}, {"ts": t0 + 2000, "rpm": 1510}]));
    let props = m5::PublishProperties {
        content_type: Some("application/cbor".into()),
        ..Default::default()
    };
    assert_eq!(
        v5.publish_props(
            "devices/dev-a/telemetry/motor",
            Q5::AtLeastOnce,
            false,
            &body,
            Some(props)
        )
        .await,
        Some(m5::PubAckReason::Success)
    );
    assert_eq!(
        stored_points(&hub, "dev-a", "motor.rpm"),
        vec![(t0 + 1000, Value::Int(1500)), (t0 + 2000, Value::Int(1510))]
    );
    // MessagePack detected without a content type; a bare scalar named by the topic.
    let body =
        rmp_serde::to_vec_named(&serde_json::json!({"ts": t0 + 3000, "power": 3.25})).unwrap();
    v5.publish("devices/dev-a/telemetry", Q5::AtLeastOnce, false, &body)
        .await;
    assert_eq!(
        stored_points(&hub, "dev-a", "power"),
        vec![(t0 + 3000, Value::Float(3.25))]
    );
    v5.publish(
        "devices/dev-a/telemetry/voltage",
        Q5::AtLeastOnce,
        false,
        b"229.5",
    )
    .await;
    let v = stored_points(&hub, "dev-a", "voltage");
    assert_eq!(v.len(), 1);
    assert!(
        (v[0].0 - now_ms()).abs() < 10_000,
        "server time for a payload without one"
    );
    // MQTT 3.1.1, QoS 2 and QoS 0 (QoS 0 is stored too, just not acknowledged).
    let mut v4 = V4::connect(v4_opts(&hub, "dev-b")).await;
    v4.publish(
        "devices/dev-b/telemetry",
        rumqttc::QoS::ExactlyOnce,
        false,
        format!(r#"{{"ts":{t0},"x":1}}"#).as_bytes(),
    )
    .await;
    v4.publish(
        "devices/dev-b/telemetry",
        rumqttc::QoS::AtMostOnce,
        false,
        format!(r#"{{"ts":{},"x":2}}"#, t0 + 1).as_bytes(),
    )
    .await;
    v4.publish(
        "devices/dev-b/telemetry",
        rumqttc::QoS::AtLeastOnce,
        false,
        format!(r#"{{"ts":{},"x":3}}"#, t0 + 2).as_bytes(),
    )
    .await;
    wait_until(Duration::from_secs(5), "QoS 0 point stored", || {
        stored_points(&hub, "dev-b", "x").len() == 3
    })
    .await;
    assert_eq!(
        stored_points(&hub, "dev-b", "x"),
        vec![
            (t0, Value::Int(1)),
            (t0 + 1, Value::Int(2)),
            (t0 + 2, Value::Int(3))
        ]
    );
    // Ordinary subscribers still get telemetry messages.
    hub.stop().await;
}

#[tokio::test]
async fn bad_payloads_are_refused_with_0x99_and_never_stored() {
    let hub = TestHub::start().await.unwrap();
    let mut v5 = V5::connect(v5_opts(&hub, "dev-c")).await;
    for bad in [
        &b"{not json"[..],
        b"",
        b"[1, 2]",
        br#"{"ts": "yesterday", "t": 1}"#,
    ] {
        assert_eq!(
            v5.publish("devices/dev-c/telemetry", Q5::AtLeastOnce, false, bad)
                .await,
            Some(m5::PubAckReason::PayloadFormatInvalid),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    // The connection stays usable and a good payload is stored.
    assert_eq!(
        v5.publish(
            "devices/dev-c/telemetry",
            Q5::AtLeastOnce,
            false,
            br#"{"t": 1}"#
        )
        .await,
        Some(m5::PubAckReason::Success)
    );
    assert_eq!(stored_points(&hub, "dev-c", "t").len(), 1);
    // A topic level that is not a device id (anonymous clients may publish anywhere): refused.
    assert_eq!(
        v5.publish(
            "devices/dev c/telemetry",
            Q5::AtLeastOnce,
            false,
            br#"{"t": 1}"#
        )
        .await,
        Some(m5::PubAckReason::PayloadFormatInvalid)
    );
    assert!(stored_points(&hub, "dev c", "t").is_empty());
    // 3.1.1 has no negative acknowledgement: acknowledged (the message was routed) but not stored,
    // and counted.
    let mut v4 = V4::connect(v4_opts(&hub, "dev-d")).await;
    v4.publish(
        "devices/dev-d/telemetry",
        rumqttc::QoS::AtLeastOnce,
        false,
        b"garbage",
    )
    .await;
    assert!(stored_points(&hub, "dev-d", "garbage").is_empty());
    let t = hub.hub().telemetry.as_ref().unwrap();
    assert_eq!(
        t.metrics.invalid.load(std::sync::atomic::Ordering::Relaxed),
        6
    );
    hub.stop().await;
}

#[tokio::test]
async fn timestamps_out_of_order_duplicates_and_skew() {
    let hub = TestHub::start().await.unwrap();
    let mut v5 = V5::connect(v5_opts(&hub, "dev-e")).await;
    let now = now_ms();
    let day = 86_400_000;
    let publish = |ts: i64, v: i64| format!(r#"{{"ts": {ts}, "v": {v}}}"#);
    // Backfilled (a week old), out of order, and a duplicate timestamp whose later write wins.
    for (ts, v) in [
        (now - 1000, 1),
        (now - 7 * day, 2),
        (now - 2000, 3),
        (now - 1000, 4),
    ] {
        v5.publish(
            "devices/dev-e/telemetry",
            Q5::AtLeastOnce,
            false,
            publish(ts, v).as_bytes(),
        )
        .await;
    }
    assert_eq!(
        stored_points(&hub, "dev-e", "v"),
        vec![
            (now - 7 * day, Value::Int(2)),
            (now - 2000, Value::Int(3)),
            (now - 1000, Value::Int(4))
        ]
    );
    // Beyond the windows (future skew 5 min, backfill 30 days): the receive time replaces them.
    for ts in [now + 3_600_000, now - 60 * day] {
        v5.publish(
            "devices/dev-e/telemetry",
            Q5::AtLeastOnce,
            false,
            format!(r#"{{"ts": {ts}, "w": 1}}"#).as_bytes(),
        )
        .await;
    }
    let w = stored_points(&hub, "dev-e", "w");
    assert!(
        w.len() <= 2 && w.iter().all(|(t, _)| (t - now_ms()).abs() < 10_000),
        "{w:?}"
    );
    let t = hub.hub().telemetry.as_ref().unwrap();
    assert_eq!(
        t.metrics
            .timestamps_replaced
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    // Sealed into parts and compacted, the answers are the same; aggregates match.
    t.engine().flush().await.unwrap();
    t.engine().compact(true).unwrap();
    assert_eq!(stored_points(&hub, "dev-e", "v").len(), 3);
    let agg = t
        .engine()
        .aggregate(
            &TenantId::default_tenant(),
            &AggregateQuery {
                metric: "v".into(),
                groups: vec![SeriesGroup {
                    name: "all".into(),
                    devices: vec!["dev-e".into()],
                }],
                from: now - 8 * day,
                to: now + 1,
                bucket_ms: day,
                fns: vec![AggFn::Sum, AggFn::Count],
            },
        )
        .unwrap();
    let (sum, count): (f64, u64) = agg[0]
        .buckets
        .iter()
        .fold((0.0, 0), |(s, c), (_, a)| (s + a.sum, c + a.count));
    assert_eq!((sum, count), (9.0, 3));
    hub.stop().await;
}

#[tokio::test]
async fn telemetry_survives_a_graceful_restart_and_tenants_can_change_topics() {
    let hub = TestHub::start().await.unwrap();
    let mut v5 = V5::connect(v5_opts(&hub, "dev-f")).await;
    v5.publish(
        "devices/dev-f/telemetry",
        Q5::AtLeastOnce,
        false,
        br#"{"a": 1}"#,
    )
    .await;
    // A custom topic layout for the default tenant: the device is the `+` level.
    let t = hub.hub().telemetry.as_ref().unwrap().clone();
    t.set_settings(
        &TenantId::default_tenant(),
        ferrohub_telemetry::service::TenantSettings {
            topics: Some(vec!["plant/+/sensors/#".into()]),
            format: None,
        },
    )
    .unwrap();
    v5.publish(
        "plant/press-7/sensors/hydraulics",
        Q5::AtLeastOnce,
        false,
        br#"{"bar": 180}"#,
    )
    .await;
    assert_eq!(stored_points(&hub, "press-7", "hydraulics.bar").len(), 1);
    // The default topic is no longer telemetry for this tenant.
    v5.publish(
        "devices/dev-f/telemetry",
        Q5::AtLeastOnce,
        false,
        br#"{"a": 2}"#,
    )
    .await;
    assert_eq!(stored_points(&hub, "dev-f", "a").len(), 1);
    assert!(
        t.set_settings(
            &TenantId::default_tenant(),
            ferrohub_telemetry::service::TenantSettings {
                topics: Some(vec!["$devices/#".into()]),
                format: None,
            }
        )
        .is_err()
    );
    drop(v5);
    drop(t);
    let dir = hub.stop().await.unwrap();
    let mut cfg = ferrohub_testkit::test_config(dir.path().to_path_buf());
    cfg.data_dir = dir.path().to_path_buf();
    let hub = TestHub::start_config(cfg).await.unwrap();
    assert_eq!(stored_points(&hub, "dev-f", "a").len(), 1);
    assert_eq!(stored_points(&hub, "press-7", "hydraulics.bar").len(), 1);
    hub.stop().await;
}
