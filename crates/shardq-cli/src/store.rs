//! Every SQL statement of the `shardq` command (the benchmark's bare-SQL
//! floor and its probes); the platform's own SQL lives in the library crates.

use sqlx::PgPool;

/// Inserts `n` no-op jobs in one statement (the floor's enqueue).
pub async fn floor_insert(pool: &PgPool, n: i64) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO shardq.jobs (account, queue, kind, args)
         SELECT 'floor', 'default', 'noop', '{}' FROM generate_series(1, $1)",
    )
    .bind(n)
    .execute(pool)
    .await
    .map(|_| ())
}

/// Claims up to `n` jobs with SKIP LOCKED and marks them running.
pub async fn floor_claim(pool: &PgPool, n: i64) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar(
        "WITH picked AS (
             SELECT id FROM shardq.jobs
              WHERE state = 'available' AND queue = 'default' AND run_at <= now()
              ORDER BY priority, run_at, id LIMIT $1 FOR UPDATE SKIP LOCKED)
         UPDATE shardq.jobs j SET state = 'running', attempt = j.attempt + 1, attempted_at = now()
           FROM picked WHERE j.id = picked.id RETURNING j.id",
    )
    .bind(n)
    .fetch_all(pool)
    .await
}

/// Completes claimed jobs in one statement.
pub async fn floor_complete(pool: &PgPool, ids: &[i64]) -> sqlx::Result<()> {
    sqlx::query("UPDATE shardq.jobs SET state = 'completed', finalized_at = now() WHERE id = ANY($1)")
        .bind(ids)
        .execute(pool)
        .await
        .map(|_| ())
}

/// Client backends connected to the server right now (all databases).
pub async fn server_connections(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
        .fetch_one(pool)
        .await
}

/// Turns the insert trigger (and so the NOTIFY) off: poll-only mode.
pub async fn notify_trigger_disable(pool: &PgPool) -> sqlx::Result<()> {
    sqlx::query("ALTER TABLE shardq.jobs DISABLE TRIGGER jobs_notify")
        .execute(pool)
        .await
        .map(|_| ())
}

/// The server's version string.
pub async fn server_version(pool: &PgPool) -> sqlx::Result<String> {
    sqlx::query_scalar("SHOW server_version").fetch_one(pool).await
}

/// Terminates every backend of the node (application name `shardq`) on the
/// shard, the LISTEN connection included; returns how many.
pub async fn chaos_terminate_node_backends(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name = 'shardq'
         ) AS t",
    )
    .fetch_one(pool)
    .await
}

/// How many of `ids` are in a final state (completed, discarded, cancelled),
/// and how many of those started more than once.
pub async fn chaos_finished_of(pool: &PgPool, ids: &[i64]) -> sqlx::Result<(i64, i64)> {
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE attempt > 1) FROM shardq.jobs
          WHERE id = ANY($1) AND state IN ('completed', 'discarded', 'cancelled')",
    )
    .bind(ids)
    .fetch_one(pool)
    .await
}
