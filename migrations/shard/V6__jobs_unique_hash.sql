-- Keep a unique job's key hash for the life of its row, so a manual retry
-- can restore the key that completion, discard or cancellation cleared.
--
-- unique_hash: the same hex SHA-256 as unique_key, written by the keyed
-- insert and never cleared; NULL for jobs that are not unique. unique_key
-- stays the enforced copy (present only while the job is in one of its
-- unique_states, covered by jobs_unique_idx); unique_hash is not indexed and
-- never decides anything on its own. A retry sets unique_key back from it,
-- and jobs_unique_idx refuses the retry when another job holds the key by
-- then.
--
-- The column has no default, so adding it is a catalog change only. Jobs
-- that hold their key now get their hash copied (found through
-- jobs_unique_idx); a key already cleared before this migration cannot be
-- recovered, so such a job is retried without one, as before.
ALTER TABLE shardq.jobs ADD COLUMN unique_hash text;

UPDATE shardq.jobs SET unique_hash = unique_key WHERE unique_key IS NOT NULL;
