//! The OpenAPI 3.1 document of the HTTP API, generated from the code and served at
//! `GET /v1/openapi.json`.
//!
//! Routes and their documentation are registered together. Each module's `routes()` returns a
//! `utoipa_axum` [`OpenApiRouter`] filled only through `.routes(routes!(...))`, and `routes!`
//! accepts only handlers annotated with `#[utoipa::path]`: it takes the method and the path from
//! the annotation, so the route served is the route documented. [`crate::router`] merges the
//! modules; [`crate::app`] keeps the router, [`json`] the document (built once per process).
//!
//! # Adding a route
//!
//! 1. Annotate the handler (see `v1::get_channel` for a complete one):
//!
//!    ```text
//!    #[utoipa::path(
//!        post, path = "/v1/queues/{name}/pause", tag = "operators",
//!        security(("admin_token" = [])),          // or ("api_key" = []); none: public
//!        params(("name" = String, Path, description = "…"), SomeQuery),
//!        request_body = SomeBody,                 // or request_body(content(…)) for non-JSON
//!        responses(
//!            (status = 200, description = "…", body = SomeView),
//!            (status = 401, description = "…", body = Problem, content_type = PROBLEM),
//!            (status = 404, description = "…", body = Problem, content_type = PROBLEM),
//!            (status = "5XX", description = "…", body = Problem, content_type = PROBLEM),
//!        ),
//!    )]
//!    ```
//!
//!    Every error the handler can answer is a [`Problem`](crate::Problem) with the content type
//!    [`PROBLEM`] (`application/problem+json`): list each status it can return.
//! 2. Register it in its module's `routes()` with `.routes(routes!(handler))`. Handlers of the
//!    same path (different methods) go in one `routes!(get_x, delete_x)`; different paths in
//!    separate `.routes(...)` calls (`routes!` serves every handler it is given on every path
//!    among them). Never `.route(...)`: that would serve the route undocumented.
//!    A new tag is declared in [`ApiDoc`]'s `tags(...)` first.
//! 3. Derive `utoipa::ToSchema` on the body types (in the engine for engine types; a secret
//!    field of a response type gets `#[serde(skip_serializing)]`, which also keeps it out of the
//!    schema) and `utoipa::IntoParams` on query structs, with doc comments: they become the
//!    descriptions.
//! 4. Add the `(method, path)` to `EXPECTED` in `api/tests/openapi.rs`, which checks that it is
//!    documented, that it answers through the router, and that it documents a 4xx.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;

/// The content type of error answers, for `#[utoipa::path]` responses.
pub const PROBLEM: &str = "application/problem+json";

/// What the document says beyond the routes: title, tags, security schemes, shared schemas.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Herald API",
        description = "Herald's HTTP API: workspaces and API keys, channels, contacts, Meta's \
            webhooks, operators' routes and health checks. Errors are RFC 9457 problem documents \
            (`application/problem+json`). Lists are paged by cursor: `?limit=` (1 to 200, \
            default 50) and `?after=` (the `next_cursor` of the previous page, null on the \
            last page)."
    ),
    tags(
        (name = "workspaces", description = "Tenants. Creating and listing them takes the admin token; a key reads its own."),
        (name = "api-keys", description = "A workspace's API keys. A key's secret is shown once, when it is created."),
        (name = "channels", description = "Senders on Meta's platforms (a WhatsApp number, a page, an Instagram account). Their secrets go in and never come out."),
        (name = "contacts", description = "The people a workspace messages, and their bulk import."),
        (name = "templates", description = "References to WhatsApp message templates approved in Meta's WhatsApp Manager, which campaigns and flows send with their parameters filled."),
        (name = "webhooks", description = "Meta's webhooks for a channel: the subscription handshake and signed deliveries."),
        (name = "operators", description = "Jobs and queues (admin token), Prometheus metrics, this document."),
        (name = "health", description = "Liveness and readiness, for load balancers and orchestrators."),
    ),
    modifiers(&SecuritySchemes),
    components(schemas(crate::Problem)),
)]
struct ApiDoc;

/// The security schemes operations name in `security(...)`.
struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("hk_<id>_<secret>")
                    .description(Some(
                        "A workspace's API key: `Authorization: Bearer hk_...`. Every query is \
                         scoped to the key's workspace; another workspace's ids answer 404.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The operator's token, `HERALD_ADMIN_TOKEN`: `Authorization: Bearer \
                         <token>`. Without one configured, the admin routes answer 404.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "hub_signature",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Hub-Signature-256",
                "Meta's signature of the delivery: `sha256=<hex HMAC-SHA256 of the raw body, \
                 keyed with the channel's app secret>`, checked before anything is parsed.",
            ))),
        );
    }
}

/// The document's base, which [`crate::router`] adds the routes to.
pub(crate) fn base() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document, serialized once per process.
pub fn json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        let (_, doc) = crate::router().split_for_parts();
        doc.to_json().expect("the OpenAPI document serializes")
    })
}

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(openapi_json))
}

/// This document.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    operation_id = "openapi",
    tag = "operators",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this API",
            body = Object, content_type = "application/json"),
    ),
)]
async fn openapi_json() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], json())
}
