//! Processing Meta's webhook deliveries: the `meta.webhook` job.
//!
//! The HTTP layer stores each signed delivery raw and answers Meta at once; a job per stored
//! batch comes here. For each delivery it parses the events of all three platforms, routes each
//! to the channel it names, and applies them: statuses move sends forward (and reconcile sends
//! whose answer was lost, by the send id echoed in `biz_opaque_callback_data` / `metadata`);
//! inbound messages are stored once per Meta message id and refresh the service window.
//!
//! Everything here is idempotent (see [`herald_engine::inbox`]), so a job that fails half way is
//! simply run again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use herald_engine::contacts::{self, InboundContact, InboundIdentity};
use herald_engine::delivery::{Channel, Platform, SendStatus, StatusEvent};
use herald_engine::inbox::{InboundHandOff, InboundMessage, Triage, WebhookArgs, WEBHOOK_KIND};
use herald_engine::{Clock, JobContext, JobError, Store, StoreError, Worker};
use serde_json::Value;
use tracing::warn;
use uuid::Uuid;

/// What one delivery carried.
#[derive(Debug, Default, PartialEq)]
pub struct Events {
    pub statuses: Vec<StatusEvent>,
    pub inbound: Vec<InboundMessage>,
    /// Meta ids (numbers, pages) that events named but the resolver did not know; their events
    /// are left out.
    pub foreign: Vec<String>,
}

/// Maps the Meta id an event belongs to (WhatsApp's `metadata.phone_number_id`, Messenger's
/// and Instagram's `entry.id`) to its channel and workspace.
pub type Resolve<'a> = dyn Fn(&str) -> Option<(Uuid, Uuid)> + 'a;

/// Parses a delivery of any of the three platforms. `channel` is the one whose URL Meta called:
/// events without a Meta id go to it. An event without a usable time gets `received_at`, when
/// the delivery arrived (the same however often the job runs). Unknown fields and event types
/// are ignored (Meta adds them); a body that is not Meta's shape is an error.
pub fn parse(
    channel: &Channel,
    body: &[u8],
    received_at: DateTime<Utc>,
    resolve: &Resolve<'_>,
) -> Result<Events, String> {
    let v = herald_engine::inbox::webhook_json(body)?;
    let (object, entries) = herald_engine::inbox::webhook_envelope(&v)?;
    let mut out = Events::default();
    match object {
        "whatsapp_business_account" => {
            for entry in entries {
                for change in entry
                    .get("changes")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let Some(value) = change.get("value") else {
                        continue;
                    };
                    let Some(sender) = meta_id(
                        value.pointer("/metadata/phone_number_id"),
                        channel,
                        &mut out,
                    ) else {
                        continue;
                    };
                    let Some((channel_id, workspace_id)) = resolve(sender) else {
                        out.foreign.push(sender.to_owned());
                        continue;
                    };
                    for s in array(value, "statuses") {
                        if let Some(e) = wa_status(channel_id, s, received_at) {
                            out.statuses.push(e);
                        }
                    }
                    for m in array(value, "messages") {
                        if let Some(mut m) = wa_message(channel_id, workspace_id, m, received_at) {
                            m.profile_name = array(value, "contacts")
                                .find(|c| c.get("wa_id").and_then(Value::as_str) == Some(&m.sender))
                                .and_then(|c| c.pointer("/profile/name"))
                                .and_then(Value::as_str)
                                .map(str::to_owned);
                            out.inbound.push(m);
                        }
                    }
                }
            }
        }
        "page" | "instagram" => {
            for entry in entries {
                let Some(sender) = meta_id(entry.get("id"), channel, &mut out) else {
                    continue;
                };
                let Some((channel_id, workspace_id)) = resolve(sender) else {
                    out.foreign.push(sender.to_owned());
                    continue;
                };
                for m in array(entry, "messaging") {
                    messenger_item(channel_id, workspace_id, m, received_at, &mut out);
                }
            }
        }
        other => return Err(format!("unknown webhook object {other:?}")),
    }
    Ok(out)
}

/// What [`whatsapp_statuses`] made of a delivery.
#[derive(Debug, PartialEq)]
pub enum Quick {
    /// Only statuses of Herald's sends (each with our send id), exactly as [`parse`] gives them.
    Statuses(Vec<StatusEvent>),
    /// For the job: something else may be in it (a `messages` field, a number no channel
    /// has, a status without our send id, no status at all). Always safe: the job applies
    /// whatever a delivery holds.
    Other,
    /// Not in the shape the quick reading takes: only [`parse`] can say.
    Unsure,
}

/// A WhatsApp delivery read straight into the fields a status needs, without a
/// `serde_json::Value` tree: the common delivery, statuses of Herald's own sends, costs a
/// fraction of [`parse`]. It says [`Quick::Statuses`] only when [`parse`] would give exactly
/// those statuses and nothing else (a property test checks this); anything it is not sure of
/// (a field of another type, a duplicate key, an escaped NUL, an error object whose absent and
/// null fields `parse` tells apart) is [`Quick::Unsure`], and the caller parses in full.
pub fn whatsapp_statuses(
    channel: &Channel,
    body: &[u8],
    received_at: DateTime<Utc>,
    resolve: &Resolve<'_>,
) -> Quick {
    use std::borrow::Cow;

    use serde::de::IgnoredAny;
    use serde::Deserialize;

    // Every level is read only from a JSON object: serde_json also fills a struct from an
    // array, where `parse` finds no fields. Strings are borrowed (`&str`): one with an escape
    // does not deserialize, and the delivery is Unsure.
    #[derive(Deserialize)]
    struct Delivery<'a> {
        #[serde(borrow)]
        object: Cow<'a, str>,
        #[serde(borrow)]
        entry: Vec<MapOnly<Entry<'a>>>,
    }
    #[derive(Deserialize)]
    struct Entry<'a> {
        #[serde(default, borrow)]
        changes: Option<Vec<MapOnly<Change<'a>>>>,
    }
    #[derive(Deserialize)]
    struct Change<'a> {
        #[serde(default, borrow)]
        value: Option<MapOnly<ChangeValue<'a>>>,
    }
    #[derive(Deserialize)]
    struct ChangeValue<'a> {
        #[serde(default, borrow)]
        metadata: Option<MapOnly<Metadata<'a>>>,
        #[serde(default, borrow)]
        statuses: Option<Vec<MapOnly<Status<'a>>>>,
        #[serde(default)]
        messages: Option<IgnoredAny>,
    }
    #[derive(Deserialize)]
    struct Metadata<'a> {
        #[serde(default, borrow)]
        phone_number_id: Option<&'a str>,
    }
    #[derive(Deserialize)]
    struct Status<'a> {
        #[serde(default, borrow)]
        id: Option<&'a str>,
        #[serde(default, borrow)]
        status: Option<&'a str>,
        #[serde(default, borrow)]
        timestamp: Option<&'a str>,
        #[serde(default, borrow)]
        biz_opaque_callback_data: Option<&'a str>,
        #[serde(default)]
        errors: Option<IgnoredAny>,
    }

    if !herald_engine::inbox::json_strict_enough(body) {
        return Quick::Unsure;
    }
    let Ok(MapOnly(delivery)) = serde_json::from_slice::<MapOnly<Delivery<'_>>>(body) else {
        return Quick::Unsure;
    };
    if delivery.object != "whatsapp_business_account" {
        return Quick::Unsure;
    }
    let mut out = Vec::new();
    for MapOnly(change) in delivery
        .entry
        .into_iter()
        .flat_map(|e| e.0.changes.unwrap_or_default())
    {
        let Some(MapOnly(value)) = change.value else {
            continue;
        };
        if value.messages.is_some() {
            return Quick::Other;
        }
        let sender = match value.metadata.as_ref().and_then(|m| m.0.phone_number_id) {
            Some(id) => id,
            None => channel.sender_id.as_str(),
        };
        let Some((channel_id, _)) = resolve(sender) else {
            return Quick::Other;
        };
        for MapOnly(s) in value.statuses.unwrap_or_default() {
            if s.errors.is_some() {
                return Quick::Unsure;
            }
            let status = match s.status {
                Some("sent") => SendStatus::Sent,
                Some("delivered") => SendStatus::Delivered,
                Some("read") => SendStatus::Read,
                Some("failed") => SendStatus::Failed,
                _ => continue,
            };
            let Some(id) = s.id else {
                continue;
            };
            let Some(send_id) = s
                .biz_opaque_callback_data
                .and_then(|c| c.parse::<Uuid>().ok())
            else {
                return Quick::Other;
            };
            out.push(StatusEvent {
                channel_id,
                provider_message_id: id.to_owned(),
                send_id: Some(send_id),
                status,
                error_code: None,
                error: None,
                at: s.timestamp.and_then(unix_seconds).unwrap_or(received_at),
            });
        }
    }
    if out.is_empty() {
        return Quick::Other;
    }
    Quick::Statuses(out)
}

/// `T`, read only from a JSON object (serde_json fills a derived struct from an array too).
struct MapOnly<T>(T);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for MapOnly<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Object<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Object<T> {
            type Value = MapOnly<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<MapOnly<T>, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(MapOnly)
            }
        }
        d.deserialize_map(Object(std::marker::PhantomData))
    }
}

/// How [`Events::foreign`] reports an id that is not a string (followed by its JSON).
pub const NOT_A_STRING: &str = "not a string: ";

/// The Meta id an event names: absent (or null) means the channel whose URL Meta called. Meta
/// sends ids as strings; any other value names no channel we know, so its events are foreign
/// rather than given to the called channel (found by fuzzing).
fn meta_id<'a>(id: Option<&'a Value>, channel: &'a Channel, out: &mut Events) -> Option<&'a str> {
    match id {
        None | Some(Value::Null) => Some(&channel.sender_id),
        Some(Value::String(s)) => Some(s),
        Some(other) => {
            out.foreign.push(format!("{NOT_A_STRING}{other}"));
            None
        }
    }
}

fn array<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    v.get(key).and_then(Value::as_array).into_iter().flatten()
}

/// The latest time a delivery may carry: the end of year 9999. Earlier than 1970 or later than
/// this is not a time Meta sends, and PostgreSQL refuses years before 4713 BC, which chrono
/// accepts: such a time counts as absent.
const LATEST_SECONDS: i64 = 253_402_300_799;

fn unix_seconds(s: &str) -> Option<DateTime<Utc>> {
    let secs: i64 = s.parse().ok()?;
    if !(0..=LATEST_SECONDS).contains(&secs) {
        return None;
    }
    Utc.timestamp_opt(secs, 0).single()
}

fn unix_millis(v: &Value) -> Option<DateTime<Utc>> {
    let millis = v.as_i64()?;
    if !(0..=LATEST_SECONDS.saturating_mul(1000)).contains(&millis) {
        return None;
    }
    Utc.timestamp_millis_opt(millis).single()
}

fn wa_status(channel_id: Uuid, s: &Value, received_at: DateTime<Utc>) -> Option<StatusEvent> {
    let status = match s.get("status").and_then(Value::as_str)? {
        "sent" => SendStatus::Sent,
        "delivered" => SendStatus::Delivered,
        "read" => SendStatus::Read,
        "failed" => SendStatus::Failed,
        _ => return None,
    };
    let error = s.pointer("/errors/0");
    Some(StatusEvent {
        channel_id,
        provider_message_id: s.get("id").and_then(Value::as_str)?.to_owned(),
        send_id: s
            .get("biz_opaque_callback_data")
            .and_then(Value::as_str)
            .and_then(|c| c.parse().ok()),
        status,
        error_code: error.and_then(|e| e.get("code")).and_then(Value::as_i64),
        error: error
            .and_then(|e| e.get("title").or_else(|| e.get("message")))
            .and_then(Value::as_str)
            .map(str::to_owned),
        at: s
            .get("timestamp")
            .and_then(Value::as_str)
            .and_then(unix_seconds)
            .unwrap_or(received_at),
    })
}

/// A WhatsApp message; None without a sender or id. One whose time is missing or out of range
/// is kept with the time its delivery arrived, as statuses and Messenger's events are: the
/// message matters more than its time (its raw payload keeps what Meta sent).
fn wa_message(
    channel_id: Uuid,
    workspace_id: Uuid,
    m: &Value,
    received_at: DateTime<Utc>,
) -> Option<InboundMessage> {
    let kind = m.get("type").and_then(Value::as_str).unwrap_or("unknown");
    let text = match kind {
        "text" => m.pointer("/text/body"),
        "button" => m.pointer("/button/text"),
        "interactive" => m
            .pointer("/interactive/button_reply/title")
            .or_else(|| m.pointer("/interactive/list_reply/title")),
        "image" | "video" | "document" => m.get(kind).and_then(|x| x.get("caption")),
        _ => None,
    }
    .and_then(Value::as_str)
    .map(str::to_owned);
    Some(InboundMessage {
        channel_id,
        workspace_id,
        provider_message_id: m.get("id").and_then(Value::as_str)?.to_owned(),
        sender: m.get("from").and_then(Value::as_str)?.to_owned(),
        kind: kind.to_owned(),
        text,
        payload: m.clone(),
        sent_at: m
            .get("timestamp")
            .and_then(Value::as_str)
            .and_then(unix_seconds)
            .unwrap_or(received_at),
        profile_name: None,
    })
}

fn messenger_item(
    channel_id: Uuid,
    workspace_id: Uuid,
    m: &Value,
    received_at: DateTime<Utc>,
    out: &mut Events,
) {
    let at = m
        .get("timestamp")
        .and_then(unix_millis)
        .unwrap_or(received_at);
    if let Some(msg) = m.get("message") {
        let mid = msg.get("mid").and_then(Value::as_str);
        if msg.get("is_echo").and_then(Value::as_bool) == Some(true) {
            // Our own message, echoed with the metadata we sent: Meta has it.
            if let Some(mid) = mid {
                out.statuses.push(StatusEvent {
                    channel_id,
                    provider_message_id: mid.to_owned(),
                    send_id: msg
                        .get("metadata")
                        .and_then(Value::as_str)
                        .and_then(|c| c.parse().ok()),
                    status: SendStatus::Sent,
                    error_code: None,
                    error: None,
                    at,
                });
            }
        } else if let (Some(from), Some(mid)) =
            (m.pointer("/sender/id").and_then(Value::as_str), mid)
        {
            let (kind, text) = if let Some(t) = msg.get("text").and_then(Value::as_str) {
                (
                    if msg.get("quick_reply").is_some() {
                        "quick_reply"
                    } else {
                        "text"
                    },
                    Some(t.to_owned()),
                )
            } else if msg.get("attachments").is_some() {
                ("attachment", None)
            } else {
                ("unknown", None)
            };
            out.inbound.push(InboundMessage {
                channel_id,
                workspace_id,
                provider_message_id: mid.to_owned(),
                sender: from.to_owned(),
                kind: kind.to_owned(),
                text,
                payload: msg.clone(),
                sent_at: at,
                profile_name: None,
            });
        }
    }
    if let Some(mids) = m.pointer("/delivery/mids").and_then(Value::as_array) {
        for mid in mids.iter().filter_map(Value::as_str) {
            out.statuses.push(StatusEvent {
                channel_id,
                provider_message_id: mid.to_owned(),
                send_id: None,
                status: SendStatus::Delivered,
                error_code: None,
                error: None,
                at,
            });
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What one job did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Processed {
    pub deliveries: usize,
    pub statuses: usize,
    /// Inbound messages stored for the first time (redeliveries are not counted).
    pub new_messages: usize,
    pub duplicates: usize,
    /// Inbound messages that were a STOP keyword.
    pub opted_out: usize,
}

/// The channels webhook events are routed to, kept between jobs: reading (and decrypting)
/// every channel for every job cost more than the job's own work. A delivery for a channel
/// that is not in the list reloads it at once; otherwise an edit (a new sender id or app
/// secret) is seen within `ttl`. A disconnected channel's deliveries are refused by the HTTP
/// layer (no secret to check them with), so the list going stale cannot route events to it
/// for longer than `ttl`.
pub struct ChannelDirectory {
    ttl: Duration,
    cached: Mutex<Option<(Instant, Arc<Vec<Channel>>)>>,
    /// One reload at a time: every webhook request asks (through the triage), so when the
    /// list goes stale the requests in flight wait for one reload instead of each reading and
    /// decrypting every channel.
    reload: tokio::sync::Mutex<()>,
}

impl ChannelDirectory {
    /// How long a loaded list is used by default.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(5);

    pub fn new(ttl: Duration) -> Self {
        ChannelDirectory {
            ttl,
            cached: Mutex::new(None),
            reload: tokio::sync::Mutex::new(()),
        }
    }

    fn cached(&self) -> Option<(Instant, Arc<Vec<Channel>>)> {
        self.cached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The channels, with every id in `needed` among them if it exists.
    async fn channels(
        &self,
        store: &dyn Store,
        needed: impl Iterator<Item = Uuid>,
    ) -> Result<Arc<Vec<Channel>>, StoreError> {
        let needed: Vec<Uuid> = needed.collect();
        let has_all = |list: &[Channel]| needed.iter().all(|id| list.iter().any(|c| c.id == *id));
        if let Some((at, list)) = self.cached() {
            if at.elapsed() < self.ttl && has_all(&list) {
                return Ok(list);
            }
        }
        let asked = Instant::now();
        let _one = self.reload.lock().await;
        // A list loaded after this call began is as new as a load of its own would be, even
        // without an id it needs (that channel does not exist).
        if let Some((at, list)) = self.cached() {
            if at >= asked || (at.elapsed() < self.ttl && has_all(&list)) {
                return Ok(list);
            }
        }
        let list = Arc::new(store.delivery().channels().await?);
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), list.clone()));
        Ok(list)
    }
}

/// The channel (and its workspace) an event naming `sender` belongs to, for a delivery to
/// `called`'s URL. Several channels of one Meta app share a callback URL, so each event goes
/// to the channel it names, among those signed by the same app secret (the delivery was signed
/// with `called`'s).
fn sibling(channels: &[Channel], called: &Channel, sender: &str) -> Option<(Uuid, Uuid)> {
    if sender == called.sender_id {
        return Some((called.id, called.workspace_id));
    }
    channels
        .iter()
        .find(|c| {
            c.sender_id == sender
                && c.platform == called.platform
                && constant_time_eq(c.app_secret.as_bytes(), called.app_secret.as_bytes())
        })
        .map(|c| (c.id, c.workspace_id))
}

/// The [`Triage`] of Meta's deliveries, for the HTTP layer's ingest: a delivery that parses,
/// names only channels Herald knows and carries only statuses of Herald's own sends (each with
/// the send id Meta echoes) has its statuses applied as it is stored. Everything else goes to
/// the `meta.webhook` job, which also logs what it could not use.
pub struct WebhookTriage {
    store: Arc<dyn Store>,
    /// The time of statuses without a usable one: the ingest's clock, which also stamps the
    /// stored delivery.
    clock: Arc<dyn Clock>,
    channels: ChannelDirectory,
}

impl WebhookTriage {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        WebhookTriage {
            store,
            clock,
            channels: ChannelDirectory::new(ChannelDirectory::DEFAULT_TTL),
        }
    }
}

#[async_trait]
impl Triage for WebhookTriage {
    async fn statuses_only(&self, channel_id: Uuid, body: &[u8]) -> Option<Vec<StatusEvent>> {
        let channels = self
            .channels
            .channels(self.store.as_ref(), std::iter::once(channel_id))
            .await
            .ok()?;
        let channel = channels.iter().find(|c| c.id == channel_id)?;
        // Most other deliveries are inbound messages: a byte search rules them out without
        // parsing them twice (here and in the job). WhatsApp's statuses come in a `statuses`
        // array; Messenger's and Instagram's settle our sends through echoes.
        let marker: &[u8] = match channel.platform {
            Platform::Whatsapp => b"\"statuses\"",
            Platform::Messenger | Platform::Instagram => b"\"is_echo\"",
        };
        memchr::memmem::find(body, marker)?;
        let resolve = |sender: &str| sibling(&channels, channel, sender);
        // The delivery is being received: it is stored in a moment with about this time.
        let received_at = self.clock.now();
        if channel.platform == Platform::Whatsapp {
            match whatsapp_statuses(channel, body, received_at, &resolve) {
                Quick::Statuses(statuses) => return Some(statuses),
                Quick::Other => return None,
                Quick::Unsure => {}
            }
        }
        let events = parse(channel, body, received_at, &resolve).ok()?;
        let ours = |s: &StatusEvent| s.send_id.is_some();
        (events.inbound.is_empty()
            && events.foreign.is_empty()
            && !events.statuses.is_empty()
            && events.statuses.iter().all(ours))
        .then_some(events.statuses)
    }
}

/// Applies stored deliveries `ids` (those not processed yet); new inbound messages are handed
/// on as `hand_off` says (see [`InboundHandOff`]). The channels are read afresh.
pub async fn process(
    store: &dyn Store,
    now: DateTime<Utc>,
    ids: &[i64],
    hand_off: Option<&InboundHandOff>,
) -> Result<Processed, StoreError> {
    process_with(
        store,
        &ChannelDirectory::new(Duration::ZERO),
        now,
        ids,
        hand_off,
    )
    .await
}

/// [`process`] with the channels from `directory`.
pub async fn process_with(
    store: &dyn Store,
    directory: &ChannelDirectory,
    now: DateTime<Utc>,
    ids: &[i64],
    hand_off: Option<&InboundHandOff>,
) -> Result<Processed, StoreError> {
    let inbox = store.inbox();
    let deliveries = inbox.webhook_events(ids).await?;
    if deliveries.is_empty() {
        return Ok(Processed::default());
    }
    let channels = directory
        .channels(store, deliveries.iter().map(|d| d.channel_id))
        .await?;
    let by_id: HashMap<Uuid, &Channel> = channels.iter().map(|c| (c.id, c)).collect();
    let mut statuses = Vec::new();
    let mut inbound = Vec::new();
    for d in &deliveries {
        let Some(channel) = by_id.get(&d.channel_id) else {
            warn!(delivery = d.id, channel = %d.channel_id, "webhook: the channel is gone; its delivery is dropped");
            continue;
        };
        match parse(channel, &d.body, d.received_at, &|sender| {
            sibling(&channels, channel, sender)
        }) {
            Ok(events) => {
                if !events.foreign.is_empty() {
                    warn!(delivery = d.id, senders = ?events.foreign, "webhook: events for numbers or pages Herald does not know were ignored");
                }
                statuses.extend(events.statuses);
                inbound.extend(events.inbound);
            }
            // The HTTP layer checked the envelope; a body that passes it but not this is kept
            // (for inspection) and marked processed, never retried forever.
            Err(why) => warn!(delivery = d.id, error = %why, "webhook: delivery cannot be parsed"),
        }
    }
    if !statuses.is_empty() {
        store.delivery().apply_statuses(&statuses).await?;
    }
    // Contacts before the deliveries are marked processed: a crash in between repeats this,
    // which changes nothing. WhatsApp senders are phone numbers (wa_id), found or created by
    // phone; Messenger's and Instagram's are page-scoped ids (PSID, IGSID), found or created by
    // their handle on the channel that received the message (its platform says which).
    let mut senders = Vec::new();
    for m in &inbound {
        let Some(channel) = by_id.get(&m.channel_id) else {
            continue;
        };
        let identity = match channel.platform {
            Platform::Whatsapp => match contacts::e164(&format!("+{}", m.sender)) {
                Ok(phone) => InboundIdentity::Phone(phone),
                Err(_) => {
                    warn!(sender = %m.sender, "webhook: a WhatsApp sender that is not a phone number");
                    continue;
                }
            },
            platform @ (Platform::Messenger | Platform::Instagram) => {
                match contacts::external_id(&m.sender) {
                    Ok(external_id) => InboundIdentity::Handle {
                        channel_id: m.channel_id,
                        platform,
                        external_id,
                    },
                    Err(why) => {
                        warn!(sender = %m.sender, %platform, error = %why, "webhook: a sender id that cannot be a contact's handle");
                        continue;
                    }
                }
            }
        };
        senders.push(InboundContact {
            workspace_id: m.workspace_id,
            identity,
            name: m.profile_name.clone(),
            opt_out: m.kind == "text"
                && m.text.as_deref().is_some_and(contacts::is_opt_out_keyword),
        });
    }
    let opted_out = senders.iter().filter(|c| c.opt_out).count();
    store
        .contacts()
        .upsert_inbound_contacts(&senders, now)
        .await?;
    let ids: Vec<i64> = deliveries.iter().map(|d| d.id).collect();
    let fresh = inbox.finish_webhooks(&ids, &inbound, hand_off, now).await?;
    Ok(Processed {
        deliveries: deliveries.len(),
        statuses: statuses.len(),
        new_messages: fresh.len(),
        duplicates: inbound.len() - fresh.len(),
        opted_out,
    })
}

/// Performs [`WEBHOOK_KIND`] jobs.
pub struct WebhookWorker {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    /// Where new inbound messages go; None while nothing in the process handles them.
    hand_off: Option<InboundHandOff>,
    channels: ChannelDirectory,
}

impl WebhookWorker {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        WebhookWorker {
            store,
            clock,
            hand_off: None,
            channels: ChannelDirectory::new(ChannelDirectory::DEFAULT_TTL),
        }
    }

    /// Hands every new inbound message on as an [`herald_engine::inbox::INBOUND_KIND`] job.
    pub fn hand_off(mut self, hand_off: InboundHandOff) -> Self {
        self.hand_off = Some(hand_off);
        self
    }
}

#[async_trait]
impl Worker for WebhookWorker {
    type Args = WebhookArgs;
    const KIND: &'static str = WEBHOOK_KIND;

    async fn work(&self, args: WebhookArgs, _ctx: &JobContext) -> Result<(), JobError> {
        let done = process_with(
            self.store.as_ref(),
            &self.channels,
            self.clock.now(),
            &args.events,
            self.hand_off.as_ref(),
        )
        .await
        .map_err(|e| JobError::retry(format!("webhook processing: {e}")))?;
        tracing::debug!(
            deliveries = done.deliveries,
            statuses = done.statuses,
            new_messages = done.new_messages,
            duplicates = done.duplicates,
            "webhooks processed"
        );
        Ok(())
    }
}
