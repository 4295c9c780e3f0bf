//! `/v1/templates`: references to WhatsApp message templates approved in Meta's WhatsApp
//! Manager (name, language, category, the body's parameters), which campaigns and flows send
//! outside the 24 h service window; and `render`, which shows the exact message a send with
//! given values would carry, or why it would be refused.

use std::collections::BTreeMap;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use herald_engine::delivery::Message;
use herald_engine::templates::{NewTemplate, Template, TemplatePatch};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::openapi::PROBLEM;
use crate::v1::{path_id, ApiError, Caller, Page, PageQuery};
use crate::{AppState, Problem};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(read, update, remove))
        .routes(routes!(render))
}

/// Registers a template reference in the caller's workspace.
#[utoipa::path(
    post,
    path = "/v1/templates",
    operation_id = "create_template",
    tag = "templates",
    security(("api_key" = [])),
    request_body = NewTemplate,
    responses(
        (status = 201, description = "The template reference", body = Template),
        (status = 400, description = "The body is not JSON", body = Problem, content_type = PROBLEM),
        (status = 401, description = "No API key, or not a valid one", body = Problem, content_type = PROBLEM),
        (status = 409, description = "The workspace has a template of this name and language", body = Problem, content_type = PROBLEM),
        (status = 422, description = "The body has the wrong shape, or a value is refused (name not [a-z0-9_], language not a Meta code, parameter names)", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<NewTemplate>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(t) = body?;
    let template = state
        .store
        .templates()
        .create_template(caller.workspace_id, &t, Utc::now())
        .await?;
    Ok((StatusCode::CREATED, Json(template)).into_response())
}

/// Lists the caller's template references, by id.
#[utoipa::path(
    get,
    path = "/v1/templates",
    operation_id = "list_templates",
    tag = "templates",
    security(("api_key" = [])),
    params(PageQuery),
    responses(
        (status = 200, description = "A page of template references", body = Page<Template>),
        (status = 400, description = "A bad `limit` or `after`, or an unknown parameter", body = Problem, content_type = PROBLEM),
        (status = 401, description = "No API key, or not a valid one", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn list(
    State(state): State<AppState>,
    caller: Caller,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<Page<Template>>, ApiError> {
    let (after, limit) = PageQuery::parse(q)?;
    let rows = state
        .store
        .templates()
        .templates(caller.workspace_id, after, limit + 1)
        .await?;
    Ok(Json(Page::of(rows, limit, |t| t.id)))
}

/// One of the caller's template references.
#[utoipa::path(
    get,
    path = "/v1/templates/{id}",
    operation_id = "get_template",
    tag = "templates",
    security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "The template reference's id")),
    responses(
        (status = 200, description = "The template reference", body = Template),
        (status = 401, description = "No API key, or not a valid one", body = Problem, content_type = PROBLEM),
        (status = 404, description = "No such template in the caller's workspace", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn read(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Template>, ApiError> {
    state
        .store
        .templates()
        .template(caller.workspace_id, path_id(&id, "template")?)
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound("template"))
}

/// Changes a template reference's category or parameters (name and language are its identity).
#[utoipa::path(
    patch,
    path = "/v1/templates/{id}",
    operation_id = "update_template",
    tag = "templates",
    security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "The template reference's id")),
    request_body = TemplatePatch,
    responses(
        (status = 200, description = "The template reference, changed", body = Template),
        (status = 400, description = "The body is not JSON", body = Problem, content_type = PROBLEM),
        (status = 401, description = "No API key, or not a valid one", body = Problem, content_type = PROBLEM),
        (status = 404, description = "No such template in the caller's workspace", body = Problem, content_type = PROBLEM),
        (status = 422, description = "The body has the wrong shape, or a value is refused", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<TemplatePatch>, JsonRejection>,
) -> Result<Json<Template>, ApiError> {
    let id = path_id(&id, "template")?;
    let Json(patch) = body?;
    state
        .store
        .templates()
        .update_template(caller.workspace_id, id, &patch, Utc::now())
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound("template"))
}

/// Deletes a template reference (sends already queued with it keep their message).
#[utoipa::path(
    delete,
    path = "/v1/templates/{id}",
    operation_id = "delete_template",
    tag = "templates",
    security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "The template reference's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "No API key, or not a valid one", body = Problem, content_type = PROBLEM),
        (status = 404, description = "No such template in the caller's workspace", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state
        .store
        .templates()
        .delete_template(caller.workspace_id, path_id(&id, "template")?)
        .await?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound("template"))
    }
}

/// Values for a template's parameters, by name.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenderRequest {
    /// Every parameter's value, by the parameter's name.
    #[serde(default)]
    pub values: BTreeMap<String, String>,
}

/// The message a send of the template with those values carries.
#[derive(Debug, Serialize, ToSchema)]
pub struct Rendered {
    pub message: Message,
}

/// Fills a template's parameters with values.
///
/// Answers the exact message a campaign or flow would send, or why WhatsApp would refuse it (a
/// missing or unknown parameter, an empty value, a new line).
#[utoipa::path(
    post,
    path = "/v1/templates/{id}/render",
    operation_id = "render_template",
    tag = "templates",
    security(("api_key" = [])),
    params(("id" = Uuid, Path, description = "The template reference's id")),
    request_body = RenderRequest,
    responses(
        (status = 200, description = "The message", body = Rendered),
        (status = 400, description = "The body is not JSON", body = Problem, content_type = PROBLEM),
        (status = 401, description = "No API key, or not a valid one", body = Problem, content_type = PROBLEM),
        (status = 404, description = "No such template in the caller's workspace", body = Problem, content_type = PROBLEM),
        (status = 422, description = "A parameter has no value, an unknown name, or a value WhatsApp refuses", body = Problem, content_type = PROBLEM),
        (status = "5XX", description = "The database is unavailable (503) or something failed on our side (500)", body = Problem, content_type = PROBLEM),
    ),
)]
async fn render(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<RenderRequest>, JsonRejection>,
) -> Result<Json<Rendered>, ApiError> {
    let id = path_id(&id, "template")?;
    let Json(req) = body?;
    let template = state
        .store
        .templates()
        .template(caller.workspace_id, id)
        .await?
        .ok_or(ApiError::NotFound("template"))?;
    let message = template.message(&req.values).map_err(ApiError::Invalid)?;
    Ok(Json(Rendered { message }))
}
