//! A stand-in for Meta's Graph API send endpoints and status webhooks.
//!
//! Tests, benchmarks and the demo point Herald's Meta handlers at a [`Sandbox`] instead of
//! `graph.facebook.com`. The sandbox speaks Meta's real formats (requests, responses, error
//! bodies, signed webhooks) and enforces Meta's limits with Meta's error codes, so the code
//! under test takes the same branches it would take in production:
//!
//! - `POST /{version}/{phone_number_id}/messages`: the WhatsApp Cloud API send endpoint.
//! - `POST /{version}/me/messages`: the Messenger / Instagram Send API.
//! - `/_sandbox/*`: control endpoints (stats, faults, accepted log, reset, inbound messages)
//!   for the `herald sandbox` CLI and for tests that drive the sandbox over HTTP.
//!
//! Accepted messages produce status webhooks (WhatsApp `statuses[]`, Messenger echoes and
//! delivery receipts), batched and signed with `X-Hub-Signature-256` like Meta's, delivered at
//! least once with retries. Faults ([`Faults`]) inject the failures a sender must survive: lost
//! responses, server errors, slow answers, rate-limit bursts, expired tokens and per-recipient
//! or per-sender error codes.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod meta;
mod server;
mod state;
mod validate;
mod webhook;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::state::Shared;

/// How long [`Sandbox::shutdown`] waits for in-flight requests and pending webhooks, so a
/// stuck webhook receiver cannot hang a test or the CLI forever.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Everything the sandbox does, fixed at start except [`Faults`] (see [`Sandbox::set_faults`]).
///
/// The defaults are Meta's defaults (80 messages/s per phone number, one message per 6 s per
/// recipient with a burst of 20) so that a caller tuned against the sandbox is tuned for Meta.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// Throughput limit per sender (WhatsApp `phone_number_id`, or the page behind
    /// `/me/messages`) in messages per second; Meta's default tier is 80/s. Beyond it sends are
    /// refused with 130429 (WhatsApp) or 613 (Messenger). A value that is not finite or not
    /// positive disables the limit, for benchmarks that measure the caller rather than pacing.
    pub mps: f64,
    /// Token-bucket capacity expressed as time at `mps` (capacity = max(1, mps × burst)), i.e.
    /// how far ahead of its pace a sender may run before it is refused. Meta tolerates short
    /// bursts; 200 ms (16 messages at 80/s) keeps a badly paced caller visible in tests.
    pub burst: Duration,
    /// Per (sender, recipient) pair refill: one message per this interval, Meta's "about one
    /// message per 6 s" pair rate. Beyond it sends are refused with 131056. Zero disables the
    /// pair limit.
    pub pair_interval: Duration,
    /// Per-pair bucket capacity: Meta tolerates bursts of tens of messages to one user before
    /// answering 131056. Values below 1 are treated as 1.
    pub pair_burst: u32,
    /// The only valid `Authorization: Bearer` token, so tests can check that the caller sends
    /// its configured token and handles 190 when it does not.
    pub access_token: String,
    /// HMAC-SHA256 key for `X-Hub-Signature-256` on webhooks (Meta's app secret), so the
    /// caller's webhook endpoint can verify signatures exactly as in production.
    pub app_secret: String,
    /// `entry[].id` in WhatsApp webhooks and the key of `X-Business-Use-Case-Usage` (Meta's
    /// WhatsApp Business Account id).
    pub waba_id: String,
    /// The page or Instagram account behind `/me/messages`: the sender for limits, faults and
    /// `entry[].id` of Messenger webhooks.
    pub page_id: String,
    /// Where status and inbound webhooks are POSTed (the caller's webhook endpoint); `None`
    /// sends none, for tests that only look at send responses.
    pub webhook_url: Option<String>,
    /// Statuses sent per accepted message, in order (Meta sends `sent` then `delivered`, and
    /// `read` when the user reads). For Messenger, `Sent` is the echo, `Delivered` a delivery
    /// receipt, `Read` a read receipt; `Failed` has no Messenger form and is skipped there.
    pub statuses: Vec<Status>,
    /// Most status items per webhook POST: Meta batches several changes in one POST, and the
    /// caller must handle that. Values below 1 are treated as 1.
    pub webhook_batch: usize,
    /// A partial batch is sent after this, so webhooks arrive promptly when traffic is light.
    pub webhook_flush: Duration,
    /// How long a "lost" response ([`Faults::lose_response`]) hangs before the connection is
    /// dropped without an answer; long by default so the caller's own timeout fires first,
    /// as with a real network partition.
    pub lost_response_hold: Duration,
    /// Initial faults; replace them at run time with [`Sandbox::set_faults`] or
    /// `PUT /_sandbox/faults`.
    pub faults: Faults,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            mps: 80.0,
            burst: Duration::from_millis(200),
            pair_interval: Duration::from_secs(6),
            pair_burst: 20,
            access_token: "sandbox-token".to_owned(),
            app_secret: "sandbox-secret".to_owned(),
            waba_id: "sandbox-waba".to_owned(),
            page_id: "sandbox-page".to_owned(),
            webhook_url: None,
            statuses: vec![Status::Sent, Status::Delivered],
            webhook_batch: 100,
            webhook_flush: Duration::from_millis(20),
            lost_response_hold: Duration::from_secs(120),
            faults: Faults::default(),
        }
    }
}

/// A message status as Meta reports it in webhooks (`statuses[].status`), so configured
/// statuses serialize to the exact strings Meta uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Meta accepted the message and sent it to the user's device.
    Sent,
    /// The message reached the user's device.
    Delivered,
    /// The user opened the message.
    Read,
    /// The message could not be delivered; the status carries `errors[]`.
    Failed,
}

/// Failures to inject, so tests can exercise every branch of the caller's error handling.
///
/// All fields default to "no fault". Replace the whole set with [`Sandbox::set_faults`] or
/// `PUT /_sandbox/faults` (JSON, missing fields default).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    /// Probability that an accepted message's response is lost: the message IS accepted
    /// (counted, webhooks sent) but no response is written; the handler hangs for
    /// [`SandboxConfig::lost_response_hold`] and then drops the connection. This is the case
    /// `biz_opaque_callback_data` reconciliation exists for.
    pub lose_response: f64,
    /// Probability of HTTP 500 with Meta error code 2 ("Service temporarily unavailable",
    /// `is_transient: true`); the message is NOT accepted, so a retry is safe.
    pub server_error: f64,
    /// Probability of delaying an accepted message's response by `slow_ms`, to exercise the
    /// caller's timeouts and concurrency.
    pub slow: f64,
    /// The delay applied by `slow`, in milliseconds.
    pub slow_ms: u64,
    /// The next N send requests are refused with the throughput error (130429, or 613 on
    /// Messenger) regardless of the bucket; counts down, to test backoff deterministically.
    pub burst_130429: u32,
    /// Every send is refused with HTTP 401, code 190, subcode 463 (expired token), to test
    /// that the caller stops the channel instead of retrying.
    pub token_expired: bool,
    /// Recipient (`to`, raw or digits only, or Messenger `recipient.id`) → Meta code returned
    /// synchronously (e.g. 131026, 131047, 131050, 131049, 551).
    pub recipient_errors: HashMap<String, i64>,
    /// Recipient → the send is accepted (200 and a message id) but a `failed` status webhook
    /// with `errors:[{code,title}]` replaces the normal statuses: Meta's asynchronous failures.
    pub fail_after_accept: HashMap<String, i64>,
    /// Sender (`phone_number_id` or page id) → code returned for every send from it (368,
    /// 131048, 131057, 4, 80007 …), to test channel-level pauses.
    pub sender_errors: HashMap<String, i64>,
    /// Add `X-Business-Use-Case-Usage` to send responses: `call_count` is the percentage of the
    /// sender's throughput bucket in use, `estimated_time_to_regain_access` is 0 unless the
    /// bucket is empty (then the minutes until a token is back, rounded up, as Meta counts).
    pub usage_headers: bool,
}

/// Counters since start or the last reset, for assertions in tests and benchmark reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Send requests accepted (each got, or would have got, a message id), including lost
    /// responses: what Meta would actually deliver.
    pub accepted: u64,
    /// Distinct non-empty callback data among accepted messages: how many logical sends
    /// went out at least once.
    pub unique_callbacks: u64,
    /// Accepted messages whose callback data had already been accepted (the extra copies):
    /// a user received the same message twice.
    pub duplicate_callbacks: u64,
    /// Throughput-limit answers (130429 on WhatsApp, 613 on Messenger): how often the caller
    /// ran ahead of its pace.
    pub limit_errors: u64,
    /// Every error answer by Meta code (the code as a string key, so the map is valid JSON).
    pub errors_by_code: BTreeMap<String, u64>,
    /// Accepted messages whose response was deliberately lost.
    pub lost_responses: u64,
    /// Wall-clock time of the first acceptance (unix milliseconds), for throughput reports.
    pub first_accepted_unix_ms: Option<f64>,
    /// Wall-clock time of the last acceptance (unix milliseconds), for throughput reports.
    pub last_accepted_unix_ms: Option<f64>,
    /// Most messages accepted for one sender in any sliding one-second window: a paced
    /// caller never exceeds bucket capacity + mps.
    pub max_in_any_second: u64,
    /// Webhook POSTs answered 2xx.
    pub webhooks_sent: u64,
    /// Webhook POSTs given up after all retries.
    pub webhook_failures: u64,
    /// Status items (WhatsApp statuses, Messenger echoes and receipts) in webhook POSTs
    /// answered 2xx.
    pub statuses_sent: u64,
}

/// One logical message in the accepted log, keyed by its callback data, so tests can check
/// that every send arrived exactly once.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Accepted {
    /// The callback data (`biz_opaque_callback_data` or Messenger `message.metadata`).
    pub callback: String,
    /// The recipient of the first accepted copy (`to` as sent, or Messenger `recipient.id`).
    pub to: String,
    /// The message id (`wamid.*` / `mid.*`) of the first accepted copy.
    pub message_id: String,
    /// When the first copy was accepted (unix milliseconds).
    pub accepted_unix_ms: f64,
    /// How many copies were accepted; more than 1 means the user got duplicates.
    pub copies: u32,
}

/// A running sandbox: the HTTP server, its shared state and the webhook sender.
///
/// Dropping it signals shutdown without waiting; call [`Sandbox::shutdown`] to also wait for
/// pending webhooks.
pub struct Sandbox {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    server: Option<JoinHandle<io::Result<()>>>,
    webhooks: Option<JoinHandle<()>>,
}

impl Sandbox {
    /// Serves on `listener` (bind it to `127.0.0.1:0` in tests) and spawns the webhook
    /// sender. Fails if the listener has no local address, or `webhook_url` is not a URL.
    pub async fn start(listener: TcpListener, config: SandboxConfig) -> io::Result<Sandbox> {
        let addr = listener.local_addr()?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let webhook_url = match &config.webhook_url {
            Some(url) => Some(
                reqwest::Url::parse(url)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            ),
            None => None,
        };
        let client = reqwest::Client::builder()
            .timeout(webhook::POST_TIMEOUT)
            .pool_max_idle_per_host(webhook::MAX_IN_FLIGHT)
            .build()
            .map_err(io::Error::other)?;
        let shared = Arc::new(Shared::new(config));
        let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let webhooks = tokio::spawn(webhook::run(
            shared.clone(),
            client,
            webhook_url.clone(),
            events_rx,
        ));
        let events = webhook_url.is_some().then_some(events_tx);
        let server = tokio::spawn(server::serve(listener, shared.clone(), events, shutdown_rx));
        tracing::debug!(%addr, "sandbox started");
        Ok(Sandbox {
            addr,
            shared,
            shutdown_tx,
            server: Some(server),
            webhooks: Some(webhooks),
        })
    }

    /// The Graph base URL to configure in the caller, e.g. `http://127.0.0.1:41234`
    /// (an unspecified bind address is reported as 127.0.0.1).
    pub fn url(&self) -> String {
        let ip = if self.addr.ip().is_unspecified() {
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            self.addr.ip()
        };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// The counters since start or the last reset.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Replaces the faults (the `burst_130429` countdown restarts from the new value).
    pub fn set_faults(&self, faults: Faults) {
        self.shared.set_faults(faults);
    }

    /// Accepted messages whose callback data starts with `prefix` (all with ""), oldest first.
    pub fn accepted(&self, prefix: &str) -> Vec<Accepted> {
        self.shared.accepted(prefix)
    }

    /// Stops serving (in-flight requests finish; lost responses are dropped at once), then
    /// flushes pending webhooks. Waits at most about 5 s in all.
    pub async fn shutdown(mut self) {
        self.shutdown_tx.send_replace(true);
        let deadline = tokio::time::Instant::now() + SHUTDOWN_WAIT;
        if let Some(server) = self.server.take() {
            wait_or_abort(server, deadline, "server").await;
        }
        if let Some(webhooks) = self.webhooks.take() {
            wait_or_abort(webhooks, deadline, "webhook sender").await;
        }
    }
}

async fn wait_or_abort<T>(
    mut task: JoinHandle<T>,
    deadline: tokio::time::Instant,
    what: &'static str,
) {
    if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
        tracing::warn!("sandbox {what} did not stop in time; aborting it");
        task.abort();
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Without this, a sandbox dropped at the end of a test would keep its port open.
        self.shutdown_tx.send_replace(true);
    }
}

/// Runs a sandbox on `listener` until `shutdown` resolves, then flushes pending webhooks:
/// the body of the `herald sandbox` CLI command.
pub async fn run(
    listener: TcpListener,
    config: SandboxConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let sandbox = Sandbox::start(listener, config).await?;
    tracing::info!(url = %sandbox.url(), "sandbox serving Meta's Graph API stand-in");
    shutdown.await;
    sandbox.shutdown().await;
    Ok(())
}
