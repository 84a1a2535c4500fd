-- Unique jobs, per-key serial order and periodic jobs (issue #5).
--
-- All three columns are NULL for ordinary jobs, so adding them is a catalog
-- change only (no table rewrite), and ordinary jobs pay nothing in the new
-- partial indexes.

-- unique_key: a hash (hex SHA-256) of (kind, queue, account, the user's key,
-- the period bucket), present only while the job is in one of its
-- unique_states; every statement that moves a job to a state outside its set
-- clears it in the same UPDATE. The unique partial index makes the database
-- the arbiter, across nodes and races.
-- serial_key: (account, ordering key); a job with one is claimable only when
-- no earlier job (lower id) with the same key is available or running.
ALTER TABLE shardq.jobs
    ADD COLUMN unique_key    text,
    ADD COLUMN unique_states text[],
    ADD COLUMN serial_key    text;

CREATE UNIQUE INDEX jobs_unique_idx ON shardq.jobs (unique_key) WHERE unique_key IS NOT NULL;

-- The fetch statement's "no earlier job of the same serial key is still
-- available or running" probe: one index seek per keyed candidate.
CREATE INDEX jobs_serial_idx ON shardq.jobs (serial_key, id)
    WHERE serial_key IS NOT NULL AND state IN ('available', 'running');

-- Occurrences of periodic jobs already handled on this shard: the primary
-- key makes "enqueue occurrence T of job N" happen once however many nodes
-- try, in the same transaction as the job's insert. job_id is NULL when the
-- occurrence was skipped (Overlap::Skip while the previous run was not done).
CREATE TABLE shardq.periodic_runs (
    name        text NOT NULL,
    occurrence  timestamptz NOT NULL,
    job_id      bigint,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, occurrence)
);
