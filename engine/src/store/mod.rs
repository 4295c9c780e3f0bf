//! The store interface and its two backends.
//!
//! Architecture invariant: the runtime and the maintenance services talk to the database only
//! through [`Store`]; nothing above this module knows which backend it runs on. Both backends pass
//! the same conformance suite (`engine/tests/conformance.rs`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::delivery::DeliveryStore;
use crate::error::{Result, StoreError};
use crate::limit::{FallbackBoard, Fallbacks, LimitError};
use crate::model::{Completion, Enqueued, Job, JobFilter, JobId, NewJob, QueueStat};
use crate::wakeup::Wakeups;

mod hot;
pub mod postgres;
pub mod sqlite;

pub use postgres::{PgStore, PgStoreConfig};
pub use sqlite::{SqliteStore, SqliteStoreConfig};

/// A unique violation as a conflict that `what` describes; any other error as it is (both
/// backends).
pub(crate) fn conflict_if_taken(
    what: impl FnOnce() -> String,
) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(what()),
        _ => e.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        }
    }

    /// Which backend a database URL names.
    pub fn of_url(url: &str) -> Result<Backend> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else {
            Err(StoreError::UnsupportedUrl(url.to_owned()))
        }
    }
}

/// Which jobs a scoped claim may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateScope<'a> {
    /// Jobs without a rate key.
    Unlimited,
    /// Jobs of this rate key.
    Key(&'a str),
    /// Jobs of this rate key with a priority number at most this (the more urgent ones).
    KeyUpTo(&'a str, i16),
}

fn board_error(e: StoreError) -> LimitError {
    LimitError::Board(e.to_string())
}

/// The job store as the fail-safe limiter's [`FallbackBoard`]: every process reaches the
/// database, including one that lost Redis.
pub struct StoreBoard(pub Arc<dyn Store>);

#[async_trait]
impl FallbackBoard for StoreBoard {
    async fn announce(
        &self,
        process_id: &str,
        period: u64,
        share: f64,
        ttl: Duration,
    ) -> std::result::Result<(), LimitError> {
        self.0
            .announce_fallback(process_id, period, share, ttl)
            .await
            .map_err(board_error)
    }

    async fn withdraw(&self, process_id: &str, period: u64) -> std::result::Result<(), LimitError> {
        self.0
            .withdraw_fallback(process_id, period)
            .await
            .map_err(board_error)
    }

    async fn others(&self, process_id: &str) -> std::result::Result<Fallbacks, LimitError> {
        self.0
            .fallback_shares(process_id)
            .await
            .map_err(board_error)
    }
}

/// One rate key's part of [`Store::claim_keys`]: at most `limit` of its jobs, only those with a
/// priority number at most `max_priority` when it is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyClaim<'a> {
    pub key: &'a str,
    pub limit: usize,
    pub max_priority: Option<i16>,
}

/// A queue an operator paused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PausedQueue {
    pub queue: String,
    pub paused_at: DateTime<Utc>,
    pub reason: String,
}

/// Longest pause reason kept.
pub const MAX_PAUSE_REASON: usize = 500;

/// Checks a queue name and pause reason given by an operator.
pub(crate) fn check_pause(queue: &str, reason: &str) -> Result<()> {
    if !crate::model::valid_queue_name(queue) {
        return Err(crate::model::InvalidJob(format!(
            "a queue name is 1 to {} bytes",
            crate::model::MAX_QUEUE_NAME
        ))
        .into());
    }
    if reason.len() > MAX_PAUSE_REASON {
        return Err(crate::model::InvalidJob(format!(
            "a pause reason is at most {MAX_PAUSE_REASON} bytes"
        ))
        .into());
    }
    Ok(())
}

/// What the rescuer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RescueReport {
    /// Handed back to `available` (the lost attempt counted).
    pub retried: u64,
    /// Discarded because the lost attempt was their last.
    pub discarded: u64,
}

/// Where jobs live. Implemented by [`PgStore`] and [`SqliteStore`].
///
/// All times are passed in by the caller (from the engine's clock), never read from the
/// database, so both backends behave the same and tests control time.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    fn backend(&self) -> Backend;

    /// The same database's channels, sends, reach and windows.
    fn delivery(&self) -> &dyn DeliveryStore;

    /// Webhook deliveries and inbound messages.
    fn inbox(&self) -> &dyn crate::inbox::InboxStore;

    /// Workspaces and API keys.
    fn tenancy(&self) -> &dyn crate::tenancy::TenancyStore;

    /// Contacts.
    fn contacts(&self) -> &dyn crate::contacts::ContactStore;

    /// WhatsApp template references.
    fn templates(&self) -> &dyn crate::templates::TemplateStore;

    /// The in-process wake-up hub this store pokes on every enqueue (and, on PostgreSQL, on
    /// NOTIFYs from other processes once [`Store::listen`] runs).
    fn wakeups(&self) -> &Wakeups;

    /// Checks that the database answers (health checks).
    async fn ping(&self) -> Result<()>;

    /// Applies pending migrations. Safe to call from several processes at once.
    async fn migrate(&self) -> Result<()>;

    /// Enqueues one job. A job whose unique key is held by an unfinished job is not inserted: the
    /// existing job's id comes back with `inserted: false`.
    async fn enqueue(&self, job: &NewJob, now: DateTime<Utc>) -> Result<Enqueued> {
        let mut out = self.enqueue_many(std::slice::from_ref(job), now).await?;
        out.pop()
            .ok_or_else(|| StoreError::Corrupt("enqueue returned no row".into()))
    }

    /// Enqueues many jobs in one transaction: all of them or none. One result per input, in order.
    /// Every job is validated before anything is written.
    async fn enqueue_many(&self, jobs: &[NewJob], now: DateTime<Utc>) -> Result<Vec<Enqueued>>;

    /// Claims up to `limit` available jobs of `queue` for `worker`, in (priority, run_at, id)
    /// order, skipping jobs whose ordering key is held by an earlier unfinished job. Each claimed
    /// job becomes `running`, its attempt is incremented and its lease runs until `lease_until`.
    async fn claim(
        &self,
        queue: &str,
        worker: &str,
        limit: usize,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<Job>>;

    /// Like [`Store::claim`], but only jobs in `scope`: those without a rate key, or those of one
    /// rate key. The rate-limited producer claims a key's jobs only as far as its limiter granted
    /// permits, so no claimed job ever waits for a permit.
    async fn claim_scoped(
        &self,
        queue: &str,
        scope: RateScope<'_>,
        worker: &str,
        limit: usize,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<Job>>;

    /// [`Store::claim_scoped`] for several rate keys at once, each within its own limit: the
    /// rate-limited producer's round over every due key. A backend that can claim them all in one
    /// statement (PostgreSQL) does: with a hundred channels at 80 messages a second, one claim a
    /// key would be thousands of statements a second, each for a message or two.
    ///
    /// Each key's jobs come most urgent first. A key named twice may have its jobs claimed
    /// once. When a key's claim fails after others succeeded, the jobs claimed so far are
    /// returned (the keys left out just look short of jobs to the caller, and wait for its next
    /// scan: up to a poll interval); only a failure before any claim is an error, so no claimed
    /// job is ever left without its worker.
    async fn claim_keys(
        &self,
        queue: &str,
        keys: &[KeyClaim<'_>],
        worker: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<Job>> {
        claim_keys_one_by_one(self, queue, keys, worker, now, lease_until).await
    }

    /// Distinct rate keys of `queue`'s available jobs, in key order, at most `limit`, starting
    /// after `after`. A loose index scan: one index probe per key, however many jobs wait.
    async fn ready_rate_keys(
        &self,
        queue: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>>;

    /// Records finished attempts. A completion whose (id, attempt) is no longer a running claim
    /// (the job was rescued, released or finalised meanwhile) changes nothing. Returns the number
    /// of jobs changed. Each completion's [`crate::model::Effect`] is written in the same
    /// statement or before it (never after), current claim or not.
    async fn complete(&self, completions: &[Completion]) -> Result<u64>;

    /// Extends the leases of these running claims (id, attempt).
    async fn heartbeat(&self, claims: &[(JobId, i32)], lease_until: DateTime<Utc>) -> Result<u64>;

    /// Gives running claims back without counting the attempt (graceful shutdown).
    async fn release(&self, claims: &[(JobId, i32)], now: DateTime<Utc>) -> Result<u64>;

    /// Makes `scheduled` and `retryable` jobs of `queue` whose run_at has come `available`.
    async fn promote(&self, queue: &str, now: DateTime<Utc>) -> Result<u64>;

    /// The earliest run_at of the scheduled and retryable jobs of `queue`.
    async fn next_due(&self, queue: &str) -> Result<Option<DateTime<Utc>>>;

    /// Running jobs whose lease expired before `now`, oldest first, at most `limit`.
    async fn expired(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<Job>>;

    /// Deletes final jobs: completed ones finalised before `completed_before`, discarded and
    /// cancelled ones finalised before `others_before`; at most `limit` rows per call.
    async fn prune(
        &self,
        completed_before: DateTime<Utc>,
        others_before: DateTime<Utc>,
        limit: usize,
    ) -> Result<u64>;

    /// Reclaims the hot table's dead row versions once more than `dead_rows` have piled up, and
    /// says whether it did. On PostgreSQL every claim and every finalised job leaves one; until
    /// they are vacuumed, each claim walks past them in the claim index, so claims slow down as a
    /// large backlog drains (autovacuum wakes at most once a minute). SQLite reuses freed pages
    /// by itself: a no-op there.
    async fn vacuum_hot(&self, dead_rows: u64) -> Result<bool>;

    /// Takes or renews the leadership `name` for `leader` until `until`. True if `leader` holds it.
    async fn try_lead(
        &self,
        name: &str,
        leader: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool>;

    /// Gives up the leadership (so another process takes over at once, not after the TTL).
    async fn resign(&self, name: &str, leader: &str) -> Result<()>;

    /// Fail-safe limiter: records that `process_id` lost Redis (its fallback period `period`)
    /// and takes `share` (a fraction) of every shared rate from a local limiter, until `ttl`
    /// from now by the store's clock (the database's, on PostgreSQL); replaces an announcement
    /// of the same process and the same or an earlier period (a late one of an earlier period
    /// changes nothing).
    async fn announce_fallback(
        &self,
        process_id: &str,
        period: u64,
        share: f64,
        ttl: Duration,
    ) -> Result<()>;

    /// Withdraws `process_id`'s fallback announcement of `period`, if it is still there (not one
    /// of a later period), and forgets expired ones.
    async fn withdraw_fallback(&self, process_id: &str, period: u64) -> Result<()>;

    /// The unexpired fallback announcements of processes other than `process_id`.
    async fn fallback_shares(&self, process_id: &str) -> Result<Fallbacks>;

    /// One job, unfinished or final.
    async fn get_job(&self, id: JobId) -> Result<Option<Job>>;

    /// Jobs matching `filter`, by ascending id.
    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>>;

    /// Operator: runs a discarded, cancelled, scheduled or retryable job again now. A discarded or
    /// cancelled job gets a fresh set of attempts. Running and completed jobs are left alone
    /// (returns None); so is a final job whose unique key another unfinished job holds now.
    async fn retry_job(&self, id: JobId, now: DateTime<Utc>) -> Result<Option<Job>>;

    /// Operator: cancels a job that is not running and not final. Returns the job if cancelled.
    async fn cancel_job(&self, id: JobId, now: DateTime<Utc>, reason: &str) -> Result<Option<Job>>;

    /// Operator: discards a job that is not running and not final: it will not run, and stays
    /// for inspection (and [`Store::retry_job`]) like a job whose attempts ran out. Returns the
    /// job if discarded.
    async fn discard_job(&self, id: JobId, now: DateTime<Utc>, reason: &str)
        -> Result<Option<Job>>;

    /// Operator: stops every producer, in every process, from claiming `queue`'s jobs until
    /// [`Store::resume_queue`]; running jobs finish, enqueues and promotions go on. Returns false
    /// if the queue was paused already (its reason is kept).
    async fn pause_queue(&self, queue: &str, reason: &str, now: DateTime<Utc>) -> Result<bool>;

    /// Operator: lets producers claim `queue` again, and wakes them. False if it was not paused.
    async fn resume_queue(&self, queue: &str) -> Result<bool>;

    /// The paused queues, by name.
    async fn paused_queues(&self) -> Result<Vec<PausedQueue>>;

    /// Jobs per queue and state.
    async fn stats(&self) -> Result<Vec<QueueStat>>;

    /// Starts forwarding other processes' wake-ups into [`Store::wakeups`] until `shutdown`;
    /// reconnects on its own. A no-op on backends without cross-process notifications.
    async fn listen(&self, shutdown: tokio::sync::watch::Receiver<bool>) -> Result<()>;
}

/// Connection settings common to both backends.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Connections in the pool (PostgreSQL). SQLite uses one writer connection.
    pub max_connections: u32,
    /// How long to wait for a connection before an operation fails.
    pub acquire_timeout: Duration,
    /// PostgreSQL schema holding Herald's tables (created if missing). Lets several Herald
    /// deployments, or parallel tests, share one database.
    pub schema: Option<String>,
    /// SQLite `synchronous` pragma: FULL survives power loss, NORMAL only process crashes.
    pub sqlite_synchronous_full: bool,
    /// Encrypts channel secrets at rest (`HERALD_MASTER_KEY`). Without one, channels cannot be
    /// created or read; everything else works.
    pub keyring: Option<Arc<crate::crypto::Keyring>>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(10),
            schema: None,
            sqlite_synchronous_full: true,
            keyring: None,
        }
    }
}

/// Opens the store a database URL names (`postgres://…` or `sqlite:…`) and applies migrations.
pub async fn connect(url: &str, options: &ConnectOptions) -> Result<Arc<dyn Store>> {
    let store: Arc<dyn Store> = match Backend::of_url(url)? {
        Backend::Postgres => Arc::new(
            PgStore::connect(&PgStoreConfig {
                url: url.to_owned(),
                max_connections: options.max_connections,
                acquire_timeout: options.acquire_timeout,
                schema: options.schema.clone(),
                keyring: options.keyring.clone(),
            })
            .await?,
        ),
        Backend::Sqlite => Arc::new(
            SqliteStore::connect(&SqliteStoreConfig {
                url: url.to_owned(),
                acquire_timeout: options.acquire_timeout,
                synchronous_full: options.sqlite_synchronous_full,
                keyring: options.keyring.clone(),
            })
            .await?,
        ),
    };
    store.migrate().await?;
    Ok(store)
}

/// One job to move to the archive, as both backends' `finalize` take it.
pub(crate) struct Finalize {
    pub id: JobId,
    /// Only if the job is still at this attempt (None: whatever its attempt).
    pub attempt: Option<i32>,
    pub state: crate::model::JobState,
    /// JSON text of the new error list; None keeps the stored one.
    pub errors: Option<String>,
    pub at: DateTime<Utc>,
}

/// A retried or snoozed job's way back to the queue.
pub(crate) struct Requeue {
    pub id: JobId,
    pub attempt: i32,
    pub run_at: DateTime<Utc>,
    /// `available` if `run_at` has come, else `retryable` (retry) or `scheduled` (snooze).
    pub state: &'static str,
    /// Attempts given back: 1 for a snooze, which does not count.
    pub uncount: i32,
    pub errors: Option<String>,
}

/// The sends Meta accepted, from the completions' effects, in send id order, and the latest of
/// their finishing times (when they are recorded as accepted). A send named twice in one batch
/// (a stale attempt and the current one, both answered) keeps the id of the latest attempt;
/// across batches the later write wins.
pub(crate) fn accepted_sends(
    completions: &[Completion],
) -> (Vec<(uuid::Uuid, String)>, DateTime<Utc>) {
    let mut at = DateTime::<Utc>::UNIX_EPOCH;
    let mut accepted: Vec<(uuid::Uuid, i32, &str)> = completions
        .iter()
        .filter_map(|c| match &c.effect {
            Some(crate::model::Effect::SendAccepted {
                send_id,
                provider_message_id,
            }) => {
                at = at.max(c.finished_at);
                Some((*send_id, c.attempt, provider_message_id.as_str()))
            }
            None => None,
        })
        .collect();
    accepted.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    accepted.dedup_by_key(|a| a.0);
    let accepted = accepted
        .into_iter()
        .map(|(id, _, pmid)| (id, pmid.to_owned()))
        .collect();
    (accepted, at)
}

/// Splits finished attempts into jobs to archive (from `running`, at their attempt) and jobs
/// to put back in the queue.
pub(crate) fn split_completions(completions: &[Completion]) -> (Vec<Finalize>, Vec<Requeue>) {
    use crate::model::{JobState, Outcome};
    let mut finals = Vec::new();
    let mut again = Vec::new();
    for c in completions {
        let errors = errors_json(&c.errors);
        let state = match &c.outcome {
            Outcome::Completed => JobState::Completed,
            Outcome::Discard { .. } => JobState::Discarded,
            Outcome::Cancel { .. } => JobState::Cancelled,
            Outcome::Retry { run_at, .. } | Outcome::Snooze { run_at } => {
                let snooze = matches!(c.outcome, Outcome::Snooze { .. });
                let waiting = if snooze { "scheduled" } else { "retryable" };
                again.push(Requeue {
                    id: c.id,
                    attempt: c.attempt,
                    run_at: *run_at,
                    state: if *run_at <= c.finished_at {
                        "available"
                    } else {
                        waiting
                    },
                    uncount: i32::from(snooze),
                    errors,
                });
                continue;
            }
        };
        finals.push(Finalize {
            id: c.id,
            attempt: Some(c.attempt),
            state,
            errors,
            at: c.finished_at,
        });
    }
    (finals, again)
}

/// The states an operator may cancel a job from.
pub(crate) const CANCELLABLE: &[&str] = &["scheduled", "available", "retryable"];

/// What an operator's cancel or discard (`state`) writes for `job`, or None if the job is
/// running or final.
pub(crate) fn operator_final(
    job: &Job,
    state: crate::model::JobState,
    now: DateTime<Utc>,
    reason: &str,
) -> Option<Finalize> {
    if job.state.is_final() || job.state == crate::model::JobState::Running {
        return None;
    }
    let mut errors = job.errors.clone();
    errors.push(crate::model::AttemptError {
        at: now,
        attempt: job.attempt,
        message: crate::model::clean_message(format!("{}: {reason}", state.as_str())),
    });
    trim_errors(&mut errors);
    Some(Finalize {
        id: job.id,
        attempt: Some(job.attempt),
        state,
        errors: errors_json(&Some(errors)),
        at: now,
    })
}

/// The JSON text of an error list, as both backends store it.
pub(crate) fn errors_json(errors: &Option<Vec<crate::model::AttemptError>>) -> Option<String> {
    errors
        .as_ref()
        .map(|e| serde_json::to_string(e).unwrap_or_else(|_| "[]".into()))
}

/// A stored state's text, read back.
pub(crate) fn parse_state(text: &str) -> Result<crate::model::JobState> {
    text.parse()
        .map_err(|e: crate::model::UnknownState| StoreError::Corrupt(e.to_string()))
}

/// Trims an error list to the most recent [`crate::model::MAX_ERRORS_KEPT`].
pub(crate) fn trim_errors(errors: &mut Vec<crate::model::AttemptError>) {
    let keep = crate::model::MAX_ERRORS_KEPT;
    if errors.len() > keep {
        errors.drain(..errors.len() - keep);
    }
}

/// What a claim sets on every job it claims: its rows need not send these back.
pub(crate) struct ClaimInfo<'a> {
    pub worker: &'a str,
    pub now: DateTime<Utc>,
    pub lease_until: DateTime<Utc>,
}

/// The columns a claim returns (the rest are known from [`ClaimInfo`]).
pub(crate) const CLAIM_COLUMNS: &str = "id, workspace_id, kind, queue, payload, priority, run_at, \
     created_at, attempt, max_attempts, errors, unique_key, rate_key, ordering_key";

/// A row an `INSERT … ON CONFLICT DO NOTHING RETURNING id, workspace_id, unique_key` gave back.
pub(crate) struct Inserted {
    pub id: JobId,
    pub workspace_id: uuid::Uuid,
    pub unique_key: Option<String>,
}

/// Matches what a bulk insert returned to its inputs (`pending`, indexes into `jobs`), filling
/// `result`. Returns the inputs with a unique key that got no row: an unfinished job holds it.
///
/// Ids are drawn in row order, so the sorted ids of the rows without a unique key belong to
/// those inputs in input order. Within one call, a second input with the same unique key as an
/// earlier one gets the earlier one's id with `inserted: false`.
pub(crate) fn match_inserted(
    jobs: &[NewJob],
    pending: &[usize],
    returned: Vec<Inserted>,
    result: &mut [Option<Enqueued>],
    seen: &mut std::collections::HashSet<(uuid::Uuid, String)>,
) -> Result<Vec<usize>> {
    let mut plain_ids = Vec::new();
    let mut by_key = std::collections::HashMap::new();
    for row in returned {
        match row.unique_key {
            None => plain_ids.push(row.id),
            Some(key) => {
                by_key.insert((row.workspace_id, key), row.id);
            }
        }
    }
    plain_ids.sort_unstable();
    let mut plain = plain_ids.into_iter();
    let mut missing = Vec::new();
    for &i in pending {
        let job = &jobs[i];
        match &job.unique_key {
            None => {
                let id = plain.next().ok_or_else(|| {
                    StoreError::Corrupt("bulk insert returned too few ids".into())
                })?;
                result[i] = Some(Enqueued { id, inserted: true });
            }
            Some(key) => {
                let k = (job.workspace_id, key.clone());
                let first = !seen.contains(&k);
                match by_key.get(&k) {
                    Some(&id) => {
                        result[i] = Some(Enqueued {
                            id,
                            inserted: first,
                        });
                        seen.insert(k);
                    }
                    None => missing.push(i),
                }
            }
        }
    }
    Ok(missing)
}

/// Gives the inputs in `missing` the id of the unfinished job holding their unique key. Returns
/// those whose holder is gone (it finished meanwhile): they must be inserted again.
pub(crate) fn match_holders(
    jobs: &[NewJob],
    missing: Vec<usize>,
    holders: &std::collections::HashMap<(uuid::Uuid, String), JobId>,
    result: &mut [Option<Enqueued>],
) -> Vec<usize> {
    let mut again = Vec::new();
    for i in missing {
        let job = &jobs[i];
        let key = (job.workspace_id, job.unique_key.clone().unwrap_or_default());
        match holders.get(&key) {
            Some(&id) => {
                result[i] = Some(Enqueued {
                    id,
                    inserted: false,
                })
            }
            None => again.push(i),
        }
    }
    again
}

/// Unwraps the per-input results once every input has one.
pub(crate) fn finish_enqueue(
    result: Vec<Option<Enqueued>>,
    pending: &[usize],
) -> Result<Vec<Enqueued>> {
    if !pending.is_empty() {
        return Err(StoreError::Corrupt(
            "unique key kept changing hands during enqueue".into(),
        ));
    }
    result
        .into_iter()
        .map(|r| r.ok_or_else(|| StoreError::Corrupt("enqueue lost a row".into())))
        .collect()
}

/// [`Store::claim_keys`] as one scoped claim per key (the trait's default).
pub(crate) async fn claim_keys_one_by_one<S: Store + ?Sized>(
    store: &S,
    queue: &str,
    keys: &[KeyClaim<'_>],
    worker: &str,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
) -> Result<Vec<Job>> {
    let mut jobs = Vec::new();
    for k in keys {
        let scope = match k.max_priority {
            Some(cap) => RateScope::KeyUpTo(k.key, cap),
            None => RateScope::Key(k.key),
        };
        match store
            .claim_scoped(queue, scope, worker, k.limit, now, lease_until)
            .await
        {
            Ok(claimed) => jobs.extend(claimed),
            Err(e) if jobs.is_empty() => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, key = k.key, "claim for a rate key failed; keeping the jobs claimed before it");
                break;
            }
        }
    }
    Ok(jobs)
}
