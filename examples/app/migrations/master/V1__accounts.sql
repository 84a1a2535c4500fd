-- The application's account directory, on the master: every account the
-- service knows and its display name. Where an account lives is shardq's
-- business (shardq.placements); this table is what the application adds.
CREATE TABLE accounts (
    account    text        PRIMARY KEY CHECK (octet_length(account) BETWEEN 1 AND 255),
    name       text        NOT NULL CHECK (name <> ''),
    created_at timestamptz NOT NULL DEFAULT now()
);
