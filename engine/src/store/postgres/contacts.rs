//! [`ContactStore`] on PostgreSQL.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use super::PgStore;
use crate::contacts::{
    attributes_from, attributes_json, merge_inbound, Contact, ContactHandle, ContactPatch,
    ContactStore, ImportCounts, InboundByHandle, InboundByPhone, InboundContact, NewContact,
};
use crate::error::{Result, StoreError};
use crate::model::InvalidJob;
use crate::store::conflict_if_taken;

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
        handles: Vec::new(),
    })
}

/// Fills in the handles of `contacts` (all of `workspace_id`), in one query.
async fn with_handles(
    pool: &sqlx::PgPool,
    workspace_id: Uuid,
    mut contacts: Vec<Contact>,
) -> Result<Vec<Contact>> {
    if contacts.is_empty() {
        return Ok(contacts);
    }
    let ids: Vec<Uuid> = contacts.iter().map(|c| c.id).collect();
    let rows = sqlx::query(
        "SELECT contact_id, channel_id, platform, external_id FROM herald_contact_handles
          WHERE workspace_id = $1 AND contact_id = ANY($2::uuid[])
          ORDER BY contact_id, created_at, channel_id, external_id",
    )
    .bind(workspace_id)
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    let mut by_contact: HashMap<Uuid, Vec<ContactHandle>> = HashMap::new();
    for r in &rows {
        let platform: String = r.try_get("platform")?;
        by_contact
            .entry(r.try_get("contact_id")?)
            .or_default()
            .push(ContactHandle {
                channel_id: r.try_get("channel_id")?,
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
    pool: &sqlx::PgPool,
    contact: Option<Contact>,
) -> Result<Option<Contact>> {
    let Some(c) = contact else {
        return Ok(None);
    };
    let ws = c.workspace_id;
    Ok(with_handles(pool, ws, vec![c]).await?.pop())
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
        .map_err(conflict_if_taken(|| {
            format!("a contact with phone {} exists", c.phone)
        }))?;
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
        let contact = row.as_ref().map(contact_from_row).transpose()?;
        one_with_handles(&self.pool, contact).await
    }

    async fn delete_contact(&self, workspace_id: Uuid, id: Uuid) -> Result<bool> {
        // The handles go with their contact, in one transaction (no foreign key: see
        // migration 0008).
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM herald_contacts WHERE workspace_id = $1 AND id = $2")
            .bind(workspace_id)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "DELETE FROM herald_contact_handles WHERE workspace_id = $1 AND contact_id = $2",
        )
        .bind(workspace_id)
        .bind(id)
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
        let (phones, handles) = merge_inbound(contacts)?;
        if phones.is_empty() && handles.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        if !phones.is_empty() {
            upsert_by_phone(&mut tx, &phones, now).await?;
        }
        if !handles.is_empty() {
            upsert_by_handle(&mut tx, &handles, now).await?;
        }
        tx.commit().await?;
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

/// WhatsApp senders: created, or found by phone (a missing name filled in, STOP applied).
async fn upsert_by_phone(
    tx: &mut sqlx::PgConnection,
    phones: &[InboundByPhone],
    now: DateTime<Utc>,
) -> Result<()> {
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
    .bind(phones.iter().map(|_| Uuid::now_v7()).collect::<Vec<_>>())
    .bind(phones.iter().map(|c| c.workspace_id).collect::<Vec<_>>())
    .bind(phones.iter().map(|c| c.phone.as_str()).collect::<Vec<_>>())
    .bind(phones.iter().map(|c| c.name.as_deref()).collect::<Vec<_>>())
    .bind(phones.iter().map(|c| c.opt_out).collect::<Vec<_>>())
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Messenger and Instagram senders: found by handle, or created as a contact without a phone
/// plus its handle.
///
/// The handle is inserted first, naming a contact id chosen here, with ON CONFLICT DO NOTHING:
/// its primary key (channel, external id) decides which of two jobs racing on the same new
/// sender creates it (the other waits for the winner's commit, then inserts nothing and finds
/// the winner's contact as an existing one, below). Contacts are created only for the handles
/// this statement inserted, so a lost race leaves no contact behind.
async fn upsert_by_handle(
    tx: &mut sqlx::PgConnection,
    handles: &[InboundByHandle],
    now: DateTime<Utc>,
) -> Result<()> {
    let ids: Vec<Uuid> = handles.iter().map(|_| Uuid::now_v7()).collect();
    let inserted: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO herald_contact_handles (channel_id, external_id, workspace_id, contact_id,
                                             platform, created_at)
         SELECT channel_id, external_id, ws, contact_id, platform, $6
           FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::uuid[], $5::text[])
                AS t(channel_id, external_id, ws, contact_id, platform)
         ON CONFLICT (channel_id, external_id) DO NOTHING
         RETURNING contact_id",
    )
    .bind(handles.iter().map(|h| h.channel_id).collect::<Vec<_>>())
    .bind(
        handles
            .iter()
            .map(|h| h.external_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(handles.iter().map(|h| h.workspace_id).collect::<Vec<_>>())
    .bind(&ids)
    .bind(
        handles
            .iter()
            .map(|h| h.platform.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(now)
    .fetch_all(&mut *tx)
    .await?;
    let inserted: std::collections::HashSet<Uuid> = inserted.into_iter().collect();
    let (new, known): (Vec<_>, Vec<_>) = handles
        .iter()
        .zip(&ids)
        .partition(|(_, id)| inserted.contains(*id));
    if !new.is_empty() {
        sqlx::query(
            "INSERT INTO herald_contacts (id, workspace_id, phone, name, opted_out, opted_out_at,
                                          created_at, updated_at)
             SELECT id, ws, NULL, name, stop, CASE WHEN stop THEN $5 END, $5, $5
               FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::bool[])
                    AS t(id, ws, name, stop)",
        )
        .bind(new.iter().map(|(_, id)| **id).collect::<Vec<_>>())
        .bind(new.iter().map(|(h, _)| h.workspace_id).collect::<Vec<_>>())
        .bind(
            new.iter()
                .map(|(h, _)| h.name.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(new.iter().map(|(h, _)| h.opt_out).collect::<Vec<_>>())
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    // Known senders: STOP opts them out (never the reverse), a missing name is filled in. Only
    // the contacts that change are touched, locked in id order.
    let known: Vec<&InboundByHandle> = known
        .into_iter()
        .map(|(h, _)| h)
        .filter(|h| h.opt_out || h.name.is_some())
        .collect();
    if !known.is_empty() {
        sqlx::query(
            "WITH t AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bool[])
                         AS t(channel_id, external_id, name, stop)),
                  target AS (
                    SELECT h.workspace_id, h.contact_id, bool_or(t.stop) AS stop,
                           min(t.name) AS name
                      FROM t JOIN herald_contact_handles h
                        ON h.channel_id = t.channel_id AND h.external_id = t.external_id
                     GROUP BY h.workspace_id, h.contact_id),
                  locked AS (
                    SELECT c.workspace_id, c.id FROM herald_contacts c
                      JOIN target ON c.workspace_id = target.workspace_id
                                 AND c.id = target.contact_id
                     WHERE (target.stop AND NOT c.opted_out)
                        OR (c.name IS NULL AND target.name IS NOT NULL)
                     ORDER BY c.workspace_id, c.id FOR UPDATE OF c)
             UPDATE herald_contacts c SET
                name = coalesce(c.name, target.name),
                opted_out = c.opted_out OR target.stop,
                opted_out_at = CASE WHEN target.stop AND NOT c.opted_out
                                    THEN $5 ELSE c.opted_out_at END,
                updated_at = CASE WHEN target.stop AND NOT c.opted_out
                                  THEN $5 ELSE c.updated_at END
               FROM target JOIN locked ON locked.workspace_id = target.workspace_id
                                      AND locked.id = target.contact_id
              WHERE c.workspace_id = locked.workspace_id AND c.id = locked.id",
        )
        .bind(known.iter().map(|h| h.channel_id).collect::<Vec<_>>())
        .bind(
            known
                .iter()
                .map(|h| h.external_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(known.iter().map(|h| h.name.as_deref()).collect::<Vec<_>>())
        .bind(known.iter().map(|h| h.opt_out).collect::<Vec<_>>())
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}
