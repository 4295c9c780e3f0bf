//! The sandbox's shared state: faults, token buckets, counters and the accepted log, behind
//! one mutex so each send's decision (faults, limits, acceptance) is atomic.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::meta::{Api, MetaError};
use crate::{Accepted, Faults, SandboxConfig, Stats};

/// Pair buckets are pruned (full ones dropped: a full bucket is the same as none) once the
/// map holds at least this many, so a million-recipient benchmark stays small.
const PAIR_PRUNE_MIN: usize = 4096;

/// Wall-clock now in unix milliseconds.
pub(crate) fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// A token bucket on tokio's clock.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// A bucket's refill rate (tokens per second) and capacity.
#[derive(Clone, Copy, Debug)]
struct Limit {
    rate: f64,
    capacity: f64,
}

impl Bucket {
    fn full(limit: Limit, now: Instant) -> Bucket {
        Bucket {
            tokens: limit.capacity,
            last: now,
        }
    }

    fn refill(&mut self, limit: Limit, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit.rate).min(limit.capacity);
        self.last = now;
    }
}

/// Per-sender state: the throughput bucket and the recent acceptances for
/// `max_in_any_second`.
#[derive(Debug)]
struct SenderState {
    bucket: Option<Bucket>,
    window: VecDeque<Instant>,
}

/// One callback's entry in the accepted log.
#[derive(Debug)]
struct LogEntry {
    to: String,
    message_id: String,
    accepted_ms: f64,
    copies: u32,
}

#[derive(Debug)]
struct Inner {
    faults: Arc<Faults>,
    burst_left: u32,
    senders: HashMap<String, SenderState>,
    pairs: HashMap<String, Bucket>,
    pair_prune_at: usize,
    stats: Stats,
    log: HashMap<String, LogEntry>,
}

/// What a send asks for, after validation.
#[derive(Debug)]
pub(crate) struct SendRequest<'a> {
    pub(crate) api: Api,
    pub(crate) sender: &'a str,
    /// `to` as sent, or the Messenger recipient id.
    pub(crate) recipient: &'a str,
    /// `to`, digits only (WhatsApp); also the pair key.
    pub(crate) recipient_digits: Option<&'a str>,
    pub(crate) callback: Option<&'a str>,
}

/// An accepted send.
#[derive(Debug)]
pub(crate) struct Acceptance {
    pub(crate) message_id: String,
    /// `fail_after_accept` code: send a failed status instead of the configured ones.
    pub(crate) fail_code: Option<i64>,
    /// Lose the response.
    pub(crate) lost: bool,
    /// Delay the response.
    pub(crate) slow: Option<Duration>,
    pub(crate) accepted_ms: f64,
}

/// The `X-Business-Use-Case-Usage` figures for the sender after a request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Usage {
    pub(crate) call_count: u32,
    pub(crate) regain_minutes: u64,
}

/// State shared by the handlers, the webhook sender and the [`crate::Sandbox`] handle.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: SandboxConfig,
    sender_limit: Option<Limit>,
    pair_limit: Option<Limit>,
    instance: u32,
    seq: AtomicU64,
    inner: Mutex<Inner>,
}

impl Shared {
    pub(crate) fn new(config: SandboxConfig) -> Shared {
        let sender_limit = (config.mps.is_finite() && config.mps > 0.0).then(|| {
            // Rounded so that e.g. 80/s × 200 ms is exactly 16, not 16.000000000000004.
            let capacity = (config.mps * config.burst.as_secs_f64() * 1e9).round() / 1e9;
            Limit {
                rate: config.mps,
                capacity: capacity.max(1.0),
            }
        });
        let pair_limit = (!config.pair_interval.is_zero()).then(|| Limit {
            rate: 1.0 / config.pair_interval.as_secs_f64(),
            capacity: f64::from(config.pair_burst.max(1)),
        });
        let faults = Arc::new(config.faults.clone());
        Shared {
            sender_limit,
            pair_limit,
            instance: fastrand::u32(..),
            seq: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                burst_left: faults.burst_130429,
                faults,
                senders: HashMap::new(),
                pairs: HashMap::new(),
                pair_prune_at: PAIR_PRUNE_MIN,
                stats: Stats::default(),
                log: HashMap::new(),
            }),
            config,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding the lock, but a poisoned sandbox is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn faults(&self) -> Arc<Faults> {
        self.lock().faults.clone()
    }

    /// The current faults, with `burst_130429` showing how many forced refusals remain.
    pub(crate) fn current_faults(&self) -> Faults {
        let inner = self.lock();
        let mut faults = (*inner.faults).clone();
        faults.burst_130429 = inner.burst_left;
        faults
    }

    pub(crate) fn set_faults(&self, faults: Faults) {
        let mut inner = self.lock();
        inner.burst_left = faults.burst_130429;
        inner.faults = Arc::new(faults);
    }

    pub(crate) fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    pub(crate) fn reset(&self) {
        let mut inner = self.lock();
        inner.stats = Stats::default();
        inner.senders.clear();
        inner.pairs.clear();
        inner.pair_prune_at = PAIR_PRUNE_MIN;
        inner.log.clear();
    }

    pub(crate) fn accepted(&self, prefix: &str) -> Vec<Accepted> {
        let inner = self.lock();
        let mut out: Vec<Accepted> = inner
            .log
            .iter()
            .filter(|(callback, _)| callback.starts_with(prefix))
            .map(|(callback, e)| Accepted {
                callback: callback.clone(),
                to: e.to.clone(),
                message_id: e.message_id.clone(),
                accepted_unix_ms: e.accepted_ms,
                copies: e.copies,
            })
            .collect();
        drop(inner);
        out.sort_by(|a, b| {
            a.accepted_unix_ms
                .total_cmp(&b.accepted_unix_ms)
                .then_with(|| a.callback.cmp(&b.callback))
        });
        out
    }

    /// Counts an error answered before the send decision (auth, validation).
    pub(crate) fn record_error(&self, code: i64) {
        record_error(&mut self.lock().stats, code);
    }

    /// Counts webhook outcomes.
    pub(crate) fn record_webhook(&self, delivered: bool, statuses: u64) {
        let mut inner = self.lock();
        if delivered {
            inner.stats.webhooks_sent += 1;
            inner.stats.statuses_sent += statuses;
        } else {
            inner.stats.webhook_failures += 1;
        }
    }

    /// A fresh message id: unique across resets and sandboxes in one process.
    pub(crate) fn message_id(&self, api: Api) -> String {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        match api {
            Api::WhatsApp => format!("wamid.SBX{:08X}{seq:012X}", self.instance),
            Api::Messenger => format!("mid.{:08x}{seq:012x}", self.instance),
        }
    }

    /// Decides a validated send: faults, then the throughput bucket, then the pair bucket;
    /// records the outcome.
    pub(crate) fn decide(&self, req: &SendRequest<'_>) -> Result<Acceptance, MetaError> {
        let now = Instant::now();
        let mut inner = self.lock();
        let faults = inner.faults.clone();
        let result = self.decide_locked(&mut inner, &faults, req, now);
        if let Err(e) = &result {
            record_error(&mut inner.stats, e.code);
        }
        result
    }

    /// The `X-Business-Use-Case-Usage` figures for `sender` now.
    pub(crate) fn usage_now(&self, sender: &str) -> Usage {
        let now = Instant::now();
        let mut inner = self.lock();
        self.usage(&mut inner, sender, now)
    }

    fn decide_locked(
        &self,
        inner: &mut Inner,
        faults: &Faults,
        req: &SendRequest<'_>,
        now: Instant,
    ) -> Result<Acceptance, MetaError> {
        let throughput_code = match req.api {
            Api::WhatsApp => 130429,
            Api::Messenger => 613,
        };
        if let Some(&code) = faults.sender_errors.get(req.sender) {
            return Err(MetaError::new(code));
        }
        if let Some(code) = lookup(&faults.recipient_errors, req) {
            return Err(MetaError::new(code));
        }
        if inner.burst_left > 0 {
            inner.burst_left -= 1;
            return Err(MetaError::new(throughput_code));
        }
        if faults.server_error > 0.0 && fastrand::f64() < faults.server_error {
            return Err(MetaError::new(2));
        }

        // Check both buckets before taking from either: a refused send costs nothing.
        let sender = inner
            .senders
            .entry(req.sender.to_owned())
            .or_insert_with(|| SenderState {
                bucket: self.sender_limit.map(|l| Bucket::full(l, now)),
                window: VecDeque::new(),
            });
        if let (Some(bucket), Some(limit)) = (sender.bucket.as_mut(), self.sender_limit) {
            bucket.refill(limit, now);
            if bucket.tokens < 1.0 {
                return Err(MetaError::new(throughput_code));
            }
        }
        let pair_key = match (self.pair_limit, req.api, req.recipient_digits) {
            (Some(limit), Api::WhatsApp, Some(digits)) => {
                let key = format!("{}\u{0}{digits}", req.sender);
                if let Some(bucket) = inner.pairs.get_mut(&key) {
                    bucket.refill(limit, now);
                    if bucket.tokens < 1.0 {
                        return Err(MetaError::new(131056));
                    }
                }
                Some((key, limit))
            }
            _ => None,
        };

        // Accepted: take the tokens.
        if let Some(state) = inner.senders.get_mut(req.sender) {
            if let Some(bucket) = state.bucket.as_mut() {
                bucket.tokens -= 1.0;
            }
            state.window.push_back(now);
            if let Some(cutoff) = now.checked_sub(Duration::from_secs(1)) {
                while state.window.front().is_some_and(|&t| t <= cutoff) {
                    state.window.pop_front();
                }
            }
            let in_window = state.window.len() as u64;
            inner.stats.max_in_any_second = inner.stats.max_in_any_second.max(in_window);
        }
        if let Some((key, limit)) = pair_key {
            if !inner.pairs.contains_key(&key) && inner.pairs.len() >= inner.pair_prune_at {
                inner.pairs.retain(|_, bucket| {
                    bucket.refill(limit, now);
                    bucket.tokens < limit.capacity
                });
                inner.pair_prune_at = PAIR_PRUNE_MIN.max(inner.pairs.len() * 2);
            }
            inner
                .pairs
                .entry(key)
                .or_insert_with(|| Bucket::full(limit, now))
                .tokens -= 1.0;
        }

        let message_id = self.message_id(req.api);
        let accepted_ms = unix_ms();
        let stats = &mut inner.stats;
        stats.accepted += 1;
        stats.first_accepted_unix_ms.get_or_insert(accepted_ms);
        stats.last_accepted_unix_ms = Some(accepted_ms);
        if let Some(callback) = req.callback {
            match inner.log.get_mut(callback) {
                Some(entry) => {
                    entry.copies = entry.copies.saturating_add(1);
                    inner.stats.duplicate_callbacks += 1;
                }
                None => {
                    inner.log.insert(
                        callback.to_owned(),
                        LogEntry {
                            to: req.recipient.to_owned(),
                            message_id: message_id.clone(),
                            accepted_ms,
                            copies: 1,
                        },
                    );
                    inner.stats.unique_callbacks += 1;
                }
            }
        }
        let lost = faults.lose_response > 0.0 && fastrand::f64() < faults.lose_response;
        if lost {
            inner.stats.lost_responses += 1;
        }
        let slow = (!lost && faults.slow > 0.0 && fastrand::f64() < faults.slow)
            .then(|| Duration::from_millis(faults.slow_ms));
        Ok(Acceptance {
            message_id,
            fail_code: lookup(&faults.fail_after_accept, req),
            lost,
            slow,
            accepted_ms,
        })
    }

    fn usage(&self, inner: &mut Inner, sender: &str, now: Instant) -> Usage {
        let (Some(limit), Some(state)) = (self.sender_limit, inner.senders.get_mut(sender)) else {
            return Usage {
                call_count: 0,
                regain_minutes: 0,
            };
        };
        let Some(bucket) = state.bucket.as_mut() else {
            return Usage {
                call_count: 0,
                regain_minutes: 0,
            };
        };
        bucket.refill(limit, now);
        let used = ((limit.capacity - bucket.tokens) / limit.capacity * 100.0).round();
        let regain_minutes = if bucket.tokens < 1.0 {
            let secs = (1.0 - bucket.tokens) / limit.rate;
            ((secs / 60.0).ceil() as u64).max(1)
        } else {
            0
        };
        Usage {
            call_count: used.clamp(0.0, 100.0) as u32,
            regain_minutes,
        }
    }
}

/// A per-recipient fault: by `to` as sent, then by its digits.
fn lookup(map: &HashMap<String, i64>, req: &SendRequest<'_>) -> Option<i64> {
    if map.is_empty() {
        return None;
    }
    map.get(req.recipient)
        .or_else(|| req.recipient_digits.and_then(|d| map.get(d)))
        .copied()
}

fn record_error(stats: &mut Stats, code: i64) {
    *stats.errors_by_code.entry(code.to_string()).or_insert(0) += 1;
    if code == 130429 || code == 613 {
        stats.limit_errors += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(sender: &'a str, to: &'a str) -> SendRequest<'a> {
        SendRequest {
            api: Api::WhatsApp,
            sender,
            recipient: to,
            recipient_digits: Some(to),
            callback: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn buckets_refill_on_tokio_time() {
        let shared = Shared::new(SandboxConfig {
            mps: 10.0,
            burst: Duration::from_millis(300),
            pair_interval: Duration::from_secs(1),
            pair_burst: 2,
            ..SandboxConfig::default()
        });
        let codes = |n: usize, to: &str| -> Vec<i64> {
            (0..n)
                .map(|_| match shared.decide(&req("p", to)) {
                    Ok(_) => 0,
                    Err(e) => e.code,
                })
                .collect()
        };
        // Capacity 3: the pair limit (2) bites first for one recipient.
        assert_eq!(codes(3, "1"), vec![0, 0, 131056]);
        assert_eq!(codes(2, "2"), vec![0, 130429]);
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(codes(2, "3"), vec![0, 130429]);
        tokio::time::advance(Duration::from_secs(1)).await;
        // Three throughput tokens back, one pair token back for "1".
        assert_eq!(codes(2, "1"), vec![0, 131056]);
        let stats = shared.stats();
        assert_eq!(stats.accepted, 5);
        assert_eq!(stats.limit_errors, 2);
        assert_eq!(stats.errors_by_code.get("131056"), Some(&2));
        // Three at t = 0 and one at t = 0.1 s: capacity + mps × 0.1 s.
        assert_eq!(stats.max_in_any_second, 4);
    }
}
