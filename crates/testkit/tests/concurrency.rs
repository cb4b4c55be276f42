//! Concurrency and churn: racing connections with one client identifier, QoS 1 without loss
//! while a persistent subscriber keeps dropping its connection, shared-subscription members
//! coming and going, fan-out to many subscribers, subscription upgrades.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferrohub_proto::mqtt::{Packet, ProtocolVersion};
use ferrohub_testkit::TestHub;
use ferrohub_types::QoS as FQoS;
use tokio::sync::Mutex;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_connections_with_one_client_id_leave_exactly_one() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("racer");
    let mut tasks = Vec::new();
    for i in 0..12 {
        let addr = hub.mqtt;
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let version = if i % 2 == 0 {
                ProtocolVersion::V5
            } else {
                ProtocolVersion::V311
            };
            let (raw, ack) = raw_connect(addr, version, &id, |c| {
                c.clean_start = i % 3 == 0;
                c.properties.session_expiry_interval = Some(60);
            })
            .await;
            assert_eq!(ack.code, 0);
            raw
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    // All but one get closed.
    wait_metric(&hub, "ferrohub_mqtt_connections", |v| v == 1.0).await;
    assert_eq!(
        metric(&metrics(&hub).await, "ferrohub_mqtt_sessions"),
        Some(1.0)
    );
    let mut alive = Vec::new();
    for mut c in clients {
        if c.send(&Packet::PingReq).await.is_ok()
            && let Ok(Some(Packet::PingResp)) = c.recv_or_close(Duration::from_millis(500)).await
        {
            alive.push(c);
        }
    }
    assert_eq!(alive.len(), 1, "exactly one connection survives");
    // And it owns a working session.
    let mut survivor = alive.pop().unwrap();
    raw_subscribe(&mut survivor, 1, "race/t", FQoS::AtLeastOnce).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("race/t", m5::QoS::AtLeastOnce, false, b"winner")
        .await;
    assert_eq!(
        raw_recv_publish(&mut survivor).await.payload.as_ref(),
        b"winner"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_qos1_loss_while_a_persistent_subscriber_keeps_dropping() {
    let hub = TestHub::start().await.unwrap();
    let id = uid("churn");
    let connect = |clean: bool| {
        move |c: &mut ferrohub_proto::mqtt::Connect| {
            c.clean_start = clean;
            c.properties.session_expiry_interval = Some(60);
            c.properties.receive_maximum = Some(5);
        }
    };
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, connect(true)).await;
    raw_subscribe(&mut raw, 1, "churn/t", FQoS::AtLeastOnce).await;
    drop(raw);

    const N: usize = 300;
    let addr = hub.mqtt;
    let publisher = tokio::spawn(async move {
        let mut o = rumqttc::v5::MqttOptions::new("churn-pub", addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        let mut publ = V5::connect(o).await;
        for i in 0..N {
            let ack = publ
                .publish(
                    "churn/t",
                    m5::QoS::AtLeastOnce,
                    false,
                    format!("{i}").as_bytes(),
                )
                .await;
            assert_eq!(ack, Some(m5::PubAckReason::Success), "message {i}");
            if i % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });

    let mut seen = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(9);
    let mut round = 0usize;
    while seen.len() < N {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {N} messages arrived; missing e.g. {:?}",
            seen.len(),
            (0..N).find(|i| !seen.contains(i))
        );
        round += 1;
        let (mut raw, ack) = raw_connect(hub.mqtt, ProtocolVersion::V5, &id, connect(false)).await;
        assert!(ack.session_present, "round {round}: session lost");
        // Take a few messages, acknowledge all but the last, then drop the connection.
        let take = 3 + round % 7;
        for k in 0..take {
            match raw.recv_or_close(Duration::from_millis(300)).await {
                Ok(Some(Packet::Publish(p))) => {
                    seen.insert(
                        std::str::from_utf8(&p.payload)
                            .unwrap()
                            .parse::<usize>()
                            .unwrap(),
                    );
                    if k + 1 < take {
                        raw.send(&puback(p.packet_id)).await.unwrap();
                    }
                }
                Ok(Some(other)) => panic!("unexpected {other:?}"),
                Ok(None) => panic!("closed by the server"),
                Err(_) => break,
            }
        }
        drop(raw);
    }
    publisher.await.unwrap();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_members_coming_and_going_lose_nothing() {
    let hub = TestHub::start().await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    // One stable member.
    let mut stable = V5::connect(v5_opts(&hub, &uid("stable"))).await;
    stable
        .subscribe("$share/churn/sc/t", m5::QoS::AtLeastOnce)
        .await;
    let stable_seen = seen.clone();
    let stable_task = tokio::spawn(async move {
        while let Some(p) = stable.next(Duration::from_secs(3)).await {
            if let m5::Packet::Publish(p) = p {
                stable_seen
                    .lock()
                    .await
                    .push(String::from_utf8(p.payload.to_vec()).unwrap());
            }
        }
    });
    // Members that join, take a few messages (acknowledging only some) and vanish.
    let addr = hub.mqtt;
    let churn_seen = seen.clone();
    let churner = tokio::spawn(async move {
        for round in 0..15 {
            let (mut raw, _) = raw_connect(
                addr,
                ProtocolVersion::V5,
                &format!("churner-{round}"),
                |c| {
                    c.properties.receive_maximum = Some(3);
                },
            )
            .await;
            raw_subscribe(&mut raw, 1, "$share/churn/sc/t", FQoS::AtLeastOnce).await;
            for k in 0..4 {
                match raw.recv_or_close(Duration::from_millis(100)).await {
                    Ok(Some(Packet::Publish(p))) => {
                        if k % 2 == 0 {
                            churn_seen
                                .lock()
                                .await
                                .push(String::from_utf8(p.payload.to_vec()).unwrap());
                            raw.send(&puback(p.packet_id)).await.unwrap();
                        }
                    }
                    Ok(Some(_)) | Ok(None) => break,
                    Err(_) => {}
                }
            }
            drop(raw);
        }
    });
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    const N: usize = 200;
    for i in 0..N {
        publ.publish(
            "sc/t",
            m5::QoS::AtLeastOnce,
            false,
            format!("m{i}").as_bytes(),
        )
        .await;
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    churner.await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got: BTreeSet<String> = seen.lock().await.iter().cloned().collect();
        if got.len() == N {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let missing: Vec<_> = (0..N)
                .map(|i| format!("m{i}"))
                .filter(|m| !got.contains(m))
                .collect();
            panic!("{} messages lost: {missing:?}", missing.len());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stable_task.abort();
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_to_many_subscribers_in_order() {
    let hub = TestHub::start().await.unwrap();
    let mut subs = Vec::new();
    for i in 0..20 {
        let mut s = V4::connect(v4_opts(&hub, &uid(&format!("fan{i}")))).await;
        s.subscribe("fan/#", rumqttc::QoS::AtLeastOnce).await;
        subs.push(s);
    }
    let mut o = v4_opts(&hub, &uid("pub"));
    o.set_inflight(50);
    let publ = V4::connect(o).await;
    const N: usize = 100;
    for i in 0..N {
        publ.client
            .publish(
                "fan/t",
                rumqttc::QoS::AtLeastOnce,
                false,
                format!("{i}").into_bytes(),
            )
            .await
            .unwrap();
    }
    for s in &mut subs {
        for i in 0..N {
            let p = s.recv_publish().await;
            assert_eq!(p.payload.as_ref(), format!("{i}").as_bytes());
        }
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribing_replaces_the_subscription_qos() {
    let hub = TestHub::start().await.unwrap();
    let mut sub = V5::connect(v5_opts(&hub, &uid("sub"))).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    sub.subscribe("resub/t", m5::QoS::AtMostOnce).await;
    publ.publish("resub/t", m5::QoS::ExactlyOnce, false, b"a")
        .await;
    assert_eq!(sub.recv_publish().await.qos, m5::QoS::AtMostOnce);
    sub.subscribe("resub/t", m5::QoS::ExactlyOnce).await;
    publ.publish("resub/t", m5::QoS::ExactlyOnce, false, b"b")
        .await;
    let p = sub.recv_publish().await;
    assert_eq!(
        p.qos,
        m5::QoS::ExactlyOnce,
        "the new subscription replaced the old one"
    );
    sub.expect_no_publish(QUIET).await;
    sub.subscribe("resub/t", m5::QoS::AtLeastOnce).await;
    publ.publish("resub/t", m5::QoS::ExactlyOnce, false, b"c")
        .await;
    assert_eq!(
        sub.recv_publish().await.qos,
        m5::QoS::AtLeastOnce,
        "and can downgrade too"
    );
    sub.expect_no_publish(QUIET).await;
    let text = metrics(&hub).await;
    assert_eq!(metric(&text, "ferrohub_mqtt_subscriptions"), Some(1.0));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_pipelined_behind_connect_are_processed() {
    let hub = TestHub::start().await.unwrap();
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let mut bytes = bytes::BytesMut::new();
        let mut c = connect_packet(version, &uid("eager"));
        c.properties.session_expiry_interval = Some(60);
        c.clean_start = false;
        for p in [
            Packet::Connect(Box::new(c)),
            subscribe_packet(1, "eager/t", FQoS::AtLeastOnce),
            publish_packet("eager/t", FQoS::AtLeastOnce, 2, b"to myself"),
            Packet::PingReq,
        ] {
            ferrohub_proto::mqtt::encode(&p, version, &mut bytes).unwrap();
        }
        let mut raw = ferrohub_testkit::RawClient::connect(hub.mqtt, version)
            .await
            .unwrap();
        raw.send_bytes(&bytes).await.unwrap();
        let mut seen = Vec::new();
        while seen.len() < 5 {
            match raw.recv(WAIT).await {
                Ok(p) => {
                    if let Packet::Publish(p) = &p {
                        raw.send(&puback(p.packet_id)).await.unwrap();
                    }
                    seen.push(p);
                }
                Err(e) => panic!("{version:?}: after {seen:?}: {e}"),
            }
        }
        assert!(
            matches!(seen[0], Packet::ConnAck(ref c) if c.code == 0),
            "{seen:?}"
        );
        assert!(
            seen.iter().any(|p| matches!(p, Packet::SubAck(_))),
            "{seen:?}"
        );
        assert!(
            seen.iter()
                .any(|p| matches!(p, Packet::PubAck(a) if a.packet_id == 2)),
            "{seen:?}"
        );
        assert!(
            seen.iter().any(|p| matches!(p, Packet::PingResp)),
            "{seen:?}"
        );
        assert!(
            seen.iter()
                .any(|p| matches!(p, Packet::Publish(p) if p.payload.as_ref() == b"to myself")),
            "{seen:?}"
        );
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_storm_leaves_no_sessions_behind() {
    let hub = TestHub::start_with(|cfg| cfg.mqtt.sys_interval_secs = 0)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let addr = hub.mqtt;
        tasks.push(tokio::spawn(async move {
            let version = if i % 2 == 0 {
                ProtocolVersion::V5
            } else {
                ProtocolVersion::V311
            };
            let (mut raw, _) = raw_connect(addr, version, &format!("storm-{i}"), |_| {}).await;
            raw_subscribe(&mut raw, 1, &format!("storm/{i}/#"), FQoS::AtLeastOnce).await;
            if i % 3 == 0 {
                raw.send(&Packet::Disconnect(Default::default()))
                    .await
                    .unwrap();
                let _ = raw.expect_close(WAIT).await;
            }
            // Otherwise just drop the socket.
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .unwrap()
            .unwrap();
    }
    wait_metric(&hub, "ferrohub_mqtt_connections", |v| v == 0.0).await;
    wait_metric(&hub, "ferrohub_mqtt_sessions", |v| v == 0.0).await;
    wait_metric(&hub, "ferrohub_mqtt_subscriptions", |v| v == 0.0).await;
    hub.stop().await;
}
