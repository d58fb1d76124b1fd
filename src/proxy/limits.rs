//! Request limits in front of Confluence: a token bucket per client_id
//! (`limits.per_client_rps`), and the site-wide back-off after Confluence answers
//! 429/503 with `Retry-After` (`limits.upstream_backoff`): all clients share one
//! admin account and its rate limit, so keygate stops spending it until then.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Buckets idle this long are forgotten (they would be full again anyway).
const IDLE: Duration = Duration::from_secs(60);

struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// Takes a token for `client_id` at `rps` per second (burst: one second's
    /// worth); `Err` is how long until the next token.
    pub fn take(&self, client_id: &str, rps: u32, now: Instant) -> Result<(), Duration> {
        if rps == 0 {
            return Ok(());
        }
        let rate = f64::from(rps);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > 10_000 {
            buckets.retain(|_, b| now.duration_since(b.last) < IDLE);
        }
        let bucket = buckets.entry(client_id.to_owned()).or_insert(Bucket {
            tokens: rate,
            last: now,
        });
        let refill = now.duration_since(bucket.last).as_secs_f64() * rate;
        bucket.tokens = (bucket.tokens + refill).min(rate);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
        }
    }
}

/// Until when Confluence asked everyone to wait.
#[derive(Default)]
pub struct UpstreamBackoff {
    until: Mutex<Option<Instant>>,
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
}
