-- The jobs of the accounts that live on this shard.
CREATE SCHEMA IF NOT EXISTS shardq;

CREATE TABLE shardq.jobs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account          text NOT NULL,
    queue            text NOT NULL,
    kind             text NOT NULL,
    args             jsonb NOT NULL DEFAULT '{}',
    -- available: waiting for run_at (scheduled / retryable when in the future);
    -- running: leased by locked_by until lease_expires_at;
    -- completed, discarded, cancelled: final, kept until pruned.
    state            text NOT NULL DEFAULT 'available'
                     CHECK (state IN ('available', 'running', 'completed', 'discarded', 'cancelled')),
    priority         smallint NOT NULL DEFAULT 0,
    attempt          integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL DEFAULT 20 CHECK (max_attempts > 0),
    run_at           timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    attempted_at     timestamptz,
    finalized_at     timestamptz,
    locked_by        text,
    lease_expires_at timestamptz,
    -- One object per failed attempt: {"attempt": n, "at": ..., "error": "..."}.
    errors           jsonb NOT NULL DEFAULT '[]'
);

-- The fetch predicate, exactly: available jobs of a queue in run order.
CREATE INDEX jobs_fetch_idx ON shardq.jobs (queue, priority, run_at, id) WHERE state = 'available';
-- Rescue of expired leases.
CREATE INDEX jobs_lease_idx ON shardq.jobs (lease_expires_at) WHERE state = 'running';
-- Listing an account's jobs.
CREATE INDEX jobs_account_idx ON shardq.jobs (account, id);

-- Wake the shard's producers: one NOTIFY per queue per statement, carrying
-- only the queue name; Postgres folds identical notifications of one
-- transaction into one.
CREATE FUNCTION shardq.jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('shardq_jobs', q.queue)
       FROM (SELECT DISTINCT queue FROM new_jobs WHERE run_at <= now()) AS q;
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_notify AFTER INSERT ON shardq.jobs
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION shardq.jobs_notify();
