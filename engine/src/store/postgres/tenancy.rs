//! [`TenancyStore`] on PostgreSQL.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use super::PgStore;
use crate::error::Result;
use crate::model::InvalidJob;
use crate::tenancy::{
    key_hash, key_prefix, new_key_text, ApiKey, NewApiKey, TenancyStore, Workspace,
};

const KEY_COLUMNS: &str = "id, workspace_id, name, prefix, created_at, revoked_at";

fn key_from_row(r: &PgRow) -> Result<ApiKey> {
    Ok(ApiKey {
        id: r.try_get("id")?,
        workspace_id: r.try_get("workspace_id")?,
        name: r.try_get("name")?,
        prefix: r.try_get("prefix")?,
        created_at: r.try_get("created_at")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

fn workspace_from_row(r: &PgRow) -> Result<Workspace> {
    Ok(Workspace {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        created_at: r.try_get("created_at")?,
    })
}

#[async_trait]
impl TenancyStore for PgStore {
    async fn create_workspace(&self, name: &str, now: DateTime<Utc>) -> Result<Workspace> {
        crate::tenancy::check_name(name).map_err(InvalidJob)?;
        let row = sqlx::query(
            "INSERT INTO herald_workspaces (id, name, created_at) VALUES ($1, $2, $3)
             RETURNING id, name, created_at",
        )
        .bind(Uuid::new_v4())
        .bind(name)
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        workspace_from_row(&row)
    }

    async fn workspace(&self, id: Uuid) -> Result<Option<Workspace>> {
        let row = sqlx::query("SELECT id, name, created_at FROM herald_workspaces WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(workspace_from_row).transpose()
    }

    async fn workspaces(&self, after: Option<Uuid>, limit: i64) -> Result<Vec<Workspace>> {
        let rows = sqlx::query(
            "SELECT id, name, created_at FROM herald_workspaces
              WHERE $1::uuid IS NULL OR id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after)
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
             SELECT $1, id, $3, $4, $5, $6 FROM herald_workspaces WHERE id = $2
             RETURNING {KEY_COLUMNS}"
        ))
        .bind(id)
        .bind(workspace_id)
        .bind(name)
        .bind(key_prefix(id))
        .bind(key_hash(&secret))
        .bind(now)
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
            "SELECT {KEY_COLUMNS} FROM herald_api_keys WHERE hash = $1 AND revoked_at IS NULL"
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
              WHERE workspace_id = $1 AND ($2::uuid IS NULL OR id > $2) ORDER BY id LIMIT $3"
        ))
        .bind(workspace_id)
        .bind(after)
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
            "UPDATE herald_api_keys SET revoked_at = $3
              WHERE workspace_id = $1 AND id = $2 AND revoked_at IS NULL",
        )
        .bind(workspace_id)
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }
}
