//! Unique jobs and per-key serial order against real servers: concurrent
//! duplicate enqueues insert one row, a finished unique job frees its key,
//! periods bucket by run time, a retry by hand restores the key (or is
//! refused while another job holds it), rescue and hand-back keep it;
//! serial jobs never overlap and run in order across two nodes, and a
//! failing job holds its key until it completes.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use shardq::store::JOB_FETCH_AVAILABLE_SQL;
use shardq::{
    Account, Backoff, JobContext, JobError, JobId, NewJob, Runtime, RuntimeOptions, UniqueOpts, UniqueStates, Worker,
};
use shardq_tests::{fleet, wait_for, Fleet, Noop};
use sqlx::Connection;

const WAIT: Duration = Duration::from_secs(60);

fn fast() -> RuntimeOptions {
    RuntimeOptions {
        poll_interval: Duration::from_millis(100),
        backoff: Backoff {
            base: Duration::from_millis(10),
            max: Duration::from_millis(30),
        },
        ..RuntimeOptions::default()
    }
}

fn account(name: &str) -> Account {
    Account::new(name).unwrap()
}

async fn state_of(f: &Fleet, id: &JobId) -> shardq::JobState {
    f.client.job(id).await.unwrap().state
}

async fn rows_of_kind(f: &Fleet, a: &Account, kind: &str) -> i64 {
    let db = f.router.pool_for(a).await.unwrap();
    sqlx::query_scalar("SELECT count(*) FROM shardq.jobs WHERE kind = $1")
        .bind(kind)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

// ---- unique jobs

#[tokio::test]
async fn concurrent_duplicate_enqueues_insert_one_row_and_all_get_its_id() {
    let f = fleet().await;
    let a = account("unique-race");
    let calls = (0..64).map(|_| {
        let client = f.client.clone();
        let a = a.clone();
        tokio::spawn(async move {
            let job = NewJob::from_json("report", serde_json::json!({"day": "2026-11-24"})).unique(UniqueOpts::new());
            client.enqueue_unique(&a, job).await.unwrap()
        })
    });
    let results: Vec<_> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(rows_of_kind(&f, &a, "report").await, 1);
    let first = &results[0].id;
    assert!(
        results.iter().all(|r| &r.id == first),
        "every call gets the one job's id"
    );
    assert_eq!(results.iter().filter(|r| !r.duplicate).count(), 1, "exactly one insert");
    // Different args are a different job; another account is never a duplicate.
    let other = f
        .client
        .enqueue_unique(
            &a,
            NewJob::from_json("report", serde_json::json!({"day": "2026-11-25"})).unique(UniqueOpts::new()),
        )
        .await
        .unwrap();
    assert!(!other.duplicate);
    let b = f
        .client
        .enqueue_unique(
            &account("unique-race-b"),
            NewJob::from_json("report", serde_json::json!({"day": "2026-11-24"})).unique(UniqueOpts::new()),
        )
        .await
        .unwrap();
    assert!(!b.duplicate);
}

#[tokio::test]
async fn a_completed_incomplete_unique_job_frees_its_key_but_any_keeps_it() {
    let f = fleet().await;
    let a = account("unique-states");
    let job =
        |states| NewJob::from_json("noop", serde_json::json!({})).unique(UniqueOpts::new().key("k").states(states));
    let first = f
        .client
        .enqueue_unique(&a, job(UniqueStates::Incomplete))
        .await
        .unwrap();
    let again = f
        .client
        .enqueue_unique(&a, job(UniqueStates::Incomplete))
        .await
        .unwrap();
    assert!(again.duplicate && again.id == first.id);
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 4)
        .register(Noop)
        .options(fast())
        .start()
        .unwrap();
    wait_for("the unique job completed", WAIT, || async {
        state_of(&f, &first.id).await == "completed"
    })
    .await;
    let after = f
        .client
        .enqueue_unique(&a, job(UniqueStates::Incomplete))
        .await
        .unwrap();
    assert!(!after.duplicate, "a completed job no longer holds an Incomplete key");
    assert_ne!(after.id, first.id);
    wait_for("the second job completed", WAIT, || async {
        state_of(&f, &after.id).await == "completed"
    })
    .await;

    let kept =
        NewJob::from_json("noop", serde_json::json!({})).unique(UniqueOpts::new().key("any").states(UniqueStates::Any));
    let any = f.client.enqueue_unique(&a, kept.clone()).await.unwrap();
    wait_for("the Any job completed", WAIT, || async {
        state_of(&f, &any.id).await == "completed"
    })
    .await;
    let dup = f.client.enqueue_unique(&a, kept).await.unwrap();
    assert!(
        dup.duplicate && dup.id == any.id,
        "a completed job still holds an Any key"
    );
    rt.shutdown(Duration::from_secs(5)).await;
}

/// Fails every run.
struct AlwaysFails;
impl Worker for AlwaysFails {
    type Args = serde_json::Value;
    const KIND: &'static str = "always-fails";
    async fn work(&self, _: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        Err(JobError::failed("boom"))
    }
}

fn keyed_failing(key: &str) -> NewJob {
    NewJob::from_json("always-fails", serde_json::json!({}))
        .max_attempts(1)
        .unique(UniqueOpts::new().key(key))
}

#[tokio::test]
async fn a_discarded_unique_job_retried_by_hand_gets_its_key_back() {
    let f = fleet().await;
    let a = account("unique-retry");
    let first = f.client.enqueue_unique(&a, keyed_failing("k")).await.unwrap();
    assert!(!first.duplicate);
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 4)
        .register(AlwaysFails)
        .options(fast())
        .start()
        .unwrap();
    wait_for("the unique job was discarded", WAIT, || async {
        state_of(&f, &first.id).await == "discarded"
    })
    .await;
    // Stopped, so the retried job stays available while the duplicate is enqueued.
    rt.shutdown(Duration::from_secs(5)).await;
    let retried = f.client.retry(&first.id).await.unwrap();
    assert_eq!(retried.state, "available");
    let dup = f.client.enqueue_unique(&a, keyed_failing("k")).await.unwrap();
    assert!(
        dup.duplicate && dup.id == first.id,
        "the retried job holds its key again: {dup:?}"
    );
    assert_eq!(rows_of_kind(&f, &a, "always-fails").await, 1, "no second job");
}

/// A unique job of key `key` that has not run (due in an hour), cancelled:
/// its key is released.
async fn cancelled_unique(f: &Fleet, a: &Account, key: &str) -> JobId {
    let job = keyed_failing(key).delay(Duration::from_secs(3600));
    let e = f.client.enqueue_unique(a, job).await.unwrap();
    assert!(!e.duplicate, "{key} was free");
    f.client.cancel(&e.id).await.unwrap();
    e.id
}

#[tokio::test]
async fn retrying_a_unique_job_whose_key_another_job_holds_is_refused_and_changes_nothing() {
    let f = fleet().await;
    let a = account("unique-retry-held");
    let old = cancelled_unique(&f, &a, "k").await;
    let holder = f.client.enqueue_unique(&a, keyed_failing("k")).await.unwrap();
    assert!(!holder.duplicate, "the cancelled job released its key");
    let before = f.client.job(&old).await.unwrap();

    let err = f.client.retry(&old).await.unwrap_err();
    assert!(
        matches!(&err, shardq::Error::UniqueConflict { id, state, holder: h }
            if id == &old && state == "cancelled" && h == &holder.id),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&old.to_string()) && msg.contains(&holder.id.to_string()) && msg.contains("unique key"),
        "{msg}"
    );
    let after = f.client.job(&old).await.unwrap();
    assert_eq!(
        (
            &after.state,
            &after.errors,
            after.max_attempts,
            after.attempt,
            after.run_at,
            after.finalized_at
        ),
        (
            &before.state,
            &before.errors,
            before.max_attempts,
            before.attempt,
            before.run_at,
            before.finalized_at
        ),
        "a refused retry changes nothing"
    );
    let dup = f.client.enqueue_unique(&a, keyed_failing("k")).await.unwrap();
    assert!(dup.duplicate && dup.id == holder.id, "the holder keeps the key");

    // Once the holder lets go of the key, the retry goes through and takes it.
    f.client.cancel(&holder.id).await.unwrap();
    assert_eq!(f.client.retry(&old).await.unwrap().state, "available");
    let dup = f.client.enqueue_unique(&a, keyed_failing("k")).await.unwrap();
    assert!(dup.duplicate && dup.id == old, "the retried job holds the key");
}

#[tokio::test]
async fn concurrent_retries_of_jobs_sharing_a_key_let_exactly_one_through() {
    let f = fleet().await;
    let a = account("unique-retry-race");
    for round in 0..8 {
        let key = format!("race-{round}");
        let first = cancelled_unique(&f, &a, &key).await;
        let second = cancelled_unique(&f, &a, &key).await;
        let (r1, r2) = tokio::join!(f.client.retry(&first), f.client.retry(&second));
        let (winner, loser, err) = match (r1, r2) {
            (Ok(_), Err(e)) => (&first, &second, e),
            (Err(e), Ok(_)) => (&second, &first, e),
            other => panic!("exactly one retry of {key} goes through: {other:?}"),
        };
        assert!(
            matches!(&err, shardq::Error::UniqueConflict { id, holder, .. } if id == loser && holder == winner),
            "{err}"
        );
        assert_eq!(state_of(&f, loser).await, "cancelled");
        let dup = f
            .client
            .enqueue_unique(&a, keyed_failing(&key).delay(Duration::from_secs(3600)))
            .await
            .unwrap();
        assert!(dup.duplicate && &dup.id == winner, "{key}: the winner holds the key");
    }
}

#[tokio::test]
async fn rescue_hand_back_and_release_keep_the_key_of_a_job_they_make_available() {
    let f = fleet().await;
    let a = account("unique-rescue");
    let pool = f.router.pool_for(&a).await.unwrap().clone();
    // Running on node n, attempt 1, lease expired; returns the run's key.
    let run = |id: i64| {
        let pool = &pool;
        async move {
            sqlx::query_as::<_, (i64, i32, chrono::DateTime<chrono::Utc>)>(
                "UPDATE shardq.jobs SET state = 'running', attempt = 1, attempted_at = now(), locked_by = 'n',
                        lease_expires_at = now() - interval '1 second'
                  WHERE id = $1
                 RETURNING id, attempt, attempted_at",
            )
            .bind(id)
            .fetch_one(pool)
            .await
            .map(|(id, attempt, attempted_at)| shardq::store::RunKey {
                id,
                attempt,
                attempted_at,
            })
        }
    };
    let holds_key = |key: &'static str, id: JobId| {
        let f = &f;
        let a = &a;
        async move {
            let dup = f
                .client
                .enqueue_unique(a, keyed_failing(key).max_attempts(5))
                .await
                .unwrap();
            assert!(
                dup.duplicate && dup.id == id,
                "{key}: {id} still holds the key: {dup:?}"
            );
        }
    };
    let keyed = |key: &'static str, max_attempts: i32| {
        let f = &f;
        let a = &a;
        async move {
            let job = keyed_failing(key).max_attempts(max_attempts);
            f.client.enqueue_unique(a, job).await.unwrap().id
        }
    };

    let rescued = keyed("rescued", 5).await;
    run(rescued.id).await.unwrap();
    assert_eq!(shardq::store::job_rescue_expired(&pool, 100).await.unwrap(), 1);
    assert_eq!(state_of(&f, &rescued).await, "available");
    holds_key("rescued", rescued).await;

    let given = keyed("given-back", 5).await;
    let given_run = run(given.id).await.unwrap();
    assert_eq!(shardq::store::job_give_back(&pool, &[given_run], "n").await.unwrap(), 1);
    assert_eq!(state_of(&f, &given).await, "available");
    holds_key("given-back", given).await;

    let released = keyed("released", 5).await;
    let released_run = run(released.id).await.unwrap();
    assert_eq!(
        shardq::store::job_release_unclaimed(&pool, &[released_run], "n")
            .await
            .unwrap(),
        1
    );
    assert_eq!(state_of(&f, &released).await, "available");
    holds_key("released", released).await;

    // Rescued with no attempts left: discarded, the key is released; a
    // retry by hand takes it back.
    let spent = keyed("spent", 1).await;
    run(spent.id).await.unwrap();
    assert_eq!(shardq::store::job_rescue_expired(&pool, 100).await.unwrap(), 1);
    assert_eq!(state_of(&f, &spent).await, "discarded");
    f.client.retry(&spent).await.unwrap();
    holds_key("spent", spent).await;
}

#[tokio::test]
async fn a_period_dedups_within_a_bucket_and_not_across_buckets() {
    let f = fleet().await;
    let a = account("unique-period");
    let at = |h: u32, m: u32| Utc.with_ymd_and_hms(2030, 1, 1, h, m, 0).unwrap();
    let job = |when| {
        NewJob::from_json("digest", serde_json::json!({}))
            .run_at(when)
            .unique(UniqueOpts::new().period(Duration::from_secs(3600)))
    };
    let first = f.client.enqueue_unique(&a, job(at(10, 5))).await.unwrap();
    let same = f.client.enqueue_unique(&a, job(at(10, 55))).await.unwrap();
    assert!(same.duplicate && same.id == first.id, "10:55 is in 10:05's hour");
    let next = f.client.enqueue_unique(&a, job(at(11, 0))).await.unwrap();
    assert!(!next.duplicate, "11:00 starts another hour");
    assert_eq!(rows_of_kind(&f, &a, "digest").await, 2);
    // enqueue() returns the existing id too; enqueue_many maps duplicates to it.
    assert_eq!(f.client.enqueue(&a, job(at(10, 30))).await.unwrap(), first.id);
    let many = f
        .client
        .enqueue_many([
            (a.clone(), job(at(10, 1))),
            (a.clone(), NewJob::from_json("noop", serde_json::json!({}))),
            (a.clone(), job(at(12, 0))),
            (a.clone(), job(at(12, 1))),
        ])
        .await
        .unwrap();
    assert_eq!(many[0], first.id);
    assert_ne!(many[2], first.id);
    assert_eq!(many[3], many[2], "a duplicate of an earlier job of the same call");
    assert_eq!(rows_of_kind(&f, &a, "digest").await, 3);
}

// ---- serial keys

/// Records (key, seq) start and end events; fails a job `fail` times first.
#[derive(Clone, Default)]
struct Serial {
    events: Arc<Mutex<Vec<(String, i64, bool)>>>,
    attempts: Arc<Mutex<HashMap<(String, i64), i64>>>,
}

impl Worker for Serial {
    type Args = serde_json::Value;
    const KIND: &'static str = "serial";
    async fn work(&self, _: JobContext, a: serde_json::Value) -> Result<(), JobError> {
        let key = a["key"].as_str().unwrap().to_string();
        let seq = a["seq"].as_i64().unwrap();
        let n = {
            let mut at = self.attempts.lock().unwrap();
            let n = at.entry((key.clone(), seq)).or_default();
            *n += 1;
            *n
        };
        self.events.lock().unwrap().push((key.clone(), seq, true));
        // Yield so overlapping runs would interleave their events.
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        self.events.lock().unwrap().push((key, seq, false));
        if n <= a["fail"].as_i64().unwrap_or(0) {
            return Err(JobError::failed(format!("fail attempt {n}")));
        }
        Ok(())
    }
}

/// Per key, runs never overlap and successful runs end in seq order.
fn check_serial(events: &[(String, i64, bool)]) -> HashMap<String, Vec<i64>> {
    let mut open: HashMap<&str, i64> = HashMap::new();
    let mut ended: HashMap<String, Vec<i64>> = HashMap::new();
    for (key, seq, start) in events {
        if *start {
            assert!(
                !open.contains_key(key.as_str()),
                "key {key}: {seq} started while {:?} ran",
                open.get(key.as_str())
            );
            open.insert(key, *seq);
        } else {
            assert_eq!(open.remove(key.as_str()), Some(*seq));
            let seqs = ended.entry(key.clone()).or_default();
            if seqs.last() != Some(seq) {
                seqs.push(*seq);
            }
        }
    }
    ended
}

#[tokio::test]
async fn serial_jobs_of_a_key_never_overlap_and_run_in_order_across_two_nodes() {
    let f = fleet().await;
    let a = account("serial-order");
    let keys = ["k0", "k1", "k2", "k3", "k4"];
    let mut jobs = Vec::new();
    for seq in 0..40 {
        for key in keys {
            jobs.push((
                a.clone(),
                NewJob::from_json("serial", serde_json::json!({"key": key, "seq": seq})).serial_key(key),
            ));
        }
    }
    // One at a time, so ids follow seq order per key.
    for (a, job) in jobs {
        f.client.enqueue(&a, job).await.unwrap();
    }
    let worker = Serial::default();
    let nodes: Vec<Runtime> = (0..2)
        .map(|_| {
            Runtime::builder(f.router.clone())
                .queue("default", 50)
                .register(worker.clone())
                .options(fast())
                .start()
                .unwrap()
        })
        .collect();
    wait_for("all 200 serial jobs completed", WAIT, || async {
        shardq_tests::count_state_all(&f.router, "completed").await == 200
    })
    .await;
    for n in nodes {
        n.shutdown(Duration::from_secs(5)).await;
    }
    let ended = check_serial(&worker.events.lock().unwrap());
    for key in keys {
        assert_eq!(ended[key], (0..40).collect::<Vec<_>>(), "key {key} ran out of order");
    }
}

#[tokio::test]
async fn a_failing_serial_job_holds_its_key_until_it_completes() {
    let f = fleet().await;
    let a = account("serial-fail");
    let mut ids = Vec::new();
    for seq in 0..4 {
        let fail = if seq == 0 { 2 } else { 0 };
        let job =
            NewJob::from_json("serial", serde_json::json!({"key": "k", "seq": seq, "fail": fail})).serial_key("k");
        ids.push(f.client.enqueue(&a, job).await.unwrap());
    }
    // Another key is not held up by k's failing head.
    let free = f
        .client
        .enqueue(
            &a,
            NewJob::from_json("serial", serde_json::json!({"key": "other", "seq": 0})).serial_key("other"),
        )
        .await
        .unwrap();
    let worker = Serial::default();
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 10)
        .register(worker.clone())
        .options(fast())
        .start()
        .unwrap();
    wait_for("every job completed", WAIT, || async {
        futures::future::join_all(ids.iter().chain([&free]).map(|id| state_of(&f, id)))
            .await
            .iter()
            .all(|s| s == "completed")
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await;
    let events = worker.events.lock().unwrap().clone();
    check_serial(&events);
    let k: Vec<(i64, bool)> = events.iter().filter(|e| e.0 == "k").map(|e| (e.1, e.2)).collect();
    // seq 0 ran three times (two failures, then success) before seq 1 started.
    let first_other = k.iter().position(|e| e.0 != 0).unwrap();
    assert_eq!(first_other, 6, "seq 0's three runs come first: {k:?}");
    let job = f.client.job(&ids[0]).await.unwrap();
    assert_eq!(job.attempt, 3);
    assert_eq!(job.errors.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn the_fetch_plan_probes_serial_keys_through_their_index() {
    let f = fleet().await;
    let db = f.router.shards()[0].clone();
    let mut conn = db.pool.acquire().await.unwrap();
    // 10k distinct keys with two jobs each, among unkeyed jobs.
    sqlx::query(
        "INSERT INTO shardq.jobs (account, queue, kind, args, serial_key)
         SELECT 'a', 'default', 'noop', '{}', CASE WHEN i % 3 = 0 THEN NULL ELSE 'a' || chr(31) || (i % 10000) END
           FROM generate_series(1, 30000) AS i",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query("ANALYZE shardq.jobs").execute(&mut *conn).await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("SET LOCAL plan_cache_mode = force_generic_plan")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(&format!(
        "PREPARE serial_fetch(text, bigint, text, float8, float8) AS {JOB_FETCH_AVAILABLE_SQL}"
    ))
    .execute(&mut *tx)
    .await
    .unwrap();
    let plan: Vec<String> = sqlx::query_scalar("EXPLAIN EXECUTE serial_fetch('default', 1000, 'node', 30, 300)")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains("jobs_serial_idx"),
        "the probe seeks jobs_serial_idx:\n{plan}"
    );
    assert!(!plan.contains("Seq Scan"), "no sequential scan:\n{plan}");
    // Only the head of each key is claimable: 10k keyed heads plus 10k unkeyed.
    let claimed: Vec<i64> = sqlx::query_scalar("EXECUTE serial_fetch('default', 100000, 'node', 30, 300)")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 20_000);
}
