//! The trie and the retained tree must agree with the reference matcher
//! (`ferrohub_types::filter_matches`) on every filter/topic pair.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use ferrohub_router::{Router, Subscriber, SubscriberId, Subscription};
use ferrohub_types::{Message, QoS, TenantId, TopicFilter, TopicName, filter_matches};
use proptest::prelude::*;

struct TestSub {
    id: SubscriberId,
    available: AtomicBool,
}

impl Subscriber for TestSub {
    fn id(&self) -> SubscriberId {
        self.id
    }
    fn is_available(&self) -> bool {
        self.available.load(Ordering::Relaxed)
    }
}

fn sub(id: u64) -> Arc<TestSub> {
    Arc::new(TestSub {
        id,
        available: AtomicBool::new(true),
    })
}

fn msg(topic: &str, qos: QoS, retain: bool) -> Message {
    Message {
        topic: TopicName::parse(topic).unwrap(),
        payload: Bytes::from_static(b"x"),
        qos,
        retain,
        received_at: 0,
        properties: None,
    }
}

fn plain(filter: &str, qos: QoS, id: Option<u32>) -> Subscription {
    Subscription {
        filter: TopicFilter::parse(filter).unwrap(),
        share_group: None,
        qos,
        no_local: false,
        retain_as_published: false,
        subscription_id: id,
    }
}

fn level() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_string()),
        Just("b".to_string()),
        Just("".to_string()),
        Just("$s".to_string())
    ]
}

fn topic() -> impl Strategy<Value = String> {
    proptest::collection::vec(level(), 1..5).prop_map(|l| {
        let t = l.join("/");
        if t.is_empty() { "a".to_string() } else { t }
    })
}

fn filter() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(
            prop_oneof![level(), Just("+".to_string()), Just("+".to_string())],
            1..5,
        ),
        any::<bool>(),
    )
        .prop_map(|(mut l, hash)| {
            if hash {
                l.push("#".into());
            }
            let f = l.join("/");
            if f.is_empty() { "a".to_string() } else { f }
        })
}

proptest! {
    #[test]
    fn trie_agrees_with_reference(filters in proptest::collection::vec(filter(), 1..20),
                                  topics in proptest::collection::vec(topic(), 1..20)) {
        let router = Router::<TestSub>::new();
        let t = router.tenant(&TenantId::default_tenant());
        let subs: Vec<_> = (0..filters.len() as u64).map(sub).collect();
        for (i, f) in filters.iter().enumerate() {
            t.subscribe(&subs[i], plain(f, QoS::AtLeastOnce, None));
        }
        let mut out = Vec::new();
        for topic in &topics {
            t.route(u64::MAX, &msg(topic, QoS::AtLeastOnce, false), &mut out);
            let got: BTreeSet<u64> = out.iter().map(|m| m.subscriber.id).collect();
            prop_assert_eq!(got.len(), out.len(), "one copy per subscriber");
            let want: BTreeSet<u64> = filters.iter().enumerate()
                .filter(|(_, f)| filter_matches(f, topic)).map(|(i, _)| i as u64).collect();
            // The side-effect-free probe agrees with routing.
            prop_assert_eq!(t.has_match(topic), !want.is_empty(), "has_match {}", topic);
            prop_assert_eq!(got, want, "topic {}", topic);
        }
        // Removing everything leaves an empty trie.
        for (i, f) in filters.iter().enumerate() {
            prop_assert!(t.unsubscribe(i as u64, f, None));
        }
        prop_assert_eq!(t.subscription_count(), 0);
    }

    #[test]
    fn retained_agrees_with_reference(topics in proptest::collection::vec(topic(), 1..20),
                                      filters in proptest::collection::vec(filter(), 1..20)) {
        let router = Router::<TestSub>::new();
        let t = router.tenant(&TenantId::default_tenant());
        for topic in &topics {
            t.retain(Arc::new(msg(topic, QoS::AtMostOnce, true)));
        }
        let distinct: BTreeSet<&String> = topics.iter().collect();
        prop_assert_eq!(t.retained_count(), distinct.len());
        for f in &filters {
            let mut out = Vec::new();
            t.retained_matching(f, &mut out);
            let got: BTreeSet<String> = out.iter().map(|m| m.topic.to_string()).collect();
            let want: BTreeSet<String> = distinct.iter().filter(|tp| filter_matches(f, tp)).map(|s| s.to_string()).collect();
            prop_assert_eq!(got, want, "filter {}", f);
        }
    }
}

#[test]
fn overlapping_subscriptions_give_one_copy_at_highest_qos_with_all_ids() {
    let router = Router::<TestSub>::new();
    let t = router.tenant(&TenantId::default_tenant());
    let s = sub(1);
    t.subscribe(&s, plain("a/+", QoS::AtMostOnce, Some(7)));
    t.subscribe(&s, plain("a/#", QoS::ExactlyOnce, Some(9)));
    let mut out = Vec::new();
    t.route(2, &msg("a/b", QoS::ExactlyOnce, false), &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].qos, QoS::ExactlyOnce);
    let mut ids = out[0].subscription_ids.to_vec();
    ids.sort();
    assert_eq!(ids, vec![7, 9]);
    // Delivery QoS never exceeds the published QoS.
    t.route(2, &msg("a/b", QoS::AtLeastOnce, false), &mut out);
    assert_eq!(out[0].qos, QoS::AtLeastOnce);
}

#[test]
fn no_local_skips_own_publications() {
    let router = Router::<TestSub>::new();
    let t = router.tenant(&TenantId::default_tenant());
    let s = sub(1);
    let mut sb = plain("a", QoS::AtMostOnce, None);
    sb.no_local = true;
    t.subscribe(&s, sb);
    let mut out = Vec::new();
    t.route(1, &msg("a", QoS::AtMostOnce, false), &mut out);
    assert!(out.is_empty());
    t.route(2, &msg("a", QoS::AtMostOnce, false), &mut out);
    assert_eq!(out.len(), 1);
}

#[test]
fn shared_group_round_robins_over_available_members_and_redispatches() {
    let router = Router::<TestSub>::new();
    let t = router.tenant(&TenantId::default_tenant());
    let members: Vec<_> = (1..=3).map(sub).collect();
    for m in &members {
        let mut sb = plain("job/#", QoS::AtLeastOnce, None);
        sb.share_group = Some(Arc::from("g"));
        t.subscribe(m, sb);
    }
    let plain_sub = sub(10);
    t.subscribe(&plain_sub, plain("job/#", QoS::AtLeastOnce, None));
    let mut counts = [0usize; 4];
    let mut out = Vec::new();
    for _ in 0..30 {
        t.route(99, &msg("job/x", QoS::AtLeastOnce, false), &mut out);
        assert_eq!(out.len(), 2, "one group member plus the plain subscriber");
        let shared: Vec<_> = out.iter().filter(|m| m.share.is_some()).collect();
        assert_eq!(shared.len(), 1);
        counts[shared[0].subscriber.id as usize] += 1;
    }
    assert_eq!(&counts[1..], &[10, 10, 10]);
    // An unavailable member is skipped while others are available.
    members[0].available.store(false, Ordering::Relaxed);
    for _ in 0..10 {
        t.route(99, &msg("job/x", QoS::AtLeastOnce, false), &mut out);
        let m = out.iter().find(|m| m.share.is_some()).unwrap();
        assert_ne!(m.subscriber.id, 1);
    }
    // Redispatch picks another member than the one excluded.
    t.route(99, &msg("job/x", QoS::AtLeastOnce, false), &mut out);
    let key = out.iter().find_map(|m| m.share.clone()).unwrap();
    let (other, _) = t.redispatch(&key, 2).unwrap();
    assert_ne!(other.id, 2);
    // With one member left, nobody else can take it.
    assert!(t.unsubscribe(1, "job/#", Some("g")));
    assert!(t.unsubscribe(3, "job/#", Some("g")));
    assert!(t.redispatch(&key, 2).is_none());
}

#[test]
fn tenants_are_isolated() {
    let router = Router::<TestSub>::new();
    let a = router.tenant(&TenantId::new("a"));
    let b = router.tenant(&TenantId::new("b"));
    a.subscribe(&sub(1), plain("#", QoS::AtMostOnce, None));
    let mut out = Vec::new();
    b.route(2, &msg("x", QoS::AtMostOnce, false), &mut out);
    assert!(out.is_empty());
    b.retain(Arc::new(msg("x", QoS::AtMostOnce, true)));
    let mut r = Vec::new();
    a.retained_matching("#", &mut r);
    assert!(r.is_empty());
}
