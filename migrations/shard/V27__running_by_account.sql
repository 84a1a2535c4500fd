-- Running jobs indexed by queue and account instead of by node.
--
-- The fair claim asks, for the accounts at the head of the queue, whether
-- any of them already runs a job. Read through an index on `locked_by`,
-- that meant every running job of the queue, visited in the heap, on
-- every claim (256 with 64 slots and the claim-ahead buffer): in a drain
-- of 1,000 accounts in turn, 0.15 of the floor's throughput. With the
-- index on (queue, account) it is one probe per head account that stops
-- at the index when the account runs nothing.
--
-- The index still holds only running jobs, so a claim writes one entry
-- into it, as before. The rescuer, the orphan check and a node's release
-- read all running jobs of the shard through it (bounded by the fleet's
-- concurrency), now with the node as a filter.
DROP INDEX shardq.jobs_running_idx;
CREATE INDEX jobs_running_idx ON shardq.jobs (queue, account) WHERE state = 'running';
