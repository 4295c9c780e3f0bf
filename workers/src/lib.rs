//! Herald's built-in job handlers. Delivery (Meta sends), campaign fan-out and workflow steps
//! register here as they arrive; for now: the handlers the benchmarks, demo and tests use.

pub mod meta;

use std::time::Duration;

use async_trait::async_trait;
use herald_engine::{JobContext, JobError, Registry, Worker};
use serde::Deserialize;

/// Does nothing: measures the engine's own cost per job.
pub struct Noop;

#[async_trait]
impl Worker for Noop {
    type Args = serde_json::Value;
    const KIND: &'static str = "noop";

    async fn work(&self, _args: serde_json::Value, _ctx: &JobContext) -> Result<(), JobError> {
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
pub struct SleepArgs {
    /// How long the job takes.
    pub ms: u64,
    /// Fail (and retry) until this attempt; 0 never fails.
    #[serde(default)]
    pub fail_until_attempt: i32,
}

/// Takes `ms` milliseconds, optionally failing its first attempts: stands in for real work in
/// the demo and in crash tests.
pub struct Sleep;

#[async_trait]
impl Worker for Sleep {
    type Args = SleepArgs;
    const KIND: &'static str = "sleep";

    fn policy(&self) -> herald_engine::KindPolicy {
        herald_engine::KindPolicy {
            backoff: herald_engine::Backoff {
                base: Duration::from_millis(500),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    async fn work(&self, args: SleepArgs, ctx: &JobContext) -> Result<(), JobError> {
        tokio::time::sleep(Duration::from_millis(args.ms)).await;
        if ctx.job.attempt <= args.fail_until_attempt {
            return Err(JobError::retry(format!(
                "simulated failure on attempt {}",
                ctx.job.attempt
            )));
        }
        Ok(())
    }
}

/// Every built-in handler.
pub fn builtin() -> Registry {
    let mut registry = Registry::new();
    registry.register(Noop).register(Sleep);
    registry
}
