//! Every SQL statement of the job crate, as noun-first functions.
//!
//! Fencing: a running job is identified by `(id, attempt)`; every statement
//! that ends or extends a run matches both plus `state = 'running'`, so a late
//! write from a node whose lease was rescued changes nothing.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use crate::job::{JobId, JobRecord, NewJob};

/// A job claimed by a producer.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FetchedJob {
    /// Row id on its shard.
    pub id: i64,
    /// Owning account.
    pub account: String,
    /// Kind, selects the handler.
    pub kind: String,
    /// Args as JSON.
    pub args: sqlx::types::Json<serde_json::Value>,
    /// This attempt's number (1 for the first run).
    pub attempt: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// When the job became due.
    pub run_at: DateTime<Utc>,
}

/// What a producer asks for.
pub struct FetchParams<'a> {
    /// The queue.
    pub queue: &'a str,
    /// Most jobs to claim.
    pub limit: i64,
    /// This node's id, recorded as `locked_by`.
    pub node: &'a str,
    /// Lease length in seconds.
    pub lease_secs: f64,
}

/// How one run ended, for the batched write.
#[derive(Debug, Clone)]
pub struct Finish {
    /// Row id.
    pub id: i64,
    /// The attempt that ran (fence).
    pub attempt: i32,
    /// New state: `completed`, `available` (retry/snooze), `discarded`, `cancelled`.
    pub state: &'static str,
    /// Next run time for `available`.
    pub run_at: Option<DateTime<Utc>>,
    /// Error text to append to the job's errors, with this attempt's number.
    pub error: Option<String>,
    /// Extra attempts granted (a snooze does not count as a failure).
    pub extra_attempts: i32,
}

const JOB_INSERT: &str = "INSERT INTO shardq.jobs (account, queue, kind, args, priority, max_attempts, run_at)
     VALUES ($1, $2, $3, $4::jsonb, $5, $6, COALESCE($7, now()))
     RETURNING id";

/// Inserts one job on the connection (the caller's transaction, or a pool connection).
pub async fn job_insert(conn: &mut PgConnection, account: &str, job: &NewJob, args: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar(JOB_INSERT)
        .bind(account)
        .bind(&job.queue)
        .bind(&job.kind)
        .bind(args)
        .bind(job.priority)
        .bind(job.max_attempts)
        .bind(job.run_at)
        .fetch_one(conn)
        .await
}

/// Inserts many jobs in one statement; ids come back in input order.
pub async fn job_insert_many(conn: &mut PgConnection, rows: &[(&str, &NewJob, String)]) -> sqlx::Result<Vec<i64>> {
    let accounts: Vec<&str> = rows.iter().map(|r| r.0).collect();
    let queues: Vec<&str> = rows.iter().map(|r| r.1.queue.as_str()).collect();
    let kinds: Vec<&str> = rows.iter().map(|r| r.1.kind.as_str()).collect();
    let args: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
    let priorities: Vec<i16> = rows.iter().map(|r| r.1.priority).collect();
    let max_attempts: Vec<i32> = rows.iter().map(|r| r.1.max_attempts).collect();
    let run_ats: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.1.run_at).collect();
    sqlx::query_scalar(
        "INSERT INTO shardq.jobs (account, queue, kind, args, priority, max_attempts, run_at)
         SELECT a, q, k, g::jsonb, p, m, COALESCE(r, now())
           FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::smallint[], $6::int[], $7::timestamptz[])
                WITH ORDINALITY AS t(a, q, k, g, p, m, r, n)
          ORDER BY n
         RETURNING id",
    )
    .bind(accounts)
    .bind(queues)
    .bind(kinds)
    .bind(args)
    .bind(priorities)
    .bind(max_attempts)
    .bind(run_ats)
    .fetch_all(conn)
    .await
}

/// The fetch statement: `$1` queue, `$2` limit, `$3` node id, `$4` lease
/// seconds. Public so tests can check its generic plan: `id = ANY(ARRAY(..))`
/// keeps it an index scan even when the server switches to a generic plan
/// (a CTE joined on id can become a hash join over a sequential scan).
pub const JOB_FETCH_AVAILABLE_SQL: &str = "UPDATE shardq.jobs j
            SET state = 'running', attempt = j.attempt + 1, attempted_at = now(),
                locked_by = $3, lease_expires_at = now() + make_interval(secs => $4)
          WHERE j.id = ANY(ARRAY(
              SELECT id FROM shardq.jobs
               WHERE state = 'available' AND queue = $1 AND run_at <= now()
               ORDER BY priority, run_at, id
               LIMIT $2
               FOR UPDATE SKIP LOCKED))
         RETURNING j.id, j.account, j.kind, j.args, j.attempt, j.max_attempts, j.run_at";

/// Claims up to `limit` due jobs of a queue, in priority then run order,
/// skipping rows other nodes hold, and leases them to `node`.
pub async fn job_fetch_available(pool: &PgPool, p: &FetchParams<'_>) -> sqlx::Result<Vec<FetchedJob>> {
    sqlx::query_as(JOB_FETCH_AVAILABLE_SQL)
        .bind(p.queue)
        .bind(p.limit)
        .bind(p.node)
        .bind(p.lease_secs)
        .fetch_all(pool)
        .await
}

/// The completion statement: `$1` ids, `$2` attempts. Public so tests can
/// check its generic plan.
pub const JOB_COMPLETE_MANY_SQL: &str = "UPDATE shardq.jobs j
            SET state = 'completed', finalized_at = now(), locked_by = NULL, lease_expires_at = NULL
           FROM unnest($1::bigint[], $2::int[]) AS c(id, attempt)
          WHERE j.id = ANY($1) AND j.id = c.id AND j.attempt = c.attempt AND j.state = 'running'";

/// Marks runs completed, fenced by attempt. Returns the rows changed.
pub async fn job_complete_many(pool: &PgPool, ids: &[i64], attempts: &[i32]) -> sqlx::Result<u64> {
    sqlx::query(JOB_COMPLETE_MANY_SQL)
        .bind(ids)
        .bind(attempts)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
}

/// Writes runs that did not simply complete (retry, snooze, discard, cancel), fenced by attempt.
pub async fn job_finish_many(pool: &PgPool, finishes: &[Finish]) -> sqlx::Result<u64> {
    let ids: Vec<i64> = finishes.iter().map(|f| f.id).collect();
    let attempts: Vec<i32> = finishes.iter().map(|f| f.attempt).collect();
    let states: Vec<&str> = finishes.iter().map(|f| f.state).collect();
    let run_ats: Vec<Option<DateTime<Utc>>> = finishes.iter().map(|f| f.run_at).collect();
    let errors: Vec<Option<&str>> = finishes.iter().map(|f| f.error.as_deref()).collect();
    let extra: Vec<i32> = finishes.iter().map(|f| f.extra_attempts).collect();
    sqlx::query(
        "UPDATE shardq.jobs j
            SET state = f.state,
                run_at = COALESCE(f.run_at, j.run_at),
                finalized_at = CASE WHEN f.state = 'available' THEN NULL ELSE now() END,
                max_attempts = j.max_attempts + f.extra,
                errors = CASE WHEN f.error IS NULL THEN j.errors
                              ELSE j.errors || jsonb_build_array(jsonb_build_object(
                                       'attempt', j.attempt, 'at', now(), 'error', f.error)) END,
                locked_by = NULL, lease_expires_at = NULL
           FROM unnest($1::bigint[], $2::int[], $3::text[], $4::timestamptz[], $5::text[], $6::int[])
                AS f(id, attempt, state, run_at, error, extra)
          WHERE j.id = ANY($1) AND j.id = f.id AND j.attempt = f.attempt AND j.state = 'running'",
    )
    .bind(ids)
    .bind(attempts)
    .bind(states)
    .bind(run_ats)
    .bind(errors)
    .bind(extra)
    .execute(pool)
    .await
    .map(|r| r.rows_affected())
}

/// Extends the leases of this node's running jobs.
pub async fn job_lease_renew(pool: &PgPool, ids: &[i64], node: &str, lease_secs: f64) -> sqlx::Result<u64> {
    sqlx::query(
        "UPDATE shardq.jobs SET lease_expires_at = now() + make_interval(secs => $3)
          WHERE id = ANY($1) AND state = 'running' AND locked_by = $2",
    )
    .bind(ids)
    .bind(node)
    .bind(lease_secs)
    .execute(pool)
    .await
    .map(|r| r.rows_affected())
}

/// The rescue statement: `$1` limit. Public so tests can check its generic plan.
pub const JOB_RESCUE_EXPIRED_SQL: &str = "UPDATE shardq.jobs j
            SET state = CASE WHEN j.attempt >= j.max_attempts THEN 'discarded' ELSE 'available' END,
                finalized_at = CASE WHEN j.attempt >= j.max_attempts THEN now() END,
                run_at = now(),
                errors = j.errors || jsonb_build_array(jsonb_build_object(
                    'attempt', j.attempt, 'at', now(),
                    'error', 'lease expired: node ' || coalesce(j.locked_by, '?') || ' stopped renewing it (crashed or cut off); rescued')),
                locked_by = NULL, lease_expires_at = NULL
          WHERE j.id = ANY(ARRAY(
              SELECT id FROM shardq.jobs
               WHERE state = 'running' AND lease_expires_at < now()
               ORDER BY lease_expires_at
               LIMIT $1
               FOR UPDATE SKIP LOCKED))";

/// Makes running jobs whose lease expired available again (or discards them
/// when they had no attempts left), recording the lost attempt as an error.
pub async fn job_rescue_expired(pool: &PgPool, limit: i64) -> sqlx::Result<u64> {
    sqlx::query(JOB_RESCUE_EXPIRED_SQL)
        .bind(limit)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
}

/// Hands running jobs of this node back (shutdown): available now, and the
/// interrupted attempt does not count against `max_attempts`.
pub async fn job_give_back(pool: &PgPool, ids: &[i64], attempts: &[i32], node: &str) -> sqlx::Result<u64> {
    sqlx::query(
        "UPDATE shardq.jobs j
            SET state = 'available', run_at = now(), max_attempts = j.max_attempts + 1,
                locked_by = NULL, lease_expires_at = NULL
           FROM unnest($1::bigint[], $2::int[]) AS g(id, attempt)
          WHERE j.id = ANY($1) AND j.id = g.id AND j.attempt = g.attempt
            AND j.state = 'running' AND j.locked_by = $3",
    )
    .bind(ids)
    .bind(attempts)
    .bind(node)
    .execute(pool)
    .await
    .map(|r| r.rows_affected())
}

#[derive(sqlx::FromRow)]
struct JobRow {
    id: i64,
    account: String,
    queue: String,
    kind: String,
    args: sqlx::types::Json<serde_json::Value>,
    state: String,
    priority: i16,
    attempt: i32,
    max_attempts: i32,
    run_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
    attempted_at: Option<DateTime<Utc>>,
    finalized_at: Option<DateTime<Utc>>,
    locked_by: Option<String>,
    errors: sqlx::types::Json<serde_json::Value>,
}

const JOB_COLUMNS: &str = "id, account, queue, kind, args, state, priority, attempt, max_attempts, run_at,
                           created_at, attempted_at, finalized_at, locked_by, errors";

impl JobRow {
    fn into_record(self, shard: &str) -> JobRecord {
        JobRecord {
            id: JobId {
                shard: shard.to_string(),
                id: self.id,
            },
            account: self.account,
            queue: self.queue,
            kind: self.kind,
            args: self.args.0,
            state: self.state,
            priority: self.priority,
            attempt: self.attempt,
            max_attempts: self.max_attempts,
            run_at: self.run_at,
            created_at: self.created_at,
            attempted_at: self.attempted_at,
            finalized_at: self.finalized_at,
            locked_by: self.locked_by,
            errors: self.errors.0,
        }
    }
}

/// One job by id.
pub async fn job_get(pool: &PgPool, shard: &str, id: i64) -> sqlx::Result<Option<JobRecord>> {
    let row: Option<JobRow> = sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM shardq.jobs WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?;
    Ok(row.map(|r| r.into_record(shard)))
}

/// An account's jobs on a shard, newest first, optionally of one state.
pub async fn job_list_for_account(
    pool: &PgPool,
    shard: &str,
    account: &str,
    state: Option<&str>,
    limit: i64,
) -> sqlx::Result<Vec<JobRecord>> {
    let rows: Vec<JobRow> = sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM shardq.jobs
          WHERE account = $1 AND ($2::text IS NULL OR state = $2)
          ORDER BY id DESC LIMIT $3"
    ))
    .bind(account)
    .bind(state)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| r.into_record(shard)).collect())
}

/// Job counts by queue and state on a shard (`scheduled` counts available jobs not yet due).
pub async fn job_counts(pool: &PgPool) -> sqlx::Result<Vec<(String, String, i64)>> {
    sqlx::query_as(
        "SELECT queue,
                CASE WHEN state = 'available' AND run_at > now() THEN 'scheduled' ELSE state END AS state,
                count(*)
           FROM shardq.jobs GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await
}
