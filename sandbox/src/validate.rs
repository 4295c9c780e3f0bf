//! Request validation with Meta's codes: a missing required parameter is 131008, a value
//! Meta rejects is 131009 (132001 for a template name), a parameter of the wrong JSON type
//! or a body that is not JSON is 100. Messenger reports all of them as 100.

use serde_json::{Map, Value};

use crate::meta::MetaError;

/// Longest WhatsApp text body, in characters.
const WA_TEXT_MAX: usize = 4096;
/// Longest `biz_opaque_callback_data`, in characters.
const WA_CALLBACK_MAX: usize = 512;
/// Longest interactive body text, in characters.
const WA_INTERACTIVE_BODY_MAX: usize = 1024;
/// Longest Messenger text, in characters.
const PAGE_TEXT_MAX: usize = 2000;
/// Longest Messenger `message.metadata`, in characters.
const PAGE_METADATA_MAX: usize = 1000;

/// A valid WhatsApp send, reduced to what the sandbox needs.
#[derive(Debug)]
pub(crate) struct WaSend {
    /// `to` as sent.
    pub(crate) to: String,
    /// `to`, digits only: Meta's `wa_id` and the status webhooks' `recipient_id`.
    pub(crate) wa_id: String,
    /// `biz_opaque_callback_data`, if present and non-empty.
    pub(crate) callback: Option<String>,
}

/// A valid Messenger / Instagram send.
#[derive(Debug)]
pub(crate) struct PageSend {
    pub(crate) recipient: String,
    pub(crate) metadata: Option<String>,
    pub(crate) text: Option<String>,
    pub(crate) attachment: Option<Value>,
}

fn missing(name: &str) -> MetaError {
    MetaError::with_details(131008, format!("The parameter {name} is required."))
}

fn invalid(details: impl Into<String>) -> MetaError {
    MetaError::with_details(131009, details)
}

fn wrong_type(name: &str, expected: &str) -> MetaError {
    MetaError::with_details(100, format!("Param {name} must be {expected}."))
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, MetaError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(MetaError::with_details(
            100,
            "The request body must be a JSON object.",
        )),
        Err(e) => Err(MetaError::with_details(
            100,
            format!("The request body is not valid JSON: {e}"),
        )),
    }
}

/// A string field: `Ok(None)` when absent or null, 100 when of another type.
fn opt_str<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    name: &str,
) -> Result<Option<&'a str>, MetaError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(wrong_type(name, "a string")),
    }
}

/// A required, non-empty string field: 131008 when absent or empty.
fn req_str<'a>(obj: &'a Map<String, Value>, key: &str, name: &str) -> Result<&'a str, MetaError> {
    match opt_str(obj, key, name)? {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(missing(name)),
    }
}

/// An object field: `Ok(None)` when absent or null, 100 when of another type.
fn opt_obj<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    name: &str,
) -> Result<Option<&'a Map<String, Value>>, MetaError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(wrong_type(name, "an object")),
    }
}

fn req_obj<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    name: &str,
) -> Result<&'a Map<String, Value>, MetaError> {
    opt_obj(obj, key, name)?.ok_or_else(|| missing(name))
}

/// Digits of a phone number: `+1 (555) 010-0000` → `15550100000`.
pub(crate) fn digits(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}

fn is_template_name(name: &str) -> bool {
    (1..=512).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Validates a `POST /{version}/{phone_number_id}/messages` body.
pub(crate) fn whatsapp(body: &[u8]) -> Result<WaSend, MetaError> {
    let obj = parse_object(body)?;
    let product = req_str(&obj, "messaging_product", "messaging_product")?;
    if product != "whatsapp" {
        return Err(MetaError::with_details(
            100,
            format!("Param messaging_product must be 'whatsapp', got '{product}'."),
        ));
    }
    let to = req_str(&obj, "to", "to")?;
    let wa_id = digits(to);
    if wa_id.is_empty() {
        return Err(invalid(format!(
            "The parameter to ('{to}') is not a valid phone number or WhatsApp id."
        )));
    }
    // Meta defaults a missing type to text.
    let kind = opt_str(&obj, "type", "type")?.unwrap_or("text");
    match kind {
        "text" => {
            let text = req_obj(&obj, "text", "text")?;
            let body = req_str(text, "body", "text['body']")?;
            let len = body.chars().count();
            if len > WA_TEXT_MAX {
                return Err(invalid(format!(
                    "Param text['body'] must be at most {WA_TEXT_MAX} characters long, got {len}."
                )));
            }
            if !matches!(text.get("preview_url"), None | Some(Value::Bool(_))) {
                return Err(wrong_type("text['preview_url']", "a boolean"));
            }
        }
        "template" => {
            let template = req_obj(&obj, "template", "template")?;
            let name = req_str(template, "name", "template['name']")?;
            let language = req_obj(template, "language", "template['language']")?;
            let code = req_str(language, "code", "template['language']['code']")?;
            if !is_template_name(name) {
                return Err(MetaError::with_details(
                    132001,
                    format!("template name ({name}) does not exist in {code}"),
                ));
            }
            if !matches!(template.get("components"), None | Some(Value::Array(_))) {
                return Err(wrong_type("template['components']", "an array"));
            }
        }
        "image" | "document" | "audio" | "video" => {
            let media = req_obj(&obj, kind, kind)?;
            let link = opt_str(media, "link", &format!("{kind}['link']"))?;
            let id = opt_str(media, "id", &format!("{kind}['id']"))?;
            match (link, id) {
                (Some(link), _) if !link.is_empty() => {
                    if !(link.starts_with("https://") || link.starts_with("http://")) {
                        return Err(invalid(format!(
                            "Param {kind}['link'] must be an http or https URL."
                        )));
                    }
                }
                (_, Some(id)) if !id.is_empty() => {}
                _ => return Err(missing(&format!("{kind}['link'] or {kind}['id']"))),
            }
        }
        "interactive" => validate_interactive(req_obj(&obj, "interactive", "interactive")?)?,
        other => {
            return Err(invalid(format!(
                "Param type ('{other}') must be one of text, template, image, document, audio, video, interactive."
            )))
        }
    }
    let callback = opt_str(&obj, "biz_opaque_callback_data", "biz_opaque_callback_data")?;
    if let Some(callback) = callback {
        let len = callback.chars().count();
        if len > WA_CALLBACK_MAX {
            return Err(invalid(format!(
                "Param biz_opaque_callback_data must be at most {WA_CALLBACK_MAX} characters long, got {len}."
            )));
        }
    }
    Ok(WaSend {
        to: to.to_owned(),
        wa_id,
        callback: callback.filter(|c| !c.is_empty()).map(str::to_owned),
    })
}

fn validate_interactive(interactive: &Map<String, Value>) -> Result<(), MetaError> {
    let kind = req_str(interactive, "type", "interactive['type']")?;
    if kind != "button" && kind != "list" {
        return Err(invalid(format!(
            "Param interactive['type'] ('{kind}') must be button or list."
        )));
    }
    let body = req_obj(interactive, "body", "interactive['body']")?;
    let text = req_str(body, "text", "interactive['body']['text']")?;
    if text.chars().count() > WA_INTERACTIVE_BODY_MAX {
        return Err(invalid(format!(
            "Param interactive['body']['text'] must be at most {WA_INTERACTIVE_BODY_MAX} characters long."
        )));
    }
    let action = req_obj(interactive, "action", "interactive['action']")?;
    let (key, max) = if kind == "button" {
        ("buttons", 3)
    } else {
        req_str(action, "button", "interactive['action']['button']")?;
        ("sections", 10)
    };
    match action.get(key) {
        None | Some(Value::Null) => Err(missing(&format!("interactive['action']['{key}']"))),
        Some(Value::Array(items)) if (1..=max).contains(&items.len()) => Ok(()),
        Some(Value::Array(items)) => Err(invalid(format!(
            "Param interactive['action']['{key}'] must have 1 to {max} elements, got {}.",
            items.len()
        ))),
        Some(_) => Err(wrong_type(
            &format!("interactive['action']['{key}']"),
            "an array",
        )),
    }
}

fn page_error(details: impl Into<String>) -> MetaError {
    MetaError::with_details(100, details)
}

/// Validates a `POST /{version}/me/messages` body (Messenger and Instagram).
pub(crate) fn messenger(body: &[u8]) -> Result<PageSend, MetaError> {
    let obj = parse_object(body)?;
    let as_100 = |e: MetaError| page_error(e.details.unwrap_or_default());
    let recipient = req_obj(&obj, "recipient", "recipient").map_err(as_100)?;
    let recipient = req_str(recipient, "id", "recipient['id']").map_err(as_100)?;
    let messaging_type = req_str(&obj, "messaging_type", "messaging_type").map_err(as_100)?;
    match messaging_type {
        "RESPONSE" | "UPDATE" => {}
        "MESSAGE_TAG" => {
            req_str(&obj, "tag", "tag").map_err(as_100)?;
        }
        other => {
            return Err(page_error(format!(
                "Param messaging_type ('{other}') must be one of RESPONSE, UPDATE, MESSAGE_TAG."
            )))
        }
    }
    let message = req_obj(&obj, "message", "message").map_err(as_100)?;
    let text = opt_str(message, "text", "message['text']").map_err(as_100)?;
    let attachment = opt_obj(message, "attachment", "message['attachment']").map_err(as_100)?;
    match (text, attachment) {
        (Some(text), None) => {
            let len = text.chars().count();
            if text.is_empty() || len > PAGE_TEXT_MAX {
                return Err(page_error(format!(
                    "Param message['text'] must be 1 to {PAGE_TEXT_MAX} characters long, got {len}."
                )));
            }
        }
        (None, Some(attachment)) => {
            let kind =
                req_str(attachment, "type", "message['attachment']['type']").map_err(as_100)?;
            if !matches!(kind, "image" | "audio" | "video" | "file" | "template") {
                return Err(page_error(format!(
                    "Param message['attachment']['type'] ('{kind}') must be one of image, audio, video, file, template."
                )));
            }
            req_obj(attachment, "payload", "message['attachment']['payload']").map_err(as_100)?;
        }
        (Some(_), Some(_)) => {
            return Err(page_error(
                "Only one of message['text'] and message['attachment'] may be set.",
            ))
        }
        (None, None) => {
            return Err(page_error(
                "Message cannot be empty, must provide valid attachment or text.",
            ))
        }
    }
    let metadata = opt_str(message, "metadata", "message['metadata']").map_err(as_100)?;
    if let Some(metadata) = metadata {
        let len = metadata.chars().count();
        if len > PAGE_METADATA_MAX {
            return Err(page_error(format!(
                "Param message['metadata'] must be at most {PAGE_METADATA_MAX} characters long, got {len}."
            )));
        }
    }
    Ok(PageSend {
        recipient: recipient.to_owned(),
        metadata: metadata.filter(|m| !m.is_empty()).map(str::to_owned),
        text: text.map(str::to_owned),
        attachment: attachment.map(|a| Value::Object(a.clone())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wa(v: Value) -> Result<WaSend, i64> {
        whatsapp(v.to_string().as_bytes()).map_err(|e| e.code)
    }

    fn page(v: Value) -> Result<PageSend, i64> {
        messenger(v.to_string().as_bytes()).map_err(|e| e.code)
    }

    #[test]
    fn whatsapp_codes() {
        let ok = wa(
            serde_json::json!({"messaging_product":"whatsapp","to":"+1 555-0100","type":"text","text":{"body":"hi"},"biz_opaque_callback_data":"cb"}),
        );
        let ok = ok.expect("valid");
        assert_eq!(ok.wa_id, "15550100");
        assert_eq!(ok.callback.as_deref(), Some("cb"));
        assert_eq!(
            whatsapp(b"{nope").map_err(|e| e.code).err(),
            Some(100),
            "malformed JSON"
        );
        assert_eq!(
            wa(serde_json::json!({"to":"1","text":{"body":"x"}})).err(),
            Some(131008)
        );
        assert_eq!(
            wa(serde_json::json!({"messaging_product":"sms","to":"1","text":{"body":"x"}})).err(),
            Some(100)
        );
        assert_eq!(
            wa(serde_json::json!({"messaging_product":"whatsapp","to":"1","type":"text"})).err(),
            Some(131008)
        );
        assert_eq!(
            wa(serde_json::json!({"messaging_product":"whatsapp","to":"1","text":{"body":"x".repeat(4097)}})).err(),
            Some(131009)
        );
        assert_eq!(
            wa(serde_json::json!({"messaging_product":"whatsapp","to":"1","type":"sticker2","text":{"body":"x"}})).err(),
            Some(131009)
        );
        assert_eq!(
            wa(serde_json::json!({"messaging_product":"whatsapp","to":"1","type":"template","template":{"name":"Bad-Name","language":{"code":"en_US"}}})).err(),
            Some(132001)
        );
        assert!(wa(serde_json::json!({"messaging_product":"whatsapp","to":"1","type":"template","template":{"name":"good_name_1","language":{"code":"en_US"}}})).is_ok());
        assert_eq!(
            wa(serde_json::json!({"messaging_product":"whatsapp","to":"1","type":"template","template":{"name":"x","language":{}}})).err(),
            Some(131008)
        );
        assert_eq!(
            wa(serde_json::json!({"messaging_product":"whatsapp","to":"1","type":"image","image":{}})).err(),
            Some(131008)
        );
        assert!(wa(serde_json::json!({"messaging_product":"whatsapp","to":"1","type":"image","image":{"id":"123"}})).is_ok());
        assert!(wa(serde_json::json!({"messaging_product":"whatsapp","to":"1","type":"interactive","interactive":{"type":"button","body":{"text":"q"},"action":{"buttons":[{"type":"reply","reply":{"id":"a","title":"A"}}]}}})).is_ok());
        assert_eq!(
            wa(serde_json::json!({"messaging_product":"whatsapp","to":"1","type":"interactive","interactive":{"type":"carousel","body":{"text":"q"},"action":{}}})).err(),
            Some(131009)
        );
        assert_eq!(
            wa(serde_json::json!({"messaging_product":"whatsapp","to":"1","text":{"body":"x"},"biz_opaque_callback_data":"c".repeat(513)})).err(),
            Some(131009)
        );
        assert_eq!(
            wa(serde_json::json!({"messaging_product":"whatsapp","to":5,"text":{"body":"x"}}))
                .err(),
            Some(100)
        );
    }

    #[test]
    fn messenger_codes() {
        let ok = page(serde_json::json!({"recipient":{"id":"42"},"messaging_type":"RESPONSE","message":{"text":"hi","metadata":"m"}})).expect("valid");
        assert_eq!(ok.recipient, "42");
        assert_eq!(ok.metadata.as_deref(), Some("m"));
        assert_eq!(
            page(serde_json::json!({"messaging_type":"RESPONSE","message":{"text":"hi"}})).err(),
            Some(100)
        );
        assert_eq!(
            page(serde_json::json!({"recipient":{"id":"42"},"messaging_type":"MESSAGE_TAG","message":{"text":"hi"}})).err(),
            Some(100)
        );
        assert_eq!(
            page(serde_json::json!({"recipient":{"id":"42"},"messaging_type":"RESPONSE","message":{"text":"hi","metadata":"m".repeat(1001)}})).err(),
            Some(100)
        );
        assert!(page(serde_json::json!({"recipient":{"id":"42"},"messaging_type":"UPDATE","message":{"attachment":{"type":"image","payload":{"url":"https://x"}}}})).is_ok());
    }
}
