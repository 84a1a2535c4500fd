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

use sqlx::PgPool;

/// The claim of limited accounts' jobs, as the leading common table
/// expressions of the claim statement; its last one, `limited`, is the
/// `UPDATE .. RETURNING` of the rows claimed, with the columns of a
/// fetched job (`keyed` is true: the completer releases the hold).
/// Parameters as in the ordinary claims: `$1` queue,
/// `$2` most jobs, `$3` node, `$4` lease seconds, `$5` priority aging.
///
/// For each account with a limit in the queue (`shardq.account_limits`,
/// primary key `(queue, account)`), that the queue is not paused and the
/// account not fenced: its free slots are the limit less its held runs
/// (counted in `jobs_limit_slot_idx`); it takes at most that many due jobs,
/// aged first, then by priority, run time and id (one seek in
/// `jobs_fair_idx (queue, priority, account, run_at, id)` per priority in
/// use, with the serial-key rules of the ordinary claims, SKIP LOCKED), at
/// most `$2` in all; each claimed job gets one free slot number. Free slots
/// are looked for from an offset that depends on the node, so claims of
/// different nodes tend to pick different slots. When the queue has no
/// limited account, this reads one empty range of a small primary key and
/// nothing else.
pub const JOB_FETCH_LIMITED_CTES: &str = "WITH RECURSIVE lim_priorities AS (
    (SELECT priority FROM shardq.jobs
      WHERE state = 'available' AND queue = $1
      ORDER BY priority LIMIT 1)
    UNION ALL
    SELECT n.priority
      FROM lim_priorities p
      CROSS JOIN LATERAL (
          SELECT priority FROM shardq.jobs
           WHERE state = 'available' AND queue = $1 AND priority > p.priority
           ORDER BY priority LIMIT 1) AS n
),
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
          SELECT d.id, d.priority, d.run_at,
                 COALESCE(d.run_at <= now() - make_interval(secs => $5), false) AS aged
            FROM lim_priorities p
            CROSS JOIN LATERAL (
                SELECT id, priority, run_at FROM shardq.jobs
                 WHERE state = 'available' AND queue = $1 AND priority = p.priority
                   AND account = a.account AND run_at <= now()
                   AND (serial_key IS NULL OR (
                        NOT EXISTS (
                            SELECT 1 FROM shardq.jobs b
                             WHERE b.serial_key = jobs.serial_key AND b.id < jobs.id
                               AND b.state IN ('available', 'running'))
                        AND NOT EXISTS (
                            SELECT 1 FROM shardq.jobs h
                             WHERE h.serial_key = jobs.serial_key AND h.serial_held)))
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
    RETURNING j.id, j.account, j.kind, j.args, j.attempt, j.max_attempts, j.run_at, true AS keyed
)";

/// `claim` (one of the ordinary claim statements, an `UPDATE .. RETURNING`
/// of the columns `limited` returns) and the limited claim in one
/// statement: both sets of rows, which are disjoint (the ordinary claims
/// skip limited accounts).
pub fn claim_with_limits(claim: &str) -> String {
    format!("{JOB_FETCH_LIMITED_CTES}, claimed AS ({claim}) SELECT * FROM claimed UNION ALL SELECT * FROM limited")
}

/// Whether a claim failed because a concurrent claim took a limit slot it
/// picked (`jobs_limit_slot_idx`): nothing was claimed; claim again.
pub(crate) fn claim_lost_limit_race(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().as_deref() == Some("23505") && db.constraint() == Some("jobs_limit_slot_idx"))
}

/// Sets the concurrency limit of `account` in `queue` on this shard
/// (`None`: no limit). Refused (returns false, nothing written) while the
/// account has a fence here: it is moving or has moved away, and a move
/// carries the limits it had when it started.
pub async fn account_limit_set(pool: &PgPool, account: &str, queue: &str, limit: Option<i32>) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "WITH open AS (SELECT NOT EXISTS (SELECT 1 FROM shardq.fences WHERE account = $1) AS ok),
              gone AS (DELETE FROM shardq.account_limits
                        WHERE account = $1 AND queue = $2 AND $3::int IS NULL AND (SELECT ok FROM open)),
              put AS (INSERT INTO shardq.account_limits (queue, account, max_running)
                      SELECT $2, $1, $3 WHERE $3::int IS NOT NULL AND (SELECT ok FROM open)
                      ON CONFLICT (queue, account) DO UPDATE
                         SET max_running = EXCLUDED.max_running, set_at = now())
         SELECT ok FROM open",
    )
    .bind(account)
    .bind(queue)
    .bind(limit)
    .fetch_one(pool)
    .await
}

/// The concurrency limits of `account` on this shard: `(queue, limit)` by queue.
pub async fn account_limits_of(pool: &PgPool, account: &str) -> sqlx::Result<Vec<(String, i32)>> {
    sqlx::query_as("SELECT queue, max_running FROM shardq.account_limits WHERE account = $1 ORDER BY queue")
        .bind(account)
        .fetch_all(pool)
        .await
}

/// How many runs of `account` in `queue` hold a limit slot on this shard now.
pub async fn account_limit_held(pool: &PgPool, account: &str, queue: &str) -> sqlx::Result<i64> {
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
pub async fn account_limits_put(shard: &PgPool, account: &str, limits: &[(String, i32)]) -> sqlx::Result<()> {
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
