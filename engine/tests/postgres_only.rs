//! What only the PostgreSQL store does: enqueue inside the caller's transaction, NOTIFY wake-ups
//! across processes, and races between separate connection pools (as separate processes have).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use herald_engine::store::PgStore;
use herald_engine::{JobFilter, NewJob, Store};
use serde_json::json;
use sqlx::postgres::PgListener;

fn job(n: i64) -> NewJob {
    NewJob::new("test.kind", json!({ "n": n }))
}

async fn count_jobs(store: &PgStore) -> usize {
    store
        .list_jobs(&JobFilter {
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("list")
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_enqueue_exists_only_if_the_caller_commits() {
    let schema = common::unique_name("tx");
    let _leftovers = common::Dropped::Schema(schema.clone());
    let store = common::pg_store_in(&schema).await;
    sqlx::query("CREATE TABLE orders (id bigint PRIMARY KEY)")
        .execute(store.pool())
        .await
        .expect("create caller's table");

    // Rolled back: neither the caller's row nor the job exists.
    let mut tx = store.pool().begin().await.expect("begin");
    sqlx::query("INSERT INTO orders VALUES (1)")
        .execute(&mut *tx)
        .await
        .expect("caller's write");
    let out = store
        .enqueue_in(&mut tx, &[job(1), job(2)], Utc::now())
        .await
        .expect("enqueue in tx");
    assert_eq!(out.len(), 2);
    assert_eq!(count_jobs(&store).await, 0, "invisible before commit");
    tx.rollback().await.expect("rollback");
    assert_eq!(count_jobs(&store).await, 0, "gone with the rollback");

    // Committed: both exist, and the wake-up arrives only with the commit.
    let mut listener = wake_ups(&store, &schema).await;
    let mut tx = store.pool().begin().await.expect("begin");
    sqlx::query("INSERT INTO orders VALUES (2)")
        .execute(&mut *tx)
        .await
        .expect("caller's write");
    store
        .enqueue_in(&mut tx, &[job(3)], Utc::now())
        .await
        .expect("enqueue in tx");
    let early = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await;
    assert!(early.is_err(), "no NOTIFY before commit");
    tx.commit().await.expect("commit");
    let n = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("NOTIFY after commit")
        .expect("notification");
    // Due now, without rate keys; untagged, so this process's producers hear it too.
    assert_eq!(n.payload(), "udefault");
    assert_eq!(count_jobs(&store).await, 1);
}

/// A LISTEN on the store's wake-up channel, as another process has.
async fn wake_ups(store: &PgStore, schema: &str) -> PgListener {
    let mut listener = PgListener::connect_with(store.pool())
        .await
        .expect("listener");
    listener
        .listen(&format!("herald_jobs_{schema}"))
        .await
        .expect("listen");
    listener
}

/// The NOTIFY payloads that arrive until none has for half a second.
async fn heard(listener: &mut PgListener) -> Vec<String> {
    let mut payloads = Vec::new();
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), listener.recv()).await {
        payloads.push(n.payload().to_owned());
    }
    payloads
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_notify_per_queue_per_batch() {
    let schema = common::unique_name("notify");
    let _leftovers = common::Dropped::Schema(schema.clone());
    let store = common::pg_store_in(&schema).await;
    let mut listener = wake_ups(&store, &schema).await;
    let now = Utc::now();
    let mut jobs: Vec<NewJob> = (0..1000).map(job).collect();
    jobs.extend((0..500).map(|n| job(n).queue("other")));
    jobs.extend((0..100).map(|n| job(n).queue("keyed").rate_key("ch:1")));
    jobs.extend((0..10).map(|n| {
        job(n)
            .queue("later")
            .run_at(now + chrono::Duration::hours(1))
    }));
    store.enqueue_many(&jobs, now).await.expect("bulk");
    let payloads = heard(&mut listener).await;
    // The store wakes its own producers itself: its NOTIFYs carry its origin, one origin.
    let origins: std::collections::HashSet<&str> = payloads
        .iter()
        .filter_map(|p| p.strip_prefix('@')?.split_once(':').map(|(o, _)| o))
        .collect();
    assert_eq!(origins.len(), 1, "tagged with one origin: {payloads:?}");
    let mut payloads: Vec<&str> = payloads
        .iter()
        .filter_map(|p| p.split_once(':').map(|(_, rest)| rest))
        .collect();
    payloads.sort();
    let later = format!(
        "s{}:later",
        (now + chrono::Duration::hours(1)).timestamp_micros()
    );
    let mut expected = vec!["kkeyed", "udefault", "uother", later.as_str()];
    expected.sort();
    assert_eq!(payloads, expected, "one NOTIFY per queue, none per row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_key_race_between_separate_pools() {
    let schema = common::unique_name("race");
    let _leftovers = common::Dropped::Schema(schema.clone());
    let stores: Vec<Arc<PgStore>> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(Arc::new(common::pg_store_in(&schema).await));
        }
        v
    };
    let mut handles = Vec::new();
    for (p, store) in stores.iter().enumerate() {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for round in 0..50 {
                // Half single enqueues, half one row inside a bulk call.
                let key = format!("k{round}");
                let e = if round % 2 == 0 {
                    store
                        .enqueue(&job(p as i64).unique_key(&key), Utc::now())
                        .await
                } else {
                    store
                        .enqueue_many(&[job(-1), job(p as i64).unique_key(&key)], Utc::now())
                        .await
                        .map(|v| v[1])
                }
                .expect("a racing enqueue is never an error");
                out.push((round, e));
            }
            out
        }));
    }
    let mut by_round: HashMap<i32, Vec<herald_engine::Enqueued>> = HashMap::new();
    for h in handles {
        for (round, e) in h.await.expect("task") {
            by_round.entry(round).or_default().push(e);
        }
    }
    assert_eq!(by_round.len(), 50);
    for (round, v) in by_round {
        assert_eq!(v.iter().filter(|e| e.inserted).count(), 1, "round {round}");
        assert!(v.iter().all(|e| e.id == v[0].id), "round {round}: same job");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hot_table_is_vacuumed_once_dead_rows_pile_up() {
    let schema = common::unique_name("vacuum");
    let _leftovers = common::Dropped::Schema(schema.clone());
    let store = common::pg_store_in(&schema).await;
    assert!(
        !store.vacuum_hot(0).await.expect("vacuum_hot"),
        "nothing dead yet"
    );
    let now = Utc::now();
    let jobs: Vec<NewJob> = (0..2_000).map(job).collect();
    store.enqueue_many(&jobs, now).await.expect("bulk");
    let claimed = store
        .claim(
            "default",
            "w",
            2_000,
            now,
            now + chrono::Duration::seconds(30),
        )
        .await
        .expect("claim");
    let done: Vec<herald_engine::model::Completion> = claimed
        .iter()
        .map(|j| herald_engine::model::Completion {
            id: j.id,
            attempt: j.attempt,
            outcome: herald_engine::model::Outcome::Completed,
            errors: None,
            finished_at: now,
            effect: None,
        })
        .collect();
    store.complete(&done).await.expect("complete");
    // Each job left two dead versions (claimed, then moved out). Statistics reach
    // pg_stat_user_tables within about a second; wait for them, bounded.
    assert!(
        !store.vacuum_hot(1_000_000).await.expect("vacuum_hot"),
        "below the threshold nothing happens"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if store.vacuum_hot(1_000).await.expect("vacuum_hot") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dead rows were never reported"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dead: i64 = sqlx::query_scalar(
        "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'herald_jobs'::regclass",
    )
    .fetch_one(store.pool())
    .await
    .expect("stats");
    assert!(dead < 1_000, "vacuumed: {dead} dead rows left");
}

/// An import meeting a phone that another transaction is creating at the same moment (an
/// inbound message, another import) waits for it, then updates that contact: one row per
/// phone, nothing lost, and the other writer's opt-out kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_racing_another_writer_upserts() {
    use herald_engine::contacts::NewContact;

    let schema = common::unique_name("imp");
    let _leftovers = common::Dropped::Schema(schema.clone());
    let store = Arc::new(common::pg_store_in(&schema).await);
    let ws = uuid::Uuid::new_v4();
    let now = Utc::now();
    let contact = |phone: &str, name: &str| NewContact {
        phone: phone.into(),
        name: Some(name.into()),
        labels: vec!["imported".into()],
        attributes: Default::default(),
        opted_out: false,
    };
    // Another writer creates +15550000001 and holds its transaction open.
    let mut other = store.pool().begin().await.expect("begin");
    sqlx::query(
        "INSERT INTO herald_contacts (id, workspace_id, phone, name, opted_out, created_at, updated_at)
         VALUES ($1, $2, '+15550000001', 'from a webhook', true, $3, $3)",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(ws)
    .bind(now)
    .execute(&mut *other)
    .await
    .expect("other writer");
    let import = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .contacts()
                .import_contacts(
                    ws,
                    &[
                        contact("+15550000001", "Ann"),
                        contact("+15550000002", "Bo"),
                    ],
                    now,
                )
                .await
        }
    });
    // Wait until the import's insert waits on the other writer's row, then commit it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE wait_event_type = 'Lock' AND query LIKE '%herald_contacts%'",
        )
        .fetch_one(store.pool())
        .await
        .expect("activity");
        if waiting > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the import never waited"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    other.commit().await.expect("commit");
    let counts = import.await.expect("task").expect("the import succeeds");
    assert_eq!(counts.stored, 2);
    let all = store
        .contacts()
        .contacts(ws, None, None, 10)
        .await
        .expect("list");
    let got: Vec<String> = all
        .iter()
        .map(|c| {
            format!(
                "{} {} opted_out={} {:?}",
                c.phone.as_deref().unwrap_or("-"),
                c.name.as_deref().unwrap_or("-"),
                c.opted_out,
                c.labels
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            "+15550000001 Ann opted_out=true [\"imported\"]",
            "+15550000002 Bo opted_out=false [\"imported\"]",
        ],
        "one row per phone; the import updated the other writer's contact and kept its opt-out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_ingest_wakes_other_processes_once() {
    let schema = common::unique_name("ingest_notify");
    let _leftovers = common::Dropped::Schema(schema.clone());
    let store = common::pg_store_in(&schema).await;
    let mut listener = wake_ups(&store, &schema).await;
    let events: Vec<_> = (0..3)
        .map(|n| {
            herald_engine::inbox::NewWebhookEvent::raw(
                uuid::Uuid::new_v4(),
                format!("{{\"n\":{n}}}").into_bytes(),
            )
        })
        .collect();
    store
        .inbox()
        .store_webhooks(&events, Utc::now())
        .await
        .expect("store");
    let payloads = heard(&mut listener).await;
    assert_eq!(payloads.len(), 1, "one NOTIFY: {payloads:?}");
    let (origin, payload) = payloads[0]
        .strip_prefix('@')
        .and_then(|p| p.split_once(':'))
        .expect("tagged with the process's origin");
    assert!(!origin.is_empty());
    assert_eq!(
        payload, "uwebhooks",
        "key-less jobs due now on the webhooks queue"
    );
}

/// An engine working the default queue with `concurrency` slots, polling every 50 ms.
fn quick_engine(concurrency: usize) -> herald_engine::EngineConfig {
    let mut queues = std::collections::BTreeMap::new();
    queues.insert(
        herald_engine::model::DEFAULT_QUEUE.to_owned(),
        herald_engine::QueueConfig { concurrency },
    );
    herald_engine::EngineConfig {
        worker_id: common::unique_name("worker"),
        queues,
        poll_interval: Duration::from_millis(50),
        ..herald_engine::EngineConfig::default()
    }
}

/// A completion the database refuses for good (a trigger stands in for whatever it has
/// against the job's row) is given up, but what the attempt did outside is still recorded:
/// Meta's id lands, and the rescued job will find the send accepted instead of sending again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_completion_still_records_its_effect() {
    use herald_engine::delivery::SendStatus;
    let schema = common::unique_name("effect_refused");
    let _leftovers = common::Dropped::Schema(schema.clone());
    let store = Arc::new(common::pg_store_in(&schema).await);
    let channel = common::whatsapp_channel(&*store).await;
    let ids = common::begun_sends(&*store, &channel, 1).await;
    sqlx::query(
        "CREATE FUNCTION refuse_finish() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
            IF OLD.kind = 'test.accepting' THEN
                RAISE EXCEPTION 'refused by the test' USING ERRCODE = '22023';
            END IF;
            RETURN OLD;
         END $$",
    )
    .execute(store.pool())
    .await
    .expect("function");
    sqlx::query(
        "CREATE TRIGGER refuse_finish BEFORE DELETE ON herald_jobs
         FOR EACH ROW EXECUTE FUNCTION refuse_finish()",
    )
    .execute(store.pool())
    .await
    .expect("trigger");

    let mut registry = herald_engine::Registry::new();
    registry.register(common::Accepting);
    let config = quick_engine(2);
    let clock: Arc<dyn herald_engine::Clock> = Arc::new(herald_engine::SystemClock);
    let store: Arc<dyn Store> = store;
    let engine = herald_engine::Engine::start(store.clone(), registry, config, clock);
    let job = store
        .enqueue(
            &NewJob::new("test.accepting", json!({ "send": ids[0] })),
            Utc::now(),
        )
        .await
        .expect("enqueue")
        .id;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let send = loop {
        let send = common::send_of(&*store, ids[0]).await;
        if send.status == SendStatus::Accepted || std::time::Instant::now() > deadline {
            break send;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(send.status, SendStatus::Accepted, "the effect was written");
    assert_eq!(
        send.provider_message_id,
        Some(format!("wamid.{}", ids[0].simple()))
    );
    let job = store.get_job(job).await.expect("get").expect("exists");
    assert_eq!(
        job.state,
        herald_engine::JobState::Running,
        "the completion itself was given up (the rescuer will hand the job back)"
    );
    engine.shutdown().await;
}

/// Holds each attempt until the test lets it go, and says when each has started and ended.
struct Held {
    started: tokio::sync::mpsc::UnboundedSender<i32>,
    ended: tokio::sync::mpsc::UnboundedSender<i32>,
    release: [Arc<tokio::sync::Notify>; 2],
}

#[async_trait::async_trait]
impl herald_engine::Worker for Held {
    type Args = serde_json::Value;
    const KIND: &'static str = "test.held";

    async fn work(
        &self,
        _: serde_json::Value,
        ctx: &herald_engine::JobContext,
    ) -> Result<(), herald_engine::JobError> {
        let attempt = ctx.job.attempt;
        let _ = self.started.send(attempt);
        let index = usize::try_from(attempt - 1).unwrap_or(0).min(1);
        self.release[index].notified().await;
        let _ = self.ended.send(attempt);
        Ok(())
    }
}

/// A claim rescued from under a slow task and claimed again by the same process: when the
/// stale task ends first, it must not take the new claim's place in the process's map, or the
/// new attempt's completion is dropped as if shutdown had released it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_attempt_ending_first_leaves_the_current_one_alone() {
    let schema = common::unique_name("stale_attempt");
    let _leftovers = common::Dropped::Schema(schema.clone());
    let pg = Arc::new(common::pg_store_in(&schema).await);
    let store: Arc<dyn Store> = pg.clone();
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    let release = [
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    ];
    let mut registry = herald_engine::Registry::new();
    registry.register(Held {
        started: started_tx,
        ended: ended_tx,
        release: release.clone(),
    });
    let config = quick_engine(4);
    let clock: Arc<dyn herald_engine::Clock> = Arc::new(herald_engine::SystemClock);
    let engine = herald_engine::Engine::start(store.clone(), registry, config, clock);
    let id = store
        .enqueue(&NewJob::new("test.held", json!({})), Utc::now())
        .await
        .expect("enqueue")
        .id;
    let within = |what: &'static str| {
        move |r: Result<Option<i32>, tokio::time::error::Elapsed>| {
            r.ok().flatten().unwrap_or_else(|| panic!("{what}"))
        }
    };
    let wait = Duration::from_secs(10);
    let first = within("attempt 1 started")(tokio::time::timeout(wait, started.recv()).await);
    assert_eq!(first, 1);
    // What the rescuer does to an expired lease, now: the job is available again, its
    // attempt kept, and this process claims it again.
    sqlx::query(
        "UPDATE herald_jobs SET state = 'available', lease_expires_at = NULL WHERE id = $1",
    )
    .bind(id)
    .execute(pg.pool())
    .await
    .expect("rescue");
    let second = within("attempt 2 started")(tokio::time::timeout(wait, started.recv()).await);
    assert_eq!(second, 2);
    // The stale attempt ends first; its completion changes nothing in the database.
    release[0].notify_one();
    let done = within("attempt 1 ended")(tokio::time::timeout(wait, ended.recv()).await);
    assert_eq!(done, 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    release[1].notify_one();
    let done = within("attempt 2 ended")(tokio::time::timeout(wait, ended.recv()).await);
    assert_eq!(done, 2);
    let job = common::wait_for_state(&*store, id, herald_engine::JobState::Completed).await;
    assert_eq!(job.attempt, 2, "completed by the current claim");
    engine.shutdown().await;
}

/// The keyed claim begins the claimed sends in its own statement, but never waits for a send
/// row another statement holds (a webhook's batch, say): it leaves that send to its worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_skips_a_send_another_statement_holds() {
    use herald_engine::delivery::{channel_rate_key, SendStatus, SEND_QUEUE};

    let schema = common::unique_name("begin");
    let _leftovers = common::Dropped::Schema(schema.clone());
    let store = common::pg_store_in(&schema).await;
    let d = store.delivery();
    let now = Utc::now();
    let (ch, ids) = two_queued_sends(&store, now).await;

    let mut holder = store.pool().begin().await.expect("begin");
    sqlx::query("SELECT id FROM herald_sends WHERE id = $1 FOR UPDATE")
        .bind(ids[0])
        .execute(&mut *holder)
        .await
        .expect("hold the first send");
    let key = channel_rate_key(ch.id);
    let claimed = tokio::time::timeout(
        Duration::from_secs(10),
        common::claim_key(&store, SEND_QUEUE, &key, now),
    )
    .await
    .expect("the claim does not wait for the held row");
    only_the_second_is_begun(
        &store,
        &claimed,
        &ids,
        now,
        "the held send is left to its worker",
    );
    holder.rollback().await.expect("release");
    let held = d.send(ids[0]).await.expect("read").expect("exists");
    assert_eq!(
        held.status,
        SendStatus::Queued,
        "still queued for its worker"
    );
    assert_eq!(held.requests, 0);
    let begun = d.begin_sends(&ids[..1], now).await.expect("worker's begin");
    assert_eq!(begun.len(), 1, "its worker begins it");
}

/// A send the keyed claim begins whose row does not decode (its message was corrupted) costs
/// only its own record: the claim still hands out every job, the other sends' records are
/// there, and the bad one is `sending` from the claim's time, which its worker recognises.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begun_row_that_does_not_decode_fails_only_its_own_record() {
    use herald_engine::delivery::{channel_rate_key, SEND_QUEUE};

    let schema = common::unique_name("undecodable");
    let _leftovers = common::Dropped::Schema(schema.clone());
    let store = common::pg_store_in(&schema).await;
    let now = Utc::now();
    let (ch, ids) = two_queued_sends(&store, now).await;
    sqlx::query("UPDATE herald_sends SET message = '{\"type\":\"bogus\"}' WHERE id = $1")
        .bind(ids[0])
        .execute(store.pool())
        .await
        .expect("corrupt the first send");

    let claimed = common::claim_key(&store, SEND_QUEUE, &channel_rate_key(ch.id), now).await;
    only_the_second_is_begun(
        &store,
        &claimed,
        &ids,
        now,
        "the row that does not decode has no record",
    );
    let (status, requested_at): (String, Option<chrono::DateTime<Utc>>) =
        sqlx::query_as("SELECT status, requested_at FROM herald_sends WHERE id = $1")
            .bind(ids[0])
            .fetch_one(store.pool())
            .await
            .expect("read the corrupt send's columns");
    assert_eq!(status, "sending", "begun by the claim all the same");
    assert_eq!(
        requested_at.map(|t| t.timestamp_micros()),
        Some(now.timestamp_micros()),
        "at the claim's time, which its worker recognises (`begun_by_claim`)"
    );
}

/// A WhatsApp channel with two queued sends (and their jobs).
async fn two_queued_sends(
    store: &herald_engine::store::PgStore,
    now: chrono::DateTime<Utc>,
) -> (herald_engine::delivery::Channel, Vec<uuid::Uuid>) {
    use herald_engine::delivery::{Lane, Message, NewSend};

    let ch = common::whatsapp_channel(store).await;
    let sends: Vec<NewSend> = (0..2)
        .map(|i| NewSend {
            workspace_id: ch.workspace_id,
            channel_id: ch.id,
            recipient: format!("1555000{i}"),
            message: Message::Text {
                body: "hello".into(),
            },
            lane: Lane::Broadcast,
        })
        .collect();
    let ids = store
        .delivery()
        .create_sends(&sends, now)
        .await
        .expect("sends");
    (ch, ids)
}

/// The claim handed out the jobs of both `sends`; the first has no record of its begin (`why`)
/// and the second's is there, begun.
fn only_the_second_is_begun(
    store: &herald_engine::store::PgStore,
    claimed: &[herald_engine::Job],
    sends: &[uuid::Uuid],
    now: chrono::DateTime<Utc>,
    why: &str,
) {
    use herald_engine::delivery::SendStatus;

    assert_eq!(claimed.len(), 2, "both jobs are claimed");
    let job_of = |id: uuid::Uuid| {
        claimed
            .iter()
            .find(|j| j.payload["send_id"] == id.to_string())
            .expect("its job")
    };
    let d = store.delivery();
    assert!(
        d.take_begun(sends[0], job_of(sends[0]).id, now).is_none(),
        "{why}"
    );
    assert_eq!(
        d.take_begun(sends[1], job_of(sends[1]).id, now)
            .map(|s| s.status),
        Some(SendStatus::Sending),
        "the other's record is there, begun"
    );
}
