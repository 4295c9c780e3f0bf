//! `FailSafeLimiter`: the shared Redis limiter, falling back to a local limiter at a
//! conservative share of each rate while Redis cannot be reached.
//!
//! Every instance registers its process in Redis (a sorted set scored by Redis's clock,
//! refreshed every `heartbeat_interval`), so that it knows how many processes share each rate.
//! When a Redis call fails or times out it switches to [`LimiterMode::Fallback`] (one warning,
//! counted in [`LimiterStatus::fallbacks`]) and serves every rate from a local limiter at
//! `per_second * fallback_fraction / live_processes`, burst scaled likewise (at least 1), keys
//! starting with an empty bucket: the other processes may have taken the whole burst from Redis
//! just before. It probes Redis every `probe_interval` and returns to Redis mode when it answers.
//!
//! When only some processes lose Redis (a partition), the others still take the rate from
//! Redis. So a process in fallback announces its share on the *fallback board* (the job store,
//! which it still reaches: [`FallbackBoard`]), renewed at every probe and valid for
//! `process_ttl`. The processes on Redis read the board at every heartbeat and take only
//! `rate * (1 - announced shares)` from Redis. A reading is trusted for [`trust`] from the
//! moment it started (`heartbeat_interval + call_timeout + 2 * board_timeout`, more than a
//! heartbeat round takes); a process whose last reading is older, or that never read the board,
//! leaves `fallback_fraction` more free. A process in fallback grants nothing until [`hold`]
//! (`trust` and one Redis call) after its announcement was stored, so that every process on
//! Redis has read it or distrusts its older reading, and no Redis call decided at the old rate
//! is still under way; it stops granting when the announcement may have expired
//! (`process_ttl` after it sent it) without a renewal, and holds again after a renewal that
//! came too late. Processes in fallback also count in the number the shares are divided by
//! (the board says how many there are, also to a process before its first announcement), so
//! that processes losing Redis one after another do not take more than `fallback_fraction`
//! together. Sends pause for the hold at every fallback (2.5 s with the defaults), also when
//! all processes lose Redis at once, and fallback needs the database: a short pause is the
//! price of never exceeding a rate.
//!
//! It fails safe, never open: when unsure it grants less. Three cases it cannot see are
//! bounded, not excluded: processes that start while Redis is down are not counted (set
//! `min_processes` to the deployment's size to cover it); on the way back to Redis a key's
//! shared state may have expired during the outage, so each process's last fallback grants are
//! not charged to it (at most the fallback burst plus what the fallback granted in the last
//! bucket span); and every share's burst is at least one permit, so with many processes in
//! fallback on a rate whose burst is smaller than their number, a window may hold one permit
//! more per process in fallback. Without a board ([`FailSafeLimiter::connect`] with `None`, for
//! tests of the limiter alone) a partition is not covered: together the processes may exceed
//! the rate by the fallbacks' shares (`fallback_fraction / processes` each) for as long as it
//! lasts. On SQLite the board's expiry is by the wall clock (processes share it only on one
//! machine); a step of the clock by more than the hold can end an announcement early.
//!
//! [`hold`]: FailSafeConfig::hold
//! [`trust`]: FailSafeConfig::trust

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::Client;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::local::LocalLimiter;
use super::redis::{
    connect_manager, open_client, RedisLimiter, RedisLimiterConfig, DEFAULT_CALL_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_KEY_PREFIX,
};
use super::{Grant, LimitError, Limiter, LimiterMode, LimiterStatus, Rate};

/// Default [`FailSafeConfig::fallback_fraction`].
pub(crate) const DEFAULT_FALLBACK_FRACTION: f64 = 0.5;
/// Default [`FailSafeConfig::probe_interval`].
pub(crate) const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Default [`FailSafeConfig::heartbeat_interval`].
pub(crate) const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Default [`FailSafeConfig::process_ttl`].
pub(crate) const DEFAULT_PROCESS_TTL: Duration = Duration::from_secs(5);
/// Default [`FailSafeConfig::board_timeout`].
pub(crate) const DEFAULT_BOARD_TIMEOUT: Duration = Duration::from_millis(500);
/// Default [`FailSafeConfig::refund_grace`].
pub(crate) const DEFAULT_REFUND_GRACE: Duration = Duration::from_secs(1);

/// Where processes that lost Redis announce the share of every rate they take from a local
/// limiter, so that the processes still on Redis leave it free. It must not depend on Redis;
/// production uses the job store (`herald_engine::store::StoreBoard`), which every process
/// reaches.
#[async_trait]
pub trait FallbackBoard: Send + Sync + 'static {
    /// Records that `process_id`, in its fallback period `period`, takes `share` (a fraction)
    /// of every rate locally, for `ttl` from when the board stores it, by the board's clock;
    /// replaces the process's announcement of the same or an earlier period, never a later one.
    async fn announce(
        &self,
        process_id: &str,
        period: u64,
        share: f64,
        ttl: Duration,
    ) -> Result<(), LimitError>;
    /// Withdraws `process_id`'s announcement of `period`, if it is still there: a withdrawal
    /// that arrives late never removes a later period's announcement.
    async fn withdraw(&self, process_id: &str, period: u64) -> Result<(), LimitError>;
    /// The unexpired announcements of processes other than `process_id`.
    async fn others(&self, process_id: &str) -> Result<Fallbacks, LimitError>;
}

/// What a [`FallbackBoard`] holds about the other processes.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Fallbacks {
    /// The sum of their shares.
    pub share: f64,
    /// How many processes announced one.
    pub processes: u32,
}

/// Settings of a [`FailSafeLimiter`]. `Default` gives the values named `DEFAULT_*`.
#[derive(Debug, Clone)]
pub struct FailSafeConfig {
    /// Share of each rate that all the live processes together may use while Redis is
    /// unreachable, between 0 (exclusive) and 1. Below 1 because the count of live processes is
    /// only the last one seen, and Meta penalises exceeding a rate more than sending slower.
    /// Default 0.5.
    pub fallback_fraction: f64,
    /// How often to try Redis again while in fallback: often enough to return soon, rarely
    /// enough not to hammer a Redis that is restarting. Default 1 s.
    pub probe_interval: Duration,
    /// How often this process refreshes its registration (and learns how many processes are
    /// live). Must be well under `process_ttl`, or live processes would look dead between
    /// refreshes and fallback shares would be too large. Default 1 s.
    pub heartbeat_interval: Duration,
    /// A process not refreshed for this long (by Redis's clock) no longer counts as live: long
    /// enough to survive a missed heartbeat or two, short enough that a crashed process stops
    /// shrinking the others' fallback shares soon. Default 5 s.
    pub process_ttl: Duration,
    /// The longest a Redis call may take before it counts as a failure and the limiter falls
    /// back: a send waits on it. Default 250 ms.
    pub call_timeout: Duration,
    /// The longest one attempt to (re)connect to Redis may take, at start and when probing.
    /// Default 1 s.
    pub connect_timeout: Duration,
    /// Prefix of every Redis key, so that deployments (and tests) sharing a Redis do not share
    /// limits. Default `herald:rl:`.
    pub key_prefix: String,
    /// The number of processes assumed at least, when fewer (or none, if Redis is down at
    /// start) have been seen. Set it to the deployment's size to divide the fallback rate
    /// correctly even then. Default 1.
    pub min_processes: u32,
    /// The longest a fallback board call (announce, withdraw, read) may take: a database call,
    /// so longer than `call_timeout`; a process on Redis distrusts its reading of the board
    /// (and leaves `fallback_fraction` more free) only after [`Self::trust`], which grows with
    /// it, as does the pause at a fallback ([`Self::hold`]). Default 500 ms.
    pub board_timeout: Duration,
    /// Refunds are dropped for this long after a switch between Redis and fallback: a refund
    /// cannot say which store its permits came from, and handing them back to the other one
    /// would credit permits never taken there. Dropping a refund only grants less. Default 1 s.
    pub refund_grace: Duration,
}

impl Default for FailSafeConfig {
    fn default() -> Self {
        FailSafeConfig {
            fallback_fraction: DEFAULT_FALLBACK_FRACTION,
            probe_interval: DEFAULT_PROBE_INTERVAL,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            process_ttl: DEFAULT_PROCESS_TTL,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            key_prefix: DEFAULT_KEY_PREFIX.to_string(),
            min_processes: 1,
            board_timeout: DEFAULT_BOARD_TIMEOUT,
            refund_grace: DEFAULT_REFUND_GRACE,
        }
    }
}

impl FailSafeConfig {
    /// Checks the settings are usable; the error names the one that is not.
    pub fn validate(&self) -> Result<(), LimitError> {
        let bad = |what: &str| Err(LimitError::InvalidConfig(what.to_string()));
        if !(self.fallback_fraction > 0.0 && self.fallback_fraction <= 1.0) {
            return bad("fallback_fraction must be in (0, 1]");
        }
        if self.probe_interval.is_zero()
            || self.heartbeat_interval.is_zero()
            || self.call_timeout.is_zero()
            || self.connect_timeout.is_zero()
            || self.board_timeout.is_zero()
        {
            return bad("probe_interval, heartbeat_interval, call_timeout, connect_timeout and board_timeout must be positive");
        }
        if self.process_ttl < self.heartbeat_interval * 2 + self.call_timeout {
            return bad("process_ttl must be at least twice heartbeat_interval plus call_timeout");
        }
        Ok(())
    }

    /// How long a process in fallback waits after its announcement was stored before it
    /// grants: the time a process on Redis trusts a reading of the board ([`Self::trust`]) plus
    /// one Redis call, which may still be deciding at the old rate.
    pub fn hold(&self) -> Duration {
        self.trust() + self.call_timeout
    }

    /// How long a process on Redis trusts a reading of the fallback board, from the moment the
    /// reading started: longer than a heartbeat round between two readings (the sleep, the
    /// Redis call, the reading, and on the way back from fallback a withdrawal), so that a
    /// process on Redis distrusts its reading only when its heartbeat is late.
    pub fn trust(&self) -> Duration {
        self.heartbeat_interval + self.call_timeout + self.board_timeout * 2
    }

    /// The settings' additional requirement when the limiter has a fallback board: an
    /// announcement must be renewed before it expires, and a round in fallback is the first
    /// reading of the board, the announcement, a probe (a connection attempt and three calls)
    /// and `probe_interval`.
    pub fn validate_with_board(&self) -> Result<(), LimitError> {
        let round = self.probe_interval
            + self.board_timeout * 2
            + self.connect_timeout
            + self.call_timeout * 3;
        if self.process_ttl <= round {
            return Err(LimitError::InvalidConfig(
                "with a fallback board, process_ttl must exceed probe_interval + 2 * board_timeout + connect_timeout + 3 * call_timeout".into(),
            ));
        }
        Ok(())
    }
}

const MODE_REDIS: u8 = 0;
const MODE_FALLBACK: u8 = 1;
/// `changed_at` before any switch.
const NEVER: u64 = u64::MAX;

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(NEVER - 1)
}

/// A fallback board call, bounded by `timeout`.
async fn timed<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T, LimitError>>,
) -> Result<T, LimitError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_elapsed) => Err(LimitError::Board(format!("no answer within {timeout:?}"))),
    }
}

/// What the limiter and its background task share.
struct Shared {
    client: Client,
    redis_config: RedisLimiterConfig,
    /// Set once the first connection succeeds; the manager reconnects by itself after that.
    redis: OnceLock<RedisLimiter>,
    local: LocalLimiter,
    config: FailSafeConfig,
    process_id: String,
    mode: AtomicU8,
    /// Serialises mode switches, so that each logs once and the local limiter is cleared
    /// before anyone uses it in a new fallback period.
    switching: Mutex<()>,
    fallbacks: AtomicU64,
    redis_errors: AtomicU64,
    /// Live processes last seen in Redis.
    live_seen: AtomicU32,
    epoch: Instant,
    /// When the mode last switched, in nanoseconds since `epoch`, or [`NEVER`].
    changed_at: AtomicU64,
    /// Where this process announces its fallback share and reads the others'; `None`: a
    /// partition is not covered (see the module documentation).
    board: Option<Arc<dyn FallbackBoard>>,
    /// The shares (`f64` bits) the other processes announced at the last good reading of the
    /// board: left free in Redis mode.
    reserved: AtomicU64,
    /// When the last good reading started (nanoseconds since `epoch`), or [`NEVER`].
    read_at: AtomicU64,
    /// How many processes announced a share at the last good reading: they count as live.
    fallbacks_seen: AtomicU32,
    /// The part of every rate this process announced in its current fallback period (`f64`
    /// bits): what it grants itself, whatever the live count says by now.
    announced: AtomicU64,
    /// Whether the last board read failed, so that a failing board is logged once.
    board_failing: AtomicBool,
    /// In fallback with a board, local grants start at `grant_from` (or [`NEVER`]: not yet
    /// announced) and end at `grant_until`, in nanoseconds since `epoch`.
    grant_from: AtomicU64,
    grant_until: AtomicU64,
    /// Wakes the background task at a switch to fallback, so that it announces at once.
    wake: Arc<Notify>,
    /// Set by `leave`: the process is no longer counted and its share is withdrawn, so the
    /// limiter grants nothing more.
    left: AtomicBool,
}

impl Shared {
    fn mode(&self) -> LimiterMode {
        match self.mode.load(Ordering::Acquire) {
            MODE_REDIS => LimiterMode::Redis,
            _ => LimiterMode::Fallback,
        }
    }

    /// The processes last seen on Redis and in fallback, at least `min_processes`.
    fn live(&self) -> u32 {
        self.live_seen
            .load(Ordering::Relaxed)
            .saturating_add(self.fallbacks_seen.load(Ordering::Relaxed))
            .max(self.config.min_processes)
            .max(1)
    }

    /// The part of every rate this process takes in fallback: with a board, the part it
    /// announced.
    fn part(&self) -> f64 {
        match self.board {
            Some(_) => f64::from_bits(self.announced.load(Ordering::Acquire)),
            None => self.config.fallback_fraction / f64::from(self.live()),
        }
    }

    /// This process's share of `rate` while Redis is unreachable.
    fn share(&self, rate: Rate) -> Rate {
        rate.scaled(self.part())
    }

    fn now_ns(&self) -> u64 {
        nanos(self.epoch.elapsed())
    }

    fn mark_switch(&self) {
        self.changed_at.store(self.now_ns(), Ordering::Release);
    }

    /// The share of every rate left free for processes in fallback: as last read from the
    /// board; when that reading is older than [`FailSafeConfig::trust`] (or there was none),
    /// `fallback_fraction` more for the processes that may have fallen back since.
    fn reserved(&self) -> f64 {
        if self.board.is_none() {
            return 0.0;
        }
        let read = f64::from_bits(self.reserved.load(Ordering::Acquire));
        let at = self.read_at.load(Ordering::Acquire);
        if at == NEVER || self.now_ns().saturating_sub(at) > nanos(self.config.trust()) {
            (read + self.config.fallback_fraction).min(1.0)
        } else {
            read
        }
    }

    /// What this process may take of `rate` from Redis: less the shares processes in fallback
    /// announced.
    fn redis_rate(&self, rate: Rate) -> Rate {
        let reserved = self.reserved();
        if reserved <= 0.0 {
            return rate;
        }
        rate.scaled((1.0 - reserved).max(0.0))
    }

    /// In fallback with a board: how long until local grants may start, or `None` if they may
    /// now (announced, held long enough, and not yet possibly expired).
    fn fallback_closed(&self) -> Option<Duration> {
        self.board.as_ref()?;
        let now = self.now_ns();
        let from = self.grant_from.load(Ordering::Acquire);
        let until = self.grant_until.load(Ordering::Acquire);
        if from == NEVER || now >= until {
            return Some(
                self.config
                    .probe_interval
                    .min(self.config.heartbeat_interval),
            );
        }
        (now < from).then(|| Duration::from_nanos(from - now))
    }

    /// Reads the shares the processes in fallback announced, to leave them free in Redis mode.
    /// A failed reading changes nothing: the last good one is trusted until it is older than
    /// [`FailSafeConfig::trust`], then `fallback_fraction` more is left free (see
    /// [`Shared::reserved`]).
    async fn refresh_reserved(&self) {
        let Some(board) = &self.board else {
            return;
        };
        let started = self.now_ns();
        let read = timed(self.config.board_timeout, board.others(&self.process_id)).await;
        let seen = match read {
            Ok(seen) if seen.share.is_finite() && seen.share >= 0.0 => seen,
            other => {
                let error = match other {
                    Ok(seen) => LimitError::Board(format!("unusable total share {}", seen.share)),
                    Err(error) => error,
                };
                if !self.board_failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        process_id = %self.process_id,
                        error = %error,
                        fallback_fraction = self.config.fallback_fraction,
                        "cannot read the fallback board: shared rates leave the most processes \
                         without Redis could take free once the last reading is too old"
                    );
                }
                return;
            }
        };
        if self.board_failing.swap(false, Ordering::Relaxed) {
            tracing::info!(process_id = %self.process_id, "fallback board readable again");
        }
        let value = seen.share.min(1.0);
        self.fallbacks_seen.store(seen.processes, Ordering::Relaxed);
        let before = f64::from_bits(self.reserved.swap(value.to_bits(), Ordering::AcqRel));
        // Readings are made one at a time (at connect, then by the background task).
        self.read_at.store(started, Ordering::Release);
        if before != value {
            if value > 0.0 {
                tracing::warn!(
                    process_id = %self.process_id,
                    reserved = value,
                    processes = seen.processes,
                    "processes without Redis announced fallback shares: shared rates leave them free"
                );
            } else {
                tracing::info!(
                    process_id = %self.process_id,
                    "no process announces a fallback share: shared rates are whole again"
                );
            }
        }
    }

    /// In fallback: announces (or renews) this process's share on the board, and opens local
    /// grants once the processes on Redis have read it: [`FailSafeConfig::hold`] after it was
    /// stored, the first time in a fallback period and whenever a renewal came after the last
    /// announcement may have expired.
    async fn announce(&self) {
        let Some(board) = &self.board else {
            return;
        };
        let period = self.fallbacks.load(Ordering::Acquire);
        if self.grant_from.load(Ordering::Acquire) == NEVER {
            // The first announcement of a period: count the processes already in fallback (a
            // process that started without Redis has never read the board).
            let read = timed(self.config.board_timeout, board.others(&self.process_id));
            if let Ok(seen) = read.await {
                self.fallbacks_seen
                    .fetch_max(seen.processes, Ordering::Relaxed);
            }
        }
        let started = self.now_ns();
        let part = self.config.fallback_fraction / f64::from(self.live());
        let ttl = self.config.process_ttl;
        let call = board.announce(&self.process_id, period, part, ttl);
        if let Err(error) = timed(self.config.board_timeout, call).await {
            tracing::warn!(
                process_id = %self.process_id,
                error = %error,
                "cannot announce this process's fallback share: it grants nothing until it can"
            );
            return;
        }
        let _guard = self
            .switching
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.mode.load(Ordering::Acquire) != MODE_FALLBACK
            || self.fallbacks.load(Ordering::Acquire) != period
        {
            return;
        }
        let now = self.now_ns();
        if self.grant_from.load(Ordering::Acquire) == NEVER
            || self.grant_until.load(Ordering::Acquire) <= now
        {
            // First announcement, or the last one may have expired before this one was stored:
            // the processes on Redis may have stopped leaving the share free meanwhile.
            self.grant_from.store(
                now.saturating_add(nanos(self.config.hold())),
                Ordering::Release,
            );
        }
        self.announced.store(part.to_bits(), Ordering::Release);
        self.grant_until
            .store(started.saturating_add(nanos(ttl)), Ordering::Release);
    }

    /// Back on Redis: withdraws this process's announcement, so that the others take the
    /// whole rate at their next heartbeat rather than after `process_ttl`.
    async fn withdraw(&self, period: u64) {
        let Some(board) = &self.board else {
            return;
        };
        let call = board.withdraw(&self.process_id, period);
        if timed(self.config.board_timeout, call).await.is_err() {
            tracing::debug!(
                process_id = %self.process_id,
                "cannot withdraw the fallback share: it expires by itself"
            );
        }
    }

    fn in_refund_grace(&self) -> bool {
        let changed = self.changed_at.load(Ordering::Acquire);
        changed != NEVER
            && self
                .epoch
                .elapsed()
                .saturating_sub(Duration::from_nanos(changed))
                < self.config.refund_grace
    }

    /// Counts a failed Redis call and falls back, if not already.
    fn on_error(&self, error: &LimitError) {
        self.redis_errors.fetch_add(1, Ordering::Relaxed);
        let _guard = self
            .switching
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.mode.load(Ordering::Acquire) == MODE_FALLBACK {
            return;
        }
        // Cleared before the mode says fallback, so nobody uses last period's buckets or
        // grants before this period's announcement.
        self.local.clear();
        self.grant_from.store(NEVER, Ordering::Release);
        self.grant_until.store(0, Ordering::Release);
        self.mark_switch();
        self.fallbacks.fetch_add(1, Ordering::Release);
        self.mode.store(MODE_FALLBACK, Ordering::Release);
        self.wake.notify_one();
        tracing::warn!(
            process_id = %self.process_id,
            error = %error,
            live_processes = self.live(),
            fallback_fraction = self.config.fallback_fraction,
            "Redis unreachable: rate limits fall back to this process's share, kept locally"
        );
    }

    /// Back to Redis mode; returns the fallback period that ended (taken under the lock, so
    /// that a fallback right after cannot make the withdrawal take the new period's share).
    fn on_recovery(&self) -> Option<u64> {
        let _guard = self
            .switching
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.mode.load(Ordering::Acquire) == MODE_REDIS {
            return None;
        }
        self.mark_switch();
        self.mode.store(MODE_REDIS, Ordering::Release);
        tracing::info!(
            process_id = %self.process_id,
            live_processes = self.live(),
            "Redis reachable again: rate limits are shared through Redis"
        );
        Some(self.fallbacks.load(Ordering::Acquire))
    }

    /// Registers this process and records the live count; true if Redis answered.
    async fn heartbeat(&self, redis: &RedisLimiter) -> Result<(), LimitError> {
        let live = redis
            .register_process(&self.process_id, self.config.process_ttl)
            .await?;
        self.live_seen.store(live, Ordering::Relaxed);
        Ok(())
    }

    /// One round of the background task: a heartbeat and a board read in Redis mode; an
    /// announcement and a probe in fallback.
    async fn tick(&self) {
        if self.mode() == LimiterMode::Redis {
            if let Some(redis) = self.redis.get() {
                match self.heartbeat(redis).await {
                    Ok(()) => self.refresh_reserved().await,
                    Err(error) => self.on_error(&error),
                }
            }
            return;
        }
        self.announce().await;
        if let Err(error) = self.probe().await {
            self.redis_errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(process_id = %self.process_id, error = %error, "Redis probe failed");
        }
    }

    /// Tries Redis: connects if it never did, PINGs, registers; back to Redis mode on success.
    async fn probe(&self) -> Result<(), LimitError> {
        let redis = match self.redis.get() {
            Some(redis) => redis,
            None => {
                let conn = connect_manager(self.client.clone(), &self.redis_config).await?;
                self.redis
                    .get_or_init(|| RedisLimiter::with_manager(conn, self.redis_config.clone()))
            }
        };
        // After an outage the first call may only learn that the last reconnection attempt
        // failed, and start a new one; a second call waits for that attempt.
        if redis.ping().await.is_err() {
            redis.ping().await?;
        }
        self.heartbeat(redis).await?;
        self.refresh_reserved().await;
        if let Some(period) = self.on_recovery() {
            self.withdraw(period).await;
        }
        Ok(())
    }
}

/// The production [`Limiter`]: shared through Redis, falling back to a local limiter at a
/// conservative share of each rate while Redis is unreachable, and back again when it answers.
/// See the module documentation.
pub struct FailSafeLimiter {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl FailSafeLimiter {
    /// Connects to Redis at `url` as the process `process_id` (unique per process: a host name
    /// and pid, or a UUID), registers it, and starts the heartbeat and probe task (on the
    /// current Tokio runtime). `board` is where processes in fallback announce their shares:
    /// the job store in production; `None` leaves partitions uncovered (module documentation).
    ///
    /// A Redis that is down (or slow) at start is not an error: the limiter starts in fallback
    /// (which counts as one fallback in its status, with the warning) and probes. A malformed
    /// URL or configuration is.
    pub async fn connect(
        url: &str,
        process_id: String,
        config: FailSafeConfig,
        board: Option<Arc<dyn FallbackBoard>>,
    ) -> Result<Self, LimitError> {
        config.validate()?;
        if board.is_some() {
            config.validate_with_board()?;
        }
        let client = open_client(url)?;
        let redis_config = RedisLimiterConfig {
            key_prefix: config.key_prefix.clone(),
            call_timeout: config.call_timeout,
            connect_timeout: config.connect_timeout,
        };
        let shared = Arc::new(Shared {
            client,
            redis_config,
            redis: OnceLock::new(),
            local: LocalLimiter::new().starting_empty(),
            config,
            process_id,
            mode: AtomicU8::new(MODE_REDIS),
            switching: Mutex::new(()),
            fallbacks: AtomicU64::new(0),
            redis_errors: AtomicU64::new(0),
            live_seen: AtomicU32::new(0),
            epoch: Instant::now(),
            changed_at: AtomicU64::new(NEVER),
            board,
            reserved: AtomicU64::new(0.0_f64.to_bits()),
            read_at: AtomicU64::new(NEVER),
            fallbacks_seen: AtomicU32::new(0),
            announced: AtomicU64::new(0.0_f64.to_bits()),
            board_failing: AtomicBool::new(false),
            grant_from: AtomicU64::new(NEVER),
            grant_until: AtomicU64::new(0),
            wake: Arc::new(Notify::new()),
            left: AtomicBool::new(false),
        });
        let started = async {
            let conn = connect_manager(shared.client.clone(), &shared.redis_config).await?;
            let redis = shared
                .redis
                .get_or_init(|| RedisLimiter::with_manager(conn, shared.redis_config.clone()));
            shared.heartbeat(redis).await
        };
        match started.await {
            Ok(()) => shared.refresh_reserved().await,
            Err(error) => shared.on_error(&error),
        }
        let task = tokio::spawn(run(Arc::downgrade(&shared), Arc::clone(&shared.wake)));
        Ok(FailSafeLimiter { shared, task })
    }

    /// This process's id in the registry of live processes.
    pub fn process_id(&self) -> &str {
        &self.shared.process_id
    }

    /// The number of processes fallback shares are divided by: the last count seen in Redis
    /// plus the processes last seen in fallback on the board, at least `min_processes`.
    pub fn live_processes(&self) -> u32 {
        self.shared.live()
    }

    /// The rate this process allows itself for `rate` while in fallback: with a board, the
    /// part it announced (nothing before its first announcement).
    pub fn fallback_rate(&self, rate: Rate) -> Rate {
        self.shared.share(rate)
    }

    /// Removes this process from the registry, so that the others' fallback shares grow at
    /// once rather than after `process_ttl`, and withdraws its fallback share from the board.
    /// For graceful shutdown; the heartbeat would add it back if the limiter were used on.
    pub async fn deregister(&self) -> Result<(), LimitError> {
        let period = self.shared.fallbacks.load(Ordering::Acquire);
        self.shared.withdraw(period).await;
        match self.shared.redis.get() {
            Some(redis) => redis.deregister_process(&self.shared.process_id).await,
            None => Ok(()),
        }
    }
}

/// The background task: heartbeats every `heartbeat_interval` in Redis mode, announces and
/// probes every `probe_interval` in fallback, and at once when the limiter falls back. Ends
/// when the limiter is dropped.
async fn run(shared: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        let pause = match shared.upgrade() {
            Some(s) if s.mode() == LimiterMode::Redis => s.config.heartbeat_interval,
            Some(s) => s.config.probe_interval,
            None => return,
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = wake.notified() => {}
        }
        let Some(s) = shared.upgrade() else {
            return;
        };
        s.tick().await;
    }
}

impl Drop for FailSafeLimiter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl fmt::Debug for FailSafeLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailSafeLimiter")
            .field("process_id", &self.shared.process_id)
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Limiter for FailSafeLimiter {
    async fn acquire(&self, key: &str, rate: Rate, want: u32) -> Grant {
        self.acquire_many(&[(key, rate, want)])
            .await
            .into_iter()
            .next()
            .unwrap_or_else(super::invalid_rate_grant)
    }

    /// One Redis call for every key; when it fails, every key falls back together, exactly as
    /// each would have alone.
    async fn acquire_many(&self, asks: &[(&str, Rate, u32)]) -> Vec<Grant> {
        let s = &self.shared;
        if s.left.load(Ordering::Acquire) {
            let closed = Grant {
                granted: 0,
                next_in: s.config.probe_interval,
            };
            return vec![closed; asks.len()];
        }
        if s.mode() == LimiterMode::Redis {
            if let Some(redis) = s.redis.get() {
                let shared: Vec<(&str, Rate, u32)> = asks
                    .iter()
                    .map(|(key, rate, want)| (*key, s.redis_rate(*rate), *want))
                    .collect();
                match redis.acquire_many(&shared).await {
                    Ok(grants) => return grants,
                    Err(error) => s.on_error(&error),
                }
            }
        }
        if let Some(next_in) = s.fallback_closed() {
            let closed = Grant {
                granted: 0,
                next_in,
            };
            return vec![closed; asks.len()];
        }
        asks.iter()
            .map(|(key, rate, want)| s.local.acquire_now(key, s.share(*rate), *want))
            .collect()
    }

    /// Stops the heartbeats and probes, deregisters the process and withdraws its fallback
    /// share (see [`FailSafeLimiter::deregister`]); from then on the limiter grants nothing
    /// (its share is no longer counted or announced).
    async fn leave(&self) {
        self.shared.left.store(true, Ordering::Release);
        // No more heartbeats or announcements: they would register the process again. (One
        // already under way may still land; the process then counts until it expires.)
        self.task.abort();
        if let Err(error) = self.deregister().await {
            tracing::warn!(
                process_id = %self.shared.process_id,
                error = %error,
                "could not deregister from Redis: the others count this process until it expires"
            );
        }
    }

    async fn refund(&self, key: &str, rate: Rate, n: u32) {
        let s = &self.shared;
        let mode = s.mode();
        if s.in_refund_grace() {
            return;
        }
        match (mode, s.redis.get()) {
            (LimiterMode::Redis, Some(redis)) => {
                if let Err(error) = redis.refund(key, s.redis_rate(rate), n).await {
                    s.on_error(&error);
                }
            }
            _ => s.local.refund_now(key, s.share(rate), n),
        }
    }

    fn status(&self) -> LimiterStatus {
        let mode = self.shared.mode();
        LimiterStatus {
            mode,
            fallbacks: self.shared.fallbacks.load(Ordering::Relaxed),
            redis_errors: self.shared.redis_errors.load(Ordering::Relaxed),
            reserved_for_fallbacks: if mode == LimiterMode::Redis {
                self.shared.reserved()
            } else {
                0.0
            },
            fallback_share: if mode == LimiterMode::Fallback {
                self.shared.part()
            } else {
                1.0
            },
        }
    }
}
