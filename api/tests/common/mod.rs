//! Fixtures of the HTTP tests: a store in a fresh SQLite file, removed when the test ends.
#![allow(dead_code)]

use std::sync::Arc;

use herald_engine::{ConnectOptions, Store};
use uuid::Uuid;

pub struct Fixture {
    pub store: Arc<dyn Store>,
    path: std::path::PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.path.display()));
        }
    }
}

/// A migrated SQLite store with a test master key.
pub async fn fixture() -> Fixture {
    let path = std::env::temp_dir().join(format!("herald_api_{}.db", Uuid::new_v4().simple()));
    let store = herald_engine::connect(
        &format!("sqlite:{}", path.display()),
        &ConnectOptions {
            keyring: Some(Arc::new(
                herald_engine::crypto::Keyring::parse(&"ab".repeat(32), &[]).expect("test key"),
            )),
            ..ConnectOptions::default()
        },
    )
    .await
    .expect("open sqlite");
    Fixture { store, path }
}
