//! Reads for watching a shard: queue depths and oldest waits, queues with
//! work, running and recently finished counts, schema version, listeners.
//! Called by the runtime's sampler, `observe::health` and `observe::status`.

use shardq_router::router::Database;

// ---- observability
//
// Read by the node's sampler every few seconds and by `shardq status`: each
// statement reads a bounded part of an index, never the whole table, so a
// million-job backlog does not turn watching into load. Public so tests can
// check their plans.

/// Most rows a depth sample counts; a count at the cap means "at least".
pub const QUEUE_DEPTH_CAP: i64 = 10_000;

/// One queue's depth on a shard (`$1` queue, `$2` cap): due and scheduled
/// available jobs among the first `$2` entries of `jobs_fetch_idx` (so the
/// two add up to at most the cap), and the age in seconds of the oldest due
/// job (0 when none is due). The oldest `run_at` comes from a recursive skip
/// scan over the distinct priorities (one index seek each), as in
/// [`JOB_NEXT_DUE_SQL`].
pub const QUEUE_DEPTH_SQL: &str = concat!(
    queue_heads_cte!(),
    "SELECT count(*) FILTER (WHERE h.run_at <= now()) AS available,
                count(*) FILTER (WHERE h.run_at > now()) AS scheduled,
                GREATEST(EXTRACT(EPOCH FROM now() - (SELECT min(run_at) FROM firsts))::float8, 0) AS oldest_secs
           FROM (SELECT run_at FROM shardq.jobs
                  WHERE state = 'available' AND queue = $1
                  ORDER BY priority, run_at, id
                  LIMIT $2) AS h"
);

/// The queues that have available jobs on a shard: a recursive skip scan of
/// `jobs_fetch_idx`, one index seek per queue.
pub const QUEUE_NAMES_SQL: &str = "WITH RECURSIVE queues AS (
             (SELECT queue FROM shardq.jobs WHERE state = 'available' ORDER BY queue LIMIT 1)
             UNION ALL
             SELECT n.queue
               FROM queues q
               CROSS JOIN LATERAL (
                   SELECT queue FROM shardq.jobs
                    WHERE state = 'available' AND queue > q.queue
                    ORDER BY queue LIMIT 1) AS n
         )
         SELECT queue FROM queues";

/// Running jobs per queue on a shard (through `jobs_running_idx`, whose
/// predicate is `state = 'running'`).
pub const QUEUE_RUNNING_SQL: &str = "SELECT queue, count(*) FROM shardq.jobs WHERE state = 'running' GROUP BY queue";

/// Jobs finished in the last hour per queue and final state, with those of
/// the last minute (through `jobs_finalized_idx`; the states are literals so
/// even a generic plan proves the index's predicate).
pub const QUEUE_FINISHED_RECENT_SQL: &str = "SELECT queue, state,
                count(*) FILTER (WHERE finalized_at > now() - interval '1 minute') AS last_minute,
                count(*) AS last_hour
           FROM shardq.jobs
          WHERE state IN ('completed', 'discarded', 'cancelled')
            AND finalized_at > now() - interval '1 hour'
          GROUP BY queue, state";

/// A sampled depth of one queue on a shard.
#[derive(Debug, Clone, Copy, PartialEq, sqlx::FromRow)]
pub struct QueueDepth {
    /// Due jobs waiting (at most [`QUEUE_DEPTH_CAP`] together with `scheduled`).
    pub available: i64,
    /// Jobs waiting for a future `run_at` (scheduled, or retrying after a backoff).
    pub scheduled: i64,
    /// Age in seconds of the oldest due job; 0 when none is due.
    pub oldest_secs: f64,
}

impl QueueDepth {
    /// Whether the counts stopped at the cap (the queue holds at least that many).
    pub fn capped(&self, cap: i64) -> bool {
        self.available + self.scheduled >= cap
    }
}

/// The depth of `queue` on a shard, counting at most `cap` jobs.
pub async fn queue_depth(pool: &Database, queue: &str, cap: i64) -> sqlx::Result<QueueDepth> {
    sqlx::query_as(QUEUE_DEPTH_SQL)
        .bind(queue)
        .bind(cap)
        .fetch_one(pool)
        .await
}

/// The queues with available jobs on a shard, in name order.
pub async fn queue_names_waiting(pool: &Database) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(QUEUE_NAMES_SQL).fetch_all(pool).await
}

/// Running jobs per queue on a shard.
pub async fn queue_running(pool: &Database) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as(QUEUE_RUNNING_SQL).fetch_all(pool).await
}

/// Jobs finished per queue and final state: (queue, state, last minute, last hour).
pub async fn queue_finished_recent(pool: &Database) -> sqlx::Result<Vec<(String, String, i64, i64)>> {
    sqlx::query_as(QUEUE_FINISHED_RECENT_SQL).fetch_all(pool).await
}

/// The highest applied platform migration of a database, `None` when none
/// is (or the history table does not exist yet).
pub async fn schema_version(pool: &Database) -> sqlx::Result<Option<i32>> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('shardq_schema_history') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if !exists {
        return Ok(None);
    }
    sqlx::query_scalar("SELECT max(version) FROM shardq_schema_history")
        .fetch_one(pool)
        .await
}

/// Backends on this database holding a LISTEN (any node's notifier).
pub async fn listener_count(pool: &Database) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'",
    )
    .fetch_one(pool)
    .await
}
