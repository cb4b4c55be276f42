//! The compiled expression tree ([`Node`]) and its evaluator.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::cmp::Ordering;

use serde_json::Value as Json;
use smallvec::SmallVec;

use crate::functions::{Args, FnPtr};
use crate::state::{AggKind, SlotKind, SlotState};
use crate::syntax::{BinOp, IsWhat};
use crate::value::{Num, Val, dec_val, sql_cmp, sql_eq};
use crate::{Lookup, MessageContext};

/// One step of a JSON path, split at compile time.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Seg {
    Key(Box<str>),
    Idx(i64),
}

/// Regular-expression functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RegexFn {
    Matches,
    Replace,
    Substr,
}

/// A compiled expression.
#[derive(Debug, Clone)]
pub(crate) enum Node {
    Const(Val<'static>),
    /// A path from the payload root (empty: the whole payload), and its id among the rule's
    /// paths ([`NO_FIELD`] for the whole payload; see [`FieldCache`]).
    Payload(Box<[Seg]>, u32),
    /// A path step applied to a computed value.
    Get(Box<Node>, Seg),
    /// `expr[expr]` with a computed index or key.
    Index(Box<Node>, Box<Node>),
    Neg(Box<Node>),
    Not(Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
    Bin(BinOp, Box<Node>, Box<Node>),
    Is(Box<Node>, bool, IsWhat),
    Case(Option<Box<Node>>, Box<[(Node, Node)]>, Option<Box<Node>>),
    Array(Box<[Node]>),
    /// A function call, and its id among the rule's message-only calls ([`NO_CALL`]: none;
    /// see [`FieldCache`]).
    Call(FnPtr, Box<[Node]>, u32),
    Regex(RegexFn, Option<Box<regex::Regex>>, Box<[Node]>),
    Twin(Option<Box<Node>>),
    Device(Option<Box<Node>>),
    /// A stateful function (`lag`, `delta`, …): its slot in the key's state.
    Stateful(usize, SlotKind, Box<[Node]>),
    /// The result of a window aggregate (evaluated at window close).
    AggRef(usize),
    /// A non-aggregate sub-expression of a windowed SELECT: its value from the window's latest message.
    Carried(usize),
    WindowStart,
    WindowEnd,
}

/// What a window close provides to the SELECT list.
pub(crate) struct Emit {
    pub aggs: Vec<Val<'static>>,
    pub carried: Vec<Val<'static>>,
    pub start_ms: i64,
    pub end_ms: i64,
    /// Tenant of the window's messages (lookups at emission stay in it).
    pub tenant: String,
}

/// Path id of a [`Node::Payload`] without one (the whole payload).
pub(crate) const NO_FIELD: u32 = u32::MAX;

/// Payload paths resolved once per message and shared by the rules of a [`crate::RuleSet`]:
/// `slots[map[id]]` is `Some(resolve(payload, path))` for the rule's path `id` (`None`: not
/// resolved, walked directly).
///
/// Likewise function calls that depend only on the message and appear in several rules are
/// evaluated once per message (on first use): `calls[call_map[id]]` for the rule's call `id`.
pub(crate) struct FieldCache<'a> {
    /// Rule path id → slot.
    pub map: &'a [u32],
    pub slots: &'a [Option<Option<&'a Json>>],
    /// Rule call id → slot of `calls` ([`NO_CALL`]: not shared).
    pub call_map: &'a [u32],
    pub calls: &'a [OnceCell<Val<'static>>],
}

impl FieldCache<'_> {
    fn call(&self, id: u32) -> Option<&OnceCell<Val<'static>>> {
        let slot = *self.call_map.get(id as usize)?;
        self.calls.get(slot as usize)
    }
}

/// The value at `segs` from `v`, if any.
pub(crate) fn resolve<'a>(mut v: &'a Json, segs: &[Seg]) -> Option<&'a Json> {
    for s in segs {
        v = match s {
            Seg::Key(k) => v.get(k.as_ref())?,
            Seg::Idx(i) => {
                let a = v.as_array()?;
                let len = i64::try_from(a.len()).ok()?;
                let i = if *i < 0 { len + i } else { *i };
                if (0..len).contains(&i) {
                    a.get(i as usize)?
                } else {
                    return None;
                }
            }
        };
    }
    Some(v)
}

/// Everything an expression can see.
pub(crate) struct Env<'a> {
    pub msg: &'a MessageContext<'a>,
    pub lookup: &'a dyn Lookup,
    pub emit: Option<&'a Emit>,
    /// Arrival sequence number of the message (caches stateful results within one message).
    pub seq: u64,
    /// Per-message cache of top-level fields (rules run through a [`crate::RuleSet`]).
    pub fields: Option<&'a FieldCache<'a>>,
}

/// Aggregate specifications of a windowed rule.
#[derive(Debug, Clone)]
pub(crate) struct AggSpec {
    pub kind: AggKind,
    /// `None` for `count(*)`.
    pub arg: Option<Node>,
}

/// Maximum length of a regular expression compiled while evaluating.
const DYN_REGEX_LIMIT: usize = 1 << 16;

impl Node {
    pub(crate) fn eval<'a>(&'a self, env: &Env<'a>, slots: &mut [SlotState]) -> Val<'a> {
        match self {
            Node::Const(v) => v.reborrow(),
            Node::Payload(segs, id) => {
                let cached = env.fields.and_then(|c| {
                    let slot = *c.map.get(*id as usize)?;
                    *c.slots.get(slot as usize)?
                });
                match cached.unwrap_or_else(|| resolve(env.msg.payload, segs)) {
                    Some(v) => Val::from_json(v),
                    None => Val::Undefined,
                }
            }
            Node::Get(base, seg) => {
                let v = base.eval(env, slots);
                match seg {
                    Seg::Key(k) => v.get_key(k),
                    Seg::Idx(i) => v.get_index(*i),
                }
            }
            Node::Index(base, idx) => {
                let v = base.eval(env, slots);
                match idx.eval(env, slots) {
                    Val::Int(i) => v.get_index(i),
                    Val::Str(s) => v.get_key(&s),
                    _ => Val::Undefined,
                }
            }
            Node::Neg(e) => match e.eval(env, slots).num() {
                Some(Num::I(i)) => i
                    .checked_neg()
                    .map_or_else(|| dec_val(-(i as f64)), Val::Int),
                Some(Num::D(d)) => Val::Dec(-d),
                None => Val::Undefined,
            },
            Node::Not(e) => e
                .eval(env, slots)
                .boolean()
                .map_or(Val::Undefined, |b| Val::Bool(!b)),
            Node::And(l, r) => {
                let Some(a) = l.eval(env, slots).boolean() else {
                    return Val::Undefined;
                };
                if !a {
                    return Val::Bool(false);
                }
                r.eval(env, slots)
                    .boolean()
                    .map_or(Val::Undefined, Val::Bool)
            }
            Node::Or(l, r) => {
                let Some(a) = l.eval(env, slots).boolean() else {
                    return Val::Undefined;
                };
                if a {
                    return Val::Bool(true);
                }
                r.eval(env, slots)
                    .boolean()
                    .map_or(Val::Undefined, Val::Bool)
            }
            Node::Bin(op, l, r) => {
                let a = l.eval(env, slots);
                let b = r.eval(env, slots);
                binary(*op, &a, &b)
            }
            Node::Is(e, not, what) => {
                let v = e.eval(env, slots);
                let is = match what {
                    IsWhat::Null => matches!(v, Val::Null),
                    IsWhat::Undefined => matches!(v, Val::Undefined),
                };
                Val::Bool(is != *not)
            }
            Node::Case(operand, whens, else_) => {
                let op = operand.as_ref().map(|o| o.eval(env, slots));
                for (w, t) in whens.iter() {
                    let c = w.eval(env, slots);
                    let hit = match &op {
                        Some(o) => sql_eq(o, &c) == Some(true),
                        None => c.boolean() == Some(true),
                    };
                    if hit {
                        return t.eval(env, slots);
                    }
                }
                else_
                    .as_ref()
                    .map_or(Val::Undefined, |e| e.eval(env, slots))
            }
            Node::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for i in items.iter() {
                    out.extend(i.eval(env, slots).into_json());
                }
                Val::Json(Cow::Owned(Json::Array(out)))
            }
            Node::Call(f, args, id) => {
                if let Some(cell) = env.fields.and_then(|c| c.call(*id)) {
                    return cell
                        .get_or_init(|| {
                            let a: Args<'a> = args.iter().map(|n| n.eval(env, slots)).collect();
                            f(a, env).into_owned()
                        })
                        .reborrow();
                }
                let a: Args<'a> = args.iter().map(|n| n.eval(env, slots)).collect();
                f(a, env)
            }
            Node::Regex(kind, re, args) => {
                let a: Args<'a> = args.iter().map(|n| n.eval(env, slots)).collect();
                regex_fn(*kind, re.as_deref(), &a)
            }
            Node::Twin(id) | Node::Device(id) => {
                let dev = match id {
                    Some(n) => match n.eval(env, slots) {
                        Val::Str(s) => s.into_owned(),
                        v => match v.text() {
                            Some(t) => t.into_owned(),
                            None => return Val::Undefined,
                        },
                    },
                    None => env.msg.device.unwrap_or(env.msg.client_id).to_string(),
                };
                if dev.is_empty() {
                    return Val::Undefined;
                }
                let found = if matches!(self, Node::Twin(_)) {
                    env.lookup.twin(env.msg.tenant, &dev)
                } else {
                    env.lookup.device(env.msg.tenant, &dev)
                };
                found.map_or(Val::Undefined, Val::from_owned_json)
            }
            Node::Stateful(slot, kind, args) => {
                let a: Args<'a> = args.iter().map(|n| n.eval(env, slots)).collect();
                match slots.get_mut(*slot) {
                    Some(s) => s.apply(*kind, &a, env.msg.timestamp_ms, env.seq),
                    None => Val::Undefined,
                }
            }
            Node::AggRef(i) => env
                .emit
                .and_then(|e| e.aggs.get(*i))
                .map_or(Val::Undefined, Val::reborrow),
            Node::Carried(i) => env
                .emit
                .and_then(|e| e.carried.get(*i))
                .map_or(Val::Undefined, Val::reborrow),
            Node::WindowStart => env.emit.map_or(Val::Undefined, |e| Val::Int(e.start_ms)),
            Node::WindowEnd => env.emit.map_or(Val::Undefined, |e| Val::Int(e.end_ms)),
        }
    }
}

/// Call id of a function call that is not shared between rules (`newuuid()`, or one whose
/// arguments involve state, windows or lookups).
pub(crate) const NO_CALL: u32 = u32::MAX;

/// Which lookup an expression makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LookupKind {
    /// `twin(…)`: the device's twin document.
    Twin,
    /// `device(…)`: the device's registry record.
    Device,
}

impl Node {
    /// Collects every `twin(…)`/`device(…)` whose device id depends only on the message (no
    /// state, window or nested lookup), with its id expression (`None`: the publisher).
    pub(crate) fn collect_lookups(&mut self, out: &mut Vec<(LookupKind, Option<Node>)>) {
        let found = match self {
            Node::Twin(id) => Some((LookupKind::Twin, id.as_deref().cloned())),
            Node::Device(id) => Some((LookupKind::Device, id.as_deref().cloned())),
            _ => None,
        };
        if let Some((kind, id)) = found
            && id.clone().is_none_or(|mut n| n.depends_on_message_only())
        {
            out.push((kind, id));
        }
        self.each_child(&mut |n| n.collect_lookups(out));
    }

    /// Whether the value depends only on the message: no state, window or lookup.
    fn depends_on_message_only(&mut self) -> bool {
        self.message_only_with(false)
    }

    /// The device id a lookup's id expression gives for `env`'s message (as `twin(id)` does).
    pub(crate) fn lookup_id(id: Option<&Node>, env: &Env<'_>) -> Option<String> {
        match id {
            Some(n) => match n.eval(env, &mut []) {
                Val::Str(s) => Some(s.into_owned()),
                v => v.text().map(|t| t.into_owned()),
            },
            None => Some(env.msg.device.unwrap_or(env.msg.client_id).to_string()),
        }
    }

    /// Applies `f` to each direct child.
    fn each_child(&mut self, f: &mut dyn FnMut(&mut Node)) {
        match self {
            Node::Payload(..)
            | Node::Const(_)
            | Node::AggRef(_)
            | Node::Carried(_)
            | Node::WindowStart
            | Node::WindowEnd => {}
            Node::Get(n, _) | Node::Neg(n) | Node::Not(n) | Node::Is(n, _, _) => f(n),
            Node::Index(a, b) | Node::And(a, b) | Node::Or(a, b) | Node::Bin(_, a, b) => {
                f(a);
                f(b);
            }
            Node::Case(op, whens, else_) => {
                if let Some(n) = op {
                    f(n);
                }
                for (w, t) in whens.iter_mut() {
                    f(w);
                    f(t);
                }
                if let Some(n) = else_ {
                    f(n);
                }
            }
            Node::Array(ns)
            | Node::Call(_, ns, _)
            | Node::Regex(_, _, ns)
            | Node::Stateful(_, _, ns) => ns.iter_mut().for_each(f),
            Node::Twin(n) | Node::Device(n) => {
                if let Some(n) = n {
                    f(n);
                }
            }
        }
    }

    /// Calls `f` on the path of every [`Node::Payload`] with a non-empty path and stores the id
    /// it returns.
    pub(crate) fn number_paths(&mut self, f: &mut dyn FnMut(&[Seg]) -> u32) {
        if let Node::Payload(segs, id) = self
            && !segs.is_empty()
        {
            *id = f(segs);
        }
        self.each_child(&mut |n| n.number_paths(f));
    }

    /// Whether the value depends only on the message (no state, window, lookup or randomness),
    /// so that rules may share it.
    fn message_only(&mut self) -> bool {
        self.message_only_with(true)
    }

    /// [`Node::message_only`]; `strict` also refuses calls that may not be shared (`newuuid()`).
    fn message_only_with(&mut self, strict: bool) -> bool {
        let unshared = strict && matches!(self, Node::Call(_, _, NO_CALL));
        let mut ok = !unshared
            && !matches!(
                self,
                Node::Stateful(..)
                    | Node::AggRef(_)
                    | Node::Carried(_)
                    | Node::WindowStart
                    | Node::WindowEnd
                    | Node::Twin(_)
                    | Node::Device(_)
            );
        self.each_child(&mut |n| ok &= n.message_only_with(strict));
        ok
    }

    /// Calls `f` on every function call that depends only on the message (outermost first, before
    /// any path or inner call is numbered) and stores the id it returns.
    pub(crate) fn number_calls(&mut self, f: &mut dyn FnMut(&Node) -> u32) {
        if matches!(self, Node::Call(_, _, id) if *id != NO_CALL) {
            let id = if self.message_only() {
                f(self)
            } else {
                NO_CALL
            };
            if let Node::Call(_, _, slot) = self {
                *slot = id;
            }
        }
        self.each_child(&mut |n| n.number_calls(f));
    }
}

fn regex_fn<'a>(kind: RegexFn, pre: Option<&regex::Regex>, a: &Args<'a>) -> Val<'a> {
    let Val::Str(s) = &a[0] else {
        return Val::Undefined;
    };
    let owned;
    let re = match pre {
        Some(r) => r,
        None => {
            let Val::Str(p) = &a[1] else {
                return Val::Undefined;
            };
            match regex::RegexBuilder::new(p)
                .size_limit(DYN_REGEX_LIMIT)
                .build()
            {
                Ok(r) => {
                    owned = r;
                    &owned
                }
                Err(_) => return Val::Undefined,
            }
        }
    };
    match kind {
        RegexFn::Matches => Val::Bool(re.is_match(s)),
        RegexFn::Substr => re.find(s).map_or(Val::Str(Cow::Borrowed("")), |m| {
            Val::Str(Cow::Owned(m.as_str().to_string()))
        }),
        RegexFn::Replace => match a.get(2) {
            Some(Val::Str(r)) => Val::Str(Cow::Owned(re.replace_all(s, r.as_ref()).into_owned())),
            _ => Val::Undefined,
        },
    }
}

/// A binary operator other than AND/OR.
pub(crate) fn binary<'a>(op: BinOp, a: &Val<'a>, b: &Val<'a>) -> Val<'a> {
    match op {
        BinOp::Eq => sql_eq(a, b).map_or(Val::Undefined, Val::Bool),
        BinOp::Ne => sql_eq(a, b).map_or(Val::Undefined, |e| Val::Bool(!e)),
        BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => match sql_cmp(a, b) {
            Some(o) => Val::Bool(match op {
                BinOp::Lt => o == Ordering::Less,
                BinOp::Le => o != Ordering::Greater,
                BinOp::Gt => o == Ordering::Greater,
                _ => o != Ordering::Less,
            }),
            None => Val::Undefined,
        },
        BinOp::Concat => match (a.text(), b.text()) {
            (Some(x), Some(y)) => Val::Str(Cow::Owned(format!("{x}{y}"))),
            _ => Val::Undefined,
        },
        BinOp::And | BinOp::Or => match (a.boolean(), b.boolean()) {
            (Some(x), Some(y)) => Val::Bool(if op == BinOp::And { x && y } else { x || y }),
            _ => Val::Undefined,
        },
        _ => arith(op, a, b),
    }
}

/// Arithmetic: `Int op Int` is `Int` (overflow falls back to `Decimal`), anything with a
/// `Decimal` is `Decimal`; numeric strings are converted; other types give `Undefined`.
pub(crate) fn arith<'a>(op: BinOp, a: &Val<'_>, b: &Val<'_>) -> Val<'a> {
    let (Some(x), Some(y)) = (a.num(), b.num()) else {
        return Val::Undefined;
    };
    if let (Num::I(x), Num::I(y)) = (x, y) {
        let r = match op {
            BinOp::Add => x.checked_add(y),
            BinOp::Sub => x.checked_sub(y),
            BinOp::Mul => x.checked_mul(y),
            BinOp::Div if y == 0 => return Val::Undefined,
            BinOp::Div => x.checked_div(y),
            BinOp::Mod if y == 0 => return Val::Undefined,
            BinOp::Mod => x.checked_rem(y),
            _ => return Val::Undefined,
        };
        if let Some(r) = r {
            return Val::Int(r);
        }
    }
    let (x, y) = (x.f(), y.f());
    let r = match op {
        BinOp::Add => x + y,
        BinOp::Sub => x - y,
        BinOp::Mul => x * y,
        BinOp::Div if y == 0.0 => return Val::Undefined,
        BinOp::Div => x / y,
        BinOp::Mod if y == 0.0 => return Val::Undefined,
        BinOp::Mod => x % y,
        _ => return Val::Undefined,
    };
    dec_val(r)
}

/// Evaluates a list of nodes into owned values (window bookkeeping).
pub(crate) fn eval_owned(
    nodes: &[Node],
    env: &Env<'_>,
    slots: &mut [SlotState],
) -> SmallVec<[Val<'static>; 4]> {
    nodes
        .iter()
        .map(|n| n.eval(env, slots).into_owned())
        .collect()
}
