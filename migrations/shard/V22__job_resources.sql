-- The named resources a job uses (issue #16): its handler starts only
-- holding a permit of each (master table shardq.resources). NULL for jobs
-- that use none, so the column is a catalog change and such jobs are not
-- in the index below: only jobs that use resources are written to it, and
-- their own claim reads it.
ALTER TABLE shardq.jobs ADD COLUMN resources text[];

CREATE INDEX jobs_resources_fetch_idx ON shardq.jobs (queue, priority, run_at, id)
    WHERE state = 'available' AND resources IS NOT NULL;
