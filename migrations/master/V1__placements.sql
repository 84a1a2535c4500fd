-- The placement directory: which shard each account lives on.
CREATE SCHEMA IF NOT EXISTS shardq;

-- Every shard that has ever received an account. A shard listed here with
-- placements but missing from shards.toml is an error at start-up.
CREATE TABLE shardq.shards (
    name       text PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE shardq.placements (
    account   text PRIMARY KEY CHECK (octet_length(account) BETWEEN 1 AND 255),
    shard     text NOT NULL REFERENCES shardq.shards (name),
    placed_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX placements_shard_idx ON shardq.placements (shard);
