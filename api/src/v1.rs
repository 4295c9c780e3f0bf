//! The `/v1` API: workspaces and API keys, channels.
//!
//! Every route but the admin ones takes `Authorization: Bearer <API key>`, and every query it
//! makes is scoped to the key's workspace: another workspace's ids answer 404, exactly like ids
//! that do not exist. Admin routes (creating and listing workspaces) take the admin token from
//! `HERALD_ADMIN_TOKEN`; without one configured they answer 404, as if absent.
//!
//! Lists are paginated by cursor: `?limit=N` (1 to [`MAX_PAGE`], default [`DEFAULT_PAGE`]) and
//! `?after=<next_cursor of the previous page>`; each page is `{"data": [...], "next_cursor":
//! ...}`, the cursor null on the last page.
//!
//! Errors are RFC 9457 problem documents with a stable `type`; internals are logged, never
//! returned.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use chrono::Utc;
use herald_engine::delivery::{Channel, ChannelLimits, NewChannel, Platform};
use herald_engine::StoreError;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use crate::{problem, AppState};

/// Largest page a list returns.
pub const MAX_PAGE: i64 = 200;
/// Page size without `?limit`.
pub const DEFAULT_PAGE: i64 = 50;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/workspaces",
            post(create_workspace).get(list_workspaces),
        )
        .route("/v1/workspace", get(own_workspace))
        .route("/v1/api-keys", post(create_key).get(list_keys))
        .route("/v1/api-keys/{id}", delete(revoke_key))
        .route("/v1/channels", post(create_channel).get(list_channels))
        .route(
            "/v1/channels/{id}",
            get(get_channel).delete(disconnect_channel),
        )
}

/// An error of the API, answered as a problem document.
#[derive(Debug)]
pub enum ApiError {
    /// No credentials, or wrong ones.
    Unauthorized,
    /// Not there, or not the caller's.
    NotFound(&'static str),
    /// The request cannot be read (JSON, query, path).
    BadRequest(String),
    /// Read, but refused (a rule of the data).
    Invalid(String),
    /// It would duplicate something unique.
    Conflict(String),
    /// The body is not of a type the route takes.
    Unsupported(String),
    /// The body is larger than the route takes.
    TooLarge(String),
    /// The database is away; retry later.
    Unavailable,
    /// A bug or corrupt data; logged where it happened.
    Internal,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Unauthorized => problem(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid API key is required: Authorization: Bearer <key>",
            ),
            ApiError::NotFound(what) => problem(
                StatusCode::NOT_FOUND,
                "not-found",
                &format!("no such {what}"),
            ),
            ApiError::BadRequest(why) => problem(StatusCode::BAD_REQUEST, "bad-request", &why),
            ApiError::Invalid(why) => problem(StatusCode::UNPROCESSABLE_ENTITY, "invalid", &why),
            ApiError::Conflict(why) => problem(StatusCode::CONFLICT, "conflict", &why),
            ApiError::Unsupported(why) => problem(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                &why,
            ),
            ApiError::TooLarge(why) => {
                problem(StatusCode::PAYLOAD_TOO_LARGE, "body-too-large", &why)
            }
            ApiError::Unavailable => problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the database cannot be reached; try again",
            ),
            ApiError::Internal => problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "something went wrong on our side; it has been logged",
            ),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Invalid(why) => ApiError::Invalid(why.0),
            StoreError::Conflict(why) => ApiError::Conflict(why),
            e if e.is_transient() => {
                tracing::warn!(error = %e, "api: database unavailable");
                ApiError::Unavailable
            }
            e => {
                tracing::error!(error = %e, "api: store error");
                ApiError::Internal
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        // Well-formed JSON of the wrong shape is 422 (like a rule of the data); anything that
        // is not JSON at all (or not declared as JSON) is 400.
        if e.status() == StatusCode::UNPROCESSABLE_ENTITY {
            ApiError::Invalid(e.body_text())
        } else {
            ApiError::BadRequest(e.body_text())
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError::BadRequest(e.body_text())
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The caller an API key stands for.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub workspace_id: Uuid,
    pub key_id: Uuid,
}

fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Caller> {
        let presented = bearer(parts).ok_or(ApiError::Unauthorized)?;
        // Keys have a fixed shape; anything else is refused without a query.
        if !presented.starts_with("hk_") || presented.len() > 200 {
            return Err(ApiError::Unauthorized);
        }
        let key = state
            .store
            .tenancy()
            .authenticate(presented)
            .await?
            .ok_or(ApiError::Unauthorized)?;
        Ok(Caller {
            workspace_id: key.workspace_id,
            key_id: key.id,
        })
    }
}

/// The operator holding `HERALD_ADMIN_TOKEN`.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Admin> {
        let Some(token) = state.admin_token.as_deref() else {
            return Err(ApiError::NotFound("route"));
        };
        let presented = bearer(parts).ok_or(ApiError::Unauthorized)?;
        if crate::webhooks::constant_time_eq(presented.as_bytes(), token.as_bytes()) {
            Ok(Admin)
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

/// `?limit=&after=`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    limit: Option<i64>,
    after: Option<String>,
}

impl PageQuery {
    fn parse(q: Result<Query<PageQuery>, QueryRejection>) -> ApiResult<(Option<Uuid>, i64)> {
        let Query(q) = q?;
        PageQuery::check(q.limit, q.after)
    }

    /// The cursor and page size of `?limit=&after=`, checked.
    pub fn check(limit: Option<i64>, after: Option<String>) -> ApiResult<(Option<Uuid>, i64)> {
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(ApiError::BadRequest(format!(
                "limit must be between 1 and {MAX_PAGE}"
            )));
        }
        let after = match after {
            None => None,
            Some(c) => Some(c.parse::<Uuid>().map_err(|_| {
                ApiError::BadRequest("after is not a cursor from a previous page".into())
            })?),
        };
        Ok((after, limit))
    }
}

/// A page of a list.
#[derive(Debug, Serialize)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// The page of `limit + 1` fetched rows.
    pub fn of(rows: Vec<T>, limit: i64, id: impl Fn(&T) -> Uuid) -> Page<T> {
        page(rows, limit, id)
    }
}

/// Builds a page from `limit + 1` fetched rows.
fn page<T>(mut rows: Vec<T>, limit: i64, id: impl Fn(&T) -> Uuid) -> Page<T> {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit.max(0) as usize);
    let next_cursor = if more {
        rows.last().map(|r| id(r).to_string())
    } else {
        None
    };
    Page {
        data: rows,
        next_cursor,
    }
}

fn path_id(raw: &str, what: &'static str) -> ApiResult<Uuid> {
    raw.parse().map_err(|_| ApiError::NotFound(what))
}

// ---------------------------------------------------------------------------------------------
// Workspaces and keys

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameBody {
    name: String,
}

async fn create_workspace(
    State(state): State<AppState>,
    _admin: Admin,
    body: Result<Json<NameBody>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(body) = body?;
    let tenancy = state.store.tenancy();
    let workspace = tenancy.create_workspace(&body.name, Utc::now()).await?;
    let key = tenancy
        .create_api_key(workspace.id, "initial", Utc::now())
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "workspace": workspace,
            "api_key": { "id": key.key.id, "prefix": key.key.prefix, "key": key.secret },
        })),
    )
        .into_response())
}

async fn list_workspaces(
    State(state): State<AppState>,
    _admin: Admin,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> ApiResult<Json<Page<herald_engine::tenancy::Workspace>>> {
    let (after, limit) = PageQuery::parse(q)?;
    let rows = state.store.tenancy().workspaces(after, limit + 1).await?;
    Ok(Json(page(rows, limit, |w| w.id)))
}

async fn own_workspace(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<herald_engine::tenancy::Workspace>> {
    let w = state
        .store
        .tenancy()
        .workspace(caller.workspace_id)
        .await?
        .ok_or(ApiError::NotFound("workspace"))?;
    Ok(Json(w))
}

async fn create_key(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<NameBody>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(body) = body?;
    let key = state
        .store
        .tenancy()
        .create_api_key(caller.workspace_id, &body.name, Utc::now())
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": key.key.id,
            "name": key.key.name,
            "prefix": key.key.prefix,
            "created_at": key.key.created_at,
            "key": key.secret,
        })),
    )
        .into_response())
}

async fn list_keys(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> ApiResult<Json<Page<herald_engine::tenancy::ApiKey>>> {
    let (after, limit) = PageQuery::parse(q)?;
    let rows = state
        .store
        .tenancy()
        .api_keys(caller.workspace_id, after, limit + 1)
        .await?;
    Ok(Json(page(rows, limit, |k| k.id)))
}

async fn revoke_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let id = path_id(&id, "API key")?;
    if state
        .store
        .tenancy()
        .revoke_api_key(caller.workspace_id, id, Utc::now())
        .await?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound("API key"))
    }
}

// ---------------------------------------------------------------------------------------------
// Channels

/// What connects a channel. Secrets go in and never come out.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelBody {
    platform: Platform,
    name: String,
    sender_id: String,
    #[serde(default)]
    portfolio_id: Option<String>,
    access_token: String,
    app_secret: String,
    #[serde(default)]
    verify_token: Option<String>,
    #[serde(default)]
    graph_base_url: Option<String>,
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    limits: Option<ChannelLimits>,
}

/// A channel as the API shows it: no secrets, and where Meta must send its webhooks.
#[derive(Serialize)]
pub struct ChannelView {
    #[serde(flatten)]
    channel: Channel,
    webhook_path: String,
}

fn view(channel: Channel) -> ChannelView {
    ChannelView {
        webhook_path: format!("/webhooks/{}", channel.id),
        channel,
    }
}

async fn create_channel(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<ChannelBody>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(b) = body?;
    let channel = state
        .store
        .delivery()
        .create_channel(
            &NewChannel {
                workspace_id: caller.workspace_id,
                platform: b.platform,
                name: b.name,
                sender_id: b.sender_id,
                portfolio_id: b.portfolio_id,
                access_token: b.access_token,
                app_secret: b.app_secret,
                // Meta's handshake needs one; a random one is as good as any the caller picks.
                verify_token: b
                    .verify_token
                    .unwrap_or_else(|| Uuid::new_v4().simple().to_string()),
                graph_base_url: b.graph_base_url,
                api_version: b.api_version,
                limits: b.limits,
            },
            Utc::now(),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(view(channel))).into_response())
}

async fn list_channels(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> ApiResult<Json<Page<ChannelView>>> {
    let (after, limit) = PageQuery::parse(q)?;
    let rows = state
        .store
        .delivery()
        .workspace_channels(caller.workspace_id, after, limit + 1)
        .await?;
    let p = page(rows, limit, |c| c.id);
    Ok(Json(Page {
        data: p.data.into_iter().map(view).collect(),
        next_cursor: p.next_cursor,
    }))
}

/// The caller's channel, or 404 (also for another workspace's).
async fn own_channel(state: &AppState, caller: Caller, raw: &str) -> ApiResult<Channel> {
    let id = path_id(raw, "channel")?;
    match state.store.delivery().channel(id).await? {
        Some(c) if c.workspace_id == caller.workspace_id => Ok(c),
        _ => Err(ApiError::NotFound("channel")),
    }
}

async fn get_channel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<ChannelView>> {
    Ok(Json(view(own_channel(&state, caller, &id).await?)))
}

async fn disconnect_channel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let id = path_id(&id, "channel")?;
    if state
        .store
        .delivery()
        .disconnect_channel(caller.workspace_id, id, Utc::now())
        .await?
    {
        state.channels.forget(id).await;
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound("channel"))
    }
}
