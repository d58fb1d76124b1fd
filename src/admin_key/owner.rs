//! The owner task: the only place admin-key calls are made and the state changes.
//! One loop waits for demand, a command or a timer; each step decides at most one
//! call from the state, makes it, and publishes the result. Every transition is in
//! `step`, `call` and `disable`.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::Method;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::backoff::Backoff;
use super::coordination::{Coordination, Hold, Outcome, Shared, Turn};
use super::{
    lock, parse_key, ActiveKey, AdminKeyApi, AdminKeyEvent, Call, Command, Demand, EventSink,
    Settings, State, DRIFT_CHECK,
};
use crate::readiness::Readiness;

const READINESS: &str = "admin_key";

pub(super) struct Owner<A, C> {
    pub(super) api: A,
    pub(super) coordination: C,
    pub(super) state: watch::Sender<State>,
    pub(super) demand: Arc<Demand>,
    pub(super) settings: Arc<ArcSwap<Settings>>,
    pub(super) commands: mpsc::Receiver<Command>,
    pub(super) backoff: Backoff,
    pub(super) readiness: Arc<Readiness>,
    pub(super) sinks: Arc<std::sync::Mutex<Vec<EventSink>>>,
    pub(super) replica: Arc<str>,
    /// The latest bypass request of any other live replica (cluster mode).
    pub(super) cluster_last: Option<Instant>,
}

/// A call that succeeded: the key, the event to report (if any) and why.
struct Success {
    key: ActiveKey,
    action: Option<&'static str>,
    why: &'static str,
}

/// A call that failed, and the key that is still usable meanwhile (if any).
struct Failed {
    failure: Failure,
    key: Option<ActiveKey>,
}

impl<A: AdminKeyApi, C: Coordination> Owner<A, C> {
    pub(super) async fn run(mut self) {
        let mut reported_traffic = None;
        loop {
            let wake = self.next_wake();
            tokio::select! {
                biased;
                command = self.commands.recv() => match command {
                    Some(Command::Disable { why, done }) => {
                        let idle = self.settings.load().policy.idle_disable_after;
                        let last_one =
                            why != "shutdown" || self.coordination.last_one_out(idle).await;
                        if last_one {
                            self.disable(why, None).await;
                        }
                        let _ = done.send(());
                        continue;
                    }
                    Some(Command::Leave(done)) => {
                        self.coordination.leave().await;
                        let _ = done.send(());
                        continue;
                    }
                    // Every handle is gone: keygate is stopping.
                    None => return,
                },
                _ = self.demand.notify.notified() => {}
                _ = sleep_until(wake) => {}
            }
            let last = self.demand.last_bypass();
            if last.is_some() && last != reported_traffic {
                if let Some(at) = last {
                    self.coordination.traffic(at).await;
                }
                reported_traffic = last;
            }
            self.step().await;
        }
    }

    /// The next time the owner must look without being asked: the idle deadline,
    /// and the poll of the shared state when replicas share one.
    /// The latest bypass request here or on any other live replica.
    fn last_bypass(&self) -> Option<Instant> {
        self.demand.last_bypass().max(self.cluster_last)
    }

    fn next_wake(&self) -> Option<Instant> {
        let now = Instant::now();
        let idle = self.settings.load().policy.idle_disable_after;
        let held = self.state.borrow().held().is_some();
        let idle_at = match (idle, held, self.last_bypass()) {
            (Some(idle), true, Some(last)) => Some(last + idle),
            (Some(idle), true, None) => Some(now + idle),
            _ => None,
        };
        let poll_at = self.coordination.poll_every().map(|every| now + every);
        match (idle_at, poll_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn publish(&self, state: State) {
        self.state.send_replace(state);
    }

    fn current(&self) -> State {
        self.state.borrow().clone()
    }

    /// Decides and makes at most one call.
    async fn step(&mut self) {
        let now = Instant::now();
        if self.coordination.poll_every().is_some() {
            if let Some(shared) = self.coordination.shared().await {
                self.merge(shared, now);
            }
        }
        let settings = self.settings.load_full();
        let current = self.current();
        let last_bypass = self.last_bypass();
        if let (Some(idle), Some(_)) = (settings.policy.idle_disable_after, current.held()) {
            if last_bypass.is_none_or(|last| last + idle <= now) {
                let quiet_since = now.checked_sub(idle);
                self.disable("no bypass traffic for idle_disable_after", quiet_since)
                    .await;
                return;
            }
        }
        if self.backoff.active(now) {
            return;
        }
        let usable = current.usable_key(now).cloned();
        let waiting = self
            .demand
            .waiting
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0;
        let since = |t: Instant| last_bypass.is_some_and(|last| last >= t);
        let call = match &usable {
            None if waiting => Some(Call::Acquire),
            None => None,
            Some(key) if since(key.refresh_at) => Some(Call::Refresh),
            Some(key) if since(key.checked_at + DRIFT_CHECK) => Some(Call::Check),
            Some(_) => None,
        };
        if let Some(call) = call {
            self.call(call, usable, current.held().is_some()).await;
        }
    }

    /// Takes what another replica learnt: a newer key, or its back-off.
    fn merge(&mut self, shared: Shared, now: Instant) {
        self.cluster_last = self.cluster_last.max(shared.last_bypass);
        let current = self.current();
        if !matches!(
            current,
            State::NoKey | State::Active(_) | State::BackingOff { .. }
        ) {
            return;
        }
        if let Some(Hold {
            until,
            reason,
            fatal,
        }) = shared.backoff.filter(|h| h.until > now)
        {
            // The same readiness on every replica, whichever made the call.
            if fatal && self.readiness.set(READINESS, reason.clone()) {
                tracing::error!(reason = %reason, "admin key unavailable until this is fixed (seen by another replica)");
            }
            self.backoff.hold_until(until);
            if current
                != (State::BackingOff {
                    until,
                    reason: reason.clone(),
                    key: shared.key.clone().filter(|k| k.usable(now)),
                })
            {
                self.publish(State::BackingOff {
                    until,
                    reason,
                    key: shared.key.filter(|k| k.usable(now)),
                });
            }
            return;
        }
        match (shared.key, current.held()) {
            (Some(theirs), Some(ours))
                if theirs.lease == ours.lease && theirs.checked_at <= ours.checked_at => {}
            (Some(theirs), _) => {
                self.backoff.reset();
                if self.readiness.clear(READINESS) {
                    tracing::info!("admin key calls succeed again (seen by another replica)");
                }
                self.publish(State::Active(theirs));
            }
            (None, Some(_)) => self.publish(State::NoKey),
            (None, None) => {}
        }
    }

    async fn call(&mut self, call: Call, usable: Option<ActiveKey>, had_key: bool) {
        self.publish(State::Calling {
            call,
            key: usable.clone(),
        });
        match self.coordination.turn(call).await {
            Ok(Turn::Mine) => {}
            Ok(Turn::Adopt(shared)) => {
                let now = Instant::now();
                self.publish(State::NoKey);
                self.merge(shared, now);
                if let Some(key) = self.current().held().cloned() {
                    if !had_key {
                        self.emit("adopted", Some(&key), "another replica enabled it");
                    }
                }
                return;
            }
            Err(reason) => {
                let failed = Failed {
                    failure: Failure::Transient(reason, None),
                    key: usable,
                };
                self.failed(failed).await;
                return;
            }
        }
        match self.sync(call, usable, had_key).await {
            Ok(success) => {
                self.backoff.reset();
                if self.readiness.clear(READINESS) {
                    tracing::info!("admin key calls succeed again");
                }
                if let Some(action) = success.action {
                    self.emit(action, Some(&success.key), success.why);
                }
                self.publish(State::Active(success.key.clone()));
                self.coordination.finish(&Outcome::Key(success.key)).await;
            }
            Err(failed) => self.failed(failed).await,
        }
    }

    async fn failed(&mut self, failed: Failed) {
        let now = Instant::now();
        let reason = failed.failure.reason();
        let fatal = failed.failure.fatal();
        let wait = self.backoff.fail(now, fatal, failed.failure.retry_after());
        if fatal && self.readiness.set(READINESS, reason.clone()) {
            tracing::error!(reason = %reason, "admin key unavailable until this is fixed");
        }
        self.emit_failed(reason.clone());
        let until = now + wait;
        self.publish(State::BackingOff {
            until,
            reason: reason.clone(),
            key: failed.key,
        });
        self.coordination
            .finish(&Outcome::Failed(Hold {
                until,
                reason,
                fatal,
            }))
            .await;
    }

    /// The calls themselves: GET (unless refreshing), then POST when needed.
    async fn sync(
        &mut self,
        call: Call,
        mut usable: Option<ActiveKey>,
        had_key: bool,
    ) -> Result<Success, Failed> {
        let policy = self.settings.load().policy.clone();
        if call != Call::Refresh {
            let sent = Instant::now();
            let reply = match self.api.call(Method::GET, 0).await {
                Ok(r) => r,
                Err(e) => return Err(transient(e, usable)),
            };
            match reply.status {
                200 => match parse_key(&reply, sent, policy.refresh_before) {
                    Some(key) if key.deadline - sent > policy.refresh_before => {
                        let action = if had_key { None } else { Some("adopted") };
                        return Ok(Success {
                            key,
                            action,
                            why: "an active key was found",
                        });
                    }
                    // Short but usable: requests go on with it while the POST runs,
                    // and keep it if the POST fails.
                    Some(key) => {
                        usable = Some(key).filter(|k| k.usable(Instant::now()));
                        self.publish(State::Calling {
                            call,
                            key: usable.clone(),
                        });
                    }
                    None => return Err(transient("GET answered an unreadable key".into(), usable)),
                },
                // No key is active (or the account may not use admin keys: only POST
                // tells). Whatever keygate held is gone: no request may use it.
                404 => {
                    usable = None;
                    self.publish(State::Calling { call, key: None });
                }
                status => {
                    return Err(Failed {
                        failure: Failure::from_status(Method::GET, status, reply.retry_after),
                        key: usable,
                    })
                }
            }
        }
        let sent = Instant::now();
        let reply = match self.api.call(Method::POST, policy.duration_minutes).await {
            Ok(r) => r,
            Err(e) => return Err(transient(e, usable)),
        };
        match reply.status {
            200 | 201 => match parse_key(&reply, sent, policy.refresh_before) {
                Some(key) => {
                    let (action, why) = match (call, had_key) {
                        (Call::Refresh, _) => ("refreshed", "less than refresh_before was left"),
                        (Call::Check, true) => {
                            ("enabled", "the key was disabled or shortened elsewhere")
                        }
                        (_, true) => ("refreshed", "the key had run out"),
                        (_, false) => ("enabled", "a bypass request needed it"),
                    };
                    Ok(Success {
                        key,
                        action: Some(action),
                        why,
                    })
                }
                None => Err(transient("POST answered an unreadable key".into(), usable)),
            },
            status => Err(Failed {
                failure: Failure::from_status(Method::POST, status, reply.retry_after),
                key: usable,
            }),
        }
    }

    /// DELETEs the key if one is held. While the DELETE is in flight the state is
    /// `Disabling`: no request gets a lease. In a cluster, a replica that had
    /// bypass traffic after `quiet_since` keeps the key enabled.
    async fn disable(&mut self, why: &str, quiet_since: Option<Instant>) {
        let before = self.current();
        if before.held().is_none() {
            return;
        }
        self.publish(State::Disabling);
        match self.coordination.turn(Call::Disable { quiet_since }).await {
            Ok(Turn::Mine) => {}
            Ok(Turn::Adopt(shared)) => {
                // Another replica still needs the key, or already disabled it.
                self.publish(before);
                self.merge(shared, Instant::now());
                return;
            }
            Err(reason) => {
                self.emit_failed(format!("disable failed: {reason}"));
                self.publish(before);
                return;
            }
        }
        match self.api.call(Method::DELETE, 0).await {
            Ok(r) if matches!(r.status, 200 | 204 | 404) => {
                self.publish(State::NoKey);
                self.emit("disabled", None, why);
                self.coordination.finish(&Outcome::Disabled).await;
            }
            Ok(r) => {
                self.emit_failed(format!("disable failed: DELETE answered {}", r.status));
                self.publish(before);
                self.coordination.finish(&Outcome::Unchanged).await;
            }
            Err(e) => {
                self.emit_failed(format!("disable failed: {e}"));
                self.publish(before);
                self.coordination.finish(&Outcome::Unchanged).await;
            }
        }
    }

    fn emit(&self, action: &'static str, key: Option<&ActiveKey>, why: &str) {
        self.send(AdminKeyEvent {
            action,
            expires: key.map(|k| k.lease.expires),
            account_id: key.map(|k| k.lease.account_id.clone()),
            reason: why.to_owned(),
            replica: Arc::clone(&self.replica),
        });
    }

    fn emit_failed(&self, reason: String) {
        self.send(AdminKeyEvent {
            action: "failed",
            expires: None,
            account_id: None,
            reason,
            replica: Arc::clone(&self.replica),
        });
    }

    fn send(&self, event: AdminKeyEvent) {
        match event.action {
            "failed" => {
                tracing::warn!(reason = %event.reason, replica = %event.replica, "admin key call failed")
            }
            action => {
                let expires = event.expires.map(crate::rfc3339::format_seconds);
                tracing::info!(
                    action,
                    account = event.account_id.as_deref(),
                    expires = expires.as_deref(),
                    reason = %event.reason,
                    replica = %event.replica,
                    "admin key"
                )
            }
        }
        for sink in lock(&self.sinks).iter() {
            sink(&event);
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn transient(reason: String, key: Option<ActiveKey>) -> Failed {
    Failed {
        failure: Failure::Transient(reason, None),
        key,
    }
}

enum Failure {
    Transient(String, Option<Duration>),
    /// The admin's credential was rejected (401).
    Credential,
    /// The account may not use admin keys (403 to any call, 404 to POST).
    NotAllowed {
        call: Method,
        status: u16,
    },
}

impl Failure {
    fn from_status(call: Method, status: u16, retry_after: Option<Duration>) -> Failure {
        match status {
            401 => Failure::Credential,
            403 => Failure::NotAllowed { call, status },
            404 if call == Method::POST => Failure::NotAllowed { call, status },
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
            Failure::NotAllowed { call, status } => format!("the account may not use admin keys ({status} to {call}): it must be an org or site admin of a Premium or Enterprise site"),
        }
    }
}
