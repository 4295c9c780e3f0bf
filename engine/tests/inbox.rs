//! The inbox store, conformance: webhook deliveries stored with their processing job, read back
//! until processed, and inbound messages stored once per Meta message id. Every test runs
//! against PostgreSQL and SQLite.

mod common;

use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use herald_engine::inbox::{
    InboundMessage, NewWebhookEvent, WebhookArgs, WEBHOOK_KIND, WEBHOOK_QUEUE,
};
use herald_engine::model::JobFilter;
use herald_engine::Store;
use serde_json::json;
use uuid::Uuid;

conformance!(
    store_webhooks_writes_events_and_one_job,
    processed_events_are_not_read_again,
    inbound_messages_are_stored_once_and_open_windows,
    a_big_batch_of_deliveries,
    new_messages_are_handed_on_once_in_order,
    statuses_are_applied_as_their_deliveries_are_stored,
    batches_of_the_same_messages_in_any_order_store_each_once,
);

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0)
        .single()
        .expect("valid time")
}

fn event(channel_id: Uuid, n: usize) -> NewWebhookEvent {
    NewWebhookEvent::raw(
        channel_id,
        format!("{{\"object\":\"page\",\"entry\":[],\"n\":{n}}}").into_bytes(),
    )
}

fn message(channel_id: Uuid, mid: &str, from: &str, secs: i64) -> InboundMessage {
    InboundMessage {
        channel_id,
        workspace_id: Uuid::nil(),
        provider_message_id: mid.to_owned(),
        sender: from.to_owned(),
        kind: "text".into(),
        text: Some(format!("text of {mid}")),
        payload: json!({ "id": mid, "text": { "body": "x" } }),
        sent_at: t0() + chrono::Duration::seconds(secs),
        profile_name: None,
    }
}

async fn store_webhooks_writes_events_and_one_job(store: Arc<dyn Store>) {
    let ch = Uuid::new_v4();
    let inbox = store.inbox();
    assert!(inbox
        .store_webhooks(&[], t0())
        .await
        .expect("empty")
        .is_empty());
    let events: Vec<_> = (0..3).map(|n| event(ch, n)).collect();
    let ids = inbox.store_webhooks(&events, t0()).await.expect("store");
    assert_eq!(ids.len(), 3);
    let jobs = store
        .list_jobs(&JobFilter {
            kind: Some(WEBHOOK_KIND.into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("jobs");
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].queue, WEBHOOK_QUEUE);
    let args: WebhookArgs = serde_json::from_value(jobs[0].payload.clone()).expect("args");
    let mut named = args.events.clone();
    named.sort();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(named, sorted, "the job names exactly the stored deliveries");
    assert_eq!(ids, sorted, "ids come back in the order of the deliveries");
    let want = herald_engine::inbox::webhook_job(&ids);
    let job = &jobs[0];
    assert_eq!(
        (
            job.kind.as_str(),
            job.priority,
            job.max_attempts,
            job.workspace_id
        ),
        (
            want.kind.as_str(),
            want.priority,
            want.max_attempts,
            want.workspace_id
        ),
        "the job is webhook_job's"
    );
    assert_eq!(job.state, herald_engine::JobState::Available);
    assert_eq!((job.run_at, job.created_at), (t0(), t0()));
    let read = inbox.webhook_events(&ids).await.expect("read");
    assert_eq!(read.len(), 3);
    let bodies: Vec<_> = read.iter().map(|e| e.body.clone()).collect();
    let want: Vec<_> = events.iter().map(|e| e.body.clone()).collect();
    assert_eq!(
        bodies, want,
        "bodies come back byte for byte, by id in delivery order"
    );
    assert!(read
        .iter()
        .all(|e| e.channel_id == ch && e.received_at == t0()));
    let counts = inbox.webhook_counts().await.expect("counts");
    assert_eq!((counts.stored, counts.pending), (3, 3));
    let mut pending = inbox.pending_webhooks(10).await.expect("pending");
    pending.sort();
    assert_eq!(pending, sorted);
}

async fn processed_events_are_not_read_again(store: Arc<dyn Store>) {
    let ch = Uuid::new_v4();
    let inbox = store.inbox();
    let ids = inbox
        .store_webhooks(&[event(ch, 1), event(ch, 2)], t0())
        .await
        .expect("store");
    inbox
        .finish_webhooks(&ids[..1], &[], None, t0())
        .await
        .expect("finish one");
    let left = inbox.webhook_events(&ids).await.expect("read");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, ids[1]);
    // Finishing again (a retried job) changes nothing.
    inbox
        .finish_webhooks(&ids, &[], None, t0())
        .await
        .expect("finish all");
    inbox
        .finish_webhooks(&ids, &[], None, t0())
        .await
        .expect("finish again");
    assert!(inbox.webhook_events(&ids).await.expect("read").is_empty());
    let counts = inbox.webhook_counts().await.expect("counts");
    assert_eq!((counts.stored, counts.pending), (2, 0));
    assert!(inbox
        .pending_webhooks(10)
        .await
        .expect("pending")
        .is_empty());
}

async fn inbound_messages_are_stored_once_and_open_windows(store: Arc<dyn Store>) {
    let ch = Uuid::new_v4();
    let other = Uuid::new_v4();
    let inbox = store.inbox();
    let first = [
        message(ch, "wamid.1", "15550000001", 10),
        message(ch, "wamid.2", "15550000002", 20),
        // The same Meta id on another channel is another message.
        message(other, "wamid.1", "15550000001", 5),
        // Twice in one batch: stored once.
        message(ch, "wamid.2", "15550000002", 20),
    ];
    let fresh = inbox
        .finish_webhooks(&[], &first, None, t0())
        .await
        .expect("first");
    let mut got: Vec<_> = fresh
        .iter()
        .map(|m| (m.channel_id == ch, m.provider_message_id.clone()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (false, "wamid.1".to_owned()),
            (true, "wamid.1".to_owned()),
            (true, "wamid.2".to_owned())
        ]
    );
    // A redelivery (with a later copy of one message) stores nothing new.
    let again = [
        message(ch, "wamid.1", "15550000001", 10),
        message(ch, "wamid.3", "15550000001", 30),
    ];
    let fresh = inbox
        .finish_webhooks(&[], &again, None, t0())
        .await
        .expect("again");
    assert_eq!(fresh.len(), 1);
    assert_eq!(fresh[0].provider_message_id, "wamid.3");
    let stored = inbox.inbound_messages(ch, 10).await.expect("list");
    let mids: Vec<_> = stored
        .iter()
        .map(|m| m.provider_message_id.as_str())
        .collect();
    assert_eq!(mids, ["wamid.3", "wamid.2", "wamid.1"], "newest first");
    assert_eq!(stored[2].text.as_deref(), Some("text of wamid.1"));
    assert_eq!(stored[2].payload["id"], "wamid.1");
    assert_eq!(stored[2].sent_at, t0() + chrono::Duration::seconds(10));
    let d = store.delivery();
    assert_eq!(
        d.last_inbound(ch, "+15550000001").await.expect("window"),
        Some(t0() + chrono::Duration::seconds(30)),
        "the window follows the latest message, whatever the spelling"
    );
    assert_eq!(
        d.last_inbound(other, "15550000001").await.expect("window"),
        Some(t0() + chrono::Duration::seconds(5))
    );
    // A redelivery of a message whose time is its delivery's (Meta gave none): the later
    // copy is stored nowhere and moves no window.
    let late = [message(other, "wamid.1", "15550000001", 500)];
    let fresh = inbox
        .finish_webhooks(&[], &late, None, t0())
        .await
        .expect("late copy");
    assert!(fresh.is_empty());
    assert_eq!(
        d.last_inbound(other, "15550000001").await.expect("window"),
        Some(t0() + chrono::Duration::seconds(5)),
        "a message seen before opens no window again"
    );
}

async fn batches_of_the_same_messages_in_any_order_store_each_once(store: Arc<dyn Store>) {
    let ch = Uuid::new_v4();
    // Of one message twice in a batch, the first copy is the one stored and handed back;
    // enough of them, interleaved, that an unstable sort would put some second copies first.
    let mut batch = Vec::new();
    for copy in ["first copy", "second copy", "third copy"] {
        for i in (0..30).rev() {
            let mut m = message(ch, &format!("wamid.d{i:02}"), "15550000001", i);
            m.text = Some(copy.into());
            batch.push(m);
        }
    }
    let fresh = store
        .inbox()
        .finish_webhooks(&[], &batch, None, t0())
        .await
        .expect("batch with duplicates");
    assert_eq!(fresh.len(), 30);
    assert!(fresh
        .iter()
        .all(|m| m.text.as_deref() == Some("first copy")));
    let stored = store.inbox().inbound_messages(ch, 100).await.expect("list");
    assert_eq!(stored.len(), 30);
    assert!(
        stored
            .iter()
            .all(|m| m.text.as_deref() == Some("first copy")),
        "the first copy of each is stored"
    );

    // Two deliveries of the same messages in opposite orders, at once (Meta retries a
    // delivery while the first is still being processed): both succeed (no deadlock), and
    // each message is new to exactly one of them.
    for round in 0..10 {
        let forward: Vec<_> = (0..40)
            .map(|i| message(ch, &format!("wamid.r{round}.{i}"), "15550000002", i))
            .collect();
        let mut backward = forward.clone();
        backward.reverse();
        let (a, b) = tokio::join!(
            store.inbox().finish_webhooks(&[], &forward, None, t0()),
            store.inbox().finish_webhooks(&[], &backward, None, t0()),
        );
        let (a, b) = (a.expect("forward"), b.expect("backward"));
        let mut all: Vec<_> = a
            .iter()
            .chain(&b)
            .map(|m| m.provider_message_id.clone())
            .collect();
        all.sort();
        let mut want: Vec<_> = forward
            .iter()
            .map(|m| m.provider_message_id.clone())
            .collect();
        want.sort();
        assert_eq!(all, want, "round {round}: each message new exactly once");
    }
}

async fn a_big_batch_of_deliveries(store: Arc<dyn Store>) {
    let ch = Uuid::new_v4();
    let events: Vec<_> = (0..2_500).map(|n| event(ch, n)).collect();
    let ids = store
        .inbox()
        .store_webhooks(&events, t0())
        .await
        .expect("store");
    assert_eq!(ids.len(), 2_500);
    let counts = store.inbox().webhook_counts().await.expect("counts");
    assert_eq!(counts.stored, 2_500);
}

async fn new_messages_are_handed_on_once_in_order(store: Arc<dyn Store>) {
    let ch = Uuid::new_v4();
    let inbox = store.inbox();
    let hand_off = herald_engine::inbox::InboundHandOff::default();
    let ids = inbox
        .store_webhooks(
            &[herald_engine::inbox::NewWebhookEvent::raw(
                ch,
                b"{}".to_vec(),
            )],
            t0(),
        )
        .await
        .expect("store");
    let batch = [
        // Out of order in the delivery: handed on by the time Meta gives.
        message(ch, "wamid.2", "15550000001", 20),
        message(ch, "wamid.1", "15550000001", 10),
        message(ch, "wamid.3", "15550000002", 15),
    ];
    let fresh = inbox
        .finish_webhooks(&ids, &batch, Some(&hand_off), t0())
        .await
        .expect("finish");
    assert_eq!(fresh.len(), 3);
    // A redelivery of all of them, and one new message: only the new one is handed on.
    let again = [
        message(ch, "wamid.1", "15550000001", 10),
        message(ch, "wamid.2", "15550000001", 20),
        message(ch, "wamid.4", "15550000001", 30),
    ];
    inbox
        .finish_webhooks(&[], &again, Some(&hand_off), t0())
        .await
        .expect("again");
    let jobs = store
        .list_jobs(&JobFilter {
            kind: Some(herald_engine::inbox::INBOUND_KIND.into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("jobs");
    let handed: Vec<(String, String, Option<String>)> = jobs
        .iter()
        .map(|j| {
            (
                j.payload["provider_message_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                j.queue.clone(),
                j.ordering_key.clone(),
            )
        })
        .collect();
    let conv1 = Some(format!("conversation:{ch}:15550000001"));
    let conv2 = Some(format!("conversation:{ch}:15550000002"));
    assert_eq!(
        handed,
        [
            ("wamid.1".to_owned(), "flows".to_owned(), conv1.clone()),
            ("wamid.3".to_owned(), "flows".to_owned(), conv2),
            ("wamid.2".to_owned(), "flows".to_owned(), conv1.clone()),
            ("wamid.4".to_owned(), "flows".to_owned(), conv1),
        ],
        "by id: oldest first within a delivery, once each"
    );
    // The payload is the whole message, so a handler needs nothing else.
    let m: InboundMessage = serde_json::from_value(jobs[0].payload.clone()).expect("payload");
    assert_eq!(m, message(ch, "wamid.1", "15550000001", 10));
    // Without a hand-off nothing is enqueued.
    inbox
        .finish_webhooks(&[], &[message(ch, "wamid.5", "1", 40)], None, t0())
        .await
        .expect("finish");
    assert_eq!(
        store
            .list_jobs(&JobFilter {
                kind: Some(herald_engine::inbox::INBOUND_KIND.into()),
                limit: 100,
                ..Default::default()
            })
            .await
            .expect("jobs")
            .len(),
        4
    );
}

fn status(
    channel_id: Uuid,
    send_id: Option<Uuid>,
    status: herald_engine::delivery::SendStatus,
    at: DateTime<Utc>,
) -> herald_engine::delivery::StatusEvent {
    herald_engine::delivery::StatusEvent {
        channel_id,
        provider_message_id: format!("wamid.{}", send_id.unwrap_or_default()),
        send_id,
        status,
        error_code: None,
        error: None,
        at,
    }
}

/// A delivery triaged as statuses of our sends has them applied by `store_webhooks` and needs
/// no job; the others in the same batch are stored for the job as always.
async fn statuses_are_applied_as_their_deliveries_are_stored(store: Arc<dyn Store>) {
    use herald_engine::delivery::{Lane, Message, NewSend, SendStatus};
    let d = store.delivery();
    let ch = common::whatsapp_channel(&*store).await;
    let new_send = |to: &str| NewSend {
        workspace_id: ch.workspace_id,
        channel_id: ch.id,
        recipient: to.into(),
        message: Message::Text { body: "hi".into() },
        lane: Lane::Broadcast,
    };
    let sends = d
        .create_sends(&[new_send("1555001"), new_send("1555002")], t0())
        .await
        .expect("sends");
    let (s1, s2) = (sends[0], sends[1]);
    let t1 = t0() + chrono::Duration::seconds(1);
    let applied = NewWebhookEvent {
        statuses: Some(vec![status(ch.id, Some(s1), SendStatus::Delivered, t1)]),
        ..event(ch.id, 1)
    };
    // One status without our send id: the whole delivery goes to the job.
    let mixed = NewWebhookEvent {
        statuses: Some(vec![
            status(ch.id, Some(s2), SendStatus::Read, t1),
            status(ch.id, None, SendStatus::Read, t1),
        ]),
        ..event(ch.id, 2)
    };
    // Nothing to apply is not "applied": it goes to the job too.
    let empty = NewWebhookEvent {
        statuses: Some(Vec::new()),
        ..event(ch.id, 0)
    };
    let ids = store
        .inbox()
        .store_webhooks(&[empty, applied, mixed], t0())
        .await
        .expect("store");
    assert_eq!(ids.len(), 3, "every delivery is stored");
    let jobs = |store: Arc<dyn Store>| async move {
        store
            .list_jobs(&JobFilter {
                kind: Some(WEBHOOK_KIND.into()),
                limit: 10,
                ..Default::default()
            })
            .await
            .expect("jobs")
    };
    let listed = jobs(store.clone()).await;
    assert_eq!(listed.len(), 1, "one job for the batch");
    let args: WebhookArgs = serde_json::from_value(listed[0].payload.clone()).expect("args");
    assert_eq!(
        args.events,
        vec![ids[0], ids[2]],
        "the job names the deliveries not applied"
    );
    let unread: Vec<i64> = store
        .inbox()
        .webhook_events(&ids)
        .await
        .expect("read")
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(unread, vec![ids[0], ids[2]], "the applied one is processed");
    let counts = store.inbox().webhook_counts().await.expect("counts");
    assert_eq!((counts.stored, counts.pending), (3, 2));
    let sent1 = d.send(s1).await.expect("read").expect("send 1");
    assert_eq!(sent1.status, SendStatus::Delivered, "status applied");
    assert_eq!(
        sent1.provider_message_id.as_deref(),
        Some(format!("wamid.{s1}").as_str()),
        "Meta's id recorded from the status"
    );
    let sent2 = d.send(s2).await.expect("read").expect("send 2");
    assert_eq!(sent2.status, SendStatus::Queued, "left for the job");

    // A batch that is all applied stores no job, and a status never moves a send back.
    let back = NewWebhookEvent {
        statuses: Some(vec![status(ch.id, Some(s1), SendStatus::Sent, t1)]),
        ..event(ch.id, 3)
    };
    let more = store
        .inbox()
        .store_webhooks(&[back], t0())
        .await
        .expect("store applied");
    assert_eq!(more.len(), 1);
    assert_eq!(jobs(store.clone()).await.len(), 1, "no job for it");
    assert_eq!(
        d.send(s1).await.expect("read").expect("send 1").status,
        SendStatus::Delivered,
        "not moved back"
    );
    let counts = store.inbox().webhook_counts().await.expect("counts");
    assert_eq!((counts.stored, counts.pending), (4, 2));
}
