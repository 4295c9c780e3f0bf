//! Contacts: the people a workspace messages. A contact has an E.164 phone number (unique in its
//! workspace) and/or handles (the page-scoped ids Messenger and Instagram know them by, one per
//! channel), a name, labels (audiences are chosen by label), free-form attributes and an
//! opt-out flag (set by the contact, e.g. by writing STOP; a campaign must skip them).
//!
//! Contacts created through the API or an import have a phone. Contacts created by an inbound
//! Messenger or Instagram message have a handle and no phone: Meta gives those platforms'
//! senders as a PSID (Messenger) or IGSID (Instagram), an id scoped to the page or account that
//! received the message, so the same person writing to two pages is two handles.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::delivery::Platform;
use crate::error::Result;

/// Labels per contact at most.
pub const MAX_LABELS: usize = 100;
/// Characters per label at most.
pub const MAX_LABEL_CHARS: usize = 100;
/// Bytes of a contact's attributes, as JSON, at most.
pub const MAX_ATTRIBUTES_BYTES: usize = 16 * 1024;
/// Characters of a handle's external id (PSID, IGSID) at most; Meta's are about 16 digits.
pub const MAX_EXTERNAL_ID_CHARS: usize = 256;

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Contact {
    pub id: Uuid,
    pub workspace_id: Uuid,
    /// E.164: `+` and 8 to 15 digits. Null for a contact known only by its handles (someone
    /// who wrote to a Messenger page or an Instagram account).
    pub phone: Option<String>,
    pub name: Option<String>,
    pub labels: Vec<String>,
    pub attributes: serde_json::Map<String, serde_json::Value>,
    pub opted_out: bool,
    pub opted_out_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The ids Messenger pages and Instagram accounts know this contact by, oldest first.
    pub handles: Vec<ContactHandle>,
}

/// How one Messenger page or Instagram account knows a contact: the page-scoped id of the
/// person (PSID on Messenger, IGSID on Instagram) on that channel. Unique per channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ContactHandle {
    /// The channel (page or account) that knows the contact by this id.
    pub channel_id: Uuid,
    /// `messenger` or `instagram`.
    pub platform: Platform,
    /// The PSID (Messenger) or IGSID (Instagram).
    pub external_id: String,
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

/// A handle's external id (a PSID or IGSID) as stored: trimmed, 1 to
/// [`MAX_EXTERNAL_ID_CHARS`] characters, no control characters.
pub fn external_id(raw: &str) -> std::result::Result<String, String> {
    let s = raw.trim();
    if s.is_empty() {
        return Err("an external id must not be empty".into());
    }
    if s.chars().count() > MAX_EXTERNAL_ID_CHARS {
        return Err(format!(
            "an external id has more than {MAX_EXTERNAL_ID_CHARS} characters"
        ));
    }
    if s.chars().any(char::is_control) {
        return Err("an external id must not contain control characters".into());
    }
    Ok(s.to_owned())
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
    /// Creates the senders of inbound messages that are not contacts yet, and opts out those
    /// whose message was a STOP keyword (never the reverse); in one transaction. A sender known
    /// by phone (WhatsApp) is found or created by phone, with its profile name. A sender known
    /// by a handle (Messenger, Instagram) is found by its handle, or created as a contact
    /// without a phone plus that handle; two calls racing to create the same new handle create
    /// one contact between them, and neither fails. `StoreError::Invalid` (nothing written) if a
    /// handle is a WhatsApp one or its external id is not valid ([`external_id`]).
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
    /// Who wrote: a phone (WhatsApp) or a handle on a channel (Messenger, Instagram).
    pub identity: InboundIdentity,
    /// The sender's profile name, if the delivery carried one (WhatsApp does; Messenger and
    /// Instagram webhooks do not).
    pub name: Option<String>,
    /// The message was a STOP keyword.
    pub opt_out: bool,
}

/// How the sender of an inbound message is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundIdentity {
    /// WhatsApp: the sender's phone, E.164.
    Phone(String),
    /// Messenger or Instagram: the sender's page-scoped id (PSID, IGSID) on the channel that
    /// received the message.
    Handle {
        channel_id: Uuid,
        /// `Messenger` or `Instagram`.
        platform: Platform,
        external_id: String,
    },
}

/// A sender known by phone, merged (see [`merge_inbound`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InboundByPhone {
    pub workspace_id: Uuid,
    pub phone: String,
    pub name: Option<String>,
    pub opt_out: bool,
}

/// A sender known by a handle, merged (see [`merge_inbound`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InboundByHandle {
    pub workspace_id: Uuid,
    pub channel_id: Uuid,
    pub platform: Platform,
    pub external_id: String,
    pub name: Option<String>,
    pub opt_out: bool,
}

/// The inbound senders of one call, merged: one entry per (workspace, phone) and one per
/// handle (channel, external id), each list in key order (so concurrent batches lock rows in
/// the same order); opted out if any message was STOP, the first name given. Handles that are
/// WhatsApp's or whose external id is not valid are refused.
pub(crate) fn merge_inbound(
    contacts: &[InboundContact],
) -> std::result::Result<(Vec<InboundByPhone>, Vec<InboundByHandle>), crate::model::InvalidJob> {
    use std::collections::BTreeMap;
    let mut phones: BTreeMap<(Uuid, &str), InboundByPhone> = BTreeMap::new();
    let mut handles: BTreeMap<(Uuid, String), InboundByHandle> = BTreeMap::new();
    for c in contacts {
        let (opt_out, name) = match &c.identity {
            InboundIdentity::Phone(phone) => {
                let e = phones
                    .entry((c.workspace_id, phone.as_str()))
                    .or_insert_with(|| InboundByPhone {
                        workspace_id: c.workspace_id,
                        phone: phone.clone(),
                        name: None,
                        opt_out: false,
                    });
                (&mut e.opt_out, &mut e.name)
            }
            InboundIdentity::Handle {
                channel_id,
                platform,
                external_id: raw,
            } => {
                if *platform == Platform::Whatsapp {
                    return Err(crate::model::InvalidJob(
                        "a WhatsApp sender is known by phone, not by a handle".into(),
                    ));
                }
                let id = external_id(raw).map_err(crate::model::InvalidJob)?;
                let e =
                    handles
                        .entry((*channel_id, id.clone()))
                        .or_insert_with(|| InboundByHandle {
                            workspace_id: c.workspace_id,
                            channel_id: *channel_id,
                            platform: *platform,
                            external_id: id,
                            name: None,
                            opt_out: false,
                        });
                (&mut e.opt_out, &mut e.name)
            }
        };
        *opt_out |= c.opt_out;
        if name.is_none() {
            *name = c.name.clone();
        }
    }
    Ok((
        phones.into_values().collect(),
        handles.into_values().collect(),
    ))
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
    fn inbound_senders_merge_by_phone_and_by_handle() {
        let ws = Uuid::new_v4();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let handle = |channel_id, id: &str, name: Option<&str>, opt_out| InboundContact {
            workspace_id: ws,
            identity: InboundIdentity::Handle {
                channel_id,
                platform: Platform::Messenger,
                external_id: id.into(),
            },
            name: name.map(str::to_owned),
            opt_out,
        };
        let phone = |p: &str, opt_out| InboundContact {
            workspace_id: ws,
            identity: InboundIdentity::Phone(p.into()),
            name: None,
            opt_out,
        };
        let (phones, handles) = merge_inbound(&[
            handle(b, "9", None, false),
            handle(a, " 9", None, true),
            phone("+15550000002", false),
            handle(a, "9", Some("Ann"), false),
            phone("+15550000001", true),
            phone("+15550000002", true),
            handle(a, "10", None, false),
        ])
        .expect("valid");
        let p: Vec<(&str, bool)> = phones
            .iter()
            .map(|c| (c.phone.as_str(), c.opt_out))
            .collect();
        assert_eq!(p, [("+15550000001", true), ("+15550000002", true)]);
        let h: Vec<(Uuid, &str, Option<&str>, bool)> = handles
            .iter()
            .map(|c| {
                (
                    c.channel_id,
                    c.external_id.as_str(),
                    c.name.as_deref(),
                    c.opt_out,
                )
            })
            .collect();
        assert_eq!(
            h,
            [
                (a, "10", None, false),
                (a, "9", Some("Ann"), true),
                (b, "9", None, false)
            ],
            "one per (channel, trimmed id), in key order; STOP if any was, the first name"
        );
        let whatsapp = InboundContact {
            identity: InboundIdentity::Handle {
                channel_id: a,
                platform: Platform::Whatsapp,
                external_id: "1".into(),
            },
            ..phone("+15550000001", false)
        };
        assert!(merge_inbound(&[whatsapp]).is_err());
        assert!(merge_inbound(&[handle(a, "", None, false)]).is_err());
    }

    #[test]
    fn external_ids() {
        assert_eq!(external_id(" 123 "), Ok("123".into()));
        assert!(external_id("").is_err());
        assert!(external_id("1\n2").is_err());
        assert!(external_id(&"1".repeat(MAX_EXTERNAL_ID_CHARS + 1)).is_err());
        assert!(external_id(&"1".repeat(MAX_EXTERNAL_ID_CHARS)).is_ok());
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
