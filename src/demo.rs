//! `herald demo`: Herald at work on the embedded default, in a few seconds, with nothing to
//! install and no Meta account. First a small mixed workload (plain jobs, jobs that fail and
//! retry, a conversation whose messages must keep their order, a unique job enqueued twice);
//! then a WhatsApp broadcast through the built-in Meta sandbox at Meta's 80 messages a second,
//! with interactive replies overtaking it, a few answers lost on the way (reconciled by the
//! signed status webhooks, never sent twice) and one undeliverable recipient. Prints what
//! happened.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use herald_engine::{Client, JobFilter, JobState, NewJob, SystemClock};
use serde_json::json;

use crate::settings::Settings;

#[derive(Args)]
pub struct DemoArgs {
    /// Plain jobs to run.
    #[arg(long, default_value_t = 2000)]
    jobs: usize,
    /// Broadcast messages to send through the Meta sandbox (80 a second); 0 skips the part.
    #[arg(long, default_value_t = 400)]
    messages: usize,
}

pub async fn run(mut settings: Settings, args: DemoArgs) -> Result<(), Box<dyn std::error::Error>> {
    settings.engine.poll_interval = Duration::from_millis(200);
    // The sandbox loses a few answers on purpose: notice them in 2 s, not Meta's 15.
    settings.meta_timeout = Duration::from_secs(2);
    let store = crate::open_store(&settings).await?;
    let client = Client::new(store.clone(), Arc::new(SystemClock));
    println!(
        "Herald demo on {} ({})",
        store.backend().as_str(),
        crate::redact(&settings.database_url)
    );
    let mut jobs: Vec<NewJob> = (0..args.jobs)
        .map(|i| NewJob::new("sleep", json!({ "ms": i % 5 })).queue("default"))
        .collect();
    for i in 0..20 {
        jobs.push(NewJob::new(
            "sleep",
            json!({ "ms": 1, "fail_until_attempt": 1 + i % 2 }),
        ));
    }
    for i in 0..10 {
        jobs.push(
            NewJob::new("sleep", json!({ "ms": 3, "seq": i })).ordering_key("conversation:42"),
        );
    }
    jobs.push(NewJob::new("sleep", json!({ "ms": 1 })).unique_key("daily-report"));
    jobs.push(NewJob::new("sleep", json!({ "ms": 1 })).unique_key("daily-report"));
    jobs.push(NewJob::new("no.such.kind", json!({})));
    // Earlier runs on the same file stay in the archive: count only what this run adds.
    let before = store.stats().await?;
    let started = Instant::now();
    let out = client.enqueue_many(&jobs).await?;
    let duplicates = out.iter().filter(|e| !e.inserted).count();
    println!(
        "enqueued {} jobs in one transaction in {:?} ({} returned an existing job by unique key)",
        out.len(),
        started.elapsed(),
        duplicates
    );
    let listener = tokio::net::TcpListener::bind(settings.listen).await.ok();
    let served_at = listener.as_ref().and_then(|l| l.local_addr().ok());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let runner = {
        let store = store.clone();
        let settings = settings.clone();
        tokio::spawn(async move {
            let shutdown = async {
                let _ = stop_rx.await;
            };
            match listener {
                Some(l) => {
                    if let Ok(addr) = l.local_addr() {
                        println!("health check: http://{addr}/healthz");
                    }
                    crate::run(l, store, &settings, shutdown)
                        .await
                        .map_err(|e| e.to_string())
                }
                None => {
                    let engine = crate::start_engine(store, &settings)
                        .await
                        .map_err(|e| e.to_string())?;
                    shutdown.await;
                    engine.shutdown().await;
                    Ok(())
                }
            }
        })
    };
    let expected = out.len() - duplicates;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let stats = store.stats().await?;
        let total = |list: &[herald_engine::model::QueueStat], s: JobState| {
            list.iter()
                .filter(|x| x.state == s)
                .map(|x| x.count)
                .sum::<i64>()
        };
        let count = |s: JobState| {
            let earlier = if s.is_final() { total(&before, s) } else { 0 };
            total(&stats, s) - earlier
        };
        let finished = count(JobState::Completed) + count(JobState::Discarded);
        println!(
            "  completed {:>6}  retrying {:>3}  discarded {:>2}  running {:>4}  waiting {:>6}",
            count(JobState::Completed),
            count(JobState::Retryable),
            count(JobState::Discarded),
            count(JobState::Running),
            count(JobState::Available) + count(JobState::Scheduled)
        );
        if finished as usize >= expected || Instant::now() > deadline {
            break;
        }
    }
    match served_at {
        Some(addr) if args.messages > 0 => {
            crate::demo_delivery::run(store.clone(), addr, args.messages).await?
        }
        Some(_) => {}
        None => println!(
            "(the broadcast part needs the HTTP server for Meta's webhooks, and {} is taken)",
            settings.listen
        ),
    }
    let _ = stop_tx.send(());
    runner.await?.map_err(|e| format!("engine: {e}"))?;
    // The conversation's jobs follow the plain and the failing ones in `jobs`.
    let convo_ids = &out[args.jobs + 20..args.jobs + 30];
    let mut convo = Vec::new();
    for e in convo_ids {
        if let Some(j) = store.get_job(e.id).await? {
            convo.push(j);
        }
    }
    convo.sort_by_key(|j| j.attempted_at);
    let order: Vec<i64> = convo
        .iter()
        .filter_map(|j| j.payload.get("seq").and_then(|v| v.as_i64()))
        .collect();
    println!("conversation:42 ran in order: {order:?}");
    let first_id = out
        .iter()
        .filter(|e| e.inserted)
        .map(|e| e.id)
        .min()
        .unwrap_or(0);
    let discarded = store
        .list_jobs(&JobFilter {
            state: Some(JobState::Discarded),
            after_id: Some(first_id - 1),
            limit: 10,
            ..Default::default()
        })
        .await?;
    for j in discarded {
        if let Some(e) = j.errors.last() {
            println!("discarded job {} ({}): {}", j.id, j.kind, e.message);
        }
    }
    println!("done in {:?}", started.elapsed());
    Ok(())
}
