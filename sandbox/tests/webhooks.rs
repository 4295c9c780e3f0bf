//! Webhooks: signed and batched status deliveries, lost responses, failed statuses,
//! Messenger echoes, inbound messages, retries and the flush on shutdown.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use herald_sandbox::{Faults, SandboxConfig, Status};
use serde_json::{json, Value};
use tokio::task::JoinSet;

fn config(receiver: &Receiver) -> SandboxConfig {
    SandboxConfig {
        webhook_url: Some(receiver.url.clone()),
        ..SandboxConfig::default()
    }
}

#[tokio::test]
async fn statuses_are_signed_and_batched() {
    let rx = Receiver::start().await;
    let sb = start(SandboxConfig {
        webhook_batch: 3,
        webhook_flush: Duration::from_millis(50),
        ..config(&rx)
    })
    .await;
    let c = client();
    let mut set = JoinSet::new();
    for i in 0..4 {
        let (c, url) = (c.clone(), format!("{}/v21.0/1001/messages", sb.url()));
        set.spawn(async move {
            let body = text(&format!("+1555000{i}"), Some(&format!("sig-{i}")));
            post_json(&c, &url, Some(TOKEN), &body).await
        });
    }
    let mut ids = HashMap::new();
    while let Some(res) = set.join_next().await {
        let (status, body) = res.expect("task");
        assert_eq!(status, 200);
        let wa_id = body["contacts"][0]["wa_id"]
            .as_str()
            .expect("wa_id")
            .to_owned();
        ids.insert(
            body["messages"][0]["id"].as_str().expect("id").to_owned(),
            wa_id,
        );
    }
    assert!(wait_until(Duration::from_secs(3), || sb.stats().statuses_sent >= 8).await);
    assert_eq!(rx.state.bad_signatures.load(Ordering::SeqCst), 0);

    let statuses = rx.statuses();
    assert_eq!(statuses.len(), 8);
    for s in &statuses {
        let id = s["id"].as_str().expect("id");
        assert_eq!(
            s["recipient_id"].as_str(),
            ids.get(id).map(String::as_str),
            "{s}"
        );
        assert!(
            s["timestamp"]
                .as_str()
                .is_some_and(|t| t.parse::<u64>().is_ok()),
            "{s}"
        );
        assert!(s["biz_opaque_callback_data"]
            .as_str()
            .is_some_and(|c| c.starts_with("sig-")));
        assert!(s.get("errors").is_none());
    }
    for id in ids.keys() {
        let mine: Vec<&str> = statuses
            .iter()
            .filter(|s| s["id"] == id.as_str())
            .filter_map(|s| s["status"].as_str())
            .collect();
        let mut sorted = mine.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec!["delivered", "sent"], "{id}");
    }

    let posts = rx.posts();
    for post in &posts {
        assert_eq!(post["object"], "whatsapp_business_account");
        assert_eq!(post["entry"][0]["id"], "sandbox-waba");
        let change = &post["entry"][0]["changes"][0];
        assert_eq!(change["field"], "messages");
        assert_eq!(change["value"]["messaging_product"], "whatsapp");
        assert_eq!(change["value"]["metadata"]["phone_number_id"], "1001");
        assert_eq!(
            change["value"]["metadata"]["display_phone_number"],
            "15550000000"
        );
        let n = change["value"]["statuses"].as_array().map_or(0, Vec::len);
        assert!((1..=3).contains(&n), "batch of {n}");
    }
    assert!(posts.len() >= 3, "8 statuses in batches of at most 3");
    assert!(
        posts
            .iter()
            .any(|p| p["entry"][0]["changes"][0]["value"]["statuses"]
                .as_array()
                .is_some_and(|s| s.len() > 1)),
        "statuses are batched"
    );
    let stats = sb.stats();
    assert_eq!(stats.webhooks_sent, posts.len() as u64);
    assert_eq!(stats.statuses_sent, 8);
    assert_eq!(stats.webhook_failures, 0);
    sb.shutdown().await;
}

#[tokio::test]
async fn lost_response_is_accepted_and_reconcilable() {
    let rx = Receiver::start().await;
    let sb = start(SandboxConfig {
        lost_response_hold: Duration::from_millis(300),
        ..config(&rx)
    })
    .await;
    sb.set_faults(Faults {
        lose_response: 1.0,
        ..Faults::default()
    });
    let url = format!("{}/v21.0/1001/messages", sb.url());

    // The caller's timeout fires first.
    let short = reqwest::Client::builder()
        .timeout(Duration::from_millis(150))
        .build()
        .expect("client");
    let err = short
        .post(&url)
        .bearer_auth(TOKEN)
        .json(&text("15550001", Some("lost-1")))
        .send()
        .await
        .expect_err("no response");
    assert!(err.is_timeout(), "{err}");

    // Without a timeout, the connection is dropped after the hold, unanswered.
    let started = Instant::now();
    let err = client()
        .post(&url)
        .bearer_auth(TOKEN)
        .json(&text("15550002", Some("lost-2")))
        .send()
        .await
        .expect_err("connection dropped");
    assert!(!err.is_timeout(), "{err}");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );

    let stats = sb.stats();
    assert_eq!(stats.accepted, 2);
    assert_eq!(stats.lost_responses, 2);
    let log = sb.accepted("lost-");
    assert_eq!(log.len(), 2);

    // The status webhooks carry the callback data, so the sender can reconcile.
    assert!(wait_until(Duration::from_secs(3), || rx.statuses().len() >= 4).await);
    let statuses = rx.statuses();
    for entry in &log {
        assert!(statuses.iter().any(|s| s["id"] == entry.message_id.as_str()
            && s["biz_opaque_callback_data"] == entry.callback.as_str()
            && s["status"] == "sent"));
    }
    sb.shutdown().await;
}

#[tokio::test]
async fn shutdown_is_not_held_up_by_lost_responses() {
    let sb = start(SandboxConfig::default()).await;
    sb.set_faults(Faults {
        lose_response: 1.0,
        ..Faults::default()
    });
    let url = format!("{}/v21.0/1001/messages", sb.url());
    let c = client();
    let pending = tokio::spawn(async move {
        c.post(&url)
            .bearer_auth(TOKEN)
            .json(&text("15550001", None))
            .send()
            .await
            .map(|r| r.status())
    });
    assert!(wait_until(Duration::from_secs(2), || sb.stats().accepted == 1).await);
    let started = Instant::now();
    sb.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let result = pending.await.expect("task");
    assert!(
        result.is_err(),
        "the lost response is never written: {result:?}"
    );
}

#[tokio::test]
async fn fail_after_accept_sends_a_failed_status() {
    let rx = Receiver::start().await;
    let sb = start(config(&rx)).await;
    sb.set_faults(Faults {
        fail_after_accept: HashMap::from([("15550131".to_owned(), 131026)]),
        ..Faults::default()
    });
    let c = client();
    let (status, body) = wa_send(&c, &sb, "1001", &text("+1 555 0131", Some("fa-1"))).await;
    assert_eq!(status, 200, "accepted synchronously");
    let id = body["messages"][0]["id"].as_str().expect("id").to_owned();
    let (status, ok) = wa_send(&c, &sb, "1001", &text("15550132", Some("fa-2"))).await;
    assert_eq!(status, 200);
    let ok_id = ok["messages"][0]["id"].as_str().expect("id").to_owned();

    assert!(wait_until(Duration::from_secs(3), || rx.statuses().len() >= 3).await);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let statuses = rx.statuses();
    let failed: Vec<&Value> = statuses.iter().filter(|s| s["id"] == id.as_str()).collect();
    assert_eq!(failed.len(), 1, "only the failed status: {statuses:?}");
    assert_eq!(failed[0]["status"], "failed");
    assert_eq!(failed[0]["biz_opaque_callback_data"], "fa-1");
    assert_eq!(failed[0]["recipient_id"], "15550131");
    assert_eq!(failed[0]["errors"][0]["code"], 131026);
    assert!(failed[0]["errors"][0]["title"].is_string());
    assert_eq!(
        statuses
            .iter()
            .filter(|s| s["id"] == ok_id.as_str())
            .count(),
        2
    );
    assert_eq!(sb.stats().accepted, 2);
    sb.shutdown().await;
}

#[tokio::test]
async fn messenger_echo_carries_metadata_then_delivery() {
    let rx = Receiver::start().await;
    let sb = start(SandboxConfig {
        statuses: vec![Status::Sent, Status::Delivered, Status::Read],
        ..config(&rx)
    })
    .await;
    let (status, body) = page_send(
        &client(),
        &sb,
        &json!({"recipient":{"id":"psid-9"},"messaging_type":"RESPONSE",
                "message":{"text":"your order shipped","metadata":"job-42"}}),
    )
    .await;
    assert_eq!(status, 200);
    let mid = body["message_id"].as_str().expect("mid").to_owned();
    assert!(wait_until(Duration::from_secs(3), || rx.messaging().len() >= 3).await);
    let posts = rx.posts();
    assert_eq!(posts[0]["object"], "page");
    assert_eq!(posts[0]["entry"][0]["id"], "sandbox-page");
    assert!(posts[0]["entry"][0]["time"].is_u64());
    let items = rx.messaging();
    let echo = &items[0];
    assert_eq!(echo["sender"]["id"], "sandbox-page");
    assert_eq!(echo["recipient"]["id"], "psid-9");
    assert_eq!(echo["message"]["is_echo"], true);
    assert_eq!(echo["message"]["mid"], mid.as_str());
    assert_eq!(echo["message"]["metadata"], "job-42");
    assert_eq!(echo["message"]["text"], "your order shipped");
    let delivery = &items[1];
    assert_eq!(delivery["sender"]["id"], "psid-9");
    assert_eq!(delivery["delivery"]["mids"][0], mid.as_str());
    assert!(delivery["delivery"]["watermark"].is_u64());
    assert!(items[2]["read"]["watermark"].is_u64());
    assert_eq!(rx.state.bad_signatures.load(Ordering::SeqCst), 0);
    // The receiver stores a POST before answering it; the sandbox counts after the answer.
    assert!(wait_until(Duration::from_secs(3), || sb.stats().statuses_sent == 3).await);
    sb.shutdown().await;
}

#[tokio::test]
async fn inbound_message_webhook() {
    let rx = Receiver::start().await;
    let sb = start(config(&rx)).await;
    let resp = client()
        .post(format!("{}/_sandbox/inbound", sb.url()))
        .json(&json!({"sender_id": "1001", "from": "+1 555 0177", "text": "STOP", "id": "wamid.in-1"}))
        .send()
        .await
        .expect("inbound");
    assert_eq!(resp.status().as_u16(), 200);
    let bad = client()
        .post(format!("{}/_sandbox/inbound", sb.url()))
        .json(&json!({"from": "1"}))
        .send()
        .await
        .expect("inbound");
    assert_eq!(bad.status().as_u16(), 400);
    assert!(wait_until(Duration::from_secs(3), || !rx.wa_values().is_empty()).await);
    let value = &rx.wa_values()[0];
    assert_eq!(value["metadata"]["phone_number_id"], "1001");
    assert_eq!(value["contacts"][0]["wa_id"], "15550177");
    assert!(value["contacts"][0]["profile"]["name"].is_string());
    let message = &value["messages"][0];
    assert_eq!(message["from"], "15550177");
    assert_eq!(message["id"], "wamid.in-1");
    assert_eq!(message["type"], "text");
    assert_eq!(message["text"]["body"], "STOP");
    assert!(message["timestamp"]
        .as_str()
        .is_some_and(|t| t.parse::<u64>().is_ok()));
    assert_eq!(
        sb.stats().statuses_sent,
        0,
        "an inbound message is not a status"
    );
    sb.shutdown().await;
}

#[tokio::test]
async fn failed_deliveries_are_retried() {
    let rx = Receiver::start().await;
    rx.state.fail_next.store(2, Ordering::SeqCst);
    let sb = start(config(&rx)).await;
    let (status, _) = wa_send(&client(), &sb, "1001", &text("15550001", Some("retry-1"))).await;
    assert_eq!(status, 200);
    assert!(wait_until(Duration::from_secs(3), || sb.stats().statuses_sent >= 2).await);
    assert_eq!(rx.statuses().len(), 2);
    assert_eq!(rx.state.failed.load(Ordering::SeqCst), 2);
    let stats = sb.stats();
    assert_eq!(stats.statuses_sent, 2);
    assert_eq!(stats.webhook_failures, 0);
    sb.shutdown().await;
}

#[tokio::test]
async fn shutdown_flushes_pending_webhooks() {
    let rx = Receiver::start().await;
    let sb = start(SandboxConfig {
        webhook_flush: Duration::from_secs(30),
        ..config(&rx)
    })
    .await;
    let (status, _) = wa_send(&client(), &sb, "1001", &text("15550001", Some("flush-1"))).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(rx.posts().is_empty(), "the partial batch is still waiting");
    let started = Instant::now();
    sb.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(rx.statuses().len(), 2);
}
