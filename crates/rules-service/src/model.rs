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

/// One action. Tagged by `type`; more kinds (store as telemetry, update a twin, send a command,
/// alarms) are added as variants.
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
    },
    /// Send the output to an HTTP endpoint.
    Webhook(WebhookSpec),
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
            ActionSpec::Republish { topic, qos } => {
                if *qos > 1 {
                    return Err(RulesError::Invalid("republish qos must be 0 or 1".into()));
                }
                crate::template::Template::parse(topic)?;
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
        }
        Ok(())
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
