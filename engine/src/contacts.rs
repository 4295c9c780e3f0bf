//! Contacts: the people a workspace messages. A contact has an E.164 phone number (unique in its
//! workspace), a name, labels (audiences are chosen by label), free-form attributes and an
//! opt-out flag (set by the contact, e.g. by writing STOP; a campaign must skip them).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::Result;

/// Labels per contact at most.
pub const MAX_LABELS: usize = 100;
/// Characters per label at most.
pub const MAX_LABEL_CHARS: usize = 100;
/// Bytes of a contact's attributes, as JSON, at most.
pub const MAX_ATTRIBUTES_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Contact {
    pub id: Uuid,
    pub workspace_id: Uuid,
    /// E.164: `+` and 8 to 15 digits.
    pub phone: String,
    pub name: Option<String>,
    pub labels: Vec<String>,
    pub attributes: serde_json::Map<String, serde_json::Value>,
    pub opted_out: bool,
    pub opted_out_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A contact to create (or, in an import, to create or update by phone).
#[derive(Debug, Clone, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewContact {
    pub phone: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub attributes: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub opted_out: bool,
}

/// Changes to a contact; absent fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContactPatch {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    /// Replaces the attributes as a whole.
    #[serde(default)]
    pub attributes: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub opted_out: Option<bool>,
}

/// What an import did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ImportCounts {
    /// Rows stored (created or updated by phone).
    pub stored: u64,
}

/// The E.164 form of a phone number: separators (spaces, `-`, `.`, parentheses) dropped, a
/// leading `00` read as `+`; then it must be `+` and 8 to 15 digits, not starting with 0.
pub fn e164(raw: &str) -> std::result::Result<String, String> {
    let mut s: String = raw
        .trim()
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')'))
        .collect();
    if let Some(rest) = s.strip_prefix("00") {
        s = format!("+{rest}");
    }
    let Some(digits) = s.strip_prefix('+') else {
        return Err(format!(
            "{raw:?} is not an E.164 number: it must start with + and the country code"
        ));
    };
    if !(8..=15).contains(&digits.len())
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || digits.starts_with('0')
    {
        return Err(format!(
            "{raw:?} is not an E.164 number: + then 8 to 15 digits, the first not 0"
        ));
    }
    Ok(s)
}

fn check_text(what: &str, s: &str, max: usize) -> std::result::Result<(), String> {
    if s.chars().count() > max {
        return Err(format!("{what} has more than {max} characters"));
    }
    if s.chars().any(|c| c == '\0') {
        return Err(format!("{what} contains NUL"));
    }
    Ok(())
}

fn check_labels(labels: &[String]) -> std::result::Result<Vec<String>, String> {
    if labels.len() > MAX_LABELS {
        return Err(format!("at most {MAX_LABELS} labels"));
    }
    let mut out: Vec<String> = Vec::with_capacity(labels.len());
    for l in labels {
        let l = l.trim();
        if l.is_empty() {
            return Err("a label must not be empty".into());
        }
        check_text("a label", l, MAX_LABEL_CHARS)?;
        if l.chars().any(char::is_control) {
            return Err("a label must not contain control characters".into());
        }
        if !out.iter().any(|o| o == l) {
            out.push(l.to_owned());
        }
    }
    out.sort();
    Ok(out)
}

fn check_attributes(
    a: &serde_json::Map<String, serde_json::Value>,
) -> std::result::Result<(), String> {
    let size = serde_json::to_string(a)
        .map(|s| s.len())
        .unwrap_or(usize::MAX);
    if size > MAX_ATTRIBUTES_BYTES {
        return Err(format!(
            "attributes take more than {MAX_ATTRIBUTES_BYTES} bytes"
        ));
    }
    if serde_json::to_string(a).is_ok_and(|s| s.contains("\\u0000")) {
        return Err("attributes contain NUL".into());
    }
    Ok(())
}

impl NewContact {
    /// Checks and normalises (E.164 phone, trimmed, sorted and de-duplicated labels).
    pub fn normalized(&self) -> std::result::Result<NewContact, String> {
        if let Some(n) = &self.name {
            check_text("name", n, 200)?;
        }
        check_attributes(&self.attributes)?;
        Ok(NewContact {
            phone: e164(&self.phone)?,
            name: self
                .name
                .as_ref()
                .map(|n| n.trim().to_owned())
                .filter(|n| !n.is_empty()),
            labels: check_labels(&self.labels)?,
            attributes: self.attributes.clone(),
            opted_out: self.opted_out,
        })
    }
}

impl ContactPatch {
    pub fn normalized(&self) -> std::result::Result<ContactPatch, String> {
        if let Some(n) = &self.name {
            check_text("name", n, 200)?;
        }
        if let Some(a) = &self.attributes {
            check_attributes(a)?;
        }
        Ok(ContactPatch {
            name: self.name.as_ref().map(|n| n.trim().to_owned()),
            labels: self.labels.as_deref().map(check_labels).transpose()?,
            attributes: self.attributes.clone(),
            opted_out: self.opted_out,
        })
    }
}

/// Words that, as a whole inbound message, mean "stop messaging me" (Meta's and carriers'
/// usual set, in English, Spanish, Portuguese, French and German).
pub fn is_opt_out_keyword(text: &str) -> bool {
    const WORDS: &[&str] = &[
        "stop",
        "stopall",
        "unsubscribe",
        "cancel",
        "end",
        "quit",
        "optout",
        "opt out",
        "opt-out",
        "baja",
        "parar",
        "sair",
        "arret",
        "arrêt",
        "desabonner",
        "abmelden",
    ];
    let t = text.trim().trim_end_matches(['.', '!']).to_lowercase();
    WORDS.contains(&t.as_str())
}

/// Where contacts live. Implemented by both stores; every method is scoped to a workspace.
#[async_trait]
pub trait ContactStore: Send + Sync + 'static {
    /// Creates a contact; `StoreError::Conflict` if the workspace has one with that phone.
    async fn create_contact(
        &self,
        workspace_id: Uuid,
        contact: &NewContact,
        now: DateTime<Utc>,
    ) -> Result<Contact>;
    async fn contact(&self, workspace_id: Uuid, id: Uuid) -> Result<Option<Contact>>;
    /// Contacts in id order after `after`, with `label` if given, at most `limit`.
    async fn contacts(
        &self,
        workspace_id: Uuid,
        label: Option<&str>,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<Contact>>;
    async fn update_contact(
        &self,
        workspace_id: Uuid,
        id: Uuid,
        patch: &ContactPatch,
        now: DateTime<Utc>,
    ) -> Result<Option<Contact>>;
    async fn delete_contact(&self, workspace_id: Uuid, id: Uuid) -> Result<bool>;
    /// Creates or updates (by phone) normalised contacts, in one transaction per call. A phone
    /// twice in one call: the last row wins.
    async fn import_contacts(
        &self,
        workspace_id: Uuid,
        contacts: &[NewContact],
        now: DateTime<Utc>,
    ) -> Result<ImportCounts>;
    /// Creates the contacts of inbound WhatsApp messages that are new (with their profile
    /// names), and opts out those whose message was a STOP keyword; in one transaction.
    async fn upsert_inbound_contacts(
        &self,
        contacts: &[InboundContact],
        now: DateTime<Utc>,
    ) -> Result<()>;
    /// Contacts in the workspace.
    async fn contact_count(&self, workspace_id: Uuid) -> Result<i64>;
}

/// The sender of an inbound message, as a contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundContact {
    pub workspace_id: Uuid,
    /// E.164.
    pub phone: String,
    pub name: Option<String>,
    /// The message was a STOP keyword.
    pub opt_out: bool,
}

/// One entry per (workspace, phone), in key order (so concurrent batches lock rows in the same
/// order): opted out if any message was STOP, the first name given.
pub(crate) fn merge_inbound(contacts: &[InboundContact]) -> Vec<InboundContact> {
    let mut by_key: std::collections::BTreeMap<(Uuid, &str), InboundContact> = Default::default();
    for c in contacts {
        by_key
            .entry((c.workspace_id, c.phone.as_str()))
            .and_modify(|e| {
                e.opt_out |= c.opt_out;
                if e.name.is_none() {
                    e.name = c.name.clone();
                }
            })
            .or_insert_with(|| c.clone());
    }
    by_key.into_values().collect()
}

/// Attribute maps are stored as JSON objects.
pub(crate) fn attributes_json(a: &serde_json::Map<String, serde_json::Value>) -> String {
    serde_json::Value::Object(a.clone()).to_string()
}

/// Reads stored attributes; anything but an object reads as empty.
pub(crate) fn attributes_from(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e164_normalises_and_refuses() {
        assert_eq!(e164("+1 (555) 123-4567"), Ok("+15551234567".into()));
        assert_eq!(e164("0044 20 7946 0958"), Ok("+442079460958".into()));
        for bad in [
            "",
            "+",
            "5551234567",
            "+0123456789",
            "+1234567",
            "+1234567890123456",
            "+1555abc4567",
            "++15551234567",
        ] {
            assert!(e164(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn labels_are_trimmed_sorted_and_unique() {
        let c = NewContact {
            phone: "+15551234567".into(),
            name: Some("  Ann ".into()),
            labels: vec![" vip".into(), "beta".into(), "vip".into()],
            attributes: Default::default(),
            opted_out: false,
        }
        .normalized()
        .expect("valid");
        assert_eq!(c.labels, ["beta", "vip"]);
        assert_eq!(c.name.as_deref(), Some("Ann"));
        let too_many = NewContact {
            labels: (0..101).map(|n| n.to_string()).collect(),
            ..c.clone()
        };
        assert!(too_many.normalized().is_err());
        let empty = NewContact {
            labels: vec!["  ".into()],
            ..c
        };
        assert!(empty.normalized().is_err());
    }

    #[test]
    fn stop_words() {
        for w in ["STOP", "stop", " Unsubscribe. ", "BAJA", "Arrêt"] {
            assert!(is_opt_out_keyword(w), "{w}");
        }
        for w in ["please stop sending", "stopped", "hello"] {
            assert!(!is_opt_out_keyword(w), "{w}");
        }
    }
}
