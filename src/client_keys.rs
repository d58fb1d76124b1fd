//! Callers' API access keys: who may call keygate at all.
//!
//! A client presents `Basic base64(client_id:client_secret)` or, for generated
//! secrets, `Bearer client_secret`. Secrets exist only as argon2id hashes; the
//! comparison is argon2's own constant-time one. A verified credential is cached
//! (moka, keyed by a SHA-256 of exactly what was presented, TTL
//! `verify_cache_ttl`) so the hash cost is paid once per key per TTL; concurrent
//! first uses of one credential share a single verification.
//!
//! Invariants: a failed verification is never cached, so a wrong secret cannot pass
//! after a right one; a store is replaced whole on reload, dropping its cache;
//! revocation and expiry are checked on every request, cached or not.

pub mod api;
pub mod cli;
pub mod edit;
pub mod file;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use http::HeaderValue;
use rand::Rng as _;

pub use file::{ApiKey, KeyEntry, KeysFile};

/// Prefix of generated secrets, so secret scanners can recognise leaked ones.
pub const SECRET_PREFIX: &str = "kgs_";
/// Random characters in a generated secret: 44 of 62 symbols is over 256 bits.
const SECRET_RANDOM_LEN: usize = 44;
/// Random characters after the name in a client_id.
const CLIENT_ID_SUFFIX_LEN: usize = 25;

/// Who is calling, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub client_id: String,
    pub key_name: String,
    pub roles: Vec<String>,
}

/// Why a credential was refused. Clients see one uniform 401; this goes to logs,
/// metrics and the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no credential")]
    Missing,
    #[error("malformed credential")]
    Malformed,
    #[error("unknown client")]
    UnknownClient,
    #[error("wrong secret")]
    WrongSecret,
    #[error("key revoked")]
    Revoked,
    #[error("key expired")]
    Expired,
}

impl AuthError {
    /// A short machine-readable reason for metrics and audit records.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::UnknownClient => "unknown_client",
            AuthError::WrongSecret => "wrong_secret",
            AuthError::Revoked => "revoked",
            AuthError::Expired => "expired",
        }
    }
}

/// An authentication failure with the client_id the caller claimed, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFailure {
    pub error: AuthError,
    pub client_id: Option<String>,
}

struct Fixed {
    digest: [u8; 32],
    principal: Principal,
}

enum Presented<'a> {
    Basic { client_id: String, secret: String },
    Bearer { secret: &'a str },
}

/// The keys of one configuration generation, with their verification cache.
pub struct KeyStore {
    /// A single credential compared directly (benchmark baseline), if set.
    fixed: Option<Fixed>,
    by_client_id: HashMap<String, Arc<ApiKey>>,
    /// The random suffix of each client_id, which generated secrets carry.
    by_suffix: HashMap<String, Arc<ApiKey>>,
    cache: moka::future::Cache<[u8; 32], Arc<ApiKey>>,
    argon2_runs: Arc<AtomicU64>,
}

impl KeyStore {
    /// `argon2_runs` is shared across reloads so that the count is the process's.
    pub fn new(keys: Vec<ApiKey>, cache_ttl: Duration, argon2_runs: Arc<AtomicU64>) -> Self {
        let mut by_client_id = HashMap::with_capacity(keys.len());
        let mut by_suffix = HashMap::with_capacity(keys.len());
        for key in keys {
            let key = Arc::new(key);
            if let Some((_, suffix)) = key.client_id.rsplit_once('_') {
                by_suffix.insert(suffix.to_owned(), Arc::clone(&key));
            }
            by_client_id.insert(key.client_id.clone(), key);
        }
        let cache = moka::future::Cache::builder()
            .max_capacity(10_000)
            .time_to_live(cache_ttl.max(Duration::from_millis(1)))
            .build();
        KeyStore {
            fixed: None,
            by_client_id,
            by_suffix,
            cache,
            argon2_runs,
        }
    }

    /// A store that accepts exactly one Basic credential, compared in constant time
    /// with no hashing and no cache: the baseline the verification cache is
    /// benchmarked against (`benches/auth_cache.rs`).
    pub fn fixed_credential(client_id: &str, secret: &str, roles: Vec<String>) -> Self {
        let mut store = KeyStore::new(Vec::new(), Duration::from_secs(1), Arc::default());
        store.fixed = Some(Fixed {
            digest: cache_key(b'b', client_id, secret),
            principal: Principal {
                client_id: client_id.to_owned(),
                key_name: client_id.to_owned(),
                roles,
            },
        });
        store
    }

    pub fn len(&self) -> usize {
        self.by_client_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_client_id.is_empty()
    }

    /// Every key of this generation.
    pub fn keys(&self) -> impl Iterator<Item = &ApiKey> {
        self.by_client_id.values().map(Arc::as_ref)
    }

    pub fn get(&self, client_id: &str) -> Option<&ApiKey> {
        self.by_client_id.get(client_id).map(Arc::as_ref)
    }

    /// How many argon2 verifications this process has run.
    pub fn argon2_runs(&self) -> u64 {
        self.argon2_runs.load(Ordering::Relaxed)
    }

    /// Authenticates the value of the request's `Authorization` header.
    pub async fn authenticate(
        &self,
        header: Option<&HeaderValue>,
        now: SystemTime,
    ) -> Result<Principal, AuthFailure> {
        let fail = |error, client_id: Option<&str>| AuthFailure {
            error,
            client_id: client_id.map(str::to_owned),
        };
        let header = header.ok_or_else(|| fail(AuthError::Missing, None))?;
        let presented =
            parse_authorization(header).ok_or_else(|| fail(AuthError::Malformed, None))?;
        if let (Some(fixed), Presented::Basic { client_id, secret }) = (&self.fixed, &presented) {
            let digest = cache_key(b'b', client_id, secret);
            let differ = digest
                .iter()
                .zip(fixed.digest.iter())
                .fold(0u8, |a, (x, y)| a | (x ^ y));
            return if differ == 0 {
                Ok(fixed.principal.clone())
            } else {
                Err(fail(AuthError::WrongSecret, Some(client_id)))
            };
        }
        let (key, secret, cache_key) = match &presented {
            Presented::Basic { client_id, secret } => {
                let key = self
                    .by_client_id
                    .get(client_id)
                    .ok_or_else(|| fail(AuthError::UnknownClient, Some(client_id)))?;
                (key, secret.as_str(), cache_key(b'b', client_id, secret))
            }
            Presented::Bearer { secret } => {
                let key = self
                    .key_for_bearer(secret)
                    .ok_or_else(|| fail(AuthError::UnknownClient, None))?;
                (key, *secret, cache_key(b't', "", secret))
            }
        };
        let claimed = Some(key.client_id.as_str());
        if !key.is_valid {
            return Err(fail(AuthError::Revoked, claimed));
        }
        if key.expiration.is_some_and(|exp| exp <= now) {
            return Err(fail(AuthError::Expired, claimed));
        }
        // Hits, the common case, take the plain lookup: no init future, no copies.
        if let Some(verified) = self.cache.get(&cache_key).await {
            return Ok(Principal {
                client_id: verified.client_id.clone(),
                key_name: verified.name.clone(),
                roles: verified.roles.clone(),
            });
        }
        let runs = Arc::clone(&self.argon2_runs);
        let candidate = Arc::clone(key);
        let secret = secret.to_owned();
        let verified = self
            .cache
            .try_get_with(cache_key, async move {
                let hash = candidate.secret_hash.clone();
                let ok = tokio::task::spawn_blocking(move || {
                    runs.fetch_add(1, Ordering::Relaxed);
                    verify_secret(&secret, &hash)
                })
                .await
                .unwrap_or(false);
                if ok {
                    Ok(candidate)
                } else {
                    Err(AuthError::WrongSecret)
                }
            })
            .await;
        match verified {
            Ok(key) => Ok(Principal {
                client_id: key.client_id.clone(),
                key_name: key.name.clone(),
                roles: key.roles.clone(),
            }),
            Err(e) => Err(fail((*e).clone(), claimed)),
        }
    }

    /// Generated secrets carry the random part of their client_id, so a Bearer
    /// token finds its one key without trying every hash.
    fn key_for_bearer(&self, secret: &str) -> Option<&Arc<ApiKey>> {
        self.by_suffix.get(bearer_lookup(secret)?)
    }
}

fn cache_key(kind: u8, client_id: &str, secret: &str) -> [u8; 32] {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    h.update(&[kind]);
    h.update(client_id.as_bytes());
    h.update(&[0]);
    h.update(secret.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(h.finish().as_ref());
    out
}

fn parse_authorization(header: &HeaderValue) -> Option<Presented<'_>> {
    let text = header.to_str().ok()?;
    let (scheme, rest) = text.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (client_id, secret) = decoded.split_once(':')?;
        if client_id.is_empty() || secret.is_empty() {
            return None;
        }
        Some(Presented::Basic {
            client_id: client_id.to_owned(),
            secret: secret.to_owned(),
        })
    } else if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        Some(Presented::Bearer { secret: rest })
    } else {
        None
    }
}

/// The client_id suffix inside a generated secret `kgs_<suffix>_<random>`.
fn bearer_lookup(secret: &str) -> Option<&str> {
    let rest = secret.strip_prefix(SECRET_PREFIX)?;
    let (suffix, random) = rest.split_once('_')?;
    (suffix.len() == CLIENT_ID_SUFFIX_LEN && random.len() == SECRET_RANDOM_LEN).then_some(suffix)
}

fn argon2() -> argon2::Argon2<'static> {
    argon2::Argon2::default()
}

/// Checks a secret against an argon2id PHC string (constant-time comparison).
pub fn verify_secret(secret: &str, phc: &str) -> bool {
    use argon2::PasswordVerifier as _;
    argon2::PasswordHash::new(phc)
        .map(|hash| argon2().verify_password(secret.as_bytes(), &hash).is_ok())
        .unwrap_or(false)
}

/// Hashes a secret into an argon2id PHC string with a fresh random salt.
pub fn hash_secret(secret: &str) -> Result<String, argon2::password_hash::Error> {
    use argon2::PasswordHasher as _;
    let mut salt = [0u8; 16];
    rand::rngs::OsRng.fill(&mut salt);
    let salt = argon2::password_hash::SaltString::encode_b64(&salt)?;
    Ok(argon2()
        .hash_password(secret.as_bytes(), &salt)?
        .to_string())
}

fn random_alphanumeric(len: usize, lower_only: bool) -> String {
    const ALL: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    const LOWER: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let set = if lower_only { LOWER } else { ALL };
    let mut rng = rand::rngs::OsRng;
    (0..len)
        .map(|_| char::from(set[rng.gen_range(0..set.len())]))
        .collect()
}

/// A new client_id: the name, `_`, and 25 random `[a-z0-9]`.
pub fn new_client_id(name: &str) -> String {
    format!("{name}_{}", random_alphanumeric(CLIENT_ID_SUFFIX_LEN, true))
}

/// A new generated secret for `client_id`: `kgs_<client_id suffix>_<44 random>`.
pub fn new_secret(client_id: &str) -> String {
    let suffix = client_id.rsplit_once('_').map(|(_, s)| s).unwrap_or("");
    format!(
        "{SECRET_PREFIX}{suffix}_{}",
        random_alphanumeric(SECRET_RANDOM_LEN, false)
    )
}

/// The rule for secrets a user chooses: 10 to 30 characters with at least three of
/// upper-case, lower-case, digit and special character.
pub fn check_user_secret(secret: &str) -> Result<(), String> {
    let len = secret.chars().count();
    let classes = [
        secret.chars().any(|c| c.is_uppercase()),
        secret.chars().any(|c| c.is_lowercase()),
        secret.chars().any(|c| c.is_ascii_digit()),
        secret.chars().any(|c| !c.is_alphanumeric()),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if !(10..=30).contains(&len) || classes < 3 {
        return Err(format!(
            "a chosen secret must be 10 to 30 characters with at least three of: upper-case letter, lower-case letter, digit, special character (got {len} characters, {classes} of the four kinds)"
        ));
    }
    if secret.chars().any(char::is_control) {
        return Err("a chosen secret must not contain control characters".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
