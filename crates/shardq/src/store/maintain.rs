//! Upkeep of a shard's jobs table: rescue of expired leases and pruning of
//! finished jobs past their retention. Called by the runtime's rescuer and
//! retention stages.

use shardq_router::router::Database;

use crate::job::JobState;

/// The rescue statement: `$1` limit. Public so tests can check its generic plan.
pub const JOB_RESCUE_EXPIRED_SQL: &str = concat!(
    "WITH changed AS (
         UPDATE shardq.jobs j
            SET state = CASE WHEN j.attempt >= j.max_attempts THEN 'discarded' ELSE 'available' END,
                finalized_at = CASE WHEN j.attempt >= j.max_attempts THEN now() END,
                unique_key = CASE WHEN j.attempt < j.max_attempts OR 'discarded' = ANY(j.unique_states)
                                  THEN j.unique_key END,
                run_at = now(),
                errors = j.errors || jsonb_build_array(jsonb_build_object(
                    'attempt', j.attempt, 'at', now(),
                    'error', 'lease expired: node ' || coalesce(j.locked_by, '?') || ' stopped renewing it (crashed or cut off); rescued')),
                locked_by = NULL, lease_expires_at = NULL, serial_held = false
          WHERE j.id = ANY(ARRAY(
              SELECT id FROM shardq.jobs
               WHERE state = 'running' AND lease_expires_at < now()
               ORDER BY lease_expires_at
               LIMIT $1
               FOR UPDATE SKIP LOCKED))
         RETURNING j.queue, j.state
     )",
    written_and_notified!()
);

/// Makes running jobs whose lease expired available again (or discards them
/// when they had no attempts left), recording the lost attempt as an error;
/// the queues of the jobs made available are notified.
pub async fn job_rescue_expired(pool: &Database, limit: i64) -> sqlx::Result<u64> {
    sqlx::query_as(JOB_RESCUE_EXPIRED_SQL)
        .bind(limit)
        .fetch_one(pool)
        .await
        .map(|(written, _notified): (i64, i64)| written as u64)
}

/// Releases serial keys still held by runs that ended without their node
/// saying so (a cancelled job's node died, or its handler ran on past its
/// lease): `$1` limit. Their queues are notified.
pub async fn job_serial_release_expired(pool: &Database, limit: i64) -> sqlx::Result<u64> {
    sqlx::query_as(concat!(
        "WITH changed AS (
         UPDATE shardq.jobs j SET serial_held = false, lease_expires_at = NULL
          WHERE j.id = ANY(ARRAY(
              SELECT id FROM shardq.jobs
               WHERE serial_held AND state <> 'running' AND lease_expires_at < now()
               LIMIT $1
               FOR UPDATE SKIP LOCKED))
         RETURNING j.queue, 'available'::text AS state
         )",
        written_and_notified!()
    ))
    .bind(limit)
    .fetch_one(pool)
    .await
    .map(|(written, _notified): (i64, i64)| written as u64)
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

    /// The job state it stands for.
    pub fn state(self) -> JobState {
        match self {
            Finished::Completed => JobState::Completed,
            Finished::Cancelled => JobState::Cancelled,
            Finished::Discarded => JobState::Discarded,
        }
    }

    /// The state's name in the jobs table.
    pub fn as_str(self) -> &'static str {
        self.state().as_str()
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
pub async fn job_prune_finished(
    pool: &Database,
    state: Finished,
    older_than_secs: f64,
    limit: i64,
) -> sqlx::Result<u64> {
    sqlx::query(state.prune_sql())
        .bind(older_than_secs)
        .bind(limit)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
}
