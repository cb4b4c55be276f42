//! Per-device passwords: argon2id hashing and a cache of recently verified secrets.
//!
//! Devices that authenticate with a username/password on MQTT CONNECT present a secret that is
//! stored only as an argon2id [PHC string](https://github.com/P-H-C/phc-string-format). Verifying
//! one costs ~20 ms of CPU and 19 MiB of memory with the default [`PasswordParams`], which is the
//! point against offline guessing but makes argon2 the bottleneck of a reconnect storm. The
//! [`VerifiedCache`] remembers, per credential, a keyed digest of a password that argon2 already
//! accepted, so a device reconnecting with the same secret costs one HMAC instead of one argon2.

use std::fmt;

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hashbrown::HashMap;
use parking_lot::Mutex;
use rand::{Rng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Largest `memory_kib` accepted, for hashing and for verifying a stored PHC string (1 GiB).
///
/// Verification takes its cost parameters from the PHC string, so without a ceiling a corrupt or
/// planted hash could make every CONNECT allocate gigabytes.
pub const MAX_MEMORY_KIB: u32 = 1024 * 1024;
/// Largest `iterations` accepted, for hashing and for verifying a stored PHC string.
pub const MAX_ITERATIONS: u32 = 64;
/// Largest `parallelism` accepted, for hashing and for verifying a stored PHC string.
pub const MAX_PARALLELISM: u32 = 64;

/// Argon2id cost parameters for new password hashes (a configuration section).
///
/// Existing hashes keep the parameters they were created with (they are part of the PHC string),
/// so changing these affects only passwords set afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PasswordParams {
    /// Memory cost in KiB (argon2 `m`). At least `8 * parallelism`, at most [`MAX_MEMORY_KIB`].
    pub memory_kib: u32,
    /// Number of passes over the memory (argon2 `t`). 1 ..= [`MAX_ITERATIONS`].
    pub iterations: u32,
    /// Degree of parallelism (argon2 `p`). 1 ..= [`MAX_PARALLELISM`].
    pub parallelism: u32,
}

impl Default for PasswordParams {
    /// OWASP's argon2id recommendation: m = 19456 KiB (19 MiB), t = 2, p = 1.
    fn default() -> Self {
        Self {
            memory_kib: 19 * 1024,
            iterations: 2,
            parallelism: 1,
        }
    }
}

impl PasswordParams {
    /// Checks the parameters without hashing anything (e.g. when loading the configuration).
    ///
    /// # Errors
    /// [`CredentialError::InvalidParams`] naming the offending field and its accepted range.
    pub fn validate(&self) -> Result<(), CredentialError> {
        self.to_argon2().map(|_| ())
    }

    fn to_argon2(self) -> Result<Params, CredentialError> {
        let Self {
            memory_kib,
            iterations,
            parallelism,
        } = self;
        if !(1..=MAX_PARALLELISM).contains(&parallelism) {
            return Err(CredentialError::InvalidParams(format!(
                "parallelism = {parallelism}; set it between 1 and {MAX_PARALLELISM}"
            )));
        }
        if !(1..=MAX_ITERATIONS).contains(&iterations) {
            return Err(CredentialError::InvalidParams(format!(
                "iterations = {iterations}; set it between 1 and {MAX_ITERATIONS}"
            )));
        }
        let min_memory = 8 * parallelism;
        if !(min_memory..=MAX_MEMORY_KIB).contains(&memory_kib) {
            return Err(CredentialError::InvalidParams(format!(
                "memory_kib = {memory_kib}; set it between 8 * parallelism = {min_memory} and \
                 {MAX_MEMORY_KIB} (OWASP recommends 19456 with iterations = 2)"
            )));
        }
        Params::new(memory_kib, iterations, parallelism, None)
            .map_err(|e| CredentialError::InvalidParams(e.to_string()))
    }
}

/// Why a password could not be hashed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// The argon2 parameters are out of range.
    #[error("invalid argon2 password parameters: {0}")]
    InvalidParams(String),
    /// Hashing failed (random salt unavailable, out of memory, password too long).
    #[error(
        "password hashing failed: {0}; check that the system RNG is available and that \
         memory_kib fits in memory"
    )]
    Hash(String),
}

/// Hashes `password` with argon2id (v19) and a random 16-byte salt; returns the PHC string
/// (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`) to store.
///
/// # Errors
/// [`CredentialError::InvalidParams`] for out-of-range `params`, [`CredentialError::Hash`] if the
/// hash could not be computed.
pub fn hash_password(password: &[u8], params: &PasswordParams) -> Result<String, CredentialError> {
    let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.to_argon2()?);
    let hash: PasswordHash = argon2
        .hash_password(password)
        .map_err(|e| CredentialError::Hash(e.to_string()))?;
    Ok(hash.to_string())
}

/// Checks `password` against a stored PHC string.
///
/// Returns `false` for a wrong password and for anything that is not a well-formed argon2 PHC
/// string (including one whose cost parameters exceed [`MAX_MEMORY_KIB`], [`MAX_ITERATIONS`] or
/// [`MAX_PARALLELISM`]); never panics. Costs one full argon2 evaluation when the string is valid:
/// consult a [`VerifiedCache`] first on hot paths.
#[must_use]
pub fn verify_password(phc: &str, password: &[u8]) -> bool {
    if let Some(expected) = phc.strip_prefix(GENERATED_PREFIX) {
        let got = hex::encode(Sha256::digest(password));
        // Same length always (64 hex digits): compare without an early exit.
        return expected.len() == got.len()
            && expected
                .bytes()
                .zip(got.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
    }
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    let Ok(params) = Params::try_from(&hash) else {
        return false;
    };
    if params.m_cost() > MAX_MEMORY_KIB
        || params.t_cost() > MAX_ITERATIONS
        || params.p_cost() > MAX_PARALLELISM
    {
        return false;
    }
    // The cost parameters, variant and version come from the PHC string, not from this instance.
    PasswordVerifier::<PasswordHash>::verify_password(&Argon2::default(), password, &hash).is_ok()
}

/// Marks a stored hash of a hub-generated secret (see [`hash_generated_secret`]).
pub const GENERATED_PREFIX: &str = "$fh-sha256$";

/// The stored form of a secret the hub generated itself ([`generate_secret`]: 256 random bits).
///
/// A slow hash protects secrets people choose, which can be guessed; a 256-bit random secret
/// cannot be, so a plain SHA-256 keeps it just as safe while verifying in microseconds — the way
/// API tokens and IoT symmetric device keys are checked. This keeps the first connects after a
/// hub restart (when the verified-secret cache is empty) as fast as reconnects.
#[must_use]
pub fn hash_generated_secret(secret: &str) -> String {
    format!(
        "{GENERATED_PREFIX}{}",
        hex::encode(Sha256::digest(secret.as_bytes()))
    )
}

/// Whether a stored hash is the fast kind ([`hash_generated_secret`]).
#[must_use]
pub fn is_generated_hash(stored: &str) -> bool {
    stored.starts_with(GENERATED_PREFIX)
}

/// A fresh random secret for "generate a password for me": 32 random bytes, base64url without
/// padding (43 characters).
#[must_use]
pub fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A bounded, thread-safe memory of (credential, PHC string, password) triples that argon2 has
/// already accepted.
///
/// Entries are keyed by a caller-chosen credential key (e.g. `tenant/device/credential-id`) and
/// hold only an HMAC-SHA256, under a random secret drawn when the cache is created, of the key,
/// the PHC string and the password; the password itself is never stored, and a memory dump does
/// not allow checking password guesses offline without that secret. Because the PHC string is
/// part of the digest, rotating a credential (new PHC string) never matches an old entry.
///
/// Intended use on CONNECT:
///
/// ```
/// # use ferrohub_registry::password::*;
/// # let params = PasswordParams { memory_kib: 64, iterations: 1, parallelism: 1 };
/// # let phc = hash_password(b"pw", &params).unwrap();
/// let cache = VerifiedCache::new(100_000);
/// let ok = match cache.check("t1/dev-7/c1", &phc, b"pw") {
///     Some(ok) => ok,
///     None => {
///         let ok = verify_password(&phc, b"pw");
///         if ok {
///             cache.remember("t1/dev-7/c1", &phc, b"pw");
///         }
///         ok
///     }
/// };
/// assert!(ok);
/// ```
///
/// When full, inserting a new key first evicts every entry that has not been hit since the
/// previous eviction pass (a one-bit clock) and, if that frees nothing, a random half.
pub struct VerifiedCache {
    secret: [u8; 32],
    capacity: usize,
    entries: Mutex<HashMap<Box<str>, Entry>>,
}

struct Entry {
    tag: [u8; 32],
    /// Hit (or inserted) since the last eviction pass.
    referenced: bool,
}

impl VerifiedCache {
    /// An empty cache holding at most `capacity` credentials (0 disables caching).
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        Self {
            secret,
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(true)` when `password` was already verified against `phc` for `key` (and remembered);
    /// `None` when unknown — the caller must run [`verify_password`], and [`remember`] on
    /// success.
    ///
    /// Never returns `Some(false)`: a mismatch may just as well mean a rotated credential as a
    /// wrong password, so wrong passwords always pay the full argon2 cost (throttling repeated
    /// failures is the caller's job). The comparison is constant-time.
    ///
    /// [`remember`]: Self::remember
    #[must_use]
    pub fn check(&self, key: &str, phc: &str, password: &[u8]) -> Option<bool> {
        if self.capacity == 0 {
            return None;
        }
        let tag = self.tag(key, phc, password);
        let mut entries = self.entries.lock();
        let entry = entries.get_mut(key)?;
        if constant_time_eq(&entry.tag, &tag) {
            entry.referenced = true;
            Some(true)
        } else {
            None
        }
    }

    /// Records that argon2 accepted `password` for `phc` under `key`, replacing whatever was
    /// remembered for `key` before. Call only after a successful [`verify_password`].
    pub fn remember(&self, key: &str, phc: &str, password: &[u8]) {
        if self.capacity == 0 {
            return;
        }
        let tag = self.tag(key, phc, password);
        let mut entries = self.entries.lock();
        if let Some(entry) = entries.get_mut(key) {
            entry.tag = tag;
            entry.referenced = true;
            return;
        }
        if entries.len() >= self.capacity {
            make_room(&mut entries, self.capacity);
        }
        entries.insert(
            key.into(),
            Entry {
                tag,
                referenced: true,
            },
        );
    }

    /// Forgets the entry for exactly `key` (credential revoked or changed).
    pub fn forget(&self, key: &str) {
        self.entries.lock().remove(key);
    }

    /// Forgets every entry whose key starts with `prefix` (e.g. `"tenant/device/"` when a device
    /// is deleted, `"tenant/"` when a tenant is). An empty prefix clears the cache.
    pub fn forget_prefix(&self, prefix: &str) {
        self.entries.lock().retain(|k, _| !k.starts_with(prefix));
    }

    /// Forgets everything.
    pub fn clear(&self) {
        self.entries.lock().clear();
    }

    /// Number of remembered credentials.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    /// Whether nothing is remembered.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most credentials remembered at once.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// HMAC-SHA256 under the per-cache secret of the length-prefixed key and PHC string followed
    /// by the password.
    fn tag(&self, key: &str, phc: &str, password: &[u8]) -> [u8; 32] {
        let key_len = (key.len() as u64).to_le_bytes();
        let phc_len = (phc.len() as u64).to_le_bytes();
        hmac_sha256(
            &self.secret,
            &[&key_len, key.as_bytes(), &phc_len, phc.as_bytes(), password],
        )
    }
}

impl fmt::Debug for VerifiedCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedCache")
            .field("len", &self.len())
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// Brings `entries` below `capacity`: drops entries not referenced since the previous pass
/// (clearing the bit of the survivors), then random halves while still full.
fn make_room(entries: &mut HashMap<Box<str>, Entry>, capacity: usize) {
    entries.retain(|_, e| std::mem::replace(&mut e.referenced, false));
    let mut rng = rand::rng();
    while entries.len() >= capacity {
        entries.retain(|_, _| rng.random_bool(0.5));
    }
}

/// HMAC-SHA256 (RFC 2104) of the concatenation of `parts`, for a key of at most one block.
fn hmac_sha256(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut ipad = [0x36u8; BLOCK];
    let mut opad = [0x5cu8; BLOCK];
    for (i, k) in key.iter().enumerate() {
        ipad[i] ^= k;
        opad[i] ^= k;
    }
    let mut inner = Sha256::new();
    inner.update(ipad);
    for part in parts {
        inner.update(part);
    }
    let inner = inner.finalize();
    let mut outer = Sha256::new();
    outer.update(opad);
    outer.update(inner);
    outer.finalize().into()
}

/// Compares two digests without an early exit.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: PasswordParams = PasswordParams {
        memory_kib: 256,
        iterations: 1,
        parallelism: 1,
    };

    #[test]
    fn default_params_are_owasp() {
        let p = PasswordParams::default();
        assert_eq!((p.memory_kib, p.iterations, p.parallelism), (19456, 2, 1));
        p.validate().unwrap();
    }

    #[test]
    fn params_serde_fills_defaults_and_rejects_typos() {
        let p: PasswordParams = serde_json::from_str(r#"{"memory_kib": 65536}"#).unwrap();
        assert_eq!(p.memory_kib, 65536);
        assert_eq!(p.iterations, 2);
        assert!(serde_json::from_str::<PasswordParams>(r#"{"memory": 1}"#).is_err());
        let back: PasswordParams =
            serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn out_of_range_params_are_refused_with_a_hint() {
        for bad in [
            PasswordParams {
                memory_kib: 4,
                ..FAST
            },
            PasswordParams {
                iterations: 0,
                ..FAST
            },
            PasswordParams {
                parallelism: 0,
                ..FAST
            },
            PasswordParams {
                memory_kib: MAX_MEMORY_KIB + 1,
                ..FAST
            },
        ] {
            let err = hash_password(b"x", &bad).unwrap_err();
            assert!(matches!(err, CredentialError::InvalidParams(_)), "{err}");
            assert!(err.to_string().contains("set it between"), "{err}");
        }
    }

    #[test]
    fn hash_and_verify() {
        let phc = hash_password(b"correct horse", &FAST).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=256,t=1,p=1$"), "{phc}");
        assert!(verify_password(&phc, b"correct horse"));
        assert!(!verify_password(&phc, b"correct horsE"));
        assert!(!verify_password(&phc, b""));
        // Random salt: the same password hashes differently.
        let again = hash_password(b"correct horse", &FAST).unwrap();
        assert_ne!(phc, again);
        assert!(verify_password(&again, b"correct horse"));
    }

    #[test]
    fn empty_and_binary_passwords() {
        let phc = hash_password(b"", &FAST).unwrap();
        assert!(verify_password(&phc, b""));
        assert!(!verify_password(&phc, b"\0"));
        let bin = [0u8, 255, 10, 13, 0];
        let phc = hash_password(&bin, &FAST).unwrap();
        assert!(verify_password(&phc, &bin));
    }

    #[test]
    fn malformed_phc_is_false() {
        let phc = hash_password(b"pw", &FAST).unwrap();
        let truncated = &phc[..phc.len() - 5];
        let no_hash = phc.rsplit_once('$').unwrap().0;
        let huge_memory = phc.replace("m=256", "m=4194304");
        for bad in [
            "",
            "$",
            "not a hash",
            "$argon2id$",
            "$argon2id$v=19$m=256,t=1,p=1$$",
            "$argon2id$v=19$m=0,t=0,p=0$c2FsdHNhbHQ$aGFzaGhhc2g",
            "$argon2id$v=99$m=256,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
            "$pbkdf2-sha256$i=1000$c2FsdHNhbHQ$aGFzaGhhc2g",
            "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW",
            truncated,
            no_hash,
            &huge_memory,
        ] {
            assert!(!verify_password(bad, b"pw"), "{bad:?}");
        }
    }

    #[test]
    fn generated_secrets_are_43_char_base64url() {
        let a = generate_secret();
        let b = generate_secret();
        assert_eq!(a.len(), 43);
        assert_ne!(a, b);
        assert_eq!(URL_SAFE_NO_PAD.decode(&a).unwrap().len(), 32);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
    }

    #[test]
    fn hmac_matches_rfc4231_shape() {
        // RFC 4231 test case 2 uses a 4-byte key; zero-padding to 32 bytes gives the same HMAC.
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        let mac = hmac_sha256(&key, &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn cache_hit_miss_and_rotation() {
        let cache = VerifiedCache::new(16);
        let phc = hash_password(b"pw1", &FAST).unwrap();
        assert_eq!(cache.check("t/d/c", &phc, b"pw1"), None);
        cache.remember("t/d/c", &phc, b"pw1");
        assert_eq!(cache.check("t/d/c", &phc, b"pw1"), Some(true));
        // Wrong password, other key: unknown, argon2 decides.
        assert_eq!(cache.check("t/d/c", &phc, b"pw2"), None);
        assert_eq!(cache.check("t/d/other", &phc, b"pw1"), None);
        // Rotation: same password, new PHC string.
        let rotated = hash_password(b"pw1", &FAST).unwrap();
        assert_eq!(cache.check("t/d/c", &rotated, b"pw1"), None);
        cache.remember("t/d/c", &rotated, b"pw1");
        assert_eq!(cache.check("t/d/c", &rotated, b"pw1"), Some(true));
        assert_eq!(cache.check("t/d/c", &phc, b"pw1"), None);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn cache_forget_and_prefix() {
        let cache = VerifiedCache::new(16);
        for key in ["t1/a/c", "t1/b/c", "t2/a/c"] {
            cache.remember(key, "$phc", b"pw");
        }
        cache.forget("t1/a/c");
        assert_eq!(cache.check("t1/a/c", "$phc", b"pw"), None);
        assert_eq!(cache.check("t1/b/c", "$phc", b"pw"), Some(true));
        cache.forget_prefix("t1/");
        assert_eq!(cache.check("t1/b/c", "$phc", b"pw"), None);
        assert_eq!(cache.check("t2/a/c", "$phc", b"pw"), Some(true));
        cache.clear();
        assert!(cache.is_empty());
    }

    #[test]
    fn cache_separates_fields() {
        // Length prefixes: shifting bytes between key, phc and password never collides.
        let cache = VerifiedCache::new(16);
        cache.remember("k", "$ab", b"c");
        assert_eq!(cache.check("k", "$a", b"bc"), None);
        assert_eq!(cache.check("k", "$abc", b""), None);
        assert_eq!(cache.check("k", "$ab", b"c"), Some(true));
    }

    #[test]
    fn cache_is_bounded_and_keeps_hot_entries() {
        let cache = VerifiedCache::new(100);
        for i in 0..100 {
            cache.remember(&format!("k{i}"), "$phc", b"pw");
        }
        assert_eq!(cache.len(), 100);
        // First eviction pass: everything was freshly inserted, so a random half goes.
        cache.remember("new0", "$phc", b"pw");
        assert!(cache.len() <= 100);
        // Keep hitting the surviving "k" entries; churn lots of one-shot keys.
        let hot: Vec<String> = (0..100)
            .map(|i| format!("k{i}"))
            .filter(|k| cache.check(k, "$phc", b"pw").is_some())
            .take(10)
            .collect();
        assert!(!hot.is_empty());
        for i in 0..3_000 {
            cache.remember(&format!("cold{i}"), "$phc", b"pw");
            assert!(cache.len() <= 100);
            for k in &hot {
                assert_eq!(cache.check(k, "$phc", b"pw"), Some(true), "{k} evicted");
            }
        }
    }

    #[test]
    fn zero_capacity_disables() {
        let cache = VerifiedCache::new(0);
        cache.remember("k", "$phc", b"pw");
        assert_eq!(cache.check("k", "$phc", b"pw"), None);
        assert!(cache.is_empty());
    }

    #[test]
    fn cache_is_shareable_across_threads() {
        let cache = std::sync::Arc::new(VerifiedCache::new(64));
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let cache = cache.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        let key = format!("t{t}/d{i}");
                        cache.remember(&key, "$phc", b"pw");
                        let _ = cache.check(&key, "$phc", b"pw");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert!(cache.len() <= 64);
    }

    #[test]
    fn types_are_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<VerifiedCache>();
        assert_send_sync::<CredentialError>();
    }

    #[test]
    fn debug_shows_no_secret() {
        let cache = VerifiedCache::new(8);
        let s = format!("{cache:?}");
        assert!(s.contains("capacity: 8") && !s.contains("secret"), "{s}");
    }

    #[test]
    fn generated_secrets_verify_with_the_fast_hash_only_when_right() {
        let secret = generate_secret();
        let stored = hash_generated_secret(&secret);
        assert!(is_generated_hash(&stored));
        assert!(verify_password(&stored, secret.as_bytes()));
        assert!(!verify_password(&stored, b"wrong"));
        assert!(!verify_password(&stored, format!("{secret}x").as_bytes()));
        assert!(!verify_password("$fh-sha256$00", secret.as_bytes()));
    }
}
