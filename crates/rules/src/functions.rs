//! The stateless built-in functions, resolved by name at compile time to plain function pointers.

use std::borrow::Cow;

use base64::Engine as _;
use serde_json::Value as Json;
use smallvec::SmallVec;

use crate::eval::Env;
use crate::value::{Num, Val, dec_val, num_val, parse_num};

/// Evaluated arguments (no heap allocation for up to four).
pub(crate) type Args<'a> = SmallVec<[Val<'a>; 4]>;

/// A built-in function.
pub(crate) type FnPtr = for<'a> fn(Args<'a>, &Env<'a>) -> Val<'a>;

/// `(name, min args, max args, implementation)`.
pub(crate) const FUNCTIONS: &[(&str, usize, usize, FnPtr)] = &[
    ("abs", 1, 1, abs),
    ("ceil", 1, 1, ceil),
    ("floor", 1, 1, floor),
    ("round", 1, 2, round),
    ("trunc", 1, 2, trunc),
    ("power", 2, 2, power),
    ("sqrt", 1, 1, |a, _| f1(&a, f64::sqrt)),
    ("ln", 1, 1, |a, _| f1(&a, f64::ln)),
    ("log", 1, 1, |a, _| f1(&a, f64::log10)),
    ("exp", 1, 1, |a, _| f1(&a, f64::exp)),
    ("sin", 1, 1, |a, _| f1(&a, f64::sin)),
    ("cos", 1, 1, |a, _| f1(&a, f64::cos)),
    ("tan", 1, 1, |a, _| f1(&a, f64::tan)),
    ("asin", 1, 1, |a, _| f1(&a, f64::asin)),
    ("acos", 1, 1, |a, _| f1(&a, f64::acos)),
    ("atan", 1, 1, |a, _| f1(&a, f64::atan)),
    ("atan2", 2, 2, atan2),
    ("mod", 2, 2, |a, _| {
        crate::eval::arith(crate::syntax::BinOp::Mod, &a[0], &a[1])
    }),
    ("sign", 1, 1, sign),
    ("lower", 1, 1, |a, _| map_str(&a[0], |s| s.to_lowercase())),
    ("upper", 1, 1, |a, _| map_str(&a[0], |s| s.to_uppercase())),
    ("trim", 1, 1, |a, _| {
        map_str(&a[0], |s| s.trim().to_string())
    }),
    ("ltrim", 1, 1, |a, _| {
        map_str(&a[0], |s| s.trim_start().to_string())
    }),
    ("rtrim", 1, 1, |a, _| {
        map_str(&a[0], |s| s.trim_end().to_string())
    }),
    ("concat", 2, 64, concat),
    ("length", 1, 1, length),
    ("char_length", 1, 1, length),
    ("substring", 2, 3, substring),
    ("replace", 3, 3, replace),
    ("startswith", 2, 2, |a, _| {
        str2(&a, |s, p| Val::Bool(s.starts_with(p)))
    }),
    ("endswith", 2, 2, |a, _| {
        str2(&a, |s, p| Val::Bool(s.ends_with(p)))
    }),
    ("indexof", 2, 2, indexof),
    ("cast", 2, 2, cast),
    ("topic", 0, 1, topic),
    ("clientid", 0, 0, |_, e| {
        Val::Str(Cow::Borrowed(e.msg.client_id))
    }),
    ("principal", 0, 0, |_, e| {
        Val::Str(Cow::Borrowed(e.msg.principal))
    }),
    ("tenant", 0, 0, |_, e| Val::Str(Cow::Borrowed(e.msg.tenant))),
    ("timestamp", 0, 0, |_, e| Val::Int(e.msg.timestamp_ms)),
    ("newuuid", 0, 0, newuuid),
    ("encode", 2, 2, encode),
    ("decode", 2, 2, decode),
    ("md5", 1, 1, |a, _| {
        hash(&a[0], |b| hex::encode(<md5::Md5 as md5::Digest>::digest(b)))
    }),
    ("sha1", 1, 1, |a, _| {
        hash(&a[0], |b| {
            hex::encode(<sha1::Sha1 as sha1::Digest>::digest(b))
        })
    }),
    ("sha256", 1, 1, |a, _| {
        hash(&a[0], |b| {
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b))
        })
    }),
    ("sha512", 1, 1, |a, _| {
        hash(&a[0], |b| {
            hex::encode(<sha2::Sha512 as sha2::Digest>::digest(b))
        })
    }),
    ("get_or_default", 2, 2, get_or_default),
    ("get", 2, 2, get),
    ("isundefined", 1, 1, |a, _| {
        Val::Bool(matches!(a[0], Val::Undefined))
    }),
    ("isnull", 1, 1, |a, _| Val::Bool(matches!(a[0], Val::Null))),
    ("isstring", 1, 1, |a, _| {
        Val::Bool(matches!(a[0], Val::Str(_)))
    }),
    ("isnumber", 1, 1, |a, _| {
        Val::Bool(matches!(a[0], Val::Int(_) | Val::Dec(_)))
    }),
    ("isboolean", 1, 1, |a, _| {
        Val::Bool(matches!(a[0], Val::Bool(_)))
    }),
    ("isarray", 1, 1, |a, _| {
        Val::Bool(matches!(&a[0], Val::Json(j) if j.is_array()))
    }),
    ("isobject", 1, 1, |a, _| {
        Val::Bool(matches!(&a[0], Val::Json(j) if j.is_object()))
    }),
    ("typeof", 1, 1, |a, _| {
        Val::Str(Cow::Borrowed(a[0].type_name()))
    }),
    ("st_distance", 4, 4, st_distance),
    ("st_contains", 3, 3, st_contains),
];

fn f1<'a>(a: &Args<'a>, f: fn(f64) -> f64) -> Val<'a> {
    a[0].f64().map_or(Val::Undefined, |x| dec_val(f(x)))
}

fn abs<'a>(a: Args<'a>, _: &Env<'a>) -> Val<'a> {
    match a[0].num() {
        Some(Num::I(i)) => i.checked_abs().map_or(Val::Dec((i as f64).abs()), Val::Int),
        Some(Num::D(d)) => Val::Dec(d.abs()),
        None => Val::Undefined,
    }
}

fn int_or<'a>(a: &Args<'a>, f: fn(f64) -> f64) -> Val<'a> {
    match a[0].num() {
        Some(Num::I(i)) => Val::Int(i),
        Some(Num::D(d)) => num_val(f(d)),
        None => Val::Undefined,
    }
}

fn ceil<'a>(a: Args<'a>, _: &Env<'a>) -> Val<'a> {
    int_or(&a, f64::ceil)
}

fn floor<'a>(a: Args<'a>, _: &Env<'a>) -> Val<'a> {
    int_or(&a, f64::floor)
}

fn digits(a: &Args<'_>) -> Option<i32> {
    match a.get(1) {
        None => Some(0),
        Some(v) => match v.num() {
            Some(Num::I(i)) => i32::try_from(i.clamp(-30, 30)).ok(),
            _ => None,
        },
    }
}

fn round<'a>(a: Args<'a>, _: &Env<'a>) -> Val<'a> {
    match (a[0].num(), digits(&a)) {
        (Some(Num::I(i)), Some(_)) => Val::Int(i),
        (Some(Num::D(d)), Some(0)) => num_val(d.round()),
        (Some(Num::D(d)), Some(n)) => {
            let m = 10f64.powi(n);
            dec_val((d * m).round() / m)
        }
        _ => Val::Undefined,
    }
}

fn trunc<'a>(a: Args<'a>, _: &Env<'a>) -> Val<'a> {
    match (a[0].num(), digits(&a)) {
        (Some(Num::I(i)), Some(_)) => Val::Int(i),
        (Some(Num::D(d)), Some(0)) => num_val(d.trunc()),
        (Some(Num::D(d)), Some(n)) => {
            let m = 10f64.powi(n);
            dec_val((d * m).trunc() / m)
        }
        _ => Val::Undefined,
    }
}

fn power<'a>(a: Args<'a>, _: &Env<'a>) -> Val<'a> {
    match (a[0].num(), a[1].num()) {
        (Some(Num::I(b)), Some(Num::I(e))) if (0..=u32::MAX as i64).contains(&e) => b
            .checked_pow(e as u32)
            .map_or_else(|| dec_val((b as f64).powf(e as f64)), Val::Int),
        (Some(b), Some(e)) => dec_val(b.f().powf(e.f())),
        _ => Val::Undefined,
    }
}

fn atan2<'a>(a: Args<'a>, _: &Env<'a>) -> Val<'a> {
    match (a[0].f64(), a[1].f64()) {
        (Some(y), Some(x)) => dec_val(y.atan2(x)),
        _ => Val::Undefined,
    }
}

fn sign<'a>(a: Args<'a>, _: &Env<'a>) -> Val<'a> {
    match a[0].f64() {
        Some(d) if d > 0.0 => Val::Int(1),
        Some(d) if d < 0.0 => Val::Int(-1),
        Some(_) => Val::Int(0),
        None => Val::Undefined,
    }
}

fn map_str<'a>(v: &Val<'a>, f: impl Fn(&str) -> String) -> Val<'a> {
    match v {
        Val::Str(s) => Val::Str(Cow::Owned(f(s))),
        _ => Val::Undefined,
    }
}

fn str2<'a>(a: &Args<'a>, f: impl Fn(&str, &str) -> Val<'a>) -> Val<'a> {
    match (&a[0], &a[1]) {
        (Val::Str(s), Val::Str(p)) => f(s, p),
        _ => Val::Undefined,
    }
}

fn concat<'a>(a: Args<'a>, _: &Env<'a>) -> Val<'a> {
    if a.iter().any(Val::is_undefined) {
        return Val::Undefined;
    }
    if a.iter().any(|v| matches!(v, Val::Json(j) if j.is_array())) {
        let mut out = Vec::new();
        for v in a {
            match v {
                Val::Json(j) if j.is_array() => {
                    if let Json::Array(items) = j.into_owned() {
                        out.extend(items);
                    }
                }
                v => out.extend(v.into_json()),
            }
        }
        return Val::Json(Cow::Owned(Json::Array(out)));
    }
    let mut s = String::new();
    for v in &a {
        match v.text() {
            Some(t) => s.push_str(&t),
            None => return Val::Undefined,
        }
    }
    Val::Str(Cow::Owned(s))
}

fn length<'a>(a: Args<'a>, _: &Env<'a>) -> Val<'a> {
    match &a[0] {
        Val::Str(s) => Val::Int(s.chars().count() as i64),
        Val::Json(j) => j
            .as_array()
            .map_or(Val::Undefined, |a| Val::Int(a.len() as i64)),
        _ => Val::Undefined,
    }
}

fn substring<'a>(a: Args<'a>, _: &Env<'a>) -> Val<'a> {
    let Val::Str(s) = &a[0] else {
        return Val::Undefined;
    };
    let len = s.chars().count() as i64;
    let Some(Num::I(start)) = a[1].num() else {
        return Val::Undefined;
    };
    let end = match a.get(2).map(Val::num) {
        None => len,
        Some(Some(Num::I(e))) => e,
        Some(_) => return Val::Undefined,
    };
    let (start, end) = (start.clamp(0, len), end.clamp(0, len));
    if end <= start {
        return Val::Str(Cow::Borrowed(""));
    }
    Val::Str(Cow::Owned(
        s.chars()
            .skip(start as usize)
            .take((end - start) as usize)
            .collect(),
    ))
}

fn replace<'a>(a: Args<'a>, _: &Env<'a>) -> Val<'a> {
    match (&a[0], &a[1], &a[2]) {
        (Val::Str(s), Val::Str(from), Val::Str(to)) if !from.is_empty() => {
            Val::Str(Cow::Owned(s.replace(from.as_ref(), to)))
        }
        (Val::Str(s), Val::Str(_), Val::Str(_)) => Val::Str(Cow::Owned(s.to_string())),
        _ => Val::Undefined,
    }
}

fn indexof<'a>(a: Args<'a>, _: &Env<'a>) -> Val<'a> {
    str2(&a, |s, p| {
        Val::Int(s.find(p).map_or(-1, |b| s[..b].chars().count() as i64))
    })
}

/// `cast(x AS type)`; the parser passes the type name as a string.
fn cast<'a>(a: Args<'a>, _: &Env<'a>) -> Val<'a> {
    let Val::Str(ty) = &a[1] else {
        return Val::Undefined;
    };
    let v = &a[0];
    match ty.to_ascii_lowercase().as_str() {
        "int" | "integer" | "bigint" => match v {
            Val::Bool(b) => Val::Int(i64::from(*b)),
            _ => match v.num() {
                Some(Num::I(i)) => Val::Int(i),
                Some(Num::D(d)) if d.is_finite() && d.abs() < 9.2e18 => Val::Int(d.trunc() as i64),
                _ => Val::Undefined,
            },
        },
        "decimal" | "double" | "float" | "real" => match v {
            Val::Bool(b) => Val::Dec(if *b { 1.0 } else { 0.0 }),
            _ => v.f64().map_or(Val::Undefined, dec_val),
        },
        "bool" | "boolean" => match v {
            Val::Bool(b) => Val::Bool(*b),
            Val::Int(i) => Val::Bool(*i != 0),
            Val::Dec(d) => Val::Bool(*d != 0.0),
            Val::Str(_) => v.boolean().map_or(Val::Undefined, Val::Bool),
            _ => Val::Undefined,
        },
        "string" | "varchar" | "text" => match v {
            Val::Str(s) => Val::Str(s.clone()),
            Val::Null => Val::Str(Cow::Borrowed("null")),
            _ => v
                .text()
                .map_or(Val::Undefined, |s| Val::Str(Cow::Owned(s.into_owned()))),
        },
        _ => Val::Undefined,
    }
}

/// `topic()` is the whole topic; `topic(n)` its n-th level from 1.
fn topic<'a>(a: Args<'a>, e: &Env<'a>) -> Val<'a> {
    let t = e.msg.topic;
    match a.first() {
        None => Val::Str(Cow::Borrowed(t)),
        Some(v) => match v.num() {
            Some(Num::I(n)) if n >= 1 => t
                .split('/')
                .nth((n - 1) as usize)
                .map_or(Val::Undefined, |s| Val::Str(Cow::Borrowed(s))),
            _ => Val::Undefined,
        },
    }
}

fn newuuid<'a>(_: Args<'a>, _: &Env<'a>) -> Val<'a> {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    Val::Str(Cow::Owned(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )))
}

fn encode<'a>(a: Args<'a>, _: &Env<'a>) -> Val<'a> {
    let (Some(text), Val::Str(enc)) = (a[0].text(), &a[1]) else {
        return Val::Undefined;
    };
    match enc.to_ascii_lowercase().as_str() {
        "base64" => Val::Str(Cow::Owned(
            base64::engine::general_purpose::STANDARD.encode(text.as_bytes()),
        )),
        "hex" => Val::Str(Cow::Owned(hex::encode(text.as_bytes()))),
        _ => Val::Undefined,
    }
}

fn decode<'a>(a: Args<'a>, _: &Env<'a>) -> Val<'a> {
    let (Val::Str(s), Val::Str(enc)) = (&a[0], &a[1]) else {
        return Val::Undefined;
    };
    let bytes = match enc.to_ascii_lowercase().as_str() {
        "base64" => base64::engine::general_purpose::STANDARD
            .decode(s.trim().as_bytes())
            .ok(),
        "hex" => hex::decode(s.trim()).ok(),
        _ => None,
    };
    match bytes.map(String::from_utf8) {
        Some(Ok(s)) => Val::Str(Cow::Owned(s)),
        _ => Val::Undefined,
    }
}

fn hash<'a>(v: &Val<'a>, f: impl Fn(&[u8]) -> String) -> Val<'a> {
    v.text()
        .map_or(Val::Undefined, |t| Val::Str(Cow::Owned(f(t.as_bytes()))))
}

fn get_or_default<'a>(mut a: Args<'a>, _: &Env<'a>) -> Val<'a> {
    let d = a.pop().unwrap_or(Val::Undefined);
    let v = a.pop().unwrap_or(Val::Undefined);
    if matches!(v, Val::Undefined | Val::Null) {
        d
    } else {
        v
    }
}

/// `get(object, 'key')` or `get(array, n)`.
fn get<'a>(mut a: Args<'a>, _: &Env<'a>) -> Val<'a> {
    let k = a.pop().unwrap_or(Val::Undefined);
    let v = a.pop().unwrap_or(Val::Undefined);
    match k {
        Val::Str(s) => v.get_key(&s),
        Val::Int(i) => v.get_index(i),
        _ => Val::Undefined,
    }
}

/// Mean Earth radius (IUGG), metres.
const EARTH_RADIUS_M: f64 = 6_371_008.8;

pub(crate) fn haversine_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = (lat2 - lat1).to_radians();
    let dl = (lon2 - lon1).to_radians();
    let h = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_M * h.sqrt().min(1.0).asin()
}

fn st_distance<'a>(a: Args<'a>, _: &Env<'a>) -> Val<'a> {
    match (a[0].f64(), a[1].f64(), a[2].f64(), a[3].f64()) {
        (Some(la1), Some(lo1), Some(la2), Some(lo2)) => dec_val(haversine_m(la1, lo1, la2, lo2)),
        _ => Val::Undefined,
    }
}

/// Point in polygon (even-odd rule) over `[[lat, lon], …]`, treating coordinates as planar.
pub(crate) fn point_in_polygon(poly: &[(f64, f64)], lat: f64, lon: f64) -> bool {
    let mut inside = false;
    let n = poly.len();
    let mut j = n.wrapping_sub(1);
    for i in 0..n {
        let (yi, xi) = poly[i];
        let (yj, xj) = poly[j];
        if (yi > lat) != (yj > lat) && lon < (xj - xi) * (lat - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

fn st_contains<'a>(a: Args<'a>, _: &Env<'a>) -> Val<'a> {
    let (Val::Json(poly), Some(lat), Some(lon)) = (&a[0], a[1].f64(), a[2].f64()) else {
        return Val::Undefined;
    };
    let Some(points) = poly.as_array() else {
        return Val::Undefined;
    };
    let mut pts = Vec::with_capacity(points.len());
    for p in points {
        let pair = p.as_array().filter(|p| p.len() == 2);
        let coord = |v: &Json| match v {
            Json::Number(n) => n.as_f64(),
            Json::String(s) => parse_num(s).map(Num::f),
            _ => None,
        };
        match pair.and_then(|p| Some((coord(&p[0])?, coord(&p[1])?))) {
            Some(pt) => pts.push(pt),
            None => return Val::Undefined,
        }
    }
    if pts.len() < 3 {
        return Val::Undefined;
    }
    Val::Bool(point_in_polygon(&pts, lat, lon))
}
