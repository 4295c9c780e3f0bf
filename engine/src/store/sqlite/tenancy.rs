//! [`TenancyStore`] on SQLite.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use uuid::Uuid;

use super::{parse_uuid, SqliteStore};
use crate::clock::{from_micros, to_micros};
use crate::error::Result;
use crate::model::InvalidJob;
use crate::tenancy::{
    key_hash, key_prefix, new_key_text, ApiKey, NewApiKey, TenancyStore, Workspace,
};

const KEY_COLUMNS: &str = "id, workspace_id, name, prefix, created_at, revoked_at";

fn key_from_row(r: &SqliteRow) -> Result<ApiKey> {
    Ok(ApiKey {
        id: parse_uuid(&r.try_get::<String, _>("id")?)?,
        workspace_id: parse_uuid(&r.try_get::<String, _>("workspace_id")?)?,
        name: r.try_get("name")?,
        prefix: r.try_get("prefix")?,
        created_at: from_micros(r.try_get("created_at")?),
        revoked_at: r.try_get::<Option<i64>, _>("revoked_at")?.map(from_micros),
    })
}

fn workspace_from_row(r: &SqliteRow) -> Result<Workspace> {
    Ok(Workspace {
        id: parse_uuid(&r.try_get::<String, _>("id")?)?,
        name: r.try_get("name")?,
        created_at: from_micros(r.try_get("created_at")?),
    })
}

#[async_trait]
impl TenancyStore for SqliteStore {
    async fn create_workspace(&self, name: &str, now: DateTime<Utc>) -> Result<Workspace> {
        crate::tenancy::check_name(name).map_err(InvalidJob)?;
        let row = sqlx::query(
            "INSERT INTO herald_workspaces (id, name, created_at) VALUES (?1, ?2, ?3)
             RETURNING id, name, created_at",
        )
        .bind(Uuid::new_v4().to_string())
        .bind(name)
        .bind(to_micros(now))
        .fetch_one(&self.pool)
        .await?;
        workspace_from_row(&row)
    }

    async fn workspace(&self, id: Uuid) -> Result<Option<Workspace>> {
        let row = sqlx::query("SELECT id, name, created_at FROM herald_workspaces WHERE id = ?1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(workspace_from_row).transpose()
    }

    async fn workspaces(&self, after: Option<Uuid>, limit: i64) -> Result<Vec<Workspace>> {
        let rows = sqlx::query(
            "SELECT id, name, created_at FROM herald_workspaces
              WHERE ?1 IS NULL OR id > ?1 ORDER BY id LIMIT ?2",
        )
        .bind(after.map(|a| a.to_string()))
        .bind(limit.clamp(0, 1_000))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(workspace_from_row).collect()
    }

    async fn create_api_key(
        &self,
        workspace_id: Uuid,
        name: &str,
        now: DateTime<Utc>,
    ) -> Result<NewApiKey> {
        crate::tenancy::check_name(name).map_err(InvalidJob)?;
        let id = Uuid::new_v4();
        let secret = new_key_text(id);
        let row = sqlx::query(&format!(
            "INSERT INTO herald_api_keys (id, workspace_id, name, prefix, hash, created_at)
             SELECT ?1, id, ?3, ?4, ?5, ?6 FROM herald_workspaces WHERE id = ?2
             RETURNING {KEY_COLUMNS}"
        ))
        .bind(id.to_string())
        .bind(workspace_id.to_string())
        .bind(name)
        .bind(key_prefix(id))
        .bind(key_hash(&secret))
        .bind(to_micros(now))
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| InvalidJob(format!("no workspace {workspace_id}")))?;
        Ok(NewApiKey {
            key: key_from_row(&row)?,
            secret,
        })
    }

    async fn authenticate(&self, presented: &str) -> Result<Option<ApiKey>> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM herald_api_keys WHERE hash = ?1 AND revoked_at IS NULL"
        ))
        .bind(key_hash(presented))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    async fn api_keys(
        &self,
        workspace_id: Uuid,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<ApiKey>> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM herald_api_keys
              WHERE workspace_id = ?1 AND (?2 IS NULL OR id > ?2) ORDER BY id LIMIT ?3"
        ))
        .bind(workspace_id.to_string())
        .bind(after.map(|a| a.to_string()))
        .bind(limit.clamp(0, 1_000))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_from_row).collect()
    }

    async fn revoke_api_key(
        &self,
        workspace_id: Uuid,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE herald_api_keys SET revoked_at = ?3
              WHERE workspace_id = ?1 AND id = ?2 AND revoked_at IS NULL",
        )
        .bind(workspace_id.to_string())
        .bind(id.to_string())
        .bind(to_micros(now))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }
}
