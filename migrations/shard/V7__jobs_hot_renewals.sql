-- Lease renewals change only lease_expires_at. With no index on that column
-- (and room left on the page) they are HOT updates: no index entry is
-- written and the old version is pruned in place, so a node renewing
-- thousands of leases every heartbeat does not bloat the indexes.
--
-- Rescue and the orphan check find running jobs through this index instead;
-- running jobs are bounded by the fleet's concurrency, so reading them all
-- to find the expired ones stays cheap.
CREATE INDEX jobs_running_idx ON shardq.jobs (locked_by) WHERE state = 'running';
DROP INDEX shardq.jobs_lease_idx;

-- Room on every page for updated versions (HOT), and vacuum that keeps up
-- with a table whose rows are all updated several times and then deleted.
ALTER TABLE shardq.jobs SET (
    fillfactor = 85,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02
);
