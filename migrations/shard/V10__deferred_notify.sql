-- Inserted jobs wake the shard's producers from the inserting transaction,
-- unless it set `shardq.notify` to 'deferred' (the job client's own
-- one-statement inserts do): every transaction that notifies holds a
-- server-wide lock from its commit until the commit is flushed, so
-- concurrent notifying commits cannot share a WAL flush. The client sends
-- the NOTIFY after its insert committed, in a transaction that does not
-- wait for a flush. Fences are checked as before.
CREATE OR REPLACE FUNCTION shardq.jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    moved record;
BEGIN
    SELECT f.account, f.moved_to INTO moved
      FROM new_jobs n JOIN shardq.fences f ON f.account = n.account
     WHERE f.fenced_at IS NOT NULL AND transaction_timestamp() >= f.fenced_at
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'account % has moved to shard %', moved.account, moved.moved_to
            USING ERRCODE = 'SQ001', DETAIL = moved.account, HINT = moved.moved_to;
    END IF;
    IF current_setting('shardq.notify', true) IS DISTINCT FROM 'deferred' THEN
        PERFORM pg_notify('shardq_jobs', q.queue)
           FROM (SELECT DISTINCT queue FROM new_jobs) AS q;
    END IF;
    RETURN NULL;
END;
$$;
