//! The statements of a node's hot loop on one shard: claim due jobs, write
//! outcomes, renew and hand back leases, find the next due time, and see
//! which running jobs were cancelled. Called by the runtime's producer,
//! completer, heartbeat and cancel stages. Every write that ends or extends
//! a run is fenced by its [`RunKey`], as the module `store` describes.
//!
//! Claims that hold nothing across nodes commit without waiting for their
//! WAL flush ([`CLAIM_COMMIT_TAIL`]); claims of keyed jobs (a serial key, an
//! account's limit slot) and of jobs that use resources stay durable.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use shardq_router::router::Database;

use super::limits;

use crate::job::JobState;

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
    /// The claim's token: `attempted_at` as this claim set it (the shard's
    /// `now()` in the claim's transaction). With `id` and `attempt` it
    /// fences the run ([`RunKey`]).
    pub attempted_at: DateTime<Utc>,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// When the job became due.
    pub run_at: DateTime<Utc>,
    /// Whether its run holds something until it ends on the node (a serial
    /// key, or a limit slot of its account), released after its outcome.
    pub keyed: bool,
    /// The named resources it uses (claimed by the resourced claim only;
    /// `None` for every other job).
    #[sqlx(default)]
    pub resources: Option<Vec<String>>,
}

impl FetchedJob {
    /// The key that fences this run's writes.
    pub fn key(&self) -> RunKey {
        RunKey {
            id: self.id,
            attempt: self.attempt,
            attempted_at: self.attempted_at,
        }
    }
}

/// What fences a run: every statement that ends, extends or releases a run
/// matches all three (plus the state it expects).
///
/// `(id, attempt)` alone does not name one run: a claim that committed
/// without waiting for its WAL flush and was lost in a server crash gives
/// its attempt number back, so the node that ran it and a node that claims
/// the job again after the restart would both hold `(id, N)`, and the first
/// could complete, renew or release the second's run. `attempted_at` is set
/// to the shard's `now()` by every claim and by nothing else, so a claim
/// after the restart never repeats the token of a claim lost before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunKey {
    /// Row id on its shard.
    pub id: i64,
    /// The attempt the claim started.
    pub attempt: i32,
    /// The claim's token ([`FetchedJob::attempted_at`]).
    pub attempted_at: DateTime<Utc>,
}

/// The three arrays a fenced statement takes for `runs`: ids, attempts, tokens.
fn run_arrays(runs: &[RunKey]) -> (Vec<i64>, Vec<i32>, Vec<DateTime<Utc>>) {
    let mut ids = Vec::with_capacity(runs.len());
    let mut attempts = Vec::with_capacity(runs.len());
    let mut tokens = Vec::with_capacity(runs.len());
    for r in runs {
        ids.push(r.id);
        attempts.push(r.attempt);
        tokens.push(r.attempted_at);
    }
    (ids, attempts, tokens)
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
    /// Priority aging in seconds: a job due longer than this is claimed
    /// ahead of any priority; `None`: strict priority order.
    pub aging_secs: Option<f64>,
    /// Fair share across accounts ([`JOB_FETCH_FAIR_SQL`]); false: strict
    /// priority then run order over the whole queue ([`JOB_FETCH_AVAILABLE_SQL`]).
    pub fair: bool,
    /// Fair claims only: the account the rotation resumes after (the one
    /// [`fair_rotation_after`] returned for this producer's last claim);
    /// `None`: from the first.
    pub after: Option<&'a str>,
    /// Whether the queue has accounts with a concurrency limit on the shard
    /// (as [`limits::account_limits_exist`] last read): only then does the
    /// claim carry the limited part, whose planning costs about a
    /// millisecond more per claim.
    pub limited: bool,
}

/// How one run ended, for the batched write.
#[derive(Debug, Clone)]
pub struct Finish {
    /// The run (fence).
    pub run: RunKey,
    /// New state: `Available` (retry or snooze), `Discarded` or `Cancelled`.
    pub state: JobState,
    /// For `available`: how long from now (the shard's clock) until it runs again.
    pub retry_in: Option<std::time::Duration>,
    /// Error text to append to the job's errors, with this attempt's number.
    pub error: Option<String>,
    /// Extra attempts granted (a snooze does not count as a failure).
    pub extra_attempts: i32,
}

/// Session settings of the engine's own connections. `jit = off`: the
/// planner prices the claim (a skip scan whose row estimates multiply) far
/// above `jit_above_cost` although it touches a few hundred buffers, and
/// JIT-compiling it costs tens of milliseconds per claim (measured: 85 ms
/// per claim of 64 with JIT, under 1 ms without). No statement of the hot
/// loop gains from JIT.
///
/// `enable_bitmapscan = off`: the partial indexes the hot loop reads
/// (`jobs_running_idx` for the fair claim's running count and the orphan
/// check, `jobs_fetch_idx`, `jobs_fair_idx`) keep an entry for every job
/// that left their state until vacuum removes it. A plain index scan marks
/// the entries of dead rows it meets (and steps over them on the next
/// scan; btree drops them when the page fills); a bitmap scan does
/// neither, so it visits the heap for every dead entry. Measured on the
/// fair claim beside a backlog: the running count read 90,084 entries
/// through a bitmap (3,436 buffers, 4.5 ms of a 6.5 ms claim) for 128
/// running rows.
///
/// `plan_cache_mode = force_generic_plan`: the statements of the hot loop
/// are written for their generic plans (the plan tests check those), and
/// the server's default plans a prepared statement afresh for its first
/// five runs and then whenever it prices the generic plan above the custom
/// ones. On a shard with a 5M-job backlog it did for every claim (788
/// plans in 788 claims, 3.4 ms of planning on top of 5.6 ms of execution
/// each), where a 100k backlog got the generic plan after a few.
pub const ENGINE_SESSION_SETTINGS: [(&str, &str); 3] = [
    ("jit", "off"),
    ("enable_bitmapscan", "off"),
    ("plan_cache_mode", "force_generic_plan"),
];

/// The claim's outer statement up to its candidates: `UPDATE .. WHERE
/// j.id = ANY(ARRAY(` (closed by `claim_close!`). The claimed rows become
/// `running` under node `$3` with a lease of `$4` seconds; a keyed job's
/// run holds its serial key. `id = ANY(ARRAY(..))` keeps the statement an
/// index scan on the primary key under a generic plan (a CTE joined on id
/// can become a hash join over a sequential scan).
macro_rules! claim_open {
    () => {
        "UPDATE shardq.jobs j
            SET state = 'running', attempt = j.attempt + 1, attempted_at = now(),
                locked_by = $3, lease_expires_at = now() + make_interval(secs => $4),
                serial_held = j.serial_key IS NOT NULL
          WHERE j.id = ANY(ARRAY("
    };
}

/// The end of a claim opened by `claim_open!`: the row every claim returns
/// ([`FetchedJob`], with the claim's token `attempted_at`).
macro_rules! claim_close {
    () => {
        "))
         RETURNING j.id, j.account, j.kind, j.args, j.attempt, j.attempted_at, j.max_attempts, j.run_at,
                   j.serial_key IS NOT NULL AS keyed"
    };
}

/// The end of every claim statement a producer runs, after a CTE `claimed`
/// that holds the claimed rows (their column `keyed` says whether a run
/// holds something across nodes until it ends): returns the rows, and
/// decides how the claim's transaction commits. Public so tests can check
/// the statements built with it.
///
/// A claim whose rows are all unkeyed commits with `synchronous_commit =
/// off` (for its own transaction only: `set_config(.., true)`), without
/// waiting for its WAL flush: its jobs start one flush sooner. Lost in a
/// server crash (the WAL writer had not written it yet), such a claim only
/// makes its jobs run again: after the restart they are `available` with the
/// attempt given back, the node that ran them holds runs whose token
/// ([`RunKey`]) no later claim repeats, so their outcomes, renewals and
/// releases change nothing, and at-least-once holds. A claim that returned
/// a keyed row (a serial key, or a limit slot of its account) keeps the
/// session's setting and waits for its flush: lost, it would free the key
/// or slot on the shard while its handler still runs on the node, and let
/// another job of the key (or beyond the limit) run beside it. The claim of
/// jobs that use resources ([`limits::JOB_FETCH_RESOURCED_SQL`]) is its own
/// statement and always durable. A later durable commit on the shard
/// flushes every earlier one, so a keyed claim never depends on an
/// unflushed one.
///
/// The decision is an uncorrelated subquery in the condition, so it is
/// evaluated once, after every row was claimed and before any is returned.
pub const CLAIM_COMMIT_TAIL: &str = " SELECT c.* FROM claimed c
  WHERE (SELECT CASE WHEN bool_or(k.keyed) THEN 'durable'
                     ELSE set_config('synchronous_commit', 'off', true) END
           FROM claimed k) IS NOT NULL";

/// Condition: queue `$1` is not paused on this shard (one primary-key probe
/// of `shardq.queue_pauses`).
macro_rules! claim_queue_open {
    () => {
        "NOT EXISTS (SELECT 1 FROM shardq.queue_pauses qp WHERE qp.queue = $1)"
    };
}

/// Condition: the account in column `$account` is not fenced off this shard
/// (it is not moving or moved away). While no account is fenced (nearly
/// always), one probe of the empty `shardq.fences` per claim (`min` of its
/// primary key: one index seek) decides it for every row (`OR` evaluates
/// its left side first); otherwise one seek per row (a count, which the
/// planner cannot turn into a hashed subplan over the whole table).
macro_rules! claim_account_unfenced {
    ($account:literal) => {
        concat!(
            "((SELECT min(account) FROM shardq.fences) IS NULL
              OR (SELECT count(*) FROM shardq.fences f WHERE f.account = ",
            $account,
            ") = 0)"
        )
    };
}

/// The weight of the account in column `$account` as float8: its row in
/// `shardq.account_weights`, 1 without one. While no account on the shard
/// has a weight set, one probe of the empty table per claim (one index
/// seek) decides it
/// (`CASE` evaluates lazily); otherwise one primary-key seek per account.
macro_rules! claim_account_weight {
    ($account:literal) => {
        concat!(
            "CASE WHEN (SELECT min(account) FROM shardq.account_weights) IS NULL THEN 1
                  ELSE COALESCE((SELECT w.weight FROM shardq.account_weights w
                                  WHERE w.account = ",
            $account,
            "), 1) END::float8"
        )
    };
}

/// `start`, `pairs` and `start_pair`, the fair claim's window: a
/// recursive skip scan over `jobs_fair_idx (queue, priority, account,
/// run_at, id)` that finds, one index seek each, the earliest job of at
/// most `max($2, 32)` (priority, account) pairs of queue `$1` (`priority`,
/// `account`, `run_at`): as many as the claim takes jobs, and never fewer
/// than 32, so that a small claim still sees every priority of the
/// accounts nearby. It starts after account `$6` (NULL: the first) at the
/// best priority in use (the first of `priorities`, `priorities_cte!`,
/// read once per claim) and wraps around at the end, back to that
/// priority's first account and up to account `$6`. `start_pair` is the
/// pair of `$6` itself at that priority, the window's last: its own CTE,
/// so that the fast check (`JOB_FETCH_FAIR_SQL`) never reads it when `$6`
/// is the head's only account. That account is most often a backlog just
/// claimed from, and the seek to its earliest job steps over the index
/// entries of every job claimed from it since the last vacuum (a page
/// each 150 or so). The wrapped seeks keep to that priority with plain
/// bounds on `account` (a row comparison bounds a scan only by its first
/// column, so `(priority, account) < ..` would read the whole backlog).
macro_rules! fair_window_ctes {
    () => {
        "start AS (
              SELECT p.priority, COALESCE($6, '') AS account
                FROM (SELECT priority FROM priorities ORDER BY priority LIMIT 1) AS p
          ),
          pairs AS (
              (SELECT j1.priority, j1.account, j1.run_at, j1.wrapped, 1 AS n
                 FROM start s
                 CROSS JOIN LATERAL (
                     (SELECT priority, account, run_at, false AS wrapped FROM shardq.jobs
                       WHERE state = 'available' AND queue = $1
                         AND (priority, account) > (s.priority, s.account)
                       ORDER BY priority, account, run_at LIMIT 1)
                     UNION ALL
                     (SELECT priority, account, run_at, true FROM shardq.jobs
                       WHERE state = 'available' AND queue = $1
                         AND priority = s.priority AND account < s.account
                       ORDER BY account, run_at LIMIT 1)
                     LIMIT 1) AS j1)
              UNION ALL
              SELECT n.priority, n.account, n.run_at, n.wrapped, p.n + 1
                FROM pairs p
                CROSS JOIN start s
                CROSS JOIN LATERAL (
                    (SELECT priority, account, run_at, false AS wrapped FROM shardq.jobs
                      WHERE state = 'available' AND queue = $1 AND NOT p.wrapped
                        AND (priority, account) > (p.priority, p.account)
                      ORDER BY priority, account, run_at LIMIT 1)
                    UNION ALL
                    (SELECT priority, account, run_at, true FROM shardq.jobs
                      WHERE state = 'available' AND queue = $1 AND NOT p.wrapped
                        AND priority = s.priority AND account < s.account
                      ORDER BY account, run_at LIMIT 1)
                    UNION ALL
                    (SELECT priority, account, run_at, true FROM shardq.jobs
                      WHERE state = 'available' AND queue = $1 AND p.wrapped
                        AND priority = s.priority AND account > p.account AND account < s.account
                      ORDER BY account, run_at LIMIT 1)
                    LIMIT 1) AS n
               WHERE p.n < GREATEST($2, 32)
          ),
          start_pair AS (
              SELECT j.priority, j.account, j.run_at
                FROM start s
                CROSS JOIN LATERAL (
                    SELECT priority, account, run_at FROM shardq.jobs
                     WHERE state = 'available' AND queue = $1
                       AND priority = s.priority AND account = s.account
                     ORDER BY run_at LIMIT 1) AS j
          )"
    };
}

/// `running`: one row, `counts`, a JSON object from account to how many of
/// its jobs run in queue `$1` now, on any node; read through
/// `jobs_running_idx`, so bounded by the fleet's concurrency on the shard.
/// One object looked up per account (a binary search over its keys)
/// instead of a join, which the planner, misled by the window's row
/// estimate, would run as a nested loop over every running account per
/// window row.
macro_rules! fair_running_cte {
    () => {
        "running AS MATERIALIZED (
              SELECT COALESCE(jsonb_object_agg(account, n), '{}') AS counts
                FROM (SELECT account, count(*) AS n FROM shardq.jobs
                       WHERE state = 'running' AND queue = $1
                       GROUP BY account) AS r
          )"
    };
}

/// The head of queue `$1` in strict order (`id`, `account`): per priority
/// of `priorities` (`priorities_cte!`), the due range of
/// `jobs_fetch_idx` read oldest first, up to `$2` rows, locked with SKIP
/// LOCKED, without paused queues, fenced accounts or blocked serial keys;
/// of those, the first `$2` by aging, priority, run time and id.
macro_rules! strict_head_select {
    () => {
        concat!(
            "SELECT c.id, c.account, c.priority, c.run_at
               FROM priorities p
               CROSS JOIN LATERAL (
                   SELECT id, account, priority, run_at FROM shardq.jobs
                    WHERE state = 'available' AND queue = $1 AND priority = p.priority
                      AND run_at <= now()
                      AND ",
            claim_queue_open!(),
            "
                      AND ",
            claim_account_unfenced!("jobs.account"),
            no_account_limit!("jobs.account"),
            no_resources!(),
            "
                      AND ",
            claim_serial_free!(),
            "
                    ORDER BY run_at, id
                    LIMIT $2
                    FOR UPDATE SKIP LOCKED) AS c
               CROSS JOIN LATERAL (
                   SELECT COALESCE(c.run_at <= now() - make_interval(secs => $5), false) AS aged) AS a
              ORDER BY a.aged DESC, CASE WHEN a.aged THEN c.run_at END, c.priority, c.run_at, c.id
              LIMIT $2"
        )
    };
}

/// The strict-order fetch statement (a queue that opted out of fair share): `$1` queue, `$2` limit, `$3` node id, `$4` lease
/// seconds, `$5` priority aging in seconds (NULL: off). Public so tests can check its generic plan.
///
/// Serial keys (`claim_serial_free!`): a job with a `serial_key` is
/// claimed only when no earlier job of the key is waiting or running and
/// no run of the key still holds it (a run holds its key from its claim
/// until it has ended on its node: a cancelled job whose handler goes on
/// still holds it). The unique index on held keys is the rule itself: a claim
/// racing another for a key the probes could not yet see held (an older
/// job that became visible late, or was retried by hand) fails instead of
/// running two at once, and the producer claims again. Why two concurrent fetches cannot both claim jobs
/// of one key: the earlier job leaves `available`/`running` only when it is
/// final, and a final state is written only after the job was claimed and
/// ran, in a later transaction than its claim. A fetch whose snapshot
/// predates the claim's commit sees the earlier job `available`; one that
/// sees the claim sees it `running`; either way the probe finds it and the
/// later job is skipped. SKIP LOCKED skips only rows this fetch would lock
/// (candidates), never the probed rows, which are read from the snapshot.
///
/// Priority aging (`$5` seconds, NULL: off): a job due for longer than that
/// is claimed ahead of younger jobs of any priority, oldest first, so lower
/// priorities make progress under sustained higher-priority load. Each
/// priority's due range is read oldest first already, so the aged jobs are
/// among the rows read and aging costs nothing more.
///
/// Paused queues (`claim_queue_open!`): nothing is claimed from a queue
/// paused on this shard. Fences (`claim_account_unfenced!`): the jobs of
/// an account fenced off this shard (it is moving or has moved away) are
/// never claimed here.
///
/// Per-account limits (`no_account_limit!`): jobs of an account with a
/// limit in the queue (`shardq.account_limits`) are left to the limited
/// claim that [`job_fetch_available`] runs in the same statement
/// ([`limits::JOB_FETCH_LIMITED_CTES`]); one probe of that table's primary
/// key per candidate. Jobs that use resources (`no_resources!`) are left to
/// [`limits::JOB_FETCH_RESOURCED_SQL`].
///
/// Future jobs (scheduled, or retrying after a backoff) stay `available` in
/// `jobs_fetch_idx (queue, priority, run_at, id)`, which leads with
/// priority, so a plain scan for due jobs in priority order would walk every
/// future entry of a better priority first (a retry storm would make every
/// claim cost the backlog). Instead the claim walks the queue's distinct
/// priorities with a recursive skip scan (one index seek each) and, per
/// priority, reads only the due range `run_at <= now()` of the index, up to
/// the limit. Its cost grows with the priorities in use and the rows
/// claimed, never with future jobs. Each priority locks at most `$2`
/// candidates; those beyond the limit are released when the statement ends.
pub const JOB_FETCH_AVAILABLE_SQL: &str = concat!(
    claim_open!(),
    "WITH RECURSIVE ",
    priorities_cte!("priorities"),
    "
     SELECT h.id FROM (",
    strict_head_select!(),
    ") AS h",
    claim_close!()
);

/// The fair fetch statement, the default: the parameters of
/// [`JOB_FETCH_AVAILABLE_SQL`] plus `$6`, the account the rotation resumes
/// after (NULL: the first); the same result, and the same rules for serial keys,
/// priority aging, paused queues and fences; what differs is which due jobs
/// a claim takes when several accounts have some.
///
/// Fair share (weighted fair queueing by account, work-conserving): each
/// candidate gets a turn, `(running + k - 1) / weight`, where `running` is
/// how many jobs of its account run in the queue now (on any node: counted
/// in the database, `fair_running_cte!`), `k` its place among its account's candidates (aged
/// jobs first, then priority, run time, id) and `weight` the account's
/// (`claim_account_weight!`). The claim takes the lowest
/// turns, ties broken by aging, priority, run time and id. So one claim
/// interleaves the accounts with due jobs, an account with weight 2 gets
/// twice the turns of one with weight 1, an account that already holds
/// many slots waits for those that hold few, and a lone account takes the
/// whole claim. A backlog delays other accounts by its share, never by its
/// size.
///
/// The strict head first: the claim reads the queue's head in strict order
/// (`strict_head_select!`, what [`JOB_FETCH_AVAILABLE_SQL`] claims) and
/// takes it as it is when that is already fair: no account on the shard
/// has a weight set, and either the head holds at most one job of each
/// account and none of them runs a job in the queue now, or it holds jobs
/// of one account only and the window finds no other account with due
/// jobs. That is the usual case while many accounts enqueue in turn, or
/// one account alone, and it costs what the strict claim costs. Whether a
/// head account runs a job is one probe of `jobs_running_idx (queue,
/// account)` per head account, stopping at the first that does (only when
/// the head holds one job per account; a probe of an account that runs
/// nothing ends in the index), not the per-account counts the turns need
/// (`fair_running_cte!`, read only when the turns decide). Otherwise
/// (a backlog at the head, or accounts that already run jobs) the head's
/// rows stay locked until the statement ends and the turns below decide.
///
/// Cost: the window (`fair_window_ctes!`) is at most `max($2, 32)`
/// (priority, account) pairs and the start account's own, one seek each
/// in `jobs_fair_idx` (a backlog of 200k jobs of one account is one seek;
/// the fast check above leaves out the start account's when it is the
/// head's only one), starting after the account the
/// producer served last, so with more accounts than the window successive
/// claims rotate through them ([`fair_rotation_after`]) and a claim never
/// reads more than the window. Of the accounts with due jobs in the window,
/// the `n ≤ $2` with the fewest running jobs per weight (then the oldest
/// due job) each read, per priority, at most a quota of due jobs: its
/// weight's share of the claim, or, when more, what fills the claim if
/// every other account has one due job (`$2 - n + 1`), locked with SKIP
/// LOCKED (so concurrent claims on other nodes take the next jobs of each
/// account instead of waiting). With as many accounts as the claim takes
/// jobs, that is one job each: the claim locks no more rows than it
/// returns. The cost grows with the accounts and priorities in use and the
/// rows claimed, never with one account's backlog. The head's rows,
/// locked already, are candidates too (their account's turns go on where
/// its quota's end): a claim beside another that has just locked the small
/// accounts' jobs (a producer's two claims in flight, or two nodes) skips
/// those and fills up from the head instead of coming back with the
/// backlog's quota only. A claim may still come back short while few
/// accounts have due jobs (their quotas bound it); the producer then
/// claims again at once.
pub const JOB_FETCH_FAIR_SQL: &str = concat!(
    claim_open!(),
    "WITH RECURSIVE ",
    priorities_cte!("priorities"),
    ",
     head AS MATERIALIZED (",
    strict_head_select!(),
    "),
     ",
    fair_window_ctes!(),
    ",
     ",
    fair_running_cte!(),
    ",
     accounts AS (
         SELECT a.account, a.priorities, a.weight, a.running
           FROM (SELECT g.account, g.priorities, g.head, g.weight,
                        COALESCE((r.counts ->> g.account)::float8, 0) AS running
                   FROM running r
                   CROSS JOIN (SELECT d.account, array_agg(d.priority) AS priorities, min(d.run_at) AS head,
                ",
    claim_account_weight!("d.account"),
    " AS weight
           FROM (SELECT priority, account, run_at FROM pairs
                 UNION ALL
                 SELECT priority, account, run_at FROM start_pair) AS d
          WHERE d.run_at <= now()
            AND ",
    claim_queue_open!(),
    "
            AND ",
    claim_account_unfenced!("d.account"),
    no_account_limit!("d.account"),
    "
          GROUP BY d.account) AS g) AS a
          ORDER BY a.running / a.weight, a.head
          LIMIT $2
     ),
     shares AS MATERIALIZED (
         SELECT account, priorities, weight, running,
                LEAST($2, GREATEST(ceil($2 * weight / sum(weight) OVER ()),
                                   $2 - count(*) OVER () + 1))::bigint AS quota
           FROM accounts
     ),
     candidates AS (
         SELECT c.id, c.priority, c.run_at, s.weight, s.running, s.account,
                COALESCE(c.run_at <= now() - make_interval(secs => $5), false) AS aged
           FROM shares s
           CROSS JOIN LATERAL unnest(s.priorities) AS pr(priority)
           CROSS JOIN LATERAL (
               SELECT id, priority, run_at FROM shardq.jobs
                WHERE state = 'available' AND queue = $1 AND priority = pr.priority
                  AND account = s.account AND run_at <= now()",
    no_resources!(),
    "
                  AND ",
    claim_serial_free!(),
    "
                ORDER BY run_at, id
                LIMIT s.quota
                FOR UPDATE SKIP LOCKED) AS c
         UNION
         SELECT h.id, h.priority, h.run_at, s.weight, s.running, s.account,
                COALESCE(h.run_at <= now() - make_interval(secs => $5), false)
           FROM head h
           JOIN shares s ON s.account = h.account
     ),
     ranked AS (
         SELECT id, priority, run_at, aged,
                (running + row_number() OVER (
                     PARTITION BY account
                     ORDER BY aged DESC, CASE WHEN aged THEN run_at END, priority, run_at, id) - 1)
                / weight AS turn
           FROM candidates
     ),
     fast AS MATERIALIZED (
         SELECT CASE WHEN (SELECT min(account) FROM shardq.account_weights) IS NOT NULL THEN false
                     WHEN count(*) = count(DISTINCT h.account)
                          THEN NOT EXISTS (
                               SELECT 1 FROM head h2
                                WHERE (SELECT true FROM shardq.jobs r
                                        WHERE r.state = 'running' AND r.queue = $1 AND r.account = h2.account
                                        LIMIT 1))
                     WHEN count(DISTINCT h.account) = 1 THEN NOT EXISTS (
                          SELECT 1 FROM pairs
                           WHERE pairs.run_at <= now() AND pairs.account <> min(h.account))
                          AND CASE WHEN $6 = min(h.account) THEN true
                                   ELSE NOT EXISTS (SELECT 1 FROM start_pair sp
                                                     WHERE sp.run_at <= now() AND sp.account <> min(h.account))
                              END
                     ELSE false END AS head_is_fair
           FROM head h
     )
     SELECT id FROM head WHERE (SELECT head_is_fair FROM fast)
     UNION ALL
     (SELECT id FROM ranked WHERE NOT (SELECT head_is_fair FROM fast)
       ORDER BY turn, aged DESC, CASE WHEN aged THEN run_at END, priority, run_at, id
       LIMIT $2)",
    claim_close!()
);

/// Whether a claim failed because a concurrent claim took a serial key it
/// picked a job of (`jobs_serial_held_idx`): nothing was claimed; claim again.
pub(crate) fn claim_lost_serial_race(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().as_deref() == Some("23505") && db.constraint() == Some("jobs_serial_held_idx"))
}

/// The claim statement a producer runs for `claim` (one of the claims'
/// `UPDATE .. RETURNING`), with the limited claim when `limited`, ending
/// in [`CLAIM_COMMIT_TAIL`].
fn claim_statement(claim: &str, limited: bool) -> String {
    if limited {
        format!("{}{CLAIM_COMMIT_TAIL}", limits::claim_with_limits(claim))
    } else {
        format!("WITH claimed AS ({claim}){CLAIM_COMMIT_TAIL}")
    }
}

/// The strict-order claim a producer runs: [`JOB_FETCH_AVAILABLE_SQL`],
/// committed as [`CLAIM_COMMIT_TAIL`] says.
pub static AVAILABLE_CLAIM: LazyLock<String> = LazyLock::new(|| claim_statement(JOB_FETCH_AVAILABLE_SQL, false));
/// The fair claim a producer runs: [`JOB_FETCH_FAIR_SQL`], committed as
/// [`CLAIM_COMMIT_TAIL`] says.
pub static FAIR_CLAIM: LazyLock<String> = LazyLock::new(|| claim_statement(JOB_FETCH_FAIR_SQL, false));
/// The strict-order claim a producer runs while the queue has limited
/// accounts: [`JOB_FETCH_AVAILABLE_SQL`] and the limited claim
/// ([`limits::JOB_FETCH_LIMITED_CTES`]) in one statement.
pub static AVAILABLE_WITH_LIMITS: LazyLock<String> = LazyLock::new(|| claim_statement(JOB_FETCH_AVAILABLE_SQL, true));
/// The fair claim a producer runs while the queue has limited accounts:
/// [`JOB_FETCH_FAIR_SQL`] and the limited claim in one statement.
pub static FAIR_WITH_LIMITS: LazyLock<String> = LazyLock::new(|| claim_statement(JOB_FETCH_FAIR_SQL, true));

/// Claims up to `limit` due jobs of a queue, fair share across accounts
/// or in strict priority then run order (`p.fair`), skipping rows other
/// nodes hold, and leases them to `node`; when `p.limited`, in the same
/// statement, up to `limit` more of accounts with a concurrency limit in
/// the queue, each holding one of its account's free slots
/// ([`limits::JOB_FETCH_LIMITED_CTES`]). Commits without waiting for its
/// flush unless it claimed a keyed job ([`CLAIM_COMMIT_TAIL`]).
pub async fn job_fetch_available<'c>(
    conn: impl sqlx::PgExecutor<'c>,
    p: &FetchParams<'_>,
) -> sqlx::Result<Vec<FetchedJob>> {
    let q = sqlx::query_as(match (p.fair, p.limited) {
        (true, true) => FAIR_WITH_LIMITS.as_str(),
        (true, false) => FAIR_CLAIM.as_str(),
        (false, true) => AVAILABLE_WITH_LIMITS.as_str(),
        (false, false) => AVAILABLE_CLAIM.as_str(),
    })
    .bind(p.queue)
    .bind(p.limit)
    .bind(p.node)
    .bind(p.lease_secs)
    .bind(p.aging_secs);
    if p.fair {
        q.bind(p.after).fetch_all(conn).await
    } else {
        q.fetch_all(conn).await
    }
}

/// Where a producer's next fair claim resumes the rotation over accounts,
/// given where its last one started (`after`) and what it claimed: the
/// last account served in rotation order (the greatest claimed account
/// after `after`, or, when the walk wrapped around, the greatest of all).
/// Unchanged when nothing was claimed.
pub fn fair_rotation_after(after: Option<&str>, claimed: &[FetchedJob]) -> Option<String> {
    let beyond = claimed
        .iter()
        .map(|j| j.account.as_str())
        .filter(|a| after.is_none_or(|c| *a > c))
        .max();
    beyond
        .or_else(|| claimed.iter().map(|j| j.account.as_str()).max())
        .or(after)
        .map(str::to_string)
}

/// `'running'` as the fenced statements compare `j.state` to it: through
/// an uncorrelated subquery (one evaluation per statement), so that the
/// planner cannot prove `state = 'running'` and no partial index with that
/// predicate (`jobs_running_idx`, `jobs_lease_idx`) can serve the
/// statement. Each fenced statement then finds its rows from the ids it
/// is given, one probe of the primary key each, whatever the statistics
/// say: on a shard analyzed while no job was running, the planner
/// otherwise took the running rows for about none and drove a nested loop
/// from `jobs_running_idx`, comparing every running row with every id
/// given (256 × 256 rows, 12-16 ms per completion batch instead of 2).
macro_rules! state_running {
    () => {
        "(SELECT 'running'::text)"
    };
}

/// The completion statement: `$1` ids, `$2` attempts, `$3` claim tokens
/// ([`RunKey`]). Public so tests can check its generic plan.
///
/// Its transaction commits without waiting for the WAL flush
/// (`synchronous_commit = off` for this transaction only): a completion
/// lost in a server crash leaves the job `running` under this node, and the
/// node's orphan check (or rescue, once the lease expires) makes it run
/// again. At-least-once holds; the job is never lost, and a completion
/// costs no flush wait. Claims do the same unless they hold something
/// across nodes ([`CLAIM_COMMIT_TAIL`]); every other outcome stays
/// synchronous.
///
/// The rows are found from the ids, one primary-key probe each
/// (`state_running!` keeps the planner from turning the join around).
pub const JOB_COMPLETE_MANY_SQL: &str = concat!(
    "UPDATE shardq.jobs j
            SET state = 'completed', finalized_at = now(), locked_by = NULL, lease_expires_at = NULL,
                serial_held = false,
                unique_key = CASE WHEN 'completed' = ANY(j.unique_states) THEN j.unique_key END
           FROM (SELECT set_config('synchronous_commit', 'off', true)) AS s(sync),
                unnest($1::bigint[], $2::int[], $3::timestamptz[]) AS c(id, attempt, attempted_at)
          WHERE j.id = c.id AND j.attempt = c.attempt AND j.attempted_at = c.attempted_at
            AND j.state = ",
    state_running!()
);

/// Marks runs completed, fenced by their [`RunKey`]. Returns the rows changed.
pub async fn job_complete_many(pool: &Database, runs: &[RunKey]) -> sqlx::Result<u64> {
    let (ids, attempts, tokens) = run_arrays(runs);
    sqlx::query(JOB_COMPLETE_MANY_SQL)
        .bind(ids)
        .bind(attempts)
        .bind(tokens)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
}

/// The statement that writes runs that did not simply complete: `$1` ids,
/// `$2` attempts, `$3` claim tokens, `$4` states, `$5` seconds until a
/// retry, `$6` errors, `$7` extra attempts. Public so tests can check its
/// generic plan.
pub const JOB_FINISH_MANY_SQL: &str = concat!(
    "WITH changed AS (
         UPDATE shardq.jobs j
            SET state = f.state,
                run_at = CASE WHEN f.retry_in IS NULL THEN j.run_at
                              ELSE now() + make_interval(secs => f.retry_in) END,
                finalized_at = CASE WHEN f.state = 'available' THEN NULL ELSE now() END,
                unique_key = CASE WHEN f.state = ANY(j.unique_states) THEN j.unique_key END,
                max_attempts = j.max_attempts + f.extra,
                errors = CASE WHEN f.error IS NULL THEN j.errors
                              ELSE j.errors || jsonb_build_array(jsonb_build_object(
                                       'attempt', j.attempt, 'at', now(), 'error', f.error)) END,
                locked_by = NULL, lease_expires_at = NULL, serial_held = false
           FROM unnest($1::bigint[], $2::int[], $3::timestamptz[], $4::text[], $5::float8[], $6::text[], $7::int[])
                AS f(id, attempt, attempted_at, state, retry_in, error, extra)
          WHERE j.id = f.id AND j.attempt = f.attempt AND j.attempted_at = f.attempted_at
            AND j.state = ",
    state_running!(),
    "
         RETURNING j.queue, j.state
         )",
    written_and_notified!()
);

/// Writes runs that did not simply complete (retry, snooze, discard, cancel), fenced by their [`RunKey`].
/// Jobs made available again (retry, snooze) notify their queue, so every
/// node's producer re-reads the queue's next run time and wakes at the
/// retry's `run_at` rather than up to a poll later.
pub async fn job_finish_many(pool: &Database, finishes: &[Finish]) -> sqlx::Result<u64> {
    let runs: Vec<RunKey> = finishes.iter().map(|f| f.run).collect();
    let (ids, attempts, tokens) = run_arrays(&runs);
    let states: Vec<&str> = finishes.iter().map(|f| f.state.as_str()).collect();
    let retry_in: Vec<Option<f64>> = finishes.iter().map(|f| f.retry_in.map(|d| d.as_secs_f64())).collect();
    let errors: Vec<Option<&str>> = finishes.iter().map(|f| f.error.as_deref()).collect();
    let extra: Vec<i32> = finishes.iter().map(|f| f.extra_attempts).collect();
    sqlx::query_as(JOB_FINISH_MANY_SQL)
        .bind(ids)
        .bind(attempts)
        .bind(tokens)
        .bind(states)
        .bind(retry_in)
        .bind(errors)
        .bind(extra)
        .fetch_one(pool)
        .await
        .map(|(written, _notified): (i64, i64)| written as u64)
}

/// Extends the leases of this node's runs that are still running under
/// its name, to `lease_secs` from now; returns every one still held, with
/// the seconds left on its lease.
///
/// A lease with more than `fresh_secs` left (claimed or renewed moments
/// ago) is not written: it is returned with what it has left. Under a
/// steady drain nearly every held job was claimed since the last beat, so a
/// beat writes only the leases of runs that outlast a beat, not every job
/// in flight. The caller picks `fresh_secs` so a skipped lease still has
/// more than a beat left at the next one.
///
/// The statement changes only `lease_expires_at`, which no index covers
/// (shard migration V7), so renewals are HOT updates when the page has room.
pub async fn job_lease_renew<'c>(
    conn: impl sqlx::PgExecutor<'c>,
    runs: &[RunKey],
    node: &str,
    lease_secs: f64,
    fresh_secs: f64,
) -> sqlx::Result<Vec<(RunKey, f64)>> {
    let (ids, attempts, tokens) = run_arrays(runs);
    let rows: Vec<(i64, i32, DateTime<Utc>, f64)> = sqlx::query_as(JOB_LEASE_RENEW_SQL)
        .bind(ids)
        .bind(attempts)
        .bind(tokens)
        .bind(node)
        .bind(lease_secs)
        .bind(fresh_secs)
        .fetch_all(conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(id, attempt, attempted_at, secs)| {
            (
                RunKey {
                    id,
                    attempt,
                    attempted_at,
                },
                secs,
            )
        })
        .collect())
}

/// The renewal statement: `$1` ids, `$2` attempts, `$3` claim tokens
/// ([`RunKey`]), `$4` node, `$5` lease seconds, `$6` seconds left above
/// which a lease is fresh and left alone.
/// A fresh lease is reported from the statement's snapshot: it cannot have
/// expired, so no rescue can have taken it meanwhile; a renewed one only if
/// the update, which re-checks the row, wrote it. Public so tests can check
/// its plan.
pub const JOB_LEASE_RENEW_SQL: &str = "WITH mine AS (
             SELECT j.id, j.attempt, j.attempted_at, j.lease_expires_at
               FROM shardq.jobs j
               JOIN unnest($1::bigint[], $2::int[], $3::timestamptz[]) AS r(id, attempt, attempted_at)
                 ON j.id = r.id AND j.attempt = r.attempt AND j.attempted_at = r.attempted_at
              WHERE j.locked_by = $4 AND (j.state = 'running' OR j.serial_held)
         ), renewed AS (
             UPDATE shardq.jobs j SET lease_expires_at = now() + make_interval(secs => $5)
               FROM mine m
              WHERE j.id = m.id AND j.attempt = m.attempt AND j.attempted_at = m.attempted_at
                AND j.locked_by = $4 AND (j.state = 'running' OR j.serial_held)
                AND m.lease_expires_at <= now() + make_interval(secs => $6)
             RETURNING j.id, j.attempt, j.attempted_at
         )
         SELECT id, attempt, attempted_at, $5::float8 FROM renewed
         UNION ALL
         SELECT id, attempt, attempted_at, EXTRACT(EPOCH FROM lease_expires_at - now())::float8 FROM mine
          WHERE lease_expires_at > now() + make_interval(secs => $6)";

/// Releases the serial keys (and limit slots) the `runs` held, once they
/// ended on this node (a run whose row was cancelled meanwhile still holds
/// its key until here), and notifies the queues of every given job, so a
/// producer waiting on the key's next job wakes.
pub async fn job_serial_release(pool: &Database, runs: &[RunKey]) -> sqlx::Result<u64> {
    let (ids, attempts, tokens) = run_arrays(runs);
    sqlx::query_as(
        "WITH released AS (
             UPDATE shardq.jobs j SET serial_held = false
               FROM unnest($1::bigint[], $2::int[], $3::timestamptz[]) AS r(id, attempt, attempted_at)
              WHERE j.id = r.id AND j.attempt = r.attempt AND j.attempted_at = r.attempted_at
                AND j.serial_held = (SELECT true)
             RETURNING j.id
         )
         SELECT (SELECT count(*) FROM released),
                (SELECT count(pg_notify('shardq_jobs', q.queue))
                   FROM (SELECT DISTINCT queue FROM shardq.jobs WHERE id = ANY($1)) AS q)",
    )
    .bind(ids)
    .bind(attempts)
    .bind(tokens)
    .fetch_one(pool)
    .await
    .map(|(released, _notified): (i64, i64)| released as u64)
}

/// The runs of this node on the shard, as the shard sees them.
pub async fn job_running_of_node(pool: &Database, node: &str) -> sqlx::Result<Vec<RunKey>> {
    let rows: Vec<(i64, i32, Option<DateTime<Utc>>)> =
        sqlx::query_as("SELECT id, attempt, attempted_at FROM shardq.jobs WHERE state = 'running' AND locked_by = $1")
            .bind(node)
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, attempt, attempted_at)| {
            attempted_at.map(|attempted_at| RunKey {
                id,
                attempt,
                attempted_at,
            })
        })
        .collect())
}

/// Makes claims of this node that it never received available again, with
/// the attempt given back (it never ran); their queues are notified.
pub async fn job_release_unclaimed(pool: &Database, runs: &[RunKey], node: &str) -> sqlx::Result<u64> {
    give_back(pool, runs, node, false).await
}

/// Hands running jobs of this node back (shutdown): available now, and the
/// interrupted attempt does not count against `max_attempts`; their queues
/// are notified, so another node takes them at once.
pub async fn job_give_back(pool: &Database, runs: &[RunKey], node: &str) -> sqlx::Result<u64> {
    give_back(pool, runs, node, true).await
}

/// Makes this node's `runs` available now without counting their attempt:
/// an attempt that `ran` stays recorded and one more is allowed
/// (`max_attempts + 1`); one that never ran is taken back (`attempt - 1`).
/// Their queues are notified.
async fn give_back(pool: &Database, runs: &[RunKey], node: &str, ran: bool) -> sqlx::Result<u64> {
    let (ids, attempts, tokens) = run_arrays(runs);
    sqlx::query_as(concat!(
        "WITH changed AS (
         UPDATE shardq.jobs j
            SET state = 'available', run_at = now(),
                attempt = j.attempt - CASE WHEN $5 THEN 0 ELSE 1 END,
                max_attempts = j.max_attempts + CASE WHEN $5 THEN 1 ELSE 0 END,
                locked_by = NULL, lease_expires_at = NULL, serial_held = false
           FROM unnest($1::bigint[], $2::int[], $3::timestamptz[]) AS g(id, attempt, attempted_at)
          WHERE j.id = g.id AND j.attempt = g.attempt AND j.attempted_at = g.attempted_at
            AND j.state = ",
        state_running!(),
        " AND j.locked_by = $4
         RETURNING j.queue, j.state
         )",
        written_and_notified!()
    ))
    .bind(ids)
    .bind(attempts)
    .bind(tokens)
    .bind(node)
    .bind(ran)
    .fetch_one(pool)
    .await
    .map(|(written, _notified): (i64, i64)| written as u64)
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
pub async fn job_next_due(pool: &Database, queue: &str) -> sqlx::Result<Option<f64>> {
    sqlx::query_scalar(JOB_NEXT_DUE_SQL).bind(queue).fetch_one(pool).await
}

/// Of `ids` (jobs this node runs), those that are now `cancelled`: the
/// fallback for a `shardq_cancel` notification lost across a reconnect.
pub async fn job_cancelled_among(pool: &Database, ids: &[i64]) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar("SELECT id FROM shardq.jobs WHERE id = ANY($1) AND state = 'cancelled'")
        .bind(ids)
        .fetch_all(pool)
        .await
}
