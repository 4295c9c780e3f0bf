//! `herald sandbox`: the Meta stand-in as a server of its own, for trying Herald without a Meta
//! account (point a channel's Graph base URL at it).

use std::time::Duration;

use clap::Args;
use herald_sandbox::{Faults, SandboxConfig};

#[derive(Args, Debug)]
pub struct SandboxArgs {
    /// Address to serve the Graph API stand-in on.
    #[arg(long, default_value = "127.0.0.1:9090")]
    listen: std::net::SocketAddr,
    /// Throughput per sender (Meta's 130429 / 613 beyond); 0 turns the limit off.
    #[arg(long, default_value_t = 80.0)]
    mps: f64,
    /// Burst tolerance, in milliseconds of `mps`.
    #[arg(long, default_value_t = 200)]
    burst_ms: u64,
    /// Seconds between messages to one user (131056 beyond the pair burst); 0 turns it off.
    #[arg(long, default_value_t = 6.0)]
    pair_interval: f64,
    /// The only Bearer token the sandbox accepts.
    #[arg(long, default_value = "sandbox-token")]
    access_token: String,
    /// Signs the status webhooks (X-Hub-Signature-256).
    #[arg(long, default_value = "sandbox-secret")]
    app_secret: String,
    /// Where status webhooks go (Herald's `/webhooks/{channel_id}`).
    #[arg(long)]
    webhook_url: Option<String>,
    /// Share of sends whose answer is lost (the message is still accepted).
    #[arg(long, default_value_t = 0.0)]
    lose_response: f64,
    /// Share of sends answered 500 (code 2) and not accepted.
    #[arg(long, default_value_t = 0.0)]
    server_error: f64,
}

pub async fn run(args: SandboxArgs) -> Result<(), Box<dyn std::error::Error>> {
    for (name, p) in [
        ("--lose-response", args.lose_response),
        ("--server-error", args.server_error),
    ] {
        if !(0.0..=1.0).contains(&p) {
            return Err(format!("{name} must be between 0 and 1").into());
        }
    }
    if !args.pair_interval.is_finite() || args.pair_interval < 0.0 {
        return Err("--pair-interval must be 0 or more seconds".into());
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    println!("Meta sandbox on http://{}", listener.local_addr()?);
    let config = SandboxConfig {
        mps: args.mps,
        burst: Duration::from_millis(args.burst_ms),
        pair_interval: Duration::from_secs_f64(args.pair_interval),
        access_token: args.access_token,
        app_secret: args.app_secret,
        webhook_url: args.webhook_url,
        faults: Faults {
            lose_response: args.lose_response,
            server_error: args.server_error,
            ..Faults::default()
        },
        ..SandboxConfig::default()
    };
    herald_sandbox::run(listener, config, crate::shutdown_signal()).await?;
    Ok(())
}
