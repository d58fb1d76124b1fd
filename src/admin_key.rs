//! The Confluence admin key: enabled on demand, refreshed before it expires, disabled
//! when idle or at shutdown.
//!
//! One owner task (`admin_key/owner.rs`) holds the state and makes every admin-key
//! call; it publishes a `State` through a `watch` channel. Requests only read that
//! state and signal demand, so:
//! - at most one admin-key call is in flight at any time, however many requests
//!   wait — the owner makes calls one after another, and a waiter giving up never
//!   cancels one;
//! - a bypass request is only ever let through with a key that, on Confluence's
//!   clock, has more than `SAFETY_MARGIN` left; otherwise it waits for the call in
//!   flight or is refused (503) — never forwarded without the key;
//! - while a `DELETE` is in flight the state is `Disabling`, which holds no key:
//!   no request can be handed a lease on a key being disabled;
//! - failed calls back off exponentially with jitter and honour `Retry-After`; a
//!   rejected credential or "not allowed" sets a readiness reason, logged once.
//!
//! Expiry is judged on Confluence's clock: remaining = `expirationTime` − the
//! response's `Date`, laid onto the monotonic clock at the moment the call was sent.
//! Time is tokio's, so tests drive hours of it in milliseconds with a paused clock.

mod backoff;
pub mod coordination;
mod owner;
pub mod probe;

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::Method;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

use crate::config::AdminKeyPolicy;
use crate::readiness::Readiness;
pub use coordination::{ClusterCoordination, Coordination, LocalCoordination, MemoryStore};

/// A key must have at least this much left for a request to be sent with it.
pub const SAFETY_MARGIN: Duration = Duration::from_secs(5);
/// While bypass traffic flows, the key state is re-read at least this often, so a
/// key disabled elsewhere is noticed and re-enabled within a minute.
pub const DRIFT_CHECK: Duration = Duration::from_secs(50);

/// What Confluence answered to an admin-key call.
#[derive(Debug, Clone)]
pub struct ApiReply {
    pub status: u16,
    pub date: Option<SystemTime>,
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

/// The admin-key endpoints of one site, as the admin account.
pub trait AdminKeyApi: Send + Sync + 'static {
    /// `GET`, `POST` (with `{"durationInMinutes": n}`) or `DELETE /wiki/api/v2/admin-key`.
    /// `Err` is a timeout or a connection failure, described.
    fn call(
        &self,
        method: Method,
        duration_minutes: u32,
    ) -> impl Future<Output = Result<ApiReply, String>> + Send;
}

/// The key a bypass request is sent with, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub account_id: String,
    /// `expirationTime` as Confluence reported it (its clock).
    pub expires: SystemTime,
}

/// Why no key can be had right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    pub retry_after: Duration,
    pub reason: String,
}

/// What happened, for logs, metrics and the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminKeyEvent {
    /// `enabled`, `refreshed`, `adopted`, `disabled` or `failed`.
    pub action: &'static str,
    pub expires: Option<SystemTime>,
    pub account_id: Option<String>,
    pub reason: String,
    /// Which replica made the call (its name; the host name by default).
    pub replica: Arc<str>,
}

/// A key known to be active, with its expiry on the monotonic clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveKey {
    pub lease: Lease,
    /// When it expires on the monotonic clock.
    pub deadline: Instant,
    /// When a refresh starts: `refresh_before` ahead of the deadline, or half the
    /// key's life if Confluence granted less than that (no refresh storm).
    pub refresh_at: Instant,
    /// When its state was last read from Confluence.
    pub checked_at: Instant,
}

impl ActiveKey {
    fn usable(&self, now: Instant) -> bool {
        self.deadline > now + SAFETY_MARGIN
    }

    /// Whether a request at `now` should ask the owner for a refresh or a re-read.
    fn wants_attention(&self, now: Instant) -> bool {
        now >= self.refresh_at || now.saturating_duration_since(self.checked_at) >= DRIFT_CHECK
    }
}

/// Which admin-key call the owner is making.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// No usable key: GET, then POST unless the active one has enough left.
    Acquire,
    /// Less than `refresh_before` left: POST.
    Refresh,
    /// Re-read the state (drift): GET, then POST if gone or short.
    Check,
    /// DELETE — in a cluster, only if no other replica had bypass traffic after
    /// `quiet_since` (`None`: unconditionally, a shutdown already agreed).
    Disable { quiet_since: Option<Instant> },
}

/// The admin-key state as the owner publishes it. Only the variants that carry a
/// key hand out leases; `Disabling` carries none, so "a lease during a DELETE"
/// cannot be expressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// No key held.
    NoKey,
    /// A key is held; no call in flight.
    Active(ActiveKey),
    /// A call is in flight; `key` is the still-usable key meanwhile (refresh, check).
    Calling { call: Call, key: Option<ActiveKey> },
    /// The last call failed; requests without a usable key are refused until `until`.
    BackingOff {
        until: Instant,
        reason: String,
        key: Option<ActiveKey>,
    },
    /// A `DELETE` is in flight.
    Disabling,
}

impl State {
    /// The key a request may use at `now`.
    pub fn usable_key(&self, now: Instant) -> Option<&ActiveKey> {
        let key = match self {
            State::Active(key) => Some(key),
            State::Calling { key, .. } | State::BackingOff { key, .. } => key.as_ref(),
            State::NoKey | State::Disabling => None,
        };
        key.filter(|k| k.usable(now))
    }

    /// The key held, usable or not (for metrics).
    pub fn held(&self) -> Option<&ActiveKey> {
        match self {
            State::Active(key) => Some(key),
            State::Calling { key, .. } | State::BackingOff { key, .. } => key.as_ref(),
            State::NoKey | State::Disabling => None,
        }
    }
}

type EventSink = Box<dyn Fn(&AdminKeyEvent) + Send + Sync>;

/// What requests tell the owner: that bypass traffic happened, and how many wait.
struct Demand {
    /// Wakes the owner.
    notify: Notify,
    /// Requests waiting for a usable key.
    waiting: AtomicUsize,
    /// Nanoseconds after `base` of the last bypass request, plus one (0: none yet).
    last_bypass: AtomicU64,
    base: Instant,
}

impl Demand {
    fn touch(&self, now: Instant) {
        let nanos = u64::try_from(now.saturating_duration_since(self.base).as_nanos())
            .unwrap_or(u64::MAX - 1)
            + 1;
        self.last_bypass.fetch_max(nanos, Ordering::Relaxed);
    }

    fn last_bypass(&self) -> Option<Instant> {
        match self.last_bypass.load(Ordering::Relaxed) {
            0 => None,
            n => Some(self.base + Duration::from_nanos(n - 1)),
        }
    }
}

/// Decrements the waiting count however a waiter leaves.
struct Waiting<'a>(&'a Demand);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Settings the owner reads at each step, replaced on reload.
#[derive(Debug, Clone)]
pub struct Settings {
    pub policy: AdminKeyPolicy,
    /// How long a request waits for the call in flight.
    pub wait_bound: Duration,
}

enum Command {
    /// DELETE the key if one is held, then answer.
    Disable {
        why: &'static str,
        done: oneshot::Sender<()>,
    },
    /// This replica stops: tell the others, then answer.
    Leave(oneshot::Sender<()>),
}

/// The handle requests and the rest of keygate use; cheap to clone.
#[derive(Clone)]
pub struct AdminKeys {
    state: watch::Receiver<State>,
    demand: Arc<Demand>,
    settings: Arc<ArcSwap<Settings>>,
    commands: mpsc::Sender<Command>,
    sinks: Arc<Mutex<Vec<EventSink>>>,
}

impl AdminKeys {
    /// Starts the owner task (on the current runtime) with the local, single-node
    /// coordination.
    pub fn spawn<A: AdminKeyApi>(
        api: A,
        policy: AdminKeyPolicy,
        wait_bound: Duration,
        readiness: Arc<Readiness>,
    ) -> AdminKeys {
        Self::spawn_with(
            api,
            LocalCoordination,
            Settings { policy, wait_bound },
            readiness,
            Arc::from("local"),
        )
    }

    /// Starts the owner task with the given coordination between replicas.
    pub fn spawn_with<A: AdminKeyApi, C: Coordination>(
        api: A,
        coordination: C,
        settings: Settings,
        readiness: Arc<Readiness>,
        replica: Arc<str>,
    ) -> AdminKeys {
        let (state_tx, state) = watch::channel(State::NoKey);
        let demand = Arc::new(Demand {
            notify: Notify::new(),
            waiting: AtomicUsize::new(0),
            last_bypass: AtomicU64::new(0),
            base: Instant::now(),
        });
        let settings = Arc::new(ArcSwap::from_pointee(settings));
        let (commands, command_rx) = mpsc::channel(8);
        let sinks: Arc<Mutex<Vec<EventSink>>> = Arc::default();
        let owner = owner::Owner {
            api,
            coordination,
            state: state_tx,
            demand: Arc::clone(&demand),
            settings: Arc::clone(&settings),
            commands: command_rx,
            backoff: backoff::Backoff::default(),
            readiness,
            sinks: Arc::clone(&sinks),
            replica,
            cluster_last: None,
        };
        tokio::spawn(owner.run());
        AdminKeys {
            state,
            demand,
            settings,
            commands,
            sinks,
        }
    }

    /// Applies a reloaded policy to what happens from now on.
    pub fn set_settings(&self, settings: Settings) {
        self.settings.store(Arc::new(settings));
        self.demand.notify.notify_one();
    }

    /// Adds a receiver of every event (the audit trail, metrics).
    pub fn on_event(&self, sink: impl Fn(&AdminKeyEvent) + Send + Sync + 'static) {
        lock(&self.sinks).push(Box::new(sink));
    }

    /// The lease a bypass request may be sent with, waiting (at most the wait bound)
    /// for the owner's call if no usable key is held.
    pub async fn ensure(&self) -> Result<Lease, Unavailable> {
        let started = Instant::now();
        self.demand.touch(started);
        let give_up = started + self.settings.load().wait_bound;
        let mut state = self.state.clone();
        let mut waiting = None;
        // One clock read on the way through (the usual case: a key is held).
        let mut now = started;
        loop {
            {
                let current = state.borrow_and_update();
                if let Some(key) = current.usable_key(now) {
                    if key.wants_attention(now) {
                        self.demand.notify.notify_one();
                    }
                    return Ok(key.lease.clone());
                }
                if let State::BackingOff { until, reason, .. } = &*current {
                    if *until > now {
                        return Err(Unavailable {
                            retry_after: *until - now,
                            reason: reason.clone(),
                        });
                    }
                }
            }
            if waiting.is_none() {
                self.demand.waiting.fetch_add(1, Ordering::Relaxed);
                waiting = Some(Waiting(&self.demand));
            }
            self.demand.notify.notify_one();
            match tokio::time::timeout_at(give_up, state.changed()).await {
                Ok(Ok(())) => now = Instant::now(),
                Ok(Err(_)) => {
                    return Err(Unavailable {
                        retry_after: Duration::from_secs(1),
                        reason: "the admin-key task has stopped".into(),
                    })
                }
                Err(_) => {
                    return Err(Unavailable {
                        retry_after: Duration::from_secs(1),
                        reason: "timed out waiting for the admin-key call".into(),
                    })
                }
            }
        }
    }

    /// DELETEs the key if one is held; `why` goes into the event.
    pub async fn disable(&self, why: &'static str) {
        let (done, wait) = oneshot::channel();
        if self
            .commands
            .send(Command::Disable { why, done })
            .await
            .is_ok()
        {
            let _ = wait.await;
        }
    }

    /// At shutdown, after in-flight requests drained: DELETE the key if the policy
    /// says so (in a cluster: if no other replica had recent bypass traffic),
    /// then stop counting as a live replica.
    pub async fn shutdown(&self) {
        if self.settings.load().policy.disable_on_shutdown {
            self.disable("shutdown").await;
        }
        let (done, wait) = oneshot::channel();
        if self.commands.send(Command::Leave(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// The state now.
    pub fn state(&self) -> State {
        self.state.borrow().clone()
    }

    /// Seconds until the held key expires (for metrics); `None` without a key.
    pub fn seconds_left(&self) -> Option<f64> {
        let state = self.state.borrow();
        state.held().map(|k| {
            k.deadline
                .saturating_duration_since(Instant::now())
                .as_secs_f64()
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The key in a 200 answer, its expiry laid onto the monotonic clock at `sent`.
pub(crate) fn parse_key(
    reply: &ApiReply,
    sent: Instant,
    refresh_before: Duration,
) -> Option<ActiveKey> {
    let v: serde_json::Value = serde_json::from_slice(&reply.body).ok()?;
    let account_id = v.get("accountId")?.as_str()?.to_owned();
    let expires = crate::rfc3339::parse(v.get("expirationTime")?.as_str()?).ok()?;
    // Without a Date header, the local clock is the only one there is.
    let date = reply.date.unwrap_or_else(SystemTime::now);
    let left = expires.duration_since(date).unwrap_or(Duration::ZERO);
    Some(ActiveKey {
        lease: Lease {
            account_id,
            expires,
        },
        deadline: sent + left,
        refresh_at: sent + left - refresh_before.min(left / 2),
        checked_at: Instant::now(),
    })
}

#[cfg(test)]
mod tests;
