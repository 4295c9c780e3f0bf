//! The webhook sender: batches events into Meta's webhook payloads, signs them with
//! `X-Hub-Signature-256`, and delivers them at least once with retries.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use hmac::{Hmac, Mac};
use serde_json::{json, Map, Value};
use sha2::Sha256;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::meta::{default_details, title};
use crate::state::{Acceptance, Shared};
use crate::validate::{PageSend, WaSend};
use crate::{SandboxConfig, Status};

/// Timeout of one webhook POST: Meta gives up on slow endpoints too.
pub(crate) const POST_TIMEOUT: Duration = Duration::from_secs(5);
/// Webhook POSTs in flight at once, so one slow answer does not hold up every status.
pub(crate) const MAX_IN_FLIGHT: usize = 4;
/// Tries per POST before it counts as a webhook failure.
const MAX_TRIES: u32 = 8;
/// Backoff before the second try; doubles each time.
const RETRY_BASE: Duration = Duration::from_millis(100);
/// `metadata.display_phone_number` in WhatsApp webhooks.
const DISPLAY_PHONE_NUMBER: &str = "15550000000";

/// One webhook item waiting to be sent.
#[derive(Debug, Clone)]
pub(crate) enum Event {
    WaStatus {
        sender: String,
        message_id: String,
        status: Status,
        timestamp: u64,
        recipient_id: String,
        callback: Option<String>,
        error: Option<i64>,
    },
    WaInbound {
        sender: String,
        from: String,
        id: String,
        timestamp: u64,
        text: String,
        name: String,
    },
    PageEcho {
        page: String,
        recipient: String,
        mid: String,
        ts_ms: u64,
        text: Option<String>,
        attachment: Option<Value>,
        metadata: Option<String>,
    },
    PageDelivery {
        page: String,
        recipient: String,
        mid: String,
        ts_ms: u64,
    },
    PageRead {
        page: String,
        recipient: String,
        ts_ms: u64,
    },
}

impl Event {
    fn is_status(&self) -> bool {
        !matches!(self, Event::WaInbound { .. })
    }

    fn is_whatsapp(&self) -> bool {
        matches!(self, Event::WaStatus { .. } | Event::WaInbound { .. })
    }
}

/// The status events of an accepted WhatsApp send.
pub(crate) fn whatsapp_events(
    config: &SandboxConfig,
    sender: &str,
    send: &WaSend,
    acc: &Acceptance,
) -> Vec<Event> {
    let timestamp = (acc.accepted_ms / 1000.0) as u64;
    let status = |status: Status, error: Option<i64>| Event::WaStatus {
        sender: sender.to_owned(),
        message_id: acc.message_id.clone(),
        status,
        timestamp,
        recipient_id: send.wa_id.clone(),
        callback: send.callback.clone(),
        error,
    };
    match acc.fail_code {
        Some(code) => vec![status(Status::Failed, Some(code))],
        None => config
            .statuses
            .iter()
            .map(|&s| status(s, (s == Status::Failed).then_some(131000)))
            .collect(),
    }
}

/// The echo and receipts of an accepted Messenger / Instagram send. A `fail_after_accept`
/// recipient gets the echo but no receipts: Messenger has no failed status.
pub(crate) fn page_events(config: &SandboxConfig, send: &PageSend, acc: &Acceptance) -> Vec<Event> {
    let ts_ms = acc.accepted_ms as u64;
    let page = &config.page_id;
    config
        .statuses
        .iter()
        .filter_map(|status| match status {
            Status::Sent => Some(Event::PageEcho {
                page: page.clone(),
                recipient: send.recipient.clone(),
                mid: acc.message_id.clone(),
                ts_ms,
                text: send.text.clone(),
                attachment: send.attachment.clone(),
                metadata: send.metadata.clone(),
            }),
            Status::Delivered if acc.fail_code.is_none() => Some(Event::PageDelivery {
                page: page.clone(),
                recipient: send.recipient.clone(),
                mid: acc.message_id.clone(),
                ts_ms,
            }),
            Status::Read if acc.fail_code.is_none() => Some(Event::PageRead {
                page: page.clone(),
                recipient: send.recipient.clone(),
                ts_ms,
            }),
            _ => None,
        })
        .collect()
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`, Meta's `X-Hub-Signature-256`.
pub(crate) fn sign(secret: &str, body: &[u8]) -> String {
    match <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()) {
        Ok(mut mac) => {
            mac.update(body);
            format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
        }
        // HMAC takes keys of any length; this cannot happen.
        Err(_) => "sha256=".to_owned(),
    }
}

/// Batches events from `events` and POSTs them to `url` until the channel closes (the server
/// has stopped), then waits for the POSTs in flight.
pub(crate) async fn run(
    shared: Arc<Shared>,
    client: reqwest::Client,
    url: Option<reqwest::Url>,
    mut events: mpsc::UnboundedReceiver<Event>,
) {
    let Some(url) = url else {
        while events.recv().await.is_some() {}
        return;
    };
    let batch_max = shared.config.webhook_batch.max(1);
    let flush = shared.config.webhook_flush;
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    let mut buf = Vec::with_capacity(batch_max);
    loop {
        if events.recv_many(&mut buf, batch_max).await == 0 {
            break;
        }
        let deadline = Instant::now() + flush;
        while buf.len() < batch_max {
            let want = batch_max - buf.len();
            match tokio::time::timeout_at(deadline, events.recv_many(&mut buf, want)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        while tasks.try_join_next().is_some() {}
        for (body, statuses) in payloads(&shared.config, &buf) {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            tasks.spawn(deliver(
                shared.clone(),
                client.clone(),
                url.clone(),
                body,
                statuses,
                permit,
            ));
        }
        buf.clear();
    }
    while tasks.join_next().await.is_some() {}
}

/// POSTs one payload, retrying with exponential backoff; counts the outcome.
async fn deliver(
    shared: Arc<Shared>,
    client: reqwest::Client,
    url: reqwest::Url,
    body: Bytes,
    statuses: u64,
    _permit: OwnedSemaphorePermit,
) {
    let signature = sign(&shared.config.app_secret, &body);
    for attempt in 0..MAX_TRIES {
        if attempt > 0 {
            tokio::time::sleep(RETRY_BASE * 2u32.pow(attempt - 1)).await;
        }
        let sent = client
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Hub-Signature-256", &signature)
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(resp) => {
                let status = resp.status();
                // Read the answer so the connection goes back to the pool.
                let _ = resp.bytes().await;
                if status.is_success() {
                    shared.record_webhook(true, statuses);
                    return;
                }
                tracing::debug!(%status, attempt, "webhook refused; will retry");
            }
            Err(e) => tracing::debug!(error = %e, attempt, "webhook failed; will retry"),
        }
    }
    tracing::warn!(%url, "webhook given up after {MAX_TRIES} tries");
    shared.record_webhook(false, 0);
}

/// The POST bodies for a batch: one `whatsapp_business_account` payload and one `page`
/// payload at most, each with the number of status items it carries.
fn payloads(config: &SandboxConfig, batch: &[Event]) -> Vec<(Bytes, u64)> {
    let (wa, page): (Vec<&Event>, Vec<&Event>) = batch.iter().partition(|e| e.is_whatsapp());
    let mut out = Vec::with_capacity(2);
    for (events, payload) in [
        (
            &wa,
            whatsapp_payload as fn(&SandboxConfig, &[&Event]) -> Value,
        ),
        (&page, page_payload),
    ] {
        if events.is_empty() {
            continue;
        }
        let statuses = events.iter().filter(|e| e.is_status()).count() as u64;
        let body = payload(config, events).to_string();
        out.push((Bytes::from(body), statuses));
    }
    out
}

/// Per-sender lists, in order of first appearance.
fn group<'a, T>(items: impl Iterator<Item = (&'a str, T)>) -> Vec<(&'a str, Vec<T>)> {
    let mut groups: Vec<(&'a str, Vec<T>)> = Vec::new();
    for (key, item) in items {
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, list)) => list.push(item),
            None => groups.push((key, vec![item])),
        }
    }
    groups
}

fn whatsapp_payload(config: &SandboxConfig, events: &[&Event]) -> Value {
    let mut changes = Vec::new();
    let by_sender = group(events.iter().filter_map(|e| match e {
        Event::WaStatus { sender, .. } | Event::WaInbound { sender, .. } => {
            Some((sender.as_str(), *e))
        }
        _ => None,
    }));
    for (sender, events) in by_sender {
        let metadata = json!({
            "display_phone_number": DISPLAY_PHONE_NUMBER,
            "phone_number_id": sender,
        });
        let mut statuses = Vec::new();
        let mut contacts = Vec::new();
        let mut messages = Vec::new();
        for event in events {
            match event {
                Event::WaStatus {
                    message_id,
                    status,
                    timestamp,
                    recipient_id,
                    callback,
                    error,
                    ..
                } => {
                    let mut s = Map::new();
                    s.insert("id".into(), json!(message_id));
                    s.insert("status".into(), json!(status));
                    s.insert("timestamp".into(), json!(timestamp.to_string()));
                    s.insert("recipient_id".into(), json!(recipient_id));
                    if let Some(callback) = callback {
                        s.insert("biz_opaque_callback_data".into(), json!(callback));
                    }
                    if let Some(code) = error {
                        s.insert(
                            "errors".into(),
                            json!([{
                                "code": code,
                                "title": title(*code),
                                "message": title(*code),
                                "error_data": {"details": default_details(*code)},
                            }]),
                        );
                    }
                    statuses.push(Value::Object(s));
                }
                Event::WaInbound {
                    from,
                    id,
                    timestamp,
                    text,
                    name,
                    ..
                } => {
                    contacts.push(json!({"profile": {"name": name}, "wa_id": from}));
                    messages.push(json!({
                        "from": from,
                        "id": id,
                        "timestamp": timestamp.to_string(),
                        "type": "text",
                        "text": {"body": text},
                    }));
                }
                _ => {}
            }
        }
        if !statuses.is_empty() {
            changes.push(json!({"field": "messages", "value": {
                "messaging_product": "whatsapp",
                "metadata": metadata,
                "statuses": statuses,
            }}));
        }
        if !messages.is_empty() {
            changes.push(json!({"field": "messages", "value": {
                "messaging_product": "whatsapp",
                "metadata": metadata,
                "contacts": contacts,
                "messages": messages,
            }}));
        }
    }
    json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": config.waba_id, "changes": changes}],
    })
}

fn page_payload(_config: &SandboxConfig, events: &[&Event]) -> Value {
    let time = crate::state::unix_ms() as u64;
    let by_page = group(events.iter().filter_map(|e| match e {
        Event::PageEcho { page, .. }
        | Event::PageDelivery { page, .. }
        | Event::PageRead { page, .. } => Some((page.as_str(), *e)),
        _ => None,
    }));
    let entries: Vec<Value> = by_page
        .into_iter()
        .map(|(page, events)| {
            let messaging: Vec<Value> = events
                .into_iter()
                .filter_map(|event| match event {
                    Event::PageEcho {
                        recipient,
                        mid,
                        ts_ms,
                        text,
                        attachment,
                        metadata,
                        ..
                    } => {
                        let mut message = Map::new();
                        message.insert("is_echo".into(), Value::Bool(true));
                        message.insert("mid".into(), json!(mid));
                        if let Some(metadata) = metadata {
                            message.insert("metadata".into(), json!(metadata));
                        }
                        if let Some(text) = text {
                            message.insert("text".into(), json!(text));
                        }
                        if let Some(attachment) = attachment {
                            message.insert("attachments".into(), json!([attachment]));
                        }
                        Some(json!({
                            "sender": {"id": page},
                            "recipient": {"id": recipient},
                            "timestamp": ts_ms,
                            "message": message,
                        }))
                    }
                    Event::PageDelivery {
                        recipient,
                        mid,
                        ts_ms,
                        ..
                    } => Some(json!({
                        "sender": {"id": recipient},
                        "recipient": {"id": page},
                        "timestamp": ts_ms,
                        "delivery": {"mids": [mid], "watermark": ts_ms},
                    })),
                    Event::PageRead {
                        recipient, ts_ms, ..
                    } => Some(json!({
                        "sender": {"id": recipient},
                        "recipient": {"id": page},
                        "timestamp": ts_ms,
                        "read": {"watermark": ts_ms},
                    })),
                    _ => None,
                })
                .collect();
            json!({"id": page, "time": time, "messaging": messaging})
        })
        .collect();
    json!({"object": "page", "entry": entries})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_known_vector() {
        // RFC 4231 test case 2.
        let sig = sign("Jefe", b"what do ya want for nothing?");
        assert_eq!(
            sig,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_eight_tries_with_backoff() {
        // A port nobody listens on: every try fails at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let shared = Arc::new(Shared::new(SandboxConfig::default()));
        let client = reqwest::Client::builder()
            .timeout(POST_TIMEOUT)
            .build()
            .expect("client");
        let url = reqwest::Url::parse(&format!("http://127.0.0.1:{port}/hook")).expect("url");
        let permit = Arc::new(Semaphore::new(1))
            .acquire_owned()
            .await
            .expect("permit");
        let started = Instant::now();
        deliver(
            shared.clone(),
            client,
            url,
            Bytes::from_static(b"{}"),
            2,
            permit,
        )
        .await;
        // 100 + 200 + … + 6400 ms between the eight tries.
        assert!(started.elapsed() >= Duration::from_millis(12_700));
        let stats = shared.stats();
        assert_eq!(stats.webhook_failures, 1);
        assert_eq!(stats.webhooks_sent, 0);
        assert_eq!(stats.statuses_sent, 0);
    }

    #[test]
    fn batch_splits_by_object_and_groups_by_sender() {
        let config = SandboxConfig::default();
        let status = |sender: &str, id: &str| Event::WaStatus {
            sender: sender.into(),
            message_id: id.into(),
            status: Status::Sent,
            timestamp: 1,
            recipient_id: "1".into(),
            callback: None,
            error: None,
        };
        let batch = vec![
            status("a", "w1"),
            status("b", "w2"),
            status("a", "w3"),
            Event::PageRead {
                page: "p".into(),
                recipient: "u".into(),
                ts_ms: 5,
            },
        ];
        let posts = payloads(&config, &batch);
        assert_eq!(posts.len(), 2);
        assert_eq!(posts[0].1, 3);
        let wa: Value = serde_json::from_slice(&posts[0].0).expect("json");
        let changes = &wa["entry"][0]["changes"];
        assert_eq!(changes.as_array().map(Vec::len), Some(2));
        assert_eq!(changes[0]["value"]["metadata"]["phone_number_id"], "a");
        assert_eq!(changes[0]["value"]["statuses"][1]["id"], "w3");
        assert!(changes[0]["value"]["statuses"][0]
            .get("biz_opaque_callback_data")
            .is_none());
        let page: Value = serde_json::from_slice(&posts[1].0).expect("json");
        assert_eq!(page["object"], "page");
        assert_eq!(page["entry"][0]["messaging"][0]["read"]["watermark"], 5);
    }
}
