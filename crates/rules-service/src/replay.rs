//! Replays a rule against stored telemetry: messages rebuilt from the time-series store (one
//! per device and timestamp, metrics nested back by their dots), evaluated in time order by a
//! fresh runner — windows and `lag`/`delta` state included — without running any action.
//!
//! The caller (the API) reads the store; this module only evaluates, so the rules service keeps
//! knowing nothing of the telemetry engine.

use std::sync::Arc;

use ferrohub_rules::{MessageContext, RuleRunner};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json, json};

use crate::error::{Result, RulesError};
use crate::model::RuleSpec;
use crate::service::{Plan, RulesService};

/// Most messages one replay evaluates.
pub const MAX_REPLAY_MESSAGES: usize = 1_000_000;
/// Most outputs one replay returns.
pub const MAX_REPLAY_OUTPUTS: usize = 1_000;

/// What to replay.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// Start, Unix ms (inclusive).
    pub from: i64,
    /// End, Unix ms (exclusive).
    pub to: i64,
    /// Only these devices (default: every device of the tenant).
    #[serde(default)]
    pub devices: Option<Vec<String>>,
    /// Topic each rebuilt message gets; `{device}` is replaced by its device id (default
    /// `devices/{device}/telemetry`, the default telemetry topic).
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Outputs returned (default 100, at most 1000); the counts cover all of them.
    #[serde(default = "default_outputs")]
    pub max_outputs: usize,
    /// Messages evaluated at most (default 100 000, at most 1 000 000); past it the replay
    /// stops and says so.
    #[serde(default = "default_messages")]
    pub max_messages: usize,
}

fn default_topic() -> String {
    "devices/{device}/telemetry".into()
}
fn default_outputs() -> usize {
    100
}
fn default_messages() -> usize {
    100_000
}

impl ReplayRequest {
    /// Checks the bounds.
    pub fn validate(&self) -> Result<()> {
        if self.from >= self.to {
            return Err(RulesError::Invalid(
                "replay `from` must be before `to`".into(),
            ));
        }
        if !(1..=MAX_REPLAY_OUTPUTS).contains(&self.max_outputs) {
            return Err(RulesError::Invalid(format!(
                "max_outputs must be 1 to {MAX_REPLAY_OUTPUTS}"
            )));
        }
        if !(1..=MAX_REPLAY_MESSAGES).contains(&self.max_messages) {
            return Err(RulesError::Invalid(format!(
                "max_messages must be 1 to {MAX_REPLAY_MESSAGES}"
            )));
        }
        Ok(())
    }
}

/// One rebuilt message.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayMessage {
    /// Device.
    pub device: String,
    /// Time, Unix ms.
    pub timestamp_ms: i64,
    /// The payload.
    pub payload: Json,
}

/// One output of a replay.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayOutput {
    /// Time of the message that produced it (a window's output: the window's start).
    pub timestamp_ms: i64,
    /// The publisher (empty for a window's output).
    pub device: String,
    /// The SELECT result.
    pub output: Json,
    /// What each action would have done (nothing is run).
    pub actions: Vec<Json>,
}

/// What a replay found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    /// Messages rebuilt and offered.
    pub messages: u64,
    /// Messages whose topic matched the rule.
    pub matched: u64,
    /// Outputs produced.
    pub outputs_total: u64,
    /// Evaluations that failed.
    pub failed: u64,
    /// The first `max_outputs` outputs.
    pub outputs: Vec<ReplayOutput>,
    /// The store held more than `max_messages` messages in the range: narrow it.
    pub truncated: bool,
    /// The first evaluation errors (at most 10).
    pub errors: Vec<String>,
}

/// Rebuilds a payload from `(metric, value)` pairs: `env.t` becomes `{"env": {"t": …}}`.
/// A metric whose path collides with another's (`env` and `env.t`: a device that sent both
/// shapes) is kept under its dotted name at the top when that is free, else left out.
pub fn nest(pairs: impl IntoIterator<Item = (String, Json)>) -> Json {
    let mut root = Map::new();
    for (metric, value) in pairs {
        if !insert_path(&mut root, &metric, value.clone()) {
            root.entry(metric).or_insert(value);
        }
    }
    Json::Object(root)
}

fn insert_path(map: &mut Map<String, Json>, path: &str, value: Json) -> bool {
    match path.split_once('.') {
        None => {
            if map.contains_key(path) {
                return false;
            }
            map.insert(path.to_string(), value);
            true
        }
        Some((head, rest)) => {
            let slot = map
                .entry(head.to_string())
                .or_insert_with(|| Json::Object(Map::new()));
            match slot {
                Json::Object(inner) => insert_path(inner, rest, value),
                _ => false,
            }
        }
    }
}

impl RulesService {
    /// Evaluates `spec` over `messages` (in time order) with fresh state and no side effects.
    /// `twin()`/`device()` see the records as they are now, not as they were.
    pub async fn replay(
        &self,
        tenant: &str,
        spec: &RuleSpec,
        request: &ReplayRequest,
        messages: Vec<ReplayMessage>,
        truncated: bool,
    ) -> Result<ReplayReport> {
        request.validate()?;
        let compiled = spec.validate()?;
        let rule_id: Arc<str> = Arc::from("replay");
        let plans = spec
            .actions
            .iter()
            .map(|a| Plan::new(a, &rule_id))
            .collect::<Result<Vec<_>>>()?;
        let mut runner = RuleRunner::new(compiled.clone(), self.config().limits);
        let tenant_arc: Arc<str> = Arc::from(tenant);
        let mut report = ReplayReport {
            truncated,
            ..ReplayReport::default()
        };
        let mut outputs = Vec::new();
        let mut keys = Vec::new();
        for m in &messages {
            report.messages += 1;
            let topic = request.topic.replace("{device}", &m.device);
            if !compiled.matches_topic(&topic) {
                continue;
            }
            report.matched += 1;
            let mut ctx = MessageContext::new(tenant, &topic, &m.payload).at(m.timestamp_ms);
            ctx.client_id = &m.device;
            ctx.principal = &m.device;
            ctx.device = Some(&m.device);
            keys.clear();
            compiled.lookup_keys(&ctx, &mut keys);
            if !keys.is_empty() {
                self.lookups().prefetch(&tenant_arc, &keys).await;
            }
            match runner.on_message(&ctx, self.lookups(), &mut outputs) {
                Ok(()) => {
                    for o in outputs.drain(..) {
                        self.record(&mut report, request, &plans, &ctx, o);
                    }
                }
                Err(e) => {
                    outputs.clear();
                    report.failed += 1;
                    if report.errors.len() < 10 {
                        report
                            .errors
                            .push(format!("{} at {}: {e}", m.device, m.timestamp_ms));
                    }
                }
            }
        }
        // Windows that ended by the end of the range close now.
        let end = request
            .to
            .saturating_add(self.config().limits.allowed_lateness_ms);
        let _ = runner.tick(end, self.lookups(), &mut outputs);
        let null = Json::Null;
        let ctx = MessageContext::new(tenant, "", &null).at(end);
        for o in outputs.drain(..) {
            self.record(&mut report, request, &plans, &ctx, o);
        }
        Ok(report)
    }

    fn record(
        &self,
        report: &mut ReplayReport,
        request: &ReplayRequest,
        plans: &[Plan],
        ctx: &MessageContext<'_>,
        o: ferrohub_rules::Output,
    ) {
        report.outputs_total += 1;
        if report.outputs.len() >= request.max_outputs {
            return;
        }
        let windowed;
        let (ctx, device) = match o.window {
            Some((start, _)) => {
                windowed = MessageContext::new(ctx.tenant, "", &o.value).at(start);
                (&windowed, String::new())
            }
            None => (ctx, ctx.device.unwrap_or_default().to_string()),
        };
        let actions = plans
            .iter()
            .map(|p| match p.render(ctx, self.lookups(), &o.value) {
                Ok(Some(job)) => job.describe(),
                Ok(None) => json!({"skipped": true}),
                Err(e) => json!({"error": e}),
            })
            .collect();
        report.outputs.push(ReplayOutput {
            timestamp_ms: ctx.timestamp_ms,
            device,
            output: o.value,
            actions,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nests_dotted_metrics_back() {
        let p = nest([
            ("temp".to_string(), json!(21)),
            ("env.h".to_string(), json!(40)),
            ("env.p.x".to_string(), json!(true)),
            ("temp.raw".to_string(), json!(7)),
        ]);
        assert_eq!(
            p,
            json!({"temp": 21, "env": {"h": 40, "p": {"x": true}}, "temp.raw": 7})
        );
    }
}
