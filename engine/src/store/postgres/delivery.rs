//! [`DeliveryStore`] on PostgreSQL.
//!
//! Statements that change several sends lock them in id order first (`… ORDER BY id FOR
//! UPDATE`): the send worker's batches and the webhook's status batches touch the same rows
//! at once, and locking in join order deadlocked them (stalling sends for PostgreSQL's
//! one-second deadlock timeout).

use std::sync::LazyLock;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use super::PgStore;
use crate::crypto::{CryptoError, Keyring};
use crate::delivery::secrets::{self, ChannelSecrets};
use crate::delivery::{
    canonical_recipient, check_sends, latest_statuses, send_job, Channel, ChannelLimits,
    DeliveryStore, NewChannel, NewSend, SendCount, SendRecord, SendStatus, SendUpdate, StatusEvent,
    DISCONNECTED, META_API_VERSION, META_GRAPH_URL,
};
use crate::error::{Result, StoreError};
use crate::model::InvalidJob;
use crate::store::postgres::notify_payloads;

const CHANNEL_COLUMNS: &str = "id, workspace_id, platform, name, sender_id, portfolio_id, \
     access_token, app_secret, verify_token, graph_base_url, api_version, limits, paused_reason, \
     paused_broadcasts_only, paused_at, created_at, updated_at, secrets, secrets_key_id";

const SEND_COLUMNS: &str = "id, workspace_id, channel_id, recipient, message, lane, status, \
     requests, provider_message_id, error_code, error, created_at, requested_at, accepted_at, \
     updated_at";

/// Statuses that name their send (our id echoed back), applied where they move the send
/// forward: [`DeliveryStore::apply_statuses`], and the webhook ingest that applies a delivery's
/// statuses as it stores it. Its parameters start at `$first` (eight of them, bound by
/// [`bind_statuses_by_send`]); it is an UPDATE that can stand as a CTE of a larger statement.
pub(super) fn statuses_by_send_sql(first: usize) -> String {
    let p: Vec<String> = (first..first + 8).map(|n| format!("${n}")).collect();
    format!(
        "WITH e AS (SELECT * FROM unnest({}::uuid[], {}::uuid[], {}::text[], {}::text[],
                                         {}::smallint[], {}::bigint[], {}::text[],
                                         {}::timestamptz[])
                     AS e(id, channel_id, pmid, status, rank, code, error, at)),
              locked AS (SELECT id FROM herald_sends WHERE id IN (SELECT id FROM e)
                          ORDER BY id FOR UPDATE)
         UPDATE herald_sends s
            SET status = e.status, status_rank = e.rank,
                provider_message_id = coalesce(s.provider_message_id, e.pmid),
                accepted_at = coalesce(s.accepted_at, e.at),
                error_code = CASE WHEN e.status = 'failed' THEN e.code ELSE NULL END,
                error = CASE WHEN e.status = 'failed' THEN e.error ELSE NULL END,
                updated_at = e.at
           FROM e JOIN locked USING (id)
          WHERE s.id = e.id AND s.channel_id = e.channel_id AND s.status_rank < e.rank",
        p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]
    )
}

static STATUSES_BY_SEND: LazyLock<String> = LazyLock::new(|| statuses_by_send_sql(1));

/// Binds [`statuses_by_send_sql`]'s parameters, in order. Every event has a send id (it is
/// from [`latest_statuses`]' first list).
pub(super) fn bind_statuses_by_send<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    by_send: &[&'q StatusEvent],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(by_send.iter().map(|e| e.send_id).collect::<Vec<_>>())
        .bind(by_send.iter().map(|e| e.channel_id).collect::<Vec<_>>())
        .bind(
            by_send
                .iter()
                .map(|e| e.provider_message_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            by_send
                .iter()
                .map(|e| e.status.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(by_send.iter().map(|e| e.status.rank()).collect::<Vec<_>>())
        .bind(by_send.iter().map(|e| e.error_code).collect::<Vec<_>>())
        .bind(
            by_send
                .iter()
                .map(|e| e.error.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(by_send.iter().map(|e| e.at).collect::<Vec<_>>())
}

/// [`SEND_COLUMNS`] of the table aliased `s`, for RETURNING clauses of UPDATE ... FROM.
static SEND_COLUMNS_OF_S: LazyLock<String> = LazyLock::new(|| {
    SEND_COLUMNS
        .split(", ")
        .map(|c| format!("s.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
});

/// The begin UPDATE (queued -> sending, one more request), over a `locked` CTE of the rows; the
/// arguments name the statement's parameters for the ids, the time and the rank.
pub(super) fn begin_update(now: &str, rank: &str, returning: &str) -> String {
    format!(
        "UPDATE herald_sends s SET status = 'sending', status_rank = {rank},
                requests = s.requests + 1, requested_at = {now}, updated_at = {now}
           FROM locked
          WHERE s.id = locked.id AND s.status_rank = 0
          RETURNING {returning}"
    )
}

/// What the claim of send jobs returns of the sends it began ([`super::claim_keys_sql`]):
/// [`SEND_COLUMNS`] of the table aliased `s`, each renamed `b_<column>`.
pub(super) static BEGUN_RETURNING: LazyLock<String> = LazyLock::new(|| {
    SEND_FIELDS
        .iter()
        .map(|c| format!("s.{c} AS b_{c}"))
        .collect::<Vec<_>>()
        .join(", ")
});

/// The fields a send is read from, in [`SEND_COLUMNS`] order (a test holds the two together,
/// and [`send_from_names`] reads them by position).
const SEND_FIELDS: [&str; 15] = [
    "id",
    "workspace_id",
    "channel_id",
    "recipient",
    "message",
    "lane",
    "status",
    "requests",
    "provider_message_id",
    "error_code",
    "error",
    "created_at",
    "requested_at",
    "accepted_at",
    "updated_at",
];

/// [`SEND_FIELDS`] renamed as [`BEGUN_RETURNING`] renames them.
static BEGUN_NAMES: LazyLock<Vec<String>> =
    LazyLock::new(|| SEND_FIELDS.iter().map(|c| format!("b_{c}")).collect());

/// The sends a claim statement began, with their jobs: the rows whose `b_id` is set. A row
/// that does not decode is left out (its worker recognises the send by its `requested_at`,
/// [`crate::delivery::begun_by_claim`]) and does not cost the others theirs.
pub(super) fn begun_from_rows(rows: &[PgRow]) -> Vec<(SendRecord, i64)> {
    let mut begun = Vec::new();
    for row in rows {
        let decoded = (|| -> Result<Option<(SendRecord, i64)>> {
            if row.try_get::<Option<Uuid>, _>("b_id")?.is_none() {
                return Ok(None);
            }
            Ok(Some((
                send_from_names(row, &BEGUN_NAMES)?,
                row.try_get("id")?,
            )))
        })();
        match decoded {
            Ok(Some(b)) => begun.push(b),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "claim: a begun send does not decode; its worker reads it")
            }
        }
    }
    begun
}

/// The accept UPDATE (Meta's id recorded, never moving a send back), over a `t(id, pmid)` CTE
/// of the accepts and a `locked` CTE of the rows ([`accept_ctes`]); the arguments name the
/// time and the rank.
pub(super) fn accept_update(now: &str, rank: &str) -> String {
    format!(
        "UPDATE herald_sends s
            SET status = CASE WHEN s.status_rank < {rank} THEN 'accepted' ELSE s.status END,
                status_rank = greatest(s.status_rank, {rank}),
                provider_message_id = t.pmid, accepted_at = coalesce(s.accepted_at, {now}),
                error = CASE WHEN s.status_rank < {rank} THEN NULL ELSE s.error END,
                error_code = CASE WHEN s.status_rank < {rank} THEN NULL ELSE s.error_code END,
                updated_at = greatest(s.updated_at, {now})
           FROM t JOIN locked USING (id)
          WHERE s.id = t.id"
    )
}

/// `begin_sends`: ids $1, time $2, rank $3.
static BEGIN_SENDS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH locked AS (
            SELECT id FROM herald_sends WHERE id = ANY($1::uuid[]) AND status_rank = 0
             ORDER BY id FOR UPDATE)
         {}",
        begin_update("$2", "$3", &SEND_COLUMNS_OF_S)
    )
});

/// The CTEs the accept UPDATE reads: `t(id, pmid)` from the statement's parameters named by
/// `ids` and `pmids`, and `locked`, those sends locked in id order like every other writer of
/// herald_sends, so that no two writers deadlock.
pub(super) fn accept_ctes(ids: &str, pmids: &str) -> String {
    format!(
        "t AS (SELECT * FROM unnest({ids}::uuid[], {pmids}::text[]) AS t(id, pmid)),
         locked AS (SELECT id FROM herald_sends WHERE id IN (SELECT id FROM t)
                     ORDER BY id FOR UPDATE)"
    )
}

/// `accept_sends`: ids $1, Meta's ids $2, time $3, rank $4.
static ACCEPT_SENDS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH {} {}",
        accept_ctes("$1", "$2"),
        accept_update("$3", "$4")
    )
});

fn channel_from_row(keyring: Option<&Keyring>, row: &PgRow) -> Result<Channel> {
    let platform: String = row.try_get("platform")?;
    let limits: sqlx::types::Json<ChannelLimits> = row.try_get("limits")?;
    let id: Uuid = row.try_get("id")?;
    let sealed = match (
        row.try_get::<Option<String>, _>("secrets_key_id")?,
        row.try_get::<Option<Vec<u8>>, _>("secrets")?,
    ) {
        (Some(k), Some(b)) => Some((k, b)),
        _ => None,
    };
    let secrets = secrets::open(
        keyring,
        id,
        sealed,
        ChannelSecrets {
            access_token: row.try_get("access_token")?,
            app_secret: row.try_get("app_secret")?,
            verify_token: row.try_get("verify_token")?,
        },
    )?;
    Ok(Channel {
        id,
        workspace_id: row.try_get("workspace_id")?,
        platform: platform.parse().map_err(StoreError::Corrupt)?,
        name: row.try_get("name")?,
        sender_id: row.try_get("sender_id")?,
        portfolio_id: row.try_get("portfolio_id")?,
        access_token: secrets.access_token,
        app_secret: secrets.app_secret,
        verify_token: secrets.verify_token,
        graph_base_url: row.try_get("graph_base_url")?,
        api_version: row.try_get("api_version")?,
        limits: limits.0,
        paused_reason: row.try_get("paused_reason")?,
        paused_broadcasts_only: row.try_get("paused_broadcasts_only")?,
        paused_at: row.try_get("paused_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn send_from_row(row: &PgRow) -> Result<SendRecord> {
    send_from_names(row, &SEND_FIELDS)
}

/// A send from the columns named `names` ([`SEND_COLUMNS`] order, perhaps renamed).
fn send_from_names(row: &PgRow, names: &[impl AsRef<str>]) -> Result<SendRecord> {
    let n = |i: usize| names[i].as_ref();
    let lane: String = row.try_get(n(5))?;
    let status: String = row.try_get(n(6))?;
    let message: sqlx::types::Json<crate::delivery::Message> = row.try_get(n(4))?;
    Ok(SendRecord {
        id: row.try_get(n(0))?,
        workspace_id: row.try_get(n(1))?,
        channel_id: row.try_get(n(2))?,
        recipient: row.try_get(n(3))?,
        message: message.0,
        lane: lane.parse().map_err(StoreError::Corrupt)?,
        status: status.parse().map_err(StoreError::Corrupt)?,
        requests: row.try_get(n(7))?,
        provider_message_id: row.try_get(n(8))?,
        error_code: row.try_get(n(9))?,
        error: row.try_get(n(10))?,
        created_at: row.try_get(n(11))?,
        requested_at: row.try_get(n(12))?,
        accepted_at: row.try_get(n(13))?,
        updated_at: row.try_get(n(14))?,
    })
}

#[async_trait]
impl DeliveryStore for PgStore {
    async fn create_channel(&self, channel: &NewChannel, now: DateTime<Utc>) -> Result<Channel> {
        channel.validate().map_err(InvalidJob)?;
        let limits = channel
            .limits
            .unwrap_or_else(|| ChannelLimits::for_platform(channel.platform));
        let id = Uuid::new_v4();
        let sealed = secrets::seal(
            self.keyring.as_deref(),
            id,
            &ChannelSecrets {
                access_token: channel.access_token.clone(),
                app_secret: channel.app_secret.clone(),
                verify_token: channel.verify_token.clone(),
            },
        )?;
        // The plaintext columns stay empty: the secrets exist only as the ciphertext.
        let row = sqlx::query(&format!(
            "INSERT INTO herald_channels ({CHANNEL_COLUMNS})
             VALUES ($1, $2, $3, $4, $5, $6, '', '', '', $7, $8, $9, NULL, false, NULL, $10, $10,
                     $11, $12)
             RETURNING {CHANNEL_COLUMNS}"
        ))
        .bind(id)
        .bind(channel.workspace_id)
        .bind(channel.platform.as_str())
        .bind(&channel.name)
        .bind(&channel.sender_id)
        .bind(&channel.portfolio_id)
        .bind(channel.graph_base_url.as_deref().unwrap_or(META_GRAPH_URL))
        .bind(channel.api_version.as_deref().unwrap_or(META_API_VERSION))
        .bind(sqlx::types::Json(limits))
        .bind(now)
        .bind(&sealed.blob)
        .bind(&sealed.key_id)
        .fetch_one(&self.pool)
        .await?;
        channel_from_row(self.keyring.as_deref(), &row)
    }

    async fn channel(&self, id: Uuid) -> Result<Option<Channel>> {
        let row = sqlx::query(&format!(
            "SELECT {CHANNEL_COLUMNS} FROM herald_channels WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref()
            .map(|r| channel_from_row(self.keyring.as_deref(), r))
            .transpose()
    }

    async fn channels(&self) -> Result<Vec<Channel>> {
        let rows = sqlx::query(&format!(
            "SELECT {CHANNEL_COLUMNS} FROM herald_channels ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| channel_from_row(self.keyring.as_deref(), r))
            .collect()
    }

    async fn workspace_channels(
        &self,
        workspace_id: Uuid,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<Channel>> {
        let rows = sqlx::query(&format!(
            "SELECT {CHANNEL_COLUMNS} FROM herald_channels
              WHERE workspace_id = $1 AND ($2::uuid IS NULL OR id > $2) ORDER BY id LIMIT $3"
        ))
        .bind(workspace_id)
        .bind(after)
        .bind(limit.clamp(0, 1_000))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| channel_from_row(self.keyring.as_deref(), r))
            .collect()
    }

    async fn disconnect_channel(
        &self,
        workspace_id: Uuid,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE herald_channels
                SET secrets = NULL, secrets_key_id = NULL,
                    access_token = '', app_secret = '', verify_token = '',
                    paused_reason = $4, paused_broadcasts_only = false, paused_at = $3,
                    updated_at = $3
              WHERE workspace_id = $1 AND id = $2",
        )
        .bind(workspace_id)
        .bind(id)
        .bind(now)
        .bind(DISCONNECTED)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn seal_secrets(&self) -> Result<u64> {
        let keyring = self.keyring.as_deref().ok_or(CryptoError::NoKey)?;
        let rows = sqlx::query(&format!(
            "SELECT {CHANNEL_COLUMNS} FROM herald_channels
              WHERE (secrets IS NULL AND access_token <> '')
                 OR (secrets IS NOT NULL AND secrets_key_id IS DISTINCT FROM $1)
              ORDER BY id"
        ))
        .bind(keyring.current_id())
        .fetch_all(&self.pool)
        .await?;
        let mut changed = 0;
        for row in &rows {
            let c = channel_from_row(Some(keyring), row)?;
            let sealed = secrets::seal(
                Some(keyring),
                c.id,
                &ChannelSecrets {
                    access_token: c.access_token,
                    app_secret: c.app_secret,
                    verify_token: c.verify_token,
                },
            )?;
            changed += sqlx::query(
                "UPDATE herald_channels
                    SET secrets = $2, secrets_key_id = $3,
                        access_token = '', app_secret = '', verify_token = ''
                  WHERE id = $1",
            )
            .bind(c.id)
            .bind(&sealed.blob)
            .bind(&sealed.key_id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        }
        Ok(changed)
    }

    async fn pause_channel(
        &self,
        id: Uuid,
        reason: Option<&str>,
        broadcasts_only: bool,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE herald_channels
                SET paused_reason = $2, paused_at = CASE WHEN $2::text IS NULL THEN NULL ELSE $3 END,
                    paused_broadcasts_only = $4, updated_at = $3
              WHERE id = $1",
        )
        .bind(id)
        .bind(reason)
        .bind(now)
        .bind(reason.is_some() && broadcasts_only)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn create_sends(&self, sends: &[NewSend], now: DateTime<Utc>) -> Result<Vec<Uuid>> {
        check_sends(sends)?;
        if sends.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = sends.iter().map(|_| Uuid::new_v4()).collect();
        let jobs: Vec<_> = ids
            .iter()
            .zip(sends)
            .map(|(id, s)| send_job(*id, s))
            .collect();
        let mut tx = self.pool.begin().await?;
        for (chunk_ids, chunk) in ids.chunks(5_000).zip(sends.chunks(5_000)) {
            let messages: Vec<String> = chunk
                .iter()
                .map(|s| serde_json::to_string(&s.message))
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            sqlx::query(
                "INSERT INTO herald_sends (id, workspace_id, channel_id, recipient, message, lane,
                                           status, status_rank, created_at, updated_at)
                 SELECT id, ws, ch, rcpt, msg::json, lane, 'queued', 0, $7, $7
                   FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[],
                               $6::text[]) AS t(id, ws, ch, rcpt, msg, lane)",
            )
            .bind(chunk_ids)
            .bind(chunk.iter().map(|s| s.workspace_id).collect::<Vec<_>>())
            .bind(chunk.iter().map(|s| s.channel_id).collect::<Vec<_>>())
            .bind(
                chunk
                    .iter()
                    .map(|s| canonical_recipient(&s.recipient).into_owned())
                    .collect::<Vec<_>>(),
            )
            .bind(messages)
            .bind(chunk.iter().map(|s| s.lane.as_str()).collect::<Vec<_>>())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        let out = self.enqueue_notifying(&mut tx, &jobs, now, true).await?;
        tx.commit().await?;
        for p in notify_payloads(jobs.iter().zip(&out), now) {
            self.wakeups.apply_payload(&p);
        }
        Ok(ids)
    }

    async fn send(&self, id: Uuid) -> Result<Option<SendRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {SEND_COLUMNS} FROM herald_sends WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(send_from_row).transpose()
    }

    async fn update_send(
        &self,
        id: Uuid,
        update: &SendUpdate,
        now: DateTime<Utc>,
    ) -> Result<Option<SendRecord>> {
        // Herald's own states (rank below `accepted`) are the worker's to move; once Meta has
        // the message only a later Meta status moves it, so each update names the ranks it may
        // replace.
        let sql: String;
        let query = match update {
            SendUpdate::Requesting => sqlx::query({
                sql = format!(
                    "UPDATE herald_sends SET status = 'sending', status_rank = $2,
                        requests = requests + 1, requested_at = $3, updated_at = $3
                  WHERE id = $1 AND status_rank < $4 RETURNING {SEND_COLUMNS}"
                );
                &sql
            })
            .bind(id)
            .bind(SendStatus::Sending.rank())
            .bind(now)
            .bind(SendStatus::Accepted.rank()),
            SendUpdate::Unknown { error } => sqlx::query({
                sql = format!(
                    "UPDATE herald_sends SET status = 'unknown', status_rank = $2, error = $5,
                        updated_at = $3
                  WHERE id = $1 AND status_rank < $4 RETURNING {SEND_COLUMNS}"
                );
                &sql
            })
            .bind(id)
            .bind(SendStatus::Unknown.rank())
            .bind(now)
            .bind(SendStatus::Accepted.rank())
            .bind(error),
            SendUpdate::Accepted {
                provider_message_id,
            } => sqlx::query({
                sql = format!(
                    "UPDATE herald_sends
                    SET status = CASE WHEN status_rank < $2 THEN 'accepted' ELSE status END,
                        status_rank = greatest(status_rank, $2),
                        provider_message_id = $4, accepted_at = coalesce(accepted_at, $3),
                        error = CASE WHEN status_rank < $2 THEN NULL ELSE error END,
                        error_code = CASE WHEN status_rank < $2 THEN NULL ELSE error_code END,
                        updated_at = $3
                  WHERE id = $1 RETURNING {SEND_COLUMNS}"
                );
                &sql
            })
            .bind(id)
            .bind(SendStatus::Accepted.rank())
            .bind(now)
            .bind(provider_message_id),
            SendUpdate::Unsent { requested_at } => sqlx::query({
                sql = format!(
                    "UPDATE herald_sends SET status = 'queued', status_rank = $2, updated_at = $3,
                            requests = greatest(requests - 1, 0)
                      WHERE id = $1 AND status_rank = $4 AND requested_at = $5
                  RETURNING {SEND_COLUMNS}"
                );
                &sql
            })
            .bind(id)
            .bind(SendStatus::Queued.rank())
            .bind(now)
            .bind(SendStatus::Sending.rank())
            .bind(requested_at),
            SendUpdate::Refused { code, error } => sqlx::query({
                sql = format!(
                    "UPDATE herald_sends SET status = 'queued', status_rank = $2, error_code = $5,
                            error = $6, updated_at = $3
                      WHERE id = $1 AND status_rank < $4 RETURNING {SEND_COLUMNS}"
                );
                &sql
            })
            .bind(id)
            .bind(SendStatus::Queued.rank())
            .bind(now)
            .bind(SendStatus::Accepted.rank())
            .bind(code)
            .bind(error),
            SendUpdate::Failed { code, error } => sqlx::query({
                sql = format!(
                    "UPDATE herald_sends SET status = 'failed', status_rank = $2, error_code = $5,
                        error = $6, updated_at = $3
                  WHERE id = $1 AND status_rank < $4 RETURNING {SEND_COLUMNS}"
                );
                &sql
            })
            .bind(id)
            .bind(SendStatus::Failed.rank())
            .bind(now)
            .bind(SendStatus::Accepted.rank())
            .bind(code)
            .bind(error),
        };
        match query.fetch_optional(&self.pool).await? {
            Some(row) => Ok(Some(send_from_row(&row)?)),
            None => self.send(id).await,
        }
    }

    async fn begin_sends(&self, ids: &[Uuid], now: DateTime<Utc>) -> Result<Vec<SendRecord>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.hot.lease().await?;
        let rows = sqlx::query(&BEGIN_SENDS)
            .bind(ids)
            .bind(now)
            .bind(SendStatus::Sending.rank())
            .fetch_all(&mut *conn)
            .await?;
        conn.release();
        rows.iter().map(send_from_row).collect()
    }

    fn take_begun(&self, id: Uuid, job: i64, claimed_at: DateTime<Utc>) -> Option<SendRecord> {
        self.begun.take(id, job, claimed_at)
    }

    async fn accept_sends(&self, accepted: &[(Uuid, String)], now: DateTime<Utc>) -> Result<u64> {
        if accepted.is_empty() {
            return Ok(0);
        }
        let mut conn = self.hot.lease().await?;
        let done = sqlx::query(&ACCEPT_SENDS)
            .bind(accepted.iter().map(|a| a.0).collect::<Vec<_>>())
            .bind(accepted.iter().map(|a| a.1.as_str()).collect::<Vec<_>>())
            .bind(now)
            .bind(SendStatus::Accepted.rank())
            .execute(&mut *conn)
            .await?;
        conn.release();
        Ok(done.rows_affected())
    }

    async fn apply_statuses(&self, events: &[StatusEvent]) -> Result<u64> {
        let (by_send, by_provider) = latest_statuses(events);
        let mut changed = 0;
        let mut conn = self.hot.lease().await?;
        if !by_send.is_empty() {
            let done = bind_statuses_by_send(sqlx::query(&STATUSES_BY_SEND), &by_send)
                .execute(&mut *conn)
                .await?;
            changed += done.rows_affected();
        }
        if !by_provider.is_empty() {
            let done = sqlx::query(
                "WITH e AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[],
                                                 $4::smallint[], $5::bigint[], $6::text[],
                                                 $7::timestamptz[])
                             AS e(channel_id, pmid, status, rank, code, error, at)),
                      locked AS (SELECT s.id, s.provider_message_id, s.channel_id
                                   FROM herald_sends s JOIN e
                                     ON s.provider_message_id = e.pmid AND s.channel_id = e.channel_id
                                  ORDER BY s.id FOR UPDATE OF s)
                 UPDATE herald_sends s
                    SET status = e.status, status_rank = e.rank,
                        error_code = CASE WHEN e.status = 'failed' THEN e.code ELSE NULL END,
                        error = CASE WHEN e.status = 'failed' THEN e.error ELSE NULL END,
                        updated_at = e.at
                   FROM e JOIN locked ON locked.provider_message_id = e.pmid
                                     AND locked.channel_id = e.channel_id
                  WHERE s.id = locked.id AND s.status_rank < e.rank",
            )
            .bind(by_provider.iter().map(|e| e.channel_id).collect::<Vec<_>>())
            .bind(by_provider.iter().map(|e| e.provider_message_id.as_str()).collect::<Vec<_>>())
            .bind(by_provider.iter().map(|e| e.status.as_str()).collect::<Vec<_>>())
            .bind(by_provider.iter().map(|e| e.status.rank()).collect::<Vec<_>>())
            .bind(by_provider.iter().map(|e| e.error_code).collect::<Vec<_>>())
            .bind(by_provider.iter().map(|e| e.error.as_deref()).collect::<Vec<_>>())
            .bind(by_provider.iter().map(|e| e.at).collect::<Vec<_>>())
            .execute(&mut *conn)
            .await?;
            changed += done.rows_affected();
        }
        conn.release();
        Ok(changed)
    }

    async fn send_counts(&self, channel_id: Option<Uuid>) -> Result<Vec<SendCount>> {
        let rows = sqlx::query(
            "SELECT status, count(*) AS n FROM herald_sends
              WHERE $1::uuid IS NULL OR channel_id = $1
              GROUP BY status ORDER BY min(status_rank)",
        )
        .bind(channel_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let status: String = r.try_get("status")?;
                Ok(SendCount {
                    status: status.parse().map_err(StoreError::Corrupt)?,
                    count: r.try_get("n")?,
                })
            })
            .collect()
    }

    async fn reserve_reach(
        &self,
        portfolio_id: &str,
        recipient: &str,
        tier: u32,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>> {
        let since = now - chrono::Duration::hours(24);
        let mut tx = self.pool.begin().await?;
        // One portfolio's reservations run one at a time, in every process.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('herald_reach:' || $1, 0))")
            .bind(portfolio_id)
            .execute(&mut *tx)
            .await?;
        let last: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT reached_at FROM herald_reach WHERE portfolio_id = $1 AND recipient = $2",
        )
        .bind(portfolio_id)
        .bind(canonical_recipient(recipient).as_ref())
        .fetch_optional(&mut *tx)
        .await?;
        if last.is_none_or(|at| at <= since) {
            let (count, oldest): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
                "SELECT count(*), min(reached_at) FROM herald_reach
                  WHERE portfolio_id = $1 AND reached_at > $2",
            )
            .bind(portfolio_id)
            .bind(since)
            .fetch_one(&mut *tx)
            .await?;
            if count >= i64::from(tier) {
                tx.rollback().await?;
                let frees = oldest.map_or(now, |o| o + chrono::Duration::hours(24));
                return Ok(Some(frees));
            }
        }
        sqlx::query(
            "INSERT INTO herald_reach (portfolio_id, recipient, reached_at) VALUES ($1, $2, $3)
             ON CONFLICT (portfolio_id, recipient) DO UPDATE SET reached_at = excluded.reached_at",
        )
        .bind(portfolio_id)
        .bind(canonical_recipient(recipient).as_ref())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(None)
    }

    async fn record_inbound(
        &self,
        channel_id: Uuid,
        recipient: &str,
        at: DateTime<Utc>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO herald_windows (channel_id, recipient, last_inbound_at) VALUES ($1, $2, $3)
             ON CONFLICT (channel_id, recipient) DO UPDATE
                SET last_inbound_at = greatest(herald_windows.last_inbound_at, excluded.last_inbound_at)",
        )
        .bind(channel_id)
        .bind(canonical_recipient(recipient).as_ref())
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn last_inbound(
        &self,
        channel_id: Uuid,
        recipient: &str,
    ) -> Result<Option<DateTime<Utc>>> {
        Ok(sqlx::query_scalar(
            "SELECT last_inbound_at FROM herald_windows WHERE channel_id = $1 AND recipient = $2",
        )
        .bind(channel_id)
        .bind(canonical_recipient(recipient).as_ref())
        .fetch_optional(&self.pool)
        .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_fields_are_send_columns_in_order() {
        assert_eq!(SEND_FIELDS.join(", "), SEND_COLUMNS);
    }
}
