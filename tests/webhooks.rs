//! Meta's webhooks through a real `herald serve`: `herald bench webhooks` sends signed
//! deliveries from many connections; every delivery acknowledged with 200 must be stored and
//! then processed by the queue. Correctness only, never speed.

mod common;

use std::time::Duration;

use common::{herald, pg_url, Proc, TestDir};
use serde_json::Value;

async fn bench(dir: &TestDir, name: &str, database_url: &str) -> Value {
    let mut cmd = herald();
    cmd.args([
        "bench",
        "webhooks",
        "--requests",
        "3000",
        "--concurrency",
        "32",
        "--database-url",
        database_url,
    ])
    .current_dir(dir.path())
    .env("HERALD_LOG", "warn");
    let mut proc = Proc::spawn(name, cmd, dir.path());
    let status = proc.wait_for_exit(Duration::from_secs(240)).await;
    assert!(status.success(), "the bench succeeds\n{}", proc.logs());
    let stdout = proc.stdout();
    let last = stdout.lines().last().unwrap_or_default().to_owned();
    serde_json::from_str(&last)
        .unwrap_or_else(|e| panic!("last line is JSON ({e}): {last:?}\n{}", proc.logs()))
}

fn assert_all_stored_and_processed(result: &Value) {
    assert_eq!(result["requests"], 3000, "{result}");
    assert_eq!(result["errors"], 0, "{result}");
    assert_eq!(
        result["stored"], 3000,
        "every acknowledged delivery is stored: {result}"
    );
    assert_eq!(result["pending_after_wait"], 0, "and processed: {result}");
}

#[tokio::test]
async fn every_acknowledged_delivery_is_stored_and_processed_on_postgres() {
    let dir = TestDir::new();
    let result = bench(&dir, "bench-webhooks-pg", &pg_url()).await;
    assert_all_stored_and_processed(&result);
}

#[tokio::test]
async fn every_acknowledged_delivery_is_stored_and_processed_on_sqlite() {
    let dir = TestDir::new();
    let result = bench(&dir, "bench-webhooks-sqlite", &dir.sqlite_url("webhooks")).await;
    assert_all_stored_and_processed(&result);
}
