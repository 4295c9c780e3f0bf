//! Test fixtures: a fresh store per test (its own PostgreSQL schema, or its own SQLite file).
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use herald_engine::store::{PgStore, PgStoreConfig, SqliteStore, SqliteStoreConfig};
use herald_engine::{Job, JobId, JobState, Store};

/// How long the `wait_*` helpers wait before they fail the test.
pub const WAIT: Duration = Duration::from_secs(10);

/// The PostgreSQL server tests use; CI sets it, the default is the machine's local server.
pub fn pg_url() -> String {
    std::env::var("HERALD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

pub async fn pg_store_in(schema: &str) -> PgStore {
    let store = PgStore::connect(&PgStoreConfig {
        keyring: Some(std::sync::Arc::new(
            herald_engine::crypto::Keyring::parse(
                "abababababababababababababababababababababababababababababababab",
                &[],
            )
            .expect("test key"),
        )),
        url: pg_url(),
        max_connections: 8,
        acquire_timeout: std::time::Duration::from_secs(10),
        schema: Some(schema.to_owned()),
    })
    .await
    .expect("connect to PostgreSQL (is it running? set HERALD_TEST_DATABASE_URL)");
    store
        .migrate()
        .await
        .expect("migrate PostgreSQL (is it running? set HERALD_TEST_DATABASE_URL)");
    store
}

/// A store in a fresh schema, and a guard that drops the schema when the test ends (passed or
/// failed), so repeated runs leave nothing behind in the shared database.
pub async fn pg() -> (Arc<dyn Store>, Dropped) {
    let schema = unique_name("t");
    let store: Arc<dyn Store> = Arc::new(pg_store_in(&schema).await);
    (store, Dropped::Schema(schema))
}

/// What a test leaves behind, removed on drop.
pub enum Dropped {
    Schema(String),
    File(std::path::PathBuf),
}

impl Drop for Dropped {
    fn drop(&mut self) {
        match self {
            Dropped::Schema(schema) => {
                // Synchronous, so it also runs while a failed test unwinds.
                let _ = std::process::Command::new("psql")
                    .arg(pg_url())
                    .args([
                        "-q",
                        "-c",
                        &format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
                    ])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
            }
            Dropped::File(path) => {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
        }
    }
}

pub fn sqlite_path() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{}.db", unique_name("herald_test")))
}

pub async fn sqlite_at(path: &std::path::Path) -> SqliteStore {
    let store = SqliteStore::connect(&SqliteStoreConfig {
        keyring: Some(std::sync::Arc::new(
            herald_engine::crypto::Keyring::parse(
                "abababababababababababababababababababababababababababababababab",
                &[],
            )
            .expect("test key"),
        )),
        url: format!("sqlite:{}", path.display()),
        acquire_timeout: std::time::Duration::from_secs(10),
        synchronous_full: false,
    })
    .await
    .expect("open SQLite");
    store.migrate().await.expect("migrate SQLite");
    store
}

pub async fn sqlite() -> (Arc<dyn Store>, Dropped) {
    let path = sqlite_path();
    let store: Arc<dyn Store> = Arc::new(sqlite_at(&path).await);
    (store, Dropped::File(path))
}

/// Polls `ok` until it holds; panics naming `what` after [`WAIT`].
pub async fn eventually(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !ok() {
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {WAIT:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls the job until `done` holds for it and returns it; panics with the job as last seen after
/// [`WAIT`]. Store errors count as "not yet" (the database may be restarting).
pub async fn wait_for_job(
    store: &dyn Store,
    id: JobId,
    what: &str,
    done: impl Fn(&Job) -> bool,
) -> Job {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let last = match store.get_job(id).await {
            Ok(Some(job)) if done(&job) => return job,
            Ok(Some(job)) => format!("{job:#?}"),
            Ok(None) => "no such job".to_owned(),
            Err(e) => format!("store error: {e}"),
        };
        if tokio::time::Instant::now() >= deadline {
            panic!("job {id}: timed out after {WAIT:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the job until it is in `state` and returns it.
pub async fn wait_for_state(store: &dyn Store, id: JobId, state: JobState) -> Job {
    wait_for_job(store, id, &format!("state {state}"), |j| j.state == state).await
}

/// Polls the store's stats until exactly `n` jobs (all queues) are in `state`.
pub async fn wait_for_count(store: &dyn Store, state: JobState, n: i64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let last = match store.stats().await {
            Ok(stats) => {
                let count: i64 = stats
                    .iter()
                    .filter(|s| s.state == state)
                    .map(|s| s.count)
                    .sum();
                if count == n {
                    return;
                }
                format!("{count} {state}; all: {stats:?}")
            }
            Err(e) => format!("store error: {e}"),
        };
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {WAIT:?} waiting for {n} jobs {state}; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs each listed test against both backends.
#[macro_export]
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (store, _leftovers) = $crate::common::pg().await;
                    super::$name(store).await
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (store, _leftovers) = $crate::common::sqlite().await;
                    super::$name(store).await
                }
            )*
        }
    };
}

/// A WhatsApp channel with Meta's defaults, for tests that need sends.
pub async fn whatsapp_channel(store: &dyn Store) -> herald_engine::delivery::Channel {
    store
        .delivery()
        .create_channel(
            &herald_engine::delivery::NewChannel {
                workspace_id: uuid::Uuid::new_v4(),
                platform: herald_engine::delivery::Platform::Whatsapp,
                name: "wa".into(),
                sender_id: "1555000".into(),
                portfolio_id: None,
                access_token: "token".into(),
                app_secret: "secret".into(),
                verify_token: "verify".into(),
                graph_base_url: None,
                api_version: None,
                limits: None,
            },
            chrono::Utc::now(),
        )
        .await
        .expect("create channel")
}

/// Claims up to ten jobs of `queue` with rate key `key` as worker `w1` at `now` (lease 30 s).
pub async fn claim_key(
    store: &dyn Store,
    queue: &str,
    key: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<Job> {
    store
        .claim_keys(
            queue,
            &[herald_engine::store::KeyClaim {
                key,
                limit: 10,
                max_priority: None,
            }],
            "w1",
            now,
            now + chrono::Duration::seconds(30),
        )
        .await
        .expect("claim")
}

/// `n` text sends on `channel`, begun (`sending`, as before a call to Meta).
pub async fn begun_sends(
    store: &dyn Store,
    channel: &herald_engine::delivery::Channel,
    n: usize,
) -> Vec<uuid::Uuid> {
    use herald_engine::delivery::{Lane, Message, NewSend};
    let sends: Vec<NewSend> = (0..n)
        .map(|i| NewSend {
            workspace_id: channel.workspace_id,
            channel_id: channel.id,
            recipient: format!("+1555000{i}"),
            message: Message::Text { body: "hi".into() },
            lane: Lane::Broadcast,
        })
        .collect();
    let delivery = store.delivery();
    let ids = delivery
        .create_sends(&sends, chrono::Utc::now())
        .await
        .expect("create sends");
    delivery
        .begin_sends(&ids, chrono::Utc::now())
        .await
        .expect("begin sends");
    ids
}

/// The send `id`, which must exist.
pub async fn send_of(store: &dyn Store, id: uuid::Uuid) -> herald_engine::delivery::SendRecord {
    store
        .delivery()
        .send(id)
        .await
        .expect("read the send")
        .expect("the send exists")
}

/// Records a send as accepted through its completion (`JobContext::complete_with`), with
/// Meta's id `wamid.<send id>`, then succeeds or, with `fail`, is discarded.
pub struct Accepting;

#[derive(serde::Deserialize)]
pub struct AcceptingArgs {
    pub send: uuid::Uuid,
    #[serde(default)]
    pub fail: bool,
}

#[async_trait::async_trait]
impl herald_engine::Worker for Accepting {
    type Args = AcceptingArgs;
    const KIND: &'static str = "test.accepting";

    async fn work(
        &self,
        args: AcceptingArgs,
        ctx: &herald_engine::JobContext,
    ) -> Result<(), herald_engine::JobError> {
        ctx.complete_with(herald_engine::model::Effect::SendAccepted {
            send_id: args.send,
            provider_message_id: format!("wamid.{}", args.send.simple()),
        });
        if args.fail {
            return Err(herald_engine::JobError::Discard(
                "failed after the call".into(),
            ));
        }
        Ok(())
    }
}
