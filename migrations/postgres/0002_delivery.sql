-- Rate-limited delivery to Meta.

-- The rate-limited producer claims one rate key's jobs at a time, as many as its limiter granted;
-- this index serves those claims and the loose scan that finds which keys have work. It replaces
-- herald_jobs_rate, which no query used.
CREATE INDEX herald_jobs_claim_rated ON herald_jobs (queue, rate_key, priority, run_at, id)
    WHERE state = 'available' AND rate_key IS NOT NULL;
DROP INDEX herald_jobs_rate;

-- A connected WhatsApp number, Facebook page or Instagram account.
CREATE TABLE herald_channels (
    id             uuid        PRIMARY KEY,
    workspace_id   uuid        NOT NULL,
    platform       text        NOT NULL CHECK (platform IN ('whatsapp', 'messenger', 'instagram')),
    name           text        NOT NULL,
    -- phone_number_id (WhatsApp), page id (Messenger) or Instagram account id.
    sender_id      text        NOT NULL,
    -- The business portfolio whose messaging tier (unique users a day) this channel shares.
    portfolio_id   text,
    access_token   text        NOT NULL,
    app_secret     text        NOT NULL,
    verify_token   text        NOT NULL,
    graph_base_url text        NOT NULL,
    api_version    text        NOT NULL,
    -- ChannelLimits as JSON: throughput, pair interval, tier, headroom.
    limits         jsonb       NOT NULL,
    -- Set when Meta told us to stop (190, 368, 131048): nothing is sent until an operator resumes.
    paused_reason  text,
    -- 131048 (spam quality) pauses broadcasts only: interactive replies still go.
    paused_broadcasts_only boolean NOT NULL DEFAULT false,
    paused_at      timestamptz,
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL
);
CREATE INDEX herald_channels_workspace ON herald_channels (workspace_id, id);

-- One outbound message to one recipient. Recorded before Meta is called, so a lost response
-- leaves a trace ("unknown") that the status webhook reconciles through biz_opaque_callback_data.
CREATE TABLE herald_sends (
    id                  uuid        PRIMARY KEY,
    workspace_id        uuid        NOT NULL,
    channel_id          uuid        NOT NULL,
    recipient           text        NOT NULL,
    message             json        NOT NULL,
    lane                text        NOT NULL CHECK (lane IN ('interactive', 'broadcast')),
    status              text        NOT NULL,
    -- Status order: a webhook never moves a send backwards.
    status_rank         smallint    NOT NULL,
    requests            integer     NOT NULL DEFAULT 0,
    provider_message_id text,
    error_code          bigint,
    error               text,
    created_at          timestamptz NOT NULL,
    requested_at        timestamptz,
    accepted_at         timestamptz,
    updated_at          timestamptz NOT NULL
);
CREATE INDEX herald_sends_provider ON herald_sends (provider_message_id)
    WHERE provider_message_id IS NOT NULL;
CREATE INDEX herald_sends_channel ON herald_sends (channel_id, created_at);

-- Users reached outside a service window, per business portfolio (the messaging tier).
CREATE TABLE herald_reach (
    portfolio_id text        NOT NULL,
    recipient    text        NOT NULL,
    reached_at   timestamptz NOT NULL,
    PRIMARY KEY (portfolio_id, recipient)
);
CREATE INDEX herald_reach_time ON herald_reach (portfolio_id, reached_at);

-- The customer service window: the last time each user wrote to a channel.
CREATE TABLE herald_windows (
    channel_id      uuid        NOT NULL,
    recipient       text        NOT NULL,
    last_inbound_at timestamptz NOT NULL,
    PRIMARY KEY (channel_id, recipient)
);
