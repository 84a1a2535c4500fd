-- Paused queues on this shard: while a queue has a row here, no node claims
-- its jobs on this shard (the claim statement probes this table once per
-- candidate priority range: a primary-key seek in a table of a few rows).
-- Jobs can still be enqueued, cancelled and retried; running jobs finish.
-- Pausing is per shard: the same queue on another shard keeps running.
CREATE TABLE shardq.queue_pauses (
    queue     text PRIMARY KEY CHECK (octet_length(queue) BETWEEN 1 AND 128),
    paused_at timestamptz NOT NULL DEFAULT now(),
    -- Who paused it, as the caller gave it (an operator, "dashboard", ...).
    paused_by text NOT NULL
);
