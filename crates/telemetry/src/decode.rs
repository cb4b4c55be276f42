//! Device payloads (JSON, CBOR, MessagePack) → [`Sample`]s.
//!
//! Every format is decoded into one intermediate tree, and one piece of code maps that tree onto
//! samples, so the three formats behave identically: the CBOR or MessagePack encoding of a JSON
//! document gives the same samples as the document.
//!
//! # Formats
//!
//! [`PayloadFormat::Auto`] (the default) looks at the first byte that is not whitespace: a payload
//! starting with `{`, `[`, `"`, `-`, a digit, `t`, `f` or `n` is JSON; anything else is CBOR if it
//! decodes as exactly one CBOR item, else MessagePack. Auto cannot tell every payload apart (a
//! bare MessagePack integer from 32 to 127 is a printable character, so it looks like text);
//! devices sending bare binary scalars should use an explicit format. An empty or all-whitespace
//! payload is refused. Trailing bytes after the one value are refused in every format.
//!
//! # Mapping rules
//!
//! - **Flat object**: `{"temp": 21.5, "hum": 40, "ok": true, "state": "idle"}` gives one sample
//!   per key, in payload order. A number is an integer sample if it is an integer that fits a
//!   signed 64-bit integer, otherwise a float sample (so `21.0` is a float, and an unsigned
//!   integer above 2^63 − 1 becomes a float); booleans and strings are kept as such; `null` is
//!   skipped. NaN and infinities (possible in CBOR and MessagePack, not in JSON) are refused: the
//!   whole payload is rejected, naming the metric.
//! - **Nesting**: nested objects flatten with `.`: `{"env": {"temp": 21}}` gives `env.temp`.
//!   Arrays flatten with the element's index: `{"accel": [1, 2, 3]}` gives `accel.0`, `accel.1`,
//!   `accel.2` (arrays of objects and arrays of arrays flatten the same way:
//!   `{"s": [{"t": 1}]}` gives `s.0.t`). Empty objects and arrays give no sample.
//! - **Timestamps**: a key `ts`, `timestamp` or `time` directly in a sample object (the payload
//!   itself, or an element of a top-level array) is not a metric but the timestamp of every value
//!   of that object. Accepted: a number of milliseconds since the Unix epoch, or of seconds if its
//!   absolute value is below 10^11 (10^11 ms is March 1973, 10^11 s is the year 5138); a float
//!   in seconds keeps its millisecond fraction (`1700000000.25` is `1700000000250` ms; sub-
//!   millisecond digits are rounded); or an RFC 3339 string such as `2024-05-01T12:00:00.5Z` or
//!   `2024-05-01T14:00:00+02:00` (`t` or a space may replace `T`; a missing offset means UTC).
//!   Anything else under those keys (another type, a string that is not RFC 3339, a value out of
//!   range, two timestamp keys in one object) rejects the payload, naming the key. A sample
//!   without a timestamp key has no timestamp: the ingest service uses the time of arrival.
//!   Keys named like timestamps deeper in the tree are ordinary metrics (`env.ts`).
//! - **ThingsBoard shape**: an object whose only keys are a timestamp key and `values`, where
//!   `values` is an object: `{"ts": 1700000000000, "values": {"temp": 21}}` gives the samples of
//!   `values` (`temp`, not `values.temp`) with that timestamp.
//! - **Batches**: a top-level array of objects, each of either shape above with its own
//!   timestamp: `[{"ts": 1, "temp": 20}, {"ts": 2, "values": {"temp": 21}}]`. Every element must be
//!   an object.
//! - **Bare scalar**: a payload that is just `21.5`, `true` or `"idle"` is one sample whose metric
//!   is the topic's metric prefix (the part of the MQTT topic after `telemetry/`, with `/`
//!   replaced by `.`, computed by the caller). Without a prefix it is refused (publish an object,
//!   or publish to a topic that names the metric). A bare `null` gives no sample.
//! - **Prefix**: with a metric prefix, every metric of an object becomes `prefix.metric`. An
//!   empty prefix counts as none.
//! - **Metric names** must be 1 to [`MAX_METRIC_LEN`] bytes long with no control characters, and
//!   no key may be empty (`{"": 1}` or `{"a": {"": 1}}`); a payload with an invalid name is
//!   refused, never renamed. CBOR and MessagePack map keys must be strings; binary strings are
//!   refused as values; CBOR tags are looked through (a tagged value counts as the value: tag 1
//!   on an epoch number or tag 0 on an RFC 3339 string are fine for a timestamp).
//! - **Limits** ([`DecodeLimits`]): at most `max_samples` samples (default 10 000) and at most
//!   `max_depth` levels of nesting (default 8; every object or array counts one level, the
//!   outermost included, so `{"a": {"b": 1}}` is 2 deep; in CBOR a tag counts one level too).
//!   A payload over either is refused.
//!
//! Any error rejects the whole payload: a device gets all of its samples stored or none.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use ferrohub_types::telemetry::{MAX_METRIC_LEN, Sample, Value};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// Keys that carry a sample object's timestamp instead of a metric.
pub const TIMESTAMP_KEYS: [&str; 3] = ["ts", "timestamp", "time"];

/// Epoch numbers below this (in absolute value) are seconds, at or above it milliseconds.
const SECONDS_BELOW: i64 = 100_000_000_000;

/// The encoding of a device payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// Detect: JSON if it starts like JSON, else CBOR if it decodes, else MessagePack.
    #[default]
    Auto,
    /// JSON (RFC 8259).
    Json,
    /// CBOR (RFC 8949).
    Cbor,
    /// MessagePack.
    #[serde(rename = "msgpack")]
    MessagePack,
}

impl PayloadFormat {
    /// The format named by a MIME content type (an MQTT v5 content type or an HTTP
    /// `Content-Type`); parameters such as `; charset=utf-8` are ignored, case does not matter.
    /// `None` for any other type.
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let essence = content_type.split(';').next().unwrap_or_default().trim();
        const TYPES: [(&str, PayloadFormat); 5] = [
            ("application/json", PayloadFormat::Json),
            ("application/cbor", PayloadFormat::Cbor),
            ("application/msgpack", PayloadFormat::MessagePack),
            ("application/x-msgpack", PayloadFormat::MessagePack),
            ("application/vnd.msgpack", PayloadFormat::MessagePack),
        ];
        TYPES
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(essence))
            .map(|(_, format)| *format)
    }

    /// The configuration spelling: `auto`, `json`, `cbor` or `msgpack`.
    pub fn as_str(self) -> &'static str {
        match self {
            PayloadFormat::Auto => "auto",
            PayloadFormat::Json => "json",
            PayloadFormat::Cbor => "cbor",
            PayloadFormat::MessagePack => "msgpack",
        }
    }

    /// The name used in messages.
    fn display_name(self) -> &'static str {
        match self {
            PayloadFormat::Auto => "auto-detected",
            PayloadFormat::Json => "JSON",
            PayloadFormat::Cbor => "CBOR",
            PayloadFormat::MessagePack => "MessagePack",
        }
    }
}

/// Shows the human name (`JSON`, `CBOR`, `MessagePack`); [`PayloadFormat::as_str`] gives the
/// configuration spelling.
impl fmt::Display for PayloadFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.display_name())
    }
}

/// A payload format name that is not `auto`, `json`, `cbor` or `msgpack`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown payload format `{0}` (expected auto, json, cbor or msgpack)")]
pub struct UnknownFormat(pub String);

impl FromStr for PayloadFormat {
    type Err = UnknownFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(PayloadFormat::Auto),
            "json" => Ok(PayloadFormat::Json),
            "cbor" => Ok(PayloadFormat::Cbor),
            "msgpack" => Ok(PayloadFormat::MessagePack),
            other => Err(UnknownFormat(other.to_owned())),
        }
    }
}

/// Bounds on what one payload may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecodeLimits {
    /// Most samples one payload may give.
    pub max_samples: usize,
    /// Deepest nesting of objects and arrays (the outermost one is level 1).
    pub max_depth: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_samples: 10_000,
            max_depth: 8,
        }
    }
}

/// Why a payload was refused. Every message says what is wrong and what is expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// Zero bytes, or only whitespace.
    #[error("payload is empty; send a JSON, CBOR or MessagePack value")]
    Empty,
    /// The payload is not valid in the format it was decoded as.
    #[error("payload is not valid {format}: {message}")]
    Malformed {
        /// The format tried.
        format: PayloadFormat,
        /// What the decoder found wrong.
        message: String,
    },
    /// Auto-detection found no format that decodes the payload.
    #[error(
        "cannot detect the payload format: it does not start like JSON (first byte 0x{first_byte:02x}), \
         it is not CBOR ({cbor}) and it is not MessagePack ({msgpack}); send JSON, CBOR or \
         MessagePack, or configure the format explicitly"
    )]
    Undetected {
        /// The first byte that is not whitespace.
        first_byte: u8,
        /// Why CBOR failed.
        cbor: String,
        /// Why MessagePack failed.
        msgpack: String,
    },
    /// Objects and arrays nest deeper than [`DecodeLimits::max_depth`].
    #[error("payload nests objects and arrays more than {max} levels deep; flatten it")]
    TooDeep {
        /// The limit.
        max: usize,
    },
    /// More samples than [`DecodeLimits::max_samples`].
    #[error("payload holds more than {max} samples; split it into several messages")]
    TooManySamples {
        /// The limit.
        max: usize,
    },
    /// A bare scalar with no metric prefix to name it.
    #[error(
        "payload is a bare {found} with no metric name; publish an object such as \
         {{\"temperature\": 21.5}}, or publish the value to a topic that names the metric \
         (telemetry/<metric>)"
    )]
    BareScalar {
        /// What the payload is (`number`, `string`, …).
        found: &'static str,
    },
    /// An element of a top-level array is not an object.
    #[error(
        "element {index} of the top-level array is a {found}; a top-level array must hold \
         objects, one per timestamp, such as [{{\"ts\": 1700000000000, \"temp\": 21}}]"
    )]
    BatchElement {
        /// Index of the element in the array.
        index: usize,
        /// What it is.
        found: &'static str,
    },
    /// A metric name that is empty, too long or holds a control character.
    #[error(
        "invalid metric name `{metric}`: {reason} (metric names are 1 to {max} bytes without \
         control characters, and no key may be empty)",
        max = MAX_METRIC_LEN
    )]
    InvalidMetric {
        /// The name (cut to 80 characters when longer).
        metric: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A NaN or infinite float.
    #[error("metric `{metric}` is NaN or infinite; only finite numbers are accepted")]
    NonFinite {
        /// The metric.
        metric: String,
    },
    /// A binary string value (CBOR byte string, MessagePack bin).
    #[error(
        "metric `{metric}` is a binary string ({len} bytes); send a number, boolean or text string"
    )]
    Binary {
        /// The metric.
        metric: String,
        /// Its length in bytes.
        len: usize,
    },
    /// An unusable value under a timestamp key.
    #[error(
        "timestamp `{key}` {reason}; expected milliseconds since the Unix epoch (or seconds if \
         below 10^11) as a number, or an RFC 3339 string such as \"2024-05-01T12:00:00Z\""
    )]
    BadTimestamp {
        /// The key (`ts`, `timestamp` or `time`).
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Decodes one device payload into samples, in payload order.
///
/// `metric_prefix` is the metric named by the topic (see the [module docs](self)), `None` when
/// the topic names none.
pub fn decode(
    payload: &[u8],
    format: PayloadFormat,
    metric_prefix: Option<&str>,
    limits: &DecodeLimits,
) -> Result<Vec<Sample>, DecodeError> {
    let mut out = Vec::new();
    decode_into(payload, format, metric_prefix, limits, &mut out)?;
    Ok(out)
}

/// Like [`decode`], but appends to `out` (so a caller can reuse one buffer) and returns how many
/// samples it appended. On error `out` is left as it was.
pub fn decode_into(
    payload: &[u8],
    format: PayloadFormat,
    metric_prefix: Option<&str>,
    limits: &DecodeLimits,
    out: &mut Vec<Sample>,
) -> Result<usize, DecodeError> {
    let tree = parse_tree(payload, format, limits.max_depth)?;
    let start = out.len();
    let mut mapper = Mapper {
        out,
        start,
        max_samples: limits.max_samples,
        path: String::new(),
    };
    match mapper.root(tree, metric_prefix) {
        Ok(()) => Ok(mapper.out.len() - start),
        Err(e) => {
            mapper.out.truncate(start);
            Err(e)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The intermediate tree.

/// A decoded value, before mapping. Strings borrow from the payload where the decoder allows it.
#[derive(Debug, Clone, PartialEq)]
enum Node<'a> {
    Null,
    Bool(bool),
    Int(i64),
    /// Floats, and integers that do not fit an i64 (per the mapping rules).
    Float(f64),
    Str(Cow<'a, str>),
    /// A binary string; only its length is kept, to name it in the error.
    Bytes(usize),
    Array(Vec<Node<'a>>),
    /// Entries in payload order (duplicates kept).
    Map(Vec<(Cow<'a, str>, Node<'a>)>),
}

impl Node<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Node::Null => "null",
            Node::Bool(_) => "boolean",
            Node::Int(_) | Node::Float(_) => "number",
            Node::Str(_) => "string",
            Node::Bytes(_) => "binary string",
            Node::Array(_) => "array",
            Node::Map(_) => "object",
        }
    }
}

fn parse_tree(
    payload: &[u8],
    format: PayloadFormat,
    max_depth: usize,
) -> Result<Node<'_>, DecodeError> {
    match format {
        PayloadFormat::Json => parse_json(payload, max_depth),
        PayloadFormat::Cbor => parse_cbor(payload, max_depth),
        PayloadFormat::MessagePack => parse_msgpack(payload, max_depth),
        PayloadFormat::Auto => {
            let Some(&first) = payload.iter().find(|b| !is_json_whitespace(**b)) else {
                return Err(DecodeError::Empty);
            };
            if matches!(
                first,
                b'{' | b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n'
            ) {
                return parse_json(payload, max_depth).map_err(|e| match e {
                    DecodeError::Malformed { format, message } => DecodeError::Malformed {
                        format,
                        message: format!(
                            "{message} (detected as JSON because it starts with `{}`; configure \
                             the format if it is CBOR or MessagePack)",
                            char::from(first)
                        ),
                    },
                    other => other,
                });
            }
            let cbor = match parse_cbor(payload, max_depth) {
                Ok(tree) => return Ok(tree),
                Err(e) => e,
            };
            let msgpack = match parse_msgpack(payload, max_depth) {
                Ok(tree) => return Ok(tree),
                Err(e) => e,
            };
            // A decoder that got that deep had the right format: say what is wrong instead.
            if matches!(cbor, DecodeError::TooDeep { .. }) {
                return Err(cbor);
            }
            if matches!(msgpack, DecodeError::TooDeep { .. }) {
                return Err(msgpack);
            }
            Err(DecodeError::Undetected {
                first_byte: first,
                cbor: inner_message(cbor),
                msgpack: inner_message(msgpack),
            })
        }
    }
}

/// The decoder's own words, without the "payload is not valid X" framing.
fn inner_message(e: DecodeError) -> String {
    match e {
        DecodeError::Malformed { message, .. } => message,
        other => other.to_string(),
    }
}

fn is_json_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn malformed(format: PayloadFormat, message: impl Into<String>) -> DecodeError {
    DecodeError::Malformed {
        format,
        message: message.into(),
    }
}

fn parse_json(payload: &[u8], max_depth: usize) -> Result<Node<'_>, DecodeError> {
    if payload.iter().all(|b| is_json_whitespace(*b)) {
        return Err(DecodeError::Empty);
    }
    let too_deep = Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(payload);
    let tree = NodeSeed::<Borrowing>::new(max_depth, &too_deep)
        .deserialize(&mut de)
        .and_then(|tree| de.end().map(|()| tree));
    tree.map_err(|e| {
        if too_deep.get() {
            DecodeError::TooDeep { max: max_depth }
        } else {
            malformed(PayloadFormat::Json, e.to_string())
        }
    })
}

fn parse_cbor(payload: &[u8], max_depth: usize) -> Result<Node<'static>, DecodeError> {
    use ciborium::de::Error;
    if payload.is_empty() {
        return Err(DecodeError::Empty);
    }
    let mut rest = payload;
    // ciborium only deserializes owned values; its own recursion limit (arrays, maps, tags)
    // enforces the depth.
    let tree = ciborium::de::from_reader_with_recursion_limit::<CborRoot, _>(&mut rest, max_depth)
        .map_err(|e| match e {
            Error::RecursionLimitExceeded => DecodeError::TooDeep { max: max_depth },
            Error::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                malformed(PayloadFormat::Cbor, "unexpected end of data")
            }
            Error::Io(e) => malformed(PayloadFormat::Cbor, e.to_string()),
            Error::Syntax(offset) => malformed(
                PayloadFormat::Cbor,
                format!("syntax error at byte {offset}"),
            ),
            Error::Semantic(Some(offset), message) => {
                malformed(PayloadFormat::Cbor, format!("{message} (at byte {offset})"))
            }
            Error::Semantic(None, message) => malformed(PayloadFormat::Cbor, message),
        })?;
    if !rest.is_empty() {
        return Err(malformed(
            PayloadFormat::Cbor,
            format!("{} unexpected bytes after the first item", rest.len()),
        ));
    }
    Ok(tree.0)
}

fn parse_msgpack(payload: &[u8], max_depth: usize) -> Result<Node<'_>, DecodeError> {
    use rmp_serde::decode::Error;
    if payload.is_empty() {
        return Err(DecodeError::Empty);
    }
    let too_deep = Cell::new(false);
    let mut de = rmp_serde::Deserializer::from_read_ref(payload);
    // Our seed counts depth itself (typed error); rmp's own limit is a backstop one level below.
    de.set_max_depth(max_depth.saturating_add(1));
    let map_err = |e: Error| match e {
        Error::DepthLimitExceeded => DecodeError::TooDeep { max: max_depth },
        _ if too_deep.get() => DecodeError::TooDeep { max: max_depth },
        Error::InvalidMarkerRead(e) | Error::InvalidDataRead(e)
            if e.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            malformed(PayloadFormat::MessagePack, "unexpected end of data")
        }
        e => malformed(PayloadFormat::MessagePack, e.to_string()),
    };
    let tree = NodeSeed::<Borrowing>::new(max_depth, &too_deep)
        .deserialize(&mut de)
        .map_err(map_err)?;
    // rmp-serde cannot tell how much it consumed from a borrowed slice: probe for another value.
    match IgnoredAny::deserialize(&mut de) {
        Err(Error::InvalidMarkerRead(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Ok(tree)
        }
        _ => Err(malformed(
            PayloadFormat::MessagePack,
            "unexpected bytes after the first value",
        )),
    }
}

/// How the tree keeps the strings a decoder hands over: borrowed from the payload when the
/// decoder can lend them (JSON without escapes, MessagePack), copied otherwise.
trait StrMode<'de, 'a> {
    fn keep(s: &'de str) -> Cow<'a, str>;
}

struct Borrowing;
impl<'de: 'a, 'a> StrMode<'de, 'a> for Borrowing {
    fn keep(s: &'de str) -> Cow<'a, str> {
        Cow::Borrowed(s)
    }
}

struct Copying;
impl<'de, 'a> StrMode<'de, 'a> for Copying {
    fn keep(s: &'de str) -> Cow<'a, str> {
        Cow::Owned(s.to_owned())
    }
}

/// A CBOR payload's tree (ciborium needs a `DeserializeOwned` type).
struct CborRoot(Node<'static>);

impl<'de> Deserialize<'de> for CborRoot {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let unused = Cell::new(false);
        NodeSeed::<Copying>::new(usize::MAX, &unused)
            .deserialize(deserializer)
            .map(CborRoot)
    }
}

/// Deserializes a [`Node`], counting depth.
struct NodeSeed<'a, 'c, M> {
    /// Containers enclosing the value being decoded.
    depth: usize,
    max_depth: usize,
    /// Set when the depth limit stops decoding (the format's error type hides our reason).
    too_deep: &'c Cell<bool>,
    mode: PhantomData<(Cow<'a, str>, M)>,
}

impl<'c, M> NodeSeed<'_, 'c, M> {
    fn new(max_depth: usize, too_deep: &'c Cell<bool>) -> Self {
        Self {
            depth: 0,
            max_depth,
            too_deep,
            mode: PhantomData,
        }
    }

    /// The seed for the children of a container, or an error past the depth limit.
    fn enter<E: de::Error>(self) -> Result<Self, E> {
        if self.depth >= self.max_depth {
            self.too_deep.set(true);
            return Err(E::custom(format_args!(
                "nesting deeper than {} levels",
                self.max_depth
            )));
        }
        Ok(Self {
            depth: self.depth + 1,
            ..self
        })
    }
}

// Manual impls: a derive would require `M: Copy`.
impl<M> Clone for NodeSeed<'_, '_, M> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<M> Copy for NodeSeed<'_, '_, M> {}

/// Container pre-allocation cap: a declared length is not trusted.
const MAX_PREALLOC: usize = 256;

impl<'de, 'a, M: StrMode<'de, 'a>> DeserializeSeed<'de> for NodeSeed<'a, '_, M> {
    type Value = Node<'a>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, 'a, M: StrMode<'de, 'a>> Visitor<'de> for NodeSeed<'a, '_, M> {
    type Value = Node<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object, array, number, string, boolean or null")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Node<'a>, E> {
        Ok(Node::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Node<'a>, E> {
        Ok(Node::Int(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Node<'a>, E> {
        Ok(i64::try_from(v).map_or(Node::Float(v as f64), Node::Int))
    }

    fn visit_i128<E>(self, v: i128) -> Result<Node<'a>, E> {
        Ok(i64::try_from(v).map_or(Node::Float(v as f64), Node::Int))
    }

    fn visit_u128<E>(self, v: u128) -> Result<Node<'a>, E> {
        Ok(i64::try_from(v).map_or(Node::Float(v as f64), Node::Int))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Node<'a>, E> {
        Ok(Node::Float(v))
    }

    fn visit_char<E>(self, v: char) -> Result<Node<'a>, E> {
        Ok(Node::Str(Cow::Owned(v.to_string())))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Node<'a>, E> {
        Ok(Node::Str(M::keep(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Node<'a>, E> {
        Ok(Node::Str(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Node<'a>, E> {
        Ok(Node::Str(Cow::Owned(v)))
    }

    fn visit_bytes<E>(self, v: &[u8]) -> Result<Node<'a>, E> {
        Ok(Node::Bytes(v.len()))
    }

    fn visit_none<E>(self) -> Result<Node<'a>, E> {
        Ok(Node::Null)
    }

    fn visit_unit<E>(self) -> Result<Node<'a>, E> {
        Ok(Node::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Node<'a>, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node<'a>, A::Error> {
        let child = self.enter()?;
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_PREALLOC));
        while let Some(item) = seq.next_element_seed(child)? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node<'a>, A::Error> {
        let child = self.enter()?;
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(MAX_PREALLOC));
        while let Some(key) = map.next_key_seed(KeySeed::<M>(PhantomData))? {
            let value = map.next_value_seed(child)?;
            entries.push((key, value));
        }
        Ok(Node::Map(entries))
    }

    /// CBOR tags arrive as enums (tag number, tagged item): look through the tag.
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<Node<'a>, A::Error> {
        use de::VariantAccess;
        let (IgnoredAny, variant) = data.variant::<IgnoredAny>()?;
        variant.newtype_variant_seed(self)
    }
}

/// Deserializes a map key, which must be a string.
struct KeySeed<'a, M>(PhantomData<(Cow<'a, str>, M)>);

impl<'de, 'a, M: StrMode<'de, 'a>> DeserializeSeed<'de> for KeySeed<'a, M> {
    type Value = Cow<'a, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        // `deserialize_any`, so that a non-string key reaches our visitor and its message.
        deserializer.deserialize_any(KeyVisitor::<M>(PhantomData))
    }
}

struct KeyVisitor<'a, M>(PhantomData<(Cow<'a, str>, M)>);

impl<'de, 'a, M: StrMode<'de, 'a>> Visitor<'de> for KeyVisitor<'a, M> {
    type Value = Cow<'a, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a text string as map key (metric names are strings)")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(M::keep(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

// ---------------------------------------------------------------------------------------------
// Tree → samples.

struct Mapper<'o> {
    out: &'o mut Vec<Sample>,
    /// Length of `out` before this payload (the sample limit counts this payload only).
    start: usize,
    max_samples: usize,
    /// The metric name being built (reused across samples).
    path: String,
}

impl Mapper<'_> {
    fn root(&mut self, tree: Node<'_>, prefix: Option<&str>) -> Result<(), DecodeError> {
        let prefix = prefix.filter(|p| !p.is_empty());
        if let Some(prefix) = prefix {
            check_metric_chars(prefix).map_err(|reason| invalid_metric(prefix, reason))?;
        }
        match tree {
            Node::Map(entries) => self.sample_object(entries, prefix),
            Node::Array(items) => {
                for (index, item) in items.into_iter().enumerate() {
                    match item {
                        Node::Map(entries) => self.sample_object(entries, prefix)?,
                        other => {
                            return Err(DecodeError::BatchElement {
                                index,
                                found: other.kind(),
                            });
                        }
                    }
                }
                Ok(())
            }
            scalar => match prefix {
                Some(prefix) => {
                    self.path.clear();
                    self.path.push_str(prefix);
                    self.value(scalar, None)
                }
                None if matches!(scalar, Node::Null) => {
                    Err(DecodeError::BareScalar { found: "null" })
                }
                None => Err(DecodeError::BareScalar {
                    found: scalar.kind(),
                }),
            },
        }
    }

    /// One object of the payload: its own timestamp, flat or ThingsBoard-shaped.
    fn sample_object(
        &mut self,
        entries: Vec<(Cow<'_, str>, Node<'_>)>,
        prefix: Option<&str>,
    ) -> Result<(), DecodeError> {
        let mut ts: Option<(&'static str, i64)> = None;
        for (key, value) in &entries {
            if let Some(ts_key) = timestamp_key(key) {
                if let Some((first, _)) = ts {
                    return Err(DecodeError::BadTimestamp {
                        key: ts_key,
                        reason: format!(
                            "appears after timestamp `{first}`: one object may have only one timestamp"
                        ),
                    });
                }
                ts = Some((ts_key, parse_timestamp(ts_key, value)?));
            }
        }
        let ts_ms = ts.map(|(_, ms)| ms);
        let thingsboard = ts.is_some()
            && entries.len() == 2
            && entries
                .iter()
                .any(|(k, v)| k == "values" && matches!(v, Node::Map(_)));
        let entries = entries
            .into_iter()
            .filter(|(k, _)| timestamp_key(k).is_none());
        if thingsboard {
            for (_, values) in entries {
                if let Node::Map(inner) = values {
                    self.top_entries(inner, prefix, ts_ms)?;
                }
            }
            Ok(())
        } else {
            self.top_entries(entries, prefix, ts_ms)
        }
    }

    /// The metrics of a sample object (timestamp keys already removed).
    fn top_entries<'t>(
        &mut self,
        entries: impl IntoIterator<Item = (Cow<'t, str>, Node<'t>)>,
        prefix: Option<&str>,
        ts_ms: Option<i64>,
    ) -> Result<(), DecodeError> {
        for (key, value) in entries {
            self.path.clear();
            if let Some(prefix) = prefix {
                self.path.push_str(prefix);
                self.path.push('.');
            }
            self.push_key(&key)?;
            self.value(value, ts_ms)?;
        }
        Ok(())
    }

    /// Appends a key to the path (the caller has pushed the separator).
    fn push_key(&mut self, key: &str) -> Result<(), DecodeError> {
        if key.is_empty() {
            self.path.push_str("<empty>");
            return Err(invalid_metric(&self.path, "a key is empty"));
        }
        self.path.push_str(key);
        check_metric_chars(key).map_err(|reason| invalid_metric(&self.path, reason))
    }

    /// Emits the samples of `node` under the current path.
    fn value(&mut self, node: Node<'_>, ts_ms: Option<i64>) -> Result<(), DecodeError> {
        let value = match node {
            Node::Null => return Ok(()),
            Node::Bool(b) => Value::Bool(b),
            Node::Int(i) => Value::Int(i),
            Node::Float(f) if f.is_finite() => Value::Float(f),
            Node::Float(_) => {
                return Err(DecodeError::NonFinite {
                    metric: shorten(&self.path, 80),
                });
            }
            Node::Str(s) => Value::Str(s.into_owned()),
            Node::Bytes(len) => {
                return Err(DecodeError::Binary {
                    metric: shorten(&self.path, 80),
                    len,
                });
            }
            Node::Array(items) => {
                let len = self.path.len();
                for (index, item) in items.into_iter().enumerate() {
                    use std::fmt::Write as _;
                    // Writing to a String cannot fail.
                    let _ = write!(self.path, ".{index}");
                    self.value(item, ts_ms)?;
                    self.path.truncate(len);
                }
                return Ok(());
            }
            Node::Map(entries) => {
                let len = self.path.len();
                for (key, item) in entries {
                    self.path.push('.');
                    self.push_key(&key)?;
                    self.value(item, ts_ms)?;
                    self.path.truncate(len);
                }
                return Ok(());
            }
        };
        if self.path.len() > MAX_METRIC_LEN {
            return Err(invalid_metric(&self.path, "it is longer than the limit"));
        }
        if self.out.len() - self.start >= self.max_samples {
            return Err(DecodeError::TooManySamples {
                max: self.max_samples,
            });
        }
        self.out.push(Sample {
            metric: self.path.clone(),
            ts_ms,
            value,
        });
        Ok(())
    }
}

fn timestamp_key(key: &str) -> Option<&'static str> {
    TIMESTAMP_KEYS.into_iter().find(|k| *k == key)
}

fn invalid_metric(metric: &str, reason: &'static str) -> DecodeError {
    DecodeError::InvalidMetric {
        metric: shorten(metric, 80),
        reason,
    }
}

/// `s` cut to `max_chars` characters (marked with `…`), for an error message.
pub(crate) fn shorten(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((end, _)) => format!("{}…", &s[..end]),
        None => s.to_owned(),
    }
}

/// Checks a metric name's characters (emptiness and length are checked by the callers, which
/// know whether a piece or a whole name is at hand).
fn check_metric_chars(name: &str) -> Result<(), &'static str> {
    if name.chars().any(char::is_control) {
        return Err("it contains a control character");
    }
    Ok(())
}

/// Checks a whole metric name: 1 to [`MAX_METRIC_LEN`] bytes, no control characters.
pub(crate) fn check_metric(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > MAX_METRIC_LEN {
        return Err("it is longer than the limit");
    }
    check_metric_chars(name)
}

// ---------------------------------------------------------------------------------------------
// Timestamps.

fn parse_timestamp(key: &'static str, node: &Node<'_>) -> Result<i64, DecodeError> {
    let bad = |reason: String| DecodeError::BadTimestamp { key, reason };
    match node {
        Node::Int(n) => {
            if n.unsigned_abs() < SECONDS_BELOW as u64 {
                Ok(n * 1000)
            } else {
                Ok(*n)
            }
        }
        Node::Float(f) => {
            if !f.is_finite() {
                return Err(bad("is NaN or infinite".to_owned()));
            }
            let ms = if f.abs() < SECONDS_BELOW as f64 {
                (f * 1000.0).round()
            } else {
                f.round()
            };
            // i64::MIN as f64 is exactly -2^63; 2^63 itself does not fit.
            if ms >= -(2f64.powi(63)) && ms < 2f64.powi(63) {
                Ok(ms as i64)
            } else {
                Err(bad(format!("{f} is out of range")))
            }
        }
        Node::Str(s) => parse_rfc3339(s).map_err(|reason| {
            bad(format!(
                "\"{}\" is not an RFC 3339 time: {reason}",
                shorten(s, 80)
            ))
        }),
        other => Err(bad(format!("is a {}", other.kind()))),
    }
}

/// Parses `YYYY-MM-DD(T|t| )HH:MM:SS[.fraction][Z|z|±HH:MM]` (no offset: UTC) into
/// milliseconds since the Unix epoch; digits past the millisecond are dropped.
fn parse_rfc3339(s: &str) -> Result<i64, &'static str> {
    let b = s.as_bytes();
    if b.len() < 19 {
        return Err("too short (expected YYYY-MM-DDTHH:MM:SS)");
    }
    let digits = |range: std::ops::Range<usize>| -> Result<i64, &'static str> {
        b[range].iter().try_fold(0i64, |acc, c| match c {
            b'0'..=b'9' => Ok(acc * 10 + i64::from(c - b'0')),
            _ => Err("expected a digit"),
        })
    };
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err("expected YYYY-MM-DDTHH:MM:SS");
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err("no such date");
    }
    if hour > 23 || minute > 59 || second > 60 {
        return Err("no such time of day");
    }
    let mut pos = 19;
    let mut millis = 0;
    if b.get(pos) == Some(&b'.') {
        pos += 1;
        let start = pos;
        while let Some(c @ b'0'..=b'9') = b.get(pos) {
            if pos - start < 3 {
                millis = millis * 10 + i64::from(c - b'0');
            }
            pos += 1;
        }
        if pos == start {
            return Err("expected digits after the decimal point");
        }
        for _ in (pos - start)..3 {
            millis *= 10;
        }
    }
    let offset_minutes = match &b[pos..] {
        [] | [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let two = |a: u8, b: u8| match (a, b) {
                (b'0'..=b'9', b'0'..=b'9') => Ok(i64::from(a - b'0') * 10 + i64::from(b - b'0')),
                _ => Err("bad offset (expected Z or ±HH:MM)"),
            };
            let (h, m) = (two(*h1, *h2)?, two(*m1, *m2)?);
            if h > 23 || m > 59 {
                return Err("bad offset (expected Z or ±HH:MM)");
            }
            let minutes = h * 60 + m;
            if *sign == b'-' { -minutes } else { minutes }
        }
        _ => return Err("unexpected text after the time (expected Z or ±HH:MM)"),
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60;
    Ok(seconds * 1000 + millis)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests;
