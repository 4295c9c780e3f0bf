//! The job model: what a job is, the states it moves through, and what callers hand to `enqueue`.
//!
//! # State machine
//!
//! ```text
//!                 enqueue (run_at in future)           enqueue (due now)
//!                          │                                  │
//!                          ▼                                  ▼
//!                     ┌─────────┐   run_at reached      ┌───────────┐
//!                     │scheduled│ ────────────────────▶ │ available │ ◀──────────────┐
//!                     └─────────┘      (promotion)      └───────────┘                │
//!                          ▲                                  │ claim (attempt += 1) │
//!                          │ snooze (attempt not counted)     ▼                      │
//!                          └─────────────────────────── ┌─────────┐                  │
//!                                                       │ running │──lease expired──▶│ (rescuer;
//!     ┌──────────┐ ◀── handler Ok ───────────────────── └─────────┘                  │  the attempt
//!     │completed │                                        │   │   │                  │  stays counted)
//!     └──────────┘            failed, attempts left ──────┘   │   │                  │
//!                                     ▼                       │   │                  │
//!                               ┌───────────┐  run_at reached │   │                  │
//!                               │ retryable │ ────────────────┼───┼─────────────────▶┘
//!                               └───────────┘  (promotion)    │   │
//!     ┌───────────┐ ◀── failed, no attempts left / Discard ───┘   │
//!     │ discarded │ ── operator retry ──▶ available               │
//!     └───────────┘                                               │
//!     ┌───────────┐ ◀── handler Cancel / operator cancel ─────────┘
//!     │ cancelled │ ── operator retry ──▶ available
//!     └───────────┘
//! ```
//!
//! `scheduled`, `available`, `running` and `retryable` are *unfinished* states: such jobs live in
//! the hot table. `completed`, `discarded` and `cancelled` are *final*: the job moves, in the same
//! statement that finalises it, to the archive table, where the pruner deletes it after its
//! retention. Keeping only unfinished jobs in the hot table keeps it (and its indexes) small under
//! sustained load, and it is what makes unique and ordering keys cheap: "held by an unfinished job"
//! is simply "present in the hot table".

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A job's id. Assigned by the store, increasing in enqueue order.
pub type JobId = i64;

/// Where a job is in its life. See the module documentation for the transitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for its `run_at`.
    Scheduled,
    /// Due; a producer may claim it.
    Available,
    /// Claimed by a worker that holds its lease.
    Running,
    /// Failed, waiting for its backoff before the next attempt.
    Retryable,
    /// Finished successfully.
    Completed,
    /// Failed for good (attempts exhausted, or the handler discarded it). Kept for inspection;
    /// an operator may retry it.
    Discarded,
    /// Cancelled by its handler or an operator.
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Scheduled,
        JobState::Available,
        JobState::Running,
        JobState::Retryable,
        JobState::Completed,
        JobState::Discarded,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Scheduled => "scheduled",
            JobState::Available => "available",
            JobState::Running => "running",
            JobState::Retryable => "retryable",
            JobState::Completed => "completed",
            JobState::Discarded => "discarded",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Final states live in the archive table and never change again (but for an operator retry).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Discarded | JobState::Cancelled
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text did not name a job state.
#[derive(Debug, thiserror::Error)]
#[error("unknown job state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for JobState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// One failed attempt, as kept on the job (the last [`MAX_ERRORS_KEPT`] of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttemptError {
    pub at: DateTime<Utc>,
    pub attempt: i32,
    pub message: String,
}

/// Longest error message kept on a job, in bytes.
pub const MAX_ERROR_MESSAGE: usize = 2048;

/// An error message as stored: NUL (which PostgreSQL cannot store, and which would otherwise fail
/// every completion batch the job is in, forever) replaced, and cut to [`MAX_ERROR_MESSAGE`] at a
/// character boundary. Handlers' messages come from outside (response bodies, panics).
pub fn clean_message(message: String) -> String {
    let mut message = if message.contains('\0') {
        message.replace('\0', "\u{FFFD}")
    } else {
        message
    };
    if message.len() > MAX_ERROR_MESSAGE {
        let mut cut = MAX_ERROR_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push('…');
    }
    message
}

/// How many of a job's most recent errors are kept on it.
pub const MAX_ERRORS_KEPT: usize = 10;

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Job {
    #[schema(value_type = i64)]
    pub id: JobId,
    /// The tenant the job belongs to. The nil UUID marks Herald's own system jobs.
    pub workspace_id: Uuid,
    /// Selects the handler.
    pub kind: String,
    pub queue: String,
    pub payload: serde_json::Value,
    /// Lower runs first (0 is the most urgent).
    pub priority: i16,
    pub state: JobState,
    /// When the job is due (scheduled / retryable) or became due.
    pub run_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    /// Attempts started so far (claims). Incremented when a worker claims the job.
    pub attempt: i32,
    pub max_attempts: i32,
    pub attempted_at: Option<DateTime<Utc>>,
    /// The worker (process) that holds or last held the job.
    pub attempted_by: Option<String>,
    /// A running job whose lease has expired is rescued.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// When the job reached its final state.
    pub finalized_at: Option<DateTime<Utc>>,
    pub errors: Vec<AttemptError>,
    /// While an unfinished job holds this key (per workspace), enqueueing another job with the
    /// same key returns the existing job instead.
    pub unique_key: Option<String>,
    /// Names the shared rate limit the job draws on (a channel, a recipient).
    pub rate_key: Option<String>,
    /// Jobs with the same ordering key (per workspace) run one at a time, in enqueue order.
    pub ordering_key: Option<String>,
}

/// Nil workspace: jobs that belong to no tenant (Herald's own maintenance, benchmarks).
pub const SYSTEM_WORKSPACE: Uuid = Uuid::nil();

/// The queue used when a job names none.
pub const DEFAULT_QUEUE: &str = "default";

/// The attempts a job gets when neither it nor its kind's policy says otherwise.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 20;

/// What a caller asks to enqueue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewJob {
    pub workspace_id: Uuid,
    pub kind: String,
    pub queue: String,
    pub payload: serde_json::Value,
    pub priority: i16,
    /// None: due now.
    pub run_at: Option<DateTime<Utc>>,
    pub max_attempts: i32,
    pub unique_key: Option<String>,
    pub rate_key: Option<String>,
    pub ordering_key: Option<String>,
}

/// Longest queue name, in bytes.
pub const MAX_QUEUE_NAME: usize = 128;

/// Whether `queue` may name a queue (of a job, or one an operator pauses).
pub fn valid_queue_name(queue: &str) -> bool {
    !queue.is_empty() && queue.len() <= MAX_QUEUE_NAME
}

impl NewJob {
    /// A job of `kind` with `payload`, on the default queue, due now.
    pub fn new(kind: impl Into<String>, payload: serde_json::Value) -> Self {
        NewJob {
            workspace_id: SYSTEM_WORKSPACE,
            kind: kind.into(),
            queue: DEFAULT_QUEUE.to_owned(),
            payload,
            priority: 0,
            run_at: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            unique_key: None,
            rate_key: None,
            ordering_key: None,
        }
    }

    pub fn workspace(mut self, workspace_id: Uuid) -> Self {
        self.workspace_id = workspace_id;
        self
    }
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }
    pub fn run_at(mut self, run_at: DateTime<Utc>) -> Self {
        self.run_at = Some(run_at);
        self
    }
    pub fn max_attempts(mut self, max_attempts: i32) -> Self {
        self.max_attempts = max_attempts;
        self
    }
    pub fn unique_key(mut self, key: impl Into<String>) -> Self {
        self.unique_key = Some(key.into());
        self
    }
    pub fn rate_key(mut self, key: impl Into<String>) -> Self {
        self.rate_key = Some(key.into());
        self
    }
    pub fn ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// Checks what the store cannot: a caller's mistake is an error here, before anything is
    /// written.
    pub fn validate(&self) -> Result<(), InvalidJob> {
        if self.kind.is_empty() || self.kind.len() > 128 {
            return Err(InvalidJob("kind must be 1 to 128 bytes".into()));
        }
        if !valid_queue_name(&self.queue) {
            return Err(InvalidJob(format!(
                "queue must be 1 to {MAX_QUEUE_NAME} bytes"
            )));
        }
        if self.max_attempts < 1 {
            return Err(InvalidJob("max_attempts must be at least 1".into()));
        }
        for (name, key) in [
            ("unique_key", &self.unique_key),
            ("rate_key", &self.rate_key),
            ("ordering_key", &self.ordering_key),
        ] {
            if key.as_ref().is_some_and(|k| k.is_empty() || k.len() > 512) {
                return Err(InvalidJob(format!("{name} must be 1 to 512 bytes")));
            }
        }
        // PostgreSQL cannot store NUL in text or jsonb; refusing it here keeps both backends alike.
        let texts = [Some(&self.kind), Some(&self.queue)]
            .into_iter()
            .chain([&self.unique_key, &self.rate_key, &self.ordering_key].map(Option::as_ref));
        if texts.flatten().any(|t| t.contains('\0')) || has_nul(&self.payload) {
            return Err(InvalidJob("text must not contain NUL characters".into()));
        }
        Ok(())
    }
}

fn has_nul(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(a) => a.iter().any(has_nul),
        serde_json::Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// Input the store refuses as given (a job, a channel, a workspace): the message says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid: {0}")]
pub struct InvalidJob(pub String);

/// What enqueueing one job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    pub id: JobId,
    /// False when an unfinished job already held the unique key: `id` is that job's.
    pub inserted: bool,
}

/// How a handler's attempt ended, as the runtime hands it to the store.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Completed,
    /// The attempt failed; run again at `run_at` (attempts were left).
    Retry {
        run_at: DateTime<Utc>,
        error: String,
    },
    /// Not a failure: run again at `run_at` without counting this attempt.
    Snooze {
        run_at: DateTime<Utc>,
    },
    /// Failed for good.
    Discard {
        reason: String,
    },
    Cancel {
        reason: String,
    },
}

/// A finished attempt: which claim it belongs to and how it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub id: JobId,
    /// The attempt number of the claim; a completion for a claim that is no longer current (the
    /// job was rescued and claimed again) changes nothing.
    pub attempt: i32,
    pub outcome: Outcome,
    /// The job's error list after this attempt (already trimmed); None leaves it unchanged.
    pub errors: Option<Vec<AttemptError>>,
    pub finished_at: DateTime<Utc>,
    /// What the attempt did outside the database, to record with the completion
    /// ([`crate::JobContext::complete_with`]).
    pub effect: Option<Effect>,
}

impl Completion {
    /// A completion that finishes no job but still carries this one's effect (attempt 0:
    /// every claim's attempt is at least 1), for a completion that cannot be written itself:
    /// released at shutdown, or refused by the database.
    pub fn effect_only(&self) -> Option<Completion> {
        Some(Completion {
            id: self.id,
            attempt: 0,
            outcome: Outcome::Completed,
            errors: None,
            finished_at: self.finished_at,
            effect: Some(self.effect.clone()?),
        })
    }
}

/// A write that belongs with a job's completion: the store makes it in the statement (or
/// transaction) that completes the job, or just before, never after, so a completed job never
/// lacks it. It is made even when the completion changes nothing (the claim is no longer
/// current): it records what happened, and that happened either way.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Meta accepted a send: its message id, as
    /// [`crate::delivery::DeliveryStore::accept_sends`] records it.
    SendAccepted {
        send_id: Uuid,
        provider_message_id: String,
    },
}

/// Jobs per state, per queue (unfinished) or in the archive (final).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct QueueStat {
    pub queue: String,
    pub state: JobState,
    pub count: i64,
}

/// Which jobs an operator lists.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub workspace_id: Option<Uuid>,
    pub queue: Option<String>,
    pub state: Option<JobState>,
    pub kind: Option<String>,
    /// Only jobs with an id greater than this (cursor pagination, ascending ids).
    pub after_id: Option<JobId>,
    pub limit: i64,
}

/// `at + d`, saturating at the latest time chrono represents instead of panicking: delays come
/// from handlers (`retry_after`, `Snooze`), which may ask for anything.
pub fn later(at: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    at.checked_add_signed(chrono_duration(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Converts a [`Duration`] to chrono's, saturating instead of failing.
pub fn chrono_duration(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_saturates() {
        let now = Utc::now();
        assert_eq!(later(now, Duration::MAX), DateTime::<Utc>::MAX_UTC);
        assert_eq!(
            later(now, Duration::from_secs(1)),
            now + chrono::Duration::seconds(1)
        );
    }

    #[test]
    fn states_round_trip_through_text() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>().ok(), Some(state));
        }
        assert!("nonsense".parse::<JobState>().is_err());
    }

    #[test]
    fn validation_rejects_bad_jobs() {
        assert!(NewJob::new("k", serde_json::json!({})).validate().is_ok());
        assert!(NewJob::new("", serde_json::json!({})).validate().is_err());
        assert!(NewJob::new("k", serde_json::json!({}))
            .max_attempts(0)
            .validate()
            .is_err());
        assert!(NewJob::new("k", serde_json::json!({}))
            .unique_key("")
            .validate()
            .is_err());
        assert!(NewJob::new("k", serde_json::json!({}))
            .queue("")
            .validate()
            .is_err());
        assert!(NewJob::new("k", serde_json::json!({"a": ["x\u{0}"]}))
            .validate()
            .is_err());
        assert!(NewJob::new("k", serde_json::json!({}))
            .ordering_key("a\u{0}")
            .validate()
            .is_err());
    }
}
