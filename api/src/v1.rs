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
//!
//! Each route is documented where it is defined (`#[utoipa::path]`); see [`crate::openapi`].

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use herald_engine::delivery::{Channel, ChannelLimits, NewChannel, Platform};
use herald_engine::tenancy::{ApiKey, Workspace};
use herald_engine::StoreError;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::openapi::PROBLEM;
use crate::{problem, AppState, Problem};

/// Largest page a list returns.
pub const MAX_PAGE: i64 = 200;
/// Page size without `?limit`.
pub const DEFAULT_PAGE: i64 = 50;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_workspace, list_workspaces))
        .routes(routes!(own_workspace))
        .routes(routes!(create_key, list_keys))
        .routes(routes!(revoke_key))
        .routes(routes!(create_channel, list_channels))
        .routes(routes!(get_channel, disconnect_channel))
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
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Page size: 1 to 200, default 50.
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
    /// The `next_cursor` of the previous page.
    after: Option<String>,
}

impl PageQuery {
    pub(crate) fn parse(
        q: Result<Query<PageQuery>, QueryRejection>,
    ) -> ApiResult<(Option<Uuid>, i64)> {
        let Query(q) = q?;
        PageQuery::check(q.limit, q.after)
    }

    /// The cursor and page size of `?limit=&after=`, checked.
    pub fn check(limit: Option<i64>, after: Option<String>) -> ApiResult<(Option<Uuid>, i64)> {
        let limit = page_limit(limit)?;
        let after = match after {
            None => None,
            Some(c) => Some(c.parse::<Uuid>().map_err(|_| {
                ApiError::BadRequest("after is not a cursor from a previous page".into())
            })?),
        };
        Ok((after, limit))
    }
}

/// The page size of `?limit=`: [`DEFAULT_PAGE`] when absent, refused outside 1 to [`MAX_PAGE`].
pub fn page_limit(limit: Option<i64>) -> ApiResult<i64> {
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    Ok(limit)
}

/// A page of a list.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    pub data: Vec<T>,
    /// `?after=` for the next page; null on the last page.
    #[schema(required = true)]
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

/// An id from the path; one that does not parse names nothing, so it is `what` not found.
pub(crate) fn path_id<T: std::str::FromStr>(raw: &str, what: &'static str) -> ApiResult<T> {
    raw.parse().map_err(|_| ApiError::NotFound(what))
}

// ---------------------------------------------------------------------------------------------
// Workspaces and keys

/// A name: 1 to 200 characters, no control characters.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NameBody {
    #[schema(min_length = 1, max_length = 200, example = "Acme")]
    name: String,
}

/// A workspace just created, with its first API key.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedWorkspace {
    pub workspace: Workspace,
    pub api_key: InitialKey,
}

/// A workspace's first API key (named `initial`).
#[derive(Debug, Serialize, ToSchema)]
pub struct InitialKey {
    pub id: Uuid,
    pub prefix: String,
    /// The whole key, `hk_<id>_<secret>`: the only time it is shown.
    pub key: String,
}

/// An API key just created.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    pub id: Uuid,
    pub name: String,
    /// `hk_<id>_`: enough to recognise the key in a list.
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    /// The whole key, `hk_<id>_<secret>`: the only time it is shown.
    pub key: String,
}

/// Creates a workspace and its first API key.
#[utoipa::path(
    post,
    path = "/v1/workspaces",
    tag = "workspaces",
    security(("admin_token" = [])),
    request_body = NameBody,
    responses(
        (status = 201, description = "The workspace, and its first API key (shown once)", body = CreatedWorkspace),
        (status = 400, description = "The body is not JSON", body = Problem, content_type = PROBLEM),
        (status = 401, description = "No admin token, or a wrong one", body = Problem, content_type = PROBLEM),
        (status = 404, description = "The admin routes are closed (no `HERALD_ADMIN_TOKEN`)", body = Problem, content_type = PROBLEM),
        (status = 422, description = "The body has the wrong shape, or the name is refused", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
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
        Json(CreatedWorkspace {
            workspace,
            api_key: InitialKey {
                id: key.key.id,
                prefix: key.key.prefix,
                key: key.secret,
            },
        }),
    )
        .into_response())
}

/// Lists the workspaces, by id.
#[utoipa::path(
    get,
    path = "/v1/workspaces",
    tag = "workspaces",
    security(("admin_token" = [])),
    params(PageQuery),
    responses(
        (status = 200, description = "A page of workspaces", body = Page<Workspace>),
        (status = 400, description = "A bad `limit` or `after`, or an unknown parameter", body = Problem, content_type = PROBLEM),
        (status = 401, description = "No admin token, or a wrong one", body = Problem, content_type = PROBLEM),
        (status = 404, description = "The admin routes are closed (no `HERALD_ADMIN_TOKEN`)", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn list_workspaces(
    State(state): State<AppState>,
    _admin: Admin,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> ApiResult<Json<Page<Workspace>>> {
    let (after, limit) = PageQuery::parse(q)?;
    let rows = state.store.tenancy().workspaces(after, limit + 1).await?;
    Ok(Json(page(rows, limit, |w| w.id)))
}

/// The workspace of the caller's API key.
#[utoipa::path(
    get,
    path = "/v1/workspace",
    tag = "workspaces",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "The caller's workspace", body = Workspace),
        (status = 401, description = "No API key, or not a valid one", body = Problem, content_type = PROBLEM),
        (status = 404, description = "The workspace is gone", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn own_workspace(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Workspace>> {
    let w = state
        .store
        .tenancy()
        .workspace(caller.workspace_id)
        .await?
        .ok_or(ApiError::NotFound("workspace"))?;
    Ok(Json(w))
}

/// Creates an API key in the caller's workspace.
#[utoipa::path(
    post,
    path = "/v1/api-keys",
    tag = "api-keys",
    security(("api_key" = [])),
    request_body = NameBody,
    responses(
        (status = 201, description = "The key, with its secret (shown once)", body = CreatedKey),
        (status = 400, description = "The body is not JSON", body = Problem, content_type = PROBLEM),
        (status = 401, description = "No API key, or not a valid one", body = Problem, content_type = PROBLEM),
        (status = 422, description = "The body has the wrong shape, or the name is refused", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
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
        Json(CreatedKey {
            id: key.key.id,
            name: key.key.name,
            prefix: key.key.prefix,
            created_at: key.key.created_at,
            key: key.secret,
        }),
    )
        .into_response())
}

/// Lists the caller's workspace's API keys (revoked ones too), by id; never their secrets.
#[utoipa::path(
    get,
    path = "/v1/api-keys",
    tag = "api-keys",
    security(("api_key" = [])),
    params(PageQuery),
    responses(
        (status = 200, description = "A page of API keys", body = Page<ApiKey>),
        (status = 400, description = "A bad `limit` or `after`, or an unknown parameter", body = Problem, content_type = PROBLEM),
        (status = 401, description = "No API key, or not a valid one", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn list_keys(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> ApiResult<Json<Page<ApiKey>>> {
    let (after, limit) = PageQuery::parse(q)?;
    let rows = state
        .store
        .tenancy()
        .api_keys(caller.workspace_id, after, limit + 1)
        .await?;
    Ok(Json(page(rows, limit, |k| k.id)))
}

/// Revokes an API key of the caller's workspace (the caller's own key too).
#[utoipa::path(
    delete,
    path = "/v1/api-keys/{id}",
    tag = "api-keys",
    security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "The key's id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, description = "No API key, or not a valid one", body = Problem, content_type = PROBLEM),
        (status = 404, description = "No such key in the caller's workspace, or already revoked", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
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
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChannelBody {
    platform: Platform,
    name: String,
    /// phone_number_id (WhatsApp), page id (Messenger) or Instagram account id.
    sender_id: String,
    /// The business portfolio whose messaging tier the channel shares (WhatsApp).
    #[serde(default)]
    portfolio_id: Option<String>,
    /// Secret: the Graph API token sends use. Stored encrypted; never returned.
    access_token: String,
    /// Secret: checks the signature of Meta's webhooks. Stored encrypted; never returned.
    app_secret: String,
    /// Secret: Meta's subscription handshake presents it. Random when absent; never returned.
    #[serde(default)]
    verify_token: Option<String>,
    /// Meta's Graph API when absent (another base: the sandbox).
    #[serde(default)]
    graph_base_url: Option<String>,
    /// The Graph API version, `v21.0` when absent.
    #[serde(default)]
    api_version: Option<String>,
    /// Meta's defaults for the platform when absent; absent fields take the defaults.
    #[serde(default)]
    limits: Option<ChannelLimits>,
}

/// A channel as the API shows it: no secrets, and where Meta must send its webhooks.
#[derive(Serialize, ToSchema)]
pub struct ChannelView {
    #[serde(flatten)]
    channel: Channel,
    /// The path of the channel's webhooks, `/webhooks/<id>`, to give Meta.
    webhook_path: String,
}

fn view(channel: Channel) -> ChannelView {
    ChannelView {
        webhook_path: format!("/webhooks/{}", channel.id),
        channel,
    }
}

/// Connects a channel to the caller's workspace.
#[utoipa::path(
    post,
    path = "/v1/channels",
    tag = "channels",
    security(("api_key" = [])),
    request_body = ChannelBody,
    responses(
        (status = 201, description = "The channel (without its secrets)", body = ChannelView),
        (status = 400, description = "The body is not JSON", body = Problem, content_type = PROBLEM),
        (status = 401, description = "No API key, or not a valid one", body = Problem, content_type = PROBLEM),
        (status = 422, description = "The body has the wrong shape, or a value is refused (limits, URL, …)", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
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

/// Lists the caller's workspace's channels, by id.
#[utoipa::path(
    get,
    path = "/v1/channels",
    tag = "channels",
    security(("api_key" = [])),
    params(PageQuery),
    responses(
        (status = 200, description = "A page of channels", body = Page<ChannelView>),
        (status = 400, description = "A bad `limit` or `after`, or an unknown parameter", body = Problem, content_type = PROBLEM),
        (status = 401, description = "No API key, or not a valid one", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
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
pub(crate) async fn own_channel(state: &AppState, caller: Caller, raw: &str) -> ApiResult<Channel> {
    let id = path_id(raw, "channel")?;
    match state.store.delivery().channel(id).await? {
        Some(c) if c.workspace_id == caller.workspace_id => Ok(c),
        _ => Err(ApiError::NotFound("channel")),
    }
}

/// One of the caller's channels.
#[utoipa::path(
    get,
    path = "/v1/channels/{id}",
    tag = "channels",
    security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "The channel's id")),
    responses(
        (status = 200, description = "The channel (without its secrets)", body = ChannelView),
        (status = 401, description = "No API key, or not a valid one", body = Problem, content_type = PROBLEM),
        (status = 404, description = "No such channel in the caller's workspace", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn get_channel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<ChannelView>> {
    Ok(Json(view(own_channel(&state, caller, &id).await?)))
}

/// Disconnects one of the caller's channels: its secrets are erased and it sends nothing more.
#[utoipa::path(
    delete,
    path = "/v1/channels/{id}",
    tag = "channels",
    security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "The channel's id")),
    responses(
        (status = 204, description = "Disconnected"),
        (status = 401, description = "No API key, or not a valid one", body = Problem, content_type = PROBLEM),
        (status = 404, description = "No such channel in the caller's workspace", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
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
