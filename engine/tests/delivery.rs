//! The delivery store and scoped claims, conformance: every test runs against PostgreSQL and
//! SQLite (each in its own schema or file, see `common::conformance!`).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use herald_engine::delivery::{
    channel_rate_key, Button, Channel, ChannelLimits, Lane, Message, NewChannel, NewSend, Platform,
    SendCount, SendRecord, SendStatus, SendUpdate, StatusEvent, META_API_VERSION, META_GRAPH_URL,
    SEND_KIND, SEND_QUEUE,
};
use herald_engine::model::{JobFilter, QueueStat};
use herald_engine::store::{KeyClaim, RateScope};
use herald_engine::{Job, JobState, NewJob, Store, StoreError};
use serde_json::json;
use uuid::Uuid;

conformance!(
    channels_create_get_list_and_defaults,
    channels_pause_and_resume,
    invalid_channels_store_nothing,
    channel_texts_with_nul_are_refused_alike,
    channel_debug_hides_secrets,
    create_sends_writes_one_job_per_send,
    invalid_send_in_a_batch_writes_nothing,
    create_sends_20k_in_one_batch,
    begin_sends_takes_only_queued_sends,
    accept_sends_records_provider_ids,
    accept_sends_keeps_a_webhook_failure,
    completions_record_accepted_sends,
    apply_statuses_only_moves_forward,
    apply_statuses_by_provider_id_and_within_channel,
    statuses_from_another_channel_do_not_mask_real_ones,
    update_send_transitions,
    update_send_leaves_sent_and_beyond_alone,
    send_counts_per_channel_and_overall,
    reserve_reach_moving_24h_tier,
    reserve_reach_concurrent_reservations_respect_the_tier,
    inbound_keeps_the_latest_per_channel,
    ready_rate_keys_and_claim_scoped,
    claim_keys_takes_each_key_within_its_limit,
    claim_keys_begins_the_claimed_sends,
    migrations_apply_twice,
);

// ---------------------------------------------------------------------------------------------
// Fixtures

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0)
        .single()
        .expect("valid time")
}

fn secs(s: i64) -> chrono::Duration {
    chrono::Duration::seconds(s)
}

fn micros(us: i64) -> chrono::Duration {
    chrono::Duration::microseconds(us)
}

fn hours(h: i64) -> chrono::Duration {
    chrono::Duration::hours(h)
}

const TOKEN: &str = "EAAG-secret-access-token-0123456789";
const APP_SECRET: &str = "app-secret-abcdef9876543210";

fn new_channel(platform: Platform, sender_id: &str) -> NewChannel {
    NewChannel {
        workspace_id: Uuid::new_v4(),
        platform,
        name: format!("{platform} {sender_id}"),
        sender_id: sender_id.to_owned(),
        portfolio_id: Some("portfolio-1".to_owned()),
        access_token: TOKEN.to_owned(),
        app_secret: APP_SECRET.to_owned(),
        verify_token: "verify-me".to_owned(),
        graph_base_url: None,
        api_version: None,
        limits: None,
    }
}

async fn channel(store: &dyn Store) -> Channel {
    store
        .delivery()
        .create_channel(&new_channel(Platform::Whatsapp, "1555000"), t0())
        .await
        .expect("create channel")
}

fn text(body: &str) -> Message {
    Message::Text {
        body: body.to_owned(),
    }
}

fn send_to(ch: &Channel, recipient: &str, lane: Lane) -> NewSend {
    NewSend {
        workspace_id: ch.workspace_id,
        channel_id: ch.id,
        recipient: recipient.to_owned(),
        message: text("hello"),
        lane,
    }
}

async fn create_one(store: &dyn Store, ch: &Channel, recipient: &str) -> Uuid {
    let ids = store
        .delivery()
        .create_sends(&[send_to(ch, recipient, Lane::Broadcast)], t0())
        .await
        .expect("create send");
    assert_eq!(ids.len(), 1, "one send in, one id out");
    ids[0]
}

async fn get_send(store: &dyn Store, id: Uuid) -> SendRecord {
    store
        .delivery()
        .send(id)
        .await
        .expect("read send")
        .unwrap_or_else(|| panic!("send {id} exists"))
}

async fn apply(store: &dyn Store, events: Vec<StatusEvent>) -> u64 {
    store
        .delivery()
        .apply_statuses(&events)
        .await
        .expect("apply statuses")
}

async fn status_of(store: &dyn Store, id: Uuid) -> SendStatus {
    get_send(store, id).await.status
}

fn event(
    ch: Uuid,
    pmid: &str,
    send_id: Option<Uuid>,
    status: SendStatus,
    at: DateTime<Utc>,
) -> StatusEvent {
    StatusEvent {
        channel_id: ch,
        provider_message_id: pmid.to_owned(),
        send_id,
        status,
        error_code: None,
        error: None,
        at,
    }
}

fn failed_event(ch: Uuid, pmid: &str, send_id: Option<Uuid>, at: DateTime<Utc>) -> StatusEvent {
    StatusEvent {
        error_code: Some(131_047),
        error: Some("Re-engagement message".to_owned()),
        ..event(ch, pmid, send_id, SendStatus::Failed, at)
    }
}

/// Every job of `filter`, paging through `list_jobs` (which returns at most 1000 at a time).
async fn all_jobs(store: &dyn Store, filter: JobFilter) -> Vec<Job> {
    let mut out: Vec<Job> = Vec::new();
    loop {
        let page = store
            .list_jobs(&JobFilter {
                after_id: out.last().map(|j| j.id),
                limit: 1000,
                ..filter.clone()
            })
            .await
            .expect("list jobs");
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

async fn send_jobs(store: &dyn Store) -> Vec<Job> {
    all_jobs(
        store,
        JobFilter {
            kind: Some(SEND_KIND.to_owned()),
            ..JobFilter::default()
        },
    )
    .await
}

/// Non-zero job counts, sorted, for comparing whole states of the jobs table.
async fn job_stats(store: &dyn Store) -> Vec<(String, String, i64)> {
    let mut stats: Vec<(String, String, i64)> = store
        .stats()
        .await
        .expect("stats")
        .into_iter()
        .filter(|s: &QueueStat| s.count > 0)
        .map(|s| (s.queue, s.state.as_str().to_owned(), s.count))
        .collect();
    stats.sort();
    stats
}

async fn counts(store: &dyn Store, channel_id: Option<Uuid>) -> Vec<(SendStatus, i64)> {
    let mut c: Vec<SendCount> = store
        .delivery()
        .send_counts(channel_id)
        .await
        .expect("send counts");
    c.sort_by_key(|c| c.status.rank());
    c.into_iter().map(|c| (c.status, c.count)).collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Channels

async fn channels_create_get_list_and_defaults(store: Arc<dyn Store>) {
    let d = store.delivery();
    let wa_new = new_channel(Platform::Whatsapp, "1555000");
    let wa = d.create_channel(&wa_new, t0()).await.expect("create wa");
    assert_eq!(wa.workspace_id, wa_new.workspace_id, "workspace kept");
    assert_eq!(wa.platform, Platform::Whatsapp, "platform kept");
    assert_eq!(wa.name, wa_new.name, "name kept");
    assert_eq!(wa.sender_id, "1555000", "sender kept");
    assert_eq!(wa.portfolio_id.as_deref(), Some("portfolio-1"), "portfolio");
    assert_eq!(wa.access_token, TOKEN, "token stored");
    assert_eq!(wa.app_secret, APP_SECRET, "app secret stored");
    assert_eq!(wa.verify_token, "verify-me", "verify token stored");
    assert_eq!(wa.graph_base_url, META_GRAPH_URL, "default graph URL");
    assert_eq!(wa.api_version, META_API_VERSION, "default API version");
    assert_eq!(
        wa.limits,
        ChannelLimits::for_platform(Platform::Whatsapp),
        "WhatsApp defaults"
    );
    assert_eq!(wa.limits.mps, 80.0, "WhatsApp default mps");
    assert_eq!(wa.paused_reason, None, "new channel not paused");
    assert_eq!(wa.paused_at, None, "new channel has no paused_at");
    assert_eq!(
        (wa.created_at, wa.updated_at),
        (t0(), t0()),
        "timestamps are the given now"
    );

    let ms = d
        .create_channel(&new_channel(Platform::Messenger, "page-1"), t0())
        .await
        .expect("create messenger");
    assert_eq!(ms.limits.mps, 300.0, "Messenger default mps");
    assert_eq!(ms.portfolio_id.as_deref(), Some("portfolio-1"), "portfolio");
    let ig = d
        .create_channel(&new_channel(Platform::Instagram, "ig-1"), t0())
        .await
        .expect("create instagram");
    assert_eq!(ig.limits.mps, 300.0, "Instagram default mps");
    assert_eq!(ig.platform, Platform::Instagram, "platform kept");

    let limits = ChannelLimits {
        mps: 1000.0,
        headroom: 0.05,
        burst_ms: 200,
        meta_burst_ms: 300,
        pair_interval_ms: 3_000,
        pair_burst: 4,
        tier: Some(2_000),
    };
    let custom_new = NewChannel {
        portfolio_id: None,
        graph_base_url: Some("http://127.0.0.1:9999".to_owned()),
        api_version: Some("v19.0".to_owned()),
        limits: Some(limits),
        ..new_channel(Platform::Whatsapp, "1555111")
    };
    let custom = d
        .create_channel(&custom_new, t0() + secs(5))
        .await
        .expect("create custom");
    assert_eq!(custom.limits, limits, "explicit limits kept as given");
    assert_eq!(custom.graph_base_url, "http://127.0.0.1:9999", "URL kept");
    assert_eq!(custom.api_version, "v19.0", "API version kept");
    assert_eq!(custom.portfolio_id, None, "no portfolio");
    assert_eq!(custom.created_at, t0() + secs(5), "created_at is now");

    for c in [&wa, &ms, &ig, &custom] {
        let got = d.channel(c.id).await.expect("get channel");
        assert_eq!(
            got.as_ref(),
            Some(c),
            "get by id returns what create returned"
        );
    }
    assert_eq!(
        d.channel(Uuid::new_v4()).await.expect("get unknown"),
        None,
        "unknown id"
    );

    let mut expected = vec![wa.clone(), ms, ig, custom];
    expected.sort_by_key(|c| c.id);
    let listed = d.channels().await.expect("list channels");
    assert_eq!(listed, expected, "list returns every channel, by id");
}

async fn channels_pause_and_resume(store: Arc<dyn Store>) {
    let d = store.delivery();
    let ch = channel(&*store).await;
    let other = channel(&*store).await;
    assert!(
        d.pause_channel(
            ch.id,
            Some("368: temporarily blocked"),
            false,
            t0() + secs(10)
        )
        .await
        .expect("pause"),
        "pause finds the channel"
    );
    let paused = d.channel(ch.id).await.expect("get").expect("exists");
    assert_eq!(
        paused.paused_reason.as_deref(),
        Some("368: temporarily blocked"),
        "reason stored"
    );
    assert_eq!(paused.paused_at, Some(t0() + secs(10)), "paused_at set");
    assert_eq!(paused.updated_at, t0() + secs(10), "updated_at moved");
    assert_eq!(paused.access_token, TOKEN, "pausing keeps the rest");
    let untouched = d.channel(other.id).await.expect("get").expect("exists");
    assert_eq!(
        untouched, other,
        "pausing one channel leaves the other alone"
    );

    assert!(
        d.pause_channel(ch.id, None, false, t0() + secs(20))
            .await
            .expect("resume"),
        "resume finds the channel"
    );
    let resumed = d.channel(ch.id).await.expect("get").expect("exists");
    assert_eq!(resumed.paused_reason, None, "reason cleared");
    assert_eq!(resumed.paused_at, None, "paused_at cleared");
    assert_eq!(resumed.updated_at, t0() + secs(20), "updated_at moved");

    assert!(
        !d.pause_channel(Uuid::new_v4(), Some("x"), false, t0())
            .await
            .expect("pause unknown"),
        "pausing an unknown channel says false"
    );
    assert!(
        !d.pause_channel(Uuid::new_v4(), None, false, t0())
            .await
            .expect("resume unknown"),
        "resuming an unknown channel says false"
    );
    assert_eq!(
        d.channels().await.expect("list").len(),
        2,
        "no channel made"
    );
}

async fn invalid_channels_store_nothing(store: Arc<dyn Store>) {
    let d = store.delivery();
    let good = new_channel(Platform::Whatsapp, "1555000");
    let bad_limits = |f: fn(&mut ChannelLimits)| {
        let mut l = ChannelLimits::for_platform(Platform::Whatsapp);
        f(&mut l);
        NewChannel {
            limits: Some(l),
            ..good.clone()
        }
    };
    let cases: Vec<(&str, NewChannel)> = vec![
        (
            "empty sender_id",
            NewChannel {
                sender_id: String::new(),
                ..good.clone()
            },
        ),
        (
            "empty name",
            NewChannel {
                name: String::new(),
                ..good.clone()
            },
        ),
        (
            "empty access token",
            NewChannel {
                access_token: String::new(),
                ..good.clone()
            },
        ),
        (
            "NUL in sender_id",
            NewChannel {
                sender_id: "15\u{0}55".to_owned(),
                ..good.clone()
            },
        ),
        (
            "URL without scheme",
            NewChannel {
                graph_base_url: Some("graph.facebook.com".to_owned()),
                ..good.clone()
            },
        ),
        (
            "ftp URL",
            NewChannel {
                graph_base_url: Some("ftp://graph.facebook.com".to_owned()),
                ..good.clone()
            },
        ),
        ("mps 0", bad_limits(|l| l.mps = 0.0)),
        ("mps NaN", bad_limits(|l| l.mps = f64::NAN)),
        ("headroom 0.95", bad_limits(|l| l.headroom = 0.95)),
        ("negative headroom", bad_limits(|l| l.headroom = -0.1)),
        ("burst_ms 0", bad_limits(|l| l.burst_ms = 0)),
        ("meta_burst_ms 0", bad_limits(|l| l.meta_burst_ms = 0)),
        ("pair_interval_ms 0", bad_limits(|l| l.pair_interval_ms = 0)),
        ("tier 0", bad_limits(|l| l.tier = Some(0))),
    ];
    for (what, bad) in cases {
        let res = d.create_channel(&bad, t0()).await;
        assert!(
            matches!(res, Err(StoreError::Invalid(_))),
            "{what}: refused as invalid, got {res:?}"
        );
    }
    assert_eq!(
        d.channels().await.expect("list"),
        Vec::<Channel>::new(),
        "nothing stored for invalid channels"
    );
    // Sanity: the base of the bad cases is itself fine.
    let ok = d.create_channel(&good, t0()).await.expect("good channel");
    assert_eq!(
        d.channels().await.expect("list"),
        vec![ok],
        "the valid channel is the only one"
    );
}

/// PostgreSQL cannot store NUL in text: both backends must refuse it the same way, before
/// writing, in every text a channel stores (not only the ones checked for length).
async fn channel_texts_with_nul_are_refused_alike(store: Arc<dyn Store>) {
    let d = store.delivery();
    let good = new_channel(Platform::Whatsapp, "1555000");
    let cases: Vec<(&str, NewChannel)> = vec![
        (
            "NUL in verify_token",
            NewChannel {
                verify_token: "ver\u{0}ify".to_owned(),
                ..good.clone()
            },
        ),
        (
            "NUL in portfolio_id",
            NewChannel {
                portfolio_id: Some("port\u{0}folio".to_owned()),
                ..good.clone()
            },
        ),
        (
            "NUL in api_version",
            NewChannel {
                api_version: Some("v21\u{0}.0".to_owned()),
                ..good.clone()
            },
        ),
        (
            "NUL in graph_base_url",
            NewChannel {
                graph_base_url: Some("https://graph\u{0}.example".to_owned()),
                ..good.clone()
            },
        ),
    ];
    for (what, bad) in cases {
        let res = d.create_channel(&bad, t0()).await;
        assert!(
            matches!(res, Err(StoreError::Invalid(_))),
            "{what}: refused as invalid, got {res:?}"
        );
    }
    assert_eq!(
        d.channels().await.expect("list"),
        Vec::<Channel>::new(),
        "nothing stored for channels with NUL"
    );
}

async fn channel_debug_hides_secrets(store: Arc<dyn Store>) {
    let new = new_channel(Platform::Whatsapp, "1555000");
    let ch = store
        .delivery()
        .create_channel(&new, t0())
        .await
        .expect("create");
    for (what, dbg) in [
        ("NewChannel {:?}", format!("{new:?}")),
        ("NewChannel {:#?}", format!("{new:#?}")),
        ("Channel {:?}", format!("{ch:?}")),
        ("Channel {:#?}", format!("{ch:#?}")),
        ("Some(Channel) {:?}", format!("{:?}", Some(&ch))),
    ] {
        assert!(!dbg.contains(TOKEN), "{what} shows the access token: {dbg}");
        assert!(
            !dbg.contains(APP_SECRET),
            "{what} shows the app secret: {dbg}"
        );
        assert!(
            !dbg.contains("verify-me"),
            "{what} shows the verify token: {dbg}"
        );
        assert!(dbg.contains("1555000"), "{what} still names the sender");
    }
    let json = serde_json::to_string(&ch).expect("serialize channel");
    assert!(
        !json.contains(TOKEN) && !json.contains(APP_SECRET),
        "serialized channel hides secrets: {json}"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. create_sends

async fn create_sends_writes_one_job_per_send(store: Arc<dyn Store>) {
    let d = store.delivery();
    let ch = channel(&*store).await;
    let other = channel(&*store).await;
    let sends = vec![
        send_to(&ch, "+15550001", Lane::Interactive),
        send_to(&ch, "+15550002", Lane::Broadcast),
        NewSend {
            message: Message::Template {
                name: "order_update_2".to_owned(),
                language: "en_US".to_owned(),
                parameters: vec!["A-17".to_owned(), "ünïcödé ✓".to_owned()],
            },
            ..send_to(&other, "+15550003", Lane::Broadcast)
        },
        NewSend {
            message: Message::Buttons {
                body: "Pick one".to_owned(),
                buttons: (1..=3)
                    .map(|i| Button {
                        id: format!("b{i}"),
                        title: format!("Option {i}"),
                    })
                    .collect(),
            },
            ..send_to(&ch, "+15550004", Lane::Interactive)
        },
    ];
    let now = t0() + secs(3);
    let ids = d.create_sends(&sends, now).await.expect("create sends");
    assert_eq!(ids.len(), sends.len(), "one id per send");
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        ids.len(),
        "ids are distinct"
    );

    for (id, s) in ids.iter().zip(&sends) {
        let r = get_send(&*store, *id).await;
        let expected = SendRecord {
            id: *id,
            workspace_id: s.workspace_id,
            channel_id: s.channel_id,
            // Stored in one spelling per user: E.164 loses its "+" (WhatsApp's wa_id form).
            recipient: herald_engine::delivery::canonical_recipient(&s.recipient).into_owned(),
            message: s.message.clone(),
            lane: s.lane,
            status: SendStatus::Queued,
            requests: 0,
            provider_message_id: None,
            error_code: None,
            error: None,
            created_at: now,
            requested_at: None,
            accepted_at: None,
            updated_at: now,
        };
        assert_eq!(r, expected, "send {id} stored as given, queued");
    }

    let jobs = send_jobs(&*store).await;
    assert_eq!(jobs.len(), sends.len(), "exactly one job per send");
    let mut by_send: HashMap<Uuid, &Job> = HashMap::new();
    for j in &jobs {
        let send_id: Uuid = j.payload["send_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("job {} names its send: {}", j.id, j.payload));
        assert!(
            by_send.insert(send_id, j).is_none(),
            "send {send_id} has a second job"
        );
    }
    for (id, s) in ids.iter().zip(&sends) {
        let j = by_send
            .get(id)
            .unwrap_or_else(|| panic!("send {id} has a job"));
        assert_eq!(j.kind, SEND_KIND, "job kind");
        assert_eq!(j.queue, SEND_QUEUE, "job queue");
        assert_eq!(j.state, JobState::Available, "job is available");
        assert_eq!(j.run_at, now, "job due now");
        assert_eq!(j.workspace_id, s.workspace_id, "job workspace");
        assert_eq!(
            j.rate_key.as_deref(),
            Some(format!("ch:{}", s.channel_id).as_str()),
            "rate key names the channel"
        );
        assert_eq!(
            j.rate_key,
            Some(channel_rate_key(s.channel_id)),
            "rate key matches channel_rate_key"
        );
        let expected_priority = match s.lane {
            Lane::Interactive => 0,
            Lane::Broadcast => 10,
        };
        assert_eq!(
            j.priority, expected_priority,
            "priority follows the lane (interactive 0 before broadcast 10)"
        );
        assert_eq!(
            j.payload,
            json!({ "send_id": id.to_string(), "channel_id": s.channel_id.to_string() }),
            "payload is exactly {{send_id, channel_id}}"
        );
        assert_eq!(
            j.unique_key.as_deref(),
            Some(format!("send:{id}").as_str()),
            "unique key per send"
        );
    }
    assert_eq!(
        d.create_sends(&[], now).await.expect("empty batch"),
        Vec::<Uuid>::new(),
        "empty batch gives no ids"
    );
    assert_eq!(send_jobs(&*store).await.len(), 4, "empty batch adds no job");
}

async fn invalid_send_in_a_batch_writes_nothing(store: Arc<dyn Store>) {
    let d = store.delivery();
    let ch = channel(&*store).await;
    let good = send_to(&ch, "+15550001", Lane::Broadcast);
    let with = |message: Message| NewSend {
        message,
        ..good.clone()
    };
    let cases: Vec<(&str, NewSend)> = vec![
        (
            "empty recipient",
            NewSend {
                recipient: String::new(),
                ..good.clone()
            },
        ),
        (
            "recipient with a newline",
            NewSend {
                recipient: "+1555\n0001".to_owned(),
                ..good.clone()
            },
        ),
        (
            "template name with uppercase",
            with(Message::Template {
                name: "Order_Update".to_owned(),
                language: "en_US".to_owned(),
                parameters: vec![],
            }),
        ),
        (
            "template without language",
            with(Message::Template {
                name: "order_update".to_owned(),
                language: String::new(),
                parameters: vec![],
            }),
        ),
        ("empty text body", with(text(""))),
        ("NUL in the text", with(text("nul \u{0} byte"))),
        (
            "NUL in a template parameter",
            with(Message::Template {
                name: "order_update".to_owned(),
                language: "en_US".to_owned(),
                parameters: vec!["a\u{0}b".to_owned()],
            }),
        ),
        (
            "4 buttons",
            with(Message::Buttons {
                body: "Pick one".to_owned(),
                buttons: (1..=4)
                    .map(|i| Button {
                        id: format!("b{i}"),
                        title: format!("Option {i}"),
                    })
                    .collect(),
            }),
        ),
        (
            "media link without scheme",
            with(Message::Media {
                media: herald_engine::delivery::MediaKind::Image,
                link: "example.com/a.png".to_owned(),
                caption: None,
            }),
        ),
    ];
    for (what, bad) in cases {
        let batch = vec![good.clone(), bad, good.clone()];
        let res = d.create_sends(&batch, t0()).await;
        assert!(
            matches!(res, Err(StoreError::Invalid(_))),
            "{what}: batch refused as invalid, got {res:?}"
        );
        assert_eq!(
            counts(&*store, None).await,
            vec![],
            "{what}: no send written"
        );
        assert_eq!(job_stats(&*store).await, vec![], "{what}: no job written");
    }
    // The good sends alone go through.
    let ids = d
        .create_sends(&[good.clone(), good], t0())
        .await
        .expect("good batch");
    assert_eq!(ids.len(), 2, "two good sends");
    assert_eq!(
        counts(&*store, None).await,
        vec![(SendStatus::Queued, 2)],
        "only the good batch is stored"
    );
}

async fn create_sends_20k_in_one_batch(store: Arc<dyn Store>) {
    const N: usize = 20_000;
    let d = store.delivery();
    let ch = channel(&*store).await;
    let sends: Vec<NewSend> = (0..N)
        .map(|i| {
            let lane = if i % 10 == 0 {
                Lane::Interactive
            } else {
                Lane::Broadcast
            };
            NewSend {
                message: text(&format!("message {i}")),
                ..send_to(&ch, &format!("+1555{i:07}"), lane)
            }
        })
        .collect();
    let ids = d
        .create_sends(&sends, t0())
        .await
        .expect("create 20k sends");
    assert_eq!(ids.len(), N, "one id per send");
    let distinct: HashSet<Uuid> = ids.iter().copied().collect();
    assert_eq!(distinct.len(), N, "ids are distinct");
    assert_eq!(
        counts(&*store, Some(ch.id)).await,
        vec![(SendStatus::Queued, N as i64)],
        "every send stored, queued"
    );
    assert_eq!(
        job_stats(&*store).await,
        vec![(SEND_QUEUE.to_owned(), "available".to_owned(), N as i64)],
        "one available send job per send"
    );
    let jobs = send_jobs(&*store).await;
    assert_eq!(jobs.len(), N, "listing finds every job");
    let mut seen = HashSet::new();
    for j in &jobs {
        let send_id: Uuid = j.payload["send_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("job {} names its send", j.id));
        assert!(
            distinct.contains(&send_id),
            "job {} is for one of ours",
            j.id
        );
        assert!(seen.insert(send_id), "send {send_id} has a second job");
    }
    // Spot checks across chunk boundaries (the stores write in chunks of 5,000).
    for i in [0, 4_999, 5_000, 9_999, 10_000, 19_999] {
        let r = get_send(&*store, ids[i]).await;
        assert_eq!(r.recipient, format!("1555{i:07}"), "send {i}: recipient");
        assert_eq!(
            r.message,
            text(&format!("message {i}")),
            "send {i}: message"
        );
        assert_eq!(r.status, SendStatus::Queued, "send {i}: queued");
    }
}

// ---------------------------------------------------------------------------------------------
// 3. begin_sends

async fn begin_sends_takes_only_queued_sends(store: Arc<dyn Store>) {
    let d = store.delivery();
    let ch = channel(&*store).await;
    let sends: Vec<NewSend> = (0..5)
        .map(|i| send_to(&ch, &format!("+1555000{i}"), Lane::Broadcast))
        .collect();
    let ids = d.create_sends(&sends, t0()).await.expect("create");

    let t1 = t0() + secs(1);
    let begun = d.begin_sends(&ids[..1], t1).await.expect("begin 0");
    assert_eq!(begun.len(), 1, "the queued send is begun");
    let b = &begun[0];
    assert_eq!(b.id, ids[0], "begun the right send");
    assert_eq!(b.status, SendStatus::Sending, "sending");
    assert_eq!(b.requests, 1, "one request counted");
    assert_eq!(b.requested_at, Some(t1), "requested_at set");
    assert_eq!(b.updated_at, t1, "updated_at set");
    assert_eq!(&get_send(&*store, ids[0]).await, b, "stored as returned");

    let again = d
        .begin_sends(&ids[..1], t0() + secs(2))
        .await
        .expect("begin 0 again");
    assert_eq!(again, vec![], "a send already begun is not begun again");
    let r = get_send(&*store, ids[0]).await;
    assert_eq!(
        (r.status, r.requests, r.requested_at),
        (SendStatus::Sending, 1, Some(t1)),
        "second begin changed nothing"
    );

    // ids[1] accepted, ids[2] failed, ids[3] and ids[4] queued; plus an unknown id.
    d.begin_sends(&ids[1..3], t1).await.expect("begin 1,2");
    assert_eq!(
        d.accept_sends(&[(ids[1], "wamid.1".to_owned())], t1)
            .await
            .expect("accept"),
        1,
        "accept found the send"
    );
    let failed = d
        .update_send(
            ids[2],
            &SendUpdate::Failed {
                code: Some(100),
                error: "bad".to_owned(),
            },
            t1,
        )
        .await
        .expect("fail")
        .expect("exists");
    assert_eq!(failed.status, SendStatus::Failed, "failed");

    let t3 = t0() + secs(3);
    let mixed = [ids[0], ids[1], ids[2], ids[3], ids[4], Uuid::new_v4()];
    let mut begun = d.begin_sends(&mixed, t3).await.expect("begin mixed");
    begun.sort_by_key(|r| r.id);
    let mut expected = vec![ids[3], ids[4]];
    expected.sort();
    assert_eq!(
        begun.iter().map(|r| r.id).collect::<Vec<_>>(),
        expected,
        "only the queued sends are begun"
    );
    for r in &begun {
        assert_eq!(
            (r.status, r.requests, r.requested_at),
            (SendStatus::Sending, 1, Some(t3)),
            "send {} begun",
            r.id
        );
    }
    for (i, status) in [
        (0, SendStatus::Sending),
        (1, SendStatus::Accepted),
        (2, SendStatus::Failed),
    ] {
        let r = get_send(&*store, ids[i]).await;
        assert_eq!(r.status, status, "send {i} kept its status");
        assert_eq!(r.requests, 1, "send {i} not counted again");
        assert_eq!(r.requested_at, Some(t1), "send {i} requested_at kept");
    }
    assert_eq!(
        d.begin_sends(&[], t3).await.expect("empty"),
        vec![],
        "empty list"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. accept_sends

async fn accept_sends_records_provider_ids(store: Arc<dyn Store>) {
    let d = store.delivery();
    let ch = channel(&*store).await;
    let s1 = create_one(&*store, &ch, "+15550001").await;
    let s2 = create_one(&*store, &ch, "+15550002").await;
    let t1 = t0() + secs(1);
    assert_eq!(
        d.begin_sends(&[s1, s2], t1).await.expect("begin").len(),
        2,
        "both begun"
    );

    let t2 = t0() + secs(2);
    assert_eq!(
        d.accept_sends(
            &[
                (s1, "wamid.1".to_owned()),
                (Uuid::new_v4(), "wamid.x".to_owned())
            ],
            t2
        )
        .await
        .expect("accept"),
        1,
        "accept counts the sends it found"
    );
    let r1 = get_send(&*store, s1).await;
    assert_eq!(r1.status, SendStatus::Accepted, "accepted");
    assert_eq!(
        r1.provider_message_id.as_deref(),
        Some("wamid.1"),
        "pmid set"
    );
    assert_eq!(r1.accepted_at, Some(t2), "accepted_at set");
    assert_eq!(r1.requests, 1, "requests unchanged");

    // The delivered webhook arrives before Meta's answer to the request.
    let t3 = t0() + secs(3);
    assert_eq!(
        d.apply_statuses(&[event(ch.id, "wamid.2", Some(s2), SendStatus::Delivered, t3)])
            .await
            .expect("delivered"),
        1,
        "webhook moved the send"
    );
    assert_eq!(
        get_send(&*store, s2).await.status,
        SendStatus::Delivered,
        "delivered before the answer"
    );
    let t4 = t0() + secs(4);
    assert_eq!(
        d.accept_sends(&[(s2, "wamid.2".to_owned())], t4)
            .await
            .expect("late accept"),
        1,
        "late accept finds the send"
    );
    let r2 = get_send(&*store, s2).await;
    assert_eq!(
        r2.status,
        SendStatus::Delivered,
        "a late accept does not move delivered back"
    );
    assert_eq!(
        r2.provider_message_id.as_deref(),
        Some("wamid.2"),
        "pmid set"
    );
    assert_eq!(
        r2.accepted_at,
        Some(t3),
        "accepted_at kept from the webhook"
    );

    // The send worker's update_send path behaves the same.
    let r2 = d
        .update_send(
            s2,
            &SendUpdate::Accepted {
                provider_message_id: "wamid.2".to_owned(),
            },
            t4,
        )
        .await
        .expect("accepted update")
        .expect("exists");
    assert_eq!(
        r2.status,
        SendStatus::Delivered,
        "update_send(Accepted) does not move delivered back"
    );
    assert_eq!(
        d.accept_sends(&[], t4).await.expect("empty"),
        0,
        "empty list"
    );
}

/// The send worker's second write travels with its job's completion: Meta's id is recorded in
/// the completing statement, whatever the outcome, and even when the claim is no longer
/// current (Meta has the message either way). Never moving a send back, as `accept_sends`.
async fn completions_record_accepted_sends(store: Arc<dyn Store>) {
    use herald_engine::model::{Completion, Effect, Outcome};
    let ch = channel(&*store).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(create_one(&*store, &ch, &format!("+1555000{i}")).await);
    }
    let t1 = t0() + secs(1);
    let claimed = store
        .claim(SEND_QUEUE, "w1", 10, t1, t1 + secs(60))
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 5, "one job per send");
    let send_of = |j: &Job| -> Uuid {
        serde_json::from_value::<herald_engine::delivery::SendArgs>(j.payload.clone())
            .expect("send args")
            .send_id
    };
    let job_of = |send: Uuid| -> &Job {
        claimed
            .iter()
            .find(|j| send_of(j) == send)
            .expect("the send's job")
    };
    store.delivery().begin_sends(&ids, t1).await.expect("begin");
    // Send 2 was delivered (webhook) before its answer came back.
    apply(
        &*store,
        vec![event(
            ch.id,
            "wamid.2",
            Some(ids[2]),
            SendStatus::Delivered,
            t1,
        )],
    )
    .await;
    let t2 = t0() + secs(2);
    let accepted = |send: Uuid, pmid: &str| {
        Some(Effect::SendAccepted {
            send_id: send,
            provider_message_id: pmid.to_owned(),
        })
    };
    let completion = |send: Uuid, attempt: i32, outcome: Outcome, effect| Completion {
        id: job_of(send).id,
        attempt,
        outcome,
        errors: None,
        finished_at: t2,
        effect,
    };
    let current = job_of(ids[0]).attempt;
    let changed = store
        .complete(&[
            completion(
                ids[0],
                current,
                Outcome::Completed,
                accepted(ids[0], "wamid.0"),
            ),
            // A stale claim (rescued and claimed again meanwhile): the job is not touched, the
            // send is still recorded.
            completion(
                ids[1],
                current + 1,
                Outcome::Completed,
                accepted(ids[1], "wamid.1"),
            ),
            completion(
                ids[2],
                current,
                Outcome::Completed,
                accepted(ids[2], "wamid.2"),
            ),
            // Another outcome than success still carries its effect.
            completion(
                ids[3],
                current,
                Outcome::Snooze {
                    run_at: t2 + secs(30),
                },
                accepted(ids[3], "wamid.3"),
            ),
            completion(ids[4], current, Outcome::Completed, None),
        ])
        .await
        .expect("complete");
    assert_eq!(changed, 4, "every current claim changed, the stale one not");
    for (i, want) in [
        (0, SendStatus::Accepted),
        (1, SendStatus::Accepted),
        (3, SendStatus::Accepted),
    ] {
        let r = get_send(&*store, ids[i]).await;
        assert_eq!(r.status, want, "send {i}");
        assert_eq!(
            r.provider_message_id,
            Some(format!("wamid.{i}")),
            "send {i}"
        );
        assert_eq!(r.accepted_at, Some(t2), "send {i}");
    }
    let r2 = get_send(&*store, ids[2]).await;
    assert_eq!(r2.status, SendStatus::Delivered, "2 not moved back");
    assert_eq!(r2.provider_message_id.as_deref(), Some("wamid.2"));
    assert_eq!(
        get_send(&*store, ids[4]).await.status,
        SendStatus::Sending,
        "no effect, no write"
    );
    let job = |send: Uuid| {
        let store = store.clone();
        let id = job_of(send).id;
        async move {
            store
                .get_job(id)
                .await
                .expect("get")
                .expect("the job exists")
        }
    };
    assert_eq!(job(ids[0]).await.state, JobState::Completed);
    assert_eq!(
        job(ids[1]).await.state,
        JobState::Running,
        "stale: untouched"
    );
    assert_eq!(job(ids[3]).await.state, JobState::Scheduled);
    // Effects alone (no completion finalizes a job) are written too; a send named by two
    // attempts keeps the later attempt's id, wherever it stands in the batch.
    let t3 = t0() + secs(3);
    let changed = store
        .complete(&[
            Completion {
                finished_at: t3,
                ..completion(
                    ids[4],
                    current + 8,
                    Outcome::Completed,
                    accepted(ids[4], "wamid.4"),
                )
            },
            completion(
                ids[4],
                current + 7,
                Outcome::Completed,
                accepted(ids[4], "wamid.4-earlier"),
            ),
        ])
        .await
        .expect("stale only");
    assert_eq!(changed, 0);
    let r4 = get_send(&*store, ids[4]).await;
    assert_eq!(r4.status, SendStatus::Accepted);
    assert_eq!(r4.accepted_at, Some(t3));
}

/// A `failed` status webhook that arrives before Meta's answer to the request: the late accept
/// must not erase the failure's code and reason (the status stays `failed`).
async fn accept_sends_keeps_a_webhook_failure(store: Arc<dyn Store>) {
    let d = store.delivery();
    let ch = channel(&*store).await;
    let s1 = create_one(&*store, &ch, "+15550001").await;
    let s2 = create_one(&*store, &ch, "+15550002").await;
    d.begin_sends(&[s1, s2], t0() + secs(1))
        .await
        .expect("begin");
    let changed = d
        .apply_statuses(&[
            failed_event(ch.id, "wamid.1", Some(s1), t0() + secs(2)),
            failed_event(ch.id, "wamid.2", Some(s2), t0() + secs(2)),
        ])
        .await
        .expect("failed webhooks");
    assert_eq!(changed, 2, "both failed");

    assert_eq!(
        d.accept_sends(&[(s1, "wamid.1".to_owned())], t0() + secs(3))
            .await
            .expect("late accept"),
        1,
        "late accept finds the send"
    );
    let r1 = get_send(&*store, s1).await;
    assert_eq!(r1.status, SendStatus::Failed, "failed stays failed");
    assert_eq!(
        (r1.error_code, r1.error.as_deref()),
        (Some(131_047), Some("Re-engagement message")),
        "accept_sends kept the failure's code and reason"
    );

    let r2 = d
        .update_send(
            s2,
            &SendUpdate::Accepted {
                provider_message_id: "wamid.2".to_owned(),
            },
            t0() + secs(3),
        )
        .await
        .expect("accepted update")
        .expect("exists");
    assert_eq!(r2.status, SendStatus::Failed, "failed stays failed");
    assert_eq!(
        (r2.error_code, r2.error.as_deref()),
        (Some(131_047), Some("Re-engagement message")),
        "update_send(Accepted) kept the failure's code and reason"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. apply_statuses

async fn apply_statuses_only_moves_forward(store: Arc<dyn Store>) {
    let d = store.delivery();
    let ch = channel(&*store).await;
    let ids = d
        .create_sends(
            &(0..3)
                .map(|i| send_to(&ch, &format!("+1555000{i}"), Lane::Broadcast))
                .collect::<Vec<_>>(),
            t0(),
        )
        .await
        .expect("create");
    let (s1, s2, s3) = (ids[0], ids[1], ids[2]);
    d.begin_sends(&ids, t0()).await.expect("begin");
    d.accept_sends(
        &[
            (s1, "wamid.1".to_owned()),
            (s2, "wamid.2".to_owned()),
            (s3, "wamid.3".to_owned()),
        ],
        t0() + secs(1),
    )
    .await
    .expect("accept");

    // s1: delivered, then a late sent and a late failed change nothing; read moves on.
    let n = apply(
        &*store,
        vec![event(
            ch.id,
            "wamid.1",
            Some(s1),
            SendStatus::Delivered,
            t0() + secs(10),
        )],
    )
    .await;
    assert_eq!(n, 1, "delivered changed one send");
    assert_eq!(
        status_of(&*store, s1).await,
        SendStatus::Delivered,
        "delivered"
    );
    let n = apply(
        &*store,
        vec![event(
            ch.id,
            "wamid.1",
            Some(s1),
            SendStatus::Sent,
            t0() + secs(11),
        )],
    )
    .await;
    assert_eq!(n, 0, "sent after delivered changes nothing");
    assert_eq!(
        status_of(&*store, s1).await,
        SendStatus::Delivered,
        "still delivered"
    );
    let n = apply(
        &*store,
        vec![failed_event(ch.id, "wamid.1", Some(s1), t0() + secs(12))],
    )
    .await;
    assert_eq!(n, 0, "failed after delivered changes nothing");
    let r = get_send(&*store, s1).await;
    assert_eq!(
        r.status,
        SendStatus::Delivered,
        "failed never undoes delivery"
    );
    assert_eq!(
        (r.error_code, r.error),
        (None, None),
        "the ignored failure left no error"
    );
    assert_eq!(r.updated_at, t0() + secs(10), "updated_at of the delivery");
    let n = apply(
        &*store,
        vec![event(
            ch.id,
            "wamid.1",
            Some(s1),
            SendStatus::Read,
            t0() + secs(13),
        )],
    )
    .await;
    assert_eq!(n, 1, "read after delivered changes the send");
    let r = get_send(&*store, s1).await;
    assert_eq!(r.status, SendStatus::Read, "read");
    assert_eq!(r.updated_at, t0() + secs(13), "updated_at of the read");
    assert_eq!(
        r.provider_message_id.as_deref(),
        Some("wamid.1"),
        "pmid kept"
    );

    // s2: sent, then failed (failed ranks above sent) with its code and reason.
    assert_eq!(
        apply(
            &*store,
            vec![event(
                ch.id,
                "wamid.2",
                Some(s2),
                SendStatus::Sent,
                t0() + secs(10)
            )]
        )
        .await,
        1,
        "sent changed s2"
    );
    assert_eq!(
        apply(
            &*store,
            vec![failed_event(ch.id, "wamid.2", Some(s2), t0() + secs(11))]
        )
        .await,
        1,
        "failed after sent changed s2"
    );
    let r = get_send(&*store, s2).await;
    assert_eq!(r.status, SendStatus::Failed, "failed after sent");
    assert_eq!(r.error_code, Some(131_047), "error code recorded");
    assert_eq!(
        r.error.as_deref(),
        Some("Re-engagement message"),
        "error recorded"
    );

    // s3: one batch with sent, delivered and read (out of order and repeated) ends at read.
    let n = apply(
        &*store,
        vec![
            event(
                ch.id,
                "wamid.3",
                Some(s3),
                SendStatus::Delivered,
                t0() + secs(21),
            ),
            event(
                ch.id,
                "wamid.3",
                Some(s3),
                SendStatus::Read,
                t0() + secs(22),
            ),
            event(
                ch.id,
                "wamid.3",
                Some(s3),
                SendStatus::Sent,
                t0() + secs(20),
            ),
            event(
                ch.id,
                "wamid.3",
                Some(s3),
                SendStatus::Delivered,
                t0() + secs(21),
            ),
        ],
    )
    .await;
    assert_eq!(n, 1, "one send changed by the batch");
    let r = get_send(&*store, s3).await;
    assert_eq!(r.status, SendStatus::Read, "the batch ends at read");
    assert_eq!(r.updated_at, t0() + secs(22), "updated_at of the read");

    // A batch over several sends counts the sends it changed.
    let s4 = create_one(&*store, &ch, "+15550004").await;
    let s5 = create_one(&*store, &ch, "+15550005").await;
    let n = apply(
        &*store,
        vec![
            event(
                ch.id,
                "wamid.4",
                Some(s4),
                SendStatus::Sent,
                t0() + secs(30),
            ),
            event(
                ch.id,
                "wamid.4",
                Some(s4),
                SendStatus::Delivered,
                t0() + secs(31),
            ),
            event(
                ch.id,
                "wamid.5",
                Some(s5),
                SendStatus::Sent,
                t0() + secs(30),
            ),
            event(
                ch.id,
                "wamid.1",
                Some(s1),
                SendStatus::Delivered,
                t0() + secs(30),
            ),
            event(
                ch.id,
                "wamid.x",
                Some(Uuid::new_v4()),
                SendStatus::Read,
                t0() + secs(30),
            ),
        ],
    )
    .await;
    assert_eq!(
        n, 2,
        "s4 and s5 changed; s1 (read) and an unknown send did not"
    );
    let r4 = get_send(&*store, s4).await;
    assert_eq!(r4.status, SendStatus::Delivered, "s4 delivered");
    assert_eq!(
        r4.provider_message_id.as_deref(),
        Some("wamid.4"),
        "a webhook naming our send id records Meta's id when we had none"
    );
    assert_eq!(
        get_send(&*store, s5).await.status,
        SendStatus::Sent,
        "s5 sent"
    );
    assert_eq!(
        status_of(&*store, s1).await,
        SendStatus::Read,
        "s1 still read"
    );
    assert_eq!(
        apply(&*store, vec![]).await,
        0,
        "an empty batch changes nothing"
    );
}

async fn apply_statuses_by_provider_id_and_within_channel(store: Arc<dyn Store>) {
    let d = store.delivery();
    let ch = channel(&*store).await;
    let other = channel(&*store).await;
    let s1 = create_one(&*store, &ch, "+15550001").await;
    let s2 = create_one(&*store, &ch, "+15550002").await;
    d.begin_sends(&[s1, s2], t0()).await.expect("begin");
    d.accept_sends(
        &[(s1, "wamid.1".to_owned()), (s2, "wamid.2".to_owned())],
        t0() + secs(1),
    )
    .await
    .expect("accept");

    // Our send id, but another channel: nothing changes.
    let n = d
        .apply_statuses(&[event(
            other.id,
            "wamid.1",
            Some(s1),
            SendStatus::Delivered,
            t0() + secs(2),
        )])
        .await
        .expect("foreign channel by send id");
    assert_eq!(n, 0, "an event from another channel changes nothing");
    // Meta's id, but another channel: nothing changes either.
    let n = d
        .apply_statuses(&[event(
            other.id,
            "wamid.1",
            None,
            SendStatus::Delivered,
            t0() + secs(2),
        )])
        .await
        .expect("foreign channel by pmid");
    assert_eq!(n, 0, "a pmid from another channel changes nothing");
    let r = get_send(&*store, s1).await;
    assert_eq!(r.status, SendStatus::Accepted, "s1 still accepted");
    assert_eq!(r.updated_at, t0() + secs(1), "s1 untouched");

    // Matched by Meta's id only.
    let n = d
        .apply_statuses(&[
            event(ch.id, "wamid.1", None, SendStatus::Sent, t0() + secs(3)),
            event(
                ch.id,
                "wamid.1",
                None,
                SendStatus::Delivered,
                t0() + secs(4),
            ),
            event(ch.id, "wamid.2", None, SendStatus::Sent, t0() + secs(3)),
            event(
                ch.id,
                "wamid.unknown",
                None,
                SendStatus::Read,
                t0() + secs(3),
            ),
        ])
        .await
        .expect("by pmid");
    assert_eq!(n, 2, "two sends changed by Meta's id");
    let r1 = get_send(&*store, s1).await;
    assert_eq!(r1.status, SendStatus::Delivered, "s1 delivered by pmid");
    assert_eq!(r1.updated_at, t0() + secs(4), "updated_at of the delivery");
    assert_eq!(
        get_send(&*store, s2).await.status,
        SendStatus::Sent,
        "s2 sent by pmid"
    );
    let n = d
        .apply_statuses(&[failed_event(ch.id, "wamid.1", None, t0() + secs(5))])
        .await
        .expect("late failure by pmid");
    assert_eq!(n, 0, "failed after delivered changes nothing, by pmid too");
    let n = d
        .apply_statuses(&[failed_event(ch.id, "wamid.2", None, t0() + secs(5))])
        .await
        .expect("failure by pmid");
    assert_eq!(n, 1, "failed after sent, by pmid");
    let r2 = get_send(&*store, s2).await;
    assert_eq!(
        (r2.status, r2.error_code, r2.error.as_deref()),
        (
            SendStatus::Failed,
            Some(131_047),
            Some("Re-engagement message")
        ),
        "failure by pmid records its code and reason"
    );
}

/// A batch in which a status for our send arrives under the right channel, and one naming the
/// same send id arrives under another channel with a further status: the foreign one must be
/// ignored, and must not hide the real one.
async fn statuses_from_another_channel_do_not_mask_real_ones(store: Arc<dyn Store>) {
    let d = store.delivery();
    let ch = channel(&*store).await;
    let other = channel(&*store).await;
    let s1 = create_one(&*store, &ch, "+15550001").await;
    d.begin_sends(&[s1], t0()).await.expect("begin");
    d.accept_sends(&[(s1, "wamid.1".to_owned())], t0() + secs(1))
        .await
        .expect("accept");
    let n = d
        .apply_statuses(&[
            event(
                ch.id,
                "wamid.1",
                Some(s1),
                SendStatus::Delivered,
                t0() + secs(2),
            ),
            event(
                other.id,
                "wamid.1",
                Some(s1),
                SendStatus::Read,
                t0() + secs(3),
            ),
        ])
        .await
        .expect("mixed channels");
    let r = get_send(&*store, s1).await;
    assert_eq!(
        r.status,
        SendStatus::Delivered,
        "the real delivery applies; the foreign read does not"
    );
    assert_eq!(n, 1, "one send changed");
}

// ---------------------------------------------------------------------------------------------
// 6. update_send

async fn update_send_transitions(store: Arc<dyn Store>) {
    let d = store.delivery();
    let ch = channel(&*store).await;
    let s = create_one(&*store, &ch, "+15550001").await;
    let upd = |u: SendUpdate, at: DateTime<Utc>| {
        let store = store.clone();
        async move {
            store
                .delivery()
                .update_send(s, &u, at)
                .await
                .expect("update send")
                .expect("send exists")
        }
    };

    let r = upd(SendUpdate::Requesting, t0() + secs(1)).await;
    assert_eq!(r.status, SendStatus::Sending, "queued -> sending");
    assert_eq!(r.requests, 1, "request counted");
    assert_eq!(r.requested_at, Some(t0() + secs(1)), "requested_at set");
    assert_eq!(r.updated_at, t0() + secs(1), "updated_at set");
    assert_eq!(get_send(&*store, s).await, r, "stored as returned");

    let r = upd(
        SendUpdate::Unknown {
            error: "timed out".to_owned(),
        },
        t0() + secs(2),
    )
    .await;
    assert_eq!(r.status, SendStatus::Unknown, "sending -> unknown");
    assert_eq!(r.error.as_deref(), Some("timed out"), "reason kept");
    assert_eq!(r.requests, 1, "unknown counts no request");

    let unknown = r;
    let r = upd(
        SendUpdate::Unsent {
            requested_at: t0() + secs(1),
        },
        t0() + secs(3),
    )
    .await;
    assert_eq!(
        r, unknown,
        "an unknown send is not unsent: its answer was lost"
    );

    let r = upd(SendUpdate::Requesting, t0() + micros(3_000_001)).await;
    assert_eq!(
        r.status,
        SendStatus::Sending,
        "unknown -> sending (sent again)"
    );
    assert_eq!(r.requests, 2, "a second request counted");
    let sending = r;
    for other in [
        t0() + secs(1),
        t0() + micros(3_000_000),
        t0() + micros(3_000_002),
    ] {
        let r = upd(
            SendUpdate::Unsent {
                requested_at: other,
            },
            t0() + secs(4),
        )
        .await;
        assert_eq!(
            r, sending,
            "unsent for another begin ({other}) leaves this one's request alone"
        );
    }
    let r = upd(
        SendUpdate::Unsent {
            requested_at: t0() + micros(3_000_001),
        },
        t0() + secs(3),
    )
    .await;
    assert_eq!(r.status, SendStatus::Queued, "sending -> queued (unsent)");
    assert_eq!(r.requests, 1, "unsent takes back the request it began");
    assert_eq!(r.updated_at, t0() + secs(3), "updated_at set");
    let r = upd(
        SendUpdate::Unsent {
            requested_at: t0() + micros(3_000_001),
        },
        t0() + secs(3),
    )
    .await;
    assert_eq!(
        r.requests, 1,
        "a second unsent of the same begin counts nothing back"
    );

    let r = upd(SendUpdate::Requesting, t0() + secs(3)).await;
    assert_eq!(r.requests, 2, "a request counted again");
    let r = upd(
        SendUpdate::Refused {
            code: Some(130_429),
            error: "rate limit".to_owned(),
        },
        t0() + secs(3),
    )
    .await;
    assert_eq!(r.status, SendStatus::Queued, "refused -> queued");
    assert_eq!(r.requests, 2, "a refused request still counts");
    assert_eq!(
        r.error_code,
        Some(130_429),
        "Meta's code kept for operators"
    );

    let r = upd(SendUpdate::Requesting, t0() + secs(4)).await;
    assert_eq!(r.status, SendStatus::Sending, "queued -> sending again");
    assert_eq!(r.requests, 3, "third request counted");
    assert_eq!(r.requested_at, Some(t0() + secs(4)), "requested_at moved");

    let r = upd(
        SendUpdate::Failed {
            code: Some(131_026),
            error: "Message undeliverable".to_owned(),
        },
        t0() + secs(5),
    )
    .await;
    assert_eq!(r.status, SendStatus::Failed, "sending -> failed");
    assert_eq!(r.error_code, Some(131_026), "code kept");
    assert_eq!(
        r.error.as_deref(),
        Some("Message undeliverable"),
        "error kept"
    );
    assert_eq!(get_send(&*store, s).await, r, "stored as returned");

    // Failed without a code, from queued.
    let s2 = create_one(&*store, &ch, "+15550002").await;
    let r = d
        .update_send(
            s2,
            &SendUpdate::Failed {
                code: None,
                error: "gave up".to_owned(),
            },
            t0() + secs(6),
        )
        .await
        .expect("fail")
        .expect("exists");
    assert_eq!(
        (r.status, r.error_code, r.error.as_deref()),
        (SendStatus::Failed, None, Some("gave up")),
        "queued -> failed without a code"
    );

    // Accepted, through update_send.
    let s3 = create_one(&*store, &ch, "+15550003").await;
    upd_other(&*store, s3, SendUpdate::Requesting, t0() + secs(7)).await;
    let r = upd_other(
        &*store,
        s3,
        SendUpdate::Accepted {
            provider_message_id: "wamid.3".to_owned(),
        },
        t0() + secs(8),
    )
    .await;
    assert_eq!(r.status, SendStatus::Accepted, "sending -> accepted");
    assert_eq!(
        r.provider_message_id.as_deref(),
        Some("wamid.3"),
        "pmid set"
    );
    assert_eq!(r.accepted_at, Some(t0() + secs(8)), "accepted_at set");

    assert_eq!(
        d.update_send(Uuid::new_v4(), &SendUpdate::Requesting, t0())
            .await
            .expect("update unknown"),
        None,
        "an unknown send gives None"
    );
}

async fn upd_other(store: &dyn Store, id: Uuid, u: SendUpdate, at: DateTime<Utc>) -> SendRecord {
    store
        .delivery()
        .update_send(id, &u, at)
        .await
        .expect("update send")
        .expect("send exists")
}

async fn update_send_leaves_sent_and_beyond_alone(store: Arc<dyn Store>) {
    let d = store.delivery();
    let ch = channel(&*store).await;
    for (i, reached) in [
        SendStatus::Accepted,
        SendStatus::Sent,
        SendStatus::Delivered,
        SendStatus::Read,
    ]
    .into_iter()
    .enumerate()
    {
        let s = create_one(&*store, &ch, &format!("+1555000{i}")).await;
        let pmid = format!("wamid.{i}");
        d.begin_sends(&[s], t0() + secs(1)).await.expect("begin");
        d.accept_sends(&[(s, pmid.clone())], t0() + secs(2))
            .await
            .expect("accept");
        if reached != SendStatus::Accepted {
            let n = d
                .apply_statuses(&[event(ch.id, &pmid, Some(s), reached, t0() + secs(3))])
                .await
                .expect("status");
            assert_eq!(n, 1, "moved to {reached:?}");
        }
        let before = get_send(&*store, s).await;
        assert_eq!(before.status, reached, "set up at {reached:?}");
        for u in [
            SendUpdate::Requesting,
            SendUpdate::Unknown {
                error: "lost".to_owned(),
            },
            SendUpdate::Unsent {
                requested_at: t0() + secs(1),
            },
            SendUpdate::Failed {
                code: Some(1),
                error: "late".to_owned(),
            },
        ] {
            let after = upd_other(&*store, s, u.clone(), t0() + secs(10)).await;
            assert_eq!(after, before, "{u:?} on a {reached:?} send changes nothing");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 7. send_counts

async fn send_counts_per_channel_and_overall(store: Arc<dyn Store>) {
    let d = store.delivery();
    let a = channel(&*store).await;
    let b = channel(&*store).await;
    assert_eq!(counts(&*store, None).await, vec![], "no sends yet");
    let ia = d
        .create_sends(
            &(0..4)
                .map(|i| send_to(&a, &format!("+1555000{i}"), Lane::Broadcast))
                .collect::<Vec<_>>(),
            t0(),
        )
        .await
        .expect("create a");
    let ib = d
        .create_sends(
            &(0..2)
                .map(|i| send_to(&b, &format!("+1555100{i}"), Lane::Interactive))
                .collect::<Vec<_>>(),
            t0(),
        )
        .await
        .expect("create b");
    d.begin_sends(&[ia[0], ia[1], ia[2], ib[0]], t0())
        .await
        .expect("begin");
    d.accept_sends(&[(ia[1], "wamid.a1".to_owned())], t0())
        .await
        .expect("accept");
    d.apply_statuses(&[event(
        a.id,
        "wamid.a2",
        Some(ia[2]),
        SendStatus::Delivered,
        t0(),
    )])
    .await
    .expect("deliver");

    assert_eq!(
        counts(&*store, Some(a.id)).await,
        vec![
            (SendStatus::Queued, 1),
            (SendStatus::Sending, 1),
            (SendStatus::Accepted, 1),
            (SendStatus::Delivered, 1),
        ],
        "channel a by status"
    );
    assert_eq!(
        counts(&*store, Some(b.id)).await,
        vec![(SendStatus::Queued, 1), (SendStatus::Sending, 1)],
        "channel b by status"
    );
    assert_eq!(
        counts(&*store, None).await,
        vec![
            (SendStatus::Queued, 2),
            (SendStatus::Sending, 2),
            (SendStatus::Accepted, 1),
            (SendStatus::Delivered, 1),
        ],
        "all channels by status"
    );
    assert_eq!(
        counts(&*store, Some(Uuid::new_v4())).await,
        vec![],
        "unknown channel has no sends"
    );
}

// ---------------------------------------------------------------------------------------------
// 8. reserve_reach

async fn reserve_reach_moving_24h_tier(store: Arc<dyn Store>) {
    let d = store.delivery();
    let reserve = |portfolio: &'static str, user: &'static str, at: DateTime<Utc>| {
        let store = store.clone();
        async move {
            store
                .delivery()
                .reserve_reach(portfolio, user, 2, at)
                .await
                .expect("reserve reach")
        }
    };
    let a_at = t0();
    assert_eq!(reserve("p1", "A", a_at).await, None, "A allowed");
    assert_eq!(reserve("p1", "B", t0() + secs(60)).await, None, "B allowed");
    assert_eq!(
        reserve("p1", "C", t0() + secs(120)).await,
        Some(a_at + hours(24)),
        "C refused until A's reach leaves the 24 h window"
    );
    assert_eq!(
        reserve("p1", "C", t0() + hours(23)).await,
        Some(a_at + hours(24)),
        "C still refused an hour before"
    );
    // Users already reached in the last 24 h are free.
    assert_eq!(
        reserve("p1", "A", t0() + secs(180)).await,
        None,
        "A again within 24 h allowed"
    );
    assert_eq!(
        reserve("p1", "B", t0() + hours(20)).await,
        None,
        "B again within 24 h allowed"
    );
    // Another portfolio has its own budget.
    assert_eq!(
        reserve("p2", "C", t0() + secs(120)).await,
        None,
        "p2: C allowed"
    );
    assert_eq!(
        reserve("p2", "D", t0() + secs(121)).await,
        None,
        "p2: D allowed"
    );
    assert_eq!(
        reserve("p2", "E", t0() + secs(122)).await,
        Some(t0() + secs(120) + hours(24)),
        "p2: E refused by p2's own budget"
    );

    // 24 h and 1 s after A's first reach: A was reached again at +180 s and B at +20 h, so
    // both still count, and C is refused until A's second reach leaves the window.
    let later = a_at + hours(24) + secs(1);
    assert_eq!(
        reserve("p1", "C", later).await,
        Some(t0() + secs(180) + hours(24)),
        "A's repeat reach still counts"
    );
    let after_a = t0() + secs(180) + hours(24) + secs(1);
    assert_eq!(
        reserve("p1", "C", after_a).await,
        None,
        "C allowed once A's reach is over 24 h old"
    );
    assert_eq!(
        reserve("p1", "D", after_a + secs(1)).await,
        Some(t0() + hours(20) + hours(24)),
        "B and C now fill the tier"
    );

    // A fresh portfolio, plainly: after 24 h and 1 s the first user's reach has expired.
    assert_eq!(reserve("p3", "A", t0()).await, None, "p3: A allowed");
    assert_eq!(reserve("p3", "B", t0()).await, None, "p3: B allowed");
    let frees = reserve("p3", "C", t0() + secs(1)).await;
    assert_eq!(frees, Some(t0() + hours(24)), "p3: C refused until A+24h");
    assert_eq!(
        reserve("p3", "C", t0() + hours(24) + secs(1)).await,
        None,
        "p3: C allowed 24 h and 1 s later"
    );
    // The refusal's time is when the budget frees: a reservation then succeeds.
    assert_eq!(
        d.reserve_reach("p4", "A", 1, t0()).await.expect("reserve"),
        None,
        "p4: A allowed"
    );
    let frees = d
        .reserve_reach("p4", "B", 1, t0() + secs(5))
        .await
        .expect("reserve")
        .expect("p4: B refused with tier 1");
    assert_eq!(frees, t0() + hours(24), "p4: frees at A+24h");
    assert_eq!(
        d.reserve_reach("p4", "B", 1, frees - secs(1))
            .await
            .expect("reserve"),
        Some(frees),
        "p4: still refused a second before"
    );
    assert_eq!(
        d.reserve_reach("p4", "B", 1, frees).await.expect("reserve"),
        None,
        "p4: allowed at the time the refusal named"
    );
}

async fn reserve_reach_concurrent_reservations_respect_the_tier(store: Arc<dyn Store>) {
    const TIER: u32 = 4;
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .delivery()
                    .reserve_reach("p-race", &format!("user{i}"), TIER, t0() + secs(i))
                    .await
                    .expect("reserve reach")
            })
        })
        .collect();
    let mut allowed = 0;
    for t in tasks {
        if t.await.expect("task").is_none() {
            allowed += 1;
        }
    }
    assert_eq!(allowed, TIER, "exactly the tier's worth of users allowed");
}

// ---------------------------------------------------------------------------------------------
// 9. service windows

async fn inbound_keeps_the_latest_per_channel(store: Arc<dyn Store>) {
    let d = store.delivery();
    let ch1 = Uuid::new_v4();
    let ch2 = Uuid::new_v4();
    assert_eq!(
        d.last_inbound(ch1, "+15550001").await.expect("read"),
        None,
        "no inbound yet"
    );
    d.record_inbound(ch1, "+15550001", t0() + secs(10))
        .await
        .expect("record");
    assert_eq!(
        d.last_inbound(ch1, "+15550001").await.expect("read"),
        Some(t0() + secs(10)),
        "first inbound recorded"
    );
    d.record_inbound(ch1, "+15550001", t0() + secs(5))
        .await
        .expect("record older");
    assert_eq!(
        d.last_inbound(ch1, "+15550001").await.expect("read"),
        Some(t0() + secs(10)),
        "an older inbound does not overwrite a newer one"
    );
    d.record_inbound(ch1, "+15550001", t0() + secs(20))
        .await
        .expect("record newer");
    assert_eq!(
        d.last_inbound(ch1, "+15550001").await.expect("read"),
        Some(t0() + secs(20)),
        "a newer inbound moves the window"
    );
    assert_eq!(
        d.last_inbound(ch2, "+15550001").await.expect("read"),
        None,
        "windows are per channel"
    );
    assert_eq!(
        d.last_inbound(ch1, "+15550002").await.expect("read"),
        None,
        "windows are per user"
    );
    d.record_inbound(ch2, "+15550001", t0())
        .await
        .expect("record ch2");
    assert_eq!(
        d.last_inbound(ch2, "+15550001").await.expect("read"),
        Some(t0()),
        "ch2 has its own window"
    );
    assert_eq!(
        d.last_inbound(ch1, "+15550001").await.expect("read"),
        Some(t0() + secs(20)),
        "ch1 unaffected by ch2"
    );
}

// ---------------------------------------------------------------------------------------------
// 10. claim_scoped / ready_rate_keys

async fn ready_rate_keys_and_claim_scoped(store: Arc<dyn Store>) {
    let q = "rated";
    let job = |n: i64, prio: i16, key: Option<&str>| {
        let j = NewJob::new("test.rated", json!({ "n": n }))
            .queue(q)
            .priority(prio);
        match key {
            Some(k) => j.rate_key(k),
            None => j,
        }
    };
    // Enqueued out of key and priority order on purpose.
    let jobs = vec![
        job(1, 5, Some("c")),
        job(2, 5, Some("b")),
        job(3, 1, None),
        job(4, 3, Some("a")),
        job(5, 0, Some("b")),
        job(6, 9, None),
        job(7, 3, Some("b")),
        job(8, 0, Some("a")),
        // Another queue with a key of the same name, and one of its own.
        job(9, 0, Some("a")).queue("elsewhere"),
        job(10, 0, Some("z")).queue("elsewhere"),
        // Not yet due: not ready.
        job(11, 0, Some("y")).run_at(t0() + secs(3600)),
    ];
    let enq = store.enqueue_many(&jobs, t0()).await.expect("enqueue");
    let id_of = |n: usize| enq[n - 1].id;
    let keys = |after: Option<&'static str>, limit: usize| {
        let store = store.clone();
        async move {
            store
                .ready_rate_keys(q, after, limit)
                .await
                .expect("ready rate keys")
        }
    };

    assert_eq!(keys(None, 100).await, ["a", "b", "c"], "keys, in order");
    assert_eq!(keys(None, 2).await, ["a", "b"], "limit respected");
    assert_eq!(keys(None, 1).await, ["a"], "limit 1");
    assert_eq!(keys(Some("a"), 100).await, ["b", "c"], "after a");
    assert_eq!(keys(Some("aa"), 100).await, ["b", "c"], "after a non-key");
    assert_eq!(keys(Some("b"), 1).await, ["c"], "after and limit");
    assert_eq!(keys(Some("c"), 100).await, Vec::<String>::new(), "after c");
    assert_eq!(
        store
            .ready_rate_keys("elsewhere", None, 100)
            .await
            .expect("keys elsewhere"),
        ["a", "z"],
        "the other queue's keys"
    );
    assert_eq!(
        store
            .ready_rate_keys("empty", None, 100)
            .await
            .expect("keys of an empty queue"),
        Vec::<String>::new(),
        "an empty queue has no keys"
    );

    let now = t0() + secs(1);
    let lease = now + secs(30);
    let claimed = store
        .claim_scoped(q, RateScope::Key("b"), "w1", 2, now, lease)
        .await
        .expect("claim b");
    assert_eq!(
        claimed.iter().map(|j| j.id).collect::<Vec<_>>(),
        [id_of(5), id_of(7)],
        "b's two most urgent jobs, highest priority first"
    );
    for j in &claimed {
        assert_eq!(j.rate_key.as_deref(), Some("b"), "only b's jobs");
        assert_eq!(j.state, JobState::Running, "claimed jobs run");
        assert_eq!(j.attempt, 1, "attempt counted");
        assert_eq!(j.attempted_by.as_deref(), Some("w1"), "worker recorded");
        assert_eq!(j.lease_expires_at, Some(lease), "lease set");
    }
    assert_eq!(
        claimed.iter().map(|j| j.priority).collect::<Vec<_>>(),
        [0, 3],
        "priorities in order"
    );
    assert_eq!(
        keys(None, 100).await,
        ["a", "b", "c"],
        "b still has an available job"
    );
    let rest = store
        .claim_scoped(q, RateScope::Key("b"), "w1", 10, now, lease)
        .await
        .expect("claim rest of b");
    assert_eq!(
        rest.iter().map(|j| j.id).collect::<Vec<_>>(),
        [id_of(2)],
        "the rest of b"
    );
    assert_eq!(
        keys(None, 100).await,
        ["a", "c"],
        "a key whose jobs all run is no longer ready"
    );
    assert_eq!(
        store
            .claim_scoped(q, RateScope::Key("b"), "w1", 10, now, lease)
            .await
            .expect("claim empty b")
            .len(),
        0,
        "nothing left for b"
    );

    let unlimited = store
        .claim_scoped(q, RateScope::Unlimited, "w2", 10, now, lease)
        .await
        .expect("claim unkeyed");
    assert_eq!(
        unlimited.iter().map(|j| j.id).collect::<Vec<_>>(),
        [id_of(3), id_of(6)],
        "only the key-less jobs, by priority"
    );
    assert!(
        unlimited.iter().all(|j| j.rate_key.is_none()),
        "unlimited scope takes no keyed job"
    );
    assert_eq!(
        store
            .claim_scoped(q, RateScope::Unlimited, "w2", 10, now, lease)
            .await
            .expect("claim unkeyed again")
            .len(),
        0,
        "no key-less job left"
    );

    let a = store
        .claim_scoped(q, RateScope::Key("a"), "w3", 10, now, lease)
        .await
        .expect("claim a");
    assert_eq!(
        a.iter().map(|j| j.id).collect::<Vec<_>>(),
        [id_of(8), id_of(4)],
        "a's jobs on this queue only, by priority"
    );
    assert_eq!(
        store
            .claim_scoped(q, RateScope::Key("y"), "w3", 10, now, lease)
            .await
            .expect("claim y")
            .len(),
        0,
        "a scheduled job is not claimed before it is due"
    );
    assert_eq!(keys(None, 100).await, ["c"], "only c left");
    assert_eq!(
        store
            .ready_rate_keys("elsewhere", None, 100)
            .await
            .expect("keys elsewhere"),
        ["a", "z"],
        "the other queue untouched"
    );
    assert_eq!(
        store
            .get_job(id_of(9))
            .await
            .expect("get")
            .expect("exists")
            .state,
        JobState::Available,
        "the other queue's a job is still available"
    );
}

// ---------------------------------------------------------------------------------------------
// 11. migrations

async fn migrations_apply_twice(store: Arc<dyn Store>) {
    let ch = channel(&*store).await;
    let id = create_one(&*store, &ch, "+15550001").await;
    store.migrate().await.expect("migrate a second time");
    store.migrate().await.expect("migrate a third time");
    assert_eq!(
        store.delivery().channel(ch.id).await.expect("get"),
        Some(ch.clone()),
        "channel survives migrating again"
    );
    assert_eq!(
        get_send(&*store, id).await.status,
        SendStatus::Queued,
        "send survives migrating again"
    );
    assert_eq!(
        store
            .ready_rate_keys(SEND_QUEUE, None, 10)
            .await
            .expect("ready keys"),
        [channel_rate_key(ch.id)],
        "the rated claim index still serves the loose scan"
    );
}

/// The producer's round over several rate keys in one call: each key within its own limit and
/// priority cap, most urgent first; keys without jobs, other queues, unkeyed jobs, jobs not yet
/// due and later jobs of an ordering key are left alone; a paused queue gives nothing.
async fn claim_keys_takes_each_key_within_its_limit(store: Arc<dyn Store>) {
    let q = "rated";
    let job = |n: i64, prio: i16, key: &str| {
        NewJob::new("test.rated", json!({ "n": n }))
            .queue(q)
            .priority(prio)
            .rate_key(key)
    };
    let jobs = vec![
        job(1, 5, "a"),
        job(2, 0, "a"),
        job(3, 3, "a"),
        job(4, 5, "b"),
        job(5, 1, "b"),
        job(6, 0, "c"),
        job(7, 9, "c"),
        NewJob::new("test.rated", json!({ "n": 8 })).queue(q),
        job(9, 0, "a").queue("elsewhere"),
        job(10, 0, "b").run_at(t0() + secs(3600)),
        // One conversation: the second waits for the first.
        job(11, 2, "d").ordering_key("conv"),
        job(12, 0, "d").ordering_key("conv"),
    ];
    let enq = store.enqueue_many(&jobs, t0()).await.expect("enqueue");
    let id_of = |n: usize| enq[n - 1].id;
    let now = t0() + secs(1);
    let lease = now + secs(30);
    let claim = |k: &'static str, limit: usize, cap: Option<i16>| KeyClaim {
        key: k,
        limit,
        max_priority: cap,
    };

    assert!(
        store
            .claim_keys(q, &[], "w1", now, lease)
            .await
            .expect("no keys")
            .is_empty(),
        "no keys, no jobs"
    );
    let claimed = store
        .claim_keys(
            q,
            &[
                claim("a", 2, None),
                claim("b", 5, None),
                claim("c", 5, Some(0)),
                claim("d", 5, None),
                claim("nothing", 3, None),
            ],
            "w1",
            now,
            lease,
        )
        .await
        .expect("claim keys");
    let mut ids: Vec<_> = claimed.iter().map(|j| j.id).collect();
    ids.sort();
    let mut want = vec![id_of(2), id_of(3), id_of(4), id_of(5), id_of(6), id_of(11)];
    want.sort();
    assert_eq!(
        ids, want,
        "a's two most urgent, all of b that is due, c's urgent one, d's first"
    );
    for j in &claimed {
        assert_eq!(j.state, JobState::Running, "claimed jobs run");
        assert_eq!(j.attempt, 1, "attempt counted");
        assert_eq!(j.attempted_by.as_deref(), Some("w1"), "worker recorded");
        assert_eq!(j.lease_expires_at, Some(lease), "lease set");
    }
    for key in ["a", "b", "c", "d"] {
        let prios: Vec<i16> = claimed
            .iter()
            .filter(|j| j.rate_key.as_deref() == Some(key))
            .map(|j| j.priority)
            .collect();
        let mut sorted = prios.clone();
        sorted.sort();
        assert_eq!(prios, sorted, "{key}: most urgent first");
    }

    // What is left: a's job 1, c's job 7 (above the cap), the unkeyed job, d's second job
    // (waits for its first), and the other queue's job.
    assert_eq!(
        store.ready_rate_keys(q, None, 100).await.expect("keys"),
        ["a", "c", "d"],
        "keys with jobs left"
    );
    let again = store
        .claim_keys(
            q,
            &[claim("a", 0, None), claim("c", 1, None)],
            "w2",
            now,
            lease,
        )
        .await
        .expect("claim again");
    assert_eq!(
        again.iter().map(|j| j.id).collect::<Vec<_>>(),
        [id_of(7)],
        "a limit of 0 takes nothing; c's last job without a cap"
    );

    store
        .pause_queue(q, "maintenance", now)
        .await
        .expect("pause");
    assert!(
        store
            .claim_keys(q, &[claim("a", 5, None)], "w1", now, lease)
            .await
            .expect("claim paused")
            .is_empty(),
        "a paused queue gives nothing"
    );
    store.resume_queue(q).await.expect("resume");
    assert_eq!(
        store
            .claim_keys(q, &[claim("a", 5, None)], "w1", now, lease)
            .await
            .expect("claim resumed")
            .iter()
            .map(|j| j.id)
            .collect::<Vec<_>>(),
        [id_of(1)],
        "resumed"
    );
}

async fn claim_keys_begins_the_claimed_sends(store: Arc<dyn Store>) {
    let d = store.delivery();
    let ch = channel(&*store).await;
    let sends: Vec<NewSend> = (0..4)
        .map(|i| send_to(&ch, &format!("+1555000{i}"), Lane::Broadcast))
        .collect();
    let ids = d.create_sends(&sends, t0()).await.expect("create");
    // Settled before its claim (a late status webhook): the claim must not begin it.
    d.update_send(
        ids[3],
        &SendUpdate::Failed {
            code: Some(131026),
            error: "undeliverable".into(),
        },
        t0(),
    )
    .await
    .expect("fail one");
    // A send job whose payload names no send, and a job of another kind on the same key
    // naming a send of another channel (whose own job is not claimed here).
    let key = channel_rate_key(ch.id);
    let ch2 = d
        .create_channel(&new_channel(Platform::Whatsapp, "1555999"), t0())
        .await
        .expect("second channel");
    let other = d
        .create_sends(&[send_to(&ch2, "+15559990000", Lane::Broadcast)], t0())
        .await
        .expect("other send")[0];
    store
        .enqueue_many(
            &[
                NewJob::new(
                    SEND_KIND,
                    json!({ "send_id": "not-a-uuid", "channel_id": ch.id }),
                )
                .queue(SEND_QUEUE)
                .rate_key(&key),
                NewJob::new("test.other", json!({ "send_id": other }))
                    .queue(SEND_QUEUE)
                    .rate_key(&key),
                // A send job enqueued by hand naming that send: not the send's own job.
                NewJob::new(SEND_KIND, json!({ "send_id": other, "channel_id": ch2.id }))
                    .queue(SEND_QUEUE)
                    .rate_key(&key),
            ],
            t0(),
        )
        .await
        .expect("enqueue odd jobs");

    // A claim's time with nanoseconds: the stores keep microseconds.
    let now = t0() + secs(1) + chrono::Duration::nanoseconds(123_456_789);
    let claimed = common::claim_key(&*store, SEND_QUEUE, &key, now).await;
    assert_eq!(claimed.len(), 7, "every job is claimed, the odd ones too");
    let job_of = |id: Uuid| {
        claimed
            .iter()
            .find(|j| j.unique_key.as_deref() == Some(format!("send:{id}").as_str()))
            .unwrap_or_else(|| panic!("the job of send {id}"))
    };

    // A record is for its own claim (job and time): another claim does not get it, and the
    // send says which claim began it, to the microsecond.
    let first = job_of(ids[0]);
    let micro = chrono::Duration::microseconds(1);
    assert!(d.take_begun(ids[0], first.id, now + micro).is_none());
    assert!(d.take_begun(ids[0], first.id + 1, now).is_none());
    let s0 = get_send(&*store, ids[0]).await;
    assert!(herald_engine::delivery::begun_by_claim(&s0, now));
    assert!(!herald_engine::delivery::begun_by_claim(&s0, now + micro));
    assert!(!herald_engine::delivery::begun_by_claim(&s0, now - micro));
    assert_eq!(herald_engine::delivery::send_of_job(first), Some(ids[0]));

    for &id in &ids[..3] {
        let job = job_of(id);
        let begun = d
            .take_begun(id, job.id, now)
            .expect("the claim began the queued send");
        assert_eq!(begun.id, id);
        assert_eq!(begun.status, SendStatus::Sending, "begun: sending");
        assert_eq!(begun.requests, 1, "one request counted");
        assert_eq!(
            begun.requested_at.map(|t| t.timestamp_micros()),
            Some(now.timestamp_micros()),
            "requested at the claim"
        );
        assert_eq!(
            get_send(&*store, id).await,
            begun,
            "what the worker gets is what is stored"
        );
        assert!(d.take_begun(id, job.id, now).is_none(), "taken once");
    }
    let settled = job_of(ids[3]);
    assert!(
        d.take_begun(ids[3], settled.id, now).is_none(),
        "a settled send is not begun"
    );
    let s3 = get_send(&*store, ids[3]).await;
    assert_eq!(s3.status, SendStatus::Failed);
    assert_eq!(s3.requests, 0, "and not counted");
    // Only a send's own job begins it.
    let elsewhere = get_send(&*store, other).await;
    assert_eq!(
        elsewhere.status,
        SendStatus::Queued,
        "not begun by another job"
    );
    assert_eq!(elsewhere.requests, 0);

    // Begun by the claim, the worker's own begin finds nothing queued: no second request.
    assert!(
        d.begin_sends(&ids[..3], now)
            .await
            .expect("begin")
            .is_empty(),
        "already begun"
    );
}
