//! `shardq.account_jobs` holds exactly the (account, id) of every job on its
//! shard, whatever path inserts or deletes jobs, and the job lifecycle
//! (claims, outcomes) never writes it or any index keyed by account.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use shardq::moves::{MoveOptions, Mover};
use shardq::{Account, NewJob, Runtime, RuntimeOptions, UniqueOpts};
use shardq_tests::{count_state, fast_options, fleet, wait_for, Fleet, Noop};
use sqlx::PgPool;

const WAIT: Duration = Duration::from_secs(30);

fn pool_of(f: &Fleet, shard: &str) -> PgPool {
    f.router.shard(shard).unwrap().pool.clone()
}

/// Jobs on the shard, and how many (account, id) pairs the jobs table and
/// `shardq.account_jobs` do not share (0 when they hold the same pairs).
async fn mirror(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM shardq.jobs),
                (SELECT count(*) FROM ((SELECT account, id FROM shardq.jobs EXCEPT ALL
                                        SELECT account, id FROM shardq.account_jobs)
                                       UNION ALL
                                       (SELECT account, id FROM shardq.account_jobs EXCEPT ALL
                                        SELECT account, id FROM shardq.jobs)) AS differ)",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Asserts the mirror is exact on `pool` with `jobs` jobs, after `step`.
async fn assert_mirrored(pool: &PgPool, jobs: i64, step: &str) {
    assert_eq!(
        mirror(pool).await,
        (jobs, 0),
        "after {step}: (jobs, pairs not mirrored)"
    );
}

fn later(kind: &str) -> NewJob {
    NewJob::from_json(kind, serde_json::json!({})).delay(Duration::from_secs(3600))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_jobs_mirrors_the_jobs_through_every_insert_and_delete_path() {
    let f = fleet().await;
    let names: Vec<String> = f.router.shards().iter().map(|d| d.name.clone()).collect();
    let (from, to) = (names[0].clone(), names[1].clone());
    let a = Account::new("mirror-a").unwrap();
    let b = Account::new("mirror-b").unwrap();
    f.router.place(&a, &from).await.unwrap();
    f.router.place(&b, &from).await.unwrap();
    let pool = pool_of(&f, &from);
    assert_mirrored(&pool, 0, "migrating").await;

    f.client.enqueue(&a, later("noop")).await.unwrap();
    assert_mirrored(&pool, 1, "enqueue").await;

    let once = || later("noop").unique(UniqueOpts::new().key("once"));
    assert!(!f.client.enqueue_unique(&a, once()).await.unwrap().duplicate);
    assert!(f.client.enqueue_unique(&a, once()).await.unwrap().duplicate);
    assert_mirrored(&pool, 2, "a unique job and its duplicate").await;

    let batch = (0..50).map(|i| (if i % 2 == 0 { a.clone() } else { b.clone() }, later("noop")));
    f.client.enqueue_many(batch).await.unwrap();
    assert_mirrored(&pool, 52, "enqueue_many").await;

    let mut tx = pool.begin().await.unwrap();
    f.client.enqueue_in(&mut tx, &a, later("noop")).await.unwrap();
    tx.rollback().await.unwrap();
    assert_mirrored(&pool, 52, "an enqueue rolled back with its transaction").await;
    let mut tx = pool.begin().await.unwrap();
    f.client.enqueue_in(&mut tx, &a, later("noop")).await.unwrap();
    tx.commit().await.unwrap();
    assert_mirrored(&pool, 53, "enqueue_in").await;

    sqlx::query("SELECT shardq.enqueue($1, 'default', 'noop', '{}', run_at => now() + interval '1 hour')")
        .bind(b.as_str())
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO shardq.jobs (account, queue, kind, run_at)
         SELECT $1, 'default', 'noop', now() + interval '1 hour' FROM generate_series(1, 10)",
    )
    .bind(b.as_str())
    .execute(&pool)
    .await
    .unwrap();
    assert_mirrored(&pool, 64, "shardq.enqueue and the application's own INSERT").await;

    // Due now: the engine runs them, the pruner deletes them.
    let due = (0..20).map(|_| (b.clone(), NewJob::from_json("noop", serde_json::json!({}))));
    f.client.enqueue_many(due).await.unwrap();
    assert_mirrored(&pool, 84, "due jobs enqueued").await;
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 8)
        .register(Noop)
        .options(RuntimeOptions {
            retain_completed: Duration::ZERO,
            prune_interval: Duration::from_millis(50),
            ..fast_options()
        })
        .start()
        .unwrap();
    wait_for("the 20 due jobs run and pruned", WAIT, || async {
        mirror(&pool).await.0 == 64 && count_state(&f.router, &from, "completed").await == 0
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await;
    assert_mirrored(&pool, 64, "pruning").await;

    let a_jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM shardq.jobs WHERE account = $1")
        .bind(a.as_str())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(a_jobs, 28);
    Mover::new(f.router.clone(), MoveOptions::default())
        .move_account(&a, &to)
        .await
        .unwrap();
    assert_mirrored(&pool, 64 - a_jobs, "moving an account off").await;
    assert_mirrored(&pool_of(&f, &to), a_jobs, "moving an account in").await;

    sqlx::query("TRUNCATE shardq.jobs CASCADE")
        .execute(&pool)
        .await
        .unwrap();
    assert_mirrored(&pool, 0, "TRUNCATE").await;
}

/// `(ctid, xmin)` of every row of `shardq.account_jobs`: a row updated,
/// or deleted and inserted again, changes both.
async fn row_versions(pool: &PgPool) -> Vec<(String, String)> {
    sqlx::query_as("SELECT ctid::text, xmin::text FROM shardq.account_jobs ORDER BY ctid")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_and_outcomes_never_write_account_jobs_or_an_index_keyed_by_account() {
    let f = fleet().await;
    let shard = f.router.shards()[0].name.clone();
    let pool = pool_of(&f, &shard);
    let accounts: Vec<Account> = (0..20)
        .map(|i| Account::new(format!("lifecycle-{i}")).unwrap())
        .collect();
    for a in &accounts {
        f.router.place(a, &shard).await.unwrap();
    }
    let jobs = (0..500).map(|i| {
        (
            accounts[i % 20].clone(),
            NewJob::from_json("noop", serde_json::json!({})),
        )
    });
    f.client.enqueue_many(jobs).await.unwrap();
    let before = row_versions(&pool).await;
    assert_eq!(before.len(), 500);

    let rt = Runtime::builder(f.router.clone())
        .queue("default", 16)
        .register(Noop)
        .options(fast_options())
        .start()
        .unwrap();
    wait_for("the 500 jobs completed", WAIT, || async {
        count_state(&f.router, &shard, "completed").await == 500
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        row_versions(&pool).await,
        before,
        "claiming and completing rewrote rows of shardq.account_jobs"
    );

    // Every state change of a job writes an entry into every index of the
    // jobs table whose predicate holds; none that holds for every job may
    // have `account` among its keys.
    let keyed_by_account: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_index i
           JOIN pg_class c ON c.oid = i.indexrelid
           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
          WHERE i.indrelid = 'shardq.jobs'::regclass AND a.attname = 'account' AND i.indpred IS NULL
          ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        keyed_by_account.is_empty(),
        "indexes of shardq.jobs keyed by account on every job: {keyed_by_account:?}"
    );
}
