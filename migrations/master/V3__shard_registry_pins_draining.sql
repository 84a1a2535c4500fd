-- Operating the fleet: pinned accounts (never moved by a rebalance),
-- draining shards (offered no new accounts), and a shard registry only the
-- schema owner writes.

-- An account pinned to its shard (`shardq accounts pin`): a rebalance or a
-- drain never moves it (a drain refuses unless told to include pinned ones).
ALTER TABLE shardq.placements
    ADD COLUMN pinned boolean NOT NULL DEFAULT false;

-- A draining shard takes no new accounts (neither the ring nor the
-- least-loaded choice offers it); `shardq shards drain` sets it and moves
-- every account off.
ALTER TABLE shardq.shards
    ADD COLUMN draining boolean NOT NULL DEFAULT false;

-- Only the schema owner writes the registry: a role granted INSERT, UPDATE
-- or DELETE on it by earlier grants loses them here (the application reads
-- it; the foreign key from placements then refuses a placement on a shard
-- the owner did not register).
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT a.grantee
          FROM pg_class c, aclexplode(c.relacl) a
         WHERE c.oid = 'shardq.shards'::regclass
           AND a.privilege_type IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')
           AND a.grantee <> c.relowner
    LOOP
        IF r.grantee = 0 THEN
            EXECUTE 'REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON shardq.shards FROM PUBLIC';
        ELSE
            EXECUTE format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON shardq.shards FROM %I', pg_get_userbyid(r.grantee));
        END IF;
    END LOOP;
END;
$$;
