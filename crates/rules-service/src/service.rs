//! [`RulesService`]: the enabled rules of every tenant, evaluated on one task fed by the router
//! through a bounded queue, with their actions on per-action queues.
//!
//! - **Input** (`input_queue`, default 10 000): the broker offers ordinary client publications
//!   on its publisher's path; only messages some enabled rule of the tenant matches are queued.
//!   When full, the message is not evaluated: counted per rule (`dropped_queue_full`) and in
//!   `ferrohub_rules_input_dropped_total`. Rules are a consumer like a QoS 0 subscriber: the
//!   publisher is never refused or slowed because of them, and its QoS 1 acknowledgement does
//!   not wait for rules (the message is still delivered to subscribers and stored).
//! - **Evaluation**: one task, so per-key window state needs no locks; windows are ticked every
//!   second. A rule never sees another tenant's messages (rules are indexed by tenant).
//! - **Actions**: see [`crate::actions`].
//! - **Loop protection**: actions publish as the hub itself, and the broker offers rules only
//!   what clients publish, so no republished message re-enters any rule.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use ferrohub_rules::{
    CompiledRule, Lookup, MessageContext, NoLookup, Output, RuleRunner, RuleSet, RunnerLimits,
};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};
use tokio::sync::mpsc;

use crate::actions::{
    ActionQueue, AlarmRequest, CommandRequest, DeadLetter, DeadLetters, Failure, HubLink, Job,
    WorkerContext, now_ms, spawn_worker,
};
use crate::error::{Result, RulesError};
use crate::lookup::LookupCache;
use crate::model::{ActionSpec, RuleSpec, StoredRule, TwinSection, validate_id};
use crate::stats::{ActionCounters, RuleCounters, RuleStats};
use crate::store::RuleStore;
use crate::template::{Expression, Template};

/// Messages taken from the input queue at once by the evaluation task.
const EVAL_BATCH: usize = 256;

/// Limits of the rules service.
#[derive(Debug, Clone)]
pub struct RulesConfig {
    /// Messages waiting for evaluation, all tenants.
    pub input_queue: usize,
    /// Jobs waiting per action of a rule.
    pub action_queue: usize,
    /// Dead letters kept per rule (oldest evicted).
    pub dead_letters: usize,
    /// Rules per tenant (bounds the per-rule metric series).
    pub max_rules_per_tenant: usize,
    /// State limits of each rule.
    pub limits: RunnerLimits,
    /// How long a fetched twin or registry record serves `twin()`/`device()` (a twin change
    /// evicts it at once).
    pub lookup_ttl: Duration,
    /// Twin and registry records cached for lookups, all tenants.
    pub lookup_capacity: usize,
    /// Refuse webhooks to loopback, private and link-local addresses ([`crate::egress`]).
    pub webhook_deny_private: bool,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            input_queue: 10_000,
            action_queue: 1_000,
            dead_letters: 100,
            max_rules_per_tenant: 1_000,
            limits: RunnerLimits::default(),
            lookup_ttl: Duration::from_secs(5),
            lookup_capacity: 100_000,
            webhook_deny_private: false,
        }
    }
}

/// A message offered to the rules.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// Tenant.
    pub tenant: Arc<str>,
    /// Topic.
    pub topic: Arc<str>,
    /// Raw payload (parsed as JSON once, `Null` otherwise).
    pub payload: Bytes,
    /// Publisher's client id.
    pub client_id: Option<Arc<str>>,
    /// Publisher's registered device.
    pub device: Option<Arc<str>>,
    /// Unix ms.
    pub timestamp_ms: i64,
}

/// A sample message for a dry run.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Sample {
    /// Topic.
    pub topic: String,
    /// The payload (JSON).
    #[serde(default)]
    pub payload: Json,
    /// Client id.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Unix ms (default: now).
    #[serde(default)]
    pub timestamp: Option<i64>,
}

/// What a dry run gives.
#[derive(Debug, Clone, Serialize)]
pub struct DryRun {
    /// Whether the sample's topic matches the rule's FROM.
    pub topic_matches: bool,
    /// The output (`null`: WHERE failed, or a windowed rule that emits only at window close).
    pub output: Option<Json>,
    /// What each action would do with it.
    pub actions: Vec<Json>,
}

/// Counters and dead letters of a rule: kept across updates and disable/enable.
struct RuleShared {
    counters: Arc<RuleCounters>,
    dead_letters: Arc<DeadLetters>,
}

/// An action compiled: its templates and expressions parsed once.
pub(crate) enum Plan {
    Republish {
        topic: Template,
        qos: u8,
        payload: Option<Template>,
    },
    Webhook {
        url: Template,
        headers: Vec<(String, Template)>,
        body: Option<Template>,
    },
    StoreTelemetry {
        device: Option<Template>,
        metrics: Vec<(String, Expression)>,
    },
    UpdateTwin {
        device: Option<Template>,
        section: TwinSection,
        patch: Option<Template>,
    },
    Command {
        device: Option<Template>,
        name: Template,
        payload: Option<Template>,
        queued: bool,
        ttl_s: Option<u64>,
    },
    Alarm {
        rule: Arc<str>,
        key: Template,
        severity: String,
        message: Option<Template>,
        device: Option<Template>,
        raise_when: Option<Expression>,
        clear: bool,
    },
}

fn template(t: &Option<String>) -> Result<Option<Template>> {
    t.as_deref().map(Template::parse).transpose()
}

/// The longest default alarm message (the rule id and its output).
const MAX_DEFAULT_MESSAGE: usize = 1024;

impl Plan {
    pub(crate) fn new(spec: &ActionSpec, rule: &Arc<str>) -> Result<Plan> {
        Ok(match spec {
            ActionSpec::Republish {
                topic,
                qos,
                payload,
            } => Plan::Republish {
                topic: Template::parse(topic)?,
                qos: *qos,
                payload: template(payload)?,
            },
            ActionSpec::Webhook(w) => Plan::Webhook {
                url: Template::parse(&w.url)?,
                headers: w
                    .headers
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), Template::parse(v)?)))
                    .collect::<Result<_>>()?,
                body: template(&w.body)?,
            },
            ActionSpec::StoreTelemetry { device, metrics } => Plan::StoreTelemetry {
                device: template(device)?,
                metrics: metrics
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), Expression::parse(v)?)))
                    .collect::<Result<_>>()?,
            },
            ActionSpec::UpdateTwin {
                device,
                section,
                patch,
            } => Plan::UpdateTwin {
                device: template(device)?,
                section: *section,
                patch: template(patch)?,
            },
            ActionSpec::Command {
                device,
                name,
                payload,
                queued,
                ttl_s,
            } => Plan::Command {
                device: template(device)?,
                name: Template::parse(name)?,
                payload: template(payload)?,
                queued: *queued,
                ttl_s: *ttl_s,
            },
            ActionSpec::Alarm(a) => Plan::Alarm {
                rule: rule.clone(),
                key: Template::parse(&a.key)?,
                severity: a.severity.clone(),
                message: template(&a.message)?,
                device: template(&a.device)?,
                raise_when: a.raise_when.as_deref().map(Expression::parse).transpose()?,
                clear: a.clear,
            },
        })
    }

    /// The job for one output. Templates see `msg` (the input message, or for a windowed rule
    /// the output itself); `metrics` and `raise_when` see the output. `Ok(None)`: nothing to
    /// do (`raise_when` neither true nor false); `Err`: the job cannot be built (no device, a
    /// patch that is not a JSON object) and becomes a dead letter.
    pub(crate) fn render(
        &self,
        msg: &MessageContext<'_>,
        lookup: &dyn Lookup,
        output: &Json,
    ) -> std::result::Result<Option<Job>, String> {
        let device = |t: &Option<Template>| -> std::result::Result<String, String> {
            let d = match t {
                Some(t) => t.render(msg, lookup),
                None => msg.device.unwrap_or(msg.client_id).to_string(),
            };
            if d.is_empty() {
                return Err(
                    "no device: the message has no publishing device; set the action's `device`"
                        .into(),
                );
            }
            Ok(d)
        };
        let mut out_ctx = MessageContext::new(msg.tenant, msg.topic, output).at(msg.timestamp_ms);
        out_ctx.client_id = msg.client_id;
        out_ctx.principal = msg.principal;
        out_ctx.device = msg.device;
        Ok(Some(match self {
            Plan::Republish {
                topic,
                qos,
                payload,
            } => Job::Republish {
                topic: topic.render(msg, lookup),
                payload: Bytes::from(match payload {
                    Some(p) => p.render(msg, lookup),
                    None => output.to_string(),
                }),
                qos: *qos,
            },
            Plan::Webhook { url, headers, body } => Job::Webhook {
                url: url.render(msg, lookup),
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.render(msg, lookup)))
                    .collect(),
                body: Bytes::from(match body {
                    Some(b) => b.render(msg, lookup),
                    None => output.to_string(),
                }),
            },
            Plan::StoreTelemetry { device: d, metrics } => {
                let mut payload = if metrics.is_empty() {
                    match output {
                        Json::Object(o) => o.clone(),
                        _ => {
                            return Err(
                                "store_telemetry needs an object output (or `metrics`)".into()
                            );
                        }
                    }
                } else {
                    metrics
                        .iter()
                        .filter_map(|(k, e)| Some((k.clone(), e.eval(&out_ctx, lookup)?)))
                        .collect()
                };
                if payload.is_empty() {
                    return Ok(None);
                }
                if !["ts", "timestamp", "time"]
                    .iter()
                    .any(|k| payload.contains_key(*k))
                {
                    payload.insert("ts".into(), json!(msg.timestamp_ms));
                }
                Job::StoreTelemetry {
                    device: device(d)?,
                    payload: Json::Object(payload),
                }
            }
            Plan::UpdateTwin {
                device: d,
                section,
                patch,
            } => {
                let patch = match patch {
                    Some(t) => serde_json::from_str(&t.render(msg, lookup))
                        .map_err(|e| format!("the rendered twin patch is not JSON: {e}"))?,
                    None => output.clone(),
                };
                if !patch.is_object() {
                    return Err("a twin patch must be a JSON object".into());
                }
                Job::UpdateTwin {
                    device: device(d)?,
                    section: *section,
                    patch,
                }
            }
            Plan::Command {
                device: d,
                name,
                payload,
                queued,
                ttl_s,
            } => Job::Command {
                device: device(d)?,
                command: CommandRequest {
                    name: name.render(msg, lookup),
                    payload: Bytes::from(match payload {
                        Some(p) => p.render(msg, lookup),
                        None => output.to_string(),
                    }),
                    queued: *queued,
                    ttl_s: *ttl_s,
                },
            },
            Plan::Alarm {
                rule,
                key,
                severity,
                message,
                device: d,
                raise_when,
                clear,
            } => {
                let key = key.render(msg, lookup);
                if key.is_empty() {
                    return Err("the alarm key rendered empty".into());
                }
                let raise = match raise_when {
                    Some(e) => match e.eval(&out_ctx, lookup) {
                        Some(Json::Bool(b)) => b,
                        _ => return Ok(None),
                    },
                    None => !clear,
                };
                if !raise {
                    Job::Alarm(Box::new(AlarmRequest::Clear { key }))
                } else {
                    let mut message = match message {
                        Some(t) => t.render(msg, lookup),
                        None => format!("rule {rule}: {output}"),
                    };
                    if message.len() > MAX_DEFAULT_MESSAGE && self.default_message() {
                        let mut cut = MAX_DEFAULT_MESSAGE;
                        while !message.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        message.truncate(cut);
                    }
                    Job::Alarm(Box::new(AlarmRequest::Raise {
                        key,
                        severity: severity.clone(),
                        device: match d {
                            Some(t) => Some(t.render(msg, lookup)).filter(|s| !s.is_empty()),
                            None => msg
                                .device
                                .or(Some(msg.client_id))
                                .filter(|s| !s.is_empty())
                                .map(str::to_string),
                        },
                        message,
                        details: output.clone(),
                    }))
                }
            }
        }))
    }

    fn default_message(&self) -> bool {
        matches!(self, Plan::Alarm { message: None, .. })
    }
}

struct ActiveRule {
    id: Arc<str>,
    compiled: Arc<CompiledRule>,
    counters: Arc<RuleCounters>,
    dead_letters: Arc<DeadLetters>,
    actions: Vec<(Plan, ActionQueue)>,
    error_action: Option<Arc<ErrorAction>>,
}

/// The error action of a rule, invoked with the error document.
struct ErrorAction {
    plan: Plan,
    queue: ActionQueue,
    counters: Arc<RuleCounters>,
    dead_letters: Arc<DeadLetters>,
}

impl ErrorAction {
    fn invoke(&self, doc: Json) {
        self.counters.error_actions.fetch_add(1, Relaxed);
        let topic = doc
            .pointer("/input/topic")
            .and_then(Json::as_str)
            .unwrap_or("")
            .to_string();
        let tenant = doc
            .get("tenant")
            .and_then(Json::as_str)
            .unwrap_or("")
            .to_string();
        let ctx = MessageContext::new(&tenant, &topic, &doc);
        let (error, target) = match self.plan.render(&ctx, &NoLookup, &doc) {
            Ok(None) => return,
            Ok(Some(job)) => match self.queue.offer(job) {
                Ok(()) => return,
                Err(job) => ("the error action's queue is full".to_string(), job.target()),
            },
            Err(e) => (e, String::new()),
        };
        self.queue.counters.dead_letters.fetch_add(1, Relaxed);
        self.dead_letters.push(DeadLetter {
            at_ms: now_ms(),
            action: None,
            attempts: 0,
            error,
            target,
            payload: doc,
        });
    }
}

/// The enabled rules of one tenant.
///
/// The list is replaced, never edited, so evaluation takes it with one `Arc` clone per message.
/// The [`RuleSet`] — every rule's state, and the per-message path cache shared by the rules —
/// is carried over from list to list and locked by the evaluation task (contended only by a
/// rule change).
struct TenantRules {
    rules: Box<[Arc<ActiveRule>]>,
    by_id: HashMap<Arc<str>, Arc<ActiveRule>>,
    set: Arc<Mutex<RuleSet>>,
}

impl TenantRules {
    fn new(rules: Vec<Arc<ActiveRule>>, set: Arc<Mutex<RuleSet>>) -> TenantRules {
        TenantRules {
            by_id: rules.iter().map(|r| (r.id.clone(), r.clone())).collect(),
            rules: rules.into(),
            set,
        }
    }
}

/// The rules of every tenant, running.
pub struct RulesService {
    store: Arc<dyn RuleStore>,
    config: RulesConfig,
    hub: Arc<dyn HubLink>,
    http: reqwest::Client,
    /// Enabled rules by tenant (what the broker's offer and the evaluation task read).
    active: RwLock<HashMap<Arc<str>, Arc<TenantRules>>>,
    shared: Mutex<HashMap<(String, String), Arc<RuleShared>>>,
    input: mpsc::Sender<Inbound>,
    input_rx: Mutex<Option<mpsc::Receiver<Inbound>>>,
    input_dropped: AtomicU64,
    lookups: LookupCache,
}

impl std::fmt::Debug for RulesService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RulesService").finish_non_exhaustive()
    }
}

impl RulesService {
    /// A service over `store`; call [`RulesService::start`] to load the rules and run.
    pub fn new(
        store: Arc<dyn RuleStore>,
        hub: Arc<dyn HubLink>,
        config: RulesConfig,
    ) -> Arc<RulesService> {
        let (input, rx) = mpsc::channel(config.input_queue.max(1));
        Arc::new(RulesService {
            store,
            hub: hub.clone(),
            http: crate::egress::client(config.webhook_deny_private),
            active: RwLock::new(HashMap::new()),
            shared: Mutex::new(HashMap::new()),
            input,
            input_rx: Mutex::new(Some(rx)),
            input_dropped: AtomicU64::new(0),
            lookups: LookupCache::new(hub.clone(), config.lookup_ttl, config.lookup_capacity),
            config,
        })
    }

    /// Loads the enabled rules from the store (a stored rule that no longer compiles is logged
    /// and skipped) and starts the evaluation task, which stops with `shutdown`.
    pub async fn start(
        self: &Arc<Self>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<tokio::task::JoinHandle<()>> {
        for rule in self.store.list(None).await? {
            if rule.enabled
                && let Err(e) = self.activate(&rule)
            {
                tracing::warn!(tenant = rule.tenant, rule = rule.id, error = %e, "stored rule not started");
            }
        }
        let rx = self.input_rx.lock().take();
        let me = self.clone();
        Ok(tokio::spawn(async move {
            let Some(mut rx) = rx else { return };
            let mut shutdown = std::pin::pin!(shutdown);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Drained in batches: one wake-up per batch, not per message.
            let mut batch = Vec::with_capacity(EVAL_BATCH);
            loop {
                tokio::select! {
                    _ = &mut shutdown => break,
                    n = rx.recv_many(&mut batch, EVAL_BATCH) => {
                        if n == 0 {
                            break;
                        }
                        for m in batch.drain(..) {
                            me.evaluate(&m).await;
                        }
                    }
                    _ = tick.tick() => me.tick(now_ms()),
                }
            }
        }))
    }

    /// Offers a publication (called by the broker on the publisher's path; never blocks).
    /// `make` builds the message only when an enabled rule of the tenant matches the topic.
    /// Returns whether a rule wanted it.
    pub fn offer(&self, tenant: &str, topic: &str, make: impl FnOnce() -> Inbound) -> bool {
        let active = self.active.read();
        let Some(tr) = active.get(tenant) else {
            return false;
        };
        let rules = &tr.rules;
        if !rules.iter().any(|r| r.compiled.matches_topic(topic)) {
            return false;
        }
        if self.input.try_send(make()).is_err() {
            self.input_dropped.fetch_add(1, Relaxed);
            for r in rules.iter().filter(|r| r.compiled.matches_topic(topic)) {
                r.counters.dropped_queue_full.fetch_add(1, Relaxed);
            }
        }
        true
    }

    pub(crate) fn config(&self) -> &RulesConfig {
        &self.config
    }

    pub(crate) fn lookups(&self) -> &LookupCache {
        &self.lookups
    }

    /// Drops cached lookups: a device's twin (it changed); without a device, everything of the
    /// tenant; without a tenant, everything.
    pub fn forget_lookup(&self, tenant: Option<&str>, device: Option<&str>) {
        self.lookups.forget(tenant, device);
    }

    async fn evaluate(&self, m: &Inbound) {
        let tr: Arc<TenantRules> = match self.active.read().get(&*m.tenant) {
            Some(r) => r.clone(),
            None => return,
        };
        let payload = ferrohub_rules::parse_payload(&m.payload);
        let mut ctx = MessageContext::new(&m.tenant, &m.topic, &payload).at(m.timestamp_ms);
        ctx.client_id = m.client_id.as_deref().unwrap_or("");
        ctx.principal = m.device.as_deref().or(m.client_id.as_deref()).unwrap_or("");
        ctx.device = m.device.as_deref();
        let mut keys = Vec::new();
        for rule in tr.rules.iter().filter(|r| r.compiled.uses_lookups()) {
            if rule.compiled.matches_topic(&m.topic) {
                rule.compiled.lookup_keys(&ctx, &mut keys);
            }
        }
        if !keys.is_empty() {
            self.lookups.prefetch(&m.tenant, &keys).await;
        }
        let mut outputs = Vec::new();
        let mut errors = Vec::new();
        tr.set.lock().on_message_observed(
            &ctx,
            &self.lookups,
            &mut outputs,
            &mut errors,
            &mut |id, took| {
                if let Some(r) = tr.by_id.get(id) {
                    r.counters.matched.fetch_add(1, Relaxed);
                    r.counters.latency.record(took.as_micros() as u64);
                }
            },
        );
        self.dispatch_all(&tr, &ctx, outputs);
        for (id, e) in errors {
            let Some(rule) = tr.by_id.get(&id) else {
                continue;
            };
            rule.counters.failed.fetch_add(1, Relaxed);
            if let Some(ea) = &rule.error_action {
                ea.invoke(json!({
                    "rule": &*rule.id, "tenant": &*m.tenant, "error": e.to_string(),
                    "input": {"topic": &*m.topic, "payload": payload,
                              "client_id": m.client_id.as_deref()},
                }));
            }
        }
    }

    /// Runs the actions of each output; a rule with outputs counts one `passed`.
    fn dispatch_all(
        &self,
        tr: &TenantRules,
        ctx: &MessageContext<'_>,
        outputs: Vec<(Arc<str>, Output)>,
    ) {
        let mut last: Option<Arc<str>> = None;
        for (id, o) in outputs {
            let Some(rule) = tr.by_id.get(&id) else {
                continue;
            };
            // A rule's outputs for one message (or tick) are contiguous.
            if last.as_ref() != Some(&id) {
                rule.counters.passed.fetch_add(1, Relaxed);
                last = Some(id);
            }
            self.dispatch(rule, ctx, &o);
        }
    }

    fn tick(&self, now: i64) {
        let all: Vec<(Arc<str>, Arc<TenantRules>)> = self
            .active
            .read()
            .iter()
            .filter(|(_, tr)| tr.rules.iter().any(|r| r.compiled.window().is_some()))
            .map(|(t, tr)| (t.clone(), tr.clone()))
            .collect();
        let mut outputs = Vec::new();
        for (tenant, tr) in all {
            tr.set.lock().tick(now, &self.lookups, &mut outputs);
            let null = Json::Null;
            let ctx = MessageContext::new(&tenant, "", &null).at(now);
            self.dispatch_all(&tr, &ctx, std::mem::take(&mut outputs));
        }
    }

    fn dispatch(&self, rule: &ActiveRule, ctx: &MessageContext<'_>, output: &Output) {
        let windowed;
        let (ctx, output) = match output.window {
            // A window's output has no single publisher: its actions' templates see the
            // output, at the window's start (what `store_telemetry` stamps it with).
            Some((start, _)) => {
                windowed = MessageContext::new(ctx.tenant, "", &output.value).at(start);
                (&windowed, &output.value)
            }
            None => (ctx, &output.value),
        };
        for (i, (plan, queue)) in rule.actions.iter().enumerate() {
            let (error, target) = match plan.render(ctx, &self.lookups, output) {
                Ok(None) => continue,
                Ok(Some(job)) => match queue.offer(job) {
                    Ok(()) => continue,
                    Err(job) => ("the action's queue is full".to_string(), job.target()),
                },
                Err(e) => (e, String::new()),
            };
            queue.counters.dead_letters.fetch_add(1, Relaxed);
            let letter = DeadLetter {
                at_ms: now_ms(),
                action: Some(i),
                attempts: 0,
                error,
                target,
                payload: output.clone(),
            };
            rule.dead_letters.push(letter.clone());
            if let Some(ea) = &rule.error_action {
                ea.invoke(error_doc(&rule.id, ctx.tenant, i, &letter, ctx.topic));
            }
        }
    }

    fn shared(&self, tenant: &str, id: &str) -> Arc<RuleShared> {
        self.shared
            .lock()
            .entry((tenant.to_string(), id.to_string()))
            .or_insert_with(|| {
                Arc::new(RuleShared {
                    counters: Arc::new(RuleCounters::default()),
                    dead_letters: Arc::new(DeadLetters::new(self.config.dead_letters)),
                })
            })
            .clone()
    }

    #[allow(clippy::too_many_arguments)]
    fn worker(
        &self,
        tenant: &Arc<str>,
        rule: &str,
        action: Option<usize>,
        spec: &ActionSpec,
        shared: &RuleShared,
        failures: Option<mpsc::Sender<Failure>>,
    ) -> ActionQueue {
        let webhook = match spec {
            ActionSpec::Webhook(w) => Some(w.clone()),
            _ => None,
        };
        spawn_worker(
            WorkerContext {
                tenant: tenant.clone(),
                actor: Arc::from(format!("rule:{rule}")),
                action,
                counters: Arc::new(ActionCounters::default()),
                dead_letters: shared.dead_letters.clone(),
                hub: self.hub.clone(),
                deny_private: self.config.webhook_deny_private,
                http: self.http.clone(),
                failures,
            },
            webhook,
            self.config.action_queue,
            spec.kind(),
        )
    }

    /// Starts (or restarts with fresh state) a stored rule.
    fn activate(&self, rule: &StoredRule) -> Result<()> {
        let compiled = rule.spec.validate()?;
        let tenant: Arc<str> = Arc::from(rule.tenant.as_str());
        let id: Arc<str> = Arc::from(rule.id.as_str());
        let shared = self.shared(&rule.tenant, &rule.id);
        let error_action = match &rule.spec.error_action {
            Some(spec) => Some(Arc::new(ErrorAction {
                plan: Plan::new(spec, &id)?,
                queue: self.worker(&tenant, &id, None, spec, &shared, None),
                counters: shared.counters.clone(),
                dead_letters: shared.dead_letters.clone(),
            })),
            None => None,
        };
        // Failures of the actions reach the error action through a bounded queue (full: the
        // dead letter is still recorded; only the error action's call is missed).
        let failures = error_action.as_ref().map(|ea| {
            let (tx, mut rx) = mpsc::channel::<Failure>(self.config.action_queue.max(1));
            let ea = ea.clone();
            let (rid, t) = (id.clone(), tenant.clone());
            tokio::spawn(async move {
                while let Some(f) = rx.recv().await {
                    let topic = String::new();
                    ea.invoke(error_doc(
                        &rid,
                        &t,
                        f.action.unwrap_or(0),
                        &f.letter,
                        &topic,
                    ));
                }
            });
            tx
        });
        let mut actions = Vec::new();
        for (i, spec) in rule.spec.actions.iter().enumerate() {
            actions.push((
                Plan::new(spec, &id)?,
                self.worker(&tenant, &id, Some(i), spec, &shared, failures.clone()),
            ));
        }
        let active = Arc::new(ActiveRule {
            id: id.clone(),
            compiled: compiled.clone(),
            counters: shared.counters.clone(),
            dead_letters: shared.dead_letters.clone(),
            actions,
            error_action,
        });
        let mut map = self.active.write();
        let (mut rules, set) = match map.get(&tenant) {
            Some(tr) => (
                tr.rules.iter().filter(|r| r.id != id).cloned().collect(),
                tr.set.clone(),
            ),
            None => (
                Vec::new(),
                Arc::new(Mutex::new(RuleSet::new(self.config.limits))),
            ),
        };
        // Replaces the rule's state too (a changed rule starts afresh).
        set.lock().insert(&id, compiled);
        rules.push(active);
        map.insert(tenant, Arc::new(TenantRules::new(rules, set)));
        Ok(())
    }

    fn deactivate(&self, tenant: &str, id: &str) {
        let mut map = self.active.write();
        let Some(tr) = map.get(tenant) else {
            return;
        };
        tr.set.lock().remove(id);
        let rest: Vec<Arc<ActiveRule>> =
            tr.rules.iter().filter(|r| &*r.id != id).cloned().collect();
        if rest.is_empty() {
            map.remove(tenant);
        } else {
            let set = tr.set.clone();
            map.insert(Arc::from(tenant), Arc::new(TenantRules::new(rest, set)));
        }
    }

    /// The rules of a tenant.
    pub async fn list(&self, tenant: &str) -> Result<Vec<StoredRule>> {
        self.store.list(Some(tenant)).await
    }

    /// One rule.
    pub async fn get(&self, tenant: &str, id: &str) -> Result<StoredRule> {
        self.store
            .get(tenant, id)
            .await?
            .ok_or_else(|| RulesError::NotFound(id.to_string()))
    }

    /// Creates a rule (validated: compile errors carry line and column).
    pub async fn create(
        &self,
        tenant: &str,
        id: &str,
        spec: RuleSpec,
        enabled: bool,
    ) -> Result<StoredRule> {
        validate_id(id)?;
        spec.validate()?;
        if self.store.list(Some(tenant)).await?.len() >= self.config.max_rules_per_tenant {
            return Err(RulesError::Invalid(format!(
                "a tenant has at most {} rules",
                self.config.max_rules_per_tenant
            )));
        }
        let rule = self
            .store
            .create(tenant, id, &spec, enabled, now_ms())
            .await?;
        if rule.enabled {
            self.activate(&rule)?;
        }
        Ok(rule)
    }

    /// Replaces a rule's SQL and actions (new version; window state starts afresh).
    pub async fn update(
        &self,
        tenant: &str,
        id: &str,
        spec: RuleSpec,
        expected: Option<u64>,
    ) -> Result<StoredRule> {
        spec.validate()?;
        let rule = self
            .store
            .update(tenant, id, Some(&spec), None, expected, now_ms())
            .await?;
        self.apply(&rule)?;
        Ok(rule)
    }

    /// Enables or disables a rule (new version).
    pub async fn set_enabled(
        &self,
        tenant: &str,
        id: &str,
        enabled: bool,
        expected: Option<u64>,
    ) -> Result<StoredRule> {
        let rule = self
            .store
            .update(tenant, id, None, Some(enabled), expected, now_ms())
            .await?;
        self.apply(&rule)?;
        Ok(rule)
    }

    fn apply(&self, rule: &StoredRule) -> Result<()> {
        if rule.enabled {
            self.activate(rule)
        } else {
            self.deactivate(&rule.tenant, &rule.id);
            Ok(())
        }
    }

    /// Deletes a rule, its counters and dead letters.
    pub async fn delete(&self, tenant: &str, id: &str) -> Result<()> {
        if !self.store.delete(tenant, id).await? {
            return Err(RulesError::NotFound(id.to_string()));
        }
        self.deactivate(tenant, id);
        self.shared
            .lock()
            .remove(&(tenant.to_string(), id.to_string()));
        Ok(())
    }

    /// Deletes every rule of a tenant (the tenant was deleted).
    pub async fn forget_tenant(&self, tenant: &str) -> Result<()> {
        self.lookups.forget(Some(tenant), None);
        for r in self.store.list(Some(tenant)).await? {
            self.delete(tenant, &r.id).await?;
        }
        Ok(())
    }

    /// Counters of a rule.
    pub async fn stats(&self, tenant: &str, id: &str) -> Result<RuleStats> {
        self.get(tenant, id).await?;
        let shared = self.shared(tenant, id);
        let c = &shared.counters;
        let actions = self
            .active
            .read()
            .get(tenant)
            .and_then(|rules| rules.by_id.get(id).cloned())
            .map(|r| {
                r.actions
                    .iter()
                    .map(|(_, q)| q.counters.snapshot(q.kind))
                    .collect()
            })
            .unwrap_or_default();
        Ok(RuleStats {
            matched: c.matched.load(Relaxed),
            passed: c.passed.load(Relaxed),
            failed: c.failed.load(Relaxed),
            dropped_queue_full: c.dropped_queue_full.load(Relaxed),
            error_actions: c.error_actions.load(Relaxed),
            latency_p50_us: c.latency.quantile_micros(0.5),
            latency_p99_us: c.latency.quantile_micros(0.99),
            actions,
            dead_letters_held: shared.dead_letters.len(),
            dead_letters_evicted: shared.dead_letters.evicted.load(Relaxed),
        })
    }

    /// The dead letters of a rule, oldest first.
    pub async fn dead_letters(&self, tenant: &str, id: &str) -> Result<Vec<DeadLetter>> {
        self.get(tenant, id).await?;
        Ok(self.shared(tenant, id).dead_letters.list())
    }

    /// Evaluates `spec` against `sample` without state or side effects.
    pub fn dry_run(&self, tenant: &str, spec: &RuleSpec, sample: &Sample) -> Result<DryRun> {
        let compiled = spec.validate()?;
        let compiled_window = compiled.window().is_some();
        let topic_matches = compiled.matches_topic(&sample.topic);
        let mut ctx = MessageContext::new(tenant, &sample.topic, &sample.payload)
            .at(sample.timestamp.unwrap_or_else(now_ms));
        ctx.client_id = sample.client_id.as_deref().unwrap_or("");
        ctx.principal = ctx.client_id;
        let mut runner = RuleRunner::new(compiled, self.config.limits);
        let mut outputs = Vec::new();
        if topic_matches {
            runner
                .on_message(&ctx, &NoLookup, &mut outputs)
                .map_err(|e| RulesError::Invalid(format!("evaluation failed: {e}")))?;
        }
        let output = outputs.into_iter().next().map(|o| o.value);
        let mut actions = Vec::new();
        if let Some(out) = &output {
            let rule: Arc<str> = Arc::from("dry-run");
            let ctx = if compiled_window {
                MessageContext::new(tenant, "", out).at(ctx.timestamp_ms)
            } else {
                ctx
            };
            for spec in &spec.actions {
                actions.push(match Plan::new(spec, &rule)?.render(&ctx, &NoLookup, out) {
                    Ok(Some(job)) => job.describe(),
                    Ok(None) => json!({"type": spec.kind(), "skipped": true}),
                    Err(e) => json!({"type": spec.kind(), "error": e}),
                });
            }
        }
        Ok(DryRun {
            topic_matches,
            output,
            actions,
        })
    }

    /// Prometheus text: per-rule series labelled `tenant` and `rule` (at most
    /// `max_rules_per_tenant` rules per tenant), and the input queue's.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(
            out,
            "# HELP ferrohub_rules_input_dropped_total Messages not evaluated because the rules input queue was full.\n\
             # TYPE ferrohub_rules_input_dropped_total counter\n\
             ferrohub_rules_input_dropped_total {}\n\
             # HELP ferrohub_rules_input_queued Messages waiting for evaluation.\n\
             # TYPE ferrohub_rules_input_queued gauge\n\
             ferrohub_rules_input_queued {}\n\
             # HELP ferrohub_rules_lookup_fetches_total Twin and registry records fetched for twin()/device().\n\
             # TYPE ferrohub_rules_lookup_fetches_total counter\n\
             ferrohub_rules_lookup_fetches_total {}\n\
             # HELP ferrohub_rules_lookup_hits_total Lookups answered from the cache.\n\
             # TYPE ferrohub_rules_lookup_hits_total counter\n\
             ferrohub_rules_lookup_hits_total {}\n\
             # HELP ferrohub_rules_lookup_cached Records held by the lookup cache.\n\
             # TYPE ferrohub_rules_lookup_cached gauge\n\
             ferrohub_rules_lookup_cached {}",
            self.input_dropped.load(Relaxed),
            self.input.max_capacity() - self.input.capacity(),
            self.lookups.fetches.load(Relaxed),
            self.lookups.hits.load(Relaxed),
            self.lookups.len(),
        );
        let shared: Vec<((String, String), Arc<RuleShared>)> = self
            .shared
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let action_totals: HashMap<(String, String), [u64; 4]> = self
            .active
            .read()
            .iter()
            .flat_map(|(t, rules)| rules.rules.iter().map(move |r| (t, r)))
            .map(|(t, r)| {
                let mut sums = [0u64; 4];
                for (_, q) in &r.actions {
                    sums[0] += q.counters.successes.load(Relaxed);
                    sums[1] += q.counters.errors.load(Relaxed);
                    sums[2] += q.counters.retries.load(Relaxed);
                    sums[3] += q.counters.dead_letters.load(Relaxed);
                }
                ((t.to_string(), r.id.to_string()), sums)
            })
            .collect();
        let series: [(&str, &str, &str); 9] = [
            (
                "matched",
                "counter",
                "Messages whose topic matched the rule.",
            ),
            ("passed", "counter", "Evaluations that produced an output."),
            ("failed", "counter", "Evaluations that failed."),
            (
                "dropped",
                "counter",
                "Matching messages dropped because the rules queue was full.",
            ),
            (
                "action_successes",
                "counter",
                "Action deliveries that succeeded (since the rule's last change).",
            ),
            (
                "action_errors",
                "counter",
                "Action attempts that failed (since the rule's last change).",
            ),
            (
                "action_retries",
                "counter",
                "Action attempts after the first (since the rule's last change).",
            ),
            (
                "dead_letters",
                "counter",
                "Messages an action gave up on (since the rule's last change).",
            ),
            (
                "eval_latency_p99_microseconds",
                "gauge",
                "Evaluation latency p99 (power-of-two bucket bound).",
            ),
        ];
        for (i, (name, kind, help)) in series.iter().enumerate() {
            let _ = writeln!(
                out,
                "# HELP ferrohub_rule_{name} {help}\n# TYPE ferrohub_rule_{name} {kind}"
            );
            for ((tenant, id), s) in &shared {
                let c = &s.counters;
                let acts = action_totals
                    .get(&(tenant.clone(), id.clone()))
                    .copied()
                    .unwrap_or_default();
                let v = match i {
                    0 => c.matched.load(Relaxed),
                    1 => c.passed.load(Relaxed),
                    2 => c.failed.load(Relaxed),
                    3 => c.dropped_queue_full.load(Relaxed),
                    4..=7 => acts[i - 4],
                    _ => c.latency.quantile_micros(0.99),
                };
                let _ = writeln!(
                    out,
                    "ferrohub_rule_{name}{{tenant=\"{}\",rule=\"{}\"}} {v}",
                    escape(tenant),
                    escape(id)
                );
            }
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn error_doc(rule: &str, tenant: &str, action: usize, letter: &DeadLetter, topic: &str) -> Json {
    json!({
        "rule": rule, "tenant": tenant, "action": action, "error": letter.error,
        "attempts": letter.attempts, "target": letter.target,
        "input": {"topic": topic, "payload": letter.payload},
    })
}
