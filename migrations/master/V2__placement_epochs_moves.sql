-- Placements that can change: every move bumps the account's epoch, and
-- routers learn of it by notification (and by a periodic look at what
-- changed, since notifications are lost across reconnects).
ALTER TABLE shardq.placements
    ADD COLUMN epoch bigint NOT NULL DEFAULT 1,
    ADD COLUMN moved_at timestamptz;

CREATE INDEX placements_moved_idx ON shardq.placements (moved_at) WHERE moved_at IS NOT NULL;

CREATE FUNCTION shardq.placements_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('shardq_placements', NEW.account);
    RETURN NULL;
END;
$$;

CREATE TRIGGER placements_notify AFTER UPDATE ON shardq.placements
    FOR EACH ROW WHEN (OLD.shard IS DISTINCT FROM NEW.shard OR OLD.epoch IS DISTINCT FROM NEW.epoch)
    EXECUTE FUNCTION shardq.placements_notify();

-- Moves: one row per move of an account, a state machine every step of
-- which is idempotent, so a mover killed at any point is resumed (or the
-- move aborted while it still can be).
CREATE TABLE shardq.moves (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account     text NOT NULL,
    from_shard  text NOT NULL,
    to_shard    text NOT NULL,
    -- The account's placement epoch when the move started; the switch
    -- makes it epoch + 1.
    epoch       bigint NOT NULL,
    step        text NOT NULL DEFAULT 'started'
                CHECK (step IN ('started', 'paused', 'fenced', 'copied', 'switched', 'done', 'aborted')),
    error       text,
    started_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (from_shard <> to_shard)
);

-- At most one move in progress per account.
CREATE UNIQUE INDEX moves_active_idx ON shardq.moves (account) WHERE step NOT IN ('done', 'aborted');
