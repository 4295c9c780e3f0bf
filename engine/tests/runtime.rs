//! The running engine end to end: real handlers, every test on PostgreSQL and SQLite (but the
//! PostgreSQL restart test, which runs its own private cluster).
//!
//! No test asserts on timing: each waits, bounded, for the state it expects (see `common::wait_*`).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use herald_engine::model::{AttemptError, JobFilter, DEFAULT_QUEUE};
use herald_engine::{
    Backoff, Client, Clock, Engine, EngineConfig, Job, JobContext, JobError, JobId, JobState,
    KindPolicy, ManualClock, NewJob, QueueConfig, Registry, Store, SystemClock, Worker,
};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;

use common::{eventually, unique_name, wait_for_count, wait_for_state};

conformance!(
    jobs_run_to_completion,
    retry_waits_for_the_backoff_on_the_engine_clock,
    retry_after_overrides_the_policy_backoff,
    panicking_handler_is_a_failed_attempt,
    hostile_error_messages_are_stored_safely,
    endless_snooze_is_stored_not_a_crash,
    handler_timeout_is_a_failed_attempt,
    exhausted_attempts_discard,
    discard_error_discards_at_once,
    cancel_error_cancels,
    snooze_reschedules_without_counting_the_attempt,
    unknown_kind_and_bad_payload_are_discarded,
    ordering_key_runs_one_at_a_time_in_enqueue_order,
    different_ordering_keys_run_in_parallel,
    graceful_shutdown_releases_stuck_jobs,
    crashed_worker_jobs_are_rescued,
    paused_queue_runs_nothing_until_resumed,
    effects_are_written_with_the_completion,
    an_effect_handed_over_after_shutdown_released_the_claim_is_kept,
);

// ---------------------------------------------------------------------------------------------
// Fixtures

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0)
        .single()
        .expect("valid time")
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn chrono_secs(n: i64) -> chrono::Duration {
    chrono::Duration::seconds(n)
}

/// Fast settings: a crashed worker's jobs are rescued within a few seconds.
fn config(concurrency: usize) -> EngineConfig {
    let mut queues = BTreeMap::new();
    queues.insert(DEFAULT_QUEUE.to_owned(), QueueConfig { concurrency });
    let config = EngineConfig {
        worker_id: unique_name("worker"),
        queues,
        poll_interval: ms(50),
        lease: secs(2),
        heartbeat_interval: ms(500),
        rescue_interval: ms(200),
        leader_renew_interval: ms(100),
        leader_ttl: secs(1),
        shutdown_timeout: secs(2),
        ..EngineConfig::default()
    };
    config.validate().expect("the test configuration is valid");
    config
}

/// No jitter, so the delay after attempt 1 is exactly `base`.
fn policy(base: Duration) -> KindPolicy {
    KindPolicy {
        backoff: Backoff {
            base,
            factor: 2.0,
            max: secs(3600),
            jitter: 0.0,
        },
        timeout: secs(60),
    }
}

fn system_clock() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

async fn enqueue(client: &Client, job: NewJob) -> JobId {
    client.enqueue(&job).await.expect("enqueue").id
}

async fn get(store: &dyn Store, id: JobId) -> Job {
    store
        .get_job(id)
        .await
        .expect("get_job")
        .expect("the job exists")
}

async fn stop(engine: Engine) {
    let report = engine.shutdown().await;
    assert_eq!(report.released, 0, "no job was left running at shutdown");
}

#[derive(Debug, Deserialize)]
struct Numbered {
    n: i64,
}

// ---------------------------------------------------------------------------------------------
// Workers

/// Counts how often it saw each payload.
struct Record {
    seen: Arc<Mutex<HashMap<i64, usize>>>,
}

#[async_trait]
impl Worker for Record {
    type Args = Numbered;
    const KIND: &'static str = "test.record";

    async fn work(&self, args: Numbered, _ctx: &JobContext) -> Result<(), JobError> {
        *self
            .seen
            .lock()
            .expect("seen lock")
            .entry(args.n)
            .or_default() += 1;
        Ok(())
    }
}

fn record_registry() -> (Registry, Arc<Mutex<HashMap<i64, usize>>>) {
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let mut registry = Registry::new();
    registry.register(Record { seen: seen.clone() });
    (registry, seen)
}

fn numbered(kind: &str, n: i64) -> NewJob {
    NewJob::new(kind, json!({ "n": n }))
}

/// Fails attempt 1 (after the policy's backoff of 30 s, or after `after` when given); succeeds
/// afterwards.
struct FailFirst {
    after: Option<Duration>,
    attempts: Arc<Mutex<Vec<i32>>>,
}

const FLAKY_ERROR: &str = "flaky: the first attempt fails";

#[async_trait]
impl Worker for FailFirst {
    type Args = serde_json::Value;
    const KIND: &'static str = "test.fail_first";

    fn policy(&self) -> KindPolicy {
        policy(secs(30))
    }

    async fn work(&self, _args: serde_json::Value, ctx: &JobContext) -> Result<(), JobError> {
        self.attempts
            .lock()
            .expect("attempts lock")
            .push(ctx.job.attempt);
        if ctx.job.attempt > 1 {
            return Ok(());
        }
        Err(match self.after {
            Some(after) => JobError::retry_after(FLAKY_ERROR, after),
            None => JobError::retry(FLAKY_ERROR),
        })
    }
}

struct Panics;

#[async_trait]
impl Worker for Panics {
    type Args = Numbered;
    const KIND: &'static str = "test.panics";

    fn policy(&self) -> KindPolicy {
        policy(secs(3600))
    }

    async fn work(&self, args: Numbered, _ctx: &JobContext) -> Result<(), JobError> {
        panic!("kaboom {}", args.n);
    }
}

/// Fails with a message no database column should take as it is: NUL characters, and far too
/// long.
struct HostileError;

#[async_trait]
impl Worker for HostileError {
    type Args = Numbered;
    const KIND: &'static str = "test.hostile_error";

    fn policy(&self) -> KindPolicy {
        policy(secs(3600))
    }

    async fn work(&self, args: Numbered, _ctx: &JobContext) -> Result<(), JobError> {
        Err(JobError::retry(format!(
            "bad \u{0}body {} {}",
            args.n,
            "é".repeat(100_000)
        )))
    }
}

/// Snoozes for longer than any calendar holds.
struct SnoozesForever;

#[async_trait]
impl Worker for SnoozesForever {
    type Args = Numbered;
    const KIND: &'static str = "test.snoozes_forever";

    async fn work(&self, _args: Numbered, _ctx: &JobContext) -> Result<(), JobError> {
        Err(JobError::Snooze(Duration::MAX))
    }
}

struct SleepsTooLong;

#[async_trait]
impl Worker for SleepsTooLong {
    type Args = serde_json::Value;
    const KIND: &'static str = "test.sleeps";

    fn policy(&self) -> KindPolicy {
        KindPolicy {
            timeout: ms(200),
            ..policy(secs(3600))
        }
    }

    async fn work(&self, _args: serde_json::Value, _ctx: &JobContext) -> Result<(), JobError> {
        tokio::time::sleep(secs(10)).await;
        Ok(())
    }
}

/// Does what its payload says. Retries have no backoff, so exhausting attempts is quick.
struct Outcomes {
    runs: Arc<AtomicUsize>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "do", rename_all = "snake_case")]
enum Act {
    Fail {
        error: String,
    },
    Discard {
        reason: String,
    },
    Cancel {
        reason: String,
    },
    /// Snoozes on its first run, succeeds afterwards.
    SnoozeOnce {
        secs: u64,
    },
}

#[async_trait]
impl Worker for Outcomes {
    type Args = Act;
    const KIND: &'static str = "test.outcome";

    fn policy(&self) -> KindPolicy {
        policy(Duration::ZERO)
    }

    async fn work(&self, act: Act, _ctx: &JobContext) -> Result<(), JobError> {
        let run = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        match act {
            Act::Fail { error } => Err(JobError::retry(error)),
            Act::Discard { reason } => Err(JobError::Discard(reason)),
            Act::Cancel { reason } => Err(JobError::Cancel(reason)),
            Act::SnoozeOnce { secs } if run == 1 => {
                Err(JobError::Snooze(Duration::from_secs(secs)))
            }
            Act::SnoozeOnce { .. } => Ok(()),
        }
    }
}

/// Starts an engine on a manual clock at t0 with the [`Outcomes`] worker.
fn outcomes_engine(store: &Arc<dyn Store>) -> (Engine, Client, ManualClock, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::new();
    registry.register(Outcomes { runs: runs.clone() });
    let clock = ManualClock::new(t0());
    let engine_clock: Arc<dyn Clock> = Arc::new(clock.clone());
    let client = Client::new(store.clone(), engine_clock.clone());
    let engine = Engine::start(store.clone(), registry, config(10), engine_clock);
    (engine, client, clock, runs)
}

/// Records, per ordering key, the order jobs started in and whether two ever overlapped.
#[derive(Default)]
struct OrderLog {
    running: Mutex<HashMap<String, Arc<AtomicBool>>>,
    started: Mutex<HashMap<String, Vec<JobId>>>,
    overlaps: Mutex<Vec<String>>,
    now: AtomicUsize,
    max: AtomicUsize,
}

struct Ordered {
    log: Arc<OrderLog>,
}

#[derive(Debug, Deserialize)]
struct Keyed {
    key: String,
    sleep_ms: u64,
}

#[async_trait]
impl Worker for Ordered {
    type Args = Keyed;
    const KIND: &'static str = "test.ordered";

    async fn work(&self, args: Keyed, ctx: &JobContext) -> Result<(), JobError> {
        // Never panic here: a panic would only fail the attempt. Violations are recorded and the
        // test asserts on them.
        let log = &self.log;
        let flag = log
            .running
            .lock()
            .expect("running lock")
            .entry(args.key.clone())
            .or_default()
            .clone();
        if flag.swap(true, Ordering::SeqCst) {
            log.overlaps.lock().expect("overlaps lock").push(format!(
                "job {} (key {}) started while another job of its key was running",
                ctx.job.id, args.key
            ));
        }
        log.started
            .lock()
            .expect("started lock")
            .entry(args.key.clone())
            .or_default()
            .push(ctx.job.id);
        let now = log.now.fetch_add(1, Ordering::SeqCst) + 1;
        log.max.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(ms(args.sleep_ms)).await;
        log.now.fetch_sub(1, Ordering::SeqCst);
        flag.store(false, Ordering::SeqCst);
        Ok(())
    }
}

/// Blocks far longer than any shutdown timeout.
struct Stuck {
    started: Arc<AtomicUsize>,
}

#[async_trait]
impl Worker for Stuck {
    type Args = serde_json::Value;
    const KIND: &'static str = "test.stuck";

    async fn work(&self, _args: serde_json::Value, _ctx: &JobContext) -> Result<(), JobError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(secs(30)).await;
        Ok(())
    }
}

/// Waits for the test's go (sent just before shutdown), then finishes quickly.
struct Quick {
    started: Arc<AtomicUsize>,
    go: watch::Receiver<bool>,
}

#[async_trait]
impl Worker for Quick {
    type Args = serde_json::Value;
    const KIND: &'static str = "test.quick";

    async fn work(&self, _args: serde_json::Value, _ctx: &JobContext) -> Result<(), JobError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let mut go = self.go.clone();
        go.wait_for(|go| *go)
            .await
            .map(|_| ())
            .map_err(|_| JobError::retry("the test dropped its go sender"))?;
        tokio::time::sleep(ms(50)).await;
        Ok(())
    }
}

/// Engine A's handler for the crash test: never returns.
struct Hangs;

#[async_trait]
impl Worker for Hangs {
    type Args = serde_json::Value;
    const KIND: &'static str = "test.crash";

    async fn work(&self, _args: serde_json::Value, _ctx: &JobContext) -> Result<(), JobError> {
        std::future::pending::<()>().await;
        Ok(())
    }
}

/// Engine B's handler for the same kind: succeeds, noting the attempt.
struct Succeeds {
    attempts: Arc<Mutex<Vec<i32>>>,
}

#[async_trait]
impl Worker for Succeeds {
    type Args = serde_json::Value;
    const KIND: &'static str = "test.crash";

    async fn work(&self, _args: serde_json::Value, ctx: &JobContext) -> Result<(), JobError> {
        self.attempts
            .lock()
            .expect("attempts lock")
            .push(ctx.job.attempt);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Tests on both backends

async fn paused_queue_runs_nothing_until_resumed(store: Arc<dyn Store>) {
    let (registry, _seen) = record_registry();
    let clock = system_clock();
    let client = Client::new(store.clone(), clock.clone());
    store
        .pause_queue(DEFAULT_QUEUE, "deploying", Utc::now())
        .await
        .expect("pause");
    let engine = Engine::start(store.clone(), registry, config(10), clock);
    let jobs: Vec<NewJob> = (0..20).map(|n| numbered(Record::KIND, n)).collect();
    client.enqueue_many(&jobs).await.expect("enqueue");
    // Several polls go by (50 ms each); nothing may be claimed meanwhile.
    tokio::time::sleep(ms(400)).await;
    wait_for_count(&*store, JobState::Available, 20).await;
    let metrics = engine.metrics();
    assert_eq!(
        metrics
            .queue(DEFAULT_QUEUE)
            .completed
            .load(Ordering::Relaxed),
        0
    );
    assert!(store.resume_queue(DEFAULT_QUEUE).await.expect("resume"));
    wait_for_count(&*store, JobState::Completed, 20).await;
    let q = metrics.queue(DEFAULT_QUEUE);
    eventually("20 completions counted", || {
        q.completed.load(Ordering::Relaxed) == 20
    })
    .await;
    assert_eq!(q.run.count(), 20);
    assert_eq!(q.wait.count(), 20);
    let mut text = String::new();
    metrics.render(&mut text);
    assert!(
        text.contains("herald_jobs_finished_total{queue=\"default\",outcome=\"completed\"} 20"),
        "{text}"
    );
    assert!(text.contains("herald_job_wait_seconds_count{queue=\"default\"} 20"));
    stop(engine).await;
}

async fn jobs_run_to_completion(store: Arc<dyn Store>) {
    let (registry, seen) = record_registry();
    let clock = system_clock();
    let client = Client::new(store.clone(), clock.clone());
    let config = config(20);
    let worker = config.worker_id.clone();
    let engine = Engine::start(store.clone(), registry, config, clock);

    let jobs: Vec<NewJob> = (0..200).map(|n| numbered(Record::KIND, n)).collect();
    let mut ids: Vec<JobId> = client
        .enqueue_many(&jobs)
        .await
        .expect("enqueue 200 jobs")
        .iter()
        .map(|e| e.id)
        .collect();
    wait_for_count(&*store, JobState::Completed, 200).await;

    let done = store
        .list_jobs(&JobFilter {
            state: Some(JobState::Completed),
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("list completed jobs");
    ids.sort_unstable();
    assert_eq!(
        done.iter().map(|j| j.id).collect::<Vec<_>>(),
        ids,
        "every enqueued job is completed, in the archive"
    );
    for j in &done {
        assert_eq!(j.attempt, 1, "job {} ran once", j.id);
        assert!(
            j.errors.is_empty(),
            "job {} has no errors: {:?}",
            j.id,
            j.errors
        );
        assert_eq!(j.attempted_by.as_deref(), Some(worker.as_str()));
        assert!(j.finalized_at.is_some(), "job {} has a finalized_at", j.id);
    }
    let unfinished = store
        .stats()
        .await
        .expect("stats")
        .into_iter()
        .filter(|s| !s.state.is_final())
        .collect::<Vec<_>>();
    assert!(
        unfinished.is_empty(),
        "nothing left unfinished: {unfinished:?}"
    );

    let seen = seen.lock().expect("seen lock").clone();
    assert_eq!(seen.len(), 200, "the handler saw every payload");
    for n in 0..200 {
        assert_eq!(
            seen.get(&n),
            Some(&1),
            "payload {n} was handled exactly once"
        );
    }
    assert_eq!(engine.in_flight(), 0);
    stop(engine).await;
}

/// Runs a job of [`FailFirst`] on a manual clock: attempt 1 fails, the job waits for `delay`
/// (engine time), then attempt 2 succeeds.
async fn fail_first_then_succeed(store: Arc<dyn Store>, after: Option<Duration>, delay: i64) {
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let mut registry = Registry::new();
    registry.register(FailFirst {
        after,
        attempts: attempts.clone(),
    });
    let clock = ManualClock::new(t0());
    let engine_clock: Arc<dyn Clock> = Arc::new(clock.clone());
    let client = Client::new(store.clone(), engine_clock.clone());
    let engine = Engine::start(store.clone(), registry, config(10), engine_clock);

    let id = enqueue(
        &client,
        NewJob::new(FailFirst::KIND, json!({})).max_attempts(5),
    )
    .await;
    let failed = wait_for_state(&*store, id, JobState::Retryable).await;
    // The clock has not moved: the failure happened at t0.
    assert_eq!(
        failed.run_at,
        t0() + chrono_secs(delay),
        "retry due after the delay"
    );
    assert_eq!(failed.attempt, 1);
    assert_eq!(
        failed.errors,
        vec![AttemptError {
            at: t0(),
            attempt: 1,
            message: FLAKY_ERROR.to_owned(),
        }]
    );
    assert_eq!(failed.lease_expires_at, None);

    // Several polls later, with the engine's clock still at t0, the job still waits.
    tokio::time::sleep(ms(300)).await;
    let waiting = get(&*store, id).await;
    assert_eq!((waiting.state, waiting.attempt), (JobState::Retryable, 1));
    assert_eq!(*attempts.lock().expect("attempts lock"), vec![1]);

    clock.advance(Duration::from_secs(delay as u64));
    store.wakeups().scheduled(DEFAULT_QUEUE, failed.run_at);
    let done = wait_for_state(&*store, id, JobState::Completed).await;
    assert_eq!(done.attempt, 2, "completed on the second attempt");
    assert_eq!(done.finalized_at, Some(t0() + chrono_secs(delay)));
    assert_eq!(done.errors.len(), 1, "the first attempt's error is kept");
    assert_eq!(*attempts.lock().expect("attempts lock"), vec![1, 2]);
    stop(engine).await;
}

async fn retry_waits_for_the_backoff_on_the_engine_clock(store: Arc<dyn Store>) {
    // Policy: base 30 s, no jitter.
    fail_first_then_succeed(store, None, 30).await;
}

async fn retry_after_overrides_the_policy_backoff(store: Arc<dyn Store>) {
    // The handler asks for 5 s; the policy's 30 s does not apply.
    fail_first_then_succeed(store, Some(secs(5)), 5).await;
}

async fn panicking_handler_is_a_failed_attempt(store: Arc<dyn Store>) {
    let (mut registry, seen) = record_registry();
    registry.register(Panics);
    let clock = system_clock();
    let client = Client::new(store.clone(), clock.clone());
    let engine = Engine::start(store.clone(), registry, config(10), clock);

    let id = enqueue(&client, numbered(Panics::KIND, 7).max_attempts(3)).await;
    let failed = wait_for_state(&*store, id, JobState::Retryable).await;
    assert_eq!(failed.attempt, 1);
    assert_eq!(failed.errors.len(), 1);
    assert_eq!(failed.errors[0].attempt, 1);
    let message = &failed.errors[0].message;
    assert!(
        message.contains("panicked"),
        "error names the panic: {message}"
    );
    assert!(
        message.contains("kaboom 7"),
        "error keeps the panic message: {message}"
    );
    assert!(
        failed.run_at > failed.errors[0].at,
        "it waits for its backoff"
    );

    // The engine keeps working.
    let ok = enqueue(&client, numbered(Record::KIND, 1)).await;
    let done = wait_for_state(&*store, ok, JobState::Completed).await;
    assert_eq!(done.attempt, 1);
    assert_eq!(seen.lock().expect("seen lock").get(&1), Some(&1));
    eventually("no job in flight", || engine.in_flight() == 0).await;
    stop(engine).await;
}

async fn hostile_error_messages_are_stored_safely(store: Arc<dyn Store>) {
    let (mut registry, seen) = record_registry();
    registry.register(HostileError);
    let clock = system_clock();
    let client = Client::new(store.clone(), clock.clone());
    let engine = Engine::start(store.clone(), registry, config(10), clock);

    let id = enqueue(&client, numbered(HostileError::KIND, 3).max_attempts(3)).await;
    let failed = wait_for_state(&*store, id, JobState::Retryable).await;
    let message = &failed.errors[0].message;
    assert!(
        message.starts_with("bad \u{FFFD}body 3 "),
        "{}",
        &message[..40]
    );
    assert!(!message.contains('\0'));
    assert!(message.len() <= herald_engine::model::MAX_ERROR_MESSAGE + '…'.len_utf8());
    // Completions keep flowing: the bad message did not wedge the completer.
    let ok = enqueue(&client, numbered(Record::KIND, 1)).await;
    wait_for_state(&*store, ok, JobState::Completed).await;
    assert_eq!(seen.lock().expect("seen lock").get(&1), Some(&1));
    stop(engine).await;
}

async fn endless_snooze_is_stored_not_a_crash(store: Arc<dyn Store>) {
    let (mut registry, seen) = record_registry();
    registry.register(SnoozesForever);
    let clock = system_clock();
    let client = Client::new(store.clone(), clock.clone());
    let engine = Engine::start(store.clone(), registry, config(10), clock);

    let id = enqueue(&client, numbered(SnoozesForever::KIND, 1)).await;
    let snoozed = wait_for_state(&*store, id, JobState::Scheduled).await;
    assert_eq!(snoozed.attempt, 0);
    assert!(snoozed.run_at > Utc::now() + chrono::Duration::days(365 * 1000));
    eventually("the snoozed job left the engine", || {
        engine.in_flight() == 0
    })
    .await;
    let ok = enqueue(&client, numbered(Record::KIND, 2)).await;
    wait_for_state(&*store, ok, JobState::Completed).await;
    assert_eq!(seen.lock().expect("seen lock").get(&2), Some(&1));
    stop(engine).await;
}

async fn handler_timeout_is_a_failed_attempt(store: Arc<dyn Store>) {
    let mut registry = Registry::new();
    registry.register(SleepsTooLong);
    let clock = system_clock();
    let client = Client::new(store.clone(), clock.clone());
    let engine = Engine::start(store.clone(), registry, config(10), clock);

    let id = enqueue(
        &client,
        NewJob::new(SleepsTooLong::KIND, json!({})).max_attempts(3),
    )
    .await;
    let failed = wait_for_state(&*store, id, JobState::Retryable).await;
    assert_eq!(failed.attempt, 1);
    assert_eq!(failed.errors.len(), 1);
    let message = &failed.errors[0].message;
    assert!(
        message.contains("timed out"),
        "error says it timed out: {message}"
    );
    assert_eq!(failed.errors[0].attempt, 1);
    eventually("the timed-out attempt left the engine", || {
        engine.in_flight() == 0
    })
    .await;
    stop(engine).await;
}

async fn exhausted_attempts_discard(store: Arc<dyn Store>) {
    let (engine, client, _clock, runs) = outcomes_engine(&store);
    let id = enqueue(
        &client,
        NewJob::new(Outcomes::KIND, json!({"do": "fail", "error": "boom"})).max_attempts(3),
    )
    .await;
    let job = wait_for_state(&*store, id, JobState::Discarded).await;
    assert_eq!(
        (job.attempt, job.max_attempts),
        (3, 3),
        "every attempt was used"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    let attempts: Vec<i32> = job.errors.iter().map(|e| e.attempt).collect();
    assert_eq!(attempts, vec![1, 2, 3], "one error per attempt");
    assert!(
        job.errors.iter().all(|e| e.message == "boom"),
        "{:?}",
        job.errors
    );
    assert_eq!(job.finalized_at, Some(t0()));
    stop(engine).await;
}

async fn discard_error_discards_at_once(store: Arc<dyn Store>) {
    let (engine, client, _clock, runs) = outcomes_engine(&store);
    let id = enqueue(
        &client,
        NewJob::new(
            Outcomes::KIND,
            json!({"do": "discard", "reason": "recipient blocked us"}),
        )
        .max_attempts(5),
    )
    .await;
    let job = wait_for_state(&*store, id, JobState::Discarded).await;
    assert_eq!(job.attempt, 1, "attempts left do not matter");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(job.errors.len(), 1);
    assert_eq!(job.errors[0].attempt, 1);
    assert_eq!(job.errors[0].message, "discarded: recipient blocked us");
    stop(engine).await;
}

async fn cancel_error_cancels(store: Arc<dyn Store>) {
    let (engine, client, _clock, runs) = outcomes_engine(&store);
    let id = enqueue(
        &client,
        NewJob::new(
            Outcomes::KIND,
            json!({"do": "cancel", "reason": "user asked"}),
        )
        .max_attempts(5),
    )
    .await;
    let job = wait_for_state(&*store, id, JobState::Cancelled).await;
    assert_eq!(job.attempt, 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(job.errors.len(), 1);
    assert_eq!(job.errors[0].message, "cancelled: user asked");
    assert_eq!(job.finalized_at, Some(t0()));
    stop(engine).await;
}

async fn snooze_reschedules_without_counting_the_attempt(store: Arc<dyn Store>) {
    let (engine, client, clock, runs) = outcomes_engine(&store);
    let id = enqueue(
        &client,
        NewJob::new(Outcomes::KIND, json!({"do": "snooze_once", "secs": 60})).max_attempts(1),
    )
    .await;
    let snoozed = wait_for_state(&*store, id, JobState::Scheduled).await;
    assert_eq!(snoozed.attempt, 0, "a snooze does not count the attempt");
    assert_eq!(snoozed.run_at, t0() + chrono_secs(60));
    assert!(snoozed.errors.is_empty(), "a snooze is not an error");
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    clock.advance(secs(60));
    store.wakeups().scheduled(DEFAULT_QUEUE, snoozed.run_at);
    // Had the snooze counted, this run would be attempt 2 (of max_attempts 1).
    let done = wait_for_state(&*store, id, JobState::Completed).await;
    assert_eq!(done.attempt, 1);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    stop(engine).await;
}

async fn unknown_kind_and_bad_payload_are_discarded(store: Arc<dyn Store>) {
    let (registry, seen) = record_registry();
    let clock = system_clock();
    let client = Client::new(store.clone(), clock.clone());
    let engine = Engine::start(store.clone(), registry, config(10), clock);

    let unknown = enqueue(
        &client,
        NewJob::new("test.nobody_handles_this", json!({})).max_attempts(5),
    )
    .await;
    let bad = enqueue(
        &client,
        NewJob::new(Record::KIND, json!({"n": "not a number"})).max_attempts(5),
    )
    .await;

    let job = wait_for_state(&*store, unknown, JobState::Discarded).await;
    assert_eq!(job.attempt, 1, "never retried");
    assert_eq!(job.errors.len(), 1);
    let message = &job.errors[0].message;
    assert!(
        message.contains("test.nobody_handles_this"),
        "the error names the kind: {message}"
    );

    let job = wait_for_state(&*store, bad, JobState::Discarded).await;
    assert_eq!(job.attempt, 1, "never retried");
    assert_eq!(job.errors.len(), 1);
    let message = &job.errors[0].message;
    assert!(message.contains("does not deserialize"), "{message}");
    assert!(
        message.contains(Record::KIND),
        "the error names the kind: {message}"
    );
    assert!(
        seen.lock().expect("seen lock").is_empty(),
        "the handler never ran"
    );
    stop(engine).await;
}

async fn ordering_key_runs_one_at_a_time_in_enqueue_order(store: Arc<dyn Store>) {
    let log = Arc::new(OrderLog::default());
    let mut registry = Registry::new();
    registry.register(Ordered { log: log.clone() });
    let clock = system_clock();
    let client = Client::new(store.clone(), clock.clone());
    let engine = Engine::start(store.clone(), registry, config(10), clock);

    let jobs: Vec<NewJob> = (0..30)
        .map(|_| {
            NewJob::new(Ordered::KIND, json!({"key": "conv", "sleep_ms": 5})).ordering_key("conv")
        })
        .collect();
    let ids: Vec<JobId> = client
        .enqueue_many(&jobs)
        .await
        .expect("enqueue 30 jobs")
        .iter()
        .map(|e| e.id)
        .collect();
    wait_for_count(&*store, JobState::Completed, 30).await;

    let overlaps = log.overlaps.lock().expect("overlaps lock").clone();
    assert!(
        overlaps.is_empty(),
        "jobs of one key overlapped: {overlaps:?}"
    );
    let started = log.started.lock().expect("started lock").clone();
    assert_eq!(
        started.get("conv"),
        Some(&ids),
        "ran strictly in enqueue order"
    );
    assert_eq!(log.max.load(Ordering::SeqCst), 1, "never two at once");
    for id in ids {
        assert_eq!(get(&*store, id).await.attempt, 1);
    }
    stop(engine).await;
}

async fn different_ordering_keys_run_in_parallel(store: Arc<dyn Store>) {
    let log = Arc::new(OrderLog::default());
    let mut registry = Registry::new();
    registry.register(Ordered { log: log.clone() });
    let clock = system_clock();
    let client = Client::new(store.clone(), clock.clone());
    let engine = Engine::start(store.clone(), registry, config(10), clock);

    // Interleaved: a0 b0 a1 b1 …
    let keys = ["a", "b"];
    let jobs: Vec<NewJob> = (0..10)
        .flat_map(|_| keys)
        .map(|key| {
            NewJob::new(Ordered::KIND, json!({"key": key, "sleep_ms": 30})).ordering_key(key)
        })
        .collect();
    let ids: Vec<JobId> = client
        .enqueue_many(&jobs)
        .await
        .expect("enqueue 20 jobs")
        .iter()
        .map(|e| e.id)
        .collect();
    wait_for_count(&*store, JobState::Completed, 20).await;

    let overlaps = log.overlaps.lock().expect("overlaps lock").clone();
    assert!(
        overlaps.is_empty(),
        "jobs of one key overlapped: {overlaps:?}"
    );
    let started = log.started.lock().expect("started lock").clone();
    for (k, key) in keys.iter().enumerate() {
        let expected: Vec<JobId> = ids.iter().skip(k).step_by(2).copied().collect();
        assert_eq!(
            started.get(*key),
            Some(&expected),
            "key {key} ran in enqueue order"
        );
    }
    let max = log.max.load(Ordering::SeqCst);
    assert!(
        max >= 2,
        "the two keys ran in parallel (max at once: {max})"
    );
    assert!(max <= 2, "one job per key at a time (max at once: {max})");
    stop(engine).await;
}

async fn graceful_shutdown_releases_stuck_jobs(store: Arc<dyn Store>) {
    let started = Arc::new(AtomicUsize::new(0));
    let (go, go_rx) = watch::channel(false);
    let mut registry = Registry::new();
    registry.register(Stuck {
        started: started.clone(),
    });
    registry.register(Quick {
        started: started.clone(),
        go: go_rx,
    });
    let clock = system_clock();
    let client = Client::new(store.clone(), clock.clone());
    let config = EngineConfig {
        shutdown_timeout: ms(300),
        ..config(10)
    };
    let engine = Engine::start(store.clone(), registry, config, clock);

    let mut stuck = Vec::new();
    for _ in 0..3 {
        stuck.push(enqueue(&client, NewJob::new(Stuck::KIND, json!({}))).await);
    }
    let quick = enqueue(&client, NewJob::new(Quick::KIND, json!({}))).await;
    eventually("all four handlers started", || {
        started.load(Ordering::SeqCst) == 4
    })
    .await;
    for &id in stuck.iter().chain([&quick]) {
        let job = get(&*store, id).await;
        assert_eq!((job.state, job.attempt), (JobState::Running, 1), "job {id}");
    }
    assert_eq!(engine.in_flight(), 4);

    go.send(true).expect("the quick handler listens");
    let report = engine.shutdown().await;
    assert_eq!(report.released, stuck.len(), "the stuck jobs were released");
    for id in stuck {
        let job = get(&*store, id).await;
        assert_eq!(job.state, JobState::Available, "job {id} is handed back");
        assert_eq!(
            job.attempt, 0,
            "job {id}: the released attempt is not counted"
        );
        assert_eq!(job.lease_expires_at, None);
        assert!(
            job.errors.is_empty(),
            "a release is not an error: {:?}",
            job.errors
        );
    }
    let job = get(&*store, quick).await;
    assert_eq!(
        (job.state, job.attempt),
        (JobState::Completed, 1),
        "the job that finished within the timeout is completed"
    );
}

async fn crashed_worker_jobs_are_rescued(store: Arc<dyn Store>) {
    let clock = system_clock();
    let client = Client::new(store.clone(), clock.clone());
    let mut registry_a = Registry::new();
    registry_a.register(Hangs);
    let config_a = config(10);
    let worker_a = config_a.worker_id.clone();
    let engine_a = Engine::start(store.clone(), registry_a, config_a, clock.clone());

    let id = enqueue(&client, NewJob::new(Hangs::KIND, json!({})).max_attempts(5)).await;
    let running = wait_for_state(&*store, id, JobState::Running).await;
    assert_eq!(running.attempted_by.as_deref(), Some(worker_a.as_str()));
    assert_eq!(running.attempt, 1);
    eventually("engine A leads maintenance", || engine_a.is_leader()).await;
    // A crash: everything stops at once, nothing is released, leadership is not given up.
    drop(engine_a);

    let attempts = Arc::new(Mutex::new(Vec::new()));
    let mut registry_b = Registry::new();
    registry_b.register(Succeeds {
        attempts: attempts.clone(),
    });
    let config_b = config(10);
    let worker_b = config_b.worker_id.clone();
    assert_ne!(worker_a, worker_b);
    let engine_b = Engine::start(store.clone(), registry_b, config_b, clock);

    let done = wait_for_state(&*store, id, JobState::Completed).await;
    assert_eq!(done.attempt, 2, "the lost attempt counts");
    assert_eq!(done.attempted_by.as_deref(), Some(worker_b.as_str()));
    assert_eq!(done.errors.len(), 1);
    assert_eq!(done.errors[0].attempt, 1);
    let message = &done.errors[0].message;
    assert!(message.contains("lease expired"), "{message}");
    assert!(
        message.contains(&worker_a),
        "the error names the lost worker: {message}"
    );
    assert_eq!(*attempts.lock().expect("attempts lock"), vec![2]);
    eventually("engine B leads maintenance", || engine_b.is_leader()).await;
    stop(engine_b).await;
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL only: a private cluster, restarted under a running engine

mod restart {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// A PostgreSQL cluster of this test's own, stopped and deleted when dropped (also when the
    /// test panics).
    pub struct PrivateCluster {
        bin: PathBuf,
        dir: PathBuf,
        data: PathBuf,
        port: u16,
    }

    /// The newest `/usr/lib/postgresql/<version>/bin` with an initdb.
    fn find_bin() -> PathBuf {
        let root = Path::new("/usr/lib/postgresql");
        let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let version = e.file_name().to_str()?.split('.').next()?.parse().ok()?;
                        let bin = e.path().join("bin");
                        bin.join("initdb").is_file().then_some((version, bin))
                    })
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        match found.pop() {
            Some((_, bin)) => bin,
            None => panic!(
                "initdb not found in /usr/lib/postgresql/*/bin: this test needs the PostgreSQL \
                 server binaries (apt-get install postgresql) to run a private cluster"
            ),
        }
    }

    fn free_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free local port");
        listener.local_addr().expect("local address").port()
    }

    impl PrivateCluster {
        pub fn start() -> PrivateCluster {
            let bin = find_bin();
            let dir = std::env::temp_dir().join(crate::common::unique_name("herald_pg"));
            std::fs::create_dir(&dir).expect("create the cluster directory");
            let cluster = PrivateCluster {
                bin,
                data: dir.join("data"),
                dir,
                port: free_port(),
            };
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&cluster.dir)
                .status()
                .expect("run chown");
            assert!(status.success(), "chown the cluster directory to postgres");
            cluster.as_postgres(
                "initdb",
                &[
                    "-D".as_ref(),
                    cluster.data.as_os_str(),
                    "--auth=trust".as_ref(),
                    "-U".as_ref(),
                    "postgres".as_ref(),
                    "--no-sync".as_ref(),
                ],
            );
            cluster.pg_ctl_start();
            cluster
        }

        pub fn url(&self) -> String {
            format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
        }

        pub fn pg_ctl_start(&self) {
            let options = format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                self.port,
                self.dir.display()
            );
            let log = self.dir.join("postgres.log");
            self.as_postgres(
                "pg_ctl",
                &[
                    "-D".as_ref(),
                    self.data.as_os_str(),
                    "-l".as_ref(),
                    log.as_os_str(),
                    "-o".as_ref(),
                    options.as_ref(),
                    "-w".as_ref(),
                    "-t".as_ref(),
                    "60".as_ref(),
                    "start".as_ref(),
                ],
            );
        }

        pub fn pg_ctl_stop(&self) {
            self.as_postgres(
                "pg_ctl",
                &[
                    "-D".as_ref(),
                    self.data.as_os_str(),
                    "-m".as_ref(),
                    "fast".as_ref(),
                    "-w".as_ref(),
                    "-t".as_ref(),
                    "60".as_ref(),
                    "stop".as_ref(),
                ],
            );
        }

        fn command(&self, program: &str, args: &[&std::ffi::OsStr]) -> Command {
            let mut command = Command::new("runuser");
            command
                .args(["-u", "postgres", "--"])
                .arg(self.bin.join(program))
                .args(args)
                // The postgres user may not enter the test's working directory.
                .current_dir(&self.dir);
            command
        }

        fn as_postgres(&self, program: &str, args: &[&std::ffi::OsStr]) {
            let out = self
                .command(program, args)
                .output()
                .unwrap_or_else(|e| panic!("run {program} as postgres (runuser): {e}"));
            if !out.status.success() {
                let log =
                    std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
                panic!(
                    "{program} {args:?} failed ({}):\n{}\n{}\nserver log:\n{log}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                );
            }
        }
    }

    impl Drop for PrivateCluster {
        fn drop(&mut self) {
            if self.data.join("postmaster.pid").exists() {
                let _ = self
                    .command(
                        "pg_ctl",
                        &[
                            "-D".as_ref(),
                            self.data.as_os_str(),
                            "-m".as_ref(),
                            "immediate".as_ref(),
                            "-w".as_ref(),
                            "stop".as_ref(),
                        ],
                    )
                    .output();
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// When the server started, asked with retries (a pooled connection may be dead).
async fn postmaster_start_time(store: &herald_engine::PgStore) -> DateTime<Utc> {
    let mut tries = 0;
    loop {
        match sqlx::query_scalar("SELECT pg_postmaster_start_time()")
            .fetch_one(store.pool())
            .await
        {
            Ok(at) => return at,
            Err(e) if tries < 50 => {
                tries += 1;
                eprintln!("pg_postmaster_start_time failed (try {tries}): {e}");
                tokio::time::sleep(ms(200)).await;
            }
            Err(e) => panic!("the private cluster does not answer: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_survives_a_postgresql_restart() {
    use herald_engine::store::{PgStore, PgStoreConfig};

    let cluster = tokio::task::block_in_place(restart::PrivateCluster::start);
    let store = PgStore::connect(&PgStoreConfig {
        keyring: Some(std::sync::Arc::new(
            herald_engine::crypto::Keyring::parse(
                "abababababababababababababababababababababababababababababababab",
                &[],
            )
            .expect("test key"),
        )),
        url: cluster.url(),
        max_connections: 8,
        acquire_timeout: secs(5),
        schema: Some("restart".to_owned()),
    })
    .await
    .expect("connect to the private cluster");
    store.migrate().await.expect("migrate the private cluster");
    let store = Arc::new(store);
    let started_at = postmaster_start_time(&store).await;
    let pg = store.clone();
    let store: Arc<dyn Store> = store;

    let (registry, seen) = record_registry();
    let clock = system_clock();
    let client = Client::new(store.clone(), clock.clone());
    let engine = Engine::start(store.clone(), registry, config(10), clock);

    let first: Vec<NewJob> = (0..50).map(|n| numbered(Record::KIND, n)).collect();
    client
        .enqueue_many(&first)
        .await
        .expect("enqueue the first 50");
    wait_for_count(&*store, JobState::Completed, 50).await;

    // Down for a second, then back: every pooled connection is dead.
    tokio::task::block_in_place(|| cluster.pg_ctl_stop());
    tokio::time::sleep(secs(1)).await;
    tokio::task::block_in_place(|| cluster.pg_ctl_start());
    assert!(
        postmaster_start_time(&pg).await > started_at,
        "the server really restarted"
    );

    // The test's own enqueue may meet a dead pooled connection first: retry it (the batch is
    // one transaction, so a failed try wrote nothing).
    let second: Vec<NewJob> = (50..100).map(|n| numbered(Record::KIND, n)).collect();
    let mut tries = 0;
    loop {
        match client.enqueue_many(&second).await {
            Ok(_) => break,
            Err(e) if tries < 50 => {
                tries += 1;
                eprintln!("enqueue after restart failed (try {tries}): {e}");
                tokio::time::sleep(ms(200)).await;
            }
            Err(e) => panic!("enqueue after the restart kept failing: {e}"),
        }
    }
    wait_for_count(&*store, JobState::Completed, 100).await;

    let seen = seen.lock().expect("seen lock").clone();
    for n in 0..100 {
        assert_eq!(
            seen.get(&n),
            Some(&1),
            "payload {n} was handled exactly once"
        );
    }
    stop(engine).await;
    drop(store);
    drop(cluster);
}

// ---------------------------------------------------------------------------------------------
// Effects

/// What a handler records with `complete_with` reaches the store with its completion,
/// whichever way the attempt ended.
async fn effects_are_written_with_the_completion(store: Arc<dyn Store>) {
    use common::Accepting;
    use herald_engine::delivery::SendStatus;
    let channel = common::whatsapp_channel(&*store).await;
    let ids = common::begun_sends(&*store, &channel, 3).await;
    let mut registry = Registry::new();
    registry.register(Accepting);
    let clock = system_clock();
    let client = Client::new(store.clone(), clock.clone());
    let engine = Engine::start(store.clone(), registry, config(4), clock);
    let ok = enqueue(
        &client,
        NewJob::new(Accepting::KIND, json!({ "send": ids[0] })),
    )
    .await;
    let failed = enqueue(
        &client,
        NewJob::new(Accepting::KIND, json!({ "send": ids[1], "fail": true })),
    )
    .await;
    wait_for_state(&*store, ok, JobState::Completed).await;
    wait_for_state(&*store, failed, JobState::Discarded).await;
    for id in &ids[..2] {
        let send = common::send_of(&*store, *id).await;
        assert_eq!(send.status, SendStatus::Accepted, "send {id}");
        assert_eq!(
            send.provider_message_id,
            Some(format!("wamid.{}", id.simple()))
        );
    }
    let untouched = common::send_of(&*store, ids[2]).await;
    assert_eq!(untouched.status, SendStatus::Sending);
    stop(engine).await;
}

/// Records its effect, then blocks its thread (no await, so an abort cannot stop it) past the
/// shutdown timeout: the claim is released under it, and the effect comes after.
struct AcceptsLate {
    started: Arc<AtomicBool>,
}

#[async_trait]
impl Worker for AcceptsLate {
    type Args = common::AcceptingArgs;
    const KIND: &'static str = "test.accepts_late";

    async fn work(&self, args: common::AcceptingArgs, ctx: &JobContext) -> Result<(), JobError> {
        ctx.complete_with(herald_engine::model::Effect::SendAccepted {
            send_id: args.send,
            provider_message_id: format!("wamid.{}", args.send.simple()),
        });
        self.started.store(true, Ordering::SeqCst);
        // Hands this worker's other tasks to another thread first, so only this task waits.
        tokio::task::block_in_place(|| std::thread::sleep(ms(800)));
        Ok(())
    }
}

/// Shutdown releases a claim whose task is past its last await; the task's effect still
/// reaches the store before the engine stops (it used to be lost when it came after the
/// completer's last flush).
async fn an_effect_handed_over_after_shutdown_released_the_claim_is_kept(store: Arc<dyn Store>) {
    use herald_engine::delivery::SendStatus;
    let channel = common::whatsapp_channel(&*store).await;
    let ids = common::begun_sends(&*store, &channel, 1).await;
    let started = Arc::new(AtomicBool::new(false));
    let mut registry = Registry::new();
    registry.register(AcceptsLate {
        started: started.clone(),
    });
    let clock = system_clock();
    let client = Client::new(store.clone(), clock.clone());
    let config = EngineConfig {
        shutdown_timeout: ms(100),
        ..config(2)
    };
    let engine = Engine::start(store.clone(), registry, config, clock);
    let job = enqueue(
        &client,
        NewJob::new(AcceptsLate::KIND, json!({ "send": ids[0] })),
    )
    .await;
    eventually("the handler recorded its effect", || {
        started.load(Ordering::SeqCst)
    })
    .await;
    let report = engine.shutdown().await;
    assert_eq!(report.released, 1, "the claim was released under the task");
    assert_eq!(get(&*store, job).await.state, JobState::Available);
    let send = common::send_of(&*store, ids[0]).await;
    assert_eq!(send.status, SendStatus::Accepted);
    assert_eq!(
        send.provider_message_id,
        Some(format!("wamid.{}", ids[0].simple()))
    );
}
