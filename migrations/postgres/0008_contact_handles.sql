-- Contacts known by a handle: Messenger and Instagram give a sender as a page-scoped id (PSID,
-- IGSID), not a phone. A contact created by such a message has no phone; the unique
-- (workspace_id, phone) stays (NULLs do not collide). No table rewrite: dropping NOT NULL only
-- changes the catalog.
ALTER TABLE herald_contacts ALTER COLUMN phone DROP NOT NULL;

-- How a Messenger page or an Instagram account (a channel) knows a contact. The key is Meta's:
-- an external id is unique per channel, and two jobs creating the same new sender at once meet
-- on it (ON CONFLICT) so that only one contact is created.
--
-- No foreign key to herald_contacts: delete_contact removes a contact's handles in its own
-- transaction, on both backends. A key with ON DELETE CASCADE would work here (contacts' key is
-- (workspace_id, id)) but not the same way on SQLite, where contacts' key is id alone and a
-- foreign key makes every multi-row insert into herald_contacts (an import) look up the child
-- table for each row; one explicit delete behaves the same on both and costs imports nothing.
CREATE TABLE herald_contact_handles (
    channel_id   uuid        NOT NULL,
    external_id  text        COLLATE "C" NOT NULL,
    workspace_id uuid        NOT NULL,
    contact_id   uuid        NOT NULL,
    platform     text        NOT NULL CHECK (platform IN ('messenger', 'instagram')),
    created_at   timestamptz NOT NULL,
    PRIMARY KEY (channel_id, external_id)
);
-- A contact's handles (reads, pages of contacts, delete).
CREATE INDEX herald_contact_handles_contact ON herald_contact_handles (workspace_id, contact_id);
