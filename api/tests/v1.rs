//! The `/v1` API through `app(state)` with `oneshot`: workspaces and keys, channels, pagination,
//! bad input, and the walk that proves another workspace's ids answer 404 everywhere.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use herald_api::{app, ApiConfig, AppState};
use herald_engine::{ConnectOptions, Store};
use serde_json::{json, Value};
use tower::ServiceExt;
use uuid::Uuid;

const ADMIN: &str = "admin-token-for-tests-0123456789";

struct Fixture {
    store: Arc<dyn Store>,
    path: std::path::PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.path.display()));
        }
    }
}

async fn fixture() -> Fixture {
    let path = std::env::temp_dir().join(format!("herald_api_v1_{}.db", Uuid::new_v4().simple()));
    let store = herald_engine::connect(
        &format!("sqlite:{}", path.display()),
        &ConnectOptions {
            keyring: Some(Arc::new(
                herald_engine::crypto::Keyring::parse(&"cd".repeat(32), &[]).expect("key"),
            )),
            ..ConnectOptions::default()
        },
    )
    .await
    .expect("open sqlite");
    Fixture { store, path }
}

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
        let state = AppState::new(
            self.store.clone(),
            Arc::new(herald_engine::SystemClock),
            ApiConfig {
                admin_token: Some(ADMIN.into()),
                ..ApiConfig::default()
            },
        );
        let response = app(state)
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
    let missing = Uuid::new_v4().to_string();
    for (method, template) in [
        ("GET", "/v1/channels/{}"),
        ("DELETE", "/v1/channels/{}"),
        ("DELETE", "/v1/api-keys/{}"),
    ] {
        let foreign = if template.contains("channels") {
            &a_channel
        } else {
            &a_key_id
        };
        for id in [foreign.as_str(), missing.as_str(), "not-an-id"] {
            let (status, body) = f
                .call(method, &template.replace("{}", id), Some(&b_key), None)
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
}
