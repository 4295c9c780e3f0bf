//! [`InboxStore`] on PostgreSQL.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use uuid::Uuid;

use std::sync::LazyLock;

use super::delivery::{bind_statuses_by_send, statuses_by_send_sql};
use super::PgStore;
use crate::delivery::{canonical_recipient, latest_statuses};
use crate::error::Result;
use crate::inbox::{
    statuses_applied_now, webhook_job, InboundHandOff, InboundMessage, InboxStore, NewWebhookEvent,
    WebhookCounts, WebhookEvent,
};
use crate::store::postgres::notify_payloads;
use crate::wakeup::{Due, Wakeups};

/// Deliveries, their job, the wake-up and the statuses applied now, in one statement (atomic
/// without BEGIN and COMMIT): one round trip instead of five for every webhook Meta sends. The
/// job is `webhook_job`'s, with the ids of the deliveries not applied now written in by the
/// database (it has no unique key and no run_at, which this statement does not write; a test
/// in `inbox` holds it to that); there is none when every delivery was applied. Parameters 1-8
/// are the statuses ([`bind_statuses_by_send`]). A send the statuses change is not also
/// changed by anything else in the statement (a row changed twice in one statement keeps only
/// one of the changes).
static STORE_WEBHOOKS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH ev AS (
            INSERT INTO herald_webhook_events (channel_id, received_at, body, processed_at)
            SELECT ch, $12, body, CASE WHEN applied THEN $12 END
              FROM unnest($9::uuid[], $10::bytea[], $11::bool[]) WITH ORDINALITY
                   AS t(ch, body, applied, n)
             ORDER BY n
            RETURNING id, processed_at
         ), job AS (
            INSERT INTO herald_jobs (workspace_id, kind, queue, payload, priority, state,
                                     run_at, created_at, max_attempts, rate_key, ordering_key)
            SELECT $13, $14, $15, json_build_object('events', json_agg(id ORDER BY id)), $16,
                   'available', $12, $12, $17, $18, $19
              FROM ev WHERE processed_at IS NULL
            HAVING count(*) > 0
            RETURNING id
         ), st AS (
            {}
            RETURNING 1
         )
         SELECT (SELECT array_agg(id ORDER BY id) FROM ev),
                (SELECT count(pg_notify($20, $21)) FROM job),
                (SELECT count(*) FROM st)",
        statuses_by_send_sql(1)
    )
});

#[async_trait]
impl InboxStore for PgStore {
    async fn store_webhooks(
        &self,
        events: &[NewWebhookEvent],
        now: DateTime<Utc>,
    ) -> Result<Vec<i64>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let channels: Vec<Uuid> = events.iter().map(|e| e.channel_id).collect();
        let bodies: Vec<&[u8]> = events.iter().map(|e| e.body.as_slice()).collect();
        let applied: Vec<bool> = events.iter().map(|e| e.applied_now().is_some()).collect();
        let statuses = statuses_applied_now(events);
        let (by_send, by_provider) = latest_statuses(&statuses);
        debug_assert!(
            by_provider.is_empty(),
            "applied_now lets only send ids through"
        );
        let template = webhook_job(&[]);
        let mut conn = self.hot.lease().await?;
        let due = Due {
            unkeyed: template.rate_key.is_none(),
            keyed: template.rate_key.is_some(),
        };
        let payload = Wakeups::due_payload(&template.queue, due);
        let row = bind_statuses_by_send(sqlx::query(&STORE_WEBHOOKS), &by_send)
            .bind(&channels)
            .bind(&bodies)
            .bind(&applied)
            .bind(now)
            .bind(template.workspace_id)
            .bind(&template.kind)
            .bind(&template.queue)
            .bind(template.priority)
            .bind(template.max_attempts)
            .bind(template.rate_key.as_deref())
            .bind(template.ordering_key.as_deref())
            .bind(&self.channel)
            .bind(self.wakeups.tagged(&payload))
            .fetch_one(&mut *conn)
            .await?;
        conn.release();
        let ids: Vec<i64> = row.try_get(0)?;
        let notified: i64 = row.try_get(1)?;
        if notified > 0 {
            self.wakeups.apply_payload(&payload);
        }
        Ok(ids)
    }

    async fn webhook_events(&self, ids: &[i64]) -> Result<Vec<WebhookEvent>> {
        let mut conn = self.hot.lease().await?;
        let rows = sqlx::query(
            "SELECT id, channel_id, received_at, body FROM herald_webhook_events
              WHERE id = ANY($1) AND processed_at IS NULL ORDER BY id",
        )
        .bind(ids)
        .fetch_all(&mut *conn)
        .await?;
        conn.release();
        rows.iter()
            .map(|r| {
                Ok(WebhookEvent {
                    id: r.try_get("id")?,
                    channel_id: r.try_get("channel_id")?,
                    received_at: r.try_get("received_at")?,
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
        const MARK_PROCESSED: &str = "UPDATE herald_webhook_events SET processed_at = $2
              WHERE id = ANY($1) AND processed_at IS NULL";
        let mut conn = self.hot.lease().await?;
        if inbound.is_empty() {
            // Statuses only (most deliveries): one statement needs no transaction.
            sqlx::query(MARK_PROCESSED)
                .bind(ids)
                .bind(now)
                .execute(&mut *conn)
                .await?;
            conn.release();
            return Ok(Vec::new());
        }
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let mut fresh = Vec::new();
        // Inserted in key order, so that two batches holding the same messages lock their rows
        // in the same order and cannot deadlock. The sort is stable and the rows go in in that
        // order (ORDER BY n): of one message twice in a batch, the first is stored.
        let mut order: Vec<&InboundMessage> = inbound.iter().collect();
        order.sort_by(|a, b| {
            (a.channel_id, a.provider_message_id.as_str())
                .cmp(&(b.channel_id, b.provider_message_id.as_str()))
        });
        let payloads: Vec<String> = order.iter().map(|m| m.payload.to_string()).collect();
        let new_keys: Vec<(Uuid, String)> = sqlx::query_as(
            "INSERT INTO herald_inbound_messages (channel_id, provider_message_id, workspace_id,
                                                  sender, kind, text, payload, sent_at, received_at)
             SELECT ch, mid, ws, sender, kind, txt, payload::jsonb, sent, $9
               FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[],
                           $6::text[], $7::text[], $8::timestamptz[]) WITH ORDINALITY
                    AS t(ch, mid, ws, sender, kind, txt, payload, sent, n)
              ORDER BY n
             ON CONFLICT (channel_id, provider_message_id) DO NOTHING
             RETURNING channel_id, provider_message_id",
        )
        .bind(order.iter().map(|m| m.channel_id).collect::<Vec<_>>())
        .bind(
            order
                .iter()
                .map(|m| m.provider_message_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(order.iter().map(|m| m.workspace_id).collect::<Vec<_>>())
        .bind(order.iter().map(|m| m.sender.as_str()).collect::<Vec<_>>())
        .bind(order.iter().map(|m| m.kind.as_str()).collect::<Vec<_>>())
        .bind(order.iter().map(|m| m.text.as_deref()).collect::<Vec<_>>())
        .bind(&payloads)
        .bind(order.iter().map(|m| m.sent_at).collect::<Vec<_>>())
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let new_keys: std::collections::HashSet<(Uuid, String)> = new_keys.into_iter().collect();
        // The same message twice in one batch: the first is the new one.
        let mut seen = std::collections::HashSet::new();
        for m in inbound {
            let key = (m.channel_id, m.provider_message_id.clone());
            if new_keys.contains(&key) && seen.insert(key) {
                fresh.push(m.clone());
            }
        }
        // Latest new message per (channel, user), in key order so concurrent batches lock the
        // window rows in the same order. Only new ones: a redelivered message whose time is
        // its delivery's (Meta gave none) would move the window again.
        let mut windows: std::collections::BTreeMap<(Uuid, String), DateTime<Utc>> =
            Default::default();
        for m in &fresh {
            let w = windows
                .entry((m.channel_id, canonical_recipient(&m.sender).into_owned()))
                .or_insert(m.sent_at);
            *w = (*w).max(m.sent_at);
        }
        sqlx::query(
            "INSERT INTO herald_windows (channel_id, recipient, last_inbound_at)
             SELECT ch, r, at FROM unnest($1::uuid[], $2::text[], $3::timestamptz[])
                    WITH ORDINALITY AS t(ch, r, at, n)
              ORDER BY n
             ON CONFLICT (channel_id, recipient) DO UPDATE
                SET last_inbound_at = greatest(herald_windows.last_inbound_at, excluded.last_inbound_at)",
        )
        .bind(windows.keys().map(|k| k.0).collect::<Vec<_>>())
        .bind(windows.keys().map(|k| k.1.as_str()).collect::<Vec<_>>())
        .bind(windows.values().copied().collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        sqlx::query(MARK_PROCESSED)
            .bind(ids)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        // Handed on in the same transaction: exactly the messages stored for the first time.
        let mut wake = Vec::new();
        if let Some(h) = hand_off.filter(|_| !fresh.is_empty()) {
            let jobs = h.jobs(&fresh);
            let out = self.enqueue_notifying(&mut tx, &jobs, now, true).await?;
            wake = notify_payloads(jobs.iter().zip(&out), now);
        }
        tx.commit().await?;
        conn.release();
        for p in wake {
            self.wakeups.apply_payload(&p);
        }
        Ok(fresh)
    }

    async fn pending_webhooks(&self, limit: i64) -> Result<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM herald_webhook_events WHERE processed_at IS NULL ORDER BY id LIMIT $1",
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
               FROM herald_inbound_messages WHERE channel_id = $1
              ORDER BY sent_at DESC, provider_message_id DESC LIMIT $2",
        )
        .bind(channel_id)
        .bind(limit.clamp(0, 10_000))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(InboundMessage {
                    channel_id: r.try_get("channel_id")?,
                    workspace_id: r.try_get("workspace_id")?,
                    provider_message_id: r.try_get("provider_message_id")?,
                    sender: r.try_get("sender")?,
                    kind: r.try_get("kind")?,
                    text: r.try_get("text")?,
                    payload: r.try_get("payload")?,
                    sent_at: r.try_get("sent_at")?,
                    profile_name: None,
                })
            })
            .collect()
    }
}
