//! Test fixtures: a fresh store per test (its own PostgreSQL schema, or its own SQLite file).
#![allow(dead_code)]

use std::sync::Arc;

use herald_engine::store::{PgStore, PgStoreConfig, SqliteStore, SqliteStoreConfig};
use herald_engine::Store;

/// The PostgreSQL server tests use; CI sets it, the default is the machine's local server.
pub fn pg_url() -> String {
    std::env::var("HERALD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

pub async fn pg_store_in(schema: &str) -> PgStore {
    let store = PgStore::connect(&PgStoreConfig {
        url: pg_url(),
        max_connections: 8,
        acquire_timeout: std::time::Duration::from_secs(10),
        schema: Some(schema.to_owned()),
    })
    .await
    .expect("connect to PostgreSQL (is it running? set HERALD_TEST_DATABASE_URL)");
    store
        .migrate()
        .await
        .expect("migrate PostgreSQL (is it running? set HERALD_TEST_DATABASE_URL)");
    store
}

pub async fn pg() -> Arc<dyn Store> {
    Arc::new(pg_store_in(&unique_name("t")).await)
}

pub fn sqlite_path() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{}.db", unique_name("herald_test")))
}

pub async fn sqlite_at(path: &std::path::Path) -> SqliteStore {
    let store = SqliteStore::connect(&SqliteStoreConfig {
        url: format!("sqlite:{}", path.display()),
        acquire_timeout: std::time::Duration::from_secs(10),
        synchronous_full: false,
    })
    .await
    .expect("open SQLite");
    store.migrate().await.expect("migrate SQLite");
    store
}

pub async fn sqlite() -> Arc<dyn Store> {
    Arc::new(sqlite_at(&sqlite_path()).await)
}

/// Runs each listed test against both backends.
#[macro_export]
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::pg().await).await
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::sqlite().await).await
                }
            )*
        }
    };
}
