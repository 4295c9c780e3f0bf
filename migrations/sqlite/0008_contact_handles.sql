-- Contacts known by a handle; see the PostgreSQL migration. SQLite cannot drop a NOT NULL, so
-- herald_contacts is rebuilt: the same table with a nullable phone, every row copied, the old
-- one dropped and the new one renamed, then its index recreated. This runs inside the
-- migration's transaction (a failure leaves the old table as it was); no foreign key refers to
-- herald_contacts, so dropping it checks nothing.
CREATE TABLE herald_contacts_new (
    id           TEXT    PRIMARY KEY,
    workspace_id TEXT    NOT NULL,
    phone        TEXT,
    name         TEXT,
    labels       TEXT    NOT NULL DEFAULT '[]',
    attributes   TEXT    NOT NULL DEFAULT '{}',
    opted_out    INTEGER NOT NULL DEFAULT 0,
    opted_out_at INTEGER,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    UNIQUE (workspace_id, phone)
);
INSERT INTO herald_contacts_new (id, workspace_id, phone, name, labels, attributes, opted_out,
                                 opted_out_at, created_at, updated_at)
SELECT id, workspace_id, phone, name, labels, attributes, opted_out, opted_out_at, created_at,
       updated_at
  FROM herald_contacts;
DROP TABLE herald_contacts;
ALTER TABLE herald_contacts_new RENAME TO herald_contacts;
CREATE INDEX herald_contacts_page ON herald_contacts (workspace_id, id);

-- No foreign key to herald_contacts (see the PostgreSQL migration): delete_contact removes a
-- contact's handles in its transaction.
CREATE TABLE herald_contact_handles (
    channel_id   TEXT    NOT NULL,
    external_id  TEXT    NOT NULL,
    workspace_id TEXT    NOT NULL,
    contact_id   TEXT    NOT NULL,
    platform     TEXT    NOT NULL CHECK (platform IN ('messenger', 'instagram')),
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (channel_id, external_id)
);
CREATE INDEX herald_contact_handles_contact ON herald_contact_handles (workspace_id, contact_id);
