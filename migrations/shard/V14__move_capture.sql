-- Change capture for accounts being moved, so a move copies an account's
-- rows while its writes continue and, inside the write pause, copies only
-- what changed since (the catch-up).
--
-- On the shard an account leaves: while the account has a row in
-- move_captures, every insert, update and delete of its rows in a captured
-- table (shardq.jobs, and each account-scoped table a move carries, whose
-- triggers the mover attaches) records the changed row's key in
-- move_changes. For every other account the triggers cost one probe of the
-- (usually empty) move_captures per statement.
CREATE TABLE shardq.move_captures (
    account text PRIMARY KEY,
    move_id bigint NOT NULL
);

CREATE SEQUENCE shardq.move_changes_seq;

-- One row per changed row of a moving account: its table, its key (the
-- primary key's columns as a JSON object) and the last change's sequence
-- number, so a catch-up removes only the entries it has copied.
CREATE TABLE shardq.move_changes (
    move_id bigint NOT NULL,
    tbl     oid NOT NULL,
    key     jsonb NOT NULL,
    seq     bigint NOT NULL,
    PRIMARY KEY (move_id, tbl, key)
);

-- Statement trigger: arguments are the account column, then the key
-- columns. The transition table is new_rows (INSERT, UPDATE) or old_rows
-- (DELETE); keys are assumed not to change in an UPDATE.
CREATE FUNCTION shardq.capture_moving_accounts() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    key_expr text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM shardq.move_captures) THEN
        RETURN NULL;
    END IF;
    SELECT string_agg(format('%L, r.%I', c, c), ', ') INTO key_expr
      FROM unnest(TG_ARGV[1:TG_NARGS - 1]) AS c;
    EXECUTE format(
        'INSERT INTO shardq.move_changes (move_id, tbl, key, seq)
         SELECT DISTINCT ON (k.move_id, k.key) k.move_id, %s, k.key, nextval(''shardq.move_changes_seq'')
           FROM (SELECT c.move_id, jsonb_build_object(%s) AS key
                   FROM %I r JOIN shardq.move_captures c ON c.account = r.%I) AS k
         ON CONFLICT (move_id, tbl, key) DO UPDATE SET seq = EXCLUDED.seq',
        TG_RELID, key_expr,
        CASE WHEN TG_OP = 'DELETE' THEN 'old_rows' ELSE 'new_rows' END,
        TG_ARGV[0]);
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_capture_insert AFTER INSERT ON shardq.jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION shardq.capture_moving_accounts('account', 'id');
CREATE TRIGGER jobs_capture_update AFTER UPDATE ON shardq.jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION shardq.capture_moving_accounts('account', 'id');
CREATE TRIGGER jobs_capture_delete AFTER DELETE ON shardq.jobs
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION shardq.capture_moving_accounts('account', 'id');

-- On the shard an account goes to: which job each copied job came from
-- (old id on the shard it leaves → new id here), so the catch-up updates a
-- copied job in place (its id, and so its serial order, kept).
CREATE TABLE shardq.move_jobs (
    move_id bigint NOT NULL,
    old_id  bigint NOT NULL,
    new_id  bigint NOT NULL,
    PRIMARY KEY (move_id, old_id)
);
