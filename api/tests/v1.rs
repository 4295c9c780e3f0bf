//! The `/v1` API through `app(state)` with `oneshot`: workspaces and keys, channels, pagination,
//! bad input, and the walk that proves another workspace's ids answer 404 everywhere.

mod common;

use common::{fixture, Fixture, ADMIN};

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use herald_api::ApiConfig;
use serde_json::{json, Value};
use tower::ServiceExt;
use uuid::Uuid;

impl Fixture {
    async fn call(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.raw(method, uri, token, body.map(|b| b.to_string().into_bytes()))
            .await
    }

    async fn raw(
        &self,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let response = self
            .admin_app()
            .oneshot(
                req.body(body.map(Body::from).unwrap_or_else(Body::empty))
                    .expect("request"),
            )
            .await
            .expect("response");
        let status = response.status();
        let problem = response
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes() == b"application/problem+json");
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_client_error() || status.is_server_error() {
            assert!(problem, "{status}: errors are problem+json: {value}");
            assert!(value["type"]
                .as_str()
                .is_some_and(|t| t.contains("/problems/")));
        }
        (status, value)
    }

    /// A text answer (`/metrics`), from an app that also reports `engine`'s measurements.
    async fn text_with(
        &self,
        uri: &str,
        engine: Option<Arc<herald_engine::metrics::EngineMetrics>>,
    ) -> String {
        let response = self
            .app(ApiConfig {
                engine_metrics: engine,
                ..ApiConfig::default()
            })
            .oneshot(Request::get(uri).body(Body::empty()).expect("request"))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 22)
            .await
            .expect("body");
        String::from_utf8(bytes.to_vec()).expect("utf-8")
    }

    async fn text(&self, uri: &str) -> String {
        self.text_with(uri, None).await
    }

    /// A workspace and its first key.
    async fn workspace(&self, name: &str) -> (Uuid, String) {
        let (status, body) = self
            .call(
                "POST",
                "/v1/workspaces",
                Some(ADMIN),
                Some(json!({ "name": name })),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let id = body["workspace"]["id"]
            .as_str()
            .expect("id")
            .parse()
            .expect("uuid");
        (id, body["api_key"]["key"].as_str().expect("key").to_owned())
    }

    async fn channel(&self, key: &str, sender: &str) -> Value {
        let (status, body) = self
            .call(
                "POST",
                "/v1/channels",
                Some(key),
                Some(json!({
                    "platform": "whatsapp", "name": "Support", "sender_id": sender,
                    "access_token": "EAAG-secret-token", "app_secret": "app-secret-xyz",
                    "limits": { "mps": 1000.0 }
                })),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }
}

#[tokio::test]
async fn workspaces_need_the_admin_token_and_keys_work_once_shown() {
    let f = fixture().await;
    let (status, _) = f
        .call("POST", "/v1/workspaces", None, Some(json!({ "name": "x" })))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = f
        .call(
            "POST",
            "/v1/workspaces",
            Some("wrong-admin-token-0000000000"),
            Some(json!({ "name": "x" })),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (ws, key) = f.workspace("Acme").await;
    assert!(key.starts_with("hk_"));
    let (status, me) = f.call("GET", "/v1/workspace", Some(&key), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["id"], ws.to_string());
    assert_eq!(me["name"], "Acme");

    // A second key; listing never shows a secret; revoking locks it out.
    let (status, second) = f
        .call(
            "POST",
            "/v1/api-keys",
            Some(&key),
            Some(json!({ "name": "ci" })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let second_key = second["key"].as_str().expect("key").to_owned();
    let (status, list) = f.call("GET", "/v1/api-keys", Some(&second_key), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["data"].as_array().map(Vec::len), Some(2));
    assert!(
        !list.to_string().contains(&second_key[20..]),
        "no secret in the list"
    );
    let (status, _) = f
        .call(
            "DELETE",
            &format!("/v1/api-keys/{}", second["id"].as_str().expect("id")),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = f
        .call("GET", "/v1/workspace", Some(&second_key), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a revoked key is refused");
    for bad in [
        "",
        "hk_",
        "not-a-key",
        &format!("{key}x"),
        &"hk_".repeat(100),
    ] {
        let (status, _) = f.call("GET", "/v1/workspace", Some(bad), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "key {bad:?}");
    }
}

#[tokio::test]
async fn channels_keep_their_secrets_and_disconnect_deletes_them() {
    let f = fixture().await;
    let (_, key) = f.workspace("Acme").await;
    let created = f.channel(&key, "1555000001").await;
    let text = created.to_string();
    for secret in ["EAAG-secret-token", "app-secret-xyz"] {
        assert!(!text.contains(secret), "the API never returns {secret}");
    }
    assert_eq!(created["limits"]["mps"], 1000.0);
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(created["webhook_path"], format!("/webhooks/{id}"));
    let (status, got) = f
        .call("GET", &format!("/v1/channels/{id}"), Some(&key), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["id"], id);
    let stored = f
        .store
        .delivery()
        .channel(id.parse().expect("uuid"))
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(stored.access_token, "EAAG-secret-token");
    assert!(!stored.verify_token.is_empty(), "a verify token is made up");

    let (status, _) = f
        .call("DELETE", &format!("/v1/channels/{id}"), Some(&key), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let gone = f
        .store
        .delivery()
        .channel(id.parse().expect("uuid"))
        .await
        .expect("read")
        .expect("row kept for its history");
    assert_eq!(gone.access_token, "");
    assert_eq!(gone.app_secret, "");
    assert_eq!(
        gone.paused_reason.as_deref(),
        Some(herald_engine::delivery::DISCONNECTED)
    );
}

#[tokio::test]
async fn lists_page_by_cursor_and_refuse_huge_pages() {
    let f = fixture().await;
    let (_, key) = f.workspace("Acme").await;
    for n in 0..5 {
        f.channel(&key, &format!("155500010{n}")).await;
    }
    let mut seen = Vec::new();
    let mut uri = "/v1/channels?limit=2".to_owned();
    loop {
        let (status, page) = f.call("GET", &uri, Some(&key), None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let data = page["data"].as_array().expect("data").clone();
        assert!(data.len() <= 2);
        seen.extend(
            data.iter()
                .map(|c| c["id"].as_str().expect("id").to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => uri = format!("/v1/channels?limit=2&after={c}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5);
    let mut unique = seen.clone();
    unique.dedup();
    assert_eq!(unique, seen, "no channel twice, in order");
    for bad in [
        "/v1/channels?limit=100000",
        "/v1/channels?limit=0",
        "/v1/channels?limit=-1",
        "/v1/channels?limit=abc",
        "/v1/channels?after=garbage",
        "/v1/channels?unknown=1",
    ] {
        let (status, body) = f.call("GET", bad, Some(&key), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
}

#[tokio::test]
async fn bad_bodies_get_a_clear_status_and_store_nothing() {
    let f = fixture().await;
    let (ws, key) = f.workspace("Acme").await;
    for (body, want) in [
        (b"{not json".to_vec(), StatusCode::BAD_REQUEST),
        (vec![0xff, 0xfe], StatusCode::BAD_REQUEST),
        (b"{}".to_vec(), StatusCode::UNPROCESSABLE_ENTITY),
        (
            br#"{"platform":"fax","name":"x","sender_id":"1","access_token":"t","app_secret":"s"}"#
                .to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            br#"{"platform":"whatsapp","name":"x","sender_id":"1","access_token":"t","app_secret":"s","limits":{"mps":-5}}"#
                .to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            br#"{"platform":"whatsapp","name":"x","sender_id":"1","access_token":"t","app_secret":"s","extra":1}"#
                .to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        let (status, problem) = f.raw("POST", "/v1/channels", Some(&key), Some(body.clone())).await;
        assert_eq!(status, want, "{}: {problem}", String::from_utf8_lossy(&body));
    }
    let channels = f
        .store
        .delivery()
        .workspace_channels(ws, None, 100)
        .await
        .expect("list");
    assert!(channels.is_empty(), "nothing stored");
    let (status, _) = f
        .call(
            "POST",
            "/v1/workspaces",
            Some(ADMIN),
            Some(json!({ "name": "" })),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

/// Every route that takes an id, called with another workspace's ids, answers exactly what it
/// answers for ids that do not exist: 404, and changes nothing.
#[tokio::test]
async fn another_workspaces_ids_answer_404_everywhere() {
    let f = fixture().await;
    let (_, a_key) = f.workspace("A").await;
    let (_, b_key) = f.workspace("B").await;
    let a_channel = f.channel(&a_key, "1555000201").await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (_, a_keys) = f.call("GET", "/v1/api-keys", Some(&a_key), None).await;
    let a_key_id = a_keys["data"][0]["id"].as_str().expect("id").to_owned();
    let (status, a_contact) = f
        .call(
            "POST",
            "/v1/contacts",
            Some(&a_key),
            Some(json!({ "phone": "+15550009999" })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let a_contact = a_contact["id"].as_str().expect("id").to_owned();
    let (status, a_template) = f
        .call(
            "POST",
            "/v1/templates",
            Some(&a_key),
            Some(json!({ "name": "hello", "language": "en", "category": "utility" })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let a_template = a_template["id"].as_str().expect("id").to_owned();
    let missing = Uuid::new_v4().to_string();
    let walk = [
        ("GET", "/v1/channels/{}"),
        ("DELETE", "/v1/channels/{}"),
        ("DELETE", "/v1/api-keys/{}"),
        ("GET", "/v1/contacts/{}"),
        ("PATCH", "/v1/contacts/{}"),
        ("DELETE", "/v1/contacts/{}"),
        ("POST", "/v1/channels/{}/pause"),
        ("POST", "/v1/channels/{}/resume"),
        ("GET", "/v1/templates/{}"),
        ("PATCH", "/v1/templates/{}"),
        ("DELETE", "/v1/templates/{}"),
        ("POST", "/v1/templates/{}/render"),
    ];
    // The walk covers every workspace route with an id that the API documents.
    let (_, doc) = f.call("GET", "/v1/openapi.json", None, None).await;
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        if !path.contains("{id}") || path.starts_with("/v1/admin/") {
            continue;
        }
        for method in ops.as_object().expect("ops").keys() {
            let m = method.to_uppercase();
            let t = path.replace("{id}", "{}");
            assert!(
                walk.iter().any(|(wm, wt)| *wm == m && *wt == t),
                "{m} {path} is not in the foreign-id walk"
            );
        }
    }
    for (method, template) in walk {
        let foreign = if template.contains("channels") {
            &a_channel
        } else if template.contains("contacts") {
            &a_contact
        } else if template.contains("templates") {
            &a_template
        } else {
            &a_key_id
        };
        for id in [foreign.as_str(), missing.as_str(), "not-an-id"] {
            let body = match (method, template.contains("templates")) {
                ("PATCH", false) => Some(json!({ "opted_out": true })),
                ("PATCH", true) => Some(json!({ "category": "marketing" })),
                ("POST", true) => Some(json!({ "values": {} })),
                _ => None,
            };
            let (status, body) = f
                .call(method, &template.replace("{}", id), Some(&b_key), body)
                .await;
            assert_eq!(
                status,
                StatusCode::NOT_FOUND,
                "{method} {template} {id}: {body}"
            );
        }
    }
    // B's lists hold nothing of A's.
    let (_, list) = f.call("GET", "/v1/channels", Some(&b_key), None).await;
    assert_eq!(list["data"].as_array().map(Vec::len), Some(0));
    let (_, keys) = f.call("GET", "/v1/api-keys", Some(&b_key), None).await;
    assert!(!keys.to_string().contains(&a_key_id));
    // And A's channel and key are untouched.
    let (status, _) = f
        .call(
            "GET",
            &format!("/v1/channels/{a_channel}"),
            Some(&a_key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = f.call("GET", "/v1/workspace", Some(&a_key), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, contact) = f
        .call(
            "GET",
            &format!("/v1/contacts/{a_contact}"),
            Some(&a_key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(contact["opted_out"], false, "B's PATCH changed nothing");
    let (_, list) = f.call("GET", "/v1/contacts", Some(&b_key), None).await;
    assert_eq!(list["data"].as_array().map(Vec::len), Some(0));
    let (_, list) = f.call("GET", "/v1/templates", Some(&b_key), None).await;
    assert_eq!(list["data"].as_array().map(Vec::len), Some(0));
    let (_, template) = f
        .call(
            "GET",
            &format!("/v1/templates/{a_template}"),
            Some(&a_key),
            None,
        )
        .await;
    assert_eq!(template["category"], "utility", "B's PATCH changed nothing");
}

#[tokio::test]
async fn templates_crud_and_render() {
    let f = fixture().await;
    let (_, key) = f.workspace("Acme").await;
    let new = json!({
        "name": "order_update", "language": "en_US", "category": "utility",
        "parameters": [{ "name": "first_name", "example": "Ana" }, { "name": "order_id" }]
    });
    let (status, t) = f
        .call("POST", "/v1/templates", Some(&key), Some(new.clone()))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{t}");
    let id = t["id"].as_str().expect("id").to_owned();
    assert_eq!(
        t["parameters"][0],
        json!({ "name": "first_name", "example": "Ana" })
    );
    let (status, p) = f.call("POST", "/v1/templates", Some(&key), Some(new)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{p}");
    assert_eq!(p["type"], "https://herald.dev/problems/conflict");
    for bad in [
        json!({ "name": "Bad Name", "language": "en", "category": "utility" }),
        json!({ "name": "ok", "language": "english", "category": "utility" }),
        json!({ "name": "ok", "language": "en", "category": "spam" }),
        json!({ "name": "ok", "language": "en", "category": "utility", "extra": 1 }),
    ] {
        let (status, p) = f
            .call("POST", "/v1/templates", Some(&key), Some(bad.clone()))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {p}");
    }
    let (_, list) = f.call("GET", "/v1/templates", Some(&key), None).await;
    assert_eq!(list["data"].as_array().map(Vec::len), Some(1));
    let uri = format!("/v1/templates/{id}/render");
    let (status, r) = f
        .call(
            "POST",
            &uri,
            Some(&key),
            Some(json!({ "values": { "first_name": "Ana", "order_id": "A-17" } })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(
        r["message"],
        json!({
            "type": "template", "name": "order_update", "language": "en_US",
            "parameters": ["Ana", "A-17"]
        })
    );
    for values in [
        json!({ "first_name": "Ana" }),
        json!({ "first_name": "Ana", "order_id": "1", "typo": "x" }),
        json!({ "first_name": "Ana\nBob", "order_id": "1" }),
    ] {
        let (status, p) = f
            .call("POST", &uri, Some(&key), Some(json!({ "values": values })))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{values}: {p}");
    }
    let (status, t) = f
        .call(
            "PATCH",
            &format!("/v1/templates/{id}"),
            Some(&key),
            Some(json!({ "category": "marketing", "parameters": [] })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{t}");
    assert_eq!(
        (t["category"].as_str(), t["name"].as_str()),
        (Some("marketing"), Some("order_update"))
    );
    let (status, _) = f
        .call("DELETE", &format!("/v1/templates/{id}"), Some(&key), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = f
        .call("GET", &format!("/v1/templates/{id}"), Some(&key), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn contacts_crud_labels_and_conflicts() {
    let f = fixture().await;
    let (_, key) = f.workspace("Acme").await;
    let (status, ann) = f
        .call(
            "POST",
            "/v1/contacts",
            Some(&key),
            Some(
                json!({ "phone": "+1 (555) 000-0001", "name": "Ann", "labels": ["vip"],
                          "attributes": { "plan": "gold" } }),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{ann}");
    assert_eq!(ann["phone"], "+15550000001");
    let id = ann["id"].as_str().expect("id").to_owned();
    let (status, _) = f
        .call(
            "POST",
            "/v1/contacts",
            Some(&key),
            Some(json!({ "phone": "+15550000001" })),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    for bad in [
        json!({ "phone": "555-0001" }),
        json!({ "phone": "+15550000002", "labels": [""] }),
        json!({ "phone": "+15550000002", "colour": "red" }),
        json!({ "name": "no phone" }),
    ] {
        let (status, body) = f
            .call("POST", "/v1/contacts", Some(&key), Some(bad.clone()))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
    }
    let (status, patched) = f
        .call(
            "PATCH",
            &format!("/v1/contacts/{id}"),
            Some(&key),
            Some(json!({ "labels": ["vip", "beta"], "opted_out": true })),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(patched["labels"], json!(["beta", "vip"]));
    assert_eq!(patched["opted_out"], true);
    assert_eq!(patched["name"], "Ann");
    f.call(
        "POST",
        "/v1/contacts",
        Some(&key),
        Some(json!({ "phone": "+15550000003" })),
    )
    .await;
    let (_, beta) = f
        .call("GET", "/v1/contacts?label=beta", Some(&key), None)
        .await;
    assert_eq!(beta["data"].as_array().map(Vec::len), Some(1));
    let (status, _) = f
        .call("DELETE", &format!("/v1/contacts/{id}"), Some(&key), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = f
        .call("GET", &format!("/v1/contacts/{id}"), Some(&key), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// A contact created by a Messenger or Instagram message has no phone (`null`) and its
/// handles; one created through the API has a phone and no handles.
#[tokio::test]
async fn contacts_show_phone_and_handles() {
    let f = fixture().await;
    let (ws, key) = f.workspace("Acme").await;
    let page = Uuid::new_v4();
    f.store
        .contacts()
        .upsert_inbound_contacts(
            &[herald_engine::contacts::InboundContact {
                workspace_id: ws,
                identity: herald_engine::contacts::InboundIdentity::Handle {
                    channel_id: page,
                    platform: herald_engine::delivery::Platform::Messenger,
                    external_id: "24000000000000001".into(),
                },
                name: None,
                opt_out: false,
            }],
            chrono::Utc::now(),
        )
        .await
        .expect("inbound");
    let (status, ann) = f
        .call(
            "POST",
            "/v1/contacts",
            Some(&key),
            Some(json!({ "phone": "+15550000001" })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{ann}");
    assert_eq!(ann["handles"], json!([]));
    let (status, list) = f.call("GET", "/v1/contacts", Some(&key), None).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let data = list["data"].as_array().expect("data");
    assert_eq!(data.len(), 2, "{list}");
    let by_handle = data
        .iter()
        .find(|c| c["phone"].is_null())
        .expect("the Messenger contact");
    assert!(
        by_handle.as_object().expect("object").contains_key("phone"),
        "phone is present, as null: {by_handle}"
    );
    assert_eq!(
        by_handle["handles"],
        json!([{ "channel_id": page, "platform": "messenger",
                 "external_id": "24000000000000001" }])
    );
    let id = by_handle["id"].as_str().expect("id");
    let (status, one) = f
        .call("GET", &format!("/v1/contacts/{id}"), Some(&key), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(&one, by_handle);
    let (status, _) = f
        .call("DELETE", &format!("/v1/contacts/{id}"), Some(&key), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, list) = f.call("GET", "/v1/contacts", Some(&key), None).await;
    assert_eq!(list["data"].as_array().map(Vec::len), Some(1));
}

impl Fixture {
    /// Posts an import body in chunks of `chunk` bytes, so that rows and quoted fields span
    /// chunk boundaries.
    async fn import(
        &self,
        key: &str,
        content_type: &str,
        body: &str,
        chunk: usize,
    ) -> (StatusCode, Value) {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body
            .as_bytes()
            .chunks(chunk)
            .map(|c| Ok(c.to_vec()))
            .collect();
        let req = Request::post("/v1/contacts/import")
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", content_type)
            .body(Body::from_stream(futures_util::stream::iter(chunks)))
            .expect("request");
        let response = self
            .app(ApiConfig::default())
            .oneshot(req)
            .await
            .expect("response");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 22)
            .await
            .expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

#[tokio::test]
async fn ndjson_import_stores_valid_rows_and_reports_bad_ones() {
    let f = fixture().await;
    let (ws, key) = f.workspace("Acme").await;
    let mut body = String::new();
    for n in 0..1_000 {
        body.push_str(&format!(
            "{{\"phone\":\"+1444{n:07}\",\"name\":\"Person {n}\",\"labels\":[\"imported\"]}}\n"
        ));
    }
    body.push_str("{\"phone\":\"12345\"}\n");
    body.push_str("not json\n");
    body.push('\n');
    body.push_str("{\"phone\":\"+15550001111\",\"labels\":[\"last\"]}"); // no final newline
    for chunk in [7, 4096] {
        let (status, report) = f.import(&key, "application/x-ndjson", &body, chunk).await;
        assert_eq!(status, StatusCode::OK, "{report}");
        assert_eq!(report["rows"], 1_003, "{report}");
        assert_eq!(report["stored"], 1_001);
        assert_eq!(report["rejected"], 2);
        assert_eq!(report["errors"][0]["line"], 1_001);
        assert_eq!(report["errors"][1]["line"], 1_002);
    }
    assert_eq!(
        f.store.contacts().contact_count(ws).await.expect("count"),
        1_001,
        "importing twice changes nothing"
    );
    let (status, _) = f.import(&key, "application/json", "{}", 10).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[tokio::test]
async fn csv_import_with_quotes_labels_and_attributes() {
    let f = fixture().await;
    let (ws, key) = f.workspace("Acme").await;
    let body = "\u{feff}phone,name,labels,opted_out,city\r\n\
                +15550000001,\"Doe, Jane\",vip;beta,no,Lisbon\r\n\
                +15550000002,\"Multi\nLine\",,yes,\r\n\
                bad-phone,X,,,\r\n\
                +15550000003,Y,,maybe,\r\n\
                +15550000004,Last,,,Porto";
    for chunk in [3, 1 << 16] {
        let (status, report) = f.import(&key, "text/csv; charset=utf-8", body, chunk).await;
        assert_eq!(status, StatusCode::OK, "{report}");
        assert_eq!(report["rows"], 5, "{report}");
        assert_eq!(report["stored"], 3);
        assert_eq!(report["rejected"], 2);
        assert_eq!(report["errors"][0]["line"], 4);
        assert_eq!(report["errors"][1]["line"], 5);
    }
    let all = f
        .store
        .contacts()
        .contacts(ws, None, None, 10)
        .await
        .expect("list");
    let jane = all
        .iter()
        .find(|c| c.phone.as_deref() == Some("+15550000001"))
        .expect("jane");
    assert_eq!(jane.name.as_deref(), Some("Doe, Jane"));
    assert_eq!(jane.labels, ["beta", "vip"]);
    assert_eq!(jane.attributes["city"], "Lisbon");
    let multi = all
        .iter()
        .find(|c| c.phone.as_deref() == Some("+15550000002"))
        .expect("multi");
    assert_eq!(multi.name.as_deref(), Some("Multi\nLine"));
    assert!(multi.opted_out);
    let (status, problem) = f.import(&key, "text/csv", "name,city\nX,Y\n", 100).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
}

#[tokio::test]
async fn operators_see_metrics_queues_and_jobs_and_pause_channels() {
    let f = fixture().await;
    let (_, key) = f.workspace("Acme").await;
    let (status, ready) = f.call("GET", "/readyz", None, None).await;
    assert_eq!(status, StatusCode::OK, "{ready}");

    let id = f.waiting_job().await;
    let (status, _) = f.call("GET", "/v1/admin/queues", Some(&key), None).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a workspace key is not the admin token"
    );
    let (status, queues) = f.call("GET", "/v1/admin/queues", Some(ADMIN), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        queues,
        json!({ "data": [{ "queue": "default", "paused": false, "paused_at": null,
                           "paused_reason": null, "jobs": { "scheduled": 1 } }],
                "next_cursor": null })
    );
    // Pausing a queue shows in the list, in /metrics, and holds every process's producers.
    let (status, paused) = f
        .call(
            "POST",
            "/v1/admin/queues/default/pause",
            Some(ADMIN),
            Some(json!({ "reason": "deploying" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{paused}");
    assert_eq!(
        (paused["paused"].as_bool(), paused["paused_reason"].as_str()),
        (Some(true), Some("deploying"))
    );
    assert!(f.store.paused_queues().await.expect("paused").len() == 1);
    let (status, _) = f
        .call(
            "POST",
            "/v1/admin/queues/default/pause",
            Some(ADMIN),
            Some(json!({ "reason": "x".repeat(501) })),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let metrics = f.text("/metrics").await;
    assert!(
        metrics.contains("herald_queue_paused{queue=\"default\"} 1"),
        "{metrics}"
    );
    let (status, resumed) = f
        .call("POST", "/v1/admin/queues/default/resume", Some(ADMIN), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{resumed}");
    assert_eq!(resumed["paused"], false);
    let (status, _) = f
        .call("POST", "/v1/admin/queues/default/resume", Some(ADMIN), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "it is not paused");
    // Queues come in pages by name.
    for q in ["q1", "q2"] {
        let (status, _) = f
            .call(
                "POST",
                &format!("/v1/admin/queues/{q}/pause"),
                Some(ADMIN),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    let (_, page) = f
        .call("GET", "/v1/admin/queues?limit=2", Some(ADMIN), None)
        .await;
    let names: Vec<&str> = page["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|v| v["queue"].as_str())
        .collect();
    assert_eq!(
        (names, page["next_cursor"].as_str()),
        (vec!["default", "q1"], Some("q1"))
    );
    let (_, page) = f
        .call(
            "GET",
            "/v1/admin/queues?limit=2&after=q1",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(page["data"][0]["queue"], "q2");
    assert_eq!(page["data"][0]["paused_reason"], "paused by an operator");
    assert_eq!(page["next_cursor"], Value::Null);
    for bad in ["limit=0", "limit=201", "nope=1"] {
        let (status, _) = f
            .call("GET", &format!("/v1/admin/queues?{bad}"), Some(ADMIN), None)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
    for q in ["q1", "q2"] {
        f.call(
            "POST",
            &format!("/v1/admin/queues/{q}/resume"),
            Some(ADMIN),
            None,
        )
        .await;
    }
    // Discarding a waiting job; a final one answers 409.
    let other = f.waiting_job().await;
    let (status, discarded) = f
        .call(
            "POST",
            &format!("/v1/admin/jobs/{other}/discard"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{discarded}");
    assert_eq!(discarded["state"], "discarded");
    assert!(discarded.to_string().contains("discarded by an operator"));
    let (status, _) = f
        .call(
            "POST",
            &format!("/v1/admin/jobs/{other}/discard"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, list) = f
        .call(
            "GET",
            "/v1/admin/jobs?state=scheduled&limit=10",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["data"][0]["id"], id);
    let (status, _) = f
        .call("GET", "/v1/admin/jobs?state=nonsense", Some(ADMIN), None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, cancelled) = f
        .call(
            "POST",
            &format!("/v1/admin/jobs/{id}/cancel"),
            Some(ADMIN),
            Some(json!({ "reason": "not needed" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["state"], "cancelled");
    let (status, _) = f
        .call(
            "POST",
            &format!("/v1/admin/jobs/{id}/cancel"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a final job cannot be cancelled"
    );
    let (status, retried) = f
        .call(
            "POST",
            &format!("/v1/admin/jobs/{id}/retry"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(retried["state"], "available");
    let (status, _) = f
        .call("GET", "/v1/admin/jobs/999999999", Some(ADMIN), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let channel = f.channel(&key, "1555000301").await;
    let cid = channel["id"].as_str().expect("id").to_owned();
    let (status, _) = f
        .call(
            "POST",
            &format!("/v1/channels/{cid}/pause"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, paused) = f
        .call("GET", &format!("/v1/channels/{cid}"), Some(&key), None)
        .await;
    assert_eq!(paused["paused_reason"], "paused by an operator");
    let (status, _) = f
        .call(
            "POST",
            &format!("/v1/channels/{cid}/resume"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, resumed) = f
        .call("GET", &format!("/v1/channels/{cid}"), Some(&key), None)
        .await;
    assert_eq!(resumed["paused_reason"], Value::Null);

    // Metrics: Prometheus text with the job gauges and webhook counters, and the engine's
    // throughput, latency and permits when an engine runs beside the API.
    let engine = Arc::new(herald_engine::metrics::EngineMetrics::default());
    let q = engine.queue("send");
    q.completed
        .fetch_add(7, std::sync::atomic::Ordering::Relaxed);
    q.run.observe(std::time::Duration::from_millis(3));
    engine
        .key("channel:abc")
        .granted
        .fetch_add(5, std::sync::atomic::Ordering::Relaxed);
    let text = f.text_with("/metrics", Some(engine)).await;
    for want in [
        "herald_jobs_finished_total{queue=\"send\",outcome=\"completed\"} 7",
        "herald_job_run_seconds_bucket{queue=\"send\",le=\"0.005\"} 1",
        "herald_job_wait_seconds_count{queue=\"send\"} 0",
        "herald_limiter_permits_total{key=\"channel:abc\",kind=\"granted\"} 5",
        "herald_jobs{queue=\"default\",state=\"available\"} 1",
        "herald_webhook_requests_total{outcome=\"bad_signature\"} 0",
        "herald_webhook_response_seconds_bucket{le=\"+Inf\"} 0",
        "herald_webhook_deliveries{state=\"pending\"} 0",
        "herald_metrics_database_up 1",
    ] {
        assert!(text.contains(want), "{want} in\n{text}");
    }
}
