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
    /// The row would duplicate one that must be unique (a contact's phone in its workspace).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A secret could not be encrypted or decrypted (no master key, a key that is not
    /// configured, altered data).
    #[error("channel secrets: {0}")]
    Secrets(#[from] crate::crypto::CryptoError),
}

impl StoreError {
    /// Whether trying the same thing again later may succeed: the connection was lost, the
    /// database is restarting or overloaded, a lock or serialization conflict. False when the
    /// database refused the request itself (bad data, a constraint), which a retry repeats.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Database(db)) => {
                let code = db.code();
                let code = code.as_deref().unwrap_or("");
                // PostgreSQL SQLSTATE classes: 08 connection, 40 rollback (serialization,
                // deadlock), 53 resources, 57 operator intervention (shutdown), 58 system.
                if ["08", "40", "53", "57", "58"]
                    .iter()
                    .any(|c| code.starts_with(c))
                {
                    return true;
                }
                // SQLite result codes, primary code in the low byte: BUSY, LOCKED, IOERR, FULL.
                // Only SQLite's: many SQLSTATEs are digits too, and 22021 (a NUL byte in text)
                // has 5 in its low byte, so a refused write was retried as if SQLite were busy.
                db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some()
                    && code
                        .parse::<i32>()
                        .is_ok_and(|n| matches!(n & 0xff, 5 | 6 | 10 | 13))
            }
            StoreError::Database(
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed,
            ) => true,
            StoreError::Database(_)
            | StoreError::Invalid(_)
            | StoreError::Corrupt(_)
            | StoreError::Migration { .. }
            | StoreError::UnsupportedUrl(_)
            | StoreError::Secrets(_)
            | StoreError::Conflict(_) => false,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_connections_are_transient_refusals_are_not() {
        assert!(StoreError::Database(sqlx::Error::PoolTimedOut).is_transient());
        assert!(
            StoreError::Database(sqlx::Error::Io(std::io::Error::other("reset"))).is_transient()
        );
        assert!(!StoreError::Database(sqlx::Error::RowNotFound).is_transient());
        assert!(!StoreError::Corrupt("x".into()).is_transient());
        assert!(!StoreError::Invalid(InvalidJob("x".into())).is_transient());
    }
}
