-- Channel secrets encrypted at rest; see the PostgreSQL migration.
ALTER TABLE herald_channels ADD COLUMN secrets BLOB;
ALTER TABLE herald_channels ADD COLUMN secrets_key_id TEXT;
