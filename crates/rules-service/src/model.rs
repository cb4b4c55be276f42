//! What a rule is, as stored and as the API shows it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Result, RulesError};

/// Longest rule id.
pub const MAX_ID_LEN: usize = 128;
/// Most actions on one rule.
pub const MAX_ACTIONS: usize = 10;

/// What an operator writes: the SQL and what to do with its output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// The rule (`docs/rules.md`).
    pub sql: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Run for every output, each on its own queue.
    #[serde(default)]
    pub actions: Vec<ActionSpec>,
    /// Run with the error document when evaluating the rule or one of its actions fails for
    /// good (an action's dead letter).
    #[serde(default)]
    pub error_action: Option<ActionSpec>,
}

/// One action, tagged by `type`.
///
/// `device`, `topic`, `url`, header, `body`, `name`, `key` and `message` are substitution
/// templates (`${expr}`), rendered against the input message — or, for a windowed rule, against
/// its output (a window's output has no single publisher). `metrics` and `raise_when` are
/// expressions over the rule's output (field names as the SELECT gives them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ActionSpec {
    /// Publish the output through the router as the hub.
    Republish {
        /// Topic template (`alerts/${topic(2)}`).
        topic: String,
        /// 0 or 1.
        #[serde(default)]
        qos: u8,
        /// Payload template; absent: the output as JSON.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        payload: Option<String>,
    },
    /// Send the output to an HTTP endpoint.
    Webhook(WebhookSpec),
    /// Store the output (or chosen metrics of it) as telemetry of a device, at the message's
    /// time.
    StoreTelemetry {
        /// Device template (default: the publisher's device).
        #[serde(default)]
        device: Option<String>,
        /// Metric name → expression over the output; empty: every field of the output
        /// (nested objects flattened to dotted names, as device payloads are).
        #[serde(default)]
        metrics: BTreeMap<String, String>,
    },
    /// Merge the output (or a rendered patch) into a section of a device's twin.
    UpdateTwin {
        /// Device template (default: the publisher's device).
        #[serde(default)]
        device: Option<String>,
        /// `desired` (default), `reported` or `tags`.
        #[serde(default)]
        section: TwinSection,
        /// Template rendering a JSON object (a merge patch); absent: the output.
        #[serde(default)]
        patch: Option<String>,
    },
    /// Send a command to a device (queued by default: durable, delivered when it is online).
    Command {
        /// Device template (default: the publisher's device).
        #[serde(default)]
        device: Option<String>,
        /// Command name template.
        name: String,
        /// Payload template; absent: the output as JSON.
        #[serde(default)]
        payload: Option<String>,
        /// Queued (true, default) or direct (false: sent only if the device is online; the
        /// worker waits for its response).
        #[serde(default = "yes")]
        queued: bool,
        /// Lifetime of a queued command in seconds (default: the hub's `commands` setting).
        #[serde(default)]
        ttl_s: Option<u64>,
    },
    /// Raise (or clear) an alarm, deduplicated by its key.
    Alarm(AlarmSpec),
}

/// Which twin section a rule writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TwinSection {
    /// What the device should be (the device gets the delta).
    #[default]
    Desired,
    /// State derived on the device's behalf.
    Reported,
    /// Operator labels.
    Tags,
}

/// An alarm action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlarmSpec {
    /// Dedup key template (`overheat:${topic(2)}`): a raise with the key of an open alarm
    /// updates it instead of opening another.
    pub key: String,
    /// `critical`, `major` (default), `minor`, `warning` or `info`.
    #[serde(default = "default_severity")]
    pub severity: String,
    /// Message template (default: the rule id and the output).
    #[serde(default)]
    pub message: Option<String>,
    /// Device template (default: the publisher's device, if any).
    #[serde(default)]
    pub device: Option<String>,
    /// Expression over the output: true raises, false clears (one rule both raises and clears,
    /// e.g. `"raise_when": "temp > 80"`). Absent: every output raises.
    #[serde(default)]
    pub raise_when: Option<String>,
    /// Clear the alarm with this key instead of raising it.
    #[serde(default)]
    pub clear: bool,
}

/// Alarm severities, most severe first.
pub const SEVERITIES: [&str; 5] = ["critical", "major", "minor", "warning", "info"];

fn default_severity() -> String {
    "major".into()
}
fn yes() -> bool {
    true
}

/// An HTTP action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    /// `http://` or `https://` URL (a template).
    pub url: String,
    /// HTTP method (default POST).
    #[serde(default = "default_method")]
    pub method: String,
    /// Header templates.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Body template; absent: the output as JSON.
    #[serde(default)]
    pub body: Option<String>,
    /// Attempts before the message becomes a dead letter (1..=20, default 3).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Per-attempt timeout in milliseconds (default 5000).
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// First back-off in milliseconds, doubled per attempt with jitter (default 200).
    #[serde(default = "default_backoff")]
    pub backoff_ms: u64,
}

fn default_method() -> String {
    "POST".into()
}
fn default_attempts() -> u32 {
    3
}
fn default_timeout() -> u64 {
    5000
}
fn default_backoff() -> u64 {
    200
}

/// A rule as stored: the spec with its identity, version and state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRule {
    /// Tenant.
    pub tenant: String,
    /// Id, unique in the tenant.
    pub id: String,
    /// 1 at creation, +1 per update or enable/disable.
    pub version: u64,
    /// Whether it runs.
    pub enabled: bool,
    /// Creation time, Unix ms.
    pub created_ms: i64,
    /// Last change, Unix ms.
    pub updated_ms: i64,
    /// The rule.
    #[serde(flatten)]
    pub spec: RuleSpec,
}

/// Checks a rule id: 1..=128 of `[A-Za-z0-9_.-]`.
pub fn validate_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > MAX_ID_LEN
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(RulesError::Invalid(format!(
            "rule id `{id}` must be 1 to {MAX_ID_LEN} characters of letters, digits, `_`, `-`, `.`"
        )));
    }
    Ok(())
}

impl ActionSpec {
    /// Checks what can be checked without running it.
    pub fn validate(&self) -> Result<()> {
        match self {
            ActionSpec::Republish {
                topic,
                qos,
                payload,
            } => {
                if *qos > 1 {
                    return Err(RulesError::Invalid("republish qos must be 0 or 1".into()));
                }
                crate::template::Template::parse(topic)?;
                parse_opt(payload)?;
            }
            ActionSpec::Webhook(w) => {
                if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                    return Err(RulesError::Invalid(format!(
                        "webhook url `{}` must start with http:// or https://",
                        w.url
                    )));
                }
                crate::template::Template::parse(&w.url)?;
                if reqwest::Method::from_bytes(w.method.as_bytes()).is_err() {
                    return Err(RulesError::Invalid(format!(
                        "webhook method `{}` is not an HTTP method",
                        w.method
                    )));
                }
                for (name, value) in &w.headers {
                    if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                        return Err(RulesError::Invalid(format!(
                            "webhook header name `{name}` is not valid"
                        )));
                    }
                    crate::template::Template::parse(value)?;
                }
                if let Some(b) = &w.body {
                    crate::template::Template::parse(b)?;
                }
                if !(1..=20).contains(&w.max_attempts) {
                    return Err(RulesError::Invalid(
                        "webhook max_attempts must be 1 to 20".into(),
                    ));
                }
                if !(1..=60_000).contains(&w.timeout_ms) {
                    return Err(RulesError::Invalid(
                        "webhook timeout_ms must be 1 to 60000".into(),
                    ));
                }
                if w.backoff_ms > 60_000 {
                    return Err(RulesError::Invalid(
                        "webhook backoff_ms must be at most 60000".into(),
                    ));
                }
            }
            ActionSpec::StoreTelemetry { device, metrics } => {
                parse_opt(device)?;
                for (name, expr) in metrics {
                    if name.is_empty() || name.len() > 256 {
                        return Err(RulesError::Invalid(format!(
                            "store_telemetry metric name `{name}` must be 1 to 256 characters"
                        )));
                    }
                    crate::template::Expression::parse(expr)?;
                }
            }
            ActionSpec::UpdateTwin { device, patch, .. } => {
                parse_opt(device)?;
                parse_opt(patch)?;
            }
            ActionSpec::Command {
                device,
                name,
                payload,
                ttl_s,
                ..
            } => {
                parse_opt(device)?;
                crate::template::Template::parse(name)?;
                parse_opt(payload)?;
                if *ttl_s == Some(0) {
                    return Err(RulesError::Invalid(
                        "command ttl_s must be at least 1".into(),
                    ));
                }
            }
            ActionSpec::Alarm(a) => {
                crate::template::Template::parse(&a.key)?;
                parse_opt(&a.message)?;
                parse_opt(&a.device)?;
                if !SEVERITIES.contains(&a.severity.as_str()) {
                    return Err(RulesError::Invalid(format!(
                        "alarm severity `{}` must be one of {}",
                        a.severity,
                        SEVERITIES.join(", ")
                    )));
                }
                if let Some(w) = &a.raise_when {
                    if a.clear {
                        return Err(RulesError::Invalid(
                            "an alarm action has `raise_when` or `clear`, not both".into(),
                        ));
                    }
                    crate::template::Expression::parse(w)?;
                }
            }
        }
        Ok(())
    }
}

fn parse_opt(template: &Option<String>) -> Result<()> {
    if let Some(t) = template {
        crate::template::Template::parse(t)?;
    }
    Ok(())
}

impl ActionSpec {
    /// The action's kind as its `type` tag.
    pub fn kind(&self) -> &'static str {
        match self {
            ActionSpec::Republish { .. } => "republish",
            ActionSpec::Webhook(_) => "webhook",
            ActionSpec::StoreTelemetry { .. } => "store_telemetry",
            ActionSpec::UpdateTwin { .. } => "update_twin",
            ActionSpec::Command { .. } => "command",
            ActionSpec::Alarm(_) => "alarm",
        }
    }
}

impl RuleSpec {
    /// Compiles the SQL and checks the actions.
    pub fn validate(&self) -> Result<std::sync::Arc<ferrohub_rules::CompiledRule>> {
        let compiled = ferrohub_rules::Rule::compile(&self.sql)?;
        if self.actions.len() > MAX_ACTIONS {
            return Err(RulesError::Invalid(format!(
                "a rule has at most {MAX_ACTIONS} actions"
            )));
        }
        for a in self.actions.iter().chain(self.error_action.as_ref()) {
            a.validate()?;
        }
        Ok(std::sync::Arc::new(compiled))
    }
}
