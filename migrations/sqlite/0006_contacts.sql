-- Contacts; see the PostgreSQL migration. Labels are a JSON array of sorted, unique strings.
CREATE TABLE herald_contacts (
    id           TEXT    PRIMARY KEY,
    workspace_id TEXT    NOT NULL,
    phone        TEXT    NOT NULL,
    name         TEXT,
    labels       TEXT    NOT NULL DEFAULT '[]',
    attributes   TEXT    NOT NULL DEFAULT '{}',
    opted_out    INTEGER NOT NULL DEFAULT 0,
    opted_out_at INTEGER,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    UNIQUE (workspace_id, phone)
);
CREATE INDEX herald_contacts_page ON herald_contacts (workspace_id, id);
