-- Herald job queue, SQLite. Same design as the PostgreSQL schema (see its comments): unfinished
-- jobs in herald_jobs, final jobs in herald_jobs_done. Times are integer microseconds since the
-- Unix epoch; workspace ids are UUID text.

CREATE TABLE herald_jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    workspace_id     TEXT    NOT NULL,
    kind             TEXT    NOT NULL,
    queue            TEXT    NOT NULL,
    payload          TEXT    NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    state            TEXT    NOT NULL CHECK (state IN ('scheduled', 'available', 'running', 'retryable')),
    run_at           INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL CHECK (max_attempts > 0),
    attempted_at     INTEGER,
    attempted_by     TEXT,
    lease_expires_at INTEGER,
    errors           TEXT    NOT NULL DEFAULT '[]',
    unique_key       TEXT,
    rate_key         TEXT,
    ordering_key     TEXT
);

CREATE INDEX herald_jobs_claim ON herald_jobs (queue, priority, run_at, id) WHERE state = 'available';
CREATE INDEX herald_jobs_due ON herald_jobs (queue, run_at) WHERE state IN ('scheduled', 'retryable');
CREATE INDEX herald_jobs_lease ON herald_jobs (lease_expires_at) WHERE state = 'running';
CREATE UNIQUE INDEX herald_jobs_unique ON herald_jobs (workspace_id, unique_key) WHERE unique_key IS NOT NULL;
CREATE INDEX herald_jobs_ordering ON herald_jobs (workspace_id, ordering_key, id) WHERE ordering_key IS NOT NULL;
CREATE INDEX herald_jobs_rate ON herald_jobs (rate_key, state) WHERE rate_key IS NOT NULL;

CREATE TABLE herald_jobs_done (
    id               INTEGER PRIMARY KEY,
    workspace_id     TEXT    NOT NULL,
    kind             TEXT    NOT NULL,
    queue            TEXT    NOT NULL,
    payload          TEXT    NOT NULL,
    priority         INTEGER NOT NULL,
    state            TEXT    NOT NULL CHECK (state IN ('completed', 'discarded', 'cancelled')),
    run_at           INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    attempt          INTEGER NOT NULL,
    max_attempts     INTEGER NOT NULL,
    attempted_at     INTEGER,
    attempted_by     TEXT,
    finalized_at     INTEGER NOT NULL,
    errors           TEXT    NOT NULL,
    unique_key       TEXT,
    rate_key         TEXT,
    ordering_key     TEXT
);
CREATE INDEX herald_jobs_done_finalized ON herald_jobs_done (finalized_at);

CREATE TABLE herald_leaders (
    name       TEXT    PRIMARY KEY,
    leader_id  TEXT    NOT NULL,
    expires_at INTEGER NOT NULL
);
