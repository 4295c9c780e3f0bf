//! [`DeliveryStore`] on SQLite. Same semantics as PostgreSQL's; one writer connection makes
//! every transaction serial, so the tier reservation needs no lock of its own.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use uuid::Uuid;

use super::{parse_uuid, SqliteStore};
use crate::clock::{from_micros, to_micros};
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

fn micros_opt(row: &SqliteRow, col: &str) -> Result<Option<DateTime<Utc>>> {
    Ok(row.try_get::<Option<i64>, _>(col)?.map(from_micros))
}

fn json<T: serde::de::DeserializeOwned>(row: &SqliteRow, col: &str) -> Result<T> {
    let text: String = row.try_get(col)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
}

fn channel_from_row(keyring: Option<&Keyring>, row: &SqliteRow) -> Result<Channel> {
    let platform: String = row.try_get("platform")?;
    let id = parse_uuid(&row.try_get::<String, _>("id")?)?;
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
        workspace_id: parse_uuid(&row.try_get::<String, _>("workspace_id")?)?,
        platform: platform.parse().map_err(StoreError::Corrupt)?,
        name: row.try_get("name")?,
        sender_id: row.try_get("sender_id")?,
        portfolio_id: row.try_get("portfolio_id")?,
        access_token: secrets.access_token,
        app_secret: secrets.app_secret,
        verify_token: secrets.verify_token,
        graph_base_url: row.try_get("graph_base_url")?,
        api_version: row.try_get("api_version")?,
        limits: json::<ChannelLimits>(row, "limits")?,
        paused_reason: row.try_get("paused_reason")?,
        paused_broadcasts_only: row.try_get("paused_broadcasts_only")?,
        paused_at: micros_opt(row, "paused_at")?,
        created_at: from_micros(row.try_get("created_at")?),
        updated_at: from_micros(row.try_get("updated_at")?),
    })
}

fn send_from_row(row: &SqliteRow) -> Result<SendRecord> {
    let status: String = row.try_get("status")?;
    let lane: String = row.try_get("lane")?;
    Ok(SendRecord {
        id: parse_uuid(&row.try_get::<String, _>("id")?)?,
        workspace_id: parse_uuid(&row.try_get::<String, _>("workspace_id")?)?,
        channel_id: parse_uuid(&row.try_get::<String, _>("channel_id")?)?,
        recipient: row.try_get("recipient")?,
        message: json(row, "message")?,
        lane: lane.parse().map_err(StoreError::Corrupt)?,
        status: status.parse().map_err(StoreError::Corrupt)?,
        requests: row.try_get("requests")?,
        provider_message_id: row.try_get("provider_message_id")?,
        error_code: row.try_get("error_code")?,
        error: row.try_get("error")?,
        created_at: from_micros(row.try_get("created_at")?),
        requested_at: micros_opt(row, "requested_at")?,
        accepted_at: micros_opt(row, "accepted_at")?,
        updated_at: from_micros(row.try_get("updated_at")?),
    })
}

#[async_trait]
impl DeliveryStore for SqliteStore {
    async fn create_channel(&self, channel: &NewChannel, now: DateTime<Utc>) -> Result<Channel> {
        channel.validate().map_err(InvalidJob)?;
        let limits = channel
            .limits
            .unwrap_or_else(|| ChannelLimits::for_platform(channel.platform));
        let limits =
            serde_json::to_string(&limits).map_err(|e| StoreError::Corrupt(e.to_string()))?;
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
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, '', '', '', ?7, ?8, ?9, NULL, 0, NULL, ?10, ?10,
                     ?11, ?12)
             RETURNING {CHANNEL_COLUMNS}"
        ))
        .bind(id.to_string())
        .bind(channel.workspace_id.to_string())
        .bind(channel.platform.as_str())
        .bind(&channel.name)
        .bind(&channel.sender_id)
        .bind(&channel.portfolio_id)
        .bind(channel.graph_base_url.as_deref().unwrap_or(META_GRAPH_URL))
        .bind(channel.api_version.as_deref().unwrap_or(META_API_VERSION))
        .bind(limits)
        .bind(to_micros(now))
        .bind(&sealed.blob)
        .bind(&sealed.key_id)
        .fetch_one(&self.pool)
        .await?;
        channel_from_row(self.keyring.as_deref(), &row)
    }

    async fn channel(&self, id: Uuid) -> Result<Option<Channel>> {
        let row = sqlx::query(&format!(
            "SELECT {CHANNEL_COLUMNS} FROM herald_channels WHERE id = ?1"
        ))
        .bind(id.to_string())
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
              WHERE workspace_id = ?1 AND (?2 IS NULL OR id > ?2) ORDER BY id LIMIT ?3"
        ))
        .bind(workspace_id.to_string())
        .bind(after.map(|a| a.to_string()))
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
                    paused_reason = ?4, paused_broadcasts_only = false, paused_at = ?3,
                    updated_at = ?3
              WHERE workspace_id = ?1 AND id = ?2",
        )
        .bind(workspace_id.to_string())
        .bind(id.to_string())
        .bind(to_micros(now))
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
                 OR (secrets IS NOT NULL AND secrets_key_id IS NOT ?1)
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
                    SET secrets = ?2, secrets_key_id = ?3,
                        access_token = '', app_secret = '', verify_token = ''
                  WHERE id = ?1",
            )
            .bind(c.id.to_string())
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
                SET paused_reason = ?2, paused_at = CASE WHEN ?2 IS NULL THEN NULL ELSE ?3 END,
                    paused_broadcasts_only = ?4, updated_at = ?3
              WHERE id = ?1",
        )
        .bind(id.to_string())
        .bind(reason)
        .bind(to_micros(now))
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
            let rows: Vec<serde_json::Value> = chunk_ids
                .iter()
                .zip(chunk)
                .map(|(id, s)| {
                    serde_json::json!([
                        id.to_string(),
                        s.workspace_id.to_string(),
                        s.channel_id.to_string(),
                        canonical_recipient(&s.recipient),
                        serde_json::to_string(&s.message).unwrap_or_default(),
                        s.lane.as_str(),
                    ])
                })
                .collect();
            let rows =
                serde_json::to_string(&rows).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            sqlx::query(
                "INSERT INTO herald_sends (id, workspace_id, channel_id, recipient, message, lane,
                                           status, status_rank, created_at, updated_at)
                 SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5,
                        'queued', 0, ?2, ?2
                   FROM json_each(?1)",
            )
            .bind(rows)
            .bind(to_micros(now))
            .execute(&mut *tx)
            .await?;
        }
        let mut out = Vec::with_capacity(jobs.len());
        for chunk in jobs.chunks(5_000) {
            out.extend(self.insert_chunk(&mut tx, chunk, now).await?);
        }
        tx.commit().await?;
        for p in notify_payloads(jobs.iter().zip(&out), now) {
            self.wakeups.apply_payload(&p);
        }
        Ok(ids)
    }

    async fn send(&self, id: Uuid) -> Result<Option<SendRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {SEND_COLUMNS} FROM herald_sends WHERE id = ?1"
        ))
        .bind(id.to_string())
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
        let accepted = SendStatus::Accepted.rank();
        let sql: String;
        let query = match update {
            SendUpdate::Requesting => sqlx::query({
                sql = format!(
                    "UPDATE herald_sends SET status = 'sending', status_rank = ?2,
                        requests = requests + 1, requested_at = ?3, updated_at = ?3
                  WHERE id = ?1 AND status_rank < ?4 RETURNING {SEND_COLUMNS}"
                );
                &sql
            })
            .bind(id.to_string())
            .bind(SendStatus::Sending.rank())
            .bind(to_micros(now))
            .bind(accepted),
            SendUpdate::Unknown { error } => sqlx::query({
                sql = format!(
                    "UPDATE herald_sends SET status = 'unknown', status_rank = ?2, error = ?5,
                        updated_at = ?3
                  WHERE id = ?1 AND status_rank < ?4 RETURNING {SEND_COLUMNS}"
                );
                &sql
            })
            .bind(id.to_string())
            .bind(SendStatus::Unknown.rank())
            .bind(to_micros(now))
            .bind(accepted)
            .bind(error),
            SendUpdate::Accepted {
                provider_message_id,
            } => sqlx::query({
                sql = format!(
                    "UPDATE herald_sends
                    SET status = CASE WHEN status_rank < ?2 THEN 'accepted' ELSE status END,
                        status_rank = max(status_rank, ?2),
                        provider_message_id = ?4, accepted_at = coalesce(accepted_at, ?3),
                        error = CASE WHEN status_rank < ?2 THEN NULL ELSE error END,
                        error_code = CASE WHEN status_rank < ?2 THEN NULL ELSE error_code END,
                        updated_at = ?3
                  WHERE id = ?1 RETURNING {SEND_COLUMNS}"
                );
                &sql
            })
            .bind(id.to_string())
            .bind(accepted)
            .bind(to_micros(now))
            .bind(provider_message_id),
            SendUpdate::Unsent { requested_at } => sqlx::query({
                sql = format!(
                    "UPDATE herald_sends SET status = 'queued', status_rank = ?2, updated_at = ?3,
                            requests = max(requests - 1, 0)
                      WHERE id = ?1 AND status_rank = ?4 AND requested_at = ?5
                  RETURNING {SEND_COLUMNS}"
                );
                &sql
            })
            .bind(id.to_string())
            .bind(SendStatus::Queued.rank())
            .bind(to_micros(now))
            .bind(SendStatus::Sending.rank())
            .bind(to_micros(*requested_at)),
            SendUpdate::Refused { code, error } => sqlx::query({
                sql = format!(
                    "UPDATE herald_sends SET status = 'queued', status_rank = ?2, error_code = ?5,
                            error = ?6, updated_at = ?3
                      WHERE id = ?1 AND status_rank < ?4 RETURNING {SEND_COLUMNS}"
                );
                &sql
            })
            .bind(id.to_string())
            .bind(SendStatus::Queued.rank())
            .bind(to_micros(now))
            .bind(accepted)
            .bind(code)
            .bind(error),
            SendUpdate::Failed { code, error } => sqlx::query({
                sql = format!(
                    "UPDATE herald_sends SET status = 'failed', status_rank = ?2, error_code = ?5,
                        error = ?6, updated_at = ?3
                  WHERE id = ?1 AND status_rank < ?4 RETURNING {SEND_COLUMNS}"
                );
                &sql
            })
            .bind(id.to_string())
            .bind(SendStatus::Failed.rank())
            .bind(to_micros(now))
            .bind(accepted)
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
        let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        let ids = serde_json::to_string(&ids).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let rows = sqlx::query(&format!(
            "UPDATE herald_sends SET status = 'sending', status_rank = ?3,
                    requests = requests + 1, requested_at = ?2, updated_at = ?2
              WHERE id IN (SELECT value FROM json_each(?1)) AND status_rank = 0
              RETURNING {SEND_COLUMNS}"
        ))
        .bind(ids)
        .bind(to_micros(now))
        .bind(SendStatus::Sending.rank())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(send_from_row).collect()
    }

    fn take_begun(&self, id: Uuid, job: i64, claimed_at: DateTime<Utc>) -> Option<SendRecord> {
        self.begun.take(id, job, claimed_at)
    }

    async fn accept_sends(&self, accepted: &[(Uuid, String)], now: DateTime<Utc>) -> Result<u64> {
        if accepted.is_empty() {
            return Ok(0);
        }
        let rows: Vec<(String, &str)> = accepted
            .iter()
            .map(|(id, pmid)| (id.to_string(), pmid.as_str()))
            .collect();
        let rows = serde_json::to_string(&rows).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let done = sqlx::query(
            "UPDATE herald_sends
                SET status = CASE WHEN status_rank < ?3 THEN 'accepted' ELSE status END,
                    status_rank = max(status_rank, ?3),
                    provider_message_id = t.value->>1, accepted_at = coalesce(accepted_at, ?2),
                    error = CASE WHEN status_rank < ?3 THEN NULL ELSE error END,
                    error_code = CASE WHEN status_rank < ?3 THEN NULL ELSE error_code END,
                    updated_at = max(updated_at, ?2)
               FROM json_each(?1) AS t
              WHERE herald_sends.id = t.value->>0",
        )
        .bind(rows)
        .bind(to_micros(now))
        .bind(SendStatus::Accepted.rank())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn apply_statuses(&self, events: &[StatusEvent]) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let changed = apply_statuses_in(&mut tx, events).await?;
        tx.commit().await?;
        Ok(changed)
    }

    async fn send_counts(&self, channel_id: Option<Uuid>) -> Result<Vec<SendCount>> {
        let rows = sqlx::query(
            "SELECT status, count(*) AS n FROM herald_sends
              WHERE ?1 IS NULL OR channel_id = ?1
              GROUP BY status ORDER BY min(status_rank)",
        )
        .bind(channel_id.map(|c| c.to_string()))
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
        let since = to_micros(now - chrono::Duration::hours(24));
        // BEGIN IMMEDIATE semantics: the pool's single writer serialises this transaction.
        let mut tx = self.pool.begin().await?;
        let last: Option<i64> = sqlx::query_scalar(
            "SELECT reached_at FROM herald_reach WHERE portfolio_id = ?1 AND recipient = ?2",
        )
        .bind(portfolio_id)
        .bind(canonical_recipient(recipient).as_ref())
        .fetch_optional(&mut *tx)
        .await?;
        if last.is_none_or(|at| at <= since) {
            let (count, oldest): (i64, Option<i64>) = sqlx::query_as(
                "SELECT count(*), min(reached_at) FROM herald_reach
                  WHERE portfolio_id = ?1 AND reached_at > ?2",
            )
            .bind(portfolio_id)
            .bind(since)
            .fetch_one(&mut *tx)
            .await?;
            if count >= i64::from(tier) {
                tx.rollback().await?;
                let frees = oldest.map_or(now, |o| from_micros(o) + chrono::Duration::hours(24));
                return Ok(Some(frees));
            }
        }
        sqlx::query(
            "INSERT INTO herald_reach (portfolio_id, recipient, reached_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (portfolio_id, recipient) DO UPDATE SET reached_at = excluded.reached_at",
        )
        .bind(portfolio_id)
        .bind(canonical_recipient(recipient).as_ref())
        .bind(to_micros(now))
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
            "INSERT INTO herald_windows (channel_id, recipient, last_inbound_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (channel_id, recipient) DO UPDATE
                SET last_inbound_at = max(herald_windows.last_inbound_at, excluded.last_inbound_at)",
        )
        .bind(channel_id.to_string())
        .bind(canonical_recipient(recipient).as_ref())
        .bind(to_micros(at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn last_inbound(
        &self,
        channel_id: Uuid,
        recipient: &str,
    ) -> Result<Option<DateTime<Utc>>> {
        let at: Option<i64> = sqlx::query_scalar(
            "SELECT last_inbound_at FROM herald_windows WHERE channel_id = ?1 AND recipient = ?2",
        )
        .bind(channel_id.to_string())
        .bind(canonical_recipient(recipient).as_ref())
        .fetch_optional(&self.pool)
        .await?;
        Ok(at.map(from_micros))
    }
}

/// [`DeliveryStore::apply_statuses`] inside the caller's transaction (the webhook ingest
/// applies a delivery's statuses in the one that stores it).
pub(super) async fn apply_statuses_in(
    tx: &mut sqlx::SqliteConnection,
    events: &[StatusEvent],
) -> Result<u64> {
    let (by_send, by_provider) = latest_statuses(events);
    let mut changed = 0;
    for e in by_send {
        let done = sqlx::query(
            "UPDATE herald_sends
                    SET status = ?3, status_rank = ?4,
                        provider_message_id = coalesce(provider_message_id, ?5),
                        accepted_at = coalesce(accepted_at, ?8),
                        error_code = CASE WHEN ?3 = 'failed' THEN ?6 ELSE NULL END,
                        error = CASE WHEN ?3 = 'failed' THEN ?7 ELSE NULL END,
                        updated_at = ?8
                  WHERE id = ?1 AND channel_id = ?2 AND status_rank < ?4",
        )
        .bind(e.send_id.map(|id| id.to_string()))
        .bind(e.channel_id.to_string())
        .bind(e.status.as_str())
        .bind(e.status.rank())
        .bind(&e.provider_message_id)
        .bind(e.error_code)
        .bind(&e.error)
        .bind(to_micros(e.at))
        .execute(&mut *tx)
        .await?;
        changed += done.rows_affected();
    }
    for e in by_provider {
        let done = sqlx::query(
            "UPDATE herald_sends
                    SET status = ?3, status_rank = ?4,
                        error_code = CASE WHEN ?3 = 'failed' THEN ?6 ELSE NULL END,
                        error = CASE WHEN ?3 = 'failed' THEN ?7 ELSE NULL END,
                        updated_at = ?8
                  WHERE provider_message_id = ?1 AND channel_id = ?2 AND status_rank < ?4",
        )
        .bind(&e.provider_message_id)
        .bind(e.channel_id.to_string())
        .bind(e.status.as_str())
        .bind(e.status.rank())
        .bind(&e.provider_message_id)
        .bind(e.error_code)
        .bind(&e.error)
        .bind(to_micros(e.at))
        .execute(&mut *tx)
        .await?;
        changed += done.rows_affected();
    }
    Ok(changed)
}
