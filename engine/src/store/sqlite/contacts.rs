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
    attributes_from, attributes_json, merge_inbound, Contact, ContactPatch, ContactStore,
    ImportCounts, InboundContact, NewContact,
};
use crate::error::{Result, StoreError};
use crate::model::InvalidJob;

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
    })
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
        .map_err(|e| match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                StoreError::Conflict(format!("a contact with phone {} exists", c.phone))
            }
            _ => e.into(),
        })?;
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
        row.as_ref().map(contact_from_row).transpose()
    }

    async fn delete_contact(&self, workspace_id: Uuid, id: Uuid) -> Result<bool> {
        let done = sqlx::query("DELETE FROM herald_contacts WHERE workspace_id = ?1 AND id = ?2")
            .bind(workspace_id.to_string())
            .bind(id.to_string())
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
        let merged = merge_inbound(contacts);
        if merged.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for c in &merged {
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
            .bind(to_micros(now))
            .execute(&mut *tx)
            .await?;
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
