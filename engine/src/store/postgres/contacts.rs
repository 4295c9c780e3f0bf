//! [`ContactStore`] on PostgreSQL.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use super::PgStore;
use crate::contacts::{
    attributes_from, attributes_json, merge_inbound, Contact, ContactPatch, ContactStore,
    ImportCounts, InboundContact, NewContact,
};
use crate::error::{Result, StoreError};
use crate::model::InvalidJob;

const COLUMNS: &str = "id, workspace_id, phone, name, labels, attributes, opted_out, \
     opted_out_at, created_at, updated_at";

/// Labels travel to `unnest` joined by the unit separator, which labels cannot contain
/// (control characters are refused).
const SEP: &str = "\u{1f}";

fn contact_from_row(r: &PgRow) -> Result<Contact> {
    Ok(Contact {
        id: r.try_get("id")?,
        workspace_id: r.try_get("workspace_id")?,
        phone: r.try_get("phone")?,
        name: r.try_get("name")?,
        labels: r.try_get("labels")?,
        attributes: attributes_from(r.try_get("attributes")?),
        opted_out: r.try_get("opted_out")?,
        opted_out_at: r.try_get("opted_out_at")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

#[async_trait]
impl ContactStore for PgStore {
    async fn create_contact(
        &self,
        workspace_id: Uuid,
        contact: &NewContact,
        now: DateTime<Utc>,
    ) -> Result<Contact> {
        let c = contact.normalized().map_err(InvalidJob)?;
        let row = sqlx::query(&format!(
            "INSERT INTO herald_contacts ({COLUMNS})
             VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, CASE WHEN $7 THEN $8 END, $8, $8)
             RETURNING {COLUMNS}"
        ))
        .bind(Uuid::now_v7())
        .bind(workspace_id)
        .bind(&c.phone)
        .bind(&c.name)
        .bind(&c.labels)
        .bind(attributes_json(&c.attributes))
        .bind(c.opted_out)
        .bind(now)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StoreError::Conflict(format!("a contact with phone {} exists", c.phone))
            } else {
                e.into()
            }
        })?;
        contact_from_row(&row)
    }

    async fn contact(&self, workspace_id: Uuid, id: Uuid) -> Result<Option<Contact>> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM herald_contacts WHERE workspace_id = $1 AND id = $2"
        ))
        .bind(workspace_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(contact_from_row).transpose()
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
              WHERE workspace_id = $1 AND ($2::uuid IS NULL OR id > $2)
                AND ($3::text IS NULL OR labels @> ARRAY[$3::text])
              ORDER BY id LIMIT $4"
        ))
        .bind(workspace_id)
        .bind(after)
        .bind(label)
        .bind(limit.clamp(0, 1_000))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(contact_from_row).collect()
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
                name = CASE WHEN $3 THEN nullif($4, '') ELSE name END,
                labels = coalesce($5, labels),
                attributes = coalesce($6::jsonb, attributes),
                opted_out_at = CASE WHEN $7::boolean IS NULL OR $7 = opted_out THEN opted_out_at
                                    WHEN $7 THEN $8 END,
                opted_out = coalesce($7, opted_out),
                updated_at = $8
              WHERE workspace_id = $1 AND id = $2
              RETURNING {COLUMNS}"
        ))
        .bind(workspace_id)
        .bind(id)
        .bind(p.name.is_some())
        .bind(p.name.as_deref())
        .bind(p.labels.as_ref())
        .bind(p.attributes.as_ref().map(attributes_json))
        .bind(p.opted_out)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(contact_from_row).transpose()
    }

    async fn delete_contact(&self, workspace_id: Uuid, id: Uuid) -> Result<bool> {
        let done = sqlx::query("DELETE FROM herald_contacts WHERE workspace_id = $1 AND id = $2")
            .bind(workspace_id)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn import_contacts(
        &self,
        workspace_id: Uuid,
        contacts: &[NewContact],
        now: DateTime<Utc>,
    ) -> Result<ImportCounts> {
        // One row per phone (the last wins): ON CONFLICT cannot touch a row twice.
        let mut last: HashMap<&str, usize> = HashMap::with_capacity(contacts.len());
        for (i, c) in contacts.iter().enumerate() {
            last.insert(c.phone.as_str(), i);
        }
        let mut rows: Vec<usize> = last.into_values().collect();
        rows.sort_unstable();
        let mut tx = self.pool.begin().await?;
        let mut stored = 0;
        for chunk in rows.chunks(20_000) {
            let pick = |f: &dyn Fn(&NewContact) -> String| -> Vec<String> {
                chunk.iter().map(|&i| f(&contacts[i])).collect()
            };
            let ids: Vec<Uuid> = chunk.iter().map(|_| Uuid::now_v7()).collect();
            let names: Vec<Option<&str>> =
                chunk.iter().map(|&i| contacts[i].name.as_deref()).collect();
            let opted: Vec<bool> = chunk.iter().map(|&i| contacts[i].opted_out).collect();
            stored += sqlx::query(
                "INSERT INTO herald_contacts (id, workspace_id, phone, name, labels, attributes,
                                              opted_out, opted_out_at, created_at, updated_at)
                 SELECT id, $1, phone, name,
                        CASE WHEN labels = '' THEN '{}'::text[] ELSE string_to_array(labels, $8) END,
                        attrs::jsonb, opted, CASE WHEN opted THEN $7 END, $7, $7
                   FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $9::bool[])
                        AS t(id, phone, name, labels, attrs, opted)
                 ON CONFLICT (workspace_id, phone) DO UPDATE SET
                    name = coalesce(excluded.name, herald_contacts.name),
                    labels = excluded.labels,
                    attributes = herald_contacts.attributes || excluded.attributes,
                    -- An import never resubscribes someone who opted out.
                    opted_out = herald_contacts.opted_out OR excluded.opted_out,
                    opted_out_at = coalesce(herald_contacts.opted_out_at, excluded.opted_out_at),
                    updated_at = excluded.updated_at",
            )
            .bind(workspace_id)
            .bind(&ids)
            .bind(pick(&|c| c.phone.clone()))
            .bind(&names)
            .bind(pick(&|c| c.labels.join(SEP)))
            .bind(pick(&|c| attributes_json(&c.attributes)))
            .bind(now)
            .bind(SEP)
            .bind(&opted)
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
        let merged = merge_inbound(contacts);
        if merged.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO herald_contacts (id, workspace_id, phone, name, opted_out, opted_out_at,
                                          created_at, updated_at)
             SELECT id, ws, phone, name, stop, CASE WHEN stop THEN $6 END, $6, $6
               FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bool[])
                    AS t(id, ws, phone, name, stop)
             ON CONFLICT (workspace_id, phone) DO UPDATE SET
                name = coalesce(herald_contacts.name, excluded.name),
                opted_out = herald_contacts.opted_out OR excluded.opted_out,
                opted_out_at = coalesce(herald_contacts.opted_out_at, excluded.opted_out_at),
                updated_at = CASE WHEN excluded.opted_out AND NOT herald_contacts.opted_out
                                  THEN excluded.updated_at ELSE herald_contacts.updated_at END",
        )
        .bind(merged.iter().map(|_| Uuid::now_v7()).collect::<Vec<_>>())
        .bind(merged.iter().map(|c| c.workspace_id).collect::<Vec<_>>())
        .bind(merged.iter().map(|c| c.phone.as_str()).collect::<Vec<_>>())
        .bind(merged.iter().map(|c| c.name.as_deref()).collect::<Vec<_>>())
        .bind(merged.iter().map(|c| c.opt_out).collect::<Vec<_>>())
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn contact_count(&self, workspace_id: Uuid) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM herald_contacts WHERE workspace_id = $1")
                .bind(workspace_id)
                .fetch_one(&self.pool)
                .await?,
        )
    }
}
