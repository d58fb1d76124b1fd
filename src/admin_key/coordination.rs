//! How the owner task agrees with other replicas on the one admin key they share.
//!
//! A single node needs no agreement (`LocalCoordination`). Replicas that share a
//! database (`ClusterCoordination` over a `Store`: PostgreSQL in production,
//! `MemoryStore` in tests) agree like this:
//! - **one call in flight for the cluster**: a replica calls the admin-key API
//!   only while it holds the call lease, a row with a deadline (`lease_for`); a
//!   replica that dies holding it blocks the others until that deadline at most;
//! - **a call made by one counts for all**: with the lease in hand, a replica
//!   first looks at what the others published; a key enabled, refreshed or
//!   checked recently enough, or a back-off, is adopted instead of calling;
//! - **idle disable for the cluster**: replicas publish when they last forwarded
//!   a bypass request (at most once a second) with a heartbeat; the key is
//!   disabled only when no live replica had bypass traffic for
//!   `idle_disable_after`, and a replica whose heartbeat is older than `LIVE`
//!   stops counting;
//! - **back-off for the cluster**: a failed call's back-off, and a `Retry-After`
//!   on a forwarded request, hold every replica within `SHARE_EVERY`.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::{ActiveKey, Call, DRIFT_CHECK};

/// How often replicas read the shared state (and so the longest a back-off or
/// a disable seen by one takes to hold the others).
pub const SHARE_EVERY: Duration = Duration::from_millis(250);
/// A replica's heartbeat period.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A replica without a heartbeat for this long no longer counts as live.
pub const LIVE: Duration = Duration::from_secs(10);
/// Bypass traffic is published at most this often per replica.
pub const TRAFFIC_EVERY: Duration = Duration::from_secs(1);
/// How often a replica waiting for the call lease looks again.
const LEASE_POLL: Duration = Duration::from_millis(100);

/// A back-off some replica saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub until: Instant,
    pub reason: String,
    /// It needs a human (a rejected credential, an account not allowed).
    pub fatal: bool,
}

/// The shared view of the admin key, on the local monotonic clock.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Shared {
    /// The key some replica holds, with its deadline and refresh time.
    pub key: Option<ActiveKey>,
    /// Calls are held back until then (a failure another replica saw).
    pub backoff: Option<Hold>,
    /// The most recent bypass request of any other live replica.
    pub last_bypass: Option<Instant>,
}

/// Whether the owner may make its call now.
#[derive(Debug)]
pub enum Turn {
    /// Make the call; report with `finish`.
    Mine,
    /// Another replica's result serves: take it instead of calling.
    Adopt(Shared),
}

/// What a finished call left behind, to publish to the other replicas.
#[derive(Debug, Clone)]
pub enum Outcome {
    Key(ActiveKey),
    Failed(Hold),
    Disabled,
    /// The call left the shared state as it was (a failed DELETE, or nothing done).
    Unchanged,
}

/// Agreement with other replicas on the admin key.
pub trait Coordination: Send + Sync + 'static {
    /// Waits for this replica's turn to make `wanted`. A replica that cannot
    /// reach the others answers `Err`.
    fn turn(&self, wanted: Call) -> impl Future<Output = Result<Turn, String>> + Send;

    /// Publishes the outcome of the call this replica made and ends its turn.
    fn finish(&self, outcome: &Outcome) -> impl Future<Output = ()> + Send;

    /// The shared view now (`None` for a single node, or when unreachable).
    fn shared(&self) -> impl Future<Output = Option<Shared>> + Send;

    /// Records that this replica forwarded bypass traffic at `at` (published at
    /// most every `TRAFFIC_EVERY`).
    fn traffic(&self, at: Instant) -> impl Future<Output = ()> + Send;

    /// How often `shared` should be polled; `None` when there is nobody to agree
    /// with.
    fn poll_every(&self) -> Option<Duration>;

    /// Whether no other live replica had bypass traffic within `recent` (with
    /// `None`: whether no other replica is live). A shutdown disables the key
    /// only then.
    fn last_one_out(&self, recent: Option<Duration>) -> impl Future<Output = bool> + Send;

    /// This replica stops: it no longer counts as live.
    fn leave(&self) -> impl Future<Output = ()> + Send;
}

/// A single node: every turn is its own, nothing is shared.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalCoordination;

impl Coordination for LocalCoordination {
    async fn turn(&self, _wanted: Call) -> Result<Turn, String> {
        Ok(Turn::Mine)
    }

    async fn finish(&self, _outcome: &Outcome) {}

    async fn shared(&self) -> Option<Shared> {
        None
    }

    async fn traffic(&self, _at: Instant) {}

    fn poll_every(&self) -> Option<Duration> {
        None
    }

    async fn last_one_out(&self, _recent: Option<Duration>) -> bool {
        true
    }

    async fn leave(&self) {}
}

/// What the cluster knows, on the local monotonic clock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub key: Option<ActiveKey>,
    /// Admin-key calls are held back until then.
    pub hold: Option<Hold>,
    /// Forwarded requests are held back until then (a `Retry-After`).
    pub upstream_hold: Option<Instant>,
    /// The latest bypass request of any other live replica.
    pub others_last_bypass: Option<Instant>,
    /// How many other replicas are live.
    pub others_live: usize,
}

/// Where replicas keep what they share. Times cross it as local monotonic
/// instants; a store on a shared server converts them to the server's clock.
pub trait Store: Send + Sync + 'static {
    /// Takes the call lease until `until` unless another replica holds one
    /// that has not expired; `Some(view)` when taken.
    fn lease(
        &self,
        me: &str,
        until: Instant,
    ) -> impl Future<Output = Result<Option<View>, String>> + Send;

    fn view(&self, me: &str) -> impl Future<Output = Result<View, String>> + Send;

    /// Publishes the outcome of a call and releases `me`'s lease.
    fn publish(
        &self,
        me: &str,
        outcome: &Outcome,
    ) -> impl Future<Output = Result<(), String>> + Send;

    /// Holds forwarded requests of every replica until `until` (never shortens).
    fn hold_upstream(&self, until: Instant) -> impl Future<Output = Result<(), String>> + Send;

    /// `me` is live; its latest bypass request was at `last_bypass`.
    fn beat(
        &self,
        me: &str,
        last_bypass: Option<Instant>,
    ) -> impl Future<Output = Result<(), String>> + Send;

    /// `me` stops.
    fn leave(&self, me: &str) -> impl Future<Output = Result<(), String>> + Send;
}

type HoldSink = Box<dyn Fn(Instant) + Send + Sync>;

struct Inner<S> {
    store: S,
    me: String,
    lease_for: Duration,
    /// How often the owner reads the shared state (`SHARE_EVERY`).
    poll: Duration,
    /// This replica's latest bypass request, and what was last published.
    local_last: Mutex<(Option<Instant>, Option<Instant>)>,
    last_beat: Mutex<Option<Instant>>,
    /// Told of every upstream hold read from the store (the proxy's back-off).
    upstream_hold: Mutex<Option<HoldSink>>,
}

/// The coordination of replicas sharing a `Store`; cheap to clone.
pub struct ClusterCoordination<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for ClusterCoordination<S> {
    fn clone(&self) -> Self {
        ClusterCoordination {
            inner: Arc::clone(&self.inner),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<S: Store> ClusterCoordination<S> {
    /// `me` names this replica; `lease_for` bounds one admin-key call (its GET
    /// and POST), and so how long a replica that died holding the lease blocks
    /// the others.
    pub fn new(store: S, me: &str, lease_for: Duration) -> Self {
        ClusterCoordination {
            inner: Arc::new(Inner {
                store,
                me: me.to_owned(),
                lease_for,
                poll: SHARE_EVERY,
                local_last: Mutex::new((None, None)),
                last_beat: Mutex::new(None),
                upstream_hold: Mutex::new(None),
            }),
        }
    }

    /// Reads the shared state every `poll` instead of `SHARE_EVERY` (long
    /// simulations on a paused clock).
    pub fn with_poll(self, poll: Duration) -> Self {
        let inner = match Arc::try_unwrap(self.inner) {
            Ok(mut inner) => {
                inner.poll = poll;
                inner
            }
            Err(shared) => return ClusterCoordination { inner: shared },
        };
        ClusterCoordination {
            inner: Arc::new(inner),
        }
    }

    /// Where upstream holds read from the store go (the proxy's back-off).
    pub fn on_upstream_hold(&self, sink: impl Fn(Instant) + Send + Sync + 'static) {
        *lock(&self.inner.upstream_hold) = Some(Box::new(sink));
    }

    /// Shares a `Retry-After` this replica saw on a forwarded request.
    pub async fn share_upstream_hold(&self, after: Duration) {
        let until = Instant::now() + after.min(Duration::from_secs(3600));
        if let Err(e) = self.inner.store.hold_upstream(until).await {
            tracing::warn!(error = %e, "cannot share Confluence's back-off with the other replicas");
        }
    }

    /// Publishes heartbeat and traffic when due.
    async fn maybe_beat(&self) {
        let now = Instant::now();
        let (latest, published) = *lock(&self.inner.local_last);
        let last_beat = *lock(&self.inner.last_beat);
        let since = last_beat.map(|b| now.saturating_duration_since(b));
        let due = match since {
            None => true,
            Some(since) => since >= HEARTBEAT || (latest != published && since >= TRAFFIC_EVERY),
        };
        if !due {
            return;
        }
        *lock(&self.inner.last_beat) = Some(now);
        match self.inner.store.beat(&self.inner.me, latest).await {
            Ok(()) => lock(&self.inner.local_last).1 = latest,
            Err(e) => tracing::debug!(error = %e, "heartbeat not published"),
        }
    }
}

/// Whether what the others published serves `call`, so it need not be made.
fn serves(call: Call, view: &View, now: Instant) -> bool {
    if view.hold.as_ref().is_some_and(|h| h.until > now) {
        return true;
    }
    let fresh_key = view
        .key
        .as_ref()
        .filter(|k| k.usable(now) && k.refresh_at > now);
    match call {
        Call::Acquire | Call::Refresh => fresh_key.is_some(),
        Call::Check => {
            fresh_key.is_some_and(|k| now.saturating_duration_since(k.checked_at) < DRIFT_CHECK)
        }
        Call::Disable { quiet_since } => {
            view.key.is_none()
                || quiet_since.is_some_and(|q| view.others_last_bypass.is_some_and(|l| l > q))
        }
    }
}

fn shared_of(view: View) -> Shared {
    Shared {
        key: view.key,
        backoff: view.hold,
        last_bypass: view.others_last_bypass,
    }
}

impl<S: Store> Coordination for ClusterCoordination<S> {
    async fn turn(&self, wanted: Call) -> Result<Turn, String> {
        let give_up = Instant::now() + self.inner.lease_for + Duration::from_secs(1);
        loop {
            let now = Instant::now();
            if let Some(view) = self
                .inner
                .store
                .lease(&self.inner.me, now + self.inner.lease_for)
                .await?
            {
                if serves(wanted, &view, now) {
                    self.inner
                        .store
                        .publish(&self.inner.me, &Outcome::Unchanged)
                        .await?;
                    return Ok(Turn::Adopt(shared_of(view)));
                }
                return Ok(Turn::Mine);
            }
            if now >= give_up {
                return Err("another replica holds the admin-key call lease".into());
            }
            tokio::time::sleep(LEASE_POLL).await;
        }
    }

    async fn finish(&self, outcome: &Outcome) {
        if let Err(e) = self.inner.store.publish(&self.inner.me, outcome).await {
            tracing::warn!(error = %e, "cannot publish the admin-key call's outcome to the other replicas");
        }
    }

    async fn shared(&self) -> Option<Shared> {
        self.maybe_beat().await;
        let view = match self.inner.store.view(&self.inner.me).await {
            Ok(view) => view,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the shared admin-key state");
                return None;
            }
        };
        if let Some(until) = view.upstream_hold.filter(|u| *u > Instant::now()) {
            if let Some(sink) = &*lock(&self.inner.upstream_hold) {
                sink(until);
            }
        }
        Some(shared_of(view))
    }

    async fn traffic(&self, at: Instant) {
        {
            let mut last = lock(&self.inner.local_last);
            if last.0.is_none_or(|l| l < at) {
                last.0 = Some(at);
            }
        }
        self.maybe_beat().await;
    }

    fn poll_every(&self) -> Option<Duration> {
        Some(self.inner.poll)
    }

    async fn last_one_out(&self, recent: Option<Duration>) -> bool {
        let Ok(view) = self.inner.store.view(&self.inner.me).await else {
            // Nobody to ask: keep the key rather than cut the others off.
            return false;
        };
        let now = Instant::now();
        match recent {
            _ if view.others_live == 0 => true,
            Some(recent) => view.others_last_bypass.is_none_or(|l| l + recent <= now),
            None => false,
        }
    }

    async fn leave(&self) {
        if let Err(e) = self.inner.store.leave(&self.inner.me).await {
            tracing::warn!(error = %e, "cannot tell the other replicas that this one stops");
        }
    }
}

/// Replicas' shared state in memory, on the local clock: for tests and
/// simulations of several replicas in one process.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<MemoryState>,
}

#[derive(Default)]
struct MemoryState {
    key: Option<ActiveKey>,
    hold: Option<Hold>,
    upstream_hold: Option<Instant>,
    lease: Option<(String, Instant)>,
    /// replica → (heartbeat, last bypass, stopped)
    replicas: std::collections::HashMap<String, (Instant, Option<Instant>, bool)>,
}

impl MemoryState {
    fn view(&self, me: &str, now: Instant) -> View {
        let others = self
            .replicas
            .iter()
            .filter(|(name, (beat, _, stopped))| {
                name.as_str() != me && !stopped && now.saturating_duration_since(*beat) < LIVE
            })
            .map(|(_, (_, last, _))| *last);
        let (mut live, mut last) = (0, None);
        for l in others {
            live += 1;
            last = last.max(l);
        }
        View {
            key: self.key.clone(),
            hold: self.hold.clone(),
            upstream_hold: self.upstream_hold,
            others_last_bypass: last,
            others_live: live,
        }
    }
}

impl Store for Arc<MemoryStore> {
    async fn lease(&self, me: &str, until: Instant) -> Result<Option<View>, String> {
        let now = Instant::now();
        let mut state = lock(&self.state);
        let free = state
            .lease
            .as_ref()
            .is_none_or(|(holder, deadline)| holder == me || *deadline <= now);
        if !free {
            return Ok(None);
        }
        state.lease = Some((me.to_owned(), until));
        Ok(Some(state.view(me, now)))
    }

    async fn view(&self, me: &str) -> Result<View, String> {
        Ok(lock(&self.state).view(me, Instant::now()))
    }

    async fn publish(&self, me: &str, outcome: &Outcome) -> Result<(), String> {
        let mut state = lock(&self.state);
        match outcome {
            Outcome::Key(key) => {
                state.key = Some(key.clone());
                state.hold = None;
            }
            Outcome::Failed(hold) => state.hold = Some(hold.clone()),
            Outcome::Disabled => state.key = None,
            Outcome::Unchanged => {}
        }
        if state.lease.as_ref().is_some_and(|(holder, _)| holder == me) {
            state.lease = None;
        }
        Ok(())
    }

    async fn hold_upstream(&self, until: Instant) -> Result<(), String> {
        let mut state = lock(&self.state);
        state.upstream_hold = state.upstream_hold.max(Some(until));
        Ok(())
    }

    async fn beat(&self, me: &str, last_bypass: Option<Instant>) -> Result<(), String> {
        let now = Instant::now();
        let mut state = lock(&self.state);
        let entry = state
            .replicas
            .entry(me.to_owned())
            .or_insert((now, None, false));
        *entry = (now, entry.1.max(last_bypass), false);
        Ok(())
    }

    async fn leave(&self, me: &str) -> Result<(), String> {
        if let Some(entry) = lock(&self.state).replicas.get_mut(me) {
            entry.2 = true;
        }
        Ok(())
    }
}
