//! The alarm model: [`Alarm`], its history rows ([`AlarmEvent`]), what raises one
//! ([`RaiseAlarm`]), list queries, and notification channels ([`Channel`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::error::AlarmError;

/// How bad an alarm is; ordered (`Info` < … < `Critical`), so a re-raise can escalate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// For information.
    Info,
    /// Something to watch.
    Warning,
    /// Degraded.
    Minor,
    /// Needs attention soon.
    Major,
    /// Needs attention now.
    Critical,
}

impl Severity {
    /// Every severity, highest first.
    pub const ALL: [Severity; 5] = [
        Severity::Critical,
        Severity::Major,
        Severity::Minor,
        Severity::Warning,
        Severity::Info,
    ];

    /// The name used in JSON and queries.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Minor => "minor",
            Severity::Major => "major",
            Severity::Critical => "critical",
        }
    }

    /// Stored rank (1 = info … 5 = critical).
    pub fn rank(self) -> i64 {
        self as i64 + 1
    }

    /// From a stored rank.
    pub fn from_rank(rank: i64) -> Option<Severity> {
        Severity::ALL.into_iter().find(|s| s.rank() == rank)
    }

    /// From its name.
    pub fn parse(s: &str) -> Result<Severity, AlarmError> {
        Severity::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| {
                AlarmError::Invalid(format!(
                    "severity `{s}`: use critical, major, minor, warning or info"
                ))
            })
    }
}

/// Where an alarm is in its lifecycle: `active` → `acknowledged` → `cleared` (an active alarm
/// may also be cleared directly). A cleared alarm is closed for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlarmState {
    /// Raised, nobody has acknowledged it.
    Active,
    /// Someone is on it.
    Acknowledged,
    /// Over.
    Cleared,
}

impl AlarmState {
    /// The name used in JSON, queries and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            AlarmState::Active => "active",
            AlarmState::Acknowledged => "acknowledged",
            AlarmState::Cleared => "cleared",
        }
    }

    /// From its name.
    pub fn parse(s: &str) -> Result<AlarmState, AlarmError> {
        match s {
            "active" => Ok(AlarmState::Active),
            "acknowledged" => Ok(AlarmState::Acknowledged),
            "cleared" => Ok(AlarmState::Cleared),
            _ => Err(AlarmError::Invalid(format!(
                "state `{s}`: use active, acknowledged, cleared or open (not cleared)"
            ))),
        }
    }
}

/// One alarm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alarm {
    /// Tenant.
    pub tenant: String,
    /// ULID (sorts by creation time).
    pub id: String,
    /// Dedup key: raising a key that has a not-cleared alarm folds into it.
    pub key: String,
    /// Severity (the highest it was raised with while open).
    pub severity: Severity,
    /// Lifecycle state.
    pub state: AlarmState,
    /// The device concerned, if any.
    pub device: Option<String>,
    /// What happened (the latest raise's).
    pub message: String,
    /// Free details (the latest raise's).
    pub details: Json,
    /// `api` or `rule:<id>`.
    pub source: String,
    /// Raises folded into it (1 for a new alarm).
    pub count: u64,
    /// Unix ms.
    pub created_ms: i64,
    /// Last change of any kind, Unix ms.
    pub updated_ms: i64,
    /// Last raise, Unix ms.
    pub last_raised_ms: i64,
    /// When it was acknowledged.
    pub acknowledged_ms: Option<i64>,
    /// Who acknowledged it.
    pub acknowledged_by: Option<String>,
    /// When it was cleared.
    pub cleared_ms: Option<i64>,
    /// Who cleared it.
    pub cleared_by: Option<String>,
}

/// What an [`AlarmEvent`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A new alarm.
    Raised,
    /// A raise folded into an open alarm (re-raised, maybe escalated).
    Updated,
    /// Acknowledged.
    Acknowledged,
    /// Cleared.
    Cleared,
}

impl EventKind {
    /// Every kind.
    pub const ALL: [EventKind; 4] = [
        EventKind::Raised,
        EventKind::Updated,
        EventKind::Acknowledged,
        EventKind::Cleared,
    ];

    /// The name used in JSON and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Raised => "raised",
            EventKind::Updated => "updated",
            EventKind::Acknowledged => "acknowledged",
            EventKind::Cleared => "cleared",
        }
    }

    /// From its name.
    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A history row of an alarm (and what streams and notifications carry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlarmEvent {
    /// Store-wide sequence number (increasing).
    pub seq: i64,
    /// What happened.
    pub kind: EventKind,
    /// The alarm as it was right after.
    pub alarm: Alarm,
    /// Unix ms.
    pub at_ms: i64,
    /// Who: `api`/`rule:<id>` for raises, the token for acknowledge/clear.
    pub by: String,
    /// A note given with acknowledge/clear.
    pub note: Option<String>,
}

/// What raises an alarm (the rules service and the API).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RaiseAlarm {
    /// Dedup key (1 to 256 characters), e.g. `overheat:dev-1`.
    pub key: String,
    /// Severity.
    pub severity: Severity,
    /// The device concerned.
    pub device: Option<String>,
    /// What happened (at most 4 KiB).
    pub message: String,
    /// Free details (at most 16 KiB as JSON).
    pub details: Json,
    /// `api` or `rule:<id>`.
    pub source: String,
}

/// Longest key, in characters.
pub const MAX_KEY_CHARS: usize = 256;
/// Longest message, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024;
/// Largest details, in bytes of JSON.
pub const MAX_DETAILS_BYTES: usize = 16 * 1024;
/// Longest note, in bytes.
pub const MAX_NOTE_BYTES: usize = 4 * 1024;

impl RaiseAlarm {
    /// Checks the bounds.
    pub fn validate(&self) -> Result<(), AlarmError> {
        let chars = self.key.chars().count();
        if chars == 0 || chars > MAX_KEY_CHARS {
            return Err(AlarmError::Invalid(format!(
                "key: give 1 to {MAX_KEY_CHARS} characters (got {chars})"
            )));
        }
        if self.key.chars().any(char::is_control) {
            return Err(AlarmError::Invalid(
                "key: control characters are not allowed".into(),
            ));
        }
        if self.message.len() > MAX_MESSAGE_BYTES {
            return Err(AlarmError::Invalid(format!(
                "message: at most {MAX_MESSAGE_BYTES} bytes (got {})",
                self.message.len()
            )));
        }
        let details = serde_json::to_string(&self.details).map_or(usize::MAX, |s| s.len());
        if details > MAX_DETAILS_BYTES {
            return Err(AlarmError::Invalid(format!(
                "details: at most {MAX_DETAILS_BYTES} bytes of JSON (got {details})"
            )));
        }
        if let Some(d) = &self.device
            && (d.is_empty() || d.len() > 256)
        {
            return Err(AlarmError::Invalid(
                "device: give 1 to 256 bytes, or leave it out".into(),
            ));
        }
        if self.source.is_empty() || self.source.len() > 256 {
            return Err(AlarmError::Invalid("source: give 1 to 256 bytes".into()));
        }
        Ok(())
    }
}

/// Checks a note of acknowledge/clear.
pub fn validate_note(note: Option<&str>) -> Result<(), AlarmError> {
    match note {
        Some(n) if n.len() > MAX_NOTE_BYTES => Err(AlarmError::Invalid(format!(
            "note: at most {MAX_NOTE_BYTES} bytes"
        ))),
        _ => Ok(()),
    }
}

/// A state filter of a list query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFilter {
    /// Exactly this state.
    Is(AlarmState),
    /// Active or acknowledged.
    Open,
}

impl StateFilter {
    /// `active`, `acknowledged`, `cleared` or `open`.
    pub fn parse(s: &str) -> Result<StateFilter, AlarmError> {
        if s == "open" {
            Ok(StateFilter::Open)
        } else {
            AlarmState::parse(s).map(StateFilter::Is)
        }
    }
}

/// A list query; every filter is optional. Newest first (by creation).
#[derive(Debug, Clone, Default)]
pub struct AlarmQuery {
    /// State.
    pub state: Option<StateFilter>,
    /// Exactly this severity.
    pub severity: Option<Severity>,
    /// Device.
    pub device: Option<String>,
    /// Dedup key.
    pub key: Option<String>,
    /// Created at or after, Unix ms.
    pub since_ms: Option<i64>,
    /// Created before, Unix ms.
    pub until_ms: Option<i64>,
    /// At most this many (1 to 1000; default 100).
    pub limit: Option<usize>,
    /// From a previous page's `next_cursor`.
    pub cursor: Option<String>,
}

/// Largest page.
pub const MAX_PAGE: usize = 1000;

/// A page of alarms.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AlarmPage {
    /// The alarms, newest first.
    pub items: Vec<Alarm>,
    /// Give it as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Open (not cleared) alarms of a tenant by severity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlarmCounts {
    /// Critical.
    pub critical: u64,
    /// Major.
    pub major: u64,
    /// Minor.
    pub minor: u64,
    /// Warning.
    pub warning: u64,
    /// Info.
    pub info: u64,
    /// All open alarms.
    pub total: u64,
    /// Of those, not acknowledged yet.
    pub unacknowledged: u64,
}

impl AlarmCounts {
    /// Adds `n` open alarms of `severity` (`acknowledged` or not).
    pub fn add(&mut self, severity: Severity, acknowledged: bool, n: u64) {
        let slot = match severity {
            Severity::Critical => &mut self.critical,
            Severity::Major => &mut self.major,
            Severity::Minor => &mut self.minor,
            Severity::Warning => &mut self.warning,
            Severity::Info => &mut self.info,
        };
        *slot += n;
        self.total += n;
        if !acknowledged {
            self.unacknowledged += n;
        }
    }
}

/// A webhook channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookChannel {
    /// URL template (rendered, then must be http or https).
    pub url: String,
    /// `POST` (default), `PUT`, `PATCH` or `GET`.
    #[serde(default = "default_method")]
    pub method: String,
    /// Header name → value template.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Body template; absent: `{"alarm": …, "event": …}` as JSON.
    #[serde(default)]
    pub body: Option<String>,
    /// Per-attempt timeout, 1 ms to 60 s (default 5 s).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Attempts before a delivery is recorded as failed, 1 to 10 (default 5).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First back-off, doubled per attempt with ±50 % jitter, at most 30 s (default 500 ms).
    #[serde(default = "default_backoff_ms")]
    pub backoff_ms: u64,
}

fn default_method() -> String {
    "POST".into()
}
fn default_timeout_ms() -> u64 {
    5_000
}
fn default_max_attempts() -> u32 {
    5
}
fn default_backoff_ms() -> u64 {
    500
}

/// How a channel notifies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ChannelKind {
    /// An HTTP request.
    Webhook(WebhookChannel),
}

/// A notification channel of a tenant, as saved (`PUT …/alarm-channels/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSpec {
    /// How it notifies.
    pub kind: ChannelKind,
    /// Only alarms at least this severe (default `info`: all).
    #[serde(default = "default_min_severity")]
    pub min_severity: Severity,
    /// Which events (default: all four).
    #[serde(default = "default_events")]
    pub events: Vec<EventKind>,
    /// Per alarm: at most one `raised`/`updated` notification per alarm in this many seconds
    /// (0: no limit); the rest are suppressed (counted). Acknowledge and clear always notify.
    #[serde(default)]
    pub rate_limit_s: u64,
    /// Whether it notifies (default true).
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Free description.
    #[serde(default)]
    pub description: String,
}

fn default_min_severity() -> Severity {
    Severity::Info
}
fn default_events() -> Vec<EventKind> {
    EventKind::ALL.to_vec()
}
fn default_enabled() -> bool {
    true
}

/// A saved channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Channel {
    /// Tenant.
    pub tenant: String,
    /// Id (letters, digits, `_`, `-`, `.`; at most 128).
    pub id: String,
    /// The spec.
    #[serde(flatten)]
    pub spec: ChannelSpec,
    /// Last saved, Unix ms.
    pub updated_ms: i64,
}

/// Checks a channel id.
pub fn validate_channel_id(id: &str) -> Result<(), AlarmError> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(AlarmError::Invalid(format!(
            "channel id `{id}`: use 1 to 128 letters, digits, `_`, `-` or `.`"
        )));
    }
    Ok(())
}

/// Outcome of one notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// A 2xx answer.
    Sent,
    /// Gave up (attempts exhausted, a non-retryable answer, queue full, template error).
    Failed,
}

/// One notification's outcome (the last ones per channel are kept in memory).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// When it finished, Unix ms.
    pub at_ms: i64,
    /// The alarm.
    pub alarm_id: String,
    /// The event.
    pub event: EventKind,
    /// Sent or failed.
    pub status: DeliveryStatus,
    /// Attempts made (0: never sent, e.g. queue full).
    pub attempts: u32,
    /// HTTP status of the last answer.
    pub http_status: Option<u16>,
    /// The last error.
    pub error: Option<String>,
    /// Whether it was a test (`POST …/test`).
    #[serde(default)]
    pub test: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn severity_order_and_names() {
        assert!(Severity::Critical > Severity::Major);
        assert!(Severity::Warning > Severity::Info);
        for s in Severity::ALL {
            assert_eq!(Severity::from_rank(s.rank()), Some(s));
            assert_eq!(Severity::parse(s.as_str()).ok(), Some(s));
        }
        assert!(Severity::parse("urgent").is_err());
    }

    #[test]
    fn raise_bounds() {
        let ok = RaiseAlarm {
            key: "k".into(),
            severity: Severity::Major,
            device: None,
            message: "m".into(),
            details: Json::Null,
            source: "api".into(),
        };
        assert!(ok.validate().is_ok());
        let mut r = ok.clone();
        r.key = String::new();
        assert!(r.validate().is_err());
        r.key = "é".repeat(256);
        assert!(r.validate().is_ok(), "256 characters, not bytes");
        r.key.push('x');
        assert!(r.validate().is_err());
        let mut r = ok.clone();
        r.message = "x".repeat(MAX_MESSAGE_BYTES + 1);
        assert!(r.validate().is_err());
        let mut r = ok;
        r.details = Json::String("x".repeat(MAX_DETAILS_BYTES));
        assert!(r.validate().is_err());
    }

    #[test]
    fn channel_spec_defaults_and_shape() {
        let spec: ChannelSpec =
            serde_json::from_value(serde_json::json!({"kind": {"webhook": {"url": "http://x/"}}}))
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(spec.events.len(), 4);
        assert_eq!(spec.min_severity, Severity::Info);
        assert!(spec.enabled);
        let ChannelKind::Webhook(w) = &spec.kind;
        assert_eq!((w.method.as_str(), w.max_attempts), ("POST", 5));
        assert!(
            serde_json::from_value::<ChannelSpec>(
                serde_json::json!({"kind": {"webhook": {"url": "http://x/"}}, "typo": 1})
            )
            .is_err()
        );
    }
}
