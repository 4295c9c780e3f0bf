//! Meta's webhooks, per channel: the verification handshake and signed event deliveries.
//!
//! Today the events are applied as they arrive, in the request: statuses move sends forward
//! (reconciling sends whose answer was lost, by the send id echoed in
//! `biz_opaque_callback_data` / `metadata`), inbound messages open the service window. The
//! answer is 200 only once that is written, so Meta redelivers whatever Herald did not store.
//!
//! Architecture invariant: nothing from a POST is parsed, let alone stored, before its
//! `X-Hub-Signature-256` has been checked against the channel's app secret in constant time.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, TimeZone, Utc};
use herald_engine::delivery::{Channel, SendStatus, StatusEvent};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::Value;
use sha2::Sha256;
use uuid::Uuid;

use crate::{problem, AppState};

/// Largest webhook body accepted. Meta batches events, but a batch stays far below this.
pub const MAX_BODY: usize = 1024 * 1024;

#[derive(Debug, Deserialize)]
pub struct Verify {
    #[serde(rename = "hub.mode")]
    mode: Option<String>,
    #[serde(rename = "hub.verify_token")]
    verify_token: Option<String>,
    #[serde(rename = "hub.challenge")]
    challenge: Option<String>,
}

/// `GET /webhooks/{channel_id}`: answers Meta's subscription handshake with the challenge when
/// the verify token matches, 403 otherwise.
pub async fn verify(
    State(state): State<AppState>,
    Path(channel_id): Path<String>,
    Query(q): Query<Verify>,
) -> Response {
    let Some(channel) = channel_of(&state, &channel_id).await else {
        return problem(StatusCode::NOT_FOUND, "unknown-channel", "no such channel");
    };
    let token_ok = q.verify_token.as_deref().is_some_and(|t| {
        !channel.verify_token.is_empty()
            && constant_time_eq(t.as_bytes(), channel.verify_token.as_bytes())
    });
    match (q.mode.as_deref(), token_ok, q.challenge) {
        (Some("subscribe"), true, Some(challenge)) => (StatusCode::OK, challenge).into_response(),
        _ => problem(
            StatusCode::FORBIDDEN,
            "verification-failed",
            "hub.mode, hub.verify_token or hub.challenge is wrong",
        ),
    }
}

/// `POST /webhooks/{channel_id}`.
pub async fn receive(
    State(state): State<AppState>,
    Path(channel_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(channel) = channel_of(&state, &channel_id).await else {
        return problem(StatusCode::NOT_FOUND, "unknown-channel", "no such channel");
    };
    let signature = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !signature_valid(&channel.app_secret, &body, signature) {
        return problem(
            StatusCode::UNAUTHORIZED,
            "bad-signature",
            "X-Hub-Signature-256 is missing or does not match the body",
        );
    }
    // Events carry the Meta id of the number or page they belong to: several channels of one
    // Meta app share a callback URL, so each event goes to its own channel, not the URL's.
    let own = |sender: &str| (sender == channel.sender_id).then_some(channel.id);
    let mut events = match parse(&channel, &body, &own) {
        Ok(events) => events,
        Err(why) => return problem(StatusCode::BAD_REQUEST, "malformed-webhook", &why),
    };
    if !events.foreign.is_empty() {
        let siblings = match state.store.delivery().channels().await {
            Ok(list) => list,
            Err(e) => {
                tracing::error!(error = %e, "webhook: cannot load channels");
                return problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage-unavailable",
                    "the event was not stored; Meta will deliver it again",
                );
            }
        };
        // Only channels that share the app secret that signed this body.
        let by_sender: std::collections::HashMap<&str, Uuid> = siblings
            .iter()
            .filter(|c| {
                c.platform == channel.platform
                    && constant_time_eq(c.app_secret.as_bytes(), channel.app_secret.as_bytes())
            })
            .map(|c| (c.sender_id.as_str(), c.id))
            .collect();
        let resolve = |sender: &str| by_sender.get(sender).copied();
        events = match parse(&channel, &body, &resolve) {
            Ok(events) => events,
            Err(why) => return problem(StatusCode::BAD_REQUEST, "malformed-webhook", &why),
        };
        if !events.foreign.is_empty() {
            tracing::warn!(
                channel = %channel.id,
                senders = ?events.foreign,
                "webhook: events for numbers or pages Herald does not know were ignored"
            );
        }
    }
    let delivery = state.store.delivery();
    if !events.statuses.is_empty() {
        if let Err(e) = delivery.apply_statuses(&events.statuses).await {
            tracing::error!(error = %e, "webhook: cannot store statuses");
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage-unavailable",
                "the event was not stored; Meta will deliver it again",
            );
        }
    }
    for (channel_id, from, at) in &events.inbound {
        if let Err(e) = delivery.record_inbound(*channel_id, from, *at).await {
            tracing::error!(error = %e, "webhook: cannot store an inbound message");
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage-unavailable",
                "the event was not stored; Meta will deliver it again",
            );
        }
    }
    StatusCode::OK.into_response()
}

async fn channel_of(state: &AppState, id: &str) -> Option<Channel> {
    let id: Uuid = id.parse().ok()?;
    match state.store.delivery().channel(id).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "webhook: cannot load the channel");
            None
        }
    }
}

/// Checks `sha256=<hex>` against HMAC-SHA256 of the raw body, in constant time.
pub fn signature_valid(secret: &str, body: &[u8], header: &str) -> bool {
    let Some(hex_sig) = header.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig.trim()) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What one webhook delivery carried.
#[derive(Debug, Default, PartialEq)]
pub struct Events {
    pub statuses: Vec<StatusEvent>,
    /// Inbound messages: the channel, the user who wrote, and when.
    pub inbound: Vec<(Uuid, String, DateTime<Utc>)>,
    /// Meta ids (numbers, pages) that events named but the resolver did not know; their events
    /// are left out.
    pub foreign: Vec<String>,
}

/// Parses a webhook body of any of the three platforms. `resolve` maps the Meta id an event
/// belongs to (WhatsApp's `metadata.phone_number_id`, Messenger's and Instagram's `entry.id`) to
/// its channel; events whose id it does not know are left out and listed in `foreign`. Unknown
/// fields and event types are ignored (Meta adds them); a body that is not Meta's shape is an
/// error.
pub fn parse(
    channel: &Channel,
    body: &[u8],
    resolve: &dyn Fn(&str) -> Option<Uuid>,
) -> Result<Events, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let object = v.get("object").and_then(Value::as_str).unwrap_or("");
    let entries = v
        .get("entry")
        .and_then(Value::as_array)
        .ok_or("no entry array")?;
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
                    let sender = value
                        .pointer("/metadata/phone_number_id")
                        .and_then(Value::as_str)
                        .unwrap_or(&channel.sender_id);
                    let Some(channel_id) = resolve(sender) else {
                        out.foreign.push(sender.to_owned());
                        continue;
                    };
                    for s in value
                        .get("statuses")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        if let Some(e) = wa_status(channel_id, s) {
                            out.statuses.push(e);
                        }
                    }
                    for m in value
                        .get("messages")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        if let (Some(from), Some(at)) = (
                            m.get("from").and_then(Value::as_str),
                            m.get("timestamp")
                                .and_then(Value::as_str)
                                .and_then(unix_seconds),
                        ) {
                            out.inbound.push((channel_id, from.to_owned(), at));
                        }
                    }
                }
            }
        }
        "page" | "instagram" => {
            for entry in entries {
                let sender = entry
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or(&channel.sender_id);
                let Some(channel_id) = resolve(sender) else {
                    out.foreign.push(sender.to_owned());
                    continue;
                };
                for m in entry
                    .get("messaging")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    messenger_item(channel_id, m, &mut out);
                }
            }
        }
        other => return Err(format!("unknown webhook object {other:?}")),
    }
    Ok(out)
}

fn unix_seconds(s: &str) -> Option<DateTime<Utc>> {
    let secs: i64 = s.parse().ok()?;
    Utc.timestamp_opt(secs, 0).single()
}

fn unix_millis(v: &Value) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(v.as_i64()?).single()
}

fn wa_status(channel_id: Uuid, s: &Value) -> Option<StatusEvent> {
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
            .unwrap_or_else(Utc::now),
    })
}

fn messenger_item(channel_id: Uuid, m: &Value, out: &mut Events) {
    let at = m
        .get("timestamp")
        .and_then(unix_millis)
        .unwrap_or_else(Utc::now);
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
        } else if let Some(from) = m.pointer("/sender/id").and_then(Value::as_str) {
            out.inbound.push((channel_id, from.to_owned(), at));
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
