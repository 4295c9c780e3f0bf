//! The engine's errors: one enum for what the store can fail with.

use crate::model::InvalidJob;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database said no or could not be reached. Transient failures are retried by the runtime.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Invalid(#[from] InvalidJob),
    /// A stored row that the engine cannot read back (corrupted or written by a newer version).
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("migration {version} failed: {source}")]
    Migration {
        version: i64,
        #[source]
        source: sqlx::Error,
    },
    #[error("unsupported database URL {0:?}: use postgres://… or sqlite:…")]
    UnsupportedUrl(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
