//! Operators' routes: readiness, Prometheus metrics, and the jobs and queues behind the admin
//! token (`/v1/admin/...`), plus pausing and resuming a channel with a workspace key.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use herald_engine::model::QueueStat;
use herald_engine::{Job, JobFilter, JobId, JobState};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use herald_engine::metrics::{label, Histogram};

use crate::openapi::PROBLEM;
use crate::v1::{own_channel, page_limit, path_id, Admin, ApiError, Caller, Page};
use crate::{AppState, Problem};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(queues))
        .routes(routes!(jobs))
        .routes(routes!(job))
        .routes(routes!(retry))
        .routes(routes!(cancel))
        .routes(routes!(discard))
        .routes(routes!(pause_queue))
        .routes(routes!(resume_queue))
        .routes(routes!(pause_channel))
        .routes(routes!(resume_channel))
}

/// The operators' routes of a process that serves no API (`herald worker`): `/metrics` (with
/// the engine's measurements given in `state`), `/healthz` and `/readyz`. Not part of the API,
/// so not in its OpenAPI document.
pub fn monitoring(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/readyz", axum::routing::get(readyz))
        .route("/healthz", axum::routing::get(crate::healthz))
        .with_state(state)
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

/// `/readyz`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ready {
    /// Always `ready`.
    #[schema(example = "ready")]
    pub status: &'static str,
}

/// Readiness: 200 once the database answers, 503 otherwise.
///
/// A load balancer sends no traffic while it answers 503.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready: the database answers", body = Ready),
        (status = 503, description = "Not ready: the database does not answer", body = Problem, content_type = PROBLEM),
    ),
)]
async fn readyz(State(state): State<AppState>) -> Response {
    match state.store.ping().await {
        Ok(()) => (StatusCode::OK, Json(Ready { status: "ready" })).into_response(),
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

/// Prometheus metrics.
///
/// Webhook requests by outcome and their latency, jobs by queue and state, paused queues, stored
/// and pending webhook deliveries, and whether the database answered this scrape; with an
/// engine in the process, jobs finished per queue and outcome (throughput), their wait and run
/// time histograms, and rate-limit permits per channel with the limiter's mode. Always 200: what the
/// database could not tell is left out, and `herald_metrics_database_up` is 0.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operators",
    responses(
        (status = 200, description = "The Prometheus text exposition format (0.0.4)", body = String,
            content_type = METRICS_CONTENT_TYPE),
    ),
)]
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
    match state.store.paused_queues().await {
        Ok(paused) => {
            let _ = writeln!(
                out,
                "# HELP herald_queue_paused Queues an operator paused (1 while paused).\n# TYPE herald_queue_paused gauge"
            );
            for p in paused {
                let _ = writeln!(
                    out,
                    "herald_queue_paused{{queue=\"{}\"}} 1",
                    label(&p.queue)
                );
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics: cannot read paused queues");
            ok = false;
        }
    }
    if let Some(engine) = &state.engine_metrics {
        engine.render(&mut out);
    }
    let _ = writeln!(
        out,
        "# HELP herald_metrics_database_up Whether the database answered this scrape.\n# TYPE herald_metrics_database_up gauge\nherald_metrics_database_up {}",
        u8::from(ok)
    );
    (
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        out,
    )
        .into_response()
}

/// Prometheus's text format.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A queue: whether it is paused, and its jobs per state.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueView {
    pub queue: String,
    pub paused: bool,
    /// When and why an operator paused it.
    #[schema(required = true)]
    pub paused_at: Option<chrono::DateTime<Utc>>,
    #[schema(required = true)]
    pub paused_reason: Option<String>,
    /// Jobs per state (final states: in the archive); states without jobs are left out.
    pub jobs: BTreeMap<String, i64>,
}

/// `?limit=&after=`: pages of queues by name.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct QueuesQuery {
    /// Page size: 1 to 200, default 50.
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
    /// The `next_cursor` of the previous page (a queue name).
    after: Option<String>,
}

/// Queues with their jobs per state, and whether each is paused.
#[utoipa::path(
    get,
    path = "/v1/admin/queues",
    operation_id = "list_queues",
    tag = "operators",
    security(("admin_token" = [])),
    params(QueuesQuery),
    responses(
        (status = 200, description = "A page of the queues that have jobs or are paused, by name", body = Page<QueueView>),
        (status = 400, description = "A bad `limit`, or an unknown parameter", body = Problem, content_type = PROBLEM),
        (status = 401, description = "No admin token, or a wrong one", body = Problem, content_type = PROBLEM),
        (status = 404, description = "The admin routes are closed (no `HERALD_ADMIN_TOKEN`)", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn queues(
    State(state): State<AppState>,
    _admin: Admin,
    q: Result<Query<QueuesQuery>, QueryRejection>,
) -> Result<Json<Page<QueueView>>, ApiError> {
    let Query(q) = q?;
    let limit = page_limit(q.limit)?;
    let mut data: Vec<QueueView> = queue_views(&state, None)
        .await?
        .into_iter()
        .filter(|v| q.after.as_deref().is_none_or(|a| v.queue.as_str() > a))
        .take(limit as usize + 1)
        .collect();
    let next_cursor = if data.len() as i64 > limit {
        data.truncate(limit as usize);
        data.last().map(|v| v.queue.clone())
    } else {
        None
    };
    Ok(Json(Page { data, next_cursor }))
}

/// Every queue that has jobs or is paused (or only `only`), by name.
async fn queue_views(state: &AppState, only: Option<&str>) -> Result<Vec<QueueView>, ApiError> {
    let mut views: BTreeMap<String, QueueView> = BTreeMap::new();
    if let Some(name) = only {
        views.insert(name.to_owned(), QueueView::new(name));
    }
    let wanted = |q: &str| only.is_none_or(|o| o == q);
    for QueueStat {
        queue,
        state,
        count,
    } in state.store.stats().await?
    {
        if wanted(&queue) {
            views
                .entry(queue.clone())
                .or_insert_with(|| QueueView::new(&queue))
                .jobs
                .insert(state.as_str().to_owned(), count);
        }
    }
    for p in state.store.paused_queues().await? {
        if wanted(&p.queue) {
            let v = views
                .entry(p.queue.clone())
                .or_insert_with(|| QueueView::new(&p.queue));
            v.paused = true;
            v.paused_at = Some(p.paused_at);
            v.paused_reason = Some(p.reason);
        }
    }
    Ok(views.into_values().collect())
}

impl QueueView {
    fn new(queue: &str) -> QueueView {
        QueueView {
            queue: queue.to_owned(),
            paused: false,
            paused_at: None,
            paused_reason: None,
            jobs: BTreeMap::new(),
        }
    }
}

/// Why an operator pauses a queue, or cancels or discards a job.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReasonBody {
    /// Shown with the paused queue (at most 500 bytes), or kept on the job's error history; a
    /// default reason when absent.
    #[serde(default)]
    reason: Option<String>,
}

/// The reason in an optional JSON body (absent, `null`, or without `reason`: `default`).
fn reason_or(
    body: Result<Option<Json<Option<ReasonBody>>>, JsonRejection>,
    default: impl FnOnce() -> String,
) -> Result<String, ApiError> {
    Ok(body?
        .and_then(|b| b.0)
        .and_then(|b| b.reason)
        .unwrap_or_else(default))
}

/// Pauses a queue in every process: no job of it starts until it is resumed.
///
/// Running jobs finish; jobs are still enqueued and come due meanwhile. Pausing a paused queue
/// keeps its first reason.
#[utoipa::path(
    post,
    path = "/v1/admin/queues/{name}/pause",
    operation_id = "pause_queue",
    tag = "operators",
    security(("admin_token" = [])),
    params(("name" = String, Path, description = "The queue's name")),
    request_body(
        content = Option<ReasonBody>,
        description = "Optional: without a JSON body, or with `null`, the reason is `paused by an operator`",
    ),
    responses(
        (status = 200, description = "The queue, paused", body = QueueView),
        (status = 400, description = "The body is declared JSON but is not JSON", body = Problem, content_type = PROBLEM),
        (status = 401, description = "No admin token, or a wrong one", body = Problem, content_type = PROBLEM),
        (status = 404, description = "The admin routes are closed (no `HERALD_ADMIN_TOKEN`)", body = Problem, content_type = PROBLEM),
        (status = 422, description = "The body has the wrong shape, the reason is too long, or the name is not 1 to 128 bytes", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn pause_queue(
    State(state): State<AppState>,
    _admin: Admin,
    Path(name): Path<String>,
    body: Result<Option<Json<Option<ReasonBody>>>, JsonRejection>,
) -> Result<Json<QueueView>, ApiError> {
    let reason = reason_or(body, || "paused by an operator".into())?;
    state.store.pause_queue(&name, &reason, Utc::now()).await?;
    queue_view(&state, &name).await.map(Json)
}

/// Resumes a paused queue: its producers claim again at once.
#[utoipa::path(
    post,
    path = "/v1/admin/queues/{name}/resume",
    operation_id = "resume_queue",
    tag = "operators",
    security(("admin_token" = [])),
    params(("name" = String, Path, description = "The queue's name")),
    responses(
        (status = 200, description = "The queue, running", body = QueueView),
        (status = 401, description = "No admin token, or a wrong one", body = Problem, content_type = PROBLEM),
        (status = 404, description = "The queue is not paused, or the admin routes are closed (no `HERALD_ADMIN_TOKEN`)", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn resume_queue(
    State(state): State<AppState>,
    _admin: Admin,
    Path(name): Path<String>,
) -> Result<Json<QueueView>, ApiError> {
    if !state.store.resume_queue(&name).await? {
        return Err(ApiError::NotFound("paused queue"));
    }
    queue_view(&state, &name).await.map(Json)
}

/// One queue's view.
async fn queue_view(state: &AppState, name: &str) -> Result<QueueView, ApiError> {
    queue_views(state, Some(name))
        .await?
        .pop()
        .ok_or(ApiError::Internal)
}

/// `?queue=&state=&kind=&after=&limit=`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct JobsQuery {
    /// Only the jobs of this queue.
    queue: Option<String>,
    /// Only the jobs in this state.
    #[param(value_type = Option<JobState>)]
    state: Option<String>,
    /// Only the jobs of this kind.
    kind: Option<String>,
    /// The last job id of the previous page (its `next_cursor`).
    #[param(value_type = Option<i64>)]
    after: Option<JobId>,
    /// Page size: 1 to 200, default 50.
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
}

/// A page of jobs.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobPage {
    pub data: Vec<Job>,
    /// `?after=` for the next page (a job id); null on the last page.
    #[schema(value_type = Option<i64>, required = true)]
    pub next_cursor: Option<JobId>,
}

/// Jobs by ascending id, unfinished and archived, with their error history.
#[utoipa::path(
    get,
    path = "/v1/admin/jobs",
    operation_id = "list_jobs",
    tag = "operators",
    security(("admin_token" = [])),
    params(JobsQuery),
    responses(
        (status = 200, description = "A page of jobs", body = JobPage),
        (status = 400, description = "A bad `limit`, `state` or `after`, or an unknown parameter", body = Problem, content_type = PROBLEM),
        (status = 401, description = "No admin token, or a wrong one", body = Problem, content_type = PROBLEM),
        (status = 404, description = "The admin routes are closed (no `HERALD_ADMIN_TOKEN`)", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn jobs(
    State(state): State<AppState>,
    _admin: Admin,
    q: Result<Query<JobsQuery>, QueryRejection>,
) -> Result<Json<JobPage>, ApiError> {
    let Query(q) = q?;
    let limit = page_limit(q.limit)?;
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
    Ok(Json(JobPage {
        data: rows,
        next_cursor: next,
    }))
}

/// One job, with its error history.
#[utoipa::path(
    get,
    path = "/v1/admin/jobs/{id}",
    operation_id = "get_job",
    tag = "operators",
    security(("admin_token" = [])),
    params(("id" = i64, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The job", body = Job),
        (status = 401, description = "No admin token, or a wrong one", body = Problem, content_type = PROBLEM),
        (status = 404, description = "No such job, or the admin routes are closed (no `HERALD_ADMIN_TOKEN`)", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn job(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    state
        .store
        .get_job(path_id::<JobId>(&id, "job")?)
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound("job"))
}

/// Runs a job again now (operator retry).
///
/// For a discarded, cancelled, scheduled or retryable job; a discarded or cancelled one gets a
/// fresh set of attempts.
#[utoipa::path(
    post,
    path = "/v1/admin/jobs/{id}/retry",
    operation_id = "retry_job",
    tag = "operators",
    security(("admin_token" = [])),
    params(("id" = i64, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The job, available again", body = Job),
        (status = 401, description = "No admin token, or a wrong one", body = Problem, content_type = PROBLEM),
        (status = 404, description = "No such job, or the admin routes are closed (no `HERALD_ADMIN_TOKEN`)", body = Problem, content_type = PROBLEM),
        (status = 409, description = "The job is running or completed, or another job holds its unique key", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn retry(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    let id = path_id::<JobId>(&id, "job")?;
    match state.store.retry_job(id, Utc::now()).await? {
        Some(job) => Ok(Json(job)),
        None if state.store.get_job(id).await?.is_some() => Err(ApiError::Conflict(
            "the job is running or completed, or another job holds its unique key".into(),
        )),
        None => Err(ApiError::NotFound("job")),
    }
}

/// Cancels a job that is waiting (not running, not final).
#[utoipa::path(
    post,
    path = "/v1/admin/jobs/{id}/cancel",
    operation_id = "cancel_job",
    tag = "operators",
    security(("admin_token" = [])),
    params(("id" = i64, Path, description = "The job's id")),
    request_body(
        content = Option<ReasonBody>,
        description = "Optional: without a JSON body (no `Content-Type: application/json`), or with `null`, the reason is `cancelled by an operator`",
    ),
    responses(
        (status = 200, description = "The job, cancelled", body = Job),
        (status = 400, description = "The body is declared JSON but is not JSON", body = Problem, content_type = PROBLEM),
        (status = 401, description = "No admin token, or a wrong one", body = Problem, content_type = PROBLEM),
        (status = 404, description = "No such job, or the admin routes are closed (no `HERALD_ADMIN_TOKEN`)", body = Problem, content_type = PROBLEM),
        (status = 409, description = "The job is running or final", body = Problem, content_type = PROBLEM),
        (status = 422, description = "The body has the wrong shape", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn cancel(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
    body: Result<Option<Json<Option<ReasonBody>>>, JsonRejection>,
) -> Result<Json<Job>, ApiError> {
    end_job(&state, &id, body, JobState::Cancelled).await
}

/// An operator's cancel or discard (`to`) of a waiting job, with the body's reason or a default.
async fn end_job(
    state: &AppState,
    id: &str,
    body: Result<Option<Json<Option<ReasonBody>>>, JsonRejection>,
    to: JobState,
) -> Result<Json<Job>, ApiError> {
    let id = path_id::<JobId>(id, "job")?;
    let reason = reason_or(body, || format!("{to} by an operator"))?;
    let now = Utc::now();
    let ended = if to == JobState::Discarded {
        state.store.discard_job(id, now, &reason).await?
    } else {
        state.store.cancel_job(id, now, &reason).await?
    };
    match ended {
        Some(job) => Ok(Json(job)),
        None if state.store.get_job(id).await?.is_some() => Err(ApiError::Conflict(format!(
            "only a job that is waiting (not running, not final) can be {to}"
        ))),
        None => Err(ApiError::NotFound("job")),
    }
}

/// Discards a job that is waiting (not running, not final).
///
/// It will not run, and stays for inspection and operator retry, like a job whose attempts ran
/// out.
#[utoipa::path(
    post,
    path = "/v1/admin/jobs/{id}/discard",
    operation_id = "discard_job",
    tag = "operators",
    security(("admin_token" = [])),
    params(("id" = i64, Path, description = "The job's id")),
    request_body(
        content = Option<ReasonBody>,
        description = "Optional: without a JSON body, or with `null`, the reason is `discarded by an operator`",
    ),
    responses(
        (status = 200, description = "The job, discarded", body = Job),
        (status = 400, description = "The body is declared JSON but is not JSON", body = Problem, content_type = PROBLEM),
        (status = 401, description = "No admin token, or a wrong one", body = Problem, content_type = PROBLEM),
        (status = 404, description = "No such job, or the admin routes are closed (no `HERALD_ADMIN_TOKEN`)", body = Problem, content_type = PROBLEM),
        (status = 409, description = "The job is running or final", body = Problem, content_type = PROBLEM),
        (status = 422, description = "The body has the wrong shape", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn discard(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
    body: Result<Option<Json<Option<ReasonBody>>>, JsonRejection>,
) -> Result<Json<Job>, ApiError> {
    end_job(&state, &id, body, JobState::Discarded).await
}

async fn set_paused(
    state: &AppState,
    caller: Caller,
    raw: &str,
    reason: Option<&str>,
) -> Result<StatusCode, ApiError> {
    let channel = own_channel(state, caller, raw).await?;
    if channel.paused_reason.as_deref() == Some(herald_engine::delivery::DISCONNECTED) {
        return Err(ApiError::Conflict(
            "the channel is disconnected; connect it again".into(),
        ));
    }
    state
        .store
        .delivery()
        .pause_channel(channel.id, reason, false, Utc::now())
        .await?;
    state.channels.forget(channel.id).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Pauses one of the caller's channels: it sends nothing until resumed.
#[utoipa::path(
    post,
    path = "/v1/channels/{id}/pause",
    operation_id = "pause_channel",
    tag = "channels",
    security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "The channel's id")),
    responses(
        (status = 204, description = "Paused"),
        (status = 401, description = "No API key, or not a valid one", body = Problem, content_type = PROBLEM),
        (status = 404, description = "No such channel in the caller's workspace", body = Problem, content_type = PROBLEM),
        (status = 409, description = "The channel is disconnected", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn pause_channel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    set_paused(&state, caller, &id, Some("paused by an operator")).await
}

/// Resumes one of the caller's channels.
///
/// Paused by an operator or by Meta's answers (190, 368, 131048): resume it once the cause is
/// fixed.
#[utoipa::path(
    post,
    path = "/v1/channels/{id}/resume",
    operation_id = "resume_channel",
    tag = "channels",
    security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "The channel's id")),
    responses(
        (status = 204, description = "Resumed"),
        (status = 401, description = "No API key, or not a valid one", body = Problem, content_type = PROBLEM),
        (status = 404, description = "No such channel in the caller's workspace", body = Problem, content_type = PROBLEM),
        (status = 409, description = "The channel is disconnected", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn resume_channel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    set_paused(&state, caller, &id, None).await
}
