//! `sim run`'s transport flags (`--transport`, `--ca`, `--cert`/`--key`, `--insecure`,
//! `--server-name`, `--ws-path`) turned into the client's [`Transport`], and devices' own client
//! certificates from a fleet file.

use std::net::IpAddr;

use anyhow::{Context, bail};

use super::BrokerArgs;
use crate::bench::transport::{self, DeviceTls, TlsClient, TlsSettings, Transport};

/// `--transport`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportKind {
    /// MQTT over TCP.
    #[default]
    Tcp,
    /// MQTT over TLS.
    Tls,
    /// MQTT over WebSocket (binary frames, subprotocol `mqtt`).
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss,
}

impl TransportKind {
    fn uses_tls(self) -> bool {
        matches!(self, TransportKind::Tls | TransportKind::Wss)
    }
}

/// What the transport flags resolve to.
pub struct Setup {
    /// The client's transport.
    pub transport: Transport,
    /// The broker's port.
    pub port: u16,
    /// The broker as shown in the summary (`host:port` for TCP, else a URL).
    pub broker: String,
    /// Roots and verification, for devices' own certificates (TLS transports only).
    pub tls: Option<TlsSettings>,
}

/// `host:port`, with brackets around an IPv6 address.
fn authority(host: &str, port: u16) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        _ => format!("{host}:{port}"),
    }
}

/// The roots of `--ca` (and `--insecure`), for the broker and an https:// API.
pub fn tls_settings(a: &BrokerArgs) -> anyhow::Result<TlsSettings> {
    let ca = match &a.ca {
        Some(p) => Some((
            p.display().to_string(),
            transport::read_pem(p).context("--ca")?,
        )),
        None => None,
    };
    Ok(TlsSettings::new(
        ca.as_ref().map(|(n, pem)| (n.as_str(), pem.as_slice())),
        a.insecure,
    )?)
}

/// Checks the transport flags and builds the transport.
pub fn setup(a: &BrokerArgs) -> anyhow::Result<Setup> {
    let kind = a.transport;
    if !kind.uses_tls() {
        let tls_flag = [
            (a.cert.is_some(), "--cert"),
            (a.insecure, "--insecure"),
            (a.server_name.is_some(), "--server-name"),
        ]
        .into_iter()
        .find_map(|(set, name)| set.then_some(name));
        // --ca also serves an https:// --api, so it is allowed with any transport.
        if let Some(flag) = tls_flag {
            bail!("{flag} needs --transport tls or wss");
        }
    }
    if !a.ws_path.starts_with('/') {
        bail!("--ws-path must start with `/` (e.g. /mqtt)");
    }
    let port = a.port;
    let hostport = authority(&a.host, port);
    let tls = if kind.uses_tls() {
        let settings = tls_settings(a)?;
        let identity = match (&a.cert, &a.key) {
            (Some(c), Some(k)) => Some((
                transport::read_pem(c).context("--cert")?,
                transport::read_pem(k).context("--key")?,
            )),
            _ => None,
        };
        let config = settings
            .config(identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())))
            .context("--cert/--key")?;
        let name = a.server_name.as_deref().unwrap_or(&a.host);
        let server_name = transport::server_name(name).context("--server-name")?;
        Some((
            settings,
            TlsClient {
                config,
                server_name,
            },
        ))
    } else {
        None
    };
    let ws_url = |scheme: &str| format!("{scheme}://{hostport}{}", a.ws_path);
    let (settings, client) = match tls {
        Some((s, t)) => (Some(s), Some(t)),
        None => (None, None),
    };
    let (transport, broker) = match (kind, client) {
        (TransportKind::Tcp, _) => (Transport::Tcp, hostport.clone()),
        (TransportKind::Ws, _) => (
            Transport::Ws {
                url: ws_url("ws"),
                tls: None,
            },
            ws_url("ws"),
        ),
        (TransportKind::Tls, Some(t)) => (Transport::Tls(t), format!("mqtts://{hostport}")),
        (TransportKind::Wss, Some(t)) => (
            Transport::Ws {
                url: ws_url("wss"),
                tls: Some(t),
            },
            ws_url("wss"),
        ),
        // uses_tls() built the TLS client for both.
        (TransportKind::Tls | TransportKind::Wss, None) => bail!("TLS configuration missing"),
    };
    Ok(Setup {
        transport,
        port,
        broker,
        tls: settings,
    })
}

/// A device's own TLS configuration from its fleet entry's certificate and key (PEM), when the
/// transport is TLS; `None` otherwise (the entry's certificate is then not used).
pub fn device_tls(
    settings: Option<&TlsSettings>,
    id: &str,
    cert_pem: Option<&str>,
    key_pem: Option<&str>,
) -> anyhow::Result<Option<DeviceTls>> {
    match (settings, cert_pem, key_pem) {
        (Some(s), Some(c), Some(k)) => {
            let config = s
                .config(Some((c.as_bytes(), k.as_bytes())))
                .with_context(|| format!("fleet entry {id}"))?;
            Ok(Some(DeviceTls(config)))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sim::RunArgs;

    fn setup_of(flags: &str) -> anyhow::Result<Setup> {
        setup(
            &super::super::RunArgs::try_parse_from(flags.split_whitespace())
                .unwrap()
                .broker,
        )
    }

    #[test]
    fn ports_and_broker_names_follow_the_transport() {
        let s = setup_of("").unwrap();
        assert_eq!((s.port, s.broker.as_str()), (1883, "127.0.0.1:1883"));
        assert!(matches!(s.transport, Transport::Tcp) && s.tls.is_none());
        let s = setup_of("--transport tls --host ::1").unwrap();
        assert_eq!((s.port, s.broker.as_str()), (8883, "mqtts://[::1]:8883"));
        assert!(s.tls.is_some());
        let s = setup_of("--transport ws").unwrap();
        assert_eq!(s.broker, "ws://127.0.0.1:8083/mqtt");
        let s = setup_of("--transport wss").unwrap();
        assert_eq!(s.port, 8084);
        let s = setup_of("--transport tls --port 1883").unwrap();
        assert_eq!(s.port, 1883);
        let s = setup_of("--transport wss --host h.example --port 443 --ws-path /x").unwrap();
        assert_eq!(s.broker, "wss://h.example:443/x");
        assert_eq!(s.transport.name(), "wss");
    }

    #[test]
    fn tls_flags_need_a_tls_transport() {
        for flags in ["--insecure", "--server-name x", "--transport ws --insecure"] {
            let e = setup_of(flags).err().unwrap().to_string();
            assert!(e.contains("needs --transport tls or wss"), "{flags}: {e}");
        }
        assert!(setup_of("--transport ws --ws-path mqtt").is_err());
        assert!(setup_of("--transport tls --server-name bad_name!").is_err());
        let e = setup_of("--transport tls --ca /nonexistent.pem")
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("/nonexistent.pem"), "{e:#}");
        // --cert and --key go together.
        assert!(RunArgs::try_parse_from(["--cert", "c.pem"]).is_err());
    }
}
