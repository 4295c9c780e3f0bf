//! The send worker end to end: a real engine (rate-limited producer, [`ChannelAdmission`],
//! [`LocalLimiter`]) running [`SendWorker`] against the Meta sandbox, on SQLite (a temporary
//! file per test) and on PostgreSQL (a schema per test, `HERALD_TEST_DATABASE_URL`).
//!
//! Every test asserts exact outcomes: the send row (status, error code, requests), its job
//! (state, attempt, run_at), the channel (paused_reason) and what the sandbox saw (requests,
//! copies per callback, error codes). Conditions are awaited by polling with a deadline; the
//! only plain waits are observation windows in which something must *not* happen.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use herald_engine::admission::Admission;
use herald_engine::delivery::{
    arrival_rate_key, channel_rate_key, pair_rate_key, AdmissionConfig, Channel, ChannelAdmission,
    ChannelLimits, Lane, Message, NewChannel, NewSend, Platform, RequestGate, SendArgs, SendRecord,
    SendStatus, SendUpdate, StatusEvent, SEND_KIND, SEND_QUEUE,
};
use herald_engine::limit::{FailSafeConfig, FailSafeLimiter, Limiter, LimiterMode, LocalLimiter};
use herald_engine::{
    Clock, ConnectOptions, Engine, EngineConfig, Job, JobFilter, JobState, QueueConfig, Registry,
    Store, SystemClock,
};
use herald_sandbox::{Faults, Sandbox, SandboxConfig, Stats};
use herald_workers::meta::{ClientConfig, MetaClient, SendConfig, SendWorker};
use tokio::net::TcpListener;
use tokio::time::Instant;
use uuid::Uuid;

/// How long a `wait_*` helper waits before it fails the test.
const WAIT: Duration = Duration::from_secs(15);
/// How often the helpers look.
const POLL: Duration = Duration::from_millis(25);
/// The grace period of unknown sends in these tests.
const GRACE: Duration = Duration::from_secs(2);
/// The client's request timeout: a lost answer is noticed after this.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a paused send waits before it looks at its channel again.
const PAUSED_RECHECK: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Backend {
    Sqlite,
    Postgres,
}

fn pg_url() -> String {
    std::env::var("HERALD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// What a test leaves in the database, removed when dropped (also when the test fails).
enum DbGuard {
    File(PathBuf),
    Schema(String),
}

impl Drop for DbGuard {
    fn drop(&mut self) {
        match self {
            DbGuard::File(path) => {
                for suffix in ["", "-wal", "-shm", "-journal"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
            DbGuard::Schema(schema) => {
                // Synchronous (it also runs while a failed test unwinds), like the engine's own
                // tests: workers has no SQL client of its own.
                let _ = std::process::Command::new("psql")
                    .arg(pg_url())
                    .args([
                        "-q",
                        "-c",
                        &format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"),
                    ])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }
}

struct Setup {
    backend: Backend,
    sandbox: SandboxConfig,
    admission: AdmissionConfig,
    /// False: the engine is started later with [`Harness::start`].
    start_engine: bool,
}

impl Setup {
    fn new(backend: Backend) -> Setup {
        Setup {
            backend,
            sandbox: SandboxConfig::default(),
            admission: AdmissionConfig {
                reload_interval: Duration::from_millis(200),
                paused_recheck: Duration::from_millis(200),
                ..AdmissionConfig::default()
            },
            start_engine: true,
        }
    }

    fn sandbox(mut self, config: SandboxConfig) -> Setup {
        self.sandbox = config;
        self
    }

    fn admission(mut self, config: AdmissionConfig) -> Setup {
        self.admission = config;
        self
    }

    fn stopped(mut self) -> Setup {
        self.start_engine = false;
        self
    }
}

/// A store, a sandbox, and an engine running the send worker against it.
struct Harness {
    engine: Option<Engine>,
    pending: Option<(Registry, EngineConfig)>,
    sandbox: Sandbox,
    store: Arc<dyn Store>,
    admission: Arc<ChannelAdmission>,
    clock: Arc<dyn Clock>,
    workspace: Uuid,
    _db: DbGuard,
}

impl Harness {
    async fn new(setup: Setup) -> Harness {
        let sandbox = Sandbox::start(
            TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind sandbox"),
            setup.sandbox,
        )
        .await
        .expect("start the sandbox");
        let (url, options, guard) = match setup.backend {
            Backend::Sqlite => {
                let path = std::env::temp_dir().join(format!("{}.db", unique("herald_send")));
                (
                    format!("sqlite:{}", path.display()),
                    ConnectOptions {
                        sqlite_synchronous_full: false,
                        keyring: Some(std::sync::Arc::new(
                            herald_engine::crypto::Keyring::parse(
                                "abababababababababababababababababababababababababababababababab",
                                &[],
                            )
                            .expect("test key"),
                        )),
                        ..ConnectOptions::default()
                    },
                    DbGuard::File(path),
                )
            }
            Backend::Postgres => {
                let schema = unique("herald_send");
                (
                    pg_url(),
                    ConnectOptions {
                        schema: Some(schema.clone()),
                        keyring: Some(std::sync::Arc::new(
                            herald_engine::crypto::Keyring::parse(
                                "abababababababababababababababababababababababababababababababab",
                                &[],
                            )
                            .expect("test key"),
                        )),
                        max_connections: 8,
                        ..ConnectOptions::default()
                    },
                    DbGuard::Schema(schema),
                )
            }
        };
        let store = herald_engine::connect(&url, &options)
            .await
            .unwrap_or_else(|e| panic!("connect to {url} (is it running?): {e}"));
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let admission = Arc::new(ChannelAdmission::new(
            store.clone(),
            Arc::new(LocalLimiter::new()),
            setup.admission,
        ));
        let client = MetaClient::new(ClientConfig {
            connect_timeout: Duration::from_secs(1),
            request_timeout: REQUEST_TIMEOUT,
            ..ClientConfig::default()
        })
        .expect("build the Meta client");
        let worker = SendWorker::new(
            store.clone(),
            admission.clone(),
            client,
            clock.clone(),
            SendConfig {
                unknown_grace: GRACE,
                paused_recheck: PAUSED_RECHECK,
                ..SendConfig::default()
            },
        );
        let mut registry = Registry::new();
        registry.register(worker);
        let mut queues = BTreeMap::new();
        queues.insert(SEND_QUEUE.to_owned(), QueueConfig { concurrency: 32 });
        let config = EngineConfig {
            queues,
            poll_interval: Duration::from_millis(100),
            rate_tick: Duration::from_millis(5),
            shutdown_timeout: Duration::from_secs(2),
            maintenance: false,
            ..EngineConfig::default()
        };
        let mut h = Harness {
            engine: None,
            pending: Some((registry, config)),
            sandbox,
            store,
            admission,
            clock,
            workspace: Uuid::new_v4(),
            _db: guard,
        };
        if setup.start_engine {
            h.start();
        }
        h
    }

    fn start(&mut self) {
        let (registry, config) = self.pending.take().expect("the engine is already running");
        self.engine = Some(Engine::start_limited(
            self.store.clone(),
            registry,
            config,
            self.clock.clone(),
            self.admission.clone() as Arc<dyn Admission>,
        ));
    }

    /// Graceful end: the engine drains, the sandbox stops; the guard then removes the database.
    async fn finish(mut self) {
        if let Some(engine) = self.engine.take() {
            engine.shutdown().await;
        }
        let Harness { sandbox, .. } = self;
        sandbox.shutdown().await;
    }

    fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    async fn channel(
        &self,
        sender: &str,
        limits: Option<ChannelLimits>,
        portfolio: Option<&str>,
    ) -> Channel {
        self.store
            .delivery()
            .create_channel(
                &NewChannel {
                    workspace_id: self.workspace,
                    platform: Platform::Whatsapp,
                    name: format!("test {sender}"),
                    sender_id: sender.to_owned(),
                    portfolio_id: portfolio.map(str::to_owned),
                    access_token: "sandbox-token".into(),
                    app_secret: "sandbox-secret".into(),
                    verify_token: "verify".into(),
                    graph_base_url: Some(self.sandbox.url()),
                    api_version: None,
                    limits,
                },
                self.now(),
            )
            .await
            .expect("create channel")
    }

    fn template(&self, ch: &Channel, to: &str, lane: Lane) -> NewSend {
        NewSend {
            workspace_id: self.workspace,
            channel_id: ch.id,
            recipient: to.to_owned(),
            message: Message::Template {
                name: "order_update".into(),
                language: "en_US".into(),
                parameters: vec!["42".into()],
            },
            lane,
        }
    }

    fn text(&self, ch: &Channel, to: &str) -> NewSend {
        NewSend {
            workspace_id: self.workspace,
            channel_id: ch.id,
            recipient: to.to_owned(),
            message: Message::Text {
                body: "hello".into(),
            },
            lane: Lane::Interactive,
        }
    }

    async fn create(&self, sends: &[NewSend]) -> Vec<Uuid> {
        self.store
            .delivery()
            .create_sends(sends, self.now())
            .await
            .expect("create sends")
    }

    async fn create_one(&self, send: NewSend) -> Uuid {
        self.create(&[send]).await[0]
    }

    async fn send(&self, id: Uuid) -> SendRecord {
        self.store
            .delivery()
            .send(id)
            .await
            .expect("read send")
            .expect("send exists")
    }

    async fn channel_now(&self, id: Uuid) -> Channel {
        self.store
            .delivery()
            .channel(id)
            .await
            .expect("read channel")
            .expect("channel exists")
    }

    /// Every send job (unfinished and archived), by send id.
    async fn jobs(&self) -> HashMap<Uuid, Job> {
        let mut out = HashMap::new();
        let mut after = None;
        loop {
            let page = self
                .store
                .list_jobs(&JobFilter {
                    kind: Some(SEND_KIND.to_owned()),
                    after_id: after,
                    limit: 1000,
                    ..JobFilter::default()
                })
                .await
                .expect("list jobs");
            let Some(last) = page.last() else {
                return out;
            };
            after = Some(last.id);
            for job in page {
                let id = job.payload["send_id"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .expect("send job payload names its send");
                out.insert(id, job);
            }
        }
    }

    async fn job(&self, send: Uuid) -> Job {
        let mut jobs = self.jobs().await;
        let id = jobs.remove(&send).expect("the send has a job").id;
        // Through get_job too, the operator's view of one job.
        self.store
            .get_job(id)
            .await
            .expect("get job")
            .expect("job exists")
    }

    async fn wait_sends(
        &self,
        ids: &[Uuid],
        what: &str,
        done: impl Fn(&SendRecord) -> bool,
    ) -> Vec<SendRecord> {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut all = Vec::with_capacity(ids.len());
            for id in ids {
                all.push(self.send(*id).await);
            }
            if all.iter().all(&done) {
                return all;
            }
            if Instant::now() >= deadline {
                let left: Vec<_> = all.iter().filter(|s| !done(s)).collect();
                panic!(
                    "timed out after {WAIT:?} waiting for {what}; sandbox {:?}; not there yet: {left:#?}",
                    self.sandbox.stats()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn wait_send(
        &self,
        id: Uuid,
        what: &str,
        done: impl Fn(&SendRecord) -> bool,
    ) -> SendRecord {
        self.wait_sends(&[id], what, done).await.remove(0)
    }

    async fn wait_job(&self, send: Uuid, what: &str, done: impl Fn(&Job) -> bool) -> Job {
        let deadline = Instant::now() + WAIT;
        loop {
            let job = self.job(send).await;
            if done(&job) {
                return job;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {WAIT:?} waiting for {what}; job {job:#?}; send {:#?}",
                    self.send(send).await
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until every send's job is final (the completer writes results in batches, after
    /// the handler's own writes) and returns them by send id.
    async fn wait_final_jobs(&self, sends: &[Uuid]) -> HashMap<Uuid, Job> {
        let deadline = Instant::now() + WAIT;
        loop {
            let jobs = self.jobs().await;
            let left: Vec<&Job> = sends
                .iter()
                .map(|id| &jobs[id])
                .filter(|j| !j.state.is_final())
                .collect();
            if left.is_empty() {
                return jobs;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {WAIT:?} waiting for final jobs; left: {left:#?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    async fn wait_paused(&self, id: Uuid) -> Channel {
        let deadline = Instant::now() + WAIT;
        loop {
            let ch = self.channel_now(id).await;
            if ch.paused_reason.is_some() {
                return ch;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for channel {id} to be paused; sandbox {:?}",
                self.sandbox.stats()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    async fn wait_sandbox(&self, what: &str, ok: impl Fn(&Stats) -> bool) -> Stats {
        let deadline = Instant::now() + WAIT;
        loop {
            let stats = self.sandbox.stats();
            if ok(&stats) {
                return stats;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {WAIT:?} waiting for the sandbox: {what}; stats {stats:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// The copies of a send the sandbox accepted (0 if none).
    fn copies(&self, send: Uuid) -> u32 {
        let key = send.to_string();
        self.sandbox
            .accepted(&key)
            .iter()
            .find(|a| a.callback == key)
            .map_or(0, |a| a.copies)
    }

    /// Meta's message id for a send, from the sandbox's log.
    fn sandbox_message_id(&self, send: Uuid) -> String {
        let key = send.to_string();
        self.sandbox
            .accepted(&key)
            .into_iter()
            .find(|a| a.callback == key)
            .unwrap_or_else(|| panic!("the sandbox never accepted send {send}"))
            .message_id
    }

    /// What Meta's status webhook would tell Herald for a send: the sandbox's message id and our
    /// send id echoed as `biz_opaque_callback_data`.
    async fn apply_status(&self, ch: &Channel, send: Uuid, message_id: &str, status: SendStatus) {
        self.store
            .delivery()
            .apply_statuses(&[StatusEvent {
                channel_id: ch.id,
                provider_message_id: message_id.to_owned(),
                send_id: Some(send),
                status,
                error_code: None,
                error: None,
                at: self.now(),
            }])
            .await
            .expect("apply status");
    }
}

/// Every request the sandbox answered: accepted ones and refused ones.
fn requests_seen(stats: &Stats) -> u64 {
    stats.accepted + stats.errors_by_code.values().sum::<u64>()
}

fn errors_of(stats: &Stats, code: i64) -> u64 {
    stats
        .errors_by_code
        .get(&code.to_string())
        .copied()
        .unwrap_or(0)
}

fn secs(d: chrono::Duration) -> f64 {
    d.num_milliseconds() as f64 / 1000.0
}

// ---------------------------------------------------------------------------------------------
// 1. Happy path
// ---------------------------------------------------------------------------------------------

async fn happy_path(backend: Backend) {
    let h = Harness::new(Setup::new(backend)).await;
    let ch = h.channel("1555000100", None, None).await;
    let broadcast: Vec<NewSend> = (0..50)
        .map(|i| h.template(&ch, &format!("1555100{i:04}"), Lane::Broadcast))
        .collect();
    let templates = h.create(&broadcast).await;
    h.store
        .delivery()
        .record_inbound(ch.id, "15552000001", h.now())
        .await
        .unwrap();
    let open = h.create_one(h.text(&ch, "15552000001")).await;
    let closed = h.create_one(h.text(&ch, "15552000002")).await;

    let mut ids = templates.clone();
    ids.push(open);
    let sends = h
        .wait_sends(
            &ids,
            "every template and the in-window text accepted",
            |s| s.status == SendStatus::Accepted,
        )
        .await;
    let failed = h
        .wait_send(closed, "the text outside the window to fail", |s| {
            s.status == SendStatus::Failed
        })
        .await;

    let mut all = ids.clone();
    all.push(closed);
    let jobs = h.wait_final_jobs(&all).await;
    for s in &sends {
        assert_eq!(s.requests, 1, "{s:#?}");
        assert_eq!(s.error_code, None);
        assert!(s.accepted_at.is_some());
        assert_eq!(
            s.provider_message_id.as_deref(),
            Some(h.sandbox_message_id(s.id).as_str()),
            "the send records Meta's id for it"
        );
        assert_eq!(h.copies(s.id), 1);
        let job = &jobs[&s.id];
        assert_eq!(job.state, JobState::Completed);
        assert_eq!(job.attempt, 1);
    }
    assert!(matches!(h.send(open).await.message, Message::Text { .. }));

    // The text without a window: refused by Herald, never sent.
    assert_eq!(failed.error_code, Some(131047));
    assert!(failed.error.as_deref().unwrap().contains("window"));
    assert_eq!(failed.provider_message_id, None);
    assert_eq!(h.copies(closed), 0);
    let job = &jobs[&closed];
    assert_eq!(job.state, JobState::Discarded);
    assert_eq!(job.attempt, 1);

    let stats = h.sandbox.stats();
    assert_eq!(stats.accepted, 51, "{stats:?}");
    assert_eq!(stats.unique_callbacks, 51);
    assert_eq!(stats.duplicate_callbacks, 0);
    assert!(stats.errors_by_code.is_empty(), "{stats:?}");
    assert_eq!(requests_seen(&stats), 51);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_sqlite() {
    happy_path(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_postgres() {
    happy_path(Backend::Postgres).await;
}

/// A channel connected while the engine runs sends at once: the admission's cache of channels
/// (reloaded every `reload_interval`, 1 s by default) may not know it yet, which must not fail
/// its sends as "the channel no longer exists".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_connected_while_running_can_send_at_once() {
    let h = Harness::new(Setup::new(Backend::Sqlite).admission(AdmissionConfig::default())).await;
    let old = h.channel("1555000120", None, None).await;
    let first = h
        .create_one(h.template(&old, "15552800001", Lane::Broadcast))
        .await;
    // Sending it loads the admission's cache.
    h.wait_send(first, "a send on the first channel", |s| {
        s.status == SendStatus::Accepted
    })
    .await;
    let new = h.channel("1555000121", None, None).await;
    let id = h
        .create_one(h.template(&new, "15552800002", Lane::Broadcast))
        .await;
    let s = h
        .wait_send(id, "the new channel's send settled", |s| {
            s.status.is_settled()
        })
        .await;
    assert_eq!(s.status, SendStatus::Accepted, "{s:#?}");
    assert_eq!(s.requests, 1);
    assert_eq!(h.copies(id), 1);
    let job = h
        .wait_job(id, "its job completed", |j| j.state.is_final())
        .await;
    assert_eq!(job.state, JobState::Completed, "{job:#?}");
    h.finish().await;
}

/// The producer asks for every due channel at once: each key gets what it would get alone (a
/// key that is not a channel everything, an unknown channel one at a time, a paused channel
/// nothing, a channel its burst), and the limiter's state is the one single asks see.
#[tokio::test]
async fn admission_asks_for_many_keys_as_it_would_one_by_one() {
    let h = Harness::new(Setup::new(Backend::Sqlite).stopped()).await;
    let limits = ChannelLimits {
        mps: 100.0,
        burst_ms: 50,
        ..ChannelLimits::default()
    };
    let open = h.channel("1555000130", Some(limits), None).await;
    let paused = h.channel("1555000131", Some(limits), None).await;
    let replies_only = h.channel("1555000132", Some(limits), None).await;
    let delivery = h.store.delivery();
    assert!(delivery
        .pause_channel(paused.id, Some("test"), false, h.now())
        .await
        .unwrap());
    assert!(delivery
        .pause_channel(replies_only.id, Some("test"), true, h.now())
        .await
        .unwrap());
    h.admission.invalidate();
    let (open_key, paused_key, replies_key, unknown_key) = (
        channel_rate_key(open.id),
        channel_rate_key(paused.id),
        channel_rate_key(replies_only.id),
        channel_rate_key(Uuid::new_v4()),
    );
    let burst = limits.rate().burst;
    let grants = h
        .admission
        .acquire_many(&[
            ("not-a-channel", 7),
            (open_key.as_str(), 100),
            (paused_key.as_str(), 5),
            (unknown_key.as_str(), 5),
            (replies_key.as_str(), 100),
        ])
        .await;
    let granted: Vec<u32> = grants.iter().map(|g| g.granted).collect();
    assert_eq!(granted, vec![7, burst, 0, 1, burst], "{grants:?}");
    // Looked at again after the admission's `paused_recheck` (200 ms in these tests).
    assert_eq!(grants[2].next_in, Duration::from_millis(200));
    // The permits were taken from the same limiter single asks use.
    assert_eq!(h.admission.acquire(&open_key, 100).await.granted, 0);
    assert_eq!(h.admission.acquire(&replies_key, 100).await.granted, 0);
    assert!(h.admission.acquire_many(&[]).await.is_empty());
    h.finish().await;
}

/// The checks at a request hand back what they took when the other refuses: the pair permit
/// when the send is ahead of the channel's pace, the arrival permit when the recipient has had
/// its share; a send held back for its pace is counted. A claim permit given back (a send that
/// waits for its recipient) is counted as handed back.
#[tokio::test]
async fn the_checks_at_a_request_hand_back_what_they_do_not_use() {
    let h = Harness::new(Setup::new(Backend::Sqlite).stopped()).await;
    let metrics = Arc::new(herald_engine::metrics::EngineMetrics::default());
    h.admission.set_metrics(metrics.clone());
    // Slow rates (one arrival permit a second, a burst of two), so nothing refills meanwhile.
    let limits = ChannelLimits {
        mps: 1.0,
        meta_burst_ms: 2_000,
        pair_burst: 1,
        ..ChannelLimits::default()
    };
    let (arrival, pair) = (limits.arrival_rate(), limits.pair_rate());
    assert_eq!(arrival.burst, 2);
    let limiter = h.admission.limiter().clone();
    let busy = h.channel("1555000134", Some(limits), None).await;
    let quiet = h.channel("1555000135", Some(limits), None).await;
    let held = |ch: &Channel| {
        metrics
            .key(&channel_rate_key(ch.id))
            .held
            .load(std::sync::atomic::Ordering::Relaxed)
    };

    // Ahead: the busy channel's arrival burst is gone; the pair permit goes back.
    let taken = limiter
        .acquire(&arrival_rate_key(busy.id), arrival, 10)
        .await;
    assert_eq!(taken.granted, 2);
    let gate = h.admission.at_request(&busy, "15552830001").await;
    assert!(
        matches!(gate, RequestGate::Ahead(w) if w > Duration::ZERO),
        "{gate:?}"
    );
    let pair_left = limiter
        .acquire(&pair_rate_key(busy.id, "15552830001"), pair, 10)
        .await;
    assert_eq!(pair_left.granted, 1, "the pair permit was handed back");
    assert_eq!(held(&busy), 1);

    // Pair: the recipient has had its message; the quiet channel's arrival permit goes back.
    let to = "15552830002";
    assert_eq!(
        limiter
            .acquire(&pair_rate_key(quiet.id, to), pair, 10)
            .await
            .granted,
        1
    );
    let gate = h.admission.at_request(&quiet, to).await;
    assert!(
        matches!(gate, RequestGate::Pair(w) if w > Duration::from_secs(5)),
        "{gate:?}"
    );
    assert_eq!(
        limiter
            .acquire(&arrival_rate_key(quiet.id), arrival, 10)
            .await
            .granted,
        2,
        "the arrival permit was handed back"
    );
    assert_eq!(held(&quiet), 0);

    // Both refused: held back for its pace (no claim permit back), waiting for the pair.
    assert_eq!(
        limiter
            .acquire(&pair_rate_key(busy.id, to), pair, 10)
            .await
            .granted,
        1
    );
    let gate = h.admission.at_request(&busy, to).await;
    assert!(
        matches!(gate, RequestGate::Ahead(w) if w > Duration::from_secs(5)),
        "{gate:?}"
    );
    assert_eq!(held(&busy), 2);

    // A claim permit given back returns to the channel's rate and is counted.
    let claim_key = channel_rate_key(quiet.id);
    let claims = limiter.acquire(&claim_key, limits.rate(), 10).await;
    assert_eq!(claims.granted, limits.rate().burst);
    h.admission.give_back(quiet.id).await;
    assert_eq!(
        limiter.acquire(&claim_key, limits.rate(), 10).await.granted,
        1
    );
    assert_eq!(
        metrics
            .key(&claim_key)
            .refunded
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // A channel that does not exist has nothing to hand back to, and nothing is counted.
    let gone = Uuid::new_v4();
    h.admission.give_back(gone).await;
    assert_eq!(
        metrics
            .key(&channel_rate_key(gone))
            .refunded
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    // Go: a channel with room takes one of each.
    let fresh = h.channel("1555000136", Some(limits), None).await;
    let gate = h.admission.at_request(&fresh, to).await;
    assert_eq!(gate, RequestGate::Go);
    assert_eq!(
        limiter
            .acquire(&arrival_rate_key(fresh.id), arrival, 10)
            .await
            .granted,
        1,
        "one of the arrival burst of two is taken"
    );
    assert_eq!(
        limiter
            .acquire(&pair_rate_key(fresh.id, to), pair, 10)
            .await
            .granted,
        0,
        "the pair permit is taken"
    );
    h.finish().await;
}

/// Two processes sharing Redis share the arrival check: what one process's requests took,
/// the other's request cannot take again, and the pair permit it took goes back in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_share_the_arrival_check_through_redis() {
    let h = Harness::new(Setup::new(Backend::Sqlite).stopped()).await;
    let url =
        std::env::var("HERALD_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let config = FailSafeConfig {
        key_prefix: format!("herald-test:{}:", Uuid::new_v4().simple()),
        ..FailSafeConfig::default()
    };
    let mut processes = Vec::new();
    for name in ["a", "b"] {
        let limiter = FailSafeLimiter::connect(&url, name.into(), config.clone(), None)
            .await
            .unwrap_or_else(|e| panic!("this test needs a real Redis at {url}: {e}"));
        assert_eq!(limiter.status().mode, LimiterMode::Redis);
        processes.push(ChannelAdmission::new(
            h.store.clone(),
            Arc::new(limiter),
            AdmissionConfig::default(),
        ));
    }
    let limits = ChannelLimits {
        mps: 10.0,
        pair_burst: 1,
        ..ChannelLimits::default()
    };
    assert_eq!(limits.arrival_rate().burst, 2);
    let ch = h.channel("1555000137", Some(limits), None).await;
    let (a, b) = (&processes[0], &processes[1]);
    assert_eq!(a.at_request(&ch, "15552840001").await, RequestGate::Go);
    assert_eq!(a.at_request(&ch, "15552840002").await, RequestGate::Go);
    let gate = b.at_request(&ch, "15552840003").await;
    assert!(
        matches!(gate, RequestGate::Ahead(w) if w > Duration::ZERO),
        "{gate:?}"
    );
    // The pair permit b took went back: a's next request to that user is not refused for it.
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(a.at_request(&ch, "15552840003").await, RequestGate::Go);
    h.finish().await;
}

/// With Redis unreachable (the limiter in fallback), each new recipient still gets its first
/// message at once: the pair rate is kept by the admission at the fallback share, starting
/// full (the shared limiter's fallback keys start empty, which made every new recipient wait
/// for a pair permit of one per 12 s or slower), and the arrival rate is not checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_fallback_each_new_recipient_gets_its_first_message_at_once() {
    let h = Harness::new(Setup::new(Backend::Sqlite).stopped()).await;
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address").port()
    };
    let limiter = FailSafeLimiter::connect(
        &format!("redis://127.0.0.1:{dead}"),
        "alone".into(),
        FailSafeConfig {
            key_prefix: format!("herald-test:{}:", Uuid::new_v4().simple()),
            ..FailSafeConfig::default()
        },
        None,
    )
    .await
    .expect("a Redis that is down is not an error");
    assert_eq!(limiter.status().mode, LimiterMode::Fallback);
    let admission = ChannelAdmission::new(
        h.store.clone(),
        Arc::new(limiter),
        AdmissionConfig::default(),
    );
    let limits = ChannelLimits {
        mps: 1.0,
        pair_burst: 1,
        ..ChannelLimits::default()
    };
    let ch = h.channel("1555000138", Some(limits), None).await;
    for i in 0..5 {
        let to = format!("155528500{i:02}");
        assert_eq!(
            admission.at_request(&ch, &to).await,
            RequestGate::Go,
            "recipient {i}"
        );
    }
    // A second message to one of them waits for the pair rate, at half of it (one process).
    let gate = admission.at_request(&ch, "15552850000").await;
    assert!(
        matches!(gate, RequestGate::Pair(w) if w > Duration::from_secs(6)),
        "{gate:?}"
    );
    h.finish().await;
}

/// A send whose request would run ahead of the channel's pace as Meta sees it (its permit
/// was taken, and meanwhile other processes' sends went out) is not sent then: it goes back to
/// the queue, no request and no attempt counted, and goes out once the pace allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_ahead_of_the_channels_pace_waits_at_its_request() {
    let h = Harness::new(Setup::new(Backend::Sqlite).stopped()).await;
    let limits = ChannelLimits {
        mps: 1.0,
        ..ChannelLimits::default()
    };
    let ch = h.channel("1555000133", Some(limits), None).await;
    // Other processes' requests took the whole arrival burst just now (two at 1/s); the claim
    // rate, taken apart from it, still has permits.
    let arrival = limits.arrival_rate();
    let taken = h
        .admission
        .limiter()
        .acquire(&arrival_rate_key(ch.id), arrival, 10)
        .await;
    assert_eq!(taken.granted, arrival.burst);
    let free_at = Utc::now() + chrono::Duration::milliseconds(1_000);
    let id = h
        .create_one(h.template(&ch, "15552820001", Lane::Interactive))
        .await;
    let mut h = h;
    h.start();
    let s = h
        .wait_send(id, "the send went out once the pace allowed", |s| {
            s.status == SendStatus::Accepted
        })
        .await;
    assert_eq!(s.requests, 1, "one request: {s:#?}");
    assert_eq!(h.copies(id), 1);
    let accepted = h.sandbox.accepted(&id.to_string());
    let at_ms = accepted.first().map_or(0.0, |a| a.accepted_unix_ms);
    // The sandbox's clock and this one are the same machine's; allow a few ms of rounding.
    assert!(
        at_ms + 5.0 >= free_at.timestamp_millis() as f64,
        "sent {} ms before the pace allowed",
        free_at.timestamp_millis() as f64 - at_ms
    );
    assert_eq!(errors_of(&h.sandbox.stats(), 130429), 0);
    let job = h
        .wait_job(id, "its job completed", |j| j.state.is_final())
        .await;
    assert_eq!(job.state, JobState::Completed, "{job:#?}");
    assert_eq!(
        job.attempt, 1,
        "waiting for the pace is not an attempt: {job:#?}"
    );
    h.finish().await;
}

/// …and its rate applies from its first send, even before the admission's cache knows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_connected_while_running_is_paced_from_its_first_send() {
    let h = Harness::new(Setup::new(Backend::Sqlite).admission(AdmissionConfig::default())).await;
    let old = h.channel("1555000122", None, None).await;
    let first = h
        .create_one(h.template(&old, "15552810001", Lane::Broadcast))
        .await;
    h.wait_send(first, "a send on the first channel", |s| {
        s.status == SendStatus::Accepted
    })
    .await;
    let limits = ChannelLimits {
        mps: 5.0,
        burst_ms: 200,
        ..ChannelLimits::default()
    };
    let burst = limits.rate().burst as usize;
    let new = h.channel("1555000123", Some(limits), None).await;
    let sends: Vec<NewSend> = (0..12)
        .map(|i| h.template(&new, &format!("1555282{i:04}"), Lane::Broadcast))
        .collect();
    let ids = h.create(&sends).await;
    h.wait_sends(&ids, "the new channel's sends accepted", |s| {
        s.status == SendStatus::Accepted
    })
    .await;
    let keys: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    let times: Vec<f64> = h
        .sandbox
        .accepted("")
        .into_iter()
        .filter(|a| keys.contains(&a.callback))
        .map(|a| a.accepted_unix_ms)
        .collect();
    let most = max_in_a_second(&times);
    assert!(
        most <= 5 + burst,
        "{most} sends in one second on a channel limited to 5/s (burst {burst})"
    );
    h.finish().await;
}

// ---------------------------------------------------------------------------------------------
// 2. The error table, row by row
// ---------------------------------------------------------------------------------------------

/// 131026, 131047, 131050, 100, 131008, 131009, 132000-132015: the send fails with Meta's code
/// after exactly one request, and its job is discarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_errors_fail_the_send_after_one_request() {
    let codes = [131026, 131047, 131050, 100, 131008, 131009, 132000, 132015];
    let recipient = |i: usize| format!("155530000{i:02}");
    let mut faults = Faults::default();
    for (i, code) in codes.iter().enumerate() {
        faults.recipient_errors.insert(recipient(i), *code);
    }
    let h = Harness::new(Setup::new(Backend::Sqlite).sandbox(SandboxConfig {
        faults,
        ..SandboxConfig::default()
    }))
    .await;
    let ch = h.channel("1555000101", None, None).await;
    let sends: Vec<NewSend> = (0..codes.len())
        .map(|i| h.template(&ch, &recipient(i), Lane::Broadcast))
        .collect();
    let ids = h.create(&sends).await;
    let failed = h
        .wait_sends(&ids, "every send failed", |s| {
            s.status == SendStatus::Failed
        })
        .await;
    let jobs = h.wait_final_jobs(&ids).await;
    for (s, code) in failed.iter().zip(codes) {
        assert_eq!(s.error_code, Some(code), "{s:#?}");
        assert!(
            s.error.as_deref().unwrap().contains(&code.to_string()),
            "{s:#?}"
        );
        assert_eq!(s.requests, 1, "{s:#?}");
        let job = &jobs[&s.id];
        assert_eq!(job.state, JobState::Discarded, "{job:#?}");
        assert_eq!(job.attempt, 1);
    }
    let stats = h.sandbox.stats();
    for code in codes {
        assert_eq!(errors_of(&stats, code), 1, "code {code}: {stats:?}");
    }
    assert_eq!(stats.accepted, 0);
    assert_eq!(requests_seen(&stats), codes.len() as u64);
    // Nothing retried them later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(requests_seen(&h.sandbox.stats()), codes.len() as u64);
    h.finish().await;
}

/// 190 and 368 (and an expired token): the channel is paused with the code in its reason,
/// the send goes back to `queued`, nothing more reaches Meta while paused; once an operator
/// resumes the channel the send (and one enqueued during the pause) goes out.
async fn pause_and_resume(h: &Harness, cases: &[(Channel, i64)]) {
    let mut first = Vec::new();
    for (ch, _) in cases {
        first.push(
            h.create_one(h.template(ch, "15556000001", Lane::Broadcast))
                .await,
        );
    }
    for ((ch, code), send) in cases.iter().zip(&first) {
        let paused = h.wait_paused(ch.id).await;
        let reason = paused.paused_reason.unwrap();
        assert!(
            reason.contains(&code.to_string()),
            "reason {reason:?} names {code}"
        );
        assert!(paused.paused_at.is_some());
        let s = h
            .wait_send(*send, "the send back to queued", |s| {
                s.status == SendStatus::Queued
            })
            .await;
        assert_eq!(s.requests, 1);
        assert_eq!(s.provider_message_id, None);
        let job = h
            .wait_job(*send, "the job waiting", |j| {
                !j.state.is_final() && j.state != JobState::Running
            })
            .await;
        assert_eq!(job.attempt, 0, "a pause is not an attempt: {job:#?}");
        // The admission grants the paused channel nothing.
        h.admission.invalidate();
        let grant = h.admission.acquire(&channel_rate_key(ch.id), 5).await;
        assert_eq!(grant.granted, 0);
    }
    let seen = requests_seen(&h.sandbox.stats());
    assert_eq!(seen, cases.len() as u64, "{:?}", h.sandbox.stats());
    // Sends enqueued during the pause wait too.
    let mut during = Vec::new();
    for (ch, _) in cases {
        during.push(
            h.create_one(h.template(ch, "15556000002", Lane::Interactive))
                .await,
        );
    }
    // Several recheck periods: nothing reaches Meta, nothing leaves `queued`.
    let until = Instant::now() + PAUSED_RECHECK * 4;
    while Instant::now() < until {
        assert_eq!(requests_seen(&h.sandbox.stats()), seen);
        tokio::time::sleep(POLL).await;
    }
    for id in first.iter().chain(&during) {
        assert_eq!(h.send(*id).await.status, SendStatus::Queued);
    }

    // The operator fixes the cause and resumes.
    h.sandbox.set_faults(Faults::default());
    for (ch, _) in cases {
        assert!(h
            .store
            .delivery()
            .pause_channel(ch.id, None, false, h.now())
            .await
            .unwrap());
    }
    h.admission.invalidate();
    let ids: Vec<Uuid> = first.iter().chain(&during).copied().collect();
    let sends = h
        .wait_sends(&ids, "every send accepted after the resume", |s| {
            s.status == SendStatus::Accepted
        })
        .await;
    let jobs = h.wait_final_jobs(&ids).await;
    for (s, refused_once) in sends
        .iter()
        .zip(std::iter::repeat_n(true, first.len()).chain(std::iter::repeat_n(false, during.len())))
    {
        let expected = if refused_once { 2 } else { 1 };
        assert_eq!(s.requests, expected, "{s:#?}");
        assert_eq!(h.copies(s.id), 1);
        let job = &jobs[&s.id];
        assert_eq!(job.state, JobState::Completed);
        assert_eq!(job.attempt, 1, "{job:#?}");
    }
    for (ch, _) in cases {
        assert_eq!(h.channel_now(ch.id).await.paused_reason, None);
    }
    let stats = h.sandbox.stats();
    assert_eq!(stats.accepted, ids.len() as u64);
    assert_eq!(stats.duplicate_callbacks, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_errors_pause_the_channel_until_resumed() {
    let mut faults = Faults::default();
    for (sender, code) in [("1555000190", 190), ("1555000368", 368)] {
        faults.sender_errors.insert(sender.into(), code);
    }
    let h = Harness::new(Setup::new(Backend::Sqlite).sandbox(SandboxConfig {
        faults,
        ..SandboxConfig::default()
    }))
    .await;
    let mut cases = Vec::new();
    for (sender, code) in [("1555000190", 190), ("1555000368", 368)] {
        cases.push((h.channel(sender, None, None).await, code));
    }
    pause_and_resume(&h, &cases).await;
    let stats = h.sandbox.stats();
    for code in [190, 368] {
        assert_eq!(errors_of(&stats, code), 1, "{stats:?}");
    }
    h.finish().await;
}

/// 131048 (spam quality) pauses the channel's broadcasts only: a reply to someone who wrote in
/// still goes out during the pause, broadcast jobs are not even claimed, and after the resume
/// the broadcast goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spam_quality_pauses_broadcasts_but_not_replies() {
    let mut faults = Faults::default();
    faults.sender_errors.insert("1555131048".into(), 131048);
    let h = Harness::new(Setup::new(Backend::Sqlite).sandbox(SandboxConfig {
        faults,
        ..SandboxConfig::default()
    }))
    .await;
    let ch = h.channel("1555131048", None, None).await;
    let first = h
        .create_one(h.template(&ch, "15556100001", Lane::Broadcast))
        .await;
    let paused = h.wait_paused(ch.id).await;
    assert!(paused.paused_broadcasts_only, "{paused:?}");
    assert!(paused
        .paused_reason
        .as_deref()
        .is_some_and(|r| r.contains("131048")));
    h.wait_send(first, "the broadcast back to queued", |s| {
        s.status == SendStatus::Queued
    })
    .await;
    // Meta stops refusing (the quality recovered) but the operator has not resumed yet.
    h.sandbox.set_faults(Faults::default());
    h.admission.invalidate();
    let more: Vec<Uuid> = h
        .create(&[
            h.template(&ch, "15556100002", Lane::Broadcast),
            h.template(&ch, "15556100003", Lane::Broadcast),
        ])
        .await;
    h.store
        .delivery()
        .record_inbound(ch.id, "15556100009", h.now())
        .await
        .unwrap();
    let reply = h.create_one(h.text(&ch, "15556100009")).await;
    h.wait_send(reply, "the reply accepted during the pause", |s| {
        s.status == SendStatus::Accepted
    })
    .await;
    tokio::time::sleep(PAUSED_RECHECK * 3).await;
    for id in std::iter::once(&first).chain(&more) {
        assert_eq!(
            h.send(*id).await.status,
            SendStatus::Queued,
            "broadcasts wait"
        );
    }
    for id in &more {
        assert_eq!(
            h.job(*id).await.attempt,
            0,
            "a paused broadcast is not even claimed"
        );
    }
    assert_eq!(h.sandbox.stats().accepted, 1, "only the reply reached Meta");
    assert!(h
        .store
        .delivery()
        .pause_channel(ch.id, None, false, h.now())
        .await
        .unwrap());
    h.admission.invalidate();
    let all: Vec<Uuid> = std::iter::once(first).chain(more).collect();
    h.wait_sends(&all, "the broadcast goes on after the resume", |s| {
        s.status == SendStatus::Accepted
    })
    .await;
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_pauses_the_channel_postgres() {
    let h = Harness::new(Setup::new(Backend::Postgres).sandbox(SandboxConfig {
        faults: Faults {
            token_expired: true,
            ..Faults::default()
        },
        ..SandboxConfig::default()
    }))
    .await;
    let ch = h.channel("1555000191", None, None).await;
    pause_and_resume(&h, &[(ch, 190)]).await;
    assert_eq!(errors_of(&h.sandbox.stats(), 190), 1);
    h.finish().await;
}

/// 130429: the send is retried (not counted as an attempt) until Meta takes it, and the
/// channel is slowed down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_refusals_slow_the_channel_and_retry() {
    let h = Harness::new(Setup::new(Backend::Sqlite).sandbox(SandboxConfig {
        faults: Faults {
            burst_130429: 3,
            ..Faults::default()
        },
        ..SandboxConfig::default()
    }))
    .await;
    let ch = h.channel("1555000102", None, None).await;
    assert_eq!(h.admission.slowdown(ch.id), 1.0);
    let id = h
        .create_one(h.template(&ch, "15557000001", Lane::Broadcast))
        .await;
    let s = h
        .wait_send(id, "the send accepted after three 130429", |s| {
            s.status == SendStatus::Accepted
        })
        .await;
    assert!(
        h.admission.slowdown(ch.id) < 1.0,
        "the channel runs slower after 130429"
    );
    assert_eq!(s.requests, 4, "{s:#?}");
    assert_eq!(s.error_code, None);
    let stats = h.sandbox.stats();
    assert_eq!(stats.limit_errors, 3);
    assert_eq!(errors_of(&stats, 130429), 3);
    assert_eq!(stats.accepted, 1);
    assert_eq!(h.copies(id), 1);
    let job = h
        .wait_job(id, "the job completed", |j| j.state == JobState::Completed)
        .await;
    assert_eq!(job.attempt, 1, "130429 is not an attempt: {job:#?}");
    assert!(job.errors.is_empty(), "{job:#?}");
    h.finish().await;
}

/// 131056: only that recipient waits, 4^n seconds after its n-th refusal (1 s, then 4 s);
/// sends to everyone else go on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_rate_refusals_retry_only_that_recipient() {
    let h = Harness::new(Setup::new(Backend::Sqlite).sandbox(SandboxConfig {
        pair_burst: 1,
        pair_interval: Duration::from_secs(3),
        ..SandboxConfig::default()
    }))
    .await;
    let ch = h.channel("1555000103", None, None).await;
    let user = "15558000000";
    let a1 = h.create_one(h.template(&ch, user, Lane::Broadcast)).await;
    h.wait_send(a1, "the first send to the user", |s| {
        s.status == SendStatus::Accepted
    })
    .await;
    let mut batch = vec![h.template(&ch, user, Lane::Broadcast)];
    for i in 1..=5 {
        batch.push(h.template(&ch, &format!("1555800000{i}"), Lane::Broadcast));
    }
    let ids = h.create(&batch).await;
    let (a2, others) = (ids[0], &ids[1..]);

    // First refusal: the second send to the user waits 4^0 = 1 s; the others go out.
    let job = h
        .wait_job(a2, "the second send to the user snoozed", |j| {
            j.state == JobState::Scheduled
        })
        .await;
    let s = h.send(a2).await;
    assert_eq!(s.status, SendStatus::Queued);
    assert_eq!(s.requests, 1);
    assert_eq!(job.attempt, 0, "131056 is not an attempt");
    let wait = secs(job.run_at - s.updated_at);
    assert!(
        (0.9..=1.5).contains(&wait),
        "first 131056: retry after 4^0 = 1 s, got {wait} s"
    );
    let sent = h
        .wait_sends(others, "the sends to other users", |s| {
            s.status == SendStatus::Accepted
        })
        .await;
    assert!(sent.iter().all(|s| s.requests == 1));
    assert_eq!(h.send(a2).await.status, SendStatus::Queued);
    assert_eq!(errors_of(&h.sandbox.stats(), 131056), 1);

    // Second refusal (the sandbox allows one message per 3 s): 4^1 = 4 s.
    h.wait_sandbox("the second 131056", |s| errors_of(s, 131056) == 2)
        .await;
    let job = h
        .wait_job(a2, "the send snoozed again", |j| {
            j.state == JobState::Scheduled && j.run_at > job.run_at
        })
        .await;
    let s = h.send(a2).await;
    let wait = secs(job.run_at - s.updated_at);
    assert!(
        (3.9..=4.5).contains(&wait),
        "second 131056: retry after 4^1 = 4 s, got {wait} s"
    );

    let s = h
        .wait_send(a2, "the second send to the user accepted", |s| {
            s.status == SendStatus::Accepted
        })
        .await;
    assert_eq!(s.requests, 3, "{s:#?}");
    let stats = h.sandbox.stats();
    assert_eq!(errors_of(&stats, 131056), 2);
    assert_eq!(stats.accepted, 7);
    assert_eq!(stats.duplicate_callbacks, 0);
    let log: HashMap<String, f64> = h
        .sandbox
        .accepted("")
        .into_iter()
        .map(|a| (a.callback, a.accepted_unix_ms))
        .collect();
    let at = |id: Uuid| log[&id.to_string()];
    assert!(at(a2) - at(a1) >= 2_900.0, "the pair rate was kept");
    for o in others {
        assert!(at(*o) < at(a2), "other users did not wait for the pair");
    }
    let job = h
        .wait_job(a2, "its job completed", |j| j.state.is_final())
        .await;
    assert_eq!(job.state, JobState::Completed);
    assert_eq!(job.attempt, 1);
    h.finish().await;
}

/// Server errors (HTTP 500, code 2; codes 1, 131016, 131000): retried with the kind's backoff,
/// counting attempts, until Meta takes the send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_retry_with_backoff() {
    let mut faults = Faults {
        server_error: 1.0,
        ..Faults::default()
    };
    let coded = [
        ("1555000001", 1),
        ("1555131016", 131016),
        ("1555131000", 131000),
    ];
    for (sender, code) in coded {
        faults.sender_errors.insert(sender.into(), code);
    }
    let h = Harness::new(Setup::new(Backend::Sqlite).sandbox(SandboxConfig {
        faults,
        ..SandboxConfig::default()
    }))
    .await;
    let ch = h.channel("1555000104", None, None).await;
    let mut others = Vec::new();
    for (sender, code) in coded {
        let c = h.channel(sender, None, None).await;
        others.push((
            h.create_one(h.template(&c, "15559000002", Lane::Broadcast))
                .await,
            code,
        ));
    }
    let id = h
        .create_one(h.template(&ch, "15559000001", Lane::Broadcast))
        .await;

    for (send, code) in &others {
        let job = h
            .wait_job(*send, "a retry after a temporary error", |j| {
                j.state == JobState::Retryable && j.attempt == 1
            })
            .await;
        assert_eq!(job.errors.len(), 1);
        assert!(
            job.errors[0].message.contains(&code.to_string()),
            "{job:#?}"
        );
        let s = h.send(*send).await;
        assert_eq!(s.status, SendStatus::Queued, "code {code}");
        let wait = secs(job.run_at - job.errors[0].at);
        assert!(
            (0.75..=1.25).contains(&wait),
            "backoff 1 s ±20 %, got {wait}"
        );
    }

    h.wait_sandbox("two server errors", |s| errors_of(s, 2) >= 2)
        .await;
    h.sandbox.set_faults(Faults::default());
    let s = h
        .wait_send(id, "the send accepted once Meta recovered", |s| {
            s.status == SendStatus::Accepted
        })
        .await;
    assert_eq!(s.requests, 3, "{s:#?}");
    let stats = h.sandbox.stats();
    assert_eq!(errors_of(&stats, 2), 2);
    assert_eq!(h.copies(id), 1);
    let job = h
        .wait_job(id, "the job completed", |j| j.state == JobState::Completed)
        .await;
    assert_eq!(job.attempt, 3, "server errors count attempts: {job:#?}");
    assert_eq!(job.errors.len(), 2);
    let gaps: Vec<f64> = job
        .errors
        .windows(2)
        .map(|w| secs(w[1].at - w[0].at))
        .collect();
    assert!(
        gaps[0] >= 0.75,
        "the second attempt waited the backoff: {gaps:?}"
    );
    h.wait_sends(
        &others.iter().map(|o| o.0).collect::<Vec<_>>(),
        "the other sends accepted",
        |s| s.status == SendStatus::Accepted,
    )
    .await;
    h.finish().await;
}

/// 4, 17, 32, 613, 80007 (Graph API limits): snoozed ~60 s and the channel slowed; 131057
/// (throughput upgrade): snoozed ~60 s; 131049 (per-user marketing cap): snoozed for hours.
/// None of them counts as an attempt or is retried at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_and_wait_codes_snooze_without_counting_attempts() {
    let slowing = [4, 17, 32, 613, 80007];
    let mut faults = Faults::default();
    let sender = |code: i64| format!("1555{code:06}");
    for code in slowing.iter().chain(&[131057]) {
        faults.sender_errors.insert(sender(*code), *code);
    }
    faults.recipient_errors.insert("15551310490".into(), 131049);
    let h = Harness::new(Setup::new(Backend::Sqlite).sandbox(SandboxConfig {
        faults,
        ..SandboxConfig::default()
    }))
    .await;
    let mut cases = Vec::new();
    for code in slowing.iter().chain(&[131057]) {
        let ch = h.channel(&sender(*code), None, None).await;
        let id = h
            .create_one(h.template(&ch, "15551000001", Lane::Broadcast))
            .await;
        cases.push((ch, id, *code, Duration::from_secs(60)));
    }
    let ch = h.channel("1555000105", None, None).await;
    let id = h
        .create_one(h.template(&ch, "15551310490", Lane::Broadcast))
        .await;
    cases.push((ch, id, 131049, Duration::from_secs(12 * 3600)));

    for (ch, id, code, after) in &cases {
        let job = h
            .wait_job(*id, "the send snoozed", |j| j.state == JobState::Scheduled)
            .await;
        assert_eq!(job.attempt, 0, "code {code} is not an attempt: {job:#?}");
        assert!(job.errors.is_empty());
        let s = h.send(*id).await;
        assert_eq!(s.status, SendStatus::Queued, "code {code}");
        assert_eq!(s.requests, 1);
        assert_eq!(
            s.error_code,
            Some(*code),
            "Meta's refusal is kept for operators"
        );
        let wait = secs(job.run_at - s.updated_at);
        let base = after.as_secs_f64();
        assert!(
            (base - 0.5..=base * 1.2 + 1.0).contains(&wait),
            "code {code}: snoozed {wait} s, expected {base} s + up to 20 %"
        );
        let slowed = h.admission.slowdown(ch.id);
        if slowing.contains(code) {
            assert!(slowed < 1.0, "code {code} slows the channel");
        } else {
            assert_eq!(slowed, 1.0, "code {code} does not slow the channel");
        }
        assert_eq!(h.channel_now(ch.id).await.paused_reason, None);
    }
    let stats = h.sandbox.stats();
    for (_, _, code, _) in &cases {
        assert_eq!(errors_of(&stats, *code), 1, "code {code}: {stats:?}");
    }
    assert_eq!(requests_seen(&stats), cases.len() as u64);
    h.finish().await;
}

/// Meta's usage headers near the limit slow the channel before Meta refuses anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_headers_near_the_limit_slow_the_channel() {
    let h = Harness::new(Setup::new(Backend::Sqlite).sandbox(SandboxConfig {
        // A bucket of 5 that refills slowly: five quick sends use 90 % and more of it.
        mps: 2.0,
        burst: Duration::from_millis(2_500),
        faults: Faults {
            usage_headers: true,
            ..Faults::default()
        },
        ..SandboxConfig::default()
    }))
    .await;
    let ch = h.channel("1555000113", None, None).await;
    let sends: Vec<NewSend> = (0..5)
        .map(|i| h.template(&ch, &format!("1555290{i:04}"), Lane::Broadcast))
        .collect();
    let ids = h.create(&sends).await;
    h.wait_sends(&ids, "all accepted", |s| s.status == SendStatus::Accepted)
        .await;
    let stats = h.sandbox.stats();
    assert_eq!(stats.limit_errors, 0, "{stats:?}");
    assert_eq!(stats.accepted, 5);
    assert!(
        h.admission.slowdown(ch.id) < 1.0,
        "usage above 90 % slows the channel"
    );
    h.finish().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Lost answers
// ---------------------------------------------------------------------------------------------

/// Sends one message whose answer the sandbox loses; returns it once Herald marked it unknown.
async fn lose_one(h: &Harness, ch: &Channel) -> SendRecord {
    h.sandbox.set_faults(Faults {
        lose_response: 1.0,
        ..Faults::default()
    });
    let id = h
        .create_one(h.template(ch, "15552100001", Lane::Broadcast))
        .await;
    h.wait_sandbox("the lost send accepted", |s| s.lost_responses == 1)
        .await;
    h.sandbox.set_faults(Faults::default());
    let s = h
        .wait_send(id, "the send unknown", |s| s.status == SendStatus::Unknown)
        .await;
    assert_eq!(s.requests, 1);
    assert_eq!(s.provider_message_id, None);
    assert!(s.error.is_some(), "the lost answer is recorded: {s:#?}");
    assert_eq!(h.copies(id), 1);
    let job = h
        .wait_job(id, "the job waiting for the grace period", |j| {
            j.state == JobState::Scheduled
        })
        .await;
    assert_eq!(job.attempt, 0, "a lost answer is not a failed attempt");
    let grace_ends = s.requested_at.unwrap() + chrono::Duration::from_std(GRACE).unwrap();
    assert!(job.run_at >= grace_ends, "{job:#?}");
    s
}

/// With the status webhook reconciled, the lost send is settled and never sent again, even
/// after the grace period.
async fn lost_answer_reconciled(backend: Backend) {
    let h = Harness::new(Setup::new(backend)).await;
    let ch = h.channel("1555000106", None, None).await;
    let s = lose_one(&h, &ch).await;
    let message_id = h.sandbox_message_id(s.id);
    h.apply_status(&ch, s.id, &message_id, SendStatus::Sent)
        .await;
    h.apply_status(&ch, s.id, &message_id, SendStatus::Delivered)
        .await;
    // The job wakes after the grace period and finds the send settled.
    let job = h
        .wait_job(s.id, "the job completed after the grace period", |j| {
            j.state == JobState::Completed
        })
        .await;
    assert!(
        job.finalized_at.unwrap()
            >= s.requested_at.unwrap() + chrono::Duration::from_std(GRACE).unwrap()
    );
    assert_eq!(job.attempt, 1);
    let after = h.send(s.id).await;
    assert_eq!(after.status, SendStatus::Delivered, "{after:#?}");
    assert_eq!(after.requests, 1);
    assert_eq!(
        after.provider_message_id.as_deref(),
        Some(message_id.as_str())
    );
    assert_eq!(h.copies(s.id), 1);
    let stats = h.sandbox.stats();
    assert_eq!(stats.accepted, 1);
    assert_eq!(stats.duplicate_callbacks, 0);
    assert_eq!(requests_seen(&stats), 1);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answer_reconciled_by_its_status_is_not_resent_sqlite() {
    lost_answer_reconciled(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answer_reconciled_by_its_status_is_not_resent_postgres() {
    lost_answer_reconciled(Backend::Postgres).await;
}

/// Without any status, the send waits out the grace period and is sent again: the documented
/// price of never dropping a message is this duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answer_without_status_is_resent_after_the_grace_period() {
    let h = Harness::new(Setup::new(Backend::Sqlite)).await;
    let ch = h.channel("1555000107", None, None).await;
    let s = lose_one(&h, &ch).await;
    let first_request = s.requested_at.unwrap();
    let grace_ends = first_request + chrono::Duration::from_std(GRACE).unwrap();
    // Not before the grace period.
    while h.now() < grace_ends - chrono::Duration::milliseconds(100) {
        assert_eq!(h.copies(s.id), 1, "resent before the grace period ended");
        assert_eq!(h.send(s.id).await.status, SendStatus::Unknown);
        tokio::time::sleep(POLL).await;
    }
    let after = h
        .wait_send(s.id, "the send resent and accepted", |s| {
            s.status == SendStatus::Accepted
        })
        .await;
    assert_eq!(after.requests, 2, "{after:#?}");
    assert!(after.requested_at.unwrap() >= grace_ends);
    assert_eq!(h.copies(s.id), 2, "the sandbox holds both copies");
    let stats = h.sandbox.stats();
    assert_eq!(stats.accepted, 2);
    assert_eq!(stats.duplicate_callbacks, 1);
    assert_eq!(stats.unique_callbacks, 1);
    // Meta's id is the second copy's (the one Herald was told about).
    assert!(after.provider_message_id.is_some());
    assert_ne!(
        after.provider_message_id.as_deref(),
        Some(h.sandbox_message_id(s.id).as_str())
    );
    let job = h
        .wait_job(s.id, "the job completed", |j| {
            j.state == JobState::Completed
        })
        .await;
    assert_eq!(job.attempt, 1);
    h.finish().await;
}

// ---------------------------------------------------------------------------------------------
// 4. A worker that died mid-call
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_left_sending_waits_for_the_grace_period() {
    let mut h = Harness::new(Setup::new(Backend::Sqlite).stopped()).await;
    let ch = h.channel("1555000108", None, None).await;
    let silent = h
        .create_one(h.template(&ch, "15552200001", Lane::Broadcast))
        .await;
    let reported = h
        .create_one(h.template(&ch, "15552200002", Lane::Broadcast))
        .await;
    // Both were being requested when their worker died (their jobs are back in the queue).
    let mut requested_at = HashMap::new();
    for id in [silent, reported] {
        let s = h
            .store
            .delivery()
            .update_send(id, &SendUpdate::Requesting, h.now())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(s.status, SendStatus::Sending);
        assert_eq!(s.requests, 1);
        requested_at.insert(id, s.requested_at.unwrap());
    }
    h.start();
    let grace = chrono::Duration::from_std(GRACE).unwrap();
    for id in [silent, reported] {
        h.wait_send(id, "the send marked unknown", |s| {
            s.status == SendStatus::Unknown
        })
        .await;
        let job = h
            .wait_job(id, "the job waiting for the grace period", |j| {
                j.state == JobState::Scheduled
            })
            .await;
        assert_eq!(job.attempt, 0);
        let until = secs(job.run_at - requested_at[&id]);
        assert!(
            (GRACE.as_secs_f64() - 0.05..=GRACE.as_secs_f64() + 0.5).contains(&until),
            "waits until the grace period ends: {until}"
        );
    }
    // Meta's status for the second one arrives (the request did reach Meta after all).
    h.apply_status(&ch, reported, "wamid.crashed", SendStatus::Sent)
        .await;
    // Nothing is sent before the grace period ends.
    while h.now() < requested_at[&silent] + grace - chrono::Duration::milliseconds(100) {
        assert_eq!(requests_seen(&h.sandbox.stats()), 0);
        tokio::time::sleep(POLL).await;
    }
    let s = h
        .wait_send(silent, "the silent send resent", |s| {
            s.status == SendStatus::Accepted
        })
        .await;
    assert_eq!(s.requests, 2);
    assert!(s.requested_at.unwrap() >= requested_at[&silent] + grace);
    assert_eq!(h.copies(silent), 1);
    let job = h
        .wait_job(reported, "the reported send's job completed", |j| {
            j.state == JobState::Completed
        })
        .await;
    assert_eq!(job.attempt, 1);
    let r = h.send(reported).await;
    assert_eq!(r.status, SendStatus::Sent);
    assert_eq!(r.requests, 1, "never sent again");
    assert_eq!(r.provider_message_id.as_deref(), Some("wamid.crashed"));
    assert_eq!(h.copies(reported), 0);
    let stats = h.sandbox.stats();
    assert_eq!(stats.accepted, 1);
    assert_eq!(requests_seen(&stats), 1);
    h.finish().await;
}

/// A send the claim of its job began goes out at once even when the claim's record of it did
/// not reach the worker (a row that did not decode, say): its worker recognises its own
/// claim's time. A later attempt (the claiming process died before the call) does not: the
/// send waits for the grace period, as any request whose answer may be lost.
async fn a_begun_send_without_its_record(backend: Backend) {
    use herald_engine::store::KeyClaim;
    use herald_engine::JobError;

    let h = Harness::new(Setup::new(backend).stopped()).await;
    let ch = h.channel("1555000109", None, None).await;
    let ids = h
        .create(&[
            h.template(&ch, "15552300001", Lane::Broadcast),
            h.template(&ch, "15552300002", Lane::Broadcast),
        ])
        .await;
    let now = h.now();
    let key = channel_rate_key(ch.id);
    let jobs = h
        .store
        .claim_keys(
            SEND_QUEUE,
            &[KeyClaim {
                key: &key,
                limit: 10,
                max_priority: None,
            }],
            "w1",
            now,
            now + chrono::Duration::seconds(30),
        )
        .await
        .expect("claim");
    assert_eq!(jobs.len(), 2);
    let job_of = |id: Uuid| {
        jobs.iter()
            .find(|j| j.payload["send_id"] == id.to_string())
            .expect("its job")
            .clone()
    };
    for &id in &ids {
        let job = job_of(id);
        let d = h.store.delivery();
        let later = now + chrono::Duration::seconds(1);
        assert!(
            d.take_begun(id, job.id, later).is_none(),
            "another claim does not get the record"
        );
        // The record goes missing (as a row that does not decode would).
        assert!(d.take_begun(id, job.id, now).is_some());
    }
    let worker = h.worker();

    // The attempt whose claim began it: sent at once, one request in all.
    let own = job_of(ids[0]);
    run_job(&worker, &own).await.expect("sent");
    let s = h.send(ids[0]).await;
    assert_eq!(
        s.status,
        SendStatus::Sending,
        "the completion records the answer"
    );
    assert_eq!(s.requests, 1, "no second request counted");
    assert_eq!(h.copies(ids[0]), 1, "sent once");

    // A later attempt of the other (its first claimer died before the call): it waits.
    let mut later = job_of(ids[1]);
    later.attempt += 1;
    later.attempted_at = Some(now + chrono::Duration::seconds(1));
    let result = run_job(&worker, &later).await;
    // The grace period runs from the request (the first claim), whatever this took.
    let elapsed = (h.now() - now).to_std().unwrap_or_default();
    match result {
        Err(JobError::Snooze(wait)) => assert!(
            wait <= GRACE && wait + elapsed + Duration::from_millis(50) >= GRACE,
            "waits out the grace period: {wait:?} after {elapsed:?}"
        ),
        other => panic!("expected to wait for the grace period, got {other:?}"),
    }
    assert_eq!(h.send(ids[1]).await.status, SendStatus::Unknown);
    assert_eq!(h.copies(ids[1]), 0, "not sent");
    assert_eq!(requests_seen(&h.sandbox.stats()), 1);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begun_send_without_its_record_sqlite() {
    a_begun_send_without_its_record(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begun_send_without_its_record_postgres() {
    a_begun_send_without_its_record(Backend::Postgres).await;
}

/// Runs `worker` on `job` as the engine would: its payload read as the send's arguments.
async fn run_job(worker: &SendWorker, job: &Job) -> Result<(), herald_engine::JobError> {
    use herald_engine::Worker as _;

    let args: SendArgs = serde_json::from_value(job.payload.clone()).expect("send args");
    worker
        .work(args, &herald_engine::JobContext::new(job.clone()))
        .await
}

impl Harness {
    /// Runs `sql` in this test's schema with psql, and returns what it printed (PostgreSQL
    /// only: the workers crate has no SQL client of its own).
    fn psql(&self, sql: &str) -> String {
        let DbGuard::Schema(schema) = &self._db else {
            panic!("psql is for PostgreSQL tests");
        };
        let out = std::process::Command::new("psql")
            .arg(pg_url())
            .args(["-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1", "-c"])
            .arg(format!("SET search_path TO \"{schema}\"; {sql}"))
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The send's job, claimed as a plain claim does (which begins no send), with a lease.
    async fn claim_plain(&self) -> Job {
        let now = self.now();
        let mut jobs = self
            .store
            .claim(
                SEND_QUEUE,
                "w1",
                1,
                now,
                now + chrono::Duration::seconds(30),
            )
            .await
            .expect("claim");
        assert_eq!(jobs.len(), 1, "one send job");
        jobs.remove(0)
    }

    /// Runs the queue's one send job (claimed plainly) and drops the attempt once `held` (a
    /// query counting what holds it up) says it waits: a handler timeout or a shutdown would
    /// drop it there.
    async fn drop_attempt_when_held(&self, held: &str) {
        use herald_engine::JobContext;
        use herald_engine::Worker as _;

        let worker = self.worker();
        let job = self.claim_plain().await;
        let args: SendArgs = serde_json::from_value(job.payload.clone()).expect("send args");
        let attempt = tokio::spawn(async move { worker.work(args, &JobContext::new(job)).await });
        let deadline = Instant::now() + WAIT;
        while self.psql(held) == "0" {
            assert!(!attempt.is_finished(), "not held up: {:?}", attempt.await);
            assert!(Instant::now() < deadline, "the attempt was never held up");
            tokio::time::sleep(POLL).await;
        }
        attempt.abort();
        assert!(attempt.await.is_err_and(|e| e.is_cancelled()), "dropped");
    }

    /// A template send on a tiered channel whose portfolio's reservation lock another session
    /// holds (the worker's tier step, after its begin and before its call, waits for it until
    /// the holder is dropped): the send, the lock's key and its holder.
    async fn send_held_at_its_tier(&self) -> (Uuid, String, Holder) {
        use std::io::Write as _;

        let limits = ChannelLimits {
            tier: Some(10),
            ..ChannelLimits::default()
        };
        let portfolio = unique("portfolio");
        let lock = format!("hashtextextended('herald_reach:{portfolio}', 0)");
        let ch = self
            .channel("1555000109", Some(limits), Some(&portfolio))
            .await;
        let id = self
            .create_one(self.template(&ch, "15552300001", Lane::Broadcast))
            .await;
        let mut holder = Holder::psql();
        let stdin = holder.0.stdin.as_mut().expect("psql's input");
        stdin
            .write_all(format!("SELECT pg_advisory_lock({lock});\n").as_bytes())
            .and_then(|()| stdin.flush())
            .expect("ask psql for the lock");
        let deadline = Instant::now() + WAIT;
        while self.psql(&format!("SELECT pg_try_advisory_lock({lock})")) == "t" {
            assert!(Instant::now() < deadline, "the lock was not taken");
            tokio::time::sleep(POLL).await;
        }
        (id, lock, holder)
    }

    fn worker(&self) -> SendWorker {
        self.worker_with(SendConfig {
            unknown_grace: GRACE,
            ..SendConfig::default()
        })
    }

    fn worker_with(&self, config: SendConfig) -> SendWorker {
        SendWorker::new(
            self.store.clone(),
            self.admission.clone(),
            MetaClient::new(ClientConfig::default()).expect("client"),
            self.clock.clone(),
            config,
        )
    }
}

/// A worker's begin that committed but whose answer failed (here: the row it returned does not
/// decode) is undone by its attempt, so the next attempt sends at once instead of waiting out
/// the grace period as for a lost answer. Meta was not called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_whose_answer_failed_is_undone_postgres() {
    use herald_engine::JobError;

    let h = Harness::new(Setup::new(Backend::Postgres).stopped()).await;
    let ch = h.channel("1555000109", None, None).await;
    let id = h
        .create_one(h.template(&ch, "15552300001", Lane::Broadcast))
        .await;
    let good = h.psql(&format!(
        "SELECT message::text FROM herald_sends WHERE id = '{id}'"
    ));
    h.psql(&format!(
        "UPDATE herald_sends SET message = '{{\"type\":\"bogus\"}}' WHERE id = '{id}'"
    ));
    let worker = h.worker();
    let job = h.claim_plain().await;
    match run_job(&worker, &job).await {
        Err(JobError::Retry { error, .. }) => {
            assert!(
                error.contains("decode") || error.contains("bogus"),
                "{error}"
            )
        }
        other => panic!("expected a retry, got {other:?}"),
    }
    assert_eq!(
        h.psql(&format!(
            "SELECT status || ' ' || requests FROM herald_sends WHERE id = '{id}'"
        )),
        "queued 0",
        "the begin is undone: no request was made"
    );
    assert_eq!(requests_seen(&h.sandbox.stats()), 0);

    // The next attempt sends at once.
    h.psql(&format!(
        "UPDATE herald_sends SET message = '{}' WHERE id = '{id}'",
        good.replace('\'', "''")
    ));
    let mut next = job.clone();
    next.attempt += 1;
    next.attempted_at = Some(h.now());
    run_job(&worker, &next).await.expect("sent at once");
    assert_eq!(h.copies(id), 1, "sent once");
    assert_eq!(h.send(id).await.requests, 1, "one request in all");
    h.finish().await;
}

/// A request the transport could not send (no connection: no byte left the process) puts its
/// send back to `queued` with its request not counted, for a retry with backoff, not a wait
/// for the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_not_sent_goes_back_to_the_queue() {
    use herald_engine::JobError;

    let h = Harness::new(Setup::new(Backend::Sqlite).stopped()).await;
    // Bound and not listening for the whole test: connections are refused, and no other
    // test's server can take the port meanwhile.
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("a socket");
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    let closed = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("its address")
        .port();
    let ch = h
        .store
        .delivery()
        .create_channel(
            &NewChannel {
                workspace_id: h.workspace,
                platform: Platform::Whatsapp,
                name: "nowhere".into(),
                sender_id: "1555000109".into(),
                portfolio_id: None,
                access_token: "sandbox-token".into(),
                app_secret: "sandbox-secret".into(),
                verify_token: "verify".into(),
                graph_base_url: Some(format!("http://127.0.0.1:{closed}")),
                api_version: None,
                limits: None,
            },
            h.now(),
        )
        .await
        .expect("create channel");
    let id = h
        .create_one(h.template(&ch, "15552300001", Lane::Broadcast))
        .await;
    match run_job(&h.worker(), &h.claim_plain().await).await {
        Err(JobError::Retry { .. }) => {}
        other => panic!("expected a retry, got {other:?}"),
    }
    let s = h.send(id).await;
    assert_eq!(
        (s.status, s.requests),
        (SendStatus::Queued, 0),
        "back to the queue, the request not counted"
    );
    h.finish().await;
}

/// An attempt dropped while its worker's begin is being written (here: held up by another
/// session's lock on the send's row) makes no request: the recorder, finding its caller gone
/// once the begin commits, undoes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_whose_attempt_was_dropped_is_undone_postgres() {
    use std::io::{BufRead as _, Write as _};

    let h = Harness::new(Setup::new(Backend::Postgres).stopped()).await;
    let ch = h.channel("1555000109", None, None).await;
    let id = h
        .create_one(h.template(&ch, "15552300001", Lane::Broadcast))
        .await;
    let DbGuard::Schema(schema) = &h._db else {
        unreachable!("a PostgreSQL test")
    };
    let mut holder = Holder::psql();
    let pid = {
        let stdin = holder.0.stdin.as_mut().expect("psql's input");
        stdin
            .write_all(
                format!(
                    "SET search_path TO \"{schema}\"; BEGIN;
                     SELECT pg_backend_pid() FROM herald_sends WHERE id = '{id}' FOR UPDATE;\n"
                )
                .as_bytes(),
            )
            .and_then(|()| stdin.flush())
            .expect("lock the send's row");
        let mut line = String::new();
        std::io::BufReader::new(holder.0.stdout.as_mut().expect("psql's output"))
            .read_line(&mut line)
            .expect("psql's pid");
        line.trim().to_owned()
    };
    // Dropped once its begin waits for the row.
    h.drop_attempt_when_held(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE {pid} = ANY(pg_blocking_pids(pid))"
    ))
    .await;
    drop(holder);
    let undone = h
        .wait_sends(&[id], "begun, then undone", |s| {
            s.status == SendStatus::Queued && s.requested_at.is_some()
        })
        .await;
    assert_eq!(undone[0].requests, 0, "no request counted");
    assert_eq!(requests_seen(&h.sandbox.stats()), 0, "Meta was not called");
    h.finish().await;
}

/// A psql session fed on its input, which ends (rolling back whatever it holds) as soon as
/// its input closes: it holds back no other test's vacuum for longer than its test.
struct Holder(std::process::Child);

impl Holder {
    fn psql() -> Holder {
        Holder(
            std::process::Command::new("psql")
                .arg(pg_url())
                .args(["-X", "-q", "-tA"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("run psql"),
        )
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// An attempt that ends between its begin and its call (a handler timeout, a panic, a
/// shutdown drops it; here it is held up by another session's lock on the messaging tier)
/// undoes its begin, so the next attempt does not wait out the grace period. Meta was not
/// called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_dropped_before_its_call_undoes_its_begin_postgres() {
    let h = Harness::new(Setup::new(Backend::Postgres).stopped()).await;
    let (id, lock, holder) = h.send_held_at_its_tier().await;
    // Dropped once it waits for the lock: past its begin, before its call.
    h.drop_attempt_when_held(&format!(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
            AND objsubid = 1 AND classid::text::bigint = ({lock} >> 32) & 4294967295
            AND objid::text::bigint = {lock} & 4294967295"
    ))
    .await;
    let undone = h
        .wait_sends(&[id], "begun, then undone", |s| {
            s.status == SendStatus::Queued && s.requested_at.is_some()
        })
        .await;
    assert_eq!(undone[0].requests, 0, "no request counted");
    assert_eq!(requests_seen(&h.sandbox.stats()), 0, "Meta was not called");
    drop(holder);
    h.finish().await;
}

/// An attempt that outlasts the worker's own timeout before its request (here: held up at the
/// messaging tier) is ended by the worker: its send goes back to the queue for a retry, and on
/// the job's last attempt fails with the reason instead of being left without a job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_past_its_time_settles_its_send_postgres() {
    use herald_engine::JobError;

    let h = Harness::new(Setup::new(Backend::Postgres).stopped()).await;
    let (id, _lock, holder) = h.send_held_at_its_tier().await;
    let worker = h.worker_with(SendConfig {
        unknown_grace: GRACE,
        // Ample for the steps before the tier, which waits: the timeout ends it there.
        attempt_timeout: Duration::from_secs(2),
        ..SendConfig::default()
    });
    let mut job = h.claim_plain().await;
    match run_job(&worker, &job).await {
        Err(JobError::Retry { error, .. }) => assert!(error.contains("longer than"), "{error}"),
        other => panic!("expected a retry, got {other:?}"),
    }
    let s = h
        .wait_sends(&[id], "back to the queue", |s| {
            s.status == SendStatus::Queued
        })
        .await;
    assert_eq!(s[0].requests, 0, "no request counted");

    job.attempt = job.max_attempts;
    job.attempted_at = Some(h.now());
    match run_job(&worker, &job).await {
        Err(JobError::Discard(why)) => assert!(why.contains("gave up"), "{why}"),
        other => panic!("expected the send to fail on the last attempt, got {other:?}"),
    }
    let s = h.send(id).await;
    assert_eq!(
        s.status,
        SendStatus::Failed,
        "failed with its reason, not left queued"
    );
    assert!(
        s.error
            .as_deref()
            .is_some_and(|e| e.contains("longer than")),
        "{:?}",
        s.error
    );
    assert_eq!(requests_seen(&h.sandbox.stats()), 0, "Meta was not called");
    drop(holder);
    h.finish().await;
}

/// An attempt whose time runs out while Meta has its request (a slow answer) leaves the send
/// as a lost answer, waiting for its status webhook: never back in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_past_its_time_during_the_call_is_a_lost_answer() {
    use herald_engine::JobError;

    let h = Harness::new(Setup::new(Backend::Sqlite).stopped()).await;
    h.sandbox.set_faults(Faults {
        slow: 1.0,
        slow_ms: 3_000,
        ..Faults::default()
    });
    let ch = h.channel("1555000109", None, None).await;
    let id = h
        .create_one(h.template(&ch, "15552300001", Lane::Broadcast))
        .await;
    let worker = h.worker_with(SendConfig {
        unknown_grace: GRACE,
        attempt_timeout: Duration::from_millis(1_000),
        ..SendConfig::default()
    });
    match run_job(&worker, &h.claim_plain().await).await {
        Err(JobError::Snooze(wait)) => assert_eq!(wait, GRACE, "waits for the status"),
        other => panic!("expected to wait for the status webhook, got {other:?}"),
    }
    let s = h.send(id).await;
    assert_eq!(
        (s.status, s.requests),
        (SendStatus::Unknown, 1),
        "a lost answer, its request counted"
    );
    h.finish().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Messaging tier
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_messaging_tier_holds_sends_to_new_users() {
    let h = Harness::new(Setup::new(Backend::Sqlite)).await;
    let limits = ChannelLimits {
        tier: Some(2),
        ..ChannelLimits::default()
    };
    let ch = h
        .channel("1555000109", Some(limits), Some("portfolio-1"))
        .await;
    let users = ["15552300001", "15552300002", "15552300003"];
    let sends: Vec<NewSend> = users
        .iter()
        .map(|u| h.template(&ch, u, Lane::Broadcast))
        .collect();
    let ids = h.create(&sends).await;
    let all = h
        .wait_sends(&ids, "two accepted, one held", |s| {
            s.status == SendStatus::Accepted || s.status == SendStatus::Queued
        })
        .await;
    // Wait for the held one's job to be snoozed.
    let deadline = Instant::now() + WAIT;
    let held = loop {
        let jobs = h.jobs().await;
        let snoozed: Vec<Uuid> = ids
            .iter()
            .filter(|id| jobs[*id].state == JobState::Scheduled)
            .copied()
            .collect();
        let accepted = h
            .wait_sends(&ids, "settled or queued", |_| true)
            .await
            .iter()
            .filter(|s| s.status == SendStatus::Accepted)
            .count();
        if snoozed.len() == 1 && accepted == 2 {
            break snoozed[0];
        }
        assert!(Instant::now() < deadline, "{all:#?} {jobs:#?}");
        tokio::time::sleep(POLL).await;
    };
    let s = h.send(held).await;
    assert_eq!(s.status, SendStatus::Queued);
    let job = h.job(held).await;
    assert_eq!(job.attempt, 0);
    let wait = secs(job.run_at - h.now());
    assert!(
        (24.0 * 3600.0 - 120.0..=24.0 * 3600.0 + 600.0).contains(&wait),
        "held until the oldest reach is 24 h old (plus up to 10 minutes of spread): {wait} s"
    );
    assert_eq!(h.copies(held), 0);
    let stats = h.sandbox.stats();
    assert_eq!(stats.accepted, 2);
    assert_eq!(requests_seen(&stats), 2);

    // A user reached already costs nothing more, nor does one inside a service window.
    let reached = all
        .iter()
        .find(|s| s.id != held)
        .map(|s| s.recipient.clone())
        .unwrap();
    h.store
        .delivery()
        .record_inbound(ch.id, "15552300009", h.now())
        .await
        .unwrap();
    let more = h
        .create(&[
            h.template(&ch, &reached, Lane::Broadcast),
            h.template(&ch, "15552300009", Lane::Broadcast),
        ])
        .await;
    h.wait_sends(&more, "free sends accepted", |s| {
        s.status == SendStatus::Accepted
    })
    .await;
    assert_eq!(h.job(held).await.state, JobState::Scheduled);
    assert_eq!(h.sandbox.stats().accepted, 4);
    h.finish().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Rate and priority
// ---------------------------------------------------------------------------------------------

/// The most acceptances in any one-second window.
fn max_in_a_second(times_ms: &[f64]) -> usize {
    let mut best = 0;
    let mut start = 0;
    for end in 0..times_ms.len() {
        while times_ms[end] - times_ms[start] >= 1000.0 {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_is_paced_at_its_rate() {
    let h = Harness::new(Setup::new(Backend::Sqlite).sandbox(SandboxConfig {
        mps: 20.0,
        ..SandboxConfig::default()
    }))
    .await;
    let limits = ChannelLimits {
        mps: 20.0,
        burst_ms: 100,
        ..ChannelLimits::default()
    };
    let burst = limits.rate().burst as usize;
    let ch = h.channel("1555000110", Some(limits), None).await;
    let sends: Vec<NewSend> = (0..60)
        .map(|i| h.template(&ch, &format!("1555240{i:04}"), Lane::Broadcast))
        .collect();
    let ids = h.create(&sends).await;
    let done = h
        .wait_sends(&ids, "all 60 accepted", |s| {
            s.status == SendStatus::Accepted
        })
        .await;
    assert!(done.iter().all(|s| s.requests == 1));
    let stats = h.sandbox.stats();
    assert_eq!(stats.limit_errors, 0, "{stats:?}");
    assert_eq!(stats.accepted, 60);
    let times: Vec<f64> = h
        .sandbox
        .accepted("")
        .iter()
        .map(|a| a.accepted_unix_ms)
        .collect();
    let most = max_in_a_second(&times);
    assert!(
        most <= 20 + burst,
        "{most} accepted in one second, limit 20 + burst {burst}"
    );
    assert!(stats.max_in_any_second as usize <= 20 + burst);
    let span = (times[times.len() - 1] - times[0]) / 1000.0;
    assert!(
        span >= 2.5,
        "60 sends at 20/s take about 3 s, took {span} s"
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_sends_overtake_a_broadcast() {
    let h = Harness::new(Setup::new(Backend::Sqlite)).await;
    let limits = ChannelLimits {
        mps: 50.0,
        ..ChannelLimits::default()
    };
    let ch = h.channel("1555000111", Some(limits), None).await;
    let broadcast: Vec<NewSend> = (0..100)
        .map(|i| h.template(&ch, &format!("1555250{i:04}"), Lane::Broadcast))
        .collect();
    let b = h.create(&broadcast).await;
    let replies: Vec<NewSend> = (0..5)
        .map(|i| h.template(&ch, &format!("1555260{i:04}"), Lane::Interactive))
        .collect();
    let r = h.create(&replies).await;
    let all: Vec<Uuid> = b.iter().chain(&r).copied().collect();
    h.wait_sends(&all, "everything accepted", |s| {
        s.status == SendStatus::Accepted
    })
    .await;
    let order: Vec<String> = h
        .sandbox
        .accepted("")
        .into_iter()
        .map(|a| a.callback)
        .collect();
    assert_eq!(order.len(), 105);
    let reply_keys: Vec<String> = r.iter().map(Uuid::to_string).collect();
    let last_reply = order.iter().rposition(|c| reply_keys.contains(c)).unwrap();
    let broadcast_before = last_reply + 1 - reply_keys.len();
    assert!(
        broadcast_before <= 25,
        "the replies waited for {broadcast_before} of 100 broadcast sends"
    );
    assert_eq!(h.sandbox.stats().limit_errors, 0);
    h.finish().await;
}

// ---------------------------------------------------------------------------------------------
// Bookkeeping of `requests`
// ---------------------------------------------------------------------------------------------

/// `SendRecord::requests` is "requests made to Meta for this send". Sends that Herald itself
/// holds back (no service window, messaging tier used up, a paused channel, the local pair
/// limit) make no request, so they must not count one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_held_back_by_herald_count_no_request() {
    let h = Harness::new(Setup::new(Backend::Sqlite)).await;
    let limits = ChannelLimits {
        tier: Some(1),
        ..ChannelLimits::default()
    };
    let ch = h
        .channel("1555000112", Some(limits), Some("portfolio-2"))
        .await;
    let first = h
        .create_one(h.template(&ch, "15552700001", Lane::Broadcast))
        .await;
    h.wait_send(first, "the first send", |s| {
        s.status == SendStatus::Accepted
    })
    .await;
    let closed = h.create_one(h.text(&ch, "15552700002")).await;
    let tiered = h
        .create_one(h.template(&ch, "15552700003", Lane::Broadcast))
        .await;
    let closed = h
        .wait_send(closed, "the text without a window failed", |s| {
            s.status == SendStatus::Failed
        })
        .await;
    h.wait_job(tiered, "the tier-held send snoozed", |j| {
        j.state == JobState::Scheduled
    })
    .await;
    let tiered = h.send(tiered).await;
    assert_eq!(
        requests_seen(&h.sandbox.stats()),
        1,
        "only the first went out"
    );
    assert_eq!(
        (closed.requests, tiered.requests),
        (0, 0),
        "no request reached Meta for these sends"
    );
    h.finish().await;
}

#[test]
fn max_in_a_second_counts_a_sliding_window() {
    assert_eq!(max_in_a_second(&[]), 0);
    assert_eq!(max_in_a_second(&[0.0, 500.0, 999.0, 1000.0, 1500.0]), 3);
}

/// Messenger and Instagram go through `/me/messages` with the page token: text, media and
/// quick-reply buttons are accepted with Meta's `mid`; a WhatsApp template cannot be expressed
/// there and fails for good without a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messenger_and_instagram_sends() {
    let h = Harness::new(Setup::new(Backend::Sqlite)).await;
    for platform in [Platform::Messenger, Platform::Instagram] {
        let ch = h
            .store
            .delivery()
            .create_channel(
                &NewChannel {
                    workspace_id: h.workspace,
                    platform,
                    name: format!("{platform}"),
                    sender_id: "sandbox-page".into(),
                    portfolio_id: None,
                    access_token: "sandbox-token".into(),
                    app_secret: "sandbox-secret".into(),
                    verify_token: "verify".into(),
                    graph_base_url: Some(h.sandbox.url()),
                    api_version: None,
                    limits: None,
                },
                h.now(),
            )
            .await
            .expect("create channel");
        assert_eq!(ch.limits.mps, 300.0, "Meta's default for {platform}");
        let send = |recipient: &str, message: Message| NewSend {
            workspace_id: h.workspace,
            channel_id: ch.id,
            recipient: recipient.to_owned(),
            message,
            lane: Lane::Interactive,
        };
        let ok = h
            .create(&[
                send(
                    "psid-1",
                    Message::Text {
                        body: "hello".into(),
                    },
                ),
                send(
                    "psid-2",
                    Message::Media {
                        media: herald_engine::delivery::MediaKind::Document,
                        link: "https://example.com/a.pdf".into(),
                        caption: None,
                    },
                ),
                send(
                    "psid-3",
                    Message::Buttons {
                        body: "Pick one".into(),
                        buttons: vec![herald_engine::delivery::Button {
                            id: "yes".into(),
                            title: "Yes".into(),
                        }],
                    },
                ),
            ])
            .await;
        let sends = h
            .wait_sends(&ok, "Messenger sends accepted", |s| {
                s.status == SendStatus::Accepted
            })
            .await;
        for s in &sends {
            assert!(
                s.provider_message_id
                    .as_deref()
                    .is_some_and(|m| m.starts_with("mid.")),
                "{platform}: Meta's mid recorded: {s:#?}"
            );
            assert_eq!(s.requests, 1);
        }
        let template = h
            .create_one(send(
                "psid-4",
                Message::Template {
                    name: "order_update".into(),
                    language: "en_US".into(),
                    parameters: vec![],
                },
            ))
            .await;
        let failed = h
            .wait_send(template, "the template to fail", |s| {
                s.status == SendStatus::Failed
            })
            .await;
        assert!(
            failed
                .error
                .as_deref()
                .is_some_and(|e| e.contains("WhatsApp")),
            "{platform}: the reason says templates are WhatsApp's: {failed:#?}"
        );
        assert_eq!(failed.requests, 0, "{platform}: nothing was sent");
    }
    let stats = h.sandbox.stats();
    assert_eq!(
        stats.accepted, 6,
        "three sends per platform reached the sandbox"
    );
}
