-- Contacts: the people a workspace messages, one per E.164 phone number in a workspace.
CREATE TABLE herald_contacts (
    id           uuid        PRIMARY KEY,
    workspace_id uuid        NOT NULL,
    phone        text        NOT NULL,
    name         text,
    -- Sorted, unique; audiences are chosen by label (the GIN index).
    labels       text[]      NOT NULL DEFAULT '{}',
    attributes   jsonb       NOT NULL DEFAULT '{}',
    opted_out    boolean     NOT NULL DEFAULT false,
    opted_out_at timestamptz,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    UNIQUE (workspace_id, phone)
);
CREATE INDEX herald_contacts_page ON herald_contacts (workspace_id, id);
CREATE INDEX herald_contacts_labels ON herald_contacts USING gin (labels);
