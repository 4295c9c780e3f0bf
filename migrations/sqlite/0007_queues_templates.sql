-- Paused queues and templates; see the PostgreSQL migration.
CREATE TABLE herald_paused_queues (
    queue     TEXT    PRIMARY KEY,
    paused_at INTEGER NOT NULL,
    reason    TEXT    NOT NULL
);

CREATE TABLE herald_templates (
    id           TEXT    PRIMARY KEY,
    workspace_id TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    language     TEXT    NOT NULL,
    category     TEXT    NOT NULL,
    parameters   TEXT    NOT NULL DEFAULT '[]',
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    UNIQUE (workspace_id, name, language)
);
CREATE INDEX herald_templates_page ON herald_templates (workspace_id, id);
