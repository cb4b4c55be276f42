use proptest::prelude::*;

use super::*;

fn one(line: &str) -> LineProtocolPoint {
    let outcome = parse(line, Precision::Ns);
    assert_eq!(outcome.errors, vec![], "{line:?}");
    assert_eq!(outcome.points.len(), 1, "{line:?}");
    outcome.points.into_iter().next().unwrap()
}

fn one_with(line: &str, precision: Precision) -> LineProtocolPoint {
    let mut points = parse(line, precision).into_result().unwrap();
    assert_eq!(points.len(), 1);
    points.remove(0)
}

/// The reason a single line fails.
fn reason(line: &str) -> String {
    let outcome = parse(line, Precision::Ns);
    assert!(
        outcome.points.is_empty(),
        "{line:?} parsed: {:?}",
        outcome.points
    );
    assert_eq!(outcome.errors.len(), 1, "{line:?}");
    outcome.errors[0].reason.clone()
}

fn field(line: &str) -> Value {
    let point = one(line);
    assert_eq!(point.fields.len(), 1, "{line:?}");
    point.fields.into_iter().next().unwrap().1
}

fn tags(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn docs_example() {
    assert_eq!(
        one(r#"myMeasurement,tag1=value1,tag2=value2 fieldKey="fieldValue" 1556813561098000000"#),
        LineProtocolPoint {
            measurement: "myMeasurement".into(),
            tags: tags(&[("tag1", "value1"), ("tag2", "value2")]),
            fields: vec![("fieldKey".into(), Value::Str("fieldValue".into()))],
            ts_ms: Some(1_556_813_561_098),
        }
    );
    assert_eq!(
        one("measurementName,tagKey=tagValue fieldKey=\"fieldValue\" 1465839830100400200").ts_ms,
        Some(1_465_839_830_100)
    );
    let point = one("weather,location=us-midwest temperature=82,humidity=71i,ok=t");
    assert_eq!(point.ts_ms, None);
    assert_eq!(
        point.fields,
        vec![
            ("temperature".into(), Value::Float(82.0)),
            ("humidity".into(), Value::Int(71)),
            ("ok".into(), Value::Bool(true)),
        ]
    );
}

#[test]
fn floats() {
    for (text, want) in [
        ("1", 1.0),
        ("1.0", 1.0),
        ("-1.0", -1.0),
        ("-1.234456e+78", -1.234456e78),
        ("-1.5e3", -1500.0),
        ("1e5", 1e5),
        ("1E-5", 1e-5),
        ("1.5E+2", 150.0),
        (".5", 0.5),
        ("-.5", -0.5),
        ("1.", 1.0),
        ("0", 0.0),
        ("-0", -0.0),
        ("007", 7.0),
        ("1.7976931348623157e308", f64::MAX),
        ("4.9e-324", 4.9e-324),
        ("1e-400", 0.0),
    ] {
        assert_eq!(field(&format!("m x={text}")), Value::Float(want), "{text}");
    }
    for text in [
        "1.2.3", "e5", "-", ".", "-.", "1e", "1e+", "1e5.5", "+1", "NaN", "nan", "inf", "-Inf",
        "infinity", "1x", "0x10", "1_000", "1ee5", "--1", "1-",
    ] {
        let r = reason(&format!("m x={text}"));
        assert!(r.starts_with("invalid field value"), "{text}: {r}");
    }
    assert!(reason("m x=1e400").contains("out of range"));
    assert!(reason("m x=-1e400").contains("out of range"));
}

#[test]
fn integers() {
    for (text, want) in [
        ("1i", 1),
        ("0i", 0),
        ("-0i", 0),
        ("12485903i", 12_485_903),
        ("-12485903i", -12_485_903),
        ("9223372036854775807i", i64::MAX),
        ("-9223372036854775808i", i64::MIN),
        ("1u", 1),
        ("0u", 0),
        ("12485903u", 12_485_903),
        ("9223372036854775807u", i64::MAX),
    ] {
        assert_eq!(field(&format!("m x={text}")), Value::Int(want), "{text}");
    }
    assert!(reason("m x=9223372036854775808i").contains("out of the signed 64-bit range"));
    assert!(reason("m x=-9223372036854775809i").contains("out of the signed 64-bit range"));
    let r = reason("m x=9223372036854775808u");
    assert!(r.contains("larger than 9223372036854775807"), "{r}");
    assert!(reason("m x=18446744073709551615u").contains("larger than"));
    assert!(reason("m x=18446744073709551616u").contains("out of the 64-bit range"));
    for text in [
        "i", "-i", "u", "1.5i", "1e3i", "-1u", "1iu", "1ui", "1ii", "+1i", " 1i", "0x1i",
    ] {
        let r = reason(&format!("m x={text}"));
        assert!(
            r.starts_with("invalid field value") || r.starts_with("missing field value"),
            "{text}: {r}"
        );
    }
}

#[test]
fn booleans() {
    for text in ["t", "T", "true", "True", "TRUE"] {
        assert_eq!(field(&format!("m x={text}")), Value::Bool(true), "{text}");
    }
    for text in ["f", "F", "false", "False", "FALSE"] {
        assert_eq!(field(&format!("m x={text}")), Value::Bool(false), "{text}");
    }
    for text in ["tRUE", "truE", "yes", "tru", "fals", "FaLsE", "1b", "on"] {
        assert!(
            reason(&format!("m x={text}")).starts_with("invalid field value"),
            "{text}"
        );
    }
    // Quoted, a boolean is a string.
    assert_eq!(field("m x=\"true\""), Value::Str("true".into()));
}

#[test]
fn strings() {
    assert_eq!(field(r#"m x="""#), Value::Str(String::new()));
    assert_eq!(
        field(r#"m x="this is a string""#),
        Value::Str("this is a string".into())
    );
    assert_eq!(
        field(r#"myMeasurement fieldKey="\"string\" within a string""#),
        Value::Str("\"string\" within a string".into())
    );
    assert_eq!(
        field(r#"m x="back\\slash""#),
        Value::Str(r"back\slash".into())
    );
    // Other backslashes are literal, including `\n` (no newline escape).
    assert_eq!(
        field(r#"m x="a\nb\tc\,d""#),
        Value::Str(r"a\nb\tc\,d".into())
    );
    assert_eq!(
        field(r#"m x="trailing\\""#),
        Value::Str(r"trailing\".into())
    );
    assert_eq!(field(r#"m x="a\\\"b""#), Value::Str(r#"a\"b"#.into()));
    // Separators inside quotes are content.
    assert_eq!(field(r#"m x="a, b=c d""#), Value::Str("a, b=c d".into()));
    assert_eq!(field("m x=\"Launch 🚀\""), Value::Str("Launch 🚀".into()));
    assert_eq!(
        field("m x=\"tab\there\r\""),
        Value::Str("tab\there\r".into())
    );
    // Single quotes are not string delimiters.
    assert!(reason("m x='a'").starts_with("invalid field value"));

    assert!(reason(r#"m x="unterminated"#).starts_with("unterminated string"));
    assert!(reason(r#"m x="escaped at end\""#).starts_with("unterminated string"));
    assert!(reason(r#"m x="a"b"#).starts_with("unexpected character after a string"));
    assert!(reason(r#"m x="a""b""#).starts_with("unexpected character after a string"));
}

#[test]
fn raw_newline_in_a_string_breaks_the_line() {
    // The reference: line protocol does not support newlines in field values.
    let outcome = parse("m x=\"first\nsecond\" 1\nm y=1", Precision::Ns);
    assert_eq!(outcome.points.len(), 1);
    assert_eq!(outcome.points[0].fields[0].0, "y");
    let lines: Vec<_> = outcome.errors.iter().map(|e| e.line).collect();
    assert_eq!(lines, [1, 2]);
    assert!(outcome.errors[0].reason.starts_with("unterminated string"));
}

#[test]
fn string_then_more_fields_and_timestamp() {
    let point = one(r#"m s="a b",n=1i,b=f 1000000"#);
    assert_eq!(
        point.fields,
        vec![
            ("s".into(), Value::Str("a b".into())),
            ("n".into(), Value::Int(1)),
            ("b".into(), Value::Bool(false)),
        ]
    );
    assert_eq!(point.ts_ms, Some(1));
}

#[test]
fn escapes_in_names() {
    let point = one(r"my\ Measurement,tag\ Key1=tag\ Value1,tag\ Key2=tag\ Value2 fieldKey=100");
    assert_eq!(point.measurement, "my Measurement");
    assert_eq!(
        point.tags,
        tags(&[("tag Key1", "tag Value1"), ("tag Key2", "tag Value2")])
    );

    let point = one(r"cpu\,x,a\,b=c\,d,e\=f=g\=h k\ \,\=ey=1");
    assert_eq!(point.measurement, "cpu,x");
    assert_eq!(point.tags, tags(&[("a,b", "c,d"), ("e=f", "g=h")]));
    assert_eq!(point.fields[0].0, "k ,=ey");

    // `=` needs no escape in a measurement; `\=` there is a literal backslash and `=`.
    assert_eq!(one("a=b x=1").measurement, "a=b");
    assert_eq!(one(r"a\=b x=1").measurement, r"a\=b");
    // Quotes in names are literal.
    assert_eq!(one(r#""m",'t'="v" "f"=1"#).tags, tags(&[("'t'", "\"v\"")]));
    assert_eq!(one(r#""m" "f"=1"#).fields[0].0, "\"f\"");
    // Unicode.
    let point = one("m,tagKey=🍭 fieldKey=\"Launch 🚀\" 1556813561098000000");
    assert_eq!(point.tags, tags(&[("tagKey", "🍭")]));
}

#[test]
fn backslash_table_from_the_reference() {
    // Backslashes | interpreted as
    for (raw, want) in [
        (r"\", r"\"),
        (r"\\", r"\"),
        (r"\\\", r"\\"),
        (r"\\\\", r"\\"),
        (r"\\\\\", r"\\\"),
        (r"\\\\\\", r"\\\"),
    ] {
        let point = one(&format!("m{raw}x,t=v{raw}x f{raw}x=1"));
        assert_eq!(point.measurement, format!("m{want}x"), "{raw}");
        assert_eq!(point.tags, tags(&[("t", &format!("v{want}x"))]), "{raw}");
        assert_eq!(point.fields[0].0, format!("f{want}x"), "{raw}");
    }
    // A backslash before the separator escapes it: `a\ b=1` is one field key.
    assert_eq!(one(r"m a\ b=1").fields[0].0, "a b");
    // An escaped backslash before a separator does not escape it.
    let point = one(r"m,t=v\\ f=1");
    assert_eq!(point.tags, tags(&[("t", r"v\")]));
}

#[test]
fn tag_sets() {
    let point = one("cpu,host=a,region=eu-west,z=1 v=1");
    assert_eq!(
        point.tags,
        tags(&[("host", "a"), ("region", "eu-west"), ("z", "1")])
    );
    // Unsorted tags keep line order.
    let point = one("cpu,z=1,a=2 v=1");
    assert_eq!(point.tags, tags(&[("z", "1"), ("a", "2")]));
    assert_eq!(reason("cpu,=a v=1"), "missing tag key");
    assert_eq!(reason("cpu, v=1"), "missing tag key");
    assert_eq!(reason("cpu,a=b, v=1"), "missing tag key");
    assert_eq!(reason("cpu,,a=b v=1"), "missing tag key");
    assert!(reason("cpu,a= v=1").starts_with("missing tag value"));
    assert!(reason("cpu,a=,b=c v=1").starts_with("missing tag value"));
    assert!(reason("cpu,a v=1").starts_with("missing tag value"));
    assert!(reason("cpu,a,b=c v=1").starts_with("missing tag value"));
    assert!(reason("cpu,a=b=c v=1").starts_with("invalid tag value: unescaped `=`"));
    assert_eq!(reason("cpu,a=1,b=2,a=3 v=1"), "duplicate tag key `a`");
    // Many tags: the sorted duplicate check.
    let many: String = (0..40).map(|i| format!(",k{i}=v")).collect();
    assert_eq!(one(&format!("cpu{many} v=1")).tags.len(), 40);
    assert_eq!(
        reason(&format!("cpu{many},k7=x v=1")),
        "duplicate tag key `k7`"
    );
}

#[test]
fn structure_errors() {
    assert_eq!(reason(",a=b v=1"), "missing measurement");
    assert_eq!(reason(" ,a=b v=1"), "missing measurement");
    assert!(reason("cpu").starts_with("missing fields"));
    assert!(reason("cpu ").starts_with("missing fields"));
    assert!(reason("cpu   ").starts_with("missing fields"));
    assert!(reason("cpu,host=a").starts_with("missing fields"));
    assert!(reason("cpu,host=a ").starts_with("missing fields"));
    assert_eq!(reason("cpu =1"), "missing field key");
    assert_eq!(reason("cpu v=1,=2"), "missing field key");
    assert_eq!(reason("cpu v=1,"), "missing field key");
    assert_eq!(reason("cpu v=1, w=2"), "missing field key");
    assert_eq!(reason("cpu v="), "missing field value");
    assert_eq!(reason("cpu v= 1"), "missing field value");
    assert_eq!(reason("cpu v=,w=1"), "missing field value");
    assert!(reason("cpu v").starts_with("invalid field format: field `v` has no `=value`"));
    assert!(reason("cpu v w=1").starts_with("invalid field format"));
    assert!(reason("cpu v=1,w").starts_with("invalid field format"));
    assert!(reason("cpu v=1 abc").starts_with("invalid timestamp `abc`"));
    assert!(reason("cpu v=1 1.5").starts_with("invalid timestamp"));
    assert!(reason("cpu v=1 -").starts_with("invalid timestamp"));
    assert!(reason("cpu v=1 1e9").starts_with("invalid timestamp"));
    assert!(reason("cpu v=1 +5").starts_with("invalid timestamp"));
    assert_eq!(reason("cpu v=1 1 2"), "unexpected text after the timestamp");
    assert!(reason("cpu v=1 99999999999999999999").contains("out of range"));
}

#[test]
fn duplicate_fields_last_wins() {
    assert_eq!(
        one("m a=1i,b=2i,a=3i").fields,
        vec![("b".into(), Value::Int(2)), ("a".into(), Value::Int(3))]
    );
    assert_eq!(
        one("m a=1i,a=\"x\",a=t").fields,
        vec![("a".into(), Value::Bool(true))]
    );
    // Many fields: the sorted path.
    let mut line = String::from("m ");
    for i in 0..40 {
        line.push_str(&format!("f{i}={i}i,"));
    }
    line.push_str("f3=100i,f39=-1i");
    let fields = one(&line).fields;
    assert_eq!(fields.len(), 40);
    assert_eq!(fields[0], ("f0".into(), Value::Int(0)));
    assert_eq!(fields[37], ("f38".into(), Value::Int(38)));
    assert_eq!(fields[38], ("f3".into(), Value::Int(100)));
    assert_eq!(fields[39], ("f39".into(), Value::Int(-1)));
    assert!(!fields.iter().any(|(k, v)| k == "f3" && *v == Value::Int(3)));
}

#[test]
fn precisions() {
    let cases = [
        (
            Precision::Ns,
            1_556_813_561_098_123_456_i64,
            1_556_813_561_098_i64,
        ),
        (Precision::Us, 1_556_813_561_098_123, 1_556_813_561_098),
        (Precision::Ms, 1_556_813_561_098, 1_556_813_561_098),
        (Precision::S, 1_556_813_561, 1_556_813_561_000),
    ];
    for (precision, ts, want) in cases {
        assert_eq!(
            one_with(&format!("m v=1 {ts}"), precision).ts_ms,
            Some(want),
            "{precision}"
        );
    }
    // Negative timestamps round down.
    for (precision, ts, want) in [
        (Precision::Ns, -1, -1),
        (Precision::Ns, -1_000_000, -1),
        (Precision::Ns, -1_000_001, -2),
        (Precision::Us, -1, -1),
        (Precision::Us, -1_500, -2),
        (Precision::Ms, -5, -5),
        (Precision::S, -5, -5_000),
        (Precision::Ns, 0, 0),
        (Precision::Ns, 999_999, 0),
    ] {
        assert_eq!(
            one_with(&format!("m v=1 {ts}"), precision).ts_ms,
            Some(want),
            "{precision} {ts}"
        );
    }
    // The extremes of the reference's range.
    assert_eq!(
        one("m v=1 9223372036854775806").ts_ms,
        Some(9_223_372_036_854)
    );
    assert_eq!(
        one("m v=1 -9223372036854775806").ts_ms,
        Some(-9_223_372_036_855)
    );
    assert_eq!(
        one("m v=1 -9223372036854775808").ts_ms,
        Some(-9_223_372_036_855)
    );
    // Seconds that overflow once in milliseconds.
    assert_eq!(
        one_with("m v=1 9223372036854775", Precision::S).ts_ms,
        Some(9_223_372_036_854_775_000)
    );
    let outcome = parse("m v=1 9223372036854776", Precision::S);
    assert!(outcome.errors[0].reason.contains("out of range"));
    assert_eq!(
        one_with("m v=1 9223372036854775", Precision::Ms).ts_ms,
        Some(9_223_372_036_854_775)
    );
}

#[test]
fn precision_names() {
    for (text, want) in [
        ("ns", Precision::Ns),
        ("n", Precision::Ns),
        ("us", Precision::Us),
        ("u", Precision::Us),
        ("ms", Precision::Ms),
        ("s", Precision::S),
    ] {
        assert_eq!(Precision::from_query(text), Some(want), "{text}");
        assert_eq!(text.parse::<Precision>(), Ok(want));
    }
    for text in ["", "NS", "m", "h", "sec", "µs"] {
        assert_eq!(Precision::from_query(text), None, "{text}");
    }
    assert_eq!(
        "h".parse::<Precision>().unwrap_err().to_string(),
        "unknown precision `h` (expected ns, us, ms or s)"
    );
    assert_eq!(Precision::default(), Precision::Ns);
    for precision in [Precision::Ns, Precision::Us, Precision::Ms, Precision::S] {
        assert_eq!(Precision::from_query(precision.as_str()), Some(precision));
        let json = serde_json::to_string(&precision).unwrap();
        assert_eq!(json, format!("\"{precision}\""));
        assert_eq!(serde_json::from_str::<Precision>(&json).unwrap(), precision);
    }
}

#[test]
fn comments_blank_lines_and_line_ends() {
    let body = "# a comment\n\n   \n\t# indented comment\r\ncpu v=1 1000000\r\n\r\n  mem v=2i  \n#last\nnet v=3 2000000   ";
    let outcome = parse(body, Precision::Ns);
    assert_eq!(outcome.errors, vec![]);
    let got: Vec<_> = outcome
        .points
        .iter()
        .map(|p| (p.measurement.as_str(), p.ts_ms))
        .collect();
    assert_eq!(got, [("cpu", Some(1)), ("mem", None), ("net", Some(2))]);
    assert_eq!(outcome.lines, [5, 7, 9]);
    // `#` only starts a comment at the start of a line.
    assert_eq!(one("m v=\"#x\"").fields[0].1, Value::Str("#x".into()));
    assert_eq!(one("m#1 v=1").measurement, "m#1");
    // Empty bodies.
    assert_eq!(parse("", Precision::Ns), ParseOutcome::default());
    assert_eq!(parse("\n\r\n", Precision::Ns), ParseOutcome::default());
    // A lone `\r` in the middle of a line is content.
    assert_eq!(one("m\rx v=1").measurement, "m\rx");
}

#[test]
fn whitespace_between_sections() {
    let point = one("cpu,host=a   v=1,w=2     1000000   ");
    assert_eq!(point.fields.len(), 2);
    assert_eq!(point.ts_ms, Some(1));
    // Tabs are not separators: a tab does not end a measurement, and after a space it belongs
    // to the field key.
    assert!(reason("cpu\tv=1").starts_with("missing fields"));
    assert_eq!(one("cpu \tv=1").fields[0].0, "\tv");
    assert!(reason("cpu v=1\t1000000").starts_with("invalid field value"));
    assert!(reason("cpu v=1 1000000\t").starts_with("invalid timestamp"));
    // Leading tabs are blanks.
    assert_eq!(one("\t \tcpu v=1").measurement, "cpu");
}

#[test]
fn errors_carry_line_column_and_influx_message() {
    let body = "cpu v=1\n\n# c\ncpu,host=a v=\nmem v=1\ncpu v=bad";
    let outcome = parse(body, Precision::Ns);
    assert_eq!(outcome.points.len(), 2);
    assert_eq!(outcome.lines, [1, 5]);
    assert_eq!(outcome.failed_lines, 2);
    assert_eq!(
        outcome.errors,
        vec![
            LineError {
                line: 4,
                column: 14,
                text: "cpu,host=a v=".into(),
                reason: "missing field value".into(),
            },
            LineError {
                line: 6,
                column: 7,
                text: "cpu v=bad".into(),
                reason: outcome.errors[1].reason.clone(),
            },
        ]
    );
    assert_eq!(
        outcome.errors[0].to_string(),
        "unable to parse 'cpu,host=a v=': missing field value"
    );
    assert_eq!(outcome.first_error(), Some(&outcome.errors[0]));
    // Columns count the leading blanks; the text drops them.
    let outcome = parse("  cpu v=x", Precision::Ns);
    assert_eq!(
        (outcome.errors[0].column, outcome.errors[0].text.as_str()),
        (9, "cpu v=x")
    );
    // into_result: all or the first error.
    let err = parse(body, Precision::Ns).into_result().unwrap_err();
    assert_eq!(err.line, 4);
    assert_eq!(
        parse("a v=1\nb v=2", Precision::Ns)
            .into_result()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn error_reports_are_bounded() {
    let body = "bad\n".repeat(1000);
    let outcome = parse(&body, Precision::Ns);
    assert_eq!(outcome.failed_lines, 1000);
    assert_eq!(outcome.errors.len(), MAX_REPORTED_ERRORS);
    assert_eq!(outcome.errors.last().unwrap().line, MAX_REPORTED_ERRORS);
    // A long bad line is cut in the message.
    let long = format!("m v={}", "x".repeat(100_000));
    let outcome = parse(&long, Precision::Ns);
    let error = &outcome.errors[0];
    assert!(error.text.chars().count() <= 201, "{}", error.text.len());
    assert!(error.to_string().len() < 600);
}

#[test]
fn very_long_lines() {
    // A megabyte string field.
    let big = "y".repeat(1 << 20);
    let point = one(&format!("m,t=v s=\"{big}\" 1000000"));
    assert_eq!(point.fields[0].1, Value::Str(big));
    // Fifty thousand fields and tags.
    let fields: Vec<String> = (0..50_000).map(|i| format!("f{i}={i}i")).collect();
    let tag_set: String = (0..50_000).map(|i| format!(",t{i}=v")).collect();
    let point = one(&format!("m{tag_set} {} 5000000", fields.join(",")));
    assert_eq!(point.fields.len(), 50_000);
    assert_eq!(point.tags.len(), 50_000);
    assert_eq!(point.fields[49_999], ("f49999".into(), Value::Int(49_999)));
    assert_eq!(point.ts_ms, Some(5));
    // A long measurement name.
    let name = "m".repeat(100_000);
    assert_eq!(one(&format!("{name} v=1")).measurement, name);
}

// ---------------------------------------------------------------------------------------------
// Mapping.

const DEVICE_TAGS: &[&str] = &["device", "host"];

#[test]
fn mapping_basic() {
    let point = one("cpu,host=edge-1 usage=0.5,cores=4i 1700000000000000000");
    let (device, samples) = to_samples(point, DEVICE_TAGS).unwrap();
    assert_eq!(device, "edge-1");
    assert_eq!(
        samples,
        vec![
            Sample {
                metric: "cpu.usage".into(),
                ts_ms: Some(1_700_000_000_000),
                value: Value::Float(0.5),
            },
            Sample {
                metric: "cpu.cores".into(),
                ts_ms: Some(1_700_000_000_000),
                value: Value::Int(4),
            },
        ]
    );
    // No timestamp: None.
    let (_, samples) = to_samples(one("cpu,device=d v=\"x\""), DEVICE_TAGS).unwrap();
    assert_eq!(samples[0].ts_ms, None);
    assert_eq!(samples[0].value, Value::Str("x".into()));
}

#[test]
fn mapping_device_tag_preference() {
    // `device` is preferred over `host` whatever the tag order; `host` then stays a tag.
    let (device, samples) = to_samples(one("cpu,host=h,device=d v=1"), DEVICE_TAGS).unwrap();
    assert_eq!(device, "d");
    assert_eq!(samples[0].metric, "cpu.v{host=h}");
    let (device, samples) = to_samples(one("cpu,host=h,zone=z v=1"), DEVICE_TAGS).unwrap();
    assert_eq!(device, "h");
    assert_eq!(samples[0].metric, "cpu.v{zone=z}");
    // Custom device tags.
    let (device, _) = to_samples(one("cpu,serial=123,host=h v=1"), &["serial"]).unwrap();
    assert_eq!(device, "123");
}

#[test]
fn mapping_without_device() {
    let err = to_samples(one("cpu,zone=a v=1"), DEVICE_TAGS).unwrap_err();
    assert_eq!(
        err.to_string(),
        "point `cpu` names no device: add a tag `device` or `host` (for example `cpu,device=sensor-1 ...`)"
    );
    assert!(matches!(
        to_samples(one("cpu v=1"), DEVICE_TAGS),
        Err(MappingError::NoDeviceTag { .. })
    ));
    // Tag names are case-sensitive.
    assert!(to_samples(one("cpu,Device=x v=1"), DEVICE_TAGS).is_err());
    let err = to_samples(one("cpu,device=x v=1"), &[]).unwrap_err();
    assert!(
        err.to_string()
            .contains("no device tag names are configured"),
        "{err}"
    );
}

#[test]
fn mapping_invalid_device_ids() {
    // Device ids follow the registry's rule: 1-128 characters of A-Z a-z 0-9 . _ : -
    let long = "d".repeat(129);
    let long_line = format!("cpu,device={long} v=1,w=2");
    for (line, want) in [
        ("cpu,device=a/b v=1,w=2", "a/b"),
        ("cpu,device=x#y v=1,w=2", "x#y"),
        (r"cpu,host=a\ b v=1,w=2", "a b"),
        ("cpu,host=caf\u{e9} v=1,w=2", "caf\u{e9}"),
        (long_line.as_str(), long.as_str()),
        // The preferred tag names the device even when another tag would be valid.
        ("cpu,host=ok,device=$SYS v=1,w=2", "$SYS"),
        ("cpu,device=.. v=1,w=2", ".."),
    ] {
        let err = to_samples(one(line), DEVICE_TAGS).unwrap_err();
        let MappingError::InvalidDevice { device, fields, .. } = &err else {
            panic!("{line}: {err:?}");
        };
        assert_eq!(*fields, 2, "{line}");
        assert_eq!(*device, shorten(want, 80), "{line}");
        assert!(
            err.to_string()
                .ends_with(&format!("device ids are {}", ferrohub_types::id::ID_RULE)),
            "{err}"
        );
    }
    let err = to_samples(one("cpu,device=a/b v=1"), DEVICE_TAGS).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "device id \"a/b\" (tag `device`) is not valid: device ids are {}",
            ferrohub_types::id::ID_RULE
        )
    );
    let longest = "d".repeat(128);
    for ok in ["web1.example.com", "edge:1_a-B", longest.as_str()] {
        let (device, _) = to_samples(one(&format!("cpu,host={ok} v=1")), DEVICE_TAGS).unwrap();
        assert_eq!(device, ok);
    }
}

#[test]
fn mapping_tags_sorted_and_escaped() {
    let (_, samples) = to_samples(
        one("disk,zone=b,device=d,path=/var,az=1 free=1i,used=2i"),
        DEVICE_TAGS,
    )
    .unwrap();
    let metrics: Vec<_> = samples.iter().map(|s| s.metric.as_str()).collect();
    assert_eq!(
        metrics,
        [
            "disk.free{az=1,path=/var,zone=b}",
            "disk.used{az=1,path=/var,zone=b}"
        ]
    );
    // Characters that would make two tag sets look alike are escaped.
    let (_, a) = to_samples(one(r"m,device=d,k=a\,b\=c v=1"), DEVICE_TAGS).unwrap();
    let (_, b) = to_samples(one(r"m,device=d,k=a,b=c v=1"), DEVICE_TAGS).unwrap();
    assert_eq!(a[0].metric, r"m.v{k=a\,b\=c}");
    assert_eq!(b[0].metric, "m.v{b=c,k=a}");
    let (_, c) = to_samples(one(r"m,device=d,k}=x\\y v=1"), DEVICE_TAGS).unwrap();
    assert_eq!(c[0].metric, r"m.v{k\}=x\\y}");
    // Spaces and dots are kept as they are.
    let (_, d) = to_samples(one(r"my\ m,device=d,a\ b=c.d my\ f=1"), DEVICE_TAGS).unwrap();
    assert_eq!(d[0].metric, "my m.my f{a b=c.d}");
}

#[test]
fn mapping_metric_limits() {
    let long_field = "f".repeat(MAX_METRIC_LEN - 2);
    let (_, samples) = to_samples(one(&format!("m,device=d {long_field}=1")), DEVICE_TAGS).unwrap();
    assert_eq!(samples[0].metric.len(), MAX_METRIC_LEN);
    let too_long = "f".repeat(MAX_METRIC_LEN - 1);
    match to_samples(one(&format!("m,device=d {too_long}=1")), DEVICE_TAGS) {
        Err(e @ MappingError::InvalidMetric { .. }) => {
            assert!(e.to_string().contains("longer than the limit"), "{e}");
            assert!(e.to_string().len() < 400);
        }
        other => panic!("{other:?}"),
    }
    // Tags count towards the length.
    let tag = "t".repeat(MAX_METRIC_LEN);
    assert!(to_samples(one(&format!("m,device=d,x={tag} v=1")), DEVICE_TAGS).is_err());
    // Control characters (a tab is legal line protocol in a name).
    assert!(matches!(
        to_samples(one("m\tx,device=d v=1"), DEVICE_TAGS),
        Err(MappingError::InvalidMetric { .. })
    ));
    assert!(matches!(
        to_samples(one("m,device=d,k=a\u{1}b v=1"), DEVICE_TAGS),
        Err(MappingError::InvalidMetric { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Properties.

/// A serializer, to round-trip generated points.
fn write_point(point: &LineProtocolPoint, ts: Option<i64>, bool_spelling: usize) -> String {
    fn escape(out: &mut String, s: &str, special: &[char]) {
        for c in s.chars() {
            if c == '\\' || special.contains(&c) {
                out.push('\\');
            }
            out.push(c);
        }
    }
    let mut out = String::new();
    escape(&mut out, &point.measurement, &[',', ' ']);
    for (k, v) in &point.tags {
        out.push(',');
        escape(&mut out, k, &[',', '=', ' ']);
        out.push('=');
        escape(&mut out, v, &[',', '=', ' ']);
    }
    out.push(' ');
    for (i, (k, v)) in point.fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        escape(&mut out, k, &[',', '=', ' ']);
        out.push('=');
        match v {
            Value::Float(f) => out.push_str(&f.to_string()),
            Value::Int(n) if n % 2 == 0 && *n >= 0 => out.push_str(&format!("{n}u")),
            Value::Int(n) => out.push_str(&format!("{n}i")),
            Value::Bool(b) => {
                let spellings = if *b {
                    ["t", "T", "true", "True", "TRUE"]
                } else {
                    ["f", "F", "false", "False", "FALSE"]
                };
                out.push_str(spellings[bool_spelling % 5]);
            }
            Value::Str(s) => {
                out.push('"');
                escape(&mut out, s, &['"']);
                out.push('"');
            }
        }
    }
    if let Some(ts) = ts {
        out.push(' ');
        out.push_str(&ts.to_string());
    }
    out
}

/// Names: anything but newlines, with the characters that need escaping well represented.
fn arb_name() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            4 => prop::char::range('a', 'z'),
            1 => prop::sample::select(vec![',', '=', ' ', '\\', '"', '\'', '#', '\t', '\r', '{', '}', '.', 'é', '🚀']),
            1 => any::<char>().prop_filter("no newline", |c| *c != '\n'),
        ],
        1..8,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

fn arb_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::Float),
        (-1e6f64..1e6).prop_map(Value::Float),
        any::<i64>().prop_map(Value::Int),
        any::<bool>().prop_map(Value::Bool),
        prop::collection::vec(
            any::<char>().prop_filter("no newline", |c| *c != '\n'),
            0..8
        )
        .prop_map(|chars| Value::Str(chars.into_iter().collect())),
    ]
}

fn arb_point() -> impl Strategy<Value = (LineProtocolPoint, Precision, Option<i64>)> {
    let precision = prop::sample::select(vec![
        Precision::Ns,
        Precision::Us,
        Precision::Ms,
        Precision::S,
    ]);
    (
        arb_name().prop_filter("not a comment or blank start", |m| {
            !m.starts_with(['#', '\t'])
        }),
        prop::collection::btree_map(arb_name(), arb_name(), 0..4),
        prop::collection::btree_map(arb_name(), arb_value(), 1..5),
        precision,
        // Within what seconds can hold once in milliseconds.
        prop::option::of(-9_000_000_000_000_000i64 / 1000..9_000_000_000_000_000 / 1000),
    )
        .prop_map(|(measurement, tags, fields, precision, ts)| {
            let point = LineProtocolPoint {
                measurement,
                tags: tags.into_iter().collect(),
                fields: fields.into_iter().collect(),
                ts_ms: ts.map(|ts| precision.to_millis(ts).unwrap()),
            };
            (point, precision, ts)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC*", bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse(&text, Precision::Ns);
        let lossy = String::from_utf8_lossy(&bytes);
        for precision in [Precision::Ns, Precision::Us, Precision::Ms, Precision::S] {
            let outcome = parse(&lossy, precision);
            for point in outcome.points {
                let _ = to_samples(point, DEVICE_TAGS);
            }
        }
    }

    /// Text made of line protocol's own characters, where the parser's branches are.
    #[test]
    fn protocol_soup_never_panics(text in "[a-c,= \"\\\\\t\r\n#0-9.eiuftTF+-]{0,60}") {
        let outcome = parse(&text, Precision::S);
        for error in &outcome.errors {
            prop_assert!(error.line >= 1 && error.column >= 1);
            prop_assert!(!error.reason.is_empty());
        }
        for point in outcome.points {
            prop_assert!(!point.measurement.is_empty() && !point.fields.is_empty());
            let _ = to_samples(point, DEVICE_TAGS);
        }
    }

    /// Written points parse back to themselves, several per body, with any line ends.
    #[test]
    fn round_trip(points in prop::collection::vec(arb_point(), 1..4), spelling in 0usize..5, crlf in any::<bool>()) {
        for (point, precision, ts) in &points {
            let line = write_point(point, *ts, spelling);
            let parsed = parse(&line, *precision);
            prop_assert_eq!(&parsed.errors, &vec![], "{:?}", line);
            prop_assert_eq!(&parsed.points, &vec![point.clone()], "{:?}", line);
        }
        // All in one body (same precision for all: the first one's).
        let precision = points[0].1;
        let end = if crlf { "\r\n" } else { "\n" };
        let body: String = points
            .iter()
            .map(|(p, _, ts)| format!("{}{end}# comment{end}{end}", write_point(p, *ts, spelling)))
            .collect();
        let parsed = parse(&body, precision).into_result();
        prop_assert!(parsed.is_ok(), "{:?}", body);
        let parsed = parsed.unwrap_or_default();
        prop_assert_eq!(parsed.len(), points.len());
        for (got, (want, _, ts)) in parsed.iter().zip(&points) {
            prop_assert_eq!(&got.fields, &want.fields);
            prop_assert_eq!(got.ts_ms, ts.map(|ts| precision.to_millis(ts).unwrap()));
        }
    }
}
