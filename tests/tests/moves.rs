//! Moving accounts between shards online: rows and jobs go along exactly
//! once, stale routers never write to the old shard, and a mover stopped
//! at any step is resumed or aborted cleanly.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use shardq::moves::{AccountTable, MoveOptions, Mover, Step};
use shardq::{Account, Client, JobContext, JobError, NewJob, Runtime, Worker};
use shardq_router::Router;
use shardq_tests::{fast_options, fleet, wait_for, Fleet};

const WAIT: Duration = Duration::from_secs(30);

/// The application's account-scoped table, on every shard.
async fn create_docs(f: &Fleet) {
    for db in f.router.shards() {
        sqlx::raw_sql(
            "CREATE TABLE docs (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
                                account text NOT NULL, title text NOT NULL, body jsonb)",
        )
        .execute(&db.pool)
        .await
        .unwrap();
    }
}

fn docs_table() -> MoveOptions {
    MoveOptions {
        tables: vec![AccountTable {
            table: "docs".into(),
            column: "account".into(),
        }],
        ..MoveOptions::default()
    }
}

/// `options` with copy batches of 7 rows, so a copy takes several.
fn small_batches(options: MoveOptions) -> MoveOptions {
    MoveOptions { batch: 7, ..options }
}

/// Fences for `account` on `shard` that hold its jobs without refusing
/// its writes (what a move leaves on the new shard until its switch).
async fn fences_held(f: &Fleet, shard: &str, account: &Account) -> i64 {
    let db = f.router.shard(shard).unwrap();
    sqlx::query_scalar("SELECT count(*) FROM shardq.fences WHERE account = $1 AND fenced_at IS NULL")
        .bind(account.as_str())
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// Rows of `account` on `shard` in `table`.
async fn count(f: &Fleet, shard: &str, table: &str, account: &Account) -> i64 {
    let db = f.router.shard(shard).unwrap();
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE account = $1"))
        .bind(account.as_str())
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// The account's jobs on `shard` as comparable tuples, in id order.
async fn jobs_on(f: &Fleet, shard: &str, account: &Account) -> Vec<(String, String, i16, String, i32, String)> {
    let db = f.router.shard(shard).unwrap();
    sqlx::query_as(
        "SELECT kind, args::text, priority, to_char(run_at, 'YYYY-MM-DD HH24:MI:SS.US'), attempt, state
           FROM shardq.jobs WHERE account = $1 ORDER BY id",
    )
    .bind(account.as_str())
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// Places `account` on the first shard and gives it rows and jobs: 30
/// scheduled jobs of three priorities, a serial chain and a unique job.
async fn an_account_with_data(f: &Fleet, name: &str) -> (Account, String, String) {
    let a = Account::new(name).unwrap();
    let names: Vec<String> = f.router.shards().iter().map(|d| d.name.clone()).collect();
    f.router.place(&a, &names[0]).await.unwrap();
    let db = f.router.shard(&names[0]).unwrap();
    for i in 0..40 {
        sqlx::query("INSERT INTO docs (account, title, body) VALUES ($1, $2, $3)")
            .bind(a.as_str())
            .bind(format!("doc {i}"))
            .bind(sqlx::types::Json(serde_json::json!({ "i": i })))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    for i in 0..30 {
        let job = NewJob::from_json("later", serde_json::json!({ "i": i }))
            .priority((i % 3) as i16)
            .delay(Duration::from_secs(3600 + i));
        f.client.enqueue(&a, job).await.unwrap();
    }
    for i in 0..3 {
        let job = NewJob::from_json("later", serde_json::json!({ "step": i }))
            .serial_key("chain")
            .delay(Duration::from_secs(3600));
        f.client.enqueue(&a, job).await.unwrap();
    }
    let unique = NewJob::from_json("later", serde_json::json!({})).unique(shardq::UniqueOpts::new().key("once"));
    f.client
        .enqueue(&a, unique.delay(Duration::from_secs(3600)))
        .await
        .unwrap();
    (a, names[0].clone(), names[1].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_moves_with_its_rows_and_jobs_exactly_once() {
    let f = fleet().await;
    create_docs(&f).await;
    let (a, from, to) = an_account_with_data(&f, "mover-1").await;
    let before = jobs_on(&f, &from, &a).await;
    assert_eq!(before.len(), 34);
    let m = Mover::new(f.router.clone(), docs_table())
        .move_account(&a, &to)
        .await
        .unwrap();
    assert_eq!(m.step, Step::Done);
    assert_eq!(f.router.shard_for(&a).await.unwrap().shard, to);
    assert_eq!(
        (count(&f, &from, "docs", &a).await, count(&f, &to, "docs", &a).await),
        (0, 40)
    );
    assert!(jobs_on(&f, &from, &a).await.is_empty(), "no job left behind");
    assert_eq!(
        jobs_on(&f, &to, &a).await,
        before,
        "every job once, in order, as it was"
    );
    // The unique key came along: a duplicate enqueue finds the moved job.
    let dup = f
        .client
        .enqueue_unique(
            &a,
            NewJob::from_json("later", serde_json::json!({})).unique(shardq::UniqueOpts::new().key("once")),
        )
        .await
        .unwrap();
    assert!(dup.duplicate && dup.id.shard == to, "{dup:?}");
}

/// The account's fair-share weight row on `shard`, if any.
async fn weight_on(f: &Fleet, shard: &str, account: &Account) -> Option<i32> {
    let db = f.router.shard(shard).unwrap();
    sqlx::query_scalar("SELECT weight FROM shardq.account_weights WHERE account = $1")
        .bind(account.as_str())
        .fetch_optional(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_accounts_fair_share_weight_moves_with_it() {
    let f = fleet().await;
    create_docs(&f).await;
    let (a, from, to) = an_account_with_data(&f, "weighed-mover").await;
    f.client.set_account_weight(&a, Some(7)).await.unwrap();
    assert_eq!(weight_on(&f, &from, &a).await, Some(7));
    let mover = Mover::new(f.router.clone(), docs_table());
    let m = mover.start(&a, &to).await.unwrap();
    let m = mover.step(&m).await.unwrap();
    assert_eq!(m.step, Step::Paused);
    // Frozen while it moves: the move carries the weight it started with.
    let refused = f.client.set_account_weight(&a, Some(2)).await.unwrap_err();
    assert!(
        matches!(refused, shardq::Error::AccountSetting { .. }) && refused.to_string().contains("moving"),
        "{refused}"
    );
    let mut m = m;
    while m.step != Step::Done {
        m = mover.step(&m).await.unwrap();
    }
    assert_eq!(weight_on(&f, &to, &a).await, Some(7), "the weight is on the new shard");
    assert_eq!(weight_on(&f, &from, &a).await, None, "and gone from the old one");
    assert_eq!(f.client.account_weight(&a).await.unwrap(), 7);
    // Settable again after the move, on the new shard.
    f.client.set_account_weight(&a, Some(3)).await.unwrap();
    assert_eq!(weight_on(&f, &to, &a).await, Some(3));
}

#[tokio::test]
async fn an_accounts_concurrency_limits_move_with_it() {
    let f = fleet().await;
    create_docs(&f).await;
    let (a, from, to) = an_account_with_data(&f, "limited-mover").await;
    f.client.set_account_limit(&a, "email", Some(4)).await.unwrap();
    f.client.set_account_limit(&a, "reports", Some(1)).await.unwrap();
    let mover = Mover::new(f.router.clone(), docs_table());
    let m = mover.start(&a, &to).await.unwrap();
    let mut m = mover.step(&m).await.unwrap();
    let refused = f.client.set_account_limit(&a, "email", Some(2)).await.unwrap_err();
    assert!(
        matches!(refused, shardq::Error::AccountSetting { .. }) && refused.to_string().contains("moving"),
        "{refused}"
    );
    while m.step != Step::Done {
        m = mover.step(&m).await.unwrap();
    }
    let on = |shard: String| {
        let db = f.router.shard(&shard).unwrap();
        let a = a.clone();
        async move {
            sqlx::query_as::<_, (String, i32)>(
                "SELECT queue, max_running FROM shardq.account_limits WHERE account = $1 ORDER BY queue",
            )
            .bind(a.as_str())
            .fetch_all(&db.pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(on(to.clone()).await, vec![("email".into(), 4), ("reports".into(), 1)]);
    assert!(on(from.clone()).await.is_empty(), "gone from the old shard");
    assert_eq!(f.client.account_limit(&a, "email").await.unwrap(), Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_router_never_writes_to_the_shard_an_account_left() {
    let f = fleet().await;
    create_docs(&f).await;
    let (a, from, to) = an_account_with_data(&f, "mover-2").await;
    // A second process's router caches the old placement.
    let stale = Arc::new(Router::connect(&f.config).await.unwrap());
    assert_eq!(stale.shard_for(&a).await.unwrap().shard, from);
    Mover::new(f.router.clone(), docs_table())
        .move_account(&a, &to)
        .await
        .unwrap();
    // Its job enqueue lands on the new shard...
    let id = Client::new(stale.clone())
        .enqueue(&a, NewJob::from_json("later", serde_json::json!({ "late": true })))
        .await
        .unwrap();
    assert_eq!(id.shard, to);
    // ...and so does a fenced transaction.
    let mut tx = stale.begin(&a).await.unwrap();
    assert_eq!(tx.shard(), to);
    sqlx::query("INSERT INTO docs (account, title) VALUES ($1, 'late')")
        .bind(a.as_str())
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        (count(&f, &from, "docs", &a).await, count(&f, &to, "docs", &a).await),
        (0, 41)
    );
    // The old shard itself refuses the account's jobs, whoever writes them.
    let old = f.router.shard(&from).unwrap();
    let refused = sqlx::query("INSERT INTO shardq.jobs (account, queue, kind) VALUES ($1, 'default', 'x')")
        .bind(a.as_str())
        .execute(&old.pool)
        .await
        .unwrap_err();
    let fenced = shardq_router::router::fenced(&refused).expect("a fence refusal");
    assert_eq!(
        (fenced.account.as_str(), fenced.moved_to.as_str()),
        (a.as_str(), to.as_str())
    );
    // Without any write, the stale router learns of the move from the master.
    let other = Account::new("mover-2b").unwrap();
    stale.place(&other, &from).await.unwrap();
    assert_eq!(stale.shard_for(&other).await.unwrap().shard, from);
    Mover::new(f.router.clone(), MoveOptions::default())
        .move_account(&other, &to)
        .await
        .unwrap();
    wait_for("the stale router sees the move", WAIT, || async {
        stale.shard_for(&other).await.unwrap().shard == to
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_enqueued_during_a_move_land_once_on_the_new_shard() {
    let f = fleet().await;
    create_docs(&f).await;
    let (a, from, to) = an_account_with_data(&f, "mover-3").await;
    let writer = {
        let client = Client::new(Arc::new(Router::connect(&f.config).await.unwrap()));
        let a = a.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..300 {
                let job =
                    NewJob::from_json("later", serde_json::json!({ "during": i })).delay(Duration::from_secs(3600));
                ids.push(client.enqueue(&a, job).await.unwrap());
            }
            ids
        })
    };
    // Let some land before the move starts.
    wait_for("the writer is under way", WAIT, || async {
        jobs_on(&f, &from, &a).await.len() > 40
    })
    .await;
    Mover::new(f.router.clone(), docs_table())
        .move_account(&a, &to)
        .await
        .unwrap();
    let ids = writer.await.unwrap();
    assert!(jobs_on(&f, &from, &a).await.is_empty());
    let on_new = jobs_on(&f, &to, &a).await;
    let during: Vec<_> = on_new.iter().filter(|j| j.1.contains("during")).collect();
    assert_eq!(during.len(), 300, "every acknowledged enqueue, once");
    let distinct: std::collections::BTreeSet<_> = during.iter().map(|j| j.1.clone()).collect();
    assert_eq!(distinct.len(), 300, "no job twice");
    assert!(ids.iter().any(|id| id.shard == from) && ids.iter().any(|id| id.shard == to));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mover_stopped_after_any_step_is_resumed_to_one_copy() {
    let f = fleet().await;
    create_docs(&f).await;
    // started, paused, precopied, fenced, copied, switched: stopped after each.
    for stop_after in 0..6 {
        let (a, from, to) = an_account_with_data(&f, &format!("mover-4-{stop_after}")).await;
        let before = jobs_on(&f, &from, &a).await;
        let mover = Mover::new(f.router.clone(), small_batches(docs_table()));
        let mut m = mover.start(&a, &to).await.unwrap();
        for _ in 0..stop_after {
            m = mover.step(&m).await.unwrap();
        }
        drop(mover); // the mover dies here; a new one resumes
                     // The move recorded its tables: the resuming mover is given none.
        let done = Mover::new(f.router.clone(), MoveOptions::default())
            .resume(m.id)
            .await
            .unwrap();
        assert_eq!(done.step, Step::Done, "stopped after {stop_after} steps");
        assert_eq!(f.router.shard_for(&a).await.unwrap().shard, to);
        assert_eq!(
            (count(&f, &from, "docs", &a).await, count(&f, &to, "docs", &a).await),
            (0, 40),
            "stopped after {stop_after} steps"
        );
        assert!(jobs_on(&f, &from, &a).await.is_empty());
        assert_eq!(jobs_on(&f, &to, &a).await, before, "stopped after {stop_after} steps");
        assert_eq!(fences_held(&f, &to, &a).await, 0, "the hold on the new shard is lifted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_aborted_before_its_switch_leaves_the_account_where_it_was() {
    let f = fleet().await;
    create_docs(&f).await;
    // Aborted at started, paused, precopied, fenced and copied.
    for steps in 0..5 {
        let (a, from, to) = an_account_with_data(&f, &format!("mover-5-{steps}")).await;
        let before = jobs_on(&f, &from, &a).await;
        let mover = Mover::new(f.router.clone(), docs_table());
        let mut m = mover.start(&a, &to).await.unwrap();
        for _ in 0..steps {
            m = mover.step(&m).await.unwrap();
        }
        if steps >= 2 {
            // Past the pre-copy the new shard holds a copy...
            assert_eq!(count(&f, &to, "docs", &a).await, 40, "after {steps} steps");
            assert_eq!(jobs_on(&f, &to, &a).await.len(), before.len(), "after {steps} steps");
        }
        assert_eq!(mover.abort(m.id).await.unwrap().step, Step::Aborted);
        assert_eq!(f.router.shard_for(&a).await.unwrap().shard, from);
        // ...which the abort deleted; the old shard is intact.
        assert_eq!(count(&f, &to, "docs", &a).await, 0, "after {steps} steps");
        assert!(jobs_on(&f, &to, &a).await.is_empty(), "after {steps} steps");
        assert_eq!(count(&f, &from, "docs", &a).await, 40);
        assert_eq!(jobs_on(&f, &from, &a).await, before, "after {steps} steps");
        // Writes work on the old shard again.
        let id = f
            .client
            .enqueue(&a, NewJob::from_json("later", serde_json::json!({})))
            .await
            .unwrap();
        assert_eq!(id.shard, from);
        let tx = f.router.begin(&a).await.unwrap();
        assert_eq!(tx.shard(), from);
        tx.rollback().await.unwrap();
    }
    // Past the switch there is no way back.
    let (a, _, to) = an_account_with_data(&f, "mover-5-late").await;
    let mover = Mover::new(f.router.clone(), docs_table());
    let mut m = mover.start(&a, &to).await.unwrap();
    for _ in 0..5 {
        m = mover.step(&m).await.unwrap();
    }
    assert_eq!(m.step, Step::Switched);
    let err = mover.abort(m.id).await.unwrap_err().to_string();
    assert!(err.contains("resumed"), "{err}");
    mover.resume(m.id).await.unwrap();
}

/// `gate`: runs until the test opens the gate.
#[derive(Clone)]
struct Gate(tokio::sync::watch::Receiver<bool>);

impl Worker for Gate {
    type Args = serde_json::Value;
    const KIND: &'static str = "gate";
    async fn work(&self, _: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        let mut open = self.0.clone();
        let _ = open.wait_for(|o| *o).await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_finishes_on_the_old_shard_before_the_switch() {
    let f = fleet().await;
    create_docs(&f).await;
    let (a, from, to) = an_account_with_data(&f, "mover-6").await;
    let running = f
        .client
        .enqueue(&a, NewJob::from_json("gate", serde_json::json!({})))
        .await
        .unwrap();
    let (open, gate) = tokio::sync::watch::channel(false);
    let node = Runtime::builder(f.router.clone())
        .queue("default", 4)
        .register(Gate(gate))
        .options(fast_options())
        .start()
        .unwrap();
    wait_for("the gate job runs", WAIT, || async {
        f.client.job(&running).await.unwrap().state == "running"
    })
    .await;
    let mover = Mover::new(f.router.clone(), docs_table());
    let watcher = mover.clone();
    let moving = tokio::spawn(async move { mover.move_account(&a, &to).await });
    // The move pauses the account's claims, then waits for the running job,
    // which cannot end before the gate opens.
    wait_for("the move is paused", WAIT, || async {
        watcher
            .list(0)
            .await
            .unwrap()
            .iter()
            .any(|m| m.account == "mover-6" && m.step == Step::Paused)
    })
    .await;
    assert!(!moving.is_finished(), "the move waits for the running job");
    open.send(true).unwrap();
    let m = moving.await.unwrap().unwrap();
    assert_eq!(m.step, Step::Done);
    node.shutdown(Duration::from_secs(1)).await;
    let a = Account::new("mover-6").unwrap();
    let states: BTreeMap<String, usize> =
        jobs_on(&f, &m.to, &a)
            .await
            .into_iter()
            .fold(BTreeMap::new(), |mut acc, j| {
                *acc.entry(format!("{}:{}", j.0, j.5)).or_default() += 1;
                acc
            });
    assert_eq!(states.get("gate:completed"), Some(&1), "{states:?}");
    assert!(jobs_on(&f, &from, &a).await.is_empty());
}

/// The docs of `account` on `shard`: title → body's `v`.
async fn docs_of(f: &Fleet, shard: &str, account: &Account) -> BTreeMap<String, i64> {
    let db = f.router.shard(shard).unwrap();
    let rows: Vec<(String, Option<i64>)> =
        sqlx::query_as("SELECT title, (body ->> 'v')::bigint FROM docs WHERE account = $1")
            .bind(account.as_str())
            .fetch_all(&db.pool)
            .await
            .unwrap();
    rows.into_iter().map(|(t, v)| (t, v.unwrap_or(-1))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_the_copy_end_up_on_the_new_shard_exactly_once() {
    let f = fleet().await;
    create_docs(&f).await;
    let (a, from, to) = an_account_with_data(&f, "mover-7").await;
    let mover = Mover::new(f.router.clone(), small_batches(docs_table()));
    let m = mover.start(&a, &to).await.unwrap();
    let m = mover.step(&m).await.unwrap();
    assert_eq!(m.step, Step::Paused);
    // A writer of its own: through `begin` it inserts docs, updates and
    // deletes existing ones, and enqueues jobs, until told to stop; it
    // returns what it expects to find, as acknowledged.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (progress, mut writes) = tokio::sync::watch::channel(0usize);
    let writer = {
        let router = Arc::new(Router::connect(&f.config).await.unwrap());
        let client = Client::new(router.clone());
        let a = a.clone();
        tokio::spawn(async move {
            let mut expected: BTreeMap<String, i64> = (0..40).map(|i| (format!("doc {i}"), -1)).collect();
            let mut jobs = 0usize;
            let mut i = 0i64;
            while !*stopped.borrow() || i < 60 {
                let mut tx = router.begin(&a).await.unwrap();
                sqlx::query("INSERT INTO docs (account, title, body) VALUES ($1, $2, $3)")
                    .bind(a.as_str())
                    .bind(format!("new {i}"))
                    .bind(sqlx::types::Json(serde_json::json!({ "v": i })))
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                let old = format!("doc {}", i % 40);
                if i % 3 == 0 && expected.contains_key(&old) {
                    sqlx::query("DELETE FROM docs WHERE account = $1 AND title = $2")
                        .bind(a.as_str())
                        .bind(&old)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                } else {
                    sqlx::query("UPDATE docs SET body = $3 WHERE account = $1 AND title = $2")
                        .bind(a.as_str())
                        .bind(&old)
                        .bind(sqlx::types::Json(serde_json::json!({ "v": i })))
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                }
                tx.commit().await.unwrap();
                if i % 3 == 0 && expected.contains_key(&old) {
                    expected.remove(&old);
                } else if let Some(v) = expected.get_mut(&old) {
                    *v = i;
                }
                expected.insert(format!("new {i}"), i);
                let job =
                    NewJob::from_json("later", serde_json::json!({ "during": i })).delay(Duration::from_secs(3600));
                client.enqueue(&a, job).await.unwrap();
                jobs += 1;
                i += 1;
                let _ = progress.send(i as usize);
            }
            (expected, jobs)
        })
    };
    // Writes land while the copy runs and after it, before the fence.
    writes.wait_for(|n| *n >= 20).await.unwrap();
    let m = mover.step(&m).await.unwrap();
    assert_eq!(m.step, Step::Precopied);
    let copied_at = *writes.borrow();
    writes.wait_for(|n| *n >= copied_at + 20).await.unwrap();
    let m = mover.step(&m).await.unwrap();
    assert_eq!(m.step, Step::Fenced);
    // The writer waits out the pause and goes on on the new shard.
    let mover2 = mover.clone();
    let id = m.id;
    let rest = tokio::spawn(async move { mover2.resume(id).await });
    let done = rest.await.unwrap().unwrap();
    assert_eq!(done.step, Step::Done);
    stop.send(true).unwrap();
    let (expected, enqueued) = writer.await.unwrap();
    assert!(enqueued >= 60);
    assert_eq!(count(&f, &from, "docs", &a).await, 0);
    assert!(jobs_on(&f, &from, &a).await.is_empty());
    assert_eq!(docs_of(&f, &to, &a).await, expected, "every doc once, as last written");
    let on_new = jobs_on(&f, &to, &a).await;
    let during: Vec<String> = on_new
        .iter()
        .filter(|j| j.1.contains("during"))
        .map(|j| j.1.clone())
        .collect();
    let distinct: std::collections::BTreeSet<_> = during.iter().cloned().collect();
    assert_eq!(
        (during.len(), distinct.len()),
        (enqueued, enqueued),
        "every acknowledged enqueue once"
    );
    assert_eq!(on_new.len(), 34 + enqueued);
}

/// `tally`: counts its runs per account.
#[derive(Clone)]
struct Tally(Arc<std::sync::Mutex<BTreeMap<String, usize>>>);

impl Worker for Tally {
    type Args = serde_json::Value;
    const KIND: &'static str = "tally";
    async fn work(&self, ctx: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        *self.0.lock().unwrap().entry(ctx.account.clone()).or_default() += 1;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_copied_before_the_switch_are_not_claimed_on_the_new_shard_before_it() {
    let f = fleet().await;
    create_docs(&f).await;
    let (a, from, to) = an_account_with_data(&f, "mover-8").await;
    for i in 0..20 {
        f.client
            .enqueue(&a, NewJob::from_json("tally", serde_json::json!({ "i": i })))
            .await
            .unwrap();
    }
    let mover = Mover::new(f.router.clone(), docs_table());
    let mut m = mover.start(&a, &to).await.unwrap();
    while m.step != Step::Copied {
        m = mover.step(&m).await.unwrap();
    }
    // Due copies of its jobs are on the new shard; a node works both shards.
    let tally = Tally(Arc::default());
    let node = Runtime::builder(f.router.clone())
        .queue("default", 4)
        .register(tally.clone())
        .options(fast_options())
        .start()
        .unwrap();
    // Another account's jobs on the new shard run: the node claims there...
    let b = Account::new("mover-8-other").unwrap();
    f.router.place(&b, &to).await.unwrap();
    for i in 0..5 {
        f.client
            .enqueue(&b, NewJob::from_json("tally", serde_json::json!({ "i": i })))
            .await
            .unwrap();
    }
    wait_for("the other account's jobs ran", WAIT, || async {
        tally.0.lock().unwrap().get(b.as_str()) == Some(&5)
    })
    .await;
    // ...but not the moving account's, on either shard.
    assert_eq!(tally.0.lock().unwrap().get(a.as_str()), None);
    let available = |shard: String| {
        let f = &f;
        let a = &a;
        async move {
            jobs_on(f, &shard, a)
                .await
                .iter()
                .filter(|j| j.0 == "tally" && j.5 == "available")
                .count()
        }
    };
    assert_eq!(available(to.clone()).await, 20);
    assert_eq!(available(from.clone()).await, 20);
    // After the switch they run on the new shard, each once.
    let done = mover.resume(m.id).await.unwrap();
    assert_eq!(done.step, Step::Done);
    wait_for("the moved jobs ran", WAIT, || async {
        tally.0.lock().unwrap().get(a.as_str()) == Some(&20)
    })
    .await;
    node.shutdown(Duration::from_secs(1)).await;
    assert_eq!(tally.0.lock().unwrap().get(a.as_str()), Some(&20));
    let completed: Vec<_> = jobs_on(&f, &to, &a)
        .await
        .into_iter()
        .filter(|j| j.0 == "tally")
        .map(|j| (j.4, j.5))
        .collect();
    assert_eq!(completed, vec![(1, "completed".to_string()); 20], "each ran once");
}
