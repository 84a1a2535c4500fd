//! Every SQL statement of the dashboard. Each reads a bounded part of an
//! index: a keyset range with a `LIMIT`, a scan capped at a number of rows,
//! or the last hour of `jobs_finalized_idx`; none counts a whole table.
//! The statements are public (feature `testing`) so tests can check their
//! plans at a million jobs.
//!
//! The queue depths, running counts and health the fleet and queue pages
//! show come from `shardq::observe::status`, whose statements live in the
//! job crate's store.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// Most rows a filtered job search reads per shard and page before it
/// stops and offers to search on (from where it stopped).
pub const SCAN_CAP: i64 = 20_000;

/// Most of an account's newest jobs its per-state counts read.
pub const ACCOUNT_COUNT_CAP: i64 = 10_000;

/// Most finished jobs (newest first) a "retry discarded of a kind" looks
/// through per action.
pub const RETRY_SCAN_CAP: i64 = 50_000;

/// Most jobs one "retry discarded of a kind" retries.
pub const RETRY_LIMIT: i64 = 500;

/// Jobs finished per minute over the last hour on a shard: `(minutes ago,
/// completed, discarded)`. A range scan of `jobs_finalized_idx` over the
/// last hour (the states are literals, so even a generic plan proves the
/// index's predicate); it reads every job finished in that hour, so its
/// cost is the shard's last hour of throughput (about 60k rows at 1k
/// jobs/s), not the table's size.
pub const THROUGHPUT_SQL: &str = "SELECT floor(EXTRACT(EPOCH FROM now() - finalized_at) / 60)::int AS minutes_ago,
            count(*) FILTER (WHERE state = 'completed') AS completed,
            count(*) FILTER (WHERE state = 'discarded') AS failed
       FROM shardq.jobs
      WHERE state IN ('completed', 'discarded', 'cancelled')
        AND finalized_at > now() - interval '1 hour'
      GROUP BY 1";

/// Newest jobs below a cursor: `$1` the cursor (ids below it), `$2` limit.
/// A backward range scan of the primary key.
pub const JOBS_NEWEST_SQL: &str =
    "SELECT id, account, queue, kind, state, attempt, max_attempts, run_at, created_at, finalized_at
       FROM shardq.jobs WHERE id < $1 ORDER BY id DESC LIMIT $2";

/// An account's newest jobs below a cursor: `$1` cursor, `$2` limit, `$3`
/// account. A backward range scan of `shardq.account_jobs`' primary key
/// `(account, id)`, each job then read by the jobs' primary key.
pub const JOBS_OF_ACCOUNT_SQL: &str =
    "SELECT id, account, queue, kind, state, attempt, max_attempts, run_at, created_at, finalized_at
       FROM shardq.account_jobs AS owned(owner, job_id) JOIN shardq.jobs ON id = job_id
      WHERE owner = $3 AND job_id < $1 ORDER BY job_id DESC LIMIT $2";

/// Newest jobs below a cursor that match a kind, state or queue filter
/// (`$4`, `$5`, `$6`; NULL: any), among at most `$3` rows read backwards
/// from the cursor through the primary key (no index serves these filters,
/// and adding one per filter would tax every enqueue and state change).
/// `$1` cursor, `$2` limit.
pub const JOBS_FILTERED_SQL: &str =
    "SELECT id, account, queue, kind, state, attempt, max_attempts, run_at, created_at, finalized_at
       FROM (SELECT id, account, queue, kind, state, attempt, max_attempts, run_at, created_at, finalized_at
               FROM shardq.jobs WHERE id < $1 ORDER BY id DESC LIMIT $3) AS scanned
      WHERE ($4::text IS NULL OR kind = $4) AND ($5::text IS NULL OR state = $5) AND ($6::text IS NULL OR queue = $6)
      ORDER BY id DESC LIMIT $2";

/// [`JOBS_FILTERED_SQL`] within one account (`$7`), through
/// `shardq.account_jobs` as [`JOBS_OF_ACCOUNT_SQL`].
pub const JOBS_OF_ACCOUNT_FILTERED_SQL: &str =
    "SELECT id, account, queue, kind, state, attempt, max_attempts, run_at, created_at, finalized_at
       FROM (SELECT id, account, queue, kind, state, attempt, max_attempts, run_at, created_at, finalized_at
               FROM shardq.account_jobs AS owned(owner, job_id) JOIN shardq.jobs ON id = job_id
              WHERE owner = $7 AND job_id < $1 ORDER BY job_id DESC LIMIT $3) AS scanned
      WHERE ($4::text IS NULL OR kind = $4) AND ($5::text IS NULL OR state = $5) AND ($6::text IS NULL OR queue = $6)
      ORDER BY id DESC LIMIT $2";

/// Where a capped filtered search stopped: the lowest id among the `$2`
/// rows below cursor `$1` (of account `$3`, NULL: any), and how many there
/// were. An index-only backward scan of the primary key (or of
/// `shardq.account_jobs`' primary key), of at most `$2` entries.
pub const JOBS_FRONTIER_SQL: &str = "SELECT min(id), count(*) FROM (
         SELECT id FROM shardq.jobs WHERE id < $1 ORDER BY id DESC LIMIT $2) AS scanned";

/// [`JOBS_FRONTIER_SQL`] within one account (`$3`).
pub const JOBS_OF_ACCOUNT_FRONTIER_SQL: &str = "SELECT min(id), count(*) FROM (
         SELECT id FROM shardq.account_jobs WHERE account = $3 AND id < $1 ORDER BY id DESC LIMIT $2) AS scanned";

/// An account's jobs per state among its `$2` newest (`$1` account),
/// through `shardq.account_jobs` as [`JOBS_OF_ACCOUNT_SQL`].
pub const ACCOUNT_COUNTS_SQL: &str = "SELECT state, count(*) FROM (
         SELECT state FROM shardq.account_jobs AS owned(owner, job_id) JOIN shardq.jobs ON id = job_id
          WHERE owner = $1 ORDER BY job_id DESC LIMIT $2) AS newest
      GROUP BY state ORDER BY state";

/// Discarded jobs of kind `$1` among the `$2` most recently finished jobs,
/// at most `$3`: a backward scan of `jobs_finalized_idx` capped at `$2`.
pub const DISCARDED_OF_KIND_SQL: &str = "SELECT id FROM (
         SELECT id, kind, state FROM shardq.jobs
          WHERE state IN ('completed', 'discarded', 'cancelled')
          ORDER BY finalized_at DESC LIMIT $2) AS finished
      WHERE state = 'discarded' AND kind = $1
      LIMIT $3";

/// Placements after account `$1` in account order, `$2` of them (master;
/// the primary key's range).
pub const PLACEMENTS_PAGE_SQL: &str = "SELECT account, shard, epoch, placed_at, moved_at
       FROM shardq.placements WHERE account > $1 ORDER BY account LIMIT $2";

/// One account's placement (master).
pub const PLACEMENT_SQL: &str =
    "SELECT account, shard, epoch, placed_at, moved_at FROM shardq.placements WHERE account = $1";

/// Moves in progress, oldest first, at most `$1` (master; at most one per
/// account, through `moves_active_idx`).
pub const MOVES_ACTIVE_SQL: &str =
    "SELECT id, account, from_shard, to_shard, epoch, step, error, started_at, updated_at
       FROM shardq.moves WHERE step NOT IN ('done', 'aborted') ORDER BY id LIMIT $1";

/// An account's moves, newest first, at most `$2` (master).
pub const MOVES_OF_ACCOUNT_SQL: &str =
    "SELECT id, account, from_shard, to_shard, epoch, step, error, started_at, updated_at
       FROM shardq.moves WHERE account = $1 ORDER BY id DESC LIMIT $2";

/// A job as a list shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    /// Row id on its shard.
    pub id: i64,
    /// Owning account.
    pub account: String,
    /// Queue.
    pub queue: String,
    /// Kind.
    pub kind: String,
    /// State.
    pub state: String,
    /// Attempts started.
    pub attempt: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// When it may run (next).
    pub run_at: DateTime<Utc>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// When it reached a final state.
    pub finalized_at: Option<DateTime<Utc>>,
}

/// What a job search filters on (all optional).
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// The account.
    pub account: Option<String>,
    /// The kind.
    pub kind: Option<String>,
    /// The state's name.
    pub state: Option<String>,
    /// The queue.
    pub queue: Option<String>,
}

impl JobFilter {
    /// Whether kind, state or queue is set (so the scan is capped).
    pub fn narrows(&self) -> bool {
        self.kind.is_some() || self.state.is_some() || self.queue.is_some()
    }
}

/// The jobs below `before` that match `filter`, newest first, at most
/// `limit`; a narrowing filter reads at most [`SCAN_CAP`] rows.
pub async fn jobs_page(pool: &PgPool, filter: &JobFilter, before: i64, limit: i64) -> sqlx::Result<Vec<JobRow>> {
    match (&filter.account, filter.narrows()) {
        (None, false) => {
            sqlx::query_as(JOBS_NEWEST_SQL)
                .bind(before)
                .bind(limit)
                .fetch_all(pool)
                .await
        }
        (Some(account), false) => {
            sqlx::query_as(JOBS_OF_ACCOUNT_SQL)
                .bind(before)
                .bind(limit)
                .bind(account)
                .fetch_all(pool)
                .await
        }
        (account, true) => {
            let sql = if account.is_some() {
                JOBS_OF_ACCOUNT_FILTERED_SQL
            } else {
                JOBS_FILTERED_SQL
            };
            let mut q = sqlx::query_as(sql)
                .bind(before)
                .bind(limit)
                .bind(SCAN_CAP)
                .bind(&filter.kind)
                .bind(&filter.state)
                .bind(&filter.queue);
            if let Some(account) = account {
                q = q.bind(account);
            }
            q.fetch_all(pool).await
        }
    }
}

/// Where a capped search below `before` stops: `(lowest id read, rows
/// read)`; the id is `None` when no row is below `before`.
pub async fn jobs_frontier(pool: &PgPool, account: Option<&str>, before: i64) -> sqlx::Result<(Option<i64>, i64)> {
    match account {
        None => {
            sqlx::query_as(JOBS_FRONTIER_SQL)
                .bind(before)
                .bind(SCAN_CAP)
                .fetch_one(pool)
                .await
        }
        Some(account) => {
            sqlx::query_as(JOBS_OF_ACCOUNT_FRONTIER_SQL)
                .bind(before)
                .bind(SCAN_CAP)
                .bind(account)
                .fetch_one(pool)
                .await
        }
    }
}

/// Jobs finished per minute over the last hour: `(minutes ago, completed, failed)`.
pub async fn throughput_last_hour(pool: &PgPool) -> sqlx::Result<Vec<(i32, i64, i64)>> {
    sqlx::query_as(THROUGHPUT_SQL).fetch_all(pool).await
}

/// An account's jobs per state among its [`ACCOUNT_COUNT_CAP`] newest.
pub async fn account_counts(pool: &PgPool, account: &str) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as(ACCOUNT_COUNTS_SQL)
        .bind(account)
        .bind(ACCOUNT_COUNT_CAP)
        .fetch_all(pool)
        .await
}

/// Ids of discarded jobs of `kind` among the [`RETRY_SCAN_CAP`] most
/// recently finished, at most [`RETRY_LIMIT`].
pub async fn discarded_of_kind(pool: &PgPool, kind: &str) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar(DISCARDED_OF_KIND_SQL)
        .bind(kind)
        .bind(RETRY_SCAN_CAP)
        .bind(RETRY_LIMIT)
        .fetch_all(pool)
        .await
}

/// An account's placement, as the master holds it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PlacementRow {
    /// The account.
    pub account: String,
    /// Its shard.
    pub shard: String,
    /// Its epoch (bumped by every move).
    pub epoch: i64,
    /// When it was first placed.
    pub placed_at: DateTime<Utc>,
    /// When it last moved.
    pub moved_at: Option<DateTime<Utc>>,
}

/// Placements after `after` in account order, at most `limit`.
pub async fn placements_page(master: &PgPool, after: &str, limit: i64) -> sqlx::Result<Vec<PlacementRow>> {
    sqlx::query_as(PLACEMENTS_PAGE_SQL)
        .bind(after)
        .bind(limit)
        .fetch_all(master)
        .await
}

/// One account's placement.
pub async fn placement(master: &PgPool, account: &str) -> sqlx::Result<Option<PlacementRow>> {
    sqlx::query_as(PLACEMENT_SQL).bind(account).fetch_optional(master).await
}

/// A move of an account, as the master records it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MoveRow {
    /// The move's id.
    pub id: i64,
    /// The account.
    pub account: String,
    /// From shard.
    pub from_shard: String,
    /// To shard.
    pub to_shard: String,
    /// The epoch it started at.
    pub epoch: i64,
    /// Its step.
    pub step: String,
    /// The last error of a step, if any.
    pub error: Option<String>,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When a step last changed.
    pub updated_at: DateTime<Utc>,
}

/// Moves in progress, at most `limit`.
pub async fn moves_active(master: &PgPool, limit: i64) -> sqlx::Result<Vec<MoveRow>> {
    sqlx::query_as(MOVES_ACTIVE_SQL).bind(limit).fetch_all(master).await
}

/// An account's moves, newest first, at most `limit`.
pub async fn moves_of_account(master: &PgPool, account: &str, limit: i64) -> sqlx::Result<Vec<MoveRow>> {
    sqlx::query_as(MOVES_OF_ACCOUNT_SQL)
        .bind(account)
        .bind(limit)
        .fetch_all(master)
        .await
}
