//! Exponential back-off with jitter for admin-key calls, honouring `Retry-After`.

use std::time::Duration;

use rand::Rng as _;
use tokio::time::Instant;

/// Transient failures (429, 5xx, timeouts) start small; a rejected credential or
/// "not allowed" needs a human, so those retry rarely — on demand, never in a loop.
const TRANSIENT: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));
const FATAL: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(300));
/// A `Retry-After` beyond this is taken as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

#[derive(Debug, Default, Clone)]
pub(super) struct Backoff {
    until: Option<Instant>,
    failures: u32,
}

impl Backoff {
    pub(super) fn active(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| u > now)
    }

    /// Holds calls back until at least `until` (a back-off another replica saw).
    pub(super) fn hold_until(&mut self, until: Instant) {
        if self.until.is_none_or(|u| u < until) {
            self.until = Some(until);
        }
    }

    pub(super) fn reset(&mut self) {
        *self = Backoff::default();
    }

    /// Records a failure at `now` and returns how long to wait.
    pub(super) fn fail(
        &mut self,
        now: Instant,
        fatal: bool,
        retry_after: Option<Duration>,
    ) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let delay = delay(
            self.failures,
            fatal,
            retry_after,
            rand::thread_rng().gen_range(0.8..1.2),
        );
        self.until = Some(now + delay);
        delay
    }
}

/// The wait after the `failures`-th failure in a row, `jitter` in 0.8..1.2.
fn delay(failures: u32, fatal: bool, retry_after: Option<Duration>, jitter: f64) -> Duration {
    let (base, cap) = if fatal { FATAL } else { TRANSIENT };
    let exponent = failures.saturating_sub(1).min(16);
    let exponential = base.saturating_mul(1 << exponent).min(cap).mul_f64(jitter);
    exponential.max(retry_after.unwrap_or(Duration::ZERO).min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_cap_and_honour_retry_after() {
        let s = Duration::from_secs;
        let cases: &[(u32, bool, Option<Duration>, f64, Duration)] = &[
            (1, false, None, 1.0, s(1)),
            (2, false, None, 1.0, s(2)),
            (5, false, None, 1.0, s(16)),
            (10, false, None, 1.0, s(60)),
            (40, false, None, 1.0, s(60)),
            (1, false, Some(s(30)), 1.0, s(30)),
            (1, false, Some(s(30)), 1.2, s(30)),
            (7, false, Some(s(5)), 1.0, s(60)),
            (1, false, Some(s(99_999)), 1.0, s(3600)),
            (1, true, None, 1.0, s(30)),
            (3, true, None, 1.0, s(120)),
            (9, true, None, 1.0, s(300)),
            (1, false, None, 0.8, Duration::from_millis(800)),
            (1, false, None, 1.2, Duration::from_millis(1200)),
        ];
        for (failures, fatal, retry_after, jitter, want) in cases {
            assert_eq!(
                delay(*failures, *fatal, *retry_after, *jitter),
                *want,
                "{failures} {fatal} {retry_after:?} {jitter}"
            );
        }
    }
}
