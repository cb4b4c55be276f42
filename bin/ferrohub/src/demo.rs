//! `ferrohub serve --demo`: a demo tenant with a small simulated fleet, run in-process against
//! the hub's own MQTT listener, so that the API shows live devices and telemetry within seconds.
//!
//! * The tenant [`TENANT`] is created at the first start (its name says it holds demo data) with
//!   [`DEVICES`] devices of the five built-in profiles (tags `profile`, `site`, `demo`).
//! * Each device gets a generated password (256 random bits, cheap to check). The secrets are
//!   kept in `DATA_DIR/demo-fleet.jsonl` (mode 0600, the fleet-file format `ferrohub sim run
//!   --fleet` reads) so that later starts reuse the same devices and credentials. A device
//!   missing from the registry is registered again, and one without a stored secret gets a new
//!   password (delete the file to issue new passwords to all).
//! * The fleet runs as `ferrohub sim run` does, without a message bound, until the hub shuts
//!   down; if it ever stops on its own (every connection lost) it is started again after a pause.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ferrohub_adapters::shutdown::Shutdown;
use ferrohub_registry::model::{DeviceSpec, TenantSettings};
use ferrohub_registry::{Actor, Registry, RegistryError};
use ferrohub_sim::bench::fleet::{self, FleetEntry};
use ferrohub_sim::sim::{self, Mix, Overrides, RunArgs};
use tokio::task::JoinHandle;

/// The demo tenant's id.
pub const TENANT: &str = "demo";
/// Its display name: what the data is.
pub const TENANT_NAME: &str = "Demo data (simulated fleet of `ferrohub serve --demo`)";
/// Devices of the demo fleet.
pub const DEVICES: usize = 50;
/// The file in `data_dir` holding the demo devices' credentials.
pub const FLEET_FILE: &str = "demo-fleet.jsonl";
/// The built-in profiles of the fleet, in equal shares.
pub const PROFILES: [&str; 5] = [
    "environment",
    "rotating-machine",
    "gps-tracker",
    "smart-meter",
    "cold-chain",
];
/// Sites the devices are spread over (tag `site`).
const SITES: [&str; 5] = ["berlin", "hamburg", "munich", "cologne", "leipzig"];
/// Sampling interval of every demo device: short, so that every profile shows data within
/// seconds (the profiles' own intervals go up to 30 s).
const INTERVAL: &str = "2s";
/// Pause before the fleet is started again after it stopped on its own.
const RESTART_AFTER: Duration = Duration::from_secs(5);

/// Id of the `i`-th demo device.
pub fn device_id(i: usize) -> String {
    format!("demo-{i:02}")
}

fn profile_flags() -> Vec<String> {
    PROFILES.iter().map(|p| format!("{p}:1")).collect()
}

/// Makes sure the demo tenant, its devices and their credentials exist; returns the fleet file.
pub async fn prepare(registry: &Arc<Registry>, data_dir: &Path) -> Result<PathBuf> {
    let actor = Actor::system();
    let created_tenant = match registry.tenant(&actor, TENANT).await {
        Ok(_) => false,
        Err(RegistryError::NotFound(_)) => {
            registry
                .create_tenant(&actor, TENANT, Some(TENANT_NAME), TenantSettings::default())
                .await
                .context("demo mode: creating the demo tenant")?;
            true
        }
        Err(e) => return Err(e).context("demo mode: looking up the demo tenant"),
    };
    let mix = Mix::load(&profile_flags(), &Overrides::default())
        .context("demo mode: loading the built-in profiles")?;

    let path = data_dir.join(FLEET_FILE);
    let mut secrets: HashMap<String, String> = HashMap::new();
    if path.exists() {
        match fleet::read(&path) {
            Ok(entries) => {
                for e in fleet::devices(&entries, 0) {
                    if let Some(p) = e.password {
                        secrets.insert(e.client_id, p);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), file = %path.display(),
                "demo mode: the demo credentials file is unreadable; issuing new passwords"),
        }
    }

    // Devices missing from the registry (all of them at the first start).
    let mut missing = Vec::new();
    for i in 0..DEVICES {
        let id = device_id(i);
        match registry.device(&actor, TENANT, &id).await {
            Ok(_) => {}
            Err(RegistryError::NotFound(_)) => missing.push((i, id)),
            Err(e) => {
                return Err(e).with_context(|| format!("demo mode: looking up device {id}"));
            }
        }
    }
    let specs: Vec<DeviceSpec> = missing
        .iter()
        .map(|(i, id)| DeviceSpec {
            id: id.clone(),
            name: Some(format!("Demo {} {i:02}", mix.pick(*i as u64).name)),
            tags: BTreeMap::from([
                ("profile".to_string(), mix.pick(*i as u64).name.clone()),
                ("site".to_string(), SITES[i % SITES.len()].to_string()),
                ("demo".to_string(), "true".to_string()),
            ]),
            ..DeviceSpec::default()
        })
        .collect();
    if !specs.is_empty() {
        let report = registry
            .import_devices(&actor, TENANT, specs)
            .await
            .context("demo mode: registering the demo devices")?;
        if let Some(e) = report.into_iter().flatten().next() {
            anyhow::bail!("demo mode: registering the demo devices: {e}");
        }
    }
    for (_, id) in &missing {
        // A re-registered device's old secret is of no use.
        secrets.remove(id);
    }

    // Passwords for devices without a stored secret.
    let mut issued = 0usize;
    let mut entries = Vec::with_capacity(DEVICES);
    for i in 0..DEVICES {
        let id = device_id(i);
        let secret = match secrets.get(&id) {
            Some(s) => s.clone(),
            None => {
                let (_, s) = registry
                    .add_password(&actor, TENANT, &id, None, None)
                    .await
                    .with_context(|| format!("demo mode: issuing a password to {id}"))?;
                issued += 1;
                s
            }
        };
        entries.push(FleetEntry {
            role: fleet::DEVICE.into(),
            client_id: id.clone(),
            username: Some(format!("{TENANT}/{id}")),
            password: Some(secret),
            cert_pem: None,
            key_pem: None,
        });
    }
    if issued > 0 || !path.exists() {
        write_private(&path, &entries)?;
    }
    tracing::info!(
        tenant = TENANT,
        devices = DEVICES,
        new_tenant = created_tenant,
        registered = missing.len(),
        passwords_issued = issued,
        credentials = %path.display(),
        "demo mode: generating demo data (simulated devices of profiles {}) in tenant `{TENANT}`",
        PROFILES.join(", ")
    );
    Ok(path)
}

/// Writes the fleet file readable by its owner only (written aside, then renamed).
fn write_private(path: &Path, entries: &[FleetEntry]) -> Result<()> {
    let mut text = String::new();
    for e in entries {
        text.push_str(&serde_json::to_string(e).context("encoding a demo fleet entry")?);
        text.push('\n');
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("jsonl.tmp");
    let _ = std::fs::remove_file(&tmp);
    {
        use std::io::Write;
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        let mut f = o
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Where the fleet connects: the MQTT listener, with an unspecified address made loopback.
fn connect_addr(listener: SocketAddr) -> SocketAddr {
    let ip = match listener.ip() {
        IpAddr::V4(v) if v.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v) if v.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listener.port())
}

/// The `ferrohub sim run` arguments of the demo fleet.
fn run_args(mqtt: SocketAddr, fleet_file: &Path) -> Result<RunArgs> {
    let addr = connect_addr(mqtt);
    let mut v: Vec<String> = vec![
        "--host".into(),
        addr.ip().to_string(),
        "--port".into(),
        addr.port().to_string(),
        "--fleet".into(),
        fleet_file.display().to_string(),
        "--devices".into(),
        DEVICES.to_string(),
        "--interval".into(),
        INTERVAL.into(),
        "--drain".into(),
        "1s".into(),
        "--no-progress".into(),
    ];
    for p in profile_flags() {
        v.push("--profile".into());
        v.push(p);
    }
    RunArgs::try_parse_from(v).context("demo mode: building the fleet's arguments")
}

/// Runs the demo fleet against `mqtt` until `shutdown`.
pub fn spawn(mqtt: SocketAddr, fleet_file: PathBuf, shutdown: Shutdown) -> Result<JoinHandle<()>> {
    let args = run_args(mqtt, &fleet_file)?;
    Ok(tokio::spawn(async move {
        loop {
            let mut sd = shutdown.clone();
            let r = sim::run_args(&args, async move { sd.wait().await }).await;
            if shutdown.is_triggered() {
                break;
            }
            match r {
                Ok(s) => tracing::warn!(
                    connected = s.connected,
                    first_error = s.first_error.as_deref().unwrap_or(""),
                    "demo mode: the simulated fleet stopped; starting it again in {}s",
                    RESTART_AFTER.as_secs()
                ),
                Err(e) => tracing::warn!(
                    error = %format!("{e:#}"),
                    "demo mode: the simulated fleet failed; starting it again in {}s",
                    RESTART_AFTER.as_secs()
                ),
            }
            let mut sd = shutdown.clone();
            tokio::select! {
                _ = sd.wait() => break,
                _ = tokio::time::sleep(RESTART_AFTER) => {}
            }
        }
        tracing::info!("demo mode: simulated fleet stopped");
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn fleet_arguments_parse_and_target_loopback() {
        let a = run_args("0.0.0.0:1883".parse().unwrap(), Path::new("/x/demo.jsonl")).unwrap();
        assert_eq!((a.broker.host.as_str(), a.broker.port), ("127.0.0.1", 1883));
        assert_eq!(a.devices, Some(DEVICES as u64));
        assert!(a.duration.is_none() && a.messages_per_device.is_none());
        assert_eq!(a.profiles.len(), PROFILES.len());
        // Demo devices report firmware and health and answer commands.
        assert!(!a.no_twin && !a.no_commands);
        let a = run_args("[::]:7".parse().unwrap(), Path::new("f")).unwrap();
        assert_eq!(a.broker.host, "::1");
    }
}
