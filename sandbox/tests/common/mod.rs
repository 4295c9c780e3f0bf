//! Shared helpers for the sandbox's integration tests: starting a sandbox on a real socket,
//! sending Meta requests, and a tiny webhook receiver that verifies signatures.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use herald_sandbox::{Sandbox, SandboxConfig};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::net::TcpListener;

pub const TOKEN: &str = "sandbox-token";
pub const SECRET: &str = "sandbox-secret";

pub async fn start(config: SandboxConfig) -> Sandbox {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    Sandbox::start(listener, config).await.expect("start")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// A minimal valid WhatsApp text send.
pub fn text(to: &str, callback: Option<&str>) -> Value {
    let mut body = json!({
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "text",
        "text": {"body": "hello", "preview_url": false},
    });
    if let Some(cb) = callback {
        body["biz_opaque_callback_data"] = json!(cb);
    }
    body
}

/// POSTs a JSON body with the valid token; returns the HTTP status and the JSON answer.
pub async fn post_json(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    body: &Value,
) -> (u16, Value) {
    let mut req = client.post(url).json(body);
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status().as_u16();
    let body = resp.json::<Value>().await.expect("json body");
    (status, body)
}

pub async fn wa_send(
    client: &reqwest::Client,
    sb: &Sandbox,
    phone: &str,
    body: &Value,
) -> (u16, Value) {
    let url = format!("{}/v21.0/{phone}/messages", sb.url());
    post_json(client, &url, Some(TOKEN), body).await
}

pub async fn page_send(client: &reqwest::Client, sb: &Sandbox, body: &Value) -> (u16, Value) {
    let url = format!("{}/v21.0/me/messages", sb.url());
    post_json(client, &url, Some(TOKEN), body).await
}

/// The Meta error code of an answer, or 0 for a success.
pub fn code(body: &Value) -> i64 {
    body["error"]["code"].as_i64().unwrap_or(0)
}

/// Polls `cond` every 10 ms until it holds or `within` passes.
pub async fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[derive(Default)]
pub struct ReceiverState {
    /// Every accepted POST's parsed body.
    pub posts: Mutex<Vec<Value>>,
    /// POSTs whose signature did not verify (rejected with 403).
    pub bad_signatures: AtomicU64,
    /// Answer 500 to this many POSTs first, to exercise retries.
    pub fail_next: AtomicU32,
    /// POSTs answered 500 because of `fail_next`.
    pub failed: AtomicU64,
}

/// A webhook endpoint that verifies `X-Hub-Signature-256` like Herald must.
pub struct Receiver {
    pub url: String,
    pub state: Arc<ReceiverState>,
}

async fn hook(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let signature = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("sha256="))
        .and_then(|v| hex::decode(v).ok());
    let json_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let valid = signature.is_some_and(|sig| {
        let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(SECRET.as_bytes()) else {
            return false;
        };
        mac.update(&body);
        mac.verify_slice(&sig).is_ok()
    });
    if !valid || !json_type {
        state.bad_signatures.fetch_add(1, Ordering::SeqCst);
        return StatusCode::FORBIDDEN;
    }
    if state
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        state.failed.fetch_add(1, Ordering::SeqCst);
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    match serde_json::from_slice::<Value>(&body) {
        Ok(v) => {
            state.posts.lock().expect("lock").push(v);
            StatusCode::OK
        }
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

impl Receiver {
    pub async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(ReceiverState::default());
        let app = Router::new()
            .route("/hook", post(hook))
            .with_state(state.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url: format!("http://{addr}/hook"),
            state,
        }
    }

    pub fn posts(&self) -> Vec<Value> {
        self.state.posts.lock().expect("lock").clone()
    }

    /// Every WhatsApp status item received, in arrival order.
    pub fn statuses(&self) -> Vec<Value> {
        self.wa_values()
            .iter()
            .flat_map(|v| v["statuses"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// Every WhatsApp `changes[].value`.
    pub fn wa_values(&self) -> Vec<Value> {
        self.posts()
            .iter()
            .filter(|p| p["object"] == "whatsapp_business_account")
            .flat_map(|p| p["entry"].as_array().cloned().unwrap_or_default())
            .flat_map(|e| e["changes"].as_array().cloned().unwrap_or_default())
            .map(|c| c["value"].clone())
            .collect()
    }

    /// Every Messenger `messaging[]` item received.
    pub fn messaging(&self) -> Vec<Value> {
        self.posts()
            .iter()
            .filter(|p| p["object"] == "page")
            .flat_map(|p| p["entry"].as_array().cloned().unwrap_or_default())
            .flat_map(|e| e["messaging"].as_array().cloned().unwrap_or_default())
            .collect()
    }
}
