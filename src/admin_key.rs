//! The Confluence admin key: enabled on demand, refreshed before it expires, disabled
//! when idle or at shutdown.
//!
//! Invariants:
//! - a bypass request is only ever let through with a key that, on Confluence's
//!   clock, has more than `SAFETY_MARGIN` left; otherwise it waits for the one call
//!   in flight or is refused (503) — never forwarded without the key;
//! - at most one admin-key call is in flight at any time, however many requests
//!   wait: calls run in a spawned task, so a waiter giving up never cancels one;
//! - failed calls back off exponentially with jitter and honour `Retry-After`; a
//!   rejected credential or "not allowed" sets a readiness reason, logged once.
//!
//! Expiry is judged on Confluence's clock: remaining = `expirationTime` − the
//! response's `Date`, laid onto the monotonic clock at the moment the call was sent.
//! Time is tokio's, so tests drive hours of it in milliseconds with a paused clock.

mod backoff;
pub mod probe;

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::Method;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::config::AdminKeyPolicy;
use crate::ops::Readiness;
use backoff::Backoff;

/// A key must have at least this much left for a request to be sent with it.
pub const SAFETY_MARGIN: Duration = Duration::from_secs(5);
/// While bypass traffic flows, the key state is re-read at least this often, so a
/// key disabled elsewhere is noticed and re-enabled within a minute.
pub const DRIFT_CHECK: Duration = Duration::from_secs(50);

const READINESS: &str = "admin_key";

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
}

#[derive(Debug, Clone)]
struct ActiveKey {
    lease: Lease,
    /// When it expires on the monotonic clock.
    deadline: Instant,
    /// When a refresh starts: `refresh_before` ahead of the deadline, or half the
    /// key's life if Confluence granted less than that (no refresh storm).
    refresh_at: Instant,
}

#[derive(Debug, Default)]
struct State {
    key: Option<ActiveKey>,
    in_flight: bool,
    last_checked: Option<Instant>,
    last_bypass: Option<Instant>,
    backoff: Backoff,
    /// The last failure, for 503 messages.
    last_error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    /// No usable key: GET, then POST unless the active one has enough left.
    Acquire,
    /// Less than `refresh_before` left: POST.
    Refresh,
    /// Re-read the state (drift): GET, then POST if gone or short.
    Check,
}

type EventSink = Box<dyn Fn(&AdminKeyEvent) + Send + Sync>;

pub struct AdminKeys<A: AdminKeyApi> {
    api: A,
    policy: ArcSwap<AdminKeyPolicy>,
    /// How long a request waits for the call in flight.
    wait_bound: ArcSwap<Duration>,
    state: Mutex<State>,
    /// Bumped after every call, to wake waiters.
    settled: watch::Sender<u64>,
    activity: Notify,
    readiness: Arc<Readiness>,
    sinks: Mutex<Vec<EventSink>>,
}

impl<A: AdminKeyApi> AdminKeys<A> {
    pub fn new(
        api: A,
        policy: AdminKeyPolicy,
        wait_bound: Duration,
        readiness: Arc<Readiness>,
    ) -> Arc<Self> {
        Arc::new(AdminKeys {
            api,
            policy: ArcSwap::from_pointee(policy),
            wait_bound: ArcSwap::from_pointee(wait_bound),
            state: Mutex::new(State::default()),
            settled: watch::channel(0).0,
            activity: Notify::new(),
            readiness,
            sinks: Mutex::new(Vec::new()),
        })
    }

    /// Applies a reloaded policy to what happens from now on.
    pub fn set_policy(&self, policy: AdminKeyPolicy, wait_bound: Duration) {
        self.policy.store(Arc::new(policy));
        self.wait_bound.store(Arc::new(wait_bound));
    }

    /// Adds a receiver of every event (the audit trail, metrics).
    pub fn on_event(&self, sink: impl Fn(&AdminKeyEvent) + Send + Sync + 'static) {
        lock(&self.sinks).push(Box::new(sink));
    }

    fn emit(&self, event: AdminKeyEvent) {
        match event.action {
            "failed" => tracing::warn!(reason = %event.reason, "admin key call failed"),
            action => {
                let expires = event.expires.map(crate::rfc3339::format_seconds);
                tracing::info!(
                    action,
                    account = event.account_id.as_deref(),
                    expires = expires.as_deref(),
                    reason = %event.reason,
                    "admin key"
                )
            }
        }
        for sink in lock(&self.sinks).iter() {
            sink(&event);
        }
    }

    /// The lease a bypass request may be sent with, waiting for the one call in
    /// flight if no usable key is held.
    pub async fn ensure(self: &Arc<Self>) -> Result<Lease, Unavailable> {
        let mut settled = self.settled.subscribe();
        let wait = **self.wait_bound.load();
        let give_up = Instant::now() + wait;
        loop {
            let now = Instant::now();
            {
                let mut st = lock(&self.state);
                st.last_bypass = Some(now);
                if let Some(key) = st.key.as_ref().filter(|k| usable(k, now)) {
                    let lease = key.lease.clone();
                    let refresh = now >= key.refresh_at;
                    let check = st.last_checked.is_none_or(|t| now - t >= DRIFT_CHECK);
                    if (refresh || check) && !st.in_flight && !st.backoff.active(now) {
                        let kind = if refresh { Call::Refresh } else { Call::Check };
                        self.start(&mut st, kind);
                    }
                    return Ok(lease);
                }
                if let Some(until) = st.backoff.until().filter(|u| *u > now) {
                    return Err(Unavailable {
                        retry_after: until - now,
                        reason: st.last_error.clone().unwrap_or_default(),
                    });
                }
                if !st.in_flight {
                    self.start(&mut st, Call::Acquire);
                }
            }
            let waited = tokio::time::timeout_at(give_up, settled.changed()).await;
            if waited.is_err() {
                return Err(Unavailable {
                    retry_after: Duration::from_secs(1),
                    reason: "timed out waiting for the admin-key call".into(),
                });
            }
        }
    }

    /// Spawns the one call; the caller holds the state lock and saw no call in flight.
    fn start(self: &Arc<Self>, st: &mut State, kind: Call) {
        st.in_flight = true;
        let this = Arc::clone(self);
        tokio::spawn(async move {
            this.sync(kind).await;
            lock(&this.state).in_flight = false;
            this.settled.send_modify(|n| *n += 1);
        });
    }

    /// Waits until no call is in flight, then claims the slot.
    async fn claim(&self) {
        let mut settled = self.settled.subscribe();
        loop {
            {
                let mut st = lock(&self.state);
                if !st.in_flight {
                    st.in_flight = true;
                    return;
                }
            }
            let _ = settled.changed().await;
        }
    }

    fn release(&self) {
        lock(&self.state).in_flight = false;
        self.settled.send_modify(|n| *n += 1);
    }

    async fn sync(&self, kind: Call) {
        let policy = self.policy.load_full();
        let had_key = lock(&self.state).key.is_some();
        if kind != Call::Refresh {
            let sent = Instant::now();
            let reply = match self.api.call(Method::GET, 0).await {
                Ok(r) => r,
                Err(e) => return self.fail(Failure::Transient(e, None)),
            };
            match reply.status {
                200 => match parse_key(&reply, sent, policy.refresh_before) {
                    Some(key) if key.deadline - sent > policy.refresh_before => {
                        let action = if had_key { None } else { Some("adopted") };
                        return self.succeed(key, action, "an active key was found");
                    }
                    Some(_) => {}
                    None => {
                        return self.fail(Failure::Transient(
                            "GET answered an unreadable key".into(),
                            None,
                        ))
                    }
                },
                // No key active (or the account may not use admin keys: only POST tells).
                404 => {}
                status => return self.fail(Failure::from_status("GET", status, reply.retry_after)),
            }
        }
        let sent = Instant::now();
        let reply = match self.api.call(Method::POST, policy.duration_minutes).await {
            Ok(r) => r,
            Err(e) => return self.fail(Failure::Transient(e, None)),
        };
        match reply.status {
            200 | 201 => match parse_key(&reply, sent, policy.refresh_before) {
                Some(key) => {
                    let (action, why) = match (kind, had_key) {
                        (Call::Refresh, _) => ("refreshed", "less than refresh_before was left"),
                        (Call::Check, true) => {
                            ("enabled", "the key was disabled or shortened elsewhere")
                        }
                        (_, true) => ("refreshed", "the key had run out"),
                        (_, false) => ("enabled", "a bypass request needed it"),
                    };
                    self.succeed(key, Some(action), why);
                }
                None => self.fail(Failure::Transient(
                    "POST answered an unreadable key".into(),
                    None,
                )),
            },
            status => self.fail(Failure::from_status("POST", status, reply.retry_after)),
        }
    }

    fn succeed(&self, key: ActiveKey, action: Option<&'static str>, why: &str) {
        let event = action.map(|action| AdminKeyEvent {
            action,
            expires: Some(key.lease.expires),
            account_id: Some(key.lease.account_id.clone()),
            reason: why.to_owned(),
        });
        {
            let mut st = lock(&self.state);
            st.key = Some(key);
            st.last_checked = Some(Instant::now());
            st.backoff.reset();
            st.last_error = None;
        }
        if self.readiness.clear(READINESS) {
            tracing::info!("admin key calls succeed again");
        }
        if let Some(event) = event {
            self.emit(event);
        }
        self.activity.notify_one();
    }

    fn fail(&self, failure: Failure) {
        let now = Instant::now();
        let reason = failure.reason();
        {
            let mut st = lock(&self.state);
            st.backoff.fail(now, failure.fatal(), failure.retry_after());
            st.last_error = Some(reason.clone());
            st.last_checked = Some(now);
        }
        if failure.fatal() && self.readiness.set(READINESS, reason.clone()) {
            tracing::error!(reason = %reason, "admin key unavailable until this is fixed");
        }
        self.emit(AdminKeyEvent {
            action: "failed",
            expires: None,
            account_id: None,
            reason,
        });
    }

    /// DELETEs the key if keygate holds one; `why` goes into the event.
    pub async fn disable(&self, why: &str) {
        self.claim().await;
        if lock(&self.state).key.is_some() {
            match self.api.call(Method::DELETE, 0).await {
                Ok(r) if matches!(r.status, 200 | 204 | 404) => {
                    lock(&self.state).key = None;
                    self.emit(AdminKeyEvent {
                        action: "disabled",
                        expires: None,
                        account_id: None,
                        reason: why.to_owned(),
                    });
                }
                Ok(r) => self.emit(failed_disable(format!("DELETE answered {}", r.status))),
                Err(e) => self.emit(failed_disable(e)),
            }
        }
        self.release();
    }

    /// Disables the key after `idle_disable_after` without bypass traffic; returns
    /// when `stop` completes.
    pub async fn idle_watch(self: Arc<Self>, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let deadline = {
                let st = lock(&self.state);
                match (
                    self.policy.load().idle_disable_after,
                    st.key.is_some(),
                    st.last_bypass,
                ) {
                    (Some(idle), true, Some(last)) => Some(last + idle),
                    _ => None,
                }
            };
            let Some(deadline) = deadline else {
                tokio::select! {
                    _ = &mut stop => return,
                    _ = self.activity.notified() => continue,
                }
            };
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep_until(deadline) => {}
            }
            let idle_since = lock(&self.state).last_bypass;
            let still_idle = self
                .policy
                .load()
                .idle_disable_after
                .zip(idle_since)
                .is_some_and(|(idle, last)| Instant::now() >= last + idle);
            if still_idle {
                self.disable("no bypass traffic for idle_disable_after")
                    .await;
            }
        }
    }

    /// At shutdown, after in-flight requests drained.
    pub async fn shutdown(&self) {
        if self.policy.load().disable_on_shutdown {
            self.disable("shutdown").await;
        }
    }

    /// Seconds until the held key expires (for metrics); `None` without a key.
    pub fn seconds_left(&self) -> Option<f64> {
        let st = lock(&self.state);
        st.key.as_ref().map(|k| {
            k.deadline
                .saturating_duration_since(Instant::now())
                .as_secs_f64()
        })
    }
}

fn failed_disable(reason: String) -> AdminKeyEvent {
    AdminKeyEvent {
        action: "failed",
        expires: None,
        account_id: None,
        reason: format!("disable failed: {reason}"),
    }
}

fn usable(key: &ActiveKey, now: Instant) -> bool {
    key.deadline > now + SAFETY_MARGIN
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The key in a 200 answer, its expiry laid onto the monotonic clock at `sent`.
fn parse_key(reply: &ApiReply, sent: Instant, refresh_before: Duration) -> Option<ActiveKey> {
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
    })
}

enum Failure {
    Transient(String, Option<Duration>),
    /// The admin's credential was rejected (401).
    Credential,
    /// The account may not use admin keys (403/404 to POST).
    NotAllowed(u16),
}

impl Failure {
    fn from_status(call: &str, status: u16, retry_after: Option<Duration>) -> Failure {
        match (call, status) {
            (_, 401) => Failure::Credential,
            (_, 403) | ("POST", 404) => Failure::NotAllowed(status),
            _ => Failure::Transient(format!("{call} answered {status}"), retry_after),
        }
    }

    fn fatal(&self) -> bool {
        !matches!(self, Failure::Transient(..))
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Failure::Transient(_, after) => *after,
            _ => None,
        }
    }

    fn reason(&self) -> String {
        match self {
            Failure::Transient(why, _) => why.clone(),
            Failure::Credential => "Confluence rejected the admin credential (401): check confluence.email and confluence.api_token; Atlassian API tokens expire within a year".into(),
            Failure::NotAllowed(status) => format!("the account may not use admin keys ({status} to POST): it must be an org or site admin of a Premium or Enterprise site"),
        }
    }
}

#[cfg(test)]
mod tests;
