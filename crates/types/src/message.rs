use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{QoS, TopicName, UnixMillis};

/// A user property: a name/value pair carried by MQTT 5 packets.
pub type UserProperty = (Arc<str>, Arc<str>);

/// Application properties of a message that travel with it from publisher to subscribers
/// (the MQTT 5 PUBLISH properties the broker must forward unaltered).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageProperties {
    /// Payload Format Indicator: `true` when the payload is UTF-8 text.
    pub payload_is_utf8: bool,
    /// Absolute expiry, from the publisher's Message Expiry Interval.
    pub expires_at: Option<UnixMillis>,
    /// Content Type (a MIME type, by convention).
    pub content_type: Option<Arc<str>>,
    /// Response Topic for request/response.
    pub response_topic: Option<Arc<str>>,
    /// Correlation Data for request/response.
    pub correlation_data: Option<Bytes>,
    /// User properties, in order.
    pub user_properties: Vec<UserProperty>,
}

impl MessageProperties {
    /// True when no property is set (so that nothing needs to be stored or sent).
    pub fn is_empty(&self) -> bool {
        !self.payload_is_utf8
            && self.expires_at.is_none()
            && self.content_type.is_none()
            && self.response_topic.is_none()
            && self.correlation_data.is_none()
            && self.user_properties.is_empty()
    }
}

/// A message in flight through the hub: what was published, shared (by `Arc`) by every
/// subscriber it is delivered to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Topic it was published to.
    pub topic: TopicName,
    /// The payload bytes, never copied on fan-out.
    pub payload: Bytes,
    /// The QoS it was published with (deliveries are downgraded to the subscription's QoS).
    pub qos: QoS,
    /// The publisher's retain flag.
    pub retain: bool,
    /// When the hub received it.
    pub received_at: UnixMillis,
    /// MQTT 5 properties; `None` for the common case of none, to keep messages small.
    pub properties: Option<Arc<MessageProperties>>,
}

impl Message {
    /// True when the message has a Message Expiry Interval that has passed at `now`.
    pub fn is_expired(&self, now: UnixMillis) -> bool {
        matches!(self.properties.as_deref(), Some(MessageProperties { expires_at: Some(t), .. }) if *t <= now)
    }

    /// Remaining lifetime in whole seconds (rounded up), to forward as Message Expiry Interval.
    pub fn remaining_expiry_secs(&self, now: UnixMillis) -> Option<u32> {
        let at = self.properties.as_deref()?.expires_at?;
        let remaining = at.saturating_sub(now);
        Some(u32::try_from(remaining.div_ceil(1000)).unwrap_or(u32::MAX))
    }
}
