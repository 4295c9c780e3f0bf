//! The rate-limited producer (`Engine::start_limited`) end to end, on PostgreSQL and SQLite:
//! a rate key's jobs start no faster than its limiter allows, higher priority jobs of a key go
//! first, a key without permits holds back nothing else, keys share the slots, and permits
//! granted for jobs that were not there are handed back. Many keys in one round (one claim for
//! all of them) each keep their own rate, and a key enqueued later is found while they run.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use herald_engine::admission::Admission;
use herald_engine::limit::{Grant, Limiter, LocalLimiter, Rate};
use herald_engine::model::DEFAULT_QUEUE;
use herald_engine::{
    Client, Engine, EngineConfig, JobContext, JobError, JobState, NewJob, QueueConfig, Registry,
    Store, SystemClock, Worker,
};
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;

use common::{eventually, unique_name, wait_for_count};

conformance!(
    a_key_never_starts_faster_than_its_rate,
    interactive_jobs_overtake_a_broadcast_on_the_same_key,
    a_key_without_permits_holds_back_nothing_else,
    keys_share_the_slots,
    unused_permits_are_handed_back,
    many_keys_each_keep_their_own_rate,
    a_key_that_appears_later_is_served_while_others_run,
    slots_that_slow_keys_leave_go_to_a_fast_key,
);

// ---------------------------------------------------------------------------------------------
// Fixtures

fn config(concurrency: usize) -> EngineConfig {
    let mut queues = BTreeMap::new();
    queues.insert(DEFAULT_QUEUE.to_owned(), QueueConfig { concurrency });
    let config = EngineConfig {
        worker_id: unique_name("rated"),
        queues,
        poll_interval: Duration::from_millis(100),
        rate_tick: Duration::from_millis(5),
        shutdown_timeout: Duration::from_secs(2),
        ..EngineConfig::default()
    };
    config.validate().expect("valid test config");
    config
}

/// Each key's rate, through a real [`LocalLimiter`]; a key without a rate gets nothing, ever.
struct Rates {
    limiter: LocalLimiter,
    rates: HashMap<String, Rate>,
    /// (key, permits) handed back.
    refunds: Mutex<Vec<(String, u32)>>,
    /// (key, permits asked for), every ask.
    asks: Mutex<Vec<(String, u32)>>,
    /// Whether the engine left (at shutdown).
    left: std::sync::atomic::AtomicBool,
}

impl Rates {
    fn new(rates: &[(&str, Rate)]) -> Arc<Self> {
        Arc::new(Rates {
            limiter: LocalLimiter::new(),
            rates: rates.iter().map(|(k, r)| (k.to_string(), *r)).collect(),
            refunds: Mutex::new(Vec::new()),
            asks: Mutex::new(Vec::new()),
            left: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

#[async_trait]
impl Admission for Rates {
    async fn acquire(&self, key: &str, want: u32) -> Grant {
        self.asks.lock().expect("lock").push((key.to_owned(), want));
        match self.rates.get(key) {
            Some(rate) => self.limiter.acquire(key, *rate, want).await,
            None => Grant {
                granted: 0,
                next_in: Duration::from_millis(50),
            },
        }
    }

    async fn refund(&self, key: &str, n: u32) {
        self.refunds.lock().expect("lock").push((key.to_owned(), n));
        if let Some(rate) = self.rates.get(key) {
            self.limiter.refund(key, *rate, n).await;
        }
    }

    async fn leave(&self) {
        self.left.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[derive(Debug, Deserialize)]
struct Args {
    n: i64,
    #[serde(default)]
    ms: u64,
}

/// Records when each job started, in order.
#[derive(Clone, Default)]
struct Starts(Arc<Mutex<Vec<(String, i64, Instant)>>>);

impl Starts {
    fn list(&self) -> Vec<(String, i64, Instant)> {
        self.0.lock().expect("lock").clone()
    }
}

struct Recorder(Starts);

#[async_trait]
impl Worker for Recorder {
    type Args = Args;
    const KIND: &'static str = "test.rated";

    async fn work(&self, args: Args, ctx: &JobContext) -> Result<(), JobError> {
        let key = ctx.job.rate_key.clone().unwrap_or_default();
        self.0
             .0
            .lock()
            .expect("lock")
            .push((key, args.n, Instant::now()));
        if args.ms > 0 {
            tokio::time::sleep(Duration::from_millis(args.ms)).await;
        }
        Ok(())
    }
}

fn job(key: Option<&str>, n: i64, priority: i16, ms: u64) -> NewJob {
    let job = NewJob::new("test.rated", json!({ "n": n, "ms": ms })).priority(priority);
    match key {
        Some(k) => job.rate_key(k),
        None => job,
    }
}

fn start(
    store: &Arc<dyn Store>,
    concurrency: usize,
    admission: Arc<dyn Admission>,
) -> (Engine, Starts) {
    let starts = Starts::default();
    let mut registry = Registry::new();
    registry.register(Recorder(starts.clone()));
    let engine = Engine::start_limited(
        store.clone(),
        registry,
        config(concurrency),
        Arc::new(SystemClock),
        admission,
    );
    (engine, starts)
}

fn client(store: &Arc<dyn Store>) -> Client {
    Client::new(store.clone(), Arc::new(SystemClock))
}

// ---------------------------------------------------------------------------------------------
// Tests

/// 120 jobs on a key limited to 40/s with a burst of 4: in no window of any length do more
/// start than the rate allows (plus the burst and one for the window's edge). Handlers start a
/// moment after their permit, and on a loaded machine one claim's tasks may start late, next
/// to the following claim's: windows get 50 ms of slack for that scheduling delay (about two
/// jobs at this rate; the sandbox, like Meta, tolerates far more).
async fn a_key_never_starts_faster_than_its_rate(store: Arc<dyn Store>) {
    let rate = Rate {
        per_second: 40.0,
        burst: 4,
    };
    let admission = Rates::new(&[("a", rate)]);
    let jobs: Vec<NewJob> = (0..120).map(|n| job(Some("a"), n, 0, 0)).collect();
    client(&store).enqueue_many(&jobs).await.expect("enqueue");
    let (engine, starts) = start(&store, 50, admission.clone());
    wait_for_count(store.as_ref(), JobState::Completed, 120).await;
    assert!(!admission.left.load(std::sync::atomic::Ordering::SeqCst));
    engine.shutdown().await;
    assert!(
        admission.left.load(std::sync::atomic::Ordering::SeqCst),
        "shutdown leaves the shared limiter state"
    );
    let times: Vec<Instant> = starts.list().iter().map(|s| s.2).collect();
    assert_eq!(times.len(), 120, "every job ran once");
    assert_paced("a", &times, rate);
}

/// A broadcast of 60 jobs (priority 10) saturates a key at 30/s; 5 interactive jobs (priority
/// 0) enqueued after it started run ahead of the rest of the broadcast.
async fn interactive_jobs_overtake_a_broadcast_on_the_same_key(store: Arc<dyn Store>) {
    let admission = Rates::new(&[(
        "ch",
        Rate {
            per_second: 30.0,
            burst: 2,
        },
    )]);
    let broadcast: Vec<NewJob> = (0..60).map(|n| job(Some("ch"), n, 10, 0)).collect();
    let c = client(&store);
    c.enqueue_many(&broadcast).await.expect("enqueue");
    let (engine, starts) = start(&store, 50, admission);
    eventually("the broadcast started", || starts.list().len() >= 5).await;
    let interactive: Vec<NewJob> = (1000..1005).map(|n| job(Some("ch"), n, 0, 0)).collect();
    c.enqueue_many(&interactive).await.expect("enqueue");
    wait_for_count(store.as_ref(), JobState::Completed, 65).await;
    engine.shutdown().await;
    let order: Vec<i64> = starts.list().iter().map(|s| s.1).collect();
    for n in 1000..1005 {
        let pos = order
            .iter()
            .position(|x| *x == n)
            .expect("interactive job ran");
        assert!(
            pos < 25,
            "interactive job {n} started at position {pos} of {}: it waited behind the broadcast ({order:?})",
            order.len()
        );
    }
}

/// With two slots, a key that gets no permits (a paused channel) never has its jobs claimed,
/// and the other key's jobs and the jobs without a key all run.
async fn a_key_without_permits_holds_back_nothing_else(store: Arc<dyn Store>) {
    let admission = Rates::new(&[(
        "free",
        Rate {
            per_second: 1000.0,
            burst: 50,
        },
    )]);
    let mut jobs: Vec<NewJob> = (0..30).map(|n| job(Some("blocked"), n, 0, 0)).collect();
    jobs.extend((100..120).map(|n| job(Some("free"), n, 5, 5)));
    jobs.extend((200..205).map(|n| job(None, n, 5, 5)));
    client(&store).enqueue_many(&jobs).await.expect("enqueue");
    let (engine, starts) = start(&store, 2, admission);
    wait_for_count(store.as_ref(), JobState::Completed, 25).await;
    // A few more rounds: the blocked key is asked again and again, and still nothing of it runs.
    tokio::time::sleep(Duration::from_millis(300)).await;
    engine.shutdown().await;
    let ran: Vec<String> = starts.list().into_iter().map(|s| s.0).collect();
    assert!(
        !ran.iter().any(|k| k == "blocked"),
        "a job of the blocked key ran"
    );
    let stats = store.stats().await.expect("stats");
    let available: i64 = stats
        .iter()
        .filter(|s| s.state == JobState::Available)
        .map(|s| s.count)
        .sum();
    assert_eq!(available, 30, "the blocked key's jobs wait, unclaimed");
    let jobs = store
        .list_jobs(&herald_engine::JobFilter {
            state: Some(JobState::Available),
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("list");
    assert!(
        jobs.iter().all(|j| j.attempt == 0),
        "no blocked job was claimed and put back"
    );
}

/// A key with 150 slow jobs enqueued first does not make a key with 6 jobs enqueued later wait
/// for it: the free slots are shared round robin.
async fn keys_share_the_slots(store: Arc<dyn Store>) {
    let fast = Rate {
        per_second: 10_000.0,
        burst: 100,
    };
    let admission = Rates::new(&[("big", fast), ("small", fast)]);
    let c = client(&store);
    let big: Vec<NewJob> = (0..150).map(|n| job(Some("big"), n, 0, 20)).collect();
    c.enqueue_many(&big).await.expect("enqueue");
    let small: Vec<NewJob> = (1000..1006).map(|n| job(Some("small"), n, 0, 20)).collect();
    c.enqueue_many(&small).await.expect("enqueue");
    let (engine, starts) = start(&store, 4, admission);
    wait_for_count(store.as_ref(), JobState::Completed, 156).await;
    engine.shutdown().await;
    let order: Vec<String> = starts.list().into_iter().map(|s| s.0).collect();
    let last_small = order.iter().rposition(|k| k == "small").expect("small ran");
    assert!(
        last_small < 40,
        "the small key's last job started at position {last_small}: it waited for the big key"
    );
}

/// A key granted more permits than it has jobs hands the rest back.
async fn unused_permits_are_handed_back(store: Arc<dyn Store>) {
    let admission = Rates::new(&[(
        "k",
        Rate {
            per_second: 1000.0,
            burst: 50,
        },
    )]);
    let jobs: Vec<NewJob> = (0..3).map(|n| job(Some("k"), n, 0, 0)).collect();
    client(&store).enqueue_many(&jobs).await.expect("enqueue");
    let (engine, _starts) = start(&store, 20, admission.clone());
    wait_for_count(store.as_ref(), JobState::Completed, 3).await;
    engine.shutdown().await;
    let refunds = admission.refunds.lock().expect("lock").clone();
    let total: u32 = refunds.iter().filter(|r| r.0 == "k").map(|r| r.1).sum();
    assert!(
        total >= 17,
        "20 slots asked for 20 permits for 3 jobs: at least 17 go back, got {refunds:?}"
    );
}

/// Checks that no window of `times` holds more starts than `rate` allows, plus the burst and one
/// for the window's edge, with 50 ms of slack for the scheduling delay (see
/// `a_key_never_starts_faster_than_its_rate`).
fn assert_paced(key: &str, times: &[Instant], rate: Rate) {
    for (i, first) in times.iter().enumerate() {
        for (j, last) in times.iter().enumerate().skip(i) {
            let window = last.duration_since(*first).as_secs_f64();
            let allowed = rate.per_second * (window + 0.05) + f64::from(rate.burst) + 1.0;
            let started = (j - i + 1) as f64;
            assert!(
                started <= allowed,
                "{key}: {started} jobs started within {window:.3}s, the rate allows {allowed:.1}"
            );
        }
    }
}

/// 25 keys at 20/s each, claimed together round after round: every job runs once and no key
/// starts faster than its own rate.
async fn many_keys_each_keep_their_own_rate(store: Arc<dyn Store>) {
    let rate = Rate {
        per_second: 20.0,
        burst: 2,
    };
    let names: Vec<String> = (0..25).map(|k| format!("k{k:02}")).collect();
    let rates: Vec<(&str, Rate)> = names.iter().map(|k| (k.as_str(), rate)).collect();
    let admission = Rates::new(&rates);
    let jobs: Vec<NewJob> = (0..12 * 25)
        .map(|n| job(Some(&names[n as usize % 25]), n, 0, 0))
        .collect();
    client(&store).enqueue_many(&jobs).await.expect("enqueue");
    let (engine, starts) = start(&store, 100, admission);
    wait_for_count(store.as_ref(), JobState::Completed, 300).await;
    engine.shutdown().await;
    let list = starts.list();
    assert_eq!(list.len(), 300, "every job ran once");
    let mut seen: Vec<i64> = list.iter().map(|s| s.1).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 300, "no job ran twice");
    for name in &names {
        let times: Vec<Instant> = list.iter().filter(|s| &s.0 == name).map(|s| s.2).collect();
        assert_eq!(times.len(), 12, "{name}: all of its jobs ran");
        assert_paced(name, &times, rate);
    }
}

/// Eight keys are busy for seconds at 10/s; a key enqueued after they started is found by a
/// scan while their rounds go on, and its jobs run long before theirs are done.
async fn a_key_that_appears_later_is_served_while_others_run(store: Arc<dyn Store>) {
    let rate = Rate {
        per_second: 10.0,
        burst: 1,
    };
    let names: Vec<String> = (0..8).map(|k| format!("busy{k}")).collect();
    let mut rates: Vec<(&str, Rate)> = names.iter().map(|k| (k.as_str(), rate)).collect();
    rates.push(("late", rate));
    let admission = Rates::new(&rates);
    let jobs: Vec<NewJob> = (0..8 * 20)
        .map(|n| job(Some(&names[n as usize % 8]), n, 5, 0))
        .collect();
    let c = client(&store);
    c.enqueue_many(&jobs).await.expect("enqueue");
    let (engine, starts) = start(&store, 50, admission);
    eventually("the busy keys started", || starts.list().len() >= 16).await;
    let late: Vec<NewJob> = (1000..1003).map(|n| job(Some("late"), n, 5, 0)).collect();
    c.enqueue_many(&late).await.expect("enqueue late");
    wait_for_count(store.as_ref(), JobState::Completed, 163).await;
    engine.shutdown().await;
    let order: Vec<(String, i64)> = starts.list().into_iter().map(|s| (s.0, s.1)).collect();
    let last_late = order
        .iter()
        .rposition(|s| s.0 == "late")
        .expect("the late key ran");
    assert!(
        last_late < 120,
        "the late key's last job started at position {last_late} of {}: it waited for the busy keys",
        order.len()
    );
}

/// Nineteen keys that get one permit a round and one fast key share 100 slots: while the slow
/// keys run, the fast key is offered the slots they leave, in the same round, not only an even
/// twentieth of them.
async fn slots_that_slow_keys_leave_go_to_a_fast_key(store: Arc<dyn Store>) {
    // One permit per 5 ms rate tick: due every round, granted one each time.
    let slow = Rate {
        per_second: 200.0,
        burst: 1,
    };
    let fast = Rate {
        per_second: 5_000.0,
        burst: 500,
    };
    let names: Vec<String> = (0..19).map(|k| format!("slow{k:02}")).collect();
    let mut rates: Vec<(&str, Rate)> = names.iter().map(|k| (k.as_str(), slow)).collect();
    rates.push(("fast", fast));
    let admission = Rates::new(&rates);
    // The slow keys' jobs last about a second; the fast key's 300 much less.
    let mut jobs: Vec<NewJob> = (0..19 * 200)
        .map(|n| job(Some(&names[n as usize % 19]), n, 0, 0))
        .collect();
    jobs.extend((10_000..10_300).map(|n| job(Some("fast"), n, 0, 0)));
    client(&store).enqueue_many(&jobs).await.expect("enqueue");
    let (engine, _starts) = start(&store, 100, admission.clone());
    wait_for_count(store.as_ref(), JobState::Completed, 19 * 200 + 300).await;
    engine.shutdown().await;
    let asks = admission.asks.lock().expect("lock").clone();
    let slow_until = asks
        .iter()
        .rposition(|a| a.0.starts_with("slow"))
        .unwrap_or(0);
    let most = asks[..slow_until]
        .iter()
        .filter(|a| a.0 == "fast")
        .map(|a| a.1)
        .max()
        .unwrap_or(0);
    assert!(
        most >= 50,
        "while the slow keys ran, the fast key was offered at most {most} slots in one ask (an \
         even share is 5)"
    );
}
