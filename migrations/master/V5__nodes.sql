-- The node registry: every worker node upserts its row every fleet
-- heartbeat (its queues and limits, the shards it works, its engine
-- connections). A row whose heartbeat is older than the node's time to live
-- is gone: the live nodes divide the shards among themselves without it and
-- the next heartbeat of any node deletes the row.
CREATE TABLE shardq.nodes (
    id           text PRIMARY KEY,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    -- How long the row lives without a heartbeat, in seconds.
    ttl_secs     double precision NOT NULL,
    -- Queue name -> the node's concurrency limit for it.
    queues       jsonb NOT NULL DEFAULT '{}',
    -- The shards the node works now (its stages run and it claims there).
    working      text[] NOT NULL DEFAULT '{}',
    -- The node's open engine connections, over all shards.
    connections  integer NOT NULL DEFAULT 0
);

-- Nodes renew and delete rows here: a role that the default privileges of
-- the application grants (`shardq::privileges`) gave SELECT and INSERT on
-- this new table also gets UPDATE and DELETE on it, so a running
-- deployment's workers keep their role without granting again.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT a.grantee
          FROM pg_class c, aclexplode(c.relacl) a
         WHERE c.oid = 'shardq.nodes'::regclass
           AND a.privilege_type = 'INSERT'
           AND a.grantee <> c.relowner
    LOOP
        IF r.grantee = 0 THEN
            EXECUTE 'GRANT UPDATE, DELETE ON shardq.nodes TO PUBLIC';
        ELSE
            EXECUTE format('GRANT UPDATE, DELETE ON shardq.nodes TO %I', pg_get_userbyid(r.grantee));
        END IF;
    END LOOP;
END;
$$;
