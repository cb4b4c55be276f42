//! Wiring: opens the store, builds the broker and binds every listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use ferrohub_adapters::mqtt::{
    AuthConfig, Broker, StaticUsers, Transport, run_listener, spawn_sys_publisher, tls_acceptor,
};
use ferrohub_adapters::shutdown::{Shutdown, ShutdownTrigger};
use ferrohub_store::{BrokerStore, FsyncPolicy, RecoveredState, StoreConfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::{FsyncMode, HubConfig};

/// A running hub.
pub struct Hub {
    /// Bound MQTT/TCP address.
    pub mqtt_addr: Option<SocketAddr>,
    /// Bound MQTT/TLS address.
    pub mqtts_addr: Option<SocketAddr>,
    /// Bound MQTT/WebSocket address.
    pub ws_addr: Option<SocketAddr>,
    /// Bound HTTP address.
    pub http_addr: Option<SocketAddr>,
    /// The broker.
    pub broker: Arc<Broker>,
    trigger: ShutdownTrigger,
    tasks: Vec<JoinHandle<()>>,
}

async fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen for {what} on {addr} (in use? try --{what}-listen 127.0.0.1:0)")
    })?;
    let local = listener.local_addr()?;
    tracing::info!(protocol = what, addr = %local, "listening");
    Ok(listener)
}

impl Hub {
    /// Starts everything `config` asks for.
    pub async fn start(config: HubConfig) -> Result<Hub> {
        let (store, recovered) = if config.storage.persistence {
            std::fs::create_dir_all(&config.data_dir).with_context(|| {
                format!("creating data directory {}", config.data_dir.display())
            })?;
            let store_config = StoreConfig {
                fsync: match config.storage.fsync {
                    FsyncMode::Always => FsyncPolicy::Always,
                    FsyncMode::Never => FsyncPolicy::Never,
                },
                compact_after_bytes: config.storage.compact_after_bytes,
                ..StoreConfig::default()
            };
            let dir = config.data_dir.join("broker");
            let (store, recovered) = BrokerStore::open(&dir, store_config)
                .with_context(|| format!("opening broker state in {}", dir.display()))?;
            for w in &recovered.warnings {
                tracing::warn!(warning = %w, "broker state recovery");
            }
            tracing::info!(
                sessions = recovered.sessions.len(),
                retained = recovered.retained.len(),
                "recovered broker state"
            );
            (store, recovered)
        } else {
            tracing::warn!(
                "persistence is off: sessions and retained messages are lost on restart"
            );
            (BrokerStore::in_memory(), RecoveredState::default())
        };
        if config.allow_anonymous {
            tracing::warn!(
                "anonymous access is on (development mode): any client may connect without credentials"
            );
        }
        let auth = AuthConfig {
            authenticator: Arc::new(StaticUsers::new(
                config
                    .users
                    .iter()
                    .map(|u| (u.username.clone(), u.password.clone())),
                config.allow_anonymous,
            )),
            methods: Vec::new(),
        };
        let (trigger, shutdown) = Shutdown::new();
        let broker = Broker::new(
            config.mqtt.clone(),
            auth,
            store,
            recovered,
            shutdown.clone(),
        );
        let mut tasks = Vec::new();
        let l = &config.listeners;
        let mut hub_addrs = [None; 4];
        if let Some(addr) = HubConfig::addr("mqtt", &l.mqtt)? {
            let listener = bind("mqtt", addr).await?;
            hub_addrs[0] = Some(listener.local_addr()?);
            tasks.push(tokio::spawn(run_listener(
                broker.clone(),
                listener,
                Transport::Tcp,
            )));
        }
        if let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file)
            && let Some(addr) = HubConfig::addr("mqtts", &l.mqtts)?
        {
            let cert_pem = std::fs::read(cert)
                .with_context(|| format!("reading tls.cert_file {}", cert.display()))?;
            let key_pem = std::fs::read(key)
                .with_context(|| format!("reading tls.key_file {}", key.display()))?;
            let ca_pem = match &config.tls.client_ca_file {
                Some(p) => Some(
                    std::fs::read(p)
                        .with_context(|| format!("reading tls.client_ca_file {}", p.display()))?,
                ),
                None => None,
            };
            let acceptor = tls_acceptor(
                &cert_pem,
                &key_pem,
                ca_pem.as_deref(),
                config.tls.require_client_cert,
            )
            .context("building the TLS configuration")?;
            let listener = bind("mqtts", addr).await?;
            hub_addrs[1] = Some(listener.local_addr()?);
            tasks.push(tokio::spawn(run_listener(
                broker.clone(),
                listener,
                Transport::Tls(acceptor),
            )));
        }
        if let Some(addr) = HubConfig::addr("ws", &l.ws)? {
            let listener = bind("ws", addr).await?;
            hub_addrs[2] = Some(listener.local_addr()?);
            tasks.push(tokio::spawn(run_listener(
                broker.clone(),
                listener,
                Transport::WebSocket,
            )));
        }
        let ready = Arc::new(AtomicBool::new(false));
        if let Some(addr) = HubConfig::addr("http", &l.http)? {
            let listener = bind("http", addr).await?;
            hub_addrs[3] = Some(listener.local_addr()?);
            let b = broker.clone();
            let state = ferrohub_api::ApiState {
                ready: ready.clone(),
                metrics: Arc::new(move |out: &mut String| b.render_metrics(out)),
            };
            let mut sd = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) =
                    ferrohub_api::serve(listener, ferrohub_api::router(state), async move {
                        sd.wait().await
                    })
                    .await
                {
                    tracing::error!(error = %e, "HTTP server failed");
                }
            }));
        }
        if let Some(t) = spawn_sys_publisher(broker.clone()) {
            tasks.push(t);
        }
        ready.store(true, Ordering::Relaxed);
        Ok(Hub {
            mqtt_addr: hub_addrs[0],
            mqtts_addr: hub_addrs[1],
            ws_addr: hub_addrs[2],
            http_addr: hub_addrs[3],
            broker,
            trigger,
            tasks,
        })
    }

    /// Graceful shutdown: stop accepting, disconnect clients (v5: reason Server shutting down),
    /// persist state, stop every task.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        self.trigger.trigger();
        self.broker
            .shutdown_gracefully(Duration::from_secs(5))
            .await;
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        tracing::info!("stopped");
    }
}
