-- Contacts: the people a workspace messages, one per E.164 phone number in a workspace.
-- Ids are UUIDv7 (time-ordered): a bulk import appends to the primary key instead of writing
-- all over it, and pages (workspace, id) come in creation order. Phones and labels compare
-- bytewise (COLLATE "C"): they are identifiers, and the unique index is far cheaper so.
CREATE TABLE herald_contacts (
    id           uuid        NOT NULL,
    workspace_id uuid        NOT NULL,
    phone        text        COLLATE "C" NOT NULL,
    name         text,
    -- Sorted, unique; audiences are chosen by label (the GIN index).
    labels       text[]      COLLATE "C" NOT NULL DEFAULT '{}',
    attributes   jsonb       NOT NULL DEFAULT '{}',
    opted_out    boolean     NOT NULL DEFAULT false,
    opted_out_at timestamptz,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    PRIMARY KEY (workspace_id, id),
    UNIQUE (workspace_id, phone)
);
CREATE INDEX herald_contacts_labels ON herald_contacts USING gin (labels);
