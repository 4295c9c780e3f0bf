//! Meta's webhooks, per channel: the verification handshake and signed event deliveries.
//!
//! A POST whose signature and envelope check out is stored raw, in a batch with other requests
//! (group commit, see [`crate::ingest`]), and answered 200 only once committed; Meta redelivers
//! whatever Herald did not store. The events are applied later by the `meta.webhook` job
//! (`herald_workers::meta::webhook`): statuses, inbound messages, de-duplication.
//!
//! Architecture invariant: nothing from a POST is parsed, let alone stored, before its
//! `X-Hub-Signature-256` has been checked against the channel's app secret in constant time.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use herald_engine::delivery::Channel;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::openapi::PROBLEM;
use crate::{problem, AppState, Problem};

/// Largest webhook body accepted. Meta batches events, but a batch stays far below this.
pub const MAX_BODY: usize = 1024 * 1024;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(verify, receive))
}

/// Meta's subscription handshake.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Verify {
    /// `subscribe`.
    #[serde(rename = "hub.mode")]
    mode: Option<String>,
    /// The channel's verify token.
    #[serde(rename = "hub.verify_token")]
    verify_token: Option<String>,
    /// Echoed back when the rest checks out.
    #[serde(rename = "hub.challenge")]
    challenge: Option<String>,
}

/// A delivery from Meta. Only its envelope is checked before it is stored (a known `object` and
/// an `entry` array); the rest is Meta's, applied later by the `meta.webhook` job.
#[derive(ToSchema)]
#[allow(dead_code)] // documentation only: `check_envelope` reads the same two fields
pub struct WebhookEnvelope {
    object: WebhookObject,
    /// Meta's entries, kept as sent.
    entry: Vec<serde_json::Value>,
}

/// The products whose webhooks Herald takes.
#[derive(ToSchema)]
#[allow(dead_code)] // documentation only
#[schema(rename_all = "snake_case")]
pub enum WebhookObject {
    WhatsappBusinessAccount,
    Page,
    Instagram,
}

/// Meta's subscription handshake.
///
/// Answers `hub.challenge` when `hub.mode` is `subscribe` and `hub.verify_token` is the
/// channel's verify token; 403 otherwise.
#[utoipa::path(
    get,
    path = "/webhooks/{channel_id}",
    operation_id = "verify_webhook",
    tag = "webhooks",
    params(("channel_id" = Uuid, Path, description = "The channel's id"), Verify),
    responses(
        (status = 200, description = "`hub.challenge`, echoed", body = String, content_type = "text/plain; charset=utf-8"),
        (status = 403, description = "`hub.mode`, `hub.verify_token` or `hub.challenge` is wrong", body = Problem, content_type = PROBLEM),
        (status = 404, description = "No such channel", body = Problem, content_type = PROBLEM),
    ),
)]
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

/// Receives a signed delivery from Meta.
///
/// Checks the signature, then the envelope, stores the body durably and answers 200 once it is
/// committed. The events are applied later by the `meta.webhook` job.
#[utoipa::path(
    post,
    path = "/webhooks/{channel_id}",
    operation_id = "receive_webhook",
    tag = "webhooks",
    security(("hub_signature" = [])),
    params(("channel_id" = Uuid, Path, description = "The channel's id")),
    request_body(
        content = WebhookEnvelope,
        description = "Meta's delivery, at most 1 MiB, signed in `X-Hub-Signature-256` with the channel's app secret",
    ),
    responses(
        (status = 200, description = "Stored durably (empty body); Meta redelivers anything not answered 200"),
        (status = 400, description = "The body is unreadable, not JSON, or not Meta's envelope", body = Problem, content_type = PROBLEM),
        (status = 401, description = "`X-Hub-Signature-256` is missing or does not match the body", body = Problem, content_type = PROBLEM),
        (status = 404, description = "No such channel", body = Problem, content_type = PROBLEM),
        (status = 413, description = "The body is larger than 1 MiB", body = Problem, content_type = PROBLEM),
        (status = 503, description = "The delivery was not stored (database away, or overloaded); Meta will deliver it again", body = Problem, content_type = PROBLEM),
    ),
)]
pub async fn receive(
    State(state): State<AppState>,
    Path(channel_id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = std::time::Instant::now();
    let m = state.metrics.clone();
    let count = |c: &std::sync::atomic::AtomicU64| {
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    };
    let body = match body {
        Ok(body) => body,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            count(&m.webhooks_too_large);
            return problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                &format!("a webhook body may have at most {MAX_BODY} bytes"),
            );
        }
        Err(e) => {
            count(&m.webhooks_malformed);
            return problem(e.status(), "unreadable-body", &e.body_text());
        }
    };
    let Some(channel) = channel_of(&state, &channel_id).await else {
        count(&m.webhooks_unknown_channel);
        return problem(StatusCode::NOT_FOUND, "unknown-channel", "no such channel");
    };
    let signature = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !signature_valid(&channel.app_secret, &body, signature) {
        count(&m.webhooks_bad_signature);
        return problem(
            StatusCode::UNAUTHORIZED,
            "bad-signature",
            "X-Hub-Signature-256 is missing or does not match the body",
        );
    }
    if let Err(why) = check_envelope(&body) {
        count(&m.webhooks_malformed);
        return problem(StatusCode::BAD_REQUEST, "malformed-webhook", &why);
    }
    match state.ingest.store(channel.id, body.to_vec()).await {
        Ok(()) => {
            count(&m.webhooks_accepted);
            m.webhook_latency.observe(started.elapsed());
            StatusCode::OK.into_response()
        }
        Err(e) => {
            count(&m.webhooks_unavailable);
            // Logged by the ingest (or here, when it refused to queue).
            if matches!(e, crate::ingest::IngestError::Overloaded) {
                tracing::warn!(channel = %channel.id, "webhook: ingest overloaded; refused");
            }
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage-unavailable",
                "the event was not stored; Meta will deliver it again",
            )
        }
    }
}

/// The parts of Meta's envelope every delivery has: a known `object` and an `entry` array.
/// Checked before storing so that a body that can never be processed is refused, not kept:
/// the whole body must also be JSON the webhook worker can parse. The envelope is read with
/// the rest skipped, which checks JSON syntax only; a body that reading cannot vouch for is
/// parsed whole, as the worker will (`webhook_json`, `webhook_envelope`): one that is not an
/// object (serde fills a struct from an array too), one with anything the skipping does not
/// check (invalid UTF-8, a lone surrogate escape, a number out of range, deep nesting, an
/// escaped NUL), and one the typed reading refuses where a `Value` may not (a duplicate field).
pub fn check_envelope(body: &[u8]) -> Result<(), String> {
    #[derive(Deserialize)]
    struct Envelope<'a> {
        #[serde(borrow)]
        object: Option<std::borrow::Cow<'a, str>>,
        entry: Option<Vec<serde::de::IgnoredAny>>,
    }
    let whole = || {
        let v = herald_engine::inbox::webhook_json(body)?;
        herald_engine::inbox::webhook_envelope(&v).map(|_| ())
    };
    if body.trim_ascii_start().first() != Some(&b'{')
        || !herald_engine::inbox::json_strict_enough(body)
    {
        return whole();
    }
    let Ok(e) = serde_json::from_slice::<Envelope<'_>>(body) else {
        return whole();
    };
    herald_engine::inbox::webhook_object(e.object.as_deref(), e.entry.is_some()).map(|_| ())
}

async fn channel_of(state: &AppState, id: &str) -> Option<std::sync::Arc<Channel>> {
    let id: Uuid = id.parse().ok()?;
    state.channels.get(id).await
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

/// Compares secrets without leaking where they differ through timing.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
