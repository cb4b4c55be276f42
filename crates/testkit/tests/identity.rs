//! Identity and access, end to end: devices authenticate against the registry (passwords, JWTs,
//! client certificates from tenant CAs, just-in-time registration), policies decide what each
//! session may publish, subscribe and receive, tenants are isolated, and operator actions
//! (disable, revoke, policy change, rotation) take effect on live sessions. Quotas, brute-force
//! back-off and the audit log are checked from the outside: MQTT reason codes, `/metrics` and
//! `query_audit`. Every client is an independent implementation (rumqttc 3.1.1 and 5.0, or raw
//! packets for exact reason codes).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod identity_support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use ferrohub::config::UserEntry;
use ferrohub_proto::mqtt::{self, Packet, ProtocolVersion};
use ferrohub_registry::jwt::{DeviceClaims, TokenSigner};
use ferrohub_registry::model::{
    AuditQuery, AuditResult, DevicePatch, DeviceSpec, DeviceStatus, ProvisioningTemplate, Quotas,
};
use ferrohub_registry::policy::PolicyDocument;
use ferrohub_registry::service::TokenKeyDoc;
use ferrohub_testkit::TestHub;
use ferrohub_types::QoS as FQoS;
use identity_support::*;

const MQTT5: ProtocolVersion = ProtocolVersion::V5;
const MQTT311: ProtocolVersion = ProtocolVersion::V311;

/// Bound for a whole test.
const TEST_LIMIT: Duration = Duration::from_secs(60);

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_LIMIT, f)
        .await
        .expect("test did not finish within 60 s");
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Asserts a v5 QoS 1 publish was accepted (0x00, or 0x10 when nobody subscribes).
fn assert_accepted(r: Option<m5::PubAckReason>) {
    let code = puback_code(r);
    assert!(matches!(code, 0x00 | 0x10), "PUBACK 0x{code:02x}");
}

/// A v5 client's PUBACK reason as a number.
fn puback_code(r: Option<m5::PubAckReason>) -> u8 {
    match r.expect("QoS 1 publish has a PUBACK") {
        m5::PubAckReason::Success => 0x00,
        m5::PubAckReason::NoMatchingSubscribers => 0x10,
        m5::PubAckReason::NotAuthorized => 0x87,
        m5::PubAckReason::QuotaExceeded => 0x97,
        other => panic!("unexpected PUBACK reason {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. ACL matrix and tenant isolation
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_matrix_and_tenant_isolation() {
    bounded(async {
        let hub = secured_hub(|_| {}).await;
        add_tenant(&hub, "tx").await;
        add_tenant(&hub, "ty").await;
        let pa = add_device(&hub, "tx", "dev-a").await;
        let pb = add_device(&hub, "tx", "dev-b").await;
        // Same device id as A, another tenant, another password.
        let pc = add_device(&hub, "ty", "dev-a").await;

        let mut a = V5::connect(v5_device(&hub, "tx", "dev-a", &pa)).await;
        let mut b = V5::connect(v5_device(&hub, "tx", "dev-b", &pb)).await;
        let mut c = V5::connect(v5_device(&hub, "ty", "dev-a", &pc)).await;

        // Own topics: allowed.
        for (client, filter) in [
            (&mut a, "devices/dev-a/#"),
            (&mut b, "devices/dev-b/#"),
            (&mut c, "devices/dev-a/#"),
        ] {
            let codes = client.subscribe(filter, m5::QoS::AtLeastOnce).await;
            assert_eq!(
                codes.iter().map(suback_code).collect::<Vec<_>>(),
                [1],
                "{filter}"
            );
        }
        let codes = a.subscribe("$devices/dev-a/cmd", m5::QoS::AtMostOnce).await;
        assert_eq!(
            suback_code(&codes[0]),
            0,
            "$devices/{{id}}/# is the device's too"
        );
        let r = a
            .publish("devices/dev-a/t", m5::QoS::AtLeastOnce, false, b"mine")
            .await;
        assert_accepted(r);
        let p = a.recv_publish().await;
        assert_eq!(
            (topic5(&p).as_str(), p.payload.as_ref()),
            ("devices/dev-a/t", &b"mine"[..])
        );

        // Another device's topic: PUBACK 0x87 and nothing delivered.
        let r = a
            .publish("devices/dev-b/x", m5::QoS::AtLeastOnce, false, b"forged")
            .await;
        assert_eq!(puback_code(r), 0x87, "publish on another device's topic");
        // QoS 0 has no acknowledgement, but must be dropped all the same.
        a.publish("devices/dev-b/x", m5::QoS::AtMostOnce, false, b"forged0")
            .await;

        // Subscriptions beyond the device's own subtree: SUBACK 0x87.
        for filter in [
            "devices/dev-b/#",
            "devices/#",
            "#",
            "+/dev-b/x",
            "+/+/x",
            "$devices/dev-b/#",
        ] {
            let codes = a.subscribe(filter, m5::QoS::AtLeastOnce).await;
            assert_eq!(suback_code(&codes[0]), 0x87, "SUBACK for {filter}");
        }
        // 3.1.1 has no reason codes: the SUBACK failure code is 0x80.
        let user = username("tx", "dev-a");
        let (mut raw4, ack) = raw_connect_with(
            hub.mqtt,
            login_packet(MQTT311, "dev-a", Some(&user), Some(pa.as_bytes())),
        )
        .await;
        assert_eq!(ack.code, 0);
        // (That took over A's session: same tenant, same client id. Reconnect A at the end.)
        assert_eq!(
            raw_subscribe(&mut raw4, 1, "devices/dev-b/#", FQoS::AtLeastOnce).await,
            [0x80]
        );
        assert_eq!(
            raw_subscribe(&mut raw4, 2, "#", FQoS::AtMostOnce).await,
            [0x80]
        );
        // 3.1.1 publish to a foreign topic: acknowledged (no negative PUBACK) but dropped.
        raw4.send(&publish_packet(
            "devices/dev-b/x",
            FQoS::AtLeastOnce,
            3,
            b"forged4",
        ))
        .await
        .unwrap();
        match raw_wait(&mut raw4, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await {
            Packet::PubAck(ack) => assert_eq!(ack.packet_id, 3),
            _ => unreachable!(),
        }
        b.expect_no_publish(QUIET).await;

        // A's credentials with B's client id: CONNACK 0x87 (3.1.1: 5), and B keeps its session.
        let code = connack_code(
            hub.mqtt,
            login_packet(MQTT5, "dev-b", Some(&user), Some(pa.as_bytes())),
        )
        .await;
        assert_eq!(code, 0x87, "client id of another device");
        let code = connack_code(
            hub.mqtt,
            login_packet(MQTT311, "dev-b", Some(&user), Some(pa.as_bytes())),
        )
        .await;
        assert_eq!(code, 5, "client id of another device (3.1.1)");
        let r = b
            .publish("devices/dev-b/still", m5::QoS::AtLeastOnce, false, b"here")
            .await;
        assert_accepted(r);
        assert_eq!(topic5(&b.recv_publish().await), "devices/dev-b/still");
        assert!(!b.is_closed(), "the refused client kicked B");

        // Tenant isolation: C (tenant ty, id dev-a) publishes on the very topic A (tenant tx)
        // subscribes to. C's own subscription sees it, A's does not.
        drop(raw4);
        drop(a);
        let mut a = V5::connect(v5_device(&hub, "tx", "dev-a", &pa)).await;
        let codes = a.subscribe("devices/dev-a/#", m5::QoS::AtLeastOnce).await;
        assert_eq!(suback_code(&codes[0]), 1);
        let r = c
            .publish("devices/dev-a/t", m5::QoS::AtLeastOnce, true, b"from ty")
            .await;
        assert_accepted(r);
        let p = c.recv_publish().await;
        assert_eq!(p.payload.as_ref(), b"from ty");
        a.expect_no_publish(QUIET).await;
        // Not even as a retained message for a new subscription in tx.
        let mut a2 = V5::connect(v5_device(&hub, "tx", "dev-a", &pa)).await;
        a2.subscribe("devices/dev-a/t", m5::QoS::AtLeastOnce).await;
        a2.expect_no_publish(QUIET).await;
        // And the other way round: tx's A is not seen by ty's C.
        let r = a2
            .publish("devices/dev-a/t", m5::QoS::AtLeastOnce, false, b"from tx")
            .await;
        assert_accepted(r);
        assert_eq!(a2.recv_publish().await.payload.as_ref(), b"from tx");
        c.expect_no_publish(QUIET).await;
        hub.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2. Bad credentials
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_unknown_device_look_the_same() {
    bounded(async {
        let hub = secured_hub(|_| {}).await;
        add_tenant(&hub, "tx").await;
        let pw = add_device(&hub, "tx", "dev-a").await;
        add_bare_device(&hub, "tx", "no-cred").await;

        assert_eq!(
            login_code(&hub, MQTT5, "tx", "dev-a", &pw).await,
            0,
            "right password"
        );
        let padded = format!("{pw} ");
        let refused = [
            ("tx", "dev-a", "wrong-password"),
            ("tx", "dev-a", &pw[..pw.len() - 1]),
            ("tx", "dev-a", padded.as_str()),
            ("tx", "ghost", pw.as_str()),
            ("tx", "no-cred", "anything-at-all"),
            ("nope", "dev-a", pw.as_str()),
            // The device exists in tx, not in the default tenant.
            ("default", "dev-a", pw.as_str()),
        ];
        for (tenant, device, secret) in refused {
            assert_eq!(
                login_code(&hub, MQTT5, tenant, device, secret).await,
                0x86,
                "{tenant}/{device} with {secret:?}"
            );
            assert_eq!(
                login_code(&hub, MQTT311, tenant, device, secret).await,
                4,
                "3.1.1 {tenant}/{device} with {secret:?}"
            );
        }
        // Without the tenant prefix the user name means the default tenant.
        let c = login_packet(MQTT5, "dev-a", Some("dev-a"), Some(pw.as_bytes()));
        assert_eq!(connack_code(hub.mqtt, c).await, 0x86);
        // No credentials at all.
        assert_eq!(
            connack_code(hub.mqtt, login_packet(MQTT5, "dev-a", None, None)).await,
            0x86
        );
        let c = login_packet(MQTT5, "dev-a", Some(&username("tx", "dev-a")), None);
        assert_eq!(connack_code(hub.mqtt, c).await, 0x86);

        // rumqttc sees the same refusal.
        match V4::try_connect(v4_device(&hub, "tx", "ghost", "whatever-pw")).await {
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                assert_eq!(code, rumqttc::ConnectReturnCode::BadUserNamePassword)
            }
            Err(e) => panic!("unexpected error {e:?}"),
            Ok(_) => panic!("unknown device accepted"),
        }
        match V5::try_connect(v5_device(&hub, "tx", "dev-a", "wrong-password")).await {
            Err(e) => assert_eq!(refusal_code(&e), Some(0x86), "{e:?}"),
            Ok(_) => panic!("wrong password accepted"),
        }
        // Still fine for the right password afterwards.
        let mut ok = V5::connect(v5_device(&hub, "tx", "dev-a", &pw)).await;
        ok.subscribe("devices/dev-a/#", m5::QoS::AtMostOnce).await;
        let text = metrics(&hub).await;
        assert!(metric(&text, "ferrohub_auth_total{result=\"failure\"}").unwrap() >= 14.0);
        assert!(metric(&text, "ferrohub_auth_total{result=\"success\"}").unwrap() >= 2.0);
        hub.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 3. JWTs
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_tokens() {
    bounded(async {
        let hub = secured_hub(|_| {}).await;
        let reg = registry(&hub);
        add_tenant(&hub, "tx").await;
        add_tenant(&hub, "ty").await;
        add_bare_device(&hub, "tx", "dev-a").await;
        add_bare_device(&hub, "tx", "dev-b").await;
        add_bare_device(&hub, "ty", "dev-a").await;

        // A hub-issued token is a password.
        let token = reg
            .issue_device_token(&sys(), "tx", "dev-a", 300)
            .await
            .unwrap();
        let mut a = V5::connect(v5_device(&hub, "tx", "dev-a", &token)).await;
        let r = a
            .publish("devices/dev-a/t", m5::QoS::AtLeastOnce, false, b"jwt")
            .await;
        assert_accepted(r);
        drop(a);
        assert_eq!(login_code(&hub, MQTT311, "tx", "dev-a", &token).await, 0);

        // Another device's token, and the same device id in another tenant: refused.
        let token_b = reg
            .issue_device_token(&sys(), "tx", "dev-b", 300)
            .await
            .unwrap();
        assert_eq!(login_code(&hub, MQTT5, "tx", "dev-a", &token_b).await, 0x86);
        assert_eq!(login_code(&hub, MQTT5, "ty", "dev-a", &token).await, 0x86);
        // A tampered token (claims of dev-b, signature of dev-a's token).
        let mut parts: Vec<&str> = token.split('.').collect();
        let b_parts: Vec<&str> = token_b.split('.').collect();
        parts[1] = b_parts[1];
        assert_eq!(
            login_code(&hub, MQTT5, "tx", "dev-b", &parts.join(".")).await,
            0x86
        );

        // A key the tenant registered verifies tokens signed elsewhere (e.g. by a backend).
        let fleet = TokenSigner::generate().unwrap();
        reg.put_tenant_token_key(
            &sys(),
            "tx",
            "fleet-backend",
            TokenKeyDoc {
                pem: Some(fleet.public_key_pem()),
                jwks: None,
            },
        )
        .await
        .unwrap();
        let now = now_secs();
        let fresh = fleet
            .issue(&DeviceClaims::new("dev-a", Some("tx".into()), now, 600))
            .unwrap();
        assert_eq!(
            login_code(&hub, MQTT5, "tx", "dev-a", &fresh).await,
            0,
            "registered key"
        );
        // Expired well beyond the allowed clock skew.
        let expired = fleet
            .issue(&DeviceClaims::new(
                "dev-a",
                Some("tx".into()),
                now - 7200,
                3600,
            ))
            .unwrap();
        assert_eq!(
            login_code(&hub, MQTT5, "tx", "dev-a", &expired).await,
            0x86,
            "expired token"
        );
        assert_eq!(login_code(&hub, MQTT311, "tx", "dev-a", &expired).await, 4);
        // Issued for another tenant.
        let other_tenant = fleet
            .issue(&DeviceClaims::new("dev-a", Some("ty".into()), now, 600))
            .unwrap();
        assert_eq!(
            login_code(&hub, MQTT5, "tx", "dev-a", &other_tenant).await,
            0x86
        );
        // The tenant's key is not trusted by another tenant.
        let no_ten = fleet
            .issue(&DeviceClaims::new("dev-a", None, now, 600))
            .unwrap();
        assert_eq!(login_code(&hub, MQTT5, "tx", "dev-a", &no_ten).await, 0);
        assert_eq!(login_code(&hub, MQTT5, "ty", "dev-a", &no_ten).await, 0x86);
        // Signed by a key nobody registered.
        let stranger = TokenSigner::generate().unwrap();
        let forged = stranger
            .issue(&DeviceClaims::new("dev-a", Some("tx".into()), now, 600))
            .unwrap();
        assert_eq!(
            login_code(&hub, MQTT5, "tx", "dev-a", &forged).await,
            0x86,
            "unknown key"
        );
        hub.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 4. Client certificates
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates() {
    install_crypto_provider();
    bounded(async {
        let pki = ServerPki::new();
        let hub = secured_hub(|cfg| pki.configure(cfg)).await;
        let reg = registry(&hub);
        add_tenant(&hub, "tx").await;
        add_tenant(&hub, "ty").await;
        add_bare_device(&hub, "tx", "dev-d").await;
        add_bare_device(&hub, "tx", "dev-e").await;

        // A certificate from the tenant's built-in CA: identity = CN, tenant = the CA's.
        let (cred, issued) = reg
            .issue_certificate(&sys(), "tx", "dev-d", None, None)
            .await
            .unwrap();
        let d_cert = issued.cert_pem.clone();
        let d_key = issued.key_pem.clone().unwrap();
        let mut d = V5::connect(tls_v5(&hub, &pki, "dev-d", Some((&d_cert, &d_key)))).await;
        let codes = d.subscribe("devices/dev-d/#", m5::QoS::AtLeastOnce).await;
        assert_eq!(suback_code(&codes[0]), 1);
        let r = d
            .publish("devices/dev-d/t", m5::QoS::AtLeastOnce, false, b"mtls")
            .await;
        assert_accepted(r);
        assert_eq!(d.recv_publish().await.payload.as_ref(), b"mtls");
        // The policy still applies to certificate sessions.
        let r = d
            .publish("devices/dev-e/t", m5::QoS::AtLeastOnce, false, b"x")
            .await;
        assert_eq!(puback_code(r), 0x87);
        // The certificate names the device: another client id is refused.
        match V5::try_connect(tls_v5(&hub, &pki, "dev-e", Some((&d_cert, &d_key)))).await {
            Err(e) => assert_eq!(refusal_code(&e), Some(0x87), "{e:?}"),
            Ok(_) => panic!("certificate of dev-d accepted for client id dev-e"),
        }
        // Issuing for another device of the tenant keeps the built-in CA (and so dev-d's
        // certificate) valid, and the CA devices are told to trust is the one that signs.
        add_bare_device(&hub, "tx", "dev-f").await;
        let ca_before = reg.builtin_ca_pem(&sys(), "tx").await.unwrap();
        let (_, f_issued) = reg
            .issue_certificate(&sys(), "tx", "dev-f", None, None)
            .await
            .unwrap();
        assert_eq!(
            reg.builtin_ca_pem(&sys(), "tx").await.unwrap(),
            ca_before,
            "the tenant's built-in CA changed when a certificate was issued"
        );
        let f_key = f_issued.key_pem.clone().unwrap();
        V5::connect(tls_v5(
            &hub,
            &pki,
            "dev-f",
            Some((&f_issued.cert_pem, &f_key)),
        ))
        .await;
        drop(d);
        let mut d =
            match V5::try_connect(tls_v5(&hub, &pki, "dev-d", Some((&d_cert, &d_key)))).await {
                Ok(c) => c,
                Err(e) => {
                    panic!("dev-d's certificate no longer accepted after dev-f's was issued: {e:?}")
                }
            };
        let codes = d.subscribe("devices/dev-d/#", m5::QoS::AtLeastOnce).await;
        assert_eq!(suback_code(&codes[0]), 1);

        // A certificate from a CA nobody registered: the handshake fails.
        let rogue = TestCa::new("rogue CA");
        let leaf = rogue.issue("dev-d");
        match V5::try_connect(tls_v5(
            &hub,
            &pki,
            "dev-d",
            Some((&leaf.cert_pem, &leaf.key_pem)),
        ))
        .await
        {
            Err(e) => assert_eq!(refusal_code(&e), None, "should fail in TLS: {e:?}"),
            Ok(_) => panic!("certificate from an unregistered CA accepted"),
        }

        // An external CA registered for tx: valid certificates connect, expired ones do not.
        let acme = TestCa::new("ACME devices");
        reg.register_ca(&sys(), "tx", "acme", &acme.pem, false, None)
            .await
            .unwrap();
        let e_leaf = acme.issue("dev-e");
        let e = V5::connect(tls_v5(
            &hub,
            &pki,
            "dev-e",
            Some((&e_leaf.cert_pem, &e_leaf.key_pem)),
        ))
        .await;
        drop(e);
        let old = acme.issue_expired("dev-e");
        match V5::try_connect(tls_v5(
            &hub,
            &pki,
            "dev-e",
            Some((&old.cert_pem, &old.key_pem)),
        ))
        .await
        {
            Err(e) => assert_eq!(refusal_code(&e), None, "should fail in TLS: {e:?}"),
            Ok(_) => panic!("expired certificate accepted"),
        }
        // Unknown CN from a registered (non-JITR) CA: 0x86.
        let unknown = acme.issue("not-registered");
        match V5::try_connect(tls_v5(
            &hub,
            &pki,
            "not-registered",
            Some((&unknown.cert_pem, &unknown.key_pem)),
        ))
        .await
        {
            Err(e) => assert_eq!(refusal_code(&e), Some(0x86), "{e:?}"),
            Ok(_) => panic!("certificate of an unknown device accepted"),
        }

        // Pinning: dev-d has an issued (pinned) certificate, so another valid certificate with
        // CN dev-d from a registered CA is refused.
        let d_other = acme.issue("dev-d");
        match V5::try_connect(tls_v5(
            &hub,
            &pki,
            "dev-d",
            Some((&d_other.cert_pem, &d_other.key_pem)),
        ))
        .await
        {
            Err(e) => assert_eq!(refusal_code(&e), Some(0x86), "{e:?}"),
            Ok(_) => panic!("unpinned certificate accepted for a device with pinned ones"),
        }

        // Another tenant's CA vouches only for that tenant: ty's dev-d is not tx's dev-d.
        add_bare_device(&hub, "ty", "dev-d").await;
        let (_, ty_issued) = reg
            .issue_certificate(&sys(), "ty", "dev-d", None, None)
            .await
            .unwrap();
        let mut ty_d = V5::connect(tls_v5(
            &hub,
            &pki,
            "dev-d",
            Some((&ty_issued.cert_pem, ty_issued.key_pem.as_deref().unwrap())),
        ))
        .await;
        let r = ty_d
            .publish("devices/dev-d/t", m5::QoS::AtLeastOnce, false, b"from ty")
            .await;
        assert_accepted(r);
        d.expect_no_publish(QUIET).await;
        assert!(!d.is_closed(), "ty's dev-d took over tx's dev-d session");

        // Revoking the certificate closes the session and refuses it from then on.
        reg.revoke_credential(&sys(), "tx", "dev-d", &cred.id)
            .await
            .unwrap();
        let reason = server_disconnect_reason(d.wait_closed(Duration::from_secs(2)).await);
        assert_eq!(reason, Some(0x87), "revoked certificate's session");
        match V5::try_connect(tls_v5(&hub, &pki, "dev-d", Some((&d_cert, &d_key)))).await {
            Err(e) => assert_eq!(refusal_code(&e), Some(0x87), "{e:?}"),
            Ok(_) => panic!("revoked certificate accepted"),
        }
        // A new certificate for the device works again.
        let (_, renewed) = reg
            .issue_certificate(&sys(), "tx", "dev-d", None, None)
            .await
            .unwrap();
        let key = renewed.key_pem.unwrap();
        V5::connect(tls_v5(&hub, &pki, "dev-d", Some((&renewed.cert_pem, &key)))).await;
        hub.stop().await;
    })
    .await;
}

/// Revoking one certificate by fingerprint ends the sessions that use it and refuses it from
/// then on, for every device of the tenant; other devices' sessions are not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_certificate_touches_only_its_sessions() {
    install_crypto_provider();
    bounded(async {
        let pki = ServerPki::new();
        let hub = secured_hub(|cfg| pki.configure(cfg)).await;
        let reg = registry(&hub);
        add_tenant(&hub, "tx").await;
        add_bare_device(&hub, "tx", "dev-c").await;
        let pw = add_device(&hub, "tx", "dev-p").await;
        let (_, issued) = reg
            .issue_certificate(&sys(), "tx", "dev-c", None, None)
            .await
            .unwrap();
        let key = issued.key_pem.clone().unwrap();
        let mut c = V5::connect(tls_v5(&hub, &pki, "dev-c", Some((&issued.cert_pem, &key)))).await;
        let mut p = V5::connect(v5_device(&hub, "tx", "dev-p", &pw)).await;
        p.subscribe("devices/dev-p/#", m5::QoS::AtLeastOnce).await;

        reg.revoke_certificate(
            &sys(),
            "tx",
            &issued.info.fingerprint_sha256,
            "key compromised",
        )
        .await
        .unwrap();
        let reason = server_disconnect_reason(c.wait_closed(Duration::from_secs(2)).await);
        assert_eq!(reason, Some(0x87));
        match V5::try_connect(tls_v5(&hub, &pki, "dev-c", Some((&issued.cert_pem, &key)))).await {
            Err(e) => assert_eq!(refusal_code(&e), Some(0x87), "{e:?}"),
            Ok(_) => panic!("revoked certificate accepted"),
        }
        // dev-p, which never used that certificate, is still connected and working.
        p.expect_no_publish(QUIET).await;
        assert!(
            !p.is_closed(),
            "a password session was closed by a certificate revocation"
        );
        let r = p
            .publish(
                "devices/dev-p/t",
                m5::QoS::AtLeastOnce,
                false,
                b"still here",
            )
            .await;
        assert_accepted(r);
        assert_eq!(p.recv_publish().await.payload.as_ref(), b"still here");
        assert!(
            !p.is_closed(),
            "a password session was closed by a certificate revocation"
        );
        hub.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 5. Just-in-time registration
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn just_in_time_registration() {
    install_crypto_provider();
    bounded(async {
        let pki = ServerPki::new();
        let hub = secured_hub(|cfg| pki.configure(cfg)).await;
        let reg = registry(&hub);
        add_tenant(&hub, "tx").await;
        // The template's policy also lets devices publish on their site's topics.
        let policy = PolicyDocument::from_json(
            r#"{"version": 1, "statements": [
                {"effect": "allow", "actions": ["connect"], "resources": ["${device.id}"]},
                {"effect": "allow", "actions": ["publish", "subscribe", "receive"],
                 "resources": ["devices/${device.id}/#", "sites/${device.tags.site}/#"]}
            ]}"#,
        )
        .unwrap();
        reg.put_policy(&sys(), "tx", "site-devices", policy)
            .await
            .unwrap();
        reg.put_template(
            &sys(),
            "tx",
            ProvisioningTemplate {
                name: "factory-line".into(),
                device_type: None,
                tags: tags(&[("site", "plant-7"), ("source", "jitr")]),
                groups: Vec::new(),
                policy: Some("site-devices".into()),
                cert_validity_days: 365,
                approval_webhook: None,
            },
        )
        .await
        .unwrap();
        let factory = TestCa::new("Factory CA");
        reg.register_ca(
            &sys(),
            "tx",
            "factory",
            &factory.pem,
            true,
            Some("factory-line".into()),
        )
        .await
        .unwrap();
        let closed = TestCa::new("Closed CA");
        reg.register_ca(&sys(), "tx", "closed", &closed.pem, false, None)
            .await
            .unwrap();

        // A CA without JITR does not register unknown devices.
        let leaf = closed.issue("sensor-41");
        match V5::try_connect(tls_v5(
            &hub,
            &pki,
            "sensor-41",
            Some((&leaf.cert_pem, &leaf.key_pem)),
        ))
        .await
        {
            Err(e) => assert_eq!(refusal_code(&e), Some(0x86), "{e:?}"),
            Ok(_) => panic!("unknown device registered by a non-JITR CA"),
        }
        assert!(reg.device(&sys(), "tx", "sensor-41").await.is_err());

        // The JITR CA does.
        let leaf = factory.issue("sensor-42");
        let mut s = V5::connect(tls_v5(
            &hub,
            &pki,
            "sensor-42",
            Some((&leaf.cert_pem, &leaf.key_pem)),
        ))
        .await;
        let device = reg.device(&sys(), "tx", "sensor-42").await.unwrap();
        assert_eq!(device.tenant, "tx");
        assert_eq!(device.status, DeviceStatus::Enabled);
        assert_eq!(device.tags.get("site").map(String::as_str), Some("plant-7"));
        assert_eq!(device.tags.get("source").map(String::as_str), Some("jitr"));
        assert_eq!(device.policy.as_deref(), Some("site-devices"));
        // The template's policy is in force on the new session.
        let codes = s.subscribe("sites/plant-7/#", m5::QoS::AtLeastOnce).await;
        assert_eq!(suback_code(&codes[0]), 1);
        let r = s
            .publish("sites/plant-7/temp", m5::QoS::AtLeastOnce, false, b"21.5")
            .await;
        assert_accepted(r);
        assert_eq!(s.recv_publish().await.payload.as_ref(), b"21.5");
        let r = s
            .publish("sites/plant-8/temp", m5::QoS::AtLeastOnce, false, b"x")
            .await;
        assert_eq!(puback_code(r), 0x87);
        drop(s);
        // Registration is recorded, and a second connect finds the device (no duplicate).
        wait_audit(
            &hub,
            AuditQuery {
                tenant: Some("tx".into()),
                action: Some("device.provision".into()),
                ..AuditQuery::default()
            },
            "device.provision for sensor-42",
            |ev| ev.len() == 1 && ev[0].target == "sensor-42",
        )
        .await;
        V5::connect(tls_v5(
            &hub,
            &pki,
            "sensor-42",
            Some((&leaf.cert_pem, &leaf.key_pem)),
        ))
        .await;
        hub.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 6. Disable / enable
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_a_device_disconnects_it() {
    bounded(async {
        let hub = secured_hub(|_| {}).await;
        let reg = registry(&hub);
        add_tenant(&hub, "tx").await;
        let pw = add_device(&hub, "tx", "dev-a").await;
        let mut a = V5::connect(v5_device(&hub, "tx", "dev-a", &pw)).await;
        a.subscribe("devices/dev-a/#", m5::QoS::AtLeastOnce).await;

        let started = Instant::now();
        reg.update_device(
            &sys(),
            "tx",
            "dev-a",
            DevicePatch {
                status: Some(DeviceStatus::Disabled),
                ..DevicePatch::default()
            },
        )
        .await
        .unwrap();
        let reason = server_disconnect_reason(a.wait_closed(Duration::from_secs(2)).await);
        assert_eq!(reason, Some(0x87), "DISCONNECT reason");
        assert!(started.elapsed() < Duration::from_secs(2));

        assert_eq!(login_code(&hub, MQTT5, "tx", "dev-a", &pw).await, 0x87);
        assert_eq!(login_code(&hub, MQTT311, "tx", "dev-a", &pw).await, 5);
        let token = reg
            .issue_device_token(&sys(), "tx", "dev-a", 300)
            .await
            .unwrap();
        assert_eq!(
            login_code(&hub, MQTT5, "tx", "dev-a", &token).await,
            0x87,
            "token too"
        );

        reg.update_device(
            &sys(),
            "tx",
            "dev-a",
            DevicePatch {
                status: Some(DeviceStatus::Enabled),
                ..DevicePatch::default()
            },
        )
        .await
        .unwrap();
        let mut a = V5::connect(v5_device(&hub, "tx", "dev-a", &pw)).await;
        let r = a
            .publish("devices/dev-a/t", m5::QoS::AtLeastOnce, false, b"back")
            .await;
        assert_accepted(r);
        hub.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 7. Policy changes reach live sessions
// ---------------------------------------------------------------------------------------------

fn shared_policy(with_shared: bool) -> PolicyDocument {
    let extra = if with_shared { r#", "shared/#""# } else { "" };
    PolicyDocument::from_json(&format!(
        r#"{{"version": 1, "statements": [
            {{"effect": "allow", "actions": ["connect"], "resources": ["${{device.id}}"]}},
            {{"effect": "allow", "actions": ["publish", "subscribe", "receive"],
              "resources": ["devices/${{device.id}}/#"{extra}]}}
        ]}}"#
    ))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_change_applies_to_live_sessions() {
    bounded(async {
        let hub = secured_hub(|cfg| {
            cfg.users = vec![UserEntry {
                username: "backend".into(),
                password: "backend-secret".into(),
            }];
        })
        .await;
        let reg = registry(&hub);
        reg.put_policy(&sys(), "default", "with-shared", shared_policy(true))
            .await
            .unwrap();
        add_device_spec(
            &hub,
            "default",
            DeviceSpec {
                id: "dev-p".into(),
                policy: Some("with-shared".into()),
                ..DeviceSpec::default()
            },
        )
        .await;
        let pw = password_of("default", "dev-p");
        reg.add_password(&sys(), "default", "dev-p", Some(pw.clone()), None)
            .await
            .unwrap();
        // Default tenant: the user name is the bare device id.
        let mut o = v5_opts(&hub, "dev-p");
        o.set_credentials("dev-p", pw.as_str());
        let mut dev = V5::connect(o).await;
        let mut o = v5_opts(&hub, &uid("backend"));
        o.set_credentials("backend", "backend-secret");
        let mut backend = V5::connect(o).await;

        for filter in ["devices/dev-p/#", "shared/#"] {
            let codes = dev.subscribe(filter, m5::QoS::AtLeastOnce).await;
            assert_eq!(suback_code(&codes[0]), 1, "{filter}");
        }
        backend
            .publish("shared/x", m5::QoS::AtLeastOnce, false, b"before")
            .await;
        let p = dev.recv_publish().await;
        assert_eq!(
            (topic5(&p).as_str(), p.payload.as_ref()),
            ("shared/x", &b"before"[..])
        );
        let r = dev
            .publish("shared/y", m5::QoS::AtLeastOnce, false, b"dev")
            .await;
        assert_accepted(r); // shared/# allowed before the change
        // (dev subscribes to shared/# itself.)
        assert_eq!(topic5(&dev.recv_publish().await), "shared/y");

        reg.put_policy(&sys(), "default", "with-shared", shared_policy(false))
            .await
            .unwrap();

        // Published after the change: shared/x is no longer delivered, its own topic still is
        // (messages of one publisher reach a subscriber in order, so the second one arriving
        // first shows the first was dropped, not late).
        backend
            .publish("shared/x", m5::QoS::AtLeastOnce, false, b"after")
            .await;
        backend
            .publish("devices/dev-p/cmd", m5::QoS::AtLeastOnce, false, b"cmd")
            .await;
        let p = dev.recv_publish().await;
        assert_eq!(
            (topic5(&p).as_str(), p.payload.as_ref()),
            ("devices/dev-p/cmd", &b"cmd"[..]),
            "shared/x delivered after the policy removed it"
        );
        dev.expect_no_publish(QUIET).await;
        for qos in [m5::QoS::AtMostOnce, m5::QoS::ExactlyOnce] {
            backend.publish("shared/x", qos, false, b"after").await;
        }
        dev.expect_no_publish(QUIET).await;
        // Publishing and subscribing there are refused too.
        let r = dev
            .publish("shared/y", m5::QoS::AtLeastOnce, false, b"dev")
            .await;
        assert_eq!(puback_code(r), 0x87);
        let codes = dev.subscribe("shared/z/#", m5::QoS::AtLeastOnce).await;
        assert_eq!(suback_code(&codes[0]), 0x87);
        assert!(!dev.is_closed(), "a policy change must not disconnect");
        let text = metrics(&hub).await;
        assert!(
            metric(
                &text,
                "ferrohub_mqtt_messages_dropped_total{reason=\"not_authorized\"}"
            )
            .unwrap()
                >= 1.0
        );

        // Restoring the policy restores delivery.
        reg.put_policy(&sys(), "default", "with-shared", shared_policy(true))
            .await
            .unwrap();
        backend
            .publish("shared/x", m5::QoS::AtLeastOnce, false, b"again")
            .await;
        let p = dev.recv_publish().await;
        assert_eq!(
            (topic5(&p).as_str(), p.payload.as_ref()),
            ("shared/x", &b"again"[..])
        );
        hub.stop().await;
    })
    .await;
}

/// A default-tenant device `id` under the named policy, with its password; and a static user
/// `backend` (full access to the default tenant) connected and subscribed to `devices/#`.
async fn device_and_backend(hub: &TestHub, id: &str, policy: Option<&str>) -> (String, V5) {
    add_device_spec(
        hub,
        "default",
        DeviceSpec {
            id: id.into(),
            policy: policy.map(str::to_string),
            ..DeviceSpec::default()
        },
    )
    .await;
    let pw = password_of("default", id);
    registry(hub)
        .add_password(&sys(), "default", id, Some(pw.clone()), None)
        .await
        .unwrap();
    let mut o = v5_opts(hub, &uid("backend"));
    o.set_credentials("backend", "backend-secret");
    let mut backend = V5::connect(o).await;
    let codes = backend.subscribe("devices/#", m5::QoS::AtLeastOnce).await;
    assert_eq!(suback_code(&codes[0]), 1);
    (pw, backend)
}

fn backend_user(cfg: &mut ferrohub::config::HubConfig) {
    cfg.users = vec![UserEntry {
        username: "backend".into(),
        password: "backend-secret".into(),
    }];
}

/// `receive` is its own permission: a policy may let a device subscribe to its subtree but deny
/// it some topics there. The deny must hold from the start of the session (for live and retained
/// messages), not only after the policy changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_denies_apply_from_the_start() {
    bounded(async {
        let hub = secured_hub(backend_user).await;
        let policy = PolicyDocument::from_json(
            r#"{"version": 1, "statements": [
                {"effect": "allow", "actions": ["connect"], "resources": ["${device.id}"]},
                {"effect": "allow", "actions": ["publish", "subscribe", "receive"],
                 "resources": ["devices/${device.id}/#"]},
                {"effect": "deny", "actions": ["receive"], "resources": ["devices/${device.id}/secret"]}
            ]}"#,
        )
        .unwrap();
        registry(&hub)
            .put_policy(&sys(), "default", "no-secrets", policy)
            .await
            .unwrap();
        let (pw, mut backend) = device_and_backend(&hub, "dev-s", Some("no-secrets")).await;
        // A retained message the device must not get when it subscribes.
        backend
            .publish("devices/dev-s/secret", m5::QoS::AtLeastOnce, true, b"retained secret")
            .await;
        backend.recv_publish().await;
        let mut o = v5_opts(&hub, "dev-s");
        o.set_credentials("dev-s", pw.as_str());
        let mut dev = V5::connect(o).await;
        let codes = dev.subscribe("devices/dev-s/#", m5::QoS::AtLeastOnce).await;
        assert_eq!(suback_code(&codes[0]), 1);
        backend
            .publish("devices/dev-s/secret", m5::QoS::AtLeastOnce, false, b"live secret")
            .await;
        backend
            .publish("devices/dev-s/ok", m5::QoS::AtLeastOnce, false, b"fine")
            .await;
        let p = dev.recv_publish().await;
        assert_eq!(
            (topic5(&p).as_str(), p.payload.as_ref()),
            ("devices/dev-s/ok", &b"fine"[..]),
            "a message on a receive-denied topic was delivered"
        );
        dev.expect_no_publish(QUIET).await;
        hub.stop().await;
    })
    .await;
}

/// A Will Message is a publish by the device: it may not go where the device may not publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_message_obeys_the_publish_policy() {
    bounded(async {
        let hub = secured_hub(backend_user).await;
        let (pw, mut backend) = device_and_backend(&hub, "dev-w", None).await;
        add_bare_device(&hub, "default", "dev-v").await;
        let will_connect = |topic: &str| {
            let mut c = login_packet(MQTT5, "dev-w", Some("dev-w"), Some(pw.as_bytes()));
            c.will = Some(ferrohub_proto::mqtt::Will {
                topic: topic.into(),
                payload: bytes::Bytes::from_static(b"will"),
                qos: FQoS::AtLeastOnce,
                retain: false,
                properties: Default::default(),
            });
            c
        };
        // Control: a will on the device's own topic is published when the connection drops.
        let (raw, ack) = raw_connect_with(hub.mqtt, will_connect("devices/dev-w/status")).await;
        assert_eq!(ack.code, 0);
        drop(raw);
        let p = backend.recv_publish().await;
        assert_eq!(topic5(&p), "devices/dev-w/status");
        // On another device's topic: refused at CONNECT (0x87) or never published.
        let (raw, ack) = raw_connect_with(hub.mqtt, will_connect("devices/dev-v/cmd")).await;
        assert!(matches!(ack.code, 0 | 0x87), "{ack:?}");
        drop(raw);
        backend.expect_no_publish(Duration::from_secs(1)).await;
        hub.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 8. Brute-force throttling
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_throttled() {
    bounded(async {
        let hub = secured_hub(|cfg| {
            cfg.registry.auth_backoff.free_failures = 3;
            cfg.registry.auth_backoff.initial_ms = 2000;
            cfg.registry.auth_backoff.max_ms = 10_000;
        })
        .await;
        add_tenant(&hub, "tx").await;
        let pw = add_device(&hub, "tx", "dev-a").await;
        let pw_b = add_device(&hub, "tx", "dev-b").await;
        let attacker: IpAddr = [127, 0, 0, 1].into();
        let login = |device: &str, secret: &str| {
            let user = username("tx", device);
            login_packet(MQTT5, device, Some(&user), Some(secret.as_bytes()))
        };

        // One guess more than the free ones (see `backoff_starts_right_after_the_free_failures`
        // for the exact boundary).
        for i in 0..4 {
            let (ack, _) =
                connect_from(attacker, hub.mqtt, login("dev-a", &format!("guess-{i}-xx"))).await;
            assert_eq!(ack.code, 0x86, "guess {i}");
        }
        let last_failure = Instant::now();
        // Throttled: even the right password is refused, with the same code.
        let (ack, _) = connect_from(attacker, hub.mqtt, login("dev-a", &pw)).await;
        assert_eq!(ack.code, 0x86, "right password during the back-off");
        // The back-off is per source address (another device from there) ...
        let (ack, _) = connect_from(attacker, hub.mqtt, login("dev-b", &pw_b)).await;
        assert_eq!(ack.code, 0x86, "another device from the throttled address");
        // ... and per device (the same device from another address).
        let elsewhere: IpAddr = [127, 0, 0, 2].into();
        let (ack, _) = connect_from(elsewhere, hub.mqtt, login("dev-a", &pw)).await;
        assert_eq!(ack.code, 0x86, "throttled device from another address");
        let (ack, _) = connect_from(elsewhere, hub.mqtt, login("dev-b", &pw_b)).await;
        assert_eq!(
            ack.code, 0,
            "another device from another address is not throttled"
        );

        let text = metrics(&hub).await;
        let throttled = metric(&text, "ferrohub_auth_total{result=\"throttled\"}").unwrap();
        assert!(throttled >= 3.0, "throttled = {throttled}");

        // After the back-off, the right password works again.
        let wait = Duration::from_millis(2200).saturating_sub(last_failure.elapsed());
        tokio::time::sleep(wait).await;
        let (ack, _) = connect_from(attacker, hub.mqtt, login("dev-a", &pw)).await;
        assert_eq!(ack.code, 0, "right password after the back-off");
        let (ack, _) = connect_from(attacker, hub.mqtt, login("dev-b", &pw_b)).await;
        assert_eq!(ack.code, 0);
        hub.stop().await;
    })
    .await;
}

/// `[registry.auth_backoff]` documents `free_failures` failures as free, "then connects are
/// refused for `initial_ms`": after exactly 3 wrong passwords the 4th attempt, even with the
/// right password, must be throttled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_starts_right_after_the_free_failures() {
    bounded(async {
        let hub = secured_hub(|cfg| {
            cfg.registry.auth_backoff.free_failures = 3;
            cfg.registry.auth_backoff.initial_ms = 2000;
            cfg.registry.auth_backoff.max_ms = 10_000;
        })
        .await;
        add_tenant(&hub, "tx").await;
        let pw = add_device(&hub, "tx", "dev-a").await;
        for i in 0..3 {
            let code = login_code(&hub, MQTT5, "tx", "dev-a", &format!("guess-{i}-xx")).await;
            assert_eq!(code, 0x86, "guess {i}");
        }
        let last_failure = Instant::now();
        assert_eq!(
            login_code(&hub, MQTT5, "tx", "dev-a", &pw).await,
            0x86,
            "4th attempt (right password) after 3 free failures"
        );
        tokio::time::sleep(Duration::from_millis(2200).saturating_sub(last_failure.elapsed()))
            .await;
        assert_eq!(login_code(&hub, MQTT5, "tx", "dev-a", &pw).await, 0);
        hub.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 9. Quotas
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_quotas() {
    bounded(async {
        let hub = secured_hub(|_| {}).await;
        add_tenant_with_quotas(
            &hub,
            "tq",
            Quotas {
                device_messages_per_sec: 5,
                max_connections: 2,
                ..Quotas::default()
            },
        )
        .await;
        let p1 = add_device(&hub, "tq", "q1").await;
        let p2 = add_device(&hub, "tq", "q2").await;
        let p3 = add_device(&hub, "tq", "q3").await;
        let user = username("tq", "q1");
        let (mut q1, ack) = raw_connect_with(
            hub.mqtt,
            login_packet(MQTT5, "q1", Some(&user), Some(p1.as_bytes())),
        )
        .await;
        assert_eq!(ack.code, 0);

        // A burst of 50 QoS 1 publishes in one write.
        let mut burst = BytesMut::new();
        for pid in 1..=50u16 {
            mqtt::encode(
                &publish_packet("devices/q1/t", FQoS::AtLeastOnce, pid, b"m"),
                MQTT5,
                &mut burst,
            )
            .unwrap();
        }
        q1.send_bytes(&burst).await.unwrap();
        let mut codes = Vec::new();
        while codes.len() < 50 {
            match raw_wait(&mut q1, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await {
                Packet::PubAck(a) => codes.push((a.packet_id, a.code)),
                _ => unreachable!(),
            }
        }
        let ok = codes.iter().filter(|(_, c)| *c == 0 || *c == 0x10).count();
        let over = codes.iter().filter(|(_, c)| *c == 0x97).count();
        assert_eq!(ok + over, 50, "only success and 0x97: {codes:?}");
        assert!(
            (5..=10).contains(&ok),
            "admitted {ok} of a burst of 50 at 5/s"
        );
        let dropped = wait_metric(
            &hub,
            "ferrohub_mqtt_messages_dropped_total{reason=\"rate_limited\"}",
            |v| v >= over as f64,
        )
        .await;
        assert_eq!(dropped, over as f64);
        let text = metrics(&hub).await;
        assert_eq!(
            metric(
                &text,
                "ferrohub_quota_exceeded_total{quota=\"publish_rate\"}"
            ),
            Some(over as f64)
        );
        // The bucket refills.
        tokio::time::sleep(Duration::from_millis(400)).await;
        q1.send(&publish_packet("devices/q1/t", FQoS::AtLeastOnce, 51, b"m"))
            .await
            .unwrap();
        match raw_wait(&mut q1, "PUBACK", |p| matches!(p, Packet::PubAck(_))).await {
            Packet::PubAck(a) => assert!(matches!(a.code, 0 | 0x10), "{a:?}"),
            _ => unreachable!(),
        }

        // Connections: q1 and q2 fill the quota, q3 is refused with 0x97.
        let q2 = V5::connect(v5_device(&hub, "tq", "q2", &p2)).await;
        assert_eq!(login_code(&hub, MQTT5, "tq", "q3", &p3).await, 0x97);
        match V5::try_connect(v5_device(&hub, "tq", "q3", &p3)).await {
            Err(e) => assert_eq!(refusal_code(&e), Some(0x97), "{e:?}"),
            Ok(_) => panic!("connection over the tenant quota accepted"),
        }
        // (A device at the quota taking over its own session: see
        // `reconnect_at_the_connection_quota_takes_over`.) Other tenants are not affected.
        add_tenant(&hub, "tz").await;
        let pz = add_device(&hub, "tz", "z1").await;
        assert_eq!(login_code(&hub, MQTT5, "tz", "z1", &pz).await, 0);
        // Freed by a disconnect.
        q2.disconnect().await;
        let deadline = Instant::now() + WAIT;
        loop {
            let code = login_code(&hub, MQTT5, "tq", "q3", &p3).await;
            if code == 0 {
                break;
            }
            assert_eq!(code, 0x97);
            assert!(Instant::now() < deadline, "the quota never freed a slot");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(q1);
        hub.stop().await;
    })
    .await;
}

/// At `max_connections`, a connected device that reconnects (same client id: the new connection
/// takes the session over and the old one ends) does not need a free slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_at_the_connection_quota_takes_over() {
    bounded(async {
        let hub = secured_hub(|_| {}).await;
        add_tenant_with_quotas(
            &hub,
            "tq",
            Quotas {
                max_connections: 2,
                ..Quotas::default()
            },
        )
        .await;
        let p1 = add_device(&hub, "tq", "q1").await;
        let p2 = add_device(&hub, "tq", "q2").await;
        let mut q1 = V5::connect(v5_device(&hub, "tq", "q1", &p1)).await;
        let _q2 = V5::connect(v5_device(&hub, "tq", "q2", &p2)).await;
        let mut again = match V5::try_connect(v5_device(&hub, "tq", "q1", &p1)).await {
            Ok(c) => c,
            Err(e) => panic!("q1 could not take over its own session at the quota: {e:?}"),
        };
        let reason = server_disconnect_reason(q1.wait_closed(WAIT).await);
        assert_eq!(reason, Some(0x8e), "old connection: session taken over");
        let r = again
            .publish("devices/q1/t", m5::QoS::AtLeastOnce, false, b"x")
            .await;
        assert_accepted(r);
        hub.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 10. Audit
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_failures_and_disable() {
    bounded(async {
        let hub = secured_hub(|_| {}).await;
        let reg = registry(&hub);
        add_tenant(&hub, "ta").await;
        let pw = add_device(&hub, "ta", "dev-a").await;
        let client: IpAddr = [127, 0, 0, 7].into();
        let user = username("ta", "dev-a");

        let mut sources = Vec::new();
        for secret in ["guess-one-1", "guess-two-2"] {
            let (ack, me) = connect_from(
                client,
                hub.mqtt,
                login_packet(MQTT5, "dev-a", Some(&user), Some(secret.as_bytes())),
            )
            .await;
            assert_eq!(ack.code, 0x86);
            sources.push(me.to_string());
        }
        let ghost = username("ta", "ghost");
        let (ack, ghost_src) = connect_from(
            client,
            hub.mqtt,
            login_packet(MQTT5, "ghost", Some(&ghost), Some(b"guess-three-3")),
        )
        .await;
        assert_eq!(ack.code, 0x86);

        let operator = operator_from("token:ops-1", "127.0.0.9:4242");
        reg.update_device(
            &operator,
            "ta",
            "dev-a",
            DevicePatch {
                status: Some(DeviceStatus::Disabled),
                ..DevicePatch::default()
            },
        )
        .await
        .unwrap();
        let (ack, disabled_src) = connect_from(
            client,
            hub.mqtt,
            login_packet(MQTT5, "dev-a", Some(&user), Some(pw.as_bytes())),
        )
        .await;
        assert_eq!(ack.code, 0x87);

        let failures = wait_audit(
            &hub,
            AuditQuery {
                tenant: Some("ta".into()),
                action: Some("auth.failure".into()),
                ..AuditQuery::default()
            },
            "three auth.failure events",
            |ev| ev.len() >= 3,
        )
        .await;
        assert_eq!(failures.len(), 3, "{failures:#?}");
        let mut seen: Vec<(String, String)> = failures
            .iter()
            .map(|e| {
                assert_eq!(e.result, AuditResult::Failure);
                assert_eq!(e.tenant.as_deref(), Some("ta"));
                (e.target.clone(), e.source.clone().unwrap_or_default())
            })
            .collect();
        seen.sort();
        let mut want = vec![
            ("dev-a".to_string(), sources[0].clone()),
            ("dev-a".to_string(), sources[1].clone()),
            ("ghost".to_string(), ghost_src.to_string()),
        ];
        want.sort();
        assert_eq!(seen, want, "targets and source addresses");
        // Secrets never reach the log.
        for e in &failures {
            let text = format!("{e:?}");
            assert!(
                !text.contains("guess-"),
                "password in the audit log: {text}"
            );
        }

        let disable = wait_audit(
            &hub,
            AuditQuery {
                tenant: Some("ta".into()),
                action: Some("device.disable".into()),
                ..AuditQuery::default()
            },
            "device.disable",
            |ev| !ev.is_empty(),
        )
        .await;
        assert_eq!(disable.len(), 1);
        assert_eq!(disable[0].target, "dev-a");
        assert_eq!(disable[0].actor, "token:ops-1");
        assert_eq!(disable[0].source.as_deref(), Some("127.0.0.9:4242"));
        assert_eq!(disable[0].result, AuditResult::Success);

        let refused = wait_audit(
            &hub,
            AuditQuery {
                tenant: Some("ta".into()),
                action: Some("auth.disabled_device".into()),
                ..AuditQuery::default()
            },
            "auth.disabled_device",
            |ev| !ev.is_empty(),
        )
        .await;
        assert_eq!(refused[0].target, "dev-a");
        assert_eq!(
            refused[0].source.as_deref(),
            Some(disabled_src.to_string().as_str())
        );

        // The action prefix query and tenant scoping.
        let all_auth = reg
            .query_audit(
                &sys(),
                AuditQuery {
                    tenant: Some("ta".into()),
                    action: Some("auth.".into()),
                    ..AuditQuery::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(all_auth.len(), 4, "{all_auth:#?}");
        let other = reg
            .query_audit(
                &sys(),
                AuditQuery {
                    tenant: Some("default".into()),
                    action: Some("auth.".into()),
                    ..AuditQuery::default()
                },
            )
            .await
            .unwrap();
        assert!(other.is_empty(), "{other:#?}");
        hub.stop().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 11. Password rotation
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_rotation_with_overlap() {
    bounded(async {
        let hub = secured_hub(|_| {}).await;
        let reg = registry(&hub);
        add_tenant(&hub, "tx").await;
        let old = add_device(&hub, "tx", "dev-r").await;
        assert_eq!(login_code(&hub, MQTT5, "tx", "dev-r", &old).await, 0);

        let new = "rotated-password-2".to_string();
        let rotated_at = Instant::now();
        reg.add_password(&sys(), "tx", "dev-r", Some(new.clone()), Some(1))
            .await
            .unwrap();
        assert_eq!(
            login_code(&hub, MQTT5, "tx", "dev-r", &new).await,
            0,
            "new password"
        );
        assert_eq!(
            login_code(&hub, MQTT5, "tx", "dev-r", &old).await,
            0,
            "old one during the overlap"
        );
        assert!(
            rotated_at.elapsed() < Duration::from_millis(900),
            "the overlap checks took too long to mean anything"
        );

        tokio::time::sleep(Duration::from_millis(1500).saturating_sub(rotated_at.elapsed())).await;
        assert_eq!(
            login_code(&hub, MQTT5, "tx", "dev-r", &old).await,
            0x86,
            "old password expired"
        );
        assert_eq!(login_code(&hub, MQTT311, "tx", "dev-r", &old).await, 4);
        assert_eq!(
            login_code(&hub, MQTT5, "tx", "dev-r", &new).await,
            0,
            "new password"
        );
        let creds = reg.credentials(&sys(), "tx", "dev-r").await.unwrap();
        assert_eq!(creds.len(), 2);
        assert_eq!(
            creds.iter().filter(|c| c.expires_at.is_some()).count(),
            1,
            "exactly the old password has an expiry: {creds:?}"
        );
        hub.stop().await;
    })
    .await;
}
