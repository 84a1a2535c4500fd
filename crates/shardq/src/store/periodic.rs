//! Records of periodic occurrences (`shardq.periodic_runs` on the target
//! shard), written in the same transaction as the occurrence's job so each
//! occurrence is enqueued once across nodes. Called by `periodic`.

use chrono::{DateTime, Utc};
use shardq_router::router::Database;
use shardq_router::Conn;

/// Records occurrences of periodic job `name` as handled; returns those
/// this call recorded (the others were recorded before, by any node), in
/// time order. Waits for a concurrent recorder of the same occurrence to
/// commit or roll back, so each occurrence is recorded once.
pub async fn periodic_runs_record(
    conn: &mut Conn<'_>,
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
    conn: &mut Conn<'_>,
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
pub async fn periodic_runs_prune(pool: &Database, name: &str, before: DateTime<Utc>) -> sqlx::Result<u64> {
    sqlx::query("DELETE FROM shardq.periodic_runs WHERE name = $1 AND occurrence < $2")
        .bind(name)
        .bind(before)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
}
