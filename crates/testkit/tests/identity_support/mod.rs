//! Helpers for the identity and access tests (`identity.rs`): a hub that authenticates against
//! the device registry, tenants and devices with passwords, CONNECTs from a chosen loopback
//! source address, TLS material (the hub's server certificate, external device CAs built with
//! rcgen) and audit-log polling.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferrohub::config::HubConfig;
use ferrohub_proto::mqtt::{self, ConnAck, Connect, Packet, ProtocolVersion};
use ferrohub_registry::model::{AuditEvent, AuditQuery, DeviceSpec, Quotas, Role, TenantSettings};
use ferrohub_registry::{Actor, Registry};
use ferrohub_testkit::TestHub;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

use super::common::{WAIT, connect_packet, m5};

/// The hub itself as the acting operator (platform admin, no source address).
pub fn sys() -> Actor {
    Actor::system()
}

/// An operator acting from `source` (as the API would record it), platform-wide admin.
pub fn operator_from(name: &str, source: &str) -> Actor {
    Actor {
        name: name.into(),
        role: Role::Admin,
        tenant: None,
        source: Some(source.into()),
    }
}

/// Starts a hub that authenticates every client against the registry (no anonymous access),
/// adjusted by `f`. Failed-auth back-off is effectively off (all clients of a test come from
/// 127.0.0.1 and would otherwise throttle each other); the throttling test sets its own.
pub async fn secured_hub(f: impl FnOnce(&mut HubConfig)) -> TestHub {
    TestHub::start_with(|cfg| {
        cfg.allow_anonymous = false;
        cfg.registry.auth_backoff.free_failures = 10_000;
        f(cfg);
    })
    .await
    .unwrap()
}

/// The hub's registry.
pub fn registry(hub: &TestHub) -> &Arc<Registry> {
    &hub.hub().registry
}

/// Creates a tenant with default settings.
pub async fn add_tenant(hub: &TestHub, id: &str) {
    add_tenant_with(hub, id, TenantSettings::default()).await;
}

/// Creates a tenant with these quotas.
pub async fn add_tenant_with_quotas(hub: &TestHub, id: &str, quotas: Quotas) {
    let settings = TenantSettings {
        quotas,
        ..TenantSettings::default()
    };
    add_tenant_with(hub, id, settings).await;
}

async fn add_tenant_with(hub: &TestHub, id: &str, settings: TenantSettings) {
    registry(hub)
        .create_tenant(&sys(), id, None, settings)
        .await
        .unwrap();
}

/// Registers device `id` in `tenant` (no credential).
pub async fn add_bare_device(hub: &TestHub, tenant: &str, id: &str) {
    add_device_spec(
        hub,
        tenant,
        DeviceSpec {
            id: id.into(),
            ..DeviceSpec::default()
        },
    )
    .await;
}

/// Registers a device from a full spec.
pub async fn add_device_spec(hub: &TestHub, tenant: &str, spec: DeviceSpec) {
    registry(hub)
        .create_device(&sys(), tenant, spec)
        .await
        .unwrap();
}

/// The password every device made by [`add_device`] gets (tenant and id make it unique).
pub fn password_of(tenant: &str, id: &str) -> String {
    format!("pw-{tenant}-{id}-0123")
}

/// Registers device `id` in `tenant` with the password [`password_of`] and returns it.
pub async fn add_device(hub: &TestHub, tenant: &str, id: &str) -> String {
    add_bare_device(hub, tenant, id).await;
    let pw = password_of(tenant, id);
    registry(hub)
        .add_password(&sys(), tenant, id, Some(pw.clone()), None)
        .await
        .unwrap();
    pw
}

/// The MQTT user name of a device: `tenant/device`.
pub fn username(tenant: &str, device: &str) -> String {
    format!("{tenant}/{device}")
}

/// rumqttc 5.0 options logging in as `tenant/device` with `secret`, client id = device id.
pub fn v5_device(
    hub: &TestHub,
    tenant: &str,
    device: &str,
    secret: &str,
) -> rumqttc::v5::MqttOptions {
    let mut o = super::common::v5_opts(hub, device);
    o.set_credentials(username(tenant, device), secret);
    o
}

/// rumqttc 3.1.1 options logging in as `tenant/device` with `secret`, client id = device id.
pub fn v4_device(hub: &TestHub, tenant: &str, device: &str, secret: &str) -> rumqttc::MqttOptions {
    let mut o = super::common::v4_opts(hub, device);
    o.set_credentials(username(tenant, device), secret);
    o
}

/// A CONNECT with these credentials.
pub fn login_packet(
    version: ProtocolVersion,
    client_id: &str,
    user: Option<&str>,
    password: Option<&[u8]>,
) -> Connect {
    let mut c = connect_packet(version, client_id);
    c.username = user.map(str::to_string);
    c.password = password.map(Bytes::copy_from_slice);
    c
}

/// Sends `connect` from 127.0.0.1 and returns the CONNACK code (the socket is then dropped).
pub async fn connack_code(addr: SocketAddr, connect: Connect) -> u8 {
    connect_from([127, 0, 0, 1].into(), addr, connect)
        .await
        .0
        .code
}

/// The CONNACK code of a login as `tenant/device` with `secret` (client id = device id).
pub async fn login_code(
    hub: &TestHub,
    version: ProtocolVersion,
    tenant: &str,
    device: &str,
    secret: &str,
) -> u8 {
    let user = username(tenant, device);
    connack_code(
        hub.mqtt,
        login_packet(version, device, Some(&user), Some(secret.as_bytes())),
    )
    .await
}

/// Sends `connect` over a TCP connection whose local end is bound to `local` (any address of
/// 127.0.0.0/8 works on Linux), and returns the CONNACK with the local socket address the hub
/// saw. The connection is dropped afterwards.
pub async fn connect_from(
    local: IpAddr,
    addr: SocketAddr,
    connect: Connect,
) -> (ConnAck, SocketAddr) {
    let version = connect.protocol;
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(local, 0)).unwrap();
    let mut stream = tokio::time::timeout(WAIT, socket.connect(addr))
        .await
        .expect("TCP connect timed out")
        .unwrap();
    let me = stream.local_addr().unwrap();
    let mut out = BytesMut::new();
    mqtt::encode(&Packet::Connect(Box::new(connect)), version, &mut out).unwrap();
    stream.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let ack = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(p) = mqtt::decode(&mut buf, version, usize::MAX).unwrap() {
                return p;
            }
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed before CONNACK");
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("no CONNACK within 5 s");
    match ack {
        Packet::ConnAck(a) => (a, me),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// The numeric value of a rumqttc 5.0 CONNACK refusal.
pub fn refusal_code(e: &rumqttc::v5::ConnectionError) -> Option<u8> {
    use m5::ConnectReturnCode as C;
    match e {
        rumqttc::v5::ConnectionError::ConnectionRefused(code) => Some(match code {
            C::Success => 0x00,
            C::UnspecifiedError => 0x80,
            C::BadUserNamePassword => 0x86,
            C::NotAuthorized => 0x87,
            C::ServerUnavailable => 0x88,
            C::QuotaExceeded => 0x97,
            _ => 0xff,
        }),
        _ => None,
    }
}

/// The numeric value of a rumqttc 5.0 SUBACK reason.
pub fn suback_code(c: &m5::SubscribeReasonCode) -> u8 {
    use m5::SubscribeReasonCode as S;
    match c {
        S::Success(q) => *q as u8,
        S::Unspecified | S::Failure => 0x80,
        S::NotAuthorized => 0x87,
        S::TopicFilterInvalid => 0x8f,
        S::QuotaExceeded => 0x97,
        _ => 0xff,
    }
}

/// Polls the audit log until `pred` holds for the events matching `q` (security events are
/// written in the background), and returns them.
pub async fn wait_audit(
    hub: &TestHub,
    q: AuditQuery,
    what: &str,
    pred: impl Fn(&[AuditEvent]) -> bool,
) -> Vec<AuditEvent> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let events = registry(hub).query_audit(&sys(), q.clone()).await.unwrap();
        if pred(&events) {
            return events;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("audit log never showed {what}; last: {events:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A tag map from pairs.
pub fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

/// Makes aws-lc-rs the process-wide rustls provider (rumqttc's TLS transport needs one).
pub fn install_crypto_provider() {
    let _ = rumqttc::tokio_rustls::rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The hub's server certificate (for 127.0.0.1 and localhost) and the CA clients trust it by,
/// as files in a temporary directory.
pub struct ServerPki {
    dir: tempfile::TempDir,
    /// The CA that signed the server certificate (PEM).
    pub ca_pem: String,
}

impl ServerPki {
    /// Generates the CA and the server certificate.
    pub fn new() -> ServerPki {
        let ca = TestCa::new("ferrohub test server CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let server =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap()
                .signed_by(&key, &ca.issuer)
                .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("server.pem"), server.pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
        ServerPki {
            dir,
            ca_pem: ca.pem.clone(),
        }
    }

    /// Points the hub's TLS listener at the server certificate (client certificates optional).
    pub fn configure(&self, cfg: &mut HubConfig) {
        cfg.tls.cert_file = Some(self.dir.path().join("server.pem"));
        cfg.tls.key_file = Some(self.dir.path().join("server.key"));
    }
}

/// rumqttc 5.0 options for the hub's TLS listener, trusting `pki`, presenting `client` (cert
/// PEM, key PEM) if given, without user name.
pub fn tls_v5(
    hub: &TestHub,
    pki: &ServerPki,
    client_id: &str,
    client: Option<(&str, &str)>,
) -> rumqttc::v5::MqttOptions {
    let addr = hub.mqtts.expect("TLS listener");
    let mut o = rumqttc::v5::MqttOptions::new(client_id, "127.0.0.1", addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Simple {
            ca: pki.ca_pem.clone().into_bytes(),
            alpn: None,
            client_auth: client.map(|(c, k)| (c.as_bytes().to_vec(), k.as_bytes().to_vec())),
        },
    ));
    o
}

/// A certificate authority made with rcgen, standing for a customer's or a factory's CA.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    /// Its certificate (PEM).
    pub pem: String,
}

/// A leaf certificate and its key (PEM).
pub struct Leaf {
    /// Certificate.
    pub cert_pem: String,
    /// PKCS#8 private key.
    pub key_pem: String,
}

impl TestCa {
    /// A self-signed CA named `name`.
    pub fn new(name: &str) -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pem = issuer.pem();
        TestCa { issuer, pem }
    }

    /// A client certificate with subject CN `cn`, valid now.
    pub fn issue(&self, cn: &str) -> Leaf {
        self.issue_with(cn, |_| {})
    }

    /// A client certificate with subject CN `cn` that expired in 2021.
    pub fn issue_expired(&self, cn: &str) -> Leaf {
        self.issue_with(cn, |p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        })
    }

    fn issue_with(&self, cn: &str, f: impl FnOnce(&mut rcgen::CertificateParams)) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        f(&mut params);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}
