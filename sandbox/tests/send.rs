//! Send endpoints: success shapes, authentication, validation codes, synchronous faults,
//! usage headers, and the `/_sandbox` control endpoints.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use herald_sandbox::{Faults, SandboxConfig, Stats};
use serde_json::{json, Value};

#[tokio::test]
async fn whatsapp_success_has_meta_shape() {
    let sb = start(SandboxConfig::default()).await;
    let c = client();
    let (status, body) = wa_send(&c, &sb, "1001", &text("+1 (555) 010-0001", Some("cb-1"))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["messaging_product"], "whatsapp");
    assert_eq!(body["contacts"][0]["input"], "+1 (555) 010-0001");
    assert_eq!(body["contacts"][0]["wa_id"], "15550100001");
    let id = body["messages"][0]["id"].as_str().expect("id");
    assert!(id.starts_with("wamid."), "{id}");
    let (_, again) = wa_send(&c, &sb, "1001", &text("15550100002", None)).await;
    assert_ne!(
        again["messages"][0]["id"], body["messages"][0]["id"],
        "ids are unique"
    );

    let stats = sb.stats();
    assert_eq!(stats.accepted, 2);
    assert_eq!(stats.unique_callbacks, 1);
    assert!(stats.first_accepted_unix_ms.is_some());
    let log = sb.accepted("cb-");
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].callback, "cb-1");
    assert_eq!(log[0].to, "+1 (555) 010-0001");
    assert_eq!(log[0].message_id, id);
    assert_eq!(log[0].copies, 1);
    sb.shutdown().await;
}

#[tokio::test]
async fn wrong_missing_or_expired_token_is_190() {
    let sb = start(SandboxConfig::default()).await;
    let c = client();
    let url = format!("{}/v21.0/1001/messages", sb.url());
    for token in [Some("not-the-token"), None] {
        let (status, body) = post_json(&c, &url, token, &text("1555", None)).await;
        assert_eq!(status, 401);
        assert_eq!(body["error"]["code"], 190);
        assert_eq!(body["error"]["type"], "OAuthException");
        assert_eq!(body["error"]["error_subcode"], 463);
        assert!(body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Error validating access token")));
        assert!(body["error"]["fbtrace_id"].is_string());
    }
    sb.set_faults(Faults {
        token_expired: true,
        ..Faults::default()
    });
    let (status, body) = wa_send(&c, &sb, "1001", &text("1555", None)).await;
    assert_eq!((status, code(&body)), (401, 190));
    let (status, body) = page_send(
        &c,
        &sb,
        &json!({"recipient":{"id":"77"},"messaging_type":"RESPONSE","message":{"text":"hi"}}),
    )
    .await;
    assert_eq!((status, code(&body)), (401, 190));
    let stats = sb.stats();
    assert_eq!(stats.accepted, 0);
    assert_eq!(stats.errors_by_code.get("190"), Some(&4));
    sb.shutdown().await;
}

#[tokio::test]
async fn malformed_json_and_validation_codes() {
    let sb = start(SandboxConfig::default()).await;
    let c = client();
    let url = format!("{}/v21.0/1001/messages", sb.url());
    let resp = c
        .post(&url)
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{\"messaging_product\": \"whatsapp\", ")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], 100);
    assert_eq!(body["error"]["error_data"]["messaging_product"], "whatsapp");

    let cases: Vec<(Value, i64)> = vec![
        (
            json!({"to": "1555", "type": "text", "text": {"body": "x"}}),
            131008,
        ),
        (
            json!({"messaging_product": "messenger", "to": "1555", "text": {"body": "x"}}),
            100,
        ),
        (
            json!({"messaging_product": "whatsapp", "type": "text", "text": {"body": "x"}}),
            131008,
        ),
        (
            json!({"messaging_product": "whatsapp", "to": "1555", "type": "text"}),
            131008,
        ),
        (
            json!({"messaging_product": "whatsapp", "to": "1555", "type": "text", "text": {"body": ""}}),
            131008,
        ),
        (
            json!({"messaging_product": "whatsapp", "to": "1555", "type": "text", "text": {"body": "y".repeat(4097)}}),
            131009,
        ),
        (
            json!({"messaging_product": "whatsapp", "to": "1555", "type": "fax", "fax": {}}),
            131009,
        ),
        (
            json!({"messaging_product": "whatsapp", "to": "1555", "type": "template",
                "template": {"name": "Welcome Message", "language": {"code": "en_US"}}}),
            132001,
        ),
        (
            json!({"messaging_product": "whatsapp", "to": "1555", "type": "template",
                "template": {"name": "welcome"}}),
            131008,
        ),
        (
            json!({"messaging_product": "whatsapp", "to": "1555", "type": "document", "document": {"filename": "a.pdf"}}),
            131008,
        ),
        (
            json!({"messaging_product": "whatsapp", "to": "1555", "type": "interactive",
                "interactive": {"type": "list", "body": {"text": "pick"}}}),
            131008,
        ),
        (
            json!({"messaging_product": "whatsapp", "to": "1555", "type": "text", "text": {"body": "x"},
                "biz_opaque_callback_data": "c".repeat(513)}),
            131009,
        ),
        (
            json!({"messaging_product": "whatsapp", "to": ["1555"], "type": "text", "text": {"body": "x"}}),
            100,
        ),
    ];
    for (body, expected) in &cases {
        let (status, answer) = wa_send(&c, &sb, "1001", body).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert_eq!(code(&answer), *expected, "{body} -> {answer}");
        assert!(
            answer["error"]["error_data"]["details"].is_string(),
            "{answer}"
        );
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.starts_with(&format!("(#{expected})")), "{message}");
    }

    // Every accepted form.
    let ok = [
        json!({"messaging_product": "whatsapp", "to": "1555", "text": {"body": "default type"}}),
        json!({"messaging_product": "whatsapp", "to": "1556", "type": "template",
               "template": {"name": "order_update_2", "language": {"code": "en_US"},
                            "components": [{"type": "body", "parameters": [{"type": "text", "text": "42"}]}]}}),
        json!({"messaging_product": "whatsapp", "to": "1557", "type": "image", "image": {"link": "https://example.com/a.png"}}),
        json!({"messaging_product": "whatsapp", "to": "1558", "type": "audio", "audio": {"id": "1234"}}),
        json!({"messaging_product": "whatsapp", "to": "1559", "type": "video", "video": {"id": "1234"}}),
        json!({"messaging_product": "whatsapp", "to": "1560", "type": "document", "document": {"link": "https://example.com/a.pdf"}}),
        json!({"messaging_product": "whatsapp", "to": "1561", "type": "interactive",
               "interactive": {"type": "list", "body": {"text": "pick"},
                               "action": {"button": "Menu", "sections": [{"title": "s", "rows": [{"id": "r", "title": "R"}]}]}}}),
    ];
    for body in &ok {
        let (status, answer) = wa_send(&c, &sb, "1001", body).await;
        assert_eq!(status, 200, "{body} -> {answer}");
    }
    let stats = sb.stats();
    assert_eq!(stats.accepted, ok.len() as u64);
    assert_eq!(stats.errors_by_code.get("131008"), Some(&7));
    assert_eq!(stats.errors_by_code.get("132001"), Some(&1));
    sb.shutdown().await;
}

#[tokio::test]
async fn recipient_and_sender_errors() {
    let sb = start(SandboxConfig::default()).await;
    let c = client();
    let recipient_errors: HashMap<String, i64> = [
        ("15550000026", 131026),
        ("15550000047", 131047),
        ("15550000050", 131050),
        ("15550000049", 131049),
        ("psid-gone", 551),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let sender_errors: HashMap<String, i64> = [("blocked-phone", 368), ("spammy-phone", 131048)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    sb.set_faults(Faults {
        recipient_errors: recipient_errors.clone(),
        sender_errors,
        ..Faults::default()
    });
    for (to, expected) in &recipient_errors {
        if to.starts_with("psid") {
            continue;
        }
        // Matched on digits too.
        let to = format!("+{to}");
        let (status, body) = wa_send(&c, &sb, "1001", &text(&to, None)).await;
        assert_eq!((status, code(&body)), (400, *expected), "{body}");
    }
    for (phone, expected) in [("blocked-phone", 368), ("spammy-phone", 131048)] {
        let (status, body) = wa_send(&c, &sb, phone, &text("15551234567", None)).await;
        assert_eq!((status, code(&body)), (400, expected), "{body}");
    }
    let (status, _) = wa_send(&c, &sb, "1001", &text("15551234567", None)).await;
    assert_eq!(status, 200, "other senders and recipients are unaffected");

    let (status, body) = page_send(
        &c,
        &sb,
        &json!({"recipient":{"id":"psid-gone"},"messaging_type":"RESPONSE","message":{"text":"hi"}}),
    )
    .await;
    assert_eq!((status, code(&body)), (400, 551));
    assert_eq!(body["error"]["error_subcode"], 1545041);
    assert!(
        body["error"].get("error_data").is_none(),
        "Messenger errors carry no WhatsApp error_data"
    );

    let stats = sb.stats();
    assert_eq!(stats.accepted, 1);
    for code in [
        "131026", "131047", "131050", "131049", "368", "131048", "551",
    ] {
        assert_eq!(stats.errors_by_code.get(code), Some(&1), "{code}");
    }
    sb.shutdown().await;
}

#[tokio::test]
async fn server_error_fault_is_500_code_2_and_not_accepted() {
    let sb = start(SandboxConfig::default()).await;
    let c = client();
    sb.set_faults(Faults {
        server_error: 1.0,
        ..Faults::default()
    });
    for i in 0..3 {
        let (status, body) = wa_send(
            &c,
            &sb,
            "1001",
            &text(&format!("1555000{i}"), Some(&format!("se-{i}"))),
        )
        .await;
        assert_eq!(status, 500);
        assert_eq!(body["error"]["code"], 2);
        assert_eq!(body["error"]["is_transient"], true);
        assert_eq!(body["error"]["message"], "Service temporarily unavailable");
    }
    let stats = sb.stats();
    assert_eq!(stats.accepted, 0);
    assert_eq!(stats.errors_by_code.get("2"), Some(&3));
    assert!(sb.accepted("se-").is_empty());
    sb.shutdown().await;
}

#[tokio::test]
async fn duplicates_are_counted() {
    let sb = start(SandboxConfig::default()).await;
    let c = client();
    for i in 0..3 {
        let (status, _) = wa_send(
            &c,
            &sb,
            "1001",
            &text(&format!("1555000{i}"), Some("job-7")),
        )
        .await;
        assert_eq!(status, 200);
    }
    let (status, _) = wa_send(&c, &sb, "1001", &text("15550009", Some("job-8"))).await;
    assert_eq!(status, 200);
    let (status, _) = page_send(
        &c,
        &sb,
        &json!({"recipient":{"id":"77"},"messaging_type":"UPDATE","message":{"text":"hi","metadata":"job-8"}}),
    )
    .await;
    assert_eq!(status, 200);
    let stats = sb.stats();
    assert_eq!(stats.accepted, 5);
    assert_eq!(stats.unique_callbacks, 2);
    assert_eq!(stats.duplicate_callbacks, 3);
    let log = sb.accepted("job-");
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].callback, "job-7");
    assert_eq!(log[0].copies, 3);
    assert_eq!(log[0].to, "15550000", "the first copy is kept");
    assert_eq!(log[1].copies, 2);
    sb.shutdown().await;
}

#[tokio::test]
async fn messenger_send_and_validation() {
    let sb = start(SandboxConfig::default()).await;
    let c = client();
    let (status, body) = page_send(
        &c,
        &sb,
        &json!({"recipient":{"id":"2411"},"messaging_type":"MESSAGE_TAG","tag":"HUMAN_AGENT",
                "message":{"text":"hi","metadata":"m-1"}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["recipient_id"], "2411");
    assert!(body["message_id"]
        .as_str()
        .is_some_and(|m| m.starts_with("mid.")));
    for bad in [
        json!({"messaging_type":"RESPONSE","message":{"text":"hi"}}),
        json!({"recipient":{"id":"1"},"messaging_type":"SOMETIMES","message":{"text":"hi"}}),
        json!({"recipient":{"id":"1"},"messaging_type":"MESSAGE_TAG","message":{"text":"hi"}}),
        json!({"recipient":{"id":"1"},"messaging_type":"RESPONSE","message":{}}),
        json!({"recipient":{"id":"1"},"messaging_type":"RESPONSE","message":{"text":"x".repeat(2001)}}),
        json!({"recipient":{"id":"1"},"messaging_type":"RESPONSE","message":{"text":"hi","metadata":"m".repeat(1001)}}),
    ] {
        let (status, answer) = page_send(&c, &sb, &bad).await;
        assert_eq!((status, code(&answer)), (400, 100), "{bad} -> {answer}");
    }
    assert_eq!(sb.accepted("m-").len(), 1);
    sb.shutdown().await;
}

#[tokio::test]
async fn usage_header_reports_bucket_use() {
    let sb = start(SandboxConfig {
        // Capacity 4; the refill is too slow to move the percentages during the test.
        mps: 0.01,
        burst: Duration::from_secs(400),
        ..SandboxConfig::default()
    })
    .await;
    let c = client();
    sb.set_faults(Faults {
        usage_headers: true,
        ..Faults::default()
    });
    let url = format!("{}/v21.0/1001/messages", sb.url());
    let mut counts = Vec::new();
    let mut regain = Vec::new();
    for i in 0..5 {
        let resp = c
            .post(&url)
            .bearer_auth(TOKEN)
            .json(&text(&format!("1555000{i}"), None))
            .send()
            .await
            .expect("send");
        let header = resp
            .headers()
            .get("x-business-use-case-usage")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .expect("usage header");
        let usage: Value = serde_json::from_str(&header).expect("usage json");
        let item = &usage["sandbox-waba"][0];
        assert_eq!(item["type"], "whatsapp_business_messaging");
        counts.push(item["call_count"].as_u64().expect("call_count"));
        regain.push(
            item["estimated_time_to_regain_access"]
                .as_u64()
                .expect("regain"),
        );
    }
    // Capacity 4: 25 % per send, then empty (and refused).
    assert_eq!(counts, vec![25, 50, 75, 100, 100]);
    assert_eq!(&regain[..3], &[0, 0, 0]);
    assert!(regain[4] >= 1, "{regain:?}");
    sb.shutdown().await;
}

#[tokio::test]
async fn control_endpoints() {
    let sb = start(SandboxConfig::default()).await;
    let c = client();
    let base = sb.url();

    let resp = c
        .put(format!("{base}/_sandbox/faults"))
        .body("{\"sender_errors\": 5")
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status().as_u16(), 400);
    let resp = c
        .put(format!("{base}/_sandbox/faults"))
        .json(&json!({"sender_errors": {"paused-phone": 131057}, "burst_130429": 1}))
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status().as_u16(), 200);
    let (_, body) = wa_send(&c, &sb, "paused-phone", &text("1555", None)).await;
    assert_eq!(code(&body), 131057);
    let (_, body) = wa_send(&c, &sb, "1001", &text("1555", Some("ctl/1 a"))).await;
    assert_eq!(code(&body), 130429, "burst fault");
    let (status, _) = wa_send(&c, &sb, "1001", &text("1555", Some("ctl/1 a"))).await;
    assert_eq!(status, 200, "the burst fault counted down");
    let faults: Faults = c
        .get(format!("{base}/_sandbox/faults"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("faults");
    assert_eq!(faults.burst_130429, 0);
    assert_eq!(faults.sender_errors.get("paused-phone"), Some(&131057));

    let stats: Stats = c
        .get(format!("{base}/_sandbox/stats"))
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("stats json");
    assert_eq!(stats.accepted, 1);
    assert_eq!(stats.limit_errors, 1);
    assert_eq!(stats.errors_by_code.get("131057"), Some(&1));

    let accepted: Vec<herald_sandbox::Accepted> = c
        .get(format!("{base}/_sandbox/accepted?prefix=ctl%2F1+"))
        .send()
        .await
        .expect("accepted")
        .json()
        .await
        .expect("accepted json");
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].callback, "ctl/1 a");
    let none: Vec<Value> = c
        .get(format!("{base}/_sandbox/accepted?prefix=zzz"))
        .send()
        .await
        .expect("accepted")
        .json()
        .await
        .expect("accepted json");
    assert!(none.is_empty());

    // Unknown Graph paths answer like Graph.
    let (status, body) = post_json(
        &c,
        &format!("{base}/v21.0/1001/photos"),
        Some(TOKEN),
        &json!({}),
    )
    .await;
    assert_eq!((status, code(&body)), (400, 100));

    let resp = c
        .post(format!("{base}/_sandbox/reset"))
        .send()
        .await
        .expect("reset");
    assert_eq!(resp.status().as_u16(), 200);
    let stats = sb.stats();
    assert_eq!(stats.accepted, 0);
    assert!(stats.errors_by_code.is_empty());
    assert!(sb.accepted("").is_empty());
    sb.shutdown().await;
}
