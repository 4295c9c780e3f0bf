//! Fixtures of the HTTP tests: a store in a fresh SQLite file, removed when the test ends.
#![allow(dead_code)]

use std::sync::Arc;

use axum::Router;
use herald_api::{app, ApiConfig, AppState};
use herald_engine::{ConnectOptions, Store};
use uuid::Uuid;

/// The admin token of the apps [`Fixture::admin_app`] builds.
pub const ADMIN: &str = "admin-token-for-tests-0123456789";

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

impl Fixture {
    /// The app on this store, with the system clock.
    pub fn app(&self, config: ApiConfig) -> Router {
        app(AppState::new(
            self.store.clone(),
            Arc::new(herald_engine::SystemClock),
            config,
        ))
    }

    /// The app with the admin routes open to [`ADMIN`].
    pub fn admin_app(&self) -> Router {
        self.app(ApiConfig {
            admin_token: Some(ADMIN.into()),
            ..ApiConfig::default()
        })
    }

    /// A no-op job due in an hour: waiting, so operators can cancel or discard it.
    pub async fn waiting_job(&self) -> herald_engine::JobId {
        self.store
            .enqueue(
                &herald_engine::NewJob::new("noop", serde_json::json!({}))
                    .run_at(chrono::Utc::now() + chrono::Duration::hours(1)),
                chrono::Utc::now(),
            )
            .await
            .expect("enqueue")
            .id
    }
}
