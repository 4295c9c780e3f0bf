//! Meta's error bodies: codes, titles and HTTP statuses.

use axum::http::StatusCode;
use serde_json::{json, Map, Value};

/// Which API answers: WhatsApp errors carry `error_data.messaging_product`, Messenger's don't.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Api {
    WhatsApp,
    Messenger,
}

/// One Graph API error answer.
#[derive(Clone, Debug)]
pub(crate) struct MetaError {
    pub(crate) code: i64,
    pub(crate) details: Option<String>,
}

impl MetaError {
    pub(crate) fn new(code: i64) -> MetaError {
        MetaError {
            code,
            details: None,
        }
    }

    pub(crate) fn with_details(code: i64, details: impl Into<String>) -> MetaError {
        MetaError {
            code,
            details: Some(details.into()),
        }
    }

    /// HTTP status: Meta answers 401 for token errors, 500 for its own failures, 400 otherwise.
    pub(crate) fn http_status(&self) -> StatusCode {
        match self.code {
            190 => StatusCode::UNAUTHORIZED,
            1 | 2 => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// `{"error":{...}}` as Meta writes it.
    pub(crate) fn body(&self, api: Api) -> Value {
        let title = title(self.code);
        let message = match self.code {
            1 | 2 | 190 => title.to_owned(),
            code => format!("(#{code}) {title}"),
        };
        let mut error = Map::new();
        error.insert("message".into(), Value::String(message));
        error.insert("type".into(), Value::String("OAuthException".into()));
        error.insert("code".into(), json!(self.code));
        if let Some(subcode) = subcode(self.code) {
            error.insert("error_subcode".into(), json!(subcode));
        }
        if matches!(self.code, 1 | 2) {
            error.insert("is_transient".into(), Value::Bool(true));
        }
        if api == Api::WhatsApp {
            let details = self
                .details
                .clone()
                .unwrap_or_else(|| default_details(self.code).to_owned());
            error.insert(
                "error_data".into(),
                json!({"messaging_product": "whatsapp", "details": details}),
            );
        }
        error.insert("fbtrace_id".into(), Value::String(fbtrace_id()));
        json!({ "error": error })
    }
}

fn subcode(code: i64) -> Option<i64> {
    match code {
        190 => Some(463),
        551 => Some(1_545_041),
        _ => None,
    }
}

/// Meta's title for a code: the text after `(#code)` in `error.message` and the `title` of
/// a failed status.
pub(crate) fn title(code: i64) -> &'static str {
    match code {
        1 => "An unknown error occurred",
        2 => "Service temporarily unavailable",
        4 => "Application request limit reached",
        17 => "User request limit reached",
        32 => "Page request limit reached",
        100 => "Invalid parameter",
        190 => "Error validating access token: Session has expired on Thursday, 01-Jan-2026 00:00:00 PST. The current time is later.",
        368 => "Temporarily blocked for policies violations",
        551 => "This person isn't available right now.",
        613 => "Calls to this api have exceeded the rate limit.",
        80007 => "Rate limit issues",
        130429 => "Rate limit hit",
        131000 => "Something went wrong",
        131008 => "Required parameter is missing",
        131009 => "Parameter value is not valid",
        131016 => "Service unavailable",
        131026 => "Message undeliverable",
        131047 => "Re-engagement message",
        131048 => "Spam rate limit hit",
        131049 => "This message was not delivered to maintain healthy ecosystem engagement.",
        131050 => "Unable to deliver the message. This recipient has chosen to stop receiving marketing messages on WhatsApp from your business.",
        131056 => "(Business Account, Consumer Account) pair rate limit hit",
        131057 => "Account in maintenance mode",
        132000 => "Number of parameters does not match the expected number of params",
        132001 => "Template name does not exist in the translation",
        _ => "Sandbox fault",
    }
}

pub(crate) fn default_details(code: i64) -> &'static str {
    match code {
        2 | 131016 => "A service is temporarily unavailable. Please retry your request later.",
        4 | 17 | 32 | 613 | 80007 => "The rate limit for this API has been reached. Retry after the window.",
        130429 => "Cloud API message throughput has been reached.",
        131026 => "Message Undeliverable.",
        131047 => "Message failed to send because more than 24 hours have passed since the customer last replied to this number.",
        131048 => "Message failed to send because there are restrictions on how many messages can be sent from this phone number. This may be because too many previous messages were blocked or flagged as spam.",
        131049 => "In order to maintain a healthy ecosystem engagement, the message failed to be delivered.",
        131050 => "The recipient has stopped marketing messages from this business.",
        131056 => "Message failed to send because there were too many messages sent from this phone number to the same phone number in a short period of time.",
        131057 => "Business account is in maintenance mode: a throughput upgrade is in progress.",
        368 => "The account is restricted for violating platform policy.",
        190 => "The access token has expired.",
        _ => title(code),
    }
}

/// Meta's opaque request id, present on every error so support can trace it.
pub(crate) fn fbtrace_id() -> String {
    let mut id = String::with_capacity(27);
    id.push('A');
    id.extend(std::iter::repeat_with(fastrand::alphanumeric).take(26));
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_match_meta() {
        let e = MetaError::with_details(131008, "The parameter to is required.");
        let body = e.body(Api::WhatsApp);
        assert_eq!(body["error"]["code"], 131008);
        assert_eq!(
            body["error"]["message"],
            "(#131008) Required parameter is missing"
        );
        assert_eq!(body["error"]["error_data"]["messaging_product"], "whatsapp");
        assert_eq!(
            body["error"]["error_data"]["details"],
            "The parameter to is required."
        );
        assert!(body["error"]["fbtrace_id"].as_str().is_some());
        assert_eq!(e.http_status(), StatusCode::BAD_REQUEST);

        let e = MetaError::new(190);
        let body = e.body(Api::Messenger);
        assert_eq!(body["error"]["error_subcode"], 463);
        assert!(body["error"].get("error_data").is_none());
        assert_eq!(e.http_status(), StatusCode::UNAUTHORIZED);

        let e = MetaError::new(2);
        assert_eq!(e.body(Api::WhatsApp)["error"]["is_transient"], true);
        assert_eq!(e.http_status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
