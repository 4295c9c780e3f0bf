-- Rate-limited delivery to Meta. Same design as the PostgreSQL schema (see its comments); times
-- are integer microseconds since the Unix epoch, ids UUID text, JSON as text.

CREATE INDEX herald_jobs_claim_rated ON herald_jobs (queue, rate_key, priority, run_at, id)
    WHERE state = 'available' AND rate_key IS NOT NULL;
DROP INDEX herald_jobs_rate;

CREATE TABLE herald_channels (
    id             TEXT    PRIMARY KEY,
    workspace_id   TEXT    NOT NULL,
    platform       TEXT    NOT NULL CHECK (platform IN ('whatsapp', 'messenger', 'instagram')),
    name           TEXT    NOT NULL,
    sender_id      TEXT    NOT NULL,
    portfolio_id   TEXT,
    access_token   TEXT    NOT NULL,
    app_secret     TEXT    NOT NULL,
    verify_token   TEXT    NOT NULL,
    graph_base_url TEXT    NOT NULL,
    api_version    TEXT    NOT NULL,
    limits         TEXT    NOT NULL,
    paused_reason  TEXT,
    paused_broadcasts_only INTEGER NOT NULL DEFAULT 0,
    paused_at      INTEGER,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
);
CREATE INDEX herald_channels_workspace ON herald_channels (workspace_id, id);

CREATE TABLE herald_sends (
    id                  TEXT    PRIMARY KEY,
    workspace_id        TEXT    NOT NULL,
    channel_id          TEXT    NOT NULL,
    recipient           TEXT    NOT NULL,
    message             TEXT    NOT NULL,
    lane                TEXT    NOT NULL CHECK (lane IN ('interactive', 'broadcast')),
    status              TEXT    NOT NULL,
    status_rank         INTEGER NOT NULL,
    requests            INTEGER NOT NULL DEFAULT 0,
    provider_message_id TEXT,
    error_code          INTEGER,
    error               TEXT,
    created_at          INTEGER NOT NULL,
    requested_at        INTEGER,
    accepted_at         INTEGER,
    updated_at          INTEGER NOT NULL
);
CREATE INDEX herald_sends_provider ON herald_sends (provider_message_id)
    WHERE provider_message_id IS NOT NULL;
CREATE INDEX herald_sends_channel ON herald_sends (channel_id, created_at);

CREATE TABLE herald_reach (
    portfolio_id TEXT    NOT NULL,
    recipient    TEXT    NOT NULL,
    reached_at   INTEGER NOT NULL,
    PRIMARY KEY (portfolio_id, recipient)
);
CREATE INDEX herald_reach_time ON herald_reach (portfolio_id, reached_at);

CREATE TABLE herald_windows (
    channel_id      TEXT    NOT NULL,
    recipient       TEXT    NOT NULL,
    last_inbound_at INTEGER NOT NULL,
    PRIMARY KEY (channel_id, recipient)
);
