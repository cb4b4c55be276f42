//! `/tenants/{tenant}/devices/{device}/messages/stream`: a live tail of one device's MQTT
//! traffic (what it publishes and what is delivered to it) as Server-Sent Events.
//!
//! Bounded: the broker keeps at most 64 watchers per hub (more: 429), each with a queue of
//! `capacity` messages; messages that do not fit are skipped and the next event says how many.
//! Every stream ends when the server shuts down ([`crate::Closing`]).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use base64::Engine as _;
use ferrohub_registry::model::Role;
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult, CommonErrors};
use crate::extract::{ApiPath, ApiQuery, Caller};
use crate::{ApiState, Closing, TailMessage, TailRefused};

/// Default queue of a tail (messages).
pub const DEFAULT_TAIL_CAPACITY: usize = 256;
/// Largest queue a tail may ask for.
pub const MAX_TAIL_CAPACITY: usize = 4096;

/// Query of a message tail.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TailParams {
    /// Messages the tail's queue holds, 1 to 4096 (default 256); beyond that they are skipped
    /// and counted.
    pub capacity: Option<usize>,
}

/// One message of a device, as a `message` event of the tail.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TailEvent {
    /// `in`: published by the device; `out`: delivered to it.
    pub direction: String,
    /// The topic.
    pub topic: String,
    /// QoS 0, 1 or 2.
    pub qos: u8,
    /// The retain flag.
    pub retain: bool,
    /// When (ms since the epoch).
    pub at: u64,
    /// The payload's full size in bytes.
    pub size: usize,
    /// The payload was cut to its first 4 KiB.
    pub truncated: bool,
    /// The payload: UTF-8 text, or base64 when `base64` is true.
    pub payload: String,
    /// The payload is not UTF-8 and is given in base64.
    pub base64: bool,
    /// Messages skipped since the previous event (the tail's queue was full).
    pub skipped: u64,
}

impl From<TailMessage> for TailEvent {
    fn from(m: TailMessage) -> TailEvent {
        let truncated = m.payload.len() < m.size;
        let text = match std::str::from_utf8(&m.payload) {
            Ok(s) => Some(s.to_string()),
            // A cut inside a multi-byte character still shows as text.
            Err(e) if truncated && e.error_len().is_none() => {
                std::str::from_utf8(&m.payload[..e.valid_up_to()])
                    .ok()
                    .map(str::to_string)
            }
            Err(_) => None,
        };
        let (payload, base64) = match text {
            Some(s) => (s, false),
            None => (
                base64::engine::general_purpose::STANDARD.encode(&m.payload),
                true,
            ),
        };
        TailEvent {
            direction: if m.inbound { "in" } else { "out" }.to_string(),
            topic: m.topic.to_string(),
            qos: m.qos,
            retain: m.retain,
            at: m.at,
            size: m.size,
            truncated,
            payload,
            base64,
            skipped: m.skipped_before,
        }
    }
}

/// A live tail of a device's MQTT messages as Server-Sent Events (viewer): a `ready` event once
/// the watch is in place, then a `message` event (data: [`TailEvent`]) for every PUBLISH the
/// device sends and every message delivered to it. A registered device is matched on the device
/// it authenticated as, whatever its client id. The stream ends when the hub shuts down. At most
/// 64 tails are open per hub (429 `too_many_streams`).
#[utoipa::path(get, path = "/tenants/{tenant}/devices/{device}/messages/stream", tag = "devices",
    params(("tenant" = String, Path, description = "Tenant id"),
           ("device" = String, Path, description = "Device id"), TailParams),
    responses(
        (status = 200, description = "`text/event-stream` of `ready` and `message` events (data of `message`: TailEvent)", content_type = "text/event-stream", body = String),
        (status = 429, description = "Too many open message tails", body = crate::error::ErrorBody),
        CommonErrors))]
pub async fn device_message_stream(
    c: Caller,
    State(state): State<ApiState>,
    closing: Option<Extension<Closing>>,
    ApiPath((tenant, device)): ApiPath<(String, String)>,
    ApiQuery(p): ApiQuery<TailParams>,
) -> ApiResult<Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>>> {
    c.actor.require(Role::Viewer, Some(&tenant))?;
    let capacity = p.capacity.unwrap_or(DEFAULT_TAIL_CAPACITY);
    if !(1..=MAX_TAIL_CAPACITY).contains(&capacity) {
        return Err(ApiError::invalid(format!(
            "capacity={capacity}: give the tail's queue length, 1 to {MAX_TAIL_CAPACITY}"
        )));
    }
    // 404 for an unknown device (and another tenant's, which the registry hides the same way).
    c.registry.device(&c.actor, &tenant, &device).await?;
    let tails = state.tails.clone().ok_or_else(ApiError::unavailable)?;
    let messages =
        tails
            .watch(&tenant, &device, capacity)
            .map_err(|TailRefused::TooMany(max)| {
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_streams",
                    format!("{max} message tails are open in this hub; close one and retry"),
                )
            })?;
    let closing = Box::pin(async move {
        match closing {
            Some(Extension(c)) => c.wait().await,
            None => std::future::pending().await,
        }
    });
    let ready = serde_json::json!({ "tenant": tenant, "device": device, "capacity": capacity });
    let first = futures_util::stream::once(async move {
        Ok(Event::default().event("ready").data(ready.to_string()))
    });
    let events = messages
        .map(|m| {
            let event = serde_json::to_string(&TailEvent::from(m))
                .map(|data| Event::default().event("message").data(data))
                .unwrap_or_else(|_| Event::default().comment("unserialisable"));
            Ok(event)
        })
        .take_until(closing);
    Ok(
        Sse::new(first.chain(events))
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15))),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn message(payload: &'static [u8], size: usize) -> TailMessage {
        TailMessage {
            topic: "t".into(),
            payload: axum::body::Bytes::from_static(payload),
            size,
            qos: 1,
            retain: false,
            inbound: true,
            at: 1,
            skipped_before: 2,
        }
    }

    #[test]
    fn text_stays_text_binary_becomes_base64_and_a_cut_character_is_dropped() {
        let e = TailEvent::from(message(b"{\"t\":1}", 7));
        assert_eq!(
            (e.payload.as_str(), e.base64, e.truncated),
            ("{\"t\":1}", false, false)
        );
        assert_eq!(e.skipped, 2);
        let e = TailEvent::from(message(&[0xff, 0x00, 0x10], 3));
        assert_eq!((e.payload.as_str(), e.base64), ("/wAQ", true));
        // "é" is 0xc3 0xa9; the cap cut it after its first byte.
        let e = TailEvent::from(message(b"ab\xc3", 10));
        assert_eq!(
            (e.payload.as_str(), e.base64, e.truncated),
            ("ab", false, true)
        );
    }
}
