-- Fences: accounts moving or moved off this shard. A writer with a stale
-- placement (an old cache, a lost notification, the master down) must never
-- write an account's rows here once it has left. A fence first only stops
-- the account's jobs from being claimed here (fenced_at NULL: the move waits
-- for its running jobs, whose handlers may still write), then refuses its
-- writes too.
CREATE TABLE shardq.fences (
    account   text PRIMARY KEY,
    -- Where the account goes, and the placement epoch it leaves at.
    moved_to  text NOT NULL,
    epoch     bigint NOT NULL,
    -- From when its writes are refused: transactions that began earlier are
    -- waited for by the move and carried with the account. NULL: not yet.
    fenced_at timestamptz
);

-- Moves whose copy committed here (so a resumed move does not copy twice).
CREATE TABLE shardq.moves_applied (
    move_id    bigint PRIMARY KEY,
    account    text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- Inserted jobs wake the shard's producers, and are refused for an account
-- fenced off this shard (SQLSTATE SQ001), unless the inserting transaction
-- began before the fence: the move waits for those and carries their rows.
CREATE OR REPLACE FUNCTION shardq.jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    moved record;
BEGIN
    SELECT f.account, f.moved_to INTO moved
      FROM new_jobs n JOIN shardq.fences f ON f.account = n.account
     WHERE f.fenced_at IS NOT NULL AND transaction_timestamp() >= f.fenced_at
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'account % has moved to shard %', moved.account, moved.moved_to
            USING ERRCODE = 'SQ001', DETAIL = moved.account, HINT = moved.moved_to;
    END IF;
    PERFORM pg_notify('shardq_jobs', q.queue)
       FROM (SELECT DISTINCT queue FROM new_jobs) AS q;
    RETURN NULL;
END;
$$;

-- The same refusal for an application's account-scoped table: attach it as
--   CREATE TRIGGER t_fence AFTER INSERT ON t REFERENCING NEW TABLE AS new_rows
--       FOR EACH STATEMENT EXECUTE FUNCTION shardq.refuse_moved_accounts('account');
-- where the argument names the table's account column.
CREATE FUNCTION shardq.refuse_moved_accounts() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    moved record;
BEGIN
    EXECUTE format(
        'SELECT f.account, f.moved_to FROM new_rows n JOIN shardq.fences f ON f.account = n.%I
          WHERE f.fenced_at IS NOT NULL AND transaction_timestamp() >= f.fenced_at LIMIT 1', TG_ARGV[0])
       INTO moved;
    IF moved.account IS NOT NULL THEN
        RAISE EXCEPTION 'account % has moved to shard %', moved.account, moved.moved_to
            USING ERRCODE = 'SQ001', DETAIL = moved.account, HINT = moved.moved_to;
    END IF;
    RETURN NULL;
END;
$$;
