//! AST → [`CompiledRule`]: names resolved to function pointers, JSON paths split, constant
//! regular expressions compiled, stateful calls given slots, window aggregates separated.

use std::borrow::Cow;

use ferrohub_types::TopicFilter;
use serde_json::Value as Json;

use crate::error::{EvalError, RuleError};
use crate::eval::{
    AggSpec, Emit, Env, FieldCache, LookupKind, NO_CALL, NO_FIELD, Node, RegexFn, Seg,
};
use crate::functions::FUNCTIONS;
use crate::state::{AggKind, SlotKind, SlotState};
use crate::syntax::{BinOp, Expr, Parser, Pos, SelectItem, Statement, WindowSpec};
use crate::value::Val;
use crate::{Lookup, MessageContext};

/// Window kind and sizes of a windowed rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Back-to-back windows of `size_ms`, aligned to the Unix epoch.
    Tumbling {
        /// Window length, milliseconds.
        size_ms: i64,
    },
    /// Windows of `size_ms` starting every `step_ms` (aligned to the epoch); they overlap.
    Hopping {
        /// Window length, milliseconds.
        size_ms: i64,
        /// Distance between window starts, milliseconds.
        step_ms: i64,
    },
}

impl Window {
    pub(crate) fn size_ms(self) -> i64 {
        match self {
            Window::Tumbling { size_ms } | Window::Hopping { size_ms, .. } => size_ms,
        }
    }

    pub(crate) fn step_ms(self) -> i64 {
        match self {
            Window::Tumbling { size_ms } => size_ms,
            Window::Hopping { step_ms, .. } => step_ms,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Item {
    Star,
    Expr(String, Node),
}

/// A rule compiled once, evaluated many times. Immutable and `Send + Sync`: share it in an `Arc`.
#[derive(Debug, Clone)]
pub struct CompiledRule {
    sql: String,
    filter: TopicFilter,
    value: bool,
    pub(crate) items: Vec<Item>,
    pub(crate) where_: Option<Node>,
    pub(crate) key: Option<Node>,
    pub(crate) window: Option<Window>,
    pub(crate) slot_kinds: Vec<SlotKind>,
    pub(crate) aggs: Vec<AggSpec>,
    pub(crate) carried: Vec<Node>,
    /// Distinct payload paths read by the rule, indexed by the path ids of [`Node::Payload`]
    /// (a [`crate::RuleSet`] resolves each once per message for all its rules).
    pub(crate) fields: Vec<Box<[Seg]>>,
    /// Message-only function calls of the rule, indexed by the call ids of [`Node::Call`], as
    /// structural keys (a [`crate::RuleSet`] evaluates a call shared by rules once per message).
    pub(crate) calls: Vec<String>,
    /// `twin(…)`/`device(…)` lookups whose device id depends only on the message, with their id
    /// expressions, so a caller can fetch the records before evaluating.
    lookups: Vec<(LookupKind, Option<Node>)>,
}

/// Entry point of the language: `Rule::compile(sql)`.
#[derive(Debug, Clone, Copy)]
pub struct Rule;

impl Rule {
    /// Parses and compiles a rule. Errors carry the line and column and say what to change.
    pub fn compile(sql: &str) -> Result<CompiledRule, RuleError> {
        CompiledRule::compile(sql)
    }
}

const AGGREGATES: [&str; 7] = ["avg", "min", "max", "count", "sum", "stddev", "percentile"];
const STATEFUL: [&str; 4] = ["lag", "delta", "ewma_zscore", "rate_of_change"];
const SPECIAL: [&str; 8] = [
    "twin",
    "device",
    "regexp_matches",
    "regexp_replace",
    "regexp_substr",
    "window_start",
    "window_end",
    "get_or_default",
];

/// Every function name the language knows (for suggestions and the docs test).
pub fn function_names() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = FUNCTIONS.iter().map(|f| f.0).collect();
    v.extend(AGGREGATES);
    v.extend(STATEFUL);
    v.extend(SPECIAL);
    v.sort_unstable();
    v.dedup();
    v
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn unknown_function(name: &str, pos: Pos) -> RuleError {
    let best = function_names()
        .into_iter()
        .map(|n| {
            // A known name that the unknown one extends or abbreviates (`stddev_samp`) is close.
            let prefix =
                n.len().min(name.len()) >= 3 && (name.starts_with(n) || n.starts_with(name));
            (if prefix { 1 } else { edit_distance(name, n) }, n)
        })
        .min_by_key(|(d, _)| *d)
        .filter(|(d, n)| *d <= 2.max(n.len() / 3));
    let hint = match best {
        Some((_, n)) => format!("did you mean `{n}`?"),
        None => "docs/rules.md lists the functions".to_string(),
    };
    RuleError::new(pos, format!("unknown function `{name}`")).with_hint(hint)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Per-message expression; stateful functions allowed or not.
    Plain { stateful: bool },
    /// SELECT list of a windowed rule.
    Window,
}

#[derive(Default)]
struct Compiler {
    slots: Vec<(Expr, SlotKind)>,
    aggs: Vec<AggSpec>,
    carried: Vec<Node>,
    windowed: bool,
}

fn is_window_level(e: &Expr) -> bool {
    match e {
        Expr::Call(name, _, args) => {
            AGGREGATES.contains(&name.as_str())
                || name == "window_start"
                || name == "window_end"
                || args.iter().any(is_window_level)
        }
        Expr::Field(b, _) | Expr::Neg(b) | Expr::Not(b) | Expr::Is(b, _, _) => is_window_level(b),
        Expr::Index(a, b) | Expr::Binary(_, a, b) => is_window_level(a) || is_window_level(b),
        Expr::Case(o, w, e) => {
            o.as_deref().is_some_and(is_window_level)
                || w.iter()
                    .any(|(a, b)| is_window_level(a) || is_window_level(b))
                || e.as_deref().is_some_and(is_window_level)
        }
        Expr::Array(items) => items.iter().any(is_window_level),
        _ => false,
    }
}

fn expr_pos(e: &Expr) -> Option<Pos> {
    match e {
        Expr::Ident(_, p) | Expr::Star(p) | Expr::Call(_, p, _) => Some(*p),
        Expr::Field(b, _) | Expr::Neg(b) | Expr::Not(b) | Expr::Is(b, _, _) | Expr::Index(b, _) => {
            expr_pos(b)
        }
        Expr::Binary(_, a, b) => expr_pos(a).or_else(|| expr_pos(b)),
        _ => None,
    }
}

impl Compiler {
    fn expr(&mut self, e: &Expr, mode: Mode) -> Result<Node, RuleError> {
        if mode == Mode::Window && !is_window_level(e) {
            let n = self.expr(e, Mode::Plain { stateful: false })?;
            if matches!(n, Node::Const(_)) {
                return Ok(n);
            }
            self.carried.push(n);
            return Ok(Node::Carried(self.carried.len() - 1));
        }
        let b = |n: Node| Box::new(n);
        Ok(match e {
            Expr::Null => Node::Const(Val::Null),
            Expr::Bool(v) => Node::Const(Val::Bool(*v)),
            Expr::Int(i) => Node::Const(Val::Int(*i)),
            Expr::Dec(d) => Node::Const(crate::value::dec_val(*d)),
            Expr::Str(s) => Node::Const(Val::Str(Cow::Owned(s.clone()))),
            Expr::Ident(name, _) => {
                Node::Payload(Box::new([Seg::Key(name.as_str().into())]), NO_FIELD)
            }
            Expr::Star(_) => Node::Payload(Box::new([]), NO_FIELD),
            Expr::Field(base, key) => {
                let base = self.expr(base, mode)?;
                push_seg(base, Seg::Key(key.as_str().into()))
            }
            Expr::Index(base, idx) => {
                let base = self.expr(base, mode)?;
                match &**idx {
                    Expr::Int(i) => push_seg(base, Seg::Idx(*i)),
                    Expr::Str(s) => push_seg(base, Seg::Key(s.as_str().into())),
                    other => Node::Index(b(base), b(self.expr(other, mode)?)),
                }
            }
            Expr::Neg(x) => Node::Neg(b(self.expr(x, mode)?)),
            Expr::Not(x) => Node::Not(b(self.expr(x, mode)?)),
            Expr::Binary(op, l, r) => {
                let (l, r) = (self.expr(l, mode)?, self.expr(r, mode)?);
                match op {
                    BinOp::And => Node::And(b(l), b(r)),
                    BinOp::Or => Node::Or(b(l), b(r)),
                    _ => Node::Bin(*op, b(l), b(r)),
                }
            }
            Expr::Is(x, not, what) => Node::Is(b(self.expr(x, mode)?), *not, *what),
            Expr::Case(op, whens, else_) => {
                let op = match op {
                    Some(o) => Some(b(self.expr(o, mode)?)),
                    None => None,
                };
                let mut ws = Vec::with_capacity(whens.len());
                for (w, t) in whens {
                    ws.push((self.expr(w, mode)?, self.expr(t, mode)?));
                }
                let else_ = match else_ {
                    Some(x) => Some(b(self.expr(x, mode)?)),
                    None => None,
                };
                Node::Case(op, ws.into_boxed_slice(), else_)
            }
            Expr::Array(items) => {
                let items = items
                    .iter()
                    .map(|i| self.expr(i, mode))
                    .collect::<Result<Vec<_>, _>>()?;
                Node::Array(items.into_boxed_slice())
            }
            Expr::Call(name, pos, args) => self.call(e, name, *pos, args, mode)?,
        })
    }

    fn args(&mut self, args: &[Expr], mode: Mode) -> Result<Box<[Node]>, RuleError> {
        Ok(args
            .iter()
            .map(|a| self.expr(a, mode))
            .collect::<Result<Vec<_>, _>>()?
            .into_boxed_slice())
    }

    fn call(
        &mut self,
        whole: &Expr,
        name: &str,
        pos: Pos,
        args: &[Expr],
        mode: Mode,
    ) -> Result<Node, RuleError> {
        let arity = |min: usize, max: usize| -> Result<(), RuleError> {
            if args.len() < min || args.len() > max {
                let want = if min == max {
                    format!("{min}")
                } else {
                    format!("{min} to {max}")
                };
                return Err(RuleError::new(
                    pos,
                    format!("`{name}` takes {want} argument(s), {} given", args.len()),
                ));
            }
            Ok(())
        };
        if AGGREGATES.contains(&name) {
            if mode != Mode::Window {
                let msg = if self.windowed {
                    format!(
                        "aggregate `{name}` cannot be used here: aggregates belong in the SELECT list and cannot be nested"
                    )
                } else {
                    format!("aggregate `{name}` needs a WINDOW clause (e.g. … WINDOW TUMBLING(60))")
                };
                return Err(RuleError::new(pos, msg));
            }
            let kind = match name {
                "avg" => AggKind::Avg,
                "min" => AggKind::Min,
                "max" => AggKind::Max,
                "count" => AggKind::Count,
                "sum" => AggKind::Sum,
                "stddev" => AggKind::Stddev,
                _ => {
                    arity(2, 2)?;
                    let p = match &args[1] {
                        Expr::Int(i) => *i as f64,
                        Expr::Dec(d) => *d,
                        _ => f64::NAN,
                    };
                    if !(0.0..=100.0).contains(&p) {
                        return Err(RuleError::new(
                            pos,
                            "the percentile must be a number literal from 0 to 100, e.g. percentile(x, 95)",
                        ));
                    }
                    AggKind::Percentile(p)
                }
            };
            if !matches!(kind, AggKind::Percentile(_)) {
                arity(1, 1)?;
            }
            let arg = match &args[0] {
                Expr::Star(_) if kind == AggKind::Count => None,
                Expr::Star(p) => {
                    return Err(RuleError::new(
                        *p,
                        format!("`*` is only an argument of count, not of `{name}`"),
                    ));
                }
                a => Some(self.expr(a, Mode::Plain { stateful: false })?),
            };
            self.aggs.push(AggSpec { kind, arg });
            return Ok(Node::AggRef(self.aggs.len() - 1));
        }
        if name == "window_start" || name == "window_end" {
            arity(0, 0)?;
            if mode != Mode::Window {
                return Err(RuleError::new(
                    pos,
                    format!("`{name}()` is only available in the SELECT list of a WINDOW rule"),
                ));
            }
            return Ok(if name == "window_start" {
                Node::WindowStart
            } else {
                Node::WindowEnd
            });
        }
        if STATEFUL.contains(&name) {
            if mode != (Mode::Plain { stateful: true }) {
                return Err(RuleError::new(
                    pos,
                    format!(
                        "`{name}` keeps per-key state and is only allowed in the SELECT and WHERE of rules without WINDOW (not in GROUP BY or a windowed rule)"
                    ),
                ));
            }
            let kind = match name {
                "lag" => {
                    arity(1, 1)?;
                    SlotKind::Lag
                }
                "delta" => {
                    arity(1, 1)?;
                    SlotKind::Delta
                }
                "rate_of_change" => {
                    arity(1, 1)?;
                    SlotKind::Rate
                }
                _ => {
                    arity(2, 2)?;
                    let alpha = match &args[1] {
                        Expr::Int(i) => *i as f64,
                        Expr::Dec(d) => *d,
                        _ => f64::NAN,
                    };
                    if !(alpha > 0.0 && alpha <= 1.0) {
                        return Err(RuleError::new(
                            pos,
                            "the smoothing factor of ewma_zscore must be a number literal in (0, 1], e.g. ewma_zscore(x, 0.05)",
                        ));
                    }
                    SlotKind::Ewma { alpha }
                }
            };
            let args = self.args(&args[..1], mode)?;
            let shape = without_positions(whole);
            let slot = match self
                .slots
                .iter()
                .position(|(e, k)| *e == shape && *k == kind)
            {
                Some(i) => i,
                None => {
                    self.slots.push((shape, kind));
                    self.slots.len() - 1
                }
            };
            return Ok(Node::Stateful(slot, kind, args));
        }
        match name {
            "twin" | "device" => {
                arity(0, 1)?;
                let id = match args.first() {
                    Some(a) => Some(Box::new(self.expr(a, mode)?)),
                    None => None,
                };
                return Ok(if name == "twin" {
                    Node::Twin(id)
                } else {
                    Node::Device(id)
                });
            }
            "regexp_matches" | "regexp_substr" | "regexp_replace" => {
                let kind = match name {
                    "regexp_matches" => RegexFn::Matches,
                    "regexp_substr" => RegexFn::Substr,
                    _ => RegexFn::Replace,
                };
                if kind == RegexFn::Replace {
                    arity(3, 3)?
                } else {
                    arity(2, 2)?
                }
                let pre = match &args[1] {
                    Expr::Str(p) => Some(Box::new(
                        regex::RegexBuilder::new(p)
                            .size_limit(1 << 20)
                            .build()
                            .map_err(|e| {
                                RuleError::new(
                                    pos,
                                    format!(
                                        "invalid regular expression in `{name}`: {}",
                                        first_line(&e.to_string())
                                    ),
                                )
                            })?,
                    )),
                    _ => None,
                };
                return Ok(Node::Regex(kind, pre, self.args(args, mode)?));
            }
            "cast" => {
                if let Some(Expr::Str(ty)) = args.get(1)
                    && !matches!(
                        ty.to_ascii_lowercase().as_str(),
                        "int"
                            | "integer"
                            | "bigint"
                            | "decimal"
                            | "double"
                            | "float"
                            | "real"
                            | "bool"
                            | "boolean"
                            | "string"
                            | "varchar"
                            | "text"
                    )
                {
                    return Err(RuleError::new(
                        pos,
                        format!("unknown type `{ty}` in cast: use Int, Decimal, Boolean or String"),
                    ));
                }
            }
            _ => {}
        }
        let Some((_, min, max, f)) = FUNCTIONS.iter().find(|f| f.0 == name) else {
            return Err(unknown_function(name, pos));
        };
        arity(*min, *max)?;
        // `newuuid()` differs at each call: never shared between rules.
        let id = if name == "newuuid" { NO_CALL } else { 0 };
        Ok(Node::Call(*f, self.args(args, mode)?, id))
    }
}

/// The expression with every position zeroed: two call sites with the same text compare equal.
fn without_positions(e: &Expr) -> Expr {
    const Z: Pos = Pos { line: 0, column: 0 };
    let b = |e: &Expr| Box::new(without_positions(e));
    match e {
        Expr::Ident(n, _) => Expr::Ident(n.clone(), Z),
        Expr::Star(_) => Expr::Star(Z),
        Expr::Call(n, _, a) => Expr::Call(n.clone(), Z, a.iter().map(without_positions).collect()),
        Expr::Field(x, k) => Expr::Field(b(x), k.clone()),
        Expr::Index(x, i) => Expr::Index(b(x), b(i)),
        Expr::Neg(x) => Expr::Neg(b(x)),
        Expr::Not(x) => Expr::Not(b(x)),
        Expr::Binary(op, l, r) => Expr::Binary(*op, b(l), b(r)),
        Expr::Is(x, n, w) => Expr::Is(b(x), *n, *w),
        Expr::Case(o, w, e) => Expr::Case(
            o.as_deref().map(b),
            w.iter()
                .map(|(a, t)| (without_positions(a), without_positions(t)))
                .collect(),
            e.as_deref().map(b),
        ),
        Expr::Array(items) => Expr::Array(items.iter().map(without_positions).collect()),
        other => other.clone(),
    }
}

fn first_line(s: &str) -> String {
    s.lines().last().unwrap_or(s).trim().to_string()
}

fn push_seg(base: Node, seg: Seg) -> Node {
    match base {
        Node::Payload(segs, _) => {
            let mut v = segs.into_vec();
            v.push(seg);
            Node::Payload(v.into_boxed_slice(), NO_FIELD)
        }
        other => Node::Get(Box::new(other), seg),
    }
}

fn output_name(e: &Expr, i: usize) -> String {
    match e {
        Expr::Ident(n, _) | Expr::Field(_, n) | Expr::Call(n, _, _) => n.clone(),
        _ => format!("_{}", i + 1),
    }
}

static NULL_JSON: Json = Json::Null;

impl CompiledRule {
    /// Parses and compiles a rule (same as [`Rule::compile`]).
    pub fn compile(sql: &str) -> Result<CompiledRule, RuleError> {
        let st: Statement = Parser::new(sql)?.statement()?;
        let filter = TopicFilter::parse(&st.from).map_err(|e| {
            RuleError::new(
                st.from_pos,
                format!("invalid topic filter '{}' after FROM: {e} (use `+` for one level and `#` only as the last level)", st.from),
            )
        })?;
        let window = st.window.map(|w| match w {
            WindowSpec::Tumbling { size_ms } => Window::Tumbling { size_ms },
            WindowSpec::Hopping { size_ms, step_ms } => Window::Hopping { size_ms, step_ms },
        });
        let mut c = Compiler {
            windowed: window.is_some(),
            ..Compiler::default()
        };
        let sel_mode = if window.is_some() {
            Mode::Window
        } else {
            Mode::Plain { stateful: true }
        };
        let mut items = Vec::with_capacity(st.items.len());
        for (i, it) in st.items.iter().enumerate() {
            match it {
                SelectItem::Star(pos) => {
                    if window.is_some() {
                        return Err(RuleError::new(
                            *pos,
                            "`SELECT *` cannot be used with WINDOW: select aggregates such as avg(x) AS x",
                        ));
                    }
                    items.push(Item::Star)
                }
                SelectItem::Expr(e, alias, _) => {
                    let name = alias.clone().unwrap_or_else(|| output_name(e, i));
                    items.push(Item::Expr(name, c.expr(e, sel_mode)?));
                }
            }
        }
        let mut where_ = match &st.where_ {
            Some(w) => {
                if c.windowed && is_window_level(w) {
                    let pos = expr_pos(w).unwrap_or(st.from_pos);
                    return Err(RuleError::new(
                        pos,
                        "aggregates cannot be used in WHERE (it filters messages before they enter the window)",
                    ));
                }
                Some(c.expr(
                    w,
                    Mode::Plain {
                        stateful: !c.windowed,
                    },
                )?)
            }
            None => None,
        };
        let mut key = match &st.group_by {
            Some((g, pos)) => {
                if is_window_level(g) {
                    return Err(RuleError::new(
                        *pos,
                        "GROUP BY takes a per-message expression such as topic(2), not an aggregate",
                    ));
                }
                Some(c.expr(g, Mode::Plain { stateful: false })?)
            }
            None => None,
        };
        // Number the message-only calls (by structure, before any id inside them is set), then
        // the distinct payload paths.
        let mut roots: Vec<&mut Node> = items
            .iter_mut()
            .filter_map(|it| match it {
                Item::Expr(_, n) => Some(n),
                Item::Star => None,
            })
            .chain(where_.iter_mut())
            .chain(key.iter_mut())
            .chain(c.aggs.iter_mut().filter_map(|a| a.arg.as_mut()))
            .chain(c.carried.iter_mut())
            .collect();
        let mut calls: Vec<String> = Vec::new();
        let mut fields: Vec<Box<[Seg]>> = Vec::new();
        for n in &mut roots {
            n.number_calls(&mut |call| {
                let k = format!("{call:?}");
                let id = calls.iter().position(|c| *c == k).unwrap_or(calls.len());
                if id == calls.len() {
                    calls.push(k);
                }
                id as u32
            });
        }
        for n in &mut roots {
            n.number_paths(&mut |segs| {
                let id = fields
                    .iter()
                    .position(|f| **f == *segs)
                    .unwrap_or(fields.len());
                if id == fields.len() {
                    fields.push(segs.into());
                }
                id as u32
            });
        }
        let mut lookups = Vec::new();
        for n in &mut roots {
            n.collect_lookups(&mut lookups);
        }
        Ok(CompiledRule {
            lookups,
            sql: sql.to_string(),
            filter,
            value: st.value,
            items,
            where_,
            key,
            window,
            slot_kinds: c.slots.iter().map(|s| s.1).collect(),
            aggs: c.aggs,
            carried: c.carried,
            fields,
            calls,
        })
    }

    /// The rule text as given.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// The `FROM` topic filter.
    pub fn topic_filter(&self) -> &TopicFilter {
        &self.filter
    }

    /// Whether a message on `topic` reaches this rule (MQTT filter matching, `+` and `#`).
    pub fn matches_topic(&self, topic: &str) -> bool {
        self.filter.matches(topic)
    }

    /// Whether the rule calls `twin(…)` or `device(…)`.
    pub fn uses_lookups(&self) -> bool {
        !self.lookups.is_empty()
    }

    /// The records the rule's lookups will ask for on `msg` (those whose device id depends only
    /// on the message), so the caller can fetch them first: the `Lookup` trait is synchronous.
    pub fn lookup_keys(&self, msg: &MessageContext<'_>, out: &mut Vec<(LookupKind, String)>) {
        if self.lookups.is_empty() {
            return;
        }
        let env = Env {
            msg,
            lookup: &crate::NoLookup,
            emit: None,
            seq: 0,
            fields: None,
        };
        for (kind, id) in &self.lookups {
            if let Some(dev) = Node::lookup_id(id.as_ref(), &env).filter(|d| !d.is_empty())
                && !out.iter().any(|(k, d)| k == kind && *d == dev)
            {
                out.push((*kind, dev));
            }
        }
    }

    /// The window, if the rule aggregates over one.
    pub fn window(&self) -> Option<Window> {
        self.window
    }

    /// Whether the rule keeps state (a window or a stateful function) and so must run through a
    /// [`crate::RuleRunner`].
    pub fn is_stateful(&self) -> bool {
        self.window.is_some() || !self.slot_kinds.is_empty()
    }

    /// Evaluates a stateless rule against one message: `Ok(None)` when WHERE is not true.
    /// The topic is not checked here (see [`CompiledRule::matches_topic`]).
    pub fn evaluate(
        &self,
        msg: &MessageContext<'_>,
        lookup: &dyn Lookup,
    ) -> Result<Option<Json>, EvalError> {
        if self.is_stateful() {
            return Err(EvalError::NeedsState);
        }
        self.run(msg, lookup, &mut [], 0, None)
    }

    /// Evaluates only the WHERE clause of a stateless rule (no output is built).
    pub fn filter(&self, msg: &MessageContext<'_>, lookup: &dyn Lookup) -> Result<bool, EvalError> {
        if self.is_stateful() {
            return Err(EvalError::NeedsState);
        }
        let env = Env {
            msg,
            lookup,
            emit: None,
            seq: 0,
            fields: None,
        };
        Ok(self
            .where_
            .as_ref()
            .is_none_or(|w| matches!(w.eval(&env, &mut []), Val::Bool(true))))
    }

    pub(crate) fn run(
        &self,
        msg: &MessageContext<'_>,
        lookup: &dyn Lookup,
        slots: &mut [SlotState],
        seq: u64,
        fields: Option<&FieldCache<'_>>,
    ) -> Result<Option<Json>, EvalError> {
        let env = Env {
            msg,
            lookup,
            emit: None,
            seq,
            fields,
        };
        if let Some(w) = &self.where_
            && !matches!(w.eval(&env, slots), Val::Bool(true))
        {
            return Ok(None);
        }
        Ok(self.project(&env, slots))
    }

    /// Whether WHERE holds (windowed rules: before the message enters a window).
    pub(crate) fn where_holds(&self, env: &Env<'_>, slots: &mut [SlotState]) -> bool {
        self.where_
            .as_ref()
            .is_none_or(|w| matches!(w.eval(env, slots), Val::Bool(true)))
    }

    pub(crate) fn key_of(&self, env: &Env<'_>) -> String {
        match &self.key {
            None => String::new(),
            Some(k) => match k.eval(env, &mut []) {
                Val::Str(s) => s.into_owned(),
                Val::Undefined => String::new(),
                v => v.into_json().map(|j| j.to_string()).unwrap_or_default(),
            },
        }
    }

    /// Builds the output of a closed window.
    pub(crate) fn emit(&self, emit: &Emit, lookup: &dyn Lookup) -> Option<Json> {
        let msg = MessageContext {
            tenant: &emit.tenant,
            topic: "",
            client_id: "",
            principal: "",
            device: None,
            timestamp_ms: emit.end_ms,
            payload: &NULL_JSON,
        };
        let env = Env {
            msg: &msg,
            lookup,
            emit: Some(emit),
            seq: 0,
            fields: None,
        };
        self.project(&env, &mut [])
    }

    fn project(&self, env: &Env<'_>, slots: &mut [SlotState]) -> Option<Json> {
        if self.value {
            return match self.items.first() {
                Some(Item::Expr(_, n)) => n.eval(env, slots).into_json(),
                _ => None,
            };
        }
        if let [Item::Star] = self.items.as_slice() {
            return Some(env.msg.payload.clone());
        }
        let mut out = serde_json::Map::new();
        for it in &self.items {
            match it {
                Item::Star => {
                    if let Json::Object(m) = env.msg.payload {
                        out.extend(m.iter().map(|(k, v)| (k.clone(), v.clone())));
                    }
                }
                Item::Expr(name, n) => {
                    if let Some(j) = n.eval(env, slots).into_json() {
                        out.insert(name.clone(), j);
                    }
                }
            }
        }
        Some(Json::Object(out))
    }
}
