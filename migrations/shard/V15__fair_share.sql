-- Fair share across accounts (issue #16): within a queue, the claim
-- interleaves the accounts that have due jobs, weighted per account.
--
-- Weights of the accounts on this shard; an account without a row weighs 1.
-- An account with weight w gets w times the slots of a weight-1 account
-- while both have due jobs. The row moves with the account.
CREATE TABLE shardq.account_weights (
    account text PRIMARY KEY CHECK (octet_length(account) BETWEEN 1 AND 256),
    weight  integer NOT NULL CHECK (weight BETWEEN 1 AND 10000),
    set_at  timestamptz NOT NULL DEFAULT now()
);

-- The fair claim's walk: one seek per (priority, account) of a queue finds
-- the account's earliest job at that priority, and the due range of each
-- pair is read from there; a large backlog of one account is skipped by
-- one seek.
CREATE INDEX jobs_fair_idx ON shardq.jobs (queue, priority, account, run_at, id) WHERE state = 'available';
