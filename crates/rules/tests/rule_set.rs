//! A [`RuleSet`] (which resolves each top-level field once per message for all its rules) gives
//! exactly the outputs of each rule run alone, message by message, also after removals.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic on failure.

use std::sync::Arc;

use ferrohub_rules::{MessageContext, NoLookup, Output, Rule, RuleRunner, RuleSet, RunnerLimits};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// The bench's rule mix (`examples/bench_rules.rs`) plus rules on other filters, nested and
/// missing fields, `SELECT *` with more items, `SELECT VALUE` and a stateful function.
fn rules() -> Vec<String> {
    let mut v = Vec::new();
    for i in 0..10 {
        v.push(format!(
            "SELECT * FROM 'devices/+/telemetry' WHERE temperature > {}",
            30 + i
        ));
        v.push(format!(
            "SELECT temperature AS t, topic(2) AS device FROM 'devices/+/telemetry' WHERE humidity > {} AND status = 'warn'",
            50 + i * 5
        ));
        v.push(format!(
            "SELECT battery.level AS level FROM 'devices/+/telemetry' WHERE battery.level < {} AND NOT battery.charging",
            i * 10
        ));
        v.push(format!(
            "SELECT * FROM 'devices/+/telemetry' WHERE st_distance(pos[0], pos[1], 48.05, 2.3) < {}",
            1000 + i * 500
        ));
        v.push(format!(
            "SELECT upper(status) AS s FROM 'devices/+/telemetry' WHERE CASE WHEN temperature > 35 THEN humidity > {} ELSE false END",
            50 + i * 5
        ));
    }
    v.extend(
        [
            "SELECT *, temperature * 2 AS t2, missing AS m FROM 'devices/#' WHERE humidity IS NOT UNDEFINED",
            "SELECT VALUE battery FROM 'devices/+' WHERE battery.level >= 50 OR status = 'warn'",
            "SELECT pos[1] AS lon, missing.x AS mx, battery['charging'] AS c FROM 'other/+' WHERE status <> 'ok'",
            "SELECT lag(temperature) AS prev, temperature FROM 'devices/+/telemetry' WHERE temperature IS NOT NULL",
            "SELECT temperature, humidity, status, battery, pos FROM '#'",
            "SELECT * FROM 'devices/+/telemetry'",
        ]
        .map(String::from),
    );
    v
}

fn payload() -> impl Strategy<Value = Value> {
    let num = prop_oneof![
        (0.0f64..45.0).prop_map(Value::from),
        (0i64..100).prop_map(Value::from),
        Just(json!("31.5")),
        Just(Value::Null),
    ];
    (
        prop::option::of(num.clone()),
        prop::option::of(num.clone()),
        prop::option::of(prop_oneof![
            Just(json!("ok")),
            Just(json!("warn")),
            Just(json!(3))
        ]),
        prop::option::of(prop_oneof![
            (num.clone(), any::<bool>()).prop_map(|(l, c)| json!({"level": l, "charging": c})),
            Just(json!(7)),
        ]),
        prop::option::of((47.9f64..48.2, 2.2f64..2.4).prop_map(|(a, b)| json!([a, b]))),
        prop::option::of(num),
        prop::bool::weighted(0.05),
    )
        .prop_map(|(t, h, s, b, p, m, not_object)| {
            if not_object {
                return json!([1, 2]);
            }
            let mut o = Map::new();
            for (k, v) in [
                ("temperature", t),
                ("humidity", h),
                ("status", s),
                ("battery", b),
                ("pos", p),
                ("missing", m),
            ] {
                if let Some(v) = v {
                    o.insert(k.to_string(), v);
                }
            }
            Value::Object(o)
        })
}

fn topic() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u8..4).prop_map(|i| format!("devices/d{i}/telemetry")),
        Just("devices/d1".to_string()),
        Just("other/x".to_string()),
    ]
}

/// Runs `msgs` through a set of `sql` (minus the indices in `removed`) and through one runner
/// per remaining rule; both give the same outputs in the same order.
fn same_outputs(sql: &[String], removed: &[usize], msgs: &[(String, Value)]) {
    let mut set = RuleSet::new(RunnerLimits::default());
    for (i, s) in sql.iter().enumerate() {
        set.insert(&format!("r{i}"), Arc::new(Rule::compile(s).unwrap()));
    }
    for &i in removed {
        assert!(set.remove(&format!("r{i}")));
    }
    let mut alone: Vec<(String, RuleRunner)> = sql
        .iter()
        .enumerate()
        .filter(|(i, _)| !removed.contains(i))
        .map(|(i, s)| {
            let rule = Arc::new(Rule::compile(s).unwrap());
            (
                format!("r{i}"),
                RuleRunner::new(rule, RunnerLimits::default()),
            )
        })
        .collect();
    for (ts, (topic, payload)) in msgs.iter().enumerate() {
        let msg = MessageContext::new("acme", topic, payload).at(ts as i64);
        let (mut got, mut errs) = (Vec::new(), Vec::new());
        set.on_message(&msg, &NoLookup, &mut got, &mut errs);
        assert!(errs.is_empty());
        let got: Vec<(String, Output)> =
            got.into_iter().map(|(id, o)| (id.to_string(), o)).collect();
        let mut want = Vec::new();
        for (id, r) in &mut alone {
            let mut out = Vec::new();
            r.on_message(&msg, &NoLookup, &mut out).unwrap();
            want.extend(out.into_iter().map(|o| (id.clone(), o)));
        }
        assert_eq!(got, want, "topic {topic}, payload {payload}");
    }
}

#[test]
fn set_matches_rules_alone_on_fixed_messages() {
    let sql = rules();
    let msgs = vec![
        (
            "devices/d1/telemetry".to_string(),
            json!({"temperature": 36.5, "humidity": 99, "status": "warn",
                   "battery": {"level": 3, "charging": false}, "pos": [48.05, 2.3]}),
        ),
        (
            "devices/d2/telemetry".to_string(),
            json!({"temperature": 20}),
        ),
        (
            "other/x".to_string(),
            json!({"status": "bad", "pos": [1, 2]}),
        ),
        ("devices/d1".to_string(), json!({"battery": {"level": 70}})),
        ("devices/d1/telemetry".to_string(), Value::Null),
    ];
    same_outputs(&sql, &[], &msgs);
    same_outputs(&sql, &[0, 3, 7, 50, 52], &msgs);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn set_matches_rules_alone(
        msgs in prop::collection::vec((topic(), payload()), 1..12),
        removed in prop::collection::btree_set(0usize..56, 0..8),
    ) {
        let removed: Vec<usize> = removed.into_iter().collect();
        same_outputs(&rules(), &removed, &msgs);
    }
}

#[test]
fn newuuid_is_not_shared_between_rules() {
    let mut set = RuleSet::new(RunnerLimits::default());
    for i in 0..2 {
        let sql = "SELECT newuuid() AS u, upper(status) AS s FROM '#'";
        set.insert(&format!("r{i}"), Arc::new(Rule::compile(sql).unwrap()));
    }
    let payload = json!({"status": "ok"});
    let (mut out, mut errs) = (Vec::new(), Vec::new());
    set.on_message(
        &MessageContext::new("acme", "a/b", &payload),
        &NoLookup,
        &mut out,
        &mut errs,
    );
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].1.value["s"], "OK");
    assert_eq!(out[1].1.value["s"], "OK");
    assert_ne!(out[0].1.value["u"], out[1].1.value["u"]);
}
