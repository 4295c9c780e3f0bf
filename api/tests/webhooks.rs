//! Meta's webhooks through the router (`oneshot`, no socket) on a real SQLite store: the
//! handshake, the signature check before anything is parsed, bad input, and statuses applied
//! monotonically.

mod common;

use common::fixture;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use chrono::Utc;
use herald_api::{app, AppState};
use herald_engine::delivery::{
    Channel, Lane, Message, NewChannel, NewSend, Platform, SendStatus, SendUpdate,
};
use herald_engine::Store;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tower::ServiceExt;
use uuid::Uuid;

const SECRET: &str = "app-secret-for-tests";

async fn channel(store: &Arc<dyn Store>, platform: Platform) -> Channel {
    store
        .delivery()
        .create_channel(
            &NewChannel {
                workspace_id: Uuid::new_v4(),
                platform,
                name: "test".into(),
                sender_id: format!("1555{}", fastrand_digits()),
                portfolio_id: None,
                access_token: "token".into(),
                app_secret: SECRET.into(),
                verify_token: "verify-me".into(),
                graph_base_url: Some("http://127.0.0.1:9".into()),
                api_version: None,
                limits: None,
            },
            Utc::now(),
        )
        .await
        .expect("create channel")
}

/// A send Meta accepted as `wamid`.
async fn accepted_send(store: &Arc<dyn Store>, channel: &Channel, wamid: &str) -> Uuid {
    let ids = store
        .delivery()
        .create_sends(
            &[NewSend {
                workspace_id: channel.workspace_id,
                channel_id: channel.id,
                recipient: "15551234567".into(),
                message: Message::Text { body: "hi".into() },
                lane: Lane::Interactive,
            }],
            Utc::now(),
        )
        .await
        .expect("create send");
    store
        .delivery()
        .update_send(
            ids[0],
            &SendUpdate::Accepted {
                provider_message_id: wamid.into(),
            },
            Utc::now(),
        )
        .await
        .expect("accept");
    ids[0]
}

/// Seven random digits: each channel its own Meta id.
fn fastrand_digits() -> String {
    format!("{:07}", Uuid::new_v4().as_u128() % 10_000_000)
}

fn state(store: &Arc<dyn Store>) -> AppState {
    AppState::new(
        store.clone(),
        Arc::new(herald_engine::SystemClock),
        herald_api::ApiConfig::default(),
    )
}

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn post(
    store: &Arc<dyn Store>,
    channel: &str,
    body: Vec<u8>,
    signature: Option<String>,
) -> (StatusCode, Value) {
    let mut req =
        Request::post(format!("/webhooks/{channel}")).header("content-type", "application/json");
    if let Some(sig) = signature {
        req = req.header("x-hub-signature-256", sig);
    }
    let response = app(state(store))
        .oneshot(req.body(Body::from(body)).expect("request"))
        .await
        .expect("response");
    let status = response.status();
    if status == StatusCode::OK {
        // What the `meta.webhook` job does, without waiting for the queue.
        let pending = store
            .inbox()
            .pending_webhooks(1_000)
            .await
            .expect("pending");
        assert!(!pending.is_empty(), "a 200 stored the delivery");
        herald_workers::meta::webhook::process(store.as_ref(), chrono::Utc::now(), &pending, None)
            .await
            .expect("process");
    }
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn wa_status(channel: &Channel, wamid: &str, send: Option<Uuid>, status: &str) -> Vec<u8> {
    let mut s = json!({
        "id": wamid, "status": status, "timestamp": "1767225600", "recipient_id": "15551234567"
    });
    if let Some(id) = send {
        s["biz_opaque_callback_data"] = json!(id.to_string());
    }
    if status == "failed" {
        s["errors"] = json!([{ "code": 131026, "title": "Message undeliverable" }]);
    }
    serde_json::to_vec(&json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": "waba", "changes": [{ "field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": { "display_phone_number": "15550000000", "phone_number_id": channel.sender_id },
            "statuses": [s]
        }}]}]
    }))
    .expect("json")
}

async fn status_of(store: &Arc<dyn Store>, id: Uuid) -> SendStatus {
    store
        .delivery()
        .send(id)
        .await
        .expect("send")
        .expect("exists")
        .status
}

#[tokio::test]
async fn verification_handshake() {
    let f = fixture().await;
    let ch = channel(&f.store, Platform::Whatsapp).await;
    let get = |uri: String| {
        let store = f.store.clone();
        async move {
            let r = app(state(&store))
                .oneshot(Request::get(uri).body(Body::empty()).expect("request"))
                .await
                .expect("response");
            let status = r.status();
            let body = axum::body::to_bytes(r.into_body(), 1 << 16)
                .await
                .expect("body");
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    let ok = get(format!(
        "/webhooks/{}?hub.mode=subscribe&hub.verify_token=verify-me&hub.challenge=12345",
        ch.id
    ))
    .await;
    assert_eq!(ok, (StatusCode::OK, "12345".to_owned()));
    let wrong = get(format!(
        "/webhooks/{}?hub.mode=subscribe&hub.verify_token=nope&hub.challenge=12345",
        ch.id
    ))
    .await;
    assert_eq!(wrong.0, StatusCode::FORBIDDEN);
    assert!(!wrong.1.contains("12345"), "no challenge echoed on refusal");
    let missing = get(format!("/webhooks/{}?hub.mode=subscribe", ch.id)).await;
    assert_eq!(missing.0, StatusCode::FORBIDDEN);
    let unknown = get(format!(
        "/webhooks/{}?hub.mode=subscribe&hub.verify_token=verify-me&hub.challenge=1",
        Uuid::new_v4()
    ))
    .await;
    assert_eq!(unknown.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn unsigned_or_badly_signed_posts_change_nothing() {
    let f = fixture().await;
    let ch = channel(&f.store, Platform::Whatsapp).await;
    let send = accepted_send(&f.store, &ch, "wamid.A").await;
    let body = wa_status(&ch, "wamid.A", Some(send), "delivered");
    let id = ch.id.to_string();
    let (status, problem) = post(&f.store, &id, body.clone(), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(problem["type"], "https://herald.dev/problems/bad-signature");
    let mut tampered = body.clone();
    tampered.extend_from_slice(b" ");
    let (status, _) = post(&f.store, &id, tampered, Some(sign(&body))).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "signature of another body"
    );
    let (status, _) = post(&f.store, &id, body.clone(), Some("sha256=zz".into())).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "not hex");
    let (status, _) = post(&f.store, &id, body.clone(), Some("md5=00".into())).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "wrong scheme");
    assert_eq!(status_of(&f.store, send).await, SendStatus::Accepted);
    let (status, _) = post(&f.store, &id, body.clone(), Some(sign(&body))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(status_of(&f.store, send).await, SendStatus::Delivered);
}

#[tokio::test]
async fn bad_input_gets_a_clear_status_and_nothing_is_stored() {
    let f = fixture().await;
    let ch = channel(&f.store, Platform::Whatsapp).await;
    let id = ch.id.to_string();
    for (body, want) in [
        (b"{not json".to_vec(), StatusCode::BAD_REQUEST),
        (vec![0xff, 0xfe, 0x00], StatusCode::BAD_REQUEST),
        (
            b"{\"object\":\"other\",\"entry\":[]}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (b"{\"object\":\"page\"}".to_vec(), StatusCode::BAD_REQUEST),
        // What the envelope check skips, yet the worker's parser refuses: refused here too,
        // not stored and dropped later.
        (
            b"{\"object\":\"page\",\"entry\":[{\"id\":\"\xff\"}]}".to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            br#"{"object":"page","entry":[{"id":"\uD800"}]}"#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            br#"{"object":"page","entry":[{"time":1e999}]}"#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!(
                r#"{{"object":"page","entry":[{}{}]}}"#,
                "[".repeat(200),
                "]".repeat(200)
            )
            .into_bytes(),
            StatusCode::BAD_REQUEST,
        ),
        // The worker drops NUL from keys too: this `entry` becomes 1, this `object` "x".
        (
            br#"{"object":"page","entry":[],"entry\u0000":1}"#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        (
            br#"{"object":"page","object\u0000":"x","entry":[]}"#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        // An array is not an object, though serde would fill the envelope from it.
        (
            br#"["whatsapp_business_account",[]]"#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        // A duplicate field: the worker takes the last one, and so does the check.
        (
            br#"{"object":"other","object":"page","entry":[]}"#.to_vec(),
            StatusCode::OK,
        ),
        (
            br#"{"object":"page","object":"other","entry":[]}"#.to_vec(),
            StatusCode::BAD_REQUEST,
        ),
        // Parsed whole, and fine: a surrogate pair and an escaped NUL.
        (
            br#"{"object":"page","entry":[{"x":"\uD83D\uDE00\u0000"}]}"#.to_vec(),
            StatusCode::OK,
        ),
    ] {
        let (status, problem) = post(&f.store, &id, body.clone(), Some(sign(&body))).await;
        assert_eq!(status, want, "body {:?}", String::from_utf8_lossy(&body));
        if want != StatusCode::OK {
            assert!(problem["detail"].is_string(), "a problem+json body");
        }
    }
    let huge = vec![b' '; herald_api::webhooks::MAX_BODY + 1];
    let (status, _) = post(&f.store, &id, huge.clone(), Some(sign(&huge))).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let body = wa_status(&ch, "wamid.X", None, "read");
    let (status, _) = post(&f.store, "not-a-uuid", body.clone(), Some(sign(&body))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = post(
        &f.store,
        &Uuid::new_v4().to_string(),
        body.clone(),
        Some(sign(&body)),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A status for a message Herald never sent is accepted (Meta must not retry it) and
    // changes nothing.
    let (status, _) = post(&f.store, &id, body.clone(), Some(sign(&body))).await;
    assert_eq!(status, StatusCode::OK);
    let counts = f.store.delivery().send_counts(None).await.expect("counts");
    assert!(counts.is_empty(), "nothing stored: {counts:?}");
}

#[tokio::test]
async fn statuses_never_move_backwards() {
    let f = fixture().await;
    let ch = channel(&f.store, Platform::Whatsapp).await;
    let id = ch.id.to_string();
    let send = accepted_send(&f.store, &ch, "wamid.B").await;
    for (status, expect) in [
        ("read", SendStatus::Read),
        ("delivered", SendStatus::Read),
        ("sent", SendStatus::Read),
        ("failed", SendStatus::Read),
    ] {
        let body = wa_status(&ch, "wamid.B", Some(send), status);
        assert_eq!(
            post(&f.store, &id, body.clone(), Some(sign(&body))).await.0,
            StatusCode::OK
        );
        assert_eq!(status_of(&f.store, send).await, expect, "after {status}");
    }
    // Matched by Meta's id alone (no callback data), and a failure after `sent` is kept with
    // its code.
    let other = accepted_send(&f.store, &ch, "wamid.C").await;
    let body = wa_status(&ch, "wamid.C", None, "failed");
    assert_eq!(
        post(&f.store, &id, body.clone(), Some(sign(&body))).await.0,
        StatusCode::OK
    );
    let record = f
        .store
        .delivery()
        .send(other)
        .await
        .expect("send")
        .expect("exists");
    assert_eq!(record.status, SendStatus::Failed);
    assert_eq!(record.error_code, Some(131026));
}

#[tokio::test]
async fn a_lost_answer_is_reconciled_by_the_callback_data() {
    let f = fixture().await;
    let ch = channel(&f.store, Platform::Whatsapp).await;
    let ids = f
        .store
        .delivery()
        .create_sends(
            &[NewSend {
                workspace_id: ch.workspace_id,
                channel_id: ch.id,
                recipient: "15551234567".into(),
                message: Message::Template {
                    name: "offer".into(),
                    language: "en_US".into(),
                    parameters: vec![],
                },
                lane: Lane::Broadcast,
            }],
            Utc::now(),
        )
        .await
        .expect("send");
    let delivery = f.store.delivery();
    delivery
        .update_send(ids[0], &SendUpdate::Requesting, Utc::now())
        .await
        .expect("requesting");
    delivery
        .update_send(
            ids[0],
            &SendUpdate::Unknown {
                error: "timeout".into(),
            },
            Utc::now(),
        )
        .await
        .expect("unknown");
    let body = wa_status(&ch, "wamid.LOST", Some(ids[0]), "sent");
    assert_eq!(
        post(
            &f.store,
            &ch.id.to_string(),
            body.clone(),
            Some(sign(&body))
        )
        .await
        .0,
        StatusCode::OK
    );
    let record = delivery.send(ids[0]).await.expect("send").expect("exists");
    assert_eq!(record.status, SendStatus::Sent);
    assert_eq!(record.provider_message_id.as_deref(), Some("wamid.LOST"));
    // A callback naming this send but arriving on another channel's URL changes nothing.
    let other = channel(&f.store, Platform::Whatsapp).await;
    let body = wa_status(&other, "wamid.LOST", Some(ids[0]), "read");
    assert_eq!(
        post(
            &f.store,
            &other.id.to_string(),
            body.clone(),
            Some(sign(&body))
        )
        .await
        .0,
        StatusCode::OK
    );
    assert_eq!(status_of(&f.store, ids[0]).await, SendStatus::Sent);
}

#[tokio::test]
async fn inbound_messages_open_the_window_and_messenger_echoes_settle_sends() {
    let f = fixture().await;
    let wa = channel(&f.store, Platform::Whatsapp).await;
    let body = serde_json::to_vec(&json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": "waba", "changes": [{ "field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": { "phone_number_id": wa.sender_id },
            "contacts": [{ "profile": { "name": "Ann" }, "wa_id": "15557654321" }],
            "messages": [{ "from": "15557654321", "id": "wamid.IN", "timestamp": "1767225600",
                           "type": "text", "text": { "body": "hello" } }]
        }}]}]
    }))
    .expect("json");
    assert_eq!(
        post(
            &f.store,
            &wa.id.to_string(),
            body.clone(),
            Some(sign(&body))
        )
        .await
        .0,
        StatusCode::OK
    );
    let last = f
        .store
        .delivery()
        .last_inbound(wa.id, "15557654321")
        .await
        .expect("window");
    assert_eq!(last.map(|t| t.timestamp()), Some(1_767_225_600));
    // The same user written as E.164 with separators is the same user.
    let spelled = f
        .store
        .delivery()
        .last_inbound(wa.id, "+1 555-765-4321")
        .await
        .expect("window");
    assert_eq!(
        spelled, last,
        "one user, one window, however the number is written"
    );

    let page = channel(&f.store, Platform::Messenger).await;
    let ids = f
        .store
        .delivery()
        .create_sends(
            &[NewSend {
                workspace_id: page.workspace_id,
                channel_id: page.id,
                recipient: "psid-1".into(),
                message: Message::Text { body: "hi".into() },
                lane: Lane::Interactive,
            }],
            Utc::now(),
        )
        .await
        .expect("send");
    let echo = serde_json::to_vec(&json!({
        "object": "page",
        "entry": [{ "id": page.sender_id, "time": 1767225600000i64, "messaging": [
            { "sender": { "id": page.sender_id }, "recipient": { "id": "psid-1" }, "timestamp": 1767225600000i64,
              "message": { "is_echo": true, "mid": "mid.1", "metadata": ids[0].to_string(), "text": "hi" } },
            { "sender": { "id": "psid-1" }, "recipient": { "id": page.sender_id }, "timestamp": 1767225601000i64,
              "delivery": { "mids": ["mid.1"], "watermark": 1767225601000i64 } }
        ]}]
    }))
    .expect("json");
    assert_eq!(
        post(
            &f.store,
            &page.id.to_string(),
            echo.clone(),
            Some(sign(&echo))
        )
        .await
        .0,
        StatusCode::OK
    );
    let record = f
        .store
        .delivery()
        .send(ids[0])
        .await
        .expect("send")
        .expect("exists");
    assert_eq!(record.provider_message_id.as_deref(), Some("mid.1"));
    // The echo (sent) and the receipt (delivered) arrived in one batch; the receipt names only
    // Meta's id, which the echo set earlier in the same request.
    assert_eq!(record.status, SendStatus::Delivered);
}

/// Two numbers of one Meta app share the callback URL: each event goes to the channel of the
/// number it names, and events for numbers Herald does not know are left out.
#[tokio::test]
async fn events_go_to_the_channel_they_name_not_the_url() {
    let f = fixture().await;
    let a = channel(&f.store, Platform::Whatsapp).await;
    let b = channel(&f.store, Platform::Whatsapp).await;
    let send_b = accepted_send(&f.store, &b, "wamid.B1").await;
    let body = wa_status(&b, "wamid.B1", Some(send_b), "delivered");
    assert_eq!(
        post(&f.store, &a.id.to_string(), body.clone(), Some(sign(&body)))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        status_of(&f.store, send_b).await,
        SendStatus::Delivered,
        "B's status posted to A's URL settles B's send"
    );
    let mut stranger = b.clone();
    stranger.sender_id = "19999999999".into();
    let send_a = accepted_send(&f.store, &a, "wamid.A1").await;
    let body = wa_status(&stranger, "wamid.A1", Some(send_a), "read");
    assert_eq!(
        post(&f.store, &a.id.to_string(), body.clone(), Some(sign(&body)))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        status_of(&f.store, send_a).await,
        SendStatus::Accepted,
        "an event naming an unknown number changes nothing"
    );
}

fn wa_inbound(channel: &Channel, messages: &[(&str, &str, &str)]) -> Vec<u8> {
    let messages: Vec<Value> = messages
        .iter()
        .map(|(from, id, text)| {
            json!({ "from": from, "id": id, "timestamp": "1767225600",
                    "type": "text", "text": { "body": text } })
        })
        .collect();
    serde_json::to_vec(&json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": "waba", "changes": [{ "field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": { "phone_number_id": channel.sender_id },
            "messages": messages
        }}]}]
    }))
    .expect("json")
}

/// Meta delivers at least once: a message delivered twice (alone, or again inside a batch)
/// is stored once. A 200 means the delivery and its processing job are committed.
#[tokio::test]
async fn redelivered_messages_are_stored_once() {
    let f = fixture().await;
    let wa = channel(&f.store, Platform::Whatsapp).await;
    let id = wa.id.to_string();
    let first = wa_inbound(&wa, &[("15550000001", "wamid.A", "hello")]);
    let (status, _) = post(&f.store, &id, first.clone(), Some(sign(&first))).await;
    assert_eq!(status, StatusCode::OK);
    let jobs = f
        .store
        .list_jobs(&herald_engine::JobFilter {
            kind: Some(herald_engine::inbox::WEBHOOK_KIND.into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("jobs");
    assert_eq!(jobs.len(), 1, "one processing job per stored batch");
    let (status, _) = post(&f.store, &id, first.clone(), Some(sign(&first))).await;
    assert_eq!(status, StatusCode::OK, "a redelivery is acknowledged");
    let batch = wa_inbound(
        &wa,
        &[
            ("15550000001", "wamid.A", "hello"),
            ("15550000002", "wamid.B", "STOP"),
            ("15550000002", "wamid.B", "STOP"),
        ],
    );
    let (status, _) = post(&f.store, &id, batch.clone(), Some(sign(&batch))).await;
    assert_eq!(status, StatusCode::OK);
    let stored = f
        .store
        .inbox()
        .inbound_messages(wa.id, 100)
        .await
        .expect("messages");
    let mut mids: Vec<&str> = stored
        .iter()
        .map(|m| m.provider_message_id.as_str())
        .collect();
    mids.sort();
    assert_eq!(mids, ["wamid.A", "wamid.B"]);
    let b = stored
        .iter()
        .find(|m| m.provider_message_id == "wamid.B")
        .expect("B");
    assert_eq!(b.text.as_deref(), Some("STOP"));
    assert_eq!(b.kind, "text");
    assert_eq!(b.workspace_id, wa.workspace_id);
    let counts = f.store.inbox().webhook_counts().await.expect("counts");
    assert_eq!((counts.stored, counts.pending), (3, 0));
    // Each sender is a contact; the one who wrote STOP is opted out.
    let contacts = f
        .store
        .contacts()
        .contacts(wa.workspace_id, None, None, 10)
        .await
        .expect("contacts");
    let mut by_phone: Vec<(String, bool)> = contacts
        .iter()
        .map(|c| {
            (
                c.phone.clone().expect("a WhatsApp contact has a phone"),
                c.opted_out,
            )
        })
        .collect();
    by_phone.sort();
    assert_eq!(
        by_phone,
        [
            ("+15550000001".to_owned(), false),
            ("+15550000002".to_owned(), true)
        ]
    );
}

/// What the stand-in for the workflows received: (sender, Meta message id), in handling order.
#[derive(Clone, Default)]
struct Received(Arc<std::sync::Mutex<Vec<(String, String)>>>);

#[async_trait::async_trait]
impl herald_engine::Worker for Received {
    type Args = herald_engine::inbox::InboundMessage;
    const KIND: &'static str = herald_engine::inbox::INBOUND_KIND;

    async fn work(
        &self,
        m: herald_engine::inbox::InboundMessage,
        _ctx: &herald_engine::JobContext,
    ) -> Result<(), herald_engine::JobError> {
        // Slow enough that a second message of the conversation would overtake the first if
        // the ordering key did not hold it back.
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((m.sender, m.provider_message_id));
        Ok(())
    }
}

/// The whole path with the queue running: signed deliveries are acknowledged, the
/// `meta.webhook` job applies them, and each new inbound message is handed on once, in order
/// per conversation, however often Meta delivers it.
#[tokio::test]
async fn new_inbound_messages_are_handed_on_once_in_order() {
    use herald_engine::inbox::{InboundHandOff, INBOUND_QUEUE, WEBHOOK_QUEUE};
    use herald_engine::{Engine, EngineConfig, QueueConfig, Registry};

    let f = fixture().await;
    let wa = channel(&f.store, Platform::Whatsapp).await;
    let clock: Arc<dyn herald_engine::Clock> = Arc::new(herald_engine::SystemClock);
    let received = Received::default();
    let mut registry = Registry::new();
    registry.register(
        herald_workers::meta::webhook::WebhookWorker::new(f.store.clone(), clock.clone())
            .hand_off(InboundHandOff::default()),
    );
    registry.register(received.clone());
    let config = EngineConfig {
        queues: [
            (WEBHOOK_QUEUE.to_owned(), QueueConfig { concurrency: 4 }),
            (INBOUND_QUEUE.to_owned(), QueueConfig { concurrency: 4 }),
        ]
        .into(),
        poll_interval: std::time::Duration::from_millis(50),
        ..EngineConfig::default()
    };
    let engine = Engine::start(f.store.clone(), registry, config, clock);

    let id = wa.id.to_string();
    for body in [
        wa_inbound(
            &wa,
            &[
                ("15550000001", "wamid.A1", "hi"),
                ("15550000002", "wamid.B1", "hello"),
            ],
        ),
        wa_inbound(&wa, &[("15550000001", "wamid.A1", "hi")]),
        wa_inbound(
            &wa,
            &[
                ("15550000001", "wamid.A2", "are you there?"),
                ("15550000002", "wamid.B1", "hello"),
            ],
        ),
    ] {
        let response = app(state(&f.store))
            .oneshot(
                Request::post(format!("/webhooks/{id}"))
                    .header("content-type", "application/json")
                    .header("x-hub-signature-256", sign(&body))
                    .body(Body::from(body))
                    .expect("request"),
            )
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK);
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let done = f
            .store
            .list_jobs(&herald_engine::JobFilter {
                kind: Some(herald_engine::inbox::INBOUND_KIND.into()),
                state: Some(herald_engine::JobState::Completed),
                limit: 100,
                ..Default::default()
            })
            .await
            .expect("jobs");
        let pending = f
            .store
            .inbox()
            .webhook_counts()
            .await
            .expect("counts")
            .pending;
        if done.len() >= 3 && pending == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "handed on: {done:?}, pending deliveries: {pending}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    engine.shutdown().await;
    let got = received.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            ("15550000001".to_owned(), "wamid.A1".to_owned()),
            ("15550000001".to_owned(), "wamid.A2".to_owned()),
            ("15550000002".to_owned(), "wamid.B1".to_owned()),
        ],
        "each message once: {got:?}"
    );
    let a: Vec<&str> = got
        .iter()
        .filter(|(s, _)| s == "15550000001")
        .map(|(_, m)| m.as_str())
        .collect();
    assert_eq!(
        a,
        ["wamid.A1", "wamid.A2"],
        "in order within the conversation"
    );
}

/// A Messenger or Instagram message from `sender` to `channel` (a page or an account).
fn page_inbound(channel: &Channel, sender: &str, mid: &str, text: &str) -> Vec<u8> {
    let object = match channel.platform {
        Platform::Instagram => "instagram",
        _ => "page",
    };
    serde_json::to_vec(&json!({
        "object": object,
        "entry": [{ "id": channel.sender_id, "time": 1767225600000i64, "messaging": [
            { "sender": { "id": sender }, "recipient": { "id": channel.sender_id },
              "timestamp": 1767225600000i64, "message": { "mid": mid, "text": text } }
        ]}]
    }))
    .expect("json")
}

/// Messenger and Instagram senders are page-scoped ids: a signed message makes its sender a
/// contact with a handle on the channel and no phone; writing again creates nothing; STOP opts
/// them out.
#[tokio::test]
async fn messenger_and_instagram_senders_become_contacts_by_handle() {
    let f = fixture().await;
    let page = channel(&f.store, Platform::Messenger).await;
    let id = page.id.to_string();
    let contacts = || async {
        f.store
            .contacts()
            .contacts(page.workspace_id, None, None, 10)
            .await
            .expect("contacts")
    };
    let body = page_inbound(&page, "psid-42", "mid.in.1", "hello");
    assert_eq!(
        post(&f.store, &id, body.clone(), Some(sign(&body))).await.0,
        StatusCode::OK
    );
    let first = contacts().await;
    assert_eq!(first.len(), 1, "{first:#?}");
    assert_eq!(first[0].phone, None);
    assert!(!first[0].opted_out);
    assert_eq!(
        first[0].handles,
        [herald_engine::contacts::ContactHandle {
            channel_id: page.id,
            platform: Platform::Messenger,
            external_id: "psid-42".into(),
        }]
    );
    // The same delivery again, then another message: still the one contact.
    assert_eq!(
        post(&f.store, &id, body.clone(), Some(sign(&body))).await.0,
        StatusCode::OK
    );
    let again = page_inbound(&page, "psid-42", "mid.in.2", "are you there?");
    assert_eq!(
        post(&f.store, &id, again.clone(), Some(sign(&again)))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(contacts().await, first, "nothing new");
    let stop = page_inbound(&page, "psid-42", "mid.in.3", "Stop");
    assert_eq!(
        post(&f.store, &id, stop.clone(), Some(sign(&stop))).await.0,
        StatusCode::OK
    );
    let stopped = contacts().await;
    assert_eq!(stopped.len(), 1);
    assert_eq!(stopped[0].id, first[0].id);
    assert!(
        stopped[0].opted_out,
        "STOP on Messenger opts the contact out"
    );

    // An Instagram account's sender is a contact by an Instagram handle.
    let insta = channel(&f.store, Platform::Instagram).await;
    let body = page_inbound(&insta, "igsid-7", "mid.ig.1", "hi");
    assert_eq!(
        post(
            &f.store,
            &insta.id.to_string(),
            body.clone(),
            Some(sign(&body))
        )
        .await
        .0,
        StatusCode::OK
    );
    let ig = f
        .store
        .contacts()
        .contacts(insta.workspace_id, None, None, 10)
        .await
        .expect("contacts");
    assert_eq!(ig.len(), 1, "{ig:#?}");
    assert_eq!(ig[0].phone, None);
    assert_eq!(ig[0].handles.len(), 1);
    assert_eq!(ig[0].handles[0].channel_id, insta.id);
    assert_eq!(ig[0].handles[0].platform, Platform::Instagram);
    assert_eq!(ig[0].handles[0].external_id, "igsid-7");
}

/// The app with the workers' triage, as `herald serve` builds it.
fn triaged(store: &Arc<dyn Store>, triage: Arc<dyn herald_engine::inbox::Triage>) -> axum::Router {
    app(AppState::new(
        store.clone(),
        Arc::new(herald_engine::SystemClock),
        herald_api::ApiConfig {
            triage: Some(triage),
            ..herald_api::ApiConfig::default()
        },
    ))
}

/// Posts a signed delivery and leaves it to the store (no processing).
async fn post_only(app: axum::Router, channel: &Channel, body: Vec<u8>) -> StatusCode {
    let req = Request::post(format!("/webhooks/{}", channel.id))
        .header("content-type", "application/json")
        .header("x-hub-signature-256", sign(&body))
        .body(Body::from(body))
        .expect("request");
    app.oneshot(req).await.expect("response").status()
}

async fn webhook_jobs(store: &Arc<dyn Store>) -> Vec<herald_engine::Job> {
    store
        .list_jobs(&herald_engine::model::JobFilter {
            kind: Some(herald_engine::inbox::WEBHOOK_KIND.into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("jobs")
}

/// Statuses of our own sends (Meta echoes the send id) are applied before Meta gets its 200,
/// with no job; anything else still goes through the queue.
#[tokio::test]
async fn status_only_deliveries_are_applied_as_they_arrive() {
    let f = fixture().await;
    let ch = channel(&f.store, Platform::Whatsapp).await;
    let triage = Arc::new(herald_workers::meta::webhook::WebhookTriage::new(
        f.store.clone(),
        Arc::new(herald_engine::SystemClock),
    ));
    let send = accepted_send(&f.store, &ch, "wamid.T").await;
    let body = wa_status(&ch, "wamid.T", Some(send), "delivered");
    assert_eq!(
        post_only(triaged(&f.store, triage.clone()), &ch, body).await,
        StatusCode::OK
    );
    assert_eq!(status_of(&f.store, send).await, SendStatus::Delivered);
    let counts = f.store.inbox().webhook_counts().await.expect("counts");
    assert_eq!(
        (counts.stored, counts.pending),
        (1, 0),
        "kept raw, processed"
    );
    assert!(webhook_jobs(&f.store).await.is_empty(), "no job");

    // Matched by Meta's id alone: the job's work (it may need the provider id index).
    let other = accepted_send(&f.store, &ch, "wamid.U").await;
    let body = wa_status(&ch, "wamid.U", None, "read");
    assert_eq!(
        post_only(triaged(&f.store, triage.clone()), &ch, body).await,
        StatusCode::OK
    );
    assert_eq!(
        status_of(&f.store, other).await,
        SendStatus::Accepted,
        "left for the job"
    );
    // An inbound message, and a status for a number Herald does not know: the job's too.
    let inbound = wa_inbound(&ch, &[("15551234567", "wamid.IN", "hello")]);
    assert_eq!(
        post_only(triaged(&f.store, triage.clone()), &ch, inbound).await,
        StatusCode::OK
    );
    let stranger = Channel {
        sender_id: "19999999999".into(),
        ..ch.clone()
    };
    let foreign = wa_status(&stranger, "wamid.T", Some(send), "read");
    assert_eq!(
        post_only(triaged(&f.store, triage), &ch, foreign).await,
        StatusCode::OK
    );
    let counts = f.store.inbox().webhook_counts().await.expect("counts");
    assert_eq!((counts.stored, counts.pending), (4, 3));
    assert_eq!(webhook_jobs(&f.store).await.len(), 3, "one job each");
    let pending = f.store.inbox().pending_webhooks(10).await.expect("pending");
    herald_workers::meta::webhook::process(f.store.as_ref(), Utc::now(), &pending, None)
        .await
        .expect("process");
    assert_eq!(status_of(&f.store, other).await, SendStatus::Read);
    assert_eq!(
        status_of(&f.store, send).await,
        SendStatus::Delivered,
        "a foreign number's event is ignored"
    );
}

/// A triage that finds statuses the database refuses (a NUL byte, which PostgreSQL's text
/// cannot hold): it stands for a parser bug.
struct Refused(Uuid);

#[async_trait::async_trait]
impl herald_engine::inbox::Triage for Refused {
    async fn statuses_only(
        &self,
        channel_id: Uuid,
        _body: &[u8],
    ) -> Option<Vec<herald_engine::delivery::StatusEvent>> {
        Some(vec![herald_engine::delivery::StatusEvent {
            channel_id,
            provider_message_id: "wamid.\0".into(),
            send_id: Some(self.0),
            status: SendStatus::Failed,
            error_code: Some(1),
            error: Some("nul \0 byte".into()),
            at: Utc::now(),
        }])
    }
}

/// When the database refuses the statuses a triage found, the delivery is stored raw for the
/// job: Meta still gets its 200 and nothing is lost.
#[tokio::test]
async fn refused_statuses_fall_back_to_the_job() {
    let url = std::env::var("HERALD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let schema = format!("api_{}", &Uuid::new_v4().simple().to_string()[..12]);
    let pg = herald_engine::store::PgStore::connect(&herald_engine::store::PgStoreConfig {
        keyring: Some(Arc::new(
            herald_engine::crypto::Keyring::parse(&"ab".repeat(32), &[]).expect("test key"),
        )),
        url: url.clone(),
        max_connections: 4,
        acquire_timeout: std::time::Duration::from_secs(10),
        schema: Some(schema.clone()),
    })
    .await
    .expect("connect to PostgreSQL (is it running? set HERALD_TEST_DATABASE_URL)");
    pg.migrate().await.expect("migrate");
    let store: Arc<dyn Store> = Arc::new(pg);
    let ch = channel(&store, Platform::Whatsapp).await;
    let send = accepted_send(&store, &ch, "wamid.R").await;
    let body = wa_status(&ch, "wamid.R", Some(send), "read");
    let status = post_only(triaged(&store, Arc::new(Refused(send))), &ch, body).await;
    let counts = store.inbox().webhook_counts().await.expect("counts");
    let jobs = webhook_jobs(&store).await.len();
    let after = status_of(&store, send).await;
    drop(store);
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .expect("connect");
    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .execute(&mut conn)
        .await
        .expect("drop schema");
    assert_eq!(status, StatusCode::OK, "stored after all");
    assert_eq!((counts.stored, counts.pending), (1, 1), "for the job");
    assert_eq!(jobs, 1, "with its job");
    assert_eq!(after, SendStatus::Accepted, "nothing half applied");
}
