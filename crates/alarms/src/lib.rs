//! `ferrohub-alarms`: alarms raised by rules or the API, with a severity, a dedup key and a
//! lifecycle (`active` → `acknowledged` → `cleared`), history, event streams, and notifications
//! through webhook channels (minijinja templates, per-alarm rate limits, one bounded delivery
//! queue with retries). See `docs/alarms.md`.
//!
//! - [`model`]: alarms, events, channels, deliveries.
//! - [`store`]: the [`AlarmStore`] trait and its SQLite implementation (`data/alarms.db`).
//! - [`service`]: [`AlarmService`], what the API and the rules service call.
//! - [`notify`]: channels, the delivery queue and its workers.

pub mod error;
pub mod model;
pub mod notify;
pub mod service;
pub mod store;

pub use error::{AlarmError, Result};
pub use model::{
    Alarm, AlarmCounts, AlarmEvent, AlarmPage, AlarmQuery, AlarmState, Channel, ChannelKind,
    ChannelSpec, Delivery, DeliveryStatus, EventKind, RaiseAlarm, Severity, StateFilter,
    WebhookChannel,
};
pub use notify::ChannelDeliveries;
pub use service::{AlarmService, AlarmSubscription, AlarmsConfig, StreamItem};
pub use store::{AlarmStore, SqliteAlarmStore};
