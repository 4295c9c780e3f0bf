//! The one error type of the rate limiters. Only Redis, the fallback board and construction
//! can fail: the `Limiter` trait never fails, because the fail-safe wrapper turns every error
//! into a conservative local decision.

use std::time::Duration;

/// Why a Redis limiter call, or building a limiter, failed.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// The Redis URL could not be parsed: a configuration mistake, reported at start rather than
    /// hidden behind a fallback that would run at a fraction of the rate forever.
    #[error("invalid Redis URL: {0}")]
    InvalidUrl(#[source] redis::RedisError),
    /// A limiter setting is out of range (named in the message).
    #[error("invalid rate limiter configuration: {0}")]
    InvalidConfig(String),
    /// Redis answered with an error, or the connection failed or was lost.
    #[error("Redis error: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer within the call timeout, so that a hung Redis never stalls dispatch.
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    /// A script answered with something other than what it returns (a different script under
    /// the same name, or a Redis that changed underneath).
    #[error("unexpected reply from Redis: {0}")]
    Reply(String),
    /// The fallback board (the job store, where processes without Redis announce their
    /// shares) failed or did not answer within the call timeout.
    #[error("fallback board: {0}")]
    Board(String),
}
