-- The application's per-account tables, on every shard. Each row carries its
-- account, and every key starts with it, so an account's rows are found by
-- account alone. Ids are UUIDs, not per-shard sequences: they stay unique
-- when an account's rows are copied to another shard.

CREATE TABLE users (
    account             text        NOT NULL,
    id                  uuid        NOT NULL DEFAULT gen_random_uuid(),
    email               text        NOT NULL,
    name                text        NOT NULL,
    -- Kept by the refresh_user_stats job.
    documents_processed integer     NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account, id),
    UNIQUE (account, email)
);

CREATE TABLE documents (
    account      text        NOT NULL,
    id           uuid        NOT NULL DEFAULT gen_random_uuid(),
    -- The user who wrote it; NULL for the welcome document.
    author       uuid,
    title        text        NOT NULL,
    body         text        NOT NULL,
    -- The one document the provision_account job writes per account.
    welcome      boolean     NOT NULL DEFAULT false,
    -- Set by the process_document job.
    status       text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'processed')),
    word_count   integer,
    summary      text,
    processed_at timestamptz,
    -- Set by DELETE; the per-shard cleanup job removes the row later.
    deleted_at   timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account, id),
    FOREIGN KEY (account, author) REFERENCES users (account, id)
);

-- Makes the provision_account job idempotent: at most one welcome document.
CREATE UNIQUE INDEX documents_one_welcome ON documents (account) WHERE welcome;
-- An account's newest documents first (the list endpoint).
CREATE INDEX documents_account_created ON documents (account, created_at DESC);
-- Counting an author's processed documents (refresh_user_stats).
CREATE INDEX documents_author ON documents (account, author) WHERE author IS NOT NULL;
-- What the cleanup job looks for.
CREATE INDEX documents_deleted ON documents (deleted_at) WHERE deleted_at IS NOT NULL;
