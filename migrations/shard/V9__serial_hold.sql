-- Serial keys that hold: a keyed job holds its key from its claim until its
-- run has ended on the node (its outcome written, its lease expired, or it
-- was handed back), not only while its row says `running`: a cancelled job
-- whose handler has not stopped yet still holds the key. The unique index
-- makes "at most one run per key" the database's rule, whatever order the
-- keyed jobs became visible or were retried in.
ALTER TABLE shardq.jobs ADD COLUMN serial_held boolean NOT NULL DEFAULT false;

CREATE UNIQUE INDEX jobs_serial_held_idx ON shardq.jobs (serial_key) WHERE serial_held;
