//! Every SQL statement of the `shardq` command (the master and shard reads
//! of `accounts`, the benchmark's bare-SQL floor and its probes); the
//! platform's own SQL lives in the library crates.

use sqlx::PgPool;

/// Creates the floor's own table: the columns a job's lifecycle touches,
/// its primary key and one partial index on what the claim reads.
pub async fn floor_create(pool: &PgPool) -> sqlx::Result<()> {
    sqlx::raw_sql(
        "CREATE TABLE floor_jobs (
             id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             queue        text NOT NULL DEFAULT 'default',
             state        text NOT NULL DEFAULT 'available',
             priority     smallint NOT NULL DEFAULT 0,
             run_at       timestamptz NOT NULL DEFAULT now(),
             attempt      int NOT NULL DEFAULT 0,
             attempted_at timestamptz,
             finalized_at timestamptz,
             args         jsonb NOT NULL DEFAULT '{}');
         CREATE INDEX floor_jobs_available ON floor_jobs (queue, priority, run_at, id)
          WHERE state = 'available';",
    )
    .execute(pool)
    .await
    .map(|_| ())
}

/// Fills the floor's table with `n` jobs in one statement.
pub async fn floor_fill(pool: &PgPool, n: i64) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO floor_jobs (args) SELECT '{}' FROM generate_series(1, $1)")
        .bind(n)
        .execute(pool)
        .await
        .map(|_| ())
}

/// Claims up to `n` of the floor's jobs with SKIP LOCKED and marks them running.
pub async fn floor_claim(pool: &PgPool, n: i64) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar(
        "WITH picked AS (
             SELECT id FROM floor_jobs
              WHERE state = 'available' AND queue = 'default' AND run_at <= now()
              ORDER BY priority, run_at, id LIMIT $1 FOR UPDATE SKIP LOCKED)
         UPDATE floor_jobs j SET state = 'running', attempt = j.attempt + 1, attempted_at = now()
           FROM picked WHERE j.id = picked.id RETURNING j.id",
    )
    .bind(n)
    .fetch_all(pool)
    .await
}

/// Completes claimed floor jobs in one statement.
pub async fn floor_complete(pool: &PgPool, ids: &[i64]) -> sqlx::Result<()> {
    sqlx::query("UPDATE floor_jobs SET state = 'completed', finalized_at = now() WHERE id = ANY($1)")
        .bind(ids)
        .execute(pool)
        .await
        .map(|_| ())
}

/// The enqueue floor: one no-op job per element of `accounts` into
/// shardq's jobs table in one `UNNEST` insert, each with its own args
/// (JSON text, the same element of `args`), as `enqueue_many` sends them:
/// the same rows, columns and args, without ids back or a wake-up.
pub async fn floor_enqueue(pool: &PgPool, accounts: &[&str], args: &[&str]) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO shardq.jobs (account, queue, kind, args)
         SELECT a, 'default', 'noop', g::jsonb FROM unnest($1::text[], $2::text[]) AS t(a, g)",
    )
    .bind(accounts)
    .bind(args)
    .execute(pool)
    .await
    .map(|_| ())
}

/// One no-op job for `account`, inserted with no wake-up sent by the
/// client (the insert trigger is the only other source of one).
pub async fn enqueue_plain(pool: &PgPool, account: &str) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO shardq.jobs (account, queue, kind, args) VALUES ($1, 'default', 'noop', '{}')")
        .bind(account)
        .execute(pool)
        .await
        .map(|_| ())
}

/// The server's durability settings: `fsync`, `synchronous_commit`, `full_page_writes`.
pub async fn durability(pool: &PgPool) -> sqlx::Result<(String, String, String)> {
    sqlx::query_as(
        "SELECT current_setting('fsync'), current_setting('synchronous_commit'),
                current_setting('full_page_writes')",
    )
    .fetch_one(pool)
    .await
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

// ---- accounts (master and shards) ----------------------------------------------

/// One placement row of the master, as `accounts list` shows it.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct PlacementRow {
    /// The account.
    pub account: String,
    /// Its shard.
    pub shard: String,
    /// Its placement epoch (1, and one more per move).
    pub epoch: i64,
    /// When it was first placed.
    pub placed_at: chrono::DateTime<chrono::Utc>,
    /// When it last moved, if it did.
    pub moved_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Pinned to its shard: a rebalance never moves it.
    pub pinned: bool,
}

/// Placements in account order after `after` (exclusive), at most `limit`,
/// only those on `shard` when given.
pub async fn placements_page(
    master: &PgPool,
    shard: Option<&str>,
    after: Option<&str>,
    limit: i64,
) -> sqlx::Result<Vec<PlacementRow>> {
    sqlx::query_as(
        "SELECT account, shard, epoch, placed_at, moved_at, pinned FROM shardq.placements
          WHERE ($1::text IS NULL OR shard = $1) AND ($2::text IS NULL OR account > $2)
          ORDER BY account LIMIT $3",
    )
    .bind(shard)
    .bind(after)
    .bind(limit)
    .fetch_all(master)
    .await
}

/// One account's placement row, if it has one.
pub async fn placement_of(master: &PgPool, account: &str) -> sqlx::Result<Option<PlacementRow>> {
    sqlx::query_as(
        "SELECT account, shard, epoch, placed_at, moved_at, pinned FROM shardq.placements WHERE account = $1",
    )
    .bind(account)
    .fetch_optional(master)
    .await
}

/// An account's jobs on a shard by state (`available` split into due and
/// `scheduled`), and the bytes their rows take, through `shardq.account_jobs`.
pub async fn account_job_counts(shard: &PgPool, account: &str) -> sqlx::Result<(Vec<(String, i64)>, i64)> {
    let mut tx = shard.begin().await?;
    let counts = sqlx::query_as(
        "SELECT CASE WHEN state = 'available' AND run_at > now() THEN 'scheduled' ELSE state END AS s, count(*)
           FROM shardq.account_jobs aj JOIN shardq.jobs j ON j.id = aj.id
          WHERE aj.account = $1 GROUP BY s ORDER BY s",
    )
    .bind(account)
    .fetch_all(&mut *tx)
    .await?;
    let bytes: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(pg_column_size(j.*)), 0)::bigint
           FROM shardq.account_jobs aj JOIN shardq.jobs j ON j.id = aj.id WHERE aj.account = $1",
    )
    .bind(account)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((counts, bytes))
}

// ---- storage (the benchmark's storage scenario) ---------------------------------

/// Other client backends connected to this database (the storage scenario
/// waits for none, so every backend has flushed its statistics).
pub async fn storage_other_backends(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
    )
    .fetch_one(pool)
    .await
}

/// The jobs table's statistics and sizes.
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct JobsTableStats {
    /// Heap (main fork) bytes.
    pub heap_bytes: i64,
    /// `pg_table_size`: heap, TOAST, free space and visibility maps.
    pub table_bytes: i64,
    /// Every index together.
    pub indexes_bytes: i64,
    /// `shardq.account_jobs` (each job's account and id), table and key.
    pub account_jobs_bytes: i64,
    /// Live row versions (estimate).
    pub n_live_tup: i64,
    /// Dead row versions not yet vacuumed (estimate).
    pub n_dead_tup: i64,
    /// Rows inserted.
    pub n_tup_ins: i64,
    /// Rows updated, HOT updates included.
    pub n_tup_upd: i64,
    /// HOT updates (no index entry written).
    pub n_tup_hot_upd: i64,
    /// Vacuums by autovacuum.
    pub autovacuum_count: i64,
}

/// Sizes and counters of `shardq.jobs` from `pg_stat_user_tables`, and
/// the size of `shardq.account_jobs` beside it.
pub async fn storage_jobs_table(pool: &PgPool) -> sqlx::Result<JobsTableStats> {
    sqlx::query_as(
        "SELECT pg_relation_size(relid) AS heap_bytes, pg_table_size(relid) AS table_bytes,
                pg_indexes_size(relid) AS indexes_bytes,
                pg_total_relation_size('shardq.account_jobs') AS account_jobs_bytes, n_live_tup, n_dead_tup, n_tup_ins, n_tup_upd,
                n_tup_hot_upd, autovacuum_count
           FROM pg_stat_user_tables WHERE schemaname = 'shardq' AND relname = 'jobs'",
    )
    .fetch_one(pool)
    .await
}

/// Each index of `shardq.jobs` and its size in bytes, by name.
pub async fn storage_jobs_indexes(pool: &PgPool) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as(
        "SELECT indexrelname::text, pg_relation_size(indexrelid) FROM pg_stat_user_indexes
          WHERE schemaname = 'shardq' AND relname = 'jobs' ORDER BY indexrelname",
    )
    .fetch_all(pool)
    .await
}

/// Whether a vacuum (autovacuum's or another's) of `shardq.jobs` is running.
pub async fn storage_vacuum_running(pool: &PgPool) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_progress_vacuum WHERE relid = 'shardq.jobs'::regclass)")
        .fetch_one(pool)
        .await
}

/// `VACUUM shardq.jobs` (waits for a vacuum already running on it).
pub async fn storage_vacuum(pool: &PgPool) -> sqlx::Result<()> {
    sqlx::query("VACUUM shardq.jobs").execute(pool).await.map(|_| ())
}

/// Creates database `name` as a copy of `template` (which must have no
/// other connection) on the server `admin` is connected to.
pub async fn database_copy(admin: &PgPool, name: &str, template: &str) -> sqlx::Result<()> {
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    sqlx::raw_sql(&format!("CREATE DATABASE {} TEMPLATE {}", quote(name), quote(template)))
        .execute(admin)
        .await
        .map(|_| ())
}

/// Stamps the copied shard database at `url` with its own shard name
/// `shard` (a copy carries its template's stamp, which the router refuses
/// as another shard's).
pub async fn stamp_rename(url: &str, shard: &str) -> sqlx::Result<()> {
    let pool = PgPool::connect(url).await?;
    let done = sqlx::query("UPDATE shardq.fleet_stamp SET name = $1")
        .bind(shard)
        .execute(&pool)
        .await
        .map(|_| ());
    pool.close().await;
    done
}

/// Loads `pg_stat_statements` at the server's next start (the benchmark's
/// `--statements` profile).
pub async fn statements_preload(pool: &PgPool) -> sqlx::Result<()> {
    sqlx::query("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        .execute(pool)
        .await
        .map(|_| ())
}

/// Creates `pg_stat_statements` in the database when missing, has it
/// count planning too (a statement planned again on every call, a custom
/// plan, pays for it on the hot path), and clears every statement's
/// counters.
pub async fn statements_reset(pool: &PgPool) -> sqlx::Result<()> {
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(pool)
        .await?;
    sqlx::query("ALTER SYSTEM SET pg_stat_statements.track_planning = on")
        .execute(pool)
        .await?;
    sqlx::query("SELECT pg_reload_conf()").execute(pool).await?;
    sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(pool)
        .await
        .map(|_| ())
}

/// One statement's counters since the last reset.
#[derive(Debug, sqlx::FromRow)]
pub struct StatementStats {
    /// The statement's text, whitespace collapsed, cut to 100 characters.
    pub query: String,
    /// Times it ran.
    pub calls: i64,
    /// Rows it returned or changed, in all.
    pub rows: i64,
    /// Mean execution time, milliseconds.
    pub mean_ms: f64,
    /// Total execution time, milliseconds.
    pub total_ms: f64,
    /// Times it was planned (as many as `calls` when every call was
    /// planned again; few once a generic plan is cached).
    pub plans: i64,
    /// Mean planning time, milliseconds.
    pub mean_plan_ms: f64,
    /// Shared buffers hit, read and dirtied per call.
    pub blks_per_call: f64,
    /// WAL bytes per call.
    pub wal_per_call: f64,
}

/// The statements of the current database with the most execution time.
pub async fn statements_top(pool: &PgPool, n: i64) -> sqlx::Result<Vec<StatementStats>> {
    sqlx::query_as(
        "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 100) AS query, calls, rows,
                mean_exec_time AS mean_ms, total_exec_time AS total_ms,
                plans, mean_plan_time AS mean_plan_ms,
                ((shared_blks_hit + shared_blks_read + shared_blks_dirtied)::float8 / greatest(calls, 1)) AS blks_per_call,
                (wal_bytes::float8 / greatest(calls, 1)) AS wal_per_call
           FROM pg_stat_statements
          WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
          ORDER BY total_exec_time DESC LIMIT $1",
    )
    .bind(n)
    .fetch_all(pool)
    .await
}

/// Refreshes the planner's statistics of the jobs table (after a bulk load).
pub async fn jobs_analyze(pool: &PgPool) -> sqlx::Result<()> {
    sqlx::query("ANALYZE shardq.jobs").execute(pool).await.map(|_| ())
}

/// The aging run's figures from the shard: how many jobs of `priority`
/// completed, and the longest wait of those (enqueue to completion, s).
pub async fn priority_waits(pool: &PgPool, priority: i16) -> sqlx::Result<(i64, Option<f64>)> {
    sqlx::query_as(
        "SELECT count(*),
                max(EXTRACT(EPOCH FROM finalized_at - created_at))::float8
           FROM shardq.jobs
          WHERE priority = $1 AND state = 'completed'",
    )
    .bind(priority)
    .fetch_one(pool)
    .await
}

/// The fairness scenario's figures from the shard, once every job ran:
/// the p99 pickup (`attempted_at - run_at`, ms) of the jobs of accounts
/// other than `big`, and `big`'s share of the jobs claimed while those
/// others had jobs due (between the first and the last of their run times).
pub async fn fairness_figures(pool: &PgPool, big: &str) -> sqlx::Result<(Option<f64>, Option<f64>)> {
    sqlx::query_as(
        "WITH small AS (SELECT run_at, attempted_at FROM shardq.jobs WHERE account <> $1),
              span AS (SELECT min(run_at) AS first, max(run_at) AS last FROM small)
         SELECT (SELECT percentile_cont(0.99) WITHIN GROUP (
                     ORDER BY EXTRACT(EPOCH FROM attempted_at - run_at) * 1000) FROM small),
                (SELECT avg(CASE WHEN j.account = $1 THEN 1.0 ELSE 0.0 END)::float8
                   FROM shardq.jobs j, span
                  WHERE j.attempted_at BETWEEN span.first AND span.last)",
    )
    .bind(big)
    .fetch_one(pool)
    .await
}
