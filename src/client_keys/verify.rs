//! The bounds around argon2 verification, shared by every generation of keys.
//!
//! An attacker who knows a client_id (client_ids appear in logs) can make every
//! request cost a full argon2id run. So:
//! - verifications run on a fixed set of worker threads (half the cores, at least
//!   one), each with one argon2 memory buffer it reuses while verifications keep
//!   coming (and gives back to the system after two idle seconds), so memory is
//!   bounded by the number of workers; at most `QUEUE` wait; beyond, `Busy`
//!   (429) without hashing;
//! - re-verifications nobody waits for (a remembered credential whose
//!   verification is older than `verify_cache_ttl`) run on one more thread of
//!   the lowest priority (nice 19), one at a time per credential: on a busy
//!   core they take what serving leaves instead of half the core, and they
//!   never hold up a verification a request waits for;
//! - wrong secrets are budgeted per source address and per client_id (token
//!   buckets); a source or client over its budget gets `Throttled` (429) without
//!   hashing until a token is back.
//!
//! A legitimate client whose credential is cached never reaches this code, so a
//! flood of wrong secrets costs it nothing but the flood's share of the CPU that
//! the bounds allow.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use allocator_api2::alloc::System;
use tokio::sync::oneshot;

use super::{ApiKey, AuthError};

/// Verifications that may wait for a worker.
const QUEUE: usize = 16;
/// Background re-verifications that may wait (more are left for a later
/// request to start again).
const BACKGROUND_QUEUE: usize = 16;
/// The background worker's nice value: the lowest priority an unprivileged
/// thread can take, and never give back.
const BACKGROUND_NICE: i32 = 19;
/// A worker idle this long gives its argon2 buffer back (19 MiB with the
/// default parameters): a flood keeps it, a quiet proxy does not hold it.
const KEEP_MEMORY: Duration = Duration::from_secs(2);
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

struct Job {
    secret: String,
    phc: String,
    done: oneshot::Sender<bool>,
}

/// The jobs waiting for a worker; `closed` once the verifier is gone.
#[derive(Default)]
struct Queue {
    jobs: Mutex<(VecDeque<Job>, bool)>,
    ready: Condvar,
}

impl Queue {
    /// Queues `job` unless `limit` jobs already wait.
    fn push(&self, job: Job, limit: usize) -> Result<(), AuthError> {
        {
            let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
            if jobs.0.len() >= limit {
                return Err(AuthError::Busy);
            }
            jobs.0.push_back(job);
        }
        self.ready.notify_one();
        Ok(())
    }

    /// Ends the workers once the queued jobs are done.
    fn close(&self) {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.ready.notify_all();
    }
}

/// A credential verified against a hash, and when.
#[derive(Clone)]
struct Remembered {
    secret_hash: Arc<str>,
    at: Instant,
}

/// See the module doc.
pub struct Verifier {
    runs: Arc<AtomicU64>,
    queue: Arc<Queue>,
    /// Re-verifications nobody waits for, on the low-priority worker.
    background: Arc<Queue>,
    /// Credentials (digests) with a re-verification under way.
    rechecking: Arc<Mutex<HashSet<[u8; 32]>>>,
    /// Verifications that outlive a generation's cache (and reloads).
    remembered: moka::sync::Cache<[u8; 32], Remembered>,
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
    /// Starts `workers` verification threads and the background one; they end
    /// when the verifier does.
    pub fn with_workers(workers: usize) -> Self {
        let queue = Arc::new(Queue::default());
        let background = Arc::new(Queue::default());
        let runs = Arc::new(AtomicU64::new(0));
        let spawn = |name: String, queue: &Arc<Queue>, nice: Option<i32>| {
            let (queue, runs) = (Arc::clone(queue), Arc::clone(&runs));
            let spawned = std::thread::Builder::new().name(name).spawn(move || {
                if let Some(nice) = nice {
                    lower_priority(nice);
                }
                work(&queue, &runs)
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a verification thread");
            }
        };
        for n in 0..workers {
            spawn(format!("keygate-argon2-{n}"), &queue, None);
        }
        spawn(
            BACKGROUND_THREAD.to_owned(),
            &background,
            Some(BACKGROUND_NICE),
        );
        Verifier {
            runs,
            queue,
            background,
            rechecking: Arc::default(),
            remembered: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_idle(Duration::from_secs(24 * 3600))
                .build(),
            sources: Buckets::new(SOURCE_BUDGET),
            clients: Buckets::new(CLIENT_BUDGET),
        }
    }

    /// When the credential `digest` was last verified against `secret_hash`,
    /// if it was (and that is still the hash).
    pub fn remembered(&self, digest: &[u8; 32], secret_hash: &str) -> Option<Instant> {
        self.remembered
            .get(digest)
            .filter(|r| &*r.secret_hash == secret_hash)
            .map(|r| r.at)
    }

    /// Remembers that `digest` verified against `secret_hash` now.
    pub fn remember(&self, digest: [u8; 32], secret_hash: &str) {
        self.remembered.insert(
            digest,
            Remembered {
                secret_hash: Arc::from(secret_hash),
                at: Instant::now(),
            },
        );
    }

    /// How many argon2 verifications have run.
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    /// Whether `source` may still try secrets: once it spent its budget, a
    /// secret from it that is not already cached as right is refused unverified.
    pub fn check_source(&self, source: IpAddr) -> Result<(), AuthError> {
        self.sources
            .check(&source, Instant::now())
            .map_err(|wait| AuthError::Throttled("source", wait))
    }

    /// Admits a verification unless the client spent its budget of failures.
    pub fn admit(&self, client_id: &str) -> Result<Admission, AuthError> {
        self.clients
            .check(&client_id.to_owned(), Instant::now())
            .map_err(|wait| AuthError::Throttled("client", wait))?;
        Ok(Admission(()))
    }

    /// Records a wrong secret: against the source, and against the client when it
    /// took a verification.
    pub fn failed(&self, source: IpAddr, client_id: Option<&str>) {
        let now = Instant::now();
        self.sources.spend(&source, now);
        if let Some(client_id) = client_id {
            self.clients.spend(&client_id.to_owned(), now);
        }
    }

    /// Runs one verification on a worker; `Busy` when the queue is full.
    pub async fn verify(
        &self,
        admitted: Admission,
        secret: &str,
        key: &ApiKey,
    ) -> Result<bool, AuthError> {
        Self::run_on(&self.queue, QUEUE, admitted, secret, key).await
    }

    /// Runs one verification nobody waits for on the low-priority worker;
    /// `Busy` when its queue is full.
    pub async fn verify_in_background(
        &self,
        admitted: Admission,
        secret: &str,
        key: &ApiKey,
    ) -> Result<bool, AuthError> {
        Self::run_on(&self.background, BACKGROUND_QUEUE, admitted, secret, key).await
    }

    async fn run_on(
        queue: &Queue,
        limit: usize,
        _admitted: Admission,
        secret: &str,
        key: &ApiKey,
    ) -> Result<bool, AuthError> {
        let (done, answer) = oneshot::channel();
        let job = Job {
            secret: secret.to_owned(),
            phc: key.secret_hash.clone(),
            done,
        };
        queue.push(job, limit)?;
        answer.await.map_err(|_| AuthError::Busy)
    }

    /// Claims the re-verification of `digest`: `None` while one is under way
    /// (whichever generation started it), else a claim held until dropped.
    pub fn recheck(&self, digest: [u8; 32]) -> Option<Recheck> {
        let mut rechecking = self.rechecking.lock().unwrap_or_else(|p| p.into_inner());
        rechecking.insert(digest).then(|| Recheck {
            digest,
            rechecking: Arc::clone(&self.rechecking),
        })
    }
}

/// A re-verification under way; another for the same credential waits until
/// this is dropped.
pub struct Recheck {
    digest: [u8; 32],
    rechecking: Arc<Mutex<HashSet<[u8; 32]>>>,
}

impl Drop for Recheck {
    fn drop(&mut self) {
        self.rechecking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.digest);
    }
}

impl Drop for Verifier {
    fn drop(&mut self) {
        self.queue.close();
        self.background.close();
    }
}

/// The background worker's name (at most 15 bytes: the kernel keeps no more).
const BACKGROUND_THREAD: &str = "keygate-recheck";

/// Lowers the calling thread's priority (on Linux the nice value belongs to
/// the thread). Failing only costs the benefit: noted, not fatal.
fn lower_priority(nice: i32) {
    if let Err(e) = rustix::process::setpriority_process(None, nice) {
        tracing::debug!(error = %e, "cannot lower the background verifier's priority");
    }
}

/// A worker: one memory buffer, reused while verifications keep coming and
/// released after `KEEP_MEMORY` without one.
fn work(queue: &Queue, runs: &AtomicU64) {
    let mut memory = Memory::default();
    loop {
        let job = {
            let mut jobs = queue.jobs.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(job) = jobs.0.pop_front() {
                    break Some(job);
                }
                if jobs.1 {
                    break None;
                }
                if memory.is_empty() {
                    jobs = queue.ready.wait(jobs).unwrap_or_else(|p| p.into_inner());
                    continue;
                }
                let (guard, waited) = queue
                    .ready
                    .wait_timeout(jobs, KEEP_MEMORY)
                    .unwrap_or_else(|p| p.into_inner());
                jobs = guard;
                if waited.timed_out() && jobs.0.is_empty() {
                    memory = Memory::default();
                }
            }
        };
        let Some(job) = job else { return };
        runs.fetch_add(1, Ordering::Relaxed);
        let ok = verify_with(&job.secret, &job.phc, &mut memory);
        let _ = job.done.send(ok);
    }
}

/// The most memory one verification may use (a keys file could name more).
pub(crate) const MAX_MEMORY_KIB: u32 = 256 * 1024;

/// argon2's working memory (19 MiB with the default parameters), taken from
/// the system allocator rather than the process's: mimalloc keeps freed memory
/// for reuse and gives it back only while it keeps allocating, so a quiet proxy
/// would hold a released buffer for good. The C library maps a block this
/// large on its own and unmaps it when it is freed, as long as the block is
/// above the largest size its adaptive mapping threshold can reach (32 MiB in
/// glibc; musl always maps large blocks): so the capacity asked for is at least
/// that. Only the blocks a verification uses are ever touched; the rest of the
/// mapping costs address space, not memory.
#[derive(Default)]
pub(crate) struct Memory(Option<allocator_api2::vec::Vec<argon2::Block, System>>);

/// Blocks (1 KiB each) asked for at least: above glibc's largest adaptive
/// mapping threshold (`DEFAULT_MMAP_THRESHOLD_MAX`, 32 MiB on 64-bit systems).
const OWN_MAPPING_BLOCKS: usize = 32 * 1024 + 4;

impl Memory {
    /// `n` blocks, reusing the buffer when it is large enough.
    fn blocks(&mut self, n: usize) -> &mut [argon2::Block] {
        if self.0.as_ref().is_none_or(|b| b.capacity() < n) {
            // The old buffer (if any) goes first: never two at once.
            self.0 = None;
        }
        let buffer = self.0.get_or_insert_with(|| {
            allocator_api2::vec::Vec::with_capacity_in(n.max(OWN_MAPPING_BLOCKS), System)
        });
        buffer.resize(n, argon2::Block::default());
        &mut buffer[..]
    }

    fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// Where the buffer starts, if there is one (for tests).
    #[cfg(test)]
    fn address(&self) -> Option<usize> {
        self.0.as_ref().map(|b| b.as_ptr() as usize)
    }
}

/// Checks `secret` against an argon2 PHC string in the caller's memory buffer;
/// the comparison takes the same time wherever the first difference is.
pub(crate) fn verify_with(secret: &str, phc: &str, memory: &mut Memory) -> bool {
    use argon2::password_hash::PasswordHash;
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(expected), Some(salt)) = (hash.hash, hash.salt) else {
        return false;
    };
    let Ok(algorithm) = argon2::Algorithm::try_from(hash.algorithm) else {
        return false;
    };
    let version = match hash.version.map(argon2::Version::try_from) {
        None => argon2::Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let Ok(params) = argon2::Params::try_from(&hash) else {
        return false;
    };
    if params.m_cost() > MAX_MEMORY_KIB {
        return false;
    }
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let mut out = [0u8; 64];
    let Some(out) = out.get_mut(..expected.len()) else {
        return false;
    };
    let blocks = memory.blocks(params.block_count());
    let hasher = argon2::Argon2::new(algorithm, version, params);
    if hasher
        .hash_password_into_with_memory(secret.as_bytes(), salt, out, blocks)
        .is_err()
    {
        return false;
    }
    out.iter()
        .zip(expected.as_bytes())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
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
    fn a_recheck_is_claimed_once_until_it_is_dropped() {
        let verifier = Verifier::with_workers(1);
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let first = verifier.recheck(a).expect("nothing under way");
        assert!(verifier.recheck(a).is_none(), "one at a time");
        let other = verifier.recheck(b).expect("per credential");
        drop(first);
        assert!(verifier.recheck(a).is_some(), "free again once dropped");
        drop(other);
    }

    /// The nice value of each thread named `name` in this process.
    fn nice_values(name: &str) -> Vec<i64> {
        let mut found = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim_end() != name {
                continue;
            }
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // Fields after the name's closing parenthesis start at the third
            // (state); the nice value is the nineteenth.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            if let Some(nice) = rest.split_whitespace().nth(16) {
                found.push(nice.parse().unwrap());
            }
        }
        found
    }

    #[test]
    fn background_verifications_run_at_the_lowest_priority_and_the_others_do_not() {
        let verifier = Verifier::with_workers(1);
        let deadline = Instant::now() + Duration::from_secs(10);
        // The thread lowers its own priority as it starts.
        while !nice_values(BACKGROUND_THREAD).contains(&i64::from(BACKGROUND_NICE)) {
            assert!(
                Instant::now() < deadline,
                "no background verifier at nice 19"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // Foreground workers keep the process's priority (their names are cut
        // to 15 bytes by the kernel, like every thread's).
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let own: i64 = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .nth(16)
            .unwrap()
            .parse()
            .unwrap();
        let mut foreground = nice_values("keygate-argon2-");
        while foreground.is_empty() {
            assert!(Instant::now() < deadline, "no foreground verifier");
            std::thread::sleep(Duration::from_millis(5));
            foreground = nice_values("keygate-argon2-");
        }
        assert!(
            foreground.iter().all(|n| *n == own),
            "{foreground:?}, process {own}"
        );
        drop(verifier);
    }

    #[tokio::test]
    async fn a_background_verification_gives_the_same_answers() {
        let verifier = Verifier::with_workers(1);
        let phc = super::super::hash_secret("Right-Secret-1").unwrap();
        let k = ApiKey {
            id: "1".into(),
            client_id: "scanner_abc".into(),
            name: "scanner".into(),
            secret_hash: phc,
            roles: vec!["r".into()],
            expiration: None,
            is_valid: true,
        };
        let right = verifier.admit(&k.client_id).unwrap();
        assert!(verifier
            .verify_in_background(right, "Right-Secret-1", &k)
            .await
            .unwrap());
        let wrong = verifier.admit(&k.client_id).unwrap();
        assert!(!verifier
            .verify_in_background(wrong, "Right-Secret-2", &k)
            .await
            .unwrap());
        assert_eq!(verifier.runs(), 2);
    }

    #[test]
    fn verification_in_a_reused_buffer_agrees_with_argon2() {
        let phc = super::super::hash_secret("Right-Secret-1").unwrap();
        let mut memory = Memory::default();
        assert!(verify_with("Right-Secret-1", &phc, &mut memory));
        assert!(!verify_with("Right-Secret-2", &phc, &mut memory));
        assert!(!verify_with("", &phc, &mut memory));
        assert!(
            verify_with("Right-Secret-1", &phc, &mut memory),
            "the buffer is reused"
        );
        assert!(!verify_with("x", "not a hash", &mut memory));
        let greedy = phc.replace("m=19456", "m=4194304");
        assert!(
            !verify_with("Right-Secret-1", &greedy, &mut memory),
            "memory is capped"
        );
    }

    #[test]
    fn argon2_memory_is_asked_for_above_the_c_library_mapping_threshold() {
        // Whether the C library then maps it on its own and unmaps it on
        // release is checked on the real binary (tests/hostile.rs): in this
        // process other tests map and unmap such buffers concurrently.
        let mut memory = Memory::default();
        assert!(memory.is_empty());
        assert_eq!(memory.blocks(1024).len(), 1024);
        let buffer = memory.0.as_ref().unwrap();
        assert!(buffer.capacity() * 1024 > 32 << 20, "above 32 MiB");
        let address = memory.address();
        assert_eq!(memory.blocks(19).len(), 19, "a smaller use keeps it");
        assert_eq!(memory.address(), address);
        let more = OWN_MAPPING_BLOCKS + 1;
        assert_eq!(memory.blocks(more).len(), more, "a larger use grows it");
        assert!(memory.0.as_ref().unwrap().capacity() >= more);
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
