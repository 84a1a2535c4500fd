-- The claim of jobs that use named resources (issue #16) reads the due jobs
-- of each distinct resource set of a queue on its own (a skip scan over the
-- sets, one seek each), so the due jobs of resources the node has no permit
-- for are skipped with one seek instead of read one by one. Like the index it
-- replaces, it holds only jobs that use resources (resources are stored
-- sorted and without duplicates, so one set has one spelling).
CREATE INDEX jobs_resource_sets_idx ON shardq.jobs (queue, resources, priority, run_at, id)
    WHERE state = 'available' AND resources IS NOT NULL;

DROP INDEX shardq.jobs_resources_fetch_idx;
