//! The running engine: producers claim, job tasks run handlers, the completer writes results in
//! batches, the heartbeat renews leases, the elector picks the process that runs maintenance.
//!
//! ```text
//!   wake-ups ──▶ producer (one per queue) ──claim──▶ job tasks ──Completion──▶ completer ──▶ store
//!                     ▲    slots freed                  │                         (batched)
//!                     └─────────────────────────────────┘
//!   heartbeat: renews the leases of this process's in-flight jobs
//!   elector ──leader?──▶ rescuer (expired leases), pruner (archive retention),
//!                        vacuumer (the hot table's dead rows, PostgreSQL)
//! ```
//!
//! Architecture invariant: no service exits on a database error. Each one logs, waits with
//! backoff and tries again, so losing the database (a PostgreSQL restart) pauses work and
//! never kills a worker.

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::admission::Admission;
use crate::clock::Clock;
use crate::config::{EngineConfig, QueueConfig};
use crate::handler::{JobContext, JobError, Registry};
use crate::model::{chrono_duration, later, AttemptError, Completion, Job, JobId, Outcome};
use crate::store::{trim_errors, KeyClaim, RateScope, Store};

/// The name of the maintenance leadership.
pub const MAINTENANCE_LEADER: &str = "maintenance";

struct InFlight {
    attempt: i32,
    abort: AbortHandle,
}

enum CompleterMsg {
    Done(Completion),
    /// Everything sent before this is written (or given up on) when the sender fires.
    Flush(oneshot::Sender<()>),
}

struct Inner {
    store: Arc<dyn Store>,
    registry: Registry,
    config: EngineConfig,
    clock: Arc<dyn Clock>,
    in_flight: Mutex<HashMap<JobId, InFlight>>,
    /// Job tasks not yet ended. Unlike `in_flight` (claims still ours), it counts a task until
    /// it has handed over what it did: shutdown waits for it before the last flush.
    tasks: AtomicUsize,
    completions: mpsc::UnboundedSender<CompleterMsg>,
    is_leader: AtomicBool,
    /// Present: jobs with a rate key start only with a permit from it (see [`Producer::run_limited`]).
    admission: Option<Arc<dyn Admission>>,
    /// Throughput, wait and run times, permits: read by `/metrics`.
    metrics: Arc<crate::metrics::EngineMetrics>,
}

impl Inner {
    fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    fn lease_until(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        later(now, self.config.lease)
    }

    /// Whether this process holds the maintenance leadership (leader-only services check it
    /// each round).
    fn leading(&self) -> bool {
        self.is_leader.load(Ordering::Acquire)
    }

    fn claims(&self) -> Vec<(JobId, i32)> {
        let in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        in_flight.iter().map(|(id, f)| (*id, f.attempt)).collect()
    }
}

/// What a shutdown did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Jobs still running at the timeout, stopped and handed back (attempt not counted).
    pub released: usize,
}

/// A running engine. Dropping it without [`Engine::shutdown`] aborts everything at once, as a
/// crash would (running jobs are then rescued after their lease).
pub struct Engine {
    inner: Arc<Inner>,
    stop_claiming: watch::Sender<bool>,
    stop_services: watch::Sender<bool>,
    producers: Vec<JoinHandle<()>>,
    services: Vec<JoinHandle<()>>,
    completer: Option<JoinHandle<()>>,
}

impl Engine {
    /// Starts producers for the configured queues and the background services. Rate keys are
    /// ignored: see [`Engine::start_limited`].
    pub fn start(
        store: Arc<dyn Store>,
        registry: Registry,
        config: EngineConfig,
        clock: Arc<dyn Clock>,
    ) -> Engine {
        Engine::start_with(store, registry, config, clock, None)
    }

    /// Like [`Engine::start`], but a job with a rate key starts only with a permit from
    /// `admission`. Every process working the same queues must use the same admission.
    pub fn start_limited(
        store: Arc<dyn Store>,
        registry: Registry,
        config: EngineConfig,
        clock: Arc<dyn Clock>,
        admission: Arc<dyn Admission>,
    ) -> Engine {
        Engine::start_with(store, registry, config, clock, Some(admission))
    }

    fn start_with(
        store: Arc<dyn Store>,
        registry: Registry,
        config: EngineConfig,
        clock: Arc<dyn Clock>,
        admission: Option<Arc<dyn Admission>>,
    ) -> Engine {
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            store,
            registry,
            config,
            clock,
            in_flight: Mutex::new(HashMap::new()),
            tasks: AtomicUsize::new(0),
            completions: tx,
            is_leader: AtomicBool::new(false),
            admission,
            metrics: Arc::new(crate::metrics::EngineMetrics::default()),
        });
        let (stop_claiming, claiming_rx) = watch::channel(false);
        let (stop_services, services_rx) = watch::channel(false);
        let producers = inner
            .config
            .queues
            .iter()
            .map(|(name, q)| {
                let producer = Producer::new(inner.clone(), name.clone(), *q);
                let span = info_span!("producer", queue = %name);
                let stop = claiming_rx.clone();
                match producer.inner.admission.clone() {
                    Some(admission) => {
                        tokio::spawn(producer.run_limited(admission, stop).instrument(span))
                    }
                    None => tokio::spawn(producer.run(stop).instrument(span)),
                }
            })
            .collect();
        let completer = Some(tokio::spawn(run_completer(inner.clone(), rx)));
        let mut services = vec![
            tokio::spawn(run_heartbeat(inner.clone(), services_rx.clone())),
            tokio::spawn({
                let store = inner.store.clone();
                let stop = services_rx.clone();
                async move {
                    if let Err(e) = store.listen(stop).await {
                        error!(error = %e, "wake-up listener stopped");
                    }
                }
            }),
        ];
        if inner.config.maintenance {
            services.push(tokio::spawn(run_elector(
                inner.clone(),
                services_rx.clone(),
            )));
            services.push(tokio::spawn(run_rescuer(
                inner.clone(),
                services_rx.clone(),
            )));
            services.push(tokio::spawn(run_pruner(inner.clone(), services_rx.clone())));
            services.push(tokio::spawn(run_vacuumer(inner.clone(), services_rx)));
        }
        info!(worker = %inner.config.worker_id, queues = ?inner.config.queues.keys().collect::<Vec<_>>(), "engine started");
        Engine {
            inner,
            stop_claiming,
            stop_services,
            producers,
            services,
            completer,
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// This engine's measurements, for `/metrics`.
    pub fn metrics(&self) -> Arc<crate::metrics::EngineMetrics> {
        self.inner.metrics.clone()
    }

    pub fn worker_id(&self) -> &str {
        &self.inner.config.worker_id
    }

    /// Whether this process holds the maintenance leadership now.
    pub fn is_leader(&self) -> bool {
        self.inner.is_leader.load(Ordering::Relaxed)
    }

    /// Jobs running in this process now.
    pub fn in_flight(&self) -> usize {
        self.inner
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Graceful shutdown: stop claiming; let in-flight jobs finish for up to
    /// `shutdown_timeout`; stop and release the rest at once (their attempt is not counted),
    /// and give the stopped tasks up to a second to hand over what they did; write every
    /// completion (waiting at least 5 s for the database); give up leadership.
    pub async fn shutdown(mut self) -> ShutdownReport {
        let _ = self.stop_claiming.send(true);
        for p in self.producers.drain(..) {
            let _ = p.await;
        }
        let deadline = Instant::now() + self.inner.config.shutdown_timeout;
        while self.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Whatever is still in the map never sent its completion: stop it and hand it back.
        let left: Vec<(JobId, i32)> = {
            let mut in_flight = self
                .inner
                .in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            in_flight
                .drain()
                .map(|(id, f)| {
                    f.abort.abort();
                    (id, f.attempt)
                })
                .collect()
        };
        let report = ShutdownReport {
            released: left.len(),
        };
        if !left.is_empty() {
            warn!(
                jobs = left.len(),
                "shutdown timeout: releasing jobs still running"
            );
            let mut tries = 0;
            loop {
                match self.inner.store.release(&left, self.inner.now()).await {
                    Ok(_) => break,
                    Err(e) if tries < 5 => {
                        tries += 1;
                        warn!(error = %e, "release failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => {
                        error!(error = %e, "release failed; the rescuer will hand these jobs back after their lease");
                        break;
                    }
                }
            }
        }
        // An aborted task stops at its next await, but one already past its last await (a
        // thread the OS paused, a handler in blocking code) still hands its effect to the
        // completer: wait for it, so that the flush below takes it along.
        let deadline = Instant::now() + ABORTED_TASKS_WAIT;
        while self.inner.tasks.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (ack, done) = oneshot::channel();
        if self
            .inner
            .completions
            .send(CompleterMsg::Flush(ack))
            .is_ok()
        {
            // Bounded on its own: completions are worth waiting for even when jobs were not.
            let _ = tokio::time::timeout(FLUSH_WAIT.max(self.inner.config.shutdown_timeout), done)
                .await;
        }
        if self.is_leader() {
            if let Err(e) = self
                .inner
                .store
                .resign(MAINTENANCE_LEADER, &self.inner.config.worker_id)
                .await
            {
                warn!(error = %e, "could not resign leadership; it lapses after its TTL");
            }
        }
        let _ = self.stop_services.send(true);
        for s in self.services.drain(..) {
            let _ = s.await;
        }
        if let Some(c) = self.completer.take() {
            c.abort();
        }
        if let Some(admission) = &self.inner.admission {
            admission.leave().await;
        }
        info!(released = report.released, "engine stopped");
        report
    }
}

/// How long shutdown waits for aborted job tasks to end before its last flush (on top of
/// `shutdown_timeout`).
const ABORTED_TASKS_WAIT: Duration = Duration::from_secs(1);
/// The least time shutdown gives its last flush of completions.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

impl Drop for Engine {
    fn drop(&mut self) {
        for h in self.producers.iter().chain(&self.services) {
            h.abort();
        }
        if let Some(c) = &self.completer {
            c.abort();
        }
        let in_flight = self
            .inner
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for f in in_flight.values() {
            f.abort.abort();
        }
    }
}

/// Free and used slots of one queue in this process.
struct Slots {
    running: AtomicUsize,
    freed: Notify,
}

struct Producer {
    inner: Arc<Inner>,
    queue: String,
    concurrency: usize,
    slots: Arc<Slots>,
    metrics: Arc<crate::metrics::QueueMetrics>,
}

impl Producer {
    fn new(inner: Arc<Inner>, queue: String, config: QueueConfig) -> Self {
        Producer {
            metrics: inner.metrics.queue(&queue),
            inner,
            queue,
            concurrency: config.concurrency,
            slots: Arc::new(Slots {
                running: AtomicUsize::new(0),
                freed: Notify::new(),
            }),
        }
    }

    async fn run(self, mut stop: watch::Receiver<bool>) {
        let cfg = &self.inner.config;
        let store = self.inner.store.clone();
        let signal = store.wakeups().signal(&self.queue);
        let batch = cfg.claim_batch.min(self.concurrency).max(1);
        let threshold = cfg.claim_threshold.unwrap_or(batch / 2).clamp(1, batch);
        // Work may be waiting: true at start, on a wake-up or poll, and after a full claim.
        let mut more = true;
        let mut refresh_due = true;
        let mut next_due: Option<DateTime<Utc>> = None;
        let mut next_poll = Instant::now() + cfg.poll_interval;
        // When some slots, but fewer than `threshold`, became free; reset by each claim.
        let mut partial_since: Option<Instant> = None;
        let mut failures: u32 = 0;
        while !*stop.borrow() {
            let step: Result<(), crate::error::StoreError> = async {
                let now = self.inner.now();
                if self
                    .promote_due(now, &mut refresh_due, &mut next_due)
                    .await?
                {
                    more = true;
                }
                let free = self
                    .concurrency
                    .saturating_sub(self.slots.running.load(Ordering::Acquire));
                if free == 0 || free >= threshold {
                    partial_since = None;
                } else if partial_since.is_none() {
                    partial_since = Some(Instant::now());
                }
                let ready = free >= threshold
                    || partial_since.is_some_and(|t| t.elapsed() >= cfg.fetch_cooldown);
                if more && ready {
                    let limit = free.min(batch);
                    partial_since = None;
                    let started = Instant::now();
                    let jobs = store
                        .claim(
                            &self.queue,
                            &cfg.worker_id,
                            limit,
                            now,
                            self.inner.lease_until(now),
                        )
                        .await?;
                    more = jobs.len() == limit;
                    debug!(
                        claimed = jobs.len(),
                        limit,
                        micros = started.elapsed().as_micros() as u64,
                        "claimed"
                    );
                    self.spawn_all(jobs);
                }
                Ok(())
            }
            .await;
            match step {
                Ok(()) => failures = 0,
                Err(e) => {
                    refresh_due = true;
                    more = true;
                    back_off(&mut failures, &e, &mut stop).await;
                    continue;
                }
            }
            let free = self
                .concurrency
                .saturating_sub(self.slots.running.load(Ordering::Acquire));
            if more && free >= threshold {
                // Slots freed while we claimed: claim again at once.
                continue;
            }
            if more && free > 0 && partial_since.is_none() {
                partial_since = Some(Instant::now());
            }
            let due_in = next_due.map(|d| {
                (d - self.inner.now())
                    .to_std()
                    .unwrap_or(Duration::ZERO)
                    .min(cfg.poll_interval)
            });
            let cooldown_at = partial_since.map(|t| t + cfg.fetch_cooldown);
            tokio::select! {
                _ = stop.changed() => {}
                _ = signal.notify.notified() => {
                    more = true;
                    if let Some(at) = signal.take_next_due() {
                        next_due = Some(next_due.map_or(at, |d| d.min(at)));
                    }
                }
                // A slot freed while work may be waiting: check whether enough are free.
                _ = self.slots.freed.notified(), if more && free < threshold => {}
                _ = tokio::time::sleep_until(cooldown_at.unwrap_or_else(Instant::now)), if more && cooldown_at.is_some() => {}
                _ = tokio::time::sleep(due_in.unwrap_or(Duration::ZERO)), if due_in.is_some() => {}
                _ = tokio::time::sleep_until(next_poll) => {
                    more = true;
                    refresh_due = true;
                    next_poll = Instant::now() + cfg.poll_interval;
                }
            }
        }
        debug!("producer stopped");
    }

    /// The producer of an engine with an [`Admission`]: jobs without a rate key are claimed as
    /// usual; a rate key's jobs are claimed only as far as its permits go.
    ///
    /// It keeps the rate keys that have available jobs (found by a loose index scan on start,
    /// on wake-ups and on every poll) with the instant each may ask for permits again. Each
    /// round visits the keys that are due, round robin, offering each a fair share of the free
    /// slots; a key's claim takes its highest priority jobs first, so interactive sends overtake
    /// a broadcast on the same channel. A key without permits costs nothing until its next
    /// permit is due: no slot waits, no job is claimed and put back, and other keys go on.
    async fn run_limited(self, admission: Arc<dyn Admission>, mut stop: watch::Receiver<bool>) {
        let cfg = &self.inner.config;
        let store = self.inner.store.clone();
        let signal = store.wakeups().signal(&self.queue);
        let batch = cfg.claim_batch.min(self.concurrency).max(1);
        // Key-less jobs are claimed in batches, like the plain producer's: with fewer than
        // `threshold` free slots, wait up to `fetch_cooldown` for more to free.
        let threshold = cfg.claim_threshold.unwrap_or(batch / 2).clamp(1, batch);
        let mut partial_since: Option<Instant> = None;
        // Rate keys with available jobs, and when each may ask for permits next.
        let mut keys: BTreeMap<String, Instant> = BTreeMap::new();
        // Where the next round starts, so every key gets its turn at the free slots first.
        let mut cursor: Option<String> = None;
        // Where the next scan for keys starts (None: from the first key).
        let mut scan_after: Option<String> = None;
        let mut scan = true;
        let mut scan_task: Option<JoinHandle<Result<Vec<String>, crate::error::StoreError>>> = None;
        let mut scan_result = None;
        let mut unkeyed_more = true;
        let mut refresh_due = true;
        let mut next_due: Option<DateTime<Utc>> = None;
        let mut next_poll = Instant::now() + cfg.poll_interval;
        // Keys ask again on one grid of `rate_tick`s (see `on_grid`).
        let origin = Instant::now();
        let mut failures: u32 = 0;
        while !*stop.borrow() {
            let step: Result<(), crate::error::StoreError> = async {
                let now = self.inner.now();
                if self
                    .promote_due(now, &mut refresh_due, &mut next_due)
                    .await?
                {
                    scan = true;
                    unkeyed_more = true;
                }
                // The key scan runs beside the rounds, never in their way: on a busy hot
                // table it walks the dead index entries of every claimed job (tens of ms),
                // and the known keys' rounds must keep their tick meanwhile.
                // Taken out only with its result in hand: a finished task's handle can still
                // answer Pending when this task's cooperative budget is spent.
                if scan_task.as_ref().is_some_and(JoinHandle::is_finished) {
                    if let Some(result) = scan_task.as_mut().and_then(|t| t.now_or_never()) {
                        scan_task = None;
                        scan_result = Some(result);
                    }
                }
                if let Some(result) = scan_result.take() {
                    match result {
                        Ok(Ok(found)) => {
                            // More keys than one scan takes: the next scan goes on after the
                            // last one, so every key is found in turn.
                            scan_after = (found.len() == cfg.max_rate_keys)
                                .then(|| found.last().cloned())
                                .flatten();
                            let at = Instant::now();
                            for key in found {
                                if keys.len() >= cfg.max_rate_keys && !keys.contains_key(&key) {
                                    break;
                                }
                                keys.entry(key).or_insert(at);
                            }
                        }
                        // Tried again at the next poll (a wake-up may ask sooner).
                        Ok(Err(e)) => warn!(error = %e, "producer: rate key scan failed"),
                        Err(e) => warn!(error = %e, "producer: rate key scan task failed"),
                    }
                }
                if scan && scan_task.is_none() {
                    scan = false;
                    let (store, queue, after, max) = (
                        store.clone(),
                        self.queue.clone(),
                        scan_after.clone(),
                        cfg.max_rate_keys,
                    );
                    scan_task = Some(tokio::spawn(async move {
                        store.ready_rate_keys(&queue, after.as_deref(), max).await
                    }));
                }
                let free = self.free();
                if free == 0 || free >= threshold {
                    partial_since = None;
                } else if partial_since.is_none() {
                    partial_since = Some(Instant::now());
                }
                let ready = free >= threshold
                    || partial_since.is_some_and(|t| t.elapsed() >= cfg.fetch_cooldown);
                if unkeyed_more && free > 0 && ready {
                    partial_since = None;
                    let limit = free.min(batch);
                    let jobs = store
                        .claim_scoped(
                            &self.queue,
                            RateScope::Unlimited,
                            &cfg.worker_id,
                            limit,
                            now,
                            self.inner.lease_until(now),
                        )
                        .await?;
                    unkeyed_more = jobs.len() == limit;
                    self.spawn_all(jobs);
                }
                let at = Instant::now();
                let mut due: Vec<String> = keys
                    .iter()
                    .filter(|(_, next)| **next <= at)
                    .map(|(k, _)| k.clone())
                    .collect();
                if let Some(c) = &cursor {
                    let split = due.partition_point(|k| k <= c);
                    due.rotate_left(split);
                }
                // Every due key asks for its permits first, all in one call (one round trip
                // when the limits are shared through Redis: a round's first permits must not
                // wait on the other keys' round trips before they are used); then one claim
                // takes each key's jobs up to its grant, so a round over a hundred channels is
                // one statement. The free slots are shared out evenly, one at least, as far as
                // they go. Slots that keys at their limit left unused are offered again in a
                // second call (only then): first to the due keys that did not get to ask, one
                // each, else to the keys that took their whole share, so a fast channel among
                // slow ones is not held to an even share of the slots. Keys still left over ask
                // in a later round, from the cursor on.
                let round = at;
                let free = self.free();
                let mut asked = due.len().min(free);
                let share = (free / asked.max(1)).clamp(1, batch);
                let asks: Vec<(&str, u32)> = due[..asked]
                    .iter()
                    .map(|k| (k.as_str(), share as u32))
                    .collect();
                let mut grants = if asks.is_empty() {
                    Vec::new()
                } else {
                    admission.acquire_many(&asks).await
                };
                let nothing = crate::limit::Grant {
                    granted: 0,
                    next_in: Duration::ZERO,
                };
                // A limiter that answered for fewer keys granted the rest nothing.
                grants.resize(asked, nothing);
                let mut requested = vec![share as u64; asked];
                let used: usize = grants.iter().map(|g| g.granted as usize).sum();
                let left = free.saturating_sub(used);
                // Not the remainder of an even split: only slots a key left unused.
                let unused = grants.iter().any(|g| (g.granted as usize) < share);
                let (targets, more): (Vec<usize>, usize) = if left == 0 || !unused {
                    (Vec::new(), 0)
                } else if asked < due.len() {
                    let n = (due.len() - asked).min(left);
                    ((asked..asked + n).collect(), 1)
                } else if share < batch {
                    let hungry: Vec<usize> = (0..asked)
                        .filter(|i| grants[*i].granted as usize == share)
                        .take(left)
                        .collect();
                    let more = (left / hungry.len().max(1)).clamp(1, batch - share);
                    (hungry, more)
                } else {
                    (Vec::new(), 0)
                };
                if !targets.is_empty() {
                    let asks: Vec<(&str, u32)> = targets
                        .iter()
                        .map(|i| (due[*i].as_str(), more as u32))
                        .collect();
                    let mut again = admission.acquire_many(&asks).await;
                    again.resize(targets.len(), nothing);
                    for (i, grant) in targets.iter().zip(again) {
                        if *i < asked {
                            grants[*i].granted += grant.granted;
                            grants[*i].next_in = grant.next_in;
                            requested[*i] += more as u64;
                        } else {
                            grants.push(grant);
                            requested.push(more as u64);
                        }
                    }
                    asked = grants.len();
                }
                if let Some(last) = due[..asked].last() {
                    cursor = Some(last.clone());
                }
                let mut wants: Vec<Want> = Vec::new();
                for ((key, grant), requested) in
                    due.into_iter().take(asked).zip(grants).zip(requested)
                {
                    let next = on_grid(origin, cfg.rate_tick, round, grant.next_in);
                    let permits = self.inner.metrics.key(&key);
                    permits.requested.fetch_add(requested, Ordering::Relaxed);
                    if grant.granted == 0 {
                        permits.denied.fetch_add(1, Ordering::Relaxed);
                        keys.insert(key, next);
                        continue;
                    }
                    permits
                        .granted
                        .fetch_add(u64::from(grant.granted), Ordering::Relaxed);
                    let max_priority = admission.max_priority(&key).await;
                    wants.push(Want {
                        key,
                        granted: grant.granted,
                        max_priority,
                        next,
                    });
                }
                if wants.is_empty() {
                    return Ok(());
                }
                let now = self.inner.now();
                let claims: Vec<KeyClaim<'_>> = wants
                    .iter()
                    .map(|w| KeyClaim {
                        key: &w.key,
                        limit: w.granted as usize,
                        max_priority: w.max_priority,
                    })
                    .collect();
                let claimed = store
                    .claim_keys(
                        &self.queue,
                        &claims,
                        &cfg.worker_id,
                        now,
                        self.inner.lease_until(now),
                    )
                    .await;
                let jobs = match claimed {
                    Ok(jobs) => jobs,
                    Err(e) => {
                        for w in &wants {
                            admission.refund(&w.key, w.granted).await;
                            self.inner
                                .metrics
                                .key(&w.key)
                                .refunded
                                .fetch_add(u64::from(w.granted), Ordering::Relaxed);
                        }
                        return Err(e);
                    }
                };
                let mut got: HashMap<&str, u32> = HashMap::new();
                for job in &jobs {
                    if let Some(key) = job.rate_key.as_deref() {
                        *got.entry(key).or_default() += 1;
                    }
                }
                for w in wants {
                    let claimed = got.get(w.key.as_str()).copied().unwrap_or(0);
                    debug!(key = %w.key, granted = w.granted, claimed, "claimed for rate key");
                    if claimed < w.granted {
                        let unused = w.granted - claimed;
                        admission.refund(&w.key, unused).await;
                        self.inner
                            .metrics
                            .key(&w.key)
                            .refunded
                            .fetch_add(u64::from(unused), Ordering::Relaxed);
                        // The key ran out of available jobs; the next scan finds it again.
                        keys.remove(&w.key);
                    } else {
                        keys.insert(w.key, w.next);
                    }
                }
                self.spawn_all(jobs);
                Ok(())
            }
            .await;
            match step {
                Ok(()) => failures = 0,
                Err(e) => {
                    refresh_due = true;
                    scan = true;
                    unkeyed_more = true;
                    back_off(&mut failures, &e, &mut stop).await;
                    continue;
                }
            }
            let free = self.free();
            let at = Instant::now();
            let key_due = keys.values().min().copied();
            let key_ready = key_due.is_some_and(|k| k <= at);
            if (free > 0 && key_ready) || (unkeyed_more && free >= threshold) {
                // Slots freed while we claimed (short jobs finish that fast): go again at once.
                continue;
            }
            if unkeyed_more && free > 0 && partial_since.is_none() {
                partial_since = Some(at);
            }
            let cooldown_at = partial_since
                .filter(|_| unkeyed_more)
                .map(|t| t + cfg.fetch_cooldown);
            // Work is waiting for a slot, not for a permit: wake when one frees.
            let slot_bound = (free == 0 && key_ready) || (unkeyed_more && free < threshold);
            let due_in = next_due.map(|d| {
                (d - self.inner.now())
                    .to_std()
                    .unwrap_or(Duration::ZERO)
                    .min(cfg.poll_interval)
            });
            tokio::select! {
                _ = stop.changed() => {}
                _ = signal.notify.notified() => {
                    // Only where new work was announced: each look is a statement.
                    let due = signal.take_due();
                    scan |= due.keyed;
                    unkeyed_more |= due.unkeyed;
                    if let Some(at) = signal.take_next_due() {
                        next_due = Some(next_due.map_or(at, |d| d.min(at)));
                    }
                }
                _ = self.slots.freed.notified(), if slot_bound => {}
                result = async {
                    match scan_task.as_mut() {
                        Some(task) => task.await,
                        None => std::future::pending().await,
                    }
                }, if scan_task.is_some() => {
                    scan_task = None;
                    scan_result = Some(result);
                }
                _ = tokio::time::sleep_until(cooldown_at.unwrap_or(at)), if cooldown_at.is_some() => {}
                _ = tokio::time::sleep_until(key_due.unwrap_or(at)), if free > 0 && key_due.is_some() => {}
                _ = tokio::time::sleep(due_in.unwrap_or(Duration::ZERO)), if due_in.is_some() => {}
                _ = tokio::time::sleep_until(next_poll) => {
                    scan = true;
                    unkeyed_more = true;
                    refresh_due = true;
                    next_poll = Instant::now() + cfg.poll_interval;
                }
            }
        }
        debug!("producer stopped");
    }

    /// Makes this queue's due scheduled and retryable jobs available, looking up the earliest
    /// `run_at` again when asked to or after promoting. True if it promoted.
    async fn promote_due(
        &self,
        now: DateTime<Utc>,
        refresh_due: &mut bool,
        next_due: &mut Option<DateTime<Utc>>,
    ) -> Result<bool, crate::error::StoreError> {
        let store = &self.inner.store;
        if *refresh_due {
            *next_due = store.next_due(&self.queue).await?;
            *refresh_due = false;
        }
        if !next_due.is_some_and(|d| d <= now) {
            return Ok(false);
        }
        let promoted = store.promote(&self.queue, now).await?;
        debug!(promoted, "promoted due jobs");
        *next_due = store.next_due(&self.queue).await?;
        Ok(true)
    }

    fn free(&self) -> usize {
        self.concurrency
            .saturating_sub(self.slots.running.load(Ordering::Acquire))
    }

    fn spawn_all(&self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        self.slots.running.fetch_add(jobs.len(), Ordering::AcqRel);
        // Held while spawning, so a job that finishes at once still finds itself in the map.
        let mut in_flight = self
            .inner
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for job in jobs {
            let (id, attempt) = (job.id, job.attempt);
            let inner = self.inner.clone();
            let slots = self.slots.clone();
            let metrics = self.metrics.clone();
            if let Some(claimed) = job.attempted_at {
                metrics
                    .wait
                    .observe((claimed - job.run_at).to_std().unwrap_or_default());
            }
            let span = info_span!("job", id, kind = %job.kind, attempt);
            // Made before the task: a task aborted before its first poll drops it unrun.
            let counted = TaskCounted::new(inner.clone());
            let handle = tokio::spawn(
                async move {
                    // Dropped last, once the completion has been handed over.
                    let _counted = counted;
                    let _guard = JobGuard {
                        inner: inner.clone(),
                        slots,
                        id,
                        attempt,
                    };
                    let started = Instant::now();
                    let completion = execute(&inner, job).await;
                    metrics.run.observe(started.elapsed());
                    let counter = match completion.outcome {
                        Outcome::Completed => &metrics.completed,
                        Outcome::Retry { .. } => &metrics.retried,
                        Outcome::Snooze { .. } => &metrics.snoozed,
                        Outcome::Discard { .. } => &metrics.discarded,
                        Outcome::Cancel { .. } => &metrics.cancelled,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    // Leaving the map and handing over the result is one step: if shutdown
                    // released this claim meanwhile, the claim is no longer ours to finish.
                    // The entry must be this attempt's: a claim rescued from under a slow task
                    // and claimed again here has the job's entry now.
                    let mut in_flight = inner.in_flight.lock().unwrap_or_else(|e| e.into_inner());
                    if remove_claim(&mut in_flight, id, attempt) {
                        let _ = inner.completions.send(CompleterMsg::Done(completion));
                    } else if let Some(effect) = completion.effect_only() {
                        // What the attempt did outside is recorded all the same.
                        let _ = inner.completions.send(CompleterMsg::Done(effect));
                    }
                    // Before the guard, which takes the same lock.
                    drop(in_flight);
                }
                .instrument(span),
            );
            in_flight.insert(
                id,
                InFlight {
                    attempt,
                    abort: handle.abort_handle(),
                },
            );
        }
    }
}

/// When a rate key may ask for permits again: at least `next_in` (when its limiter has the next
/// permit) and a `tick` after the round that asked (`round`), put on the producer's grid of
/// ticks from `origin`, up to half a tick early. Without the grid each key keeps the phase of
/// its first visit, so a hundred keys wake the producer a hundred times a tick, each wake
/// claiming for one key; on the grid one wake and one claim serve every due key. Measuring
/// from the round rather than from now keeps a round that started late from skipping a tick.
/// Asking a little early costs nothing: the limiter grants what is available, and the rest
/// waits in its burst for the next tick.
fn on_grid(origin: Instant, tick: Duration, round: Instant, next_in: Duration) -> Instant {
    // Capped: a limiter that names a wait of years still gets asked again within the hour.
    let at = round + next_in.max(tick).min(Duration::from_secs(3600));
    let tick_ns = tick.as_nanos().max(1);
    let since = at
        .saturating_duration_since(origin)
        .as_nanos()
        .saturating_sub(tick_ns / 2);
    let ticks = since.div_ceil(tick_ns);
    u64::try_from(ticks.saturating_mul(tick_ns))
        .ok()
        .and_then(|offset| origin.checked_add(Duration::from_nanos(offset)))
        .map_or(at, |aligned| aligned.max(origin))
}

/// A rate key's permits in a round of [`Producer::run_limited`], until the round's claim.
struct Want {
    key: String,
    granted: u32,
    /// Only jobs this urgent (see [`Admission::max_priority`]).
    max_priority: Option<i16>,
    /// When the key may ask again if it still has jobs.
    next: Instant,
}

/// A producer's pause after a database error: 200 ms doubling to 5 s, cut short by a stop.
async fn back_off(
    failures: &mut u32,
    error: &crate::error::StoreError,
    stop: &mut watch::Receiver<bool>,
) {
    *failures += 1;
    let wait =
        Duration::from_millis(100 * 2u64.pow((*failures).min(6))).min(Duration::from_secs(5));
    warn!(error = %error, retry_in = ?wait, "producer: database error");
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        _ = stop.changed() => {}
    }
}

/// Frees a job's slot however its task ends: finished, aborted, or stopped by a bug that panics
/// outside the handler. A job that never reports back also leaves the in-flight set, so its
/// lease is no longer renewed and the rescuer hands it back.
struct JobGuard {
    inner: Arc<Inner>,
    slots: Arc<Slots>,
    id: JobId,
    attempt: i32,
}

/// Takes the claim (id, attempt) out of the in-flight map; false if the job's entry is gone
/// (released at shutdown) or belongs to another claim of it.
fn remove_claim(in_flight: &mut HashMap<JobId, InFlight>, id: JobId, attempt: i32) -> bool {
    if in_flight.get(&id).is_some_and(|f| f.attempt == attempt) {
        in_flight.remove(&id);
        return true;
    }
    false
}

/// Counts a job task in `Inner::tasks` until the task ends or is dropped unrun.
struct TaskCounted(Arc<Inner>);

impl TaskCounted {
    fn new(inner: Arc<Inner>) -> TaskCounted {
        inner.tasks.fetch_add(1, Ordering::AcqRel);
        TaskCounted(inner)
    }
}

impl Drop for TaskCounted {
    fn drop(&mut self) {
        self.0.tasks.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        remove_claim(
            &mut self
                .inner
                .in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
            self.id,
            self.attempt,
        );
        self.slots.running.fetch_sub(1, Ordering::AcqRel);
        self.slots.freed.notify_one();
    }
}

/// Runs one attempt and decides what becomes of the job.
async fn execute(inner: &Inner, job: Job) -> Completion {
    let (id, attempt, max_attempts) = (job.id, job.attempt, job.max_attempts);
    let mut errors = job.errors.clone();
    let registered = inner.registry.get(&job.kind).cloned();
    let mut effect = None;
    let result = match &registered {
        None => Err(JobError::Discard(format!(
            "no handler registered for kind {:?}",
            job.kind
        ))),
        Some(r) => {
            let ctx = JobContext::new(job);
            let run = AssertUnwindSafe(r.handler.run(&ctx)).catch_unwind();
            let result = match tokio::time::timeout(r.policy.timeout, run).await {
                Ok(Ok(result)) => result,
                Ok(Err(panic)) => Err(JobError::retry(format!(
                    "handler panicked: {}",
                    panic_message(&panic)
                ))),
                Err(_) => Err(JobError::retry(format!(
                    "handler timed out after {:?}",
                    r.policy.timeout
                ))),
            };
            effect = ctx.take_effect();
            result
        }
    };
    let now = inner.now();
    let mut note = |message: String| {
        errors.push(AttemptError {
            at: now,
            attempt,
            message: crate::model::clean_message(message),
        });
        trim_errors(&mut errors);
    };
    let outcome = match result {
        Ok(()) => {
            return Completion {
                id,
                attempt,
                outcome: Outcome::Completed,
                errors: None,
                finished_at: now,
                effect,
            }
        }
        Err(JobError::Snooze(d)) => {
            return Completion {
                id,
                attempt,
                outcome: Outcome::Snooze {
                    run_at: later(now, d),
                },
                errors: None,
                finished_at: now,
                effect,
            }
        }
        Err(JobError::Retry { error, after }) => {
            note(error.clone());
            if attempt >= max_attempts {
                Outcome::Discard {
                    reason: format!("attempts exhausted ({attempt}/{max_attempts}): {error}"),
                }
            } else {
                let delay = after.unwrap_or_else(|| {
                    registered
                        .as_ref()
                        .map(|r| r.policy.backoff.delay(attempt))
                        .unwrap_or_default()
                });
                Outcome::Retry {
                    run_at: later(now, delay),
                    error,
                }
            }
        }
        Err(JobError::Discard(reason)) => {
            note(format!("discarded: {reason}"));
            Outcome::Discard { reason }
        }
        Err(JobError::Cancel(reason)) => {
            note(format!("cancelled: {reason}"));
            Outcome::Cancel { reason }
        }
    };
    match &outcome {
        Outcome::Discard { reason } => warn!(reason, "job discarded"),
        Outcome::Retry { error, run_at } => debug!(error, %run_at, "job will retry"),
        _ => {}
    }
    Completion {
        id,
        attempt,
        outcome,
        errors: Some(errors),
        finished_at: now,
        effect,
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Writes completions in batches: whatever arrived while the previous batch was being written
/// goes in the next one, so batches grow with load and latency stays low when idle.
///
/// A write that fails for a passing reason (connection lost, database restarting, lock
/// contention) is retried until it lands: the jobs stay `running` meanwhile. Their leases are no
/// longer renewed (they left the in-flight set), so an outage longer than the lease can get a
/// finished job rescued and run again: at-least-once, never lost. A write the database refuses
/// for its content is bisected to find the completion it refuses; that one is given up after a
/// few tries, so one bad row never stalls everyone's completions. Its job stays `running`
/// until its lease lapses, and the rescuer then hands it back: it runs again, it is not lost.
async fn run_completer(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<CompleterMsg>) {
    let max = inner.config.completion_batch;
    let mut batch: Vec<Completion> = Vec::new();
    let mut acks: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        if batch.is_empty() && acks.is_empty() {
            match rx.recv().await {
                Some(CompleterMsg::Done(c)) => batch.push(c),
                Some(CompleterMsg::Flush(ack)) => acks.push(ack),
                None => return,
            }
        }
        while batch.len() < max {
            match rx.try_recv() {
                Ok(CompleterMsg::Done(c)) => batch.push(c),
                Ok(CompleterMsg::Flush(ack)) => {
                    acks.push(ack);
                    break;
                }
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            write_completions(&inner, std::mem::take(&mut batch)).await;
        }
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
    }
}

/// Tries a refused single completion this many times before giving it up.
const REFUSED_TRIES: u32 = 3;

async fn write_completions(inner: &Inner, batch: Vec<Completion>) {
    let mut parts = vec![batch];
    while let Some(mut part) = parts.pop() {
        let mut failures: u32 = 0;
        loop {
            let started = Instant::now();
            let err = match inner.store.complete(&part).await {
                Ok(_) => {
                    debug!(
                        jobs = part.len(),
                        micros = started.elapsed().as_micros() as u64,
                        "completions written"
                    );
                    break;
                }
                Err(e) => e,
            };
            failures += 1;
            if err.is_transient() {
                let wait = Duration::from_millis(50 * 2u64.pow(failures.min(6)))
                    .min(Duration::from_secs(3));
                warn!(error = %err, jobs = part.len(), retry_in = ?wait, "completer: write failed");
                tokio::time::sleep(wait).await;
            } else if part.len() > 1 {
                warn!(error = %err, jobs = part.len(), "completer: write refused; bisecting the batch");
                let right = part.split_off(part.len() / 2);
                parts.push(right);
                parts.push(part);
                break;
            } else if failures >= REFUSED_TRIES {
                error!(
                    error = %err,
                    job = part[0].id,
                    attempt = part[0].attempt,
                    "completer: the database refuses this completion; giving it up (the job will be rescued after its lease and run again)"
                );
                // Its effect may be what the database has nothing against, or the effect may be
                // what it refuses: try the effect alone first (never after the completion),
                // then the completion without it.
                if let Some(effect) = part[0]
                    .effect_only()
                    .filter(|e| e.attempt != part[0].attempt)
                {
                    let mut bare = part[0].clone();
                    bare.effect = None;
                    parts.push(vec![bare]);
                    parts.push(vec![effect]);
                }
                break;
            } else {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// An interval that, after a slow round, waits a whole period again rather than catching up.
fn ticker(period: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Waits for the next tick of a periodic service; false once the service is told to stop.
async fn next_tick(tick: &mut tokio::time::Interval, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = stop.changed() => false,
        _ = tick.tick() => true,
    }
}

async fn run_heartbeat(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut tick = ticker(inner.config.heartbeat_interval);
    while next_tick(&mut tick, &mut stop).await {
        let claims = inner.claims();
        if claims.is_empty() {
            continue;
        }
        let until = inner.lease_until(inner.now());
        if let Err(e) = inner.store.heartbeat(&claims, until).await {
            warn!(error = %e, jobs = claims.len(), "heartbeat failed");
        }
    }
}

async fn run_elector(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut tick = ticker(inner.config.leader_renew_interval);
    while next_tick(&mut tick, &mut stop).await {
        let now = inner.now();
        let until = later(now, inner.config.leader_ttl);
        let leading = match inner
            .store
            .try_lead(MAINTENANCE_LEADER, &inner.config.worker_id, now, until)
            .await
        {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "leader election failed");
                false
            }
        };
        let was = inner.is_leader.swap(leading, Ordering::AcqRel);
        if leading != was {
            info!(leading, "maintenance leadership changed");
        }
    }
}

/// Leader only: hands back the jobs of workers that stopped renewing their leases.
async fn run_rescuer(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut tick = ticker(inner.config.rescue_interval);
    while next_tick(&mut tick, &mut stop).await {
        if !inner.leading() {
            continue;
        }
        match rescue_once(&*inner.store, inner.now()).await {
            Ok(r) if r.retried + r.discarded > 0 => {
                info!(
                    retried = r.retried,
                    discarded = r.discarded,
                    "rescued jobs with expired leases"
                )
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "rescuer failed"),
        }
    }
}

/// One pass of the rescuer: every running job whose lease expired before `now` is handed back
/// (`available` at once, the lost attempt counted) or, if that was its last attempt, discarded.
pub async fn rescue_once(
    store: &dyn Store,
    now: DateTime<Utc>,
) -> crate::error::Result<crate::store::RescueReport> {
    let mut report = crate::store::RescueReport::default();
    loop {
        let expired = store.expired(now, 1000).await?;
        if expired.is_empty() {
            return Ok(report);
        }
        let full = expired.len() == 1000;
        let completions: Vec<Completion> = expired
            .into_iter()
            .map(|job| {
                let message = format!(
                    "lease expired: worker {} stopped renewing it (crashed or cut off)",
                    job.attempted_by.as_deref().unwrap_or("?")
                );
                let mut errors = job.errors;
                errors.push(AttemptError {
                    at: now,
                    attempt: job.attempt,
                    message: message.clone(),
                });
                trim_errors(&mut errors);
                let outcome = if job.attempt >= job.max_attempts {
                    report.discarded += 1;
                    Outcome::Discard {
                        reason: format!("attempts exhausted: {message}"),
                    }
                } else {
                    report.retried += 1;
                    Outcome::Retry {
                        run_at: now,
                        error: message,
                    }
                };
                Completion {
                    id: job.id,
                    attempt: job.attempt,
                    outcome,
                    errors: Some(errors),
                    finished_at: now,
                    effect: None,
                }
            })
            .collect();
        store.complete(&completions).await?;
        if !full {
            return Ok(report);
        }
    }
}

/// Leader only: vacuums the hot table when dead row versions pile up (see [`Store::vacuum_hot`]).
async fn run_vacuumer(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut tick = ticker(inner.config.vacuum_interval);
    while next_tick(&mut tick, &mut stop).await {
        if !inner.leading() {
            continue;
        }
        let started = Instant::now();
        match inner.store.vacuum_hot(inner.config.vacuum_dead_rows).await {
            Ok(true) => debug!(
                micros = started.elapsed().as_micros() as u64,
                "vacuumed the hot table"
            ),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "vacuum of the hot table failed"),
        }
    }
}

/// Leader only: deletes archived jobs past their retention.
async fn run_pruner(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut tick = ticker(inner.config.prune_interval);
    while next_tick(&mut tick, &mut stop).await {
        if !inner.leading() {
            continue;
        }
        let now = inner.now();
        let before = |retention| {
            now.checked_sub_signed(chrono_duration(retention))
                .unwrap_or(DateTime::<Utc>::MIN_UTC)
        };
        let completed_before = before(inner.config.completed_retention);
        let others_before = before(inner.config.failed_retention);
        let mut total = 0;
        loop {
            match inner
                .store
                .prune(completed_before, others_before, inner.config.prune_batch)
                .await
            {
                Ok(n) => {
                    total += n;
                    if n < inner.config.prune_batch as u64 || *stop.borrow() {
                        break;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "pruner failed");
                    break;
                }
            }
        }
        if total > 0 {
            info!(deleted = total, "pruned archived jobs");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(20);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn keys_come_due_on_the_grid() {
        let origin = Instant::now();
        // A round on a grid point: the next one.
        assert_eq!(
            on_grid(origin, TICK, origin + ms(40), ms(0)),
            origin + ms(60)
        );
        // A round that started late (up to half a tick) does not skip a tick.
        assert_eq!(
            on_grid(origin, TICK, origin + ms(49), ms(0)),
            origin + ms(60)
        );
        // Later than that, the grid point after.
        assert_eq!(
            on_grid(origin, TICK, origin + ms(51), ms(0)),
            origin + ms(80)
        );
        // A permit due later than a tick: the grid point nearest it, at most half a tick early.
        assert_eq!(
            on_grid(origin, TICK, origin + ms(40), ms(35)),
            origin + ms(80)
        );
        assert_eq!(
            on_grid(origin, TICK, origin + ms(40), ms(25)),
            origin + ms(60)
        );
        // Two keys asked at different moments of one round come due together.
        assert_eq!(
            on_grid(origin, TICK, origin + ms(41), ms(12)),
            on_grid(origin, TICK, origin + ms(45), ms(3))
        );
    }

    #[test]
    fn a_wait_of_years_is_asked_again_within_the_hour() {
        let origin = Instant::now();
        let next = on_grid(origin, TICK, origin, Duration::MAX);
        assert!(next <= origin + Duration::from_secs(3600) + TICK, "capped");
        assert!(next >= origin + Duration::from_secs(3599), "not early");
        // A zero tick does not divide by zero.
        assert_eq!(
            on_grid(origin, Duration::ZERO, origin, ms(5)),
            origin + ms(5)
        );
    }
}
