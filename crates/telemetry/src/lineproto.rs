//! InfluxDB line protocol (the body of an InfluxDB v2 `/api/v2/write` request), and how its
//! points become Ferrohub series.
//!
//! # Syntax accepted
//!
//! One point per line: `measurement[,tag=value...] field=value[,field=value...] [timestamp]`, as
//! in the InfluxDB v2 line protocol reference:
//!
//! - Lines end with `\n`; a `\r` before it is dropped (`\r\n` line ends). Blank lines and lines
//!   whose first non-blank character is `#` (comments) are skipped. Leading spaces and tabs are
//!   skipped; sections are separated by one or more spaces; trailing spaces are allowed. Elsewhere
//!   a tab is an ordinary character (InfluxDB also skips tabs after a separating space; Ferrohub
//!   keeps them, so a field key may start with one).
//! - Escapes: in the measurement, `\,` `\ ` and `\\`; in tag keys, tag values and field keys,
//!   `\,` `\=` `\ ` and `\\`; in string field values, `\"` and `\\`. A backslash before any
//!   other character is a literal backslash. There is no escape for a newline: a raw newline
//!   always ends the line, so a string field value cannot contain one (InfluxDB's reference
//!   says newlines are not supported in tag or field values).
//! - Tags are optional; a tag needs a non-empty key and value; a tag key may appear only once.
//! - At least one field. Field values: float (`1`, `1.0`, `-1.5e3`, `.5`; `NaN` and infinities
//!   are refused), integer (`1i`, signed 64-bit), unsigned (`1u`, stored as an integer, so it must
//!   not exceed 2^63 − 1), string (`"..."`), boolean (`t T true True TRUE f F false False
//!   FALSE`). When a field key repeats in one line, the last value wins (at the position of its
//!   last occurrence).
//! - The timestamp is optional (then [`LineProtocolPoint::ts_ms`] is `None` and the caller uses
//!   its own clock); it is a signed integer in the request's [`Precision`] (default
//!   nanoseconds), converted to milliseconds by floor division (`-1` ns is `-1` ms).
//! - Unlike InfluxDB, names starting with `_` are not refused (Ferrohub reserves none).
//!
//! [`parse`] parses every line and reports each bad line with its number; InfluxDB v2 rejects a
//! whole request when any line is bad, which [`ParseOutcome::into_result`] does.
//!
//! # Mapping to Ferrohub series ([`to_samples`])
//!
//! - The **device** is the value of a device tag: the first name in `device_tags` (the hub's
//!   default is `["device", "host"]`) that the point has as a tag key. A point with none of them
//!   is refused. The device tag is removed from the tags; other tags, including another device
//!   tag name, stay.
//! - The device must be a valid device id, as in the registry ([`ferrohub_types::id`]: 1–128
//!   characters of `A-Z a-z 0-9 . _ : -`); a point whose device is not is refused with
//!   [`MappingError::InvalidDevice`] (the write path drops that point and stores the others, as
//!   InfluxDB does with a bad point).
//! - Each **field** is one sample; its metric is `measurement.field`. When tags remain, they
//!   are appended sorted by key, as `measurement.field{k1=v1,k2=v2}`, so that points with
//!   different tag sets stay distinct series; inside the braces `\`, `,`, `=` and `}` are
//!   escaped with a backslash (dots are not escaped: measurement `a.b` with field `c` and
//!   measurement `a` with field `b.c` are the same metric).
//! - The sample's timestamp is the point's (`None` if it had none).
//! - A metric must be at most [`MAX_METRIC_LEN`] bytes and without control characters; a point
//!   with one that is not is refused, naming it.

use std::fmt;
use std::str::FromStr;

use ferrohub_types::id::{ID_RULE, is_valid_id};
use ferrohub_types::telemetry::{MAX_METRIC_LEN, Sample, Value};
use serde::{Deserialize, Serialize};

use crate::decode::{check_metric, shorten};

/// At most this many bad lines are kept in [`ParseOutcome::errors`] (all are counted).
pub const MAX_REPORTED_ERRORS: usize = 100;

/// The unit of the timestamps of a write request (its `precision` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Nanoseconds (the default).
    #[default]
    Ns,
    /// Microseconds.
    Us,
    /// Milliseconds.
    Ms,
    /// Seconds.
    S,
}

impl Precision {
    /// The precision named by a `precision` query value: `ns`, `us`, `ms` or `s` (InfluxDB v2),
    /// or the v1 spellings `n` and `u`. `None` for anything else.
    pub fn from_query(value: &str) -> Option<Self> {
        match value {
            "ns" | "n" => Some(Precision::Ns),
            "us" | "u" => Some(Precision::Us),
            "ms" => Some(Precision::Ms),
            "s" => Some(Precision::S),
            _ => None,
        }
    }

    /// The v2 spelling (`ns`, `us`, `ms`, `s`).
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Ns => "ns",
            Precision::Us => "us",
            Precision::Ms => "ms",
            Precision::S => "s",
        }
    }

    /// A timestamp in this precision as milliseconds (floor division); `None` if it overflows.
    pub fn to_millis(self, ts: i64) -> Option<i64> {
        match self {
            Precision::Ns => Some(ts.div_euclid(1_000_000)),
            Precision::Us => Some(ts.div_euclid(1_000)),
            Precision::Ms => Some(ts),
            Precision::S => ts.checked_mul(1_000),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `precision` value that is not `ns`, `us`, `ms`, `s`, `n` or `u`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown precision `{0}` (expected ns, us, ms or s)")]
pub struct UnknownPrecision(pub String);

impl FromStr for Precision {
    type Err = UnknownPrecision;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Precision::from_query(s).ok_or_else(|| UnknownPrecision(s.to_owned()))
    }
}

/// One parsed line, names unescaped.
#[derive(Debug, Clone, PartialEq)]
pub struct LineProtocolPoint {
    /// The measurement.
    pub measurement: String,
    /// Tags in line order (keys unique).
    pub tags: Vec<(String, String)>,
    /// Fields in line order (keys unique; at least one).
    pub fields: Vec<(String, Value)>,
    /// The timestamp in milliseconds since the Unix epoch; `None` if the line had none.
    pub ts_ms: Option<i64>,
}

/// A line that could not be parsed. Displays as InfluxDB does: `unable to parse 'LINE': REASON`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unable to parse '{text}': {reason}")]
pub struct LineError {
    /// Line number in the body, from 1.
    pub line: usize,
    /// Byte column in that line where the problem was found, from 1.
    pub column: usize,
    /// The line without leading blanks (cut to 200 characters when longer).
    pub text: String,
    /// What is wrong.
    pub reason: String,
}

/// What [`parse`] found in a body.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParseOutcome {
    /// The points of the lines that parsed, in body order.
    pub points: Vec<LineProtocolPoint>,
    /// The line number (from 1) of each of `points`.
    pub lines: Vec<usize>,
    /// The first [`MAX_REPORTED_ERRORS`] bad lines, in body order.
    pub errors: Vec<LineError>,
    /// How many lines were bad (may exceed `errors.len()`).
    pub failed_lines: usize,
}

impl ParseOutcome {
    /// The first bad line, if any.
    pub fn first_error(&self) -> Option<&LineError> {
        self.errors.first()
    }

    /// All points, or the first error if any line was bad (InfluxDB v2 semantics: a request is
    /// written whole or not at all).
    pub fn into_result(mut self) -> Result<Vec<LineProtocolPoint>, LineError> {
        if self.errors.is_empty() {
            Ok(self.points)
        } else {
            Err(self.errors.swap_remove(0))
        }
    }
}

/// Parses a line protocol body; see the [module docs](self) for the syntax.
pub fn parse(body: &str, precision: Precision) -> ParseOutcome {
    let mut outcome = ParseOutcome::default();
    for (index, raw) in body.split('\n').enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        let start = line.len() - line.trim_start_matches([' ', '\t']).len();
        if start == line.len() || line.as_bytes()[start] == b'#' {
            continue;
        }
        match parse_line(line, start, precision) {
            Ok(point) => {
                outcome.points.push(point);
                outcome.lines.push(index + 1);
            }
            Err(fail) => {
                outcome.failed_lines += 1;
                if outcome.errors.len() < MAX_REPORTED_ERRORS {
                    outcome.errors.push(LineError {
                        line: index + 1,
                        column: fail.at + 1,
                        text: shorten(&line[start..], 200),
                        reason: fail.reason,
                    });
                }
            }
        }
    }
    outcome
}

/// Why a line failed, and where (byte offset in the line).
struct Fail {
    at: usize,
    reason: String,
}

fn fail<T>(at: usize, reason: impl Into<String>) -> Result<T, Fail> {
    Err(Fail {
        at,
        reason: reason.into(),
    })
}

/// Characters a backslash escapes in a measurement (besides the backslash itself).
const MEASUREMENT_ESCAPES: &[u8] = b", ";
/// Characters a backslash escapes in tag keys, tag values and field keys.
const KEY_ESCAPES: &[u8] = b",= ";

struct Cursor<'l> {
    line: &'l str,
    pos: usize,
}

impl<'l> Cursor<'l> {
    fn peek(&self) -> Option<u8> {
        self.line.as_bytes().get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.line.len()
    }

    fn skip_spaces(&mut self) {
        while self.peek() == Some(b' ') {
            self.pos += 1;
        }
    }

    /// Reads a name up to the first unescaped byte of `stops` (or the end), unescaping it.
    /// Returns the name and the stop byte (`None` at the end of the line).
    fn name(&mut self, escapes: &[u8], stops: &[u8]) -> (String, Option<u8>) {
        let bytes = self.line.as_bytes();
        let start = self.pos;
        // Only allocate an unescaped copy when there is something to unescape.
        let mut unescaped: Option<String> = None;
        let mut segment = start;
        let mut i = start;
        while i < bytes.len() {
            let b = bytes[i];
            if b == b'\\' {
                match bytes.get(i + 1) {
                    Some(&next) if next == b'\\' || escapes.contains(&next) => {
                        let out = unescaped.get_or_insert_with(String::new);
                        out.push_str(&self.line[segment..i]);
                        out.push(char::from(next));
                        i += 2;
                        segment = i;
                    }
                    _ => i += 1,
                }
                continue;
            }
            if stops.contains(&b) {
                break;
            }
            i += 1;
        }
        self.pos = i;
        let name = match unescaped {
            Some(mut out) => {
                out.push_str(&self.line[segment..i]);
                out
            }
            None => self.line[start..i].to_owned(),
        };
        (name, bytes.get(i).copied())
    }

    /// Reads a field value (the cursor is just after the `=`).
    fn field_value(&mut self) -> Result<Value, Fail> {
        let start = self.pos;
        match self.peek() {
            None | Some(b',' | b' ') => fail(start, "missing field value"),
            Some(b'"') => self.string_value().map(Value::Str),
            Some(_) => {
                let end = self.line.as_bytes()[start..]
                    .iter()
                    .position(|b| matches!(b, b',' | b' '))
                    .map_or(self.line.len(), |n| start + n);
                self.pos = end;
                scalar_value(&self.line[start..end]).map_err(|reason| Fail { at: start, reason })
            }
        }
    }

    /// Reads a `"..."` string (the cursor is on the opening quote).
    fn string_value(&mut self) -> Result<String, Fail> {
        let open = self.pos;
        let bytes = self.line.as_bytes();
        let mut out = String::new();
        let mut segment = open + 1;
        let mut i = open + 1;
        loop {
            match bytes.get(i) {
                None => {
                    return fail(
                        open,
                        "unterminated string field value (a string must end with `\"` on the same \
                         line; write `\\\"` for a quote and `\\\\` for a backslash inside it)",
                    );
                }
                Some(b'\\') if matches!(bytes.get(i + 1), Some(b'"' | b'\\')) => {
                    out.push_str(&self.line[segment..i]);
                    out.push(char::from(bytes[i + 1]));
                    i += 2;
                    segment = i;
                }
                Some(b'"') => break,
                Some(_) => i += 1,
            }
        }
        out.push_str(&self.line[segment..i]);
        self.pos = i + 1;
        match self.peek() {
            None | Some(b',' | b' ') => Ok(out),
            Some(_) => fail(
                self.pos,
                "unexpected character after a string field value (expected `,` or a space)",
            ),
        }
    }
}

/// An unquoted field value: boolean, integer, unsigned or float.
fn scalar_value(token: &str) -> Result<Value, String> {
    match token {
        "t" | "T" | "true" | "True" | "TRUE" => return Ok(Value::Bool(true)),
        "f" | "F" | "false" | "False" | "FALSE" => return Ok(Value::Bool(false)),
        _ => {}
    }
    let invalid = || {
        format!(
            "invalid field value `{}` (expected a float such as 1.5, an integer such as 1i, an \
             unsigned integer such as 1u, a \"string\" or a boolean)",
            shorten(token, 40)
        )
    };
    if let Some(digits) = token.strip_suffix('i') {
        if !is_integer(digits.strip_prefix('-').unwrap_or(digits)) {
            return Err(invalid());
        }
        return digits.parse::<i64>().map(Value::Int).map_err(|_| {
            format!(
                "integer `{}` is out of the signed 64-bit range",
                shorten(token, 40)
            )
        });
    }
    if let Some(digits) = token.strip_suffix('u') {
        if !is_integer(digits) {
            return Err(invalid());
        }
        return match digits.parse::<u64>() {
            Ok(n) => i64::try_from(n).map(Value::Int).map_err(|_| {
                format!(
                    "unsigned integer `{token}` is larger than {} (Ferrohub stores integers as signed \
                     64-bit)",
                    i64::MAX
                )
            }),
            Err(_) => Err(format!("unsigned integer `{}` is out of the 64-bit range", shorten(token, 40))),
        };
    }
    if !is_float(token) {
        return Err(invalid());
    }
    match token.parse::<f64>() {
        Ok(f) if f.is_finite() => Ok(Value::Float(f)),
        _ => Err(format!("float `{}` is out of range", shorten(token, 40))),
    }
}

fn is_integer(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// `-?(digits[.digits?] | .digits)([eE][+-]?digits)?`
fn is_float(s: &str) -> bool {
    let s = s.strip_prefix('-').unwrap_or(s);
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(e) => (&s[..e], Some(&s[e + 1..])),
        None => (s, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() && frac.is_empty() || !digits(int) || !digits(frac) {
        return false;
    }
    match exponent {
        None => true,
        Some(e) => is_integer(e.strip_prefix(['+', '-']).unwrap_or(e)),
    }
}

/// Parses one non-blank, non-comment line whose content starts at byte `start`.
fn parse_line(line: &str, start: usize, precision: Precision) -> Result<LineProtocolPoint, Fail> {
    let mut cur = Cursor { line, pos: start };

    let (measurement, mut stop) = cur.name(MEASUREMENT_ESCAPES, b", ");
    if measurement.is_empty() {
        return fail(start, "missing measurement");
    }

    let mut tags: Vec<(String, String)> = Vec::new();
    while stop == Some(b',') {
        cur.pos += 1;
        let key_at = cur.pos;
        let (key, key_stop) = cur.name(KEY_ESCAPES, b",= ");
        if key.is_empty() {
            return fail(key_at, "missing tag key");
        }
        if key_stop != Some(b'=') {
            return fail(
                cur.pos,
                format!(
                    "missing tag value (tag `{}` needs `=value`)",
                    shorten(&key, 40)
                ),
            );
        }
        cur.pos += 1;
        let value_at = cur.pos;
        let (value, value_stop) = cur.name(KEY_ESCAPES, b",= ");
        if value_stop == Some(b'=') {
            return fail(
                cur.pos,
                "invalid tag value: unescaped `=` (write it as `\\=`)",
            );
        }
        if value.is_empty() {
            return fail(
                value_at,
                format!("missing tag value (tag `{}` is empty)", shorten(&key, 40)),
            );
        }
        tags.push((key, value));
        stop = value_stop;
    }
    if let Some(dup) = first_duplicate(&tags) {
        return fail(
            start,
            format!("duplicate tag key `{}`", shorten(&tags[dup].0, 40)),
        );
    }

    cur.skip_spaces();
    if cur.at_end() {
        return fail(
            cur.pos,
            "missing fields (expected `field=value` after the measurement and tags)",
        );
    }

    let mut fields: Vec<(String, Value)> = Vec::new();
    loop {
        let key_at = cur.pos;
        let (key, key_stop) = cur.name(KEY_ESCAPES, b",= ");
        if key.is_empty() {
            return fail(key_at, "missing field key");
        }
        if key_stop != Some(b'=') {
            return fail(
                cur.pos,
                format!(
                    "invalid field format: field `{}` has no `=value`",
                    shorten(&key, 40)
                ),
            );
        }
        cur.pos += 1;
        let value = cur.field_value()?;
        fields.push((key, value));
        if cur.peek() == Some(b',') {
            cur.pos += 1;
        } else {
            break;
        }
    }
    dedupe_last_wins(&mut fields);

    cur.skip_spaces();
    let ts_ms = if cur.at_end() {
        None
    } else {
        let ts_at = cur.pos;
        let len = line.as_bytes()[ts_at..]
            .iter()
            .position(|b| *b == b' ')
            .unwrap_or(line.len() - ts_at);
        let token = &line[ts_at..ts_at + len];
        cur.pos += len;
        let digits = token.strip_prefix('-').unwrap_or(token);
        if !is_integer(digits) {
            return fail(
                ts_at,
                format!(
                    "invalid timestamp `{}` (expected an integer number of {precision})",
                    shorten(token, 40)
                ),
            );
        }
        let ms = token
            .parse::<i64>()
            .ok()
            .and_then(|ts| precision.to_millis(ts));
        let Some(ms) = ms else {
            return fail(
                ts_at,
                format!("timestamp `{}` is out of range", shorten(token, 40)),
            );
        };
        cur.skip_spaces();
        if !cur.at_end() {
            return fail(cur.pos, "unexpected text after the timestamp");
        }
        Some(ms)
    };

    Ok(LineProtocolPoint {
        measurement,
        tags,
        fields,
        ts_ms,
    })
}

/// Below this many entries, quadratic duplicate checks beat sorting.
const SMALL: usize = 16;

/// Index of an entry whose key an earlier entry has, if any.
fn first_duplicate<T>(entries: &[(String, T)]) -> Option<usize> {
    if entries.len() <= SMALL {
        return (1..entries.len()).find(|&i| entries[..i].iter().any(|(k, _)| *k == entries[i].0));
    }
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_unstable_by(|a, b| entries[*a].0.cmp(&entries[*b].0).then(a.cmp(b)));
    order
        .windows(2)
        .find(|w| entries[w[0]].0 == entries[w[1]].0)
        .map(|w| w[1])
}

/// Drops every entry whose key a later entry repeats.
fn dedupe_last_wins<T>(entries: &mut Vec<(String, T)>) {
    if entries.len() < 2 {
        return;
    }
    let mut keep = vec![true; entries.len()];
    if entries.len() <= SMALL {
        for i in 0..entries.len() {
            keep[i] = !entries[i + 1..].iter().any(|(k, _)| *k == entries[i].0);
        }
    } else {
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_unstable_by(|a, b| entries[*a].0.cmp(&entries[*b].0).then(a.cmp(b)));
        for w in order.windows(2) {
            if entries[w[0]].0 == entries[w[1]].0 {
                keep[w[0]] = false;
            }
        }
    }
    if keep.iter().all(|k| *k) {
        return;
    }
    let mut index = 0;
    entries.retain(|_| {
        index += 1;
        keep[index - 1]
    });
}

/// Why a point cannot become samples.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    /// None of the device tags is present.
    #[error(
        "point `{measurement}` names no device: add a tag {looked_for} (for example \
         `{measurement},{first}=sensor-1 ...`)"
    )]
    NoDeviceTag {
        /// The point's measurement (cut when long).
        measurement: String,
        /// The tag names looked for, quoted and joined with "or".
        looked_for: String,
        /// The first of them (for the example).
        first: String,
    },
    /// The device tag's value is not a valid device id.
    #[error("device id {device:?} (tag `{tag}`) is not valid: device ids are {rule}", rule = ID_RULE)]
    InvalidDevice {
        /// The value (cut to 80 characters when longer).
        device: String,
        /// The tag it was in.
        tag: String,
        /// The point's fields (the samples it would have given).
        fields: usize,
    },
    /// A metric built from the point is too long or holds a control character.
    #[error(
        "invalid metric name `{metric}`: {reason} (a metric `measurement.field{{tags}}` must be 1 \
         to {max} bytes without control characters)",
        max = MAX_METRIC_LEN
    )]
    InvalidMetric {
        /// The metric (cut to 80 characters when longer).
        metric: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Maps a point onto `(device, samples)`; see the [module docs](self) for the rules.
/// `device_tags` lists the tag names that may carry the device, in order of preference.
pub fn to_samples(
    point: LineProtocolPoint,
    device_tags: &[&str],
) -> Result<(String, Vec<Sample>), MappingError> {
    let LineProtocolPoint {
        measurement,
        mut tags,
        fields,
        ts_ms,
    } = point;
    let Some(index) = device_tags
        .iter()
        .find_map(|name| tags.iter().position(|(k, _)| k == name))
    else {
        let looked_for = if device_tags.is_empty() {
            "(no device tag names are configured)".to_owned()
        } else {
            device_tags
                .iter()
                .map(|t| format!("`{t}`"))
                .collect::<Vec<_>>()
                .join(" or ")
        };
        return Err(MappingError::NoDeviceTag {
            measurement: shorten(&measurement, 80),
            looked_for,
            first: device_tags.first().copied().unwrap_or("device").to_owned(),
        });
    };
    let (tag, device) = tags.swap_remove(index);
    if !is_valid_id(&device) {
        return Err(MappingError::InvalidDevice {
            device: shorten(&device, 80),
            tag,
            fields: fields.len(),
        });
    }
    tags.sort_unstable_by(|a, b| a.0.cmp(&b.0));

    let mut suffix = String::new();
    if !tags.is_empty() {
        suffix.push('{');
        for (i, (key, value)) in tags.iter().enumerate() {
            if i > 0 {
                suffix.push(',');
            }
            push_brace_escaped(&mut suffix, key);
            suffix.push('=');
            push_brace_escaped(&mut suffix, value);
        }
        suffix.push('}');
    }

    let mut samples = Vec::with_capacity(fields.len());
    for (field, value) in fields {
        let mut metric = String::with_capacity(measurement.len() + 1 + field.len() + suffix.len());
        metric.push_str(&measurement);
        metric.push('.');
        metric.push_str(&field);
        metric.push_str(&suffix);
        if let Err(reason) = check_metric(&metric) {
            return Err(MappingError::InvalidMetric {
                metric: shorten(&metric, 80),
                reason,
            });
        }
        samples.push(Sample {
            metric,
            ts_ms,
            value,
        });
    }
    Ok((device, samples))
}

fn push_brace_escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        if matches!(c, '\\' | ',' | '=' | '}') {
            out.push('\\');
        }
        out.push(c);
    }
}

#[cfg(test)]
mod tests;
