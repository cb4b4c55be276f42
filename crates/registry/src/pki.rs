//! Device PKI: per-tenant certificate authorities, device certificates (issued here or signed
//! from a device's CSR), certificate inspection, and the TLS client-certificate verifier whose
//! set of trusted CAs can change while the broker runs.
//!
//! * [`CertificateAuthority`] is a tenant's built-in CA (ECDSA P-256). It issues device
//!   certificates whose subject CN is always the device id — a device never picks its own
//!   identity, whatever its CSR asks for.
//! * [`TrustStore`] holds every CA (built-in or uploaded by a tenant) that may sign device
//!   certificates. [`TrustStore::client_verifier`] plugs it into a rustls `ServerConfig`; the
//!   handshake then refuses expired, unknown-issuer and self-signed client certificates. After
//!   the handshake, [`TrustStore::identify`] says which tenant's CA issued the peer certificate.
//! * [`parse_certificate`], [`parse_pem_chain`], [`fingerprint_sha256`] and [`CertInfo`] turn
//!   certificates into the facts the registry stores and shows.
//!
//! All cryptography goes through aws-lc-rs (rcgen's `aws_lc_rs` backend and
//! `rustls::crypto::aws_lc_rs::default_provider()`); nothing here depends on a process-wide
//! default rustls provider.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName as TlsDn, RootCertStore};
use rustls::{SignatureScheme, pki_types::UnixTime};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

/// Longest validity accepted for issued certificates and generated CAs (about 100 years).
pub const MAX_VALIDITY_DAYS: u32 = 36_500;

/// How far `notBefore` is back-dated on generated certificates, so that devices whose clock
/// runs a little behind accept them immediately.
pub const BACKDATE: Duration = Duration::from_secs(3600);

/// Smallest RSA modulus accepted in a CSR.
const MIN_RSA_BITS: usize = 2048;

/// Prefix of the URI SAN put in every device certificate issued here; see [`device_urn`].
pub const DEVICE_URN_PREFIX: &str = "urn:ferrohub:device:";

/// What went wrong in a PKI operation. Messages say what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// No `CERTIFICATE` PEM block in the input.
    #[error(
        "no certificate found: expected a PEM block starting with `-----BEGIN CERTIFICATE-----`"
    )]
    NoCertificate,
    /// The PEM text is malformed.
    #[error("malformed PEM: {0}; check that the BEGIN/END lines and the base64 body are intact")]
    Pem(String),
    /// The DER is not a parseable X.509 certificate.
    #[error("the certificate is not valid X.509 DER: {0}")]
    BadCertificate(String),
    /// A CA was expected but the certificate is not one.
    #[error(
        "the certificate is not a CA (basic constraints CA:TRUE is missing); register the CA \
         that signs device certificates, not a device certificate"
    )]
    NotCa,
    /// The CA certificate's key usage forbids signing certificates.
    #[error(
        "the CA certificate's key usage lacks keyCertSign, so it cannot sign device \
         certificates; reissue the CA with keyCertSign"
    )]
    CaCannotSign,
    /// webpki refuses the CA as a trust anchor.
    #[error("the CA certificate cannot be used as a trust anchor: {0}")]
    UnusableCa(String),
    /// The private key could not be read.
    #[error(
        "the private key could not be read ({0}); provide an unencrypted PEM key \
         (`PRIVATE KEY`, `EC PRIVATE KEY` or `RSA PRIVATE KEY`)"
    )]
    BadKey(String),
    /// The private key does not match the certificate.
    #[error(
        "the private key does not belong to the CA certificate; provide the key the \
         certificate was issued for"
    )]
    KeyMismatch,
    /// The CSR could not be read.
    #[error("invalid certificate signing request: {0}")]
    BadCsr(String),
    /// The CSR's self-signature does not verify.
    #[error(
        "the CSR's signature does not verify; the CSR must be signed with the private key \
         whose public key it carries"
    )]
    CsrSignature,
    /// The CSR carries a key type or size that is not accepted.
    #[error(
        "unsupported public key in the CSR ({0}); use ECDSA P-256/P-384/P-521, Ed25519 or RSA \
         of at least 2048 bits"
    )]
    UnsupportedKey(String),
    /// The device id cannot be put in a certificate.
    #[error("invalid device id {id:?}: {reason}")]
    InvalidDeviceId {
        /// The rejected id.
        id: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A required name (tenant, CA id) is empty.
    #[error("{0} must not be empty")]
    EmptyName(&'static str),
    /// The requested validity is out of range.
    #[error(
        "a validity of {0} days is out of range; choose between 1 and {MAX_VALIDITY_DAYS} days"
    )]
    InvalidValidity(u32),
    /// The CA's subject name uses an encoding that cannot be reproduced in issued certificates.
    #[error(
        "the CA's subject name cannot be reproduced exactly in the certificates it would issue \
         (unusual string types or multi-valued RDNs); reissue the CA with a plain subject such \
         as `CN=...`"
    )]
    UnreproducibleName,
    /// Another tenant already registered a CA with the same key.
    #[error(
        "a CA with this public key is already registered for another tenant; a CA can serve \
         only one tenant (create a separate CA per tenant)"
    )]
    CaKeyInUse,
    /// Certificate or key generation failed inside the crypto library.
    #[error("certificate generation failed: {0}")]
    Generate(String),
}

impl From<rcgen::Error> for PkiError {
    fn from(e: rcgen::Error) -> Self {
        PkiError::Generate(e.to_string())
    }
}

/// Facts about one certificate, as stored by the registry and shown by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertInfo {
    /// The first common name of the subject, if any.
    pub subject_cn: Option<String>,
    /// DNS-name subject alternative names, in certificate order.
    pub dns_sans: Vec<String>,
    /// URI subject alternative names, in certificate order.
    pub uri_sans: Vec<String>,
    /// Serial number: lowercase hex, leading zero bytes stripped (`"00"` for serial 0).
    pub serial_hex: String,
    /// Lowercase hex SHA-256 of the certificate DER (see [`fingerprint_sha256`]).
    pub fingerprint_sha256: String,
    /// Issuer distinguished name, RFC 4514-style (`CN=...`).
    pub issuer_dn: String,
    /// Subject distinguished name, RFC 4514-style.
    pub subject_dn: String,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
    /// Whether basic constraints say CA:TRUE.
    pub is_ca: bool,
}

/// Which part of a client certificate names the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum IdentitySource {
    /// The subject common name (what [`CertificateAuthority::issue`] sets to the device id).
    #[default]
    #[serde(rename = "cn")]
    CommonName,
    /// The first DNS-name subject alternative name.
    #[serde(rename = "dns_san")]
    DnsSan,
    /// The first URI subject alternative name, returned verbatim (for certificates issued here
    /// that is [`device_urn`]; use [`parse_device_urn`] to take it apart).
    #[serde(rename = "uri_san")]
    UriSan,
}

impl CertInfo {
    /// The device identity according to `source`: the CN, or the first SAN of that kind
    /// (verbatim, no decoding). `None` when the certificate has no such field.
    pub fn identity(&self, source: IdentitySource) -> Option<&str> {
        match source {
            IdentitySource::CommonName => self.subject_cn.as_deref(),
            IdentitySource::DnsSan => self.dns_sans.first().map(String::as_str),
            IdentitySource::UriSan => self.uri_sans.first().map(String::as_str),
        }
    }
}

/// Lowercase hex SHA-256 of `der` (64 characters), the usual certificate fingerprint.
pub fn fingerprint_sha256(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Parses one DER certificate into [`CertInfo`].
pub fn parse_certificate(der: &[u8]) -> Result<CertInfo, PkiError> {
    let cert = parse_x509(der)?;
    Ok(cert_info(&cert, der))
}

/// Reads every `CERTIFICATE` block of `pem` (leaf first, as in a TLS chain file), checking
/// that each one is a parseable X.509 certificate. Other PEM blocks (keys, ...) are skipped.
pub fn parse_pem_chain(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let mut chain = Vec::new();
    for item in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let der = item.map_err(|e| PkiError::Pem(e.to_string()))?;
        parse_x509(&der)?;
        chain.push(der);
    }
    if chain.is_empty() {
        return Err(PkiError::NoCertificate);
    }
    Ok(chain)
}

/// The URI SAN written into device certificates issued here:
/// `urn:ferrohub:device:<tenant>:<device>`, with both parts percent-encoded (everything but
/// ASCII letters, digits and `-._~`), so the URI is plain ASCII and splits unambiguously.
pub fn device_urn(tenant: &str, device_id: &str) -> String {
    format!(
        "{DEVICE_URN_PREFIX}{}:{}",
        percent_encode(tenant),
        percent_encode(device_id)
    )
}

/// Inverse of [`device_urn`]: `(tenant, device_id)`, or `None` if `uri` is not of that form.
pub fn parse_device_urn(uri: &str) -> Option<(String, String)> {
    let rest = uri.strip_prefix(DEVICE_URN_PREFIX)?;
    let (tenant, device) = rest.split_once(':')?;
    if tenant.is_empty() || device.is_empty() || device.contains(':') {
        return None;
    }
    Some((percent_decode(tenant)?, percent_decode(device)?))
}

/// What to issue: a certificate for `device_id` of `tenant`, valid for `validity_days`.
///
/// With `csr_pem`, the CSR's public key is certified (its signature must verify) and nothing
/// else from the CSR is used: subject, SANs, key usages and validity are all set here. Without
/// a CSR a fresh ECDSA P-256 key pair is generated and returned with the certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssueRequest {
    /// Tenant the device belongs to (goes into the URI SAN).
    pub tenant: String,
    /// Device id: becomes the subject CN (and a DNS SAN when it is a valid DNS name).
    pub device_id: String,
    /// Validity from now, in days (1 ..= [`MAX_VALIDITY_DAYS`]).
    pub validity_days: u32,
    /// PEM `CERTIFICATE REQUEST` generated on the device, if the device keeps its own key.
    pub csr_pem: Option<String>,
}

impl IssueRequest {
    /// A request without CSR (the key pair is generated here).
    pub fn new(
        tenant: impl Into<String>,
        device_id: impl Into<String>,
        validity_days: u32,
    ) -> Self {
        IssueRequest {
            tenant: tenant.into(),
            device_id: device_id.into(),
            validity_days,
            csr_pem: None,
        }
    }

    /// Signs the public key of this CSR instead of generating a key pair.
    pub fn with_csr(mut self, csr_pem: impl Into<String>) -> Self {
        self.csr_pem = Some(csr_pem.into());
        self
    }
}

/// A freshly issued device certificate.
#[derive(Clone, Serialize)]
pub struct IssuedCertificate {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The generated private key (PKCS#8 PEM) when no CSR was given; `None` for CSR signing.
    /// Secret: hand it to the device once, do not store it.
    pub key_pem: Option<String>,
    /// Parsed facts about the certificate.
    pub info: CertInfo,
}

impl fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCertificate")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &self.key_pem.as_ref().map(|_| "[secret]"))
            .field("info", &self.info)
            .finish()
    }
}

/// A tenant's built-in certificate authority.
///
/// Persist it with [`cert_pem`](Self::cert_pem) and [`key_pem`](Self::key_pem) (the key is
/// secret) and restore it with [`from_pem`](Self::from_pem). Register the certificate in the
/// [`TrustStore`] so that what it issues is accepted in TLS handshakes.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    info: CertInfo,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("info", &self.info)
            .field("key", &"[secret]")
            .finish()
    }
}

impl CertificateAuthority {
    /// Generates a self-signed ECDSA P-256 CA for `tenant`: subject CN
    /// `Ferrohub device CA (<tenant>)`, basic constraints CA with path length 0 (it signs
    /// device certificates only), key usage keyCertSign + cRLSign, random serial, valid from
    /// [`BACKDATE`] ago for `validity_days`.
    pub fn generate(tenant: &str, validity_days: u32) -> Result<Self, PkiError> {
        if tenant.is_empty() {
            return Err(PkiError::EmptyName("tenant"));
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Ferrohub device CA ({tenant})"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial());
        set_validity(&mut params, validity_days)?;
        let cert = params.self_signed(&key)?;
        let cert_der = cert.der().clone();
        let info = parse_certificate(&cert_der)?;
        Ok(CertificateAuthority {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
            cert_der,
            info,
        })
    }

    /// Restores a CA from its certificate and private key (both PEM; the first certificate
    /// block is used). Checks that the certificate is a CA allowed to sign certificates and
    /// that the key belongs to it. Any CA works (e.g. one a tenant uploads with its key), not
    /// only those made by [`generate`](Self::generate).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let cert_der = first_certificate(cert_pem)?;
        let cert = parse_x509(&cert_der)?;
        check_ca(&cert)?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::BadKey(e.to_string()))?;
        if key.der_bytes() != cert.public_key().subject_public_key.as_ref() {
            return Err(PkiError::KeyMismatch);
        }
        let info = cert_info(&cert, &cert_der);
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        // Certificates name their issuer by the CA's subject, compared byte for byte during
        // verification; rcgen re-encodes that name, so make sure it comes out identical.
        let probe_key = rcgen::SubjectPublicKeyInfo::from_der(cert.public_key().raw)
            .map_err(|e| PkiError::BadKey(e.to_string()))?;
        let probe = CertificateParams::default().signed_by(&probe_key, &issuer)?;
        if parse_x509(probe.der())?.issuer().as_raw() != cert.subject().as_raw() {
            return Err(PkiError::UnreproducibleName);
        }
        Ok(CertificateAuthority {
            issuer,
            cert_pem: pem_encode_certificate(&cert_der),
            cert_der,
            info,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PKCS#8 PEM. Secret: store it encrypted or in a secret store.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Parsed facts about the CA certificate.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// Issues a device certificate.
    ///
    /// The leaf has subject CN = `device_id` (always, whatever a CSR asked for), SANs
    /// [`device_urn`]`(tenant, device_id)` (URI) plus `device_id` as DNS name when it is a valid
    /// DNS name, basic constraints CA:FALSE, key usage digitalSignature, extended key usage
    /// clientAuth, an authority key identifier, a random positive 16-byte serial, and validity
    /// from [`BACKDATE`] ago to `validity_days` from now.
    pub fn issue(&self, request: IssueRequest) -> Result<IssuedCertificate, PkiError> {
        let params = leaf_params(&request.tenant, &request.device_id, request.validity_days)?;
        let (cert, key_pem) = match &request.csr_pem {
            Some(csr_pem) => {
                let public_key = csr_public_key(csr_pem)?;
                (params.signed_by(&public_key, &self.issuer)?, None)
            }
            None => {
                let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
                let cert = params.signed_by(&key, &self.issuer)?;
                (cert, Some(key.serialize_pem()))
            }
        };
        let info = parse_certificate(cert.der())?;
        Ok(IssuedCertificate {
            cert_pem: cert.pem(),
            key_pem,
            info,
        })
    }
}

/// A CA trusted to sign device certificates for one tenant.
#[derive(Debug, Clone)]
pub struct TrustedCa {
    /// The tenant whose devices this CA vouches for.
    pub tenant: String,
    /// The tenant's name for this CA (a tenant may have several, e.g. during a rollover).
    pub ca_id: String,
    /// The CA certificate.
    pub cert_der: CertificateDer<'static>,
    /// Parsed facts about the CA certificate.
    pub info: CertInfo,
}

/// One registered CA plus what lookups and verification need, precomputed.
#[derive(Clone)]
struct TrustEntry {
    ca: TrustedCa,
    /// Raw DER of the CA subject name, compared with certificate issuer names.
    subject_raw: Vec<u8>,
    /// The CA's subjectPublicKey bits (one key serves one tenant).
    public_key: Vec<u8>,
    /// A verifier trusting only this CA, used by [`TrustStore::identify`].
    verifier: Arc<dyn ClientCertVerifier>,
}

/// An immutable snapshot of the trust store; replaced wholesale on every change.
struct TrustState {
    /// Sorted by (tenant, ca_id).
    entries: Vec<TrustEntry>,
    /// Verifier over all registered CAs; `None` when there are none.
    combined: Option<Arc<dyn ClientCertVerifier>>,
}

/// The CAs that may sign device certificates, across all tenants; changeable at runtime.
///
/// Every change rebuilds a webpki verifier over all CAs once; handshakes only clone an `Arc`
/// under a read lock. Build the rustls server config once with
/// [`client_verifier`](Self::client_verifier): it follows later [`set`](Self::set) and
/// [`remove`](Self::remove) calls.
pub struct TrustStore {
    provider: Arc<CryptoProvider>,
    /// Serializes writers, so a rebuild never loses a concurrent change.
    writer: Mutex<()>,
    state: RwLock<Arc<TrustState>>,
}

impl fmt::Debug for TrustStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustStore")
            .field("cas", &self.snapshot().entries.len())
            .finish()
    }
}

impl Default for TrustStore {
    fn default() -> Self {
        Self::new()
    }
}

impl TrustStore {
    /// An empty store (using the aws-lc-rs crypto provider).
    pub fn new() -> Self {
        TrustStore {
            provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            writer: Mutex::new(()),
            state: RwLock::new(Arc::new(TrustState {
                entries: Vec::new(),
                combined: None,
            })),
        }
    }

    /// Registers (or replaces) CA `ca_id` of `tenant` from PEM (first certificate block).
    ///
    /// Fails if the certificate does not parse, is not a CA (basic constraints CA:TRUE, and
    /// keyCertSign if key usage is present), is refused as a trust anchor, or if its public
    /// key is already registered for a *different* tenant — otherwise the same device
    /// certificate could be attributed to two tenants. The CA's own validity dates are not
    /// checked (webpki does not check them for trust anchors either).
    pub fn set(&self, tenant: &str, ca_id: &str, cert_pem: &str) -> Result<(), PkiError> {
        if tenant.is_empty() {
            return Err(PkiError::EmptyName("tenant"));
        }
        if ca_id.is_empty() {
            return Err(PkiError::EmptyName("CA id"));
        }
        let cert_der = first_certificate(cert_pem)?;
        let cert = parse_x509(&cert_der)?;
        check_ca(&cert)?;
        let info = cert_info(&cert, &cert_der);
        let subject_raw = cert.subject().as_raw().to_vec();
        let public_key = cert.public_key().subject_public_key.as_ref().to_vec();
        let verifier = self
            .build_verifier([&cert_der])?
            .ok_or_else(|| PkiError::UnusableCa("no trust anchor".into()))?;
        let entry = TrustEntry {
            ca: TrustedCa {
                tenant: tenant.to_owned(),
                ca_id: ca_id.to_owned(),
                cert_der,
                info,
            },
            subject_raw,
            public_key,
            verifier,
        };

        let _writer = self.writer.lock();
        let current = self.snapshot();
        if current
            .entries
            .iter()
            .any(|e| e.ca.tenant != tenant && e.public_key == entry.public_key)
        {
            return Err(PkiError::CaKeyInUse);
        }
        let mut entries: Vec<TrustEntry> = current
            .entries
            .iter()
            .filter(|e| !(e.ca.tenant == tenant && e.ca.ca_id == ca_id))
            .cloned()
            .collect();
        entries.push(entry);
        entries.sort_by(|a, b| (&a.ca.tenant, &a.ca.ca_id).cmp(&(&b.ca.tenant, &b.ca.ca_id)));
        self.install(entries)
    }

    /// Unregisters CA `ca_id` of `tenant`; certificates it issued are refused from the next
    /// handshake on. Returns whether it was registered.
    pub fn remove(&self, tenant: &str, ca_id: &str) -> bool {
        let _writer = self.writer.lock();
        let current = self.snapshot();
        let before = current.entries.len();
        let entries: Vec<TrustEntry> = current
            .entries
            .iter()
            .filter(|e| !(e.ca.tenant == tenant && e.ca.ca_id == ca_id))
            .cloned()
            .collect();
        if entries.len() == before {
            return false;
        }
        if let Err(e) = self.install(entries) {
            // Every remaining CA was accepted before, so this cannot happen; if it does, the
            // old state (still trusting the removed CA) must not survive silently.
            tracing::error!(error = %e, "trust store rebuild failed; trusting no client CA");
            *self.state.write() = Arc::new(TrustState {
                entries: Vec::new(),
                combined: None,
            });
        }
        true
    }

    /// All registered CAs, sorted by tenant then CA id.
    pub fn list(&self) -> Vec<TrustedCa> {
        self.snapshot()
            .entries
            .iter()
            .map(|e| e.ca.clone())
            .collect()
    }

    /// Number of registered CAs.
    pub fn len(&self) -> usize {
        self.snapshot().entries.len()
    }

    /// Whether no CA is registered.
    pub fn is_empty(&self) -> bool {
        self.snapshot().entries.is_empty()
    }

    /// A rustls client-certificate verifier backed by this store, for
    /// `ServerConfig::builder_with_provider(..).with_client_cert_verifier(..)`.
    ///
    /// Client authentication is always offered. With `mandatory`, clients without a
    /// certificate are refused; otherwise they are let through (to authenticate with a
    /// password over TLS, say). A presented certificate must chain to a registered CA, be
    /// within its validity and allow clientAuth, otherwise the handshake fails — also when no
    /// CA is registered at all. No CA names are hinted to clients (the list would reveal the
    /// tenants and can be long); clients then send whatever certificate they have.
    pub fn client_verifier(self: &Arc<Self>, mandatory: bool) -> Arc<dyn ClientCertVerifier> {
        Arc::new(DynamicClientVerifier {
            store: Arc::clone(self),
            mandatory,
            algorithms: self.provider.signature_verification_algorithms,
        })
    }

    /// After a handshake, finds the registered CA that issued the peer's certificate chain
    /// (leaf first, as `ServerConnection::peer_certificates` returns it) and returns
    /// `(tenant, ca_id, leaf info)`.
    ///
    /// Candidates are CAs whose subject equals the issuer name of a chain certificate, the
    /// leaf's direct issuer first; each is confirmed by full webpki verification (signatures,
    /// validity at the current time, clientAuth), so CAs with identical names but different
    /// keys — e.g. two tenants' CAs — are told apart. `None` if no registered CA verifies the
    /// chain.
    pub fn identify(&self, chain: &[CertificateDer<'_>]) -> Option<(String, String, CertInfo)> {
        let (leaf, intermediates) = chain.split_first()?;
        let leaf_cert = parse_x509(leaf).ok()?;
        let mut issuers: Vec<Vec<u8>> = vec![leaf_cert.issuer().as_raw().to_vec()];
        for der in intermediates {
            if let Ok(cert) = parse_x509(der) {
                issuers.push(cert.issuer().as_raw().to_vec());
            }
        }
        let state = self.snapshot();
        let now = UnixTime::now();
        for issuer in &issuers {
            for entry in state.entries.iter().filter(|e| &e.subject_raw == issuer) {
                if entry
                    .verifier
                    .verify_client_cert(leaf, intermediates, now)
                    .is_ok()
                {
                    return Some((
                        entry.ca.tenant.clone(),
                        entry.ca.ca_id.clone(),
                        cert_info(&leaf_cert, leaf),
                    ));
                }
            }
        }
        None
    }

    fn snapshot(&self) -> Arc<TrustState> {
        Arc::clone(&self.state.read())
    }

    /// Builds the combined verifier for `entries` and makes it current.
    fn install(&self, entries: Vec<TrustEntry>) -> Result<(), PkiError> {
        let combined = self.build_verifier(entries.iter().map(|e| &e.ca.cert_der))?;
        *self.state.write() = Arc::new(TrustState { entries, combined });
        Ok(())
    }

    /// A webpki client verifier trusting exactly `cas` (`None` if there are none). It accepts
    /// anonymous clients; whether they are allowed is decided by [`DynamicClientVerifier`].
    fn build_verifier<'a>(
        &self,
        cas: impl IntoIterator<Item = &'a CertificateDer<'static>>,
    ) -> Result<Option<Arc<dyn ClientCertVerifier>>, PkiError> {
        let mut roots = RootCertStore::empty();
        for der in cas {
            roots
                .add(der.clone())
                .map_err(|e| PkiError::UnusableCa(e.to_string()))?;
        }
        if roots.is_empty() {
            return Ok(None);
        }
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&self.provider))
            .allow_unauthenticated()
            .build()
            .map(Some)
            .map_err(|e| PkiError::UnusableCa(e.to_string()))
    }
}

/// The verifier handed to rustls: delegates certificate checks to the store's current webpki
/// verifier, so CA changes apply to the next handshake without rebuilding the server config.
struct DynamicClientVerifier {
    store: Arc<TrustStore>,
    mandatory: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for DynamicClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynamicClientVerifier")
            .field("store", &self.store)
            .field("mandatory", &self.mandatory)
            .finish()
    }
}

impl ClientCertVerifier for DynamicClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[TlsDn] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let combined = self.store.snapshot().combined.clone();
        match combined {
            Some(verifier) => verifier.verify_client_cert(end_entity, intermediates, now),
            None => Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn parse_x509(der: &[u8]) -> Result<X509Certificate<'_>, PkiError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(PkiError::BadCertificate(
            "trailing bytes after the certificate".into(),
        )),
        Err(e) => Err(PkiError::BadCertificate(e.to_string())),
    }
}

fn first_certificate(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    parse_pem_chain(pem)?
        .into_iter()
        .next()
        .ok_or(PkiError::NoCertificate)
}

fn pem_encode_certificate(der: &[u8]) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::with_capacity(body.len() + body.len() / 64 + 60);
    pem.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

fn cert_info(cert: &X509Certificate<'_>, der: &[u8]) -> CertInfo {
    let mut dns_sans = Vec::new();
    let mut uri_sans = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(s) => dns_sans.push((*s).to_owned()),
                GeneralName::URI(s) => uri_sans.push((*s).to_owned()),
                _ => {}
            }
        }
    }
    let raw_serial = cert.raw_serial();
    let significant = raw_serial
        .iter()
        .position(|b| *b != 0)
        .map_or(&[][..], |i| &raw_serial[i..]);
    let serial_hex = if significant.is_empty() {
        "00".to_owned()
    } else {
        hex::encode(significant)
    };
    CertInfo {
        subject_cn: cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned),
        dns_sans,
        uri_sans,
        serial_hex,
        fingerprint_sha256: fingerprint_sha256(der),
        issuer_dn: cert.issuer().to_string(),
        subject_dn: cert.subject().to_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        is_ca: cert.is_ca(),
    }
}

/// A CA must say CA:TRUE and, if it has key usage, allow keyCertSign.
fn check_ca(cert: &X509Certificate<'_>) -> Result<(), PkiError> {
    if !cert.is_ca() {
        return Err(PkiError::NotCa);
    }
    match cert.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => Err(PkiError::CaCannotSign),
        Ok(_) => Ok(()),
        Err(e) => Err(PkiError::BadCertificate(e.to_string())),
    }
}

/// Reads a CSR, checks its self-signature (proof of possession) and key, and returns its
/// public key. Everything else in the CSR is ignored.
fn csr_public_key(csr_pem: &str) -> Result<rcgen::SubjectPublicKeyInfo, PkiError> {
    let der =
        CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => PkiError::BadCsr(
                "no PEM block starting with `-----BEGIN CERTIFICATE REQUEST-----`".into(),
            ),
            other => PkiError::BadCsr(format!("malformed PEM: {other}")),
        })?;
    let csr = match X509CertificationRequest::from_der(&der) {
        Ok(([], csr)) => csr,
        Ok(_) => return Err(PkiError::BadCsr("trailing bytes after the CSR".into())),
        Err(e) => return Err(PkiError::BadCsr(e.to_string())),
    };
    // `verify_signature` exists because rcgen's `aws_lc_rs` feature turns on x509-parser's
    // `verify-aws`.
    csr.verify_signature().map_err(|_| PkiError::CsrSignature)?;
    let spki = &csr.certification_request_info.subject_pki;
    match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) if rsa.key_size() < MIN_RSA_BITS => {
            return Err(PkiError::UnsupportedKey(format!(
                "RSA key of {} bits",
                rsa.key_size()
            )));
        }
        Ok(PublicKey::DSA(_)) => return Err(PkiError::UnsupportedKey("DSA key".into())),
        Ok(PublicKey::GostR3410(_) | PublicKey::GostR3410_2012(_)) => {
            return Err(PkiError::UnsupportedKey("GOST key".into()));
        }
        _ => {}
    }
    rcgen::SubjectPublicKeyInfo::from_der(spki.raw)
        .map_err(|e| PkiError::UnsupportedKey(e.to_string()))
}

fn leaf_params(
    tenant: &str,
    device_id: &str,
    validity_days: u32,
) -> Result<CertificateParams, PkiError> {
    if tenant.is_empty() {
        return Err(PkiError::EmptyName("tenant"));
    }
    check_device_id(device_id)?;

    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, device_id);
    params.distinguished_name = dn;
    let urn = Ia5String::try_from(device_urn(tenant, device_id))?;
    params.subject_alt_names = vec![SanType::URI(urn)];
    if is_dns_name(device_id) {
        params
            .subject_alt_names
            .push(SanType::DnsName(Ia5String::try_from(device_id)?));
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    set_validity(&mut params, validity_days)?;
    Ok(params)
}

fn check_device_id(id: &str) -> Result<(), PkiError> {
    let reason = if id.is_empty() {
        "it is empty"
    } else if id.chars().any(char::is_control) {
        "it contains control characters"
    } else if id.len() > 1024 {
        "it is longer than 1024 bytes"
    } else {
        return Ok(());
    };
    Err(PkiError::InvalidDeviceId {
        id: id.to_owned(),
        reason,
    })
}

/// Letters, digits and inner hyphens in dot-separated labels of at most 63 bytes, at most 253
/// bytes in all, and not an IP address.
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.parse::<std::net::IpAddr>().is_err()
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Random positive 16-byte serial without a leading zero byte (first byte 0x01..=0x7f).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f).max(1);
    SerialNumber::from_slice(&bytes)
}

/// Sets `notBefore = now - BACKDATE` and `notAfter = now + validity_days`.
fn set_validity(params: &mut CertificateParams, validity_days: u32) -> Result<(), PkiError> {
    if validity_days == 0 || validity_days > MAX_VALIDITY_DAYS {
        return Err(PkiError::InvalidValidity(validity_days));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + now.saturating_sub(BACKDATE);
    params.not_after = epoch + now + Duration::from_secs(u64::from(validity_days) * 86_400);
    Ok(())
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

    const DAY: i64 = 86_400;

    fn now_secs() -> i64 {
        i64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        )
        .unwrap()
    }

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        parse_pem_chain(pem).unwrap().remove(0)
    }

    fn key_der(pem: &str) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn csr_for(key: &KeyPair, cn: &str, sans: Vec<String>) -> String {
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    /// A broker server certificate for `broker.test` from a separate CA; returns the server
    /// config parts and the CA the client must trust.
    struct ServerIdentity {
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Arc<RootCertStore>,
    }

    fn server_identity() -> ServerIdentity {
        let ca = CertificateAuthority::generate("server-ca", 30).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["broker.test".to_string()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, 30).unwrap();
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        ServerIdentity {
            chain: vec![cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            roots: Arc::new(roots),
        }
    }

    fn server_config(
        id: &ServerIdentity,
        verifier: Arc<dyn ClientCertVerifier>,
    ) -> Arc<ServerConfig> {
        Arc::new(
            ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(id.chain.clone(), id.key.clone_key())
                .unwrap(),
        )
    }

    fn client_config(
        id: &ServerIdentity,
        client: Option<(&str, &str)>,
        tls12: bool,
    ) -> Arc<ClientConfig> {
        let versions: &[&'static rustls::SupportedProtocolVersion] = if tls12 {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(Arc::clone(&id.roots));
        Arc::new(match client {
            Some((cert_pem, key_pem)) => builder
                .with_client_auth_cert(parse_pem_chain(cert_pem).unwrap(), key_der(key_pem))
                .unwrap(),
            None => builder.with_no_client_auth(),
        })
    }

    /// Moves all pending TLS records from one side to the other.
    fn pump(
        from: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
        to: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
    ) -> Result<bool, String> {
        let mut moved = false;
        while from.wants_write() {
            let mut buf = Vec::new();
            from.write_tls(&mut buf).map_err(|e| e.to_string())?;
            let mut rd = &buf[..];
            while !rd.is_empty() {
                to.read_tls(&mut rd).map_err(|e| e.to_string())?;
                to.process_new_packets().map_err(|e| e.to_string())?;
            }
            moved = true;
        }
        Ok(moved)
    }

    /// Runs a full handshake in memory; returns the server side on success, or the first
    /// error either side reported.
    fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> Result<ServerConnection, String> {
        let name = ServerName::try_from("broker.test").unwrap();
        let mut client = ClientConnection::new(client, name).map_err(|e| e.to_string())?;
        let mut server = ServerConnection::new(server).map_err(|e| e.to_string())?;
        for _ in 0..16 {
            let a = pump(&mut client, &mut server).map_err(|e| format!("server: {e}"))?;
            let b = pump(&mut server, &mut client).map_err(|e| format!("client: {e}"))?;
            if !client.is_handshaking() && !server.is_handshaking() && !a && !b {
                return Ok(server);
            }
        }
        Err("handshake did not finish".into())
    }

    #[test]
    fn generated_ca_is_a_ca_and_round_trips_through_pem() {
        let ca = CertificateAuthority::generate("acme", 365).unwrap();
        let info = ca.info();
        assert!(info.is_ca);
        assert_eq!(
            info.subject_cn.as_deref(),
            Some("Ferrohub device CA (acme)")
        );
        assert_eq!(info.subject_dn, info.issuer_dn);
        assert!((info.not_after - now_secs() - 365 * DAY).abs() < 60);
        assert!(info.not_before <= now_secs());

        let restored = CertificateAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(restored.cert_der(), ca.cert_der());
        assert_eq!(restored.info(), ca.info());
        // The restored CA issues certificates that chain to the same certificate.
        let issued = restored.issue(IssueRequest::new("acme", "d1", 1)).unwrap();
        let store = Arc::new(TrustStore::new());
        store.set("acme", "main", ca.cert_pem()).unwrap();
        let (tenant, _, _) = store.identify(&[der(&issued.cert_pem)]).unwrap();
        assert_eq!(tenant, "acme");

        // A key that is not the CA's is refused.
        let other = CertificateAuthority::generate("acme", 365).unwrap();
        let err = CertificateAuthority::from_pem(ca.cert_pem(), &other.key_pem()).unwrap_err();
        assert!(matches!(err, PkiError::KeyMismatch), "{err}");
        // A device certificate is not a CA.
        let err =
            CertificateAuthority::from_pem(&issued.cert_pem, issued.key_pem.as_deref().unwrap())
                .unwrap_err();
        assert!(matches!(err, PkiError::NotCa), "{err}");
        assert!(matches!(
            CertificateAuthority::from_pem("nope", &ca.key_pem()),
            Err(PkiError::NoCertificate)
        ));
        assert!(matches!(
            CertificateAuthority::from_pem(ca.cert_pem(), "nope"),
            Err(PkiError::BadKey(_))
        ));
        assert!(matches!(
            CertificateAuthority::generate("", 1),
            Err(PkiError::EmptyName(_))
        ));
        assert!(matches!(
            CertificateAuthority::generate("acme", 0),
            Err(PkiError::InvalidValidity(0))
        ));
    }

    #[test]
    fn uploaded_ca_with_a_richer_subject_issues_chaining_certificates() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CountryName,
            rcgen::DnValue::PrintableString("DE".try_into().unwrap()),
        );
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Acme GmbH");
        params
            .distinguished_name
            .push(DnType::CommonName, "Acme Device Root");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();

        let ca = CertificateAuthority::from_pem(&cert.pem(), &key.serialize_pem()).unwrap();
        assert_eq!(ca.cert_der(), cert.der());
        assert_eq!(
            ca.info().subject_dn,
            "C=DE, O=Acme GmbH, CN=Acme Device Root"
        );
        let leaf = ca.issue(IssueRequest::new("acme", "d", 1)).unwrap();
        assert_eq!(leaf.info.issuer_dn, ca.info().subject_dn);
        let store = TrustStore::new();
        store.set("acme", "uploaded", &cert.pem()).unwrap();
        let (tenant, ca_id, _) = store.identify(&[der(&leaf.cert_pem)]).unwrap();
        assert_eq!((tenant.as_str(), ca_id.as_str()), ("acme", "uploaded"));
    }

    #[test]
    fn issue_without_csr_generates_a_key() {
        let ca = CertificateAuthority::generate("acme", 365).unwrap();
        let issued = ca
            .issue(IssueRequest::new("acme", "sensor-01", 30))
            .unwrap();
        let key_pem = issued.key_pem.as_deref().unwrap();
        let key = KeyPair::from_pem(key_pem).unwrap();

        let cert_der = der(&issued.cert_pem);
        let info = parse_certificate(&cert_der).unwrap();
        assert_eq!(info, issued.info);
        assert_eq!(info.subject_cn.as_deref(), Some("sensor-01"));
        assert_eq!(info.subject_dn, "CN=sensor-01");
        assert_eq!(info.issuer_dn, ca.info().subject_dn);
        assert_eq!(info.dns_sans, vec!["sensor-01".to_string()]);
        assert_eq!(
            info.uri_sans,
            vec!["urn:ferrohub:device:acme:sensor-01".to_string()]
        );
        assert!(!info.is_ca);
        let now = now_secs();
        assert!(info.not_before <= now && info.not_before >= now - 3600 - 60);
        assert!((info.not_after - now - 30 * DAY).abs() < 60);

        // Serial: 16 bytes, positive, no leading zero byte; fingerprint: SHA-256 hex.
        assert_eq!(info.serial_hex.len(), 32, "{}", info.serial_hex);
        assert!(!info.serial_hex.starts_with("00"));
        assert!(u8::from_str_radix(&info.serial_hex[..2], 16).unwrap() < 0x80);
        assert_eq!(info.fingerprint_sha256, fingerprint_sha256(&cert_der));
        assert_eq!(info.fingerprint_sha256.len(), 64);
        assert!(
            info.fingerprint_sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        let again = ca
            .issue(IssueRequest::new("acme", "sensor-01", 30))
            .unwrap();
        assert_ne!(again.info.serial_hex, info.serial_hex);

        // Extensions, read independently with x509-parser.
        let cert = parse_x509(&cert_der).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        let bc = cert.basic_constraints().unwrap().unwrap().value;
        assert!(!bc.ca);
        assert_eq!(
            cert.public_key().subject_public_key.as_ref(),
            key.der_bytes(),
            "the returned key is the certified one"
        );

        assert_eq!(info.identity(IdentitySource::CommonName), Some("sensor-01"));
        assert_eq!(info.identity(IdentitySource::DnsSan), Some("sensor-01"));
        assert_eq!(
            info.identity(IdentitySource::UriSan),
            Some("urn:ferrohub:device:acme:sensor-01")
        );
    }

    #[test]
    fn issue_from_csr_forces_the_device_id() {
        let ca = CertificateAuthority::generate("acme", 365).unwrap();
        let device_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = csr_for(&device_key, "admin", vec!["evil.example".to_string()]);
        let issued = ca
            .issue(IssueRequest::new("acme", "thermo 7/B", 10).with_csr(csr))
            .unwrap();
        assert!(issued.key_pem.is_none());
        let info = &issued.info;
        assert_eq!(info.subject_cn.as_deref(), Some("thermo 7/B"));
        assert!(
            info.dns_sans.is_empty(),
            "not a DNS name, and the CSR's SAN is ignored"
        );
        assert_eq!(
            info.uri_sans,
            vec!["urn:ferrohub:device:acme:thermo%207%2FB".to_string()]
        );
        assert_eq!(
            parse_device_urn(&info.uri_sans[0]),
            Some(("acme".to_string(), "thermo 7/B".to_string()))
        );
        let cert_der = der(&issued.cert_pem);
        let cert = parse_x509(&cert_der).unwrap();
        assert_eq!(
            cert.public_key().subject_public_key.as_ref(),
            device_key.der_bytes()
        );
        assert!(
            cert.extended_key_usage()
                .unwrap()
                .unwrap()
                .value
                .client_auth
        );
        assert!((info.not_after - now_secs() - 10 * DAY).abs() < 60);

        // Other key types are accepted too.
        for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
            let key = KeyPair::generate_for(alg).unwrap();
            let issued = ca
                .issue(IssueRequest::new("acme", "d", 1).with_csr(csr_for(&key, "d", vec![])))
                .unwrap();
            let cert_der = der(&issued.cert_pem);
            let cert = parse_x509(&cert_der).unwrap();
            assert_eq!(
                cert.public_key().subject_public_key.as_ref(),
                key.der_bytes()
            );
        }
    }

    #[test]
    fn bad_requests_are_refused() {
        let ca = CertificateAuthority::generate("acme", 365).unwrap();
        let device_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = csr_for(&device_key, "tamper-me-please", vec![]);

        // Tampered CSR: change the requested CN, which is covered by the signature.
        let csr_der = CertificateSigningRequestDer::from_pem_slice(csr.as_bytes()).unwrap();
        let mut bytes = csr_der.to_vec();
        let cn_at = bytes
            .windows(16)
            .position(|w| w == b"tamper-me-please")
            .unwrap();
        bytes[cn_at] = b'T';
        let tampered = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.encode(&bytes)
            }
        );
        let err = ca
            .issue(IssueRequest::new("acme", "d", 1).with_csr(tampered))
            .unwrap_err();
        assert!(matches!(err, PkiError::CsrSignature), "{err}");

        let err = ca
            .issue(IssueRequest::new("acme", "d", 1).with_csr("garbage"))
            .unwrap_err();
        assert!(matches!(err, PkiError::BadCsr(_)), "{err}");
        let err = ca
            .issue(IssueRequest::new("acme", "d", 1).with_csr(ca.cert_pem()))
            .unwrap_err();
        assert!(matches!(err, PkiError::BadCsr(_)), "{err}");

        let err = ca.issue(IssueRequest::new("acme", "", 1)).unwrap_err();
        assert!(matches!(err, PkiError::InvalidDeviceId { .. }), "{err}");
        let err = ca.issue(IssueRequest::new("acme", "a\nb", 1)).unwrap_err();
        assert!(matches!(err, PkiError::InvalidDeviceId { .. }), "{err}");
        let err = ca.issue(IssueRequest::new("acme", "d", 0)).unwrap_err();
        assert!(matches!(err, PkiError::InvalidValidity(0)), "{err}");
        let err = ca
            .issue(IssueRequest::new("acme", "d", MAX_VALIDITY_DAYS + 1))
            .unwrap_err();
        assert!(matches!(err, PkiError::InvalidValidity(_)), "{err}");
        let err = ca.issue(IssueRequest::new("", "d", 1)).unwrap_err();
        assert!(matches!(err, PkiError::EmptyName(_)), "{err}");
    }

    #[test]
    fn pem_chains_and_serials() {
        let ca = CertificateAuthority::generate("acme", 365).unwrap();
        let issued = ca.issue(IssueRequest::new("acme", "d", 1)).unwrap();
        let bundle = format!(
            "{}{}{}",
            issued.cert_pem,
            issued.key_pem.as_deref().unwrap(),
            ca.cert_pem()
        );
        let chain = parse_pem_chain(&bundle).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(&chain[1], ca.cert_der());
        assert!(matches!(parse_pem_chain(""), Err(PkiError::NoCertificate)));
        assert!(matches!(
            parse_pem_chain("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            Err(PkiError::BadCertificate(_))
        ));
        assert!(matches!(
            parse_certificate(b"not der"),
            Err(PkiError::BadCertificate(_))
        ));

        // Serial formatting strips leading zero bytes (DER adds one before a high bit).
        let key = KeyPair::generate().unwrap();
        for (serial, expect) in [
            (vec![0x80, 0x01], "8001"),
            (vec![0x00, 0x00, 0x12], "12"),
            (vec![0x00], "00"),
        ] {
            let mut params = CertificateParams::default();
            params.serial_number = Some(SerialNumber::from_slice(&serial));
            let cert = params.self_signed(&key).unwrap();
            assert_eq!(parse_certificate(cert.der()).unwrap().serial_hex, expect);
        }
    }

    #[test]
    fn urns_round_trip() {
        for (t, d) in [("acme", "dev-1"), ("a:b", "c:d%e"), ("ünï", "x y/z")] {
            let urn = device_urn(t, d);
            assert!(urn.is_ascii());
            assert_eq!(parse_device_urn(&urn), Some((t.to_string(), d.to_string())));
        }
        assert_eq!(parse_device_urn("urn:ferrohub:device:a"), None);
        assert_eq!(parse_device_urn("urn:ferrohub:device:a:b:c"), None);
        assert_eq!(parse_device_urn("urn:ferrohub:device:a:%zz"), None);
        assert_eq!(parse_device_urn("https://x"), None);
        assert!(is_dns_name("a-b.c1"));
        assert!(!is_dns_name("-a"));
        assert!(!is_dns_name("a..b"));
        assert!(!is_dns_name("10.0.0.1"));
        assert!(!is_dns_name("a_b"));
    }

    #[test]
    fn identity_source_serde_names() {
        for (source, name) in [
            (IdentitySource::CommonName, "\"cn\""),
            (IdentitySource::DnsSan, "\"dns_san\""),
            (IdentitySource::UriSan, "\"uri_san\""),
        ] {
            assert_eq!(serde_json::to_string(&source).unwrap(), name);
            assert_eq!(
                serde_json::from_str::<IdentitySource>(name).unwrap(),
                source
            );
        }
    }

    #[test]
    fn trust_store_set_validates() {
        let store = TrustStore::new();
        let ca = CertificateAuthority::generate("acme", 365).unwrap();
        let leaf = ca.issue(IssueRequest::new("acme", "d", 1)).unwrap();
        assert!(matches!(
            store.set("acme", "x", &leaf.cert_pem),
            Err(PkiError::NotCa)
        ));
        assert!(matches!(
            store.set("acme", "x", "junk"),
            Err(PkiError::NoCertificate)
        ));
        assert!(matches!(
            store.set("", "x", ca.cert_pem()),
            Err(PkiError::EmptyName(_))
        ));
        assert!(matches!(
            store.set("acme", "", ca.cert_pem()),
            Err(PkiError::EmptyName(_))
        ));

        store.set("acme", "main", ca.cert_pem()).unwrap();
        // Same tenant may re-register (replace) or register the CA under another id.
        store.set("acme", "main", ca.cert_pem()).unwrap();
        store.set("acme", "copy", ca.cert_pem()).unwrap();
        // Another tenant may not register the same key.
        assert!(matches!(
            store.set("other", "main", ca.cert_pem()),
            Err(PkiError::CaKeyInUse)
        ));
        let listed: Vec<(String, String)> = store
            .list()
            .into_iter()
            .map(|c| (c.tenant, c.ca_id))
            .collect();
        assert_eq!(
            listed,
            vec![
                ("acme".to_string(), "copy".to_string()),
                ("acme".to_string(), "main".to_string())
            ]
        );
        assert_eq!(store.list()[0].info, *ca.info());
        assert!(store.remove("acme", "copy"));
        assert!(!store.remove("acme", "copy"));
        assert_eq!(store.len(), 1);
        assert!(store.remove("acme", "main"));
        assert!(store.is_empty());
        // Once nobody else holds it, the key is free again.
        store.set("other", "main", ca.cert_pem()).unwrap();
    }

    #[test]
    fn tls_handshakes_follow_the_trust_store() {
        let server = server_identity();
        let store = Arc::new(TrustStore::new());
        let acme = CertificateAuthority::generate("acme", 365).unwrap();
        store.set("acme", "main", acme.cert_pem()).unwrap();
        let mandatory = server_config(&server, store.client_verifier(true));
        let optional = server_config(&server, store.client_verifier(false));

        let good = acme
            .issue(IssueRequest::new("acme", "sensor-1", 7))
            .unwrap();
        let good_key = good.key_pem.clone().unwrap();

        // (a) a valid device certificate: accepted (TLS 1.3 and 1.2), and identified.
        for tls12 in [false, true] {
            let conn = handshake(
                Arc::clone(&mandatory),
                client_config(&server, Some((&good.cert_pem, &good_key)), tls12),
            )
            .unwrap_or_else(|e| panic!("tls12={tls12}: {e}"));
            let chain = conn.peer_certificates().unwrap();
            let (tenant, ca_id, leaf) = store.identify(chain).unwrap();
            assert_eq!((tenant.as_str(), ca_id.as_str()), ("acme", "main"));
            assert_eq!(leaf.subject_cn.as_deref(), Some("sensor-1"));
        }

        // (b) a certificate from a CA that is not registered...
        let impostor = CertificateAuthority::generate("acme", 365).unwrap();
        let fake = impostor
            .issue(IssueRequest::new("acme", "sensor-1", 7))
            .unwrap();
        let err = handshake(
            Arc::clone(&optional),
            client_config(
                &server,
                Some((&fake.cert_pem, fake.key_pem.as_deref().unwrap())),
                false,
            ),
        )
        .unwrap_err();
        // ... even one named like the registered CA: webpki finds the anchor by name, then
        // the signature check fails.
        assert!(err.contains("BadSignature"), "{err}");
        assert!(store.identify(&[der(&fake.cert_pem)]).is_none());
        let rogue = CertificateAuthority::generate("rogue", 365).unwrap();
        let stranger = rogue
            .issue(IssueRequest::new("acme", "sensor-1", 7))
            .unwrap();
        let err = handshake(
            Arc::clone(&mandatory),
            client_config(
                &server,
                Some((&stranger.cert_pem, stranger.key_pem.as_deref().unwrap())),
                false,
            ),
        )
        .unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
        assert!(store.identify(&[der(&stranger.cert_pem)]).is_none());

        // (c) an expired certificate from the registered CA.
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = leaf_params("acme", "sensor-1", 1).unwrap();
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        let now = Duration::from_secs(u64::try_from(now_secs()).unwrap());
        params.not_before = epoch + now - Duration::from_secs(10 * 86_400);
        params.not_after = epoch + now - Duration::from_secs(86_400);
        let expired = params.signed_by(&key, &acme.issuer).unwrap();
        let err = handshake(
            Arc::clone(&optional),
            client_config(&server, Some((&expired.pem(), &key.serialize_pem())), false),
        )
        .unwrap_err();
        assert!(err.contains("certificate expired"), "{err}");
        assert!(store.identify(&[expired.der().clone()]).is_none());

        // A self-signed leaf.
        let selfie = rcgen::generate_simple_self_signed(vec!["sensor-1".to_string()]).unwrap();
        let err = handshake(
            Arc::clone(&optional),
            client_config(
                &server,
                Some((&selfie.cert.pem(), &selfie.signing_key.serialize_pem())),
                false,
            ),
        )
        .unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");

        // (e) optional client auth: no certificate is fine; mandatory: refused.
        handshake(Arc::clone(&optional), client_config(&server, None, false)).unwrap();
        handshake(Arc::clone(&optional), client_config(&server, None, true)).unwrap();
        let err =
            handshake(Arc::clone(&mandatory), client_config(&server, None, false)).unwrap_err();
        assert!(err.contains("peer sent no certificates"), "{err}");

        // Registering the rogue CA (for another tenant) makes its certificate acceptable,
        // attributed to that tenant — on the existing server configs.
        store.set("rogue", "main", rogue.cert_pem()).unwrap();
        let conn = handshake(
            Arc::clone(&mandatory),
            client_config(
                &server,
                Some((&stranger.cert_pem, stranger.key_pem.as_deref().unwrap())),
                false,
            ),
        )
        .unwrap();
        let (tenant, _, _) = store.identify(conn.peer_certificates().unwrap()).unwrap();
        assert_eq!(tenant, "rogue");

        // (d) after removing the CA, the previously good certificate is refused.
        assert!(store.remove("acme", "main"));
        let err = handshake(
            Arc::clone(&mandatory),
            client_config(&server, Some((&good.cert_pem, &good_key)), false),
        )
        .unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
        assert!(store.identify(&[der(&good.cert_pem)]).is_none());
    }

    #[test]
    fn empty_store_allows_anonymous_clients_only() {
        let server = server_identity();
        let store = Arc::new(TrustStore::new());
        let optional = server_config(&server, store.client_verifier(false));
        let mandatory = server_config(&server, store.client_verifier(true));
        handshake(Arc::clone(&optional), client_config(&server, None, false)).unwrap();
        handshake(Arc::clone(&optional), client_config(&server, None, true)).unwrap();
        assert!(handshake(Arc::clone(&mandatory), client_config(&server, None, false)).is_err());

        let ca = CertificateAuthority::generate("acme", 365).unwrap();
        let leaf = ca.issue(IssueRequest::new("acme", "d", 1)).unwrap();
        let with_cert = client_config(
            &server,
            Some((&leaf.cert_pem, leaf.key_pem.as_deref().unwrap())),
            false,
        );
        let err = handshake(Arc::clone(&optional), Arc::clone(&with_cert)).unwrap_err();
        assert!(err.contains("UnknownIssuer"), "{err}");
        assert!(store.identify(&[der(&leaf.cert_pem)]).is_none());

        // Adding the CA later takes effect on the same server config.
        store.set("acme", "main", ca.cert_pem()).unwrap();
        handshake(Arc::clone(&optional), with_cert).unwrap();
    }

    #[test]
    fn identical_ca_names_are_told_apart_by_signature() {
        let server = server_identity();
        let store = Arc::new(TrustStore::new());
        let first = CertificateAuthority::generate("shared", 365).unwrap();
        let second = CertificateAuthority::generate("shared", 365).unwrap();
        assert_eq!(first.info().subject_dn, second.info().subject_dn);
        store.set("tenant-a", "ca", first.cert_pem()).unwrap();
        store.set("tenant-b", "ca", second.cert_pem()).unwrap();
        let mandatory = server_config(&server, store.client_verifier(true));

        for (ca, tenant) in [(&first, "tenant-a"), (&second, "tenant-b")] {
            let leaf = ca.issue(IssueRequest::new(tenant, "dev", 1)).unwrap();
            let conn = handshake(
                Arc::clone(&mandatory),
                client_config(
                    &server,
                    Some((&leaf.cert_pem, leaf.key_pem.as_deref().unwrap())),
                    false,
                ),
            )
            .unwrap();
            let (got, ca_id, info) = store.identify(conn.peer_certificates().unwrap()).unwrap();
            assert_eq!((got.as_str(), ca_id.as_str()), (tenant, "ca"));
            assert_eq!(info.subject_cn.as_deref(), Some("dev"));
        }
        assert!(store.identify(&[]).is_none());
        assert!(
            store
                .identify(&[CertificateDer::from(vec![1, 2, 3])])
                .is_none()
        );
    }
}
