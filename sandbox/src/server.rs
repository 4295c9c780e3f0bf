//! The HTTP server: Meta's send endpoints, the `/_sandbox` control endpoints, and a listener
//! whose connections a handler can drop without answering (lost responses).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::serve::{IncomingStream, Listener};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::meta::{fbtrace_id, Api, MetaError};
use crate::state::{unix_ms, SendRequest, Shared};
use crate::validate;
use crate::webhook::{self, Event};
use crate::Faults;

#[derive(Clone)]
struct AppState {
    shared: Arc<Shared>,
    /// `None` when no webhook URL is configured: nothing is queued.
    events: Option<mpsc::UnboundedSender<Event>>,
    shutdown: watch::Receiver<bool>,
}

impl AppState {
    fn emit(&self, events: Vec<Event>) {
        if let Some(tx) = &self.events {
            for event in events {
                // Fails only once the webhook sender is gone, i.e. during shutdown.
                let _ = tx.send(event);
            }
        }
    }

    /// Resolves when the sandbox shuts down.
    async fn stopping(&self) {
        let mut rx = self.shutdown.clone();
        // An error means the Sandbox handle is gone: shutting down too.
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// Serves until `shutdown` turns true, then waits for in-flight requests.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    events: Option<mpsc::UnboundedSender<Event>>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let state = AppState {
        shared,
        events,
        shutdown: shutdown.clone(),
    };
    let app = Router::new()
        .route("/{version}/{node}/messages", post(send))
        .route("/_sandbox/stats", get(stats))
        .route("/_sandbox/faults", put(put_faults).get(get_faults))
        .route("/_sandbox/accepted", get(accepted))
        .route("/_sandbox/reset", post(reset))
        .route("/_sandbox/inbound", post(inbound))
        .fallback(unsupported)
        .with_state(state.clone());
    drop(shutdown);
    axum::serve(
        SandboxListener(listener),
        app.into_make_service_with_connect_info::<Conn>(),
    )
    .with_graceful_shutdown(async move { state.stopping().await })
    .await
}

// ---- Listener whose connections can be dropped from a handler ----

/// Set by a handler to drop its connection without writing the response.
#[derive(Debug, Default)]
struct KillSwitch(AtomicBool);

/// Connection info handed to handlers: the peer and the connection's kill switch.
#[derive(Clone, Debug)]
struct Conn {
    remote: SocketAddr,
    kill: Arc<KillSwitch>,
}

impl Conn {
    fn kill(&self) {
        self.kill.0.store(true, Ordering::SeqCst);
    }
}

impl Connected<IncomingStream<'_, SandboxListener>> for Conn {
    fn connect_info(stream: IncomingStream<'_, SandboxListener>) -> Self {
        stream.remote_addr().clone()
    }
}

struct SandboxListener(TcpListener);

impl Listener for SandboxListener {
    type Io = KillableStream;
    type Addr = Conn;

    async fn accept(&mut self) -> (KillableStream, Conn) {
        loop {
            match self.0.accept().await {
                Ok((stream, remote)) => {
                    // Small JSON answers: don't let Nagle delay them.
                    let _ = stream.set_nodelay(true);
                    let kill = Arc::new(KillSwitch::default());
                    let io = KillableStream {
                        inner: stream,
                        kill: kill.clone(),
                    };
                    return (io, Conn { remote, kill });
                }
                Err(e) => {
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                    ) {
                        // E.g. out of file descriptors: wait for some to be released.
                        tracing::error!(error = %e, "sandbox accept error");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Conn> {
        Ok(Conn {
            remote: self.0.local_addr()?,
            kill: Arc::default(),
        })
    }
}

/// A TCP stream that fails every read and write once killed, so hyper closes the
/// connection without writing the pending response.
struct KillableStream {
    inner: TcpStream,
    kill: Arc<KillSwitch>,
}

impl KillableStream {
    fn killed(&self) -> bool {
        self.kill.0.load(Ordering::SeqCst)
    }
}

fn aborted<T>() -> Poll<io::Result<T>> {
    Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()))
}

impl AsyncRead for KillableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.killed() {
            return aborted();
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.killed() {
            return aborted();
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.killed() {
            return aborted();
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.killed() {
            return aborted();
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.killed() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

// ---- Send endpoints ----

fn authorized(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .is_some_and(|(scheme, given)| scheme.eq_ignore_ascii_case("bearer") && given == token)
}

/// A JSON answer, with `X-Business-Use-Case-Usage` when that fault is on.
fn respond(
    app: &AppState,
    faults: &Faults,
    api: Api,
    sender: &str,
    status: StatusCode,
    body: Value,
) -> Response {
    let mut response = (status, Json(body)).into_response();
    if faults.usage_headers {
        let usage = app.shared.usage_now(sender);
        let config = &app.shared.config;
        let (key, kind) = match api {
            Api::WhatsApp => (&config.waba_id, "whatsapp_business_messaging"),
            Api::Messenger => (&config.page_id, "messenger"),
        };
        let value = json!({ key.as_str(): [{
            "type": kind,
            "call_count": usage.call_count,
            "total_cputime": 0,
            "total_time": 0,
            "estimated_time_to_regain_access": usage.regain_minutes,
        }]});
        if let Ok(value) = HeaderValue::from_str(&value.to_string()) {
            response
                .headers_mut()
                .insert("x-business-use-case-usage", value);
        }
    }
    response
}

fn error_response(
    app: &AppState,
    faults: &Faults,
    api: Api,
    sender: &str,
    error: &MetaError,
) -> Response {
    respond(
        app,
        faults,
        api,
        sender,
        error.http_status(),
        error.body(api),
    )
}

/// `POST /{version}/{phone_number_id}/messages` and `POST /{version}/me/messages`.
async fn send(
    State(app): State<AppState>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    Path((_version, node)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (api, sender) = if node == "me" {
        (Api::Messenger, app.shared.config.page_id.clone())
    } else {
        (Api::WhatsApp, node)
    };
    let faults = app.shared.faults();
    if faults.token_expired || !authorized(&headers, &app.shared.config.access_token) {
        app.shared.record_error(190);
        return error_response(&app, &faults, api, &sender, &MetaError::new(190));
    }
    let (result, success, events) = match api {
        Api::WhatsApp => {
            let send = match validate::whatsapp(&body) {
                Ok(send) => send,
                Err(e) => {
                    app.shared.record_error(e.code);
                    return error_response(&app, &faults, api, &sender, &e);
                }
            };
            let result = app.shared.decide(&SendRequest {
                api,
                sender: &sender,
                recipient: &send.to,
                recipient_digits: Some(&send.wa_id),
                callback: send.callback.as_deref(),
            });
            match result {
                Ok(acc) => {
                    let events = webhook::whatsapp_events(&app.shared.config, &sender, &send, &acc);
                    let success = json!({
                        "messaging_product": "whatsapp",
                        "contacts": [{"input": send.to, "wa_id": send.wa_id}],
                        "messages": [{"id": acc.message_id}],
                    });
                    (Ok(acc), success, events)
                }
                Err(e) => (Err(e), Value::Null, Vec::new()),
            }
        }
        Api::Messenger => {
            let send = match validate::messenger(&body) {
                Ok(send) => send,
                Err(e) => {
                    app.shared.record_error(e.code);
                    return error_response(&app, &faults, api, &sender, &e);
                }
            };
            let result = app.shared.decide(&SendRequest {
                api,
                sender: &sender,
                recipient: &send.recipient,
                recipient_digits: None,
                callback: send.metadata.as_deref(),
            });
            match result {
                Ok(acc) => {
                    let events = webhook::page_events(&app.shared.config, &send, &acc);
                    let success = json!({
                        "recipient_id": send.recipient,
                        "message_id": acc.message_id,
                    });
                    (Ok(acc), success, events)
                }
                Err(e) => (Err(e), Value::Null, Vec::new()),
            }
        }
    };
    let acc = match result {
        Ok(acc) => acc,
        Err(e) => return error_response(&app, &faults, api, &sender, &e),
    };
    app.emit(events);
    if acc.lost {
        tokio::select! {
            _ = tokio::time::sleep(app.shared.config.lost_response_hold) => {}
            _ = app.stopping() => {}
        }
        tracing::debug!(remote = %conn.remote, id = %acc.message_id, "dropping a lost response");
        conn.kill();
        // Never written: the connection fails first.
        return StatusCode::OK.into_response();
    }
    if let Some(delay) = acc.slow {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = app.stopping() => {}
        }
    }
    respond(&app, &faults, api, &sender, StatusCode::OK, success)
}

/// Anything else: Graph's answer for an unknown object or edge.
async fn unsupported(method: Method, uri: Uri) -> Response {
    let body = json!({"error": {
        "message": format!(
            "Unsupported {} request. Object with ID '{}' does not exist, cannot be loaded due to missing permissions, or does not support this operation.",
            method.as_str().to_ascii_lowercase(),
            uri.path().trim_matches('/'),
        ),
        "type": "GraphMethodException",
        "code": 100,
        "error_subcode": 33,
        "fbtrace_id": fbtrace_id(),
    }});
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

// ---- Control endpoints ----

fn bad_request(message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": {"message": message}})),
    )
        .into_response()
}

async fn stats(State(app): State<AppState>) -> Response {
    Json(app.shared.stats()).into_response()
}

async fn get_faults(State(app): State<AppState>) -> Response {
    Json(app.shared.current_faults()).into_response()
}

async fn put_faults(State(app): State<AppState>, body: Bytes) -> Response {
    match serde_json::from_slice::<Faults>(&body) {
        Ok(faults) => {
            app.shared.set_faults(faults);
            Json(app.shared.current_faults()).into_response()
        }
        Err(e) => bad_request(format!("invalid faults: {e}")),
    }
}

async fn accepted(State(app): State<AppState>, uri: Uri) -> Response {
    let prefix = uri
        .query()
        .and_then(|q| query_param(q, "prefix"))
        .unwrap_or_default();
    Json(app.shared.accepted(&prefix)).into_response()
}

async fn reset(State(app): State<AppState>) -> Response {
    app.shared.reset();
    Json(json!({"ok": true})).into_response()
}

#[derive(Deserialize)]
struct InboundRequest {
    sender_id: String,
    from: String,
    text: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

async fn inbound(State(app): State<AppState>, body: Bytes) -> Response {
    let req = match serde_json::from_slice::<InboundRequest>(&body) {
        Ok(req) => req,
        Err(e) => return bad_request(format!("invalid inbound message: {e}")),
    };
    let id = req
        .id
        .unwrap_or_else(|| app.shared.message_id(Api::WhatsApp));
    let from = validate::digits(&req.from);
    let name = req.name.unwrap_or_else(|| format!("Sandbox User {from}"));
    app.emit(vec![Event::WaInbound {
        sender: req.sender_id,
        from,
        id: id.clone(),
        timestamp: (unix_ms() / 1000.0) as u64,
        text: req.text,
        name,
    }]);
    Json(json!({"id": id, "queued": app.events.is_some()})).into_response()
}

/// One parameter of a query string, percent-decoded (`+` is a space).
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key) == name).then(|| percent_decode(value))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        assert_eq!(
            query_param("a=1&prefix=camp%2F1+x", "prefix").as_deref(),
            Some("camp/1 x")
        );
        assert_eq!(query_param("prefix", "prefix").as_deref(), Some(""));
        assert_eq!(query_param("x=1", "prefix"), None);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
