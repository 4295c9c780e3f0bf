//! The delivery model: channels (a WhatsApp number, a page, an Instagram account) with their
//! limits, and sends (one message to one recipient) with their status.
//!
//! A send is a row in `herald_sends` plus a job of kind [`SEND_KIND`] whose rate key is the
//! channel ([`channel_rate_key`]); both are written in one transaction by
//! [`DeliveryStore::create_sends`], so there is never a send without its job or a job without
//! its send.
//!
//! Architecture invariant: a send's status only moves forward ([`SendStatus::rank`]). Meta's
//! status webhooks arrive out of order and more than once; applying one never undoes a later
//! one.

pub(crate) mod secrets;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::Result;
use crate::model::NewJob;

mod admission;
pub use admission::{
    arrival_rate_key, pair_rate_key, AdmissionConfig, ChannelAdmission, RequestGate,
};

/// The job kind that performs a send.
pub const SEND_KIND: &str = "meta.send";
/// The queue sends run on.
pub const SEND_QUEUE: &str = "send";
/// Priority of interactive sends (replies): ahead of broadcasts on the same channel.
pub const INTERACTIVE_PRIORITY: i16 = 0;
/// Priority of broadcast sends.
pub const BROADCAST_PRIORITY: i16 = 10;

/// The rate key of a channel's sends: the channel's throughput limit applies to it.
pub fn channel_rate_key(channel_id: Uuid) -> String {
    format!("ch:{channel_id}")
}

/// The channel a rate key names, if it names one.
pub fn channel_of_rate_key(key: &str) -> Option<Uuid> {
    key.strip_prefix("ch:").and_then(|id| id.parse().ok())
}

/// Meta's messaging products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    Whatsapp,
    Messenger,
    Instagram,
}

impl Platform {
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Whatsapp => "whatsapp",
            Platform::Messenger => "messenger",
            Platform::Instagram => "instagram",
        }
    }
}

impl FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "whatsapp" => Ok(Platform::Whatsapp),
            "messenger" => Ok(Platform::Messenger),
            "instagram" => Ok(Platform::Instagram),
            other => Err(format!("unknown platform {other:?}")),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Meta's Graph API, used unless a channel names another base (the sandbox).
pub const META_GRAPH_URL: &str = "https://graph.facebook.com";
/// The Graph API version sends use unless a channel says otherwise.
pub const META_API_VERSION: &str = "v21.0";

/// A channel's limits. Defaults are Meta's published values (see `shared/domain/meta-platform.md`);
/// every one is a per-channel setting because Meta raises and lowers them per number.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelLimits {
    /// Messages a second Meta accepts from this sender: WhatsApp 80 (1,000 once upgraded, 20
    /// for numbers shared with the Business app), Messenger and Instagram 300.
    pub mps: f64,
    /// Share of `mps` Herald uses. WhatsApp counts inbound messages against the same limit, and
    /// network jitter bunches requests, so 1% is left free by default.
    pub headroom: f64,
    /// The most sends let out at once, as milliseconds of `mps`. Small: Meta's tolerance for
    /// bursts is not documented.
    pub burst_ms: u32,
    /// How far ahead of its pace Meta is taken to let a sender run before it refuses with
    /// 130429, as milliseconds of `mps` (Meta does not document it; never less than
    /// `burst_ms`). Every send is checked against it at the moment of its request, by every
    /// process together: a send whose permit was taken long before (its process was held up
    /// while the others went on) and would now go out on top of later ones waits instead.
    /// Lower it if Meta refuses bursts that Herald lets out.
    pub meta_burst_ms: u32,
    /// Meta tolerates about one message per 6 s to one user (131056 beyond).
    pub pair_interval_ms: u64,
    /// Short bursts to one user are tolerated but borrow from later quota.
    pub pair_burst: u32,
    /// Unique users reached outside a service window per moving 24 h (the portfolio's
    /// messaging tier: 250, 2,000, 10,000, 100,000). None: unlimited.
    pub tier: Option<u32>,
}

impl ChannelLimits {
    /// Meta's defaults for a platform.
    pub fn for_platform(platform: Platform) -> Self {
        let mps = match platform {
            Platform::Whatsapp => 80.0,
            Platform::Messenger | Platform::Instagram => 300.0,
        };
        ChannelLimits {
            mps,
            ..ChannelLimits::default()
        }
    }

    /// The rate Herald's limiter enforces for the channel. The burst is `burst_ms` of the rate,
    /// and never less than two permits: the rate-limited producer asks every channel on one
    /// grid of `rate_tick`s, so it may ask for a permit up to a tick after it came due, and with
    /// a burst of one that lateness is lost for good (a 20/s channel reached 0.84 of its rate
    /// on a 20 ms grid). As with every burst, the worst second then holds one message more than
    /// the rate (21 at 20/s; 82 at 80/s with the default burst of three): Meta tolerates short
    /// bursts, and the sandbox, whose 200 ms token bucket stands in for that tolerance, refused
    /// none in any bench run.
    pub fn rate(&self) -> crate::limit::Rate {
        windowed(self.mps * (1.0 - self.headroom), self.burst_ms)
    }

    /// The pace requests may reach Meta at, checked at the moment of each request: `mps`
    /// itself (no headroom: this is Meta's limit, not Herald's target) with a burst of
    /// `meta_burst_ms` (at least `burst_ms`) of it. Permits are taken at `rate()` when sends
    /// are claimed, a little before their requests; this check bounds what the delays between
    /// the two can bunch, whichever processes the sends are in.
    pub fn arrival_rate(&self) -> crate::limit::Rate {
        windowed(self.mps, self.meta_burst_ms.max(self.burst_ms))
    }

    /// The per-recipient rate.
    pub fn pair_rate(&self) -> crate::limit::Rate {
        crate::limit::Rate {
            per_second: 1000.0 / self.pair_interval_ms.max(1) as f64,
            burst: self.pair_burst.max(1),
        }
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.mps.is_finite() && self.mps > 0.0 && self.mps <= 100_000.0) {
            return Err("limits.mps must be above 0 and at most 100000".into());
        }
        if !(0.0..0.9).contains(&self.headroom) {
            return Err("limits.headroom must be at least 0 and below 0.9".into());
        }
        if self.burst_ms == 0 || self.burst_ms > 10_000 {
            return Err("limits.burst_ms must be 1 to 10000".into());
        }
        if self.meta_burst_ms == 0 || self.meta_burst_ms > 10_000 {
            return Err("limits.meta_burst_ms must be 1 to 10000".into());
        }
        if self.pair_interval_ms == 0 || self.pair_burst == 0 {
            return Err("limits.pair_interval_ms and limits.pair_burst must be at least 1".into());
        }
        if self.tier == Some(0) {
            return Err("limits.tier must be at least 1 (or absent for unlimited)".into());
        }
        Ok(())
    }
}

/// `per_second` with a burst of `window_ms` of it, never fewer than two permits (see
/// [`ChannelLimits::rate`]).
fn windowed(per_second: f64, window_ms: u32) -> crate::limit::Rate {
    let burst = (per_second * f64::from(window_ms) / 1000.0).floor();
    crate::limit::Rate {
        per_second,
        // `as` saturates.
        burst: (burst as u32).max(2),
    }
}

impl Default for ChannelLimits {
    fn default() -> Self {
        ChannelLimits {
            mps: 80.0,
            headroom: 0.01,
            burst_ms: 50,
            meta_burst_ms: 150,
            pair_interval_ms: 6_000,
            pair_burst: 10,
            tier: None,
        }
    }
}

/// A connected sender.
#[derive(Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Channel {
    pub id: Uuid,
    pub workspace_id: Uuid,
    pub platform: Platform,
    pub name: String,
    /// phone_number_id (WhatsApp), page id (Messenger) or Instagram account id.
    pub sender_id: String,
    /// The business portfolio whose messaging tier the channel shares (WhatsApp).
    pub portfolio_id: Option<String>,
    /// Secret: never logged (see the `Debug` impl) nor returned by the API.
    #[serde(skip_serializing)]
    pub access_token: String,
    /// Secret: signs Meta's webhooks.
    #[serde(skip_serializing)]
    pub app_secret: String,
    #[serde(skip_serializing)]
    pub verify_token: String,
    pub graph_base_url: String,
    pub api_version: String,
    pub limits: ChannelLimits,
    /// Why Meta's answers stopped the channel (190, 368, 131048), until an operator resumes it.
    pub paused_reason: Option<String>,
    /// The pause holds broadcasts only (131048, spam quality): interactive replies still go.
    pub paused_broadcasts_only: bool,
    pub paused_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Channel {
    /// Whether a send in `lane` must wait for an operator to resume the channel.
    pub fn paused_for(&self, lane: Lane) -> bool {
        self.paused_reason.is_some() && (!self.paused_broadcasts_only || lane == Lane::Broadcast)
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("id", &self.id)
            .field("workspace_id", &self.workspace_id)
            .field("platform", &self.platform)
            .field("sender_id", &self.sender_id)
            .field("graph_base_url", &self.graph_base_url)
            .field("limits", &self.limits)
            .field("paused_reason", &self.paused_reason)
            .finish_non_exhaustive()
    }
}

/// What a caller gives to connect a channel.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct NewChannel {
    pub workspace_id: Uuid,
    pub platform: Platform,
    pub name: String,
    pub sender_id: String,
    pub portfolio_id: Option<String>,
    pub access_token: String,
    pub app_secret: String,
    pub verify_token: String,
    /// None: Meta's.
    pub graph_base_url: Option<String>,
    pub api_version: Option<String>,
    /// None: the platform's defaults.
    pub limits: Option<ChannelLimits>,
}

impl fmt::Debug for NewChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewChannel")
            .field("workspace_id", &self.workspace_id)
            .field("platform", &self.platform)
            .field("sender_id", &self.sender_id)
            .finish_non_exhaustive()
    }
}

impl NewChannel {
    pub fn validate(&self) -> std::result::Result<(), String> {
        let texts = [
            ("name", &self.name, 200),
            ("sender_id", &self.sender_id, 100),
            ("access_token", &self.access_token, 4096),
            ("app_secret", &self.app_secret, 512),
        ];
        for (name, value, max) in texts {
            if value.is_empty() || value.len() > max || value.chars().any(char::is_control) {
                return Err(format!(
                    "{name} must be 1 to {max} bytes without control characters"
                ));
            }
        }
        // PostgreSQL cannot store NUL in text: refused here so that both backends agree.
        let others = [
            Some(&self.verify_token),
            self.portfolio_id.as_ref(),
            self.graph_base_url.as_ref(),
            self.api_version.as_ref(),
        ];
        if others.into_iter().flatten().any(|t| t.contains('\0')) {
            return Err(
                "verify_token, portfolio_id, graph_base_url and api_version must not contain NUL"
                    .into(),
            );
        }
        if let Some(url) = &self.graph_base_url {
            let host = url
                .strip_prefix("https://")
                .or_else(|| url.strip_prefix("http://"))
                .map(|rest| rest.split(['/', '?', '#']).next().unwrap_or(""));
            let host_ok = host.is_some_and(|h| {
                !h.is_empty()
                    && h.chars()
                        .all(|c| c.is_ascii_alphanumeric() || ".-:[]_".contains(c))
            });
            if !host_ok || url.len() > 512 || url.chars().any(char::is_control) {
                return Err("graph_base_url must be an http(s) URL with a host".into());
            }
        }
        if let Some(limits) = &self.limits {
            limits.validate()?;
        }
        Ok(())
    }
}

/// Which lane a send travels in: interactive replies go ahead of broadcasts on the same limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lane {
    Interactive,
    Broadcast,
}

impl Lane {
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Interactive => "interactive",
            Lane::Broadcast => "broadcast",
        }
    }

    pub fn priority(self) -> i16 {
        match self {
            Lane::Interactive => INTERACTIVE_PRIORITY,
            Lane::Broadcast => BROADCAST_PRIORITY,
        }
    }
}

/// Where a send is. Herald's own states come first; Meta's (from the response and the status
/// webhooks) after, in the order Meta reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SendStatus {
    /// Recorded; its job has not called Meta yet.
    Queued,
    /// A request to Meta is under way (recorded before the call).
    Sending,
    /// The request's answer was lost (timeout, crash): Meta may or may not have the message.
    /// Reconciled by a status webhook, or resent after the grace period.
    Unknown,
    /// Meta answered with a message id.
    Accepted,
    Sent,
    Delivered,
    Read,
    /// Meta refused it (synchronously or by a `failed` status), or Herald gave up.
    Failed,
}

impl SendStatus {
    pub const ALL: [SendStatus; 8] = [
        SendStatus::Queued,
        SendStatus::Sending,
        SendStatus::Unknown,
        SendStatus::Accepted,
        SendStatus::Sent,
        SendStatus::Delivered,
        SendStatus::Read,
        SendStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SendStatus::Queued => "queued",
            SendStatus::Sending => "sending",
            SendStatus::Unknown => "unknown",
            SendStatus::Accepted => "accepted",
            SendStatus::Sent => "sent",
            SendStatus::Delivered => "delivered",
            SendStatus::Read => "read",
            SendStatus::Failed => "failed",
        }
    }

    /// The order statuses move in. `failed` ranks above `sent` (a message can fail after Meta
    /// sent it) but below `delivered`: a late `failed` never undoes a delivery or a read.
    pub fn rank(self) -> i16 {
        match self {
            SendStatus::Queued => 0,
            SendStatus::Sending => 1,
            SendStatus::Unknown => 2,
            SendStatus::Accepted => 3,
            SendStatus::Sent => 4,
            SendStatus::Failed => 5,
            SendStatus::Delivered => 6,
            SendStatus::Read => 7,
        }
    }

    /// Meta has the message (or refused it for good): nothing more to send.
    pub fn is_settled(self) -> bool {
        self.rank() >= SendStatus::Accepted.rank()
    }
}

impl FromStr for SendStatus {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        SendStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown send status {s:?}"))
    }
}

/// What a caller asks to send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewSend {
    pub workspace_id: Uuid,
    pub channel_id: Uuid,
    /// E.164 number or wa_id (WhatsApp), PSID (Messenger), IGSID (Instagram).
    pub recipient: String,
    pub message: Message,
    pub lane: Lane,
}

/// The content of a message, platform-neutral where it can be. The Meta client turns it into
/// each platform's body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    Text {
        body: String,
    },
    /// An approved WhatsApp template (the only kind allowed outside the service window).
    Template {
        name: String,
        language: String,
        /// Body parameters, in order.
        #[serde(default)]
        parameters: Vec<String>,
    },
    /// Media by link: image, document, audio or video.
    Media {
        media: MediaKind,
        link: String,
        #[serde(default)]
        caption: Option<String>,
    },
    /// Reply buttons (WhatsApp interactive, Messenger quick replies), at most 3.
    Buttons {
        body: String,
        buttons: Vec<Button>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MediaKind {
    Image,
    Document,
    Audio,
    Video,
}

impl MediaKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MediaKind::Image => "image",
            MediaKind::Document => "document",
            MediaKind::Audio => "audio",
            MediaKind::Video => "video",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Button {
    pub id: String,
    pub title: String,
}

impl Message {
    /// Checks what Meta would refuse anyway, before anything is stored.
    pub fn validate(&self) -> std::result::Result<(), String> {
        match self {
            Message::Text { body } if body.is_empty() || body.chars().count() > 4096 => {
                Err("text body must be 1 to 4096 characters".into())
            }
            Message::Template { name, language, .. }
                if name.is_empty()
                    || name.len() > 512
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                    || language.is_empty() =>
            {
                Err("template needs a name of [a-z0-9_] and a language code".into())
            }
            Message::Media { link, .. }
                if !(link.starts_with("https://") || link.starts_with("http://")) =>
            {
                Err("media link must be an http(s) URL".into())
            }
            Message::Buttons { body, buttons }
                if body.is_empty()
                    || buttons.is_empty()
                    || buttons.len() > 3
                    || buttons.iter().any(|b| {
                        b.id.is_empty() || b.title.is_empty() || b.title.chars().count() > 20
                    }) =>
            {
                Err("buttons need a body and 1 to 3 buttons with an id and a title of at most 20 characters".into())
            }
            _ => Ok(()),
        }
    }

    /// Whether the message may only go out inside a service window (everything but templates).
    pub fn needs_window(&self) -> bool {
        !matches!(self, Message::Template { .. })
    }
}

/// A send as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendRecord {
    pub id: Uuid,
    pub workspace_id: Uuid,
    pub channel_id: Uuid,
    pub recipient: String,
    pub message: Message,
    pub lane: Lane,
    pub status: SendStatus,
    /// Requests made to Meta for this send (more than one only after a lost answer's grace
    /// period, or a retry of a refused request).
    pub requests: i32,
    /// Meta's id (`wamid.…`, `mid.…`).
    pub provider_message_id: Option<String>,
    pub error_code: Option<i64>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    /// When the last request to Meta began.
    pub requested_at: Option<DateTime<Utc>>,
    pub accepted_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

/// The payload of a [`SEND_KIND`] job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendArgs {
    pub send_id: Uuid,
    pub channel_id: Uuid,
}

/// Sends begun by the claim of their jobs, waiting for their workers ([`DeliveryStore::take_begun`]).
///
/// A keyed claim of [`SEND_KIND`] jobs marks their queued sends as requested (`sending`, one
/// more request, `requested_at` = the claim's time) in the claim's own statement (PostgreSQL)
/// or right after it (SQLite), and parks the records here: the worker's first step then needs
/// no statement of its own, and its request follows its claim sooner.
///
/// An entry is for one claim (its job and the claim's time), until the claim's lease runs out.
/// A worker of another claim, or one that comes after the lease (its job may have been
/// rescued and run elsewhere), does not get it and takes the careful path instead. A send the
/// claim began whose entry is missing (its row did not decode, or SQLite's begin failed after
/// its commit) is still recognisable by the claim's own worker: `sending` with `requested_at`
/// equal to the claim's time ([`begun_by_claim`]). Only the send's own job (unique key
/// `send:<id>`) begins a send.
#[derive(Debug, Default)]
pub struct BegunSends {
    parked: std::sync::Mutex<Parked>,
}

#[derive(Debug, Default)]
struct Parked {
    by_send: std::collections::HashMap<Uuid, BegunEntry>,
    swept: Option<std::time::Instant>,
}

#[derive(Debug)]
struct BegunEntry {
    send: SendRecord,
    job: crate::model::JobId,
    /// The claim's time, to the microsecond (a job's attempt numbers repeat after a snooze).
    claimed_at: i64,
    until: std::time::Instant,
}

impl BegunSends {
    /// How often parking sweeps out the entries whose lease ran out untaken (their tasks were
    /// aborted, or their jobs' handlers never asked), so the map cannot grow without bound.
    const SWEEP_EVERY: Duration = Duration::from_secs(30);

    /// Parks the sends the claim at `claimed_at` began, each with its job, valid for `lease`
    /// from `started` (taken before the claim's statement, so that an entry never outlives
    /// the lease the database holds).
    pub fn park(
        &self,
        claimed_at: DateTime<Utc>,
        started: std::time::Instant,
        lease: Duration,
        sends: impl IntoIterator<Item = (SendRecord, crate::model::JobId)>,
    ) {
        let now = std::time::Instant::now();
        let until = started + lease;
        let claimed_at = claimed_at.timestamp_micros();
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        for (send, job) in sends {
            parked.by_send.insert(
                send.id,
                BegunEntry {
                    send,
                    job,
                    claimed_at,
                    until,
                },
            );
        }
        if parked
            .swept
            .is_none_or(|at| now.duration_since(at) >= Self::SWEEP_EVERY)
        {
            parked.by_send.retain(|_, e| e.until > now);
            parked.swept = Some(now);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_send
            .len()
    }

    /// The send `id` as the claim of job `job` at `claimed_at` began it, if that claim's
    /// lease still runs; once.
    pub fn take(
        &self,
        id: Uuid,
        job: crate::model::JobId,
        claimed_at: DateTime<Utc>,
    ) -> Option<SendRecord> {
        let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        let std::collections::hash_map::Entry::Occupied(entry) = parked.by_send.entry(id) else {
            return None;
        };
        if entry.get().job != job || entry.get().claimed_at != claimed_at.timestamp_micros() {
            // Another claim's: left for its worker (or the sweep).
            return None;
        }
        let entry = entry.remove();
        (entry.until > std::time::Instant::now()).then_some(entry.send)
    }
}

/// The sends of the [`SEND_KIND`] jobs among `jobs` that are their sends' own jobs, with
/// their jobs ([`send_of_job`]).
pub fn claimed_sends(jobs: &[crate::model::Job]) -> Vec<(Uuid, crate::model::JobId)> {
    jobs.iter()
        .filter_map(|j| Some((send_of_job(j)?, j.id)))
        .collect()
}

/// The send `job` performs, if it is that send's own job: a [`SEND_KIND`] job whose payload
/// names the send and whose unique key is `send:<id>` ([`send_job`]). A job enqueued by hand
/// that names a send is not its own job: only the send's own job may begin it.
pub fn send_of_job(job: &crate::model::Job) -> Option<Uuid> {
    if job.kind != SEND_KIND {
        return None;
    }
    let id: Uuid = job.payload.get("send_id")?.as_str()?.parse().ok()?;
    let mut text = Uuid::encode_buffer();
    let own = job.unique_key.as_deref()?.strip_prefix("send:")?
        == id.hyphenated().encode_lower(&mut text);
    own.then_some(id)
}

/// Whether `send` is `sending` because the claim at `claimed_at` began it (and so no request
/// has been made for it since, if that claim is the caller's own, its job is the send's own
/// job ([`send_of_job`]) and its lease still runs: every later request rewrites
/// `requested_at`). Times are compared to the microsecond, as the stores keep them.
pub fn begun_by_claim(send: &SendRecord, claimed_at: DateTime<Utc>) -> bool {
    send.status == SendStatus::Sending
        && send
            .requested_at
            .is_some_and(|at| at.timestamp_micros() == claimed_at.timestamp_micros())
}

/// A status Meta reported for a message (from a webhook).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusEvent {
    pub channel_id: Uuid,
    /// Meta's message id.
    pub provider_message_id: String,
    /// Our send id, echoed back (`biz_opaque_callback_data` / `metadata`).
    pub send_id: Option<Uuid>,
    pub status: SendStatus,
    pub error_code: Option<i64>,
    pub error: Option<String>,
    pub at: DateTime<Utc>,
}

/// A worker's update of a send (the webhook path uses [`DeliveryStore::apply_statuses`]).
#[derive(Debug, Clone, PartialEq)]
pub enum SendUpdate {
    /// About to call Meta: recorded first, so a crash mid-call leaves `sending` behind.
    Requesting,
    /// The answer was lost.
    Unknown {
        error: String,
    },
    Accepted {
        provider_message_id: String,
    },
    /// The request an attempt began never reached Meta (Herald held it back, there was no
    /// connection, or the write that began it failed as far as the attempt knows): back to
    /// `queued`, and the request it began is not counted. Only while the send is `sending`
    /// from that very begin (its `requested_at`, to the microsecond): a send that moved on
    /// since (its answer lost, a later attempt's request) is left as it is.
    Unsent {
        requested_at: DateTime<Utc>,
    },
    /// Meta refused the request (a limit, a temporary error, a paused account): back to
    /// `queued`, with Meta's code and reason kept for operators.
    Refused {
        code: Option<i64>,
        error: String,
    },
    Failed {
        code: Option<i64>,
        error: String,
    },
}

/// The pause reason of a disconnected channel (its secrets are gone).
pub const DISCONNECTED: &str = "disconnected: its access token and secrets were deleted";

/// How long an unknown send waits for a status webhook before it is sent again.
pub const DEFAULT_UNKNOWN_GRACE: Duration = Duration::from_secs(600);

/// The job that performs a send, for [`DeliveryStore::create_sends`].
pub fn send_job(send_id: Uuid, send: &NewSend) -> NewJob {
    NewJob::new(
        SEND_KIND,
        serde_json::json!({ "send_id": send_id, "channel_id": send.channel_id }),
    )
    .workspace(send.workspace_id)
    .queue(SEND_QUEUE)
    .priority(send.lane.priority())
    .rate_key(channel_rate_key(send.channel_id))
    .unique_key(format!("send:{send_id}"))
    .max_attempts(25)
}

/// Counts of a channel's sends by status (or all channels').
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SendCount {
    pub status: SendStatus,
    pub count: i64,
}

/// Where channels, sends, reach (tier) and service windows live. Implemented by both stores.
#[async_trait]
pub trait DeliveryStore: Send + Sync + 'static {
    async fn create_channel(&self, channel: &NewChannel, now: DateTime<Utc>) -> Result<Channel>;

    async fn channel(&self, id: Uuid) -> Result<Option<Channel>>;

    /// Every channel (the admission cache reloads them).
    async fn channels(&self) -> Result<Vec<Channel>>;

    /// A workspace's channels in id order after `after`, at most `limit`.
    async fn workspace_channels(
        &self,
        workspace_id: Uuid,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<Channel>>;

    /// Disconnects a channel of the workspace: its secrets are deleted and it is paused with
    /// [`DISCONNECTED`] (nothing is sent through it again); its sends stay for their history.
    /// False if the workspace has no such channel.
    async fn disconnect_channel(
        &self,
        workspace_id: Uuid,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<bool>;

    /// Encrypts every channel's secrets under the keyring's current key: rows sealed with an
    /// older key (a rotation) and rows written before encryption. Returns how many changed.
    async fn seal_secrets(&self) -> Result<u64>;

    /// Pauses (`Some(reason)`) or resumes (`None`) a channel: all of its sends, or with
    /// `broadcasts_only` its broadcasts. False if there is no such channel.
    async fn pause_channel(
        &self,
        id: Uuid,
        reason: Option<&str>,
        broadcasts_only: bool,
        now: DateTime<Utc>,
    ) -> Result<bool>;

    /// Records sends and enqueues their jobs in one transaction. Every send is validated first;
    /// nothing is written if one is bad. Returns the send ids, in order.
    async fn create_sends(&self, sends: &[NewSend], now: DateTime<Utc>) -> Result<Vec<Uuid>>;

    async fn send(&self, id: Uuid) -> Result<Option<SendRecord>>;

    /// A worker's transition. `Requesting` also counts a request. Returns the send afterwards.
    async fn update_send(
        &self,
        id: Uuid,
        update: &SendUpdate,
        now: DateTime<Utc>,
    ) -> Result<Option<SendRecord>>;

    /// Marks queued sends as requested (`sending`, one more request, `requested_at`) in one
    /// statement, and returns those that were queued. The send worker's first step, batched
    /// across the sends in flight, for sends their claims did not begin ([`BegunSends`]); and
    /// the SQLite store's step right after a keyed claim.
    async fn begin_sends(&self, ids: &[Uuid], now: DateTime<Utc>) -> Result<Vec<SendRecord>>;

    /// The send begun by the claim of job `job` at `claimed_at` ([`BegunSends`]), once, while
    /// that claim's lease runs: the worker's first step. None when that claim did not begin it
    /// (it was not queued, or its row was busy): the worker then begins it itself.
    fn take_begun(
        &self,
        id: Uuid,
        job: crate::model::JobId,
        claimed_at: DateTime<Utc>,
    ) -> Option<SendRecord>;

    /// Records Meta's message ids for accepted sends in one statement (never moving a send that
    /// a status webhook already moved further). Returns how many sends it found.
    async fn accept_sends(&self, accepted: &[(Uuid, String)], now: DateTime<Utc>) -> Result<u64>;

    /// Applies Meta's statuses, each only if it moves its send forward. A status names its send
    /// by our id (echoed callback data) or, failing that, by Meta's message id; either way only
    /// within its channel. Returns how many sends changed.
    async fn apply_statuses(&self, events: &[StatusEvent]) -> Result<u64>;

    /// Sends by status, of one channel or all.
    async fn send_counts(&self, channel_id: Option<Uuid>) -> Result<Vec<SendCount>>;

    /// Takes one unit of the portfolio's messaging tier for a business-initiated message to
    /// `recipient`: free if the user was reached in the last 24 h, otherwise counted against
    /// `tier`. Returns None when allowed, or the time the budget frees when it is used up.
    async fn reserve_reach(
        &self,
        portfolio_id: &str,
        recipient: &str,
        tier: u32,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>>;

    /// Records an inbound message: opens or refreshes the user's 24 h service window.
    async fn record_inbound(
        &self,
        channel_id: Uuid,
        recipient: &str,
        at: DateTime<Utc>,
    ) -> Result<()>;

    /// When the user last wrote to the channel.
    async fn last_inbound(
        &self,
        channel_id: Uuid,
        recipient: &str,
    ) -> Result<Option<DateTime<Utc>>>;
}

impl FromStr for Lane {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "interactive" => Ok(Lane::Interactive),
            "broadcast" => Ok(Lane::Broadcast),
            other => Err(format!("unknown lane {other:?}")),
        }
    }
}

/// One spelling per user. WhatsApp's webhooks name users by wa_id (digits only) while callers
/// write E.164 (`+1 555-123-4567`): a recipient made only of digits and phone separators loses
/// the separators and the leading `+`. Anything else is kept as it is (PSIDs and IGSIDs are
/// digits already). Windows, the messaging tier and the pair rate are keyed by this form.
pub fn canonical_recipient(r: &str) -> std::borrow::Cow<'_, str> {
    let r = r.trim();
    let phone_like = r
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '+' | ' ' | '-' | '(' | ')' | '.'));
    if phone_like && r.chars().any(|c| !c.is_ascii_digit()) {
        std::borrow::Cow::Owned(r.chars().filter(char::is_ascii_digit).collect())
    } else {
        std::borrow::Cow::Borrowed(r)
    }
}

/// Longest recipient id accepted (E.164 is at most 15 digits; PSIDs and IGSIDs are longer).
pub const MAX_RECIPIENT: usize = 64;

/// Validates sends before a store writes any of them.
pub(crate) fn check_sends(sends: &[NewSend]) -> Result<()> {
    for (i, s) in sends.iter().enumerate() {
        let bad = |why: String| crate::model::InvalidJob(format!("send {i}: {why}"));
        if canonical_recipient(&s.recipient).is_empty()
            || s.recipient.len() > MAX_RECIPIENT
            || s.recipient.chars().any(|c| c.is_control())
        {
            return Err(bad(format!(
                "recipient must be 1 to {MAX_RECIPIENT} bytes without control characters"
            ))
            .into());
        }
        s.message.validate().map_err(bad)?;
        if serde_json::to_string(&s.message).is_ok_and(|m| m.contains("\\u0000")) {
            return Err(bad("text must not contain NUL characters".into()).into());
        }
    }
    Ok(())
}

/// Reduces a batch of status events to the furthest one per send (and channel), split into those
/// that name our send id and those that name only Meta's message id. One UPDATE can then apply
/// each group (an UPDATE … FROM applies one arbitrary row per target when several match).
pub(crate) fn latest_statuses(events: &[StatusEvent]) -> (Vec<&StatusEvent>, Vec<&StatusEvent>) {
    use std::collections::HashMap;
    // Keyed by channel too: an event naming our send under another channel is dropped by the
    // UPDATE, and must not displace a real one for the same send.
    let mut by_send: HashMap<(Uuid, Uuid), &StatusEvent> = HashMap::new();
    let mut by_provider: HashMap<(Uuid, &str), &StatusEvent> = HashMap::new();
    for e in events {
        match e.send_id {
            Some(id) => {
                let slot = by_send.entry((e.channel_id, id)).or_insert(e);
                if e.status.rank() > slot.status.rank() {
                    *slot = e;
                }
            }
            None => {
                let slot = by_provider
                    .entry((e.channel_id, e.provider_message_id.as_str()))
                    .or_insert(e);
                if e.status.rank() > slot.status.rank() {
                    *slot = e;
                }
            }
        }
    }
    (
        by_send.into_values().collect(),
        by_provider.into_values().collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(mps: f64, burst_ms: u32) -> ChannelLimits {
        ChannelLimits {
            mps,
            burst_ms,
            ..ChannelLimits::default()
        }
    }

    #[test]
    fn the_rate_keeps_headroom_and_a_burst_of_at_least_two() {
        let r = limits(80.0, 50).rate();
        assert!((r.per_second - 79.2).abs() < 1e-9, "1% headroom");
        assert_eq!(r.burst, 3, "50 ms of 79.2/s");
        assert_eq!(limits(1000.0, 50).rate().burst, 49, "50 ms of 990/s");
        // Shared numbers (20/s) and slow channels: a tick's lateness must not be lost.
        assert_eq!(limits(20.0, 50).rate().burst, 2, "at least two");
        assert_eq!(limits(1.0, 1).rate().burst, 2, "at least two");
    }

    #[test]
    fn the_arrival_rate_is_metas_with_its_burst_never_below_herals() {
        let r = limits(80.0, 50).arrival_rate();
        assert_eq!(
            (r.per_second, r.burst),
            (80.0, 12),
            "150 ms of 80/s, no headroom"
        );
        assert_eq!(limits(1000.0, 50).arrival_rate().burst, 150);
        assert_eq!(limits(20.0, 50).arrival_rate().burst, 3);
        // Herald's own burst is never refused by the check.
        assert_eq!(limits(1000.0, 400).arrival_rate().burst, 400);
        assert_eq!(limits(1.0, 50).arrival_rate().burst, 2, "at least two");
        let mut bad = limits(80.0, 50);
        bad.meta_burst_ms = 0;
        assert!(bad.validate().is_err());
        bad.meta_burst_ms = 10_001;
        assert!(bad.validate().is_err());
        bad.meta_burst_ms = 10_000;
        assert!(bad.validate().is_ok());
        // Limits stored before the setting existed read with its default.
        let stored: ChannelLimits =
            serde_json::from_str(r#"{"mps":80.0,"headroom":0.01,"burst_ms":50}"#).unwrap();
        assert_eq!(stored.meta_burst_ms, 150);
    }

    fn begun(at: DateTime<Utc>) -> SendRecord {
        SendRecord {
            id: Uuid::new_v4(),
            workspace_id: Uuid::new_v4(),
            channel_id: Uuid::new_v4(),
            recipient: "15550001".into(),
            message: Message::Text { body: "hi".into() },
            lane: Lane::Broadcast,
            status: SendStatus::Sending,
            requests: 1,
            provider_message_id: None,
            error_code: None,
            error: None,
            created_at: at,
            requested_at: Some(at),
            accepted_at: None,
            updated_at: at,
        }
    }

    #[test]
    fn a_begun_send_is_for_its_own_claim_once_while_its_lease_runs() {
        let sends = BegunSends::default();
        let claimed = Utc::now();
        let lease = Duration::from_secs(30);
        let (a, b) = (begun(claimed), begun(claimed));
        sends.park(
            claimed,
            std::time::Instant::now(),
            lease,
            [(a.clone(), 1), (b.clone(), 2)],
        );
        assert!(sends.take(a.id, 2, claimed).is_none(), "another job's");
        let later = claimed + chrono::Duration::microseconds(1);
        assert!(sends.take(a.id, 1, later).is_none(), "another claim's");
        assert_eq!(sends.take(a.id, 1, claimed), Some(a.clone()), "its own");
        assert!(sends.take(a.id, 1, claimed).is_none(), "once");
        assert_eq!(sends.len(), 1, "the other waits for its worker");

        // A claim whose lease ran out (its job may run elsewhere by now) gets nothing.
        let long_ago = std::time::Instant::now()
            .checked_sub(Duration::from_secs(60))
            .expect("a minute ago");
        let c = begun(claimed);
        sends.park(claimed, long_ago, lease, [(c.clone(), 3)]);
        assert!(sends.take(c.id, 3, claimed).is_none(), "past its lease");
    }

    #[test]
    fn parking_sweeps_out_what_outlived_its_lease() {
        let sends = BegunSends::default();
        let claimed = Utc::now();
        let lease = Duration::from_secs(30);
        let long_ago = std::time::Instant::now()
            .checked_sub(Duration::from_secs(60))
            .expect("a minute ago");
        let stale = begun(claimed);
        let fresh = begun(claimed);
        // The first parking sweeps (none has yet); the next sweeps only 30 s later.
        sends.park(claimed, long_ago, lease, [(stale.clone(), 1)]);
        assert_eq!(sends.len(), 0, "swept at once");
        sends.park(
            claimed,
            std::time::Instant::now(),
            lease,
            [(fresh.clone(), 2)],
        );
        sends.park(claimed, long_ago, lease, [(stale.clone(), 1)]);
        assert_eq!(sends.len(), 2, "not swept again within 30 s");
        assert_eq!(sends.take(fresh.id, 2, claimed), Some(fresh));
    }
}
