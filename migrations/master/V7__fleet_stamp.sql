-- The fleet's stamp. The fleet id is created here, once, at the master's
-- first migrate; the migrator then writes the same id, with the shard's
-- name, into every shard it migrates (shardq.fleet_stamp there), and a
-- router compares both after connecting. So a shard address that leads to
-- another shard's database (two addresses swapped in shards.toml, a DNS
-- alias to the wrong server) or to another fleet's is an error naming both,
-- never silent misrouting. The master's own row names its role, 'master'.
CREATE TABLE shardq.fleet_stamp (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    fleet_id uuid NOT NULL,
    name text NOT NULL,
    stamped_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO shardq.fleet_stamp (fleet_id, name) VALUES (gen_random_uuid(), 'master');

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
