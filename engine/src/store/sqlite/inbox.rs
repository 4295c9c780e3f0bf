//! [`InboxStore`] on SQLite.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use uuid::Uuid;

use super::delivery::apply_statuses_in;
use super::{parse_uuid, SqliteStore};
use crate::clock::{from_micros, to_micros};
use crate::delivery::canonical_recipient;
use crate::error::{Result, StoreError};
use crate::inbox::{
    statuses_applied_now, webhook_job, InboundHandOff, InboundMessage, InboxStore, NewWebhookEvent,
    WebhookCounts, WebhookEvent,
};
use crate::store::postgres::notify_payloads;

/// `?` placeholders per statement stay far below SQLite's limit (32,766).
const CHUNK: usize = 500;

fn id_list(ids: &[i64]) -> Result<String> {
    serde_json::to_string(ids).map_err(|e| StoreError::Corrupt(e.to_string()))
}

#[async_trait]
impl InboxStore for SqliteStore {
    async fn store_webhooks(
        &self,
        events: &[NewWebhookEvent],
        now: DateTime<Utc>,
    ) -> Result<Vec<i64>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        let mut ids = Vec::with_capacity(events.len());
        let mut queued = Vec::with_capacity(events.len());
        for chunk in events.chunks(CHUNK) {
            let mut sql = String::from(
                "INSERT INTO herald_webhook_events (channel_id, received_at, body, processed_at) \
                 VALUES ",
            );
            for i in 0..chunk.len() {
                if i > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!(
                    "(?{}, ?1, ?{}, ?{})",
                    3 * i + 2,
                    3 * i + 3,
                    3 * i + 4
                ));
            }
            // Each row says whether it waits for the job: SQLite returns the rows in no
            // promised order, so they cannot be matched to the chunk by position.
            sql.push_str(" RETURNING id, processed_at IS NULL");
            let mut q = sqlx::query_as::<_, (i64, bool)>(&sql).bind(to_micros(now));
            for e in chunk {
                q = q
                    .bind(e.channel_id.to_string())
                    .bind(e.body.as_slice())
                    .bind(e.applied_now().map(|_| to_micros(now)));
            }
            let mut rows = q.fetch_all(&mut *tx).await?;
            // Ids grow with each row inserted, so id order is the chunk's order.
            rows.sort_unstable_by_key(|r| r.0);
            for (id, waits) in rows {
                if waits {
                    queued.push(id);
                }
                ids.push(id);
            }
        }
        let statuses = statuses_applied_now(events);
        if !statuses.is_empty() {
            apply_statuses_in(&mut tx, &statuses).await?;
        }
        let jobs: Vec<_> = if queued.is_empty() {
            Vec::new()
        } else {
            vec![webhook_job(&queued)]
        };
        let out = self.insert_chunk(&mut tx, &jobs, now).await?;
        tx.commit().await?;
        for p in notify_payloads(jobs.iter().zip(&out), now) {
            self.wakeups.apply_payload(&p);
        }
        Ok(ids)
    }

    async fn webhook_events(&self, ids: &[i64]) -> Result<Vec<WebhookEvent>> {
        let rows = sqlx::query(
            "SELECT id, channel_id, received_at, body FROM herald_webhook_events
              WHERE id IN (SELECT value FROM json_each(?1)) AND processed_at IS NULL ORDER BY id",
        )
        .bind(id_list(ids)?)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(WebhookEvent {
                    id: r.try_get("id")?,
                    channel_id: parse_uuid(&r.try_get::<String, _>("channel_id")?)?,
                    received_at: from_micros(r.try_get("received_at")?),
                    body: r.try_get("body")?,
                })
            })
            .collect()
    }

    async fn finish_webhooks(
        &self,
        ids: &[i64],
        inbound: &[InboundMessage],
        hand_off: Option<&InboundHandOff>,
        now: DateTime<Utc>,
    ) -> Result<Vec<InboundMessage>> {
        let mut tx = self.pool.begin().await?;
        let mut fresh = Vec::new();
        for m in inbound {
            let inserted = sqlx::query(
                "INSERT INTO herald_inbound_messages (channel_id, provider_message_id, workspace_id,
                                                      sender, kind, text, payload, sent_at, received_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (channel_id, provider_message_id) DO NOTHING",
            )
            .bind(m.channel_id.to_string())
            .bind(&m.provider_message_id)
            .bind(m.workspace_id.to_string())
            .bind(&m.sender)
            .bind(&m.kind)
            .bind(m.text.as_deref())
            .bind(m.payload.to_string())
            .bind(to_micros(m.sent_at))
            .bind(to_micros(now))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 0 {
                // Seen before: its window was opened then (a redelivered message whose time is
                // its delivery's, Meta having given none, would move it again).
                continue;
            }
            fresh.push(m.clone());
            sqlx::query(
                "INSERT INTO herald_windows (channel_id, recipient, last_inbound_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (channel_id, recipient) DO UPDATE
                    SET last_inbound_at = max(herald_windows.last_inbound_at, excluded.last_inbound_at)",
            )
            .bind(m.channel_id.to_string())
            .bind(canonical_recipient(&m.sender).as_ref())
            .bind(to_micros(m.sent_at))
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "UPDATE herald_webhook_events SET processed_at = ?2
              WHERE id IN (SELECT value FROM json_each(?1)) AND processed_at IS NULL",
        )
        .bind(id_list(ids)?)
        .bind(to_micros(now))
        .execute(&mut *tx)
        .await?;
        // Handed on in the same transaction: exactly the messages stored for the first time.
        let mut wake = Vec::new();
        if let Some(h) = hand_off.filter(|_| !fresh.is_empty()) {
            let jobs = h.jobs(&fresh);
            for job in &jobs {
                job.validate()?;
            }
            let mut out = Vec::with_capacity(jobs.len());
            for chunk in jobs.chunks(super::BULK_CHUNK) {
                out.extend(self.insert_chunk(&mut tx, chunk, now).await?);
            }
            wake = notify_payloads(jobs.iter().zip(&out), now);
        }
        tx.commit().await?;
        for p in wake {
            self.wakeups.apply_payload(&p);
        }
        Ok(fresh)
    }

    async fn pending_webhooks(&self, limit: i64) -> Result<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM herald_webhook_events WHERE processed_at IS NULL ORDER BY id LIMIT ?1",
        )
        .bind(limit.clamp(0, 100_000))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn webhook_counts(&self) -> Result<WebhookCounts> {
        let (stored, pending): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE processed_at IS NULL) FROM herald_webhook_events",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(WebhookCounts { stored, pending })
    }

    async fn inbound_messages(&self, channel_id: Uuid, limit: i64) -> Result<Vec<InboundMessage>> {
        let rows = sqlx::query(
            "SELECT channel_id, workspace_id, provider_message_id, sender, kind, text, payload, sent_at
               FROM herald_inbound_messages WHERE channel_id = ?1
              ORDER BY sent_at DESC, provider_message_id DESC LIMIT ?2",
        )
        .bind(channel_id.to_string())
        .bind(limit.clamp(0, 10_000))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let payload: String = r.try_get("payload")?;
                Ok(InboundMessage {
                    channel_id: parse_uuid(&r.try_get::<String, _>("channel_id")?)?,
                    workspace_id: parse_uuid(&r.try_get::<String, _>("workspace_id")?)?,
                    provider_message_id: r.try_get("provider_message_id")?,
                    sender: r.try_get("sender")?,
                    kind: r.try_get("kind")?,
                    text: r.try_get("text")?,
                    payload: serde_json::from_str(&payload)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    sent_at: from_micros(r.try_get("sent_at")?),
                    profile_name: None,
                })
            })
            .collect()
    }
}
