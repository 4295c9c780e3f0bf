//! `herald bench queue`: the engine's real path (bulk enqueue, claims, handler tasks, batched
//! completions) on a fresh schema or file, with no-op jobs. Prints its figures as the last line,
//! one JSON object.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use clap::{Args, Subcommand, ValueEnum};
use herald_engine::store::{PgStore, PgStoreConfig, SqliteStore, SqliteStoreConfig};
use herald_engine::{
    Client, Engine, EngineConfig, JobContext, JobError, JobFilter, JobState, NewJob, QueueConfig,
    Registry, Store, SystemClock, Worker,
};
use serde_json::json;
use tokio::sync::{mpsc, Notify};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Bulk-enqueue N no-op jobs, drain them with real workers, measure pickup latency.
    Queue(QueueArgs),
    /// Send N broadcast messages (and K interactive replies) through P processes sharing one
    /// channel on the Meta sandbox, limited to R messages a second.
    Delivery(crate::bench_delivery::DeliveryArgs),
    /// Send N messages through the Meta client alone to the sandbox (another process) at R a
    /// second: the HTTP floor under `delivery`'s CPU per message.
    Client(crate::bench_client::ClientArgs),
    /// Send N signed WhatsApp webhooks from C connections to a server on PostgreSQL (or SQLite)
    /// and measure how fast they are stored durably.
    Webhooks(crate::bench_webhooks::WebhooksArgs),
    /// Import N contacts as one CSV or NDJSON upload through `herald serve`.
    Import(crate::bench_import::ImportArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum BackendArg {
    Postgres,
    Sqlite,
}

#[derive(Args)]
pub struct QueueArgs {
    #[arg(long, value_enum)]
    backend: BackendArg,
    /// Jobs to enqueue and drain.
    #[arg(long, default_value_t = 100_000)]
    jobs: usize,
    /// PostgreSQL server (a fresh schema is created in it and dropped afterwards).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    database_url: String,
    /// Jobs running at once.
    #[arg(long, default_value_t = 1000)]
    concurrency: usize,
    /// Pickup-latency samples (single enqueue on an idle queue to handler start).
    #[arg(long, default_value_t = 300)]
    samples: usize,
    /// Jobs per bulk-enqueue call (each call is one transaction). 20,000 keeps the benchmark's
    /// own request building out of the peak-memory figure; the engine takes 100,000 or more.
    #[arg(long, default_value_t = 20_000)]
    enqueue_batch: usize,
    /// Bulk-enqueue calls in flight at once, each its own transaction and connection.
    #[arg(long, default_value_t = 1)]
    enqueue_streams: usize,
}

pub async fn run(which: BenchCommand) -> Result<(), Box<dyn std::error::Error>> {
    match which {
        BenchCommand::Queue(args) => queue(args).await,
        BenchCommand::Delivery(args) => crate::bench_delivery::run(args).await,
        BenchCommand::Client(args) => crate::bench_client::run(args).await,
        BenchCommand::Webhooks(args) => crate::bench_webhooks::run(args).await,
        BenchCommand::Import(args) => crate::bench_import::run(args).await,
    }
}

struct Counted {
    done: Arc<AtomicUsize>,
    target: usize,
    finished: Arc<Notify>,
}

#[async_trait]
impl Worker for Counted {
    type Args = serde_json::Value;
    const KIND: &'static str = "noop";

    async fn work(&self, _args: serde_json::Value, _ctx: &JobContext) -> Result<(), JobError> {
        if self.done.fetch_add(1, Ordering::AcqRel) + 1 == self.target {
            self.finished.notify_one();
        }
        Ok(())
    }
}

struct Ping {
    started: mpsc::UnboundedSender<(u64, Instant)>,
}

#[derive(serde::Deserialize)]
struct PingArgs {
    i: u64,
}

#[async_trait]
impl Worker for Ping {
    type Args = PingArgs;
    const KIND: &'static str = "bench.ping";

    async fn work(&self, args: PingArgs, _ctx: &JobContext) -> Result<(), JobError> {
        let _ = self.started.send((args.i, Instant::now()));
        Ok(())
    }
}

enum Target {
    Pg {
        store: Arc<PgStore>,
        schema: String,
    },
    Sqlite {
        store: Arc<SqliteStore>,
        path: std::path::PathBuf,
    },
}

impl Target {
    fn store(&self) -> Arc<dyn Store> {
        match self {
            Target::Pg { store, .. } => store.clone(),
            Target::Sqlite { store, .. } => store.clone(),
        }
    }

    async fn cleanup(self) {
        match self {
            Target::Pg { store, schema } => {
                let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                    .execute(store.pool())
                    .await;
            }
            Target::Sqlite { store, path } => {
                store.pool().close().await;
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
        }
    }
}

fn rand_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

async fn queue(args: QueueArgs) -> Result<(), Box<dyn std::error::Error>> {
    let counts = [
        args.jobs,
        args.concurrency,
        args.samples,
        args.enqueue_batch,
        args.enqueue_streams,
    ];
    if counts.contains(&0) {
        return Err(
            "--jobs, --concurrency, --samples, --enqueue-batch and --enqueue-streams \
                    must be at least 1"
                .into(),
        );
    }
    let target = match args.backend {
        BackendArg::Postgres => {
            let schema = format!("herald_bench_{}", rand_suffix());
            let store = PgStore::connect(&PgStoreConfig {
                keyring: None,
                url: args.database_url.clone(),
                max_connections: 16,
                acquire_timeout: Duration::from_secs(30),
                schema: Some(schema.clone()),
            })
            .await?;
            store.migrate().await?;
            Target::Pg {
                store: Arc::new(store),
                schema,
            }
        }
        BackendArg::Sqlite => {
            let path = std::env::temp_dir().join(format!("herald_bench_{}.db", rand_suffix()));
            let store = SqliteStore::connect(&SqliteStoreConfig {
                keyring: None,
                url: format!("sqlite:{}", path.display()),
                acquire_timeout: Duration::from_secs(30),
                synchronous_full: true,
            })
            .await?;
            store.migrate().await?;
            Target::Sqlite {
                store: Arc::new(store),
                path,
            }
        }
    };
    let result = measure(&args, target.store()).await;
    target.cleanup().await;
    let line = result?;
    println!("{line}");
    Ok(())
}

/// Stream `stream` of `streams` enqueues batches stream, stream + streams, stream + 2 × streams, …
async fn enqueue_stream(
    client: Client,
    stream: usize,
    streams: usize,
    jobs: usize,
    batch: usize,
) -> Result<(), herald_engine::StoreError> {
    let mut from = stream * batch;
    while from < jobs {
        let to = (from + batch).min(jobs);
        let chunk: Vec<NewJob> = (from..to)
            .map(|i| NewJob::new("noop", json!({ "i": i })).queue("bench"))
            .collect();
        client.enqueue_many(&chunk).await?;
        from += streams * batch;
    }
    Ok(())
}

async fn measure(
    args: &QueueArgs,
    store: Arc<dyn Store>,
) -> Result<String, Box<dyn std::error::Error>> {
    let backend = store.backend().as_str();
    let client = Client::new(store.clone(), Arc::new(SystemClock));

    // 1. Bulk enqueue, one transaction per call; `--enqueue-streams` calls at a time. One stream
    // runs here rather than in a spawned task: building its batches on one thread keeps them in
    // one malloc arena (20 MB less peak memory).
    let started = Instant::now();
    let streams = args.enqueue_streams.max(1);
    if streams == 1 {
        enqueue_stream(client.clone(), 0, 1, args.jobs, args.enqueue_batch).await?;
    } else {
        let mut tasks = tokio::task::JoinSet::new();
        for stream in 0..streams {
            let client = client.clone();
            tasks.spawn(enqueue_stream(
                client,
                stream,
                streams,
                args.jobs,
                args.enqueue_batch,
            ));
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
    }
    let enqueue_secs = started.elapsed().as_secs_f64();
    let rss_with_backlog = peak_rss_mb();
    eprintln!(
        "{backend}: enqueued {} jobs in {:.3} s ({:.0}/s)",
        args.jobs,
        enqueue_secs,
        args.jobs as f64 / enqueue_secs
    );

    // 2. Drain with real workers: until every job's completion is written.
    let done = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(Notify::new());
    let (ping_tx, mut ping_rx) = mpsc::unbounded_channel();
    let mut registry = Registry::new();
    registry
        .register(Counted {
            done: done.clone(),
            target: args.jobs,
            finished: finished.clone(),
        })
        .register(Ping { started: ping_tx });
    let mut config = EngineConfig::default();
    config.queues.clear();
    config.queues.insert(
        "bench".into(),
        QueueConfig {
            concurrency: args.concurrency,
        },
    );
    config
        .queues
        .insert("ping".into(), QueueConfig { concurrency: 10 });
    let started = Instant::now();
    let engine = Engine::start_limited(
        store.clone(),
        registry,
        config,
        Arc::new(SystemClock),
        Arc::new(herald_engine::admission::Unlimited),
    );
    finished.notified().await;
    let handlers_secs = started.elapsed().as_secs_f64();
    let unfinished = |state| JobFilter {
        queue: Some("bench".into()),
        state: Some(state),
        limit: 1,
        ..Default::default()
    };
    loop {
        let running = store.list_jobs(&unfinished(JobState::Running)).await?;
        let available = store.list_jobs(&unfinished(JobState::Available)).await?;
        if running.is_empty() && available.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let drain_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{backend}: drained {} jobs in {:.3} s ({:.0}/s; handlers done at {:.3} s)",
        args.jobs,
        drain_secs,
        args.jobs as f64 / drain_secs,
        handlers_secs
    );

    // 3. Pickup latency: one job at a time on an idle queue.
    let mut latencies = Vec::with_capacity(args.samples);
    for i in 0..args.samples as u64 {
        tokio::time::sleep(Duration::from_millis(3)).await;
        let t = Instant::now();
        client
            .enqueue(&NewJob::new("bench.ping", json!({ "i": i })).queue("ping"))
            .await?;
        loop {
            let (seen, at) = tokio::time::timeout(Duration::from_secs(10), ping_rx.recv())
                .await
                .map_err(|_| "a ping job was not picked up within 10 s")?
                .ok_or("ping channel closed")?;
            if seen == i {
                latencies.push(at.duration_since(t).as_secs_f64() * 1000.0);
                break;
            }
        }
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    engine.shutdown().await;
    let line = json!({
        "backend": backend,
        "jobs": args.jobs,
        "enqueue_per_sec": (args.jobs as f64 / enqueue_secs).round(),
        "jobs_per_sec": (args.jobs as f64 / drain_secs).round(),
        "pickup_p50_ms": round2(percentile(&latencies, 50.0)),
        "pickup_p99_ms": round2(percentile(&latencies, 99.0)),
        "peak_rss_mb": round2(peak_rss_mb()),
    });
    eprintln!(
        "{backend}: pickup latency over {} samples: p50 {:.2} ms, p99 {:.2} ms; peak RSS {:.1} MB ({:.1} MB after enqueue)",
        latencies.len(),
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        peak_rss_mb(),
        rss_with_backlog
    );
    Ok(line.to_string())
}
