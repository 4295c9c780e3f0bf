-- Processes that lost Redis and take a share of every shared rate from a local limiter (the
-- fail-safe limiter's fallback); see the PostgreSQL migration. expires_at is in microseconds
-- since the Unix epoch, by this machine's clock (SQLite is only shared by processes on one
-- machine).
CREATE TABLE herald_limiter_fallbacks (
    process_id TEXT    PRIMARY KEY,
    period     INTEGER NOT NULL,
    share      REAL    NOT NULL,
    expires_at INTEGER NOT NULL
);
