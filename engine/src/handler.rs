//! Handlers: the code that runs a job, registered per job kind with its retry policy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;

use crate::backoff::Backoff;
use crate::model::{Effect, Job};

/// How a handler's attempt did not succeed.
#[derive(Debug, Clone, PartialEq)]
pub enum JobError {
    /// Failed; retry after the kind's backoff, or after `after` when given (Meta said how long to
    /// wait). Counts an attempt: the job is discarded when none are left.
    Retry {
        error: String,
        after: Option<Duration>,
    },
    /// Not a failure: run again after this long, without counting the attempt (a limit is not
    /// free yet, a dependency is not ready).
    Snooze(Duration),
    /// Stop for good: the job is cancelled, with this reason.
    Cancel(String),
    /// Failed for good: the job is discarded, with this reason, whatever attempts are left.
    Discard(String),
}

impl JobError {
    pub fn retry(error: impl std::fmt::Display) -> Self {
        JobError::Retry {
            error: error.to_string(),
            after: None,
        }
    }

    pub fn retry_after(error: impl std::fmt::Display, after: Duration) -> Self {
        JobError::Retry {
            error: error.to_string(),
            after: Some(after),
        }
    }
}

/// What a handler sees of its job.
#[derive(Debug, Clone)]
pub struct JobContext {
    pub job: Arc<Job>,
    /// Set by [`JobContext::complete_with`], taken by the runtime for the completion.
    effect: Arc<Mutex<Option<Effect>>>,
}

impl JobContext {
    /// The context of an attempt of `job`: what the engine gives a handler. Public so that a
    /// worker can be run on a job outside the engine (tests, tools).
    pub fn new(job: Job) -> Self {
        JobContext {
            job: Arc::new(job),
            effect: Arc::default(),
        }
    }

    /// Records `effect` with this attempt's completion, whatever its outcome, in the same
    /// statement where the store can: one write instead of two, and a job never completed
    /// without it. The last call of an attempt wins. Call it within the attempt: the runtime
    /// takes the effect when the handler returns, and a later call (from a task the handler
    /// spawned, through a clone of the context) is lost.
    pub fn complete_with(&self, effect: Effect) {
        *self
            .effect
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(effect);
    }

    pub(crate) fn take_effect(&self) -> Option<Effect> {
        self.effect
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// The policy of a job kind: how it retries and how long an attempt may take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KindPolicy {
    pub backoff: Backoff,
    /// An attempt still running after this long is cancelled and counts as failed.
    pub timeout: Duration,
}

impl Default for KindPolicy {
    fn default() -> Self {
        KindPolicy {
            backoff: Backoff::default(),
            timeout: Duration::from_secs(60),
        }
    }
}

/// A typed handler for one job kind.
#[async_trait]
pub trait Worker: Send + Sync + 'static {
    /// The payload, as JSON. A payload that does not deserialize discards the job with the reason.
    type Args: DeserializeOwned + Send;
    /// The job kind this worker handles.
    const KIND: &'static str;

    fn policy(&self) -> KindPolicy {
        KindPolicy::default()
    }

    async fn work(&self, args: Self::Args, ctx: &JobContext) -> Result<(), JobError>;
}

/// The type-erased form the runtime calls.
#[async_trait]
pub trait ErasedHandler: Send + Sync + 'static {
    async fn run(&self, ctx: &JobContext) -> Result<(), JobError>;
}

struct Typed<W>(W);

#[async_trait]
impl<W: Worker> ErasedHandler for Typed<W> {
    async fn run(&self, ctx: &JobContext) -> Result<(), JobError> {
        let args = W::Args::deserialize(&ctx.job.payload).map_err(|e| {
            JobError::Discard(format!("payload does not deserialize for {}: {e}", W::KIND))
        })?;
        self.0.work(args, ctx).await
    }
}

use serde::Deserialize as _;

#[derive(Clone)]
pub(crate) struct Registered {
    pub handler: Arc<dyn ErasedHandler>,
    pub policy: KindPolicy,
}

/// The handlers of a runtime, by job kind.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: HashMap<String, Registered>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `worker` for its kind (replacing any earlier one).
    pub fn register<W: Worker>(&mut self, worker: W) -> &mut Self {
        let policy = worker.policy();
        self.kinds.insert(
            W::KIND.to_owned(),
            Registered {
                handler: Arc::new(Typed(worker)),
                policy,
            },
        );
        self
    }

    /// Registers a type-erased handler under `kind`.
    pub fn register_erased(
        &mut self,
        kind: &str,
        policy: KindPolicy,
        handler: Arc<dyn ErasedHandler>,
    ) -> &mut Self {
        self.kinds
            .insert(kind.to_owned(), Registered { handler, policy });
        self
    }

    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.kinds.keys().map(String::as_str)
    }

    pub(crate) fn get(&self, kind: &str) -> Option<&Registered> {
        self.kinds.get(kind)
    }
}
