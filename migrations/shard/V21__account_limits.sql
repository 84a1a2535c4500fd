-- Per-account concurrency limits per queue (issue #16): at most
-- `max_running` jobs of one account in one queue hold a slot at once,
-- across every node.
--
-- One row per limited (queue, account) of the accounts on this shard; an
-- account without a row has no limit and its jobs are claimed as before.
-- The rows move with the account.
CREATE TABLE shardq.account_limits (
    queue       text NOT NULL CHECK (octet_length(queue) BETWEEN 1 AND 128),
    account     text NOT NULL CHECK (octet_length(account) BETWEEN 1 AND 256),
    max_running integer NOT NULL CHECK (max_running BETWEEN 1 AND 10000),
    set_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, account)
);

CREATE INDEX account_limits_account_idx ON shardq.account_limits (account);

-- The slot (1 to max_running) a run of a limited account holds. A run holds
-- it while its row holds (`serial_held`, the same life as a serial key's
-- hold: from the claim until the run has ended on its node, its lease
-- expired or it was handed back); the number stays on the row afterwards
-- but counts for nothing. The unique index is the rule: two claims that
-- pick the same free slot cannot both commit. NULL for every job claimed
-- without a limit, so the column is a catalog change and the index holds
-- only the runs of limited accounts.
ALTER TABLE shardq.jobs ADD COLUMN limit_slot integer;

CREATE UNIQUE INDEX jobs_limit_slot_idx ON shardq.jobs (queue, account, limit_slot)
    WHERE serial_held AND limit_slot IS NOT NULL;
