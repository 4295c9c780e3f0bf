//! Herald's HTTP layer. Today: health checks and Meta's webhooks (verified, stored durably in
//! batches, processed by the queue). The `/v1` API lands here.
//!
//! [`app`] builds the router from its state, so tests drive it with `oneshot`, no socket.

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use herald_engine::{Clock, Store};
use serde_json::json;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    /// Stores webhook deliveries in batches.
    pub ingest: Ingest,
    /// Channels by id, for the webhook path (one lookup per request otherwise).
    pub channels: Arc<ChannelCache>,
    /// Opens the admin routes (workspaces); None closes them.
    pub admin_token: Option<Arc<str>>,
    /// Counters for `/metrics`.
    pub metrics: Arc<ops::Metrics>,
}

/// Settings of the HTTP layer.
#[derive(Debug, Clone, Default)]
pub struct ApiConfig {
    pub ingest: IngestConfig,
    /// `HERALD_ADMIN_TOKEN`: the bearer token of the admin routes.
    pub admin_token: Option<String>,
}

impl AppState {
    /// The state over `store`; starts the ingest's writers on the current runtime.
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, config: ApiConfig) -> AppState {
        AppState {
            ingest: Ingest::start(store.clone(), clock, config.ingest),
            channels: Arc::new(ChannelCache::new(
                store.clone(),
                ChannelCacheConfig::default(),
            )),
            admin_token: config.admin_token.filter(|t| !t.is_empty()).map(Arc::from),
            metrics: Arc::new(ops::Metrics::default()),
            store,
        }
    }
}

pub mod cache;
pub mod contacts;
pub mod ingest;
pub mod ops;
pub mod v1;
pub mod webhooks;

pub use cache::{ChannelCache, ChannelCacheConfig};
pub use ingest::{Ingest, IngestConfig};

pub fn app(state: AppState) -> Router {
    Router::new()
        .merge(v1::routes())
        .merge(contacts::routes())
        .merge(ops::routes())
        .route("/healthz", get(healthz))
        .route(
            "/webhooks/{channel_id}",
            get(webhooks::verify).post(webhooks::receive),
        )
        .layer(DefaultBodyLimit::max(webhooks::MAX_BODY))
        .with_state(state)
}

/// An RFC 9457 problem: a stable `type`, a status, and a message for people. Never carries
/// internals (those are logged where they happen).
pub fn problem(status: StatusCode, kind: &str, detail: &str) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/problem+json")],
        Json(json!({
            "type": format!("https://herald.dev/problems/{kind}"),
            "title": status.canonical_reason().unwrap_or("error"),
            "status": status.as_u16(),
            "detail": detail,
        })),
    )
        .into_response()
}

/// 200 when the database answers, 503 otherwise (the error is logged, not returned).
async fn healthz(State(state): State<AppState>) -> Response {
    match state.store.ping().await {
        Ok(()) => Json(json!({"status": "ok", "database": state.store.backend().as_str()}))
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "health check: database unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "unavailable", "database": state.store.backend().as_str()})),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    #[tokio::test]
    async fn healthz_reports_the_database() {
        let path = std::env::temp_dir().join(format!("herald_api_{}.db", std::process::id()));
        let store = herald_engine::connect(
            &format!("sqlite:{}", path.display()),
            &herald_engine::ConnectOptions::default(),
        )
        .await
        .expect("open sqlite");
        let response = app(AppState::new(
            store,
            Arc::new(herald_engine::SystemClock),
            ApiConfig::default(),
        ))
        .oneshot(
            Request::get("/healthz")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        let _ = std::fs::remove_file(&path);
    }
}
