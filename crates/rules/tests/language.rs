//! The language as a table of cases: grammar, every function, Undefined vs Null, coercions, errors.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic on failure.

use ferrohub_rules::{CompiledRule, EvalError, Lookup, MessageContext, NoLookup, Rule};
use serde_json::{Value, json};

fn payload() -> Value {
    json!({
        "temperature": 31.5,
        "humidity": 40,
        "name": "Pump-7",
        "s_num": "12",
        "s_dec": "2.5",
        "s_bad": "abc",
        "s_true": "TRUE",
        "flag": true,
        "nothing": null,
        "a": {"b": [10, {"c": "deep"}, 30], "e": {"f": 1}},
        "list": [1, 2, 3],
        "whole": 10.0,
        "big": 9223372036854775807i64,
        "poly": [[0, 0], [0, 10], [10, 10], [10, 0]],
        "text": "  padded  ",
        "b64": "aGVsbG8=",
        "hy-phen": 5
    })
}

fn ctx(p: &Value) -> MessageContext<'_> {
    MessageContext {
        tenant: "acme",
        topic: "devices/d1/telemetry",
        client_id: "client-1",
        principal: "device:d1",
        device: Some("d1"),
        timestamp_ms: 1_700_000_000_123,
        payload: p,
    }
}

/// `SELECT VALUE <expr>`: `None` when the expression is Undefined.
fn value_of(expr: &str) -> Option<Value> {
    let p = payload();
    let rule = Rule::compile(&format!("SELECT VALUE {expr} FROM '#'"))
        .unwrap_or_else(|e| panic!("{expr}: {e}"));
    rule.evaluate(&ctx(&p), &NoLookup).unwrap()
}

fn run(sql: &str) -> Option<Value> {
    let p = payload();
    Rule::compile(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .evaluate(&ctx(&p), &NoLookup)
        .unwrap()
}

fn err(sql: &str) -> ferrohub_rules::RuleError {
    match Rule::compile(sql) {
        Ok(_) => panic!("{sql} compiled"),
        Err(e) => e,
    }
}

const U: Option<Value> = None;

fn check(cases: &[(&str, Option<Value>)]) {
    let mut failures = Vec::new();
    for (expr, want) in cases {
        let got = value_of(expr);
        if &got != want {
            failures.push(format!("{expr}: got {got:?}, want {want:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn paths_and_undefined() {
    check(&[
        ("temperature", Some(json!(31.5))),
        ("a.b[0]", Some(json!(10))),
        ("a.b[1].c", Some(json!("deep"))),
        ("a.b[-1]", Some(json!(30))),
        ("a.b[7]", U),
        ("a.missing.deeper", U),
        ("missing", U),
        ("nothing", Some(Value::Null)),
        ("a.e", Some(json!({"f": 1}))),
        ("a['e'].f", Some(json!(1))),
        ("list[1 + 1]", Some(json!(3))),
        ("\"hy-phen\"", Some(json!(5))),
        ("get(a, 'e')", Some(json!({"f": 1}))),
        ("get(list, 0)", Some(json!(1))),
        ("whole", Some(json!(10))),
        ("name.x", U),
        ("list.x", U),
    ]);
}

#[test]
fn undefined_vs_null_table() {
    check(&[
        ("nothing IS NULL", Some(json!(true))),
        ("missing IS NULL", Some(json!(false))),
        ("missing IS UNDEFINED", Some(json!(true))),
        ("nothing IS UNDEFINED", Some(json!(false))),
        ("missing IS NOT UNDEFINED", Some(json!(false))),
        ("nothing IS NOT NULL", Some(json!(false))),
        ("isUndefined(missing)", Some(json!(true))),
        ("isUndefined(nothing)", Some(json!(false))),
        ("isNull(nothing)", Some(json!(true))),
        ("isNull(missing)", Some(json!(false))),
        ("missing = 1", U),
        ("missing <> 1", U),
        ("nothing = NULL", Some(json!(true))),
        ("nothing = 0", Some(json!(false))),
        ("missing + 1", U),
        ("nothing + 1", U),
        ("NOT missing", U),
        ("get_or_default(missing, 7)", Some(json!(7))),
        ("get_or_default(nothing, 7)", Some(json!(7))),
        ("get_or_default(humidity, 7)", Some(json!(40))),
        ("concat(name, missing)", U),
        ("upper(missing)", U),
        ("abs(nothing)", U),
    ]);
}

#[test]
fn arithmetic_and_coercion_table() {
    check(&[
        ("1 + 2", Some(json!(3))),
        ("7 / 2", Some(json!(3))),
        ("7.0 / 2", Some(json!(3.5))),
        ("7 % 3", Some(json!(1))),
        ("-7 % 3", Some(json!(-1))),
        ("2 * 3.5", Some(json!(7.0))),
        ("1 / 0", U),
        ("1.5 / 0", U),
        ("5 % 0", U),
        ("s_num + 1", Some(json!(13))),
        ("s_dec * 2", Some(json!(5.0))),
        ("s_bad + 1", U),
        ("flag + 1", U),
        ("list + 1", U),
        ("big + 1", Some(json!(9223372036854775808.0))),
        ("-temperature", Some(json!(-31.5))),
        ("-(humidity)", Some(json!(-40))),
        ("-s_num", Some(json!(-12))),
        ("2 + 3 * 4", Some(json!(14))),
        ("(2 + 3) * 4", Some(json!(20))),
        ("10 - 2 - 3", Some(json!(5))),
        ("1e3", Some(json!(1000.0))),
    ]);
}

#[test]
fn comparison_and_logic_table() {
    check(&[
        ("temperature > 30", Some(json!(true))),
        ("temperature >= 31.5", Some(json!(true))),
        ("temperature < 31.5", Some(json!(false))),
        ("humidity <= 40", Some(json!(true))),
        ("humidity = 40.0", Some(json!(true))),
        ("humidity != 40", Some(json!(false))),
        ("s_num = 12", Some(json!(true))),
        ("s_num > 11", Some(json!(true))),
        ("s_bad > 1", U),
        ("s_bad = 1", Some(json!(false))),
        ("name = 'Pump-7'", Some(json!(true))),
        ("'a' < 'b'", Some(json!(true))),
        ("flag = true", Some(json!(true))),
        ("list = list", Some(json!(true))),
        ("flag > 1", U),
        ("true AND false", Some(json!(false))),
        ("true OR false", Some(json!(true))),
        ("s_true AND true", Some(json!(true))),
        ("NOT flag", Some(json!(false))),
        ("NOT s_true", Some(json!(false))),
        ("humidity AND true", U),
        ("false AND missing", Some(json!(false))),
        ("true OR missing", Some(json!(true))),
        ("true AND missing", U),
        ("1 = 1 AND 2 = 2 OR 1 = 2", Some(json!(true))),
        ("NOT 1 = 2", Some(json!(true))),
    ]);
}

#[test]
fn case_expressions() {
    check(&[
        (
            "CASE WHEN temperature > 30 THEN 'hot' ELSE 'ok' END",
            Some(json!("hot")),
        ),
        (
            "CASE WHEN temperature > 40 THEN 'hot' ELSE 'ok' END",
            Some(json!("ok")),
        ),
        ("CASE WHEN temperature > 40 THEN 'hot' END", U),
        (
            "CASE humidity WHEN 30 THEN 'a' WHEN 40 THEN 'b' ELSE 'c' END",
            Some(json!("b")),
        ),
        ("CASE name WHEN 'x' THEN 1 END", U),
        ("CASE WHEN missing THEN 1 ELSE 2 END", Some(json!(2))),
        (
            "case when true then case when false then 1 else 2 end end",
            Some(json!(2)),
        ),
    ]);
}

#[test]
fn math_functions() {
    check(&[
        ("abs(-3)", Some(json!(3))),
        ("abs(-3.5)", Some(json!(3.5))),
        ("abs('-5.123')", Some(json!(5.123))),
        ("ceil(1.2)", Some(json!(2))),
        ("floor(1.8)", Some(json!(1))),
        ("floor(-1.2)", Some(json!(-2))),
        ("round(2.5)", Some(json!(3))),
        ("round(1.2345, 2)", Some(json!(1.23))),
        ("round(7)", Some(json!(7))),
        ("trunc(2.7)", Some(json!(2))),
        ("power(2, 10)", Some(json!(1024))),
        ("power(2.0, 0.5)", Some(json!(std::f64::consts::SQRT_2))),
        ("sqrt(16)", Some(json!(4.0))),
        ("sqrt(-1)", U),
        ("ln(1)", Some(json!(0.0))),
        ("log(1000)", Some(json!(3.0))),
        ("exp(0)", Some(json!(1.0))),
        ("mod(7, 3)", Some(json!(1))),
        ("mod(7.5, 2)", Some(json!(1.5))),
        ("sign(-4)", Some(json!(-1))),
        ("sign(0)", Some(json!(0))),
        ("sign(2.5)", Some(json!(1))),
        ("sin(0)", Some(json!(0.0))),
        ("cos(0)", Some(json!(1.0))),
        ("atan2(0, 1)", Some(json!(0.0))),
        ("abs('x')", U),
    ]);
}

#[test]
fn string_functions() {
    check(&[
        ("lower(name)", Some(json!("pump-7"))),
        ("upper(name)", Some(json!("PUMP-7"))),
        ("concat(name, '/', humidity)", Some(json!("Pump-7/40"))),
        ("concat(list, [4])", Some(json!([1, 2, 3, 4]))),
        ("concat(list, 4)", Some(json!([1, 2, 3, 4]))),
        ("name || '!'", Some(json!("Pump-7!"))),
        ("'t=' || temperature", Some(json!("t=31.5"))),
        ("length(name)", Some(json!(6))),
        ("char_length('héllo')", Some(json!(5))),
        ("length(list)", Some(json!(3))),
        ("substring(name, 0, 4)", Some(json!("Pump"))),
        ("substring(name, 5)", Some(json!("7"))),
        ("substring(name, 4, 2)", Some(json!(""))),
        ("substring(name, -3, 100)", Some(json!("Pump-7"))),
        ("trim(text)", Some(json!("padded"))),
        ("ltrim(text)", Some(json!("padded  "))),
        ("rtrim(text)", Some(json!("  padded"))),
        ("replace(name, '-', '_')", Some(json!("Pump_7"))),
        ("startswith(name, 'Pu')", Some(json!(true))),
        ("endswith(name, '8')", Some(json!(false))),
        ("indexof(name, '-')", Some(json!(4))),
        ("regexp_matches(name, '^P[a-z]+-\\d$')", Some(json!(true))),
        ("regexp_matches(name, '^x')", Some(json!(false))),
        ("regexp_replace(name, '[0-9]', '#')", Some(json!("Pump-#"))),
        ("regexp_substr(name, '[0-9]+')", Some(json!("7"))),
        ("regexp_matches(name, concat('^', 'P'))", Some(json!(true))),
        ("upper(humidity)", U),
    ]);
}

#[test]
fn conversion_and_hashing() {
    check(&[
        ("cast(temperature AS Int)", Some(json!(31))),
        ("cast('42' AS Int)", Some(json!(42))),
        ("cast('4.9' AS Int)", Some(json!(4))),
        ("cast(true AS Int)", Some(json!(1))),
        ("cast(humidity AS Decimal)", Some(json!(40.0))),
        ("cast(humidity AS String)", Some(json!("40"))),
        ("cast('true' AS Boolean)", Some(json!(true))),
        ("cast(0 AS Boolean)", Some(json!(false))),
        ("cast('x' AS Int)", U),
        ("encode(name, 'base64')", Some(json!("UHVtcC03"))),
        ("decode(b64, 'base64')", Some(json!("hello"))),
        ("decode('!!!', 'base64')", U),
        ("encode('hi', 'hex')", Some(json!("6869"))),
        (
            "md5('hello')",
            Some(json!("5d41402abc4b2a76b9719d911017c592")),
        ),
        (
            "sha1('hello')",
            Some(json!("aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d")),
        ),
        (
            "sha256('hello')",
            Some(json!(
                "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
            )),
        ),
        ("isString(name)", Some(json!(true))),
        ("isString(humidity)", Some(json!(false))),
        ("isNumber(humidity)", Some(json!(true))),
        ("isNumber(s_num)", Some(json!(false))),
        ("isBoolean(flag)", Some(json!(true))),
        ("isArray(list)", Some(json!(true))),
        ("isObject(a)", Some(json!(true))),
        ("typeof(temperature)", Some(json!("Decimal"))),
        ("typeof(humidity)", Some(json!("Int"))),
        ("typeof(missing)", Some(json!("Undefined"))),
    ]);
}

#[test]
fn context_functions() {
    check(&[
        ("topic()", Some(json!("devices/d1/telemetry"))),
        ("topic(1)", Some(json!("devices"))),
        ("topic(2)", Some(json!("d1"))),
        ("topic(4)", U),
        ("topic(0)", U),
        ("clientid()", Some(json!("client-1"))),
        ("principal()", Some(json!("device:d1"))),
        ("tenant()", Some(json!("acme"))),
        ("timestamp()", Some(json!(1_700_000_000_123i64))),
    ]);
    let a = value_of("newuuid()").unwrap();
    let b = value_of("newuuid()").unwrap();
    let s = a.as_str().unwrap();
    assert_eq!(s.len(), 36);
    assert_eq!(&s[14..15], "4");
    assert_ne!(a, b);
}

#[test]
fn geofence_functions() {
    check(&[
        ("st_contains(poly, 5, 5)", Some(json!(true))),
        ("st_contains(poly, 15, 5)", Some(json!(false))),
        ("st_contains([[0,0],[0,4],[4,0]], 1, 1)", Some(json!(true))),
        ("st_contains([[0,0],[0,4],[4,0]], 3, 3)", Some(json!(false))),
        ("st_contains(name, 1, 1)", U),
        ("st_contains([[0,0],[1,1]], 1, 1)", U),
        ("st_distance(0, 0, 0, 0)", Some(json!(0.0))),
        ("st_distance(0, 0, 'x', 0)", U),
    ]);
    // Paris → London is about 343.5 km.
    let d = value_of("st_distance(48.8566, 2.3522, 51.5074, -0.1278)")
        .unwrap()
        .as_f64()
        .unwrap();
    assert!((d - 343_500.0).abs() < 1_500.0, "{d}");
    // One degree of latitude ≈ 111.2 km.
    let d = value_of("st_distance(0, 0, 1, 0)")
        .unwrap()
        .as_f64()
        .unwrap();
    assert!((d - 111_195.0).abs() < 50.0, "{d}");
}

#[test]
fn select_shapes() {
    assert_eq!(run("SELECT * FROM '#'"), Some(payload()));
    assert_eq!(
        run("SELECT temperature, a.b[1].c AS c FROM '#'"),
        Some(json!({"temperature": 31.5, "c": "deep"}))
    );
    // Undefined fields are dropped, Null kept.
    assert_eq!(
        run("SELECT missing, nothing, humidity AS h FROM '#'"),
        Some(json!({"nothing": null, "h": 40}))
    );
    assert_eq!(run("SELECT a.b[0] FROM '#'"), Some(json!({"_1": 10})));
    assert_eq!(run("SELECT a.e.f FROM '#'"), Some(json!({"f": 1})));
    assert_eq!(
        run("SELECT upper(name) FROM '#'"),
        Some(json!({"upper": "PUMP-7"}))
    );
    assert_eq!(run("SELECT 1 + 1 FROM '#'"), Some(json!({"_1": 2})));
    assert_eq!(
        run("SELECT a.e AS nested FROM '#'"),
        Some(json!({"nested": {"f": 1}}))
    );
    let all = run("SELECT *, topic(2) AS device FROM '#'").unwrap();
    assert_eq!(all["device"], json!("d1"));
    assert_eq!(all["temperature"], json!(31.5));
    assert_eq!(run("SELECT VALUE missing FROM '#'"), None);
    assert_eq!(
        run("SELECT [humidity, missing, 1] AS arr FROM '#'"),
        Some(json!({"arr": [40, 1]}))
    );
    assert_eq!(
        run("select Temperature from '#'"),
        Some(json!({})),
        "keys are case-sensitive"
    );
    assert_eq!(
        run("SELECT \"hy-phen\" AS h FROM '#'"),
        Some(json!({"h": 5}))
    );
}

#[test]
fn where_semantics() {
    assert!(run("SELECT * FROM '#' WHERE temperature > 30").is_some());
    assert!(run("SELECT * FROM '#' WHERE temperature > 40").is_none());
    assert!(
        run("SELECT * FROM '#' WHERE missing > 1").is_none(),
        "Undefined is not true"
    );
    assert!(
        run("SELECT * FROM '#' WHERE nothing").is_none(),
        "Null is not true"
    );
    assert!(run("SELECT * FROM '#' WHERE 1").is_none(), "1 is not true");
    assert!(
        run("SELECT * FROM '#' WHERE s_true").is_none(),
        "WHERE wants a Boolean"
    );
    assert!(run("SELECT * FROM '#' WHERE NOT (missing > 1)").is_none());
    assert!(run("SELECT * FROM '#' WHERE missing IS UNDEFINED AND nothing IS NULL").is_some());
    assert!(run("-- a comment\nSELECT * FROM '#' -- trailing\nWHERE true").is_some());
}

#[test]
fn topic_filters() {
    let r = Rule::compile("SELECT * FROM 'devices/+/telemetry'").unwrap();
    assert!(r.matches_topic("devices/d1/telemetry"));
    assert!(!r.matches_topic("devices/d1/telemetry/x"));
    assert!(!r.matches_topic("devices/telemetry"));
    let r = Rule::compile("SELECT * FROM 'devices/#'").unwrap();
    assert!(r.matches_topic("devices/a/b/c"));
    assert!(r.matches_topic("devices"));
    assert!(!r.matches_topic("other/a"));
    let r = Rule::compile("SELECT * FROM '#'").unwrap();
    assert!(
        !r.matches_topic("$SYS/x"),
        "$ topics are not matched by a leading wildcard"
    );
    assert_eq!(r.topic_filter().as_str(), "#");
}

#[test]
fn parse_errors_point_at_line_and_column() {
    let cases: &[(&str, u32, u32, &str)] = &[
        ("SELECT avgg(x) FROM 't'", 1, 8, "unknown function `avgg`"),
        ("SELECT uper(x) FROM 't'", 1, 8, "unknown function `uper`"),
        ("SELECT x FROM 't' WHERE", 1, 24, "expected an expression"),
        (
            "SELECT x\nFROM t",
            2,
            6,
            "expected the topic filter as a quoted string",
        ),
        ("SELECT x", 1, 9, "expected `FROM`"),
        ("SELEC x FROM 't'", 1, 1, "expected `SELECT`"),
        ("SELECT x FROM 'a/#/b'", 1, 15, "invalid topic filter"),
        ("SELECT 'abc FROM 't'", 1, 20, "unterminated string"),
        (
            "SELECT x FROM 't' WHERE a ==\n b",
            1,
            28,
            "expected an expression",
        ),
        ("SELECT x FROM 't'\n  WHERE (a > 1", 2, 15, "expected `)`"),
        (
            "SELECT abs(1, 2) FROM 't'",
            1,
            8,
            "`abs` takes 1 argument(s), 2 given",
        ),
        ("SELECT avg(x) FROM 't'", 1, 8, "needs a WINDOW clause"),
        (
            "SELECT x FROM 't' WHERE x > 1 GARBAGE",
            1,
            31,
            "expected the end of the rule",
        ),
        (
            "SELECT cast(x AS Money) FROM 't'",
            1,
            8,
            "unknown type `Money`",
        ),
        (
            "SELECT regexp_matches(x, '(') FROM 't'",
            1,
            8,
            "invalid regular expression",
        ),
        ("SELECT x FROM 't' WINDOW SLIDING(5)", 1, 26, "TUMBLING"),
        (
            "SELECT avg(x) FROM 't' WINDOW HOPPING(10, 20)",
            1,
            43,
            "step must not exceed",
        ),
        (
            "SELECT avg(x) FROM 't' WINDOW TUMBLING(0)",
            1,
            40,
            "positive",
        ),
        (
            "SELECT * FROM 't' WINDOW TUMBLING(5)",
            1,
            8,
            "`SELECT *` cannot be used with WINDOW",
        ),
        (
            "SELECT x FROM 't' WHERE avg(x) > 1 WINDOW TUMBLING(5)",
            1,
            25,
            "aggregates cannot be used in WHERE",
        ),
        (
            "SELECT lag(x) FROM 't' WINDOW TUMBLING(5)",
            1,
            8,
            "keeps per-key state",
        ),
        (
            "SELECT ewma_zscore(x, 2) FROM 't'",
            1,
            8,
            "smoothing factor",
        ),
        (
            "SELECT percentile(x, 101) FROM 't' WINDOW TUMBLING(5)",
            1,
            8,
            "from 0 to 100",
        ),
        ("SELECT window_start() FROM 't'", 1, 8, "only available"),
        (
            "SELECT x FROM 't' WHERE x # 1",
            1,
            27,
            "unexpected character `#`",
        ),
        ("SELECT select FROM 't'", 1, 8, "keyword"),
        ("SELECT {} FROM 't'", 1, 8, "object literals"),
    ];
    let mut failures = Vec::new();
    for (sql, line, col, msg) in cases {
        let e = err(sql);
        if (e.line, e.column) != (*line, *col) || !e.message.contains(msg) {
            failures.push(format!(
                "{sql:?}: got {}:{} {:?}",
                e.line, e.column, e.message
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let e = err("SELECT avgg(x) FROM 't'");
    assert_eq!(
        e.to_string(),
        "unknown function `avgg` at 1:8 — did you mean `avg`?"
    );
    assert_eq!(e.hint.as_deref(), Some("did you mean `avg`?"));
    assert_eq!(
        err("SELECT uper(x) FROM 't'").hint.as_deref(),
        Some("did you mean `upper`?")
    );
    assert_eq!(
        err("SELECT stddev_samp(x) FROM 't'").hint.as_deref(),
        Some("did you mean `stddev`?")
    );
    let e = err("SELECT qqqqqqqq(x) FROM 't'");
    assert_eq!(e.hint.as_deref(), Some("docs/rules.md lists the functions"));
    assert!(err("SELECT x FROM 't' WHERE").hint.is_none());
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let sql = format!("SELECT {}1{} FROM 't'", "(".repeat(200), ")".repeat(200));
    assert!(err(&sql).message.contains("nested too deeply"));
    let sql = format!("SELECT {}1 FROM 't'", "NOT ".repeat(200));
    assert!(err(&sql).message.contains("nested too deeply"));
    let sql = format!("SELECT {}1 FROM 't'", "- ".repeat(200));
    assert!(err(&sql).message.contains("nested too deeply"));
    for op in ["+", "*", "||", "AND", "OR"] {
        let sql = format!("SELECT 1{} FROM 't'", format!(" {op} 1").repeat(100_000));
        assert!(err(&sql).message.contains("nested too deeply"), "{op}");
    }
    let sql = format!("SELECT a{} FROM 't'", ".b".repeat(100_000));
    assert!(err(&sql).message.contains("nested too deeply"));
    let sql = format!("SELECT a{} FROM 't'", "[0]".repeat(100_000));
    assert!(err(&sql).message.contains("nested too deeply"));
    // Long but flat is fine.
    let sql = format!("SELECT 1{} FROM 't'", " + 1".repeat(60));
    assert!(Rule::compile(&sql).is_ok());
}

struct MapLookup;

impl Lookup for MapLookup {
    fn twin(&self, tenant: &str, device: &str) -> Option<Value> {
        (tenant == "acme" && device == "d1")
            .then(|| json!({"reported": {"x": 5, "fw": "1.2"}, "desired": {"x": 6}}))
    }
    fn device(&self, tenant: &str, device: &str) -> Option<Value> {
        (tenant == "acme" && (device == "d1" || device == "d2"))
            .then(|| json!({"tags": {"site": format!("site-{device}")}}))
    }
}

#[test]
fn lookups() {
    let p = payload();
    let m = ctx(&p);
    let eval = |sql: &str| {
        Rule::compile(sql)
            .unwrap()
            .evaluate(&m, &MapLookup)
            .unwrap()
    };
    assert_eq!(
        eval(
            "SELECT twin().reported.x AS x, device().tags.site AS site, device('d2').tags.site AS other FROM '#'"
        ),
        Some(json!({"x": 5, "site": "site-d1", "other": "site-d2"}))
    );
    assert_eq!(
        eval("SELECT twin(topic(2)).desired.x AS x FROM '#'"),
        Some(json!({"x": 6}))
    );
    assert_eq!(
        eval("SELECT twin('nope').reported.x AS x FROM '#'"),
        Some(json!({}))
    );
    assert_eq!(
        eval("SELECT * FROM '#' WHERE twin().reported.x < temperature"),
        Some(payload())
    );
    // Another tenant sees nothing.
    let other = MessageContext {
        tenant: "other",
        ..m
    };
    let r = Rule::compile("SELECT twin().reported.x AS x FROM '#'").unwrap();
    assert_eq!(r.evaluate(&other, &MapLookup).unwrap(), Some(json!({})));
    // Without device id the client id is used.
    let no_dev = MessageContext {
        device: None,
        client_id: "d2",
        ..m
    };
    let r = Rule::compile("SELECT device().tags.site AS s FROM '#'").unwrap();
    assert_eq!(
        r.evaluate(&no_dev, &MapLookup).unwrap(),
        Some(json!({"s": "site-d2"}))
    );
}

#[test]
fn stateful_rules_need_a_runner() {
    let p = payload();
    let r: CompiledRule = Rule::compile("SELECT lag(temperature) AS prev FROM '#'").unwrap();
    assert!(r.is_stateful());
    assert_eq!(r.evaluate(&ctx(&p), &NoLookup), Err(EvalError::NeedsState));
    let r = Rule::compile("SELECT avg(temperature) AS t FROM '#' WINDOW TUMBLING(60)").unwrap();
    assert!(r.is_stateful());
    assert!(!Rule::compile("SELECT * FROM '#'").unwrap().is_stateful());
}

#[test]
fn filter_only_path() {
    let p = payload();
    let r = Rule::compile("SELECT * FROM '#' WHERE temperature > 30 AND name = 'Pump-7'").unwrap();
    assert!(r.filter(&ctx(&p), &NoLookup).unwrap());
    let r = Rule::compile("SELECT * FROM '#' WHERE temperature > 40").unwrap();
    assert!(!r.filter(&ctx(&p), &NoLookup).unwrap());
}

#[test]
fn every_function_is_documented() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/rules.md"))
        .unwrap();
    let missing: Vec<_> = ferrohub_rules::function_names()
        .into_iter()
        .filter(|f| !doc.to_lowercase().contains(&format!("`{f}(")))
        .collect();
    assert!(
        missing.is_empty(),
        "functions missing from docs/rules.md: {missing:?}"
    );
}

#[test]
fn compiled_rules_can_be_shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<CompiledRule>();
    send::<ferrohub_rules::RuleRunner>();
    send::<ferrohub_rules::RuleSet>();
    send_sync::<ferrohub_rules::RuleError>();
}

#[test]
fn lookup_keys_name_the_records_a_message_needs() {
    use ferrohub_rules::LookupKind;
    let rule = ferrohub_rules::Rule::compile(
        "SELECT twin().reported.fw AS fw, device(topic(2)).tags.site AS site, \
         twin(lag(x)).reported.y AS stateful FROM 'devices/+/t' WHERE device(upper(owner)).tags.ok = 'y'",
    )
    .expect("compiles");
    assert!(rule.uses_lookups());
    let payload = serde_json::json!({"owner": "ops", "x": 1});
    let mut msg = ferrohub_rules::MessageContext::new("t", "devices/d7/t", &payload);
    msg.client_id = "client-7";
    let mut keys = Vec::new();
    rule.lookup_keys(&msg, &mut keys);
    keys.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        keys,
        vec![
            (LookupKind::Device, "OPS".to_string()),
            (LookupKind::Twin, "client-7".to_string()),
            (LookupKind::Device, "d7".to_string()),
        ],
        "an id from state (lag) cannot be known before evaluation; duplicates once"
    );
    let plain = ferrohub_rules::Rule::compile("SELECT * FROM '#'").expect("compiles");
    assert!(!plain.uses_lookups());
}
