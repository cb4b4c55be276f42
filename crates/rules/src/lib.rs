//! `ferrohub-rules` owns one thing: the rule language. It compiles AWS IoT SQL-compatible rules
//! (`SELECT … FROM '<topic filter>' [WHERE …] [GROUP BY …] [WINDOW …]`) once and evaluates them
//! against messages, with AWS semantics (`Undefined` distinct from `Null`, coercions), built-in
//! functions, per-key state (windows, `lag`, `delta`, anomaly scores) and lookups of twins and
//! registry data through the [`Lookup`] trait. No I/O, no runtime: the hub wires it to the
//! router and to actions.
//!
//! ```
//! use ferrohub_rules::{MessageContext, NoLookup, Rule};
//!
//! let rule = Rule::compile("SELECT temperature AS t, topic(2) AS device FROM 'devices/+/telemetry' WHERE temperature > 30").unwrap();
//! let payload = serde_json::json!({"temperature": 31.5});
//! let msg = MessageContext::new("acme", "devices/d1/telemetry", &payload);
//! assert!(rule.matches_topic(msg.topic));
//! let out = rule.evaluate(&msg, &NoLookup).unwrap();
//! assert_eq!(out, Some(serde_json::json!({"t": 31.5, "device": "d1"})));
//! ```
//!
//! The language reference is `docs/rules.md`.

mod compile;
mod error;
mod eval;
mod functions;
mod set;
mod state;
mod syntax;
mod value;

pub use compile::{CompiledRule, Rule, Window, function_names};
pub use error::{EvalError, RuleError};
pub use eval::LookupKind;
pub use set::RuleSet;
pub use state::{Output, RuleRunner, RunnerLimits, RunnerStats};
pub use syntax::Pos;
pub use value::Val;

/// One message as rules see it. The payload is parsed once by the caller and shared by every rule.
#[derive(Debug, Clone, Copy)]
pub struct MessageContext<'a> {
    /// Tenant of the message (`tenant()`; lookups are scoped by it).
    pub tenant: &'a str,
    /// Topic the message was published on (`topic()`, `topic(n)`, FROM matching).
    pub topic: &'a str,
    /// MQTT client id of the publisher (`clientid()`).
    pub client_id: &'a str,
    /// Authenticated identity of the publisher (`principal()`).
    pub principal: &'a str,
    /// Registry device id of the publisher, if known (`twin()` / `device()` without argument;
    /// falls back to the client id).
    pub device: Option<&'a str>,
    /// Message time, Unix milliseconds (`timestamp()`, windows, `rate_of_change`).
    pub timestamp_ms: i64,
    /// The payload as JSON (`Null` for a payload that is not JSON).
    pub payload: &'a serde_json::Value,
}

impl<'a> MessageContext<'a> {
    /// A context with empty client id and principal, no device, at time 0.
    pub fn new(
        tenant: &'a str,
        topic: &'a str,
        payload: &'a serde_json::Value,
    ) -> MessageContext<'a> {
        MessageContext {
            tenant,
            topic,
            client_id: "",
            principal: "",
            device: None,
            timestamp_ms: 0,
            payload,
        }
    }

    /// The same message at `timestamp_ms`.
    pub fn at(self, timestamp_ms: i64) -> MessageContext<'a> {
        MessageContext {
            timestamp_ms,
            ..self
        }
    }
}

/// Read access to device twins and registry records, scoped by tenant. The hub implements it
/// over `twins` and `registry`; tests use a map.
pub trait Lookup {
    /// The twin document of `device` (`twin(id).reported.x`), if any.
    fn twin(&self, tenant: &str, device: &str) -> Option<serde_json::Value>;
    /// The registry record of `device` (tags, attributes: `device(id).tags.site`), if any.
    fn device(&self, tenant: &str, device: &str) -> Option<serde_json::Value>;
}

/// A [`Lookup`] that finds nothing (`twin(…)` and `device(…)` are `Undefined`).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLookup;

impl Lookup for NoLookup {
    fn twin(&self, _: &str, _: &str) -> Option<serde_json::Value> {
        None
    }
    fn device(&self, _: &str, _: &str) -> Option<serde_json::Value> {
        None
    }
}

/// Parses a raw payload for [`MessageContext::payload`]: JSON, or `Null` when it is not JSON.
pub fn parse_payload(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or(serde_json::Value::Null)
}
