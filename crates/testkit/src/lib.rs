//! Test support for Ferrohub's integration tests.
//!
//! [`TestHub`] starts the real hub (the same wiring as `ferrohub serve`) in-process on
//! 127.0.0.1 with port 0 and a temporary data directory; [`RawClient`] speaks MQTT at the byte
//! level for the edge cases client libraries hide. The broker's integration tests live in this
//! crate's `tests/` and drive the hub with independent clients (`rumqttc`, `reqwest`, raw sockets).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use ferrohub::config::{FsyncMode, HubConfig};
use ferrohub::hub::Hub;
use ferrohub_proto::mqtt::{self, Packet, ProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A hub running in this process.
pub struct TestHub {
    hub: Option<Hub>,
    /// MQTT/TCP address.
    pub mqtt: SocketAddr,
    /// MQTT/WebSocket address.
    pub ws: SocketAddr,
    /// HTTP address.
    pub http: SocketAddr,
    /// MQTT/TLS address, when TLS was configured.
    pub mqtts: Option<SocketAddr>,
    /// The data directory (kept until the hub is dropped, so a restart can reuse it).
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

/// The platform admin API token of every test hub.
pub const TEST_ADMIN_TOKEN: &str = "fh_test_admin_token_0123456789";

/// A configuration for tests: every listener on 127.0.0.1:0, anonymous access, persistence in
/// `data_dir` without fsync (tests measure behaviour, not the disk), `$SYS` every second, the
/// admin token [`TEST_ADMIN_TOKEN`], and cheap argon2id parameters (the algorithm is the same;
/// only its memory and time cost are lowered).
pub fn test_config(data_dir: PathBuf) -> HubConfig {
    let mut cfg = HubConfig {
        data_dir,
        allow_anonymous: true,
        admin_token: TEST_ADMIN_TOKEN.into(),
        ..HubConfig::default()
    };
    cfg.registry.password.memory_kib = 1024;
    cfg.registry.password.iterations = 1;
    cfg.listeners.mqtt = "127.0.0.1:0".into();
    cfg.listeners.mqtts = "127.0.0.1:0".into();
    cfg.listeners.ws = "127.0.0.1:0".into();
    cfg.listeners.http = "127.0.0.1:0".into();
    cfg.storage.fsync = FsyncMode::Never;
    cfg.mqtt.sys_interval_secs = 1;
    cfg
}

impl TestHub {
    /// Starts a hub with [`test_config`].
    pub async fn start() -> Result<TestHub> {
        Self::start_with(|_| {}).await
    }

    /// Starts a hub with [`test_config`] adjusted by `f`.
    pub async fn start_with(f: impl FnOnce(&mut HubConfig)) -> Result<TestHub> {
        let tmp = tempfile::tempdir().context("creating a temporary data directory")?;
        let mut cfg = test_config(tmp.path().to_path_buf());
        f(&mut cfg);
        let mut hub = Self::start_config(cfg).await?;
        hub._tmp = Some(tmp);
        Ok(hub)
    }

    /// Starts a hub with exactly `cfg`.
    pub async fn start_config(cfg: HubConfig) -> Result<TestHub> {
        let data_dir = cfg.data_dir.clone();
        let hub = Hub::start(cfg).await?;
        Ok(TestHub {
            mqtt: hub.mqtt_addr.context("no MQTT listener")?,
            ws: hub.ws_addr.context("no WebSocket listener")?,
            http: hub.http_addr.context("no HTTP listener")?,
            mqtts: hub.mqtts_addr,
            hub: Some(hub),
            data_dir,
            _tmp: None,
        })
    }

    /// The running hub.
    pub fn hub(&self) -> &Hub {
        // Present until `stop` consumes self.
        self.hub
            .as_ref()
            .unwrap_or_else(|| unreachable!("hub stopped"))
    }

    /// An HTTP client and the base URL of the operator API (`http://127.0.0.1:port/api/v1`).
    pub fn api_url(&self) -> String {
        format!("http://{}/api/v1", self.http)
    }

    /// Graceful shutdown; returns the temporary directory so a test can restart on the same data.
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        if let Some(hub) = self.hub.take() {
            hub.shutdown().await;
        }
        self._tmp.take()
    }
}

/// A byte-level MQTT client.
pub struct RawClient {
    stream: TcpStream,
    buf: BytesMut,
    /// Protocol version used to encode and decode.
    pub version: ProtocolVersion,
}

impl RawClient {
    /// Connects a TCP socket (no MQTT CONNECT yet).
    pub async fn connect(addr: SocketAddr, version: ProtocolVersion) -> Result<RawClient> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(RawClient {
            stream,
            buf: BytesMut::new(),
            version,
        })
    }

    /// Sends raw bytes.
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// Encodes and sends a packet.
    pub async fn send(&mut self, packet: &Packet) -> Result<()> {
        let mut out = BytesMut::new();
        mqtt::encode(packet, self.version, &mut out)?;
        self.send_bytes(&out).await
    }

    /// Receives the next packet, failing after `within`.
    pub async fn recv(&mut self, within: Duration) -> Result<Packet> {
        match self.recv_or_close(within).await? {
            Some(p) => Ok(p),
            None => bail!("connection closed while waiting for a packet"),
        }
    }

    /// The next packet, or `None` if the server closed the connection; fails after `within`.
    pub async fn recv_or_close(&mut self, within: Duration) -> Result<Option<Packet>> {
        tokio::time::timeout(within, async {
            loop {
                if let Some(p) = mqtt::decode(&mut self.buf, self.version, usize::MAX)? {
                    return Ok(Some(p));
                }
                let mut chunk = [0u8; 4096];
                let n = self.stream.read(&mut chunk).await.unwrap_or_default();
                if n == 0 {
                    return Ok(None);
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .context("timed out waiting for the server")?
    }

    /// Waits until the server closes the connection, returning the packets it sent before.
    pub async fn expect_close(&mut self, within: Duration) -> Result<Vec<Packet>> {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_or_close(left).await? {
                Some(p) => seen.push(p),
                None => return Ok(seen),
            }
        }
    }
}
