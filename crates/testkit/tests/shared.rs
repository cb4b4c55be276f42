//! Shared subscriptions (`$share/<group>/<filter>`): each message to exactly one member, load
//! split, redispatch of a leaving member's messages, coexistence with plain subscriptions and
//! other groups, offline members skipped, no retained messages, No Local refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use ferrohub_proto::mqtt::{
    Packet, ProtocolVersion, Subscribe, SubscribeFilter, SubscriptionOptions,
};
use ferrohub_testkit::TestHub;
use ferrohub_types::QoS as FQoS;

/// Collects PUBLISH payloads from several clients until `total` arrived, then checks quiet.
async fn drain(clients: &mut [&mut V5], total: usize) -> Vec<Vec<String>> {
    let mut got: Vec<Vec<String>> = vec![Vec::new(); clients.len()];
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.iter().map(Vec::len).sum::<usize>() < total {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {:?} of {total} messages arrived",
            got
        );
        for (i, c) in clients.iter_mut().enumerate() {
            while let Some(p) = c.next(Duration::from_millis(20)).await {
                if let m5::Packet::Publish(p) = p {
                    got[i].push(String::from_utf8(p.payload.to_vec()).unwrap());
                }
            }
        }
    }
    for c in clients.iter_mut() {
        c.expect_no_publish(Duration::from_millis(300)).await;
    }
    got
}

fn all(n: usize) -> BTreeSet<String> {
    (0..n).map(|i| format!("m{i}")).collect()
}

fn union(got: &[Vec<String>]) -> (BTreeSet<String>, usize) {
    let count = got.iter().map(Vec::len).sum();
    (got.iter().flatten().cloned().collect(), count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_message_goes_to_exactly_one_member() {
    let hub = TestHub::start().await.unwrap();
    let mut a = V5::connect(v5_opts(&hub, &uid("a"))).await;
    let mut b = V5::connect(v5_opts(&hub, &uid("b"))).await;
    a.subscribe("$share/g/sh/t", m5::QoS::AtLeastOnce).await;
    b.subscribe("$share/g/sh/t", m5::QoS::AtLeastOnce).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    const N: usize = 20;
    for i in 0..N {
        publ.publish(
            "sh/t",
            m5::QoS::AtLeastOnce,
            false,
            format!("m{i}").as_bytes(),
        )
        .await;
    }
    let got = drain(&mut [&mut a, &mut b], N).await;
    let (set, count) = union(&got);
    assert_eq!(count, N, "no duplicates: {got:?}");
    assert_eq!(set, all(N));
    assert!(
        !got[0].is_empty() && !got[1].is_empty(),
        "load is split: {got:?}"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v311_members_share_too() {
    let hub = TestHub::start().await.unwrap();
    let mut a = V4::connect(v4_opts(&hub, &uid("a"))).await;
    let mut b = V4::connect(v4_opts(&hub, &uid("b"))).await;
    a.subscribe("$share/g4/sh4/+", rumqttc::QoS::AtMostOnce)
        .await;
    b.subscribe("$share/g4/sh4/+", rumqttc::QoS::AtMostOnce)
        .await;
    let mut publ = V4::connect(v4_opts(&hub, &uid("pub"))).await;
    for i in 0..10 {
        publ.publish(
            "sh4/x",
            rumqttc::QoS::AtLeastOnce,
            false,
            format!("m{i}").as_bytes(),
        )
        .await;
    }
    let mut got = Vec::new();
    for c in [&mut a, &mut b] {
        while let Some(p) = c.next(Duration::from_millis(300)).await {
            if let rumqttc::Packet::Publish(p) = p {
                assert_eq!(
                    p.qos,
                    rumqttc::QoS::AtMostOnce,
                    "downgraded to the member's QoS"
                );
                got.push(String::from_utf8(p.payload.to_vec()).unwrap());
            }
        }
    }
    assert_eq!(got.len(), 10, "{got:?}");
    assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), all(10));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_subscriber_and_other_groups_get_their_own_copy() {
    let hub = TestHub::start().await.unwrap();
    let mut a = V5::connect(v5_opts(&hub, &uid("a"))).await;
    let mut b = V5::connect(v5_opts(&hub, &uid("b"))).await;
    let mut other = V5::connect(v5_opts(&hub, &uid("other"))).await;
    let mut plain = V5::connect(v5_opts(&hub, &uid("plain"))).await;
    a.subscribe("$share/g1/mix/t", m5::QoS::AtLeastOnce).await;
    b.subscribe("$share/g1/mix/t", m5::QoS::AtLeastOnce).await;
    other
        .subscribe("$share/g2/mix/#", m5::QoS::AtLeastOnce)
        .await;
    plain.subscribe("mix/t", m5::QoS::AtLeastOnce).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    const N: usize = 10;
    for i in 0..N {
        publ.publish(
            "mix/t",
            m5::QoS::AtLeastOnce,
            false,
            format!("m{i}").as_bytes(),
        )
        .await;
    }
    let g1 = drain(&mut [&mut a, &mut b], N).await;
    assert_eq!(union(&g1), (all(N), N));
    let g2 = drain(&mut [&mut other], N).await;
    assert_eq!(union(&g2), (all(N), N));
    let p = drain(&mut [&mut plain], N).await;
    assert_eq!(
        p[0],
        (0..N).map(|i| format!("m{i}")).collect::<Vec<_>>(),
        "plain gets all, in order"
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_with_plain_and_shared_subscription_gets_both_copies() {
    let hub = TestHub::start().await.unwrap();
    let mut a = V5::connect(v5_opts(&hub, &uid("a"))).await;
    a.subscribe("$share/g/both/t", m5::QoS::AtLeastOnce).await;
    a.subscribe("both/t", m5::QoS::AtLeastOnce).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("both/t", m5::QoS::AtLeastOnce, false, b"x")
        .await;
    a.recv_publish().await;
    a.recv_publish().await;
    a.expect_no_publish(QUIET).await;
    hub.stop().await;
}

/// A byte-level member that takes messages but never acknowledges them (Receive Maximum 1).
async fn stubborn_member(hub: &TestHub, filter: &str, expiry: u32) -> ferrohub_testkit::RawClient {
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("stubborn"), |c| {
        c.properties.receive_maximum = Some(1);
        c.properties.session_expiry_interval = Some(expiry);
    })
    .await;
    assert_eq!(
        raw_subscribe(&mut raw, 1, filter, FQoS::AtLeastOnce).await,
        vec![1]
    );
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_member_messages_are_redispatched() {
    let hub = TestHub::start().await.unwrap();
    let mut stubborn = stubborn_member(&hub, "$share/g/rd/t", 0).await;
    let mut b = V5::connect(v5_opts(&hub, &uid("b"))).await;
    b.subscribe("$share/g/rd/t", m5::QoS::AtLeastOnce).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    const N: usize = 10;
    for i in 0..N {
        publ.publish(
            "rd/t",
            m5::QoS::AtLeastOnce,
            false,
            format!("m{i}").as_bytes(),
        )
        .await;
    }
    // The stubborn member got one message in flight (never acknowledged) and has more queued.
    let inflight = raw_recv_publish(&mut stubborn).await;
    raw_expect_silence(&mut stubborn, Duration::from_millis(200)).await;
    drop(stubborn);
    // Everything, including the unacknowledged one, ends up with b.
    let got = drain(&mut [&mut b], N).await;
    let (set, count) = union(&got);
    assert_eq!(
        set,
        all(N),
        "nothing lost; in flight was {:?}",
        inflight.payload
    );
    assert_eq!(count, N);
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_member_going_offline_loses_nothing() {
    let hub = TestHub::start().await.unwrap();
    let mut stubborn = stubborn_member(&hub, "$share/gp/rdp/t", 60).await;
    let mut b = V5::connect(v5_opts(&hub, &uid("b"))).await;
    b.subscribe("$share/gp/rdp/t", m5::QoS::AtLeastOnce).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    const N: usize = 10;
    for i in 0..N {
        publ.publish(
            "rdp/t",
            m5::QoS::AtLeastOnce,
            false,
            format!("m{i}").as_bytes(),
        )
        .await;
    }
    let inflight = raw_recv_publish(&mut stubborn).await;
    drop(stubborn);
    wait_connections(&hub, 2).await;
    // Queued ones move to b; the one in flight is either redispatched too or kept for the
    // session — either way it is not lost. Publish more while the member is offline: all to b.
    for i in N..2 * N {
        publ.publish(
            "rdp/t",
            m5::QoS::AtLeastOnce,
            false,
            format!("m{i}").as_bytes(),
        )
        .await;
    }
    let mut seen: Vec<String> = Vec::new();
    while let Some(p) = b.next(Duration::from_millis(500)).await {
        if let m5::Packet::Publish(p) = p {
            seen.push(String::from_utf8(p.payload.to_vec()).unwrap());
        }
    }
    let inflight = String::from_utf8(inflight.payload.to_vec()).unwrap();
    let mut expected = all(2 * N);
    if !seen.contains(&inflight) {
        expected.remove(&inflight);
    }
    assert_eq!(
        seen.iter().cloned().collect::<BTreeSet<_>>(),
        expected,
        "seen {seen:?}"
    );
    assert_eq!(seen.len(), expected.len(), "no duplicates: {seen:?}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_gets_no_retained_messages() {
    let hub = TestHub::start().await.unwrap();
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    publ.publish("shr/t", m5::QoS::AtLeastOnce, true, b"retained")
        .await;
    let mut a = V5::connect(v5_opts(&hub, &uid("a"))).await;
    a.subscribe("$share/g/shr/t", m5::QoS::AtLeastOnce).await;
    a.expect_no_publish(QUIET).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribed_member_no_longer_receives() {
    let hub = TestHub::start().await.unwrap();
    let mut a = V5::connect(v5_opts(&hub, &uid("a"))).await;
    let mut b = V5::connect(v5_opts(&hub, &uid("b"))).await;
    a.subscribe("$share/g/un/t", m5::QoS::AtLeastOnce).await;
    b.subscribe("$share/g/un/t", m5::QoS::AtLeastOnce).await;
    a.client.unsubscribe("$share/g/un/t").await.unwrap();
    match a
        .wait_for("UNSUBACK", |p| matches!(p, m5::Packet::UnsubAck(_)))
        .await
    {
        m5::Packet::UnsubAck(u) => assert_eq!(u.reasons, vec![m5::UnsubAckReason::Success]),
        _ => unreachable!(),
    }
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    for i in 0..6 {
        publ.publish(
            "un/t",
            m5::QoS::AtLeastOnce,
            false,
            format!("m{i}").as_bytes(),
        )
        .await;
    }
    let got = drain(&mut [&mut b], 6).await;
    assert_eq!(union(&got), (all(6), 6));
    a.expect_no_publish(QUIET).await;
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_local_on_a_shared_subscription_is_a_protocol_error() {
    let hub = TestHub::start().await.unwrap();
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("nl"), |_| {}).await;
    raw.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscription_identifier: None,
        user_properties: Vec::new(),
        filters: vec![SubscribeFilter {
            filter: "$share/g/nl/t".into(),
            options: SubscriptionOptions {
                qos: FQoS::AtLeastOnce,
                no_local: true,
                ..Default::default()
            },
        }],
    }))
    .await
    .unwrap();
    assert_eq!(raw_expect_disconnect(&mut raw, WAIT).await, Some(0x82));
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_shared_filters_are_refused() {
    let hub = TestHub::start().await.unwrap();
    let (mut raw, _) = raw_connect(hub.mqtt, ProtocolVersion::V5, &uid("bad"), |_| {}).await;
    for (i, bad) in [
        "$share/g",
        "$share//t",
        "$share/g+/t",
        "$share/g#/t",
        "$share/g/",
    ]
    .into_iter()
    .enumerate()
    {
        let codes = raw_subscribe(&mut raw, i as u16 + 1, bad, FQoS::AtLeastOnce).await;
        assert_eq!(codes, vec![0x8F], "{bad:?} must get Topic Filter invalid");
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_only_match_is_a_match_for_the_puback() {
    let hub = TestHub::start().await.unwrap();
    let mut a = V5::connect(v5_opts(&hub, &uid("a"))).await;
    a.subscribe("$share/g/only/t", m5::QoS::AtLeastOnce).await;
    let mut publ = V5::connect(v5_opts(&hub, &uid("pub"))).await;
    let ack = publ
        .publish("only/t", m5::QoS::AtLeastOnce, false, b"x")
        .await;
    assert_eq!(
        ack,
        Some(m5::PubAckReason::Success),
        "a shared subscriber matched"
    );
    a.recv_publish().await;
    hub.stop().await;
}
