//! The OpenAPI document at `/v1/openapi.json`: it is OpenAPI 3.1, it documents exactly the
//! routes the router serves (each one called through `app(state)` with `oneshot`, with the
//! credentials its `security` names, and its answer's status and content type found in its
//! documented responses), every error is a `Problem`, and no response schema has a secret.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{fixture, Fixture, ADMIN};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tower::ServiceExt;

const APP_SECRET: &str = "app-secret-for-openapi-tests";
const PROBLEM: &str = "application/problem+json";

/// Every route the router serves. A new route goes here too (see `herald_api::openapi`).
const EXPECTED: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/v1/openapi.json"),
    ("post", "/v1/workspaces"),
    ("get", "/v1/workspaces"),
    ("get", "/v1/workspace"),
    ("post", "/v1/api-keys"),
    ("get", "/v1/api-keys"),
    ("delete", "/v1/api-keys/{id}"),
    ("post", "/v1/channels"),
    ("get", "/v1/channels"),
    ("get", "/v1/channels/{id}"),
    ("delete", "/v1/channels/{id}"),
    ("post", "/v1/channels/{id}/pause"),
    ("post", "/v1/channels/{id}/resume"),
    ("post", "/v1/contacts"),
    ("get", "/v1/contacts"),
    ("post", "/v1/contacts/import"),
    ("get", "/v1/contacts/{id}"),
    ("patch", "/v1/contacts/{id}"),
    ("delete", "/v1/contacts/{id}"),
    ("post", "/v1/templates"),
    ("get", "/v1/templates"),
    ("get", "/v1/templates/{id}"),
    ("patch", "/v1/templates/{id}"),
    ("delete", "/v1/templates/{id}"),
    ("post", "/v1/templates/{id}/render"),
    ("get", "/v1/admin/queues"),
    ("post", "/v1/admin/queues/{name}/pause"),
    ("post", "/v1/admin/queues/{name}/resume"),
    ("get", "/v1/admin/jobs"),
    ("get", "/v1/admin/jobs/{id}"),
    ("post", "/v1/admin/jobs/{id}/retry"),
    ("post", "/v1/admin/jobs/{id}/cancel"),
    ("post", "/v1/admin/jobs/{id}/discard"),
    ("get", "/webhooks/{channel_id}"),
    ("post", "/webhooks/{channel_id}"),
];

/// Operations that take nothing (no parameter, body or credentials) and so have no 4xx.
const NO_INPUT: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/v1/openapi.json"),
];

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// An answer: status, content type, body.
struct Answer {
    status: StatusCode,
    content_type: Option<String>,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

async fn send(
    f: &Fixture,
    method: &str,
    uri: &str,
    headers: &[(&str, String)],
    body: Option<Vec<u8>>,
) -> Answer {
    let mut req = Request::builder()
        .method(method.to_ascii_uppercase().as_str())
        .uri(uri);
    for (name, value) in headers {
        req = req.header(*name, value);
    }
    let response = f
        .admin_app()
        .oneshot(
            req.body(body.map(Body::from).unwrap_or_else(Body::empty))
                .expect("request"),
        )
        .await
        .expect("response");
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().expect("ascii content type").to_owned());
    let body = axum::body::to_bytes(response.into_body(), 16 << 20)
        .await
        .expect("body")
        .to_vec();
    Answer {
        status,
        content_type,
        body,
    }
}

fn bearer(token: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {token}"))
}

fn json_body() -> (&'static str, String) {
    ("content-type", "application/json".into())
}

async fn document(f: &Fixture) -> Value {
    let answer = send(f, "get", "/v1/openapi.json", &[], None).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.content_type.as_deref(), Some("application/json"));
    serde_json::from_slice(&answer.body).expect("the document is JSON")
}

/// Every operation of the document: (method, path, operation).
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if let Some(op) = item.get(method) {
                out.push((method.to_owned(), path.clone(), op.clone()));
            }
        }
    }
    out
}

/// The schema a `$ref` names, or the schema itself.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("unexpected $ref {r}"));
            let target = &doc["components"]["schemas"][name];
            assert!(!target.is_null(), "dangling $ref {r}");
            resolve(doc, target)
        }
        None => schema,
    }
}

/// The property names of a schema and of every schema inside it (refs followed once each).
fn property_names(
    doc: &Value,
    schema: &Value,
    seen: &mut BTreeSet<String>,
    out: &mut BTreeSet<String>,
) {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        if !seen.insert(r.to_owned()) {
            return;
        }
    }
    let schema = resolve(doc, schema);
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            out.insert(name.clone());
            property_names(doc, sub, seen, out);
        }
    }
    for key in ["items", "additionalProperties", "not"] {
        if let Some(sub) = schema.get(key).filter(|s| s.is_object()) {
            property_names(doc, sub, seen, out);
        }
    }
    for key in ["allOf", "oneOf", "anyOf", "prefixItems"] {
        for sub in schema
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            property_names(doc, sub, seen, out);
        }
    }
}

/// Whether `status` is among the documented responses (exactly, or as its `4XX`/`5XX` range).
fn documented_response(op: &Value, status: StatusCode) -> Option<&Value> {
    let responses = op["responses"].as_object()?;
    responses
        .get(status.as_str())
        .or_else(|| responses.get(&format!("{}XX", status.as_u16() / 100)))
}

#[tokio::test]
async fn the_document_is_openapi_3_1_and_served_without_credentials() {
    let f = fixture().await;
    let doc = document(&f).await;
    let version = doc["openapi"].as_str().expect("openapi");
    assert!(version.starts_with("3.1"), "{version}");
    assert!(doc["info"]["title"].is_string());
    // Served as built: the same bytes each time.
    let again = send(&f, "get", "/v1/openapi.json", &[], None).await;
    assert_eq!(
        serde_json::from_slice::<Value>(&again.body).expect("json"),
        doc
    );
}

#[tokio::test]
async fn it_documents_exactly_the_routes_served() {
    let f = fixture().await;
    let doc = document(&f).await;
    let documented: BTreeSet<(String, String)> = operations(&doc)
        .into_iter()
        .map(|(m, p, _)| (m, p))
        .collect();
    let expected: BTreeSet<(String, String)> = EXPECTED
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let missing: Vec<_> = expected.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&expected).collect();
    assert!(missing.is_empty(), "routes not documented: {missing:?}");
    assert!(
        unknown.is_empty(),
        "documented but not in EXPECTED (add them there): {unknown:?}"
    );
}

#[tokio::test]
async fn operations_are_described_tagged_and_secured() {
    let f = fixture().await;
    let doc = document(&f).await;
    let tags: BTreeSet<&str> = doc["tags"]
        .as_array()
        .expect("tags")
        .iter()
        .map(|t| t["name"].as_str().expect("tag name"))
        .collect();
    let schemes = doc["components"]["securitySchemes"]
        .as_object()
        .expect("security schemes");
    assert_eq!(schemes["api_key"]["scheme"], "bearer");
    assert_eq!(schemes["admin_token"]["scheme"], "bearer");
    assert_eq!(schemes["hub_signature"]["type"], "apiKey");
    assert_eq!(schemes["hub_signature"]["in"], "header");
    assert_eq!(schemes["hub_signature"]["name"], "X-Hub-Signature-256");
    let mut operation_ids = BTreeSet::new();
    for (method, path, op) in operations(&doc) {
        let id = op["operationId"].as_str().expect("operationId");
        assert!(
            operation_ids.insert(id.to_owned()),
            "{method} {path}: operationId {id} twice"
        );
        let op_tags = op["tags"].as_array().expect("tags");
        assert!(
            !op_tags.is_empty()
                && op_tags
                    .iter()
                    .all(|t| tags.contains(t.as_str().unwrap_or(""))),
            "{method} {path}: tags {op_tags:?} not among {tags:?}"
        );
        let summary = op["summary"].as_str().unwrap_or("");
        assert!(
            !summary.is_empty() && !summary.contains('\n'),
            "{method} {path}: the summary is one line: {summary:?}"
        );
        let security: Vec<&str> = op["security"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|r| r.as_object().expect("requirement").keys())
            .map(String::as_str)
            .collect();
        let wanted: &[&str] = if path.starts_with("/v1/admin/") || path == "/v1/workspaces" {
            &["admin_token"]
        } else if path == "/v1/openapi.json" {
            &[]
        } else if path.starts_with("/v1/") {
            &["api_key"]
        } else if path.starts_with("/webhooks/") && method == "post" {
            &["hub_signature"]
        } else {
            &[]
        };
        assert_eq!(security, wanted, "{method} {path}: security");
        for name in &security {
            assert!(
                schemes.contains_key(*name),
                "{method} {path}: unknown scheme {name}"
            );
        }
        // Path parameters are declared, and only those.
        let declared: BTreeSet<&str> = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == "path")
            .map(|p| p["name"].as_str().expect("name"))
            .collect();
        let in_path: BTreeSet<&str> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .collect();
        assert_eq!(declared, in_path, "{method} {path}: path parameters");
    }
}

#[tokio::test]
async fn every_operation_documents_a_4xx_and_errors_are_problems() {
    let f = fixture().await;
    let doc = document(&f).await;
    let problem = &doc["components"]["schemas"]["Problem"];
    let props: BTreeSet<&str> = problem["properties"]
        .as_object()
        .expect("Problem properties")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(props, BTreeSet::from(["type", "title", "status", "detail"]));
    let required: BTreeSet<&str> = problem["required"]
        .as_array()
        .expect("required")
        .iter()
        .map(|r| r.as_str().expect("name"))
        .collect();
    assert_eq!(required, props);

    for (method, path, op) in operations(&doc) {
        let responses = op["responses"].as_object().expect("responses");
        let no_input = NO_INPUT.contains(&(method.as_str(), path.as_str()));
        if no_input {
            assert!(
                op.get("parameters").is_none()
                    && op.get("requestBody").is_none()
                    && op.get("security").is_none(),
                "{method} {path} takes input: it must document its 4xx"
            );
        } else {
            assert!(
                responses.keys().any(|s| s.starts_with('4')),
                "{method} {path} documents no 4xx"
            );
        }
        for (status, response) in responses {
            let is_error = status.starts_with('4') || status.starts_with('5');
            // /healthz answers its 503 with the same JSON as its 200.
            if !is_error || (path == "/healthz" && status == "503") {
                continue;
            }
            let content = response["content"].as_object().expect("error content");
            assert_eq!(
                content.keys().collect::<Vec<_>>(),
                [PROBLEM],
                "{method} {path} {status}: errors are problem+json"
            );
            assert_eq!(
                content[PROBLEM]["schema"]["$ref"], "#/components/schemas/Problem",
                "{method} {path} {status}"
            );
        }
    }
}

#[tokio::test]
async fn no_response_schema_has_a_secret() {
    let f = fixture().await;
    let doc = document(&f).await;
    const SECRETS: [&str; 3] = ["access_token", "app_secret", "verify_token"];
    for (method, path, op) in operations(&doc) {
        for (status, response) in op["responses"].as_object().expect("responses") {
            for (media, content) in response["content"].as_object().into_iter().flatten() {
                let mut names = BTreeSet::new();
                property_names(&doc, &content["schema"], &mut BTreeSet::new(), &mut names);
                for secret in SECRETS {
                    assert!(
                        !names.contains(secret),
                        "{method} {path} {status} {media} shows {secret}"
                    );
                }
            }
        }
    }
    // The walk does see secrets where they are: in the request that connects a channel.
    let body = &doc["paths"]["/v1/channels"]["post"]["requestBody"]["content"]["application/json"]
        ["schema"];
    let mut names = BTreeSet::new();
    property_names(&doc, body, &mut BTreeSet::new(), &mut names);
    for secret in SECRETS {
        assert!(names.contains(secret), "{secret} missing from {names:?}");
    }
}

/// The ids to put in a path's parameters.
struct Ids {
    key_to_revoke: String,
    channel: String,
    contact: String,
    template: String,
    job: String,
}

impl Ids {
    fn fill(&self, path: &str) -> String {
        let id = if path.starts_with("/v1/api-keys/") {
            &self.key_to_revoke
        } else if path.starts_with("/v1/channels/") || path.starts_with("/webhooks/") {
            &self.channel
        } else if path.starts_with("/v1/contacts/") {
            &self.contact
        } else if path.starts_with("/v1/templates/") {
            &self.template
        } else if path.starts_with("/v1/admin/jobs/") {
            &self.job
        } else if path.starts_with("/v1/admin/queues/") {
            return path.replace("{name}", "default");
        } else {
            assert!(!path.contains('{'), "no id for {path}");
            return path.to_owned();
        };
        path.replace("{id}", id).replace("{channel_id}", id)
    }
}

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(APP_SECRET.as_bytes()).expect("key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A request: its URI, headers and body.
type Call = (String, Vec<(&'static str, String)>, Option<Vec<u8>>);

/// A request for the operation: its path filled, the credentials its `security` names, and a
/// body of the content type its `requestBody` documents.
fn request_for(path: &str, op: &Value, ids: &Ids, key: &str) -> Call {
    let mut uri = ids.fill(path);
    if path == "/webhooks/{channel_id}" && op.get("requestBody").is_none() {
        uri.push_str("?hub.mode=subscribe&hub.verify_token=verify-me&hub.challenge=42");
    }
    let mut headers = Vec::new();
    let mut body = None;
    if let Some(content) = op["requestBody"]["content"].as_object() {
        let media = ["application/json", "application/x-ndjson"]
            .into_iter()
            .find(|m| content.contains_key(*m))
            .expect("a sample body for one of the content types")
            .to_owned();
        let bytes: Vec<u8> = match media.as_str() {
            "application/json" if path.starts_with("/webhooks/") => {
                br#"{"object":"page","entry":[]}"#.to_vec()
            }
            "application/json" => b"{}".to_vec(),
            "application/x-ndjson" => b"{\"phone\": \"+14155550199\"}\n".to_vec(),
            other => panic!("no sample body for {other}"),
        };
        headers.push(("content-type", media));
        body = Some(bytes);
    }
    for requirement in op["security"].as_array().into_iter().flatten() {
        for scheme in requirement.as_object().expect("requirement").keys() {
            match scheme.as_str() {
                "api_key" => headers.push(bearer(key)),
                "admin_token" => headers.push(bearer(ADMIN)),
                "hub_signature" => headers.push((
                    "x-hub-signature-256",
                    sign(body.as_deref().unwrap_or_default()),
                )),
                other => panic!("unknown scheme {other}"),
            }
        }
    }
    (uri, headers, body)
}

#[tokio::test]
async fn every_documented_operation_answers_as_documented() {
    let f = fixture().await;
    let doc = document(&f).await;

    // Something for every id in a path.
    let created = send(
        &f,
        "post",
        "/v1/workspaces",
        &[bearer(ADMIN), json_body()],
        Some(json!({ "name": "Acme" }).to_string().into_bytes()),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let key = created.json()["api_key"]["key"]
        .as_str()
        .expect("key")
        .to_owned();
    let mut ids = Ids {
        key_to_revoke: String::new(),
        channel: String::new(),
        contact: String::new(),
        template: String::new(),
        job: String::new(),
    };
    for (uri, body, slot) in [
        ("/v1/api-keys", json!({ "name": "spare" }), 0),
        (
            "/v1/channels",
            json!({
                "platform": "whatsapp", "name": "Support", "sender_id": "1555000111",
                "access_token": "EAAG-token", "app_secret": APP_SECRET,
                "verify_token": "verify-me"
            }),
            1,
        ),
        ("/v1/contacts", json!({ "phone": "+14155550100" }), 2),
        (
            "/v1/templates",
            json!({ "name": "order_update", "language": "en_US", "category": "utility" }),
            3,
        ),
    ] {
        let a = send(
            &f,
            "post",
            uri,
            &[bearer(&key), json_body()],
            Some(body.to_string().into_bytes()),
        )
        .await;
        assert_eq!(a.status, StatusCode::CREATED, "{uri}: {}", a.json());
        let id = a.json()["id"].as_str().expect("id").to_owned();
        match slot {
            0 => ids.key_to_revoke = id,
            1 => ids.channel = id,
            2 => ids.contact = id,
            _ => ids.template = id,
        }
    }
    ids.job = f.waiting_job().await.to_string();

    // Deletions last, so that the others find what they name.
    let mut ops = operations(&doc);
    ops.sort_by_key(|(method, _, _)| method == "delete");
    let mut seen: BTreeMap<String, StatusCode> = BTreeMap::new();
    for (method, path, op) in &ops {
        let (uri, headers, body) = request_for(path, op, &ids, &key);
        let answer = send(&f, method, &uri, &headers, body).await;
        let what = format!("{method} {uri}");
        assert_ne!(answer.status, StatusCode::METHOD_NOT_ALLOWED, "{what}");
        assert!(
            !(answer.status == StatusCode::NOT_FOUND
                && answer.content_type.as_deref() != Some(PROBLEM)),
            "{what}: not routed"
        );
        assert!(
            !answer.status.is_server_error(),
            "{what}: {} {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
        if op.get("security").is_some() {
            assert_ne!(
                answer.status,
                StatusCode::UNAUTHORIZED,
                "{what}: credentials refused"
            );
        }
        check_documented(op, &what, &answer);
        seen.insert(what.clone(), answer.status);

        // Without its credentials, a secured operation answers a documented 401.
        if op.get("security").is_some() {
            let (uri, headers, body) = request_for(path, op, &ids, &key);
            let headers: Vec<_> = headers
                .into_iter()
                .filter(|(n, _)| *n == "content-type")
                .collect();
            let answer = send(&f, method, &uri, &headers, body).await;
            assert_eq!(
                answer.status,
                StatusCode::UNAUTHORIZED,
                "{what} without credentials"
            );
            check_documented(op, &what, &answer);
        }
    }
    // The walk reached the handlers, not only their error paths.
    for (what, status) in [
        ("get /v1/openapi.json", StatusCode::OK),
        ("post /v1/contacts/import", StatusCode::OK),
        ("post /webhooks/{channel}", StatusCode::OK),
        ("get /webhooks/{channel}?hub.mode=subscribe&hub.verify_token=verify-me&hub.challenge=42", StatusCode::OK),
        ("get /v1/admin/jobs/{job}", StatusCode::OK),
        ("get /v1/contacts/{contact}", StatusCode::OK),
        ("post /v1/templates/{template}/render", StatusCode::OK),
        ("post /v1/admin/queues/default/pause", StatusCode::OK),
        ("post /v1/admin/queues/default/resume", StatusCode::OK),
        ("post /v1/admin/jobs/{job}/cancel", StatusCode::OK),
        ("delete /v1/channels/{channel}", StatusCode::NO_CONTENT),
        ("delete /v1/api-keys/{key}", StatusCode::NO_CONTENT),
    ] {
        let what = what
            .replace("{channel}", &ids.channel)
            .replace("{job}", &ids.job)
            .replace("{contact}", &ids.contact)
            .replace("{template}", &ids.template)
            .replace("{key}", &ids.key_to_revoke);
        assert_eq!(seen.get(&what), Some(&status), "{what}: {seen:#?}");
    }
}

/// The answer's status is documented, with the content type it came with.
fn check_documented(op: &Value, what: &str, answer: &Answer) {
    let documented = documented_response(op, answer.status).unwrap_or_else(|| {
        panic!(
            "{what}: {} is not documented ({})",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        )
    });
    match documented["content"].as_object() {
        Some(content) => {
            let ct = answer.content_type.as_deref().unwrap_or("");
            assert!(
                content.contains_key(ct),
                "{what}: {} came as {ct:?}, documented as {:?}",
                answer.status,
                content.keys().collect::<Vec<_>>()
            );
            if ct == PROBLEM {
                let body = answer.json();
                let keys: BTreeSet<&str> = body
                    .as_object()
                    .expect("problem object")
                    .keys()
                    .map(String::as_str)
                    .collect();
                assert_eq!(
                    keys,
                    BTreeSet::from(["type", "title", "status", "detail"]),
                    "{what}"
                );
                assert_eq!(body["status"], answer.status.as_u16(), "{what}");
            }
        }
        None => assert!(
            answer.body.is_empty(),
            "{what}: {} documented without a body, came with one",
            answer.status
        ),
    }
}

#[tokio::test]
async fn a_cancel_body_is_optional_as_documented() {
    let f = fixture().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(f.waiting_job().await);
    }
    let cancel = |id: i64| format!("/v1/admin/jobs/{id}/cancel");
    // No body, or `null`: the default reason.
    let a = send(&f, "post", &cancel(ids[0]), &[bearer(ADMIN)], None).await;
    assert_eq!(a.status, StatusCode::OK);
    let a = send(
        &f,
        "post",
        &cancel(ids[1]),
        &[bearer(ADMIN), json_body()],
        Some(b"null".to_vec()),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.json());
    assert_eq!(a.json()["state"], "cancelled");
    // A body declared JSON that is not: a problem, like every other error.
    let a = send(
        &f,
        "post",
        &cancel(ids[2]),
        &[bearer(ADMIN), json_body()],
        Some(b"{nope".to_vec()),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.content_type.as_deref(), Some(PROBLEM));
    let a = send(
        &f,
        "post",
        &cancel(ids[2]),
        &[bearer(ADMIN), json_body()],
        Some(br#"{"because": "x"}"#.to_vec()),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(a.content_type.as_deref(), Some(PROBLEM));
}
