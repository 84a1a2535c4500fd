//! The hot statements keep index plans on a large table, also when the
//! server uses a generic plan for the prepared statement (what it does after
//! a few executions when it judges that cheaper).
#![allow(clippy::unwrap_used, missing_docs)]

use shardq::store::{
    AVAILABLE_CLAIM, AVAILABLE_WITH_LIMITS, FAIR_CLAIM, FAIR_WITH_LIMITS, JOB_COMPLETE_MANY_SQL,
    JOB_FETCH_AVAILABLE_SQL, JOB_FETCH_FAIR_SQL, JOB_FINISH_MANY_SQL, JOB_LEASE_RENEW_SQL, JOB_RESCUE_EXPIRED_SQL,
};
use shardq_tests::{analyzed_plan, assert_indexed, buffers_and_rows, fleet, generic_plan};

/// Rows in the table when plans are checked.
const ROWS: i64 = 300_000;

/// 20,000 due jobs of 1,000 accounts enqueued in turn (as many tenants
/// enqueueing at once do): the strict head holds one job of each account.
const INTERLEAVED_ACCOUNTS: &str = "INSERT INTO shardq.jobs (account, queue, kind, args, run_at)
         SELECT 'a' || (i % 1000), 'default', 'noop', '{}', now() - interval '1 minute'
           FROM generate_series(1, 20000) AS i";

/// Runs `sql` (one statement or more) on `conn`, then `VACUUM ANALYZE` of
/// the jobs table, so that plans see the rows as they are.
async fn load(conn: &mut sqlx::PgConnection, sql: &str) {
    sqlx::raw_sql(sql).execute(&mut *conn).await.unwrap();
    sqlx::query("VACUUM ANALYZE shardq.jobs")
        .execute(&mut *conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn hot_statements_use_indexes_under_generic_plans_on_a_large_table() {
    let f = fleet().await;
    let db = f.router.shards()[0].clone();
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::query(
        "INSERT INTO shardq.jobs (account, queue, kind, args, state, lease_expires_at)
         SELECT 'a' || (i % 1000), 'default', 'noop', '{}',
                CASE WHEN i % 10 = 0 THEN 'running' WHEN i % 3 = 0 THEN 'completed' ELSE 'available' END,
                CASE WHEN i % 10 = 0 THEN now() + interval '1 hour' END
           FROM generate_series(1, $1) AS i",
    )
    .bind(ROWS)
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query("ANALYZE shardq.jobs").execute(&mut *conn).await.unwrap();
    for (name, types, sql, args) in [
        (
            "fetch",
            "text, bigint, text, float8, float8",
            JOB_FETCH_AVAILABLE_SQL,
            "'default', 64, 'node', 30, 300",
        ),
        (
            "fair fetch",
            "text, bigint, text, float8, float8, text",
            JOB_FETCH_FAIR_SQL,
            "'default', 64, 'node', 30, 300, 'a5'",
        ),
        (
            "claim as it runs",
            "text, bigint, text, float8, float8",
            AVAILABLE_CLAIM.as_str(),
            "'default', 64, 'node', 30, 300",
        ),
        (
            "fair claim as it runs",
            "text, bigint, text, float8, float8, text",
            FAIR_CLAIM.as_str(),
            "'default', 64, 'node', 30, 300, 'a5'",
        ),
        (
            "fetch with the limited claim",
            "text, bigint, text, float8, float8",
            AVAILABLE_WITH_LIMITS.as_str(),
            "'default', 64, 'node', 30, 300",
        ),
        (
            "fair fetch with the limited claim",
            "text, bigint, text, float8, float8, text",
            FAIR_WITH_LIMITS.as_str(),
            "'default', 64, 'node', 30, 300, 'a5'",
        ),
        (
            "complete",
            "bigint[], int[], timestamptz[]",
            JOB_COMPLETE_MANY_SQL,
            "'{1,2,3}', '{1,1,1}', ARRAY[now(), now(), now()]",
        ),
        (
            "finish",
            "bigint[], int[], timestamptz[], text[], float8[], text[], int[]",
            JOB_FINISH_MANY_SQL,
            "'{1,2,3}', '{1,1,1}', ARRAY[now(), now(), now()], '{available,discarded,cancelled}', '{1,NULL,NULL}', '{a,b,c}', '{0,0,0}'",
        ),
        ("rescue", "bigint", JOB_RESCUE_EXPIRED_SQL, "1000"),
        (
            "renew",
            "bigint[], int[], timestamptz[], text, float8, float8",
            JOB_LEASE_RENEW_SQL,
            "'{1,2,3}', '{1,1,1}', ARRAY[now(), now(), now()], 'node', 30, 25",
        ),
    ] {
        assert_indexed(name, &generic_plan(&mut conn, types, sql, args).await);
    }
}

#[tokio::test]
async fn claiming_due_jobs_does_not_walk_the_future_ones() {
    let f = fleet().await;
    let db = f.router.shards()[0].clone();
    let mut conn = db.pool.acquire().await.unwrap();
    // 1k due jobs at priority 1.
    load(
        &mut conn,
        "INSERT INTO shardq.jobs (account, queue, kind, args, priority, run_at)
         SELECT 'a' || (i % 1000), 'default', 'noop', '{}', 1, now() - interval '1 minute'
           FROM generate_series(1, 1000) AS i",
    )
    .await;
    let types = "text, bigint, text, float8, float8";
    let args = "'default', 100, 'node', 30, 300";
    let (alone, rows) = buffers_and_rows(&mut conn, types, JOB_FETCH_AVAILABLE_SQL, args).await;
    assert_eq!(rows, 100, "a full claim of due jobs");
    // A retry storm: 500k jobs waiting for a backoff at the better priority.
    load(
        &mut conn,
        "INSERT INTO shardq.jobs (account, queue, kind, args, priority, run_at)
         SELECT 'a' || (i % 1000), 'default', 'noop', '{}', 0, now() + interval '1 hour'
           FROM generate_series(1, 500000) AS i",
    )
    .await;
    let (behind_future, rows) = buffers_and_rows(&mut conn, types, JOB_FETCH_AVAILABLE_SQL, args).await;
    assert_eq!(rows, 100, "a full claim of due jobs");
    // Finding and locking 100 due rows reads their heap pages and a few
    // index pages either way; walking 500k future index entries first
    // would read thousands more.
    assert!(
        behind_future < alone * 3 / 2 + 20,
        "the claim touched {alone} buffers alone and {behind_future} behind 500k future jobs"
    );
}

#[tokio::test]
async fn the_fair_claim_costs_what_the_strict_claim_does_while_accounts_interleave() {
    let f = fleet().await;
    let db = f.router.shards()[0].clone();
    let mut conn = db.pool.acquire().await.unwrap();
    // 1,000 accounts whose jobs were enqueued in turn (as many tenants
    // enqueueing at once do): the strict head already holds one job each.
    load(&mut conn, INTERLEAVED_ACCOUNTS).await;
    let (strict, rows) = buffers_and_rows(
        &mut conn,
        "text, bigint, text, float8, float8",
        JOB_FETCH_AVAILABLE_SQL,
        "'default', 100, 'node', 30, 300",
    )
    .await;
    assert_eq!(rows, 100, "a full strict claim");
    let (fair, rows) = buffers_and_rows(
        &mut conn,
        "text, bigint, text, float8, float8, text",
        JOB_FETCH_FAIR_SQL,
        "'default', 100, 'node', 30, 300, NULL",
    )
    .await;
    assert_eq!(rows, 100, "a full fair claim");
    // The fair claim takes the strict head (one job of each of 100
    // accounts) instead of walking 100 accounts with two seeks each.
    assert!(
        fair < strict * 3 / 2 + 20,
        "the strict claim touched {strict} buffers and the fair one {fair}"
    );
}

#[tokio::test]
async fn the_fair_claim_does_not_read_the_jobs_other_accounts_run() {
    let f = fleet().await;
    let db = f.router.shards()[0].clone();
    let mut conn = db.pool.acquire().await.unwrap();
    // 1,000 accounts enqueued in turn, none running, beside 5,000 running
    // jobs of other accounts in the same queue (a large fleet's slots).
    load(&mut conn, INTERLEAVED_ACCOUNTS).await;
    load(
        &mut conn,
        "INSERT INTO shardq.jobs (account, queue, kind, args, state, attempt, attempted_at, locked_by,
                                  lease_expires_at)
         SELECT 'busy-' || i, 'default', 'noop', '{}', 'running', 1, now(), 'other-node',
                now() + interval '1 hour'
           FROM generate_series(1, 5000) AS i",
    )
    .await;
    let plan = analyzed_plan(
        &mut conn,
        "text, bigint, text, float8, float8, text",
        JOB_FETCH_FAIR_SQL,
        "'default', 100, 'node', 30, 300, NULL",
    )
    .await;
    assert_eq!(plan[0]["Plan"]["Actual Rows"], 100, "a full fair claim");
    // Whether a head account runs a job is one probe of its own running
    // rows (none here), not a read of the 5,000 that others run.
    let n = |node: &serde_json::Value, k: &str| node[k].as_f64().unwrap_or(0.0);
    let running_rows: f64 = plan_nodes(&plan[0]["Plan"])
        .into_iter()
        .filter(|node| node["Index Name"] == "jobs_running_idx")
        .map(|node| n(node, "Actual Rows") * n(node, "Actual Loops"))
        .sum();
    assert_eq!(
        running_rows, 0.0,
        "running rows the fair claim read, beside 5,000 running jobs of other accounts"
    );
}

#[tokio::test]
async fn the_fair_claim_does_not_walk_one_accounts_backlog() {
    let f = fleet().await;
    let db = f.router.shards()[0].clone();
    let mut conn = db.pool.acquire().await.unwrap();
    let types = "text, bigint, text, float8, float8, text";
    let args = "'default', 64, 'node', 30, 300, NULL";
    // 100 small accounts with 3 due jobs each, and one big account.
    let fill = |big: i64| {
        format!(
            "INSERT INTO shardq.jobs (account, queue, kind, args, run_at)
             SELECT 'small-' || (i % 100), 'default', 'noop', '{{}}', now() - interval '1 minute'
               FROM generate_series(1, 300) AS i;
             INSERT INTO shardq.jobs (account, queue, kind, args, run_at)
             SELECT 'big', 'default', 'noop', '{{}}', now() - interval '2 minutes'
               FROM generate_series(1, {big}) AS i"
        )
    };
    load(&mut conn, &fill(100)).await;
    let (small_backlog, rows) = buffers_and_rows(&mut conn, types, JOB_FETCH_FAIR_SQL, args).await;
    assert_eq!(rows, 64, "a full claim");
    sqlx::query("TRUNCATE shardq.jobs").execute(&mut *conn).await.unwrap();
    load(&mut conn, &fill(200_000)).await;
    let (big_backlog, rows) = buffers_and_rows(&mut conn, types, JOB_FETCH_FAIR_SQL, args).await;
    assert_eq!(rows, 64, "a full claim");
    // The same accounts and the same rows claimed: only the depth of the
    // big account's index range differs (a level more, at most), never a
    // walk over its 200k entries.
    assert!(
        big_backlog < small_backlog * 3 / 2 + 20,
        "the fair claim touched {small_backlog} buffers with a backlog of 100 and {big_backlog} with 200k"
    );
}

/// Buffers (hit + read) of the plan nodes matching `pick`, with their
/// children.
fn buffers_where(plan: &serde_json::Value, pick: impl Fn(&serde_json::Value) -> bool) -> i64 {
    let n = |node: &serde_json::Value, k: &str| node[k].as_i64().unwrap_or(0);
    plan_nodes(&plan[0]["Plan"])
        .into_iter()
        .filter(|node| pick(node))
        .map(|node| n(node, "Shared Hit Blocks") + n(node, "Shared Read Blocks"))
        .sum()
}

/// A queue drained from one account's backlog keeps the index entries of
/// the jobs claimed from it at the old end of its range until vacuum
/// removes them, and a seek to that end steps over all of them. The
/// claim's own read of the due jobs must (they are the oldest), but the
/// priorities in use and the fair claim's window of accounts are found
/// without it.
#[tokio::test]
async fn the_claims_do_not_step_over_the_jobs_claimed_before_them() {
    let f = fleet().await;
    let db = f.router.shards()[0].clone();
    let mut conn = db.pool.acquire().await.unwrap();
    load(
        &mut conn,
        "ALTER TABLE shardq.jobs SET (autovacuum_enabled = false);
         INSERT INTO shardq.jobs (account, queue, kind, args, run_at)
         SELECT 'big', 'default', 'noop', '{}', now() - interval '1 hour' + i * interval '1 ms'
           FROM generate_series(1, 60000) AS i;
         INSERT INTO shardq.jobs (account, queue, kind, args, run_at)
         SELECT 'small-' || i, 'default', 'noop', '{}', now() + interval '1 hour'
           FROM generate_series(1, 5) AS i;",
    )
    .await;
    sqlx::query(
        "UPDATE shardq.jobs SET state = 'completed', finalized_at = now()
          WHERE id IN (SELECT id FROM shardq.jobs WHERE account = 'big' ORDER BY id LIMIT 50000)",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    let strict = (
        "text, bigint, text, float8, float8",
        JOB_FETCH_AVAILABLE_SQL,
        "'default', 128, 'node', 30, 300",
    );
    // The producer resumes the fair rotation after the account it served last.
    let fair = (
        "text, bigint, text, float8, float8, text",
        JOB_FETCH_FAIR_SQL,
        "'default', 128, 'node', 30, 300, 'big'",
    );
    // A first claim marks the entries of the claimed jobs dead, as a
    // drain's claims do.
    let (_, rows) = buffers_and_rows(&mut conn, strict.0, strict.1, strict.2).await;
    assert_eq!(rows, 128, "a full claim");
    for (name, (types, sql, args)) in [("strict", strict), ("fair", fair)] {
        let plan = analyzed_plan(&mut conn, types, sql, args).await;
        let head = buffers_where(&plan, |n| n["Index Name"] == "jobs_fetch_idx");
        // About 150 entries a page: 50,000 claimed jobs are some 300 pages.
        assert!(
            head > 200,
            "{name}: the due jobs' read stepped over the claimed ones ({head} buffers)"
        );
        for cte in ["CTE priorities", "CTE pairs", "CTE start_pair"] {
            let read = buffers_where(&plan, |n| n["Subplan Name"] == cte);
            assert!(read < 40, "{name} claim: {cte} touched {read} buffers");
        }
    }
}

#[tokio::test]
async fn lease_renewals_are_hot_updates() {
    use shardq::store::{job_fetch_available, job_lease_renew, FetchParams};
    let f = fleet().await;
    let db = f.router.shards()[0].clone();
    sqlx::query(
        "INSERT INTO shardq.jobs (account, queue, kind, args)
         SELECT 'a' || (i % 10), 'default', 'noop', '{}' FROM generate_series(1, 200) AS i",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let params = FetchParams {
        queue: "default",
        limit: 200,
        node: "node",
        lease_secs: 30.0,
        aging_secs: None,
        fair: true,
        after: None,
        limited: false,
    };
    let claimed = job_fetch_available(&db.pool, &params).await.unwrap();
    assert_eq!(claimed.len(), 200);
    let runs: Vec<_> = claimed.iter().map(|j| j.key()).collect();
    // Vacuum (autovacuum, on a live shard) gives back the room the claim's
    // old versions took.
    sqlx::query("VACUUM shardq.jobs").execute(&db.pool).await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    // This backend's counts not yet reported, as of now (they may hold the
    // statements above); the renewal's own are the difference.
    let counts = "SELECT pg_stat_get_xact_tuples_updated('shardq.jobs'::regclass),
                         pg_stat_get_xact_tuples_hot_updated('shardq.jobs'::regclass)";
    let (updated_before, hot_before): (i64, i64) = sqlx::query_as(counts).fetch_one(&mut *tx).await.unwrap();
    // Leases with more than 30 s left count as fresh: none, so every one is written.
    let renewed = job_lease_renew(&mut *tx, &runs, "node", 30.0, 30.0).await.unwrap();
    assert_eq!(renewed.len(), 200);
    let (updated_after, hot_after): (i64, i64) = sqlx::query_as(counts).fetch_one(&mut *tx).await.unwrap();
    let (updated, hot) = (updated_after - updated_before, hot_after - hot_before);
    tx.rollback().await.unwrap();
    assert_eq!(updated, 200);
    // With an index on lease_expires_at none could be. How many are depends
    // on the room left on the claimed rows' pages (fillfactor 85: here about
    // half), not on any index.
    assert!(hot >= 50, "only {hot} of 200 renewals were HOT updates");
}

#[tokio::test]
async fn a_renewal_confirms_fresh_leases_without_writing_them() {
    use shardq::store::{job_fetch_available, job_lease_renew, FetchParams};
    let f = fleet().await;
    let db = f.router.shards()[0].clone();
    sqlx::query(
        "INSERT INTO shardq.jobs (account, queue, kind, args)
         SELECT 'a' || (i % 10), 'default', 'noop', '{}' FROM generate_series(1, 100) AS i",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let claim = |limit| FetchParams {
        queue: "default",
        limit,
        node: "node",
        lease_secs: 30.0,
        aging_secs: None,
        fair: false,
        after: None,
        limited: false,
    };
    // 40 jobs whose lease is about to run out (claimed long ago), 60 fresh ones.
    let old = job_fetch_available(&db.pool, &claim(40)).await.unwrap();
    sqlx::query("UPDATE shardq.jobs SET lease_expires_at = now() + interval '3 seconds' WHERE id = ANY($1)")
        .bind(old.iter().map(|j| j.id).collect::<Vec<i64>>())
        .execute(&db.pool)
        .await
        .unwrap();
    let fresh = job_fetch_available(&db.pool, &claim(100)).await.unwrap();
    assert_eq!((old.len(), fresh.len()), (40, 60));
    let mut all: Vec<_> = old.iter().chain(&fresh).map(|j| j.key()).collect();
    all.sort_unstable();
    let mut tx = db.pool.begin().await.unwrap();
    let counts = "SELECT pg_stat_get_xact_tuples_updated('shardq.jobs'::regclass)";
    let before: i64 = sqlx::query_scalar(counts).fetch_one(&mut *tx).await.unwrap();
    let held = job_lease_renew(&mut *tx, &all, "node", 30.0, 25.0).await.unwrap();
    let after: i64 = sqlx::query_scalar(counts).fetch_one(&mut *tx).await.unwrap();
    let none = job_lease_renew(&mut *tx, &all, "another-node", 30.0, 25.0)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(after - before, 40, "only the leases about to run out were written");
    let mut got: Vec<_> = held.iter().map(|(run, _)| *run).collect();
    got.sort_unstable();
    assert_eq!(got, all, "every lease is reported held");
    for (run, left) in &held {
        assert!(*left > 25.0 && *left <= 30.0, "job {}: {left} s left", run.id);
    }
    assert!(none.is_empty(), "another node holds none of them");
}

/// Whether `EXPLAIN (ANALYZE)` of the claim's generic plan, on a session
/// with `settings`, JIT-compiled it (its plan has a "JIT" section).
async fn claim_jit_compiled(options: sqlx::postgres::PgConnectOptions, settings: &[(&str, &str)]) -> bool {
    use sqlx::{ConnectOptions, Connection};
    let mut conn = options.options(settings.iter().copied()).connect().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("SET LOCAL plan_cache_mode = force_generic_plan")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(&format!(
        "PREPARE shardq_jit_probe(text, bigint, text, float8, float8) AS {JOB_FETCH_AVAILABLE_SQL}"
    ))
    .execute(&mut *tx)
    .await
    .unwrap();
    let plan: serde_json::Value = sqlx::query_scalar::<_, sqlx::types::Json<serde_json::Value>>(
        "EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE shardq_jit_probe('default', 64, 'node', 30, 300)",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap()
    .0;
    tx.rollback().await.unwrap();
    assert_eq!(plan[0]["Plan"]["Actual Rows"], 64, "the probe claimed a full batch");
    plan[0].get("JIT").is_some()
}

#[tokio::test]
async fn the_engine_never_jit_compiles_the_claim() {
    let f = fleet().await;
    let db = f.router.shards()[0].clone();
    let target = &f.config.shards[0].database.target;
    sqlx::query(
        "INSERT INTO shardq.jobs (account, queue, kind, args)
         SELECT 'a' || (i % 1000), 'default', 'noop', '{}' FROM generate_series(1, 100000) AS i",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE shardq.jobs").execute(&db.pool).await.unwrap();
    let jit_available: bool = sqlx::query_scalar("SELECT pg_jit_available() AND current_setting('jit')::bool")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    if jit_available {
        // The defect the engine's settings remove: the planner's estimate
        // for the claim is high enough that a default session compiles it.
        assert!(
            claim_jit_compiled(target.connect_options().into_inner(), &[]).await,
            "a default session JIT-compiles the claim of a 100k backlog"
        );
    }
    assert!(
        !claim_jit_compiled(
            target.connect_options().into_inner(),
            &shardq::store::ENGINE_SESSION_SETTINGS
        )
        .await,
        "the engine's sessions must not JIT-compile the claim"
    );
}

/// Every node of an `EXPLAIN (FORMAT JSON)` plan, depth first.
fn plan_nodes(node: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = vec![node];
    for child in node["Plans"].as_array().into_iter().flatten() {
        out.extend(plan_nodes(child));
    }
    out
}

/// On a shard analyzed while no job was running, the statistics say almost
/// no row is `running`; the completion of a few hundred running jobs must
/// still find them from the ids it is given (one probe of the primary key
/// per id), not scan a partial index of running rows and compare each with
/// every id (a nested loop of 300 × 300 rows). The same for the other
/// outcomes.
#[tokio::test]
async fn outcomes_find_their_rows_by_id_whatever_the_statistics_say() {
    use sqlx::Connection;
    let f = fleet().await;
    let db = f.router.shards()[0].clone();
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::query(
        "INSERT INTO shardq.jobs (account, queue, kind, args, state, finalized_at)
         SELECT 'a' || (i % 100), 'default', 'noop', '{}',
                CASE WHEN i % 2 = 0 THEN 'completed' ELSE 'available' END,
                CASE WHEN i % 2 = 0 THEN now() END
           FROM generate_series(1, 20000) AS i",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query("ANALYZE shardq.jobs").execute(&mut *conn).await.unwrap();
    // 300 jobs start running after the statistics were taken.
    let running = 300;
    let (ids, attempts, tokens): (String, String, String) = sqlx::query_as(
        "WITH claimed AS (
             UPDATE shardq.jobs SET state = 'running', attempt = 1, attempted_at = now(), locked_by = 'node',
                    lease_expires_at = now() + interval '1 hour'
              WHERE id IN (SELECT id FROM shardq.jobs WHERE state = 'available' ORDER BY id LIMIT $1)
             RETURNING id, attempt, attempted_at)
         SELECT array_agg(id ORDER BY id)::text, array_agg(attempt ORDER BY id)::text,
                array_agg(attempted_at ORDER BY id)::text
           FROM claimed",
    )
    .bind(running)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    let keys = format!("'{ids}', '{attempts}', '{tokens}'");
    let n = running as usize;
    let finish_args = format!(
        "{keys}, '{{{}}}', '{{{}}}', '{{{}}}', '{{{}}}'",
        vec!["available"; n].join(","),
        vec!["1"; n].join(","),
        vec!["NULL"; n].join(","),
        vec!["0"; n].join(",")
    );
    for (name, types, sql, args) in [
        (
            "complete",
            "bigint[], int[], timestamptz[]",
            JOB_COMPLETE_MANY_SQL,
            keys.clone(),
        ),
        (
            "finish",
            "bigint[], int[], timestamptz[], text[], float8[], text[], int[]",
            JOB_FINISH_MANY_SQL,
            finish_args,
        ),
    ] {
        let mut tx = conn.begin().await.unwrap();
        sqlx::query("SET LOCAL plan_cache_mode = force_generic_plan")
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query(&format!("PREPARE shardq_outcome_probe({types}) AS {sql}"))
            .execute(&mut *tx)
            .await
            .unwrap();
        let plan: serde_json::Value = sqlx::query_scalar::<_, sqlx::types::Json<serde_json::Value>>(&format!(
            "EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE shardq_outcome_probe({args})"
        ))
        .fetch_one(&mut *tx)
        .await
        .unwrap()
        .0;
        let written: i64 = sqlx::query_scalar("SELECT count(*) FROM shardq.jobs WHERE state = 'running'")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        sqlx::query("DEALLOCATE shardq_outcome_probe")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        assert_eq!(written, 0, "{name}: every running job was written");
        let nodes = plan_nodes(&plan[0]["Plan"]);
        let on_jobs: Vec<&&serde_json::Value> = nodes
            .iter()
            .filter(|n| n["Relation Name"] == "jobs" && n["Node Type"] != "ModifyTable")
            .collect();
        let shown = serde_json::to_string_pretty(&plan).unwrap();
        assert!(!on_jobs.is_empty(), "{name}: no scan of jobs:\n{shown}");
        for scan in &on_jobs {
            assert_eq!(
                (scan["Node Type"].as_str(), scan["Index Name"].as_str()),
                (Some("Index Scan"), Some("jobs_pkey")),
                "{name}: jobs read other than by primary key:\n{shown}"
            );
            assert_eq!(
                scan["Actual Loops"].as_i64(),
                Some(running),
                "{name}: not one probe per id:\n{shown}"
            );
        }
    }
}

/// The server's plan cache plans a prepared statement afresh for its first
/// five runs and afterwards whenever its estimate for the generic plan
/// exceeds the custom plans' (on a shard with a 5M-job backlog: every
/// claim, 3.4 ms of planning each). The engine's sessions always run the
/// generic plan, which the tests in this file check.
#[tokio::test]
async fn the_engine_plans_the_claim_once_per_session() {
    use sqlx::{ConnectOptions, Connection};
    let f = fleet().await;
    let db = f.router.shards()[0].clone();
    sqlx::query(
        "INSERT INTO shardq.jobs (account, queue, kind, args)
         SELECT 'a' || (i % 10), 'default', 'noop', '{}' FROM generate_series(1, 100) AS i",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let options = f.config.shards[0].database.target.connect_options().into_inner();
    let mut conn = options
        .options(shardq::store::ENGINE_SESSION_SETTINGS)
        .connect()
        .await
        .unwrap();
    let params = shardq::store::FetchParams {
        queue: "default",
        limit: 10,
        node: "n1",
        lease_secs: 30.0,
        aging_secs: Some(300.0),
        fair: true,
        after: None,
        limited: false,
    };
    for _ in 0..7 {
        let claimed = shardq::store::job_fetch_available(&mut conn, &params).await.unwrap();
        assert_eq!(claimed.len(), 10);
    }
    let (generic, custom): (i64, i64) =
        sqlx::query_as("SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = $1")
            .bind(shardq::store::FAIR_CLAIM.as_str())
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(
        (generic, custom),
        (7, 0),
        "runs of the claim on a generic plan and on custom plans"
    );
    conn.close().await.unwrap();
}
