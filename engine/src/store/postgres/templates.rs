//! [`TemplateStore`] on PostgreSQL.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use super::PgStore;
use crate::error::Result;
use crate::model::InvalidJob;
use crate::store::conflict_if_taken;
use crate::templates::{
    category_from, parameters_from_json, parameters_json, NewTemplate, Template, TemplatePatch,
    TemplateStore,
};

const COLUMNS: &str =
    "id, workspace_id, name, language, category, parameters::text AS parameters, created_at, updated_at";

fn template_from_row(r: &PgRow) -> Result<Template> {
    Ok(Template {
        id: r.try_get("id")?,
        workspace_id: r.try_get("workspace_id")?,
        name: r.try_get("name")?,
        language: r.try_get("language")?,
        category: category_from(r.try_get("category")?)?,
        parameters: parameters_from_json(r.try_get("parameters")?)?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

#[async_trait]
impl TemplateStore for PgStore {
    async fn create_template(
        &self,
        workspace_id: Uuid,
        template: &NewTemplate,
        now: DateTime<Utc>,
    ) -> Result<Template> {
        template.check().map_err(InvalidJob)?;
        let row = sqlx::query(&format!(
            "INSERT INTO herald_templates (id, workspace_id, name, language, category, parameters,
                    created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $7)
             RETURNING {COLUMNS}"
        ))
        .bind(Uuid::now_v7())
        .bind(workspace_id)
        .bind(&template.name)
        .bind(&template.language)
        .bind(template.category.as_str())
        .bind(parameters_json(&template.parameters))
        .bind(now)
        .fetch_one(&self.pool)
        .await
        .map_err(conflict_if_taken(|| {
            format!(
                "a template {} in {} exists",
                template.name, template.language
            )
        }))?;
        template_from_row(&row)
    }

    async fn template(&self, workspace_id: Uuid, id: Uuid) -> Result<Option<Template>> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM herald_templates WHERE workspace_id = $1 AND id = $2"
        ))
        .bind(workspace_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(template_from_row).transpose()
    }

    async fn template_named(
        &self,
        workspace_id: Uuid,
        name: &str,
        language: &str,
    ) -> Result<Option<Template>> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM herald_templates
              WHERE workspace_id = $1 AND name = $2 AND language = $3"
        ))
        .bind(workspace_id)
        .bind(name)
        .bind(language)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(template_from_row).transpose()
    }

    async fn templates(
        &self,
        workspace_id: Uuid,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<Template>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM herald_templates
              WHERE workspace_id = $1 AND ($2::uuid IS NULL OR id > $2)
              ORDER BY id LIMIT $3"
        ))
        .bind(workspace_id)
        .bind(after)
        .bind(limit.clamp(0, 1_000))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(template_from_row).collect()
    }

    async fn update_template(
        &self,
        workspace_id: Uuid,
        id: Uuid,
        patch: &TemplatePatch,
        now: DateTime<Utc>,
    ) -> Result<Option<Template>> {
        patch.check().map_err(InvalidJob)?;
        let row = sqlx::query(&format!(
            "UPDATE herald_templates
                SET category = COALESCE($3, category),
                    parameters = COALESCE($4::jsonb, parameters),
                    updated_at = $5
              WHERE workspace_id = $1 AND id = $2
             RETURNING {COLUMNS}"
        ))
        .bind(workspace_id)
        .bind(id)
        .bind(patch.category.map(|c| c.as_str()))
        .bind(patch.parameters.as_deref().map(parameters_json))
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(template_from_row).transpose()
    }

    async fn delete_template(&self, workspace_id: Uuid, id: Uuid) -> Result<bool> {
        let done = sqlx::query("DELETE FROM herald_templates WHERE workspace_id = $1 AND id = $2")
            .bind(workspace_id)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }
}
