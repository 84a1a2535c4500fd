-- What moving an account to another shard needs of the per-account tables
-- (the mover carries them: `users`, `documents`; see store::account_tables).

-- The mover copies an account's rows table by table and deletes them from
-- the shard it left in the same order (users, then documents), each in one
-- transaction. Checking a document's author at commit rather than after
-- each statement lets that delete remove a user before the documents that
-- name it.
ALTER TABLE documents ALTER CONSTRAINT documents_account_author_fkey DEFERRABLE INITIALLY DEFERRED;

-- The shard an account left refuses its new rows (SQLSTATE SQ001), as it
-- refuses its jobs: a writer with a stale placement never lands a row here.
CREATE TRIGGER users_fence AFTER INSERT ON users REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION shardq.refuse_moved_accounts('account');
CREATE TRIGGER documents_fence AFTER INSERT ON documents REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION shardq.refuse_moved_accounts('account');
