//! Property tests: compiling arbitrary text and evaluating arbitrary JSON never panics.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic on failure.

use std::sync::Arc;

use ferrohub_rules::{MessageContext, NoLookup, Rule, RuleRunner, RunnerLimits};
use proptest::prelude::*;
use serde_json::Value;

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "[a-z0-9 .-]{0,8}".prop_map(Value::String),
        prop_oneof![
            Just("12"),
            Just("2.5"),
            Just("true"),
            Just("aGk="),
            Just("")
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("a".to_string()),
                    Just("b".to_string()),
                    Just("t".to_string()),
                    "[a-c]{1,2}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const TOKENS: &[&str] = &[
    "SELECT",
    "VALUE",
    "*",
    "FROM",
    "'a/+/b'",
    "'#'",
    "WHERE",
    "GROUP",
    "BY",
    "WINDOW",
    "TUMBLING",
    "HOPPING",
    "(",
    ")",
    "[",
    "]",
    ",",
    ".",
    "AS",
    "x",
    "a",
    "b",
    "t",
    "1",
    "-3",
    "2.5",
    "'s'",
    "+",
    "-",
    "/",
    "%",
    "||",
    "=",
    "<>",
    "<",
    ">=",
    "AND",
    "OR",
    "NOT",
    "IS",
    "NULL",
    "UNDEFINED",
    "CASE",
    "WHEN",
    "THEN",
    "ELSE",
    "END",
    "abs",
    "avg",
    "lag",
    "delta",
    "topic",
    "cast",
    "Int",
    "concat",
    "substring",
    "regexp_matches",
    "'('",
    "ewma_zscore",
    "0.5",
    "percentile",
    "count",
    "twin",
    "device",
    "st_contains",
    "get",
    "true",
    "\"q\"",
    "--",
    "\n",
    "{",
];

/// Rules that exercise most of the evaluator.
const RULES: &[&str] = &[
    "SELECT * FROM '#'",
    "SELECT a.b[0].c AS x, t * 2 + 1 AS y, t || 'x' AS z, -t AS n, t % 3 AS m, t / 0 AS d FROM '#' WHERE t > 1 OR a IS NULL",
    "SELECT CASE t WHEN 1 THEN 'one' ELSE concat(a, b) END AS c, abs(t), ceil(t), round(t, 2), power(t, t), sqrt(t), ln(t), log(t), sign(t), mod(t, a) FROM '#'",
    "SELECT lower(a), upper(b), length(a), substring(a, t, t), trim(a), replace(a, b, 'x'), startswith(a, b), endswith(a, b), regexp_matches(a, b), regexp_replace(a, '[0-9]', t) FROM '#'",
    "SELECT cast(t AS Int) AS i, cast(a AS Decimal) AS d, cast(b AS Boolean) AS bo, cast(* AS String) AS s, encode(*, 'base64') AS e, decode(a, 'base64') AS de, md5(*), sha256(a), get_or_default(a.b, t), isUndefined(b), isNumber(t) FROM '#'",
    "SELECT st_distance(t, a, b, t) AS d, st_contains(a, t, t) AS c, get(a, t) AS g, a[t] AS i, concat(a, b, t) AS cc FROM '#'",
    "SELECT lag(a) AS l, delta(t) AS d, rate_of_change(t) AS r, ewma_zscore(t, 0.1) AS z FROM '#' WHERE delta(t) <> 0 OR true GROUP BY b",
    "SELECT avg(t) AS a, min(t), max(t), count(*), sum(t), stddev(t), percentile(t, 50), b AS key FROM '#' GROUP BY b WINDOW HOPPING(2, 1)",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn compiling_arbitrary_text_never_panics(s in "\\PC{0,80}") {
        let _ = Rule::compile(&s);
    }

    #[test]
    fn compiling_token_soup_never_panics(toks in prop::collection::vec(prop::sample::select(TOKENS), 0..30)) {
        let sql = toks.join(" ");
        if let Ok(rule) = Rule::compile(&sql) {
            let p = serde_json::json!({"x": 1, "a": {"b": [1]}, "t": 2});
            let mut r = RuleRunner::new(Arc::new(rule), RunnerLimits::default());
            let mut out = Vec::new();
            let _ = r.on_message(&MessageContext::new("t", "a/x/b", &p).at(1_000), &NoLookup, &mut out);
            let _ = r.tick(10_000, &NoLookup, &mut out);
        }
    }

    #[test]
    fn evaluating_arbitrary_json_never_panics(payloads in prop::collection::vec((json(), prop_oneof![any::<i32>().prop_map(i64::from), any::<i64>()]), 1..8)) {
        for sql in RULES {
            let rule = Arc::new(Rule::compile(sql).unwrap());
            let mut r = RuleRunner::new(rule, RunnerLimits { max_keys: 3, ..RunnerLimits::default() });
            let mut out = Vec::new();
            for (p, t) in &payloads {
                let msg = MessageContext::new("acme", "a/b/c", p).at(*t);
                r.on_message(&msg, &NoLookup, &mut out).unwrap();
            }
            r.tick(i64::MAX, &NoLookup, &mut out).unwrap();
            for o in &out {
                // Every output is valid JSON text.
                let text = serde_json::to_string(&o.value).unwrap();
                let _: Value = serde_json::from_str(&text).unwrap();
            }
        }
    }
}
