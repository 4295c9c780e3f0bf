//! Operators' routes: readiness, Prometheus metrics, and the jobs and queues behind the admin
//! token (`/v1/admin/...`), plus pausing and resuming a channel with a workspace key.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use herald_engine::model::QueueStat;
use herald_engine::{Job, JobFilter, JobId, JobState};
use serde::Deserialize;
use serde_json::json;

use crate::v1::{Admin, ApiError, Caller, MAX_PAGE};
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/admin/queues", get(queues))
        .route("/v1/admin/jobs", get(jobs))
        .route("/v1/admin/jobs/{id}", get(job))
        .route("/v1/admin/jobs/{id}/retry", post(retry))
        .route("/v1/admin/jobs/{id}/cancel", post(cancel))
        .route("/v1/channels/{id}/pause", post(pause_channel))
        .route("/v1/channels/{id}/resume", post(resume_channel))
}

/// Webhook outcomes, counted since the process started.
#[derive(Debug, Default)]
pub struct Metrics {
    pub webhooks_accepted: AtomicU64,
    pub webhooks_bad_signature: AtomicU64,
    pub webhooks_malformed: AtomicU64,
    pub webhooks_unknown_channel: AtomicU64,
    pub webhooks_too_large: AtomicU64,
    pub webhooks_unavailable: AtomicU64,
    /// Time to answer an accepted webhook (durable store included).
    pub webhook_latency: Histogram,
}

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// A Prometheus histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                self.counts[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// 200 once the database answers; 503 otherwise (a load balancer sends no traffic then).
async fn readyz(State(state): State<AppState>) -> Response {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, Json(json!({ "status": "ready" }))).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readyz: database unreachable");
            crate::problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "not-ready",
                "the database cannot be reached",
            )
        }
    }
}

/// Label values are queue and state names; escape anyway.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut out = String::new();
    let m = &state.metrics;
    let _ = writeln!(
        out,
        "# HELP herald_webhook_requests_total Webhook POSTs by outcome.\n# TYPE herald_webhook_requests_total counter"
    );
    for (outcome, v) in [
        ("accepted", &m.webhooks_accepted),
        ("bad_signature", &m.webhooks_bad_signature),
        ("malformed", &m.webhooks_malformed),
        ("unknown_channel", &m.webhooks_unknown_channel),
        ("too_large", &m.webhooks_too_large),
        ("unavailable", &m.webhooks_unavailable),
    ] {
        let _ = writeln!(
            out,
            "herald_webhook_requests_total{{outcome=\"{outcome}\"}} {}",
            v.load(Ordering::Relaxed)
        );
    }
    m.webhook_latency.render(
        &mut out,
        "herald_webhook_response_seconds",
        "Time to store and acknowledge a webhook delivery.",
    );
    let mut ok = true;
    match state.store.stats().await {
        Ok(stats) => {
            let _ = writeln!(
                out,
                "# HELP herald_jobs Jobs by queue and state (final states: in the archive).\n# TYPE herald_jobs gauge"
            );
            for QueueStat {
                queue,
                state,
                count,
            } in stats
            {
                let _ = writeln!(
                    out,
                    "herald_jobs{{queue=\"{}\",state=\"{}\"}} {count}",
                    label(&queue),
                    state.as_str()
                );
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics: cannot read job counts");
            ok = false;
        }
    }
    match state.store.inbox().webhook_counts().await {
        Ok(c) => {
            let _ = writeln!(
                out,
                "# HELP herald_webhook_deliveries Stored webhook deliveries, and those not applied yet.\n# TYPE herald_webhook_deliveries gauge\nherald_webhook_deliveries{{state=\"stored\"}} {}\nherald_webhook_deliveries{{state=\"pending\"}} {}",
                c.stored, c.pending
            );
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics: cannot read webhook counts");
            ok = false;
        }
    }
    let _ = writeln!(
        out,
        "# HELP herald_metrics_database_up Whether the database answered this scrape.\n# TYPE herald_metrics_database_up gauge\nherald_metrics_database_up {}",
        u8::from(ok)
    );
    (
        StatusCode::OK,
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

async fn queues(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<Json<Vec<QueueStat>>, ApiError> {
    Ok(Json(state.store.stats().await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsQuery {
    queue: Option<String>,
    state: Option<String>,
    kind: Option<String>,
    /// The last job id of the previous page.
    after: Option<JobId>,
    limit: Option<i64>,
}

async fn jobs(
    State(state): State<AppState>,
    _admin: Admin,
    q: Result<Query<JobsQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = q?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let job_state = match q.state.as_deref() {
        None => None,
        Some(s) => Some(
            s.parse::<JobState>()
                .map_err(|_| ApiError::BadRequest(format!("unknown state {s:?}")))?,
        ),
    };
    let mut rows = state
        .store
        .list_jobs(&JobFilter {
            workspace_id: None,
            queue: q.queue,
            state: job_state,
            kind: q.kind,
            after_id: q.after,
            limit: limit + 1,
        })
        .await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next = if more {
        rows.last().map(|j| j.id)
    } else {
        None
    };
    Ok(Json(json!({ "data": rows, "next_cursor": next })))
}

fn job_id(raw: &str) -> Result<JobId, ApiError> {
    raw.parse().map_err(|_| ApiError::NotFound("job"))
}

async fn job(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    state
        .store
        .get_job(job_id(&id)?)
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound("job"))
}

async fn retry(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    let id = job_id(&id)?;
    match state.store.retry_job(id, Utc::now()).await? {
        Some(job) => Ok(Json(job)),
        None if state.store.get_job(id).await?.is_some() => Err(ApiError::Conflict(
            "the job is running or completed, or another job holds its unique key".into(),
        )),
        None => Err(ApiError::NotFound("job")),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    #[serde(default)]
    reason: Option<String>,
}

async fn cancel(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
    body: Option<Json<CancelBody>>,
) -> Result<Json<Job>, ApiError> {
    let id = job_id(&id)?;
    let reason = body
        .and_then(|b| b.0.reason)
        .unwrap_or_else(|| "cancelled by an operator".into());
    match state.store.cancel_job(id, Utc::now(), &reason).await? {
        Some(job) => Ok(Json(job)),
        None if state.store.get_job(id).await?.is_some() => Err(ApiError::Conflict(
            "only a job that is waiting (not running, not final) can be cancelled".into(),
        )),
        None => Err(ApiError::NotFound("job")),
    }
}

async fn set_paused(
    state: &AppState,
    caller: Caller,
    raw: &str,
    reason: Option<&str>,
) -> Result<StatusCode, ApiError> {
    let id: uuid::Uuid = raw.parse().map_err(|_| ApiError::NotFound("channel"))?;
    let delivery = state.store.delivery();
    match delivery.channel(id).await? {
        Some(c) if c.workspace_id == caller.workspace_id => {
            if c.paused_reason.as_deref() == Some(herald_engine::delivery::DISCONNECTED) {
                return Err(ApiError::Conflict(
                    "the channel is disconnected; connect it again".into(),
                ));
            }
            delivery
                .pause_channel(id, reason, false, Utc::now())
                .await?;
            state.channels.forget(id).await;
            Ok(StatusCode::NO_CONTENT)
        }
        _ => Err(ApiError::NotFound("channel")),
    }
}

async fn pause_channel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    set_paused(&state, caller, &id, Some("paused by an operator")).await
}

async fn resume_channel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    set_paused(&state, caller, &id, None).await
}
