//! The Graph API client: one pooled HTTP client for every channel, Meta's request bodies per
//! platform, and Meta's answers parsed into a message id or an error to classify.

use std::time::Duration;

use herald_engine::delivery::{Channel, Lane, Message, Platform};
use serde::Deserialize;
use serde_json::{json, Value};

/// Settings of the [`MetaClient`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientConfig {
    /// A connection not made in this long fails as "not sent" (safe to retry at once).
    pub connect_timeout: Duration,
    /// A request without an answer after this long is "unknown": Meta may have the message.
    /// Meta answers in well under a second; 15 s leaves room for its slow moments.
    pub request_timeout: Duration,
    /// Idle connections kept per host: enough for the sends in flight at 1,000/s.
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
    http: reqwest::Client,
}

impl MetaClient {
    pub fn new(config: ClientConfig) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .tcp_nodelay(true)
            // The Graph API answers sends itself; following a redirect would re-post a message
            // to somewhere else. A 3xx is an answer without Meta's body, like any other.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(MetaClient { http })
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
        let (url, body) = request(channel, recipient, message, lane, callback)?;
        let response = self
            .http
            .post(url)
            .bearer_auth(&channel.access_token)
            .json(&body)
            .send()
            .await
            .map_err(|e| {
                if e.is_builder() {
                    // Nothing left the process: the channel's token or URL cannot be used.
                    SendError::BadChannel(format!(
                        "the request cannot be built from the channel's access token and Graph \
                         base URL: {e}"
                    ))
                } else if e.is_connect() {
                    SendError::NotSent(e.to_string())
                } else {
                    SendError::Lost(e.to_string())
                }
            })?;
        let status = response.status().as_u16();
        let usage_percent = usage_percent(response.headers());
        let bytes = response
            .bytes()
            .await
            .map_err(|e| SendError::Lost(e.to_string()))?;
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
        .filter(|id| !id.is_empty())
}

/// The highest `call_count` / `total_cputime` / `total_time` percentage in Meta's usage headers.
fn usage_percent(headers: &reqwest::header::HeaderMap) -> Option<f64> {
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

/// The URL and JSON body of a send.
pub fn request(
    channel: &Channel,
    recipient: &str,
    message: &Message,
    lane: Lane,
    callback: &str,
) -> Result<(String, Value), SendError> {
    let base = channel.graph_base_url.trim_end_matches('/');
    match channel.platform {
        Platform::Whatsapp => {
            let url = format!(
                "{base}/{}/{}/messages",
                channel.api_version, channel.sender_id
            );
            let mut body = json!({
                "messaging_product": "whatsapp",
                "recipient_type": "individual",
                "to": recipient,
                "biz_opaque_callback_data": callback,
            });
            let (kind, content) = match message {
                Message::Text { body } => ("text", json!({ "body": body, "preview_url": false })),
                Message::Template {
                    name,
                    language,
                    parameters,
                } => {
                    let mut t = json!({ "name": name, "language": { "code": language } });
                    if !parameters.is_empty() {
                        let params: Vec<Value> = parameters
                            .iter()
                            .map(|p| json!({ "type": "text", "text": p }))
                            .collect();
                        t["components"] = json!([{ "type": "body", "parameters": params }]);
                    }
                    ("template", t)
                }
                Message::Media {
                    media,
                    link,
                    caption,
                } => {
                    let mut m = json!({ "link": link });
                    if let Some(c) = caption {
                        m["caption"] = json!(c);
                    }
                    (media.as_str(), m)
                }
                Message::Buttons { body, buttons } => {
                    let buttons: Vec<Value> = buttons
                        .iter()
                        .map(|b| json!({ "type": "reply", "reply": { "id": b.id, "title": b.title } }))
                        .collect();
                    (
                        "interactive",
                        json!({
                            "type": "button",
                            "body": { "text": body },
                            "action": { "buttons": buttons },
                        }),
                    )
                }
            };
            body["type"] = json!(kind);
            body[kind] = content;
            Ok((url, body))
        }
        Platform::Messenger | Platform::Instagram => {
            let url = format!("{base}/{}/me/messages", channel.api_version);
            let mut msg = match message {
                Message::Text { body } => json!({ "text": body }),
                Message::Template { .. } => {
                    return Err(SendError::Unsupported(
                        "templates are a WhatsApp feature; Messenger and Instagram take text, media or buttons".into(),
                    ))
                }
                Message::Media { media, link, .. } => {
                    let kind = match media.as_str() {
                        "document" => "file",
                        other => other,
                    };
                    json!({ "attachment": { "type": kind, "payload": { "url": link, "is_reusable": true } } })
                }
                Message::Buttons { body, buttons } => {
                    let replies: Vec<Value> = buttons
                        .iter()
                        .map(|b| json!({ "content_type": "text", "title": b.title, "payload": b.id }))
                        .collect();
                    json!({ "text": body, "quick_replies": replies })
                }
            };
            msg["metadata"] = json!(callback);
            let messaging_type = match lane {
                Lane::Interactive => "RESPONSE",
                Lane::Broadcast => "UPDATE",
            };
            Ok((
                url,
                json!({
                    "recipient": { "id": recipient },
                    "messaging_type": messaging_type,
                    "message": msg,
                }),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_headers_give_the_highest_percentage() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            "x-business-use-case-usage",
            r#"{"123":[{"type":"whatsapp","call_count":42,"total_cputime":91,"total_time":5}]}"#
                .parse()
                .unwrap(),
        );
        assert_eq!(usage_percent(&h), Some(91.0));
        h.insert("x-app-usage", r#"{"call_count":95}"#.parse().unwrap());
        assert_eq!(usage_percent(&h), Some(95.0));
        let mut bad = reqwest::header::HeaderMap::new();
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
        let (url, body) = request(
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
        let (_, body) = request(
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
        let (_, body) = request(
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
        let (url, body) = request(
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
            request(
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
        assert_eq!(message_id(b"garbage"), None);
    }
}
