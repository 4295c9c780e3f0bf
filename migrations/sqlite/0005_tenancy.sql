-- Workspaces (tenants) and their API keys. Only a key's SHA-256 is stored.
CREATE TABLE herald_workspaces (
    id         TEXT    PRIMARY KEY,
    name       TEXT    NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE herald_api_keys (
    id           TEXT    PRIMARY KEY,
    workspace_id TEXT    NOT NULL REFERENCES herald_workspaces (id) ON DELETE CASCADE,
    name         TEXT    NOT NULL,
    prefix       TEXT    NOT NULL,
    hash         BLOB    NOT NULL UNIQUE,
    created_at   INTEGER NOT NULL,
    revoked_at   INTEGER
);
CREATE INDEX herald_api_keys_workspace ON herald_api_keys (workspace_id, id);
