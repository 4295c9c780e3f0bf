//! The PostgreSQL store: for production and for several processes on several machines.
//!
//! Claims use `FOR UPDATE SKIP LOCKED`, so any number of processes claim from one table without
//! blocking each other. Enqueues send one `NOTIFY` per queue per transaction (never per row);
//! [`PgStore::listen`] turns other processes' NOTIFYs into in-process wake-ups.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Executor, PgConnection, Postgres, QueryBuilder, Row};
use tracing::{info, warn};
use uuid::Uuid;

mod contacts;
mod delivery;
mod inbox;
mod templates;
mod tenancy;

use super::{
    accepted_sends, check_pause, finish_enqueue, match_holders, match_inserted, operator_final,
    parse_state, split_completions, Backend, ClaimInfo, Finalize, Inserted, KeyClaim, PausedQueue,
    RateScope, Store, CANCELLABLE, CLAIM_COLUMNS,
};
use crate::delivery::{SendStatus, SEND_KIND};
use crate::error::{Result, StoreError};
use crate::limit::Fallbacks;
use crate::migrate;
use crate::model::{
    AttemptError, Completion, Enqueued, Job, JobFilter, JobId, JobState, NewJob, QueueStat,
};
use crate::store::hot::{HotConfig, HotConns};
use crate::wakeup::{Due, Wakeups};

/// How to reach PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgStoreConfig {
    pub url: String,
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// Schema for Herald's tables; None uses the connection's default (normally `public`).
    pub schema: Option<String>,
    /// Encrypts channel secrets; without one, channels cannot be created or read.
    pub keyring: Option<std::sync::Arc<crate::crypto::Keyring>>,
}

/// Rows per INSERT statement in a bulk enqueue (the whole call is still one transaction).
const BULK_CHUNK: usize = 20_000;

const HOT_COLUMNS: &str = "id, workspace_id, kind, queue, payload, priority, state, run_at, \
     created_at, attempt, max_attempts, attempted_at, attempted_by, lease_expires_at, \
     NULL::timestamptz AS finalized_at, errors, unique_key, rate_key, ordering_key";
const DONE_COLUMNS: &str = "id, workspace_id, kind, queue, payload, priority, state, run_at, \
     created_at, attempt, max_attempts, attempted_at, attempted_by, \
     NULL::timestamptz AS lease_expires_at, finalized_at, errors, unique_key, rate_key, ordering_key";

pub struct PgStore {
    pool: PgPool,
    /// Connections kept between the statements that run for every job (see `hot.rs`).
    hot: HotConns<Postgres>,
    schema: Option<String>,
    /// NOTIFY channel; includes the schema so that deployments sharing a database do not wake
    /// each other.
    channel: String,
    wakeups: Wakeups,
    claim_sql: String,
    claim_unkeyed_sql: String,
    claim_keyed_sql: String,
    claim_keyed_capped_sql: String,
    claim_keys_sql: String,
    keyring: Option<std::sync::Arc<crate::crypto::Keyring>>,
    /// Sends the keyed claim began, until their workers take them.
    begun: crate::delivery::BegunSends,
}

/// What a claim statement returns: [`CLAIM_COLUMNS`] of the updated `herald_jobs` rows.
fn claim_returning() -> String {
    CLAIM_COLUMNS
        .split(", ")
        .map(|c| format!("herald_jobs.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The claim statement; `scope` narrows it to jobs without a rate key or of one key (`$6`).
fn claim_sql(scope: &str) -> String {
    let returning = claim_returning();
    format!(
        "WITH picked AS (
            SELECT id FROM herald_jobs j
             WHERE j.state = 'available' AND j.queue = $1 {scope}
               AND NOT EXISTS (SELECT 1 FROM herald_paused_queues p WHERE p.queue = $1)
               AND (j.ordering_key IS NULL OR NOT EXISTS (
                    SELECT 1 FROM herald_jobs o
                     WHERE o.workspace_id = j.workspace_id
                       AND o.ordering_key = j.ordering_key AND o.id < j.id))
             ORDER BY j.priority, j.run_at, j.id
             LIMIT $2
             FOR UPDATE SKIP LOCKED
         )
         UPDATE herald_jobs SET state = 'running', attempt = attempt + 1, attempted_at = $3,
                attempted_by = $4, lease_expires_at = $5
           FROM picked WHERE herald_jobs.id = picked.id
         RETURNING {returning}"
    )
}

/// `claim_keys`: the keyed claim of `claim_sql` once per `(rate_key, n, cap)` row of `$5`-`$7`,
/// in one statement. Each key's pick is its own LATERAL subquery, so it walks the same index
/// as a claim of that key alone and stops at its own limit.
///
/// The same statement begins the sends of the claimed send jobs (`$8` is the `sending` rank),
/// returned as `b_*` columns beside their jobs ([`crate::delivery::BegunSends`]); only a send's
/// own job (unique key `send:<id>`, [`crate::delivery::send_of_job`]) begins it. A send row
/// another statement holds is skipped, not waited for (its worker begins it), so the claim
/// never waits on herald_sends and takes its locks in id order like every writer of it. A
/// payload whose `send_id` is not a UUID begins nothing (the cast is guarded: one bad job
/// must not fail every claim).
fn claim_keys_sql() -> String {
    let returning = claim_returning();
    format!(
        "WITH {},
         claimed AS (
            UPDATE herald_jobs SET state = 'running', attempt = attempt + 1, attempted_at = $2,
                   attempted_by = $3, lease_expires_at = $4
              FROM picked WHERE herald_jobs.id = picked.id
            RETURNING {returning},
                   CASE WHEN herald_jobs.kind = '{SEND_KIND}'
                         AND herald_jobs.payload->>'send_id' ~* '{UUID_PATTERN}'
                         AND herald_jobs.unique_key
                             = 'send:' || (herald_jobs.payload->>'send_id')::uuid::text
                        THEN (herald_jobs.payload->>'send_id')::uuid END AS begin_send
         ),
         locked AS (
            SELECT id FROM herald_sends
             WHERE id = ANY(ARRAY(SELECT begin_send FROM claimed WHERE begin_send IS NOT NULL))
               AND status_rank = 0
             ORDER BY id FOR UPDATE SKIP LOCKED
         ),
         begun AS ({})
         SELECT claimed.*, begun.* FROM claimed LEFT JOIN begun ON begun.b_id = claimed.begin_send",
        claim_keys_pick(),
        delivery::begin_update("$2", "$8", &delivery::BEGUN_RETURNING),
    )
}

/// A UUID in text form, as serde writes one.
const UUID_PATTERN: &str = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$";

/// The `w` and `picked` CTEs of [`claim_keys_sql`].
fn claim_keys_pick() -> &'static str {
    "w AS (SELECT * FROM unnest($5::text[], $6::int8[], $7::int2[]) AS w(rate_key, n, cap)),
     picked AS (
        SELECT p.id FROM w CROSS JOIN LATERAL (
            SELECT j.id FROM herald_jobs j
             WHERE j.state = 'available' AND j.queue = $1
               AND j.rate_key = w.rate_key AND j.priority <= w.cap
               AND (j.ordering_key IS NULL OR NOT EXISTS (
                    SELECT 1 FROM herald_jobs o
                     WHERE o.workspace_id = j.workspace_id
                       AND o.ordering_key = j.ordering_key AND o.id < j.id))
             ORDER BY j.priority, j.run_at, j.id
             LIMIT w.n
             FOR UPDATE SKIP LOCKED) p
         WHERE NOT EXISTS (SELECT 1 FROM herald_paused_queues q WHERE q.queue = $1)
     )"
}

/// The jobs of a claim statement's rows, most urgent first.
fn claimed_jobs(
    rows: &[PgRow],
    worker: &str,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
) -> Result<Vec<Job>> {
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

/// A loose index scan over `herald_jobs_claim_rated`: each step jumps to the next distinct key.
const READY_KEYS_SQL_PG: &str = "WITH RECURSIVE k(rate_key) AS (
        SELECT (SELECT min(rate_key) FROM herald_jobs
                 WHERE queue = $1 AND state = 'available' AND rate_key > $2)
        UNION ALL
        SELECT (SELECT min(rate_key) FROM herald_jobs
                 WHERE queue = $1 AND state = 'available' AND rate_key > k.rate_key)
          FROM k WHERE k.rate_key IS NOT NULL)
    SELECT rate_key FROM k WHERE rate_key IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM herald_paused_queues p WHERE p.queue = $1)
     LIMIT $3";

impl PgStore {
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

    pub async fn connect(config: &PgStoreConfig) -> Result<Self> {
        let mut options: PgConnectOptions = config.url.parse()?;
        options = options.application_name("herald");
        if let Some(schema) = &config.schema {
            validate_schema_name(schema)?;
            options = options.options([("search_path", schema.as_str())]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections.max(2))
            .acquire_timeout(config.acquire_timeout)
            // A ping before every acquire costs a round trip per statement; a broken connection
            // fails one statement instead, which the runtime retries.
            .test_before_acquire(false)
            .connect_lazy_with(options);
        let channel = match &config.schema {
            Some(schema) => format!("herald_jobs_{schema}"),
            None => "herald_jobs".to_owned(),
        };
        Ok(PgStore {
            hot: HotConns::new(
                pool.clone(),
                HotConfig::for_pool(config.max_connections.max(2)),
            ),
            pool,
            schema: config.schema.clone(),
            channel,
            wakeups: Wakeups::default(),
            claim_sql: claim_sql(""),
            claim_unkeyed_sql: claim_sql("AND j.rate_key IS NULL"),
            claim_keyed_sql: claim_sql("AND j.rate_key = $6"),
            claim_keyed_capped_sql: claim_sql("AND j.rate_key = $6 AND j.priority <= $7"),
            claim_keys_sql: claim_keys_sql(),
            keyring: config.keyring.clone(),
            begun: Default::default(),
        })
    }

    /// Runs one of the claim statements (`$6` is the rate key of a keyed claim).
    #[allow(clippy::too_many_arguments)]
    async fn claim_with(
        &self,
        sql: &str,
        key: Option<&str>,
        cap: Option<i16>,
        queue: &str,
        worker: &str,
        limit: usize,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<Job>> {
        let query = sqlx::query(sql)
            .bind(queue)
            .bind(limit as i64)
            .bind(now)
            .bind(worker)
            .bind(lease_until);
        let query = match key {
            Some(key) => query.bind(key),
            None => query,
        };
        let query = match cap {
            Some(cap) => query.bind(cap),
            None => query,
        };
        let mut conn = self.hot.lease().await?;
        let rows = query.fetch_all(&mut *conn).await?;
        conn.release();
        claimed_jobs(&rows, worker, now, lease_until)
    }

    /// The connection pool, for callers that enqueue inside their own transactions.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Enqueues inside the caller's transaction (or on any connection): the jobs exist if and
    /// only if the caller's transaction commits, and the wake-up NOTIFY is delivered on commit
    /// (to this process's producers too).
    pub async fn enqueue_in(
        &self,
        conn: &mut PgConnection,
        jobs: &[NewJob],
        now: DateTime<Utc>,
    ) -> Result<Vec<Enqueued>> {
        self.enqueue_notifying(conn, jobs, now, false).await
    }

    /// [`PgStore::enqueue_in`] for this store's own methods, which wake this process's
    /// producers themselves after the commit (`own`: the NOTIFY is tagged so its echo is
    /// ignored).
    async fn enqueue_notifying(
        &self,
        conn: &mut PgConnection,
        jobs: &[NewJob],
        now: DateTime<Utc>,
        own: bool,
    ) -> Result<Vec<Enqueued>> {
        for job in jobs {
            job.validate()?;
        }
        let mut out = Vec::with_capacity(jobs.len());
        for chunk in jobs.chunks(BULK_CHUNK) {
            out.extend(self.insert_chunk(conn, chunk, now).await?);
        }
        let mut payloads = notify_payloads(jobs.iter().zip(&out), now);
        if own {
            payloads = payloads.iter().map(|p| self.wakeups.tagged(p)).collect();
        }
        if !payloads.is_empty() {
            sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
                .bind(&self.channel)
                .bind(payloads)
                .execute(&mut *conn)
                .await?;
        }
        Ok(out)
    }

    async fn insert_chunk(
        &self,
        conn: &mut PgConnection,
        jobs: &[NewJob],
        now: DateTime<Utc>,
    ) -> Result<Vec<Enqueued>> {
        let mut result: Vec<Option<Enqueued>> = vec![None; jobs.len()];
        let mut seen = HashSet::new();
        // Rows still to insert; a unique-key row goes round again if the job holding its key
        // finished between our INSERT and our look-up.
        let mut pending: Vec<usize> = (0..jobs.len()).collect();
        for _round in 0..5 {
            if pending.is_empty() {
                break;
            }
            let returned = insert_rows(conn, jobs, &pending, now)
                .await?
                .iter()
                .map(|row| {
                    // A chunk without unique keys returns ids only (see `insert_rows`).
                    let keyed = row.len() > 1;
                    Ok(Inserted {
                        id: row.try_get("id")?,
                        workspace_id: if keyed {
                            row.try_get("workspace_id")?
                        } else {
                            Uuid::nil()
                        },
                        unique_key: if keyed {
                            row.try_get("unique_key")?
                        } else {
                            None
                        },
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let missing = match_inserted(jobs, &pending, returned, &mut result, &mut seen)?;
            if missing.is_empty() {
                pending.clear();
                break;
            }
            let workspaces: Vec<Uuid> = missing.iter().map(|&i| jobs[i].workspace_id).collect();
            let keys: Vec<Option<String>> = missing
                .iter()
                .map(|&i| jobs[i].unique_key.clone())
                .collect();
            let held = sqlx::query(
                "SELECT j.id, j.workspace_id, j.unique_key FROM herald_jobs j \
                 JOIN unnest($1::uuid[], $2::text[]) AS k(w, u) \
                   ON j.workspace_id = k.w AND j.unique_key = k.u",
            )
            .bind(workspaces)
            .bind(keys)
            .fetch_all(&mut *conn)
            .await?;
            let mut holders = HashMap::new();
            for row in held {
                holders.insert(
                    (row.try_get("workspace_id")?, row.try_get("unique_key")?),
                    row.try_get("id")?,
                );
            }
            pending = match_holders(jobs, missing, &holders, &mut result);
        }
        finish_enqueue(result, &pending)
    }

    /// Moves jobs to the archive in their final state, if they are still in one of `from` states
    /// (and at the given attempt, when one is given).
    async fn finalize(&self, rows: &[Finalize], from: &[&str]) -> Result<Vec<(String, bool)>> {
        self.finalize_accepting(rows, from, &[], Utc::now()).await
    }

    /// [`PgStore::finalize`], recording `accepted` sends (`accept_sends` at `accepted_at`) in
    /// the same statement: the send worker's completions carry Meta's message ids.
    async fn finalize_accepting(
        &self,
        rows: &[Finalize],
        from: &[&str],
        accepted: &[(Uuid, String)],
        accepted_at: DateTime<Utc>,
    ) -> Result<Vec<(String, bool)>> {
        if rows.is_empty() {
            if !accepted.is_empty() {
                crate::delivery::DeliveryStore::accept_sends(self, accepted, accepted_at).await?;
            }
            return Ok(Vec::new());
        }
        let from: Vec<String> = from.iter().map(|s| s.to_string()).collect();
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let attempts: Vec<Option<i32>> = rows.iter().map(|r| r.attempt).collect();
        let states: Vec<&str> = rows.iter().map(|r| r.state.as_str()).collect();
        let errors: Vec<Option<String>> = rows.iter().map(|r| r.errors.clone()).collect();
        let at: Vec<DateTime<Utc>> = rows.iter().map(|r| r.at).collect();
        let sql: &str = if accepted.is_empty() {
            &FINALIZE
        } else {
            &FINALIZE_ACCEPTING
        };
        let mut query = sqlx::query(sql)
            .bind(ids)
            .bind(attempts)
            .bind(states)
            .bind(errors)
            .bind(at)
            .bind(from);
        if !accepted.is_empty() {
            query = query
                .bind(accepted.iter().map(|a| a.0).collect::<Vec<_>>())
                .bind(accepted.iter().map(|a| a.1.as_str()).collect::<Vec<_>>())
                .bind(accepted_at)
                .bind(crate::delivery::SendStatus::Accepted.rank());
        }
        let mut conn = self.hot.lease().await?;
        let moved = query.fetch_all(&mut *conn).await?;
        conn.release();
        moved
            .into_iter()
            .map(|r| Ok((r.try_get("queue")?, r.try_get("ordered")?)))
            .collect()
    }

    /// Wakes producers, here and (through NOTIFY) in other processes.
    async fn notify(&self, payloads: Vec<String>) -> Result<()> {
        if payloads.is_empty() {
            return Ok(());
        }
        for p in &payloads {
            self.wakeups.apply_payload(p);
        }
        let tagged: Vec<String> = payloads.iter().map(|p| self.wakeups.tagged(p)).collect();
        let mut conn = self.hot.lease().await?;
        sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
            .bind(&self.channel)
            .bind(tagged)
            .execute(&mut *conn)
            .await?;
        conn.release();
        Ok(())
    }
}

async fn migrate_in(conn: &mut PgConnection, schema: Option<&str>) -> Result<()> {
    // One process migrates at a time; the others wait here, then find nothing to do.
    let lock_name = format!("herald_migrate:{}", schema.unwrap_or(""));
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(lock_name)
        .execute(&mut *conn)
        .await?;
    if let Some(schema) = schema {
        let create = format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"");
        conn.execute(create.as_str()).await?;
    }
    conn.execute(
        "CREATE TABLE IF NOT EXISTS herald_migrations (
            version bigint PRIMARY KEY, name text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM herald_migrations")
        .fetch_all(&mut *conn)
        .await?;
    for m in migrate::POSTGRES {
        if applied.contains(&m.version) {
            continue;
        }
        if let Err(source) = conn.execute(m.sql).await {
            return Err(StoreError::Migration {
                version: m.version,
                source,
            });
        }
        sqlx::query("INSERT INTO herald_migrations (version, name) VALUES ($1, $2)")
            .bind(m.version)
            .bind(m.name)
            .execute(&mut *conn)
            .await?;
        info!(version = m.version, name = m.name, "applied migration");
    }
    Ok(())
}

fn validate_schema_name(schema: &str) -> Result<()> {
    let ok = !schema.is_empty()
        && schema.len() <= 63
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !schema.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(crate::model::InvalidJob(format!(
            "schema name {schema:?} must be lowercase letters, digits and underscores"
        ))))
    }
}

fn insert_sql(on_conflict: &str, returning: &str) -> String {
    format!(
        "INSERT INTO herald_jobs (workspace_id, kind, queue, payload, priority, state, run_at,
            created_at, max_attempts, unique_key, rate_key, ordering_key)
         SELECT w, k, q, p::json, pr, s, r, $12, m, u, rk, o
           FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::smallint[],
                       $6::text[], $7::timestamptz[], $8::int[], $9::text[], $10::text[],
                       $11::text[])
                WITH ORDINALITY AS t(w, k, q, p, pr, s, r, m, u, rk, o, ord)
          ORDER BY ord
         {on_conflict}
         RETURNING {returning}"
    )
}

static INSERT_UNIQUE: LazyLock<String> = LazyLock::new(|| {
    insert_sql(
        "ON CONFLICT (workspace_id, unique_key) WHERE unique_key IS NOT NULL DO NOTHING",
        "id, workspace_id, unique_key",
    )
});
static INSERT_PLAIN: LazyLock<String> = LazyLock::new(|| insert_sql("", "id"));

async fn insert_rows(
    conn: &mut PgConnection,
    jobs: &[NewJob],
    pick: &[usize],
    now: DateTime<Utc>,
) -> Result<Vec<PgRow>> {
    let n = pick.len();
    let mut workspace = Vec::with_capacity(n);
    let mut kind = Vec::with_capacity(n);
    let mut queue = Vec::with_capacity(n);
    let mut payload = Vec::with_capacity(n);
    let mut priority = Vec::with_capacity(n);
    let mut state = Vec::with_capacity(n);
    let mut run_at = Vec::with_capacity(n);
    let mut max_attempts = Vec::with_capacity(n);
    let mut unique_key = Vec::with_capacity(n);
    let mut rate_key = Vec::with_capacity(n);
    let mut ordering_key = Vec::with_capacity(n);
    for &i in pick {
        let job = &jobs[i];
        let at = job.run_at.unwrap_or(now);
        workspace.push(job.workspace_id);
        kind.push(job.kind.as_str());
        queue.push(job.queue.as_str());
        payload.push(job.payload.to_string());
        priority.push(job.priority);
        state.push(if at <= now { "available" } else { "scheduled" });
        run_at.push(at);
        max_attempts.push(job.max_attempts);
        unique_key.push(job.unique_key.as_deref());
        rate_key.push(job.rate_key.as_deref());
        ordering_key.push(job.ordering_key.as_deref());
    }
    // ON CONFLICT makes every row a speculative insertion; rows without unique keys cannot
    // conflict, so a chunk without any skips it (the common bulk case, much cheaper).
    let any_unique = unique_key.iter().any(Option::is_some);
    let sql = if any_unique {
        &*INSERT_UNIQUE
    } else {
        &*INSERT_PLAIN
    };
    let rows = sqlx::query(sql)
        .bind(workspace)
        .bind(kind)
        .bind(queue)
        .bind(payload)
        .bind(priority)
        .bind(state)
        .bind(run_at)
        .bind(max_attempts)
        .bind(unique_key)
        .bind(rate_key)
        .bind(ordering_key)
        .bind(now)
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows)
}

/// One wake-up payload per queue for the jobs actually inserted: "due now" if any is due, else
/// the earliest scheduled time.
pub(crate) fn notify_payloads<'a>(
    jobs: impl Iterator<Item = (&'a NewJob, &'a Enqueued)>,
    now: DateTime<Utc>,
) -> Vec<String> {
    // Per queue: the earliest scheduled time, and which jobs are due now.
    let mut per_queue: BTreeMap<&str, (Option<DateTime<Utc>>, Due)> = BTreeMap::new();
    for (job, enq) in jobs {
        if !enq.inserted {
            continue;
        }
        let (earliest, due) = per_queue.entry(job.queue.as_str()).or_insert((
            None,
            Due {
                unkeyed: false,
                keyed: false,
            },
        ));
        match job.run_at.filter(|at| *at > now) {
            Some(at) => *earliest = Some(earliest.map_or(at, |e| e.min(at))),
            None if job.rate_key.is_some() => due.keyed = true,
            None => due.unkeyed = true,
        }
    }
    per_queue
        .into_iter()
        .map(|(q, (earliest, due))| {
            if due.keyed || due.unkeyed {
                Wakeups::due_payload(q, due)
            } else {
                Wakeups::payload(q, earliest)
            }
        })
        .collect()
}

fn job_from_row(row: &PgRow, claim: Option<&ClaimInfo>) -> Result<Job> {
    let state: String = match claim {
        Some(_) => "running".to_owned(),
        None => row.try_get("state")?,
    };
    let errors: sqlx::types::Json<Vec<AttemptError>> = row.try_get("errors")?;
    Ok(Job {
        id: row.try_get("id")?,
        workspace_id: row.try_get("workspace_id")?,
        kind: row.try_get("kind")?,
        queue: row.try_get("queue")?,
        payload: row
            .try_get::<sqlx::types::Json<serde_json::Value>, _>("payload")?
            .0,
        priority: row.try_get("priority")?,
        state: parse_state(&state)?,
        run_at: row.try_get("run_at")?,
        created_at: row.try_get("created_at")?,
        attempt: row.try_get("attempt")?,
        max_attempts: row.try_get("max_attempts")?,
        attempted_at: match claim {
            Some(c) => Some(c.now),
            None => row.try_get("attempted_at")?,
        },
        attempted_by: match claim {
            Some(c) => Some(c.worker.to_owned()),
            None => row.try_get("attempted_by")?,
        },
        lease_expires_at: match claim {
            Some(c) => Some(c.lease_until),
            None => row.try_get("lease_expires_at")?,
        },
        finalized_at: match claim {
            Some(_) => None,
            None => row.try_get("finalized_at")?,
        },
        errors: errors.0,
        unique_key: row.try_get("unique_key")?,
        rate_key: row.try_get("rate_key")?,
        ordering_key: row.try_get("ordering_key")?,
    })
}

/// The CTEs of `finalize`: the rows ($1-$5: id, attempt, state, errors, time) and the jobs
/// deleted from herald_jobs if still in one of the states $6 (at the attempt, when given).
const FINALIZE_CTES: &str = "c AS (
        SELECT * FROM unnest($1::bigint[], $2::int[], $3::text[], $4::text[], $5::timestamptz[])
          AS c(id, attempt, state, errors, at)
     ), d AS (
        DELETE FROM herald_jobs j USING c
         WHERE j.id = c.id AND j.state = ANY($6::text[])
           AND (c.attempt IS NULL OR j.attempt = c.attempt)
        RETURNING j.*, c.state AS new_state, c.errors AS new_errors, c.at AS fin
     )";

/// `finalize`'s main query: the deleted jobs into the archive.
const FINALIZE_INSERT: &str = "INSERT INTO herald_jobs_done (id, workspace_id, kind, queue,
        payload, priority, state, run_at, created_at, attempt, max_attempts, attempted_at,
        attempted_by, finalized_at, errors, unique_key, rate_key, ordering_key)
     SELECT id, workspace_id, kind, queue, payload, priority, new_state, run_at,
        created_at, attempt, max_attempts, attempted_at, attempted_by, fin,
        COALESCE(new_errors::jsonb, errors), unique_key, rate_key, ordering_key
       FROM d
     RETURNING queue, ordering_key IS NOT NULL AS ordered";

static FINALIZE: LazyLock<String> =
    LazyLock::new(|| format!("WITH {FINALIZE_CTES} {FINALIZE_INSERT}"));

/// `finalize` with `accept_sends` as a data-modifying CTE ($7 send ids, $8 Meta's ids, $9 the
/// time, $10 the accepted rank), which PostgreSQL runs whether or not the jobs are still
/// theirs to finalize.
static FINALIZE_ACCEPTING: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH {FINALIZE_CTES}, {}, accepted AS ({}) {FINALIZE_INSERT}",
        delivery::accept_ctes("$7", "$8"),
        delivery::accept_update("$9", "$10")
    )
});

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> Backend {
        Backend::Postgres
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
        (&mut *conn).execute("BEGIN").await?;
        let result = migrate_in(&mut conn, self.schema.as_deref()).await;
        let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
        (&mut *conn).execute(end).await?;
        result
    }

    async fn enqueue_many(&self, jobs: &[NewJob], now: DateTime<Utc>) -> Result<Vec<Enqueued>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        let out = self.enqueue_notifying(&mut tx, jobs, now, true).await?;
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
        self.claim_with(
            &self.claim_sql,
            None,
            None,
            queue,
            worker,
            limit,
            now,
            lease_until,
        )
        .await
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
        let (sql, key, cap) = match scope {
            RateScope::Unlimited => (&self.claim_unkeyed_sql, None, None),
            RateScope::Key(key) => (&self.claim_keyed_sql, Some(key), None),
            RateScope::KeyUpTo(key, cap) => (&self.claim_keyed_capped_sql, Some(key), Some(cap)),
        };
        self.claim_with(sql, key, cap, queue, worker, limit, now, lease_until)
            .await
    }

    async fn claim_keys(
        &self,
        queue: &str,
        keys: &[KeyClaim<'_>],
        worker: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<Job>> {
        let keys: Vec<&KeyClaim<'_>> = keys.iter().filter(|k| k.limit > 0).collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let started = std::time::Instant::now();
        let mut conn = self.hot.lease().await?;
        let rows = sqlx::query(&self.claim_keys_sql)
            .bind(queue)
            .bind(now)
            .bind(worker)
            .bind(lease_until)
            .bind(keys.iter().map(|k| k.key).collect::<Vec<_>>())
            .bind(keys.iter().map(|k| k.limit as i64).collect::<Vec<_>>())
            .bind(
                keys.iter()
                    .map(|k| k.max_priority.unwrap_or(i16::MAX))
                    .collect::<Vec<_>>(),
            )
            .bind(SendStatus::Sending.rank())
            .fetch_all(&mut *conn)
            .await?;
        conn.release();
        self.begun.park(
            now,
            started,
            (lease_until - now).to_std().unwrap_or_default(),
            delivery::begun_from_rows(&rows),
        );
        claimed_jobs(&rows, worker, now, lease_until)
    }

    async fn ready_rate_keys(
        &self,
        queue: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>> {
        let mut conn = self.hot.lease().await?;
        let keys = sqlx::query_scalar(READY_KEYS_SQL_PG)
            .bind(queue)
            .bind(after.unwrap_or(""))
            .bind(limit as i64)
            .fetch_all(&mut *conn)
            .await?;
        conn.release();
        Ok(keys)
    }

    async fn complete(&self, completions: &[Completion]) -> Result<u64> {
        let (finals, again) = split_completions(completions);
        let (accepted, accepted_at) = accepted_sends(completions);
        let mut changed = 0;
        let mut payloads = BTreeMap::new();
        for (queue, ordered) in self
            .finalize_accepting(&finals, &["running"], &accepted, accepted_at)
            .await?
        {
            changed += 1;
            if ordered {
                payloads.insert(Wakeups::payload(&queue, None), ());
            }
        }
        if !again.is_empty() {
            let ids: Vec<i64> = again.iter().map(|r| r.id).collect();
            let attempts: Vec<i32> = again.iter().map(|r| r.attempt).collect();
            let states: Vec<&str> = again.iter().map(|r| r.state).collect();
            let run_ats: Vec<DateTime<Utc>> = again.iter().map(|r| r.run_at).collect();
            let uncount: Vec<i32> = again.iter().map(|r| r.uncount).collect();
            let errors: Vec<Option<String>> = again.iter().map(|r| r.errors.clone()).collect();
            let mut conn = self.hot.lease().await?;
            let rows = sqlx::query(
                "UPDATE herald_jobs j SET state = c.state, run_at = c.run_at,
                        attempt = j.attempt - c.uncount, lease_expires_at = NULL,
                        errors = COALESCE(c.errors::jsonb, j.errors)
                   FROM unnest($1::bigint[], $2::int[], $3::text[], $4::timestamptz[], $5::int[],
                               $6::text[]) AS c(id, attempt, state, run_at, uncount, errors)
                  WHERE j.id = c.id AND j.attempt = c.attempt AND j.state = 'running'
                 RETURNING j.queue, j.state, j.run_at, j.ordering_key IS NOT NULL AS ordered",
            )
            .bind(ids)
            .bind(attempts)
            .bind(states)
            .bind(run_ats)
            .bind(uncount)
            .bind(errors)
            .fetch_all(&mut *conn)
            .await?;
            conn.release();
            let mut earliest: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
            for row in rows {
                changed += 1;
                let queue: String = row.try_get("queue")?;
                let state: String = row.try_get("state")?;
                let ordered: bool = row.try_get("ordered")?;
                if state == "available" || ordered {
                    payloads.insert(Wakeups::payload(&queue, None), ());
                } else {
                    let at: DateTime<Utc> = row.try_get("run_at")?;
                    let e = earliest.entry(queue).or_insert(at);
                    *e = (*e).min(at);
                }
            }
            for (queue, at) in earliest {
                payloads.insert(Wakeups::payload(&queue, Some(at)), ());
            }
        }
        self.notify(payloads.into_keys().collect()).await?;
        Ok(changed)
    }

    async fn heartbeat(&self, claims: &[(JobId, i32)], lease_until: DateTime<Utc>) -> Result<u64> {
        if claims.is_empty() {
            return Ok(0);
        }
        let (ids, attempts): (Vec<i64>, Vec<i32>) = claims.iter().copied().unzip();
        let mut conn = self.hot.lease().await?;
        let done = sqlx::query(
            "UPDATE herald_jobs j SET lease_expires_at = $3
               FROM unnest($1::bigint[], $2::int[]) AS c(id, attempt)
              WHERE j.id = c.id AND j.attempt = c.attempt AND j.state = 'running'",
        )
        .bind(ids)
        .bind(attempts)
        .bind(lease_until)
        .execute(&mut *conn)
        .await?;
        conn.release();
        Ok(done.rows_affected())
    }

    async fn release(&self, claims: &[(JobId, i32)], _now: DateTime<Utc>) -> Result<u64> {
        if claims.is_empty() {
            return Ok(0);
        }
        let (ids, attempts): (Vec<i64>, Vec<i32>) = claims.iter().copied().unzip();
        let rows = sqlx::query(
            "UPDATE herald_jobs j SET state = 'available', attempt = j.attempt - 1,
                    lease_expires_at = NULL
               FROM unnest($1::bigint[], $2::int[]) AS c(id, attempt)
              WHERE j.id = c.id AND j.attempt = c.attempt AND j.state = 'running'
             RETURNING j.queue",
        )
        .bind(ids)
        .bind(attempts)
        .fetch_all(&self.pool)
        .await?;
        let queues: HashSet<String> = rows
            .iter()
            .map(|r| r.try_get("queue"))
            .collect::<Result<_, _>>()?;
        self.notify(queues.iter().map(|q| Wakeups::payload(q, None)).collect())
            .await?;
        Ok(rows.len() as u64)
    }

    async fn promote(&self, queue: &str, now: DateTime<Utc>) -> Result<u64> {
        let mut total = 0;
        loop {
            let done = sqlx::query(
                "WITH due AS (
                    SELECT id FROM herald_jobs
                     WHERE queue = $1 AND state IN ('scheduled', 'retryable') AND run_at <= $2
                     ORDER BY run_at LIMIT 10000
                     FOR UPDATE SKIP LOCKED)
                 UPDATE herald_jobs j SET state = 'available' FROM due WHERE j.id = due.id",
            )
            .bind(queue)
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected();
            total += done;
            if done < 10_000 {
                return Ok(total);
            }
        }
    }

    async fn next_due(&self, queue: &str) -> Result<Option<DateTime<Utc>>> {
        Ok(sqlx::query_scalar(
            "SELECT min(run_at) FROM herald_jobs
              WHERE queue = $1 AND state IN ('scheduled', 'retryable')",
        )
        .bind(queue)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn expired(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<Job>> {
        let rows = sqlx::query(&format!(
            "SELECT {HOT_COLUMNS} FROM herald_jobs
              WHERE state = 'running' AND lease_expires_at < $1
              ORDER BY lease_expires_at LIMIT $2"
        ))
        .bind(now)
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
        let done = sqlx::query(
            "DELETE FROM herald_jobs_done WHERE id IN (
                SELECT id FROM herald_jobs_done
                 WHERE finalized_at < GREATEST($1, $2)
                   AND ((state = 'completed' AND finalized_at < $1)
                     OR (state <> 'completed' AND finalized_at < $2))
                 LIMIT $3)",
        )
        .bind(completed_before)
        .bind(others_before)
        .bind(limit as i64)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn vacuum_hot(&self, dead_rows: u64) -> Result<bool> {
        let dead: Option<i64> = sqlx::query_scalar(
            "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'herald_jobs'::regclass",
        )
        .fetch_optional(&self.pool)
        .await?;
        if dead.unwrap_or(0) <= i64::try_from(dead_rows).unwrap_or(i64::MAX) {
            return Ok(false);
        }
        // A plain string runs as a simple query, outside any transaction block, as VACUUM must.
        (&self.pool).execute("VACUUM herald_jobs").await?;
        Ok(true)
    }

    async fn try_lead(
        &self,
        name: &str,
        leader: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<bool> {
        let row: Option<String> = sqlx::query_scalar(
            "INSERT INTO herald_leaders (name, leader_id, expires_at) VALUES ($1, $2, $4)
             ON CONFLICT (name) DO UPDATE SET leader_id = EXCLUDED.leader_id,
                    expires_at = EXCLUDED.expires_at
              WHERE herald_leaders.leader_id = EXCLUDED.leader_id
                 OR herald_leaders.expires_at < $3
             RETURNING leader_id",
        )
        .bind(name)
        .bind(leader)
        .bind(now)
        .bind(until)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_deref() == Some(leader))
    }

    async fn resign(&self, name: &str, leader: &str) -> Result<()> {
        sqlx::query("DELETE FROM herald_leaders WHERE name = $1 AND leader_id = $2")
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
        sqlx::query(
            "INSERT INTO herald_limiter_fallbacks (process_id, period, share, expires_at)
             VALUES ($1, $2, $3, clock_timestamp() + make_interval(secs => $4))
             ON CONFLICT (process_id) DO UPDATE
                SET period = excluded.period, share = excluded.share,
                    expires_at = excluded.expires_at
              WHERE herald_limiter_fallbacks.period <= excluded.period",
        )
        .bind(process_id)
        .bind(i64::try_from(period).unwrap_or(i64::MAX))
        .bind(share)
        .bind(ttl.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn withdraw_fallback(&self, process_id: &str, period: u64) -> Result<()> {
        sqlx::query(
            "DELETE FROM herald_limiter_fallbacks
              WHERE (process_id = $1 AND period = $2) OR expires_at < clock_timestamp()",
        )
        .bind(process_id)
        .bind(i64::try_from(period).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn fallback_shares(&self, process_id: &str) -> Result<Fallbacks> {
        let (share, processes): (f64, i64) = sqlx::query_as(
            "SELECT COALESCE(SUM(share), 0)::float8, COUNT(*) FROM herald_limiter_fallbacks
              WHERE process_id <> $1 AND expires_at > clock_timestamp()",
        )
        .bind(process_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(Fallbacks {
            share,
            processes: u32::try_from(processes).unwrap_or(u32::MAX),
        })
    }

    async fn get_job(&self, id: JobId) -> Result<Option<Job>> {
        let row = sqlx::query(&format!(
            "SELECT {HOT_COLUMNS} FROM herald_jobs WHERE id = $1
             UNION ALL SELECT {DONE_COLUMNS} FROM herald_jobs_done WHERE id = $1"
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
        let mut qb: QueryBuilder<sqlx::Postgres> = QueryBuilder::new("SELECT * FROM (");
        for (n, (table, columns)) in tables.iter().enumerate() {
            if n > 0 {
                qb.push(" UNION ALL ");
            }
            qb.push(format!("(SELECT {columns} FROM {table} WHERE true"));
            if let Some(w) = filter.workspace_id {
                qb.push(" AND workspace_id = ").push_bind(w);
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
        qb.push(") AS j ORDER BY id LIMIT ").push_bind(limit);
        let rows = qb.build().fetch_all(&self.pool).await?;
        rows.iter().map(|r| job_from_row(r, None)).collect()
    }

    async fn retry_job(&self, id: JobId, now: DateTime<Utc>) -> Result<Option<Job>> {
        let waiting = sqlx::query(
            "UPDATE herald_jobs SET state = 'available', run_at = $2
              WHERE id = $1 AND state IN ('scheduled', 'retryable') RETURNING queue",
        )
        .bind(id)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        let queue: Option<String> = match waiting {
            Some(row) => Some(row.try_get("queue")?),
            None => {
                let mut tx = self.pool.begin().await?;
                let moved = sqlx::query(
                    "INSERT INTO herald_jobs (id, workspace_id, kind, queue, payload, priority,
                        state, run_at, created_at, attempt, max_attempts, attempted_at,
                        attempted_by, errors, unique_key, rate_key, ordering_key)
                     SELECT id, workspace_id, kind, queue, payload, priority, 'available', $2,
                        created_at, 0, max_attempts, attempted_at, attempted_by, errors,
                        unique_key, rate_key, ordering_key
                       FROM herald_jobs_done
                      WHERE id = $1 AND state IN ('discarded', 'cancelled')
                     ON CONFLICT DO NOTHING
                     RETURNING queue",
                )
                .bind(id)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(row) = moved else {
                    return Ok(None);
                };
                sqlx::query("DELETE FROM herald_jobs_done WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Some(row.try_get("queue")?)
            }
        };
        if let Some(queue) = queue {
            self.notify(vec![Wakeups::payload(&queue, None)]).await?;
        }
        self.get_job(id).await
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
            "INSERT INTO herald_paused_queues (queue, paused_at, reason) VALUES ($1, $2, $3)
             ON CONFLICT (queue) DO NOTHING",
        )
        .bind(queue)
        .bind(now)
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn resume_queue(&self, queue: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM herald_paused_queues WHERE queue = $1")
            .bind(queue)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        self.notify(vec![Wakeups::payload(queue, None)]).await?;
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
                    paused_at: r.try_get("paused_at")?,
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
        let mut delay = Duration::from_millis(100);
        while !*shutdown.borrow() {
            let mut listener = match PgListener::connect_with(&self.pool).await {
                Ok(l) => l,
                Err(e) => {
                    warn!(error = %e, "LISTEN connection failed; producers poll meanwhile");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            if let Err(e) = listener.listen(&self.channel).await {
                warn!(error = %e, "LISTEN failed; producers poll meanwhile");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
                continue;
            }
            delay = Duration::from_millis(100);
            // Anything sent while we were not listening was missed.
            self.wakeups.all();
            loop {
                tokio::select! {
                    _ = shutdown.changed() => return Ok(()),
                    n = listener.try_recv() => match n {
                        Ok(Some(n)) => self.wakeups.apply_notification(n.payload()),
                        Ok(None) => {
                            warn!("LISTEN connection lost; reconnecting");
                            self.wakeups.all();
                        }
                        Err(e) => {
                            warn!(error = %e, "LISTEN connection failed; reconnecting");
                            self.wakeups.all();
                            break;
                        }
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => {}
            }
        }
        Ok(())
    }
}
