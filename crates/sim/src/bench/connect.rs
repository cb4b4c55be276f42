//! The connect-rate scenario: N distinct clients (devices of a fleet) each open a connection,
//! send CONNECT with their own credentials, wait for a successful CONNACK, send DISCONNECT and
//! close, with a fixed number of these in flight at once. Passes repeat the whole fleet: against
//! Ferrohub the first pass is *cold* (every password goes through argon2id, every device record
//! is loaded from the registry database) and later passes *warm* (the verified-secret and
//! device caches hit); a broker without such caches does the same work in every pass.
//!
//! Authentication: `password` (user name + password of each device, plain TCP unless `--tls`),
//! `certificate` (TLS 1.3 with the device's client certificate, no user name or password), or
//! `none`. TLS clients use TLS 1.3 only, X25519 key exchange only (the hybrid post-quantum group
//! rustls prefers is not in every broker's TLS library; X25519 keeps the handshakes identical),
//! and no session resumption: every connect is a full handshake with certificate verification.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use ferrohub_proto::mqtt::{self, Disconnect, Packet, ProtocolVersion};
use rustls::client::Resumption;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::fleet::FleetEntry;
use super::stats::Latency;
use super::sys;
use super::wire::{MAX_INBOUND_PACKET, connack_name};

/// How clients authenticate in the connect scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConnectAuth {
    /// Each device's user name and password.
    Password,
    /// Each device's TLS client certificate (implies TLS).
    Certificate,
    /// No credentials.
    None,
}

impl ConnectAuth {
    fn name(self) -> &'static str {
        match self {
            ConnectAuth::Password => "password",
            ConnectAuth::Certificate => "certificate",
            ConnectAuth::None => "none",
        }
    }
}

/// TLS settings of the clients.
#[derive(Debug, Clone)]
pub struct TlsSetup {
    /// CAs that may sign the broker's certificate.
    pub roots: Arc<RootCertStore>,
    /// Name checked against the broker's certificate.
    pub server_name: ServerName<'static>,
}

impl TlsSetup {
    /// Loads the roots from a PEM file.
    pub fn load(ca_file: &std::path::Path, server_name: &str) -> anyhow::Result<TlsSetup> {
        let pem =
            std::fs::read(ca_file).with_context(|| format!("reading {}", ca_file.display()))?;
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&pem) {
            roots
                .add(c.with_context(|| format!("parsing {}", ca_file.display()))?)
                .context("adding a root certificate")?;
        }
        if roots.is_empty() {
            bail!("{} holds no certificate", ca_file.display());
        }
        Ok(TlsSetup {
            roots: Arc::new(roots),
            server_name: ServerName::try_from(server_name.to_string())
                .with_context(|| format!("{server_name:?} is not a server name"))?,
        })
    }

    fn config(&self, client: Option<&FleetEntry>) -> anyhow::Result<Arc<ClientConfig>> {
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
        let builder = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots.clone());
        let mut config = match client {
            Some(e) => {
                let (Some(cert), Some(key)) = (&e.cert_pem, &e.key_pem) else {
                    bail!(
                        "device {} has no certificate in the fleet file",
                        e.client_id
                    );
                };
                let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .with_context(|| format!("certificate of {}", e.client_id))?;
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
                    .with_context(|| format!("private key of {}", e.client_id))?;
                builder.with_client_auth_cert(chain, key)?
            }
            None => builder.with_no_client_auth(),
        };
        config.resumption = Resumption::disabled();
        Ok(Arc::new(config))
    }
}

/// How to run the connect scenario.
#[derive(Debug, Clone)]
pub struct ConnectParams {
    /// Broker address.
    pub addr: SocketAddr,
    /// MQTT version.
    pub version: ProtocolVersion,
    /// The clients (in order).
    pub devices: Vec<FleetEntry>,
    /// How they authenticate.
    pub auth: ConnectAuth,
    /// TLS (required for certificate authentication).
    pub tls: Option<TlsSetup>,
    /// Connects in flight at once.
    pub concurrency: usize,
    /// Times the whole fleet connects (pass 1 cold, later passes warm).
    pub passes: usize,
    /// Keep Alive sent in CONNECT.
    pub keep_alive: u16,
    /// Longest wait for a handshake or CONNACK.
    pub timeout: Duration,
    /// Broker process to sample.
    pub broker_pid: Option<u32>,
    /// Wait at most this long for the broker to go quiet before each pass.
    pub settle: Duration,
    /// Progress lines on stderr.
    pub progress: bool,
}

/// The figures of one pass.
#[derive(Debug, Clone, Serialize)]
pub struct PassStats {
    /// 1-based pass number.
    pub pass: usize,
    /// `cold` (first pass) or `warm`.
    pub cache: &'static str,
    /// `password`, `certificate` or `none`.
    pub auth: &'static str,
    /// Whether TLS was used.
    pub tls: bool,
    /// Negotiated TLS version (of the first connection).
    pub tls_version: Option<String>,
    /// Clients that tried.
    pub devices: usize,
    /// Connects in flight at once.
    pub concurrency: usize,
    /// CONNACKs with success.
    pub connected: usize,
    /// Failures (refused, timed out, I/O).
    pub failed: usize,
    /// The first failure.
    pub first_error: Option<String>,
    /// Seconds from the first connect to the last close.
    pub seconds: f64,
    /// `connected / seconds`.
    pub connect_rate: f64,
    /// Time from starting the TCP connect to the CONNACK, per client (ms).
    pub latency_p50_ms: f64,
    /// 90th percentile (ms).
    pub latency_p90_ms: f64,
    /// 99th percentile (ms).
    pub latency_p99_ms: f64,
    /// Largest (ms).
    pub latency_max_ms: f64,
    /// Broker CPU during the pass (seconds of one core).
    pub broker_cpu_s: Option<f64>,
    /// Broker CPU per successful connect (ms).
    pub broker_cpu_ms_per_connect: Option<f64>,
    /// Harness CPU during the pass (seconds).
    pub harness_cpu_s: f64,
}

/// One client, ready to connect: its pre-encoded CONNECT and TLS configuration.
struct Client {
    connect: Bytes,
    tls: Option<Arc<ClientConfig>>,
}

/// Prepares every client (encoding, parsing keys) before anything is timed.
fn prepare(p: &ConnectParams) -> anyhow::Result<Vec<Client>> {
    if p.auth == ConnectAuth::Certificate && p.tls.is_none() {
        bail!("certificate authentication needs --tls and --ca-file");
    }
    let shared_tls = match (&p.tls, p.auth) {
        (Some(t), ConnectAuth::Password | ConnectAuth::None) => Some(t.config(None)?),
        _ => None,
    };
    let mut out = Vec::with_capacity(p.devices.len());
    for e in &p.devices {
        let (username, password) = match p.auth {
            ConnectAuth::Password => {
                let (Some(u), Some(pw)) = (&e.username, &e.password) else {
                    bail!("device {} has no password in the fleet file", e.client_id);
                };
                (Some(u.clone()), Some(Bytes::from(pw.clone())))
            }
            ConnectAuth::Certificate | ConnectAuth::None => (None, None),
        };
        let connect = mqtt::Connect {
            protocol: p.version,
            clean_start: true,
            keep_alive: p.keep_alive,
            client_id: e.client_id.clone(),
            will: None,
            username,
            password,
            properties: mqtt::ConnectProperties::default(),
        };
        let mut buf = BytesMut::new();
        mqtt::encode(&Packet::Connect(Box::new(connect)), p.version, &mut buf)?;
        let tls = match (&p.tls, p.auth) {
            (Some(t), ConnectAuth::Certificate) => Some(t.config(Some(e))?),
            _ => shared_tls.clone(),
        };
        out.push(Client {
            connect: buf.freeze(),
            tls,
        });
    }
    Ok(out)
}

/// Runs the passes; one result per pass.
pub async fn run(p: &ConnectParams) -> anyhow::Result<Vec<PassStats>> {
    let clients = Arc::new(prepare(p)?);
    let mut disconnect = BytesMut::new();
    mqtt::encode(
        &Packet::Disconnect(Disconnect::default()),
        p.version,
        &mut disconnect,
    )?;
    let disconnect = disconnect.freeze();
    let server_name = p.tls.as_ref().map(|t| t.server_name.clone());
    let mut out = Vec::new();
    for pass in 1..=p.passes.max(1) {
        if let Some(pid) = p.broker_pid {
            super::settle(pid, p.settle).await;
        }
        let broker0 = p.broker_pid.and_then(sys::sample_process);
        let cpu0 = sys::self_cpu();
        let sem = Arc::new(Semaphore::new(p.concurrency.max(1)));
        let done = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        let mut set = JoinSet::new();
        for i in 0..clients.len() {
            let clients = clients.clone();
            let sem = sem.clone();
            let disconnect = disconnect.clone();
            let server_name = server_name.clone();
            let done = done.clone();
            let (addr, version, timeout) = (p.addr, p.version, p.timeout);
            set.spawn(async move {
                let _permit = sem.acquire_owned().await;
                let c = &clients[i];
                let started = Instant::now();
                let r = tokio::time::timeout(
                    timeout,
                    connect_once(addr, c, server_name, version, &disconnect),
                )
                .await
                .unwrap_or_else(|_| Err("timed out".to_string()));
                done.fetch_add(1, Ordering::Relaxed);
                r.map(|tls| (started.elapsed(), tls))
            });
        }
        let progress = p.progress.then(|| {
            let done = done.clone();
            let n = clients.len();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    eprintln!(
                        "[connect] pass {pass}: {}/{n} after {:.0} s",
                        done.load(Ordering::Relaxed),
                        t0.elapsed().as_secs_f64()
                    );
                }
            })
        });
        let mut hist = Latency::new(3)?;
        let (mut connected, mut failed) = (0usize, 0usize);
        let mut first_error = None;
        let mut tls_version = None;
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok((lat, tls))) => {
                    connected += 1;
                    hist.record_ns(u64::try_from(lat.as_nanos()).unwrap_or(u64::MAX));
                    if tls_version.is_none() {
                        tls_version = tls;
                    }
                }
                Ok(Err(e)) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e.to_string());
                }
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        if let Some(h) = progress {
            h.abort();
        }
        let harness_cpu_s = sys::self_cpu().saturating_sub(cpu0).as_secs_f64();
        let broker1 = p.broker_pid.and_then(sys::sample_process);
        let broker_cpu_s = match (broker0, broker1) {
            (Some(a), Some(b)) => Some(b.cpu.saturating_sub(a.cpu).as_secs_f64()),
            _ => None,
        };
        if p.progress {
            eprintln!(
                "[connect] pass {pass}: {connected} connected, {failed} failed in {secs:.2} s \
                 ({:.0}/s)",
                connected as f64 / secs.max(1e-9)
            );
        }
        out.push(PassStats {
            pass,
            cache: if pass == 1 { "cold" } else { "warm" },
            auth: p.auth.name(),
            tls: p.tls.is_some(),
            tls_version,
            devices: clients.len(),
            concurrency: p.concurrency,
            connected,
            failed,
            first_error,
            seconds: secs,
            connect_rate: connected as f64 / secs.max(1e-9),
            latency_p50_ms: hist.quantile_ms(0.5),
            latency_p90_ms: hist.quantile_ms(0.9),
            latency_p99_ms: hist.quantile_ms(0.99),
            latency_max_ms: hist.max_ms(),
            broker_cpu_s,
            broker_cpu_ms_per_connect: broker_cpu_s
                .filter(|_| connected > 0)
                .map(|c| c * 1000.0 / connected as f64),
            harness_cpu_s,
        });
    }
    Ok(out)
}

/// TCP (and TLS) connect, CONNECT, CONNACK, DISCONNECT, close. Returns the TLS version.
async fn connect_once(
    addr: SocketAddr,
    c: &Client,
    server_name: Option<ServerName<'static>>,
    version: ProtocolVersion,
    disconnect: &[u8],
) -> Result<Option<String>, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    tcp.set_nodelay(true)
        .map_err(|e| format!("configuring socket: {e}"))?;
    match (&c.tls, server_name) {
        (Some(cfg), Some(name)) => {
            let tls = TlsConnector::from(cfg.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            let v = tls.get_ref().1.protocol_version().map(|v| format!("{v:?}"));
            mqtt_exchange(tls, &c.connect, version, disconnect).await?;
            Ok(v)
        }
        _ => {
            mqtt_exchange(tcp, &c.connect, version, disconnect).await?;
            Ok(None)
        }
    }
}

async fn mqtt_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    connect: &[u8],
    version: ProtocolVersion,
    disconnect: &[u8],
) -> Result<(), String> {
    s.write_all(connect)
        .await
        .map_err(|e| format!("sending CONNECT: {e}"))?;
    s.flush()
        .await
        .map_err(|e| format!("sending CONNECT: {e}"))?;
    let mut rbuf = BytesMut::with_capacity(64);
    let reply = loop {
        match mqtt::decode(&mut rbuf, version, MAX_INBOUND_PACKET) {
            Ok(Some(p)) => break p,
            Ok(None) => {}
            Err(e) => return Err(format!("undecodable reply: {e}")),
        }
        let n = s
            .read_buf(&mut rbuf)
            .await
            .map_err(|e| format!("reading CONNACK: {e}"))?;
        if n == 0 {
            return Err("the broker closed the connection before CONNACK".into());
        }
    };
    match reply {
        Packet::ConnAck(a) if a.code == 0 => {}
        Packet::ConnAck(a) => {
            return Err(format!(
                "CONNACK {:#04x} ({})",
                a.code,
                connack_name(version, a.code)
            ));
        }
        other => return Err(format!("expected CONNACK, got {}", other.name())),
    }
    s.write_all(disconnect)
        .await
        .map_err(|e| format!("sending DISCONNECT: {e}"))?;
    // Closes the write side (TLS: sends close_notify first).
    let _ = s.shutdown().await;
    Ok(())
}
