-- Moves copy an account's rows before the write pause: a new step
-- `precopied` (the rows and jobs are on the new shard, held there; writes
-- still land on the old one and are captured for the catch-up), between
-- `paused` and `fenced`.
ALTER TABLE shardq.moves DROP CONSTRAINT moves_step_check;
ALTER TABLE shardq.moves ADD CONSTRAINT moves_step_check
    CHECK (step IN ('started', 'paused', 'precopied', 'fenced', 'copied', 'switched', 'done', 'aborted'));

-- The account-scoped tables the move carries, as recorded when it started
-- ([{"table": ..., "column": ...}], parents first), so a resumed move needs
-- no arguments. NULL for moves started before this column existed.
ALTER TABLE shardq.moves ADD COLUMN tables jsonb;
