//! Claim-based fleet provisioning over MQTT, end to end with rumqttc: a device connects with the
//! shared claim credential, asks for a certificate, and reconnects over mTLS as itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use ferrohub_registry::Actor;
use ferrohub_registry::model::{DeviceSpec, ProvisioningTemplate};
use ferrohub_registry::policy::PolicyDocument;
use ferrohub_registry::provisioning::ProvisioningResponse;
use ferrohub_testkit::TestHub;
use rumqttc::v5::mqttbytes::QoS as Q5;

const CLAIM_POLICY: &str = r#"{"version":1,"statements":[
  {"effect":"allow","actions":["connect"],"resources":["*"]},
  {"effect":"allow","actions":["publish"],"resources":["$provisioning/factory/request/${client.id}"]},
  {"effect":"allow","actions":["subscribe","receive"],"resources":["$provisioning/factory/response/${client.id}"]}
]}"#;

struct ServerPki {
    dir: tempfile::TempDir,
    ca_pem: String,
}

fn server_pki() -> ServerPki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "server CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
    ServerPki {
        dir,
        ca_pem: ca.pem(),
    }
}

async fn hub_with_claims(pki: &ServerPki) -> TestHub {
    let _ = rumqttc::tokio_rustls::rustls::crypto::aws_lc_rs::default_provider().install_default();
    let hub = TestHub::start_with(|cfg| {
        cfg.allow_anonymous = false;
        cfg.registry.allow_http_webhooks = true;
        cfg.tls.cert_file = Some(pki.dir.path().join("server.pem"));
        cfg.tls.key_file = Some(pki.dir.path().join("server.key"));
    })
    .await
    .unwrap();
    let r = &hub.hub().registry;
    let admin = Actor::system();
    r.put_policy(
        &admin,
        "default",
        "claim",
        PolicyDocument::from_json(CLAIM_POLICY).unwrap(),
    )
    .await
    .unwrap();
    r.put_template(
        &admin,
        "default",
        ProvisioningTemplate {
            name: "factory".into(),
            device_type: None,
            tags: [("line".to_string(), "a".to_string())].into(),
            groups: Vec::new(),
            policy: None,
            cert_validity_days: 30,
            approval_webhook: None,
        },
    )
    .await
    .unwrap();
    r.create_device(
        &admin,
        "default",
        DeviceSpec {
            id: "claim-factory".into(),
            policy: Some("claim".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    r.add_password(
        &admin,
        "default",
        "claim-factory",
        Some("claim-secret-123".into()),
        None,
    )
    .await
    .unwrap();
    hub
}

async fn request(hub: &TestHub, client_id: &str, body: serde_json::Value) -> ProvisioningResponse {
    let mut o = v5_opts(hub, client_id);
    o.set_credentials("claim-factory", "claim-secret-123");
    let mut c = V5::connect(o).await;
    let codes = c
        .subscribe(
            &format!("$provisioning/factory/response/{client_id}"),
            Q5::AtLeastOnce,
        )
        .await;
    assert_eq!(
        codes,
        vec![rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(
            Q5::AtLeastOnce
        )]
    );
    c.client
        .publish(
            format!("$provisioning/factory/request/{client_id}"),
            Q5::AtLeastOnce,
            false,
            serde_json::to_vec(&body).unwrap(),
        )
        .await
        .unwrap();
    let p = c.recv_publish().await;
    serde_json::from_slice(&p.payload).unwrap()
}

fn mtls_opts(
    hub: &TestHub,
    pki: &ServerPki,
    id: &str,
    cert: &str,
    key: &str,
) -> rumqttc::v5::MqttOptions {
    let addr = hub.mqtts.expect("TLS listener");
    let mut o = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Simple {
            ca: pki.ca_pem.clone().into_bytes(),
            alpn: None,
            client_auth: Some((cert.as_bytes().to_vec(), key.as_bytes().to_vec())),
        },
    ));
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_provisioning_issues_a_certificate_the_device_then_connects_with() {
    let pki = server_pki();
    let hub = hub_with_claims(&pki).await;
    let answer = request(
        &hub,
        "sn-0042",
        serde_json::json!({ "device_id": "sn-0042" }),
    )
    .await;
    let ProvisioningResponse::Accepted {
        device_id,
        certificate_pem,
        private_key_pem,
        ca_pem,
    } = answer
    else {
        panic!("provisioning rejected: {answer:?}");
    };
    assert_eq!(device_id, "sn-0042");
    assert!(ca_pem.contains("BEGIN CERTIFICATE"));
    let key = private_key_pem.expect("a key pair was generated");
    // The device exists, registered from the template.
    let d = hub
        .hub()
        .registry
        .device(&Actor::system(), "default", "sn-0042")
        .await
        .unwrap();
    assert_eq!(d.tags.get("line").map(String::as_str), Some("a"));
    // And connects over mTLS as itself, confined to its own topics by the default policy.
    let mut dev = V5::connect(mtls_opts(&hub, &pki, "sn-0042", &certificate_pem, &key)).await;
    let own = dev.subscribe("devices/sn-0042/cmd", Q5::AtLeastOnce).await;
    assert_eq!(
        own,
        vec![rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(
            Q5::AtLeastOnce
        )]
    );
    let other = dev
        .subscribe("devices/claim-factory/#", Q5::AtLeastOnce)
        .await;
    assert_eq!(
        other,
        vec![rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::NotAuthorized]
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_provisioning_signs_a_csr_and_refuses_bad_requests() {
    let pki = server_pki();
    let hub = hub_with_claims(&pki).await;
    // A CSR asking for another identity still yields a certificate for the requested device id.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "admin");
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let answer = request(
        &hub,
        "sn-0043",
        serde_json::json!({ "device_id": "sn-0043", "csr_pem": csr }),
    )
    .await;
    let ProvisioningResponse::Accepted {
        certificate_pem,
        private_key_pem,
        ..
    } = answer
    else {
        panic!("provisioning rejected: {answer:?}");
    };
    assert!(private_key_pem.is_none(), "the device keeps its own key");
    let mut dev = V5::connect(mtls_opts(
        &hub,
        &pki,
        "sn-0043",
        &certificate_pem,
        &key.serialize_pem(),
    ))
    .await;
    dev.subscribe("devices/sn-0043/cmd", Q5::AtLeastOnce).await;

    // A device id that exists already is refused; so are malformed requests.
    for (client, body) in [
        ("c1", serde_json::json!({ "device_id": "sn-0043" })),
        ("c2", serde_json::json!({ "device_id": "bad/id" })),
        ("c3", serde_json::json!({ "nope": 1 })),
        (
            "c4",
            serde_json::json!({ "device_id": "sn-0044", "csr_pem": "garbage" }),
        ),
    ] {
        let answer = request(&hub, client, body).await;
        assert!(
            matches!(answer, ProvisioningResponse::Rejected { .. }),
            "{client}: {answer:?}"
        );
    }
    // The refused CSR left no half-registered device behind.
    assert!(
        hub.hub()
            .registry
            .device(&Actor::system(), "default", "sn-0044")
            .await
            .is_err()
    );
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_credential_cannot_read_another_devices_answer() {
    let pki = server_pki();
    let hub = hub_with_claims(&pki).await;
    let mut o = v5_opts(&hub, "snoop");
    o.set_credentials("claim-factory", "claim-secret-123");
    let mut c = V5::connect(o).await;
    let codes = c
        .subscribe("$provisioning/factory/response/+", Q5::AtLeastOnce)
        .await;
    assert_eq!(
        codes,
        vec![rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::NotAuthorized]
    );
    hub.stop().await;
}

/// A one-route HTTP server answering every request with `status`; returns its URL and the bodies
/// it received.
async fn approval_server(status: u16) -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/approve", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read the head and the Content-Length body.
                loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            let _ = tx.send(body.to_string());
                            break;
                        }
                    }
                }
                let answer = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    (url, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_approval_webhook_decides() {
    let pki = server_pki();
    let hub = hub_with_claims(&pki).await;
    for (status, approved) in [(403u16, false), (200, true)] {
        let (url, mut seen) = approval_server(status).await;
        hub.hub()
            .registry
            .put_template(
                &Actor::system(),
                "default",
                ProvisioningTemplate {
                    name: "factory".into(),
                    device_type: None,
                    tags: Default::default(),
                    groups: Vec::new(),
                    policy: None,
                    cert_validity_days: 30,
                    approval_webhook: Some(url),
                },
            )
            .await
            .unwrap();
        let id = format!("sn-hook-{status}");
        let answer = request(&hub, &id, serde_json::json!({ "device_id": id })).await;
        let body: serde_json::Value = serde_json::from_str(&seen.recv().await.unwrap()).unwrap();
        assert_eq!(body["device_id"], id.as_str());
        assert_eq!(body["template"], "factory");
        assert_eq!(body["tenant"], "default");
        assert_eq!(
            matches!(answer, ProvisioningResponse::Accepted { .. }),
            approved,
            "HTTP {status}: {answer:?}"
        );
        let exists = hub
            .hub()
            .registry
            .device(&Actor::system(), "default", &id)
            .await
            .is_ok();
        assert_eq!(exists, approved);
    }
    hub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_webhooks_are_refused_by_default() {
    let hub = TestHub::start().await.unwrap();
    let e = hub
        .hub()
        .registry
        .put_template(
            &Actor::system(),
            "default",
            ProvisioningTemplate {
                name: "t".into(),
                device_type: None,
                tags: Default::default(),
                groups: Vec::new(),
                policy: None,
                cert_validity_days: 30,
                approval_webhook: Some("http://169.254.169.254/latest".into()),
            },
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("https"), "{e}");
    hub.stop().await;
}
