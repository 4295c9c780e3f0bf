//! Retry delays: exponential backoff with jitter, one policy per job kind.

use std::time::Duration;

/// How long to wait before attempt `n + 1` after attempt `n` failed.
///
/// `delay(n) = min(base * factor^(n-1), max)`, then spread by `± jitter` (a fraction) so that
/// jobs that failed together (a Meta outage) do not come back together.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay after the first failed attempt.
    pub base: Duration,
    /// Growth per attempt.
    pub factor: f64,
    /// Ceiling before jitter.
    pub max: Duration,
    /// Fraction of the delay added or removed at random, 0.0 to 1.0.
    pub jitter: f64,
}

impl Default for Backoff {
    /// 1 s, 2 s, 4 s … capped at 1 h, ±20 %: twenty attempts span about a day.
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            factor: 2.0,
            max: Duration::from_secs(3600),
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// The delay before the next attempt, after `attempt` (1-based) failed. `unit` is a number in
    /// [0, 1) that picks the jitter; pass `fastrand::f64()`.
    pub fn delay_with(&self, attempt: i32, unit: f64) -> Duration {
        let exp = attempt.saturating_sub(1).clamp(0, 64);
        let raw = self.base.as_secs_f64() * self.factor.max(1.0).powi(exp);
        let capped = raw.min(self.max.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0);
        let spread = capped * jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        Duration::from_secs_f64((capped + spread).max(0.0))
    }

    pub fn delay(&self, attempt: i32) -> Duration {
        self.delay_with(attempt, fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_and_caps() {
        let b = Backoff {
            jitter: 0.0,
            ..Backoff::default()
        };
        assert_eq!(b.delay(1), Duration::from_secs(1));
        assert_eq!(b.delay(2), Duration::from_secs(2));
        assert_eq!(b.delay(5), Duration::from_secs(16));
        assert_eq!(b.delay(30), Duration::from_secs(3600));
        assert_eq!(b.delay(i32::MAX), Duration::from_secs(3600));
        assert_eq!(b.delay(0), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let b = Backoff::default();
        for attempt in 1..15 {
            let centre = Backoff { jitter: 0.0, ..b }.delay(attempt).as_secs_f64();
            for _ in 0..200 {
                let d = b.delay(attempt).as_secs_f64();
                assert!(
                    d >= centre * 0.8 - 1e-9 && d <= centre * 1.2 + 1e-9,
                    "{d} vs {centre}"
                );
            }
            assert!(
                b.delay_with(attempt, 0.0).as_secs_f64()
                    < b.delay_with(attempt, 0.99).as_secs_f64()
            );
        }
    }
}
