//! `herald bench delivery`: the real sending path end to end. It starts the Meta sandbox with a
//! limit of R messages a second, P `herald serve` processes sharing one channel (through Redis
//! when P > 1), enqueues N broadcast sends and K interactive replies spread over the broadcast,
//! waits until every send is settled, and prints what the sandbox saw as its last line.
//!
//! `--channels C` spreads the N sends over C channels, each with its own limit R, of one Meta
//! app (one webhook URL, one app secret), as when one platform drives many numbers: what CPU a
//! message costs when many channels run at once, not only one at full speed.
//!
//! `--stall-ms MS` locks the sends table for MS ms a few times during the broadcast
//! (PostgreSQL): sends claimed meanwhile cannot record their request, and leave late together.
//! Without the check at each request they would go out on top of the ones claimed after them.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use herald_engine::delivery::{
    ChannelLimits, Lane, Message, NewChannel, NewSend, Platform, SendStatus,
};
use herald_engine::{ConnectOptions, Store};
use herald_sandbox::{Faults, Sandbox, SandboxConfig};
use serde_json::json;
use uuid::Uuid;

#[derive(Args, Debug)]
pub struct DeliveryArgs {
    /// Broadcast messages to send.
    #[arg(long, default_value_t = 4_000)]
    messages: usize,
    /// The channel's throughput limit, enforced by the sandbox (messages a second).
    #[arg(long, default_value_t = 80.0)]
    mps: f64,
    /// Engine processes sharing the channel (through Redis when more than one).
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// Interactive replies sent during the broadcast, on the same channel (spread round robin
    /// when there are several, like the broadcast).
    #[arg(long, default_value_t = 0)]
    interactive: usize,
    /// Channels the broadcast is spread over, round robin, each limited to `--mps`.
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Share of send responses the sandbox loses (the message is still accepted).
    #[arg(long, default_value_t = 0.0)]
    lose_responses: f64,
    /// Locks the sends table (exclusively) for this many milliseconds, `--stalls` times spread
    /// over the broadcast (PostgreSQL only): the write each send makes before its request waits
    /// while claims go on, as in a database hiccup, and the sends then all leave late together.
    #[arg(long, default_value_t = 0)]
    stall_ms: u64,
    /// How many stalls of `--stall-ms`.
    #[arg(long, default_value_t = 5)]
    stalls: u32,
    /// The channels' `meta_burst_ms`: how far ahead of its pace a request may leave (checked at
    /// each request). A large value (10000) all but turns the check off, to see what it does.
    #[arg(long, default_value_t = ChannelLimits::default().meta_burst_ms)]
    meta_burst_ms: u32,
    /// PostgreSQL (a fresh schema is created and dropped) or `sqlite:PATH`.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    database_url: String,
    /// Redis shared by the processes when there is more than one.
    #[arg(
        long,
        env = "HERALD_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
}

/// Children are killed if the bench stops early.
pub(crate) struct Procs(pub(crate) Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

pub(crate) fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// CPU time (user + system) of a process so far.
pub(crate) fn cpu_time(pid: u32, tick: f64) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may hold spaces) start at field 3.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Duration::from_secs_f64((ticks(11) + ticks(12)) / tick)
}

pub(crate) fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

pub async fn run(args: DeliveryArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.messages == 0
        || args.processes == 0
        || args.channels == 0
        || !args.mps.is_finite()
        || args.mps <= 0.0
    {
        return Err("--messages, --processes, --channels and --mps must be above zero".into());
    }
    if !(0.0..=1.0).contains(&args.lose_responses) {
        return Err("--lose-responses must be between 0 and 1".into());
    }
    let pg = args.database_url.starts_with("postgres");
    if args.stall_ms > 0 && !pg {
        return Err("--stall-ms needs PostgreSQL (it locks a table)".into());
    }
    let schema = format!(
        "herald_bench_delivery_{}",
        &Uuid::new_v4().simple().to_string()[..8]
    );
    let sqlite_path = std::env::temp_dir().join(format!("{schema}.db"));
    // A key of the run's own, for its fresh schema and its processes.
    let master_key = herald_engine::crypto::generate_key();
    let database_url = if pg {
        args.database_url.clone()
    } else {
        format!("sqlite:{}", sqlite_path.display())
    };
    let store = herald_engine::connect(
        &database_url,
        &ConnectOptions {
            schema: pg.then(|| schema.clone()),
            keyring: Some(Arc::new(herald_engine::crypto::Keyring::parse(
                &master_key,
                &[],
            )?)),
            ..ConnectOptions::default()
        },
    )
    .await?;
    let result = bench(&args, store.clone(), &database_url, &schema, &master_key).await;
    if pg {
        if let Ok(pool) = sqlx::PgPool::connect(&args.database_url).await {
            let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                .execute(&pool)
                .await;
        }
    } else {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", sqlite_path.display()));
        }
    }
    result
}

async fn bench(
    args: &DeliveryArgs,
    store: Arc<dyn Store>,
    database_url: &str,
    schema: &str,
    master_key: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let delivery = store.delivery();
    let sandbox_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sandbox_url = format!("http://{}", sandbox_listener.local_addr()?);
    let mut channels = Vec::with_capacity(args.channels);
    for i in 0..args.channels {
        let channel = delivery
            .create_channel(
                &NewChannel {
                    workspace_id: Uuid::new_v4(),
                    platform: Platform::Whatsapp,
                    name: format!("bench {i}"),
                    sender_id: format!("1555{:06}", 100 + i),
                    portfolio_id: None,
                    access_token: "sandbox-token".into(),
                    app_secret: "sandbox-secret".into(),
                    verify_token: "bench".into(),
                    graph_base_url: Some(sandbox_url.clone()),
                    api_version: None,
                    limits: Some(ChannelLimits {
                        mps: args.mps,
                        meta_burst_ms: args.meta_burst_ms,
                        ..ChannelLimits::default()
                    }),
                },
                chrono::Utc::now(),
            )
            .await?;
        channels.push(channel);
    }
    let channel = channels[0].clone();
    let ports: Vec<u16> = (0..args.processes)
        .map(|_| free_port())
        .collect::<Result<_, _>>()?;
    let sandbox = Sandbox::start(
        sandbox_listener,
        SandboxConfig {
            mps: args.mps,
            webhook_url: Some(format!(
                "http://127.0.0.1:{}/webhooks/{}",
                ports[0], channel.id
            )),
            faults: Faults {
                lose_response: args.lose_responses,
                ..Faults::default()
            },
            ..SandboxConfig::default()
        },
    )
    .await?;

    let exe = std::env::current_exe()?;
    let mut procs = Procs(Vec::new());
    for (i, port) in ports.iter().enumerate() {
        let mut cmd = Command::new(&exe);
        cmd.arg("serve")
            .env("DATABASE_URL", database_url)
            .env("HERALD_MASTER_KEY", master_key)
            .env_remove("HERALD_PREVIOUS_MASTER_KEYS")
            .env("HERALD_LISTEN", format!("127.0.0.1:{port}"))
            .env("HERALD_QUEUES", "send=256,webhooks=8")
            .env("HERALD_WORKER_ID", format!("bench-delivery-{i}"))
            .env("HERALD_UNKNOWN_GRACE", "30s")
            .env("HERALD_META_TIMEOUT", "2s")
            .env(
                "HERALD_LOG",
                std::env::var("HERALD_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env_remove("HERALD_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if database_url.starts_with("postgres") {
            cmd.env("HERALD_PG_SCHEMA", schema);
        }
        if args.processes > 1 {
            cmd.env("HERALD_REDIS_URL", &args.redis_url);
        } else {
            cmd.env_remove("HERALD_REDIS_URL");
        }
        procs.0.push(cmd.spawn()?);
    }
    let http = reqwest::Client::new();
    for port in &ports {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = http
                .get(format!("http://127.0.0.1:{port}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("herald serve on port {port} did not come up").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let tick = clock_ticks();
    let pids: Vec<u32> = procs.0.iter().map(Child::id).collect();
    let cpu_before: Duration = pids.iter().map(|p| cpu_time(*p, tick)).sum();

    // Interactive replies go to users who wrote first (their service window is open).
    let now = chrono::Utc::now();
    for i in 0..args.interactive {
        delivery
            .record_inbound(channels[i % channels.len()].id, &format!("1666{i:07}"), now)
            .await?;
    }
    let total_mps = args.mps * args.channels as f64;
    let expected = Duration::from_secs_f64(args.messages as f64 / total_mps);
    let interactive = {
        let store = store.clone();
        let k = args.interactive;
        let targets: Vec<(Uuid, Uuid)> = channels.iter().map(|c| (c.id, c.workspace_id)).collect();
        tokio::spawn(async move {
            let mut sent: Vec<(Uuid, f64)> = Vec::with_capacity(k);
            if k == 0 {
                return Ok::<_, String>(sent);
            }
            let start = Instant::now() + Duration::from_millis(500);
            let span = expected
                .saturating_sub(Duration::from_secs(1))
                .max(Duration::from_millis(100));
            for i in 0..k {
                tokio::time::sleep_until((start + span.mul_f64(i as f64 / k as f64)).into()).await;
                let (channel_id, workspace_id) = targets[i % targets.len()];
                let at = unix_ms();
                let ids = store
                    .delivery()
                    .create_sends(
                        &[NewSend {
                            workspace_id,
                            channel_id,
                            recipient: format!("1666{i:07}"),
                            message: Message::Text {
                                body: format!("reply {i}"),
                            },
                            lane: Lane::Interactive,
                        }],
                        chrono::Utc::now(),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                sent.extend(ids.into_iter().map(|id| (id, at)));
            }
            Ok(sent)
        })
    };
    let started = Instant::now();
    let stalls = (args.stall_ms > 0 && args.stalls > 0).then(|| {
        let (url, schema) = (database_url.to_owned(), schema.to_owned());
        let (n, hold) = (args.stalls, Duration::from_millis(args.stall_ms));
        tokio::spawn(async move {
            let pool = sqlx::PgPool::connect(&url).await?;
            for i in 1..=n {
                let at = started + expected.mul_f64(f64::from(i) / f64::from(n + 1));
                tokio::time::sleep_until(at.into()).await;
                let mut tx = pool.begin().await?;
                sqlx::query(&format!(
                    "LOCK TABLE \"{schema}\".herald_sends IN EXCLUSIVE MODE"
                ))
                .execute(&mut *tx)
                .await?;
                tokio::time::sleep(hold).await;
                tx.commit().await?;
            }
            Ok::<u32, sqlx::Error>(n)
        })
    });
    for chunk_start in (0..args.messages).step_by(10_000) {
        let end = (chunk_start + 10_000).min(args.messages);
        let sends: Vec<NewSend> = (chunk_start..end)
            .map(|i| {
                let channel = &channels[i % channels.len()];
                NewSend {
                    workspace_id: channel.workspace_id,
                    channel_id: channel.id,
                    recipient: format!("1555{i:07}"),
                    message: Message::Template {
                        name: "bench_offer".into(),
                        language: "en_US".into(),
                        parameters: vec![format!("{i}")],
                    },
                    lane: Lane::Broadcast,
                }
            })
            .collect();
        delivery.create_sends(&sends, chrono::Utc::now()).await?;
    }
    let enqueued_in = started.elapsed();
    let interactive = interactive
        .await?
        .map_err(|e| format!("interactive sends: {e}"))?;
    if let Some(stalls) = stalls {
        let n = stalls
            .await?
            .map_err(|e| format!("stalling the sends table: {e}"))?;
        eprintln!(
            "bench delivery: the sends table was locked {n} times for {} ms",
            args.stall_ms
        );
    }
    let total = args.messages + args.interactive;
    let deadline = Instant::now() + expected.mul_f64(3.0) + Duration::from_secs(120);
    let mut counts: HashMap<SendStatus, i64>;
    loop {
        counts = delivery
            .send_counts(None)
            .await?
            .into_iter()
            .map(|c| (c.status, c.count))
            .collect();
        let open: i64 = [SendStatus::Queued, SendStatus::Sending, SendStatus::Unknown]
            .iter()
            .map(|s| counts.get(s).copied().unwrap_or(0))
            .sum();
        if open == 0 {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("bench delivery: {open} sends still open at the deadline");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cpu_after: Duration = pids.iter().map(|p| cpu_time(*p, tick)).sum();
    // Let the last status webhooks land, then stop the processes gracefully.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for c in &procs.0 {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
    }
    for c in &mut procs.0 {
        let _ = c.wait();
    }
    let stats = sandbox.stats();
    let mut latencies: Vec<f64> = interactive
        .iter()
        .filter_map(|(id, at)| {
            sandbox
                .accepted(&id.to_string())
                .first()
                .map(|a| a.accepted_unix_ms - at)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| -> Option<f64> {
        if latencies.is_empty() {
            return None;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        Some((latencies[i] * 100.0).round() / 100.0)
    };
    let span_s = match (stats.first_accepted_unix_ms, stats.last_accepted_unix_ms) {
        (Some(a), Some(b)) if b > a => (b - a) / 1000.0,
        _ => 0.0,
    };
    let achieved = if span_s > 0.0 {
        (stats.accepted.saturating_sub(1)) as f64 / span_s
    } else {
        0.0
    };
    let failed = counts.get(&SendStatus::Failed).copied().unwrap_or(0);
    let lost = (total as u64).saturating_sub(stats.unique_callbacks);
    let cpu_us = (cpu_after.saturating_sub(cpu_before)).as_secs_f64() * 1e6 / total as f64;
    eprintln!(
        "bench delivery: enqueued {} in {:.2}s; sandbox accepted {} ({} unique, at most {} in a second), {} lost responses, errors {:?}; sends failed {failed}; statuses {:?}",
        args.messages,
        enqueued_in.as_secs_f64(),
        stats.accepted,
        stats.unique_callbacks,
        stats.max_in_any_second,
        stats.lost_responses,
        stats.errors_by_code,
        counts
    );
    sandbox.shutdown().await;
    let mut line = json!({
            "messages": args.messages,
            "mps_limit": args.mps,
            "processes": args.processes,
            "achieved_mps": (achieved * 100.0).round() / 100.0,
            "utilization": (achieved / total_mps * 1000.0).round() / 1000.0,
            "limit_errors": stats.limit_errors,
            "duplicates": stats.duplicate_callbacks,
            "lost": lost,
            "interactive_p50_ms": pct(0.5),
            "interactive_p99_ms": pct(0.99),
            "cpu_us_per_message": (cpu_us * 10.0).round() / 10.0,
    });
    if args.channels > 1 {
        // Only then: the one-channel line keeps exactly the keys the issue names.
        line["channels"] = json!(args.channels);
    }
    println!("{line}");
    Ok(())
}
