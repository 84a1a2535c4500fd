//! Moves under shard server crashes: a shard's server killed before any
//! step of a move, or in the middle of its copy, leaves exactly one
//! authoritative copy of the account, and resume finishes the move once the
//! server is back.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use shardq::moves::{AccountTable, MoveOptions, Mover, Step};
use shardq::{Account, Client, NewJob};
use shardq_router::Router;
use shardq_testbed::{Server, TestBed};
use shardq_tests::{fleet_on, on_server, private_bed, wait_for, Fleet};

const WAIT: Duration = Duration::from_secs(30);

fn docs_moves() -> MoveOptions {
    MoveOptions {
        tables: vec![AccountTable {
            table: "docs".into(),
            column: "account".into(),
        }],
        batch: 7,
        ..MoveOptions::default()
    }
}

/// A fresh fleet on `bed` whose router gives up on a dead shard server
/// after 300 ms (the default waits 5 s for a connection).
async fn fleet_quick_to_fail(bed: &TestBed) -> Fleet {
    let mut config = fleet_on(bed).await.config;
    for s in &mut config.shards {
        s.database.pool.acquire_timeout = Duration::from_millis(300);
    }
    let router = Arc::new(Router::connect(&config).await.unwrap());
    Fleet {
        config,
        client: Client::new(router.clone()),
        router,
    }
}

async fn create_docs(f: &Fleet) {
    for db in f.router.shards() {
        sqlx::raw_sql("CREATE TABLE docs (id bigserial PRIMARY KEY, account text NOT NULL, title text NOT NULL)")
            .execute(&db.pool)
            .await
            .unwrap();
    }
}

/// The account's docs titles and jobs (kind, args, priority) on `shard`.
async fn rows_on(f: &Fleet, shard: &str, account: &Account) -> (Vec<String>, Vec<(String, String, i16)>) {
    let db = f.router.shard(shard).unwrap();
    let docs = sqlx::query_scalar("SELECT title FROM docs WHERE account = $1 ORDER BY title")
        .bind(account.as_str())
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let jobs = sqlx::query_as("SELECT kind, args::text, priority FROM shardq.jobs WHERE account = $1 ORDER BY id")
        .bind(account.as_str())
        .fetch_all(&db.pool)
        .await
        .unwrap();
    (docs, jobs)
}

/// Places `name` on shard_1 with 30 docs and 20 scheduled jobs.
async fn an_account_on_shard_1(f: &Fleet, name: &str) -> Account {
    let a = Account::new(name).unwrap();
    f.router.place(&a, "shard_1").await.unwrap();
    let db = f.router.shard("shard_1").unwrap();
    for i in 0..30 {
        sqlx::query("INSERT INTO docs (account, title) VALUES ($1, $2)")
            .bind(a.as_str())
            .bind(format!("doc {i:02}"))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    for i in 0..20 {
        let job = NewJob::from_json("later", serde_json::json!({ "i": i }))
            .priority((i % 3) as i16)
            .delay(Duration::from_secs(3600));
        f.client.enqueue(&a, job).await.unwrap();
    }
    a
}

/// Resumes move `id` until it is done, and checks that the account's rows
/// and jobs are all on shard_2, none left on shard_1.
async fn resumed_to_one_copy(
    f: &Fleet,
    id: i64,
    a: &Account,
    before: &(Vec<String>, Vec<(String, String, i16)>),
    what: &str,
) {
    let done = Mover::new(f.router.clone(), MoveOptions::default())
        .resume(id)
        .await
        .unwrap_or_else(|e| panic!("{what}: resume after the restart failed: {e}"));
    assert_eq!(done.step, Step::Done, "{what}");
    assert_eq!(f.router.shard_for(a).await.unwrap().shard, "shard_2", "{what}");
    assert_eq!(
        &rows_on(f, "shard_2", a).await,
        before,
        "{what}: the new shard has everything once"
    );
    let left = rows_on(f, "shard_1", a).await;
    assert!(
        left.0.is_empty() && left.1.is_empty(),
        "{what}: the old shard kept {left:?}"
    );
}

/// Where the account's rows are authoritative while a server is down: the
/// master's placement names one shard, and that shard holds every row.
async fn one_authoritative_copy(
    f: &Fleet,
    bed: &Arc<TestBed>,
    a: &Account,
    before: &(Vec<String>, Vec<(String, String, i16)>),
    what: &str,
) {
    let owner = f.router.placement(a).await.unwrap().unwrap().0;
    if bed.server(&owner).unwrap().is_accepting() {
        assert_eq!(
            &rows_on(f, &owner, a).await,
            before,
            "{what}: the placed shard {owner} holds every row"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_server_killed_before_any_step_leaves_one_copy_and_resume_finishes() {
    let bed = private_bed(2).await;
    let f = fleet_quick_to_fail(&bed).await;
    create_docs(&f).await;
    // started, paused, precopied, fenced, copied, switched: each shard's
    // server killed after each.
    for stop_after in 0..6 {
        for crashed in ["shard_1", "shard_2"] {
            let what = format!("{crashed} killed after {stop_after} steps");
            let a = an_account_on_shard_1(&f, &format!("crash-{stop_after}-{crashed}")).await;
            let before = rows_on(&f, "shard_1", &a).await;
            let mover = Mover::new(f.router.clone(), docs_moves());
            let mut m = mover.start(&a, "shard_2").await.unwrap();
            for _ in 0..stop_after {
                m = mover.step(&m).await.unwrap();
            }
            on_server(&bed, crashed, Server::kill).await;
            // Every step after these touches both shards: the move stops at
            // the dead server with its error recorded, and nothing is lost.
            let e = mover.resume(m.id).await.expect_err(&what);
            let stuck = mover.get(m.id).await.unwrap();
            assert!(stuck.error.is_some(), "{what}: the failure is recorded ({e})");
            assert!(
                !matches!(stuck.step, Step::Done | Step::Aborted),
                "{what}: stopped at {}",
                stuck.step
            );
            one_authoritative_copy(&f, &bed, &a, &before, &what).await;
            on_server(&bed, crashed, Server::start).await;
            resumed_to_one_copy(&f, m.id, &a, &before, &what).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_new_shards_server_crashing_mid_copy_leaves_one_copy_and_resume_finishes() {
    let bed = private_bed(2).await;
    let f = fleet_quick_to_fail(&bed).await;
    create_docs(&f).await;
    let a = an_account_on_shard_1(&f, "crash-mid-copy").await;
    let before = rows_on(&f, "shard_1", &a).await;
    let mover = Mover::new(f.router.clone(), docs_moves());
    let m = mover.start(&a, "shard_2").await.unwrap();
    let m = mover.step(&m).await.unwrap();
    assert_eq!(m.step, Step::Paused);
    // The copy's inserts into docs on shard_2 wait behind this lock, so the
    // server is killed while the copy is under way, not between steps.
    let target = f.router.shard("shard_2").unwrap();
    let mut locker = target.pool.acquire().await.unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE docs IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    let copying = {
        let mover = Mover::new(f.router.clone(), docs_moves());
        let m = m.clone();
        tokio::spawn(async move { mover.step(&m).await })
    };
    let probe = target.pool.clone();
    wait_for("the copy waits on the docs lock on shard_2", WAIT, || {
        let probe = probe.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock' AND query ILIKE '%docs%'",
            )
            .fetch_one(&probe)
            .await
            .unwrap()
                > 0
        }
    })
    .await;
    on_server(&bed, "shard_2", Server::kill).await;
    drop(locker);
    let e = copying.await.unwrap().expect_err("the copy step fails with its server");
    let stuck = mover.get(m.id).await.unwrap();
    assert_eq!(stuck.step, Step::Paused, "the copy step did not advance ({e})");
    assert_eq!(f.router.placement(&a).await.unwrap().unwrap().0, "shard_1");
    assert_eq!(
        rows_on(&f, "shard_1", &a).await,
        before,
        "the old shard still holds every row"
    );
    on_server(&bed, "shard_2", Server::start).await;
    resumed_to_one_copy(&f, m.id, &a, &before, "shard_2 killed mid-copy").await;
}
