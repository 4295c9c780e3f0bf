//! [`ChannelAdmission`]: the engine's [`Admission`] for sends. A rate key `ch:<channel id>` is
//! admitted at the channel's rate (its limits, less any slowdown Meta asked for), and not at
//! all while the channel is paused.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use tracing::warn;
use uuid::Uuid;

use super::{channel_of_rate_key, Channel};
use crate::admission::Admission;
use crate::limit::{Grant, Limiter, LimiterMode, Rate};
use crate::metrics::{EngineMetrics, KeyMetrics};
use crate::store::Store;

/// Settings of a [`ChannelAdmission`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionConfig {
    /// Channels (limits, pauses) are reloaded from the database this often: a pause or a new
    /// limit written by another process takes effect within this long.
    pub reload_interval: Duration,
    /// A paused channel is looked at again this often.
    pub paused_recheck: Duration,
    /// After Meta's 130429 the channel's rate is cut to this share of itself…
    pub slowdown_factor: f64,
    /// …and recovers to the full rate linearly over this long without another 130429.
    pub slowdown_recovery: Duration,
    /// The slowest a channel is ever slowed to, as a share of its rate.
    pub slowdown_floor: f64,
    /// A rate key naming a channel missing from the cache reloads the channels, at most this
    /// often.
    pub miss_reload: Duration,
    /// Refusals within this long of a slowdown do not slow the channel further: they answer
    /// requests sent before it.
    pub slowdown_hold: Duration,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            reload_interval: Duration::from_secs(1),
            paused_recheck: Duration::from_secs(2),
            slowdown_factor: 0.7,
            slowdown_recovery: Duration::from_secs(30),
            slowdown_floor: 0.1,
            slowdown_hold: Duration::from_secs(1),
            miss_reload: Duration::from_millis(100),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Slowdown {
    factor: f64,
    at: Instant,
}

struct Cache {
    channels: HashMap<Uuid, Arc<Channel>>,
    loaded_at: Option<Instant>,
}

/// Admits sends at each channel's rate through a shared [`Limiter`].
pub struct ChannelAdmission {
    store: Arc<dyn Store>,
    limiter: Arc<dyn Limiter>,
    config: AdmissionConfig,
    cache: Mutex<Cache>,
    slowdowns: Mutex<HashMap<Uuid, Slowdown>>,
    reload: tokio::sync::Mutex<()>,
    /// Where sends held back at their request are counted, once set.
    metrics: std::sync::OnceLock<Arc<EngineMetrics>>,
    /// Pair permits while the limiter is in fallback (see [`ChannelAdmission::at_request`]).
    pair_fallback: crate::limit::LocalLimiter,
}

impl ChannelAdmission {
    pub fn new(store: Arc<dyn Store>, limiter: Arc<dyn Limiter>, config: AdmissionConfig) -> Self {
        ChannelAdmission {
            store,
            limiter,
            config,
            cache: Mutex::new(Cache {
                channels: HashMap::new(),
                loaded_at: None,
            }),
            slowdowns: Mutex::new(HashMap::new()),
            reload: tokio::sync::Mutex::new(()),
            metrics: std::sync::OnceLock::new(),
            pair_fallback: crate::limit::LocalLimiter::new(),
        }
    }

    pub fn limiter(&self) -> &Arc<dyn Limiter> {
        &self.limiter
    }

    /// The channel as last loaded (at most `reload_interval` old).
    pub async fn channel(&self, id: Uuid) -> Option<Arc<Channel>> {
        self.refresh().await;
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .channels
            .get(&id)
            .cloned()
    }

    /// Forgets the cached channels, so the next call reloads them (after a pause or an edit
    /// made in this process).
    pub fn invalidate(&self) {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .loaded_at = None;
    }

    /// Forgets the cache after a miss unless it was loaded within `miss_reload`.
    async fn reload_after_miss(&self) {
        let fresh = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .loaded_at
            .is_some_and(|at| at.elapsed() < self.config.miss_reload);
        if !fresh {
            self.invalidate();
            self.refresh().await;
        }
    }

    async fn refresh(&self) {
        let stale = |c: &Cache| {
            c.loaded_at
                .is_none_or(|at| at.elapsed() >= self.config.reload_interval)
        };
        if !stale(&self.cache.lock().unwrap_or_else(|e| e.into_inner())) {
            return;
        }
        // One reload at a time; the others use what is cached meanwhile, or wait for the first.
        let _guard = self.reload.lock().await;
        if !stale(&self.cache.lock().unwrap_or_else(|e| e.into_inner())) {
            return;
        }
        match self.store.delivery().channels().await {
            Ok(list) => {
                let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                cache.channels = list.into_iter().map(|c| (c.id, Arc::new(c))).collect();
                cache.loaded_at = Some(Instant::now());
            }
            Err(e) => {
                // Keep the old view (limits rarely change); try again on the next call.
                warn!(error = %e, "admission: cannot reload channels");
            }
        }
    }

    /// Meta said the channel is over its throughput (130429) or close to it (usage headers):
    /// cut its rate now, to recover gradually.
    pub fn slow_down(&self, channel_id: Uuid) {
        let mut slow = self.slowdowns.lock().unwrap_or_else(|e| e.into_inner());
        // The refusals of one burst arrive together: they are one signal, not many.
        if slow
            .get(&channel_id)
            .is_some_and(|s| s.at.elapsed() < self.config.slowdown_hold)
        {
            return;
        }
        let current = slow.get(&channel_id).map_or(1.0, |s| self.factor_of(s));
        let factor = (current * self.config.slowdown_factor).max(self.config.slowdown_floor);
        slow.insert(
            channel_id,
            Slowdown {
                factor,
                at: Instant::now(),
            },
        );
        warn!(%channel_id, factor, "channel slowed down after Meta's rate limit answer");
    }

    fn factor_of(&self, s: &Slowdown) -> f64 {
        let recovery = self.config.slowdown_recovery.as_secs_f64().max(0.001);
        let healed = s.at.elapsed().as_secs_f64() / recovery;
        (s.factor + (1.0 - s.factor) * healed).min(1.0)
    }

    /// The share of its rate a channel runs at now (1.0 unless slowed down).
    pub fn slowdown(&self, channel_id: Uuid) -> f64 {
        let mut slow = self.slowdowns.lock().unwrap_or_else(|e| e.into_inner());
        match slow.get(&channel_id).map(|s| self.factor_of(s)) {
            Some(f) if f >= 1.0 => {
                slow.remove(&channel_id);
                1.0
            }
            Some(f) => f,
            None => 1.0,
        }
    }

    fn rate_of(&self, channel: &Channel) -> Rate {
        let rate = channel.limits.rate();
        let factor = self.slowdown(channel.id);
        if factor >= 1.0 {
            return rate;
        }
        Rate {
            per_second: rate.per_second * factor,
            burst: ((f64::from(rate.burst) * factor) as u32).max(1),
        }
    }

    /// The checks at the moment of a request, taken together (one round trip when limits
    /// are shared through Redis): one permit of the (channel, recipient) pair rate (Meta
    /// tolerates about one message per 6 s to one user), and one of the channel's arrival rate
    /// ([`super::ChannelLimits::arrival_rate`]), so that a send held up since its claim does not
    /// go out on top of the sends claimed after it, by this process or any other. When one is
    /// refused the other is handed back.
    ///
    /// While the limiter runs on a reduced share of the rates the arrival rate is not checked:
    /// in fallback (Redis unreachable) each process claims at a local share of half the rate or
    /// less, and while some processes are in fallback the others leave their shares free; both
    /// leave more room than the check would, and the check's burst, scaled down with the rate
    /// (to one permit at low rates), would refuse ordinary jitter.
    ///
    /// In fallback the pair permit comes from a local limiter of the admission's own at the
    /// fallback share of the pair rate, starting full: the shared limiter's fallback keys start
    /// empty (right for a channel, whose burst other processes may just have spent on Redis),
    /// which for a pair rate of one message per 6 s made every new recipient wait half a minute
    /// or more. The worst a full start costs is one message Meta answers with 131056, which
    /// delays only that recipient.
    pub async fn at_request(&self, channel: &Channel, recipient: &str) -> RequestGate {
        let pair_key = pair_rate_key(channel.id, recipient);
        let pair_rate = channel.limits.pair_rate();
        let status = self.limiter.status();
        if status.mode == LimiterMode::Fallback {
            let rate = pair_rate.scaled(status.fallback_share.clamp(0.0, 1.0));
            let grant = self.pair_fallback.acquire_now(&pair_key, rate, 1);
            return if grant.granted > 0 {
                RequestGate::Go
            } else {
                RequestGate::Pair(grant.next_in.max(Duration::from_millis(1)))
            };
        }
        let full_rate = |s: crate::limit::LimiterStatus| {
            s.mode != LimiterMode::Fallback && s.reserved_for_fallbacks <= 0.0
        };
        let check_arrival = full_rate(status);
        let arrival_key = arrival_rate_key(channel.id);
        let arrival_rate = channel.limits.arrival_rate();
        let mut asks = vec![(pair_key.as_str(), pair_rate, 1)];
        if check_arrival {
            asks.push((arrival_key.as_str(), arrival_rate, 1));
        }
        let grants = self.limiter.acquire_many(&asks).await;
        let granted = |i: usize| grants.get(i).is_some_and(|g| g.granted > 0);
        let wait = |i: usize| {
            grants
                .get(i)
                .map_or(crate::limit::INVALID_RATE_RETRY, |g| g.next_in)
                .max(Duration::from_millis(1))
        };
        // A limiter that fell back during the call refused for want of Redis, not of room.
        let arrival = !check_arrival || granted(1) || !full_rate(self.limiter.status());
        let pair = granted(0);
        match (pair, arrival) {
            (true, true) => RequestGate::Go,
            (false, true) => {
                if check_arrival && granted(1) {
                    self.limiter.refund(&arrival_key, arrival_rate, 1).await;
                }
                RequestGate::Pair(wait(0))
            }
            (true, false) => {
                self.limiter.refund(&pair_key, pair_rate, 1).await;
                self.held(channel.id);
                RequestGate::Ahead(wait(1))
            }
            // Both: the send is late as well (its claim permit is stale, not to be handed
            // back), and waits for the pair.
            (false, false) => {
                self.held(channel.id);
                RequestGate::Ahead(wait(0).max(wait(1)))
            }
        }
    }

    /// Adds one to the counter `pick` chooses among the channel's permit counters, once metrics
    /// are set.
    fn count(&self, channel_id: Uuid, pick: fn(&KeyMetrics) -> &AtomicU64) {
        if let Some(metrics) = self.metrics.get() {
            pick(&metrics.key(&super::channel_rate_key(channel_id)))
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a send held back at its request, whose claim permit then goes unused.
    fn held(&self, channel_id: Uuid) {
        self.count(channel_id, |m| &m.held);
    }

    /// Hands back the claim permit of a send that did not use it (it waits for its recipient
    /// or the messaging tier), and counts it as handed back.
    pub async fn give_back(&self, channel_id: Uuid) {
        if self
            .refund_to(channel_id, &super::channel_rate_key(channel_id), 1)
            .await
        {
            self.count(channel_id, |m| &m.refunded);
        }
    }

    /// Refunds `n` permits of `rate_key` at channel `channel_id`'s rate; false when the
    /// channel is gone (there is nothing to refund to).
    async fn refund_to(&self, channel_id: Uuid, rate_key: &str, n: u32) -> bool {
        let Some(channel) = self.channel(channel_id).await else {
            return false;
        };
        let rate = self.rate_of(&channel);
        self.limiter.refund(rate_key, rate, n).await;
        true
    }

    /// Reports sends held back or handing their permits back in `metrics` (the engine's, so
    /// that they appear beside the producer's permits of the same channel in `/metrics`).
    pub fn set_metrics(&self, metrics: Arc<EngineMetrics>) {
        let _ = self.metrics.set(metrics);
    }
}

/// The limiter key of a (channel, recipient) pair: `pair:<channel id>:<recipient>`.
pub fn pair_rate_key(channel_id: Uuid, recipient: &str) -> String {
    format!("pair:{channel_id}:{recipient}")
}

/// The limiter key of a channel's arrival rate: `arrive:<channel id>`.
pub fn arrival_rate_key(channel_id: Uuid) -> String {
    format!("arrive:{channel_id}")
}

/// What [`ChannelAdmission::at_request`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestGate {
    /// Send now.
    Go,
    /// The recipient has had its share: wait this long (Meta would answer 131056), handing the
    /// claim's permit back.
    Pair(Duration),
    /// Sent now, the request would run ahead of the channel's pace as Meta sees it (its
    /// permit was taken long ago and later sends went first): wait this long. The claim's
    /// permit is not to be handed back: its moment has passed.
    Ahead(Duration),
}

/// What admission decides for a key before the limiter is asked.
enum Decision {
    /// Granted or refused without the limiter.
    Now(Grant),
    /// The limiter decides, under this rate.
    Limit(Rate),
}

impl ChannelAdmission {
    /// The rate `rate_key` is admitted at, or the grant it gets without asking the limiter (a
    /// key that is not a channel, an unknown or a paused channel).
    async fn decide(&self, rate_key: &str, want: u32) -> Decision {
        let Some(id) = channel_of_rate_key(rate_key) else {
            // Not a channel: nothing limits it here (the handler decides what it is).
            return Decision::Now(Grant {
                granted: want,
                next_in: Duration::ZERO,
            });
        };
        let channel = match self.channel(id).await {
            Some(c) => Some(c),
            None => {
                // Connected since the last reload? Look again now (at most every
                // `miss_reload`), so a new channel's first sends are paced like the rest.
                self.reload_after_miss().await;
                self.channel(id).await
            }
        };
        let Some(channel) = channel else {
            // Unknown channel: let its jobs run one at a time, so their handler fails them with
            // the reason instead of leaving them waiting for ever.
            return Decision::Now(Grant {
                granted: want.min(1),
                next_in: self.config.miss_reload,
            });
        };
        if channel.paused_reason.is_some() && !channel.paused_broadcasts_only {
            return Decision::Now(Grant {
                granted: 0,
                next_in: self.config.paused_recheck,
            });
        }
        Decision::Limit(self.rate_of(&channel))
    }
}

#[async_trait]
impl Admission for ChannelAdmission {
    async fn acquire(&self, rate_key: &str, want: u32) -> Grant {
        match self.decide(rate_key, want).await {
            Decision::Now(grant) => grant,
            Decision::Limit(rate) => self.limiter.acquire(rate_key, rate, want).await,
        }
    }

    async fn acquire_many(&self, asks: &[(&str, u32)]) -> Vec<Grant> {
        let mut grants = Vec::with_capacity(asks.len());
        // (index in `asks`, key, rate, want) of the keys the limiter decides, asked together.
        let mut limited = Vec::new();
        for (i, (key, want)) in asks.iter().enumerate() {
            match self.decide(key, *want).await {
                Decision::Now(grant) => grants.push(grant),
                Decision::Limit(rate) => {
                    grants.push(crate::limit::Grant {
                        granted: 0,
                        next_in: Duration::ZERO,
                    });
                    limited.push((i, (*key, rate, *want)));
                }
            }
        }
        if limited.is_empty() {
            return grants;
        }
        let ask: Vec<(&str, Rate, u32)> = limited.iter().map(|(_, a)| *a).collect();
        let got = self.limiter.acquire_many(&ask).await;
        for ((i, _), grant) in limited.iter().zip(got) {
            grants[*i] = grant;
        }
        grants
    }

    async fn leave(&self) {
        self.limiter.leave().await;
    }

    async fn max_priority(&self, rate_key: &str) -> Option<i16> {
        let channel = self.channel(channel_of_rate_key(rate_key)?).await?;
        (channel.paused_reason.is_some() && channel.paused_broadcasts_only)
            .then_some(super::INTERACTIVE_PRIORITY)
    }

    async fn refund(&self, rate_key: &str, n: u32) {
        if let Some(id) = channel_of_rate_key(rate_key) {
            self.refund_to(id, rate_key, n).await;
        }
    }
}
