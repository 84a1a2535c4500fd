//! Per-account concurrency limits per queue (shard migration V21): the
//! rows that set them, and the claim of limited accounts' jobs, which
//! joins the ordinary claims in one statement.
//!
//! The rule is the database's, like a serial key's: a run of a limited
//! account holds a slot number from 1 to the limit (`jobs.limit_slot`)
//! for as long as its row holds (`serial_held`: from the claim until the
//! run ended on its node, its lease expired or it was handed back), and
//! the unique index `jobs_limit_slot_idx (queue, account, limit_slot)
//! WHERE serial_held AND limit_slot IS NOT NULL` lets no two runs hold one
//! slot. A claim reads the free slots from its snapshot; two claims on
//! different nodes that pick the same slot cannot both commit: the later
//! fails on the index, claims nothing, and its producer claims again. Every
//! statement that ends a hold already clears `serial_held`, so the slot
//! comes back with it, and a node that died gives its slots back when its
//! leases expire.

use shardq_router::router::Database;

/// The claim of limited accounts' jobs as leading common table
/// expressions, for the claim of jobs that use no resource
/// ([`JOB_FETCH_LIMITED_CTES`]) or of jobs that use resources
/// ([`JOB_FETCH_RESOURCED_LIMITED_CTES`]): `$resources` is the candidates'
/// condition on `resources`, `$aged` whether a candidate row `d` is aged,
/// `$returning` the columns the claimed rows return after `keyed`.
macro_rules! limited_claim_ctes {
    ($resources:literal, $aged:literal, $returning:literal) => {
        concat!(
            "WITH RECURSIVE ",
            priorities_cte!("lim_priorities"),
            ",
lim_accounts AS MATERIALIZED (
    SELECT l.account, l.max_running,
           GREATEST(l.max_running - (SELECT count(*) FROM shardq.jobs h
                                      WHERE h.queue = $1 AND h.account = l.account
                                        AND h.serial_held AND h.limit_slot IS NOT NULL), 0) AS free
      FROM shardq.account_limits l
     WHERE l.queue = $1
       AND NOT EXISTS (SELECT 1 FROM shardq.queue_pauses qp WHERE qp.queue = $1)
       AND NOT EXISTS (SELECT 1 FROM shardq.fences f WHERE f.account = l.account)
),
lim_picks AS (
    SELECT c.id, a.account, a.free,
           row_number() OVER (
               PARTITION BY a.account
               ORDER BY c.aged DESC, CASE WHEN c.aged THEN c.run_at END, c.priority, c.run_at, c.id) AS k
      FROM lim_accounts a
      CROSS JOIN LATERAL (
          SELECT d.id, d.priority, d.run_at, ",
            $aged,
            " AS aged
            FROM lim_priorities p
            CROSS JOIN LATERAL (
                SELECT id, priority, run_at FROM shardq.jobs
                 WHERE state = 'available' AND queue = $1 AND priority = p.priority
                   AND account = a.account AND run_at <= now()
                   AND ",
            $resources,
            "
                   AND ",
            claim_serial_free!(),
            "
                 ORDER BY run_at, id
                 LIMIT LEAST(a.free, $2)
                 FOR UPDATE SKIP LOCKED) AS d) AS c
     WHERE a.free > 0
),
lim_chosen AS MATERIALIZED (
    SELECT id, account, k FROM lim_picks
     WHERE k <= free
     ORDER BY k, account
     LIMIT $2
),
lim_room AS MATERIALIZED (
    SELECT GREATEST($2 - count(*), 0)::bigint AS n FROM lim_chosen
),
lim_slots AS (
    SELECT a.account, s.slot, row_number() OVER (PARTITION BY a.account ORDER BY s.slot) AS k
      FROM lim_accounts a
      CROSS JOIN LATERAL (
          SELECT g.slot
            FROM (SELECT ((i + mod(hashtext($3)::bigint + 2147483648, a.max_running)) % a.max_running + 1)::int AS slot
                    FROM generate_series(0, a.max_running - 1) AS i) AS g
           WHERE NOT EXISTS (
                 SELECT 1 FROM shardq.jobs h
                  WHERE h.queue = $1 AND h.account = a.account
                    AND h.serial_held AND h.limit_slot = g.slot)
           LIMIT (SELECT count(*) FROM lim_chosen c WHERE c.account = a.account)) AS s
     WHERE a.free > 0
),
limited AS (
    UPDATE shardq.jobs j
       SET state = 'running', attempt = j.attempt + 1, attempted_at = now(),
           locked_by = $3, lease_expires_at = now() + make_interval(secs => $4),
           serial_held = true, limit_slot = s.slot
      FROM lim_chosen c
      JOIN lim_slots s ON s.account = c.account AND s.k = c.k
     WHERE j.id = c.id
    RETURNING j.id, j.account, j.kind, j.args, j.attempt, j.attempted_at, j.max_attempts, j.run_at, true AS keyed",
            $returning,
            "
)"
        )
    };
}

/// The claim of limited accounts' jobs that use no resource, as the
/// leading common table expressions of the claim statement; its last one,
/// `limited`, is the `UPDATE .. RETURNING` of the rows claimed, with the
/// columns of a fetched job (`keyed` is true: the completer releases the
/// hold), and `lim_room` (one row, `n`) is what the claim's other part may
/// still take: `$2` less the limited jobs chosen, so the whole claim never
/// returns more than `$2`. Parameters as in the ordinary claims: `$1` queue,
/// `$2` most jobs, `$3` node, `$4` lease seconds, `$5` priority aging.
///
/// For each account with a limit in the queue (`shardq.account_limits`,
/// primary key `(queue, account)`), that the queue is not paused and the
/// account not fenced: its free slots are the limit less its held runs
/// (counted in `jobs_limit_slot_idx`); it takes at most that many due jobs,
/// aged first, then by priority, run time and id (one seek in
/// `jobs_fair_idx (queue, priority, account, run_at, id)` per priority in
/// use, with the serial-key rules of the ordinary claims, SKIP LOCKED;
/// jobs that use resources are left to their own claim,
/// [`JOB_FETCH_RESOURCED_LIMITED_CTES`]), at
/// most `$2` in all; each claimed job gets one free slot number. Free slots
/// are looked for from an offset that depends on the node, so claims of
/// different nodes tend to pick different slots. When the queue has no
/// limited account, this reads one empty range of a small primary key and
/// nothing else.
pub const JOB_FETCH_LIMITED_CTES: &str = limited_claim_ctes!(
    "resources IS NULL",
    "COALESCE(d.run_at <= now() - make_interval(secs => $5), false)",
    ""
);

/// The same claim for limited accounts' jobs that use resources, leading
/// [`JOB_FETCH_RESOURCED_SQL`]: `$5` is the resources the node may claim
/// jobs of now, as there; a job is taken when all its resources are among
/// them, by priority, run time and id (no aging, as the resourced claim),
/// and holds a slot of its account like any run of it. The rows return
/// their `resources` too.
pub const JOB_FETCH_RESOURCED_LIMITED_CTES: &str = limited_claim_ctes!(
    "resources IS NOT NULL AND resources <@ $5::text[]",
    "false",
    ", j.resources"
);

/// `claim`, the other part of a claim statement (an `UPDATE .. RETURNING`
/// of the columns `limited` returns, whose every `$2` is read as the room
/// the limited part leaves), after `ctes` (the limited part,
/// [`JOB_FETCH_LIMITED_CTES`] or [`JOB_FETCH_RESOURCED_LIMITED_CTES`]), as
/// the common table expressions of one statement, the last of which,
/// `claimed`, holds both sets of rows, which are disjoint (the other part
/// skips limited accounts) and together at most `$2`; the caller ends the
/// statement.
fn with_limited_part(ctes: &str, claim: &str) -> String {
    debug_assert!(
        !claim
            .match_indices("$2")
            .any(|(i, _)| claim[i + 2..].starts_with(|c: char| c.is_ascii_digit())),
        "a claim with 20 or more parameters"
    );
    let claim = claim.replace("$2", "(SELECT n FROM lim_room)");
    format!(
        "{ctes}, ordinary AS ({claim}),
         claimed AS (SELECT * FROM ordinary UNION ALL SELECT * FROM limited)"
    )
}

/// An ordinary claim (`claim`, an `UPDATE .. RETURNING` of a fetched
/// job's columns) and the limited claim ([`JOB_FETCH_LIMITED_CTES`]) as the
/// common table expressions of one statement ending in `claimed`
/// ([`with_limited_part`]): the limited part is chosen first and the
/// ordinary one takes what is left of `$2`, so the statement returns at
/// most `$2` rows.
pub fn claim_with_limits(claim: &str) -> String {
    with_limited_part(JOB_FETCH_LIMITED_CTES, claim)
}

/// Whether a claim failed because a concurrent claim took a limit slot it
/// picked (`jobs_limit_slot_idx`): nothing was claimed; claim again.
pub(crate) fn claim_lost_limit_race(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().as_deref() == Some("23505") && db.constraint() == Some("jobs_limit_slot_idx"))
}

/// Whether any account on this shard has a concurrency limit in `queue`:
/// read by each producer about once a poll interval, and after a claim
/// without the limited part that left due jobs, to know whether its claims
/// need the limited part.
pub async fn account_limits_exist<'c>(conn: impl sqlx::PgExecutor<'c>, queue: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM shardq.account_limits WHERE queue = $1)")
        .bind(queue)
        .fetch_one(conn)
        .await
}

/// The channel a limit set or cleared notifies, with the queue as payload:
/// the shard's producers of that queue read again whether it has limited
/// accounts before their next claim, instead of once a poll interval.
pub const LIMITS_CHANNEL: &str = "shardq_limits";

/// Sets the concurrency limit of `account` in `queue` on this shard
/// (`None`: no limit) and notifies the queue (`NOTIFY shardq_jobs`, and
/// [`LIMITS_CHANNEL`]), so producers claim at once and find the limit
/// (see the producer's claim), also while their claims come back full. Refused (returns false, nothing written, nothing notified) while
/// the account has a fence here: it is moving or has moved away, and a move
/// carries the limits it had when it started.
pub async fn account_limit_set(pool: &Database, account: &str, queue: &str, limit: Option<i32>) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "WITH open AS (SELECT NOT EXISTS (SELECT 1 FROM shardq.fences WHERE account = $1) AS ok),
              gone AS (DELETE FROM shardq.account_limits
                        WHERE account = $1 AND queue = $2 AND $3::int IS NULL AND (SELECT ok FROM open)),
              put AS (INSERT INTO shardq.account_limits (queue, account, max_running)
                      SELECT $2, $1, $3 WHERE $3::int IS NOT NULL AND (SELECT ok FROM open)
                      ON CONFLICT (queue, account) DO UPDATE
                         SET max_running = EXCLUDED.max_running, set_at = now())
         SELECT o.ok AND n.notified >= 0
           FROM open o,
                LATERAL (SELECT count(pg_notify('shardq_jobs', $2)) + count(pg_notify($4, $2)) AS notified
                          WHERE o.ok) AS n",
    )
    .bind(account)
    .bind(queue)
    .bind(limit)
    .bind(LIMITS_CHANNEL)
    .fetch_one(pool)
    .await
}

/// The concurrency limits of `account` on this shard: `(queue, limit)` by queue.
pub async fn account_limits_of(pool: &Database, account: &str) -> sqlx::Result<Vec<(String, i32)>> {
    sqlx::query_as("SELECT queue, max_running FROM shardq.account_limits WHERE account = $1 ORDER BY queue")
        .bind(account)
        .fetch_all(pool)
        .await
}

/// How many runs of `account` in `queue` hold a limit slot on this shard now.
pub async fn account_limit_held(pool: &Database, account: &str, queue: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM shardq.jobs
          WHERE queue = $2 AND account = $1 AND serial_held AND limit_slot IS NOT NULL",
    )
    .bind(account)
    .bind(queue)
    .fetch_one(pool)
    .await
}

/// Writes the account's limits on the shard it goes to as the shard it
/// leaves has them (`limits`, as [`account_limits_of`] read them there):
/// the rows of other queues are deleted. Idempotent.
pub async fn account_limits_put(shard: &Database, account: &str, limits: &[(String, i32)]) -> sqlx::Result<()> {
    let queues: Vec<&str> = limits.iter().map(|(q, _)| q.as_str()).collect();
    let values: Vec<i32> = limits.iter().map(|(_, n)| *n).collect();
    sqlx::query(
        "WITH gone AS (DELETE FROM shardq.account_limits WHERE account = $1 AND NOT (queue = ANY($2)))
         INSERT INTO shardq.account_limits (queue, account, max_running)
         SELECT q, $1, n FROM unnest($2::text[], $3::int[]) AS l(q, n)
         ON CONFLICT (queue, account) DO UPDATE SET max_running = EXCLUDED.max_running",
    )
    .bind(account)
    .bind(queues)
    .bind(values)
    .execute(shard)
    .await
    .map(drop)
}

/// Deletes the account's limits on this shard (its other rows are gone or
/// going in the same clean-up). Returns the rows deleted.
pub async fn account_limits_delete<'c>(conn: impl sqlx::PgExecutor<'c>, account: &str) -> sqlx::Result<u64> {
    sqlx::query("DELETE FROM shardq.account_limits WHERE account = $1")
        .bind(account)
        .execute(conn)
        .await
        .map(|r| r.rows_affected())
}

// ---- named resources: the claim of jobs that use them (shards), their
// declarations and the permits nodes lease (master)

/// `resource_sets`: the distinct resource sets of the available jobs of
/// queue `$1` that use resources, by a recursive skip scan over
/// `jobs_resource_sets_idx (queue, resources, priority, run_at, id)` (shard
/// V25; one index seek per set).
macro_rules! resource_sets_cte {
    () => {
        "resource_sets AS (
              (SELECT resources FROM shardq.jobs
                WHERE state = 'available' AND queue = $1 AND resources IS NOT NULL
                ORDER BY resources LIMIT 1)
              UNION ALL
              SELECT n.resources
                FROM resource_sets p
                CROSS JOIN LATERAL (
                    SELECT resources FROM shardq.jobs
                     WHERE state = 'available' AND queue = $1 AND resources IS NOT NULL
                       AND resources > p.resources
                     ORDER BY resources LIMIT 1) AS n
          )"
    };
}

/// The claim of jobs that use named resources (shard V22, V25), run by a
/// producer while its node may take more such jobs: `$1` queue, `$2` most
/// jobs, `$3` node, `$4` lease seconds, `$5` the resources the node may
/// claim jobs of now.
/// It takes due jobs whose resources are all among `$5`, by priority, run
/// time and id: the queue's resource sets are found by a skip scan
/// (`resource_sets_cte!`, one seek per set), and only the sets within `$5`
/// are read, each up to `$2` due jobs in `jobs_resource_sets_idx`, so due
/// jobs of resources without permits cost one seek per set, however many
/// wait. The index holds only jobs that use resources, so it and this
/// statement cost the other jobs nothing. The rules of the ordinary claims
/// hold for paused queues, fences and serial keys. Jobs of accounts with a
/// limit in the queue are left to the limited part
/// ([`RESOURCED_WITH_LIMITS`]; one probe of the `account_limits` primary
/// key per claim while the queue has none). The node holds the claimed
/// jobs in its buffer and starts each once it holds a permit of each of
/// its resources. Each set locks at most `$2` candidates; those beyond the
/// limit are released when the statement ends.
pub const JOB_FETCH_RESOURCED_SQL: &str = concat!(
    "UPDATE shardq.jobs j
            SET state = 'running', attempt = j.attempt + 1, attempted_at = now(),
                locked_by = $3, lease_expires_at = now() + make_interval(secs => $4),
                serial_held = j.serial_key IS NOT NULL
          WHERE j.id = ANY(ARRAY(
              WITH RECURSIVE ",
    resource_sets_cte!(),
    "
              SELECT c.id
                FROM resource_sets s
                CROSS JOIN LATERAL (
                    SELECT id, priority, run_at FROM shardq.jobs
                     WHERE state = 'available' AND queue = $1 AND resources = s.resources
                       AND run_at <= now()
                       AND NOT EXISTS (SELECT 1 FROM shardq.queue_pauses qp WHERE qp.queue = $1)
                       AND NOT EXISTS (SELECT 1 FROM shardq.fences f WHERE f.account = jobs.account)",
    no_account_limit!("jobs.account"),
    "
                       AND ",
    claim_serial_free!(),
    "
                     ORDER BY priority, run_at, id
                     LIMIT $2
                     FOR UPDATE SKIP LOCKED) AS c
               WHERE s.resources <@ $5::text[]
               ORDER BY c.priority, c.run_at, c.id
               LIMIT $2))
         RETURNING j.id, j.account, j.kind, j.args, j.attempt, j.attempted_at, j.max_attempts, j.run_at,
                   j.serial_key IS NOT NULL AS keyed, j.resources"
);

/// The claim of jobs that use resources while the queue has limited
/// accounts: [`JOB_FETCH_RESOURCED_LIMITED_CTES`] (each claimed job of a
/// limited account holds one of its account's free slots) and
/// [`JOB_FETCH_RESOURCED_SQL`] for the other accounts, in one statement of
/// at most `$2` rows. It commits durably, as the resourced claim does.
pub static RESOURCED_WITH_LIMITS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{} SELECT * FROM claimed",
        with_limited_part(JOB_FETCH_RESOURCED_LIMITED_CTES, JOB_FETCH_RESOURCED_SQL)
    )
});

/// Claims up to `limit` due jobs of `queue` whose resources are all in
/// `free` and leases them to `node`: [`RESOURCED_WITH_LIMITS`] when
/// `limited` (the queue has accounts with a limit, as last read), else
/// [`JOB_FETCH_RESOURCED_SQL`].
pub async fn job_fetch_resourced<'c>(
    conn: impl sqlx::PgExecutor<'c>,
    queue: &str,
    limit: i64,
    node: &str,
    lease_secs: f64,
    free: &[String],
    limited: bool,
) -> sqlx::Result<Vec<super::FetchedJob>> {
    let sql = if limited {
        RESOURCED_WITH_LIMITS.as_str()
    } else {
        JOB_FETCH_RESOURCED_SQL
    };
    sqlx::query_as(sql)
        .bind(queue)
        .bind(limit)
        .bind(node)
        .bind(lease_secs)
        .bind(free)
        .fetch_all(conn)
        .await
}

/// A named resource as the master declares it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct Resource {
    /// Its name.
    pub name: String,
    /// Most running jobs that use it, fleet-wide; `None`: no such limit.
    pub concurrency: Option<i32>,
    /// Most starts per second; `None`: no such limit.
    pub rate: Option<f64>,
    /// Starts allowed at once above the rate; `None`: the rate's one second.
    pub burst: Option<i32>,
    /// Permits leased by nodes now (unexpired leases).
    pub leased: i64,
    /// Nodes holding an unexpired lease of it.
    pub nodes: i64,
}

/// Declares or changes resource `name` (an upsert of its limits).
pub async fn resource_put(
    master: &Database,
    name: &str,
    concurrency: Option<i32>,
    rate: Option<f64>,
    burst: Option<i32>,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO shardq.resources (name, concurrency, rate, burst) VALUES ($1, $2, $3, $4)
         ON CONFLICT (name) DO UPDATE
            SET concurrency = EXCLUDED.concurrency, rate = EXCLUDED.rate, burst = EXCLUDED.burst, updated_at = now()",
    )
    .bind(name)
    .bind(concurrency)
    .bind(rate)
    .bind(burst)
    .execute(master)
    .await
    .map(drop)
}

/// Removes resource `name` and its leases; whether it existed.
pub async fn resource_delete(master: &Database, name: &str) -> sqlx::Result<bool> {
    sqlx::query("DELETE FROM shardq.resources WHERE name = $1")
        .bind(name)
        .execute(master)
        .await
        .map(|r| r.rows_affected() > 0)
}

/// Every declared resource, by name, with its unexpired leases.
pub async fn resources_list(master: &Database) -> sqlx::Result<Vec<Resource>> {
    sqlx::query_as(
        "SELECT r.name, r.concurrency, r.rate, r.burst,
                COALESCE(sum(l.permits), 0)::bigint AS leased,
                count(l.node) FILTER (WHERE l.permits > 0) AS nodes
           FROM shardq.resources r
           LEFT JOIN shardq.resource_leases l ON l.resource = r.name AND l.expires_at > now()
          GROUP BY r.name
          ORDER BY r.name",
    )
    .fetch_all(master)
    .await
}

/// Sets `node`'s lease of resource `name` to `want` permits, or as many as
/// the other nodes' unexpired leases leave of its concurrency, for
/// `lease_secs` from now; returns the permits granted, or `None` when the
/// resource is not declared or has no concurrency limit.
///
/// Two statements in one transaction: the first locks the resource's row,
/// so grants of one resource are serialised; the second, with a snapshot
/// taken after the lock, sees every lease committed before it (one
/// statement would read the other leases from a snapshot taken before it
/// waited for the lock, and two nodes could both be granted the last
/// permits).
pub async fn resource_lease(
    master: &Database,
    name: &str,
    node: &str,
    want: i32,
    lease_secs: f64,
) -> sqlx::Result<Option<i32>> {
    let mut tx = master.begin().await?;
    let concurrency: Option<Option<i32>> =
        sqlx::query_scalar("SELECT concurrency FROM shardq.resources WHERE name = $1 FOR UPDATE")
            .bind(name)
            .fetch_optional(&mut tx)
            .await?;
    let Some(Some(concurrency)) = concurrency else {
        return Ok(None);
    };
    let granted: i32 = sqlx::query_scalar(
        "WITH others AS (
             SELECT COALESCE(sum(permits), 0)::int AS n FROM shardq.resource_leases
              WHERE resource = $1 AND node <> $2 AND expires_at > now())
         INSERT INTO shardq.resource_leases (resource, node, permits, expires_at)
         SELECT $1, $2, LEAST($3, GREATEST($4 - others.n, 0)), now() + make_interval(secs => $5)
           FROM others
         ON CONFLICT (resource, node) DO UPDATE
            SET permits = EXCLUDED.permits, expires_at = EXCLUDED.expires_at
         RETURNING permits",
    )
    .bind(name)
    .bind(node)
    .bind(want.max(0))
    .bind(concurrency)
    .bind(lease_secs)
    .fetch_one(&mut tx)
    .await?;
    tx.commit().await?;
    Ok(Some(granted))
}

/// Ends `node`'s leases of every resource (a clean shutdown).
pub async fn resource_leases_end(master: &Database, node: &str) -> sqlx::Result<u64> {
    sqlx::query("DELETE FROM shardq.resource_leases WHERE node = $1")
        .bind(node)
        .execute(master)
        .await
        .map(|r| r.rows_affected())
}

/// The resources named by due jobs of `queue` that use any (one seek per
/// resource set in use, `resource_sets_cte!`, and one per set to see
/// whether it has a due job): what a node out of permits asks the master
/// for.
pub async fn job_resourced_waiting<'c>(conn: impl sqlx::PgExecutor<'c>, queue: &str) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(concat!(
        "WITH RECURSIVE ",
        resource_sets_cte!(),
        "
         SELECT DISTINCT unnest(s.resources)
           FROM resource_sets s
          WHERE EXISTS (SELECT 1 FROM shardq.jobs
                         WHERE state = 'available' AND queue = $1 AND resources = s.resources
                           AND run_at <= now())"
    ))
    .bind(queue)
    .fetch_all(conn)
    .await
}

/// Takes up to `want` tokens of resource `name`'s bucket for `node`: the
/// bucket is refilled first (`rate` per second since it was last, up to
/// `burst`, or one second's worth without one), then the whole tokens
/// taken are removed. One statement on one row: a concurrent taker waits
/// for the row and recomputes from what the other left. Returns the tokens
/// granted (0 when the bucket is empty), or `None` when the resource is not
/// declared or has no rate.
pub async fn resource_tokens_take(master: &Database, name: &str, want: i32) -> sqlx::Result<Option<i32>> {
    sqlx::query_scalar(
        "WITH now AS (SELECT clock_timestamp() AS t)
         UPDATE shardq.resources r
            SET tokens = f.level - f.granted, refilled_at = (SELECT t FROM now)
           FROM (SELECT name, level, LEAST($2::float8, floor(level))::int AS granted
                   FROM (SELECT name,
                                LEAST(COALESCE(burst::float8, GREATEST(rate, 1)),
                                      tokens + rate * GREATEST(EXTRACT(EPOCH FROM (SELECT t FROM now) - refilled_at), 0))
                                  AS level
                           FROM shardq.resources WHERE name = $1 AND rate IS NOT NULL FOR UPDATE) AS l) AS f
          WHERE r.name = f.name
         RETURNING f.granted",
    )
    .bind(name)
    .bind(want.max(0))
    .fetch_optional(master)
    .await
}
