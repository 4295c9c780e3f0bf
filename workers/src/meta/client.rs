//! The Graph API client: one pooled HTTP client for every channel, Meta's request bodies per
//! platform, and Meta's answers parsed into a message id or an error to classify.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_engine::delivery::{Button, Channel, Lane, Message, Platform};
use http::header::HeaderValue;
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::http::{Endpoint, Failure, Transport, TransportConfig};

/// Settings of the [`MetaClient`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientConfig {
    /// A connection not made in this long fails as "not sent" (safe to retry at once).
    pub connect_timeout: Duration,
    /// The whole request, connecting included: without an answer by then it is "unknown"
    /// (Meta may have the message), or "not sent" if no connection was made. Meta answers in
    /// well under a second; 15 s leaves room for its slow moments.
    pub request_timeout: Duration,
    /// Idle connections kept per origin (scheme, host and port): enough for the sends in
    /// flight at 1,000/s. 0 keeps none.
    pub pool_max_idle_per_host: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            pool_max_idle_per_host: 512,
        }
    }
}

/// Meta's error object.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MetaError {
    #[serde(default)]
    pub message: String,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub code: Option<i64>,
    #[serde(default)]
    pub error_subcode: Option<i64>,
    #[serde(default)]
    pub fbtrace_id: Option<String>,
}

/// A send Meta accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// `wamid.…` or `mid.…`.
    pub message_id: String,
    /// The highest percentage in Meta's usage headers, when present.
    pub usage_percent: Option<f64>,
}

/// How a send did not go through.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Meta answered with an error: classify `error.code`.
    #[error("Meta refused the send (HTTP {status}, code {:?}): {}", .error.code, .error.message)]
    Meta { status: u16, error: MetaError },
    /// The request never reached Meta (no connection): nothing was sent.
    #[error("could not reach Meta: {0}")]
    NotSent(String),
    /// The request went out but its answer was lost (timeout, broken connection, unreadable
    /// body): Meta may or may not have the message.
    #[error("the answer was lost: {0}")]
    Lost(String),
    /// The message cannot be expressed on the channel's platform.
    #[error("{0}")]
    Unsupported(String),
    /// The channel's settings cannot make a request (a token with control characters, a URL
    /// without a host): nothing was sent, and nothing on this channel can be until it is fixed.
    #[error("{0}")]
    BadChannel(String),
}

/// The Graph API client. Cheap to clone (one shared connection pool).
#[derive(Clone)]
pub struct MetaClient {
    http: Arc<Transport>,
    /// Each channel's parsed endpoint and `Authorization` header, so that a send does not parse
    /// a URL and validate a header again (URL parsing alone was a twentieth of the CPU of a
    /// send at 1,000/s).
    targets: Arc<Mutex<HashMap<Uuid, Arc<Target>>>>,
}

/// An idle connection is not reused after this, and is swept from the pool (reqwest's and
/// hyper-util's default).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Meta answers a send in a few hundred bytes; a larger answer is refused as lost.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Most channels whose targets are kept; past it the cache starts again (channels are few,
/// but a long-running process may see many come and go).
const MAX_TARGETS: usize = 10_000;

/// Where and as whom a channel sends, with the channel settings it was made from: a target
/// whose settings no longer match the channel's (a new token, another base URL) is made again.
struct Target {
    graph_base_url: String,
    api_version: String,
    sender_id: String,
    access_token: String,
    platform: Platform,
    endpoint: Endpoint,
    authorization: HeaderValue,
}

impl Target {
    fn matches(&self, channel: &Channel) -> bool {
        self.platform == channel.platform
            && self.access_token == channel.access_token
            && self.sender_id == channel.sender_id
            && self.api_version == channel.api_version
            && self.graph_base_url == channel.graph_base_url
    }

    fn new(channel: &Channel) -> Result<Target, SendError> {
        let bad = |what: &str| {
            SendError::BadChannel(format!(
                "the request cannot be built from the channel's access token and Graph base \
                 URL: {what}"
            ))
        };
        let endpoint = Endpoint::parse(&endpoint(channel)).map_err(|e| bad(&e))?;
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", channel.access_token))
            .map_err(|e| bad(&format!("the access token cannot be a header: {e}")))?;
        authorization.set_sensitive(true);
        Ok(Target {
            graph_base_url: channel.graph_base_url.clone(),
            api_version: channel.api_version.clone(),
            sender_id: channel.sender_id.clone(),
            access_token: channel.access_token.clone(),
            platform: channel.platform,
            endpoint,
            authorization,
        })
    }
}

impl MetaClient {
    /// The error says why the client cannot be made (only TLS settings can fail). The client
    /// connects to Meta directly: a proxy set in the environment is not used, and a warning
    /// says so.
    pub fn new(config: ClientConfig) -> Result<Self, String> {
        for var in [
            "HTTPS_PROXY",
            "https_proxy",
            "HTTP_PROXY",
            "http_proxy",
            "ALL_PROXY",
            "all_proxy",
        ] {
            if std::env::var_os(var).is_some_and(|v| !v.is_empty()) {
                tracing::warn!(
                    variable = var,
                    "a proxy is set, but the Meta client connects to the Graph API directly"
                );
            }
        }
        // Redirects are never followed: the Graph API answers sends itself, and following one
        // would re-post a message to somewhere else. A 3xx is an answer without Meta's body,
        // like any other.
        let http = Transport::new(TransportConfig {
            connect_timeout: config.connect_timeout,
            request_timeout: config.request_timeout,
            max_idle_per_origin: config.pool_max_idle_per_host,
            idle_timeout: IDLE_TIMEOUT,
            max_answer_bytes: MAX_ANSWER_BYTES,
        })?;
        Ok(MetaClient {
            http: Arc::new(http),
            targets: Arc::default(),
        })
    }

    /// The channel's target, made on its first send and again when its settings change.
    fn target(&self, channel: &Channel) -> Result<Arc<Target>, SendError> {
        let mut targets = self
            .targets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(t) = targets.get(&channel.id).filter(|t| t.matches(channel)) {
            return Ok(t.clone());
        }
        let target = Arc::new(Target::new(channel)?);
        if targets.len() >= MAX_TARGETS {
            targets.clear();
        }
        targets.insert(channel.id, target.clone());
        Ok(target)
    }

    /// Sends `message` to `recipient` through `channel`, with `callback` (our send id) for Meta
    /// to echo in the status webhooks.
    pub async fn send(
        &self,
        channel: &Channel,
        recipient: &str,
        message: &Message,
        lane: Lane,
        callback: &str,
    ) -> Result<Accepted, SendError> {
        let body = send_body(channel.platform, recipient, message, lane, callback)?;
        let target = self.target(channel)?;
        let body = serde_json::to_vec(&body)
            .map_err(|e| SendError::Unsupported(format!("the message cannot be encoded: {e}")))?;
        let answer = self
            .http
            .post_json(&target.endpoint, &target.authorization, body)
            .await
            .map_err(|e| match e {
                Failure::NotSent(why) => SendError::NotSent(why),
                Failure::Lost(why) => SendError::Lost(why),
            })?;
        let status = answer.status;
        let usage_percent = usage_percent(&answer.headers);
        let bytes = answer.body;
        if (200..300).contains(&status) {
            return match message_id(&bytes) {
                Some(message_id) => Ok(Accepted {
                    message_id,
                    usage_percent,
                }),
                // Meta said yes but we cannot read its id: it has the message.
                None => Err(SendError::Lost(format!(
                    "HTTP {status} without a message id"
                ))),
            };
        }
        #[derive(Deserialize)]
        struct Envelope {
            error: MetaError,
        }
        match serde_json::from_slice::<Envelope>(&bytes) {
            Ok(env) => Err(SendError::Meta {
                status,
                error: env.error,
            }),
            // A 5xx without Meta's body comes from a proxy in front of Meta (a 502 or 504 after
            // a timeout inside): Meta may have the message, as with a lost answer.
            Err(_) if status >= 500 => Err(SendError::Lost(format!(
                "HTTP {status} without Meta's error body"
            ))),
            Err(_) => Err(SendError::Meta {
                status,
                error: MetaError {
                    message: format!("HTTP {status} without Meta's error body"),
                    kind: None,
                    code: None,
                    error_subcode: None,
                    fbtrace_id: None,
                },
            }),
        }
    }
}

fn message_id(body: &[u8]) -> Option<String> {
    // Read into these, not a `Value`: only the id is kept, and this runs for every message.
    #[derive(Deserialize)]
    struct Answer {
        #[serde(default)]
        messages: Vec<Sent>,
        message_id: Option<String>,
    }
    #[derive(Deserialize)]
    struct Sent {
        id: Option<String>,
    }
    let answer: Answer = serde_json::from_slice(body).ok()?;
    // WhatsApp: messages[0].id; Messenger / Instagram: message_id.
    answer
        .messages
        .into_iter()
        .next()
        .and_then(|m| m.id)
        .or(answer.message_id)
        // PostgreSQL cannot store U+0000: an id holding one would make the completion that
        // records it fail. Meta's ids never hold one.
        .map(|mut id| {
            id.retain(|c| c != '\0');
            id
        })
        .filter(|id| !id.is_empty())
}

/// The highest `call_count` / `total_cputime` / `total_time` percentage in Meta's usage headers.
fn usage_percent(headers: &http::HeaderMap) -> Option<f64> {
    let mut highest: Option<f64> = None;
    for name in ["x-business-use-case-usage", "x-app-usage", "x-page-usage"] {
        let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        let Ok(json) = serde_json::from_str::<Value>(v) else {
            continue;
        };
        let mut visit = |obj: &Value| {
            for key in ["call_count", "total_cputime", "total_time"] {
                if let Some(p) = obj.get(key).and_then(Value::as_f64) {
                    highest = Some(highest.map_or(p, |h: f64| h.max(p)));
                }
            }
        };
        match &json {
            // X-Business-Use-Case-Usage: {"<id>": [{"call_count": …}, …]}
            Value::Object(map) if !map.contains_key("call_count") => {
                for list in map.values() {
                    for obj in list.as_array().into_iter().flatten() {
                        visit(obj);
                    }
                }
            }
            other => visit(other),
        }
    }
    highest
}

/// The JSON body of a send, serialized straight from the message: no `serde_json::Value` tree
/// is built, since this runs for every message.
struct SendBody<'a> {
    platform: Platform,
    recipient: &'a str,
    message: &'a Message,
    lane: Lane,
    callback: &'a str,
}

impl Serialize for SendBody<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.platform {
            Platform::Whatsapp => {
                let (kind, content) = match self.message {
                    Message::Text { body } => ("text", WaContent::Text { body }),
                    Message::Template {
                        name,
                        language,
                        parameters,
                    } => ("template", WaContent::Template(name, language, parameters)),
                    Message::Media {
                        media,
                        link,
                        caption,
                    } => (media.as_str(), WaContent::Media { link, caption }),
                    Message::Buttons { body, buttons } => {
                        ("interactive", WaContent::Buttons { body, buttons })
                    }
                };
                let mut map = s.serialize_map(Some(6))?;
                map.serialize_entry("messaging_product", "whatsapp")?;
                map.serialize_entry("recipient_type", "individual")?;
                map.serialize_entry("to", self.recipient)?;
                map.serialize_entry("biz_opaque_callback_data", self.callback)?;
                map.serialize_entry("type", kind)?;
                map.serialize_entry(kind, &content)?;
                map.end()
            }
            Platform::Messenger | Platform::Instagram => {
                let mut map = s.serialize_map(Some(3))?;
                map.serialize_entry("recipient", &One("id", self.recipient))?;
                map.serialize_entry(
                    "messaging_type",
                    match self.lane {
                        Lane::Interactive => "RESPONSE",
                        Lane::Broadcast => "UPDATE",
                    },
                )?;
                map.serialize_entry(
                    "message",
                    &PageMessage {
                        message: self.message,
                        metadata: self.callback,
                    },
                )?;
                map.end()
            }
        }
    }
}

/// `{ key: value }`.
struct One<'a, T: ?Sized>(&'static str, &'a T);

impl<T: Serialize + ?Sized> Serialize for One<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(1))?;
        map.serialize_entry(self.0, self.1)?;
        map.end()
    }
}

/// The object named by a WhatsApp body's `type`.
enum WaContent<'a> {
    Text {
        body: &'a str,
    },
    /// Name, language and body parameters.
    Template(&'a str, &'a str, &'a [String]),
    Media {
        link: &'a str,
        caption: &'a Option<String>,
    },
    Buttons {
        body: &'a str,
        buttons: &'a [Button],
    },
}

impl Serialize for WaContent<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            WaContent::Text { body } => {
                let mut map = s.serialize_map(Some(2))?;
                map.serialize_entry("body", body)?;
                map.serialize_entry("preview_url", &false)?;
                map.end()
            }
            WaContent::Template(name, language, parameters) => {
                let mut map = s.serialize_map(None)?;
                map.serialize_entry("name", name)?;
                map.serialize_entry("language", &One("code", *language))?;
                if !parameters.is_empty() {
                    map.serialize_entry("components", &[BodyComponent(parameters)])?;
                }
                map.end()
            }
            WaContent::Media { link, caption } => {
                let mut map = s.serialize_map(None)?;
                map.serialize_entry("link", link)?;
                if let Some(c) = caption {
                    map.serialize_entry("caption", c)?;
                }
                map.end()
            }
            WaContent::Buttons { body, buttons } => {
                let mut map = s.serialize_map(Some(3))?;
                map.serialize_entry("type", "button")?;
                map.serialize_entry("body", &One("text", *body))?;
                map.serialize_entry("action", &One("buttons", &ReplyButtons(buttons)))?;
                map.end()
            }
        }
    }
}

/// A template's `{"type": "body", "parameters": [{"type": "text", "text": …}, …]}`.
struct BodyComponent<'a>(&'a [String]);

impl Serialize for BodyComponent<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry("type", "body")?;
        map.serialize_entry("parameters", &TextParameters(self.0))?;
        map.end()
    }
}

struct TextParameters<'a>(&'a [String]);

impl Serialize for TextParameters<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|text| TypedText("text", "text", text)))
    }
}

/// `{"type": kind, key: text}`.
struct TypedText<'a>(&'static str, &'static str, &'a str);

impl Serialize for TypedText<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry("type", self.0)?;
        map.serialize_entry(self.1, self.2)?;
        map.end()
    }
}

/// WhatsApp's `[{"type": "reply", "reply": {"id": …, "title": …}}, …]`.
struct ReplyButtons<'a>(&'a [Button]);

impl Serialize for ReplyButtons<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Reply<'a> {
            id: &'a str,
            title: &'a str,
        }
        #[derive(Serialize)]
        struct Item<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            reply: Reply<'a>,
        }
        s.collect_seq(self.0.iter().map(|b| Item {
            kind: "reply",
            reply: Reply {
                id: &b.id,
                title: &b.title,
            },
        }))
    }
}

/// Messenger's and Instagram's `message`, with our send id as its `metadata`. Templates never
/// get here: [`send_body`] refuses them first.
struct PageMessage<'a> {
    message: &'a Message,
    metadata: &'a str,
}

impl Serialize for PageMessage<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        match self.message {
            Message::Text { body } | Message::Buttons { body, .. } => {
                map.serialize_entry("text", body)?;
            }
            Message::Media { media, link, .. } => {
                #[derive(Serialize)]
                struct Payload<'a> {
                    url: &'a str,
                    is_reusable: bool,
                }
                #[derive(Serialize)]
                struct Attachment<'a> {
                    #[serde(rename = "type")]
                    kind: &'a str,
                    payload: Payload<'a>,
                }
                let kind = match media.as_str() {
                    "document" => "file",
                    other => other,
                };
                map.serialize_entry(
                    "attachment",
                    &Attachment {
                        kind,
                        payload: Payload {
                            url: link,
                            is_reusable: true,
                        },
                    },
                )?;
            }
            Message::Template { .. } => {}
        }
        if let Message::Buttons { buttons, .. } = self.message {
            #[derive(Serialize)]
            struct QuickReply<'a> {
                content_type: &'static str,
                title: &'a str,
                payload: &'a str,
            }
            map.serialize_entry(
                "quick_replies",
                &buttons
                    .iter()
                    .map(|b| QuickReply {
                        content_type: "text",
                        title: &b.title,
                        payload: &b.id,
                    })
                    .collect::<Vec<_>>(),
            )?;
        }
        map.serialize_entry("metadata", self.metadata)?;
        map.end()
    }
}

/// The JSON body of a send on `platform`, or why the message cannot be sent there.
fn send_body<'a>(
    platform: Platform,
    recipient: &'a str,
    message: &'a Message,
    lane: Lane,
    callback: &'a str,
) -> Result<SendBody<'a>, SendError> {
    if platform != Platform::Whatsapp && matches!(message, Message::Template { .. }) {
        return Err(SendError::Unsupported(
            "templates are a WhatsApp feature; Messenger and Instagram take text, media or buttons"
                .into(),
        ));
    }
    Ok(SendBody {
        platform,
        recipient,
        message,
        lane,
        callback,
    })
}

/// The Graph API endpoint a channel sends through.
fn endpoint(channel: &Channel) -> String {
    let base = channel.graph_base_url.trim_end_matches('/');
    match channel.platform {
        Platform::Whatsapp => format!(
            "{base}/{}/{}/messages",
            channel.api_version, channel.sender_id
        ),
        Platform::Messenger | Platform::Instagram => {
            format!("{base}/{}/me/messages", channel.api_version)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A send's URL, and its body as the JSON that goes on the wire.
    fn wire(
        channel: &Channel,
        recipient: &str,
        message: &Message,
        lane: Lane,
        callback: &str,
    ) -> Result<(String, Value), SendError> {
        let body = send_body(channel.platform, recipient, message, lane, callback)?;
        Ok((
            endpoint(channel),
            serde_json::to_value(&body).expect("a body is JSON"),
        ))
    }

    #[test]
    fn usage_headers_give_the_highest_percentage() {
        let mut h = http::HeaderMap::new();
        h.insert(
            "x-business-use-case-usage",
            r#"{"123":[{"type":"whatsapp","call_count":42,"total_cputime":91,"total_time":5}]}"#
                .parse()
                .unwrap(),
        );
        assert_eq!(usage_percent(&h), Some(91.0));
        h.insert("x-app-usage", r#"{"call_count":95}"#.parse().unwrap());
        assert_eq!(usage_percent(&h), Some(95.0));
        let mut bad = http::HeaderMap::new();
        bad.insert("x-app-usage", "not json".parse().unwrap());
        assert_eq!(usage_percent(&bad), None);
    }

    fn channel(platform: Platform) -> Channel {
        let now = chrono::Utc::now();
        Channel {
            id: uuid::Uuid::nil(),
            workspace_id: uuid::Uuid::nil(),
            platform,
            name: "t".into(),
            sender_id: "123".into(),
            portfolio_id: None,
            access_token: "token".into(),
            app_secret: "secret".into(),
            verify_token: String::new(),
            graph_base_url: "https://graph.example/".into(),
            api_version: "v21.0".into(),
            limits: herald_engine::delivery::ChannelLimits::default(),
            paused_reason: None,
            paused_broadcasts_only: false,
            paused_at: None,
            created_at: now,
            updated_at: now,
        }
    }

    #[test]
    fn whatsapp_bodies_follow_the_cloud_api() {
        let wa = channel(Platform::Whatsapp);
        let (url, body) = wire(
            &wa,
            "15551234567",
            &Message::Template {
                name: "order_update".into(),
                language: "en_US".into(),
                parameters: vec!["42".into()],
            },
            Lane::Broadcast,
            "send-1",
        )
        .expect("template");
        assert_eq!(url, "https://graph.example/v21.0/123/messages");
        assert_eq!(
            body,
            json!({
                "messaging_product": "whatsapp", "recipient_type": "individual",
                "to": "15551234567", "biz_opaque_callback_data": "send-1", "type": "template",
                "template": { "name": "order_update", "language": { "code": "en_US" },
                    "components": [{ "type": "body",
                        "parameters": [{ "type": "text", "text": "42" }] }] }
            })
        );
        let (_, body) = wire(
            &wa,
            "1",
            &Message::Media {
                media: herald_engine::delivery::MediaKind::Image,
                link: "https://x/y.png".into(),
                caption: Some("hi".into()),
            },
            Lane::Interactive,
            "s",
        )
        .expect("media");
        assert_eq!(body["type"], "image");
        assert_eq!(
            body["image"],
            json!({ "link": "https://x/y.png", "caption": "hi" })
        );
        let (_, body) = wire(
            &wa,
            "1",
            &Message::Buttons {
                body: "Pick".into(),
                buttons: vec![herald_engine::delivery::Button {
                    id: "a".into(),
                    title: "A".into(),
                }],
            },
            Lane::Interactive,
            "s",
        )
        .expect("buttons");
        assert_eq!(body["interactive"]["type"], "button");
        assert_eq!(
            body["interactive"]["action"]["buttons"][0],
            json!({ "type": "reply", "reply": { "id": "a", "title": "A" } })
        );
    }

    #[test]
    fn messenger_bodies_carry_our_id_as_metadata() {
        let page = channel(Platform::Messenger);
        let (url, body) = wire(
            &page,
            "psid",
            &Message::Text { body: "hi".into() },
            Lane::Interactive,
            "send-2",
        )
        .expect("text");
        assert_eq!(url, "https://graph.example/v21.0/me/messages");
        assert_eq!(
            body,
            json!({ "recipient": { "id": "psid" }, "messaging_type": "RESPONSE",
                    "message": { "text": "hi", "metadata": "send-2" } })
        );
        assert!(matches!(
            wire(
                &page,
                "psid",
                &Message::Template {
                    name: "x".into(),
                    language: "en".into(),
                    parameters: vec![]
                },
                Lane::Broadcast,
                "s"
            ),
            Err(SendError::Unsupported(_))
        ));
    }

    #[test]
    fn every_message_kind_has_its_exact_body() {
        let wa = channel(Platform::Whatsapp);
        let text = Message::Text { body: "hi".into() };
        let (_, body) = wire(&wa, "1", &text, Lane::Interactive, "s").expect("text");
        assert_eq!(
            body,
            json!({ "messaging_product": "whatsapp", "recipient_type": "individual", "to": "1",
                    "biz_opaque_callback_data": "s", "type": "text",
                    "text": { "body": "hi", "preview_url": false } })
        );
        let bare = Message::Template {
            name: "hello".into(),
            language: "en".into(),
            parameters: vec![],
        };
        let (_, body) = wire(&wa, "1", &bare, Lane::Broadcast, "s").expect("template");
        assert_eq!(
            body["template"],
            json!({ "name": "hello", "language": { "code": "en" } })
        );
        let doc = Message::Media {
            media: herald_engine::delivery::MediaKind::Document,
            link: "https://x/y.pdf".into(),
            caption: None,
        };
        let (_, body) = wire(&wa, "1", &doc, Lane::Broadcast, "s").expect("document");
        assert_eq!(body["type"], "document");
        assert_eq!(body["document"], json!({ "link": "https://x/y.pdf" }));
        let buttons = Message::Buttons {
            body: "Pick".into(),
            buttons: vec![herald_engine::delivery::Button {
                id: "a".into(),
                title: "A".into(),
            }],
        };
        for platform in [Platform::Messenger, Platform::Instagram] {
            let page = channel(platform);
            let (_, body) = wire(&page, "psid", &doc, Lane::Broadcast, "s2").expect("media");
            assert_eq!(
                body,
                json!({ "recipient": { "id": "psid" }, "messaging_type": "UPDATE",
                        "message": { "attachment": { "type": "file",
                            "payload": { "url": "https://x/y.pdf", "is_reusable": true } },
                            "metadata": "s2" } })
            );
            let (_, body) = wire(&page, "psid", &buttons, Lane::Interactive, "s3").expect("quick");
            assert_eq!(
                body["message"],
                json!({ "text": "Pick", "metadata": "s3", "quick_replies":
                        [{ "content_type": "text", "title": "A", "payload": "a" }] })
            );
        }
    }

    #[test]
    fn targets_follow_the_channel_settings() {
        let client = MetaClient::new(ClientConfig::default()).expect("client");
        let mut wa = channel(Platform::Whatsapp);
        let first = client.target(&wa).expect("target");
        assert_eq!(first.endpoint.host_header, "graph.example");
        assert_eq!(first.endpoint.path.as_str(), "/v21.0/123/messages");
        assert!(first.endpoint.origin.https);
        assert_eq!(first.authorization, "Bearer token");
        assert!(first.authorization.is_sensitive());
        assert!(Arc::ptr_eq(&first, &client.target(&wa).expect("again")));
        wa.access_token = "rotated".into();
        assert_eq!(
            client.target(&wa).expect("new token").authorization,
            "Bearer rotated"
        );
        wa.graph_base_url = "http://127.0.0.1:9/".into();
        let moved = client.target(&wa).expect("new base");
        assert_eq!(moved.endpoint.host_header, "127.0.0.1:9");
        assert_eq!(moved.endpoint.path.as_str(), "/v21.0/123/messages");
        assert!(!moved.endpoint.origin.https);
        wa.access_token = "bad\ntoken".into();
        assert!(matches!(client.target(&wa), Err(SendError::BadChannel(_))));
        wa.access_token = "token".into();
        for base in ["not a url", "mailto:meta@example.com", "file:///tmp"] {
            wa.graph_base_url = base.into();
            assert!(
                matches!(client.target(&wa), Err(SendError::BadChannel(_))),
                "{base}"
            );
        }
    }

    #[test]
    fn message_ids_of_both_platforms() {
        assert_eq!(
            message_id(br#"{"messaging_product":"whatsapp","messages":[{"id":"wamid.1"}]}"#),
            Some("wamid.1".into())
        );
        assert_eq!(
            message_id(br#"{"recipient_id":"1","message_id":"mid.2"}"#),
            Some("mid.2".into())
        );
        assert_eq!(message_id(b"{}"), None);
        assert_eq!(
            message_id(br#"{"message_id":"mid.\u00003"}"#),
            Some("mid.3".into())
        );
        assert_eq!(message_id(br#"{"message_id":"\u0000"}"#), None);
        assert_eq!(message_id(b"garbage"), None);
    }
}
