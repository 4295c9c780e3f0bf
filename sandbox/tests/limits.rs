//! Meta's limits: the per-sender throughput bucket (130429 / 613) and the per-pair bucket
//! (131056), on real sockets and real time.

mod common;

use std::time::{Duration, Instant};

use common::*;
use herald_sandbox::SandboxConfig;
use serde_json::json;
use tokio::task::JoinSet;

/// Fires `n` sends at once to distinct recipients; returns the codes (0 = accepted).
async fn burst(sb: &herald_sandbox::Sandbox, phone: &str, n: usize, tag: &str) -> Vec<i64> {
    let c = client();
    let url = format!("{}/v21.0/{phone}/messages", sb.url());
    let mut set = JoinSet::new();
    for i in 0..n {
        let (c, url) = (c.clone(), url.clone());
        let body = text(&format!("1555{i:04}"), Some(&format!("{tag}-{i}")));
        set.spawn(async move { code(&post_json(&c, &url, Some(TOKEN), &body).await.1) });
    }
    let mut codes = Vec::new();
    while let Some(code) = set.join_next().await {
        codes.push(code.expect("task"));
    }
    codes
}

#[tokio::test]
async fn throughput_burst_gets_exactly_capacity_then_refills() {
    // Capacity 5, one token per second: the burst takes far less than a second.
    let sb = start(SandboxConfig {
        mps: 1.0,
        burst: Duration::from_secs(5),
        pair_interval: Duration::ZERO,
        ..SandboxConfig::default()
    })
    .await;
    let codes = burst(&sb, "1001", 12, "a").await;
    assert_eq!(codes.iter().filter(|&&c| c == 0).count(), 5, "{codes:?}");
    assert_eq!(
        codes.iter().filter(|&&c| c == 130429).count(),
        7,
        "{codes:?}"
    );

    // Another sender has its own bucket.
    let other = burst(&sb, "2002", 3, "b").await;
    assert!(other.iter().all(|&c| c == 0), "{other:?}");

    // Refused requests consumed nothing: one second later exactly one token is back.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let codes = burst(&sb, "1001", 3, "c").await;
    assert_eq!(codes.iter().filter(|&&c| c == 0).count(), 1, "{codes:?}");

    let stats = sb.stats();
    assert_eq!(stats.accepted, 9);
    assert_eq!(stats.limit_errors, 9);
    assert_eq!(stats.errors_by_code.get("130429"), Some(&9));
    assert!(stats.max_in_any_second <= 5 + 1, "{stats:?}");

    // The error body is Meta's.
    let (status, body) = wa_send(&client(), &sb, "1001", &text("15559999", None)).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], 130429);
    assert_eq!(body["error"]["message"], "(#130429) Rate limit hit");
    sb.shutdown().await;
}

#[tokio::test]
async fn pair_limit_is_131056_per_recipient() {
    let sb = start(SandboxConfig {
        mps: 1000.0,
        pair_interval: Duration::from_secs(1),
        pair_burst: 3,
        ..SandboxConfig::default()
    })
    .await;
    let c = client();
    let mut codes = Vec::new();
    for _ in 0..5 {
        // "+1 555 0100" and "15550100" are the same user.
        let (_, body) = wa_send(&c, &sb, "1001", &text("+1 555 0100", None)).await;
        codes.push(code(&body));
    }
    assert_eq!(codes, vec![0, 0, 0, 131056, 131056]);
    let (_, body) = wa_send(&c, &sb, "1001", &text("15550100", None)).await;
    assert_eq!(code(&body), 131056);
    assert_eq!(
        body["error"]["message"],
        "(#131056) (Business Account, Consumer Account) pair rate limit hit"
    );
    let (status, _) = wa_send(&c, &sb, "1001", &text("15550101", None)).await;
    assert_eq!(status, 200, "other recipients are unaffected");
    let (status, _) = wa_send(&c, &sb, "2002", &text("15550100", None)).await;
    assert_eq!(status, 200, "the pair is per sender");

    tokio::time::sleep(Duration::from_millis(1050)).await;
    let (status, _) = wa_send(&c, &sb, "1001", &text("15550100", None)).await;
    assert_eq!(status, 200, "one message per interval");
    let (_, body) = wa_send(&c, &sb, "1001", &text("15550100", None)).await;
    assert_eq!(code(&body), 131056);

    let stats = sb.stats();
    assert_eq!(stats.accepted, 6);
    assert_eq!(stats.errors_by_code.get("131056"), Some(&4));
    assert_eq!(stats.limit_errors, 0, "131056 is not a throughput error");
    sb.shutdown().await;
}

#[tokio::test]
async fn paced_sender_never_exceeds_capacity_plus_mps() {
    let mps = 50.0;
    let sb = start(SandboxConfig {
        mps,
        burst: Duration::from_millis(100),
        pair_interval: Duration::ZERO,
        ..SandboxConfig::default()
    })
    .await;
    // Try at 100/s, twice the limit, for 1.2 s with 4 concurrent senders.
    let c = client();
    let url = format!("{}/v21.0/1001/messages", sb.url());
    let started = Instant::now();
    let mut set = JoinSet::new();
    for w in 0..4 {
        let (c, url) = (c.clone(), url.clone());
        set.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(40));
            let mut i = 0;
            while started.elapsed() < Duration::from_millis(1200) {
                tick.tick().await;
                let body = text(&format!("1555{w}{i:04}"), None);
                let _ = post_json(&c, &url, Some(TOKEN), &body).await;
                i += 1;
            }
        });
    }
    while set.join_next().await.is_some() {}
    let stats = sb.stats();
    let capacity = 5;
    assert!(
        stats.max_in_any_second <= capacity + mps as u64,
        "{}",
        stats.max_in_any_second
    );
    assert!(stats.max_in_any_second > capacity, "{stats:?}");
    assert!(stats.limit_errors > 0, "the sender ran ahead of its pace");
    sb.shutdown().await;
}

#[tokio::test]
async fn messenger_throughput_is_613() {
    let sb = start(SandboxConfig {
        // Capacity 2, no refill to speak of during the test.
        mps: 0.1,
        burst: Duration::from_secs(20),
        ..SandboxConfig::default()
    })
    .await;
    let c = client();
    let mut codes = Vec::new();
    for i in 0..4 {
        let body = json!({"recipient":{"id":format!("psid-{i}")},"messaging_type":"RESPONSE","message":{"text":"hi"}});
        let (_, answer) = page_send(&c, &sb, &body).await;
        codes.push(code(&answer));
    }
    assert_eq!(codes, vec![0, 0, 613, 613]);
    let stats = sb.stats();
    assert_eq!(stats.limit_errors, 2);
    assert_eq!(stats.errors_by_code.get("613"), Some(&2));
    sb.shutdown().await;
}

#[tokio::test]
async fn reset_refills_buckets() {
    let sb = start(SandboxConfig {
        // Capacity 2, no refill to speak of during the test.
        mps: 0.1,
        burst: Duration::from_secs(20),
        pair_interval: Duration::ZERO,
        ..SandboxConfig::default()
    })
    .await;
    let first = burst(&sb, "1001", 4, "r1").await;
    assert_eq!(first.iter().filter(|&&c| c == 0).count(), 2, "{first:?}");
    let resp = client()
        .post(format!("{}/_sandbox/reset", sb.url()))
        .send()
        .await
        .expect("reset");
    assert!(resp.status().is_success());
    assert_eq!(sb.stats().accepted, 0);
    assert!(sb.accepted("r1-").is_empty());
    let second = burst(&sb, "1001", 4, "r2").await;
    assert_eq!(second.iter().filter(|&&c| c == 0).count(), 2, "{second:?}");
    assert_eq!(sb.stats().accepted, 2);
    sb.shutdown().await;
}
