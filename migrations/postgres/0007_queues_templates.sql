-- Paused queues: a row here stops every producer, in every process, from claiming the queue's
-- jobs (the claim statements test it); running jobs finish. Deleting the row resumes.
CREATE TABLE herald_paused_queues (
    queue     text        COLLATE "C" PRIMARY KEY,
    paused_at timestamptz NOT NULL,
    reason    text        NOT NULL
);

-- WhatsApp message templates a workspace uses: references to templates approved in Meta's
-- WhatsApp Manager (name and language), with the body parameters a send must fill, in order.
CREATE TABLE herald_templates (
    id           uuid        NOT NULL,
    workspace_id uuid        NOT NULL,
    name         text        COLLATE "C" NOT NULL,
    language     text        COLLATE "C" NOT NULL,
    category     text        NOT NULL,
    -- [{"name": ..., "example": ...}], in the order of the body's {{1}}, {{2}}, ...
    parameters   jsonb       NOT NULL DEFAULT '[]',
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    PRIMARY KEY (workspace_id, id),
    UNIQUE (workspace_id, name, language)
);
