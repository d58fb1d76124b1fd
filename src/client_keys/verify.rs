//! The bounds around argon2 verification, shared by every generation of keys.
//!
//! An attacker who knows a client_id (client_ids appear in logs) can make every
//! request cost a full argon2id run. So:
//! - at most `workers` verifications run at once (half the cores, at least one),
//!   and at most `QUEUE` wait; beyond, `Busy` (429) without hashing;
//! - failed verifications are budgeted per source address and per client_id
//!   (token buckets); a source or client over its budget gets `Throttled` (429)
//!   without hashing until a token is back.
//!
//! A legitimate client whose credential is cached never reaches this code, so a
//! flood of wrong secrets costs it nothing but the flood's share of the CPU that
//! the bounds allow.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::{ApiKey, AuthError};

/// Verifications that may wait for a worker.
const QUEUE: usize = 16;
/// Failed verifications per source address: burst, then per second.
const SOURCE_BUDGET: (f64, f64) = (20.0, 5.0);
/// Failed verifications per client_id: burst, then per second.
const CLIENT_BUDGET: (f64, f64) = (10.0, 2.0);
/// Buckets remembered at most (the oldest are forgotten beyond).
const MAX_BUCKETS: usize = 10_000;

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant, (burst, rate): (f64, f64)) {
        let gained = now.saturating_duration_since(self.last).as_secs_f64() * rate;
        self.tokens = (self.tokens + gained).min(burst);
        self.last = now;
    }
}

struct Buckets<K> {
    map: Mutex<HashMap<K, Bucket>>,
    budget: (f64, f64),
}

impl<K: std::hash::Hash + Eq + Clone> Buckets<K> {
    fn new(budget: (f64, f64)) -> Self {
        Buckets {
            map: Mutex::new(HashMap::new()),
            budget,
        }
    }

    /// `Err(wait)` while the budget is spent.
    fn check(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let Some(bucket) = map.get_mut(key) else {
            return Ok(());
        };
        bucket.refill(now, self.budget);
        if bucket.tokens >= 1.0 {
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.budget.1,
            ))
        }
    }

    fn spend(&self, key: &K, now: Instant) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_BUCKETS && !map.contains_key(key) {
            let (burst, rate) = self.budget;
            // Full buckets carry no information: forget those first.
            map.retain(|_, b| {
                b.refill(now, (burst, rate));
                b.tokens < burst
            });
            if map.len() >= MAX_BUCKETS {
                map.clear();
            }
        }
        let bucket = map.entry(key.clone()).or_insert(Bucket {
            tokens: self.budget.0,
            last: now,
        });
        bucket.refill(now, self.budget);
        bucket.tokens = (bucket.tokens - 1.0).max(0.0);
    }
}

/// Proof that a verification was admitted by the budgets.
pub struct Admission(());

/// See the module doc.
pub struct Verifier {
    runs: AtomicU64,
    workers: Arc<Semaphore>,
    waiting: AtomicUsize,
    sources: Buckets<IpAddr>,
    clients: Buckets<String>,
}

impl Default for Verifier {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self::with_workers((cores / 2).max(1))
    }
}

impl Verifier {
    pub fn with_workers(workers: usize) -> Self {
        Verifier {
            runs: AtomicU64::new(0),
            workers: Arc::new(Semaphore::new(workers)),
            waiting: AtomicUsize::new(0),
            sources: Buckets::new(SOURCE_BUDGET),
            clients: Buckets::new(CLIENT_BUDGET),
        }
    }

    /// How many argon2 verifications have run.
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    /// Admits a verification unless the source or the client spent its budget
    /// of failures.
    pub fn admit(&self, source: IpAddr, client_id: &str) -> Result<Admission, AuthError> {
        let now = Instant::now();
        self.sources
            .check(&source, now)
            .map_err(|wait| AuthError::Throttled("source", wait))?;
        self.clients
            .check(&client_id.to_owned(), now)
            .map_err(|wait| AuthError::Throttled("client", wait))?;
        Ok(Admission(()))
    }

    /// Records a failed verification against both budgets.
    pub fn failed(&self, source: IpAddr, client_id: &str) {
        let now = Instant::now();
        self.sources.spend(&source, now);
        self.clients.spend(&client_id.to_owned(), now);
    }

    /// Runs one verification on a worker, waiting in the short queue if all are
    /// busy.
    pub async fn verify(
        &self,
        _admitted: Admission,
        secret: &str,
        key: &ApiKey,
    ) -> Result<bool, AuthError> {
        let permit = match Arc::clone(&self.workers).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= QUEUE {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    return Err(AuthError::Busy);
                }
                let permit = Arc::clone(&self.workers).acquire_owned().await;
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                permit.map_err(|_| AuthError::Busy)?
            }
        };
        self.runs.fetch_add(1, Ordering::Relaxed);
        let secret = secret.to_owned();
        let hash = key.secret_hash.clone();
        let ok = tokio::task::spawn_blocking(move || {
            let ok = super::verify_secret(&secret, &hash);
            drop(permit);
            ok
        })
        .await
        .unwrap_or(false);
        Ok(ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_spend_the_budget_and_it_comes_back() {
        let b = Buckets::<u8>::new((3.0, 1.0));
        let t0 = Instant::now();
        assert!(b.check(&1, t0).is_ok(), "no failures yet");
        for _ in 0..3 {
            b.spend(&1, t0);
        }
        let wait = b.check(&1, t0).unwrap_err();
        assert!(
            wait <= Duration::from_secs(1) && wait > Duration::from_millis(900),
            "{wait:?}"
        );
        assert!(b.check(&2, t0).is_ok(), "per key");
        assert!(b.check(&1, t0 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn the_bucket_map_stays_bounded() {
        let b = Buckets::<u32>::new((2.0, 1.0));
        let t0 = Instant::now();
        for i in 0..(MAX_BUCKETS as u32 + 500) {
            b.spend(&i, t0);
        }
        assert!(b.map.lock().unwrap().len() <= MAX_BUCKETS);
    }
}
