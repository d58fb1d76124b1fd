//! Callers' API access keys: who may call keygate at all.
//!
//! A client presents `Basic base64(client_id:client_secret)` — `client_id@<any
//! domain>` works as the username too, for clients that insist on an e-mail
//! address — or, for generated secrets, `Bearer client_secret`. Secrets exist
//! only as argon2id hashes; the comparison is argon2's own constant-time one.
//!
//! Verification is the expensive step (19 MiB and tens of milliseconds of
//! argon2id), so it is bounded (`verify.rs`):
//! - a verified credential is cached (keyed by a SHA-256 of exactly what was
//!   presented) and stays cached while it is used (`verify_cache_ttl` of
//!   idleness), so a busy client never waits for a re-hash; concurrent first uses
//!   of one credential share a single verification;
//! - the verifier also remembers, across reloads, which credential was verified
//!   against which hash and when (a day of idleness at most): such a credential
//!   is served at once while its key keeps that hash — after a reload, or back
//!   from an idle spell — and re-verified in the background once its
//!   verification is older than `verify_cache_ttl`;
//! - a wrong credential is remembered briefly, so repeating it costs no hash;
//! - each source address and each client_id may see only a few wrong secrets
//!   per second; beyond, the answer is 429 without hashing (and the proxy holds
//!   it a moment, so a flood slows itself down);
//! - at most a few verifications run at once, with a short queue; beyond, 429.
//!
//! Invariants: a failed verification is never cached as success, so a wrong
//! secret cannot pass after a right one; a remembered verification counts only
//! for the exact hash it was made against, so a regenerated secret is never
//! served from memory; revocation and expiry are checked on every request,
//! cached or not.

pub mod cli;
pub mod edit;
pub mod file;
pub mod store;
mod verify;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use http::HeaderValue;
use rand::Rng as _;

pub use file::{ApiKey, KeyEntry, KeysFile};
pub use verify::Verifier;

/// Prefix of generated secrets, so secret scanners can recognise leaked ones.
pub const SECRET_PREFIX: &str = "kgs_";
/// Random characters in a generated secret: 44 of 62 symbols is over 256 bits.
const SECRET_RANDOM_LEN: usize = 44;
/// Random characters after the name in a client_id.
const CLIENT_ID_SUFFIX_LEN: usize = 25;
/// A wrong credential is remembered this long.
const NEGATIVE_TTL: Duration = Duration::from_secs(30);
/// The longest decoded Basic credential looked at (`client_id@domain:secret`);
/// longer ones are malformed. Kept small: it lives in the request's state.
const MAX_CREDENTIAL: usize = 320;

/// Why a credential was refused. Clients see one uniform 401 (or a 429 for the
/// throttles); this goes to logs, metrics and the audit trail.
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
    /// Too many failed verifications from this source or for this client.
    #[error("too many failed verifications ({0})")]
    Throttled(&'static str, Duration),
    /// Too many verifications waiting.
    #[error("too many verifications at once")]
    Busy,
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
            AuthError::Throttled(..) => "throttled",
            AuthError::Busy => "busy",
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
    key: Arc<ApiKey>,
}

/// A credential as presented.
enum Presented<'a> {
    Basic { client_id: &'a str, secret: &'a str },
    Bearer { secret: &'a str },
}

/// The keys of one configuration generation, with their verification caches.
pub struct KeyStore {
    /// A single credential compared directly (benchmark baseline), if set.
    fixed: Option<Fixed>,
    by_client_id: HashMap<String, Arc<ApiKey>>,
    /// The random suffix of each client_id, which generated secrets carry.
    by_suffix: HashMap<String, Arc<ApiKey>>,
    verified: moka::future::Cache<[u8; 32], Arc<ApiKey>>,
    refused: moka::sync::Cache<[u8; 32], ()>,
    verifier: Arc<Verifier>,
    cache_ttl: Duration,
}

impl KeyStore {
    /// `verifier` is shared across reloads: its bounds and counts are the process's.
    pub fn new(keys: Vec<ApiKey>, cache_ttl: Duration, verifier: Arc<Verifier>) -> Self {
        let mut by_client_id = HashMap::with_capacity(keys.len());
        let mut by_suffix = HashMap::with_capacity(keys.len());
        for key in keys {
            let key = Arc::new(key);
            if let Some((_, suffix)) = key.client_id.rsplit_once('_') {
                by_suffix.insert(suffix.to_owned(), Arc::clone(&key));
            }
            by_client_id.insert(key.client_id.clone(), key);
        }
        let verified = moka::future::Cache::builder()
            .max_capacity(10_000)
            .time_to_idle(cache_ttl.max(Duration::from_millis(1)))
            .build();
        let refused = moka::sync::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(NEGATIVE_TTL)
            .build();
        KeyStore {
            fixed: None,
            by_client_id,
            by_suffix,
            verified,
            refused,
            verifier,
            cache_ttl,
        }
    }

    /// A store that accepts exactly one Basic credential, compared in constant time
    /// with no hashing and no cache: the baseline the verification cache is
    /// benchmarked against (`benches/auth_cache.rs`).
    pub fn fixed_credential(client_id: &str, secret: &str, roles: Vec<String>) -> Self {
        let mut store = KeyStore::new(Vec::new(), Duration::from_secs(1), Arc::default());
        store.fixed = Some(Fixed {
            digest: cache_key(b'b', client_id, secret),
            key: Arc::new(ApiKey {
                id: "0".into(),
                client_id: client_id.to_owned(),
                name: client_id.to_owned(),
                secret_hash: String::new(),
                roles,
                expiration: None,
                is_valid: true,
            }),
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
        self.verifier.runs()
    }

    /// Checks that a key found earlier (a connection's memo) may still be used.
    pub fn still_valid(key: &ApiKey, now: SystemTime) -> Result<(), AuthError> {
        if !key.is_valid {
            return Err(AuthError::Revoked);
        }
        if key.expiration.is_some_and(|exp| exp <= now) {
            return Err(AuthError::Expired);
        }
        Ok(())
    }

    /// Authenticates the value of the request's `Authorization` header sent from
    /// `source`.
    pub async fn authenticate(
        &self,
        header: Option<&HeaderValue>,
        source: IpAddr,
        now: SystemTime,
    ) -> Result<Arc<ApiKey>, AuthFailure> {
        let fail = |error, client_id: Option<&str>| AuthFailure {
            error,
            client_id: client_id.map(str::to_owned),
        };
        let header = header.ok_or_else(|| fail(AuthError::Missing, None))?;
        let mut decoded = [0u8; MAX_CREDENTIAL];
        let presented = parse_authorization(header, &mut decoded)
            .ok_or_else(|| fail(AuthError::Malformed, None))?;
        if let (Some(fixed), Presented::Basic { client_id, secret }) = (&self.fixed, &presented) {
            let digest = cache_key(b'b', client_id, secret);
            let differ = digest
                .iter()
                .zip(fixed.digest.iter())
                .fold(0u8, |a, (x, y)| a | (x ^ y));
            return if differ == 0 {
                Ok(Arc::clone(&fixed.key))
            } else {
                Err(fail(AuthError::WrongSecret, Some(client_id)))
            };
        }
        let (claimed, secret, digest) = match &presented {
            Presented::Basic { client_id, secret } => (
                Some(*client_id),
                *secret,
                cache_key(b'b', client_id, secret),
            ),
            Presented::Bearer { secret } => (None, *secret, cache_key(b't', "", secret)),
        };
        // Hits, the common case, take the plain lookup: no init future, no copies.
        if let Some(verified) = self.verified.get(&digest).await {
            return Self::still_valid(&verified, now)
                .map(|()| verified.clone())
                .map_err(|e| fail(e, Some(verified.client_id.as_str())));
        }
        let key = match &presented {
            Presented::Basic { client_id, .. } => self.by_client_id.get(*client_id),
            Presented::Bearer { secret } => self.key_for_bearer(secret),
        };
        let key = key.ok_or_else(|| fail(AuthError::UnknownClient, claimed))?;
        let claimed = Some(key.client_id.as_str());
        Self::still_valid(key, now).map_err(|e| fail(e, claimed))?;
        // From here on a secret is tried against a key: a source that tried too
        // many wrong ones gets no further.
        self.verifier
            .check_source(source)
            .map_err(|e| fail(e, claimed))?;
        if self.refused.contains_key(&digest) {
            self.verifier.failed(source, None);
            return Err(fail(AuthError::WrongSecret, claimed));
        }
        // Verified before (another generation, or idle past the cache's time)
        // against the hash the key still has: the answer cannot differ, so it
        // is served now; if that verification is older than verify_cache_ttl,
        // it is redone in the background. Nobody waits for argon2 on a
        // credential that was right and whose key has not changed.
        if let Some(at) = self.verifier.remembered(&digest, &key.secret_hash) {
            let key = Arc::clone(key);
            if at.elapsed() < self.cache_ttl {
                self.verified.insert(digest, Arc::clone(&key)).await;
            } else {
                self.reverify_in_background(digest, &key, secret);
            }
            return Ok(key);
        }
        let admission = self
            .verifier
            .admit(&key.client_id)
            .map_err(|e| fail(e, claimed))?;
        let verifier = Arc::clone(&self.verifier);
        let candidate = Arc::clone(key);
        let secret = secret.to_owned();
        let verified = self
            .verified
            .try_get_with(digest, async move {
                if verifier.verify(admission, &secret, &candidate).await? {
                    Ok(candidate)
                } else {
                    Err(AuthError::WrongSecret)
                }
            })
            .await;
        match verified {
            Ok(key) => {
                self.verifier.remember(digest, &key.secret_hash);
                Ok(key)
            }
            Err(e) => {
                if *e == AuthError::WrongSecret {
                    self.refused.insert(digest, ());
                    self.verifier.failed(source, Some(&key.client_id));
                }
                Err(fail((*e).clone(), claimed))
            }
        }
    }

    /// Re-verifies a remembered credential off the request path, on the
    /// verifier's low-priority worker and one at a time per credential (a
    /// request that finds one under way starts none); a busy verifier just
    /// leaves it for a later request.
    fn reverify_in_background(&self, digest: [u8; 32], key: &Arc<ApiKey>, secret: &str) {
        let Some(recheck) = self.verifier.recheck(digest) else {
            return;
        };
        // One that ended between this request's look and its claim left the
        // verification fresh: nothing to redo.
        let fresh = self
            .verifier
            .remembered(&digest, &key.secret_hash)
            .is_some_and(|at| at.elapsed() < self.cache_ttl);
        if fresh {
            return;
        }
        let Ok(admission) = self.verifier.admit(&key.client_id) else {
            return;
        };
        let (verified, verifier) = (self.verified.clone(), Arc::clone(&self.verifier));
        let (candidate, secret) = (Arc::clone(key), secret.to_owned());
        tokio::spawn(async move {
            let _recheck = recheck;
            let result = verified
                .try_get_with(digest, async {
                    if verifier
                        .verify_in_background(admission, &secret, &candidate)
                        .await?
                    {
                        Ok(Arc::clone(&candidate))
                    } else {
                        Err(AuthError::WrongSecret)
                    }
                })
                .await;
            if result.is_ok() {
                verifier.remember(digest, &candidate.secret_hash);
            }
        });
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

/// Parses the header without allocating; Basic's credential is decoded into
/// `buffer`.
fn parse_authorization<'a>(header: &'a HeaderValue, buffer: &'a mut [u8]) -> Option<Presented<'a>> {
    let text = header.to_str().ok()?;
    let (scheme, rest) = text.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let n = base64::engine::general_purpose::STANDARD
            .decode_slice(rest, buffer)
            .ok()?;
        let decoded = std::str::from_utf8(&buffer[..n]).ok()?;
        let (user, secret) = decoded.split_once(':')?;
        // `client_id@domain` for clients that insist on an e-mail address; the
        // domain is ignored (and never taken as an identity).
        let client_id = user.split_once('@').map_or(user, |(id, _)| id);
        if client_id.is_empty() || secret.is_empty() {
            return None;
        }
        Some(Presented::Basic { client_id, secret })
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

/// The suffix a generated secret carries for this client_id (Bearer lookup).
pub fn client_id_suffix(client_id: &str) -> Option<&str> {
    client_id.rsplit_once('_').map(|(_, s)| s)
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
