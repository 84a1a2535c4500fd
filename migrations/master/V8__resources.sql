-- Global limits on named resources (issue #16), declared once for the whole
-- fleet: at most `concurrency` running jobs that use the resource, over
-- every node and shard. `rate` (starts per second) and `burst` are the
-- resource's token bucket. NULL: no limit of that kind.
CREATE TABLE shardq.resources (
    name        text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.-]{1,64}$'),
    concurrency integer CHECK (concurrency BETWEEN 1 AND 1000000),
    rate        double precision CHECK (rate > 0 AND rate <= 1000000),
    burst       integer CHECK (burst BETWEEN 1 AND 1000000),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    -- The token bucket of `rate`: tokens left at `refilled_at`; it refills
    -- at `rate` per second up to `burst` (or one second's worth). Nodes
    -- take tokens in batches, one per start.
    tokens      double precision NOT NULL DEFAULT 0,
    refilled_at timestamptz NOT NULL DEFAULT now()
);

-- Permits leased by nodes in batches: node `node` may run up to `permits`
-- jobs of the resource at once until `expires_at` (renewed with its
-- heartbeat). A grant counts only unexpired leases, so a node that died
-- gives its permits back when its lease runs out.
CREATE TABLE shardq.resource_leases (
    resource   text NOT NULL REFERENCES shardq.resources (name) ON DELETE CASCADE,
    node       text NOT NULL,
    permits    integer NOT NULL CHECK (permits >= 0),
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (resource, node)
);
