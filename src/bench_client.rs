//! `herald bench client`: the Meta client alone, as the engine drives it. It starts `herald
//! sandbox` as a process of its own (no limits, no webhooks), sends N WhatsApp texts through
//! [`MetaClient`] from this process at R a second, in rounds of the engine's rate tick with one
//! task per message (as the engine runs them), and prints this process's CPU per message as its
//! last line.
//!
//! It is the floor under `herald bench delivery`'s `cpu_us_per_message`: what one HTTP request
//! to Meta costs with this HTTP stack on this machine, before any queueing, recording or
//! webhook work.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use herald_engine::delivery::{Channel, ChannelLimits, Lane, Message, Platform};
use herald_workers::meta::{ClientConfig, MetaClient};
use serde_json::json;
use uuid::Uuid;

use crate::bench_delivery::{clock_ticks, cpu_time, free_port, Procs};

#[derive(Args, Debug)]
pub struct ClientArgs {
    /// Messages to send.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Messages a second.
    #[arg(long, default_value_t = 1_000.0)]
    mps: f64,
    /// One round of sends this often (the engine's rate tick).
    #[arg(long, default_value_t = 20)]
    tick_ms: u64,
}

pub async fn run(args: ClientArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.messages == 0 || !args.mps.is_finite() || args.mps <= 0.0 || args.tick_ms == 0 {
        return Err("--messages, --mps and --tick-ms must be above zero".into());
    }
    let port = free_port()?;
    let mut procs = Procs(Vec::new());
    procs.0.push(
        Command::new(std::env::current_exe()?)
            .args(["sandbox", "--mps", "0", "--pair-interval", "0", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .env("HERALD_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?,
    );
    let now = chrono::Utc::now();
    let channel = Arc::new(Channel {
        id: Uuid::new_v4(),
        workspace_id: Uuid::new_v4(),
        platform: Platform::Whatsapp,
        name: "bench".into(),
        sender_id: "15550000100".into(),
        portfolio_id: None,
        access_token: "sandbox-token".into(),
        app_secret: "sandbox-secret".into(),
        verify_token: "bench".into(),
        graph_base_url: format!("http://127.0.0.1:{port}"),
        api_version: "v21.0".into(),
        limits: ChannelLimits::default(),
        paused_reason: None,
        paused_broadcasts_only: false,
        paused_at: None,
        created_at: now,
        updated_at: now,
    });
    let client = Arc::new(MetaClient::new(ClientConfig::default())?);
    let message = Arc::new(Message::Text {
        body: "Hello from the client bench".into(),
    });
    let send = |i: usize| {
        let (client, channel, message) = (client.clone(), channel.clone(), message.clone());
        async move {
            let callback = Uuid::new_v4().to_string();
            client
                .send(
                    &channel,
                    &format!("1666{i:07}"),
                    &message,
                    Lane::Broadcast,
                    &callback,
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    // Until the sandbox answers; this also opens the first connection.
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = send(0).await {
        if let Some(status) = procs.0[0].try_wait()? {
            return Err(format!("the sandbox exited ({status}): {e}").into());
        }
        if Instant::now() > deadline {
            return Err(format!("the sandbox did not come up: {e}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tick = Duration::from_millis(args.tick_ms);
    let per_round = args.mps * tick.as_secs_f64();
    let ticks = clock_ticks();
    let pid = std::process::id();
    let cpu_before = cpu_time(pid, ticks);
    let started = Instant::now();
    let mut rounds = tokio::time::interval(tick);
    let mut tasks = tokio::task::JoinSet::new();
    let (mut sent, mut owed, mut failed) = (0usize, 0.0f64, 0usize);
    let mut first_error = None;
    let mut settle = |done: Result<Result<(), String>, tokio::task::JoinError>| {
        if let Err(e) = done.map_err(|e| e.to_string()).and_then(|r| r) {
            failed += 1;
            first_error.get_or_insert(e);
        }
    };
    while sent < args.messages {
        rounds.tick().await;
        owed += per_round;
        while owed >= 1.0 && sent < args.messages {
            owed -= 1.0;
            tasks.spawn(send(sent));
            sent += 1;
        }
        while let Some(done) = tasks.try_join_next() {
            settle(done);
        }
    }
    while let Some(done) = tasks.join_next().await {
        settle(done);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_time(pid, ticks).saturating_sub(cpu_before);
    if cpu.is_zero() {
        return Err("cannot read this process's CPU time from /proc".into());
    }
    if let Some(e) = first_error {
        return Err(format!("{failed} of {sent} sends failed, the first: {e}").into());
    }
    println!(
        "{}",
        json!({
            "messages": sent,
            "mps": args.mps,
            "achieved_mps": ((sent as f64 / elapsed) * 100.0).round() / 100.0,
            "cpu_us_per_message": (cpu.as_secs_f64() * 1e7 / sent as f64).round() / 10.0,
        })
    );
    Ok(())
}
