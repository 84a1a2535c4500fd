-- Wake the shard's producers for every inserted job, scheduled ones too: a
-- producer that finds nothing due looks up the earliest scheduled run_at of
-- its queue and sleeps until then (bounded by its poll interval), so a job
-- scheduled for later runs at its time without a busy loop. Still one
-- NOTIFY per queue per statement, carrying only the queue name.
CREATE OR REPLACE FUNCTION shardq.jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('shardq_jobs', q.queue)
       FROM (SELECT DISTINCT queue FROM new_jobs) AS q;
    RETURN NULL;
END;
$$;
