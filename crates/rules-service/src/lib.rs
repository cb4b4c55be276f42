//! `ferrohub-rules-service`: rules running inside the hub. The rule language itself is
//! `ferrohub-rules` (no I/O); this crate adds what needs I/O — the rules store, substitution
//! templates for actions, and (wired by the binary) evaluation fed by the router and actions
//! with bounded queues. It knows nothing of MQTT adapters: the binary implements its traits
//! over the broker.

pub mod egress;
pub mod error;
mod lookup;
pub mod model;
pub mod store;
pub mod template;

pub use error::{Result, RulesError};
pub use model::{ActionSpec, AlarmSpec, RuleSpec, StoredRule, TwinSection, WebhookSpec};
pub use store::{RuleStore, SqliteRuleStore};
pub use template::Template;
pub mod actions;
pub mod replay;
pub mod service;
pub mod stats;

pub use actions::{ActionError, AlarmRequest, CommandRequest, DeadLetter, HubLink, Job};
pub use replay::{ReplayMessage, ReplayReport, ReplayRequest};
pub use service::{DryRun, Inbound, RulesConfig, RulesService, Sample};
pub use stats::RuleStats;
