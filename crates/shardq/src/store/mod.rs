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
///
/// Serial keys: a job with a `serial_key` is claimed only when no earlier
/// job (lower id) of the same key is `available` or `running` (one seek in
/// `jobs_serial_idx`; jobs without a key skip the probe, as `OR` evaluates
/// its left side first). Why two concurrent fetches cannot both claim jobs
/// of one key: the earlier job leaves `available`/`running` only when it is
/// final, and a final state is written only after the job was claimed and
/// ran, in a later transaction than its claim. A fetch whose snapshot
/// predates the claim's commit sees the earlier job `available`; one that
/// sees the claim sees it `running`; either way the probe finds it and the
/// later job is skipped. SKIP LOCKED skips only rows this fetch would lock
/// (candidates), never the probed rows, which are read from the snapshot.
pub const JOB_FETCH_AVAILABLE_SQL: &str = "UPDATE shardq.jobs j
            SET state = 'running', attempt = j.attempt + 1, attempted_at = now(),
                locked_by = $3, lease_expires_at = now() + make_interval(secs => $4)
          WHERE j.id = ANY(ARRAY(
              SELECT id FROM shardq.jobs
               WHERE state = 'available' AND queue = $1 AND run_at <= now()
                 AND (serial_key IS NULL OR NOT EXISTS (
                      SELECT 1 FROM shardq.jobs b
                       WHERE b.serial_key = jobs.serial_key AND b.id < jobs.id
                         AND b.state IN ('available', 'running')))
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
            SET state = 'completed', finalized_at = now(), locked_by = NULL, lease_expires_at = NULL,
                unique_key = CASE WHEN 'completed' = ANY(j.unique_states) THEN j.unique_key END
           FROM unnest($1::bigint[], $2::int[]) AS c(id, attempt)
          WHERE j.id = c.id AND j.attempt = c.attempt AND j.state = 'running'";

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
/// Jobs made available again (retry, snooze) notify their queue, so every
/// node's producer re-reads the queue's next run time and wakes at the
/// retry's `run_at` rather than up to a poll later.
pub async fn job_finish_many(pool: &PgPool, finishes: &[Finish]) -> sqlx::Result<u64> {
    let ids: Vec<i64> = finishes.iter().map(|f| f.id).collect();
    let attempts: Vec<i32> = finishes.iter().map(|f| f.attempt).collect();
    let states: Vec<&str> = finishes.iter().map(|f| f.state).collect();
    let run_ats: Vec<Option<DateTime<Utc>>> = finishes.iter().map(|f| f.run_at).collect();
    let errors: Vec<Option<&str>> = finishes.iter().map(|f| f.error.as_deref()).collect();
    let extra: Vec<i32> = finishes.iter().map(|f| f.extra_attempts).collect();
    sqlx::query_as(
        "WITH finished AS (
         UPDATE shardq.jobs j
            SET state = f.state,
                run_at = COALESCE(f.run_at, j.run_at),
                finalized_at = CASE WHEN f.state = 'available' THEN NULL ELSE now() END,
                unique_key = CASE WHEN f.state = ANY(j.unique_states) THEN j.unique_key END,
                max_attempts = j.max_attempts + f.extra,
                errors = CASE WHEN f.error IS NULL THEN j.errors
                              ELSE j.errors || jsonb_build_array(jsonb_build_object(
                                       'attempt', j.attempt, 'at', now(), 'error', f.error)) END,
                locked_by = NULL, lease_expires_at = NULL
           FROM unnest($1::bigint[], $2::int[], $3::text[], $4::timestamptz[], $5::text[], $6::int[])
                AS f(id, attempt, state, run_at, error, extra)
          WHERE j.id = f.id AND j.attempt = f.attempt AND j.state = 'running'
         RETURNING j.queue, j.state
         )
         SELECT (SELECT count(*) FROM finished) AS written,
                (SELECT count(pg_notify('shardq_jobs', q.queue))
                   FROM (SELECT DISTINCT queue FROM finished WHERE state = 'available') AS q) AS notified",
    )
    .bind(ids)
    .bind(attempts)
    .bind(states)
    .bind(run_ats)
    .bind(errors)
    .bind(extra)
    .fetch_one(pool)
    .await
    .map(|(written, _notified): (i64, i64)| written as u64)
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
                unique_key = CASE WHEN j.attempt < j.max_attempts OR 'discarded' = ANY(j.unique_states)
                                  THEN j.unique_key END,
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
          WHERE j.id = g.id AND j.attempt = g.attempt
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

// ---- cancellation, retry, retention (and the scheduled-job wake-up)

/// The notification channel that tells a shard's worker nodes a running job
/// was cancelled; the payload is the job's row id.
pub const CANCEL_CHANNEL: &str = "shardq_cancel";

/// `firsts`: the earliest available job (priority, run_at) of queue `$1`
/// for each priority in use, by a recursive skip scan over `jobs_fetch_idx`
/// (one index seek per distinct priority). Shared by [`JOB_NEXT_DUE_SQL`] and
/// [`QUEUE_DEPTH_SQL`].
macro_rules! queue_heads_cte {
    () => {
        "WITH RECURSIVE firsts AS (
             (SELECT priority, run_at FROM shardq.jobs
               WHERE state = 'available' AND queue = $1
               ORDER BY priority, run_at LIMIT 1)
             UNION ALL
             SELECT n.priority, n.run_at
               FROM firsts f
               CROSS JOIN LATERAL (
                   SELECT priority, run_at FROM shardq.jobs
                    WHERE state = 'available' AND queue = $1 AND priority > f.priority
                    ORDER BY priority, run_at LIMIT 1) AS n
         ) "
    };
}

/// Seconds from now until the earliest available job of queue `$1` is due
/// (negative when one is already due; NULL when the queue has none).
///
/// `jobs_fetch_idx (queue, priority, run_at, id) WHERE state = 'available'`
/// leads with priority, so a plain `min(run_at)` would read every available
/// row of the queue. Instead this walks the distinct priorities with a
/// recursive skip scan: each step is one index seek to the first entry of
/// the next priority, which is that priority's earliest `run_at`. The cost
/// is one seek per distinct priority in use, and no extra index to write on
/// every enqueue. Public so tests can check its generic plan.
pub const JOB_NEXT_DUE_SQL: &str = concat!(
    queue_heads_cte!(),
    "SELECT EXTRACT(EPOCH FROM min(run_at) - clock_timestamp())::float8 FROM firsts"
);

/// Seconds until the earliest available job of `queue` is due (negative if
/// one is due now), or `None` when the queue has no available job. Read by a
/// producer whose fetch came back short, to set its next wake-up.
pub async fn job_next_due(pool: &PgPool, queue: &str) -> sqlx::Result<Option<f64>> {
    sqlx::query_scalar(JOB_NEXT_DUE_SQL).bind(queue).fetch_one(pool).await
}

/// What a cancel or retry request found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobChange {
    /// No job has this id.
    NotFound,
    /// The job was changed; it was in this state before.
    Changed {
        /// The state before the change.
        was: String,
    },
    /// The job was left alone: in this state the request does nothing
    /// (cancelling a cancelled job).
    Unchanged {
        /// Its state.
        state: String,
    },
    /// The job's state does not allow the request; nothing was written.
    Refused {
        /// Its state.
        state: String,
    },
}

/// Cancels job `id`: an available (or scheduled) job becomes `cancelled` and
/// never runs; a running job becomes `cancelled` at once (so its node's late
/// outcome is fenced off by `state = 'running'`) and `shardq_cancel` is
/// notified with its id so the node signals the handler. `reason` is
/// appended to the job's errors. A cancelled job is left alone; a completed
/// or discarded one is refused. The row is locked first, so a cancel that
/// races a claim waits for it and then sees the job running.
pub async fn job_cancel(pool: &PgPool, id: i64, reason: &str) -> sqlx::Result<JobChange> {
    let mut tx = pool.begin().await?;
    let state: Option<String> = sqlx::query_scalar("SELECT state FROM shardq.jobs WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(state) = state else {
        return Ok(JobChange::NotFound);
    };
    match state.as_str() {
        "available" | "running" => {}
        "cancelled" => return Ok(JobChange::Unchanged { state }),
        _ => return Ok(JobChange::Refused { state }),
    }
    sqlx::query(
        "UPDATE shardq.jobs
            SET state = 'cancelled', finalized_at = now(), locked_by = NULL, lease_expires_at = NULL,
                unique_key = CASE WHEN 'cancelled' = ANY(unique_states) THEN unique_key END,
                errors = errors || jsonb_build_array(jsonb_build_object(
                    'attempt', attempt, 'at', now(), 'error', $2::text))
          WHERE id = $1",
    )
    .bind(id)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    if state == "running" {
        sqlx::query("SELECT pg_notify($1, $2::bigint::text)")
            .bind(CANCEL_CHANNEL)
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(JobChange::Changed { was: state })
}

/// Retries job `id` by hand: a discarded or cancelled job becomes available
/// now, keeping its errors, with at least one attempt left
/// (`max_attempts = greatest(max_attempts, attempt + 1)`); its queue is
/// notified. Any other state is refused. Locks the row first, like
/// [`job_cancel`].
pub async fn job_retry(pool: &PgPool, id: i64) -> sqlx::Result<JobChange> {
    let mut tx = pool.begin().await?;
    let state: Option<String> = sqlx::query_scalar("SELECT state FROM shardq.jobs WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(state) = state else {
        return Ok(JobChange::NotFound);
    };
    if !matches!(state.as_str(), "discarded" | "cancelled") {
        return Ok(JobChange::Refused { state });
    }
    sqlx::query(
        "WITH retried AS (
             UPDATE shardq.jobs
                SET state = 'available', run_at = now(), finalized_at = NULL,
                    max_attempts = greatest(max_attempts, attempt + 1)
              WHERE id = $1
             RETURNING queue)
         SELECT pg_notify('shardq_jobs', queue) FROM retried",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(JobChange::Changed { was: state })
}

/// Of `ids` (jobs this node runs), those that are now `cancelled`: the
/// fallback for a `shardq_cancel` notification lost across a reconnect.
pub async fn job_cancelled_among(pool: &PgPool, ids: &[i64]) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar("SELECT id FROM shardq.jobs WHERE id = ANY($1) AND state = 'cancelled'")
        .bind(ids)
        .fetch_all(pool)
        .await
}

/// A final state whose jobs are pruned after a retention period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// `completed` jobs.
    Completed,
    /// `cancelled` jobs.
    Cancelled,
    /// `discarded` jobs.
    Discarded,
}

impl Finished {
    /// Every final state.
    pub const ALL: [Finished; 3] = [Finished::Completed, Finished::Cancelled, Finished::Discarded];

    /// The state's name in the jobs table.
    pub fn as_str(self) -> &'static str {
        match self {
            Finished::Completed => "completed",
            Finished::Cancelled => "cancelled",
            Finished::Discarded => "discarded",
        }
    }

    /// The prune statement for this state (`$1` age in seconds, `$2` batch
    /// size). The state is a literal, not a parameter, so even a generic plan
    /// can prove it implies `jobs_finalized_idx`'s predicate and walk that
    /// index from the oldest `finalized_at`. Rows another transaction holds
    /// (a concurrent retry) are skipped, and each batch is its own short
    /// statement. Public so tests can check its generic plan.
    pub fn prune_sql(self) -> &'static str {
        match self {
            Finished::Completed => JOB_PRUNE_COMPLETED_SQL,
            Finished::Cancelled => JOB_PRUNE_CANCELLED_SQL,
            Finished::Discarded => JOB_PRUNE_DISCARDED_SQL,
        }
    }
}

macro_rules! prune_sql {
    ($state:literal) => {
        concat!(
            "DELETE FROM shardq.jobs
              WHERE state = '",
            $state,
            "' AND id = ANY(ARRAY(
                    SELECT id FROM shardq.jobs
                     WHERE state = '",
            $state,
            "' AND finalized_at < now() - make_interval(secs => $1)
                     ORDER BY finalized_at
                     LIMIT $2
                     FOR UPDATE SKIP LOCKED))"
        )
    };
}

const JOB_PRUNE_COMPLETED_SQL: &str = prune_sql!("completed");
const JOB_PRUNE_CANCELLED_SQL: &str = prune_sql!("cancelled");
const JOB_PRUNE_DISCARDED_SQL: &str = prune_sql!("discarded");

/// Deletes up to `limit` jobs in state `state` finalized more than
/// `older_than_secs` ago, oldest first. Returns the rows deleted.
pub async fn job_prune_finished(pool: &PgPool, state: Finished, older_than_secs: f64, limit: i64) -> sqlx::Result<u64> {
    sqlx::query(state.prune_sql())
        .bind(older_than_secs)
        .bind(limit)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
}

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

/// Running jobs per queue on a shard (through `jobs_lease_idx`, whose
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
pub async fn queue_depth(pool: &PgPool, queue: &str, cap: i64) -> sqlx::Result<QueueDepth> {
    sqlx::query_as(QUEUE_DEPTH_SQL)
        .bind(queue)
        .bind(cap)
        .fetch_one(pool)
        .await
}

/// The queues with available jobs on a shard, in name order.
pub async fn queue_names_waiting(pool: &PgPool) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(QUEUE_NAMES_SQL).fetch_all(pool).await
}

/// Running jobs per queue on a shard.
pub async fn queue_running(pool: &PgPool) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as(QUEUE_RUNNING_SQL).fetch_all(pool).await
}

/// Jobs finished per queue and final state: (queue, state, last minute, last hour).
pub async fn queue_finished_recent(pool: &PgPool) -> sqlx::Result<Vec<(String, String, i64, i64)>> {
    sqlx::query_as(QUEUE_FINISHED_RECENT_SQL).fetch_all(pool).await
}

/// The highest applied platform migration of a database, `None` when none
/// is (or the history table does not exist yet).
pub async fn schema_version(pool: &PgPool) -> sqlx::Result<Option<i32>> {
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
pub async fn listener_count(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'",
    )
    .fetch_one(pool)
    .await
}

// ---- unique jobs, serial keys, periodic jobs

/// The keyed insert: `$1`..`$7` as in the plain insert, `$8` the unique key
/// text (hashed here to hex SHA-256, so any length fits the index; NULL: not
/// unique), `$9` the unique states, `$10` the serial key. Inserts nothing
/// when a job holds the same unique key.
const JOB_INSERT_KEYED: &str = "INSERT INTO shardq.jobs
            (account, queue, kind, args, priority, max_attempts, run_at, unique_key, unique_states, serial_key)
     VALUES ($1, $2, $3, $4::jsonb, $5, $6, COALESCE($7, now()),
             CASE WHEN $8::text IS NOT NULL THEN encode(sha256(convert_to($8::text, 'UTF8')), 'hex') END,
             $9::text[], $10)
     ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
     RETURNING id";

/// A job's unique key and serial key as stored, from the client's inputs.
pub struct JobKeys<'a> {
    /// The unique key's text (see `unique::key_text`); `None`: not unique.
    pub unique_text: Option<&'a str>,
    /// The unique states; `None` when not unique.
    pub unique_states: Option<&'a [&'a str]>,
    /// The stored serial key (account and ordering key); `None`: none.
    pub serial_key: Option<&'a str>,
}

/// Inserts one unique and/or serial job; `None` when a job with the same
/// unique key exists (nothing inserted).
pub async fn job_insert_keyed(
    conn: &mut PgConnection,
    account: &str,
    job: &NewJob,
    args: &str,
    keys: &JobKeys<'_>,
) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar(JOB_INSERT_KEYED)
        .bind(account)
        .bind(&job.queue)
        .bind(&job.kind)
        .bind(args)
        .bind(job.priority)
        .bind(job.max_attempts)
        .bind(job.run_at)
        .bind(keys.unique_text)
        .bind(keys.unique_states)
        .bind(keys.serial_key)
        .fetch_optional(conn)
        .await
}

/// The job holding the unique key whose text is `unique_text`, if any
/// (through `jobs_unique_idx`).
pub async fn job_find_unique(conn: &mut PgConnection, unique_text: &str) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar(
        "SELECT id FROM shardq.jobs
          WHERE unique_key = encode(sha256(convert_to($1::text, 'UTF8')), 'hex') AND unique_key IS NOT NULL",
    )
    .bind(unique_text)
    .fetch_optional(conn)
    .await
}

/// Records occurrences of periodic job `name` as handled; returns those
/// this call recorded (the others were recorded before, by any node), in
/// time order. Waits for a concurrent recorder of the same occurrence to
/// commit or roll back, so each occurrence is recorded once.
pub async fn periodic_runs_record(
    conn: &mut PgConnection,
    name: &str,
    occurrences: &[DateTime<Utc>],
) -> sqlx::Result<Vec<DateTime<Utc>>> {
    let mut recorded: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "INSERT INTO shardq.periodic_runs (name, occurrence)
         SELECT $1, o FROM unnest($2::timestamptz[]) AS o
         ON CONFLICT (name, occurrence) DO NOTHING
         RETURNING occurrence",
    )
    .bind(name)
    .bind(occurrences)
    .fetch_all(conn)
    .await?;
    recorded.sort_unstable();
    Ok(recorded)
}

/// Sets the job enqueued for an occurrence recorded by [`periodic_runs_record`].
pub async fn periodic_run_set_job(
    conn: &mut PgConnection,
    name: &str,
    occurrence: DateTime<Utc>,
    job_id: i64,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE shardq.periodic_runs SET job_id = $3 WHERE name = $1 AND occurrence = $2")
        .bind(name)
        .bind(occurrence)
        .bind(job_id)
        .execute(conn)
        .await
        .map(|_| ())
}

/// Forgets occurrences of `name` before `before` (older than any catch-up
/// window, so never looked at again).
pub async fn periodic_runs_prune(pool: &PgPool, name: &str, before: DateTime<Utc>) -> sqlx::Result<u64> {
    sqlx::query("DELETE FROM shardq.periodic_runs WHERE name = $1 AND occurrence < $2")
        .bind(name)
        .bind(before)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
}
