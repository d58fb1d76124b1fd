//! The admin-key `Store` of cluster mode: the row `keygate_admin_key` (the key,
//! the call lease, the back-offs) and `keygate_replicas` (heartbeats and last
//! bypass requests). Every time is written and compared on the database
//! server's clock (`clock_timestamp()`): a replica sends and receives offsets
//! from "now", which it lays onto its own monotonic clock, so replicas whose
//! clocks disagree still agree on the key.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Db, DbError};
use crate::admin_key::coordination::{Hold, Outcome, Store, View, LIVE};
use crate::admin_key::{ActiveKey, Lease};

/// Seconds from now to `at` (negative in the past).
fn offset(at: Instant, now: Instant) -> f64 {
    if at >= now {
        (at - now).as_secs_f64()
    } else {
        -(now - at).as_secs_f64()
    }
}

/// `now` moved by `secs`.
fn at(now: Instant, secs: f64) -> Instant {
    let d = Duration::from_secs_f64(secs.abs().min(1e9));
    if secs >= 0.0 {
        now + d
    } else {
        now.checked_sub(d).unwrap_or(now)
    }
}

fn text(e: impl Into<DbError>) -> String {
    e.into().to_string()
}

/// The admin-key state in PostgreSQL.
#[derive(Clone)]
pub struct PgStore {
    db: Arc<Db>,
}

impl PgStore {
    pub fn new(db: Arc<Db>) -> Self {
        PgStore { db }
    }

    async fn read(&self, client: &tokio_postgres::Client, me: &str) -> Result<View, String> {
        let live = LIVE.as_secs_f64();
        let row = client
            .query_one(
                "SELECT account_id, confluence_expires,
                    EXTRACT(EPOCH FROM deadline_at - clock_timestamp())::float8,
                    EXTRACT(EPOCH FROM refresh_at - clock_timestamp())::float8,
                    EXTRACT(EPOCH FROM checked_at - clock_timestamp())::float8,
                    EXTRACT(EPOCH FROM hold_until - clock_timestamp())::float8,
                    hold_reason, hold_fatal,
                    EXTRACT(EPOCH FROM upstream_hold_until - clock_timestamp())::float8,
                    (SELECT EXTRACT(EPOCH FROM max(last_bypass) - clock_timestamp())::float8
                       FROM keygate_replicas r
                      WHERE r.replica <> $1 AND NOT r.stopped
                        AND r.heartbeat > clock_timestamp() - make_interval(secs => $2)),
                    (SELECT count(*) FROM keygate_replicas r
                      WHERE r.replica <> $1 AND NOT r.stopped
                        AND r.heartbeat > clock_timestamp() - make_interval(secs => $2))
                 FROM keygate_admin_key WHERE id = 1",
                &[&me, &live],
            )
            .await
            .map_err(text)?;
        let now = Instant::now();
        let account: Option<String> = row.get(0);
        let expires: Option<String> = row.get(1);
        let deadline: Option<f64> = row.get(2);
        let refresh: Option<f64> = row.get(3);
        let checked: Option<f64> = row.get(4);
        let key = match (account, expires, deadline, refresh, checked) {
            (Some(account_id), Some(expires), Some(d), Some(r), Some(c)) => {
                crate::rfc3339::parse(&expires)
                    .ok()
                    .map(|expires| ActiveKey {
                        lease: Lease {
                            account_id,
                            expires,
                        },
                        deadline: at(now, d),
                        refresh_at: at(now, r),
                        checked_at: at(now, c),
                    })
            }
            _ => None,
        };
        let hold = row.get::<_, Option<f64>>(5).map(|h| Hold {
            until: at(now, h),
            reason: row.get::<_, Option<String>>(6).unwrap_or_default(),
            fatal: row.get(7),
        });
        let others: i64 = row.get(10);
        Ok(View {
            key,
            hold,
            upstream_hold: row.get::<_, Option<f64>>(8).map(|h| at(now, h)),
            others_last_bypass: row.get::<_, Option<f64>>(9).map(|l| at(now, l)),
            others_live: usize::try_from(others).unwrap_or(0),
        })
    }
}

impl Store for PgStore {
    async fn lease(&self, me: &str, until: Instant) -> Result<Option<View>, String> {
        let client = self.db.get().await.map_err(text)?;
        let secs = offset(until, Instant::now());
        let taken = client
            .execute(
                "UPDATE keygate_admin_key
                    SET lease_holder = $1,
                        lease_until = clock_timestamp() + make_interval(secs => $2)
                  WHERE id = 1
                    AND (lease_holder IS NULL OR lease_holder = $1
                         OR lease_until < clock_timestamp())",
                &[&me, &secs],
            )
            .await
            .map_err(text)?;
        if taken == 0 {
            return Ok(None);
        }
        self.read(&client, me).await.map(Some)
    }

    async fn view(&self, me: &str) -> Result<View, String> {
        let client = self.db.get().await.map_err(text)?;
        self.read(&client, me).await
    }

    async fn publish(&self, me: &str, outcome: &Outcome) -> Result<(), String> {
        let client = self.db.get().await.map_err(text)?;
        let now = Instant::now();
        const RELEASE: &str = "lease_holder = CASE WHEN lease_holder = $1 THEN NULL ELSE lease_holder END,
                               lease_until = CASE WHEN lease_holder = $1 THEN NULL ELSE lease_until END";
        let result = match outcome {
            Outcome::Key(key) => {
                let expires = crate::rfc3339::format_millis(key.lease.expires);
                client
                    .execute(
                        &format!(
                            "UPDATE keygate_admin_key SET
                                account_id = $2, confluence_expires = $3,
                                deadline_at = clock_timestamp() + make_interval(secs => $4),
                                refresh_at = clock_timestamp() + make_interval(secs => $5),
                                checked_at = clock_timestamp() + make_interval(secs => $6),
                                hold_until = NULL, hold_reason = NULL, hold_fatal = false,
                                changed_at = clock_timestamp(), changed_by = $1, {RELEASE}
                              WHERE id = 1"
                        ),
                        &[
                            &me,
                            &key.lease.account_id,
                            &expires,
                            &offset(key.deadline, now),
                            &offset(key.refresh_at, now),
                            &offset(key.checked_at, now),
                        ],
                    )
                    .await
            }
            Outcome::Failed(hold) => {
                client
                    .execute(
                        &format!(
                            "UPDATE keygate_admin_key SET
                                hold_until = clock_timestamp() + make_interval(secs => $2),
                                hold_reason = $3, hold_fatal = $4, {RELEASE}
                              WHERE id = 1"
                        ),
                        &[&me, &offset(hold.until, now), &hold.reason, &hold.fatal],
                    )
                    .await
            }
            Outcome::Disabled => {
                client
                    .execute(
                        &format!(
                            "UPDATE keygate_admin_key SET
                                account_id = NULL, confluence_expires = NULL,
                                deadline_at = NULL, refresh_at = NULL, checked_at = NULL,
                                changed_at = clock_timestamp(), changed_by = $1, {RELEASE}
                              WHERE id = 1"
                        ),
                        &[&me],
                    )
                    .await
            }
            Outcome::Unchanged => {
                client
                    .execute(
                        &format!("UPDATE keygate_admin_key SET {RELEASE} WHERE id = 1"),
                        &[&me],
                    )
                    .await
            }
        };
        result.map(drop).map_err(text)
    }

    async fn hold_upstream(&self, until: Instant) -> Result<(), String> {
        let client = self.db.get().await.map_err(text)?;
        let secs = offset(until, Instant::now());
        client
            .execute(
                "UPDATE keygate_admin_key
                    SET upstream_hold_until = greatest(
                        coalesce(upstream_hold_until, '-infinity'),
                        clock_timestamp() + make_interval(secs => $1))
                  WHERE id = 1",
                &[&secs],
            )
            .await
            .map(drop)
            .map_err(text)
    }

    async fn beat(&self, me: &str, last_bypass: Option<Instant>) -> Result<(), String> {
        let client = self.db.get().await.map_err(text)?;
        let ago = last_bypass.map(|l| offset(l, Instant::now()));
        client
            .execute(
                "INSERT INTO keygate_replicas (replica, started_at, heartbeat, last_bypass)
                 VALUES ($1, clock_timestamp(), clock_timestamp(),
                         clock_timestamp() + make_interval(secs => $2))
                 ON CONFLICT (replica) DO UPDATE SET
                     heartbeat = clock_timestamp(), stopped = false,
                     last_bypass = greatest(keygate_replicas.last_bypass, EXCLUDED.last_bypass)",
                &[&me, &ago],
            )
            .await
            .map(drop)
            .map_err(text)
    }

    async fn leave(&self, me: &str) -> Result<(), String> {
        let client = self.db.get().await.map_err(text)?;
        client
            .execute(
                "UPDATE keygate_replicas SET stopped = true WHERE replica = $1",
                &[&me],
            )
            .await
            .map(drop)
            .map_err(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_round_trip() {
        let now = Instant::now() + Duration::from_secs(100);
        for secs in [-90.5, -1.0, 0.0, 0.25, 3600.0] {
            let there = at(now, secs);
            assert!((offset(there, now) - secs).abs() < 1e-6, "{secs}");
        }
    }
}
