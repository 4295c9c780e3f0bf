//! Meta's webhooks through a real `herald serve`: `herald bench webhooks` sends signed
//! deliveries from many connections; every delivery acknowledged with 200 must be stored and
//! then processed by the queue; and `herald bench import`, whose every valid row must be stored.
//! Correctness only, never speed.

mod common;

use common::{pg_url, run_bench, TestDir};
use serde_json::Value;

async fn bench(dir: &TestDir, name: &str, database_url: &str) -> Value {
    let args = [
        "bench",
        "webhooks",
        "--requests",
        "3000",
        "--concurrency",
        "32",
        "--database-url",
        database_url,
    ];
    run_bench(dir, name, &args, &[]).await
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

/// `herald bench import` through a real server: every valid row stored, every bad one reported.
async fn import(dir: &TestDir, name: &str, database_url: &str, format: &str) -> Value {
    let args = [
        "bench",
        "import",
        "--contacts",
        "5000",
        "--format",
        format,
        "--database-url",
        database_url,
    ];
    run_bench(dir, name, &args, &[]).await
}

#[tokio::test]
async fn contact_imports_store_every_valid_row_on_both_backends() {
    let dir = TestDir::new();
    let pg = import(&dir, "import-pg-csv", &pg_url(), "csv").await;
    assert_eq!(
        (pg["stored"].as_u64(), pg["rejected"].as_u64()),
        (Some(4995), Some(5)),
        "{pg}"
    );
    let sqlite = import(
        &dir,
        "import-sqlite-ndjson",
        &dir.sqlite_url("import"),
        "ndjson",
    )
    .await;
    assert_eq!(
        (sqlite["in_database"].as_u64(), sqlite["rejected"].as_u64()),
        (Some(4995), Some(5)),
        "{sqlite}"
    );
}
