//! `ferrohub sim run` over its other transports and with provisioning, against a real hub
//! in-process: bounded runs over TLS, mutual TLS (each device its own certificate), WebSocket and
//! WebSocket over TLS (through a TLS-terminating proxy) deliver exactly the expected PUBACKs and
//! stored points; wrong trust or paths fail with a reason; `--provision` registers the devices
//! through the API, they connect with their own generated passwords, a second run reuses them
//! (resetting the passwords), and tokens without the operator role are refused with a reason.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::stored_points;
use ferrohub_sim::sim::{RunArgs, Summary};
use ferrohub_testkit::{TEST_ADMIN_TOKEN, TestHub};

/// Every run gives up after this long instead of hanging.
const BOUND: Duration = Duration::from_secs(60);

fn args(addr: SocketAddr, flags: &str) -> RunArgs {
    common::sim_args(addr, flags)
}

async fn try_run(a: &RunArgs) -> anyhow::Result<Summary> {
    common::try_sim_run(a, BOUND).await
}

async fn run(a: &RunArgs) -> Summary {
    try_run(a).await.unwrap()
}

/// Every device of `prefix-0..n` stored `samples` points of the environment profile's metrics.
fn check_stored(hub: &TestHub, prefix: &str, n: u64, samples: usize) {
    for i in 0..n {
        for metric in ["temperature", "humidity", "battery_v"] {
            let points = stored_points(hub, &format!("{prefix}-{i}"), metric);
            assert_eq!(points.len(), samples, "{prefix}-{i} {metric}: {points:?}");
        }
    }
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

/// A CA and a server certificate for `localhost` signed by it, as PEM files; and another CA that
/// signed nothing the hub presents.
fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let ca = |name: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
    };
    let hub_ca = ca("sim transports test CA");
    let other_ca = ca("some other CA");
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &hub_ca)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), hub_ca.pem()).unwrap();
    std::fs::write(dir.path().join("other-ca.pem"), other_ca.pem()).unwrap();
    std::fs::write(dir.path().join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();
    Pki { dir }
}

async fn tls_hub(pki: &Pki, f: impl FnOnce(&mut ferrohub::config::HubConfig)) -> TestHub {
    TestHub::start_with(|cfg| {
        cfg.tls.cert_file = Some(pki.path("server.pem"));
        cfg.tls.key_file = Some(pki.path("server.key"));
        f(cfg);
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_runs_deliver_every_message_and_untrusted_servers_are_refused() {
    let pki = pki();
    let hub = tls_hub(&pki, |_| {}).await;
    let mqtts = hub.mqtts.unwrap();

    // Trusting the hub's CA (--ca), the certificate's name given by --server-name.
    let flags = format!(
        "--transport tls --ca {} --server-name localhost --devices 10 --prefix tls \
         --messages-per-device 5 --interval 10ms --connect-rate 0 --seed 3",
        pki.arg("ca.pem")
    );
    let s = run(&args(mqtts, &flags)).await;
    assert_eq!((s.connected, s.failed_connects), (10, 0), "{s:?}");
    assert_eq!(
        (s.messages_sent, s.messages_acked, s.errors),
        (50, 50, 0),
        "{s:?}"
    );
    assert_eq!(s.broker, format!("mqtts://{mqtts}"));
    check_stored(&hub, "tls", 10, 5);

    // MQTT 3.1.1 with --insecure (no CA at all), QoS 0: sent and stored.
    let s = run(&args(
        mqtts,
        "--transport tls --insecure --protocol v3 --qos 0 --devices 3 --prefix tls-insecure \
         --messages-per-device 4 --interval 10ms --connect-rate 0",
    ))
    .await;
    assert_eq!(
        (s.connected, s.messages_sent, s.errors),
        (3, 12, 0),
        "{s:?}"
    );

    // A CA that did not sign the hub's certificate: no device connects, the reason is given.
    let flags = format!(
        "--transport tls --ca {} --server-name localhost --devices 2 --prefix tls-bad \
         --messages-per-device 1",
        pki.arg("other-ca.pem")
    );
    let s = run(&args(mqtts, &flags)).await;
    assert_eq!((s.connected, s.failed_connects), (0, 2), "{s:?}");
    let e = s.first_error.unwrap();
    assert!(
        e.contains("TLS handshake") && e.contains("certificate"),
        "{e}"
    );

    // TLS flags without a TLS transport are a usage error.
    let e = try_run(&args(hub.mqtt, "--insecure --devices 1"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("--transport tls or wss"), "{e}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_runs_deliver_every_message() {
    let hub = TestHub::start().await.unwrap();
    // MQTT 5 over WebSocket at the hub's /mqtt, batches of 3 samples (larger packets).
    let s = run(&args(
        hub.ws,
        "--transport ws --devices 10 --prefix ws --messages-per-device 5 --interval 10ms \
         --batch 3 --connect-rate 0 --seed 5",
    ))
    .await;
    assert_eq!((s.connected, s.failed_connects), (10, 0), "{s:?}");
    assert_eq!(
        (s.messages_sent, s.messages_acked, s.errors),
        (50, 50, 0),
        "{s:?}"
    );
    assert_eq!(s.broker, format!("ws://{}/mqtt", hub.ws));
    check_stored(&hub, "ws", 10, 15);

    // MQTT 3.1.1 over WebSocket.
    let s = run(&args(
        hub.ws,
        "--transport ws --protocol v3 --devices 4 --prefix ws3 --messages-per-device 3 \
         --interval 10ms --connect-rate 0",
    ))
    .await;
    assert_eq!(
        (s.connected, s.messages_acked, s.errors),
        (4, 12, 0),
        "{s:?}"
    );
    check_stored(&hub, "ws3", 4, 3);

    // A path the hub does not serve: refused, and the summary says so.
    let s = run(&args(
        hub.ws,
        "--transport ws --ws-path /nope --devices 1 --prefix ws-bad --messages-per-device 1",
    ))
    .await;
    assert_eq!(s.connected, 0, "{s:?}");
    let e = s.first_error.unwrap();
    assert!(
        e.contains("WebSocket handshake") && e.contains("404"),
        "{e}"
    );
    hub.stop().await;
}

/// A TLS-terminating proxy in front of `target` (as a load balancer in front of the hub's
/// WebSocket listener would be): the hub serves WebSocket without TLS.
async fn tls_proxy(pki: &Pki, target: SocketAddr) -> SocketAddr {
    let acceptor = ferrohub_adapters::mqtt::tls_acceptor(
        &std::fs::read(pki.path("server.pem")).unwrap(),
        &std::fs::read(pki.path("server.key")).unwrap(),
        None,
        false,
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let (Ok(mut tls), Ok(mut up)) = (
                    acceptor.accept(tcp).await,
                    tokio::net::TcpStream::connect(target).await,
                ) else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_tls_delivers_every_message() {
    let pki = pki();
    let hub = TestHub::start().await.unwrap();
    let proxy = tls_proxy(&pki, hub.ws).await;
    let flags = format!(
        "--transport wss --ca {} --server-name localhost --devices 5 --prefix wss \
         --messages-per-device 4 --interval 10ms --connect-rate 0",
        pki.arg("ca.pem")
    );
    let s = run(&args(proxy, &flags)).await;
    assert_eq!((s.connected, s.failed_connects), (5, 0), "{s:?}");
    assert_eq!(
        (s.messages_sent, s.messages_acked, s.errors),
        (20, 20, 0),
        "{s:?}"
    );
    assert_eq!(s.broker, format!("wss://{proxy}/mqtt"));
    check_stored(&hub, "wss", 5, 4);
    hub.stop().await;
}

fn fleet_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioned_devices_connect_with_their_own_credentials_and_are_reused() {
    // No anonymous access: only the registry's credentials let devices in.
    let hub = TestHub::start_with(|cfg| cfg.allow_anonymous = false)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fleet1 = dir.path().join("fleet1.jsonl");
    let api = format!("http://{}", hub.http);
    let provision = |out: &Path, more: &str| {
        format!(
            "--provision --api {api} --token {TEST_ADMIN_TOKEN} --fleet-out {} --devices 6 \
             --first-index 10 --prefix prov --messages-per-device 3 --interval 10ms \
             --connect-rate 0 --profile environment:1 --profile smart-meter:1 {more}",
            out.display()
        )
    };
    let s = run(&args(hub.mqtt, &provision(&fleet1, ""))).await;
    assert_eq!((s.connected, s.failed_connects), (6, 0), "{s:?}");
    assert_eq!((s.messages_acked, s.errors), (18, 0), "{s:?}");

    // The devices exist, tagged, each with one password credential.
    let http = reqwest::Client::new();
    for i in 10..16 {
        let d: serde_json::Value = http
            .get(format!(
                "{}/tenants/default/devices/prov-{i}",
                hub.api_url()
            ))
            .bearer_auth(TEST_ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(d["tags"]["sim"], "true", "{d}");
        assert!(
            ["environment", "smart-meter"].contains(&d["tags"]["profile"].as_str().unwrap()),
            "{d}"
        );
    }
    // The fleet file: one line per device, in index order, with the secrets, owner-only.
    let lines = fleet_lines(&fleet1);
    assert_eq!(lines.len(), 6);
    assert_eq!(lines[0]["client_id"], "prov-10");
    assert_eq!(lines[5]["username"], "prov-15");
    assert!(
        lines
            .iter()
            .all(|l| l["password"].as_str().unwrap().len() >= 32)
    );
    #[cfg(unix)]
    assert_eq!(mode(&fleet1), 0o600);

    // A later run reads the file (no API involved).
    let flags = format!(
        "--fleet {} --messages-per-device 2 --interval 10ms --connect-rate 0",
        fleet1.display()
    );
    let s = run(&args(hub.mqtt, &flags)).await;
    assert_eq!((s.connected, s.messages_acked), (6, 12), "{s:?}");

    // Provisioning again reuses the devices: new passwords, the old ones stop working.
    let fleet2 = dir.path().join("fleet2.jsonl");
    let s = run(&args(hub.mqtt, &provision(&fleet2, ""))).await;
    assert_eq!((s.connected, s.messages_acked), (6, 18), "{s:?}");
    assert_ne!(fleet_lines(&fleet2)[0]["password"], lines[0]["password"]);
    let s = run(&args(hub.mqtt, &flags)).await;
    assert_eq!(s.connected, 0, "old passwords must be reset: {s:?}");

    // Telemetry of both provisioning runs and the file run: 3 + 2 + 3 messages per device.
    for i in [10, 15] {
        let device = format!("prov-{i}");
        // Each device has one of the two profiles: count both profiles' first metric.
        let total: usize = ["temperature", "power"]
            .iter()
            .map(|m| stored_points(&hub, &device, m).len())
            .sum();
        assert_eq!(total, 8, "{device}");
    }

    // A wrong token: the error says which token is needed.
    let bad = format!(
        "--provision --api {api} --token fh_wrong --devices 1 --prefix prov-bad \
         --messages-per-device 1"
    );
    let e = format!("{:#}", try_run(&args(hub.mqtt, &bad)).await.unwrap_err());
    assert!(e.contains("401") && e.contains("FERROHUB_TOKEN"), "{e}");
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_each_devices_own_certificate() {
    let pki = pki();
    // Client certificates required; no anonymous access, so the certificate is the credential.
    let hub = tls_hub(&pki, |cfg| {
        cfg.tls.require_client_cert = true;
        cfg.allow_anonymous = false;
    })
    .await;
    let mqtts = hub.mqtts.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fleet = dir.path().join("fleet.jsonl");
    // Provisioned with certificates from the tenant's built-in CA, then run over TLS.
    let flags = format!(
        "--provision --provision-certs --api http://{} --token {TEST_ADMIN_TOKEN} \
         --fleet-out {} --transport tls --ca {} --server-name localhost --devices 4 \
         --prefix mtls --messages-per-device 3 --interval 10ms --connect-rate 0",
        hub.http,
        fleet.display(),
        pki.arg("ca.pem")
    );
    let s = run(&args(mqtts, &flags)).await;
    assert_eq!(
        (s.connected, s.messages_acked, s.errors),
        (4, 12, 0),
        "{s:?}"
    );
    check_stored(&hub, "mtls", 4, 3);

    // The certificates alone: the fleet file without user names and passwords.
    let certs_only = dir.path().join("certs-only.jsonl");
    let text: String = fleet_lines(&fleet)
        .into_iter()
        .map(|mut l| {
            assert!(
                l["cert_pem"]
                    .as_str()
                    .unwrap()
                    .contains("BEGIN CERTIFICATE")
            );
            let o = l.as_object_mut().unwrap();
            o.remove("username");
            o.remove("password");
            format!("{l}\n")
        })
        .collect();
    std::fs::write(&certs_only, text).unwrap();
    let flags = format!(
        "--fleet {} --transport tls --ca {} --server-name localhost --messages-per-device 2 \
         --interval 10ms --connect-rate 0",
        certs_only.display(),
        pki.arg("ca.pem")
    );
    let s = run(&args(mqtts, &flags)).await;
    assert_eq!(
        (s.connected, s.messages_acked, s.errors),
        (4, 8, 0),
        "{s:?}"
    );

    // Without a client certificate the handshake is refused.
    let flags = format!(
        "--transport tls --ca {} --server-name localhost --devices 1 --prefix mtls-none \
         --messages-per-device 1",
        pki.arg("ca.pem")
    );
    let s = run(&args(mqtts, &flags)).await;
    assert_eq!(s.connected, 0, "{s:?}");
    hub.stop().await;
}

/// Creates an API token of `role` confined to `tenant`; returns its secret.
async fn token(hub: &TestHub, role: &str, tenant: &str) -> String {
    let v: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/tokens", hub.api_url()))
        .bearer_auth(TEST_ADMIN_TOKEN)
        .json(&serde_json::json!({"name": format!("sim-{role}"), "role": role, "tenant": tenant}))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    v["secret"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_in_a_tenant_needs_its_operator_token() {
    let hub = TestHub::start_with(|cfg| cfg.allow_anonymous = false)
        .await
        .unwrap();
    reqwest::Client::new()
        .post(format!("{}/tenants", hub.api_url()))
        .bearer_auth(TEST_ADMIN_TOKEN)
        .json(&serde_json::json!({"id": "acme"}))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    let viewer = token(&hub, "viewer", "acme").await;
    let operator = token(&hub, "operator", "acme").await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("acme.jsonl");
    let flags = |token: &str| {
        format!(
            "--provision --api http://{} --token {token} --tenant acme --fleet-out {} \
             --devices 3 --prefix acme --messages-per-device 2 --interval 10ms --connect-rate 0",
            hub.http,
            out.display()
        )
    };

    // A viewer token: refused, and the error names the role needed.
    let e = format!(
        "{:#}",
        try_run(&args(hub.mqtt, &flags(&viewer))).await.unwrap_err()
    );
    assert!(e.contains("403") && e.contains("operator"), "{e}");
    assert!(!out.exists());

    // The tenant's operator token: devices connect as acme/<id> with their own passwords.
    let s = run(&args(hub.mqtt, &flags(&operator))).await;
    assert_eq!(
        (s.connected, s.messages_acked, s.errors),
        (3, 6, 0),
        "{s:?}"
    );
    let lines = fleet_lines(&out);
    assert_eq!(lines[2]["username"], "acme/acme-2");
    hub.stop().await;
}
