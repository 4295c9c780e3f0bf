//! [`ContactStore`] on SQLite. Labels are a JSON array.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use uuid::Uuid;

use super::{parse_uuid, SqliteStore};
use crate::clock::{from_micros, to_micros};
use crate::contacts::{
    attributes_from, attributes_json, merge_inbound, Contact, ContactHandle, ContactPatch,
    ContactStore, ImportCounts, InboundContact, NewContact,
};
use crate::error::{Result, StoreError};
use crate::model::InvalidJob;
use crate::store::conflict_if_taken;

const COLUMNS: &str = "id, workspace_id, phone, name, labels, attributes, opted_out, \
     opted_out_at, created_at, updated_at";

fn corrupt(e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn contact_from_row(r: &SqliteRow) -> Result<Contact> {
    let labels: String = r.try_get("labels")?;
    let attributes: String = r.try_get("attributes")?;
    Ok(Contact {
        id: parse_uuid(&r.try_get::<String, _>("id")?)?,
        workspace_id: parse_uuid(&r.try_get::<String, _>("workspace_id")?)?,
        phone: r.try_get("phone")?,
        name: r.try_get("name")?,
        labels: serde_json::from_str(&labels).map_err(corrupt)?,
        attributes: attributes_from(serde_json::from_str(&attributes).map_err(corrupt)?),
        opted_out: r.try_get("opted_out")?,
        opted_out_at: r
            .try_get::<Option<i64>, _>("opted_out_at")?
            .map(from_micros),
        created_at: from_micros(r.try_get("created_at")?),
        updated_at: from_micros(r.try_get("updated_at")?),
        handles: Vec::new(),
    })
}

/// Fills in the handles of `contacts` (all of `workspace_id`), in one query.
async fn with_handles(
    pool: &sqlx::SqlitePool,
    workspace_id: Uuid,
    mut contacts: Vec<Contact>,
) -> Result<Vec<Contact>> {
    if contacts.is_empty() {
        return Ok(contacts);
    }
    let ids: Vec<String> = contacts.iter().map(|c| c.id.to_string()).collect();
    let rows = sqlx::query(
        "SELECT contact_id, channel_id, platform, external_id FROM herald_contact_handles
          WHERE workspace_id = ?1 AND contact_id IN (SELECT value FROM json_each(?2))
          ORDER BY contact_id, created_at, channel_id, external_id",
    )
    .bind(workspace_id.to_string())
    .bind(serde_json::to_string(&ids).map_err(corrupt)?)
    .fetch_all(pool)
    .await?;
    let mut by_contact: HashMap<Uuid, Vec<ContactHandle>> = HashMap::new();
    for r in &rows {
        let platform: String = r.try_get("platform")?;
        by_contact
            .entry(parse_uuid(&r.try_get::<String, _>("contact_id")?)?)
            .or_default()
            .push(ContactHandle {
                channel_id: parse_uuid(&r.try_get::<String, _>("channel_id")?)?,
                platform: platform.parse().map_err(StoreError::Corrupt)?,
                external_id: r.try_get("external_id")?,
            });
    }
    for c in &mut contacts {
        c.handles = by_contact.remove(&c.id).unwrap_or_default();
    }
    Ok(contacts)
}

async fn one_with_handles(
    pool: &sqlx::SqlitePool,
    contact: Option<Contact>,
) -> Result<Option<Contact>> {
    let Some(c) = contact else {
        return Ok(None);
    };
    let ws = c.workspace_id;
    Ok(with_handles(pool, ws, vec![c]).await?.pop())
}

fn labels_json(labels: &[String]) -> String {
    serde_json::to_string(labels).unwrap_or_else(|_| "[]".into())
}

#[async_trait]
impl ContactStore for SqliteStore {
    async fn create_contact(
        &self,
        workspace_id: Uuid,
        contact: &NewContact,
        now: DateTime<Utc>,
    ) -> Result<Contact> {
        let c = contact.normalized().map_err(InvalidJob)?;
        let row = sqlx::query(&format!(
            "INSERT INTO herald_contacts ({COLUMNS})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, CASE WHEN ?7 THEN ?8 END, ?8, ?8)
             RETURNING {COLUMNS}"
        ))
        .bind(Uuid::now_v7().to_string())
        .bind(workspace_id.to_string())
        .bind(&c.phone)
        .bind(&c.name)
        .bind(labels_json(&c.labels))
        .bind(attributes_json(&c.attributes))
        .bind(c.opted_out)
        .bind(to_micros(now))
        .fetch_one(&self.pool)
        .await
        .map_err(conflict_if_taken(|| {
            format!("a contact with phone {} exists", c.phone)
        }))?;
        contact_from_row(&row)
    }

    async fn contact(&self, workspace_id: Uuid, id: Uuid) -> Result<Option<Contact>> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM herald_contacts WHERE workspace_id = ?1 AND id = ?2"
        ))
        .bind(workspace_id.to_string())
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        let contact = row.as_ref().map(contact_from_row).transpose()?;
        one_with_handles(&self.pool, contact).await
    }

    async fn contacts(
        &self,
        workspace_id: Uuid,
        label: Option<&str>,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<Contact>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM herald_contacts
              WHERE workspace_id = ?1 AND (?2 IS NULL OR id > ?2)
                AND (?3 IS NULL OR EXISTS (SELECT 1 FROM json_each(labels) WHERE value = ?3))
              ORDER BY id LIMIT ?4"
        ))
        .bind(workspace_id.to_string())
        .bind(after.map(|a| a.to_string()))
        .bind(label)
        .bind(limit.clamp(0, 1_000))
        .fetch_all(&self.pool)
        .await?;
        let contacts = rows
            .iter()
            .map(contact_from_row)
            .collect::<Result<Vec<_>>>()?;
        with_handles(&self.pool, workspace_id, contacts).await
    }

    async fn update_contact(
        &self,
        workspace_id: Uuid,
        id: Uuid,
        patch: &ContactPatch,
        now: DateTime<Utc>,
    ) -> Result<Option<Contact>> {
        let p = patch.normalized().map_err(InvalidJob)?;
        let row = sqlx::query(&format!(
            "UPDATE herald_contacts SET
                name = CASE WHEN ?3 THEN nullif(?4, '') ELSE name END,
                labels = coalesce(?5, labels),
                attributes = coalesce(?6, attributes),
                opted_out_at = CASE WHEN ?7 IS NULL OR ?7 = opted_out THEN opted_out_at
                                    WHEN ?7 THEN ?8 END,
                opted_out = coalesce(?7, opted_out),
                updated_at = ?8
              WHERE workspace_id = ?1 AND id = ?2
              RETURNING {COLUMNS}"
        ))
        .bind(workspace_id.to_string())
        .bind(id.to_string())
        .bind(p.name.is_some())
        .bind(p.name.as_deref())
        .bind(p.labels.as_deref().map(labels_json))
        .bind(p.attributes.as_ref().map(attributes_json))
        .bind(p.opted_out)
        .bind(to_micros(now))
        .fetch_optional(&self.pool)
        .await?;
        let contact = row.as_ref().map(contact_from_row).transpose()?;
        one_with_handles(&self.pool, contact).await
    }

    async fn delete_contact(&self, workspace_id: Uuid, id: Uuid) -> Result<bool> {
        // The handles go with their contact, in one transaction (no foreign key: see
        // migration 0008).
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM herald_contacts WHERE workspace_id = ?1 AND id = ?2")
            .bind(workspace_id.to_string())
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "DELETE FROM herald_contact_handles WHERE workspace_id = ?1 AND contact_id = ?2",
        )
        .bind(workspace_id.to_string())
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    async fn import_contacts(
        &self,
        workspace_id: Uuid,
        contacts: &[NewContact],
        now: DateTime<Utc>,
    ) -> Result<ImportCounts> {
        let mut last: HashMap<&str, usize> = HashMap::with_capacity(contacts.len());
        for (i, c) in contacts.iter().enumerate() {
            last.insert(c.phone.as_str(), i);
        }
        let mut rows: Vec<usize> = last.into_values().collect();
        rows.sort_unstable();
        let mut tx = self.pool.begin().await?;
        let mut stored = 0;
        for chunk in rows.chunks(5_000) {
            let data: Vec<serde_json::Value> = chunk
                .iter()
                .map(|&i| {
                    let c = &contacts[i];
                    serde_json::json!([
                        Uuid::now_v7().to_string(),
                        c.phone,
                        c.name,
                        labels_json(&c.labels),
                        attributes_json(&c.attributes),
                        c.opted_out,
                    ])
                })
                .collect();
            stored += sqlx::query(
                "INSERT INTO herald_contacts (id, workspace_id, phone, name, labels, attributes,
                                              opted_out, opted_out_at, created_at, updated_at)
                 SELECT value->>0, ?2, value->>1, value->>2, value->>3, value->>4,
                        value->>5, CASE WHEN value->>5 THEN ?3 END, ?3, ?3
                   FROM json_each(?1) WHERE true
                 ON CONFLICT (workspace_id, phone) DO UPDATE SET
                    name = coalesce(excluded.name, herald_contacts.name),
                    labels = excluded.labels,
                    attributes = json_patch(herald_contacts.attributes, excluded.attributes),
                    opted_out = herald_contacts.opted_out OR excluded.opted_out,
                    opted_out_at = coalesce(herald_contacts.opted_out_at, excluded.opted_out_at),
                    updated_at = excluded.updated_at",
            )
            .bind(serde_json::to_string(&data).map_err(corrupt)?)
            .bind(workspace_id.to_string())
            .bind(to_micros(now))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(ImportCounts { stored })
    }

    async fn upsert_inbound_contacts(
        &self,
        contacts: &[InboundContact],
        now: DateTime<Utc>,
    ) -> Result<()> {
        let (phones, handles) = merge_inbound(contacts)?;
        if phones.is_empty() && handles.is_empty() {
            return Ok(());
        }
        let now = to_micros(now);
        let mut tx = self.pool.begin().await?;
        for c in &phones {
            sqlx::query(
                "INSERT INTO herald_contacts (id, workspace_id, phone, name, opted_out, opted_out_at,
                                              created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, CASE WHEN ?5 THEN ?6 END, ?6, ?6)
                 ON CONFLICT (workspace_id, phone) DO UPDATE SET
                    name = coalesce(herald_contacts.name, excluded.name),
                    opted_out = herald_contacts.opted_out OR excluded.opted_out,
                    opted_out_at = coalesce(herald_contacts.opted_out_at, excluded.opted_out_at),
                    updated_at = CASE WHEN excluded.opted_out AND NOT herald_contacts.opted_out
                                      THEN excluded.updated_at ELSE herald_contacts.updated_at END",
            )
            .bind(Uuid::now_v7().to_string())
            .bind(c.workspace_id.to_string())
            .bind(&c.phone)
            .bind(c.name.as_deref())
            .bind(c.opt_out)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        // Messenger and Instagram senders: the handle first, naming a new contact id, and the
        // contact only if the handle was new (as on PostgreSQL, where jobs race; here the one
        // writer connection runs them one at a time). A known sender's STOP opts them out and a
        // missing name is filled in.
        for h in &handles {
            let inserted: Option<String> = sqlx::query_scalar(
                "INSERT INTO herald_contact_handles (channel_id, external_id, workspace_id,
                                                     contact_id, platform, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (channel_id, external_id) DO NOTHING
                 RETURNING contact_id",
            )
            .bind(h.channel_id.to_string())
            .bind(&h.external_id)
            .bind(h.workspace_id.to_string())
            .bind(Uuid::now_v7().to_string())
            .bind(h.platform.as_str())
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(contact_id) = inserted {
                sqlx::query(
                    "INSERT INTO herald_contacts (id, workspace_id, phone, name, opted_out,
                                                  opted_out_at, created_at, updated_at)
                     VALUES (?1, ?2, NULL, ?3, ?4, CASE WHEN ?4 THEN ?5 END, ?5, ?5)",
                )
                .bind(contact_id)
                .bind(h.workspace_id.to_string())
                .bind(h.name.as_deref())
                .bind(h.opt_out)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            } else if h.opt_out || h.name.is_some() {
                sqlx::query(
                    "UPDATE herald_contacts SET
                        name = coalesce(name, ?3),
                        opted_out_at = CASE WHEN ?4 AND NOT opted_out THEN ?5 ELSE opted_out_at END,
                        updated_at = CASE WHEN ?4 AND NOT opted_out THEN ?5 ELSE updated_at END,
                        opted_out = opted_out OR ?4
                      WHERE (workspace_id, id) IN (
                            SELECT workspace_id, contact_id FROM herald_contact_handles
                             WHERE channel_id = ?1 AND external_id = ?2)
                        AND ((?4 AND NOT opted_out) OR (name IS NULL AND ?3 IS NOT NULL))",
                )
                .bind(h.channel_id.to_string())
                .bind(&h.external_id)
                .bind(h.name.as_deref())
                .bind(h.opt_out)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn contact_count(&self, workspace_id: Uuid) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM herald_contacts WHERE workspace_id = ?1")
                .bind(workspace_id.to_string())
                .fetch_one(&self.pool)
                .await?,
        )
    }
}
