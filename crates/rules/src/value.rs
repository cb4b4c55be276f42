//! The value model of the rule language: JSON plus `Undefined`, with `Int` and `Decimal` kept
//! apart, and the AWS IoT SQL coercions between them.

use std::borrow::Cow;
use std::cmp::Ordering;

use serde_json::Value as Json;

/// Whole-number decimals up to this magnitude are treated as `Int` (SQL version 2016-03-23).
const MAX_SAFE: f64 = 9_007_199_254_740_992.0;

/// One value during evaluation. Borrowed from the payload (or the compiled rule) where possible,
/// so reading a field and comparing it allocates nothing.
#[derive(Debug, Clone, PartialEq)]
pub enum Val<'a> {
    /// Not a value: a missing key, an out-of-range index, a function given the wrong types.
    Undefined,
    /// JSON `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A whole number.
    Int(i64),
    /// A decimal number (here a double: see docs/rules.md, "Differences from AWS IoT SQL").
    Dec(f64),
    /// A UTF-8 string.
    Str(Cow<'a, str>),
    /// A JSON array or object.
    Json(Cow<'a, Json>),
}

/// A number after coercion.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Num {
    I(i64),
    D(f64),
}

impl Num {
    pub(crate) fn f(self) -> f64 {
        match self {
            Num::I(i) => i as f64,
            Num::D(d) => d,
        }
    }
}

/// A number as a value: whole numbers within ±2^53 become `Int`, non-finite ones `Undefined`.
pub(crate) fn num_val<'a>(d: f64) -> Val<'a> {
    if !d.is_finite() {
        Val::Undefined
    } else if d.fract() == 0.0 && d.abs() < MAX_SAFE {
        Val::Int(d as i64)
    } else {
        Val::Dec(d)
    }
}

/// A decimal result stays `Decimal` (unless not finite).
pub(crate) fn dec_val<'a>(d: f64) -> Val<'a> {
    if d.is_finite() {
        Val::Dec(d)
    } else {
        Val::Undefined
    }
}

/// Parses a string as a number the way AWS converts strings: an integer, else a decimal.
pub(crate) fn parse_num(s: &str) -> Option<Num> {
    let t = s.trim();
    if let Ok(i) = t.parse::<i64>() {
        return Some(Num::I(i));
    }
    // Rust accepts "inf"/"NaN"; SQL does not.
    if !t.bytes().any(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse::<f64>().ok().filter(|d| d.is_finite()).map(Num::D)
}

impl<'a> Val<'a> {
    /// A view of a JSON value (numbers become `Int` or `Decimal`).
    pub fn from_json(v: &'a Json) -> Val<'a> {
        match v {
            Json::Null => Val::Null,
            Json::Bool(b) => Val::Bool(*b),
            Json::Number(n) => json_num(n),
            Json::String(s) => Val::Str(Cow::Borrowed(s.as_str())),
            Json::Array(_) | Json::Object(_) => Val::Json(Cow::Borrowed(v)),
        }
    }

    /// An owned JSON value as a value.
    pub fn from_owned_json(v: Json) -> Val<'static> {
        match v {
            Json::Null => Val::Null,
            Json::Bool(b) => Val::Bool(b),
            Json::Number(n) => json_num(&n),
            Json::String(s) => Val::Str(Cow::Owned(s)),
            v @ (Json::Array(_) | Json::Object(_)) => Val::Json(Cow::Owned(v)),
        }
    }

    /// The JSON form; `None` for `Undefined` (which JSON cannot represent).
    pub fn into_json(self) -> Option<Json> {
        Some(match self {
            Val::Undefined => return None,
            Val::Null => Json::Null,
            Val::Bool(b) => Json::Bool(b),
            Val::Int(i) => Json::from(i),
            Val::Dec(d) => serde_json::Number::from_f64(d).map(Json::Number)?,
            Val::Str(s) => Json::String(s.into_owned()),
            Val::Json(j) => j.into_owned(),
        })
    }

    /// Detaches the value from what it borrows.
    pub fn into_owned(self) -> Val<'static> {
        match self {
            Val::Undefined => Val::Undefined,
            Val::Null => Val::Null,
            Val::Bool(b) => Val::Bool(b),
            Val::Int(i) => Val::Int(i),
            Val::Dec(d) => Val::Dec(d),
            Val::Str(s) => Val::Str(Cow::Owned(s.into_owned())),
            Val::Json(j) => Val::Json(Cow::Owned(j.into_owned())),
        }
    }

    /// A borrowed copy (cheap: no string or JSON is cloned).
    pub fn reborrow(&self) -> Val<'_> {
        match self {
            Val::Undefined => Val::Undefined,
            Val::Null => Val::Null,
            Val::Bool(b) => Val::Bool(*b),
            Val::Int(i) => Val::Int(*i),
            Val::Dec(d) => Val::Dec(*d),
            Val::Str(s) => Val::Str(Cow::Borrowed(s.as_ref())),
            Val::Json(j) => Val::Json(Cow::Borrowed(j.as_ref())),
        }
    }

    /// The AWS type name: `Int`, `Decimal`, `Boolean`, `String`, `Array`, `Object`, `Null`, `Undefined`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Val::Undefined => "Undefined",
            Val::Null => "Null",
            Val::Bool(_) => "Boolean",
            Val::Int(_) => "Int",
            Val::Dec(_) => "Decimal",
            Val::Str(_) => "String",
            Val::Json(j) if j.is_array() => "Array",
            Val::Json(_) => "Object",
        }
    }

    /// Numeric coercion: `Int`, `Decimal`, and strings that parse as numbers.
    pub(crate) fn num(&self) -> Option<Num> {
        match self {
            Val::Int(i) => Some(Num::I(*i)),
            Val::Dec(d) => Some(Num::D(*d)),
            Val::Str(s) => parse_num(s),
            _ => None,
        }
    }

    pub(crate) fn f64(&self) -> Option<f64> {
        self.num().map(Num::f)
    }

    /// Boolean coercion: booleans and the strings "true"/"false" (any case).
    pub(crate) fn boolean(&self) -> Option<bool> {
        match self {
            Val::Bool(b) => Some(*b),
            Val::Str(s) if s.eq_ignore_ascii_case("true") => Some(true),
            Val::Str(s) if s.eq_ignore_ascii_case("false") => Some(false),
            _ => None,
        }
    }

    /// String coercion for string functions: strings, numbers and booleans; arrays and objects
    /// as their JSON text; `None` for `Null` and `Undefined`.
    pub(crate) fn text(&self) -> Option<Cow<'_, str>> {
        match self {
            Val::Str(s) => Some(Cow::Borrowed(s.as_ref())),
            Val::Int(i) => Some(Cow::Owned(i.to_string())),
            Val::Dec(d) => Some(Cow::Owned(d.to_string())),
            Val::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
            Val::Json(j) => Some(Cow::Owned(j.to_string())),
            Val::Null | Val::Undefined => None,
        }
    }

    pub(crate) fn is_undefined(&self) -> bool {
        matches!(self, Val::Undefined)
    }

    /// `value.key`.
    pub(crate) fn get_key(self, key: &str) -> Val<'a> {
        match self {
            Val::Json(Cow::Borrowed(j)) => j.get(key).map_or(Val::Undefined, Val::from_json),
            Val::Json(Cow::Owned(Json::Object(mut m))) => {
                m.remove(key).map_or(Val::Undefined, Val::from_owned_json)
            }
            _ => Val::Undefined,
        }
    }

    /// `value[i]`; negative indices count from the end.
    pub(crate) fn get_index(self, i: i64) -> Val<'a> {
        match self {
            Val::Json(Cow::Borrowed(Json::Array(a))) => {
                resolve_index(i, a.len()).map_or(Val::Undefined, |i| Val::from_json(&a[i]))
            }
            Val::Json(Cow::Owned(Json::Array(mut a))) => match resolve_index(i, a.len()) {
                Some(i) => Val::from_owned_json(a.swap_remove(i)),
                None => Val::Undefined,
            },
            _ => Val::Undefined,
        }
    }
}

fn resolve_index(i: i64, len: usize) -> Option<usize> {
    let len = i64::try_from(len).ok()?;
    let i = if i < 0 { len + i } else { i };
    (0..len).contains(&i).then_some(i as usize)
}

fn json_num<'a>(n: &serde_json::Number) -> Val<'a> {
    if let Some(i) = n.as_i64() {
        Val::Int(i)
    } else {
        num_val(n.as_f64().unwrap_or(f64::NAN))
    }
}

/// `a = b`: `Undefined` if either side is; numbers compare numerically (a numeric string equals
/// its number); otherwise values equal only when of the same type and content.
pub(crate) fn sql_eq(a: &Val<'_>, b: &Val<'_>) -> Option<bool> {
    Some(match (a, b) {
        (Val::Undefined, _) | (_, Val::Undefined) => return None,
        (Val::Int(x), Val::Int(y)) => x == y,
        (Val::Int(_) | Val::Dec(_), Val::Int(_) | Val::Dec(_)) => a.f64() == b.f64(),
        (Val::Str(s), Val::Int(_) | Val::Dec(_)) | (Val::Int(_) | Val::Dec(_), Val::Str(s)) => {
            match (parse_num(s), a.num().or(b.num())) {
                (Some(x), Some(_)) => {
                    let other = if matches!(a, Val::Str(_)) { b } else { a };
                    other.f64() == Some(x.f())
                }
                _ => false,
            }
        }
        (Val::Str(x), Val::Str(y)) => x == y,
        (Val::Bool(x), Val::Bool(y)) => x == y,
        (Val::Null, Val::Null) => true,
        (Val::Json(x), Val::Json(y)) => x == y,
        _ => false,
    })
}

/// `a < b` and friends: both sides converted to numbers (strings that parse); two strings that
/// are not numbers compare lexicographically; anything else is `Undefined`.
pub(crate) fn sql_cmp(a: &Val<'_>, b: &Val<'_>) -> Option<Ordering> {
    match (a, b) {
        (Val::Int(x), Val::Int(y)) => Some(x.cmp(y)),
        (Val::Dec(x), Val::Int(y)) => x.partial_cmp(&(*y as f64)),
        (Val::Int(x), Val::Dec(y)) => (*x as f64).partial_cmp(y),
        (Val::Dec(x), Val::Dec(y)) => x.partial_cmp(y),
        _ => match (a.num(), b.num()) {
            (Some(Num::I(x)), Some(Num::I(y))) => Some(x.cmp(&y)),
            (Some(x), Some(y)) => x.f().partial_cmp(&y.f()),
            _ => match (a, b) {
                (Val::Str(x), Val::Str(y)) => Some(x.cmp(y)),
                _ => None,
            },
        },
    }
}
