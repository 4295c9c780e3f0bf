//! The SQLite store: the embedded default, for one process on one machine.
//!
//! One connection does all the writing (SQLite allows one writer at a time; queueing writers in
//! the pool is cheaper than letting them collide on the file lock). The file is in WAL mode.
//! Batches travel as one JSON array per statement (`json_each`), so a claim or a completion of a
//! thousand jobs is one statement, as on PostgreSQL.
//!
//! Architecture invariant: one process per SQLite file at a time for the queue to perform; a
//! second process is correct (busy timeout) but slow. Use PostgreSQL for several processes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Executor, QueryBuilder, Row};
use tracing::info;
use uuid::Uuid;

mod contacts;
mod delivery;
mod inbox;
mod templates;
mod tenancy;

use super::postgres::notify_payloads;
use super::{
    accepted_sends, check_pause, finish_enqueue, match_holders, match_inserted, operator_final,
    parse_state, split_completions, Backend, ClaimInfo, Finalize, Inserted, KeyClaim, PausedQueue,
    RateScope, Store, CANCELLABLE, CLAIM_COLUMNS,
};
use crate::clock::{from_micros, to_micros};
use crate::error::{Result, StoreError};
use crate::limit::Fallbacks;
use crate::migrate;
use crate::model::{Completion, Enqueued, Job, JobFilter, JobId, JobState, NewJob, QueueStat};
use crate::wakeup::Wakeups;

#[derive(Debug, Clone)]
pub struct SqliteStoreConfig {
    /// `sqlite:path` (created if missing), e.g. `sqlite:herald.db`.
    pub url: String,
    pub acquire_timeout: Duration,
    /// `synchronous=FULL` (survives power loss) rather than NORMAL (survives process crashes).
    pub synchronous_full: bool,
    /// Encrypts channel secrets; without one, channels cannot be created or read.
    pub keyring: Option<std::sync::Arc<crate::crypto::Keyring>>,
}

/// Rows per INSERT statement in a bulk enqueue (the call is still one transaction).
const BULK_CHUNK: usize = 5_000;

const HOT_COLUMNS: &str = "id, workspace_id, kind, queue, payload, priority, state, run_at, \
     created_at, attempt, max_attempts, attempted_at, attempted_by, lease_expires_at, \
     NULL AS finalized_at, errors, unique_key, rate_key, ordering_key";
const DONE_COLUMNS: &str = "id, workspace_id, kind, queue, payload, priority, state, run_at, \
     created_at, attempt, max_attempts, attempted_at, attempted_by, NULL AS lease_expires_at, \
     finalized_at, errors, unique_key, rate_key, ordering_key";

pub struct SqliteStore {
    pool: SqlitePool,
    wakeups: Wakeups,
    keyring: Option<std::sync::Arc<crate::crypto::Keyring>>,
    /// Sends the keyed claim began, until their workers take them.
    begun: crate::delivery::BegunSends,
}

impl SqliteStore {
    /// An operator's cancel or discard of a job that is not running and not final.
    async fn end_job(
        &self,
        id: JobId,
        state: JobState,
        now: DateTime<Utc>,
        reason: &str,
    ) -> Result<Option<Job>> {
        let Some(job) = self.get_job(id).await? else {
            return Ok(None);
        };
        let Some(row) = operator_final(&job, state, now, reason) else {
            return Ok(None);
        };
        if self.finalize(&[row], CANCELLABLE).await?.is_empty() {
            return Ok(None);
        }
        self.get_job(id).await
    }

    pub async fn connect(config: &SqliteStoreConfig) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(&config.url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if config.synchronous_full {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            })
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(config.acquire_timeout)
            .test_before_acquire(false)
            // An in-memory database lives as long as its one connection.
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await?;
        Ok(SqliteStore {
            pool,
            wakeups: Wakeups::default(),
            keyring: config.keyring.clone(),
            begun: Default::default(),
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The claim statement, narrowed to a rate scope when given (`?6` is the key).
    async fn claim_where(
        &self,
        queue: &str,
        scope: Option<RateScope<'_>>,
        worker: &str,
        limit: usize,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<Job>> {
        let scope_sql = match scope {
            None => "",
            Some(RateScope::Unlimited) => "AND j.rate_key IS NULL",
            Some(RateScope::Key(_)) => "AND j.rate_key = ?6",
            Some(RateScope::KeyUpTo(..)) => "AND j.rate_key = ?6 AND j.priority <= ?7",
        };
        let sql = format!(
            "UPDATE herald_jobs SET state = 'running', attempt = attempt + 1, attempted_at = ?3,
                    attempted_by = ?4, lease_expires_at = ?5
              WHERE id IN (
                SELECT id FROM herald_jobs j
                 WHERE j.state = 'available' AND j.queue = ?1 {scope_sql}
                   AND NOT EXISTS (SELECT 1 FROM herald_paused_queues p WHERE p.queue = ?1)
                   AND (j.ordering_key IS NULL OR NOT EXISTS (
                        SELECT 1 FROM herald_jobs o
                         WHERE o.workspace_id = j.workspace_id
                           AND o.ordering_key = j.ordering_key AND o.id < j.id))
                 ORDER BY j.priority, j.run_at, j.id
                 LIMIT ?2)
             RETURNING {CLAIM_COLUMNS}"
        );
        let query = sqlx::query(&sql)
            .bind(queue)
            .bind(limit as i64)
            .bind(to_micros(now))
            .bind(worker)
            .bind(to_micros(lease_until));
        let query = match scope {
            Some(RateScope::Key(key)) => query.bind(key),
            Some(RateScope::KeyUpTo(key, cap)) => query.bind(key).bind(cap),
            _ => query,
        };
        let rows = query.fetch_all(&self.pool).await?;
        let info = ClaimInfo {
            worker,
            now,
            lease_until,
        };
        let mut jobs = rows
            .iter()
            .map(|r| job_from_row(r, Some(&info)))
            .collect::<Result<Vec<_>>>()?;
        jobs.sort_by_key(|j| (j.priority, j.run_at, j.id));
        Ok(jobs)
    }

    async fn insert_chunk(
        &self,
        tx: &mut sqlx::SqliteConnection,
        jobs: &[NewJob],
        now: DateTime<Utc>,
    ) -> Result<Vec<Enqueued>> {
        let mut result: Vec<Option<Enqueued>> = vec![None; jobs.len()];
        let mut seen = HashSet::new();
        let mut pending: Vec<usize> = (0..jobs.len()).collect();
        for _round in 0..5 {
            if pending.is_empty() {
                break;
            }
            let rows: Vec<serde_json::Value> = pending
                .iter()
                .map(|&i| {
                    let j = &jobs[i];
                    let at = j.run_at.unwrap_or(now);
                    json!([
                        j.workspace_id.to_string(),
                        j.kind,
                        j.queue,
                        j.payload,
                        j.priority,
                        if at <= now { "available" } else { "scheduled" },
                        to_micros(at),
                        j.max_attempts,
                        j.unique_key,
                        j.rate_key,
                        j.ordering_key,
                    ])
                })
                .collect();
            let returned = sqlx::query(
                "INSERT INTO herald_jobs (workspace_id, kind, queue, payload, priority, state,
                    run_at, created_at, max_attempts, unique_key, rate_key, ordering_key)
                 SELECT v->>0, v->>1, v->>2, v->'$[3]', v->>4, v->>5, v->>6, ?2, v->>7, v->>8,
                        v->>9, v->>10
                   FROM (SELECT key AS k, value AS v FROM json_each(?1)) WHERE true ORDER BY k
                 ON CONFLICT (workspace_id, unique_key) WHERE unique_key IS NOT NULL DO NOTHING
                 RETURNING id, workspace_id, unique_key",
            )
            .bind(serde_json::Value::Array(rows).to_string())
            .bind(to_micros(now))
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|row| {
                Ok(Inserted {
                    id: row.try_get("id")?,
                    workspace_id: parse_uuid(&row.try_get::<String, _>("workspace_id")?)?,
                    unique_key: row.try_get("unique_key")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
            let missing = match_inserted(jobs, &pending, returned, &mut result, &mut seen)?;
            if missing.is_empty() {
                pending.clear();
                break;
            }
            let keys: Vec<serde_json::Value> = missing
                .iter()
                .map(|&i| json!([jobs[i].workspace_id.to_string(), jobs[i].unique_key]))
                .collect();
            let held = sqlx::query(
                "SELECT id, workspace_id, unique_key FROM herald_jobs
                  WHERE (workspace_id, unique_key) IN
                        (SELECT value->>0, value->>1 FROM json_each(?1))",
            )
            .bind(serde_json::Value::Array(keys).to_string())
            .fetch_all(&mut *tx)
            .await?;
            let mut holders = HashMap::new();
            for row in held {
                holders.insert(
                    (
                        parse_uuid(&row.try_get::<String, _>("workspace_id")?)?,
                        row.try_get("unique_key")?,
                    ),
                    row.try_get("id")?,
                );
            }
            pending = match_holders(jobs, missing, &holders, &mut result);
        }
        finish_enqueue(result, &pending)
    }

    /// [`SqliteStore::finalize`] for running claims that completed without a new error: each
    /// row travels as `[id << 16 | attempt, finished_at]`.
    async fn finalize_completed(&self, rows: &[Finalize]) -> Result<Vec<(String, bool)>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let packed: Vec<[i64; 2]> = rows.iter().map(|r| [pack(r), to_micros(r.at)]).collect();
        let packed = serde_json::to_string(&packed).unwrap_or_else(|_| "[]".into());
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO herald_jobs_done (id, workspace_id, kind, queue, payload, priority, state,
                run_at, created_at, attempt, max_attempts, attempted_at, attempted_by,
                finalized_at, errors, unique_key, rate_key, ordering_key)
             SELECT j.id, j.workspace_id, j.kind, j.queue, j.payload, j.priority, 'completed',
                j.run_at, j.created_at, j.attempt, j.max_attempts, j.attempted_at, j.attempted_by,
                c.at, j.errors, j.unique_key, j.rate_key, j.ordering_key
               FROM (SELECT value->>0 AS p, value->>1 AS at FROM json_each(?1)) AS c
               JOIN herald_jobs j ON j.id = (c.p >> 16)
              WHERE j.state = 'running' AND j.attempt = (c.p & 65535)",
        )
        .bind(&packed)
        .execute(&mut *tx)
        .await?;
        let moved = sqlx::query(
            "DELETE FROM herald_jobs WHERE id IN (
                SELECT j.id FROM (SELECT value->>0 AS p FROM json_each(?1)) AS c
                  JOIN herald_jobs j ON j.id = (c.p >> 16)
                 WHERE j.state = 'running' AND j.attempt = (c.p & 65535))
             RETURNING queue, ordering_key IS NOT NULL AS ordered",
        )
        .bind(&packed)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        moved
            .into_iter()
            .map(|r| Ok((r.try_get("queue")?, r.try_get("ordered")?)))
            .collect()
    }

    /// Moves jobs to the archive in their final state if they are still in one of `from` states
    /// (and at the given attempt). Returns (queue, has ordering key) of each job moved.
    async fn finalize(&self, rows: &[Finalize], from: &[&str]) -> Result<Vec<(String, bool)>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let batch: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| json!([r.id, r.attempt, r.state.as_str(), r.errors, to_micros(r.at)]))
            .collect();
        let batch = serde_json::Value::Array(batch).to_string();
        let from = serde_json::to_string(from).unwrap_or_else(|_| "[]".into());
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO herald_jobs_done (id, workspace_id, kind, queue, payload, priority, state,
                run_at, created_at, attempt, max_attempts, attempted_at, attempted_by,
                finalized_at, errors, unique_key, rate_key, ordering_key)
             SELECT j.id, j.workspace_id, j.kind, j.queue, j.payload, j.priority, c.value->>2,
                j.run_at, j.created_at, j.attempt, j.max_attempts, j.attempted_at, j.attempted_by,
                c.value->>4, COALESCE(c.value->>3, j.errors), j.unique_key, j.rate_key,
                j.ordering_key
               FROM json_each(?1) AS c JOIN herald_jobs j ON j.id = c.value->>0
              WHERE j.state IN (SELECT value FROM json_each(?2))
                AND (c.value->>1 IS NULL OR j.attempt = c.value->>1)",
        )
        .bind(&batch)
        .bind(&from)
        .execute(&mut *tx)
        .await?;
        let moved = sqlx::query(
            "DELETE FROM herald_jobs WHERE id IN (
                SELECT j.id FROM json_each(?1) AS c JOIN herald_jobs j ON j.id = c.value->>0
                 WHERE j.state IN (SELECT value FROM json_each(?2))
                   AND (c.value->>1 IS NULL OR j.attempt = c.value->>1))
             RETURNING queue, ordering_key IS NOT NULL AS ordered",
        )
        .bind(&batch)
        .bind(&from)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        moved
            .into_iter()
            .map(|r| Ok((r.try_get("queue")?, r.try_get("ordered")?)))
            .collect()
    }
}

/// Ids below 2^47 and attempts below 2^16 pack into one integer (`id << 16 | attempt`), which
/// SQLite unpacks with shifts instead of parsing a JSON array per row.
fn packable(f: &Finalize) -> bool {
    f.id >= 0 && f.id < (1 << 47) && f.attempt.is_some_and(|a| (0..1 << 16).contains(&a))
}

fn pack(f: &Finalize) -> i64 {
    (f.id << 16) | i64::from(f.attempt.unwrap_or(0))
}

fn parse_uuid(s: &str) -> Result<Uuid> {
    Uuid::parse_str(s).map_err(|e| StoreError::Corrupt(format!("workspace id {s:?}: {e}")))
}

fn job_from_row(row: &SqliteRow, claim: Option<&ClaimInfo>) -> Result<Job> {
    let state: String = match claim {
        Some(_) => "running".to_owned(),
        None => row.try_get("state")?,
    };
    let payload: String = row.try_get("payload")?;
    let errors: String = row.try_get("errors")?;
    let opt_time = |col: &str| -> Result<Option<DateTime<Utc>>> {
        Ok(row.try_get::<Option<i64>, _>(col)?.map(from_micros))
    };
    Ok(Job {
        id: row.try_get("id")?,
        workspace_id: parse_uuid(&row.try_get::<String, _>("workspace_id")?)?,
        kind: row.try_get("kind")?,
        queue: row.try_get("queue")?,
        payload: serde_json::from_str(&payload)
            .map_err(|e| StoreError::Corrupt(format!("payload: {e}")))?,
        priority: row.try_get("priority")?,
        state: parse_state(&state)?,
        run_at: from_micros(row.try_get("run_at")?),
        created_at: from_micros(row.try_get("created_at")?),
        attempt: row.try_get("attempt")?,
        max_attempts: row.try_get("max_attempts")?,
        attempted_at: match claim {
            Some(c) => Some(c.now),
            None => opt_time("attempted_at")?,
        },
        attempted_by: match claim {
            Some(c) => Some(c.worker.to_owned()),
            None => row.try_get("attempted_by")?,
        },
        lease_expires_at: match claim {
            Some(c) => Some(c.lease_until),
            None => opt_time("lease_expires_at")?,
        },
        finalized_at: match claim {
            Some(_) => None,
            None => opt_time("finalized_at")?,
        },
        errors: serde_json::from_str(&errors)
            .map_err(|e| StoreError::Corrupt(format!("errors: {e}")))?,
        unique_key: row.try_get("unique_key")?,
        rate_key: row.try_get("rate_key")?,
        ordering_key: row.try_get("ordering_key")?,
    })
}

fn claims_json(claims: &[(JobId, i32)]) -> String {
    serde_json::to_string(claims).unwrap_or_else(|_| "[]".into())
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    fn delivery(&self) -> &dyn crate::delivery::DeliveryStore {
        self
    }

    fn inbox(&self) -> &dyn crate::inbox::InboxStore {
        self
    }

    fn tenancy(&self) -> &dyn crate::tenancy::TenancyStore {
        self
    }

    fn contacts(&self) -> &dyn crate::contacts::ContactStore {
        self
    }

    fn templates(&self) -> &dyn crate::templates::TemplateStore {
        self
    }

    fn wakeups(&self) -> &Wakeups {
        &self.wakeups
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn migrate(&self) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        // Takes the write lock at once, so two processes starting together migrate one by one.
        (&mut *conn).execute("BEGIN IMMEDIATE").await?;
        let result: Result<()> = async {
            (&mut *conn)
                .execute(
                    "CREATE TABLE IF NOT EXISTS herald_migrations (
                    version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
                )
                .await?;
            let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM herald_migrations")
                .fetch_all(&mut *conn)
                .await?;
            for m in migrate::SQLITE {
                if applied.contains(&m.version) {
                    continue;
                }
                (&mut *conn)
                    .execute(m.sql)
                    .await
                    .map_err(|source| StoreError::Migration {
                        version: m.version,
                        source,
                    })?;
                sqlx::query(
                    "INSERT INTO herald_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
                )
                .bind(m.version)
                .bind(m.name)
                .bind(to_micros(Utc::now()))
                .execute(&mut *conn)
                .await?;
                info!(version = m.version, name = m.name, "applied migration");
            }
            Ok(())
        }
        .await;
        let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
        (&mut *conn).execute(end).await?;
        result
    }

    async fn enqueue_many(&self, jobs: &[NewJob], now: DateTime<Utc>) -> Result<Vec<Enqueued>> {
        for job in jobs {
            job.validate()?;
        }
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::with_capacity(jobs.len());
        for chunk in jobs.chunks(BULK_CHUNK) {
            out.extend(self.insert_chunk(&mut tx, chunk, now).await?);
        }
        tx.commit().await?;
        for p in notify_payloads(jobs.iter().zip(&out), now) {
            self.wakeups.apply_payload(&p);
        }
        Ok(out)
    }

    async fn claim(
        &self,
        queue: &str,
        worker: &str,
        limit: usize,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<Job>> {
        self.claim_where(queue, None, worker, limit, now, lease_until)
            .await
    }

    /// One scoped claim per key, then the claimed send jobs' sends are begun in one more
    /// statement (PostgreSQL does both in one; in-process, SQLite gains nothing from that).
    async fn claim_keys(
        &self,
        queue: &str,
        keys: &[KeyClaim<'_>],
        worker: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<Job>> {
        let started = std::time::Instant::now();
        let jobs =
            super::claim_keys_one_by_one(self, queue, keys, worker, now, lease_until).await?;
        let sends = crate::delivery::claimed_sends(&jobs);
        if !sends.is_empty() {
            let ids: Vec<Uuid> = sends.iter().map(|s| s.0).collect();
            match crate::delivery::DeliveryStore::begin_sends(self, &ids, now).await {
                Ok(begun) => {
                    let jobs_of: HashMap<Uuid, JobId> = sends.into_iter().collect();
                    self.begun.park(
                        now,
                        started,
                        (lease_until - now).to_std().unwrap_or_default(),
                        begun.into_iter().filter_map(|send| {
                            let job = *jobs_of.get(&send.id)?;
                            Some((send, job))
                        }),
                    );
                }
                // The jobs are claimed all the same. A send that was begun all the same (the
                // statement committed) is recognised by its worker (`begun_by_claim`).
                Err(e) => tracing::warn!(error = %e, "claim: beginning the claimed sends failed"),
            }
        }
        Ok(jobs)
    }

    async fn claim_scoped(
        &self,
        queue: &str,
        scope: RateScope<'_>,
        worker: &str,
        limit: usize,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<Job>> {
        self.claim_where(queue, Some(scope), worker, limit, now, lease_until)
            .await
    }

    async fn ready_rate_keys(
        &self,
        queue: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "WITH RECURSIVE k(rate_key) AS (
                SELECT (SELECT min(rate_key) FROM herald_jobs
                         WHERE queue = ?1 AND state = 'available' AND rate_key > ?2)
                UNION ALL
                SELECT (SELECT min(rate_key) FROM herald_jobs
                         WHERE queue = ?1 AND state = 'available' AND rate_key > k.rate_key)
                  FROM k WHERE k.rate_key IS NOT NULL)
            SELECT rate_key FROM k WHERE rate_key IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM herald_paused_queues p WHERE p.queue = ?1)
             LIMIT ?3",
        )
        .bind(queue)
        .bind(after.unwrap_or(""))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn complete(&self, completions: &[Completion]) -> Result<u64> {
        // The effects first, so that no job is completed without them: Meta has these
        // messages, whatever becomes of the jobs.
        let (accepted, accepted_at) = accepted_sends(completions);
        crate::delivery::DeliveryStore::accept_sends(self, &accepted, accepted_at).await?;
        let (finals, again) = split_completions(completions);
        let again: Vec<serde_json::Value> = again
            .into_iter()
            .map(|r| {
                json!([
                    r.id,
                    r.attempt,
                    r.state,
                    to_micros(r.run_at),
                    r.uncount,
                    r.errors
                ])
            })
            .collect();
        let mut changed = 0;
        let mut wake: BTreeMap<String, Option<DateTime<Utc>>> = BTreeMap::new();
        // Plain successes (the bulk of the traffic) travel as one packed integer each.
        let (plain, finals): (Vec<Finalize>, Vec<Finalize>) = finals
            .into_iter()
            .partition(|f| f.state == JobState::Completed && f.errors.is_none() && packable(f));
        for (queue, ordered) in self.finalize_completed(&plain).await? {
            changed += 1;
            if ordered {
                wake.insert(queue, None);
            }
        }
        for (queue, ordered) in self.finalize(&finals, &["running"]).await? {
            changed += 1;
            if ordered {
                wake.insert(queue, None);
            }
        }
        if !again.is_empty() {
            let rows = sqlx::query(
                "UPDATE herald_jobs SET state = c.value->>2, run_at = c.value->>3,
                        attempt = herald_jobs.attempt - (c.value->>4), lease_expires_at = NULL,
                        errors = COALESCE(c.value->>5, herald_jobs.errors)
                   FROM json_each(?1) AS c
                  WHERE herald_jobs.id = c.value->>0 AND herald_jobs.attempt = c.value->>1
                    AND herald_jobs.state = 'running'
                 RETURNING queue, state, run_at, ordering_key IS NOT NULL AS ordered",
            )
            .bind(serde_json::Value::Array(again).to_string())
            .fetch_all(&self.pool)
            .await?;
            for row in rows {
                changed += 1;
                let queue: String = row.try_get("queue")?;
                let state: String = row.try_get("state")?;
                let ordered: bool = row.try_get("ordered")?;
                let at = from_micros(row.try_get("run_at")?);
                let due = state == "available" || ordered;
                let entry = wake
                    .entry(queue)
                    .or_insert(if due { None } else { Some(at) });
                *entry = match (*entry, due) {
                    (Some(cur), false) => Some(cur.min(at)),
                    _ => None,
                };
            }
        }
        for (queue, at) in wake {
            match at {
                None => self.wakeups.due(&queue),
                Some(at) => self.wakeups.scheduled(&queue, at),
            }
        }
        Ok(changed)
    }

    async fn heartbeat(&self, claims: &[(JobId, i32)], lease_until: DateTime<Utc>) -> Result<u64> {
        if claims.is_empty() {
            return Ok(0);
        }
        let done = sqlx::query(
            "UPDATE herald_jobs SET lease_expires_at = ?2
               FROM json_each(?1) AS c
              WHERE herald_jobs.id = c.value->>0 AND herald_jobs.attempt = c.value->>1
                AND herald_jobs.state = 'running'",
        )
        .bind(claims_json(claims))
        .bind(to_micros(lease_until))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn release(&self, claims: &[(JobId, i32)], _now: DateTime<Utc>) -> Result<u64> {
        if claims.is_empty() {
            return Ok(0);
        }
        let rows = sqlx::query(
            "UPDATE herald_jobs SET state = 'available', attempt = herald_jobs.attempt - 1,
                    lease_expires_at = NULL
               FROM json_each(?1) AS c
              WHERE herald_jobs.id = c.value->>0 AND herald_jobs.attempt = c.value->>1
                AND herald_jobs.state = 'running'
             RETURNING queue",
        )
        .bind(claims_json(claims))
        .fetch_all(&self.pool)
        .await?;
        let queues: HashSet<String> = rows
            .iter()
            .map(|r| r.try_get("queue"))
            .collect::<Result<_, _>>()?;
        for q in &queues {
            self.wakeups.due(q);
        }
        Ok(rows.len() as u64)
    }

    async fn promote(&self, queue: &str, now: DateTime<Utc>) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE herald_jobs SET state = 'available'
              WHERE queue = ?1 AND state IN ('scheduled', 'retryable') AND run_at <= ?2",
        )
        .bind(queue)
        .bind(to_micros(now))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn next_due(&self, queue: &str) -> Result<Option<DateTime<Utc>>> {
        let m: Option<i64> = sqlx::query_scalar(
            "SELECT min(run_at) FROM herald_jobs
              WHERE queue = ?1 AND state IN ('scheduled', 'retryable')",
        )
        .bind(queue)
        .fetch_one(&self.pool)
        .await?;
        Ok(m.map(from_micros))
    }

    async fn expired(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<Job>> {
        let rows = sqlx::query(&format!(
            "SELECT {HOT_COLUMNS} FROM herald_jobs
              WHERE state = 'running' AND lease_expires_at < ?1
              ORDER BY lease_expires_at LIMIT ?2"
        ))
        .bind(to_micros(now))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| job_from_row(r, None)).collect()
    }

    async fn prune(
        &self,
        completed_before: DateTime<Utc>,
        others_before: DateTime<Utc>,
        limit: usize,
    ) -> Result<u64> {
        let (c, o) = (to_micros(completed_before), to_micros(others_before));
        let done = sqlx::query(
            "DELETE FROM herald_jobs_done WHERE id IN (
                SELECT id FROM herald_jobs_done
                 WHERE finalized_at < max(?1, ?2)
                   AND ((state = 'completed' AND finalized_at < ?1)
                     OR (state <> 'completed' AND finalized_at < ?2))
                 LIMIT ?3)",
        )
        .bind(c)
        .bind(o)
        .bind(limit as i64)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn vacuum_hot(&self, _dead_rows: u64) -> Result<bool> {
        Ok(false)
    }

    async fn try_lead(
        &self,
        name: &str,
        leader: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool> {
        let row: Option<String> = sqlx::query_scalar(
            "INSERT INTO herald_leaders (name, leader_id, expires_at) VALUES (?1, ?2, ?4)
             ON CONFLICT (name) DO UPDATE SET leader_id = excluded.leader_id,
                    expires_at = excluded.expires_at
              WHERE herald_leaders.leader_id = excluded.leader_id
                 OR herald_leaders.expires_at < ?3
             RETURNING leader_id",
        )
        .bind(name)
        .bind(leader)
        .bind(to_micros(now))
        .bind(to_micros(until))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_deref() == Some(leader))
    }

    async fn resign(&self, name: &str, leader: &str) -> Result<()> {
        sqlx::query("DELETE FROM herald_leaders WHERE name = ?1 AND leader_id = ?2")
            .bind(name)
            .bind(leader)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn announce_fallback(
        &self,
        process_id: &str,
        period: u64,
        share: f64,
        ttl: Duration,
    ) -> Result<()> {
        let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
        let until = Utc::now()
            .checked_add_signed(ttl)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        sqlx::query(
            "INSERT INTO herald_limiter_fallbacks (process_id, period, share, expires_at)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (process_id) DO UPDATE
                SET period = excluded.period, share = excluded.share,
                    expires_at = excluded.expires_at
              WHERE herald_limiter_fallbacks.period <= excluded.period",
        )
        .bind(process_id)
        .bind(i64::try_from(period).unwrap_or(i64::MAX))
        .bind(share)
        .bind(to_micros(until))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn withdraw_fallback(&self, process_id: &str, period: u64) -> Result<()> {
        sqlx::query(
            "DELETE FROM herald_limiter_fallbacks
              WHERE (process_id = ?1 AND period = ?2) OR expires_at < ?3",
        )
        .bind(process_id)
        .bind(i64::try_from(period).unwrap_or(i64::MAX))
        .bind(to_micros(Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn fallback_shares(&self, process_id: &str) -> Result<Fallbacks> {
        let (share, processes): (f64, i64) = sqlx::query_as(
            "SELECT COALESCE(SUM(share), 0.0), COUNT(*) FROM herald_limiter_fallbacks
              WHERE process_id <> ?1 AND expires_at > ?2",
        )
        .bind(process_id)
        .bind(to_micros(Utc::now()))
        .fetch_one(&self.pool)
        .await?;
        Ok(Fallbacks {
            share,
            processes: u32::try_from(processes).unwrap_or(u32::MAX),
        })
    }

    async fn get_job(&self, id: JobId) -> Result<Option<Job>> {
        let row = sqlx::query(&format!(
            "SELECT {HOT_COLUMNS} FROM herald_jobs WHERE id = ?1
             UNION ALL SELECT {DONE_COLUMNS} FROM herald_jobs_done WHERE id = ?1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(|r| job_from_row(r, None)).transpose()
    }

    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        let tables: &[(&str, &str)] = match filter.state {
            Some(s) if s.is_final() => &[("herald_jobs_done", DONE_COLUMNS)],
            Some(_) => &[("herald_jobs", HOT_COLUMNS)],
            None => &[
                ("herald_jobs", HOT_COLUMNS),
                ("herald_jobs_done", DONE_COLUMNS),
            ],
        };
        let limit = filter.limit.clamp(1, 1000);
        let mut qb: QueryBuilder<sqlx::Sqlite> = QueryBuilder::new("SELECT * FROM (");
        for (n, (table, columns)) in tables.iter().enumerate() {
            if n > 0 {
                qb.push(" UNION ALL ");
            }
            qb.push(format!(
                "SELECT * FROM (SELECT {columns} FROM {table} WHERE true"
            ));
            if let Some(w) = filter.workspace_id {
                qb.push(" AND workspace_id = ").push_bind(w.to_string());
            }
            if let Some(q) = &filter.queue {
                qb.push(" AND queue = ").push_bind(q.clone());
            }
            if let Some(s) = filter.state {
                qb.push(" AND state = ").push_bind(s.as_str());
            }
            if let Some(k) = &filter.kind {
                qb.push(" AND kind = ").push_bind(k.clone());
            }
            if let Some(after) = filter.after_id {
                qb.push(" AND id > ").push_bind(after);
            }
            qb.push(" ORDER BY id LIMIT ").push_bind(limit).push(")");
        }
        qb.push(") ORDER BY id LIMIT ").push_bind(limit);
        let rows = qb.build().fetch_all(&self.pool).await?;
        rows.iter().map(|r| job_from_row(r, None)).collect()
    }

    async fn retry_job(&self, id: JobId, now: DateTime<Utc>) -> Result<Option<Job>> {
        let mut tx = self.pool.begin().await?;
        let waiting: Option<String> = sqlx::query_scalar(
            "UPDATE herald_jobs SET state = 'available', run_at = ?2
              WHERE id = ?1 AND state IN ('scheduled', 'retryable') RETURNING queue",
        )
        .bind(id)
        .bind(to_micros(now))
        .fetch_optional(&mut *tx)
        .await?;
        let queue = match waiting {
            Some(q) => Some(q),
            None => {
                let moved: Option<String> = sqlx::query_scalar(
                    "INSERT INTO herald_jobs (id, workspace_id, kind, queue, payload, priority,
                        state, run_at, created_at, attempt, max_attempts, attempted_at,
                        attempted_by, errors, unique_key, rate_key, ordering_key)
                     SELECT id, workspace_id, kind, queue, payload, priority, 'available', ?2,
                        created_at, 0, max_attempts, attempted_at, attempted_by, errors,
                        unique_key, rate_key, ordering_key
                       FROM herald_jobs_done
                      WHERE id = ?1 AND state IN ('discarded', 'cancelled')
                     ON CONFLICT DO NOTHING
                     RETURNING queue",
                )
                .bind(id)
                .bind(to_micros(now))
                .fetch_optional(&mut *tx)
                .await?;
                if moved.is_some() {
                    sqlx::query("DELETE FROM herald_jobs_done WHERE id = ?1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
                moved
            }
        };
        tx.commit().await?;
        match queue {
            Some(q) => {
                self.wakeups.due(&q);
                self.get_job(id).await
            }
            None => Ok(None),
        }
    }

    async fn cancel_job(&self, id: JobId, now: DateTime<Utc>, reason: &str) -> Result<Option<Job>> {
        self.end_job(id, JobState::Cancelled, now, reason).await
    }

    async fn discard_job(
        &self,
        id: JobId,
        now: DateTime<Utc>,
        reason: &str,
    ) -> Result<Option<Job>> {
        self.end_job(id, JobState::Discarded, now, reason).await
    }

    async fn pause_queue(&self, queue: &str, reason: &str, now: DateTime<Utc>) -> Result<bool> {
        check_pause(queue, reason)?;
        let done = sqlx::query(
            "INSERT INTO herald_paused_queues (queue, paused_at, reason) VALUES (?1, ?2, ?3)
             ON CONFLICT (queue) DO NOTHING",
        )
        .bind(queue)
        .bind(to_micros(now))
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn resume_queue(&self, queue: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM herald_paused_queues WHERE queue = ?1")
            .bind(queue)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        self.wakeups.due(queue);
        Ok(true)
    }

    async fn paused_queues(&self) -> Result<Vec<PausedQueue>> {
        let rows =
            sqlx::query("SELECT queue, paused_at, reason FROM herald_paused_queues ORDER BY queue")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(PausedQueue {
                    queue: r.try_get("queue")?,
                    paused_at: from_micros(r.try_get("paused_at")?),
                    reason: r.try_get("reason")?,
                })
            })
            .collect()
    }

    async fn stats(&self) -> Result<Vec<QueueStat>> {
        let rows = sqlx::query(
            "SELECT queue, state, count(*) AS n FROM herald_jobs GROUP BY queue, state
             UNION ALL
             SELECT queue, state, count(*) AS n FROM herald_jobs_done GROUP BY queue, state
             ORDER BY 1, 2",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let state: String = r.try_get("state")?;
                Ok(QueueStat {
                    queue: r.try_get("queue")?,
                    state: parse_state(&state)?,
                    count: r.try_get("n")?,
                })
            })
            .collect()
    }

    async fn listen(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) -> Result<()> {
        // One process per file: every enqueue already pokes the in-process hub.
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
        Ok(())
    }
}
