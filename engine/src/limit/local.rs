//! `LocalLimiter`: rate limits kept in this process, one `governor` GCRA limiter per key.
//!
//! Each key has a direct governor limiter (`Quota::with_period(T).allow_burst(burst)`) whose
//! state store is [`SharedTat`]: governor's own single-atomic representation of the theoretical
//! arrival time (TAT), but shared with this module so that it can also read the TAT (to tell when
//! a key is idle, and how long until the next permit), move it back (`refund`) and carry it over
//! when a key's rate changes. Governor's `InMemoryState` keeps it private.
//!
//! Keys live in a sharded map. Every [`SWEEP_EVERY`] acquires that land in a shard, the shard
//! drops the keys whose bucket is full again: such a key is indistinguishable from a key never
//! seen, so dropping it changes no decision and idle keys (pair-rate keys, one per recipient)
//! cannot grow memory without bound.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::num::{NonZeroU32, NonZeroU64};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{NotKeyed, StateStore};
use governor::{Quota, RateLimiter};

use super::{invalid_rate_grant, Gcra, Grant, Limiter, LimiterMode, LimiterStatus, Rate};

/// Shards of the key map: enough that two dispatch tasks rarely wait for the same lock, and that
/// a sweep holds one lock over a sixteenth of the keys only.
const SHARDS: usize = 16;

/// A shard drops its idle keys once every this many acquires that land in it: rare enough that
/// the sweep (a few nanoseconds a key) costs little per acquire, often enough that a shard holds
/// little more than the keys used recently.
pub(crate) const SWEEP_EVERY: u64 = 1024;

/// How far in the future the TAT is set, once, when a key's limiter is made, to learn the
/// instant governor counts from (see [`Entry::new`]). About 36 years: no check made right after
/// can conform, and adding it to any clock reading cannot overflow.
const PROBE_NS: u64 = 1 << 60;

/// One key's GCRA state: the TAT in nanoseconds since the key's limiter was made, zero meaning
/// "never used" (a full bucket), as in governor's `InMemoryState`. Compare-and-swap loop as there.
#[derive(Debug)]
struct SharedTat(Arc<AtomicU64>);

impl StateStore for SharedTat {
    type Key = NotKeyed;

    fn measure_and_replace<T, F, E>(&self, _key: &NotKeyed, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut prev = self.0.load(Ordering::Acquire);
        loop {
            let (result, next) = f(NonZeroU64::new(prev).map(|n| Nanos::from(n.get())))?;
            match self.0.compare_exchange_weak(
                prev,
                next.as_u64(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(result),
                Err(actual) => prev = actual,
            }
        }
    }
}

type KeyLimiter<C> = RateLimiter<NotKeyed, SharedTat, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// One key: its governor limiter, the rate it was made for, and its TAT.
struct Entry<C: Clock> {
    gcra: Gcra,
    limiter: KeyLimiter<C>,
    tat: Arc<AtomicU64>,
    /// The instant governor measures the TAT from (its private `start`).
    start: C::Instant,
}

impl<C: Clock + Clone> Entry<C> {
    /// A limiter for `gcra` whose bucket is `debt_ns` short of full (zero: full).
    ///
    /// Governor keeps the instant its TATs count from private, and this module needs it to
    /// compare a TAT with now. So the new limiter is asked once, before anyone else sees it, to
    /// admit a cell while its TAT is [`PROBE_NS`] ahead: governor refuses, and the refusal's
    /// `earliest_possible()` is that start plus `PROBE_NS`. Exact with any clock, fake or real.
    fn new(gcra: Gcra, clock: &C, debt_ns: u64) -> Option<Self> {
        let burst = NonZeroU32::new(gcra.burst)?;
        let quota = Quota::with_period(Duration::from_nanos(gcra.t_ns))?.allow_burst(burst);
        let tat = Arc::new(AtomicU64::new(PROBE_NS + gcra.tau_ns()));
        let limiter: KeyLimiter<C> =
            RateLimiter::new(quota, SharedTat(Arc::clone(&tat)), clock.clone());
        let start = match limiter.check() {
            Err(refused) => {
                Reference::saturating_sub(&refused.earliest_possible(), Nanos::from(PROBE_NS))
            }
            // Only if the clock leapt decades between two readings. A later start than
            // governor's only makes idle keys look busier (kept longer) and refunds smaller.
            Ok(()) => limiter.clock().now(),
        };
        let entry = Entry {
            gcra,
            limiter,
            tat,
            start,
        };
        let initial = if debt_ns == 0 {
            0
        } else {
            entry.now_rel(entry.now()).saturating_add(debt_ns)
        };
        entry.tat.store(initial, Ordering::Release);
        Some(entry)
    }

    fn now(&self) -> C::Instant {
        self.limiter.clock().now()
    }

    /// Nanoseconds from this key's start to `now`, the unit of its TAT.
    fn now_rel(&self, now: C::Instant) -> u64 {
        now.duration_since(self.start).as_u64()
    }

    /// How far the TAT runs ahead of `now_rel`: the time until the bucket is full again.
    fn debt(&self, now_rel: u64) -> u64 {
        self.tat.load(Ordering::Acquire).saturating_sub(now_rel)
    }

    /// Whether the bucket is full, so that forgetting the key changes nothing.
    fn replenished(&self, now_rel: u64) -> bool {
        self.tat.load(Ordering::Acquire) <= now_rel
    }

    /// Time until one more permit conforms (a cell conforms once now >= TAT - tau).
    fn wait(&self, now_rel: u64) -> Duration {
        let tat = self.tat.load(Ordering::Acquire);
        Duration::from_nanos(
            tat.saturating_sub(self.gcra.tau_ns())
                .saturating_sub(now_rel),
        )
    }

    /// Takes up to `want` permits with governor's `check_n`: the whole batch at once when it
    /// fits (the usual case, one clock reading), otherwise the refusal says how long until the
    /// batch would fit, hence how many fit now, and that many are asked for; a refusal of a
    /// single cell ends it with governor's own wait time.
    fn take(&self, want: u32) -> Grant {
        let mut granted = 0u32;
        let mut try_n = want.min(self.gcra.burst);
        while granted < want && try_n > 0 {
            let n = try_n.min(want - granted);
            let Some(cells) = NonZeroU32::new(n) else {
                break;
            };
            match self.limiter.check_n(cells) {
                Ok(Ok(())) => granted += n,
                Ok(Err(refused)) => {
                    let wait = refused.wait_time_from(self.now());
                    if n == 1 {
                        return Grant {
                            granted,
                            next_in: wait,
                        };
                    }
                    // The batch conforms `wait` from now; each interval T earlier, one cell
                    // fewer does. The estimate only has to shrink the batch: a refusal again
                    // shrinks it further.
                    let wait_ns = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
                    let short = wait_ns.div_ceil(self.gcra.t_ns);
                    let fit = u64::from(n).saturating_sub(short);
                    try_n = u32::try_from(fit).unwrap_or(n).clamp(1, n - 1);
                }
                // n <= burst, so governor never says the batch can never fit; be safe anyway.
                Err(_) => try_n = n - 1,
            }
        }
        Grant {
            granted,
            next_in: self.wait(self.now_rel(self.now())),
        }
    }

    /// Moves the TAT back by `n` intervals, never below now (a full bucket).
    fn refund(&self, n: u32) {
        let step = self.gcra.t_ns.saturating_mul(u64::from(n));
        let now_rel = self.now_rel(self.now());
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                (tat > now_rel).then(|| tat.saturating_sub(step).max(now_rel))
            });
    }
}

/// One shard of the key map, with the count of acquires that decides when it is swept.
struct Shard<C: Clock> {
    map: RwLock<HashMap<Box<str>, Entry<C>>>,
    acquires: AtomicU64,
}

/// An in-process rate limiter: one governor GCRA limiter per key.
///
/// Cheap enough for the dispatch path (a hash, a read lock, and usually one governor
/// `check_n`). Generic over governor's clock so that tests drive it with
/// `governor::clock::FakeRelativeClock`; [`LocalLimiter::new`] uses the real clock.
///
/// `refund` is exact as long as it follows the `acquire` it undoes (see [`Limiter::refund`]).
/// When a key's rate changes its limiter is made anew, carrying over the permits still
/// outstanding (the TAT's lead over now, rescaled to the new interval), so a rate change never
/// hands out a fresh burst.
pub struct LocalLimiter<C: Clock = DefaultClock> {
    clock: C,
    shards: Box<[Shard<C>]>,
    hasher: RandomState,
    start_empty: bool,
}

impl LocalLimiter<DefaultClock> {
    /// A local limiter on the real clock, new keys starting with a full bucket.
    pub fn new() -> Self {
        Self::with_clock(DefaultClock::default())
    }
}

impl Default for LocalLimiter<DefaultClock> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> LocalLimiter<C>
where
    C: Clock + Clone + Send + Sync + 'static,
{
    /// A local limiter on `clock` (a `FakeRelativeClock` in tests), new keys starting with a
    /// full bucket.
    pub fn with_clock(clock: C) -> Self {
        let shards = (0..SHARDS)
            .map(|_| Shard {
                map: RwLock::new(HashMap::new()),
                acquires: AtomicU64::new(0),
            })
            .collect();
        LocalLimiter {
            clock,
            shards,
            hasher: RandomState::new(),
            start_empty: false,
        }
    }

    /// Makes keys start with an empty bucket instead of a full one: their first permit comes
    /// one interval after first use, and none comes in a burst. The fail-safe limiter uses this
    /// when it falls back, because it cannot know how much of the burst the other processes
    /// took from Redis just before.
    pub fn starting_empty(mut self) -> Self {
        self.start_empty = true;
        self
    }

    /// Takes up to `want` permits of `key` under `rate` now. The synchronous core of
    /// [`Limiter::acquire`], for callers that are not async.
    pub fn acquire_now(&self, key: &str, rate: Rate, want: u32) -> Grant {
        let Some(gcra) = Gcra::from_rate(rate) else {
            return invalid_rate_grant();
        };
        let shard = self.shard(key);
        let count = shard.acquires.fetch_add(1, Ordering::Relaxed) + 1;
        if count % SWEEP_EVERY == 0 {
            Self::sweep(shard);
        }
        self.with_entry(shard, key, gcra, |entry| entry.take(want))
            .unwrap_or_else(invalid_rate_grant)
    }

    /// Hands back `n` permits of `key`. The synchronous core of [`Limiter::refund`]. A key this
    /// limiter does not hold (never used, or idle and dropped) has nothing outstanding.
    pub fn refund_now(&self, key: &str, rate: Rate, n: u32) {
        let _ = rate;
        let map = self
            .shard(key)
            .map
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = map.get(key) {
            entry.refund(n);
        }
    }

    /// Number of keys held, for metrics and to check that idle keys are dropped.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.map.read().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every key whose bucket is full again, in every shard, now rather than at the next
    /// periodic sweep. Returns how many were dropped.
    pub fn prune(&self) -> usize {
        self.shards.iter().map(Self::sweep).sum()
    }

    /// Forgets every key. The fail-safe limiter does this when it falls back to local limits,
    /// so that every key starts that period afresh (empty, with [`Self::starting_empty`]).
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            let mut map = shard.map.write().unwrap_or_else(PoisonError::into_inner);
            map.clear();
            map.shrink_to_fit();
        }
    }

    fn shard(&self, key: &str) -> &Shard<C> {
        // The high bits: the map inside the shard uses its own hasher, so no correlation.
        let hash = self.hasher.hash_one(key);
        &self.shards[(hash >> 59) as usize % SHARDS]
    }

    /// Runs `f` on `key`'s entry for `gcra`, making it (or remaking it for a new rate) first.
    /// `None` only when governor rejects the quota, which `Gcra::from_rate` already excludes.
    fn with_entry<R>(
        &self,
        shard: &Shard<C>,
        key: &str,
        gcra: Gcra,
        f: impl FnOnce(&Entry<C>) -> R,
    ) -> Option<R> {
        {
            let map = shard.map.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = map.get(key).filter(|e| e.gcra == gcra) {
                return Some(f(entry));
            }
        }
        let mut map = shard.map.write().unwrap_or_else(PoisonError::into_inner);
        let debt_ns = match map.get(key) {
            Some(entry) if entry.gcra == gcra => return Some(f(entry)),
            Some(old) => rescale_debt(old.debt(old.now_rel(old.now())), old.gcra, gcra),
            None if self.start_empty => gcra.tau_ns().saturating_add(gcra.t_ns),
            None => 0,
        };
        let entry = Entry::new(gcra, &self.clock, debt_ns)?;
        let entry = match map.get_mut(key) {
            Some(slot) => {
                *slot = entry;
                slot
            }
            None => map.entry(Box::from(key)).or_insert(entry),
        };
        Some(f(entry))
    }

    /// Drops the shard's keys whose bucket is full; returns how many. One clock reading for the
    /// whole shard.
    fn sweep(shard: &Shard<C>) -> usize {
        let mut map = shard.map.write().unwrap_or_else(PoisonError::into_inner);
        let Some(now) = map.values().next().map(Entry::now) else {
            return 0;
        };
        let before = map.len();
        map.retain(|_, entry| !entry.replenished(entry.now_rel(now)));
        let after = map.len();
        if map.capacity() > 64 && after * 4 < map.capacity() {
            map.shrink_to(after * 2);
        }
        before - after
    }
}

/// The outstanding permits of a key whose rate changes, as time under the new interval:
/// `debt * T_new / T_old`, rounded up, so permits taken just before a rate cut still count.
fn rescale_debt(debt_ns: u64, old: Gcra, new: Gcra) -> u64 {
    if debt_ns == 0 {
        return 0;
    }
    let scaled = (u128::from(debt_ns) * u128::from(new.t_ns)).div_ceil(u128::from(old.t_ns));
    u64::try_from(scaled).unwrap_or(u64::MAX).min(PROBE_NS)
}

impl<C: Clock> fmt::Debug for LocalLimiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalLimiter")
            .field("start_empty", &self.start_empty)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<C> Limiter for LocalLimiter<C>
where
    C: Clock + Clone + Send + Sync + 'static,
{
    async fn acquire(&self, key: &str, rate: Rate, want: u32) -> Grant {
        self.acquire_now(key, rate, want)
    }

    async fn refund(&self, key: &str, rate: Rate, n: u32) {
        self.refund_now(key, rate, n)
    }

    fn status(&self) -> LimiterStatus {
        LimiterStatus {
            mode: LimiterMode::Local,
            fallbacks: 0,
            redis_errors: 0,
            reserved_for_fallbacks: 0.0,
            fallback_share: 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn rate(per_second: f64, burst: u32) -> Rate {
        Rate { per_second, burst }
    }

    #[test]
    fn burst_then_one_per_interval() {
        let clock = FakeRelativeClock::default();
        let lim = LocalLimiter::with_clock(clock.clone());
        let r = rate(10.0, 5);
        let g = lim.acquire_now("k", r, 8);
        assert_eq!(g.granted, 5);
        assert_eq!(g.next_in, Duration::from_millis(100));
        clock.advance(Duration::from_millis(99));
        let g = lim.acquire_now("k", r, 1);
        assert_eq!((g.granted, g.next_in), (0, Duration::from_millis(1)));
        clock.advance(Duration::from_millis(1));
        let g = lim.acquire_now("k", r, 3);
        assert_eq!((g.granted, g.next_in), (1, Duration::from_millis(100)));
        clock.advance(Duration::from_millis(250));
        let g = lim.acquire_now("k", r, 3);
        assert_eq!((g.granted, g.next_in), (2, Duration::from_millis(50)));
    }

    #[test]
    fn next_in_is_zero_while_a_permit_is_free() {
        let lim = LocalLimiter::with_clock(FakeRelativeClock::default());
        let g = lim.acquire_now("k", rate(1.0, 3), 2);
        assert_eq!((g.granted, g.next_in), (2, Duration::ZERO));
        let g = lim.acquire_now("k", rate(1.0, 3), 0);
        assert_eq!((g.granted, g.next_in), (0, Duration::ZERO));
    }

    #[test]
    fn invalid_rates_grant_nothing() {
        let lim = LocalLimiter::with_clock(FakeRelativeClock::default());
        for ps in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-30] {
            assert_eq!(lim.acquire_now("k", rate(ps, 5), 5).granted, 0, "{ps}");
        }
        // Burst zero counts as one.
        assert_eq!(lim.acquire_now("z", rate(1.0, 0), 5).granted, 1);
    }

    #[test]
    fn refund_gives_permits_back_but_never_beyond_a_full_bucket() {
        let clock = FakeRelativeClock::default();
        let lim = LocalLimiter::with_clock(clock.clone());
        let r = rate(100.0, 10);
        assert_eq!(lim.acquire_now("k", r, 10).granted, 10);
        lim.refund_now("k", r, 4);
        assert_eq!(lim.acquire_now("k", r, 10).granted, 4);
        lim.refund_now("k", r, 100);
        assert_eq!(lim.acquire_now("k", r, 100).granted, 10);
        lim.refund_now("unknown", r, 3);
        assert!(lim.acquire_now("unknown", r, 100).granted <= 10);
    }

    #[test]
    fn idle_keys_are_pruned() {
        let clock = FakeRelativeClock::default();
        let lim = LocalLimiter::with_clock(clock.clone());
        let r = rate(1000.0, 10);
        for i in 0..10_000 {
            lim.acquire_now(&format!("pair:{i}"), r, 1);
        }
        assert_eq!(lim.len(), 10_000);
        clock.advance(Duration::from_millis(5));
        // Nothing is replenished 5 ms after its last permit at 1000/s with burst 10? A single
        // permit is repaid after one interval (1 ms), so all of them are.
        assert_eq!(lim.prune(), 10_000);
        assert!(lim.is_empty());
        // The periodic sweep does it without being asked: 20,000 keys go idle, then 40,000 new
        // ones (about 2,500 acquires a shard, so every shard sweeps at least once) are kept
        // because their buckets are not full yet, and the idle ones are gone.
        for i in 0..20_000 {
            lim.acquire_now(&format!("a:{i}"), r, 1);
        }
        clock.advance(Duration::from_millis(5));
        for i in 0..40_000 {
            lim.acquire_now(&format!("c:{i}"), r, 1);
        }
        assert_eq!(lim.len(), 40_000);
    }

    #[test]
    fn busy_keys_are_kept() {
        let clock = FakeRelativeClock::default();
        let lim = LocalLimiter::with_clock(clock.clone());
        let r = rate(1.0, 10);
        assert_eq!(lim.acquire_now("k", r, 10).granted, 10);
        clock.advance(Duration::from_secs(5));
        assert_eq!(lim.prune(), 0);
        // Had the key been dropped, a fresh bucket would grant 10.
        assert_eq!(lim.acquire_now("k", r, 10).granted, 5);
    }

    #[test]
    fn rate_change_carries_outstanding_permits() {
        let clock = FakeRelativeClock::default();
        let lim = LocalLimiter::with_clock(clock.clone());
        assert_eq!(lim.acquire_now("k", rate(100.0, 10), 10).granted, 10);
        // Halving the rate: the 10 permits taken just now are still outstanding, and now cost
        // 20 ms each, so nothing is free for 20 ms.
        let g = lim.acquire_now("k", rate(50.0, 10), 10);
        assert_eq!((g.granted, g.next_in), (0, Duration::from_millis(20)));
        clock.advance(Duration::from_millis(20));
        assert_eq!(lim.acquire_now("k", rate(50.0, 10), 10).granted, 1);
    }

    #[test]
    fn starting_empty_grants_nothing_at_first() {
        let clock = FakeRelativeClock::default();
        let lim = LocalLimiter::with_clock(clock.clone()).starting_empty();
        let g = lim.acquire_now("k", rate(10.0, 5), 5);
        assert_eq!((g.granted, g.next_in), (0, Duration::from_millis(100)));
        clock.advance(Duration::from_millis(250));
        assert_eq!(lim.acquire_now("k", rate(10.0, 5), 5).granted, 2);
    }

    #[test]
    fn real_clock_works() {
        let lim = LocalLimiter::new();
        assert_eq!(lim.acquire_now("k", rate(1.0, 3), 5).granted, 3);
    }
}
