use proptest::prelude::*;
use serde_json::json;

use super::*;

fn cbor(value: &serde_json::Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).unwrap();
    out
}

fn msgpack(value: &serde_json::Value) -> Vec<u8> {
    rmp_serde::to_vec(value).unwrap()
}

fn limits() -> DecodeLimits {
    DecodeLimits::default()
}

fn sample(metric: &str, ts_ms: Option<i64>, value: Value) -> Sample {
    Sample {
        metric: metric.to_owned(),
        ts_ms,
        value,
    }
}

/// Decodes `value` encoded as JSON, CBOR and MessagePack, each with its explicit format and with
/// Auto; all six results must be equal. Returns the JSON one.
fn decode_all(
    value: &serde_json::Value,
    prefix: Option<&str>,
    limits: &DecodeLimits,
) -> Result<Vec<Sample>, DecodeError> {
    let json_bytes = serde_json::to_vec(value).unwrap();
    let cbor_bytes = cbor(value);
    let msgpack_bytes = msgpack(value);
    // serde_json's map may be sorted or not (a feature elsewhere in the workspace can change it):
    // compare in metric order (stable, so batches keep their order).
    let sorted = |r: Result<Vec<Sample>, DecodeError>| {
        r.map(|mut samples| {
            samples.sort_by(|a, b| a.metric.cmp(&b.metric));
            samples
        })
    };
    let from_json = sorted(decode(&json_bytes, PayloadFormat::Json, prefix, limits));
    let mut cases = vec![
        (&json_bytes, PayloadFormat::Auto),
        (&cbor_bytes, PayloadFormat::Cbor),
        (&msgpack_bytes, PayloadFormat::MessagePack),
    ];
    // Auto cannot tell bare binary scalars apart (documented): only containers are compared.
    if value.is_object() || value.is_array() {
        cases.extend([
            (&cbor_bytes, PayloadFormat::Auto),
            (&msgpack_bytes, PayloadFormat::Auto),
        ]);
    }
    for (bytes, format) in cases {
        let other = sorted(decode(bytes, format, prefix, limits));
        match (&from_json, &other) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{format:?} of {value}"),
            (Err(a), Err(b)) => assert_eq!(
                std::mem::discriminant(a),
                std::mem::discriminant(b),
                "{format:?} of {value}: {a} vs {b}"
            ),
            _ => panic!("{format:?} of {value}: JSON gave {from_json:?}, this gave {other:?}"),
        }
    }
    from_json
}

fn ok(value: serde_json::Value) -> Vec<Sample> {
    decode_all(&value, None, &limits()).unwrap()
}

fn err(value: serde_json::Value) -> DecodeError {
    decode_all(&value, None, &limits()).unwrap_err()
}

#[test]
fn flat_object() {
    assert_eq!(
        ok(json!({"temp": 21.5, "hum": 40, "ok": true, "state": "idle", "gone": null, "neg": -3})),
        // serde_json's Map is sorted by key, so the encodings list keys alphabetically.
        vec![
            sample("hum", None, Value::Int(40)),
            sample("neg", None, Value::Int(-3)),
            sample("ok", None, Value::Bool(true)),
            sample("state", None, Value::Str("idle".into())),
            sample("temp", None, Value::Float(21.5)),
        ]
    );
}

#[test]
fn payload_order_is_kept() {
    let payload = br#"{"z": 1, "a": 2, "m": {"y": 3, "b": 4}}"#;
    let got = decode(payload, PayloadFormat::Json, None, &limits()).unwrap();
    let metrics: Vec<_> = got.iter().map(|s| s.metric.as_str()).collect();
    assert_eq!(metrics, ["z", "a", "m.y", "m.b"]);
}

#[test]
fn duplicate_keys_are_kept_in_order() {
    let got = decode(br#"{"a": 1, "a": 2}"#, PayloadFormat::Json, None, &limits()).unwrap();
    assert_eq!(
        got,
        vec![
            sample("a", None, Value::Int(1)),
            sample("a", None, Value::Int(2))
        ]
    );
}

#[test]
fn numbers() {
    assert_eq!(
        ok(
            json!({"a": i64::MAX, "b": i64::MIN, "c": u64::MAX, "d": 21.0, "e": 0, "f": -0.5, "g": 1e300})
        ),
        vec![
            sample("a", None, Value::Int(i64::MAX)),
            sample("b", None, Value::Int(i64::MIN)),
            sample("c", None, Value::Float(u64::MAX as f64)),
            sample("d", None, Value::Float(21.0)),
            sample("e", None, Value::Int(0)),
            sample("f", None, Value::Float(-0.5)),
            sample("g", None, Value::Float(1e300)),
        ]
    );
    // Exponent notation in JSON is a float even when integral.
    assert_eq!(
        decode(br#"{"x": 1e2}"#, PayloadFormat::Json, None, &limits()).unwrap(),
        vec![sample("x", None, Value::Float(100.0))]
    );
    // An integer too large for u64 in JSON is a float.
    assert_eq!(
        decode(
            br#"{"x": 100000000000000000000}"#,
            PayloadFormat::Json,
            None,
            &limits()
        )
        .unwrap(),
        vec![sample("x", None, Value::Float(1e20))]
    );
}

#[test]
fn strings_with_escapes_and_unicode() {
    let got = decode(
        br#"{"s": "a\"b\\c\n\u00e9", "k\u00e9y": "\u2603"}"#,
        PayloadFormat::Json,
        None,
        &limits(),
    )
    .unwrap();
    assert_eq!(
        got,
        vec![
            sample("s", None, Value::Str("a\"b\\c\né".into())),
            sample("kéy", None, Value::Str("☃".into())),
        ]
    );
    assert_eq!(
        ok(json!({"emoji 🚀": "ok"})),
        vec![sample("emoji 🚀", None, Value::Str("ok".into()))]
    );
}

#[test]
fn nesting_and_arrays() {
    assert_eq!(
        ok(
            json!({"env": {"temp": 21, "deep": {"x": true}}, "accel": [1, 2.5, 3], "s": [{"t": 1}, [7]], "e": {}, "ea": []})
        ),
        vec![
            sample("accel.0", None, Value::Int(1)),
            sample("accel.1", None, Value::Float(2.5)),
            sample("accel.2", None, Value::Int(3)),
            sample("env.deep.x", None, Value::Bool(true)),
            sample("env.temp", None, Value::Int(21)),
            sample("s.0.t", None, Value::Int(1)),
            sample("s.1.0", None, Value::Int(7)),
        ]
    );
    // Nulls inside arrays are skipped but keep their index.
    assert_eq!(
        ok(json!({"a": [null, 5]})),
        vec![sample("a.1", None, Value::Int(5))]
    );
}

#[test]
fn empty_object_and_array_give_nothing() {
    assert_eq!(ok(json!({})), vec![]);
    assert_eq!(ok(json!([])), vec![]);
    assert_eq!(ok(json!({"ts": 1700000000000_i64})), vec![]);
    assert_eq!(ok(json!({"a": null})), vec![]);
}

const T: i64 = 1_700_000_000_000;

#[test]
fn timestamp_milliseconds_and_seconds() {
    for (ts, want) in [
        (json!(T), T),
        (json!(1_700_000_000), T),
        (json!(1_700_000_000.25), T + 250),
        (json!(1_700_000_000.000_4), T),
        (json!(1_700_000_000.000_6), T + 1),
        (json!(T as f64 + 0.4), T),
        (json!(99_999_999_999_i64), 99_999_999_999_000),
        (json!(100_000_000_000_i64), 100_000_000_000),
        (json!(-5), -5000),
        (json!(0), 0),
        (json!(-100_000_000_000_i64), -100_000_000_000),
    ] {
        assert_eq!(
            ok(json!({"ts": ts.clone(), "v": 1})),
            vec![sample("v", Some(want), Value::Int(1))],
            "ts {ts}"
        );
    }
}

#[test]
fn timestamp_keys() {
    for key in TIMESTAMP_KEYS {
        let mut object = serde_json::Map::new();
        object.insert(key.to_owned(), json!(T));
        object.insert("v".to_owned(), json!(1));
        assert_eq!(
            ok(object.into()),
            vec![sample("v", Some(T), Value::Int(1))],
            "{key}"
        );
    }
    // Only at the top of a sample object; deeper it is a metric.
    assert_eq!(
        ok(json!({"env": {"ts": 5}})),
        vec![sample("env.ts", None, Value::Int(5))]
    );
    // Case matters.
    assert_eq!(
        ok(json!({"TS": 5})),
        vec![sample("TS", None, Value::Int(5))]
    );
    // The timestamp may come after the values.
    let got = decode(
        br#"{"v": 1, "ts": 1700000000000}"#,
        PayloadFormat::Json,
        None,
        &limits(),
    )
    .unwrap();
    assert_eq!(got, vec![sample("v", Some(T), Value::Int(1))]);
}

#[test]
fn timestamp_rfc3339() {
    for (text, want) in [
        ("2023-11-14T22:13:20Z", T),
        ("2023-11-14T22:13:20.5Z", T + 500),
        ("2023-11-14T22:13:20.123456789Z", T + 123),
        ("2023-11-14T22:13:20.12Z", T + 120),
        ("2023-11-14 22:13:20Z", T),
        ("2023-11-14t22:13:20z", T),
        ("2023-11-14T22:13:20", T),
        ("2023-11-15T00:13:20+02:00", T),
        ("2023-11-14T20:43:20-01:30", T),
        ("2023-11-14T22:13:20.250+00:00", T + 250),
        ("1970-01-01T00:00:00Z", 0),
        ("1969-12-31T23:59:59Z", -1000),
        ("2000-02-29T00:00:00Z", 951_782_400_000),
        ("1900-03-01T00:00:00Z", -2_203_891_200_000),
    ] {
        assert_eq!(
            ok(json!({"time": text, "v": 1})),
            vec![sample("v", Some(want), Value::Int(1))],
            "{text}"
        );
    }
}

#[test]
fn bad_timestamps() {
    for ts in [
        json!(true),
        json!(null),
        json!("yesterday"),
        json!("2023-11-14"),
        json!("2023-02-29T00:00:00Z"),
        json!("2023-13-01T00:00:00Z"),
        json!("2023-11-14T24:00:00Z"),
        json!("2023-11-14T22:13:20+2:00"),
        json!("2023-11-14T22:13:20Zjunk"),
        json!("2023-11-14T22:13:20."),
        json!("1700000000000"),
        json!({"a": 1}),
        json!([1]),
        json!(1e300),
        json!(u64::MAX),
    ] {
        match err(json!({"ts": ts.clone(), "v": 1})) {
            DecodeError::BadTimestamp { key: "ts", .. } => {}
            other => panic!("ts {ts}: {other:?}"),
        }
    }
    let e = err(json!({"timestamp": "x", "v": 1}));
    assert!(e.to_string().starts_with("timestamp `timestamp` "), "{e}");
    assert!(e.to_string().contains("RFC 3339"), "{e}");
    // Two timestamps in one object.
    match err(json!({"ts": 1, "time": 2, "v": 1})) {
        DecodeError::BadTimestamp { reason, .. } => {
            assert!(reason.contains("only one timestamp"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn non_finite_timestamp_from_binary_formats() {
    // {"ts": NaN (half float), "v": 1}
    let nan = [0xa2, 0x62, b't', b's', 0xf9, 0x7e, 0x00, 0x61, b'v', 0x01];
    assert!(matches!(
        decode(&nan, PayloadFormat::Cbor, None, &limits()),
        Err(DecodeError::BadTimestamp { key: "ts", .. })
    ));
}

#[test]
fn thingsboard_shape() {
    assert_eq!(
        ok(json!({"ts": T, "values": {"temp": 21, "env": {"hum": 40}}})),
        vec![
            sample("env.hum", Some(T), Value::Int(40)),
            sample("temp", Some(T), Value::Int(21)),
        ]
    );
    // Without a timestamp, or with other keys, `values` is an ordinary object.
    assert_eq!(
        ok(json!({"values": {"temp": 21}})),
        vec![sample("values.temp", None, Value::Int(21))]
    );
    assert_eq!(
        ok(json!({"ts": T, "values": {"temp": 21}, "x": 1})),
        vec![
            sample("values.temp", Some(T), Value::Int(21)),
            sample("x", Some(T), Value::Int(1)),
        ]
    );
    // `values` that is not an object is a metric.
    assert_eq!(
        ok(json!({"ts": T, "values": 3})),
        vec![sample("values", Some(T), Value::Int(3))]
    );
    // With a prefix.
    assert_eq!(
        decode_all(
            &json!({"ts": T, "values": {"temp": 21}}),
            Some("room1"),
            &limits()
        )
        .unwrap(),
        vec![sample("room1.temp", Some(T), Value::Int(21))]
    );
}

#[test]
fn batches() {
    assert_eq!(
        ok(json!([{"ts": 1, "temp": 20}, {"ts": 2, "values": {"temp": 21}}, {"temp": 22}])),
        vec![
            sample("temp", Some(1000), Value::Int(20)),
            sample("temp", Some(2000), Value::Int(21)),
            sample("temp", None, Value::Int(22)),
        ]
    );
    match err(json!([{"temp": 20}, 5])) {
        DecodeError::BatchElement {
            index: 1,
            found: "number",
        } => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        err(json!([[{"temp": 1}]])),
        DecodeError::BatchElement {
            index: 0,
            found: "array"
        }
    ));
    assert!(matches!(
        err(json!([null])),
        DecodeError::BatchElement {
            index: 0,
            found: "null"
        }
    ));
    // Batch elements with a prefix.
    assert_eq!(
        decode_all(&json!([{"ts": 1, "t": 1}]), Some("a.b"), &limits()).unwrap(),
        vec![sample("a.b.t", Some(1000), Value::Int(1))]
    );
}

#[test]
fn bare_scalars() {
    for (value, want) in [
        (json!(21.5), Value::Float(21.5)),
        (json!(7), Value::Int(7)),
        (json!(-7), Value::Int(-7)),
        (json!(true), Value::Bool(true)),
        (json!("idle"), Value::Str("idle".into())),
    ] {
        assert_eq!(
            decode_all(&value, Some("room1.temp"), &limits()).unwrap(),
            vec![sample("room1.temp", None, want)],
            "{value}"
        );
        match decode_all(&value, None, &limits()) {
            Err(e @ DecodeError::BareScalar { .. }) => {
                assert!(e.to_string().contains("publish an object"), "{e}");
                assert!(e.to_string().contains("telemetry/<metric>"), "{e}");
            }
            other => panic!("{value}: {other:?}"),
        }
    }
    assert_eq!(
        decode_all(&json!(null), Some("x"), &limits()).unwrap(),
        vec![]
    );
    assert!(matches!(
        decode_all(&json!(null), None, &limits()),
        Err(DecodeError::BareScalar { found: "null" })
    ));
    // An empty prefix is no prefix.
    assert!(matches!(
        decode_all(&json!(1), Some(""), &limits()),
        Err(DecodeError::BareScalar { found: "number" })
    ));
    assert_eq!(
        decode_all(&json!({"a": 1}), Some(""), &limits()).unwrap(),
        vec![sample("a", None, Value::Int(1))]
    );
    // JSON with surrounding whitespace.
    assert_eq!(
        decode(b"  \n 21.5 \r\n", PayloadFormat::Auto, Some("t"), &limits()).unwrap(),
        vec![sample("t", None, Value::Float(21.5))]
    );
}

#[test]
fn prefix_applies_to_objects_and_arrays() {
    assert_eq!(
        decode_all(
            &json!({"temp": 1, "env": {"hum": 2}, "a": [3]}),
            Some("site.room"),
            &limits()
        )
        .unwrap(),
        vec![
            sample("site.room.a.0", None, Value::Int(3)),
            sample("site.room.env.hum", None, Value::Int(2)),
            sample("site.room.temp", None, Value::Int(1)),
        ]
    );
}

#[test]
fn invalid_metric_names() {
    for value in [
        json!({"": 1}),
        json!({"a": {"": 1}}),
        json!({"a\u{1}b": 1}),
        json!({"tab\there": 1}),
        json!({"a": {"new\nline": 1}}),
        json!({"x".repeat(MAX_METRIC_LEN + 1): 1}),
        json!({"x".repeat(MAX_METRIC_LEN - 2): {"yy": 1}}),
    ] {
        match err(value.clone()) {
            DecodeError::InvalidMetric { .. } => {}
            other => panic!("{value}: {other:?}"),
        }
    }
    // Exactly the limit is fine.
    let name = "x".repeat(MAX_METRIC_LEN);
    assert_eq!(
        ok(json!({name.clone(): 1})),
        vec![sample(&name, None, Value::Int(1))]
    );
    // An invalid key is refused even if its value would give no sample.
    assert!(matches!(
        err(json!({"": null})),
        DecodeError::InvalidMetric { .. }
    ));
    // Prefixes are checked too.
    assert!(matches!(
        decode_all(&json!(1), Some("a\u{7f}"), &limits()),
        Err(DecodeError::InvalidMetric { .. })
    ));
    assert!(matches!(
        decode_all(
            &json!({"b": 1}),
            Some(&"p".repeat(MAX_METRIC_LEN)),
            &limits()
        ),
        Err(DecodeError::InvalidMetric { .. })
    ));
    // Long names are cut in the message.
    let e = err(json!({"x".repeat(1000): 1}));
    assert!(e.to_string().len() < 400, "{e}");
}

#[test]
fn max_samples() {
    let limits = DecodeLimits {
        max_samples: 3,
        max_depth: 8,
    };
    assert_eq!(
        decode_all(&json!({"a": [1, 2, 3]}), None, &limits)
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        decode_all(&json!({"a": [1, 2, 3, 4]}), None, &limits),
        Err(DecodeError::TooManySamples { max: 3 })
    );
    assert_eq!(
        decode_all(&json!([{"a": 1, "b": 2}, {"a": 1, "b": 2}]), None, &limits),
        Err(DecodeError::TooManySamples { max: 3 })
    );
    // Nulls do not count.
    assert_eq!(
        decode_all(&json!({"a": [1, null, 2, null, 3]}), None, &limits)
            .unwrap()
            .len(),
        3
    );
}

fn nested(depth: usize) -> serde_json::Value {
    // depth 1 is {"a": 1}; each extra level wraps it in {"n": ...}.
    (1..depth).fold(json!({"a": 1}), |inner, _| json!({"n": inner}))
}

#[test]
fn max_depth() {
    let limits = limits();
    let got = decode_all(&nested(8), None, &limits).unwrap();
    assert_eq!(
        got,
        vec![sample(&format!("{}a", "n.".repeat(7)), None, Value::Int(1))]
    );
    assert_eq!(
        decode_all(&nested(9), None, &limits),
        Err(DecodeError::TooDeep { max: 8 })
    );
    // Arrays count as levels too.
    let deep_array = (1..8).fold(json!([1]), |inner, _| json!([inner]));
    assert_eq!(
        decode_all(&json!({"a": deep_array}), None, &limits),
        Err(DecodeError::TooDeep { max: 8 })
    );
    // Far deeper than every parser's own limit: still a clean error.
    let mut text = "[".repeat(100_000);
    text.push_str(&"]".repeat(100_000));
    assert_eq!(
        decode(text.as_bytes(), PayloadFormat::Json, None, &limits),
        Err(DecodeError::TooDeep { max: 8 })
    );
    let cbor_bytes = vec![0x81; 100_000];
    assert_eq!(
        decode(&cbor_bytes, PayloadFormat::Cbor, None, &limits),
        Err(DecodeError::TooDeep { max: 8 })
    );
    let msgpack_bytes = vec![0x91; 100_000];
    assert_eq!(
        decode(&msgpack_bytes, PayloadFormat::MessagePack, None, &limits),
        Err(DecodeError::TooDeep { max: 8 })
    );
    // A lower limit.
    let shallow = DecodeLimits {
        max_samples: 10,
        max_depth: 1,
    };
    assert_eq!(
        decode_all(&json!({"a": 1}), None, &shallow).unwrap().len(),
        1
    );
    assert_eq!(
        decode_all(&json!({"a": {"b": 1}}), None, &shallow),
        Err(DecodeError::TooDeep { max: 1 })
    );
    assert_eq!(
        decode_all(&json!([{"a": 1}]), None, &shallow),
        Err(DecodeError::TooDeep { max: 1 })
    );
}

#[test]
fn non_finite_values_are_refused() {
    for f in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let mut map = std::collections::BTreeMap::new();
        map.insert("ok", 1.0);
        map.insert("x", f);
        let mut cbor_bytes = Vec::new();
        ciborium::into_writer(&map, &mut cbor_bytes).unwrap();
        let msgpack_bytes = rmp_serde::to_vec(&map).unwrap();
        for (bytes, format) in [
            (&cbor_bytes, PayloadFormat::Cbor),
            (&cbor_bytes, PayloadFormat::Auto),
            (&msgpack_bytes, PayloadFormat::MessagePack),
            (&msgpack_bytes, PayloadFormat::Auto),
        ] {
            match decode(bytes, format, None, &limits()) {
                Err(e @ DecodeError::NonFinite { .. }) => {
                    assert!(e.to_string().contains("`x`"), "{e}")
                }
                other => panic!("{f} {format:?}: {other:?}"),
            }
        }
        // Bare, with a prefix.
        let bare = rmp_serde::to_vec(&f).unwrap();
        assert!(matches!(
            decode(&bare, PayloadFormat::MessagePack, Some("p"), &limits()),
            Err(DecodeError::NonFinite { .. })
        ));
    }
    // JSON has no NaN literal.
    assert!(matches!(
        decode(br#"{"x": NaN}"#, PayloadFormat::Json, None, &limits()),
        Err(DecodeError::Malformed {
            format: PayloadFormat::Json,
            ..
        })
    ));
}

#[test]
fn binary_strings_are_refused() {
    #[derive(serde::Serialize)]
    struct WithBytes<'a> {
        #[serde(with = "serde_bytes_like")]
        img: &'a [u8],
    }
    // A tiny stand-in for serde_bytes: serialize a slice as a byte string.
    mod serde_bytes_like {
        pub fn serialize<S: serde::Serializer>(v: &&[u8], s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(v)
        }
    }
    let value = WithBytes { img: &[1, 2, 3] };
    let mut cbor_bytes = Vec::new();
    ciborium::into_writer(&value, &mut cbor_bytes).unwrap();
    let msgpack_bytes = rmp_serde::to_vec_named(&value).unwrap();
    for (bytes, format) in [
        (&cbor_bytes, PayloadFormat::Cbor),
        (&msgpack_bytes, PayloadFormat::MessagePack),
    ] {
        match decode(bytes, format, None, &limits()) {
            Err(DecodeError::Binary { metric, len: 3 }) => assert_eq!(metric, "img"),
            other => panic!("{format:?}: {other:?}"),
        }
    }
}

#[test]
fn non_string_keys_are_refused() {
    let mut map = std::collections::BTreeMap::new();
    map.insert(1_u32, 20);
    let mut cbor_bytes = Vec::new();
    ciborium::into_writer(&map, &mut cbor_bytes).unwrap();
    let msgpack_bytes = rmp_serde::to_vec(&map).unwrap();
    for (bytes, format) in [
        (&cbor_bytes, PayloadFormat::Cbor),
        (&msgpack_bytes, PayloadFormat::MessagePack),
    ] {
        match decode(bytes, format, None, &limits()) {
            Err(e @ DecodeError::Malformed { .. }) => {
                assert!(e.to_string().contains("map key"), "{format:?}: {e}")
            }
            other => panic!("{format:?}: {other:?}"),
        }
    }
    // Nested too, and boolean keys.
    let nested_bytes = rmp_serde::to_vec(&std::collections::BTreeMap::from([(
        "a",
        std::collections::BTreeMap::from([(true, 1)]),
    )]))
    .unwrap();
    assert!(matches!(
        decode(&nested_bytes, PayloadFormat::MessagePack, None, &limits()),
        Err(DecodeError::Malformed { .. })
    ));
}

#[test]
fn cbor_tags_are_looked_through() {
    use ciborium::value::Value as C;
    let tree = C::Map(vec![
        (
            C::Text("ts".into()),
            C::Tag(1, Box::new(C::Integer(1_700_000_000.into()))),
        ),
        (
            C::Text("when".into()),
            C::Tag(0, Box::new(C::Text("2023-11-14T22:13:20Z".into()))),
        ),
        (
            C::Text("big".into()),
            C::Tag(2, Box::new(C::Bytes(vec![1, 0, 0, 0, 0, 0, 0, 0, 0]))),
        ),
        (
            C::Text("small".into()),
            C::Tag(2, Box::new(C::Bytes(vec![5]))),
        ),
    ]);
    let mut bytes = Vec::new();
    ciborium::into_writer(&tree, &mut bytes).unwrap();
    assert_eq!(
        decode(&bytes, PayloadFormat::Auto, None, &limits()).unwrap(),
        vec![
            sample("when", Some(T), Value::Str("2023-11-14T22:13:20Z".into())),
            sample("big", Some(T), Value::Float(2f64.powi(64))),
            sample("small", Some(T), Value::Int(5)),
        ]
    );
}

#[test]
fn cbor_specifics() {
    use ciborium::value::Value as C;
    // Undefined is null; a negative integer below i64::MIN is a float.
    let tree = C::Map(vec![
        (C::Text("u".into()), C::Null),
        (
            C::Text("n".into()),
            C::Integer((-(1_i128 << 64)).try_into().unwrap()),
        ),
    ]);
    let mut bytes = Vec::new();
    ciborium::into_writer(&tree, &mut bytes).unwrap();
    assert_eq!(
        decode(&bytes, PayloadFormat::Cbor, None, &limits()).unwrap(),
        vec![sample("n", None, Value::Float(-(2f64.powi(64))))]
    );
    // Undefined (0xf7) as a value is skipped like null.
    let undefined = [0xa1, 0x61, b'u', 0xf7];
    assert_eq!(
        decode(&undefined, PayloadFormat::Cbor, None, &limits()).unwrap(),
        vec![]
    );
    // Indefinite-length map and text.
    let indefinite = [0xbf, 0x7f, 0x61, b'a', 0x61, b'b', 0xff, 0x01, 0xff];
    assert_eq!(
        decode(&indefinite, PayloadFormat::Cbor, None, &limits()).unwrap(),
        vec![sample("ab", None, Value::Int(1))]
    );
    // A long string (past ciborium's scratch buffer).
    let long = "x".repeat(10_000);
    assert_eq!(
        decode_all(&json!({"s": long.clone()}), None, &limits()).unwrap(),
        vec![sample("s", None, Value::Str(long))]
    );
}

#[test]
fn trailing_bytes_are_refused() {
    let value = json!({"a": 1});
    let mut json_bytes = serde_json::to_vec(&value).unwrap();
    json_bytes.extend_from_slice(b" x");
    let mut cbor_bytes = cbor(&value);
    cbor_bytes.push(0x01);
    let mut msgpack_bytes = msgpack(&value);
    msgpack_bytes.push(0x01);
    for (bytes, format) in [
        (&json_bytes, PayloadFormat::Json),
        (&cbor_bytes, PayloadFormat::Cbor),
        (&msgpack_bytes, PayloadFormat::MessagePack),
    ] {
        assert!(
            matches!(decode(bytes, format, None, &limits()), Err(DecodeError::Malformed { format: f, .. }) if f == format),
            "{format:?}"
        );
    }
    // Trailing JSON whitespace is fine.
    assert!(decode(b"{\"a\": 1}\n", PayloadFormat::Json, None, &limits()).is_ok());
}

#[test]
fn truncated_payloads() {
    let value = json!({"temp": 21.5, "state": "idle"});
    for bytes in [
        serde_json::to_vec(&value).unwrap(),
        cbor(&value),
        msgpack(&value),
    ] {
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len], PayloadFormat::Auto, None, &limits()).is_err());
        }
    }
    let e = decode(&cbor(&value)[..5], PayloadFormat::Cbor, None, &limits()).unwrap_err();
    assert!(e.to_string().contains("unexpected end"), "{e}");
}

#[test]
fn auto_detection() {
    let value = json!({"temp": 21});
    let want = vec![sample("temp", None, Value::Int(21))];
    assert_eq!(
        decode(b"\t {\"temp\": 21}", PayloadFormat::Auto, None, &limits()).unwrap(),
        want
    );
    assert_eq!(
        decode(&cbor(&value), PayloadFormat::Auto, None, &limits()).unwrap(),
        want
    );
    assert_eq!(
        decode(&msgpack(&value), PayloadFormat::Auto, None, &limits()).unwrap(),
        want
    );
    // MessagePack maps start with 0x80..0x8f, which CBOR reads as an array: still MessagePack.
    assert_eq!(msgpack(&value)[0], 0x81);

    assert_eq!(
        decode(b"", PayloadFormat::Auto, None, &limits()),
        Err(DecodeError::Empty)
    );
    assert_eq!(
        decode(b" \r\n\t", PayloadFormat::Auto, None, &limits()),
        Err(DecodeError::Empty)
    );
    for format in [
        PayloadFormat::Json,
        PayloadFormat::Cbor,
        PayloadFormat::MessagePack,
    ] {
        assert_eq!(
            decode(b"", format, None, &limits()),
            Err(DecodeError::Empty),
            "{format:?}"
        );
    }
    assert_eq!(
        decode(b"  ", PayloadFormat::Json, None, &limits()),
        Err(DecodeError::Empty)
    );

    // Looks like JSON but is not: the error says it was taken for JSON.
    match decode(b"{\"temp\": }", PayloadFormat::Auto, None, &limits()) {
        Err(
            e @ DecodeError::Malformed {
                format: PayloadFormat::Json,
                ..
            },
        ) => {
            assert!(
                e.to_string()
                    .contains("detected as JSON because it starts with `{`"),
                "{e}"
            )
        }
        other => panic!("{other:?}"),
    }
    // Neither: the error lists what was tried.
    // 0xc1 is a CBOR tag without its item, and reserved in MessagePack.
    match decode(&[0xc1], PayloadFormat::Auto, None, &limits()) {
        Err(
            e @ DecodeError::Undetected {
                first_byte: 0xc1, ..
            },
        ) => {
            let text = e.to_string();
            assert!(
                text.contains("JSON") && text.contains("CBOR") && text.contains("MessagePack"),
                "{text}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Text that is not JSON is not silently read as a MessagePack integer.
    assert!(decode(b"hello", PayloadFormat::Auto, Some("p"), &limits()).is_err());
}

#[test]
fn explicit_format_mismatch() {
    let json_bytes = br#"{"temp": 21}"#;
    assert!(matches!(
        decode(json_bytes, PayloadFormat::Cbor, None, &limits()),
        Err(DecodeError::Malformed {
            format: PayloadFormat::Cbor,
            ..
        })
    ));
    assert!(matches!(
        decode(
            &cbor(&json!({"a": 1})),
            PayloadFormat::Json,
            None,
            &limits()
        ),
        Err(DecodeError::Malformed {
            format: PayloadFormat::Json,
            ..
        })
    ));
}

#[test]
fn decode_into_appends_and_restores() {
    let mut out = vec![sample("old", None, Value::Int(0))];
    let n = decode_into(
        br#"{"a": 1, "b": 2}"#,
        PayloadFormat::Json,
        None,
        &limits(),
        &mut out,
    )
    .unwrap();
    assert_eq!(n, 2);
    assert_eq!(out.len(), 3);
    // The limit counts this payload only.
    let small = DecodeLimits {
        max_samples: 2,
        max_depth: 8,
    };
    assert_eq!(
        decode_into(
            br#"{"c": 1, "d": 2}"#,
            PayloadFormat::Json,
            None,
            &small,
            &mut out
        ),
        Ok(2)
    );
    // On error nothing is appended, even if some samples were made before it.
    let before = out.clone();
    assert!(
        decode_into(
            br#"{"a": 1, "b": {"": 2}}"#,
            PayloadFormat::Json,
            None,
            &limits(),
            &mut out
        )
        .is_err()
    );
    assert_eq!(out, before);
}

#[test]
fn content_types() {
    for (content_type, want) in [
        ("application/json", Some(PayloadFormat::Json)),
        ("application/json; charset=utf-8", Some(PayloadFormat::Json)),
        ("Application/JSON ;charset=UTF-8", Some(PayloadFormat::Json)),
        (" application/cbor ", Some(PayloadFormat::Cbor)),
        ("application/msgpack", Some(PayloadFormat::MessagePack)),
        ("application/x-msgpack", Some(PayloadFormat::MessagePack)),
        ("application/vnd.msgpack", Some(PayloadFormat::MessagePack)),
        ("text/plain", None),
        ("application/jsonx", None),
        ("", None),
        (";", None),
    ] {
        assert_eq!(
            PayloadFormat::from_content_type(content_type),
            want,
            "{content_type}"
        );
    }
}

#[test]
fn format_names() {
    for format in [
        PayloadFormat::Auto,
        PayloadFormat::Json,
        PayloadFormat::Cbor,
        PayloadFormat::MessagePack,
    ] {
        assert_eq!(format.as_str().parse::<PayloadFormat>(), Ok(format));
        let serialized = serde_json::to_string(&format).unwrap();
        assert_eq!(serialized, format!("\"{}\"", format.as_str()));
        assert_eq!(
            serde_json::from_str::<PayloadFormat>(&serialized).unwrap(),
            format
        );
    }
    assert_eq!(PayloadFormat::default(), PayloadFormat::Auto);
    assert_eq!(PayloadFormat::MessagePack.to_string(), "MessagePack");
    let e = "xml".parse::<PayloadFormat>().unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown payload format `xml` (expected auto, json, cbor or msgpack)"
    );
    assert!("JSON".parse::<PayloadFormat>().is_err());
    assert!(serde_json::from_str::<PayloadFormat>("\"messagepack\"").is_err());
}

#[test]
fn limits_config() {
    assert_eq!(
        DecodeLimits::default(),
        DecodeLimits {
            max_samples: 10_000,
            max_depth: 8
        }
    );
    let partial: DecodeLimits = serde_json::from_str(r#"{"max_depth": 4}"#).unwrap();
    assert_eq!(
        partial,
        DecodeLimits {
            max_samples: 10_000,
            max_depth: 4
        }
    );
    assert!(serde_json::from_str::<DecodeLimits>(r#"{"max_dept": 4}"#).is_err());
}

#[test]
fn error_messages_say_what_is_expected() {
    let e = decode(b"[1]", PayloadFormat::Json, None, &limits()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "element 0 of the top-level array is a number; a top-level array must hold objects, one \
         per timestamp, such as [{\"ts\": 1700000000000, \"temp\": 21}]"
    );
    let e = decode(br#"{"": 1}"#, PayloadFormat::Json, None, &limits()).unwrap_err();
    assert!(e.to_string().contains("a key is empty"), "{e}");
    let e = decode_all(&nested(9), None, &limits()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "payload nests objects and arrays more than 8 levels deep; flatten it"
    );
}

#[test]
fn rfc3339_parser_edges() {
    assert_eq!(
        parse_rfc3339("0000-01-01T00:00:00Z"),
        Ok(-62_167_219_200_000)
    );
    assert_eq!(
        parse_rfc3339("9999-12-31T23:59:59.999Z"),
        Ok(253_402_300_799_999)
    );
    assert_eq!(parse_rfc3339("2016-12-31T23:59:60Z"), Ok(1_483_228_800_000));
    assert!(parse_rfc3339("2023-11-14T22:13:20+24:00").is_err());
    assert!(parse_rfc3339("2023-11-14T22:13:20+02:60").is_err());
    assert!(parse_rfc3339("2023-11-14X22:13:20Z").is_err());
    assert!(parse_rfc3339("２０２３-11-14T22:13:20Z").is_err());
    assert!(parse_rfc3339("2023-11-14T22:13:2é").is_err());
    assert!(parse_rfc3339("2023-00-14T22:13:20Z").is_err());
    assert!(parse_rfc3339("2023-11-00T22:13:20Z").is_err());
    assert!(parse_rfc3339("2023-11-14T22:60:20Z").is_err());
    assert!(parse_rfc3339("2023-11-14T22:13:61Z").is_err());
    for year in [1600, 1700, 1969, 1970, 1972, 2000, 2024, 2100, 2400] {
        for month in 1..=12 {
            let text = format!("{year:04}-{month:02}-01T00:00:00Z");
            let days = days_from_civil(year, month, 1);
            assert_eq!(parse_rfc3339(&text), Ok(days * 86_400_000), "{text}");
        }
    }
    // Day counts agree with a naive count from 1970.
    let mut days = 0;
    for year in 1970..2100 {
        for month in 1..=12 {
            assert_eq!(days_from_civil(year, month, 1), days, "{year}-{month}");
            days += days_in_month(year, month);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Properties.

fn arb_key() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[a-z]{1,6}",
        1 => Just("ts".to_owned()),
        1 => Just("time".to_owned()),
        1 => Just("values".to_owned()),
        1 => Just(String::new()),
        1 => "\\PC{1,4}",
    ]
}

fn arb_leaf() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        (-1e12f64..1e12).prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        "\\PC{0,8}".prop_map(serde_json::Value::from),
        Just(json!("2023-11-14T22:13:20Z")),
    ]
}

fn arb_tree() -> impl Strategy<Value = serde_json::Value> {
    arb_leaf().prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::vec((arb_key(), inner), 0..6)
                .prop_map(|entries| serde_json::Value::Object(entries.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any bytes, any format: an answer, never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256), prefix in prop::option::of("[a-z.]{0,5}")) {
        for format in [PayloadFormat::Auto, PayloadFormat::Json, PayloadFormat::Cbor, PayloadFormat::MessagePack] {
            let _ = decode(&bytes, format, prefix.as_deref(), &limits());
        }
    }

    /// Bytes that start like a valid payload and then go wrong.
    #[test]
    fn mutated_payloads_never_panic(tree in arb_tree(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        for mut bytes in [serde_json::to_vec(&tree).unwrap(), cbor(&tree), msgpack(&tree)] {
            let i = at.index(bytes.len());
            bytes[i] = byte;
            let _ = decode(&bytes, PayloadFormat::Auto, Some("p"), &limits());
            bytes.truncate(i);
            let _ = decode(&bytes, PayloadFormat::Auto, None, &limits());
        }
    }

    /// JSON, CBOR and MessagePack encodings of one tree decode alike (decode_all asserts it),
    /// and every sample obeys the rules.
    #[test]
    fn formats_agree(tree in arb_tree(), prefix in prop::option::of("[a-z]{1,3}(\\.[a-z]{1,3})?")) {
        let small = DecodeLimits { max_samples: 40, max_depth: 4 };
        if let Ok(samples) = decode_all(&tree, prefix.as_deref(), &small) {
            prop_assert!(samples.len() <= small.max_samples);
            for s in samples {
                prop_assert!(check_metric(&s.metric).is_ok(), "{:?}", s.metric);
                if let Some(p) = &prefix {
                    let dotted = format!("{}.", p);
                    prop_assert!(s.metric == *p || s.metric.starts_with(&dotted));
                }
                if let Value::Float(f) = s.value {
                    prop_assert!(f.is_finite());
                }
            }
        }
    }
}
