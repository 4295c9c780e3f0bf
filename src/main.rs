//! `herald`: the one binary and composition root. It reads settings, opens the store, registers
//! the handlers and starts the services each subcommand needs.

mod bench;
mod bench_client;
mod bench_delivery;
mod bench_import;
mod bench_server;
mod bench_webhooks;
mod channels;
mod demo;
mod demo_delivery;
mod jobs;
mod keys;
mod sandbox_cmd;
mod settings;
mod workspaces;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use herald_engine::delivery::{AdmissionConfig, ChannelAdmission};
use herald_engine::inbox::{InboundHandOff, INBOUND_KIND};
use herald_engine::limit::{FailSafeConfig, FailSafeLimiter, Limiter, LocalLimiter};
use herald_engine::store::StoreBoard;
use herald_engine::{Engine, Store, SystemClock};
use herald_workers::meta::{ClientConfig, MetaClient, SendConfig, SendWorker, WebhookWorker};
use tracing::{error, info, warn};

use crate::settings::Settings;

#[derive(Parser)]
#[command(
    name = "herald",
    version,
    about = "Durable, rate-limited job engine for customer messaging"
)]
struct Cli {
    /// Optional TOML settings file (environment variables override it). Also HERALD_CONFIG.
    #[arg(long, global = true, env = "HERALD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the engine and the HTTP server (SQLite ./herald.db unless DATABASE_URL says otherwise).
    Serve,
    /// Run the engine without the HTTP server.
    Worker,
    /// Apply database migrations and exit.
    Migrate,
    /// Run a short demonstration on the embedded store and exit.
    Demo(demo::DemoArgs),
    /// Inspect and manage jobs: stats, list, show, retry, cancel.
    Jobs {
        #[command(subcommand)]
        which: jobs::JobsCommand,
    },
    /// Serve a stand-in for Meta's Graph API (sends, limits, signed status webhooks, faults).
    Sandbox(sandbox_cmd::SandboxArgs),
    /// See channels (limits, why one is paused, sends by status) and resume a paused one.
    Channels {
        #[command(subcommand)]
        which: channels::ChannelsCommand,
    },
    /// Tenants: create one (with its first API key) or list them.
    Workspace {
        #[command(subcommand)]
        which: workspaces::WorkspaceCommand,
    },
    /// The master key that encrypts channel secrets: generate one, rotate to a new one.
    Keys {
        #[command(subcommand)]
        which: keys::KeysCommand,
    },
    /// Benchmarks that print their figures as a JSON line.
    Bench {
        #[command(subcommand)]
        which: bench::BenchCommand,
    },
}

/// mimalloc instead of glibc's malloc: glibc's per-thread arenas grew and trimmed their heaps
/// (mprotect) under hyper's and sqlx's per-request buffers, about a tenth of the CPU per
/// message in `herald bench delivery`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The benchmark reads no settings (it makes its own schema or file), nor does the sandbox.
    if let Command::Bench { .. } | Command::Sandbox(_) = cli.command {
        let Some(runtime) = runtime(0) else {
            return ExitCode::FAILURE;
        };
        return runtime.block_on(async move {
            match cli.command {
                Command::Bench { which } => {
                    init_tracing(&std::env::var("HERALD_LOG").unwrap_or_else(|_| "warn".into()));
                    report(bench::run(which).await)
                }
                Command::Sandbox(args) => {
                    init_tracing(&std::env::var("HERALD_LOG").unwrap_or_else(|_| "info".into()));
                    report(sandbox_cmd::run(args).await)
                }
                _ => ExitCode::FAILURE,
            }
        });
    }
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("herald: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(runtime) = runtime(settings.threads) else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async move {
        init_tracing(&settings.log);
        let result = match cli.command {
            Command::Serve => serve(settings).await,
            Command::Worker => worker(settings).await,
            Command::Migrate => open_store(&settings)
                .await
                .map(|_| info!("migrations applied")),
            Command::Demo(args) => demo::run(settings, args).await,
            Command::Jobs { which } => jobs::run(settings, which).await,
            Command::Channels { which } => channels::run(settings, which).await,
            Command::Keys { which } => keys::run(settings, which).await,
            Command::Workspace { which } => workspaces::run(settings, which).await,
            Command::Bench { which } => bench::run(which).await,
            Command::Sandbox(args) => sandbox_cmd::run(args).await,
        };
        report(result)
    })
}

/// The async runtime with `threads` worker threads: 0, one per core; 1, the current thread only
/// (no hand-offs between threads, the least CPU per message).
fn runtime(threads: usize) -> Option<tokio::runtime::Runtime> {
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if threads > 1 {
        builder.worker_threads(threads);
    }
    match builder.enable_all().build() {
        Ok(runtime) => Some(runtime),
        Err(e) => {
            eprintln!("herald: cannot start the async runtime: {e}");
            None
        }
    }
}

fn report(result: Result<(), Box<dyn std::error::Error>>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("herald: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

async fn open_store(settings: &Settings) -> Result<Arc<dyn Store>, Box<dyn std::error::Error>> {
    let keyring = keys::keyring(settings)?;
    let has_key = keyring.is_some();
    let options = herald_engine::ConnectOptions {
        keyring,
        ..settings.connect.clone()
    };
    let store = herald_engine::connect(&settings.database_url, &options)
        .await
        .map_err(|e| format!("cannot open {}: {e}", redact(&settings.database_url)))?;
    if has_key {
        keys::seal_legacy(store.as_ref()).await;
    }
    Ok(store)
}

/// Serving and working read channels' secrets: they need the key.
fn require_key(settings: &Settings) -> Result<(), Box<dyn std::error::Error>> {
    if settings.master_key.is_none() && !settings.database_url.starts_with("sqlite:") {
        return Err(
            "master_key (HERALD_MASTER_KEY) must be set with PostgreSQL: every process \
                    sharing the database encrypts channel secrets with it (`herald keys generate`)"
                .into(),
        );
    }
    Ok(())
}

/// A database URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => info!("SIGINT received; shutting down"),
        _ = term => info!("SIGTERM received; shutting down"),
    }
}

/// The delivery stack: the limiter (Redis-backed when several processes share channels), the
/// channel admission the engine asks before claiming sends, and the send worker.
pub async fn start_engine(
    store: Arc<dyn Store>,
    settings: &Settings,
) -> Result<Engine, Box<dyn std::error::Error>> {
    let clock: Arc<dyn herald_engine::Clock> = Arc::new(SystemClock);
    let limiter: Arc<dyn Limiter> = match &settings.redis_url {
        Some(url) => Arc::new(
            FailSafeLimiter::connect(
                url,
                settings.engine.worker_id.clone(),
                FailSafeConfig {
                    min_processes: settings.redis_min_processes,
                    ..FailSafeConfig::default()
                },
                Some(Arc::new(StoreBoard(store.clone()))),
            )
            .await
            .map_err(|e| format!("redis_url (HERALD_REDIS_URL): {e}"))?,
        ),
        None => Arc::new(LocalLimiter::new()),
    };
    let admission = Arc::new(ChannelAdmission::new(
        store.clone(),
        limiter.clone(),
        AdmissionConfig::default(),
    ));
    let client = MetaClient::new(ClientConfig {
        request_timeout: settings.meta_timeout,
        ..ClientConfig::default()
    })
    .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let mut registry = herald_workers::builtin();
    registry.register(SendWorker::new(
        store.clone(),
        admission.clone(),
        client,
        clock.clone(),
        SendConfig {
            unknown_grace: settings.unknown_grace,
            // The call and the writes around it; 50 s with the default 15 s Meta timeout.
            attempt_timeout: settings.meta_timeout + std::time::Duration::from_secs(35),
            ..SendConfig::default()
        },
    ));
    // New inbound messages are handed on only to a handler that exists (the workflows, once
    // registered) on a queue this process runs; otherwise the jobs would only be discarded.
    let mut webhooks = WebhookWorker::new(store.clone(), clock.clone());
    let hand_off = InboundHandOff::default();
    let handled = registry.kinds().any(|k| k == INBOUND_KIND);
    if handled && settings.engine.queues.contains_key(&hand_off.queue) {
        webhooks = webhooks.hand_off(hand_off);
    } else if handled {
        warn!(
            queue = %hand_off.queue,
            "inbound messages have a handler but its queue is not configured; they are not handed on"
        );
    }
    registry.register(webhooks);
    let engine = Engine::start_limited(
        store,
        registry,
        settings.engine.clone(),
        clock,
        admission.clone(),
    );
    engine.metrics().set_limiter(limiter);
    admission.set_metrics(engine.metrics());
    Ok(engine)
}

async fn serve(settings: Settings) -> Result<(), Box<dyn std::error::Error>> {
    require_key(&settings)?;
    let store = open_store(&settings).await?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| {
            format!(
                "cannot listen on {} (listen / HERALD_LISTEN): {e}",
                settings.listen
            )
        })?;
    info!(
        addr = %listener.local_addr()?,
        database = store.backend().as_str(),
        threads = tokio::runtime::Handle::current().metrics().num_workers(),
        "herald serving"
    );
    run(listener, store, &settings, shutdown_signal()).await
}

/// Serves HTTP and runs the engine until `shutdown` resolves, then drains both.
pub async fn run(
    listener: tokio::net::TcpListener,
    store: Arc<dyn Store>,
    settings: &Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error>> {
    let engine = start_engine(store.clone(), settings).await?;
    let clock: Arc<dyn herald_engine::Clock> = Arc::new(SystemClock);
    let app = herald_api::app(herald_api::AppState::new(
        store.clone(),
        clock.clone(),
        herald_api::ApiConfig {
            admin_token: settings.admin_token.as_ref().map(|t| t.0.clone()),
            engine_metrics: Some(engine.metrics()),
            triage: Some(Arc::new(herald_workers::meta::webhook::WebhookTriage::new(
                store, clock,
            ))),
            ..herald_api::ApiConfig::default()
        },
    ));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });
    shutdown.await;
    let _ = stop_tx.send(());
    let report = engine.shutdown().await;
    info!(released = report.released, "engine drained");
    server.await??;
    Ok(())
}

async fn worker(settings: Settings) -> Result<(), Box<dyn std::error::Error>> {
    require_key(&settings)?;
    let store = open_store(&settings).await?;
    info!(database = store.backend().as_str(), "herald worker running");
    let engine = start_engine(store.clone(), &settings).await?;
    // Metrics and health checks, when asked for: the engine's throughput, latencies and
    // permits are per process, so each worker serves its own.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let monitor = match settings.metrics_listen {
        None => None,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                format!("cannot listen on {addr} (metrics_listen / HERALD_METRICS_LISTEN): {e}")
            })?;
            info!(addr = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
            let app = herald_api::ops::monitoring(herald_api::AppState::new(
                store,
                Arc::new(SystemClock),
                herald_api::ApiConfig {
                    engine_metrics: Some(engine.metrics()),
                    ..herald_api::ApiConfig::default()
                },
            ));
            Some(tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stop_rx.await;
                    })
                    .await
            }))
        }
    };
    shutdown_signal().await;
    let _ = stop_tx.send(());
    if let Some(m) = monitor {
        if let Ok(Err(e)) = m.await {
            warn!(error = %e, "the metrics server stopped with an error");
        }
    }
    let report = engine.shutdown().await;
    info!(released = report.released, "engine drained");
    Ok(())
}
