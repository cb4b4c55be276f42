//! Benchmark fleets: devices registered in a hub's registry database before the hub starts
//! (`ferrohub bench provision`), and the file that tells the harness how each one connects.
//!
//! The fleet file has one JSON object per line ([`FleetEntry`]): role (`device`, or `monitor` for
//! the one subscriber allowed to read every device's telemetry), client id, user name, password,
//! and the certificate and private key (PEM) the device presents over TLS. The same file feeds
//! the anchors: `scripts/bench/fleet.py` turns it into a Mosquitto password file.
//!
//! Provisioning opens `DATA_DIR/registry.db` through `ferrohub-registry` itself — the same code
//! paths as the operator API (`import_devices`, `add_password` with argon2id at the configured
//! cost, `issue_certificate` from the tenant's built-in CA) — and then closes it; the hub started
//! afterwards on that data directory (with `storage.persistence = true`) finds the devices, their
//! credentials and the CA in place. This needs no admin token, no HTTP listener, and no running
//! hub while thousands of argon2id hashes are computed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use ferrohub_registry::model::DeviceSpec;
use ferrohub_registry::policy::PolicyDocument;
use ferrohub_registry::{Actor, Registry, RegistryConfig, SqliteOptions, SqliteStore};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// How one client of a fleet connects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetEntry {
    /// `device` (publishes under `devices/{id}/`) or `monitor` (reads `devices/+/telemetry`).
    pub role: String,
    /// MQTT client identifier (= the device id).
    pub client_id: String,
    /// MQTT user name (`device` in the default tenant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password (its argon2id hash is what the registry stores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Client certificate, PEM (issued by the tenant's built-in CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_pem: Option<String>,
    /// Its private key, PEM (PKCS#8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_pem: Option<String>,
}

/// Role of the fleet's telemetry reader.
pub const MONITOR: &str = "monitor";
/// Role of an ordinary device.
pub const DEVICE: &str = "device";
/// Client id of the monitor.
pub const MONITOR_ID: &str = "bench-monitor";
/// Policy of the monitor: connect as itself, read every device's telemetry.
const MONITOR_POLICY: &str = r#"{"version": 1, "statements": [
  {"effect": "allow", "actions": ["connect"], "resources": ["${device.id}"]},
  {"effect": "allow", "actions": ["subscribe", "receive"], "resources": ["devices/+/telemetry"]}
]}"#;

/// Reads a fleet file.
pub fn read(path: &Path) -> anyhow::Result<Vec<FleetEntry>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line)
                .with_context(|| format!("{}:{}: not a fleet entry", path.display(), n + 1))?,
        );
    }
    Ok(out)
}

/// The devices (not the monitor) of a fleet, at most `limit` of them (0: all).
pub fn devices(fleet: &[FleetEntry], limit: usize) -> Vec<FleetEntry> {
    let it = fleet.iter().filter(|e| e.role == DEVICE).cloned();
    if limit == 0 {
        it.collect()
    } else {
        it.take(limit).collect()
    }
}

/// The monitor of a fleet.
pub fn monitor(fleet: &[FleetEntry]) -> Option<&FleetEntry> {
    fleet.iter().find(|e| e.role == MONITOR)
}

/// What `ferrohub bench provision` creates.
#[derive(Debug, Clone)]
pub struct ProvisionParams {
    /// Hub data directory (gets `registry.db` and `bench-tls/`).
    pub data_dir: PathBuf,
    /// Number of devices.
    pub devices: usize,
    /// Give each device its own password.
    pub passwords: bool,
    /// Let the registry generate each password (256 random bits, stored as SHA-256 and checked
    /// without argon2id) instead of choosing one (argon2id).
    pub generated_passwords: bool,
    /// Give each device a certificate from the tenant's built-in CA.
    pub certificates: bool,
    /// Also register the monitor (password credential, `devices/+/telemetry` reader).
    pub monitor: bool,
    /// Where to write the fleet file.
    pub fleet_out: PathBuf,
    /// argon2id runs at once while hashing the passwords.
    pub parallel: usize,
    /// Print progress on stderr.
    pub progress: bool,
}

/// Summary line of a provisioning run.
#[derive(Debug, Serialize)]
pub struct ProvisionReport {
    /// Always `provision`.
    pub scenario: &'static str,
    /// Devices registered.
    pub devices: usize,
    /// Passwords set.
    pub passwords: usize,
    /// Certificates issued.
    pub certificates: usize,
    /// Whether the monitor was registered.
    pub monitor: bool,
    /// The registry database.
    pub registry_db: String,
    /// The fleet file.
    pub fleet: String,
    /// Directory with `server.pem`, `server.key`, `server-ca.pem` (what clients trust) and
    /// `device-ca.pem` (the tenant's built-in CA: what a broker verifies clients against).
    pub tls_dir: String,
    /// Seconds spent.
    pub seconds: f64,
}

/// Device id of the `i`-th benchmark device.
pub fn device_id(i: usize) -> String {
    format!("bd-{i:06}")
}

/// A random password: 24 lowercase hex digits (96 bits).
fn random_password() -> String {
    let b: [u8; 12] = rand::random();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Registers a fleet in `DATA_DIR/registry.db` and writes the fleet file and TLS material.
pub async fn provision(p: &ProvisionParams) -> anyhow::Result<ProvisionReport> {
    let t0 = Instant::now();
    std::fs::create_dir_all(&p.data_dir)
        .with_context(|| format!("creating {}", p.data_dir.display()))?;
    let db = p.data_dir.join("registry.db");
    if db.exists() {
        bail!(
            "{} exists: provision into an empty data directory",
            db.display()
        );
    }
    let store = SqliteStore::open(&db, SqliteOptions { fsync: false })
        .await
        .with_context(|| format!("opening {}", db.display()))?;
    let registry = Registry::open(store.clone(), RegistryConfig::default())
        .await
        .context("opening the registry")?;
    let actor = Actor::system();
    let tenant = ferrohub_types::TenantId::DEFAULT;

    // Devices, in batches (import_devices validates and writes 1,000 per transaction).
    let ids: Vec<String> = (0..p.devices).map(device_id).collect();
    for chunk in ids.chunks(10_000) {
        let specs = chunk
            .iter()
            .enumerate()
            .map(|(j, id)| DeviceSpec {
                id: id.clone(),
                tags: BTreeMap::from([("site".to_string(), format!("site-{:02}", j % 10))]),
                ..DeviceSpec::default()
            })
            .collect();
        let report = registry.import_devices(&actor, tenant, specs).await?;
        if let Some(e) = report.into_iter().flatten().next() {
            bail!("importing devices: {e}");
        }
    }
    if p.progress {
        eprintln!("[provision] {} devices registered", p.devices);
    }

    let mut entries: Vec<FleetEntry> = ids
        .iter()
        .map(|id| FleetEntry {
            role: DEVICE.into(),
            client_id: id.clone(),
            username: None,
            password: None,
            cert_pem: None,
            key_pem: None,
        })
        .collect();

    if p.monitor {
        let doc = PolicyDocument::from_json(MONITOR_POLICY)
            .map_err(|e| anyhow::anyhow!("monitor policy: {e}"))?;
        registry
            .put_policy(&actor, tenant, "bench-monitor", doc)
            .await?;
        registry
            .create_device(
                &actor,
                tenant,
                DeviceSpec {
                    id: MONITOR_ID.into(),
                    policy: Some("bench-monitor".into()),
                    ..DeviceSpec::default()
                },
            )
            .await?;
        entries.push(FleetEntry {
            role: MONITOR.into(),
            client_id: MONITOR_ID.into(),
            username: None,
            password: None,
            cert_pem: None,
            key_pem: None,
        });
    }

    // Passwords: argon2id at the registry's configured cost, `parallel` at a time.
    let mut passwords = 0;
    if p.passwords {
        let sem = Arc::new(Semaphore::new(p.parallel.max(1)));
        let mut set = JoinSet::new();
        for (i, e) in entries.iter().enumerate() {
            let registry = registry.clone();
            let actor = actor.clone();
            let sem = sem.clone();
            let id = e.client_id.clone();
            let generated = p.generated_passwords;
            set.spawn(async move {
                let _permit = sem.acquire_owned().await;
                let chosen = (!generated).then(random_password);
                registry
                    .add_password(&actor, tenant, &id, chosen, None)
                    .await
                    .map(|(_, secret)| (i, secret))
            });
        }
        let mut done = 0usize;
        let mut last = Instant::now();
        while let Some(r) = set.join_next().await {
            let (i, secret) = r.context("password task")??;
            entries[i].username = Some(entries[i].client_id.clone());
            entries[i].password = Some(secret);
            done += 1;
            if p.progress && last.elapsed().as_secs_f64() >= 2.0 {
                last = Instant::now();
                eprintln!("[provision] {done}/{} passwords", entries.len());
            }
        }
        passwords = done;
    }

    // Certificates from the tenant's built-in CA (created on first use).
    let mut certificates = 0;
    if p.certificates {
        for e in entries.iter_mut().filter(|e| e.role == DEVICE) {
            let (_, issued) = registry
                .issue_certificate(&actor, tenant, &e.client_id, None, None)
                .await?;
            e.cert_pem = Some(issued.cert_pem);
            e.key_pem = issued.key_pem;
            certificates += 1;
            if p.progress && certificates % 1000 == 0 {
                eprintln!("[provision] {certificates} certificates");
            }
        }
    }

    // TLS material: a server certificate for 127.0.0.1/localhost from a CA of its own, and the
    // tenant's device CA (what Mosquitto's `cafile` must name).
    let tls_dir = p.data_dir.join("bench-tls");
    std::fs::create_dir_all(&tls_dir)?;
    let device_ca = registry.builtin_ca_pem(&actor, tenant).await?;
    std::fs::write(tls_dir.join("device-ca.pem"), device_ca)?;
    let server = server_identity()?;
    std::fs::write(tls_dir.join("server-ca.pem"), &server.ca_pem)?;
    std::fs::write(tls_dir.join("server.pem"), &server.cert_pem)?;
    std::fs::write(tls_dir.join("server.key"), &server.key_pem)?;

    {
        let f = std::fs::File::create(&p.fleet_out)
            .with_context(|| format!("creating {}", p.fleet_out.display()))?;
        let mut w = BufWriter::new(f);
        for e in &entries {
            serde_json::to_writer(&mut w, e)?;
            w.write_all(b"\n")?;
        }
        w.flush()?;
    }
    drop(registry);
    store.close().await;
    Ok(ProvisionReport {
        scenario: "provision",
        devices: p.devices,
        passwords,
        certificates,
        monitor: p.monitor,
        registry_db: db.display().to_string(),
        fleet: p.fleet_out.display().to_string(),
        tls_dir: tls_dir.display().to_string(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// A server certificate and the CA that signed it, PEM.
pub struct ServerIdentity {
    /// The CA clients trust.
    pub ca_pem: String,
    /// The server's certificate (SANs `localhost`, `127.0.0.1`).
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

/// Generates an ECDSA P-256 server certificate for `localhost` and `127.0.0.1`, signed by a
/// fresh P-256 CA: the same kind of keys as the device certificates.
pub fn server_identity() -> anyhow::Result<ServerIdentity> {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Ferrohub benchmark server CA");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
    params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "localhost");
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(ServerIdentity {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_without_empty_fields() {
        let e = FleetEntry {
            role: DEVICE.into(),
            client_id: "bd-000001".into(),
            username: Some("bd-000001".into()),
            password: Some("secret".into()),
            cert_pem: None,
            key_pem: None,
        };
        let line = serde_json::to_string(&e).unwrap();
        assert!(!line.contains("cert_pem"));
        assert_eq!(serde_json::from_str::<FleetEntry>(&line).unwrap(), e);
    }

    #[test]
    fn server_identity_is_pem() {
        let s = server_identity().unwrap();
        assert!(s.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(s.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(s.key_pem.contains("PRIVATE KEY"));
    }
}
