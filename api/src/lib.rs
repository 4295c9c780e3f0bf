//! Herald's HTTP layer: health checks, operators' routes, Meta's webhooks (verified, stored
//! durably in batches, processed by the queue) and the `/v1` API, with its OpenAPI 3.1 document
//! at `GET /v1/openapi.json`.
//!
//! [`app`] builds the router from its state, so tests drive it with `oneshot`, no socket.
//!
//! Every route is registered together with its documentation (`utoipa_axum`'s
//! `OpenApiRouter` and `routes!`), so none can be served undocumented: see [`openapi`] for how
//! to add one.

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use herald_engine::{Clock, Store};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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
    /// The engine's throughput, latency and limiter measurements, when an engine runs in this
    /// process (`herald serve`); `/metrics` adds them.
    pub engine_metrics: Option<Arc<herald_engine::metrics::EngineMetrics>>,
}

/// Settings of the HTTP layer.
#[derive(Debug, Clone, Default)]
pub struct ApiConfig {
    pub ingest: IngestConfig,
    /// `HERALD_ADMIN_TOKEN`: the bearer token of the admin routes.
    pub admin_token: Option<String>,
    /// The measurements of the engine running beside the API, for `/metrics`.
    pub engine_metrics: Option<Arc<herald_engine::metrics::EngineMetrics>>,
    /// Applies status-only webhook deliveries as they are stored (see [`ingest`]); None sends
    /// every delivery through the queue.
    pub triage: Option<Arc<dyn herald_engine::inbox::Triage>>,
}

impl AppState {
    /// The state over `store`; starts the ingest's writers on the current runtime.
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, config: ApiConfig) -> AppState {
        AppState {
            ingest: Ingest::start(store.clone(), clock, config.ingest, config.triage),
            channels: Arc::new(ChannelCache::new(
                store.clone(),
                ChannelCacheConfig::default(),
            )),
            admin_token: config.admin_token.filter(|t| !t.is_empty()).map(Arc::from),
            metrics: Arc::new(ops::Metrics::default()),
            engine_metrics: config.engine_metrics,
            store,
        }
    }
}

pub mod cache;
pub mod contacts;
pub mod ingest;
pub mod openapi;
pub mod ops;
pub mod templates;
pub mod v1;
pub mod webhooks;

pub use cache::{ChannelCache, ChannelCacheConfig};
pub use ingest::{Ingest, IngestConfig};

/// The HTTP API over `state`.
pub fn app(state: AppState) -> Router {
    // Built (and serialized) once per process; later calls only look it up.
    let _ = openapi::json();
    let (router, _) = router().split_for_parts();
    router
        .layer(DefaultBodyLimit::max(webhooks::MAX_BODY))
        .with_state(state)
}

/// Every route with its documentation. The only place modules' routes are put together: the
/// OpenAPI document is what this returns beside the router (see [`openapi`]).
pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::base())
        .merge(v1::routes())
        .merge(contacts::routes())
        .merge(templates::routes())
        .merge(ops::routes())
        .merge(webhooks::routes())
        .merge(openapi::routes())
        .routes(routes!(healthz))
}

/// An RFC 9457 problem document, as every error of the API is answered
/// (`Content-Type: application/problem+json`). Never carries internals (those are logged where
/// they happen).
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// `https://herald.dev/problems/<kind>`: stable, for programs (`not-found`, `unauthorized`,
    /// `bad-request`, `invalid`, `conflict`, …).
    #[serde(rename = "type")]
    #[schema(format = "uri", example = "https://herald.dev/problems/not-found")]
    pub kind: String,
    /// The status's reason phrase.
    #[schema(example = "Not Found")]
    pub title: String,
    /// The HTTP status, repeated.
    #[schema(example = 404)]
    pub status: u16,
    /// What went wrong, for people.
    #[schema(example = "no such channel")]
    pub detail: String,
}

/// Answers a [`Problem`]: `kind` is the last segment of its `type`.
pub fn problem(status: StatusCode, kind: &str, detail: &str) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/problem+json")],
        Json(Problem {
            kind: format!("https://herald.dev/problems/{kind}"),
            title: status.canonical_reason().unwrap_or("error").to_owned(),
            status: status.as_u16(),
            detail: detail.to_owned(),
        }),
    )
        .into_response()
}

/// Whether the database answers.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    Ok,
    Unavailable,
}

/// `/healthz`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: HealthStatus,
    /// The storage backend: `postgres` or `sqlite`.
    #[schema(example = "postgres")]
    pub database: &'static str,
}

/// Liveness: 200 when the database answers, 503 otherwise.
///
/// The database's error is logged, not returned.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses(
        (status = 200, description = "The database answers", body = Health,
            example = json!({"status": "ok", "database": "postgres"})),
        (status = 503, description = "The database does not answer", body = Health,
            example = json!({"status": "unavailable", "database": "postgres"})),
    ),
)]
async fn healthz(State(state): State<AppState>) -> Response {
    let database = state.store.backend().as_str();
    match state.store.ping().await {
        Ok(()) => Json(Health {
            status: HealthStatus::Ok,
            database,
        })
        .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "health check: database unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(Health {
                    status: HealthStatus::Unavailable,
                    database,
                }),
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
