-- Finished jobs by age: retention pruning and "completed in the last minute"
-- counts read this instead of the whole table.
CREATE INDEX jobs_finalized_idx ON shardq.jobs (finalized_at)
    WHERE state IN ('completed', 'discarded', 'cancelled');
