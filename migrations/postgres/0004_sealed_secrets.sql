-- Channel secrets encrypted at rest (AES-256-GCM, see engine/src/crypto.rs): one ciphertext
-- per channel and the id of the key that made it. The plaintext columns stay (empty) for rows
-- sealed from now on; rows written before are sealed by `herald migrate` / `herald keys rotate`.
ALTER TABLE herald_channels ADD COLUMN secrets bytea;
ALTER TABLE herald_channels ADD COLUMN secrets_key_id text;
