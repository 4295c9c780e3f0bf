-- Processes that lost Redis and take a share of every shared rate from a local limiter (the
-- fail-safe limiter's fallback). The processes still on Redis read the unexpired shares and
-- leave them free, so that a partition (some processes without Redis, the others with it)
-- never sends faster than the rate. It lives in the database because the processes announcing
-- here cannot reach Redis. Expiry is by the database's clock, the one clock every process
-- reading and writing here shares.
CREATE TABLE herald_limiter_fallbacks (
    process_id text             PRIMARY KEY,
    -- The process's fallback period: a late withdrawal of an earlier period removes nothing.
    period     bigint           NOT NULL,
    share      double precision NOT NULL,
    expires_at timestamptz      NOT NULL
);
