//! Request limits in front of Confluence: a token bucket per client_id
//! (`limits.per_client_rps`), the site-wide back-off after Confluence answers
//! 429/503 with `Retry-After` (`limits.upstream_backoff`: all clients share one
//! admin account and its rate limit, so keygate stops spending it until then),
//! and the rate of `auth_failure` records per source address (so a client
//! without a key cannot flood the audit trail).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

/// Buckets idle this long are forgotten (they would be full again anyway).
const IDLE: Duration = Duration::from_secs(60);

struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant, rate: f64, burst: f64) -> Result<(), Duration> {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * rate;
        self.tokens = (self.tokens + refill).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

#[derive(Default)]
pub(super) struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// Takes a token for `client_id` at `rps` per second (burst: one second's
    /// worth); `Err` is how long until the next token. Allocates only the first
    /// time a client is seen.
    pub(super) fn take(&self, client_id: &str, rps: u32, now: Instant) -> Result<(), Duration> {
        if rps == 0 {
            return Ok(());
        }
        let rate = f64::from(rps);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bucket) = buckets.get_mut(client_id) {
            return bucket.take(now, rate, rate);
        }
        if buckets.len() > 10_000 {
            buckets.retain(|_, b| now.duration_since(b.last) < IDLE);
        }
        let mut bucket = Bucket {
            tokens: rate,
            last: now,
        };
        let taken = bucket.take(now, rate, rate);
        buckets.insert(client_id.to_owned(), bucket);
        taken
    }
}

type Observer = Box<dyn Fn(Duration) + Send + Sync>;

/// Until when Confluence asked everyone to wait.
#[derive(Default)]
pub struct UpstreamBackoff {
    until: Mutex<Option<Instant>>,
    /// Told of every hold this replica decides (cluster mode shares it).
    observer: Mutex<Option<Observer>>,
}

impl UpstreamBackoff {
    /// The remaining wait, if any.
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        let until = *self.until.lock().unwrap_or_else(|p| p.into_inner());
        until.filter(|u| *u > now).map(|u| u - now)
    }

    /// Extends the wait to `now + after` (never shortens it).
    pub fn hold(&self, now: Instant, after: Duration) {
        let mut until = self.until.lock().unwrap_or_else(|p| p.into_inner());
        let new = now + after.min(Duration::from_secs(3600));
        if until.is_none_or(|u| u < new) {
            *until = Some(new);
        }
    }

    /// Holds, and tells the observer (another replica's hold comes in through
    /// `hold`, not here, so it is not told back).
    pub fn hold_and_share(&self, now: Instant, after: Duration) {
        self.hold(now, after);
        if let Some(observer) = &*self.observer.lock().unwrap_or_else(|p| p.into_inner()) {
            observer(after);
        }
    }

    pub fn observe(&self, observer: impl Fn(Duration) + Send + Sync + 'static) {
        *self.observer.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(observer));
    }
}

/// `Retry-After` of a 429/503, as seconds or as an HTTP date judged against the
/// response's own `Date` (not the local clock, which may be off).
pub(super) fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())?;
    let date = headers
        .get(http::header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    crate::confluence::parse_retry_after(value, date)
}

/// `auth_failure` records per source: a burst, then this many per second.
const RECORD_BURST: f64 = 20.0;
const RECORD_RATE: f64 = 2.0;
/// Sources tracked at most; beyond, further ones share one entry.
const MAX_SOURCES: usize = 10_000;

struct Source {
    bucket: Bucket,
    suppressed: u64,
    since: Option<SystemTime>,
}

/// What to do with one `auth_failure` record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordDecision {
    Write,
    /// Over the source's rate: counted into its next summary instead.
    Suppress,
}

/// Rate of `auth_failure` records per source, with counts of what was left out.
#[derive(Default)]
pub struct AuthRecords {
    sources: Mutex<HashMap<Option<IpAddr>, Source>>,
}

impl AuthRecords {
    pub fn decide(&self, source: IpAddr, now: Instant) -> RecordDecision {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let key = if sources.len() >= MAX_SOURCES && !sources.contains_key(&Some(source)) {
            None
        } else {
            Some(source)
        };
        let entry = sources.entry(key).or_insert_with(|| Source {
            bucket: Bucket {
                tokens: RECORD_BURST,
                last: now,
            },
            suppressed: 0,
            since: None,
        });
        match entry.bucket.take(now, RECORD_RATE, RECORD_BURST) {
            Ok(()) => RecordDecision::Write,
            Err(_) => {
                entry.suppressed += 1;
                entry.since.get_or_insert_with(SystemTime::now);
                RecordDecision::Suppress
            }
        }
    }

    /// The counts of suppressed records per source since the last call (`None`
    /// for the shared entry of sources beyond the limit); forgets idle sources.
    pub fn drain(&self, now: Instant) -> Vec<(Option<IpAddr>, u64, Option<SystemTime>)> {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (ip, s) in sources.iter_mut() {
            if s.suppressed > 0 {
                out.push((*ip, s.suppressed, s.since.take()));
                s.suppressed = 0;
            }
        }
        sources.retain(|_, s| now.duration_since(s.bucket.last) < IDLE || s.suppressed > 0);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_a_burst_then_the_rate() {
        let limiter = RateLimiter::default();
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(limiter.take("a", 5, t0).is_ok());
        }
        let wait = limiter.take("a", 5, t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(150) && wait <= Duration::from_millis(200),
            "{wait:?}"
        );
        assert!(limiter.take("b", 5, t0).is_ok(), "buckets are per client");
        assert!(limiter
            .take("a", 5, t0 + Duration::from_millis(200))
            .is_ok());
        assert!(limiter
            .take("a", 5, t0 + Duration::from_millis(200))
            .is_err());
        assert!(limiter.take("a", 0, t0).is_ok(), "0 = off");
    }

    #[test]
    fn backoff_only_grows() {
        let b = UpstreamBackoff::default();
        let t0 = Instant::now();
        assert_eq!(b.remaining(t0), None);
        b.hold(t0, Duration::from_secs(30));
        b.hold(t0, Duration::from_secs(10));
        assert_eq!(
            b.remaining(t0 + Duration::from_secs(5)),
            Some(Duration::from_secs(25))
        );
        assert_eq!(b.remaining(t0 + Duration::from_secs(30)), None);
    }

    #[test]
    fn retry_after_dates_are_judged_on_the_response_clock() {
        let mut h = http::HeaderMap::new();
        h.insert("date", "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap());
        h.insert(
            "retry-after",
            "Sun, 06 Nov 1994 08:50:07 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), Some(Duration::from_secs(30)));
        h.insert("retry-after", "12".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(12)));
    }

    #[test]
    fn auth_failure_records_are_rated_per_source_and_counted() {
        let r = AuthRecords::default();
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let written = (0..100)
            .filter(|_| r.decide(a, t0) == RecordDecision::Write)
            .count();
        assert_eq!(written, RECORD_BURST as usize);
        assert_eq!(r.decide(b, t0), RecordDecision::Write, "per source");
        let drained = r.drain(t0);
        assert_eq!(drained.len(), 1);
        assert_eq!((drained[0].0, drained[0].1), (Some(a), 80));
        assert!(r.drain(t0).is_empty(), "counted once");
    }
}
