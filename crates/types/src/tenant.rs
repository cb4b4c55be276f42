use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A tenant: an isolated namespace of topics, devices and data.
///
/// Until the registry lands every connection belongs to [`TenantId::default_tenant`]; the router
/// and the store already key everything by tenant so that isolation holds by construction.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TenantId(Arc<str>);

impl TenantId {
    /// The tenant name used when none is configured.
    pub const DEFAULT: &'static str = "default";

    /// The default tenant.
    pub fn default_tenant() -> TenantId {
        TenantId(Arc::from(Self::DEFAULT))
    }

    /// A tenant with the given name.
    pub fn new(name: &str) -> TenantId {
        TenantId(Arc::from(name))
    }

    /// The tenant's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TenantId {
    fn default() -> Self {
        Self::default_tenant()
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({})", self.0)
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
