//! Device credentials: passwords (secret shown once), revocation, issued and pinned
//! certificates, device tokens.

use x509_parser::pem::parse_x509_pem;

use crate::common::*;

fn cert_cn_and_issuer(pem: &str) -> (String, String, String) {
    let (_, pem) = parse_x509_pem(pem.as_bytes()).expect("PEM");
    let cert = pem.parse_x509().expect("X.509 certificate");
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or_default()
        .to_string();
    (cn, cert.issuer().to_string(), cert.subject().to_string())
}

/// (authority key id, subject key id) of a certificate.
pub fn key_ids(pem: &str) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
    use x509_parser::extensions::ParsedExtension;
    let (_, pem) = parse_x509_pem(pem.as_bytes()).expect("PEM");
    let cert = pem.parse_x509().expect("X.509 certificate");
    let (mut aki, mut ski) = (None, None);
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                aki = a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            ParsedExtension::SubjectKeyIdentifier(k) => ski = Some(k.0.to_vec()),
            _ => {}
        }
    }
    (aki, ski)
}

fn base64url_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => panic!("not base64url: {c}"),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_are_shown_once_and_can_be_revoked() {
    bounded(60, async {
        let hub = TestHub::start().await.unwrap();
        let admin = Api::admin(&hub);
        admin.tenant("cred").await;
        admin.device("cred", json!({"id": "d1"})).await;
        let base = "/tenants/cred/devices/d1/credentials";

        let generated = admin.post(base, json!({"kind": "password"})).await.expect(201);
        let secret = generated["secret"].as_str().unwrap().to_string();
        assert!(secret.len() >= 16);
        assert_eq!(generated["credential"]["kind"], "password");
        assert!(generated.get("certificate_pem").is_none());
        let chosen = admin
            .post(base, json!({"kind": "password", "secret": "correct horse battery", "rotate_overlap_secs": 60}))
            .await
            .expect(201);
        assert_eq!(chosen["secret"], "correct horse battery");
        admin
            .post(base, json!({"kind": "password", "secret": "short"}))
            .await
            .expect_error(400, "invalid");

        let listed = admin.get(base).await.expect(200);
        let text = listed.to_string();
        assert_eq!(listed.as_array().unwrap().len(), 2);
        assert!(!text.contains(&secret), "the secret is listed");
        assert!(!text.contains("correct horse battery"));
        assert!(!text.contains("argon2"), "the hash is listed");
        assert!(listed.as_array().unwrap().iter().all(|c| c.get("secret").is_none()));
        // Rotation: the first password now expires.
        let first_id = generated["credential"]["id"].as_str().unwrap();
        let first = listed.as_array().unwrap().iter().find(|c| c["id"] == first_id).unwrap();
        assert!(first["expires_at"].is_i64(), "{first}");

        admin.delete(&format!("{base}/{first_id}")).await.expect(204);
        let listed = admin.get(base).await.expect(200);
        let first = listed.as_array().unwrap().iter().find(|c| c["id"] == first_id).unwrap();
        assert!(first["revoked_at"].is_i64(), "{first}");
        admin.delete(&format!("{base}/cred_nope")).await.expect_error(404, "not_found");
        admin.get("/tenants/cred/devices/ghost/credentials").await.expect_error(404, "not_found");
        admin
            .post("/tenants/cred/devices/ghost/credentials", json!({"kind": "password"}))
            .await
            .expect_error(404, "not_found");
        hub.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_and_device_tokens() {
    bounded(60, async {
        let hub = TestHub::start().await.unwrap();
        let admin = Api::admin(&hub);
        admin.tenant("pki").await;
        admin.device("pki", json!({"id": "cam-1"})).await;
        admin.device("pki", json!({"id": "cam-2"})).await;

        let issued = admin
            .post(
                "/tenants/pki/devices/cam-1/credentials",
                json!({"kind": "certificate"}),
            )
            .await
            .expect(201);
        let cert = issued["certificate_pem"].as_str().unwrap();
        let ca = issued["ca_pem"].as_str().unwrap();
        assert!(
            issued["private_key_pem"]
                .as_str()
                .unwrap()
                .contains("PRIVATE KEY")
        );
        let (cn, issuer, _) = cert_cn_and_issuer(cert);
        assert_eq!(cn, "cam-1");
        let (_, _, ca_subject) = cert_cn_and_issuer(ca);
        assert_eq!(issuer, ca_subject);
        // The CA in the answer is the one that signed the certificate.
        let (aki, _) = key_ids(cert);
        let (_, ski) = key_ids(ca);
        if let (Some(aki), Some(ski)) = (aki, ski) {
            assert_eq!(
                aki, ski,
                "the certificate was not issued by the CA in the answer"
            );
        }
        let cred = &issued["credential"];
        assert_eq!(cred["kind"], "certificate");
        assert_eq!(cred["fingerprint"].as_str().unwrap().len(), 64);

        // The built-in CA, as PEM text and in the CA list.
        let reply = admin.get("/tenants/pki/cas/builtin/certificate").await;
        assert!(
            reply.content_type.starts_with("application/x-pem-file"),
            "{reply:?}"
        );
        assert_eq!(reply.expect(200).as_str().unwrap(), ca);
        let cas = admin.get("/tenants/pki/cas").await.expect(200);
        assert_eq!(cas[0]["id"], "builtin");
        assert!(cas[0].get("key_pem").is_none());

        // The key is not kept: the listing has no PEM at all.
        let listed = admin
            .get("/tenants/pki/devices/cam-1/credentials")
            .await
            .expect(200);
        assert!(!listed.to_string().contains("PRIVATE KEY"));

        // Pinning an external certificate; both forms at once are refused.
        let pinned = admin
            .post(
                "/tenants/pki/devices/cam-2/credentials",
                json!({"kind": "certificate", "certificate_pem": cert}),
            )
            .await
            .expect(201);
        assert_eq!(pinned["credential"]["fingerprint"], cred["fingerprint"]);
        assert!(pinned.get("private_key_pem").is_none());
        admin
            .post(
                "/tenants/pki/devices/cam-2/credentials",
                json!({"kind": "certificate", "certificate_pem": cert, "csr_pem": "x"}),
            )
            .await
            .expect_error(400, "invalid");
        admin
            .post(
                "/tenants/pki/devices/cam-2/credentials",
                json!({"kind": "certificate", "csr_pem": "not a csr"}),
            )
            .await
            .expect_error(400, "invalid");
        admin
            .post(
                "/tenants/pki/devices/cam-2/credentials",
                json!({"kind": "jwt_key"}),
            )
            .await
            .expect_error(400, "invalid");

        // Revoking the certificate credential puts it on the revocation list; revoking by
        // fingerprint works too.
        let id = cred["id"].as_str().unwrap();
        admin
            .delete(&format!("/tenants/pki/devices/cam-1/credentials/{id}"))
            .await
            .expect(204);
        let fp = "AB:".repeat(31) + "AB";
        let r = admin
            .post(
                "/tenants/pki/revoked-certificates",
                json!({"fingerprint": fp, "reason": "lost"}),
            )
            .await
            .expect(201);
        assert_eq!(r["fingerprint"], "ab".repeat(32));
        admin
            .post(
                "/tenants/pki/revoked-certificates",
                json!({"fingerprint": "abc"}),
            )
            .await
            .expect_error(400, "invalid");

        // Device token: a hub-signed JWT naming the device.
        let t = admin
            .post("/tenants/pki/devices/cam-1/token", json!({"ttl_secs": 600}))
            .await
            .expect(200);
        let token = t["token"].as_str().unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims: Value = serde_json::from_slice(&base64url_decode(parts[1])).unwrap();
        assert_eq!(claims["sub"], "cam-1");
        let ttl = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
        assert_eq!(ttl, 600, "{claims}");
        admin
            .post("/tenants/pki/devices/ghost/token", json!({"ttl_secs": 600}))
            .await
            .expect_error(404, "not_found");

        // Templates and CAs.
        admin
            .put(
                "/tenants/pki/provisioning-templates/cams",
                json!({"tags": {"kind": "cam"}}),
            )
            .await
            .expect(200);
        let tpl = admin
            .get("/tenants/pki/provisioning-templates/cams")
            .await
            .expect(200);
        assert_eq!(tpl["cert_validity_days"], 365);
        assert_eq!(
            admin
                .get("/tenants/pki/provisioning-templates")
                .await
                .expect(200)
                .as_array()
                .unwrap()
                .len(),
            1
        );
        let ext = admin
            .put(
                "/tenants/pki/cas/partner",
                json!({"certificate_pem": ca, "jitr": true, "jitr_template": "cams"}),
            )
            .await
            .expect(200);
        assert_eq!(ext["jitr"], true);
        admin
            .put(
                "/tenants/pki/cas/partner2",
                json!({"certificate_pem": ca, "jitr": true, "jitr_template": "nope"}),
            )
            .await
            .expect_error(400, "invalid");
        admin
            .put("/tenants/pki/cas/bad", json!({"certificate_pem": "junk"}))
            .await
            .expect_error(400, "invalid");
        admin.delete("/tenants/pki/cas/partner").await.expect(204);
        admin
            .delete("/tenants/pki/cas/partner")
            .await
            .expect_error(404, "not_found");
        admin
            .put("/tenants/pki/token-keys/backend", json!({"pem": "junk"}))
            .await
            .expect_error(400, "invalid");
        hub.stop().await;
    })
    .await;
}

/// The tenant's built-in CA is created once: certificates issued earlier keep chaining to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_ca_is_stable_across_issuances() {
    bounded(60, async {
        let hub = TestHub::start().await.unwrap();
        let admin = Api::admin(&hub);
        admin.tenant("ca").await;
        admin.device("ca", json!({"id": "a"})).await;
        admin.device("ca", json!({"id": "b"})).await;
        let first = admin
            .post(
                "/tenants/ca/devices/a/credentials",
                json!({"kind": "certificate"}),
            )
            .await
            .expect(201);
        let second = admin
            .post(
                "/tenants/ca/devices/b/credentials",
                json!({"kind": "certificate"}),
            )
            .await
            .expect(201);
        assert_eq!(first["ca_pem"], second["ca_pem"], "the built-in CA changed");
        let current = admin
            .get("/tenants/ca/cas/builtin/certificate")
            .await
            .expect(200);
        let (aki, _) = key_ids(first["certificate_pem"].as_str().unwrap());
        let (_, ski) = key_ids(current.as_str().unwrap());
        assert_eq!(
            aki, ski,
            "the first device's certificate no longer chains to the CA"
        );
        hub.stop().await;
    })
    .await;
}
