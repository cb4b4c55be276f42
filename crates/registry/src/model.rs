//! The registry's records: tenants, devices, device types, groups, credentials, API tokens,
//! certificate authorities and audit events, as the API shows them and the store keeps them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::RegistryError;

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

/// Now, in milliseconds since the Unix epoch.
pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Checks a tenant, device, type, group, policy or CA identifier: 1–128 characters of
/// `A-Z a-z 0-9 . _ : -` ([`ferrohub_types::id::is_valid_id`], the rule telemetry also holds
/// device ids to). Identifiers appear in topics (`devices/{id}/…`) and in MQTT user names
/// (`tenant/device`), so `/`, `+`, `#`, `$`, spaces and control characters are excluded.
pub fn validate_id(kind: &'static str, id: &str) -> Result<(), RegistryError> {
    if ferrohub_types::id::is_valid_id(id) {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!(
            "{kind} id {id:?} is not valid: use {}",
            ferrohub_types::id::ID_RULE
        )))
    }
}

/// Checks tag keys and values: keys like ids, values up to 256 bytes without control characters.
pub fn validate_tags(tags: &BTreeMap<String, String>) -> Result<(), RegistryError> {
    if tags.len() > 64 {
        return Err(RegistryError::Invalid(
            "a device may have at most 64 tags".into(),
        ));
    }
    for (k, v) in tags {
        validate_id("tag key", k)?;
        if v.len() > 256 || v.chars().any(char::is_control) {
            return Err(RegistryError::Invalid(format!(
                "tag {k}: values are at most 256 bytes without control characters"
            )));
        }
    }
    Ok(())
}

/// Where the device identity comes from in a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum CertIdentityField {
    /// The subject common name.
    #[default]
    Cn,
    /// The first DNS subject alternative name.
    DnsSan,
    /// The first URI subject alternative name.
    UriSan,
}

/// What happens to a decommissioned device's telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum TelemetryOnDecommission {
    /// Telemetry stays queryable under the device id.
    #[default]
    Keep,
    /// Telemetry is deleted with the device.
    Purge,
}

/// Per-tenant limits; `0` means unlimited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Quotas {
    /// Concurrent device connections in the tenant.
    pub max_connections: u32,
    /// Messages per second published by the whole tenant.
    pub tenant_messages_per_sec: u32,
    /// Payload bytes per second published by the whole tenant.
    pub tenant_bytes_per_sec: u64,
    /// Messages per second published by one device.
    pub device_messages_per_sec: u32,
    /// Payload bytes per second published by one device.
    pub device_bytes_per_sec: u64,
}

/// Tenant-wide settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TenantSettings {
    /// Quotas enforced by every adapter.
    pub quotas: Quotas,
    /// Which certificate field names the device.
    pub cert_identity: CertIdentityField,
    /// Telemetry of decommissioned devices.
    pub telemetry_on_decommission: TelemetryOnDecommission,
}

/// A tenant: an isolated namespace of topics, devices and data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Tenant {
    /// Identifier (appears in MQTT user names as `tenant/device`).
    pub id: String,
    /// Display name.
    pub name: String,
    /// Settings.
    pub settings: TenantSettings,
    /// Creation time (ms since the epoch).
    pub created_at: Millis,
}

/// Whether a device may connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStatus {
    /// May connect.
    #[default]
    Enabled,
    /// Refused on connect; connections are closed when it is disabled.
    Disabled,
}

impl DeviceStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Enabled => "enabled",
            DeviceStatus::Disabled => "disabled",
        }
    }
    pub(crate) fn parse(s: &str) -> DeviceStatus {
        if s == "disabled" {
            DeviceStatus::Disabled
        } else {
            DeviceStatus::Enabled
        }
    }
}

/// Last known connectivity of a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
pub struct Connectivity {
    /// Connected now.
    pub online: bool,
    /// Last connect, disconnect or activity (ms since the epoch).
    pub last_seen: Option<Millis>,
    /// Remote address of the last connection.
    pub remote_addr: Option<String>,
    /// Protocol of the last connection (`mqtt`, `mqtts`, `ws`, …).
    pub protocol: Option<String>,
    /// When the last connection was accepted (ms since the epoch).
    pub last_connected_at: Option<Millis>,
    /// When a connection of the device last ended (ms since the epoch). It stays when the device
    /// connects again: `online` says whether it is connected now.
    pub last_disconnected_at: Option<Millis>,
    /// Why that connection ended: `client_disconnect`, `connection_lost`, `keep_alive_timeout`,
    /// `taken_over`, `kicked`, `not_authorized`, `server_shutdown` or `protocol_error`; absent
    /// when the adapter reported no reason (say, a connect refused right after authentication).
    pub disconnect_reason: Option<String>,
}

impl Connectivity {
    /// Applies a change recorded later: its `online` and the fields it sets; the disconnect
    /// reason goes with `last_disconnected_at` (a disconnect without a reason clears it).
    pub fn apply(&mut self, change: &Connectivity) {
        self.online = change.online;
        if change.last_seen.is_some() {
            self.last_seen = change.last_seen;
        }
        if change.remote_addr.is_some() {
            self.remote_addr.clone_from(&change.remote_addr);
        }
        if change.protocol.is_some() {
            self.protocol.clone_from(&change.protocol);
        }
        if change.last_connected_at.is_some() {
            self.last_connected_at = change.last_connected_at;
        }
        if change.last_disconnected_at.is_some() {
            self.last_disconnected_at = change.last_disconnected_at;
            self.disconnect_reason.clone_from(&change.disconnect_reason);
        }
    }
}

/// What happened to a device's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConnectivityEventKind {
    /// A connection was accepted.
    Connected,
    /// A connection ended.
    Disconnected,
}

impl ConnectivityEventKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ConnectivityEventKind::Connected => "connected",
            ConnectivityEventKind::Disconnected => "disconnected",
        }
    }
    pub(crate) fn parse(s: &str) -> Option<ConnectivityEventKind> {
        match s {
            "connected" => Some(ConnectivityEventKind::Connected),
            "disconnected" => Some(ConnectivityEventKind::Disconnected),
            _ => None,
        }
    }
}

/// One entry of a device's connectivity history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConnectivityEvent {
    /// Sequence number (strictly increasing; newer events have larger ones). Pass it as `before`
    /// to get older events.
    pub seq: i64,
    /// When (ms since the epoch).
    pub at: Millis,
    /// `connected` or `disconnected`.
    pub event: ConnectivityEventKind,
    /// Why a connection ended (see [`Connectivity::disconnect_reason`]); absent on `connected`.
    pub reason: Option<String>,
    /// The MQTT client id of the connection.
    pub client_id: Option<String>,
    /// Remote address of the connection.
    pub remote_addr: Option<String>,
    /// Protocol of the connection (`mqtt`, `mqtts`, `ws`, …).
    pub protocol: Option<String>,
}

/// A device's current connectivity and a page of its connectivity history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConnectivityHistory {
    /// Connectivity now (live).
    pub current: Connectivity,
    /// Events, newest first (as flushed: at most a second behind `current`).
    pub events: Vec<ConnectivityEvent>,
    /// Pass as `before` for the next (older) page; absent on the last page.
    pub next: Option<i64>,
}

/// A registered device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Device {
    /// Identifier, unique in the tenant.
    pub id: String,
    /// Tenant.
    pub tenant: String,
    /// Display name.
    pub name: String,
    /// Device type (template), if any.
    #[serde(rename = "type")]
    pub device_type: Option<String>,
    /// Tags (indexed; used by dynamic groups and policies).
    pub tags: BTreeMap<String, String>,
    /// Free attributes (a JSON object, not indexed).
    #[schema(value_type = Object)]
    pub attributes: serde_json::Value,
    /// Enabled or disabled.
    pub status: DeviceStatus,
    /// Named policy attached to the device (else its type's, else the default policy).
    pub policy: Option<String>,
    /// Static groups the device belongs to.
    pub groups: Vec<String>,
    /// Connectivity.
    pub connectivity: Connectivity,
    /// Creation time.
    pub created_at: Millis,
    /// Last change.
    pub updated_at: Millis,
}

/// Fields of a device as created or replaced through the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceSpec {
    /// Identifier (required on create).
    pub id: String,
    /// Display name (defaults to the id).
    pub name: Option<String>,
    /// Device type; its tags, attributes and policy are the defaults.
    #[serde(rename = "type")]
    pub device_type: Option<String>,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Free attributes (JSON object).
    #[schema(value_type = Object)]
    pub attributes: Option<serde_json::Value>,
    /// Status (default enabled).
    pub status: Option<DeviceStatus>,
    /// Named policy.
    pub policy: Option<String>,
    /// Static groups to join.
    pub groups: Vec<String>,
}

/// A partial update of a device (absent fields are unchanged).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema, Default)]
#[serde(default, deny_unknown_fields)]
pub struct DevicePatch {
    /// New name.
    pub name: Option<String>,
    /// New type (`""` clears it).
    #[serde(rename = "type")]
    pub device_type: Option<String>,
    /// Tags to set; a `null` value removes the tag.
    pub tags: Option<BTreeMap<String, Option<String>>>,
    /// Replacement attributes.
    #[schema(value_type = Object)]
    pub attributes: Option<serde_json::Value>,
    /// New status.
    pub status: Option<DeviceStatus>,
    /// Named policy (`""` detaches it).
    pub policy: Option<String>,
}

/// A device type: defaults for the devices created from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceType {
    /// Identifier.
    pub name: String,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// Tags given to new devices of this type.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Attributes given to new devices of this type.
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub attributes: serde_json::Value,
    /// Policy for devices of this type that have none of their own.
    #[serde(default)]
    pub policy: Option<String>,
}

pub(crate) fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

/// A device query: the filters of a device listing and the definition of a dynamic group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceQuery {
    /// Every tag must match (`key` → `value`).
    pub tags: BTreeMap<String, String>,
    /// Device type.
    #[serde(rename = "type")]
    pub device_type: Option<String>,
    /// Status.
    pub status: Option<DeviceStatus>,
    /// Name prefix.
    pub name_prefix: Option<String>,
    /// Id prefix (the console's device search: a range on the primary key, fast at any size).
    pub id_prefix: Option<String>,
    /// Connected now (as last flushed; at most a second behind).
    pub online: Option<bool>,
}

impl DeviceQuery {
    /// Whether a device matches (used for dynamic-group membership checks).
    pub fn matches(&self, d: &Device) -> bool {
        self.tags.iter().all(|(k, v)| d.tags.get(k) == Some(v))
            && self
                .device_type
                .as_ref()
                .is_none_or(|t| d.device_type.as_ref() == Some(t))
            && self.status.is_none_or(|s| d.status == s)
            && self
                .name_prefix
                .as_ref()
                .is_none_or(|p| d.name.starts_with(p.as_str()))
            && self
                .id_prefix
                .as_ref()
                .is_none_or(|p| d.id.starts_with(p.as_str()))
            && self.online.is_none_or(|o| d.connectivity.online == o)
    }
}

/// A group of devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// Identifier.
    pub name: String,
    /// Description.
    #[serde(default)]
    pub description: String,
    /// `None` for a static group (explicit members); a query for a dynamic group.
    #[serde(default)]
    pub query: Option<DeviceQuery>,
}

/// How a device listing is sorted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum SortKey {
    /// By id.
    #[default]
    Id,
    /// By name, then id.
    Name,
    /// By creation time, then id.
    CreatedAt,
    /// By last seen, then id (never-seen devices first).
    LastSeen,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// A request for a page of devices.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeviceListing {
    /// Filters.
    pub query: DeviceQuery,
    /// Members of this group (static or dynamic).
    pub group: Option<String>,
    /// Sort key.
    pub sort: SortKey,
    /// Descending order.
    pub descending: bool,
    /// Page size (1–1000).
    pub limit: u32,
    /// Cursor from the previous page.
    pub cursor: Option<String>,
}

/// The kinds of device credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    /// An argon2id password hash.
    Password,
    /// A certificate (issued by the hub or registered), identified by its SHA-256 fingerprint;
    /// when the device has one, only pinned certificates are accepted.
    Certificate,
    /// A public key (PEM) or JWK set that verifies the device's own JWTs.
    JwtKey,
}

impl CredentialKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CredentialKind::Password => "password",
            CredentialKind::Certificate => "certificate",
            CredentialKind::JwtKey => "jwt_key",
        }
    }
    pub(crate) fn parse(s: &str) -> Option<CredentialKind> {
        match s {
            "password" => Some(CredentialKind::Password),
            "certificate" => Some(CredentialKind::Certificate),
            "jwt_key" => Some(CredentialKind::JwtKey),
            _ => None,
        }
    }
}

/// A device credential (secrets are never returned by the API).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Credential {
    /// Identifier.
    pub id: String,
    /// Device.
    pub device_id: String,
    /// Kind.
    pub kind: CredentialKind,
    /// Operator's label.
    pub label: String,
    /// Certificate fingerprint (SHA-256, hex) for certificate credentials.
    pub fingerprint: Option<String>,
    /// Certificate serial (hex).
    pub serial: Option<String>,
    /// The credential stops working at this time (rotation overlap, certificate expiry).
    pub expires_at: Option<Millis>,
    /// Creation time.
    pub created_at: Millis,
    /// Revocation time, if revoked.
    pub revoked_at: Option<Millis>,
    #[serde(skip)]
    pub(crate) secret: String,
}

impl Credential {
    /// Whether the credential may be used at `now`.
    pub fn is_active(&self, now: Millis) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now)
    }
    /// The stored secret (PHC string, PEM or JWK set); never exposed through the API.
    pub fn secret(&self) -> &str {
        &self.secret
    }
}

/// An operator role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads everything in scope.
    Viewer,
    /// Manages devices, credentials, groups and types in scope.
    Operator,
    /// Also manages tenants, policies, CAs and tokens; platform-wide when not scoped.
    Admin,
}

impl Role {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
    pub(crate) fn parse(s: &str) -> Role {
        match s {
            "admin" => Role::Admin,
            "operator" => Role::Operator,
            _ => Role::Viewer,
        }
    }
}

/// An operator API token (the secret is shown once, at creation; only its hash is stored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ApiToken {
    /// Identifier.
    pub id: String,
    /// Who or what uses it.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Tenant it is confined to; `None` = platform-wide (admins only).
    pub tenant: Option<String>,
    /// Creation time.
    pub created_at: Millis,
    /// Expiry.
    pub expires_at: Option<Millis>,
    /// Revocation time.
    pub revoked_at: Option<Millis>,
    /// Token that created it.
    pub created_by: Option<String>,
}

/// A named authorization policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NamedPolicy {
    /// Identifier.
    pub name: String,
    /// The document.
    #[schema(value_type = Object)]
    pub document: crate::policy::PolicyDocument,
    /// Last change.
    pub updated_at: Millis,
}

/// A certificate authority trusted to sign a tenant's device certificates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CaRecord {
    /// Identifier (`builtin` for the hub's own CA of the tenant).
    pub id: String,
    /// Tenant.
    pub tenant: String,
    /// The CA certificate (PEM).
    pub cert_pem: String,
    /// Subject of the CA certificate.
    pub subject: String,
    /// Expiry (ms since the epoch).
    pub not_after: Millis,
    /// Just-in-time registration: unknown devices with a valid certificate from this CA are
    /// registered on first connect, from `jitr_template`.
    pub jitr: bool,
    /// Provisioning template applied on just-in-time registration.
    pub jitr_template: Option<String>,
    /// The hub holds the key (built-in CA).
    pub builtin: bool,
    #[serde(skip)]
    pub(crate) key_pem: Option<String>,
}

/// A provisioning template: what a device registered by claim or just-in-time becomes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProvisioningTemplate {
    /// Identifier.
    pub name: String,
    /// Device type of new devices.
    #[serde(default, rename = "type")]
    pub device_type: Option<String>,
    /// Tags of new devices.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Static groups new devices join.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Policy of new devices.
    #[serde(default)]
    pub policy: Option<String>,
    /// Validity of issued certificates, in days.
    #[serde(default = "default_cert_days")]
    pub cert_validity_days: u32,
    /// Called with the request before a device is registered; a non-2xx answer refuses it.
    #[serde(default)]
    pub approval_webhook: Option<String>,
}

fn default_cert_days() -> u32 {
    365
}

/// The result of an audited action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuditResult {
    /// It happened.
    Success,
    /// It was refused or failed.
    Failure,
}

/// One entry of the append-only audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditEvent {
    /// Sequence number (strictly increasing).
    pub seq: i64,
    /// When (ms since the epoch).
    pub at: Millis,
    /// Who: `token:<id>`, `device:<tenant>/<id>`, `system`.
    pub actor: String,
    /// Tenant concerned, if any.
    pub tenant: Option<String>,
    /// What: e.g. `device.create`, `device.disable`, `auth.failure`.
    pub action: String,
    /// The object acted on.
    pub target: String,
    /// Remote address of the actor.
    pub source: Option<String>,
    /// Result.
    pub result: AuditResult,
    /// Details (a JSON object).
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

/// Filters of an audit query.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, ToSchema)]
#[serde(default)]
pub struct AuditQuery {
    /// Tenant.
    pub tenant: Option<String>,
    /// Action prefix (`device.` matches every device action).
    pub action: Option<String>,
    /// Actor.
    pub actor: Option<String>,
    /// Target.
    pub target: Option<String>,
    /// Only this result.
    pub result: Option<AuditResult>,
    /// From this time (inclusive, ms).
    pub since: Option<Millis>,
    /// Until this time (exclusive, ms).
    pub until: Option<Millis>,
    /// Newest first after this sequence number (the cursor).
    pub before_seq: Option<i64>,
    /// Page size (1–1000, default 100).
    pub limit: Option<u32>,
}
