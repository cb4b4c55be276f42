//! Device tokens: JWTs presented as the MQTT CONNECT password.
//!
//! Two kinds of issuer are supported:
//!
//! * **The hub itself.** Each tenant has an Ed25519 [`TokenSigner`] held by the hub; tokens it
//!   [issues](TokenSigner::issue) carry the signer's [`key_id`](TokenSigner::key_id) as `kid`.
//! * **The tenant's own issuer.** The tenant registers public [`VerificationKey`]s — a PEM
//!   public key or certificate, or a JWK set — for RSA (RS\*/PS\*), EC P-256/P-384 (ES256/ES384)
//!   or Ed25519 (EdDSA).
//!
//! [`verify`] checks the signature against the tenant's keys, then the claims: `aud` must be
//! [`AUDIENCE`], `exp` and `iat` are required, `nbf` is honoured, and `exp - iat` may not exceed
//! a maximum lifetime. Only asymmetric algorithms are accepted: HMAC (`HS*`) and `none` are
//! refused outright, so a token can never be "verified" with a public key used as an HMAC
//! secret, and a key only ever verifies the one algorithm it was registered for.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{DecodingKey, EncodingKey, Header};
use rcgen::{KeyPair, PKCS_ED25519, PublicKeyData};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::RSAPublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

pub use jsonwebtoken::Algorithm;

/// The only accepted `aud` claim.
pub const AUDIENCE: &str = "ferrohub";
/// Default ceiling on `exp - iat`: 30 days.
pub const DEFAULT_MAX_LIFETIME_SECS: u64 = 30 * 24 * 60 * 60;
/// Longest token accepted, in bytes (an RS512 token with a 8192-bit key is under 2 KiB).
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;
/// Largest RSA modulus accepted, in bits.
pub const MAX_RSA_BITS: usize = 8192;

/// The claims of a device token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceClaims {
    /// The device id.
    pub sub: String,
    /// Audience; must be [`AUDIENCE`] (`"ferrohub"`). On input an array containing it is
    /// accepted too.
    pub aud: String,
    /// The tenant the token is meant for (claim `ten`), if the issuer states it.
    #[serde(rename = "ten", default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Issued at, seconds since the Unix epoch.
    pub iat: i64,
    /// Expires at, seconds since the Unix epoch.
    pub exp: i64,
    /// Token id, if any (for revocation lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

impl DeviceClaims {
    /// Claims for `device_id`, issued at `now`, valid for `lifetime_secs`, audience
    /// [`AUDIENCE`], no `jti`.
    #[must_use]
    pub fn new(
        device_id: impl Into<String>,
        tenant: Option<String>,
        now: i64,
        lifetime_secs: i64,
    ) -> Self {
        Self {
            sub: device_id.into(),
            aud: AUDIENCE.to_owned(),
            tenant,
            iat: now,
            exp: now.saturating_add(lifetime_secs),
            jti: None,
        }
    }
}

/// Why a token was refused. Every variant but [`Malformed`](Self::Malformed) is only reported
/// for tokens whose signature verified (or, for the header checks, before any key is tried).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a well-formed JWS compact token, or a claim has the wrong type.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The header's `alg` is HMAC, `none` or unknown.
    #[error(
        "token algorithm {0:?} is not accepted; sign with RS256/RS384/RS512, PS256/PS384/PS512, \
         ES256/ES384 or EdDSA (HMAC and `none` are refused)"
    )]
    UnsupportedAlgorithm(String),
    /// No registered key matches the token's `kid` and algorithm.
    #[error(
        "no registered verification key{} accepts algorithm {alg}; register the issuer's public \
         key for the tenant, or fix the token's `kid`/`alg`",
        .kid.as_deref().map(|k| format!(" with kid {k:?}")).unwrap_or_default()
    )]
    UnknownKey {
        /// The token's `kid`, if it has one.
        kid: Option<String>,
        /// The token's algorithm.
        alg: String,
    },
    /// The signature does not verify under any candidate key.
    #[error(
        "token signature does not verify against the registered key(s): the token was altered \
         or signed by another key"
    )]
    BadSignature,
    /// `exp` (plus leeway) has passed.
    #[error("token expired at {exp} (now {now}, leeway {leeway}s); issue a new token")]
    Expired {
        /// The token's `exp`.
        exp: i64,
        /// The verification time.
        now: i64,
        /// The allowed clock skew.
        leeway: u64,
    },
    /// `nbf` or `iat` lies in the future (beyond the leeway).
    #[error(
        "token not valid before {not_before} (now {now}, leeway {leeway}s); check the clocks of \
         the issuer and the hub"
    )]
    NotYetValid {
        /// The token's `nbf` (or `iat`, when that is the one in the future).
        not_before: i64,
        /// The verification time.
        now: i64,
        /// The allowed clock skew.
        leeway: u64,
    },
    /// `aud` is not [`AUDIENCE`].
    #[error(
        "token audience is {found}, expected \"ferrohub\"; set the `aud` claim to \"ferrohub\""
    )]
    WrongAudience {
        /// The token's `aud`, as JSON.
        found: String,
    },
    /// A required claim (`sub`, `aud`, `iat`, `exp`) is absent.
    #[error("token lacks the required claim `{0}`; the issuer must include it")]
    MissingClaim(&'static str),
    /// `exp - iat` exceeds the maximum lifetime.
    #[error(
        "token lifetime exp - iat = {lifetime}s exceeds the maximum of {max}s; issue \
         shorter-lived tokens"
    )]
    TooLongLived {
        /// `exp - iat`.
        lifetime: i64,
        /// The maximum lifetime.
        max: u64,
    },
}

/// Why a signing or verification key could not be created, loaded or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Ed25519 key generation failed.
    #[error("could not generate an Ed25519 signing key: {0}")]
    Generate(String),
    /// The signing key is not an unencrypted Ed25519 PKCS#8 key.
    #[error(
        "invalid token signing key: {0}; expected an unencrypted Ed25519 PKCS#8 PEM \
         (-----BEGIN PRIVATE KEY-----), e.g. from `openssl genpkey -algorithm ed25519`"
    )]
    InvalidSigningKey(String),
    /// The claims handed to [`TokenSigner::issue`] would produce a token [`verify`] refuses.
    #[error("refusing to issue a device token: {0}")]
    InvalidClaims(String),
    /// Signing failed.
    #[error("could not sign the device token: {0}")]
    Sign(String),
    /// The public key could not be parsed or is of an unsupported type or size.
    #[error("invalid verification key: {0}")]
    InvalidPublicKey(String),
    /// A private key was supplied where a public key was expected.
    #[error(
        "a private key was supplied; register only the public key (`openssl pkey -in key.pem \
         -pubout`) and keep the private key with the issuer"
    )]
    PrivateKeyGiven,
    /// The requested algorithm does not fit the key.
    #[error("a {key} key cannot verify {alg} tokens; {hint}")]
    AlgorithmMismatch {
        /// The key type (e.g. `EC P-256`).
        key: String,
        /// The requested algorithm.
        alg: String,
        /// What would work.
        hint: String,
    },
    /// The JWK set is not valid JSON, contains an unusable key, or has no signature key at all.
    #[error("invalid JWK set: {0}")]
    InvalidJwks(String),
}

/// A tenant's hub-held Ed25519 token signing key. Secret: persist [`to_pkcs8_pem`] encrypted or
/// in a protected store only.
///
/// [`to_pkcs8_pem`]: Self::to_pkcs8_pem
pub struct TokenSigner {
    key_pair: KeyPair,
    encoding: EncodingKey,
    kid: String,
}

impl TokenSigner {
    /// A new random Ed25519 key.
    ///
    /// # Errors
    /// [`KeyError::Generate`] if the system RNG fails.
    pub fn generate() -> Result<Self, KeyError> {
        let key_pair =
            KeyPair::generate_for(&PKCS_ED25519).map_err(|e| KeyError::Generate(e.to_string()))?;
        Self::from_key_pair(key_pair)
    }

    /// Loads a key persisted with [`to_pkcs8_pem`](Self::to_pkcs8_pem) (or any unencrypted
    /// Ed25519 PKCS#8 v1/v2 PEM, such as `openssl genpkey -algorithm ed25519` writes).
    ///
    /// # Errors
    /// [`KeyError::InvalidSigningKey`] if `pem` is not such a key.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        let key_pair = KeyPair::from_pem(&normalize_pem(pem))
            .map_err(|e| KeyError::InvalidSigningKey(e.to_string()))?;
        Self::from_key_pair(key_pair)
    }

    fn from_key_pair(key_pair: KeyPair) -> Result<Self, KeyError> {
        if key_pair.algorithm() != &PKCS_ED25519 {
            return Err(KeyError::InvalidSigningKey(
                "the key is not an Ed25519 key".to_owned(),
            ));
        }
        let encoding = EncodingKey::from_ed_der(key_pair.serialized_der());
        // Make sure the signing backend accepts the key now rather than on first use.
        jsonwebtoken::crypto::sign(b"ferrohub key probe", &encoding, Algorithm::EdDSA)
            .map_err(|e| KeyError::InvalidSigningKey(e.to_string()))?;
        let kid = fingerprint(&key_pair.subject_public_key_info());
        Ok(Self {
            key_pair,
            encoding,
            kid,
        })
    }

    /// The private key as PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`). Secret.
    #[must_use]
    pub fn to_pkcs8_pem(&self) -> String {
        self.key_pair.serialize_pem()
    }

    /// The public key as SPKI PEM (`-----BEGIN PUBLIC KEY-----`), for relying parties.
    #[must_use]
    pub fn public_key_pem(&self) -> String {
        self.key_pair.public_key_pem()
    }

    /// The public key as a JWK (`{"kty":"OKP","crv":"Ed25519","x":…,"kid":…,"alg":"EdDSA",
    /// "use":"sig"}`), e.g. for publishing a JWK set.
    #[must_use]
    pub fn public_jwk(&self) -> Value {
        serde_json::json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "x": URL_SAFE_NO_PAD.encode(self.key_pair.public_key_raw()),
            "kid": self.kid,
            "alg": "EdDSA",
            "use": "sig",
        })
    }

    /// Key id: the first 16 hex digits of the SHA-256 of the public key's SPKI DER. Set as `kid`
    /// in every issued token.
    #[must_use]
    pub fn key_id(&self) -> String {
        self.kid.clone()
    }

    /// The matching public key (EdDSA, `kid` = [`key_id`](Self::key_id)) for [`verify`].
    #[must_use]
    pub fn verification_key(&self) -> VerificationKey {
        VerificationKey {
            kid: Some(self.kid.clone()),
            alg: Algorithm::EdDSA,
            key: DecodingKey::from_ed_der(self.key_pair.public_key_raw()),
        }
    }

    /// Signs `claims` (EdDSA, header `kid` = [`key_id`](Self::key_id), `typ` = `JWT`).
    ///
    /// # Errors
    /// [`KeyError::InvalidClaims`] if `aud` is not [`AUDIENCE`], `sub` is empty or `exp` is not
    /// after `iat`; [`KeyError::Sign`] if signing fails. The maximum lifetime is [`verify`]'s
    /// business and is not checked here.
    pub fn issue(&self, claims: &DeviceClaims) -> Result<String, KeyError> {
        if claims.aud != AUDIENCE {
            return Err(KeyError::InvalidClaims(format!(
                "aud is {:?}; it must be {AUDIENCE:?}",
                claims.aud
            )));
        }
        if claims.sub.is_empty() {
            return Err(KeyError::InvalidClaims(
                "sub (the device id) is empty".to_owned(),
            ));
        }
        if claims.exp <= claims.iat {
            return Err(KeyError::InvalidClaims(format!(
                "exp ({}) must be after iat ({})",
                claims.exp, claims.iat
            )));
        }
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| KeyError::Sign(e.to_string()))
    }
}

impl fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSigner")
            .field("alg", &"EdDSA")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// A public key that device tokens may be verified with, bound to exactly one algorithm and
/// optionally to a `kid`.
#[derive(Clone)]
pub struct VerificationKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

impl VerificationKey {
    /// Parses a PEM public key: SPKI (`-----BEGIN PUBLIC KEY-----`), PKCS#1 (`-----BEGIN RSA
    /// PUBLIC KEY-----`) or the public key of a certificate (`-----BEGIN CERTIFICATE-----`; its
    /// validity and issuer are not looked at).
    ///
    /// The algorithm follows from the key where it can: EC P-256 → ES256, EC P-384 → ES384,
    /// Ed25519 → EdDSA. RSA keys (2048–8192 bits) verify RS256 unless `alg` names another of
    /// RS256/RS384/RS512/PS256/PS384/PS512. An `alg` that does not fit the key is an error. The
    /// key has no `kid` (see [`with_kid`](Self::with_kid)).
    ///
    /// # Errors
    /// [`KeyError::PrivateKeyGiven`] for a private key, [`KeyError::InvalidPublicKey`] for
    /// unparsable or unsupported keys, [`KeyError::AlgorithmMismatch`] for a misfit `alg`.
    pub fn from_pem(pem: &str, alg: Option<Algorithm>) -> Result<Self, KeyError> {
        let normalized = normalize_pem(pem);
        let (_, block) = x509_parser::pem::parse_x509_pem(normalized.as_bytes()).map_err(|e| {
            KeyError::InvalidPublicKey(format!(
                "not a PEM block ({e}); expected -----BEGIN PUBLIC KEY-----"
            ))
        })?;
        let (alg, key) = match block.label.as_str() {
            "PUBLIC KEY" => {
                let (_, spki) = SubjectPublicKeyInfo::from_der(&block.contents).map_err(|e| {
                    KeyError::InvalidPublicKey(format!("unparsable SubjectPublicKeyInfo: {e}"))
                })?;
                key_from_spki(&spki, alg)?
            }
            "RSA PUBLIC KEY" => {
                let (_, rsa) = RSAPublicKey::from_der(&block.contents).map_err(|e| {
                    KeyError::InvalidPublicKey(format!("unparsable PKCS#1 RSA public key: {e}"))
                })?;
                check_rsa_size(rsa.modulus)?;
                (
                    rsa_algorithm(alg)?,
                    DecodingKey::from_rsa_der(&block.contents),
                )
            }
            "CERTIFICATE" => {
                let (_, cert) =
                    x509_parser::parse_x509_certificate(&block.contents).map_err(|e| {
                        KeyError::InvalidPublicKey(format!("unparsable certificate: {e}"))
                    })?;
                key_from_spki(cert.public_key(), alg)?
            }
            label if label.contains("PRIVATE KEY") => return Err(KeyError::PrivateKeyGiven),
            label => {
                return Err(KeyError::InvalidPublicKey(format!(
                    "PEM block is a {label:?}; expected PUBLIC KEY, RSA PUBLIC KEY or CERTIFICATE"
                )));
            }
        };
        Ok(Self {
            kid: None,
            alg,
            key,
        })
    }

    /// Parses a JWK set (`{"keys":[…]}`, or a single JWK object), keeping each key's `kid`.
    ///
    /// Supported: `kty` `RSA` (`n`, `e`; RS256 unless `alg` says otherwise), `EC` with `crv`
    /// `P-256`/`P-384` (`x`, `y`), `OKP` with `crv` `Ed25519` (`x`). A key's `alg`, when present,
    /// must fit its type. Keys marked `"use":"enc"` are skipped.
    ///
    /// # Errors
    /// [`KeyError::InvalidJwks`] naming the offending key when JSON is invalid, any remaining key
    /// is unsupported (including symmetric `oct` keys) or carries private material (`d`), or no
    /// signature key is left.
    pub fn from_jwks(json: &str) -> Result<Vec<Self>, KeyError> {
        let value: Value = serde_json::from_str(json)
            .map_err(|e| KeyError::InvalidJwks(format!("not valid JSON: {e}")))?;
        let jwks: Vec<Value> = match value {
            Value::Object(mut obj) => match obj.remove("keys") {
                Some(Value::Array(keys)) => keys,
                Some(_) => {
                    return Err(KeyError::InvalidJwks("`keys` must be an array".to_owned()));
                }
                None if obj.contains_key("kty") => vec![Value::Object(obj)],
                None => {
                    return Err(KeyError::InvalidJwks(
                        "expected {\"keys\": [...]} or a single JWK with `kty`".to_owned(),
                    ));
                }
            },
            _ => {
                return Err(KeyError::InvalidJwks(
                    "expected a JSON object {\"keys\": [...]}".to_owned(),
                ));
            }
        };
        let mut keys = Vec::with_capacity(jwks.len());
        for (i, jwk) in jwks.iter().enumerate() {
            let Value::Object(jwk) = jwk else {
                return Err(KeyError::InvalidJwks(format!("key #{i} is not an object")));
            };
            let kid = match jwk.get("kid") {
                None => None,
                Some(Value::String(kid)) => Some(kid.clone()),
                Some(_) => {
                    return Err(KeyError::InvalidJwks(format!(
                        "key #{i}: `kid` must be a string"
                    )));
                }
            };
            let name = match &kid {
                Some(kid) => format!("key #{i} (kid {kid:?})"),
                None => format!("key #{i}"),
            };
            match key_from_jwk(jwk) {
                Ok(Some((alg, key))) => keys.push(Self { kid, alg, key }),
                Ok(None) => {}
                Err(reason) => return Err(KeyError::InvalidJwks(format!("{name}: {reason}"))),
            }
        }
        if keys.is_empty() {
            return Err(KeyError::InvalidJwks(
                "the set contains no signature verification key".to_owned(),
            ));
        }
        Ok(keys)
    }

    /// The same key, bound to `kid`: tokens naming another `kid` will not be tried against it.
    #[must_use]
    pub fn with_kid(mut self, kid: impl Into<String>) -> Self {
        self.kid = Some(kid.into());
        self
    }

    /// The key id, if the key has one. A key without one is a candidate for any token of its
    /// algorithm whose `kid` matches no other key.
    #[must_use]
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The one algorithm this key verifies.
    #[must_use]
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

impl fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerificationKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// Verifies a device token at time `now` (seconds since the epoch) allowing `leeway_secs` of
/// clock skew, with the default maximum lifetime ([`DEFAULT_MAX_LIFETIME_SECS`]).
///
/// See [`verify_with_max_lifetime`].
///
/// # Errors
/// See [`verify_with_max_lifetime`].
pub fn verify(
    token: &str,
    keys: &[VerificationKey],
    now: i64,
    leeway_secs: u64,
) -> Result<DeviceClaims, TokenError> {
    verify_with_max_lifetime(token, keys, now, leeway_secs, DEFAULT_MAX_LIFETIME_SECS)
}

/// Verifies a device token and returns its claims.
///
/// 1. The header's `alg` must be an asymmetric algorithm ([`TokenError::UnsupportedAlgorithm`]
///    for `HS*`, `none` and anything unknown); a `crit` header is refused.
/// 2. Candidate keys: with a `kid` in the header, the keys with that `kid` — or, if none has
///    it, the keys without a `kid`; without one, all keys. Of those, only keys registered for
///    the token's algorithm ([`TokenError::UnknownKey`] if none is left). The signature must
///    verify under one of them ([`TokenError::BadSignature`]).
/// 3. Claims: `sub`, `aud`, `iat` and `exp` are required; `aud` must be (or, as an array,
///    contain) [`AUDIENCE`]; the token is expired once `now >= exp + leeway`; it is not yet
///    valid while `now + leeway < nbf` (or `< iat`); `exp - iat` may not exceed
///    `max_lifetime_secs`.
///
/// # Errors
/// The [`TokenError`] for the first failed check.
pub fn verify_with_max_lifetime(
    token: &str,
    keys: &[VerificationKey],
    now: i64,
    leeway_secs: u64,
    max_lifetime_secs: u64,
) -> Result<DeviceClaims, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed(format!(
            "token is {} bytes; at most {MAX_TOKEN_LEN} are accepted",
            token.len()
        )));
    }
    let mut segments = token.split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(TokenError::Malformed(
            "expected three base64url segments separated by '.' (JWS compact serialization)"
                .to_owned(),
        ));
    };

    // 1. Header.
    let header = decode_json_segment(header_b64, "header")?;
    let alg = match header.get("alg") {
        Some(Value::String(alg)) => accepted_algorithm(alg)?,
        Some(_) => return Err(TokenError::Malformed("`alg` must be a string".to_owned())),
        None => return Err(TokenError::Malformed("the header has no `alg`".to_owned())),
    };
    if header.contains_key("crit") {
        return Err(TokenError::Malformed(
            "the header lists `crit` extensions, which ferrohub does not understand".to_owned(),
        ));
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.as_str()),
        Some(_) => return Err(TokenError::Malformed("`kid` must be a string".to_owned())),
    };

    // 2. Signature.
    if URL_SAFE_NO_PAD.decode(signature_b64).is_err() {
        return Err(TokenError::Malformed(
            "the signature segment is not unpadded base64url".to_owned(),
        ));
    }
    let by_kid: Vec<&VerificationKey> = match kid {
        Some(kid) => {
            let exact: Vec<_> = keys.iter().filter(|k| k.kid() == Some(kid)).collect();
            if exact.is_empty() {
                keys.iter().filter(|k| k.kid.is_none()).collect()
            } else {
                exact
            }
        }
        None => keys.iter().collect(),
    };
    let mut candidates = by_kid.into_iter().filter(|k| k.alg == alg).peekable();
    if candidates.peek().is_none() {
        return Err(TokenError::UnknownKey {
            kid: kid.map(str::to_owned),
            alg: format!("{alg:?}"),
        });
    }
    let message = &token.as_bytes()[..header_b64.len() + 1 + payload_b64.len()];
    let verified = candidates.any(|k| {
        matches!(
            jsonwebtoken::crypto::verify(signature_b64, message, &k.key, alg),
            Ok(true)
        )
    });
    if !verified {
        return Err(TokenError::BadSignature);
    }

    // 3. Claims.
    let claims = decode_json_segment(payload_b64, "payload")?;
    let sub = match claims.get("sub") {
        Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
        None => return Err(TokenError::MissingClaim("sub")),
        Some(_) => {
            return Err(TokenError::Malformed(
                "`sub` must be a non-empty string (the device id)".to_owned(),
            ));
        }
    };
    let aud_ok = match claims.get("aud") {
        None => return Err(TokenError::MissingClaim("aud")),
        Some(Value::String(aud)) => aud == AUDIENCE,
        Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(AUDIENCE)),
        Some(_) => {
            return Err(TokenError::Malformed(
                "`aud` must be a string or an array of strings".to_owned(),
            ));
        }
    };
    if !aud_ok {
        return Err(TokenError::WrongAudience {
            found: claims.get("aud").map(Value::to_string).unwrap_or_default(),
        });
    }
    let exp = numeric_date(&claims, "exp")?.ok_or(TokenError::MissingClaim("exp"))?;
    let iat = numeric_date(&claims, "iat")?.ok_or(TokenError::MissingClaim("iat"))?;
    let nbf = numeric_date(&claims, "nbf")?;
    let tenant = optional_string(&claims, "ten")?;
    let jti = optional_string(&claims, "jti")?;

    let leeway = i64::try_from(leeway_secs).unwrap_or(i64::MAX);
    if now >= exp.saturating_add(leeway) {
        return Err(TokenError::Expired {
            exp,
            now,
            leeway: leeway_secs,
        });
    }
    for not_before in nbf.into_iter().chain([iat]) {
        if now.saturating_add(leeway) < not_before {
            return Err(TokenError::NotYetValid {
                not_before,
                now,
                leeway: leeway_secs,
            });
        }
    }
    if exp <= iat {
        return Err(TokenError::Malformed(format!(
            "`exp` ({exp}) must be after `iat` ({iat})"
        )));
    }
    let lifetime = exp.saturating_sub(iat);
    if u64::try_from(lifetime).map_or(true, |l| l > max_lifetime_secs) {
        return Err(TokenError::TooLongLived {
            lifetime,
            max: max_lifetime_secs,
        });
    }

    Ok(DeviceClaims {
        sub,
        aud: AUDIENCE.to_owned(),
        tenant,
        iat,
        exp,
        jti,
    })
}

/// Cheap test whether an MQTT password is a JWT rather than a plain secret: it starts with
/// `eyJ` (base64url of `{"`) and consists of three `.`-separated base64url segments (the last
/// may be empty, so unsigned tokens reach [`verify`] and are refused there with a clear error).
#[must_use]
pub fn looks_like_jwt(password: &[u8]) -> bool {
    if !password.starts_with(b"eyJ") {
        return false;
    }
    let mut segments = 0;
    for (i, segment) in password.split(|&b| b == b'.').enumerate() {
        if (segment.is_empty() && i < 2)
            || !segment
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return false;
        }
        segments += 1;
    }
    segments == 3
}

/// First 16 hex digits of SHA-256 over `spki_der`.
fn fingerprint(spki_der: &[u8]) -> String {
    let digest = Sha256::digest(spki_der);
    hex::encode(&digest[..8])
}

/// Trims every line so that indented or CRLF PEM pastes parse.
fn normalize_pem(pem: &str) -> String {
    let mut out = String::with_capacity(pem.len());
    for line in pem.lines().map(str::trim).filter(|l| !l.is_empty()) {
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn accepted_algorithm(name: &str) -> Result<Algorithm, TokenError> {
    match Algorithm::from_str(name) {
        Ok(Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) | Err(_) => {
            Err(TokenError::UnsupportedAlgorithm(name.to_owned()))
        }
        Ok(alg) => Ok(alg),
    }
}

fn decode_json_segment(segment: &str, what: &str) -> Result<Map<String, Value>, TokenError> {
    let bytes = URL_SAFE_NO_PAD.decode(segment).map_err(|_| {
        TokenError::Malformed(format!("the {what} segment is not unpadded base64url"))
    })?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(TokenError::Malformed(format!(
            "the {what} segment is not a JSON object"
        ))),
    }
}

/// A NumericDate claim, as whole seconds (fractions are truncated toward the past).
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, TokenError> {
    let Some(value) = claims.get(name) else {
        return Ok(None);
    };
    let seconds = value.as_i64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.is_finite() && f.abs() < 1e17)
            .map(|f| f.floor() as i64)
    });
    match seconds {
        Some(s) => Ok(Some(s)),
        None => Err(TokenError::Malformed(format!(
            "`{name}` must be a number of seconds since the Unix epoch"
        ))),
    }
}

fn optional_string(claims: &Map<String, Value>, name: &str) -> Result<Option<String>, TokenError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(TokenError::Malformed(format!("`{name}` must be a string"))),
    }
}

fn mismatch(key: &str, alg: Algorithm, hint: &str) -> KeyError {
    KeyError::AlgorithmMismatch {
        key: key.to_owned(),
        alg: format!("{alg:?}"),
        hint: hint.to_owned(),
    }
}

fn rsa_algorithm(requested: Option<Algorithm>) -> Result<Algorithm, KeyError> {
    match requested {
        None => Ok(Algorithm::RS256),
        Some(
            alg @ (Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512),
        ) => Ok(alg),
        Some(alg) => Err(mismatch(
            "RSA",
            alg,
            "use one of RS256, RS384, RS512, PS256, PS384, PS512",
        )),
    }
}

fn fixed_algorithm(
    key: &str,
    implied: Algorithm,
    requested: Option<Algorithm>,
) -> Result<Algorithm, KeyError> {
    match requested {
        None => Ok(implied),
        Some(alg) if alg == implied => Ok(alg),
        Some(alg) => Err(mismatch(
            key,
            alg,
            &format!("this key only verifies {implied:?}; omit the algorithm or use {implied:?}"),
        )),
    }
}

/// Size in bits of a big-endian unsigned integer.
fn bit_length(bytes: &[u8]) -> usize {
    let bytes = strip_leading_zeros(bytes);
    match bytes.first() {
        None => 0,
        Some(first) => (bytes.len() - 1) * 8 + (8 - first.leading_zeros() as usize),
    }
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

fn check_rsa_size(modulus: &[u8]) -> Result<(), KeyError> {
    let bits = bit_length(modulus);
    if (MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
        Ok(())
    } else {
        Err(KeyError::InvalidPublicKey(format!(
            "RSA modulus is {bits} bits; use a key of {MIN_RSA_BITS} to {MAX_RSA_BITS} bits"
        )))
    }
}

const UNSUPPORTED_KEY_HINT: &str = "use RSA (2048-8192 bits), EC P-256, EC P-384 or Ed25519";

fn key_from_spki(
    spki: &SubjectPublicKeyInfo<'_>,
    requested: Option<Algorithm>,
) -> Result<(Algorithm, DecodingKey), KeyError> {
    let oid = &spki.algorithm.algorithm;
    let raw: &[u8] = spki.subject_public_key.data.as_ref();
    if *oid == OID_PKCS1_RSAENCRYPTION {
        let (_, rsa) = RSAPublicKey::from_der(raw).map_err(|e| {
            KeyError::InvalidPublicKey(format!("unparsable RSA public key in SPKI: {e}"))
        })?;
        check_rsa_size(rsa.modulus)?;
        Ok((rsa_algorithm(requested)?, DecodingKey::from_rsa_der(raw)))
    } else if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        let (name, implied, coordinate_len) = match curve {
            Some(c) if c == OID_EC_P256 => ("EC P-256", Algorithm::ES256, 32),
            Some(c) if c == OID_NIST_EC_P384 => ("EC P-384", Algorithm::ES384, 48),
            Some(c) => {
                return Err(KeyError::InvalidPublicKey(format!(
                    "unsupported EC curve {c}; {UNSUPPORTED_KEY_HINT}"
                )));
            }
            None => {
                return Err(KeyError::InvalidPublicKey(
                    "EC key without a named curve; export it with a named curve (P-256 or P-384)"
                        .to_owned(),
                ));
            }
        };
        if raw.len() != 1 + 2 * coordinate_len || raw.first() != Some(&0x04) {
            return Err(KeyError::InvalidPublicKey(format!(
                "{name} public key is not an uncompressed point; export it uncompressed"
            )));
        }
        Ok((
            fixed_algorithm(name, implied, requested)?,
            DecodingKey::from_ec_der(raw),
        ))
    } else if *oid == OID_SIG_ED25519 {
        if raw.len() != 32 {
            return Err(KeyError::InvalidPublicKey(format!(
                "Ed25519 public key is {} bytes, expected 32",
                raw.len()
            )));
        }
        Ok((
            fixed_algorithm("Ed25519", Algorithm::EdDSA, requested)?,
            DecodingKey::from_ed_der(raw),
        ))
    } else {
        Err(KeyError::InvalidPublicKey(format!(
            "unsupported key algorithm {oid}; {UNSUPPORTED_KEY_HINT}"
        )))
    }
}

/// `Ok(None)` for keys to skip (encryption keys); `Err(reason)` for unusable ones.
fn key_from_jwk(jwk: &Map<String, Value>) -> Result<Option<(Algorithm, DecodingKey)>, String> {
    let field = |name: &str| -> Result<Option<&str>, String> {
        match jwk.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(format!("`{name}` must be a string")),
        }
    };
    let required = |name: &str| -> Result<&str, String> {
        field(name)?.ok_or_else(|| format!("`{name}` is missing"))
    };
    let b64 = |name: &str| -> Result<Vec<u8>, String> {
        let text = required(name)?;
        URL_SAFE_NO_PAD
            .decode(text.trim_end_matches('='))
            .map_err(|_| format!("`{name}` is not base64url"))
    };

    if field("use")? == Some("enc") {
        return Ok(None);
    }
    for private in ["d", "p", "q", "dp", "dq", "qi"] {
        if jwk.contains_key(private) {
            return Err(format!(
                "contains private key material (`{private}`); publish only public keys and keep \
                 the private key with the issuer"
            ));
        }
    }
    let requested = match field("alg")? {
        None => None,
        Some(name) => match Algorithm::from_str(name) {
            Ok(Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) | Err(_) => {
                return Err(format!(
                    "`alg` {name:?} is not accepted; use RS256/RS384/RS512, PS256/PS384/PS512, \
                     ES256/ES384 or EdDSA"
                ));
            }
            Ok(alg) => Some(alg),
        },
    };
    let kty = required("kty")?;
    let result = match kty {
        "RSA" => {
            let n = b64("n")?;
            let e = b64("e")?;
            let n = strip_leading_zeros(&n);
            let e = strip_leading_zeros(&e);
            check_rsa_size(n).map_err(|e| e.to_string())?;
            if e.is_empty() {
                return Err("`e` is zero".to_owned());
            }
            (
                rsa_algorithm(requested),
                DecodingKey::from_rsa_raw_components(n, e),
            )
        }
        "EC" => {
            let (name, implied, len) = match required("crv")? {
                "P-256" => ("EC P-256", Algorithm::ES256, 32),
                "P-384" => ("EC P-384", Algorithm::ES384, 48),
                crv => return Err(format!("unsupported curve {crv:?}; {UNSUPPORTED_KEY_HINT}")),
            };
            let x = b64("x")?;
            let y = b64("y")?;
            if x.len() != len || y.len() != len {
                return Err(format!("{name} coordinates must be {len} bytes each"));
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            (
                fixed_algorithm(name, implied, requested),
                DecodingKey::from_ec_der(&point),
            )
        }
        "OKP" => {
            match required("crv")? {
                "Ed25519" => {}
                crv => return Err(format!("unsupported curve {crv:?}; {UNSUPPORTED_KEY_HINT}")),
            }
            let x = b64("x")?;
            if x.len() != 32 {
                return Err(format!("Ed25519 `x` is {} bytes, expected 32", x.len()));
            }
            (
                fixed_algorithm("Ed25519", Algorithm::EdDSA, requested),
                DecodingKey::from_ed_der(&x),
            )
        }
        "oct" => {
            return Err(
                "symmetric (`oct`) keys are not accepted; device tokens must be signed with an \
                 asymmetric key"
                    .to_owned(),
            );
        }
        kty => return Err(format!("unsupported `kty` {kty:?}; {UNSUPPORTED_KEY_HINT}")),
    };
    let (alg, key) = result;
    Ok(Some((alg.map_err(|e| e.to_string())?, key)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use rcgen::{PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384};
    use serde_json::json;

    const NOW: i64 = 1_700_000_000;

    fn hub_key() -> TokenSigner {
        TokenSigner::generate().unwrap()
    }

    /// Signs arbitrary JSON claims with any header, bypassing `issue`'s checks.
    fn sign_raw(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        encode(&header, claims, key).unwrap()
    }

    fn ed_encoding(signer: &TokenSigner) -> EncodingKey {
        EncodingKey::from_ed_pem(signer.to_pkcs8_pem().as_bytes()).unwrap()
    }

    fn claims_json(iat: i64, exp: i64) -> Value {
        json!({"sub": "dev-1", "aud": "ferrohub", "iat": iat, "exp": exp})
    }

    fn unsigned(header: &Value, claims: &Value, signature: &str) -> String {
        format!(
            "{}.{}.{signature}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        )
    }

    #[test]
    fn hub_issued_round_trip() {
        let signer = hub_key();
        let mut claims = DeviceClaims::new("dev-1", Some("acme".into()), NOW, 3600);
        claims.jti = Some("j-1".into());
        let token = signer.issue(&claims).unwrap();
        assert!(looks_like_jwt(token.as_bytes()));
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, Algorithm::EdDSA);
        assert_eq!(header.kid.as_deref(), Some(signer.key_id().as_str()));
        assert_eq!(signer.key_id().len(), 16);
        let got = verify(&token, &[signer.verification_key()], NOW + 10, 0).unwrap();
        assert_eq!(got, claims);
        // The wire claim for the tenant is `ten`.
        let payload = token.split('.').nth(1).unwrap();
        let raw: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert_eq!(raw["ten"], "acme");
    }

    #[test]
    fn issue_refuses_unverifiable_claims() {
        let signer = hub_key();
        let mut c = DeviceClaims::new("dev-1", None, NOW, 60);
        c.aud = "other".into();
        assert!(matches!(signer.issue(&c), Err(KeyError::InvalidClaims(_))));
        let c = DeviceClaims::new("", None, NOW, 60);
        assert!(matches!(signer.issue(&c), Err(KeyError::InvalidClaims(_))));
        let c = DeviceClaims::new("dev-1", None, NOW, 0);
        assert!(matches!(signer.issue(&c), Err(KeyError::InvalidClaims(_))));
    }

    #[test]
    fn signer_persists_and_publishes() {
        let signer = hub_key();
        let pem = signer.to_pkcs8_pem();
        assert!(pem.contains("BEGIN PRIVATE KEY"));
        let loaded = TokenSigner::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(loaded.key_id(), signer.key_id());
        assert_eq!(loaded.public_key_pem(), signer.public_key_pem());
        let token = loaded
            .issue(&DeviceClaims::new("dev-1", None, NOW, 60))
            .unwrap();
        verify(&token, &[signer.verification_key()], NOW, 0).unwrap();

        // The public key registered as PEM (no kid) and as a JWK verifies hub tokens too.
        let pem_key = VerificationKey::from_pem(&signer.public_key_pem(), None).unwrap();
        assert_eq!(pem_key.algorithm(), Algorithm::EdDSA);
        assert_eq!(pem_key.kid(), None);
        verify(&token, &[pem_key], NOW, 0).unwrap();
        let jwks = json!({"keys": [signer.public_jwk()]}).to_string();
        let jwk_keys = VerificationKey::from_jwks(&jwks).unwrap();
        assert_eq!(jwk_keys[0].kid(), Some(signer.key_id().as_str()));
        verify(&token, &jwk_keys, NOW, 0).unwrap();

        assert!(!format!("{signer:?}").contains("PRIVATE"));
    }

    #[test]
    fn signer_accepts_openssl_pkcs8_v1_and_refuses_other_keys() {
        // RFC 8032 test 1 seed, wrapped as OpenSSL's `genpkey -algorithm ed25519` does (v1).
        let seed = hex::decode("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
            .unwrap();
        let mut der = hex::decode("302e020100300506032b657004220420").unwrap();
        der.extend_from_slice(&seed);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
        let pem =
            format!("  -----BEGIN PRIVATE KEY-----\r\n  {b64}\r\n  -----END PRIVATE KEY-----\r\n");
        let signer = TokenSigner::from_pkcs8_pem(&pem).unwrap();
        let public =
            hex::decode("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
                .unwrap();
        assert_eq!(signer.public_jwk()["x"], URL_SAFE_NO_PAD.encode(public));

        let p256 = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let err = TokenSigner::from_pkcs8_pem(&p256.serialize_pem()).unwrap_err();
        assert!(matches!(err, KeyError::InvalidSigningKey(_)), "{err}");
        let err = TokenSigner::from_pkcs8_pem(&signer.public_key_pem()).unwrap_err();
        assert!(matches!(err, KeyError::InvalidSigningKey(_)), "{err}");
        assert!(TokenSigner::from_pkcs8_pem("garbage").is_err());
    }

    #[test]
    fn expiry_and_leeway() {
        let signer = hub_key();
        let keys = [signer.verification_key()];
        let token = signer
            .issue(&DeviceClaims::new("dev-1", None, NOW - 100, 90))
            .unwrap(); // exp = NOW - 10
        let err = verify(&token, &keys, NOW, 0).unwrap_err();
        assert_eq!(
            err,
            TokenError::Expired {
                exp: NOW - 10,
                now: NOW,
                leeway: 0
            }
        );
        assert!(matches!(
            verify(&token, &keys, NOW, 10),
            Err(TokenError::Expired { .. })
        ));
        verify(&token, &keys, NOW, 11).unwrap();
        // At exactly `exp` the token is expired; one second before it is not.
        verify(&token, &keys, NOW - 11, 0).unwrap();
        assert!(verify(&token, &keys, NOW - 10, 0).is_err());
    }

    #[test]
    fn not_before_and_future_iat() {
        let signer = hub_key();
        let keys = [signer.verification_key()];
        let enc = ed_encoding(&signer);
        let kid = signer.key_id();
        let mut c = claims_json(NOW, NOW + 600);
        c["nbf"] = json!(NOW + 60);
        let token = sign_raw(Algorithm::EdDSA, Some(&kid), &enc, &c);
        assert_eq!(
            verify(&token, &keys, NOW, 30).unwrap_err(),
            TokenError::NotYetValid {
                not_before: NOW + 60,
                now: NOW,
                leeway: 30
            }
        );
        verify(&token, &keys, NOW, 60).unwrap();
        verify(&token, &keys, NOW + 60, 0).unwrap();

        let token = signer
            .issue(&DeviceClaims::new("dev-1", None, NOW + 300, 600))
            .unwrap();
        assert!(matches!(
            verify(&token, &keys, NOW, 60),
            Err(TokenError::NotYetValid { .. })
        ));
    }

    #[test]
    fn audience_is_checked() {
        let signer = hub_key();
        let keys = [signer.verification_key()];
        let enc = ed_encoding(&signer);
        let kid = signer.key_id();
        let mut c = claims_json(NOW, NOW + 60);
        c["aud"] = json!("someone-else");
        let token = sign_raw(Algorithm::EdDSA, Some(&kid), &enc, &c);
        assert_eq!(
            verify(&token, &keys, NOW, 0).unwrap_err(),
            TokenError::WrongAudience {
                found: "\"someone-else\"".into()
            }
        );
        c["aud"] = json!(["x", "ferrohub"]);
        let token = sign_raw(Algorithm::EdDSA, Some(&kid), &enc, &c);
        assert_eq!(verify(&token, &keys, NOW, 0).unwrap().aud, AUDIENCE);
        c["aud"] = json!(["x"]);
        let token = sign_raw(Algorithm::EdDSA, Some(&kid), &enc, &c);
        assert!(matches!(
            verify(&token, &keys, NOW, 0),
            Err(TokenError::WrongAudience { .. })
        ));
        c.as_object_mut().unwrap().remove("aud");
        let token = sign_raw(Algorithm::EdDSA, Some(&kid), &enc, &c);
        assert_eq!(
            verify(&token, &keys, NOW, 0).unwrap_err(),
            TokenError::MissingClaim("aud")
        );
    }

    #[test]
    fn required_claims_and_types() {
        let signer = hub_key();
        let keys = [signer.verification_key()];
        let enc = ed_encoding(&signer);
        let kid = signer.key_id();
        for (missing, err) in [
            ("exp", TokenError::MissingClaim("exp")),
            ("iat", TokenError::MissingClaim("iat")),
            ("sub", TokenError::MissingClaim("sub")),
        ] {
            let mut c = claims_json(NOW, NOW + 60);
            c.as_object_mut().unwrap().remove(missing);
            let token = sign_raw(Algorithm::EdDSA, Some(&kid), &enc, &c);
            assert_eq!(verify(&token, &keys, NOW, 0).unwrap_err(), err);
        }
        let mut c = claims_json(NOW, NOW + 60);
        c["exp"] = json!("tomorrow");
        let token = sign_raw(Algorithm::EdDSA, Some(&kid), &enc, &c);
        assert!(matches!(
            verify(&token, &keys, NOW, 0),
            Err(TokenError::Malformed(_))
        ));
        // Fractional NumericDates are accepted.
        let mut c = claims_json(NOW, NOW + 60);
        c["exp"] = json!((NOW + 60) as f64 + 0.5);
        let token = sign_raw(Algorithm::EdDSA, Some(&kid), &enc, &c);
        assert_eq!(verify(&token, &keys, NOW, 0).unwrap().exp, NOW + 60);
    }

    #[test]
    fn maximum_lifetime() {
        let signer = hub_key();
        let keys = [signer.verification_key()];
        let day = 24 * 3600;
        let ok = signer
            .issue(&DeviceClaims::new("dev-1", None, NOW, 30 * day))
            .unwrap();
        verify(&ok, &keys, NOW, 0).unwrap();
        let long = signer
            .issue(&DeviceClaims::new("dev-1", None, NOW, 30 * day + 1))
            .unwrap();
        assert_eq!(
            verify(&long, &keys, NOW, 0).unwrap_err(),
            TokenError::TooLongLived {
                lifetime: 30 * day + 1,
                max: DEFAULT_MAX_LIFETIME_SECS
            }
        );
        assert!(matches!(
            verify_with_max_lifetime(&ok, &keys, NOW, 0, 3600),
            Err(TokenError::TooLongLived { .. })
        ));
        verify_with_max_lifetime(&long, &keys, NOW, 0, 31 * day as u64).unwrap();
    }

    #[test]
    fn tampering_is_detected() {
        let signer = hub_key();
        let keys = [signer.verification_key()];
        let token = signer
            .issue(&DeviceClaims::new("dev-1", None, NOW, 60))
            .unwrap();
        let (head, sig) = token.rsplit_once('.').unwrap();
        // Flip one signature character.
        let mut bad_sig = sig.to_owned().into_bytes();
        bad_sig[5] = if bad_sig[5] == b'A' { b'B' } else { b'A' };
        let tampered = format!("{head}.{}", String::from_utf8(bad_sig).unwrap());
        assert_eq!(
            verify(&tampered, &keys, NOW, 0).unwrap_err(),
            TokenError::BadSignature
        );
        // Swap in another payload (device id) under the original signature.
        let (header, _) = head.split_once('.').unwrap();
        let mut c = claims_json(NOW, NOW + 60);
        c["sub"] = json!("dev-2");
        let forged = format!("{header}.{}.{sig}", URL_SAFE_NO_PAD.encode(c.to_string()));
        assert_eq!(
            verify(&forged, &keys, NOW, 0).unwrap_err(),
            TokenError::BadSignature
        );
        // Truncated signature.
        let short = &token[..token.len() - 4];
        assert!(verify(short, &keys, NOW, 0).is_err());
    }

    #[test]
    fn other_tenants_key_is_refused() {
        let tenant_a = hub_key();
        let tenant_b = hub_key();
        let token = tenant_a
            .issue(&DeviceClaims::new("dev-1", Some("a".into()), NOW, 60))
            .unwrap();
        // B's hub key has a kid, which does not match.
        assert_eq!(
            verify(&token, &[tenant_b.verification_key()], NOW, 0).unwrap_err(),
            TokenError::UnknownKey {
                kid: Some(tenant_a.key_id()),
                alg: "EdDSA".into()
            }
        );
        // B's key registered without a kid is tried, and the signature fails.
        let b_pem = VerificationKey::from_pem(&tenant_b.public_key_pem(), None).unwrap();
        assert_eq!(
            verify(&token, std::slice::from_ref(&b_pem), NOW, 0).unwrap_err(),
            TokenError::BadSignature
        );
        // Even with a stolen kid.
        let b_as_a = b_pem.with_kid(tenant_a.key_id());
        assert_eq!(
            verify(&token, &[b_as_a], NOW, 0).unwrap_err(),
            TokenError::BadSignature
        );
        assert!(matches!(
            verify(&token, &[], NOW, 0),
            Err(TokenError::UnknownKey { .. })
        ));
    }

    #[test]
    fn es256_pem_key_from_rcgen() {
        let kp = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let key = VerificationKey::from_pem(&kp.public_key_pem(), None).unwrap();
        assert_eq!(key.algorithm(), Algorithm::ES256);
        assert_eq!(
            VerificationKey::from_pem(&kp.public_key_pem(), Some(Algorithm::ES256))
                .unwrap()
                .algorithm(),
            Algorithm::ES256
        );
        let enc = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
        let token = sign_raw(
            Algorithm::ES256,
            Some("tenant-issuer-1"),
            &enc,
            &json!({"sub": "dev-9", "aud": "ferrohub", "ten": "acme", "iat": NOW, "exp": NOW + 60}),
        );
        let claims = verify(&token, &[key], NOW, 0).unwrap();
        assert_eq!(claims.sub, "dev-9");
        assert_eq!(claims.tenant.as_deref(), Some("acme"));

        for wrong in [
            Algorithm::ES384,
            Algorithm::RS256,
            Algorithm::HS256,
            Algorithm::EdDSA,
        ] {
            let err = VerificationKey::from_pem(&kp.public_key_pem(), Some(wrong)).unwrap_err();
            assert!(matches!(err, KeyError::AlgorithmMismatch { .. }), "{err}");
        }
    }

    #[test]
    fn es384_and_certificate_pem() {
        let kp = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["issuer.example".to_owned()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        let key = VerificationKey::from_pem(&cert.pem(), None).unwrap();
        assert_eq!(key.algorithm(), Algorithm::ES384);
        let enc = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
        let token = sign_raw(Algorithm::ES384, None, &enc, &claims_json(NOW, NOW + 60));
        verify(&token, std::slice::from_ref(&key), NOW, 0).unwrap();
        // An ES256 token can't be checked with a P-384 key.
        let p256 = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let enc256 = EncodingKey::from_ec_pem(p256.serialize_pem().as_bytes()).unwrap();
        let token = sign_raw(Algorithm::ES256, None, &enc256, &claims_json(NOW, NOW + 60));
        assert!(matches!(
            verify(&token, &[key], NOW, 0),
            Err(TokenError::UnknownKey { .. })
        ));
    }

    #[test]
    fn rsa_keys_default_to_rs256_and_honour_pss() {
        let kp = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let public = kp.public_key_pem();
        let rs = VerificationKey::from_pem(&public, None).unwrap();
        assert_eq!(rs.algorithm(), Algorithm::RS256);
        let ps = VerificationKey::from_pem(&public, Some(Algorithm::PS256)).unwrap();
        assert_eq!(ps.algorithm(), Algorithm::PS256);
        let enc = EncodingKey::from_rsa_pem(kp.serialize_pem().as_bytes()).unwrap();
        let rs_token = sign_raw(Algorithm::RS256, None, &enc, &claims_json(NOW, NOW + 60));
        let ps_token = sign_raw(Algorithm::PS256, None, &enc, &claims_json(NOW, NOW + 60));
        verify(&rs_token, std::slice::from_ref(&rs), NOW, 0).unwrap();
        verify(&ps_token, std::slice::from_ref(&ps), NOW, 0).unwrap();
        assert!(matches!(
            verify(&ps_token, std::slice::from_ref(&rs), NOW, 0),
            Err(TokenError::UnknownKey { .. })
        ));
        // Both registrations side by side: each token finds its own.
        verify(&ps_token, &[rs.clone(), ps.clone()], NOW, 0).unwrap();
        verify(&rs_token, &[ps, rs], NOW, 0).unwrap();
        let err = VerificationKey::from_pem(&public, Some(Algorithm::ES256)).unwrap_err();
        assert!(matches!(err, KeyError::AlgorithmMismatch { .. }), "{err}");

        // The same key as a JWK.
        let raw = kp.public_key_raw(); // PKCS#1 RSAPublicKey
        let (_, rsa) = RSAPublicKey::from_der(raw).unwrap();
        let jwk = json!({"kty": "RSA", "kid": "r1",
            "n": URL_SAFE_NO_PAD.encode(strip_leading_zeros(rsa.modulus)),
            "e": URL_SAFE_NO_PAD.encode(rsa.exponent)});
        let keys = VerificationKey::from_jwks(&jwk.to_string()).unwrap();
        assert_eq!(keys[0].algorithm(), Algorithm::RS256);
        verify(&rs_token, &keys, NOW, 0).unwrap();

        // And as a PKCS#1 PEM (`-----BEGIN RSA PUBLIC KEY-----`).
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        let pkcs1 =
            format!("-----BEGIN RSA PUBLIC KEY-----\n{b64}\n-----END RSA PUBLIC KEY-----\n");
        let key = VerificationKey::from_pem(&pkcs1, Some(Algorithm::PS256)).unwrap();
        verify(&ps_token, &[key], NOW, 0).unwrap();
    }

    #[test]
    fn from_pem_refuses_private_and_garbage() {
        let kp = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        assert_eq!(
            VerificationKey::from_pem(&kp.serialize_pem(), None).unwrap_err(),
            KeyError::PrivateKeyGiven
        );
        for bad in [
            "",
            "hello",
            "-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n",
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
            "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
        ] {
            assert!(
                matches!(
                    VerificationKey::from_pem(bad, None),
                    Err(KeyError::InvalidPublicKey(_))
                ),
                "{bad:?}"
            );
        }
    }

    fn ec_jwk(kp: &KeyPair, kid: &str) -> Value {
        let point = kp.public_key_raw(); // 0x04 || x || y
        assert_eq!(point.len(), 65);
        json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
               "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
               "y": URL_SAFE_NO_PAD.encode(&point[33..])})
    }

    #[test]
    fn jwks_with_kid_selection() {
        let ec = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let ed = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let jwks = json!({"keys": [
            ec_jwk(&ec, "ec-1"),
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed-1", "alg": "EdDSA",
             "x": URL_SAFE_NO_PAD.encode(ed.public_key_raw())},
            {"kty": "RSA", "use": "enc", "kid": "wrap", "n": "AQAB", "e": "AQAB"},
        ]});
        let keys = VerificationKey::from_jwks(&jwks.to_string()).unwrap();
        assert_eq!(keys.len(), 2, "the encryption key is skipped");
        assert_eq!(keys[0].kid(), Some("ec-1"));
        assert_eq!(keys[0].algorithm(), Algorithm::ES256);
        assert_eq!(keys[1].kid(), Some("ed-1"));
        assert_eq!(keys[1].algorithm(), Algorithm::EdDSA);

        let ec_enc = EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).unwrap();
        let ed_enc = EncodingKey::from_ed_der(ed.serialized_der());
        let c = claims_json(NOW, NOW + 60);

        verify(
            &sign_raw(Algorithm::ES256, Some("ec-1"), &ec_enc, &c),
            &keys,
            NOW,
            0,
        )
        .unwrap();
        verify(
            &sign_raw(Algorithm::EdDSA, Some("ed-1"), &ed_enc, &c),
            &keys,
            NOW,
            0,
        )
        .unwrap();
        // No kid: every key of the algorithm is tried.
        verify(
            &sign_raw(Algorithm::EdDSA, None, &ed_enc, &c),
            &keys,
            NOW,
            0,
        )
        .unwrap();
        // A kid naming another key of the right algorithm: only that key is tried.
        let ed2 = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let mut two_ed = keys.clone();
        two_ed.push(
            VerificationKey::from_pem(&ed2.public_key_pem(), None)
                .unwrap()
                .with_kid("ed-2"),
        );
        assert_eq!(
            verify(
                &sign_raw(Algorithm::EdDSA, Some("ed-2"), &ed_enc, &c),
                &two_ed,
                NOW,
                0
            )
            .unwrap_err(),
            TokenError::BadSignature
        );
        // A kid naming a key of another algorithm, or no key at all.
        assert!(matches!(
            verify(
                &sign_raw(Algorithm::EdDSA, Some("ec-1"), &ed_enc, &c),
                &keys,
                NOW,
                0
            ),
            Err(TokenError::UnknownKey { .. })
        ));
        assert_eq!(
            verify(
                &sign_raw(Algorithm::EdDSA, Some("nope"), &ed_enc, &c),
                &keys,
                NOW,
                0
            )
            .unwrap_err(),
            TokenError::UnknownKey {
                kid: Some("nope".into()),
                alg: "EdDSA".into()
            }
        );
    }

    #[test]
    fn jwks_refuses_unusable_keys() {
        let ec = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut with_d = ec_jwk(&ec, "x");
        with_d["d"] = json!("AAAA");
        let mut wrong_alg = ec_jwk(&ec, "x");
        wrong_alg["alg"] = json!("ES384");
        let mut hs_alg = ec_jwk(&ec, "x");
        hs_alg["alg"] = json!("HS256");
        let mut short = ec_jwk(&ec, "x");
        short["x"] = json!("AAAA");
        for bad in [
            "not json".to_owned(),
            "[]".to_owned(),
            json!({"keys": {}}).to_string(),
            json!({"keys": []}).to_string(),
            json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}).to_string(),
            json!({"keys": [with_d]}).to_string(),
            json!({"keys": [wrong_alg]}).to_string(),
            json!({"keys": [hs_alg]}).to_string(),
            json!({"keys": [short]}).to_string(),
            json!({"keys": [{"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}]}).to_string(),
            json!({"keys": [{"kty": "OKP", "crv": "Ed448", "x": "AA"}]}).to_string(),
            json!({"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}).to_string(),
        ] {
            let err = VerificationKey::from_jwks(&bad).unwrap_err();
            assert!(matches!(err, KeyError::InvalidJwks(_)), "{bad}: {err}");
        }
        // A single JWK object is accepted as a set of one.
        let one = VerificationKey::from_jwks(&ec_jwk(&ec, "solo").to_string()).unwrap();
        assert_eq!(one.len(), 1);
    }

    #[test]
    fn hmac_tokens_are_refused() {
        // Classic confusion: HS256 keyed with the public key the verifier holds.
        let signer = hub_key();
        let public_pem = signer.public_key_pem();
        let keys = [
            signer.verification_key(),
            VerificationKey::from_pem(&public_pem, None).unwrap(),
        ];
        for (alg, secret) in [
            (Algorithm::HS256, public_pem.as_bytes().to_vec()),
            (Algorithm::HS384, b"secret".to_vec()),
            (Algorithm::HS512, signer.key_pair.public_key_raw().to_vec()),
        ] {
            let token = sign_raw(
                alg,
                Some(&signer.key_id()),
                &EncodingKey::from_secret(&secret),
                &claims_json(NOW, NOW + 60),
            );
            assert_eq!(
                verify(&token, &keys, NOW, 0).unwrap_err(),
                TokenError::UnsupportedAlgorithm(format!("{alg:?}"))
            );
        }
        assert!(VerificationKey::from_pem(&public_pem, Some(Algorithm::HS256)).is_err());
    }

    #[test]
    fn alg_none_is_refused() {
        let signer = hub_key();
        let keys = [signer.verification_key()];
        let c = claims_json(NOW, NOW + 60);
        for alg in ["none", "None", "NONE", "nOnE"] {
            for signature in ["", "AAAA"] {
                let token = unsigned(&json!({"alg": alg, "typ": "JWT"}), &c, signature);
                assert_eq!(
                    verify(&token, &keys, NOW, 0).unwrap_err(),
                    TokenError::UnsupportedAlgorithm(alg.into()),
                    "{token}"
                );
            }
        }
        let token = unsigned(&json!({"alg": "ES512"}), &c, "AAAA");
        assert!(matches!(
            verify(&token, &keys, NOW, 0),
            Err(TokenError::UnsupportedAlgorithm(_))
        ));
    }

    #[test]
    fn malformed_tokens() {
        let signer = hub_key();
        let keys = [signer.verification_key()];
        let c = claims_json(NOW, NOW + 60);
        let big = "A".repeat(MAX_TOKEN_LEN);
        for bad in [
            String::new(),
            "eyJ".to_owned(),
            "a.b".to_owned(),
            "a.b.c.d".to_owned(),
            "!!!.e30.AAAA".to_owned(),
            format!("{}.e30.AAAA", URL_SAFE_NO_PAD.encode("not json")),
            format!("{}.e30.AAAA", URL_SAFE_NO_PAD.encode("[1]")),
            unsigned(&json!({"typ": "JWT"}), &c, "AAAA"),
            unsigned(&json!({"alg": 5}), &c, "AAAA"),
            unsigned(&json!({"alg": "EdDSA", "kid": 5}), &c, "AAAA"),
            unsigned(&json!({"alg": "EdDSA", "crit": ["exp"]}), &c, "AAAA"),
            unsigned(&json!({"alg": "EdDSA"}), &c, "AA=="),
            unsigned(&json!({"alg": "EdDSA"}), &c, "A+/A"),
            format!("eyJhbGciOiJFZERTQSJ9.{big}.AAAA"),
        ] {
            assert!(
                matches!(verify(&bad, &keys, NOW, 0), Err(TokenError::Malformed(_))),
                "{bad:.80}: {:?}",
                verify(&bad, &keys, NOW, 0)
            );
        }
        // A signed token whose payload is not JSON is only reported after the signature check.
        let enc = ed_encoding(&signer);
        let header = URL_SAFE_NO_PAD
            .encode(json!({"alg": "EdDSA", "typ": "JWT", "kid": signer.key_id()}).to_string());
        let payload = URL_SAFE_NO_PAD.encode("not json");
        let message = format!("{header}.{payload}");
        let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &enc, Algorithm::EdDSA).unwrap();
        assert!(matches!(
            verify(&format!("{message}.{sig}"), &keys, NOW, 0),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn jwt_detection() {
        let signer = hub_key();
        let token = signer
            .issue(&DeviceClaims::new("dev-1", None, NOW, 60))
            .unwrap();
        assert!(looks_like_jwt(token.as_bytes()));
        assert!(looks_like_jwt(b"eyJhbGciOiJub25lIn0.e30."));
        for not in [
            &b""[..],
            b"hunter2",
            b"eyJ",
            b"eyJa.b",
            b"eyJa..c",
            b"eyJa.b.c.d",
            b"eyJa.b=.c",
            b"eyJa.b.c\n",
            b"xeyJa.b.c",
            b"eyJ a.b.c",
            generate_like_password().as_bytes(),
        ] {
            assert!(!looks_like_jwt(not), "{}", String::from_utf8_lossy(not));
        }
    }

    fn generate_like_password() -> String {
        crate::password::generate_secret()
    }

    #[test]
    fn types_are_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<TokenSigner>();
        assert_send_sync::<VerificationKey>();
        assert_send_sync::<TokenError>();
        assert_send_sync::<KeyError>();
    }

    #[test]
    fn error_messages_say_what_to_do() {
        let e = TokenError::UnknownKey {
            kid: Some("k1".into()),
            alg: "ES256".into(),
        };
        assert!(e.to_string().contains("kid \"k1\""), "{e}");
        let e = TokenError::UnknownKey {
            kid: None,
            alg: "ES256".into(),
        };
        assert!(
            e.to_string()
                .starts_with("no registered verification key accepts"),
            "{e}"
        );
        assert!(
            TokenError::UnsupportedAlgorithm("HS256".into())
                .to_string()
                .contains("sign with")
        );
    }
}
