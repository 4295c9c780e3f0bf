//! The inbox: Meta's webhook deliveries and the messages users send us.
//!
//! A delivery is stored raw (the body exactly as Meta signed it) as soon as its signature checks
//! out, and processed later through the queue: [`InboxStore::store_webhooks`] writes a batch of
//! deliveries and one [`WEBHOOK_KIND`] job naming them in the same transaction, so a delivery
//! that was acknowledged to Meta is never lost and is always processed.
//!
//! Most deliveries are only statuses of Herald's own sends. A [`Triage`] parses those as they
//! arrive, and the store applies their statuses in the transaction that stores the delivery
//! (stored processed, with no job): one statement instead of six (store, claim, read, apply,
//! mark processed, complete). Anything else (inbound messages, events for numbers Herald does
//! not know, statuses that name no send of ours, a body that does not parse) takes the queue.
//!
//! Architecture invariant: processing a delivery twice changes nothing. Inbound messages are
//! keyed by (channel, Meta message id) and a redelivered one is dropped; windows only move
//! forward; statuses never move a send backwards. That is what lets the job be retried after a
//! crash at any point, and Meta deliver the same event as often as it likes.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::delivery::StatusEvent;
use crate::error::Result;
use crate::model::NewJob;

/// The job that processes stored deliveries.
pub const WEBHOOK_KIND: &str = "meta.webhook";
/// Its queue: webhooks never wait behind sends, nor sends behind webhooks.
pub const WEBHOOK_QUEUE: &str = "webhooks";

/// A delivery whose signature checked out, to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct NewWebhookEvent {
    /// The channel whose URL Meta called (events inside may belong to its siblings).
    pub channel_id: Uuid,
    pub body: Vec<u8>,
    /// Everything the delivery carries, when that is only statuses of our sends (each with its
    /// send id), as a [`Triage`] found: [`InboxStore::store_webhooks`] applies them in its
    /// transaction and stores the delivery processed, with no job. None (or an empty list, or
    /// a status without a send id): the delivery is stored for the [`WEBHOOK_KIND`] job.
    pub statuses: Option<Vec<StatusEvent>>,
}

impl NewWebhookEvent {
    /// A delivery for the queue.
    pub fn raw(channel_id: Uuid, body: Vec<u8>) -> Self {
        NewWebhookEvent {
            channel_id,
            body,
            statuses: None,
        }
    }

    /// The statuses to apply as the delivery is stored; None when it goes to the queue. Both
    /// stores decide with this, so they agree on which deliveries get a job.
    pub fn applied_now(&self) -> Option<&[StatusEvent]> {
        self.statuses
            .as_deref()
            .filter(|s| !s.is_empty() && s.iter().all(|e| e.send_id.is_some()))
    }
}

/// The statuses of every delivery in `events` that has some to apply now
/// ([`NewWebhookEvent::applied_now`]), in order: what both stores apply as they store them.
pub fn statuses_applied_now(events: &[NewWebhookEvent]) -> Vec<StatusEvent> {
    events
        .iter()
        .filter_map(NewWebhookEvent::applied_now)
        .flatten()
        .cloned()
        .collect()
}

/// Sorts deliveries before they are stored (see the module's documentation). Implemented by the
/// webhook parser (in the workers), given to the HTTP layer by the composition root.
#[async_trait]
pub trait Triage: Send + Sync + 'static {
    /// The statuses of a delivery to `channel_id`'s URL that carries nothing but statuses of
    /// our own sends; None when it must go through the queue. Never an error: whatever cannot
    /// be decided here is decided by the job.
    async fn statuses_only(&self, channel_id: Uuid, body: &[u8]) -> Option<Vec<StatusEvent>>;
}

impl std::fmt::Debug for dyn Triage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Triage")
    }
}

/// A stored delivery not processed yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEvent {
    pub id: i64,
    pub channel_id: Uuid,
    pub received_at: DateTime<Utc>,
    pub body: Vec<u8>,
}

/// The payload of a [`WEBHOOK_KIND`] job: the deliveries to process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookArgs {
    pub events: Vec<i64>,
}

/// The job that processes deliveries `ids`.
pub fn webhook_job(ids: &[i64]) -> NewJob {
    NewJob::new(
        WEBHOOK_KIND,
        serde_json::json!(WebhookArgs {
            events: ids.to_vec()
        }),
    )
    .queue(WEBHOOK_QUEUE)
    .max_attempts(25)
}

/// The job that hands a new inbound message on to whatever answers it (the workflows): its
/// payload is the [`InboundMessage`].
pub const INBOUND_KIND: &str = "inbound.message";

/// Where new inbound messages are handed on. With one, [`InboxStore::finish_webhooks`] enqueues
/// one [`INBOUND_KIND`] job per message stored for the first time, in the transaction that
/// stores it: a message is handed on exactly when it is stored, never twice when Meta
/// redelivers it, and never lost to a crash in between. The jobs of one conversation (channel
/// and sender) run one at a time, in order (their ordering key).
///
/// The composition root sets it when a handler for [`INBOUND_KIND`] is registered; without one
/// nothing is enqueued (a job nobody handles would only be discarded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundHandOff {
    pub queue: String,
    /// Attempts per job before it is discarded.
    pub max_attempts: i32,
}

/// Default [`InboundHandOff::queue`].
pub const INBOUND_QUEUE: &str = "flows";

impl Default for InboundHandOff {
    fn default() -> Self {
        InboundHandOff {
            queue: INBOUND_QUEUE.to_owned(),
            max_attempts: 25,
        }
    }
}

impl InboundHandOff {
    /// The jobs for `fresh` messages, oldest first.
    pub fn jobs(&self, fresh: &[InboundMessage]) -> Vec<NewJob> {
        let mut ordered: Vec<&InboundMessage> = fresh.iter().collect();
        ordered.sort_by_key(|m| m.sent_at);
        ordered
            .into_iter()
            .map(|m| {
                NewJob::new(INBOUND_KIND, serde_json::json!(m))
                    .workspace(m.workspace_id)
                    .queue(self.queue.clone())
                    .max_attempts(self.max_attempts)
                    .ordering_key(format!("conversation:{}:{}", m.channel_id, m.sender))
                    .unique_key(format!(
                        "inbound:{}:{}",
                        m.channel_id, m.provider_message_id
                    ))
            })
            .collect()
    }
}

/// A message a user sent to one of our channels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InboundMessage {
    pub channel_id: Uuid,
    pub workspace_id: Uuid,
    /// `wamid.…` or `mid.…`.
    pub provider_message_id: String,
    /// wa_id (WhatsApp), PSID (Messenger) or IGSID (Instagram).
    pub sender: String,
    /// Meta's message type: text, image, button, interactive, …
    pub kind: String,
    /// The text, a button's title or a media caption, when there is one.
    pub text: Option<String>,
    /// The message object as Meta sent it.
    pub payload: serde_json::Value,
    pub sent_at: DateTime<Utc>,
    /// The sender's profile name, when the delivery carried it (WhatsApp's `contacts[]`). Not
    /// stored with the message: it names the contact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_name: Option<String>,
}

/// How many deliveries are stored, and how many of those wait for processing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WebhookCounts {
    pub stored: i64,
    pub pending: i64,
}

/// Where deliveries and inbound messages live. Implemented by both stores.
#[async_trait]
pub trait InboxStore: Send + Sync + 'static {
    /// Stores deliveries and one job to process them, in one transaction; returns their ids.
    /// A delivery with statuses to apply now ([`NewWebhookEvent::applied_now`]) has them
    /// applied in the same transaction, as [`crate::delivery::DeliveryStore::apply_statuses`]
    /// would, and is stored processed, with no job (there is no job at all when every delivery
    /// is such). An empty slice stores nothing.
    async fn store_webhooks(
        &self,
        events: &[NewWebhookEvent],
        now: DateTime<Utc>,
    ) -> Result<Vec<i64>>;

    /// The deliveries among `ids` that are not processed yet, in id order.
    async fn webhook_events(&self, ids: &[i64]) -> Result<Vec<WebhookEvent>>;

    /// In one transaction: stores `inbound` (dropping messages already stored), refreshes their
    /// senders' service windows, hands the new messages on (`hand_off`), and marks deliveries
    /// `ids` processed. Returns the messages that were new.
    async fn finish_webhooks(
        &self,
        ids: &[i64],
        inbound: &[InboundMessage],
        hand_off: Option<&InboundHandOff>,
        now: DateTime<Utc>,
    ) -> Result<Vec<InboundMessage>>;

    /// The oldest deliveries not processed yet, at most `limit` (for operators, and for a
    /// caller that processes them without the queue, as tests do).
    async fn pending_webhooks(&self, limit: i64) -> Result<Vec<i64>>;

    /// Deliveries stored and pending.
    async fn webhook_counts(&self) -> Result<WebhookCounts>;

    /// A channel's inbound messages, newest first, at most `limit`.
    async fn inbound_messages(&self, channel_id: Uuid, limit: i64) -> Result<Vec<InboundMessage>>;
}

/// Whether a JSON body holds nothing that a `serde_json::Value` refuses but a typed reading
/// (or `IgnoredAny`) skips over unchecked in the fields it ignores: invalid UTF-8, a `\uD800`-`\uDFFF` escape (a lone
/// surrogate, or half of a pair: pairs are rare enough in status deliveries to take the full
/// parser), a number too large for an f64 (an exponent, or a run of more than 300 digits),
/// nesting deeper than serde_json's limit of 128 (it skips ignored values without one); and no
/// escaped NUL, which the webhook worker's parser removes. False means: only a full parse can
/// say. Cheap enough (one pass over the bytes) for every delivery at ingest.
pub fn json_strict_enough(body: &[u8]) -> bool {
    const MAX_DEPTH: usize = 64;
    if std::str::from_utf8(body).is_err() {
        return false;
    }
    let mut in_string = false;
    let mut escaped = false;
    let mut digits = 0usize;
    let mut depth = 0usize;
    let mut previous = 0u8;
    for (i, &b) in body.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
                // `parse` drops U+0000 from every string and key first.
                if b == b'u' && matches!(body.get(i + 1..i + 5), Some(b"0000" | [b'd' | b'D', ..]))
                {
                    return false;
                }
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'e' | b'E' if previous.is_ascii_digit() || previous == b'.' => return false,
            b'0'..=b'9' => {
                digits += 1;
                if digits > 300 {
                    return false;
                }
            }
            _ => {}
        }
        if !b.is_ascii_digit() {
            digits = 0;
        }
        previous = b;
    }
    true
}

/// A delivery's body as the webhook worker reads it: parsed whole into a `Value`, U+0000
/// removed from every string and key (see `strip_nul`).
pub fn webhook_json(body: &[u8]) -> std::result::Result<serde_json::Value, String> {
    let mut v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    strip_nul(&mut v);
    Ok(v)
}

/// The envelope every delivery has: a known `object` (`whatsapp_business_account`, `page` or
/// `instagram`) and an `entry` array. Ingest checks it before storing and the worker reads it,
/// so what ingest stores the worker can read.
pub fn webhook_envelope(
    v: &serde_json::Value,
) -> std::result::Result<(&str, &Vec<serde_json::Value>), String> {
    let object = match v.get("object") {
        Some(serde_json::Value::String(o)) => Some(o.as_str()),
        Some(_) => return Err("the object field is not a string".into()),
        None => None,
    };
    let entries = v.get("entry").and_then(serde_json::Value::as_array);
    let object = webhook_object(object, entries.is_some())?;
    Ok((object, entries.ok_or("no entry array")?))
}

/// The envelope's `object`, if it is one Meta sends and an `entry` array is beside it: the
/// part of [`webhook_envelope`] that a typed reading of the two fields can share.
pub fn webhook_object(object: Option<&str>, has_entry: bool) -> std::result::Result<&str, String> {
    let object = match object {
        Some(o @ ("whatsapp_business_account" | "page" | "instagram")) => o,
        Some(other) => return Err(format!("unknown webhook object {other:?}")),
        None => return Err("no object field".into()),
    };
    if !has_entry {
        return Err("no entry array".into());
    }
    Ok(object)
}

/// Removes U+0000 from every string (and key) of `v`. PostgreSQL's `text` and `jsonb` cannot
/// hold it, so one NUL in a delivery made every write of its batch fail: the job retried
/// until it was discarded, with the other deliveries of its batch. Meta never sends one.
fn strip_nul(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) if s.contains('\0') => s.retain(|c| c != '\0'),
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_nul),
        serde_json::Value::Object(map) => {
            if map.keys().any(|k| k.contains('\0')) {
                *map = std::mem::take(map)
                    .into_iter()
                    .map(|(k, v)| (k.replace('\0', ""), v))
                    .collect();
            }
            map.values_mut().for_each(strip_nul);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_webhook_job_is_due_at_once_and_not_unique() {
        // PostgreSQL's one-statement ingest writes neither a unique key nor a run_at.
        let job = webhook_job(&[1, 2]);
        assert_eq!((job.unique_key, job.run_at), (None, None));
        assert_eq!(job.queue, WEBHOOK_QUEUE);
    }
}
