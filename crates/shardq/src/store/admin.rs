//! Reading jobs and changing them by hand: get one, list an account's,
//! cancel, retry; pausing and resuming a queue on a shard. Called by the
//! client.

use chrono::{DateTime, Utc};
use shardq_router::router::Database;

use crate::job::{JobId, JobRecord, JobState};

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
    fn into_record(self, shard: &str) -> sqlx::Result<JobRecord> {
        Ok(JobRecord {
            id: JobId {
                shard: shard.to_string(),
                id: self.id,
            },
            account: self.account,
            queue: self.queue,
            kind: self.kind,
            args: self.args.0,
            state: super::state_from_db(&self.state)?,
            priority: self.priority,
            attempt: self.attempt,
            max_attempts: self.max_attempts,
            run_at: self.run_at,
            created_at: self.created_at,
            attempted_at: self.attempted_at,
            finalized_at: self.finalized_at,
            locked_by: self.locked_by,
            errors: self.errors.0,
        })
    }
}

/// One job by id.
pub async fn job_get(pool: &Database, shard: &str, id: i64) -> sqlx::Result<Option<JobRecord>> {
    let row: Option<JobRow> = sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM shardq.jobs WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?;
    row.map(|r| r.into_record(shard)).transpose()
}

/// An account's jobs on a shard, newest first, optionally of one state.
pub async fn job_list_for_account(
    pool: &Database,
    shard: &str,
    account: &str,
    state: Option<JobState>,
    limit: i64,
) -> sqlx::Result<Vec<JobRecord>> {
    let rows: Vec<JobRow> = sqlx::query_as(&format!(
        "SELECT {JOB_COLUMNS} FROM shardq.account_jobs AS owned(owner, job_id)
           JOIN shardq.jobs ON id = job_id
          WHERE owner = $1 AND ($2::text IS NULL OR state = $2)
          ORDER BY job_id DESC LIMIT $3"
    ))
    .bind(account)
    .bind(state.map(JobState::as_str))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter().map(|r| r.into_record(shard)).collect()
}

/// The notification channel that tells a shard's worker nodes a running job
/// was cancelled; the payload is the job's row id.
pub const CANCEL_CHANNEL: &str = "shardq_cancel";

/// What a cancel request found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobChange {
    /// No job has this id.
    NotFound,
    /// The job was changed; it was in this state before.
    Changed {
        /// The state before the change.
        was: JobState,
    },
    /// The job was left alone: in this state the request does nothing
    /// (cancelling a cancelled job).
    Unchanged {
        /// Its state.
        state: JobState,
    },
    /// The job's state does not allow the request; nothing was written.
    Refused {
        /// Its state.
        state: JobState,
    },
}

/// Cancels job `id`: an available (or scheduled) job becomes `cancelled` and
/// never runs; a running job becomes `cancelled` at once (so its node's late
/// outcome is fenced off by `state = 'running'`) and `shardq_cancel` is
/// notified with its id so the node signals the handler. `reason` is
/// appended to the job's errors. A cancelled job is left alone; a completed
/// or discarded one is refused. The row is locked first, so a cancel that
/// races a claim waits for it and then sees the job running.
pub async fn job_cancel(pool: &Database, id: i64, reason: &str) -> sqlx::Result<JobChange> {
    let mut tx = pool.begin().await?;
    let state: Option<String> = sqlx::query_scalar("SELECT state FROM shardq.jobs WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(&mut tx)
        .await?;
    let Some(state) = state else {
        return Ok(JobChange::NotFound);
    };
    let state = super::state_from_db(&state)?;
    match state {
        JobState::Available | JobState::Running => {}
        JobState::Cancelled => return Ok(JobChange::Unchanged { state }),
        JobState::Completed | JobState::Discarded => return Ok(JobChange::Refused { state }),
    }
    sqlx::query(
        "UPDATE shardq.jobs
            SET state = 'cancelled', finalized_at = now(),
                -- A run that holds its serial key keeps its node and lease
                -- (renewed by that node) until the node reports it ended.
                locked_by = CASE WHEN serial_held THEN locked_by END,
                lease_expires_at = CASE WHEN serial_held THEN lease_expires_at END,
                unique_key = CASE WHEN 'cancelled' = ANY(unique_states) THEN unique_key END,
                errors = errors || jsonb_build_array(jsonb_build_object(
                    'attempt', attempt, 'at', now(), 'error', $2::text))
          WHERE id = $1",
    )
    .bind(id)
    .bind(reason)
    .execute(&mut tx)
    .await?;
    if state == JobState::Running {
        sqlx::query("SELECT pg_notify($1, $2::bigint::text)")
            .bind(CANCEL_CHANNEL)
            .bind(id)
            .execute(&mut tx)
            .await?;
    }
    tx.commit().await?;
    Ok(JobChange::Changed { was: state })
}

/// What a manual retry found and did.
#[derive(Debug, Clone)]
pub enum RetryChange {
    /// No job has this id.
    NotFound,
    /// The job was made available; it was in this state before.
    Retried {
        /// The state before the retry (`discarded` or `cancelled`).
        was: JobState,
        /// The job as the retry left it (before any node claimed it).
        job: Box<JobRecord>,
    },
    /// The job's state does not allow a retry; nothing was written.
    Refused {
        /// Its state.
        state: JobState,
    },
    /// The job is unique and another job holds its key now, so restoring
    /// the key would duplicate that job (`jobs_unique_idx` refused it);
    /// nothing was written.
    KeyHeld {
        /// The retried job's state (unchanged).
        state: JobState,
        /// The row id of the job holding the key; `None` when on every try
        /// the holder finished (and so released the key) before it could
        /// be read.
        holder: Option<i64>,
    },
}

/// How many times a retry whose key was held, by a job that then finished
/// before it could be read, is tried again.
const RETRY_TRIES: usize = 5;

/// The retry statement: `$1` id. Makes the job available now with at least
/// one attempt left, and puts back the unique key it kept in `unique_hash`
/// (when `available` is one of its unique states, as it is in every set);
/// `jobs_unique_idx` raises a unique violation when another job holds that
/// key, so the index decides even against a concurrent enqueue or retry.
const JOB_RETRY_SQL: &str = "WITH retried AS (
         UPDATE shardq.jobs
            SET state = 'available', run_at = now(), finalized_at = NULL,
                max_attempts = greatest(max_attempts, attempt + 1),
                unique_key = CASE WHEN 'available' = ANY(unique_states)
                                  THEN coalesce(unique_key, unique_hash) END
          WHERE id = $1
         RETURNING *),
     notified AS (SELECT count(pg_notify('shardq_jobs', queue)) AS n FROM retried)
     SELECT retried.* FROM retried, notified";

/// Whether `e` is `jobs_unique_idx` refusing a key (SQLSTATE 23505).
fn is_unique_key_taken(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            db.code().as_deref() == Some("23505") && db.constraint() == Some("jobs_unique_idx")
        }
        _ => false,
    }
}

/// One try of [`job_retry`]: the change, or `Err((state, hash))` when the
/// key `hash` could not be restored because another job held it (the
/// transaction was rolled back).
async fn job_retry_once(
    pool: &Database,
    shard: &str,
    id: i64,
) -> sqlx::Result<Result<RetryChange, (JobState, String)>> {
    let mut tx = pool.begin().await?;
    let row: Option<(String, Option<String>)> =
        sqlx::query_as("SELECT state, unique_hash FROM shardq.jobs WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut tx)
            .await?;
    let Some((state, hash)) = row else {
        return Ok(Ok(RetryChange::NotFound));
    };
    let state = super::state_from_db(&state)?;
    if !matches!(state, JobState::Discarded | JobState::Cancelled) {
        return Ok(Ok(RetryChange::Refused { state }));
    }
    let retried: sqlx::Result<JobRow> = sqlx::query_as(JOB_RETRY_SQL).bind(id).fetch_one(&mut tx).await;
    match (retried, hash) {
        (Ok(row), _) => {
            tx.commit().await?;
            Ok(Ok(RetryChange::Retried {
                was: state,
                job: Box::new(row.into_record(shard)?),
            }))
        }
        (Err(e), Some(hash)) if is_unique_key_taken(&e) => {
            tx.rollback().await?;
            Ok(Err((state, hash)))
        }
        (Err(e), _) => Err(e),
    }
}

/// Retries job `id` by hand: a discarded or cancelled job becomes available
/// now, keeping its errors, with at least one attempt left
/// (`max_attempts = greatest(max_attempts, attempt + 1)`); its queue is
/// notified. Any other state is refused. Locks the row first, like
/// [`job_cancel`].
///
/// A unique job gets its key back (completion, discard and cancellation
/// clear `unique_key`; `unique_hash` keeps it), so it is deduplicated
/// against again while available. When another job holds the key by then,
/// the retry is refused ([`RetryChange::KeyHeld`], with the holder's id) and
/// nothing is written: the retried job would otherwise duplicate it.
pub async fn job_retry(pool: &Database, shard: &str, id: i64) -> sqlx::Result<RetryChange> {
    let mut tries = 0;
    loop {
        let (state, hash) = match job_retry_once(pool, shard, id).await? {
            Ok(change) => return Ok(change),
            Err(taken) => taken,
        };
        tries += 1;
        let holder: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM shardq.jobs WHERE unique_key = $1 AND unique_key IS NOT NULL AND id <> $2",
        )
        .bind(&hash)
        .bind(id)
        .fetch_optional(pool)
        .await?;
        // No holder: it finished (released the key) since; try again.
        if holder.is_some() || tries >= RETRY_TRIES {
            return Ok(RetryChange::KeyHeld { state, holder });
        }
    }
}

/// A queue paused on a shard (`shardq.queue_pauses`).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct QueuePause {
    /// The queue.
    pub queue: String,
    /// When it was paused.
    pub paused_at: DateTime<Utc>,
    /// Who paused it, as the caller said.
    pub paused_by: String,
}

/// Pauses `queue` on this shard: no node claims its jobs here until it is
/// resumed. Returns false when it was paused already (the first pause's
/// time and author are kept).
pub async fn queue_pause(pool: &Database, queue: &str, by: &str) -> sqlx::Result<bool> {
    let written = sqlx::query(
        "INSERT INTO shardq.queue_pauses (queue, paused_by) VALUES ($1, $2) ON CONFLICT (queue) DO NOTHING",
    )
    .bind(queue)
    .bind(by)
    .execute(pool)
    .await?;
    Ok(written.rows_affected() == 1)
}

/// Resumes `queue` on this shard and wakes its producers (`NOTIFY
/// shardq_jobs, '<queue>'`). Returns false when it was not paused.
pub async fn queue_resume(pool: &Database, queue: &str) -> sqlx::Result<bool> {
    let resumed: bool = sqlx::query_scalar(
        "WITH gone AS (DELETE FROM shardq.queue_pauses WHERE queue = $1 RETURNING queue),
              woken AS (SELECT count(pg_notify('shardq_jobs', queue)) AS n FROM gone)
         SELECT EXISTS (SELECT 1 FROM gone) FROM woken",
    )
    .bind(queue)
    .fetch_one(pool)
    .await?;
    Ok(resumed)
}

/// The queues paused on this shard, by name.
pub async fn queue_pauses(pool: &Database) -> sqlx::Result<Vec<QueuePause>> {
    sqlx::query_as("SELECT queue, paused_at, paused_by FROM shardq.queue_pauses ORDER BY queue")
        .fetch_all(pool)
        .await
}

/// Sets the fair-share weight of `account` on this shard (`None`: back to
/// the default, 1). Refused (returns false, nothing written) while the
/// account has a fence here: it is moving or has moved away, and a move
/// carries the weight it had when it started.
pub async fn account_weight_set(pool: &Database, account: &str, weight: Option<i32>) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "WITH open AS (SELECT NOT EXISTS (SELECT 1 FROM shardq.fences WHERE account = $1) AS ok),
              gone AS (DELETE FROM shardq.account_weights
                        WHERE account = $1 AND $2::int IS NULL AND (SELECT ok FROM open)),
              put AS (INSERT INTO shardq.account_weights (account, weight)
                      SELECT $1, $2 WHERE $2::int IS NOT NULL AND (SELECT ok FROM open)
                      ON CONFLICT (account) DO UPDATE SET weight = EXCLUDED.weight, set_at = now())
         SELECT ok FROM open",
    )
    .bind(account)
    .bind(weight)
    .fetch_one(pool)
    .await
}

/// The fair-share weight of `account` on this shard, if one was set.
pub async fn account_weight_of(pool: &Database, account: &str) -> sqlx::Result<Option<i32>> {
    sqlx::query_scalar("SELECT weight FROM shardq.account_weights WHERE account = $1")
        .bind(account)
        .fetch_optional(pool)
        .await
}
