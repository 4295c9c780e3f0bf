//! `herald jobs …`: an operator's view of the queue from the command line (stats, list, show,
//! retry, cancel, discard, pausing and resuming a queue). Prints JSON, one object per line, so its output feeds `jq` and scripts.

use clap::Subcommand;
use herald_engine::{Clock, JobFilter, JobId, JobState, SystemClock};

use crate::settings::Settings;

#[derive(Subcommand)]
pub enum JobsCommand {
    /// Jobs per queue and state.
    Stats,
    /// Jobs by ascending id; page with --after.
    List {
        #[arg(long)]
        queue: Option<String>,
        /// scheduled, available, running, retryable, completed, discarded or cancelled.
        #[arg(long)]
        state: Option<JobState>,
        #[arg(long)]
        kind: Option<String>,
        /// Only jobs with a greater id (the last id of the previous page).
        #[arg(long)]
        after: Option<JobId>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// One job, with its errors.
    Show { id: JobId },
    /// Run a discarded, cancelled, scheduled or retryable job again now.
    Retry { id: JobId },
    /// Cancel a job that is waiting (not running, not finished).
    Cancel {
        id: JobId,
        #[arg(long, default_value = "cancelled by operator")]
        reason: String,
    },
    /// Discard a job that is waiting (not running, not finished): kept for inspection and retry.
    Discard {
        id: JobId,
        #[arg(long, default_value = "discarded by operator")]
        reason: String,
    },
    /// Stop every process from starting the queue's jobs (running ones finish).
    Pause {
        queue: String,
        #[arg(long, default_value = "paused by operator")]
        reason: String,
    },
    /// Let the queue's jobs start again.
    Resume { queue: String },
    /// The paused queues.
    Paused,
}

pub async fn run(
    settings: Settings,
    command: JobsCommand,
) -> Result<(), Box<dyn std::error::Error>> {
    let store = crate::open_store(&settings).await?;
    let now = SystemClock.now();
    match command {
        JobsCommand::Stats => {
            for s in store.stats().await? {
                println!("{}", serde_json::to_string(&s)?);
            }
        }
        JobsCommand::List { queue, state, kind, after, limit } => {
            if !(1..=1000).contains(&limit) {
                return Err("--limit must be 1 to 1000".into());
            }
            let filter = JobFilter { workspace_id: None, queue, state, kind, after_id: after, limit };
            for job in store.list_jobs(&filter).await? {
                println!("{}", serde_json::to_string(&job)?);
            }
        }
        JobsCommand::Show { id } => match store.get_job(id).await? {
            Some(job) => println!("{}", serde_json::to_string_pretty(&job)?),
            None => return Err(format!("no job {id}").into()),
        },
        JobsCommand::Retry { id } => match store.retry_job(id, now).await? {
            Some(job) => println!("{}", serde_json::to_string(&job)?),
            None => {
                return Err(format!(
                    "job {id} was not retried: it does not exist, is running or completed, or its unique key is held by another job"
                )
                .into())
            }
        },
        JobsCommand::Cancel { id, reason } => match store.cancel_job(id, now, &reason).await? {
            Some(job) => println!("{}", serde_json::to_string(&job)?),
            None => {
                return Err(format!(
                    "job {id} was not cancelled: it does not exist, is running, or is finished"
                )
                .into())
            }
        },
        JobsCommand::Discard { id, reason } => match store.discard_job(id, now, &reason).await? {
            Some(job) => println!("{}", serde_json::to_string(&job)?),
            None => {
                return Err(format!(
                    "job {id} was not discarded: it does not exist, is running, or is finished"
                )
                .into())
            }
        },
        JobsCommand::Pause { queue, reason } => {
            if !store.pause_queue(&queue, &reason, now).await? {
                eprintln!("queue {queue:?} was paused already; its first reason is kept");
            }
            print_paused(store.as_ref(), &queue).await?;
        }
        JobsCommand::Resume { queue } => {
            if !store.resume_queue(&queue).await? {
                return Err(format!("queue {queue:?} is not paused").into());
            }
            println!("{}", serde_json::json!({ "queue": queue, "paused": false }));
        }
        JobsCommand::Paused => {
            for p in store.paused_queues().await? {
                println!("{}", serde_json::to_string(&p)?);
            }
        }
    }
    Ok(())
}

async fn print_paused(
    store: &dyn herald_engine::Store,
    queue: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(p) = store
        .paused_queues()
        .await?
        .into_iter()
        .find(|p| p.queue == queue)
    {
        println!("{}", serde_json::to_string(&p)?);
    }
    Ok(())
}
