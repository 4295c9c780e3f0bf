-- Meta's webhook deliveries, stored raw once their signature checks out, and processed later
-- through the queue (a `meta.webhook` job per stored batch). See the PostgreSQL migration.
CREATE TABLE herald_webhook_events (
    id           INTEGER PRIMARY KEY,
    channel_id   TEXT    NOT NULL,
    received_at  INTEGER NOT NULL,
    body         BLOB    NOT NULL,
    processed_at INTEGER
);
CREATE INDEX herald_webhook_events_pending ON herald_webhook_events (id) WHERE processed_at IS NULL;

CREATE TABLE herald_inbound_messages (
    channel_id          TEXT    NOT NULL,
    provider_message_id TEXT    NOT NULL,
    workspace_id        TEXT    NOT NULL,
    sender              TEXT    NOT NULL,
    kind                TEXT    NOT NULL,
    text                TEXT,
    payload             TEXT    NOT NULL,
    sent_at             INTEGER NOT NULL,
    received_at         INTEGER NOT NULL,
    PRIMARY KEY (channel_id, provider_message_id)
) WITHOUT ROWID;
CREATE INDEX herald_inbound_messages_sender ON herald_inbound_messages (channel_id, sender, sent_at);
