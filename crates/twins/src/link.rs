//! How the twin and command services reach devices: the binary implements [`DeviceLink`] over the
//! MQTT broker (services never depend on an adapter).

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use ferrohub_types::MessageProperties;

/// A boxed future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What became of a publication to a device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivery {
    /// A subscription matched (the device listens on that topic).
    pub matched: bool,
    /// The device's queue refused it (full).
    pub refused: bool,
}

/// The services' way to devices.
pub trait DeviceLink: Send + Sync + 'static {
    /// Publishes `payload` on `topic` in `tenant` (QoS 1, so that a persistent session keeps it
    /// while the device is away), with MQTT 5 properties for v5 subscribers.
    fn publish<'a>(
        &'a self,
        tenant: &'a str,
        topic: String,
        payload: Bytes,
        properties: Option<MessageProperties>,
    ) -> BoxFuture<'a, Delivery>;

    /// Whether the device has a live connection now.
    fn is_online(&self, tenant: &str, device: &str) -> bool;

    /// Whether anyone subscribes to `topic` (so that costly optional messages, like a twin's
    /// `documents`, are built only when someone listens).
    fn has_subscribers(&self, tenant: &str, topic: &str) -> bool {
        let _ = (tenant, topic);
        true
    }
}
