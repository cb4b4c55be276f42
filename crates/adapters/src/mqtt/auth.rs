//! Client authentication hooks.
//!
//! [`Authenticator`] decides who may connect and which tenant they belong to. The built-in
//! [`StaticUsers`] checks a username/password list from the config file; the registry replaces it
//! with per-device credentials. [`AuthMethod`] is the hook for MQTT 5 enhanced authentication
//! (the AUTH packet exchange, e.g. SCRAM or JWT methods).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use ferrohub_types::TenantId;
pub use ferrohub_types::auth::{
    Access, Admission, Authenticator, BoxFuture, Credentials, Grant, PeerCertificates, Refusal,
};

/// A fixed username → password list, plus optional anonymous access (development mode). Clients
/// it admits may do anything in the default tenant.
#[derive(Debug, Clone, Default)]
pub struct StaticUsers {
    users: HashMap<String, String>,
    allow_anonymous: bool,
}

impl StaticUsers {
    /// Users from `(username, password)` pairs.
    pub fn new(users: impl IntoIterator<Item = (String, String)>, allow_anonymous: bool) -> Self {
        StaticUsers {
            users: users.into_iter().collect(),
            allow_anonymous,
        }
    }

    /// Whether the list admits these credentials. `None`: it has no opinion (a user name and
    /// password it does not list, or no anonymous access), so another authenticator may decide.
    pub fn check(&self, username: Option<&str>, password: Option<&[u8]>) -> Option<bool> {
        match (username, password) {
            (Some(user), Some(password)) => self
                .users
                .get(user)
                .map(|expected| constant_time_eq(expected.as_bytes(), password)),
            _ if self.allow_anonymous => Some(true),
            _ => None,
        }
    }
}

/// Compares without an early exit, so that response time does not reveal a password prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Authenticator for StaticUsers {
    fn authenticate<'a>(&'a self, c: Credentials<'a>) -> BoxFuture<'a, Result<Grant, Refusal>> {
        let decision = match self.check(c.username, c.password) {
            Some(true) => Ok(Grant {
                tenant: TenantId::default_tenant(),
                access: None,
            }),
            _ => Err(Refusal::BadCredentials),
        };
        Box::pin(std::future::ready(decision))
    }
}

/// One step of an enhanced-authentication exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthStep {
    /// Send AUTH (0x18 Continue authentication) with this data and wait for the client's answer.
    Continue(Bytes),
    /// Authenticated, in this tenant; the data (if any) goes into CONNACK / the final AUTH.
    Success(TenantId, Option<Bytes>),
    /// Refused (CONNACK 0x87 Not authorized, or DISCONNECT on re-authentication).
    Failure,
}

/// An MQTT 5 enhanced authentication method (the Authentication Method property names it).
pub trait AuthMethod: Send + Sync {
    /// The method name, e.g. `SCRAM-SHA-256`.
    fn name(&self) -> &str;
    /// Starts an exchange with the Authentication Data of CONNECT (or of a re-authentication AUTH).
    fn start(&self, client_id: &str, data: Option<&[u8]>) -> (AuthStep, Box<dyn AuthExchange>);
}

/// The server side of one running exchange.
pub trait AuthExchange: Send {
    /// Handles the Authentication Data of the client's next AUTH packet.
    fn step(&mut self, data: Option<&[u8]>) -> AuthStep;
}

/// The authentication configuration of a broker.
#[derive(Clone)]
pub struct AuthConfig {
    /// Username/password (or certificate, token…) checks.
    pub authenticator: Arc<dyn Authenticator>,
    /// Enhanced authentication methods by name.
    pub methods: Vec<Arc<dyn AuthMethod>>,
}

impl AuthConfig {
    /// Anonymous access for everyone (tests, development).
    pub fn anonymous() -> Self {
        AuthConfig {
            authenticator: Arc::new(StaticUsers::new([], true)),
            methods: Vec::new(),
        }
    }

    pub(crate) fn method(&self, name: &str) -> Option<&Arc<dyn AuthMethod>> {
        self.methods.iter().find(|m| m.name() == name)
    }
}
