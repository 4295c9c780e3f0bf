//! The demo's broadcast: a WhatsApp channel on the built-in Meta sandbox, 80 messages a second.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::Utc;
use herald_engine::delivery::{Lane, Message, NewChannel, NewSend, Platform, SendStatus};
use herald_engine::Store;
use herald_sandbox::{Faults, Sandbox, SandboxConfig};
use uuid::Uuid;

const UNDELIVERABLE: &str = "15550009999";

pub async fn run(
    store: Arc<dyn Store>,
    herald_at: SocketAddr,
    messages: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let delivery = store.delivery();
    let sandbox_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sandbox_url = format!("http://{}", sandbox_listener.local_addr()?);
    let channel = delivery
        .create_channel(
            &NewChannel {
                workspace_id: Uuid::new_v4(),
                platform: Platform::Whatsapp,
                name: "demo".into(),
                sender_id: "1555000100".into(),
                portfolio_id: None,
                access_token: "sandbox-token".into(),
                app_secret: "sandbox-secret".into(),
                verify_token: "demo".into(),
                graph_base_url: Some(sandbox_url.clone()),
                api_version: None,
                limits: None,
            },
            Utc::now(),
        )
        .await?;
    let sandbox = Sandbox::start(
        sandbox_listener,
        SandboxConfig {
            mps: 80.0,
            webhook_url: Some(format!("http://{herald_at}/webhooks/{}", channel.id)),
            faults: Faults {
                lose_response: 0.01,
                recipient_errors: HashMap::from([(UNDELIVERABLE.to_owned(), 131026)]),
                ..Faults::default()
            },
            ..SandboxConfig::default()
        },
    )
    .await?;
    println!(
        "\nbroadcast: {messages} WhatsApp template messages through the Meta sandbox at {sandbox_url} \
         (limit 80/s, 1% of answers lost on purpose, one undeliverable number)"
    );
    let mut sends: Vec<NewSend> = (0..messages)
        .map(|i| NewSend {
            workspace_id: channel.workspace_id,
            channel_id: channel.id,
            recipient: format!("1555{i:07}"),
            message: Message::Template {
                name: "spring_offer".into(),
                language: "en_US".into(),
                parameters: vec![format!("customer {i}")],
            },
            lane: Lane::Broadcast,
        })
        .collect();
    if let Some(last) = sends.last_mut() {
        last.recipient = UNDELIVERABLE.to_owned();
    }
    let started = Instant::now();
    delivery.create_sends(&sends, Utc::now()).await?;
    // Three customers write in during the broadcast; the replies go ahead of it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut replies = Vec::new();
    for i in 0..3 {
        let user = format!("1666000000{i}");
        delivery
            .record_inbound(channel.id, &user, Utc::now())
            .await?;
        let at = unix_ms();
        let ids = delivery
            .create_sends(
                &[NewSend {
                    workspace_id: channel.workspace_id,
                    channel_id: channel.id,
                    recipient: user,
                    message: Message::Text {
                        body: "Thanks for writing! An agent will be with you shortly.".into(),
                    },
                    lane: Lane::Interactive,
                }],
                Utc::now(),
            )
            .await?;
        replies.extend(ids.into_iter().map(|id| (id, at)));
    }
    let deadline = Instant::now() + Duration::from_secs(messages as u64 / 40 + 60);
    let total = (messages + replies.len()) as i64;
    loop {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let counts: HashMap<SendStatus, i64> = delivery
            .send_counts(Some(channel.id))
            .await?
            .into_iter()
            .map(|c| (c.status, c.count))
            .collect();
        let get = |s: SendStatus| counts.get(&s).copied().unwrap_or(0);
        let open = get(SendStatus::Queued) + get(SendStatus::Sending) + get(SendStatus::Unknown);
        println!(
            "  queued {:>4}  unknown {:>2}  accepted {:>4}  sent {:>4}  delivered {:>4}  failed {}",
            get(SendStatus::Queued) + get(SendStatus::Sending),
            get(SendStatus::Unknown),
            get(SendStatus::Accepted),
            get(SendStatus::Sent),
            get(SendStatus::Delivered),
            get(SendStatus::Failed)
        );
        if open == 0 || Instant::now() > deadline {
            break;
        }
    }
    let elapsed = started.elapsed();
    let stats = sandbox.stats();
    let rate = match (stats.first_accepted_unix_ms, stats.last_accepted_unix_ms) {
        (Some(a), Some(b)) if b > a => stats.accepted.saturating_sub(1) as f64 / ((b - a) / 1000.0),
        _ => 0.0,
    };
    println!(
        "sandbox: accepted {} of {total} messages at {rate:.1}/s (most in any second: {}); \
         130429 answers: {}; sent twice: {}; answers lost: {} (reconciled by status webhooks)",
        stats.accepted,
        stats.max_in_any_second,
        stats.limit_errors,
        stats.duplicate_callbacks,
        stats.lost_responses
    );
    let mut waits: Vec<f64> = replies
        .iter()
        .filter_map(|(id, at)| {
            sandbox
                .accepted(&id.to_string())
                .first()
                .map(|a| a.accepted_unix_ms - at)
        })
        .collect();
    waits.sort_by(f64::total_cmp);
    println!(
        "interactive replies reached Meta {:?} ms after they were enqueued, ahead of the broadcast",
        waits.iter().map(|w| w.round() as i64).collect::<Vec<_>>()
    );
    let failed = delivery
        .send_counts(Some(channel.id))
        .await?
        .into_iter()
        .find(|c| c.status == SendStatus::Failed)
        .map_or(0, |c| c.count);
    println!(
        "failed for good: {failed} (the undeliverable number, Meta code 131026); broadcast done in {:.1}s",
        elapsed.as_secs_f64()
    );
    sandbox.shutdown().await;
    Ok(())
}

fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}
