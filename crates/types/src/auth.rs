//! The contract between device-facing adapters and whoever decides identity and access.
//!
//! An adapter hands the [`Authenticator`] what a client presented ([`Credentials`]) and gets back
//! a [`Grant`]: the tenant the client belongs to and, for registered devices, an [`Access`] object
//! that the adapter consults on every publish, subscribe and (after a policy change) delivery.
//! The registry implements both; tests and development mode use simpler ones.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use crate::TenantId;

/// A boxed future, as returned by [`Authenticator::authenticate`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A verified TLS client certificate chain (DER, leaf first).
#[derive(Debug, Clone, Copy)]
pub struct PeerCertificates<'a> {
    /// The chain.
    pub chain: &'a [Vec<u8>],
}

/// What a client presented when connecting.
#[derive(Debug, Clone)]
pub struct Credentials<'a> {
    /// Client identifier (possibly assigned by the broker).
    pub client_id: &'a str,
    /// User Name.
    pub username: Option<&'a str>,
    /// Password.
    pub password: Option<&'a [u8]>,
    /// Remote address.
    pub peer: SocketAddr,
    /// The client certificate chain verified during the TLS handshake, if any.
    pub certificates: Option<PeerCertificates<'a>>,
    /// The protocol (`mqtt`, `mqtts`, `ws`, `coap`, `http`), for connectivity records and audit.
    pub protocol: &'static str,
}

/// Why a connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Wrong, unknown or missing credentials (MQTT CONNACK 0x86 / 3.1.1 code 4). Also used while
    /// a source or device is throttled, so that the answer never tells whether a device exists.
    BadCredentials,
    /// Valid credentials, not allowed to connect (CONNACK 0x87 / 3.1.1 code 5): disabled device,
    /// policy refuses the client id.
    NotAuthorized,
    /// The tenant's connection quota is used up (CONNACK 0x97 / 3.1.1 code 3).
    QuotaExceeded,
    /// The identity service is unavailable (CONNACK 0x88 / 3.1.1 code 3).
    Unavailable,
}

/// An accepted connection.
#[derive(Clone)]
pub struct Grant {
    /// The tenant whose namespace the client lives in.
    pub tenant: TenantId,
    /// What the client may do; `None` means everything in its tenant (development mode and the
    /// static user list).
    pub access: Option<Arc<dyn Access>>,
}

/// Decides whether a client may connect.
pub trait Authenticator: Send + Sync {
    /// Checks the credentials of a connecting client.
    fn authenticate<'a>(
        &'a self,
        credentials: Credentials<'a>,
    ) -> BoxFuture<'a, Result<Grant, Refusal>>;
}

/// The outcome of a quota check on a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead.
    Admit,
    /// Over the device's or tenant's rate (MQTT 5 reason 0x97 Quota exceeded).
    QuotaExceeded,
}

/// What one connected client may do. Held for the life of the connection; dropping it records
/// the disconnection.
pub trait Access: Send + Sync {
    /// The registered device behind the connection.
    fn device_id(&self) -> &str;
    /// May publish to `topic`.
    fn can_publish(&self, topic: &str) -> bool;
    /// May subscribe to `filter` (a `$share/…` filter is checked on its inner filter).
    fn can_subscribe(&self, filter: &str) -> bool;
    /// May receive a message published on `topic`.
    fn can_receive(&self, topic: &str) -> bool;
    /// Whether deliveries must be checked with [`Access::can_receive`]: the policy changed after
    /// the connection was accepted (subscriptions granted earlier may no longer be allowed), or
    /// it restricts receiving more than subscribing. False for most devices, so most deliveries
    /// cost no check.
    fn check_deliveries(&self) -> bool;
    /// The connection resumed a session created under an earlier grant: from now on deliveries
    /// are checked (see [`Access::check_deliveries`]).
    fn session_resumed(&self);
    /// Charges a publish of `payload_bytes` against the device's and tenant's quotas.
    fn admit(&self, payload_bytes: usize) -> Admission;
    /// Set once the device was disabled, decommissioned or had the credential revoked: the
    /// connection must close (MQTT 5 DISCONNECT 0x87 Not authorized).
    fn revoked(&self) -> bool;
    /// The connection is ending, and why; called once, before the access is dropped, so that the
    /// disconnection is recorded with its reason.
    fn closing(&self, reason: crate::lifecycle::DisconnectReason) {
        let _ = reason;
    }
}
