//! Per-key state of a rule: stateful functions (`lag`, `delta`, `ewma_zscore`,
//! `rate_of_change`) and windows, held by a [`RuleRunner`].
//!
//! State is keyed by the rule (one runner per rule) and the value of its `GROUP BY` expression
//! (one key for the whole rule without `GROUP BY`). Time is the messages' own timestamps, so
//! simulated time works; [`RuleRunner::tick`] closes windows of keys that went quiet.

use std::collections::VecDeque;
use std::sync::Arc;

use hashbrown::HashMap;
use serde_json::Value as Json;
use smallvec::SmallVec;

use crate::compile::CompiledRule;
use crate::error::EvalError;
use crate::eval::{Emit, Env, FieldCache, eval_owned};
use crate::functions::Args;
use crate::value::{Val, dec_val, num_val};
use crate::{Lookup, MessageContext};

/// Beyond this z-score a value does not update the EWMA variance.
const OUTLIER_Z: f64 = 3.0;

/// Kinds of stateful functions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum SlotKind {
    Lag,
    Delta,
    Rate,
    Ewma { alpha: f64 },
}

/// State of one stateful call site for one key.
#[derive(Debug, Clone, Default)]
pub(crate) struct SlotState {
    /// Sequence number of the message whose result is cached (0: none).
    seq: u64,
    cached: Option<Val<'static>>,
    prev: Option<Val<'static>>,
    prev_ts: i64,
    n: u64,
    mean: f64,
    var: f64,
}

impl SlotState {
    pub(crate) fn apply<'a>(&mut self, kind: SlotKind, a: &Args<'a>, ts: i64, seq: u64) -> Val<'a> {
        if seq != 0
            && self.seq == seq
            && let Some(c) = &self.cached
        {
            return c.clone();
        }
        let x = a.first().cloned().unwrap_or(Val::Undefined);
        let out = match kind {
            SlotKind::Lag => {
                let out = self.prev.clone().unwrap_or(Val::Undefined);
                if !x.is_undefined() {
                    self.prev = Some(x.into_owned());
                }
                out
            }
            SlotKind::Delta => match x.num() {
                Some(_) => {
                    let out = match &self.prev {
                        Some(p) => crate::eval::arith(crate::syntax::BinOp::Sub, &x, p),
                        None => Val::Undefined,
                    };
                    self.prev = Some(x.into_owned());
                    out
                }
                None => Val::Undefined,
            },
            SlotKind::Rate => match x.f64() {
                Some(v) => {
                    let out = match self.prev.as_ref().and_then(Val::f64) {
                        Some(p) if ts > self.prev_ts => {
                            dec_val((v - p) * 1000.0 / (ts as f64 - self.prev_ts as f64))
                        }
                        Some(_) => return Val::Undefined, // not newer: ignored
                        None => Val::Undefined,
                    };
                    self.prev = Some(Val::Dec(v));
                    self.prev_ts = ts;
                    out
                }
                None => Val::Undefined,
            },
            SlotKind::Ewma { alpha } => match x.f64() {
                Some(v) => self.ewma(v, alpha),
                None => Val::Undefined,
            },
        };
        self.seq = seq;
        self.cached = Some(out.clone().into_owned());
        out
    }

    /// z-score of `v` against the exponentially weighted mean and variance of the values before
    /// it. The first `ceil(1/alpha)` values (at least 2) only warm up (plain mean and variance)
    /// and yield `Undefined`.
    fn ewma<'a>(&mut self, v: f64, alpha: f64) -> Val<'a> {
        let warmup = ((1.0 / alpha).ceil() as u64).max(2);
        self.n += 1;
        if self.n <= warmup {
            // Welford: mean and population variance so far.
            let d = v - self.mean;
            self.mean += d / self.n as f64;
            let m2 = self.var * (self.n - 1) as f64 + d * (v - self.mean);
            self.var = m2 / self.n as f64;
            return Val::Undefined;
        }
        let sd = self.var.sqrt();
        let z = if sd > 0.0 { (v - self.mean) / sd } else { 0.0 };
        let d = v - self.mean;
        let incr = alpha * d;
        self.mean += incr;
        // An outlier (|z| > 3) moves the mean but not the variance: a drift does not widen its
        // own baseline before it is flagged.
        if z.abs() <= OUTLIER_Z {
            self.var = (1.0 - alpha) * (self.var + d * incr);
        }
        dec_val(z)
    }
}

/// Kinds of window aggregates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum AggKind {
    Avg,
    Min,
    Max,
    Count,
    Sum,
    Stddev,
    Percentile(f64),
}

/// Running state of one aggregate in one window.
#[derive(Debug, Clone, Default)]
pub(crate) struct AggState {
    n: u64,
    sum: f64,
    all_int: bool,
    min: f64,
    max: f64,
    mean: f64,
    m2: f64,
    samples: Vec<f64>,
    rng: u64,
}

impl AggState {
    fn new() -> AggState {
        AggState {
            all_int: true,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            rng: 0x9E37_79B9_7F4A_7C15,
            ..AggState::default()
        }
    }

    fn add(&mut self, kind: AggKind, v: &Val<'_>, max_samples: usize) {
        if kind == AggKind::Count {
            if !matches!(v, Val::Undefined | Val::Null) {
                self.n += 1;
            }
            return;
        }
        let Some(x) = v.f64() else { return };
        if !x.is_finite() {
            return;
        }
        self.all_int &= matches!(v.num(), Some(crate::value::Num::I(_)));
        self.n += 1;
        self.sum += x;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
        let d = x - self.mean;
        self.mean += d / self.n as f64;
        self.m2 += d * (x - self.mean);
        if let AggKind::Percentile(_) = kind {
            if self.samples.len() < max_samples {
                self.samples.push(x);
            } else {
                // Reservoir sampling (xorshift): every value equally likely to be kept.
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                let j = (self.rng % self.n) as usize;
                if j < self.samples.len() {
                    self.samples[j] = x;
                }
            }
        }
    }

    fn finish(&mut self, kind: AggKind) -> Val<'static> {
        if kind == AggKind::Count {
            return Val::Int(self.n as i64);
        }
        if self.n == 0 {
            return Val::Undefined;
        }
        match kind {
            AggKind::Avg => num_val(self.sum / self.n as f64),
            AggKind::Min => num_val(self.min),
            AggKind::Max => num_val(self.max),
            AggKind::Sum if self.all_int => num_val(self.sum),
            AggKind::Sum => dec_val(self.sum),
            AggKind::Stddev => dec_val((self.m2 / self.n as f64).max(0.0).sqrt()),
            AggKind::Percentile(p) => {
                let s = &mut self.samples;
                s.sort_by(f64::total_cmp);
                if s.is_empty() {
                    return Val::Undefined;
                }
                // Linear interpolation between closest ranks.
                let rank = p / 100.0 * (s.len() - 1) as f64;
                let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
                let v = s[lo] + (s[hi.min(s.len() - 1)] - s[lo]) * (rank - lo as f64);
                num_val(v)
            }
            AggKind::Count => Val::Int(self.n as i64),
        }
    }
}

/// Limits of one runner's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerLimits {
    /// Keys (GROUP BY values) kept at most; a new key beyond it evicts the least recently seen
    /// key (its open windows are discarded, counted in `windows_dropped`).
    pub max_keys: usize,
    /// How long after a window's end messages for it are still accepted, ms. A window closes
    /// when its key sees a timestamp ≥ end + lateness (or on `tick`); later messages for it are
    /// dropped and counted in `late_messages`.
    pub allowed_lateness_ms: i64,
    /// Values kept per `percentile` per window (reservoir sampling beyond).
    pub max_samples: usize,
}

impl Default for RunnerLimits {
    fn default() -> Self {
        RunnerLimits {
            max_keys: 10_000,
            allowed_lateness_ms: 0,
            max_samples: 10_000,
        }
    }
}

/// Counters of a runner.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunnerStats {
    /// Keys currently held.
    pub keys: usize,
    /// Keys evicted because of `max_keys`.
    pub evictions: u64,
    /// Messages that arrived after all their windows had closed.
    pub late_messages: u64,
    /// Windows closed and emitted.
    pub windows_emitted: u64,
    /// Open windows discarded with an evicted key.
    pub windows_dropped: u64,
}

/// One output of a rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// The SELECT result.
    pub value: Json,
    /// `[start, end)` in ms of the window that produced it (windowed rules).
    pub window: Option<(i64, i64)>,
    /// The GROUP BY key as text (empty without GROUP BY).
    pub key: String,
}

#[derive(Debug)]
struct OpenWindow {
    start: i64,
    aggs: Vec<AggState>,
    carried: Vec<Val<'static>>,
}

#[derive(Debug, Default)]
struct KeyState {
    slots: Vec<SlotState>,
    /// Open windows, ascending by start.
    windows: VecDeque<OpenWindow>,
    /// Windows ending at or before this are closed.
    closed_until: Option<i64>,
    watermark: Option<i64>,
    last_seen: u64,
    /// Tenant of the key's latest message.
    tenant: String,
}

/// Runs one compiled rule with its per-key state. Stateless rules work too (no state kept).
#[derive(Debug)]
pub struct RuleRunner {
    rule: Arc<CompiledRule>,
    limits: RunnerLimits,
    keys: HashMap<String, KeyState>,
    seq: u64,
    stats: RunnerStats,
}

impl RuleRunner {
    /// A runner for `rule` with empty state.
    pub fn new(rule: Arc<CompiledRule>, limits: RunnerLimits) -> RuleRunner {
        RuleRunner {
            rule,
            limits,
            keys: HashMap::new(),
            seq: 0,
            stats: RunnerStats::default(),
        }
    }

    /// The rule.
    pub fn rule(&self) -> &Arc<CompiledRule> {
        &self.rule
    }

    /// Counters.
    pub fn stats(&self) -> RunnerStats {
        RunnerStats {
            keys: self.keys.len(),
            ..self.stats
        }
    }

    /// Offers one message: nothing happens unless its topic matches the rule's filter. Outputs
    /// (the message's own, or windows it closed) are appended to `out`.
    pub fn on_message(
        &mut self,
        msg: &MessageContext<'_>,
        lookup: &dyn Lookup,
        out: &mut Vec<Output>,
    ) -> Result<(), EvalError> {
        if !self.rule.matches_topic(msg.topic) {
            return Ok(());
        }
        self.process(msg, lookup, out, None)
    }

    /// `on_message` for a message already known to match the topic filter.
    pub(crate) fn process(
        &mut self,
        msg: &MessageContext<'_>,
        lookup: &dyn Lookup,
        out: &mut Vec<Output>,
        fields: Option<&FieldCache<'_>>,
    ) -> Result<(), EvalError> {
        self.seq += 1;
        let seq = self.seq;
        if !self.rule.is_stateful() {
            if let Some(value) = self.rule.run(msg, lookup, &mut [], seq, fields)? {
                out.push(Output {
                    value,
                    window: None,
                    key: String::new(),
                });
            }
            return Ok(());
        }
        let rule = Arc::clone(&self.rule);
        let env = Env {
            msg,
            lookup,
            emit: None,
            seq,
            fields,
        };
        let Some(window) = rule.window() else {
            let key = rule.key_of(&env);
            let n = rule.slot_kinds.len();
            let ks = self.key_state(&key);
            if ks.slots.len() != n {
                ks.slots = vec![SlotState::default(); n];
            }
            if let Some(value) = rule.run(msg, lookup, &mut ks.slots, seq, fields)? {
                out.push(Output {
                    value,
                    window: None,
                    key,
                });
            }
            return Ok(());
        };
        if !rule.where_holds(&env, &mut []) {
            return Ok(());
        }
        let key = rule.key_of(&env);
        let args: SmallVec<[Val<'_>; 4]> = rule
            .aggs
            .iter()
            .map(|a| {
                a.arg
                    .as_ref()
                    .map_or(Val::Bool(true), |n| n.eval(&env, &mut []))
            })
            .collect();
        let carried = eval_owned(&rule.carried, &env, &mut []);
        let (size, step) = (window.size_ms(), window.step_ms());
        let t = msg.timestamp_ms;
        let limits = self.limits;
        let ks = self.key_state(&key);
        // Window starts containing t: multiples of `step` in (t - size, t].
        let last = t.div_euclid(step).saturating_mul(step);
        let mut start = last;
        let mut starts: SmallVec<[i64; 8]> = SmallVec::new();
        while start > t.saturating_sub(size) && starts.len() < 1001 {
            starts.push(start);
            start = start.saturating_sub(step);
        }
        let mut accepted = false;
        for &s in starts.iter().rev() {
            if ks.closed_until.is_some_and(|c| s.saturating_add(size) <= c) {
                continue;
            }
            accepted = true;
            let pos = ks.windows.iter().position(|w| w.start >= s);
            let idx = match pos {
                Some(i) if ks.windows[i].start == s => i,
                Some(i) => {
                    ks.windows.insert(i, new_window(s, &rule));
                    i
                }
                None => {
                    ks.windows.push_back(new_window(s, &rule));
                    ks.windows.len() - 1
                }
            };
            let w = &mut ks.windows[idx];
            for ((st, spec), v) in w.aggs.iter_mut().zip(&rule.aggs).zip(&args) {
                st.add(spec.kind, v, limits.max_samples);
            }
            w.carried.clear();
            w.carried.extend(carried.iter().cloned());
        }
        if !accepted {
            self.stats.late_messages += 1;
        }
        let ks = self.key_state(&key);
        if ks.tenant != msg.tenant {
            msg.tenant.clone_into(&mut ks.tenant);
        }
        ks.watermark = Some(ks.watermark.map_or(t, |w| w.max(t)));
        let until = ks
            .watermark
            .unwrap_or(t)
            .saturating_sub(limits.allowed_lateness_ms);
        let closed = close_until(ks, until, size);
        let tenant = ks.tenant.clone();
        self.emit_all(&key, &tenant, closed, size, lookup, out);
        Ok(())
    }

    /// Closes every window that ended at or before `now_ms - allowed_lateness` (also for keys
    /// that received nothing since), emitting them in end order.
    pub fn tick(
        &mut self,
        now_ms: i64,
        lookup: &dyn Lookup,
        out: &mut Vec<Output>,
    ) -> Result<(), EvalError> {
        let Some(window) = self.rule.window() else {
            return Ok(());
        };
        let size = window.size_ms();
        let until = now_ms.saturating_sub(self.limits.allowed_lateness_ms);
        let mut all: Vec<(String, String, Vec<OpenWindow>)> = Vec::new();
        for (k, ks) in self.keys.iter_mut() {
            let closed = close_until(ks, until, size);
            if !closed.is_empty() {
                all.push((k.clone(), ks.tenant.clone(), closed));
            }
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let mut batch = Vec::new();
        for (k, tenant, closed) in all {
            self.emit_all(&k, &tenant, closed, size, lookup, &mut batch);
        }
        batch.sort_by_key(|o: &Output| o.window.map_or(0, |w| w.1));
        out.extend(batch);
        Ok(())
    }

    fn emit_all(
        &mut self,
        key: &str,
        tenant: &str,
        closed: Vec<OpenWindow>,
        size: i64,
        lookup: &dyn Lookup,
        out: &mut Vec<Output>,
    ) {
        for mut w in closed {
            let aggs = w
                .aggs
                .iter_mut()
                .zip(&self.rule.aggs)
                .map(|(s, spec)| s.finish(spec.kind))
                .collect();
            let end = w.start.saturating_add(size);
            let emit = Emit {
                aggs,
                carried: std::mem::take(&mut w.carried),
                start_ms: w.start,
                tenant: tenant.to_string(),
                end_ms: end,
            };
            self.stats.windows_emitted += 1;
            if let Some(value) = self.rule.emit(&emit, lookup) {
                out.push(Output {
                    value,
                    window: Some((w.start, end)),
                    key: key.to_string(),
                });
            }
        }
    }

    fn key_state(&mut self, key: &str) -> &mut KeyState {
        let seen = self.seq;
        if !self.keys.contains_key(key) && self.keys.len() >= self.limits.max_keys.max(1) {
            // Evict the least recently seen key: O(keys), only when full.
            let victim = self
                .keys
                .iter()
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(k, _)| k.clone());
            if let Some(v) = victim
                && let Some(old) = self.keys.remove(&v)
            {
                self.stats.evictions += 1;
                self.stats.windows_dropped += old.windows.len() as u64;
            }
        }
        let ks = self.keys.entry_ref(key).or_default();
        ks.last_seen = seen;
        ks
    }
}

fn new_window(start: i64, rule: &CompiledRule) -> OpenWindow {
    OpenWindow {
        start,
        aggs: vec![AggState::new(); rule.aggs.len()],
        carried: Vec::new(),
    }
}

/// Pops the windows of `ks` ending at or before `until`.
fn close_until(ks: &mut KeyState, until: i64, size: i64) -> Vec<OpenWindow> {
    let mut closed = Vec::new();
    while ks
        .windows
        .front()
        .is_some_and(|w| w.start.saturating_add(size) <= until)
    {
        if let Some(w) = ks.windows.pop_front() {
            closed.push(w);
        }
    }
    ks.closed_until = Some(ks.closed_until.map_or(until, |c| c.max(until)));
    closed
}
