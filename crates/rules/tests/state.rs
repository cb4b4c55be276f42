//! Windows over simulated time, per-key state, anomaly functions, bounded memory.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic on failure.

use std::sync::Arc;

use ferrohub_rules::{MessageContext, NoLookup, Output, Rule, RuleRunner, RuleSet, RunnerLimits};
use serde_json::{Value, json};

fn runner(sql: &str) -> RuleRunner {
    RuleRunner::new(
        Arc::new(Rule::compile(sql).unwrap_or_else(|e| panic!("{e}"))),
        RunnerLimits::default(),
    )
}

fn runner_with(sql: &str, limits: RunnerLimits) -> RuleRunner {
    RuleRunner::new(Arc::new(Rule::compile(sql).unwrap()), limits)
}

/// Offers `payload` on `topic` at `t` ms; returns the outputs.
fn send(r: &mut RuleRunner, topic: &str, t: i64, payload: Value) -> Vec<Output> {
    let mut out = Vec::new();
    let msg = MessageContext::new("acme", topic, &payload).at(t);
    r.on_message(&msg, &NoLookup, &mut out).unwrap();
    out
}

fn values(out: &[Output]) -> Vec<Value> {
    out.iter().map(|o| o.value.clone()).collect()
}

const TUMBLING: &str = "SELECT avg(t) AS avg, min(t) AS min, max(t) AS max, count(*) AS n, sum(t) AS sum, \
     stddev(t) AS sd, percentile(t, 50) AS p50, window_start() AS ws, window_end() AS we, topic(2) AS dev \
     FROM 'd/+/m' WHERE t IS NOT UNDEFINED GROUP BY topic(2) WINDOW TUMBLING(10)";

#[test]
fn tumbling_window_closes_on_the_next_window_message() {
    let mut r = runner(TUMBLING);
    assert!(send(&mut r, "d/a/m", 1_000, json!({"t": 1})).is_empty());
    assert!(send(&mut r, "d/a/m", 5_000, json!({"t": 2})).is_empty());
    assert!(send(&mut r, "d/a/m", 9_999, json!({"t": 6})).is_empty());
    assert!(
        send(&mut r, "d/a/m", 9_000, json!({"x": 100})).is_empty(),
        "filtered by WHERE"
    );
    assert!(
        send(&mut r, "x/a/m", 9_000, json!({"t": 100})).is_empty(),
        "other topic"
    );
    // 10 000 is the first instant of the next window: the first one closes.
    let out = send(&mut r, "d/a/m", 10_000, json!({"t": 10}));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].window, Some((0, 10_000)));
    assert_eq!(out[0].key, "a");
    let v = &out[0].value;
    assert_eq!(v["avg"], json!(3));
    assert_eq!(v["min"], json!(1));
    assert_eq!(v["max"], json!(6));
    assert_eq!(v["n"], json!(3));
    assert_eq!(v["sum"], json!(9));
    assert_eq!(v["p50"], json!(2));
    assert_eq!(v["ws"], json!(0));
    assert_eq!(v["we"], json!(10_000));
    assert_eq!(v["dev"], json!("a"));
    let sd = v["sd"].as_f64().unwrap();
    assert!((sd - (14.0f64 / 3.0).sqrt()).abs() < 1e-9, "{sd}");
    // A gap: the window [10 s, 20 s) closes when 35 s arrives; the empty ones emit nothing.
    let out = send(&mut r, "d/a/m", 35_000, json!({"t": 1}));
    assert_eq!(
        values(&out),
        vec![
            json!({"avg": 10, "min": 10, "max": 10, "n": 1, "sum": 10, "sd": 0.0, "p50": 10, "ws": 10_000, "we": 20_000, "dev": "a"})
        ]
    );
    assert_eq!(r.stats().windows_emitted, 2);
}

#[test]
fn keys_have_their_own_windows_and_tick_closes_idle_ones() {
    let mut r = runner(TUMBLING);
    send(&mut r, "d/a/m", 1_000, json!({"t": 1}));
    send(&mut r, "d/b/m", 2_000, json!({"t": 100}));
    // b moving on does not close a's window (per-key event time).
    let out = send(&mut r, "d/b/m", 12_000, json!({"t": 200}));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].key, "b");
    assert_eq!(out[0].value["avg"], json!(100));
    assert_eq!(r.stats().keys, 2);
    let mut out = Vec::new();
    r.tick(9_999, &NoLookup, &mut out).unwrap();
    assert!(out.is_empty());
    r.tick(20_000, &NoLookup, &mut out).unwrap();
    let got: Vec<(String, Option<(i64, i64)>)> =
        out.iter().map(|o| (o.key.clone(), o.window)).collect();
    assert_eq!(
        got,
        vec![
            ("a".to_string(), Some((0, 10_000))),
            ("b".to_string(), Some((10_000, 20_000)))
        ]
    );
    // After the tick, a message for a closed window is late.
    assert!(send(&mut r, "d/a/m", 15_000, json!({"t": 1})).is_empty());
    assert_eq!(r.stats().late_messages, 1);
}

#[test]
fn late_messages_within_and_beyond_the_allowed_lateness() {
    let sql = "SELECT count(*) AS n, sum(t) AS s FROM 'd/+/m' WINDOW TUMBLING(10)";
    let mut r = runner_with(
        sql,
        RunnerLimits {
            allowed_lateness_ms: 5_000,
            ..RunnerLimits::default()
        },
    );
    send(&mut r, "d/a/m", 1_000, json!({"t": 1}));
    // 12 s: window [0,10) stays open until 15 s.
    assert!(send(&mut r, "d/a/m", 12_000, json!({"t": 2})).is_empty());
    assert!(
        send(&mut r, "d/a/m", 9_000, json!({"t": 4})).is_empty(),
        "late but allowed"
    );
    let out = send(&mut r, "d/a/m", 15_000, json!({"t": 8}));
    assert_eq!(values(&out), vec![json!({"n": 2, "s": 5})]);
    assert!(send(&mut r, "d/a/m", 9_500, json!({"t": 16})).is_empty());
    assert_eq!(
        r.stats().late_messages,
        1,
        "beyond the lateness: dropped and counted"
    );
    // Zero lateness: anything older than the newest timestamp's window is late.
    let mut r = runner(sql);
    send(&mut r, "d/a/m", 10_500, json!({"t": 1}));
    send(&mut r, "d/a/m", 9_000, json!({"t": 1}));
    assert_eq!(r.stats().late_messages, 1);
    // Out of order inside the current window is fine.
    send(&mut r, "d/a/m", 10_100, json!({"t": 1}));
    assert_eq!(r.stats().late_messages, 1);
}

#[test]
fn hopping_windows_overlap_and_close_in_order() {
    let sql =
        "SELECT count(*) AS n, sum(v) AS s, window_start() AS ws FROM 'm' WINDOW HOPPING(10, 5)";
    let mut r = runner(sql);
    // Windows: [-5,5) [0,10) [5,15) [10,20) …
    let mut all = Vec::new();
    for (t, v) in [
        (1_000, 1),
        (4_999, 2),
        (5_000, 4),
        (9_999, 8),
        (10_000, 16),
        (14_000, 32),
    ] {
        all.extend(send(&mut r, "m", t, json!({"v": v})));
    }
    let mut out = Vec::new();
    r.tick(30_000, &NoLookup, &mut out).unwrap();
    all.extend(out);
    assert_eq!(
        values(&all),
        vec![
            json!({"n": 2, "s": 3, "ws": -5_000}),
            json!({"n": 4, "s": 15, "ws": 0}),
            json!({"n": 4, "s": 60, "ws": 5_000}),
            json!({"n": 2, "s": 48, "ws": 10_000}),
        ]
    );
    // Boundaries: [-5,5) closes exactly when 5 000 arrived, [0,10) at 10 000.
    let ends: Vec<i64> = all.iter().map(|o| o.window.unwrap().1).collect();
    assert_eq!(ends, vec![5_000, 10_000, 15_000, 20_000]);
}

#[test]
fn windows_without_group_by_share_one_key() {
    let mut r = runner("SELECT max(v) AS m FROM '+/x' WINDOW TUMBLING(1)");
    send(&mut r, "a/x", 100, json!({"v": 1}));
    send(&mut r, "b/x", 200, json!({"v": 7}));
    let out = send(&mut r, "a/x", 1_000, json!({"v": 1}));
    assert_eq!(values(&out), vec![json!({"m": 7})]);
    assert_eq!(out[0].key, "");
}

#[test]
fn aggregates_of_non_numbers_and_empty_windows() {
    let mut r = runner(
        "SELECT avg(v) AS a, count(v) AS c, count(*) AS n, min(v) + 1 AS m FROM 'm' WINDOW TUMBLING(1)",
    );
    send(&mut r, "m", 0, json!({"v": "abc"}));
    send(&mut r, "m", 1, json!({"v": null}));
    send(&mut r, "m", 2, json!({}));
    send(&mut r, "m", 3, json!({"v": "4"}));
    let out = send(&mut r, "m", 1_000, json!({}));
    assert_eq!(values(&out), vec![json!({"a": 4, "c": 2, "n": 4, "m": 5})]);
}

#[test]
fn percentile_interpolates() {
    let mut r = runner(
        "SELECT percentile(v, 90) AS p90, percentile(v, 0) AS p0, percentile(v, 100) AS p100 FROM 'm' WINDOW TUMBLING(100)",
    );
    for i in 1..=11 {
        send(&mut r, "m", i, json!({"v": i * 10}));
    }
    let out = send(&mut r, "m", 100_000, json!({"v": 0}));
    assert_eq!(
        values(&out),
        vec![json!({"p90": 100, "p0": 10, "p100": 110})]
    );
}

#[test]
fn lag_and_delta_per_key() {
    let mut r = runner(
        "SELECT lag(v) AS prev, delta(v) AS d, rate_of_change(v) AS r FROM 'd/+' GROUP BY topic(2)",
    );
    assert_eq!(
        values(&send(&mut r, "d/a", 0, json!({"v": 10}))),
        vec![json!({})]
    );
    assert_eq!(
        values(&send(&mut r, "d/b", 0, json!({"v": 100}))),
        vec![json!({})]
    );
    assert_eq!(
        values(&send(&mut r, "d/a", 2_000, json!({"v": 14}))),
        vec![json!({"prev": 10, "d": 4, "r": 2.0})]
    );
    assert_eq!(
        values(&send(&mut r, "d/b", 500, json!({"v": 90}))),
        vec![json!({"prev": 100, "d": -10, "r": -20.0})]
    );
    // A value that is not a number leaves delta's state alone; lag remembers any defined value.
    assert_eq!(
        values(&send(&mut r, "d/a", 3_000, json!({"v": "x"}))),
        vec![json!({"prev": 14})]
    );
    assert_eq!(
        values(&send(&mut r, "d/a", 4_000, json!({"v": 15.5}))),
        vec![json!({"prev": "x", "d": 1.5, "r": 0.75})]
    );
    assert_eq!(r.stats().keys, 2);
}

#[test]
fn the_same_stateful_call_in_where_and_select_shares_its_value() {
    let mut r = runner("SELECT delta(v) AS d FROM 'm' WHERE delta(v) > 5");
    assert!(send(&mut r, "m", 0, json!({"v": 1})).is_empty());
    assert!(send(&mut r, "m", 1, json!({"v": 3})).is_empty());
    assert_eq!(
        values(&send(&mut r, "m", 2, json!({"v": 10}))),
        vec![json!({"d": 7})]
    );
    assert!(send(&mut r, "m", 3, json!({"v": 12})).is_empty());
}

/// Deterministic noise in [-1, 1).
fn noise(i: u64) -> f64 {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 32;
    (x % 2_000_000) as f64 / 1_000_000.0 - 1.0
}

/// A vibration-like series (mean 1.8, noise ±0.2, one sample a second) that starts drifting
/// upward at `drift_at` by 0.02 per second (a fast bearing fault).
fn series(i: u64, drift_at: u64) -> f64 {
    let base = 1.8 + 0.2 * noise(i);
    if i >= drift_at {
        base + 0.02 * (i - drift_at) as f64
    } else {
        base
    }
}

#[test]
fn ewma_zscore_flags_the_drift_and_nothing_before() {
    let sql = "SELECT ewma_zscore(v, 0.01) AS z, topic(2) AS dev FROM 'machines/+/vibration' \
               WHERE abs(ewma_zscore(v, 0.01)) > 4 GROUP BY topic(2)";
    let mut r = runner(sql);
    let drift_at = 2_000;
    let mut first_alarm = None;
    for i in 0..3_000u64 {
        // A healthy machine alongside: never flagged.
        let healthy = send(
            &mut r,
            "machines/ok/vibration",
            (i * 1000) as i64,
            json!({"v": 1.8 + 0.2 * noise(i + 77)}),
        );
        assert!(
            healthy.is_empty(),
            "false alarm on the healthy machine at {i}: {healthy:?}"
        );
        let out = send(
            &mut r,
            "machines/m1/vibration",
            (i * 1000) as i64,
            json!({"v": series(i, drift_at)}),
        );
        if !out.is_empty() {
            assert!(
                i >= drift_at,
                "false alarm before the drift at {i}: {out:?}"
            );
            assert_eq!(out[0].value["dev"], json!("m1"));
            first_alarm.get_or_insert(i);
        }
    }
    let first = first_alarm.expect("the drift was never flagged");
    assert!(first < drift_at + 300, "flagged late: {first}");
}

#[test]
fn delta_and_rate_of_change_detect_a_step() {
    let sql = "SELECT rate_of_change(v) AS r FROM 'm' WHERE abs(delta(v)) > 1.5";
    let mut r = runner(sql);
    let mut hits = Vec::new();
    for i in 0..500u64 {
        let v = 20.0 + 0.3 * noise(i) + if i >= 300 { 5.0 } else { 0.0 };
        if !send(&mut r, "m", (i * 500) as i64, json!({"v": v})).is_empty() {
            hits.push(i);
        }
    }
    assert_eq!(hits, vec![300]);
}

#[test]
fn key_cap_evicts_the_least_recently_seen_key() {
    let limits = RunnerLimits {
        max_keys: 2,
        ..RunnerLimits::default()
    };
    let mut r = runner_with("SELECT lag(v) AS p FROM 'd/+' GROUP BY topic(2)", limits);
    send(&mut r, "d/a", 0, json!({"v": 1}));
    send(&mut r, "d/b", 0, json!({"v": 2}));
    send(&mut r, "d/a", 1, json!({"v": 3}));
    send(&mut r, "d/c", 1, json!({"v": 4})); // evicts b
    assert_eq!(r.stats().keys, 2);
    assert_eq!(r.stats().evictions, 1);
    assert_eq!(
        values(&send(&mut r, "d/a", 2, json!({"v": 5}))),
        vec![json!({"p": 3})]
    );
    // b starts over (and evicts c, now the least recently seen).
    assert_eq!(
        values(&send(&mut r, "d/b", 2, json!({"v": 6}))),
        vec![json!({})]
    );
    assert_eq!(r.stats().evictions, 2);

    let mut r = runner_with(
        "SELECT count(*) AS n FROM 'd/+' GROUP BY topic(2) WINDOW TUMBLING(10)",
        limits,
    );
    for (i, d) in ["a", "b", "c"].iter().enumerate() {
        send(&mut r, &format!("d/{d}"), i as i64, json!({}));
    }
    let s = r.stats();
    assert_eq!((s.keys, s.evictions, s.windows_dropped), (2, 1, 1));
}

#[test]
fn stateless_rules_run_through_a_runner_too() {
    let mut r = runner("SELECT t FROM 'd/+' WHERE t > 1");
    assert_eq!(
        values(&send(&mut r, "d/a", 0, json!({"t": 2}))),
        vec![json!({"t": 2})]
    );
    assert!(send(&mut r, "d/a", 0, json!({"t": 0})).is_empty());
    assert!(send(&mut r, "x/a", 0, json!({"t": 5})).is_empty());
    assert_eq!(r.stats().keys, 0);
}

#[test]
fn rule_set_matches_each_filter_once_and_tags_outputs() {
    let mut set = RuleSet::new(RunnerLimits::default());
    set.insert(
        "hot",
        Arc::new(Rule::compile("SELECT t FROM 'd/+/m' WHERE t > 30").unwrap()),
    );
    set.insert(
        "all",
        Arc::new(Rule::compile("SELECT * FROM 'd/#'").unwrap()),
    );
    set.insert(
        "avg",
        Arc::new(Rule::compile("SELECT avg(t) AS a FROM 'd/+/m' WINDOW TUMBLING(1)").unwrap()),
    );
    set.insert(
        "other",
        Arc::new(Rule::compile("SELECT * FROM 'x/#'").unwrap()),
    );
    assert_eq!(set.len(), 4);
    let (mut out, mut errs) = (Vec::new(), Vec::new());
    let p = json!({"t": 35});
    set.on_message(
        &MessageContext::new("acme", "d/a/m", &p).at(10),
        &NoLookup,
        &mut out,
        &mut errs,
    );
    let ids: Vec<&str> = out.iter().map(|(id, _)| &**id).collect();
    assert_eq!(ids, vec!["hot", "all"]);
    out.clear();
    set.tick(5_000, &NoLookup, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(&*out[0].0, "avg");
    assert_eq!(out[0].1.value, json!({"a": 35}));
    assert!(errs.is_empty());
    assert_eq!(set.filter_count(), 3, "'d/+/m' is shared by two rules");
    assert!(set.remove("hot"));
    assert!(!set.remove("hot"));
    assert_eq!(set.filter_count(), 3);
    assert!(set.remove("other"));
    assert_eq!(set.filter_count(), 2);
    // The remaining rules still see their messages after the filters were renumbered.
    out.clear();
    set.on_message(
        &MessageContext::new("acme", "d/a/m", &p).at(6_000),
        &NoLookup,
        &mut out,
        &mut errs,
    );
    assert_eq!(out.len(), 1);
    assert_eq!(&*out[0].0, "all");
    assert_eq!(set.stats("avg").unwrap().windows_emitted, 1);
}

#[test]
fn window_expressions_mix_aggregates_and_message_values() {
    let mut r = runner(
        "SELECT max(v) - min(v) AS range, avg(v) * 2 AS double_avg, concat(unit, ':', count(*)) AS label, \
         ts AS last_ts, window_end() - window_start() AS len, 'const' AS c \
         FROM 'm' GROUP BY k WINDOW TUMBLING(0.5)",
    );
    send(
        &mut r,
        "m",
        0,
        json!({"v": 2, "unit": "C", "ts": 1, "k": 3}),
    );
    send(
        &mut r,
        "m",
        100,
        json!({"v": 6, "unit": "F", "ts": 2, "k": 3}),
    );
    let out = send(&mut r, "m", 500, json!({"v": 0, "k": 3}));
    assert_eq!(
        values(&out),
        vec![
            json!({"range": 4, "double_avg": 8, "label": "F:2", "last_ts": 2, "len": 500, "c": "const"})
        ]
    );
    assert_eq!(out[0].key, "3", "a numeric key as its JSON text");
}

#[test]
fn windows_before_the_epoch_and_ticks_of_stateless_rules() {
    let mut r = runner("SELECT count(*) AS n, window_start() AS ws FROM 'm' WINDOW TUMBLING(10)");
    send(&mut r, "m", -1, json!({}));
    let out = send(&mut r, "m", 0, json!({}));
    assert_eq!(values(&out), vec![json!({"n": 1, "ws": -10_000})]);
    let mut r = runner("SELECT * FROM 'm'");
    let mut out = Vec::new();
    r.tick(i64::MAX, &NoLookup, &mut out).unwrap();
    assert!(out.is_empty());
}

struct Sites;

impl ferrohub_rules::Lookup for Sites {
    fn twin(&self, _: &str, _: &str) -> Option<Value> {
        None
    }
    fn device(&self, tenant: &str, device: &str) -> Option<Value> {
        (tenant == "acme").then(|| json!({"tags": {"site": format!("site-of-{device}")}}))
    }
}

#[test]
fn lookups_at_window_close_stay_in_the_tenant() {
    let rule = Arc::new(
        Rule::compile(
            "SELECT device(concat('d', max(v))).tags.site AS site FROM 'm' WINDOW TUMBLING(1)",
        )
        .unwrap(),
    );
    let mut r = RuleRunner::new(rule, RunnerLimits::default());
    let mut out = Vec::new();
    let p = json!({"v": 7});
    r.on_message(
        &MessageContext::new("acme", "m", &p).at(0),
        &Sites,
        &mut out,
    )
    .unwrap();
    r.tick(1_000, &Sites, &mut out).unwrap();
    assert_eq!(values(&out), vec![json!({"site": "site-of-d7"})]);
}
