//! The job crate's SQL layer: every statement, as noun-first functions
//! grouped by caller. Private to the crate; tests reach it with the
//! `testing` feature to check plans.
//!
//! - `insert`: one job, a batch, unique and serial jobs (client, scheduler).
//! - `run`: claim, complete/finish, renew, hand back, next due time, cancel
//!   sweep (the node's hot loop).
//! - `maintain`: rescue of expired leases, pruning of finished jobs.
//! - `admin`: get, list, counts, cancel and retry by hand (client, status).
//! - `observe`: depths, running and finished counts, schema version (sampler,
//!   health, status).
//! - `periodic`: records of periodic occurrences.
//! - `fleet`: the node registry in the master (runtime's fleet, status).
//! - `moves`: move records in the master; fence, copy and clean-up on shards.
//! - `rebalance`: jobs and bytes per account, the loads of a rebalance plan.
//! - `limits`: per-account concurrency limits: their rows, and the claim of
//!   limited accounts' jobs, each holding a slot.
//!
//! Fencing: a run is identified by its [`RunKey`](run::RunKey): `(id,
//! attempt, attempted_at)`, the last being the claim's token (the shard's
//! `now()` at the claim), which no later claim of the job repeats, also
//! after a claim that did not wait for its flush was lost in a crash and
//! gave its attempt number back. Every statement that ends, extends or
//! releases a run matches all three plus the state it expects, so a late
//! write from a node whose lease was rescued, or whose claim was lost,
//! changes nothing.
//!
//! States: the `state` column is text; [`JobState`](crate::job::JobState)
//! is mapped to and from it here and nowhere else.

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

/// `$name`: the distinct priorities with available jobs in queue `$1`, by
/// a recursive skip scan (one index seek each), from the last priority
/// down. Each seek lands on the newest entry of its priority, never on the
/// oldest: a drained queue keeps the entries of the jobs it claimed at the
/// old end of each priority's range until vacuum removes them, and a seek
/// to the first entry steps over every one (305 index pages at 50,000
/// claimed jobs, against 5 backwards). Shared by the claims
/// (`priorities`, `lim_priorities`), which order what they read anyway.
macro_rules! priorities_cte {
    ($name:literal) => {
        concat!(
            $name,
            " AS (
              (SELECT priority FROM shardq.jobs
                WHERE state = 'available' AND queue = $1
                ORDER BY priority DESC LIMIT 1)
              UNION ALL
              SELECT n.priority
                FROM ",
            $name,
            " p
                CROSS JOIN LATERAL (
                    SELECT priority FROM shardq.jobs
                     WHERE state = 'available' AND queue = $1 AND priority < p.priority
                     ORDER BY priority DESC LIMIT 1) AS n
          )"
        )
    };
}

/// The tail of a statement whose CTE `changed` is an `UPDATE .. RETURNING
/// queue, state` of jobs: counts the rows written and sends one
/// `NOTIFY shardq_jobs, '<queue>'` per queue that got an available job, so
/// producers on every node wake for retries, hand-backs and rescues as they
/// do for inserts.
macro_rules! written_and_notified {
    () => {
        " SELECT (SELECT count(*) FROM changed) AS written,
                 (SELECT count(pg_notify('shardq_jobs', q.queue))
                    FROM (SELECT DISTINCT queue FROM changed WHERE state = 'available') AS q) AS notified"
    };
}

/// The claims' predicate for per-account limits (shard V21): the job's
/// account (the SQL expression given, e.g. `"jobs.account"`) has no limit
/// in the claimed queue `$1`. Jobs of limited accounts are claimed by
/// their own path ([`limits`]), in the same statement. While no account
/// has a limit in the queue (nearly always), one seek in the primary key
/// of `shardq.account_limits` per claim decides it for every row (an
/// initplan, as for fences: `OR` evaluates its left side first); otherwise
/// one probe of that primary key per candidate. Reading the queue's
/// limited accounts once per statement (`<> ALL (ARRAY(..))`) changes the
/// planner's estimates so that the fences probe becomes a hashed
/// sequential scan, which the plan tests refuse.
macro_rules! no_account_limit {
    ($account:literal) => {
        concat!(
            " AND ((SELECT min(al0.account) FROM shardq.account_limits al0 WHERE al0.queue = $1) IS NULL
                OR NOT EXISTS (SELECT 1 FROM shardq.account_limits al WHERE al.queue = $1 AND al.account = ",
            $account,
            "))"
        )
    };
}

/// Condition on a candidate row of `shardq.jobs` (aliased `jobs`): its
/// serial key, if any, is free: no earlier job of the key (lower id) is
/// `available` or `running` (one seek in `jobs_serial_idx`) and no run
/// still holds it (one seek in `jobs_serial_held_idx`). Jobs without a key
/// skip both probes, as `OR` evaluates its left side first.
macro_rules! claim_serial_free {
    () => {
        "(serial_key IS NULL OR (
              NOT EXISTS (
                  SELECT 1 FROM shardq.jobs b
                   WHERE b.serial_key = jobs.serial_key AND b.id < jobs.id
                     AND b.state IN ('available', 'running'))
              AND NOT EXISTS (
                  SELECT 1 FROM shardq.jobs h
                   WHERE h.serial_key = jobs.serial_key AND h.serial_held)))"
    };
}

/// The claims' predicate for resources (shard V22): the job (a row of
/// `shardq.jobs` named `jobs` in the statement) uses no named resource. Jobs
/// that use resources are claimed by their own statement
/// ([`limits::JOB_FETCH_RESOURCED_SQL`]) while the node holds permits; for
/// the others this is one test of a column of the row read anyway.
macro_rules! no_resources {
    () => {
        " AND jobs.resources IS NULL"
    };
}

mod admin;
mod fleet;
mod insert;
mod limits;
mod maintain;
mod moves;
mod observe;
mod periodic;
mod rebalance;
mod run;

pub use admin::*;
pub use fleet::*;
pub use insert::*;
pub use limits::*;
pub use maintain::*;
pub use moves::*;
pub use observe::*;
pub use periodic::*;
pub use rebalance::*;
pub use run::*;

use crate::job::JobState;

/// A state read from the `state` column; a name the crate does not know is a
/// decode error naming it (the table's CHECK constraint makes it unreachable).
pub(crate) fn state_from_db(name: &str) -> sqlx::Result<JobState> {
    JobState::parse(name)
        .ok_or_else(|| sqlx::Error::Decode(format!("unknown job state {name:?} in shardq.jobs").into()))
}

/// Whether a failed statement may succeed if tried again unchanged: lost or
/// refused connections, pool timeouts, serialization failures and
/// deadlocks, resource exhaustion, cancels and shutdowns (SQLSTATE classes
/// 08, 40, 53, 57, 58). Anything else (e.g. `22021`, a NUL byte in text)
/// fails again the same way.
pub(crate) fn error_is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => {
            let code = db.code();
            let class = code.as_deref().map(|c| c.get(..2).unwrap_or(c)).unwrap_or("");
            matches!(class, "08" | "40" | "53" | "57" | "58")
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        _ => false,
    }
}
