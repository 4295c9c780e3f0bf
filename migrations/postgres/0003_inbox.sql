-- Meta's webhook deliveries, stored raw once their signature checks out, and processed later
-- through the queue (a `meta.webhook` job per stored batch).
CREATE TABLE herald_webhook_events (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel_id   uuid        NOT NULL,
    received_at  timestamptz NOT NULL,
    -- The body exactly as Meta signed it.
    body         bytea       NOT NULL,
    -- Set once its events are applied; a delivery is applied at least once, and applying one
    -- twice changes nothing.
    processed_at timestamptz
);
CREATE INDEX herald_webhook_events_pending ON herald_webhook_events (id) WHERE processed_at IS NULL;

-- Messages users sent us, one row per Meta message id: Meta delivers at least once, and a
-- redelivery finds its row and is dropped.
CREATE TABLE herald_inbound_messages (
    channel_id          uuid        NOT NULL,
    provider_message_id text        NOT NULL,
    workspace_id        uuid        NOT NULL,
    -- wa_id (WhatsApp), PSID (Messenger) or IGSID (Instagram).
    sender              text        NOT NULL,
    kind                text        NOT NULL,
    text                text,
    -- The message object as Meta sent it.
    payload             jsonb       NOT NULL,
    sent_at             timestamptz NOT NULL,
    received_at         timestamptz NOT NULL,
    PRIMARY KEY (channel_id, provider_message_id)
);
CREATE INDEX herald_inbound_messages_sender ON herald_inbound_messages (channel_id, sender, sent_at);
