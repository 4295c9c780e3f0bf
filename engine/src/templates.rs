//! WhatsApp message templates: references to templates approved in Meta's WhatsApp Manager (a
//! name and a language), with the body parameters a send must fill. Outside the 24 h service
//! window only a template may be sent, so campaigns and flows name one of these and fill its
//! parameters per recipient ([`Template::message`]).
//!
//! Herald does not submit templates to Meta for approval; it refuses, before anything is sent,
//! a send whose parameters do not match the reference (a missing, unknown or malformed value),
//! which Meta would answer with error 132000 (wrong number of parameters) or 132018
//! (parameter format) for every recipient.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::delivery::Message;
use crate::error::Result;

/// Body parameters per template at most (Meta allows far fewer in practice).
pub const MAX_PARAMETERS: usize = 100;
/// Characters of one parameter value at most (Meta's body limit is 1,024 in all).
pub const MAX_VALUE_CHARS: usize = 1024;

/// Meta's template categories; they decide the price and who may receive it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TemplateCategory {
    Marketing,
    Utility,
    Authentication,
}

impl TemplateCategory {
    pub fn as_str(self) -> &'static str {
        match self {
            TemplateCategory::Marketing => "marketing",
            TemplateCategory::Utility => "utility",
            TemplateCategory::Authentication => "authentication",
        }
    }

    pub fn parse(s: &str) -> Option<TemplateCategory> {
        match s {
            "marketing" => Some(TemplateCategory::Marketing),
            "utility" => Some(TemplateCategory::Utility),
            "authentication" => Some(TemplateCategory::Authentication),
            _ => None,
        }
    }
}

/// One body parameter (`{{1}}`, `{{2}}`, ... in order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateParameter {
    /// What a send names the value by (`first_name`, `order_id`): `[a-z0-9_]`, 1 to 64.
    pub name: String,
    /// A sample value, for people and previews.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub example: Option<String>,
}

/// A template reference as stored.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Template {
    pub id: Uuid,
    pub workspace_id: Uuid,
    /// The template's name in WhatsApp Manager: `[a-z0-9_]`, at most 512.
    pub name: String,
    /// Meta's language code: `en`, `en_US`, `pt_BR`.
    pub language: String,
    pub category: TemplateCategory,
    /// The body's parameters, in order.
    pub parameters: Vec<TemplateParameter>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A template reference to create. (name, language) is unique in a workspace.
#[derive(Debug, Clone, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTemplate {
    pub name: String,
    pub language: String,
    pub category: TemplateCategory,
    #[serde(default)]
    pub parameters: Vec<TemplateParameter>,
}

/// Changes to a template reference; absent fields stay. Name and language are its identity and
/// do not change (create another reference instead).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplatePatch {
    #[serde(default)]
    pub category: Option<TemplateCategory>,
    /// Replaces the parameters as a whole.
    #[serde(default)]
    pub parameters: Option<Vec<TemplateParameter>>,
}

fn is_ident(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Meta's language codes: two or three lowercase letters, optionally `_` and a region
/// (`en`, `en_US`, `es_AR`, `zh_HK`, `fil`).
pub fn check_language(code: &str) -> std::result::Result<(), String> {
    let (lang, region) = match code.split_once('_') {
        Some((l, r)) => (l, Some(r)),
        None => (code, None),
    };
    let lang_ok = (2..=3).contains(&lang.len()) && lang.bytes().all(|b| b.is_ascii_lowercase());
    let region_ok = region
        .is_none_or(|r| (2..=4).contains(&r.len()) && r.bytes().all(|b| b.is_ascii_uppercase()));
    if lang_ok && region_ok {
        Ok(())
    } else {
        Err(format!(
            "{code:?} is not a Meta language code (like en, en_US or pt_BR)"
        ))
    }
}

pub(crate) fn check_parameters(params: &[TemplateParameter]) -> std::result::Result<(), String> {
    if params.len() > MAX_PARAMETERS {
        return Err(format!("at most {MAX_PARAMETERS} parameters"));
    }
    for (i, p) in params.iter().enumerate() {
        if !is_ident(&p.name, 64) {
            return Err(format!(
                "parameter {} needs a name of [a-z0-9_], 1 to 64 characters",
                i + 1
            ));
        }
        if params[..i].iter().any(|q| q.name == p.name) {
            return Err(format!("parameter {:?} is named twice", p.name));
        }
        if let Some(e) = &p.example {
            check_value(&p.name, e)?;
        }
    }
    Ok(())
}

/// Meta refuses a parameter that is empty, has a new line or tab, more than four spaces in a
/// row (132018), or is too long.
fn check_value(name: &str, v: &str) -> std::result::Result<(), String> {
    if v.trim().is_empty() {
        return Err(format!("parameter {name:?} is empty"));
    }
    if v.chars().count() > MAX_VALUE_CHARS {
        return Err(format!(
            "parameter {name:?} has more than {MAX_VALUE_CHARS} characters"
        ));
    }
    if v.chars()
        .any(|c| c == '\n' || c == '\t' || c == '\r' || c == '\0')
    {
        return Err(format!(
            "parameter {name:?} contains a new line or tab, which WhatsApp refuses"
        ));
    }
    if v.contains("     ") {
        return Err(format!(
            "parameter {name:?} has more than four spaces in a row, which WhatsApp refuses"
        ));
    }
    Ok(())
}

impl NewTemplate {
    /// Checks everything a store would refuse, before anything is written.
    pub fn check(&self) -> std::result::Result<(), String> {
        if !is_ident(&self.name, 512) {
            return Err("a template name is [a-z0-9_], 1 to 512 characters".into());
        }
        check_language(&self.language)?;
        check_parameters(&self.parameters)
    }
}

impl TemplatePatch {
    pub fn check(&self) -> std::result::Result<(), String> {
        match &self.parameters {
            Some(p) => check_parameters(p),
            None => Ok(()),
        }
    }
}

impl Template {
    /// The message that sends this template with `values` (by parameter name): every parameter
    /// needs a value, no unknown name is taken (a typo would otherwise send a blank), and every
    /// value must be one WhatsApp accepts.
    pub fn message(
        &self,
        values: &BTreeMap<String, String>,
    ) -> std::result::Result<Message, String> {
        if let Some(unknown) = values
            .keys()
            .find(|k| !self.parameters.iter().any(|p| &p.name == *k))
        {
            return Err(format!(
                "template {} has no parameter {unknown:?}",
                self.name
            ));
        }
        let mut parameters = Vec::with_capacity(self.parameters.len());
        for p in &self.parameters {
            let Some(v) = values.get(&p.name) else {
                return Err(format!("parameter {:?} needs a value", p.name));
            };
            check_value(&p.name, v)?;
            parameters.push(v.clone());
        }
        Ok(Message::Template {
            name: self.name.clone(),
            language: self.language.clone(),
            parameters,
        })
    }
}

/// Where template references live.
#[async_trait]
pub trait TemplateStore: Send + Sync + 'static {
    /// Creates a reference; `StoreError::Conflict` if the workspace has one of that name and
    /// language, `StoreError::Invalid` if [`NewTemplate::check`] refuses it.
    async fn create_template(
        &self,
        workspace_id: Uuid,
        template: &NewTemplate,
        now: DateTime<Utc>,
    ) -> Result<Template>;
    async fn template(&self, workspace_id: Uuid, id: Uuid) -> Result<Option<Template>>;
    /// The reference of that name and language.
    async fn template_named(
        &self,
        workspace_id: Uuid,
        name: &str,
        language: &str,
    ) -> Result<Option<Template>>;
    /// References in id order after `after`, at most `limit`.
    async fn templates(
        &self,
        workspace_id: Uuid,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<Template>>;
    async fn update_template(
        &self,
        workspace_id: Uuid,
        id: Uuid,
        patch: &TemplatePatch,
        now: DateTime<Utc>,
    ) -> Result<Option<Template>>;
    async fn delete_template(&self, workspace_id: Uuid, id: Uuid) -> Result<bool>;
}

/// The parameters as stored (JSON text on both backends).
pub(crate) fn parameters_json(p: &[TemplateParameter]) -> String {
    serde_json::to_string(p).unwrap_or_else(|_| "[]".into())
}

pub(crate) fn parameters_from_json(s: &str) -> Result<Vec<TemplateParameter>> {
    serde_json::from_str(s)
        .map_err(|e| crate::error::StoreError::Corrupt(format!("template parameters: {e}")))
}

pub(crate) fn category_from(s: &str) -> Result<TemplateCategory> {
    TemplateCategory::parse(s)
        .ok_or_else(|| crate::error::StoreError::Corrupt(format!("template category {s:?}")))
}

/// Values by name, for [`Template::message`].
pub type TemplateValues = BTreeMap<String, String>;

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> Template {
        Template {
            id: Uuid::nil(),
            workspace_id: Uuid::nil(),
            name: "order_update".into(),
            language: "en_US".into(),
            category: TemplateCategory::Utility,
            parameters: vec![
                TemplateParameter {
                    name: "first_name".into(),
                    example: Some("Ana".into()),
                },
                TemplateParameter {
                    name: "order_id".into(),
                    example: None,
                },
            ],
            created_at: DateTime::<Utc>::UNIX_EPOCH,
            updated_at: DateTime::<Utc>::UNIX_EPOCH,
        }
    }

    fn values(pairs: &[(&str, &str)]) -> TemplateValues {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn message_fills_parameters_in_order() {
        let m = template()
            .message(&values(&[("order_id", "A-17"), ("first_name", "Ana")]))
            .expect("message");
        assert_eq!(
            m,
            Message::Template {
                name: "order_update".into(),
                language: "en_US".into(),
                parameters: vec!["Ana".into(), "A-17".into()],
            }
        );
    }

    #[test]
    fn message_refuses_missing_unknown_and_malformed_values() {
        let t = template();
        assert!(t.message(&values(&[("first_name", "Ana")])).is_err());
        assert!(t
            .message(&values(&[
                ("first_name", "Ana"),
                ("order_id", "1"),
                ("x", "y")
            ]))
            .is_err());
        for bad in ["", "  ", "a\nb", "a\tb", "a     b"] {
            assert!(
                t.message(&values(&[("first_name", bad), ("order_id", "1")]))
                    .is_err(),
                "{bad:?}"
            );
        }
        let long = "x".repeat(MAX_VALUE_CHARS + 1);
        assert!(t
            .message(&values(&[("first_name", &long), ("order_id", "1")]))
            .is_err());
    }

    #[test]
    fn languages_and_names() {
        for ok in ["en", "en_US", "pt_BR", "fil", "zh_HK"] {
            assert!(check_language(ok).is_ok(), "{ok}");
        }
        for bad in ["", "EN", "en-US", "en_us", "english", "e", "en_", "en_U"] {
            assert!(check_language(bad).is_err(), "{bad}");
        }
        let new = |name: &str, params: Vec<TemplateParameter>| NewTemplate {
            name: name.into(),
            language: "en".into(),
            category: TemplateCategory::Marketing,
            parameters: params,
        };
        assert!(new("spring_sale_2", vec![]).check().is_ok());
        assert!(new("Spring", vec![]).check().is_err());
        assert!(new("", vec![]).check().is_err());
        let p = |n: &str| TemplateParameter {
            name: n.into(),
            example: None,
        };
        assert!(new("t", vec![p("a"), p("a")]).check().is_err());
        assert!(new("t", vec![p("A")]).check().is_err());
        assert!(new("t", vec![p("1"), p("2")]).check().is_ok());
    }
}
