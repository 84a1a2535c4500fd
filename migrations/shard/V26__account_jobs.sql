-- Which jobs each account has on this shard, in id order, kept beside the
-- jobs table instead of as an index of it.
--
-- Every state change of a job (claim, completion, retry) is a non-HOT
-- update: `state` is in the predicates of the claim's partial indexes, so
-- each change writes a new entry into every index of shardq.jobs. An
-- (account, id) index there took such an entry at every change, on a leaf
-- of its own per account (a claim of 100 jobs of 100 accounts wrote 100
-- leaves): with the floor's own claim and completion run on shardq.jobs,
-- dropping it took the server's CPU from 28-33 to 19-20 ms per 1,000 jobs,
-- and keeping the same ids here took it to 16-17 ms. A row
-- here is written once, when the job is inserted, and removed when the job
-- is deleted; claims and outcomes never touch this table.
--
-- Moves, account listings and rebalancing read an account's jobs through
-- this table's primary key and then the jobs' primary key.
--
-- The triggers keep it exact in every path that inserts or deletes jobs
-- (the engine, `shardq.enqueue`, an application's own INSERT, a move's
-- copy, pruning), in the same transaction. A job's account and id never
-- change.
CREATE TABLE shardq.account_jobs (
    account text NOT NULL,
    id      bigint NOT NULL,
    PRIMARY KEY (account, id)
);

ALTER TABLE shardq.account_jobs SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02
);

CREATE FUNCTION shardq.account_jobs_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO shardq.account_jobs (account, id) SELECT account, id FROM new_jobs;
    RETURN NULL;
END;
$$;

CREATE FUNCTION shardq.account_jobs_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM shardq.account_jobs a USING old_jobs o WHERE a.account = o.account AND a.id = o.id;
    RETURN NULL;
END;
$$;

CREATE FUNCTION shardq.account_jobs_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE shardq.account_jobs;
    RETURN NULL;
END;
$$;

-- Created before the copy below: creating a trigger locks shardq.jobs
-- against writes until this migration commits, so no job is inserted or
-- deleted between the copy and the triggers.
CREATE TRIGGER jobs_account_jobs_insert AFTER INSERT ON shardq.jobs
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION shardq.account_jobs_insert();
CREATE TRIGGER jobs_account_jobs_delete AFTER DELETE ON shardq.jobs
    REFERENCING OLD TABLE AS old_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION shardq.account_jobs_delete();
CREATE TRIGGER jobs_account_jobs_truncate AFTER TRUNCATE ON shardq.jobs
    FOR EACH STATEMENT EXECUTE FUNCTION shardq.account_jobs_truncate();

INSERT INTO shardq.account_jobs (account, id) SELECT account, id FROM shardq.jobs;

DROP INDEX shardq.jobs_account_idx;
