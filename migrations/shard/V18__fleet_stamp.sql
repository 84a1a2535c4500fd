-- The shard's stamp: the fleet id (created in the master) and this shard's
-- name, written by the migrator after it migrates the shard. A router
-- compares it with shards.toml after connecting, so an address that leads
-- to another shard's database (two addresses swapped, a DNS alias to the
-- wrong server) or to another fleet's is an error naming both, and the
-- migrator refuses to migrate a database stamped for another shard or
-- fleet. An unstamped shard counts as not migrated.
CREATE TABLE shardq.fleet_stamp (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    fleet_id uuid NOT NULL,
    name text NOT NULL,
    stamped_at timestamptz NOT NULL DEFAULT now()
);

-- Only the schema owner writes the stamp (default privileges may have
-- granted more to the application role).
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT a.grantee
          FROM pg_class c, aclexplode(c.relacl) a
         WHERE c.oid = 'shardq.fleet_stamp'::regclass
           AND a.privilege_type IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')
           AND a.grantee <> c.relowner
    LOOP
        IF r.grantee = 0 THEN
            EXECUTE 'REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON shardq.fleet_stamp FROM PUBLIC';
        ELSE
            EXECUTE format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON shardq.fleet_stamp FROM %I', pg_get_userbyid(r.grantee));
        END IF;
    END LOOP;
END;
$$;
