//! Rate limiters: how many sends a channel (or a channel and one recipient) may make now.
//!
//! Every limiter here is a GCRA (generic cell rate algorithm): per key it keeps one instant, the
//! theoretical arrival time, so a key costs one number whatever its rate. Permits are taken in
//! batches (`acquire(key, rate, want)` grants up to `want`) because the dispatcher claims as many
//! jobs as it was granted permits, and it hands back (`refund`) the ones it found no job for.
//!
//! Architecture invariant: a limiter never admits more than its rate. When the shared state
//! (Redis) cannot be reached, the fail-safe limiter falls back to a local limiter with a
//! conservative share of the rate: it fails safe (slower), never open.
//!
//! - [`LocalLimiter`] (`local.rs`): in-process, one `governor` GCRA limiter per key.
//! - [`RedisLimiter`] (`redis.rs`): shared by every process through an atomic Lua script on
//!   Redis's clock; its methods return errors instead of deciding what an outage means.
//! - [`FailSafeLimiter`] (`failsafe.rs`): the production [`Limiter`]: Redis, and while Redis is
//!   unreachable a local limiter at `fallback_fraction / live_processes` of each rate, announced
//!   on a [`FallbackBoard`] (the job store) so that the processes still on Redis leave it free.

use std::time::Duration;

use async_trait::async_trait;

mod error;
mod failsafe;
mod local;
mod redis;

pub use error::LimitError;
pub use failsafe::{FailSafeConfig, FailSafeLimiter, FallbackBoard, Fallbacks};
pub use local::LocalLimiter;
pub use redis::{RedisLimiter, RedisLimiterConfig};

/// A rate limit: `per_second` permits a second on average, and at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Permits a second on average: the channel's throughput, or 1/6 for a pair rate. A value that
    /// is not a positive finite number is not a rate: limiters grant nothing under it.
    pub per_second: f64,
    /// Permits that may be taken at once after an idle spell (the bucket's size). Zero is taken
    /// as one, the smallest burst under which anything can be sent.
    pub burst: u32,
}

impl Rate {
    /// `part` of the rate, its burst scaled likewise (at least one permit): a process's share
    /// of it while Redis is unreachable.
    pub(crate) fn scaled(self, part: f64) -> Rate {
        let burst = (f64::from(self.burst.max(1)) * part).floor();
        Rate {
            per_second: self.per_second * part,
            // `as` saturates; the product is at most `burst`.
            burst: (burst as u32).max(1),
        }
    }
}

/// What `acquire` granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Permits taken, at most the number asked for.
    pub granted: u32,
    /// How long until the next permit is free (zero when one is free now).
    pub next_in: Duration,
}

/// Where a limiter keeps its state right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimiterMode {
    /// This process only.
    Local,
    /// Shared by every process through Redis.
    Redis,
    /// Redis is unreachable: a local limiter with a conservative share of each rate.
    Fallback,
}

/// A limiter's counters, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimiterStatus {
    /// Where the limiter keeps its state now, so operators see when limits are only local.
    pub mode: LimiterMode,
    /// Times the limiter fell back from Redis to local.
    pub fallbacks: u64,
    /// Redis calls that failed or timed out.
    pub redis_errors: u64,
    /// The share of every shared rate left free for processes that lost Redis and announced
    /// their fallback shares (0 when none did, or when this process is not on Redis).
    pub reserved_for_fallbacks: f64,
    /// The part of every rate this process takes locally while in fallback (1 in any other
    /// mode), so that a caller keeping limits of its own in fallback can take the same share.
    pub fallback_share: f64,
}

/// A rate limiter keyed by string (a channel, or a channel and one recipient), shared by the
/// dispatcher's tasks.
#[async_trait]
pub trait Limiter: Send + Sync + 'static {
    /// Takes up to `want` permits of `key` under `rate`, never more than the rate allows.
    /// Never fails: a limiter that cannot decide grants nothing.
    async fn acquire(&self, key: &str, rate: Rate, want: u32) -> Grant;

    /// [`Limiter::acquire`] for several keys at once, the grants in the order of `asks`. A
    /// limiter whose state is remote takes them in one round trip; by default they are taken
    /// one after another.
    async fn acquire_many(&self, asks: &[(&str, Rate, u32)]) -> Vec<Grant> {
        let mut grants = Vec::with_capacity(asks.len());
        for (key, rate, want) in asks {
            grants.push(self.acquire(key, *rate, *want).await);
        }
        grants
    }

    /// Hands back `n` permits taken by `acquire` but not used.
    ///
    /// Call it right after the `acquire` whose permits went unused (in the same dispatch round):
    /// a refund moves the key's arrival time back by `n` emission intervals (never below now), so
    /// one that comes after the key has gone idle and been taken again can credit up to `n`
    /// permits that were never really outstanding. Refunding is optional: dropping it only
    /// grants less.
    async fn refund(&self, key: &str, rate: Rate, n: u32);

    /// The process stops using this limiter (graceful shutdown): gives up what it holds in
    /// state shared with other processes. Nothing by default.
    async fn leave(&self) {}

    /// The limiter's mode and counters, for logs and metrics.
    fn status(&self) -> LimiterStatus;
}

/// The largest emission interval, or bucket span (`burst` intervals), a rate may have: about 36
/// years in nanoseconds. Anything slower is not a rate this engine needs, and bounding it keeps
/// every product of intervals in a `u64`.
const MAX_SPAN_NS: u128 = 1 << 60;

/// A [`Rate`] checked and turned into GCRA terms: the emission interval `T` (time one permit is
/// worth) and the burst. `T` is rounded up, so the limiters' rate is never above the one asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gcra {
    /// Emission interval in nanoseconds, at least 1.
    pub(crate) t_ns: u64,
    /// Burst, at least 1.
    pub(crate) burst: u32,
}

impl Gcra {
    /// `None` when `rate` is not a usable rate (not positive, not finite, or so slow that its
    /// bucket spans decades): the limiters then grant nothing.
    pub(crate) fn from_rate(rate: Rate) -> Option<Gcra> {
        let per_second = rate.per_second;
        if !per_second.is_finite() || per_second <= 0.0 {
            return None;
        }
        let t = (1e9 / per_second).ceil();
        if !t.is_finite() || t > MAX_SPAN_NS as f64 {
            return None;
        }
        // `as` saturates and `t` is at most 2^60, so this is exact enough and never wraps.
        let t_ns = (t as u64).max(1);
        let burst = rate.burst.max(1);
        if u128::from(t_ns) * u128::from(burst) > MAX_SPAN_NS {
            return None;
        }
        Some(Gcra { t_ns, burst })
    }

    /// Emission interval in whole microseconds (Redis's clock resolution), rounded up: rates
    /// above one million a second are capped there.
    pub(crate) fn t_us(self) -> u64 {
        self.t_ns.div_ceil(1_000).max(1)
    }

    /// Tolerance `tau = T * (burst - 1)`: how far ahead of now the arrival time may run.
    pub(crate) fn tau_ns(self) -> u64 {
        self.t_ns * u64::from(self.burst - 1)
    }
}

/// How long a caller is told to wait when its rate is not a usable rate: long enough not to
/// spin, short enough to notice a corrected rate soon.
pub(crate) const INVALID_RATE_RETRY: Duration = Duration::from_secs(1);

/// What every limiter grants under a rate that is not usable: nothing.
pub(crate) fn invalid_rate_grant() -> Grant {
    Grant {
        granted: 0,
        next_in: INVALID_RATE_RETRY,
    }
}
