//! The dashboard's statements at a million jobs per shard: every one keeps
//! an index plan (no sequential scan of `shardq.jobs`, also under a generic
//! plan) and reads a bounded number of rows, measured with `EXPLAIN
//! ANALYZE`. Then every page is rendered over HTTP and its time printed
//! (a figure for the README, not an assertion).
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use shardq::Account;
use shardq_dashboard::store::{
    ACCOUNT_COUNTS_SQL, ACCOUNT_COUNT_CAP, DISCARDED_OF_KIND_SQL, JOBS_FILTERED_SQL, JOBS_FRONTIER_SQL,
    JOBS_NEWEST_SQL, JOBS_OF_ACCOUNT_FILTERED_SQL, JOBS_OF_ACCOUNT_FRONTIER_SQL, JOBS_OF_ACCOUNT_SQL, RETRY_LIMIT,
    RETRY_SCAN_CAP, SCAN_CAP, THROUGHPUT_SQL,
};
use shardq_dashboard::{Actions, Dashboard, DashboardOptions};
use shardq_tests::{assert_indexed, fleet, generic_plan};

/// Jobs per shard.
const ROWS: i64 = 1_000_000;

/// Fills a shard with `ROWS` jobs in one statement: 10,000 accounts, 3
/// queues, 20 kinds; 70% completed and 10% discarded (finished over the
/// last week, about 6,000 of them in the last hour), 10% due, 9.9%
/// scheduled, 0.1% running. Ids grow with `created_at`, as in real use.
const FILL_SQL: &str = "INSERT INTO shardq.jobs
        (account, queue, kind, args, state, attempt, max_attempts, run_at, created_at, attempted_at, finalized_at, locked_by)
     SELECT 'acct-' || (g % 10000),
            (ARRAY['default', 'mail', 'reports'])[g % 3 + 1],
            'kind-' || (g % 20),
            '{}',
            s.state,
            CASE WHEN s.state = 'available' THEN 0 ELSE 1 END,
            CASE WHEN s.state = 'discarded' THEN 1 ELSE 20 END,
            CASE WHEN g % 10 = 9 AND s.state = 'available' THEN now() + interval '1 day' ELSE t.created END,
            t.created,
            CASE WHEN s.state NOT IN ('available') THEN t.created END,
            CASE WHEN s.state IN ('completed', 'discarded') THEN t.created + interval '1 second' END,
            CASE WHEN s.state = 'running' THEN 'node-1' END
       FROM generate_series(1, $1::bigint) AS g
      CROSS JOIN LATERAL (SELECT now() - ($1::bigint - g) * interval '600 milliseconds' AS created) AS t
      CROSS JOIN LATERAL (SELECT CASE
            WHEN g % 1000 = 999 THEN 'running'
            WHEN g % 10 < 7 THEN 'completed'
            WHEN g % 10 = 7 THEN 'discarded'
            ELSE 'available' END AS state) AS s";

/// A statement to check: (name, SQL, parameter types, generic-plan args,
/// literal args, most rows any node may read).
type Probe<'a> = (&'a str, &'a str, &'a str, String, Vec<&'a str>, i64);

/// The largest `rows × loops` of any node of an `EXPLAIN ANALYZE` output.
fn most_rows(plan: &str) -> i64 {
    plan.lines()
        .filter_map(|line| {
            let actual = line.split("(actual ").nth(1)?;
            let rows: f64 = actual.split("rows=").nth(1)?.split(' ').next()?.parse().ok()?;
            let loops: f64 = actual
                .split("loops=")
                .nth(1)?
                .trim_end_matches(')')
                .split(')')
                .next()?
                .parse()
                .ok()?;
            Some((rows * loops) as i64)
        })
        .max()
        .unwrap_or(0)
}

async fn explain_analyze(conn: &mut sqlx::PgConnection, sql: &str, args: &[&str]) -> String {
    // Inline the literal arguments: `$n` → its value, highest first.
    let mut text = sql.to_string();
    for (i, arg) in args.iter().enumerate().rev() {
        text = text.replace(&format!("${}", i + 1), arg);
    }
    let lines: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN (ANALYZE, BUFFERS) {text}"))
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    lines.join("\n")
}

#[tokio::test]
async fn every_dashboard_statement_reads_a_bounded_index_range_at_a_million_jobs() {
    let f = fleet().await;
    let started = Instant::now();
    let fills = f.router.shards().iter().map(|db| async move {
        let mut conn = db.pool.acquire().await.unwrap();
        // A fill takes longer than the pool's statement timeout.
        sqlx::query("SET statement_timeout = 0")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query(FILL_SQL).bind(ROWS).execute(&mut *conn).await.unwrap();
        sqlx::query("VACUUM ANALYZE shardq.jobs")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query("RESET statement_timeout")
            .execute(&mut *conn)
            .await
            .unwrap();
    });
    futures::future::join_all(fills).await;
    eprintln!(
        "filled {} shards with {ROWS} jobs each in {:?}",
        f.router.shards().len(),
        started.elapsed()
    );
    let db = f.router.shards()[0].clone();
    let mut conn = db.pool.acquire().await.unwrap();
    let cap = SCAN_CAP.to_string();
    let (count_cap, retry_cap, retry_limit) = (
        ACCOUNT_COUNT_CAP.to_string(),
        RETRY_SCAN_CAP.to_string(),
        RETRY_LIMIT.to_string(),
    );
    let max = i64::MAX.to_string();
    // (name, SQL, parameter types, generic-plan args, literal args, most rows any node may read)
    let statements: Vec<Probe> = vec![
        (
            "newest",
            JOBS_NEWEST_SQL,
            "bigint, bigint",
            format!("{max}, 50"),
            vec![&max, "50"],
            50,
        ),
        (
            "of account",
            JOBS_OF_ACCOUNT_SQL,
            "bigint, bigint, text",
            format!("{max}, 50, 'acct-5'"),
            vec![&max, "50", "'acct-5'"],
            100,
        ),
        (
            "filtered by kind",
            JOBS_FILTERED_SQL,
            "bigint, bigint, bigint, text, text, text",
            format!("{max}, 50, {cap}, 'kind-3', NULL, NULL"),
            vec![&max, "50", &cap, "'kind-3'", "NULL::text", "NULL::text"],
            SCAN_CAP,
        ),
        (
            "filtered by a rare state",
            JOBS_FILTERED_SQL,
            "bigint, bigint, bigint, text, text, text",
            format!("{max}, 50, {cap}, NULL, 'running', 'mail'"),
            vec![&max, "50", &cap, "NULL::text", "'cancelled'", "'mail'"],
            SCAN_CAP,
        ),
        (
            "of account, filtered",
            JOBS_OF_ACCOUNT_FILTERED_SQL,
            "bigint, bigint, bigint, text, text, text, text",
            format!("{max}, 50, {cap}, NULL, 'discarded', NULL, 'acct-7'"),
            vec![&max, "50", &cap, "NULL::text", "'discarded'", "NULL::text", "'acct-7'"],
            SCAN_CAP,
        ),
        (
            "frontier",
            JOBS_FRONTIER_SQL,
            "bigint, bigint",
            format!("{max}, {cap}"),
            vec![&max, &cap],
            SCAN_CAP,
        ),
        (
            "frontier of account",
            JOBS_OF_ACCOUNT_FRONTIER_SQL,
            "bigint, bigint, text",
            format!("{max}, {cap}, 'acct-7'"),
            vec![&max, &cap, "'acct-7'"],
            SCAN_CAP,
        ),
        ("throughput", THROUGHPUT_SQL, "", String::new(), vec![], 10_000),
        (
            "account counts",
            ACCOUNT_COUNTS_SQL,
            "text, bigint",
            format!("'acct-5', {count_cap}"),
            vec!["'acct-5'", &count_cap],
            ACCOUNT_COUNT_CAP,
        ),
        (
            "discarded of kind",
            DISCARDED_OF_KIND_SQL,
            "text, bigint, bigint",
            format!("'kind-7', {retry_cap}, {retry_limit}"),
            vec!["'kind-7'", &retry_cap, &retry_limit],
            RETRY_SCAN_CAP,
        ),
    ];
    for (name, sql, types, generic_args, args, bound) in statements {
        if !types.is_empty() {
            assert_indexed(name, &generic_plan(&mut conn, types, sql, &generic_args).await);
        }
        let plan = explain_analyze(&mut conn, sql, &args).await;
        assert_indexed(name, &plan);
        let rows = most_rows(&plan);
        assert!(rows > 0, "{name}: no row counts in:\n{plan}");
        assert!(
            rows <= bound,
            "{name}: a node read {rows} rows (bound {bound}):\n{plan}"
        );
        eprintln!("{name}: at most {rows} rows per node");
    }

    // Every page over HTTP, at a million jobs on every shard.
    let dashboard = Dashboard::new(
        f.router.clone(),
        DashboardOptions {
            actions: Actions::Trusted,
            ..DashboardOptions::default()
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(shardq_dashboard::serve_on(listener, dashboard, std::future::pending()));
    let shard = &db.name;
    // Place the account (its generated jobs are on every shard; its page
    // counts those on its shard).
    f.router.shard_for(&Account::new("acct-5").unwrap()).await.unwrap();
    let pages = [
        "/".to_string(),
        "/queues".to_string(),
        "/jobs".to_string(),
        "/jobs?kind=kind-3".to_string(),
        "/jobs?state=cancelled".to_string(),
        "/jobs?account=acct-5".to_string(),
        format!("/jobs/{shard}:500000"),
        "/accounts".to_string(),
        "/accounts/acct-5".to_string(),
    ];
    let http = reqwest::Client::new();
    for page in &pages {
        let mut best = Duration::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            let response = http.get(format!("http://{addr}{page}")).send().await.unwrap();
            let code = response.status().as_u16();
            let body = response.text().await.unwrap();
            best = best.min(t.elapsed());
            assert_eq!(code, 200, "{page}: {body}");
        }
        eprintln!("page {page}: {:.1} ms (best of 3)", best.as_secs_f64() * 1000.0);
    }
}
