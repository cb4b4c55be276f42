//! [`RuleSet`]: many rules on one message stream, each topic filter matched once per message.

use std::cell::OnceCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrohub_types::TopicFilter;
use smallvec::SmallVec;

use crate::compile::CompiledRule;
use crate::error::EvalError;
use crate::eval::{FieldCache, NO_CALL, Seg, resolve};
use crate::state::{Output, RuleRunner, RunnerLimits, RunnerStats};
use crate::value::Val;
use crate::{Lookup, MessageContext};

struct Entry {
    id: Arc<str>,
    runner: RuleRunner,
    filter: usize,
    /// The rule's path ids → slots of the set's per-message field cache.
    fields: Box<[u32]>,
    /// The rule's call ids → slots of the set's per-message call cache ([`NO_CALL`]: the call
    /// appears in no other rule).
    calls: Box<[u32]>,
}

/// Told of each rule evaluated and how long it took.
pub type Observer<'a> = &'a mut dyn FnMut(&Arc<str>, Duration);

/// Per-message field cache slots kept inline (more distinct fields spill to the heap).
type Slots<'a> = SmallVec<[Option<Option<&'a serde_json::Value>>; 32]>;

/// The active rules of one tenant (or of a whole hub): offer every message once, collect the
/// outputs tagged with their rule id.
#[derive(Default)]
pub struct RuleSet {
    entries: Vec<Entry>,
    filters: Vec<TopicFilter>,
    /// Per-message scratch: 0 unknown, 1 no match, 2 match, by filter index.
    matched: Vec<u8>,
    /// Distinct payload paths read by the rules (slots of the per-message field cache).
    fields: Vec<Box<[Seg]>>,
    /// Slots read by the rules of each filter (resolved when the filter matches).
    filter_fields: Vec<Vec<u32>>,
    /// Number of message-only calls that appear in several rules (slots of the call cache).
    shared_calls: usize,
    limits: RunnerLimits,
}

impl std::fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleSet")
            .field("rules", &self.entries.len())
            .field("filters", &self.filters.len())
            .finish()
    }
}

impl RuleSet {
    /// An empty set whose runners get `limits`.
    pub fn new(limits: RunnerLimits) -> RuleSet {
        RuleSet {
            limits,
            ..RuleSet::default()
        }
    }

    /// Adds or replaces (with fresh state) the rule `id`.
    pub fn insert(&mut self, id: &str, rule: Arc<CompiledRule>) {
        self.remove(id);
        let filter = match self.filters.iter().position(|f| f == rule.topic_filter()) {
            Some(i) => i,
            None => {
                self.filters.push(rule.topic_filter().clone());
                self.filters.len() - 1
            }
        };
        self.entries.push(Entry {
            id: Arc::from(id),
            runner: RuleRunner::new(rule, self.limits),
            filter,
            fields: Box::new([]),
            calls: Box::new([]),
        });
        self.index_fields();
    }

    /// Removes the rule `id` and its state; whether it was there.
    pub fn remove(&mut self, id: &str) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| &*e.id != id);
        if before == self.entries.len() {
            return false;
        }
        // Drop filters no rule uses any more, so they are not matched for nothing.
        let mut used = vec![false; self.filters.len()];
        for e in &self.entries {
            used[e.filter] = true;
        }
        let mut remap = vec![0; self.filters.len()];
        let mut kept = Vec::with_capacity(self.filters.len());
        for (i, f) in std::mem::take(&mut self.filters).into_iter().enumerate() {
            if used[i] {
                remap[i] = kept.len();
                kept.push(f);
            }
        }
        self.filters = kept;
        for e in &mut self.entries {
            e.filter = remap[e.filter];
        }
        self.index_fields();
        true
    }

    /// Rebuilds the field table: distinct payload paths, each rule's slots, each filter's.
    fn index_fields(&mut self) {
        // Calls: a slot for each structural key that appears in two rules or more.
        let (calls, shared) = {
            let mut count: hashbrown::HashMap<&str, u32> = hashbrown::HashMap::new();
            for e in &self.entries {
                let mut keys: Vec<&str> =
                    e.runner.rule().calls.iter().map(String::as_str).collect();
                keys.sort_unstable();
                keys.dedup();
                for k in keys {
                    *count.entry(k).or_default() += 1;
                }
            }
            let mut slot_of: hashbrown::HashMap<&str, u32> = hashbrown::HashMap::new();
            let calls: Vec<Box<[u32]>> = self
                .entries
                .iter()
                .map(|e| {
                    e.runner
                        .rule()
                        .calls
                        .iter()
                        .map(|k| {
                            if count.get(k.as_str()).copied().unwrap_or(0) < 2 {
                                return NO_CALL;
                            }
                            let n = slot_of.len() as u32;
                            *slot_of.entry(k.as_str()).or_insert(n)
                        })
                        .collect()
                })
                .collect();
            (calls, slot_of.len())
        };
        self.shared_calls = shared;
        for (e, c) in self.entries.iter_mut().zip(calls) {
            e.calls = c;
        }
        self.fields.clear();
        self.filter_fields.clear();
        self.filter_fields.resize(self.filters.len(), Vec::new());
        for e in &mut self.entries {
            e.fields = e
                .runner
                .rule()
                .fields
                .iter()
                .map(|f| match self.fields.iter().position(|t| t == f) {
                    Some(i) => i as u32,
                    None => {
                        self.fields.push(f.clone());
                        (self.fields.len() - 1) as u32
                    }
                })
                .collect();
            let ff = &mut self.filter_fields[e.filter];
            for &s in &e.fields {
                if !ff.contains(&s) {
                    ff.push(s);
                }
            }
        }
    }

    /// Number of distinct topic filters (each matched at most once per message).
    pub fn filter_count(&self) -> usize {
        self.filters.len()
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Counters of the rule `id`.
    pub fn stats(&self, id: &str) -> Option<RunnerStats> {
        self.entries
            .iter()
            .find(|e| &*e.id == id)
            .map(|e| e.runner.stats())
    }

    /// Offers one message to every rule whose filter matches. A rule failing to evaluate does not
    /// stop the others: its error is returned in `errors`.
    pub fn on_message(
        &mut self,
        msg: &MessageContext<'_>,
        lookup: &dyn Lookup,
        out: &mut Vec<(Arc<str>, Output)>,
        errors: &mut Vec<(Arc<str>, EvalError)>,
    ) {
        self.offer(msg, lookup, out, errors, None);
    }

    /// [`RuleSet::on_message`], also calling `observe` with each rule whose filter matched and
    /// the time its evaluation took (for per-rule counters and latency).
    pub fn on_message_observed(
        &mut self,
        msg: &MessageContext<'_>,
        lookup: &dyn Lookup,
        out: &mut Vec<(Arc<str>, Output)>,
        errors: &mut Vec<(Arc<str>, EvalError)>,
        observe: Observer<'_>,
    ) {
        self.offer(msg, lookup, out, errors, Some(observe));
    }

    fn offer(
        &mut self,
        msg: &MessageContext<'_>,
        lookup: &dyn Lookup,
        out: &mut Vec<(Arc<str>, Output)>,
        errors: &mut Vec<(Arc<str>, EvalError)>,
        mut observe: Option<Observer<'_>>,
    ) {
        self.matched.clear();
        self.matched.resize(self.filters.len(), 0);
        let mut buf = Vec::new();
        let mut slots: Slots<'_> = smallvec::smallvec![None; self.fields.len()];
        let calls: SmallVec<[OnceCell<Val<'static>>; 8]> =
            (0..self.shared_calls).map(|_| OnceCell::new()).collect();
        for e in &mut self.entries {
            let m = &mut self.matched[e.filter];
            if *m == 0 {
                *m = if self.filters[e.filter].matches(msg.topic) {
                    // Resolve the paths this filter's rules read, once for all of them.
                    for &s in &self.filter_fields[e.filter] {
                        let slot = &mut slots[s as usize];
                        if slot.is_none() {
                            *slot = Some(resolve(msg.payload, &self.fields[s as usize]));
                        }
                    }
                    2
                } else {
                    1
                };
            }
            if *m != 2 {
                continue;
            }
            let cache = FieldCache {
                map: &e.fields,
                slots: &slots,
                call_map: &e.calls,
                calls: &calls,
            };
            let started = observe.is_some().then(Instant::now);
            if let Err(err) = e.runner.process(msg, lookup, &mut buf, Some(&cache)) {
                errors.push((Arc::clone(&e.id), err));
            }
            if let (Some(f), Some(t)) = (observe.as_mut(), started) {
                f(&e.id, t.elapsed());
            }
            out.extend(buf.drain(..).map(|o| (Arc::clone(&e.id), o)));
        }
    }

    /// Closes idle windows of every rule (see [`RuleRunner::tick`]).
    pub fn tick(&mut self, now_ms: i64, lookup: &dyn Lookup, out: &mut Vec<(Arc<str>, Output)>) {
        let mut buf = Vec::new();
        for e in &mut self.entries {
            // tick never fails today; keep going regardless.
            let _ = e.runner.tick(now_ms, lookup, &mut buf);
            out.extend(buf.drain(..).map(|o| (Arc::clone(&e.id), o)));
        }
    }
}
