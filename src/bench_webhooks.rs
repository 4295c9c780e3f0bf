//! `herald bench webhooks`: Meta's webhook path end to end. It starts `herald serve` on the given
//! database (or targets a running server given `--url`), sends signed WhatsApp inbound-message
//! deliveries with distinct message ids from `--concurrency` connections, waits until every
//! accepted delivery is stored (and processed), and prints as its last line
//! `{"requests":N,"rps":..,"p50_ms":..,"p99_ms":..,"errors":..,"stored":..}` plus the
//! processing figures.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use herald_engine::delivery::{NewChannel, Platform};
use herald_engine::{ConnectOptions, Store};
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use uuid::Uuid;

use crate::bench_server::{drop_schema, fresh_schema, wait_ready, ServeOptions, Server};

#[derive(Args, Debug)]
pub struct WebhooksArgs {
    /// Deliveries to send.
    #[arg(long, default_value_t = 100_000)]
    requests: usize,
    /// Connections sending at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// The database: PostgreSQL (a fresh schema is created and dropped) or `sqlite:PATH`.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    database_url: String,
    /// A running server to target instead of starting one; needs `--channel-id` and
    /// `--app-secret` of a WhatsApp channel on it, and its `--database-url` to count what it stored.
    #[arg(long)]
    url: Option<String>,
    #[arg(long, requires = "url")]
    channel_id: Option<Uuid>,
    #[arg(long, requires = "url")]
    app_secret: Option<String>,
    /// Apply the stored deliveries only after the upload, not while it runs: measures the
    /// ingest alone (an API node's work), then how long the queue takes to catch up.
    #[arg(long, conflicts_with = "url")]
    process_after: bool,
}

const SENDER_ID: &str = "1555000200";

pub async fn run(args: WebhooksArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.requests == 0 || args.concurrency == 0 {
        return Err("--requests and --concurrency must be above zero".into());
    }
    if args.url.is_some() && (args.channel_id.is_none() || args.app_secret.is_none()) {
        return Err("--url needs --channel-id and --app-secret".into());
    }
    let pg = args.database_url.starts_with("postgres");
    let own_schema = args.url.is_none() && pg;
    let schema = fresh_schema("webhooks");
    // A key of the run's own, for the channel it creates and the server it starts.
    let master_key = herald_engine::crypto::generate_key();
    let store = herald_engine::connect(
        &args.database_url,
        &ConnectOptions {
            schema: own_schema.then(|| schema.clone()),
            keyring: Some(Arc::new(herald_engine::crypto::Keyring::parse(
                &master_key,
                &[],
            )?)),
            ..ConnectOptions::default()
        },
    )
    .await?;
    let result = bench(
        &args,
        store,
        own_schema.then_some(schema.as_str()),
        &master_key,
    )
    .await;
    if own_schema {
        drop_schema(&args.database_url, &schema).await;
    }
    result
}

fn sign(secret: &str, body: &[u8]) -> Result<String, Box<dyn std::error::Error>> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())?;
    mac.update(body);
    Ok(format!(
        "sha256={}",
        hex::encode(mac.finalize().into_bytes())
    ))
}

fn delivery(run: &str, i: usize) -> Vec<u8> {
    json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": "102290129340398", "changes": [{ "field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": { "display_phone_number": "15550783881", "phone_number_id": SENDER_ID },
            "contacts": [{ "profile": { "name": "Bench User" }, "wa_id": format!("1555{:07}", i % 10_000_000) }],
            "messages": [{
                "from": format!("1555{:07}", i % 10_000_000),
                "id": format!("wamid.bench.{run}.{i}"),
                "timestamp": "1767225600",
                "type": "text",
                "text": { "body": "Hi! I'd like to know more about your plans." }
            }]
        }}]}]
    })
    .to_string()
    .into_bytes()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn bench(
    args: &WebhooksArgs,
    store: Arc<dyn Store>,
    schema: Option<&str>,
    master_key: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut server: Option<Server> = None;
    let (base, channel_id, secret) = match &args.url {
        Some(url) => (
            url.trim_end_matches('/').to_owned(),
            args.channel_id.ok_or("--channel-id")?,
            args.app_secret.clone().ok_or("--app-secret")?,
        ),
        None => {
            let secret = format!("bench-secret-{}", Uuid::new_v4().simple());
            let channel = store
                .delivery()
                .create_channel(
                    &NewChannel {
                        workspace_id: Uuid::new_v4(),
                        platform: Platform::Whatsapp,
                        name: "bench".into(),
                        sender_id: SENDER_ID.into(),
                        portfolio_id: None,
                        access_token: "bench-token".into(),
                        app_secret: secret.clone(),
                        verify_token: "bench-verify".into(),
                        graph_base_url: None,
                        api_version: None,
                        limits: None,
                    },
                    chrono::Utc::now(),
                )
                .await?;
            let spawned = Server::spawn(&ServeOptions {
                database_url: &args.database_url,
                schema,
                master_key,
                queues: if args.process_after { "" } else { "webhooks=8" },
                worker_id: "bench-webhooks",
            })?;
            let base = spawned.base.clone();
            server = Some(spawned);
            (base, channel.id, secret)
        }
    };
    wait_ready(&base).await?;
    let before = store.inbox().webhook_counts().await?;

    // Signed bodies are made before the clock starts: signing is Meta's work, not ours.
    let run = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let mut bodies = Vec::with_capacity(args.requests);
    for i in 0..args.requests {
        let body = delivery(&run, i);
        let sig = sign(&secret, &body)?;
        bodies.push((body, sig));
    }
    // A lean HTTP/1.1 client (like wrk): each connection writes a whole prepared request and
    // reads the answer's head and body, one request at a time. reqwest cost as much CPU as the
    // server measured, on the same two cores.
    let addr = base
        .strip_prefix("http://")
        .ok_or("--url must be http://host:port")?
        .to_owned();
    let path = format!("/webhooks/{channel_id}");
    let requests: Vec<Vec<u8>> = bodies
        .iter()
        .map(|(body, sig)| {
            let mut r = format!(
                "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
                 x-hub-signature-256: {sig}\r\ncontent-length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            r.extend_from_slice(body);
            r
        })
        .collect();
    drop(bodies);
    let requests = Arc::new(requests);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (requests, next, addr) = (requests.clone(), next.clone(), addr.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0usize;
            let mut conn: Option<Conn> = None;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(request) = requests.get(i) else {
                    break;
                };
                let sent = Instant::now();
                if conn.is_none() {
                    conn = Conn::open(&addr).await.ok();
                }
                let status = match conn.as_mut() {
                    Some(c) => c.exchange(request).await.ok(),
                    None => None,
                };
                latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                if status != Some(200) {
                    errors += 1;
                    conn = None;
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::with_capacity(args.requests);
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let accepted = (args.requests - errors) as i64;

    // Acknowledged means committed: the count must already be there.
    let stored = store.inbox().webhook_counts().await?.stored - before.stored;
    eprintln!(
        "bench webhooks: stored {stored} of {accepted} accepted at {:.0}/s; p50 {:.2} ms, p99 {:.2} ms; waiting for processing",
        args.requests as f64 / elapsed,
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99)
    );
    // Then wait for the queue to apply them (bounded, in case processing is broken); with
    // --process-after, a second server that only works the queue starts now.
    let mut worker = None;
    if args.process_after {
        if let Some(s) = server.as_mut() {
            s.stop().await;
        }
        let w = Server::spawn(&ServeOptions {
            database_url: &args.database_url,
            schema,
            master_key,
            queues: "webhooks=8",
            worker_id: "bench-webhooks-worker",
        })?;
        w.wait_ready().await?;
        worker = Some(w);
    }
    let process_deadline = Instant::now() + Duration::from_secs(300);
    let pending = loop {
        let c = store.inbox().webhook_counts().await?;
        if c.pending == 0 || Instant::now() > process_deadline {
            break c.pending;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let processed_s = started.elapsed().as_secs_f64();
    let messages = store.inbox().inbound_messages(channel_id, 1).await?.len();
    if let Some(w) = worker.as_mut() {
        w.stop().await;
    }
    if let Some(server) = server.as_mut() {
        server.stop().await;
    }
    eprintln!(
        "bench webhooks: {} requests from {} connections in {elapsed:.2}s; {accepted} accepted, {stored} stored; all processed after {processed_s:.2}s ({pending} pending){}",
        args.requests,
        args.concurrency,
        if messages == 0 { "; NO inbound message stored" } else { "" }
    );
    println!(
        "{}",
        json!({
            "requests": args.requests,
            "rps": (args.requests as f64 / elapsed).round(),
            "p50_ms": (percentile(&latencies, 0.50) * 100.0).round() / 100.0,
            "p99_ms": (percentile(&latencies, 0.99) * 100.0).round() / 100.0,
            "errors": errors,
            "stored": stored,
            "accepted": accepted,
            "pending_after_wait": pending,
            "processed_after_s": (processed_s * 100.0).round() / 100.0,
        })
    );
    if stored != accepted {
        return Err(
            format!("{accepted} deliveries were acknowledged but {stored} are stored").into(),
        );
    }
    Ok(())
}

/// One keep-alive connection of the load generator.
struct Conn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: &str) -> std::io::Result<Conn> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Writes one request and reads its answer; returns the status code.
    async fn exchange(&mut self, request: &[u8]) -> std::io::Result<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_owned());
        self.stream.write_all(request).await?;
        self.buf.clear();
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).map_err(|_| bad("head"))?;
                let status: u16 = head
                    .get(9..12)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| bad("status"))?;
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                while self.buf.len() < end + 4 + length {
                    let mut chunk = [0u8; 4096];
                    let n = self.stream.read(&mut chunk).await?;
                    if n == 0 {
                        return Err(bad("closed"));
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                return Ok(status);
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(bad("closed"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
