//! The job engine against real servers: enqueue, wake-ups, outcomes, leases.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardq::store::{self, FetchParams};
use shardq::{Account, JobContext, JobError, JobId, NewJob, Runtime, RuntimeOptions, Worker};
use shardq_tests::{count_state, count_state_all, fast_options, fleet, wait_for};

const WAIT: Duration = Duration::from_secs(60);

/// Counts runs per job id.
#[derive(Clone, Default)]
struct Counting(Arc<Mutex<HashMap<JobId, u32>>>);

impl Worker for Counting {
    type Args = serde_json::Value;
    const KIND: &'static str = "count";
    async fn work(&self, ctx: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        *self.0.lock().unwrap().entry(ctx.id).or_default() += 1;
        Ok(())
    }
}

#[derive(serde::Deserialize)]
struct FailArgs {
    times: i32,
}

struct Fail;
impl Worker for Fail {
    type Args = FailArgs;
    const KIND: &'static str = "fail";
    async fn work(&self, ctx: JobContext, a: FailArgs) -> Result<(), JobError> {
        if ctx.attempt <= a.times {
            return Err(JobError::failed(format!("boom on attempt {}", ctx.attempt)));
        }
        Ok(())
    }
}

struct Slow;
impl Worker for Slow {
    type Args = serde_json::Value;
    const KIND: &'static str = "slow";
    fn timeout(&self) -> Duration {
        Duration::from_millis(100)
    }
    async fn work(&self, _: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(())
    }
}

struct Panics;
impl Worker for Panics {
    type Args = serde_json::Value;
    const KIND: &'static str = "panics";
    async fn work(&self, _: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        panic!("the handler fell over")
    }
}

/// Blocks until the job is handed back (long handler timeout).
/// `hang`: counts its start, then runs for an hour.
struct Hang(Arc<std::sync::atomic::AtomicUsize>);
impl Worker for Hang {
    type Args = serde_json::Value;
    const KIND: &'static str = "hang";
    fn timeout(&self) -> Duration {
        Duration::from_secs(3600)
    }
    async fn work(&self, _: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(())
    }
}

fn account(i: usize) -> Account {
    Account::new(format!("acct-{i}")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_of_a_multi_shard_batch_completes_exactly_once_under_two_nodes() {
    let f = fleet().await;
    let jobs: Vec<_> = (0..2000)
        .map(|i| {
            (
                account(i % 200),
                NewJob::from_json("count", serde_json::json!({ "i": i })),
            )
        })
        .collect();
    let ids = f.client.enqueue_many(jobs).await.unwrap();
    assert_eq!(ids.len(), 2000);
    let shards_used: std::collections::BTreeSet<_> = ids.iter().map(|id| id.shard.clone()).collect();
    assert_eq!(shards_used.len(), 3, "200 accounts spread over all 3 shards");

    let runs = Counting::default();
    let nodes: Vec<Runtime> = (0..2)
        .map(|_| {
            Runtime::builder(f.router.clone())
                .queue("default", 16)
                .register(runs.clone())
                .options(fast_options())
                .start()
                .unwrap()
        })
        .collect();
    wait_for("all 2000 jobs completed", WAIT, || async {
        count_state_all(&f.router, "completed").await == 2000
    })
    .await;
    for n in nodes {
        n.shutdown(Duration::from_secs(5)).await;
    }
    let runs = runs.0.lock().unwrap();
    assert_eq!(runs.len(), 2000, "every job ran");
    assert!(runs.values().all(|n| *n == 1), "no job ran twice");
    for id in &ids {
        assert_eq!(runs.get(id), Some(&1), "{id} ran once");
    }
}

#[tokio::test]
async fn enqueue_in_a_rolled_back_transaction_leaves_no_job() {
    let f = fleet().await;
    let a = account(1);
    let db = f.router.pool_for(&a).await.unwrap();

    let mut tx = db.pool.begin().await.unwrap();
    let id = f
        .client
        .enqueue_in(&mut tx, &a, NewJob::from_json("count", serde_json::json!({})))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(matches!(f.client.job(&id).await, Err(shardq::Error::JobNotFound(_))));

    let mut tx = db.pool.begin().await.unwrap();
    let id = f
        .client
        .enqueue_in(&mut tx, &a, NewJob::from_json("count", serde_json::json!({})))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(f.client.job(&id).await.unwrap().state, "available");
}

/// Waits until the shard has a backend listening (the notifier is up).
async fn wait_listening(f: &shardq_tests::Fleet, shard: &str) {
    let db = f.router.shard(shard).unwrap().clone();
    wait_for("the notifier's LISTEN", WAIT, || {
        let pool = db.pool.clone();
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            n > 0
        }
    })
    .await;
}

#[tokio::test]
async fn a_notification_wakes_the_producer_without_polling() {
    let f = fleet().await;
    let a = account(7);
    let shard = f.router.shard_for(&a).await.unwrap().shard;
    // The poll is an hour away: only the notification can start this job.
    let opts = RuntimeOptions {
        poll_interval: Duration::from_secs(3600),
        ..fast_options()
    };
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 4)
        .register(Counting::default())
        .options(opts)
        .start()
        .unwrap();
    wait_listening(&f, &shard).await;
    let id = f
        .client
        .enqueue(&a, NewJob::from_json("count", serde_json::json!({})))
        .await
        .unwrap();
    wait_for("notified job completed", WAIT, || async {
        f.client.job(&id).await.unwrap().state == "completed"
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await;
}

/// A client's wake-ups are coalesced (one task per shard sends the
/// NOTIFYs of concurrent enqueues together): none is lost on the way. In
/// each of 20 rounds, 16 concurrent enqueues of one client put one job
/// each into two queues, and the round waits until all 16 have run; with
/// the poll an hour away, only wake-ups can start them, so a queue's
/// wake-up dropped in the coalescing leaves its jobs waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enqueues_into_two_queues_all_wake_the_producers() {
    let f = fleet().await;
    let a = account(8);
    let shard = f.router.shard_for(&a).await.unwrap().shard;
    let opts = RuntimeOptions {
        poll_interval: Duration::from_secs(3600),
        ..fast_options()
    };
    let runs = Counting::default();
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 8)
        .queue("other", 8)
        .register(runs.clone())
        .options(opts)
        .start()
        .unwrap();
    wait_listening(&f, &shard).await;
    for round in 0..20 {
        let enqueues = (0..16).map(|i| {
            let queue = if i % 2 == 0 { "default" } else { "other" };
            f.client
                .enqueue(&a, NewJob::from_json("count", serde_json::json!({})).queue(queue))
        });
        let ids: Vec<JobId> = futures::future::try_join_all(enqueues).await.unwrap();
        wait_for(&format!("round {round}: its 16 woken jobs completed"), WAIT, || async {
            let runs = runs.0.lock().unwrap();
            ids.iter().all(|id| runs.get(id) == Some(&1))
        })
        .await;
    }
    rt.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn the_poll_picks_up_jobs_when_notifications_are_lost() {
    let f = fleet().await;
    let a = account(8);
    let db = f.router.pool_for(&a).await.unwrap();
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 4)
        .register(Counting::default())
        .options(fast_options())
        .start()
        .unwrap();
    wait_listening(&f, &db.name).await;
    // A deferred insert whose wake-up is never sent (a client that died
    // between its insert and its NOTIFY): only the poll can find this job.
    let mut conn = db.pool.acquire().await.unwrap();
    let job = NewJob::from_json("count", serde_json::json!({}));
    let id = store::job_insert(&mut db.conn(&mut conn), a.as_str(), &job, "{}", store::Notify::Deferred)
        .await
        .unwrap();
    let id = JobId {
        shard: db.name.clone(),
        id,
    };
    wait_for("polled job completed", WAIT, || async {
        f.client.job(&id).await.unwrap().state == "completed"
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn failures_retry_with_backoff_then_discard_keeping_every_error() {
    let f = fleet().await;
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 4)
        .register(Fail)
        .options(fast_options())
        .start()
        .unwrap();
    let a = account(3);
    let doomed = f
        .client
        .enqueue(
            &a,
            NewJob::from_json("fail", serde_json::json!({ "times": 99 })).max_attempts(3),
        )
        .await
        .unwrap();
    let flaky = f
        .client
        .enqueue(
            &a,
            NewJob::from_json("fail", serde_json::json!({ "times": 2 })).max_attempts(5),
        )
        .await
        .unwrap();
    wait_for("doomed job discarded", WAIT, || async {
        f.client.job(&doomed).await.unwrap().state == "discarded"
    })
    .await;
    wait_for("flaky job completed", WAIT, || async {
        f.client.job(&flaky).await.unwrap().state == "completed"
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await;

    let job = f.client.job(&doomed).await.unwrap();
    assert_eq!(job.attempt, 3);
    let errors = job.errors.as_array().unwrap();
    let attempts: Vec<i64> = errors.iter().map(|e| e["attempt"].as_i64().unwrap()).collect();
    assert_eq!(attempts, [1, 2, 3]);
    assert_eq!(errors[2]["error"], "boom on attempt 3");
    let job = f.client.job(&flaky).await.unwrap();
    assert_eq!((job.attempt, job.errors.as_array().unwrap().len()), (3, 2));
}

#[tokio::test]
async fn timeouts_and_panics_are_recorded_as_errors() {
    let f = fleet().await;
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 4)
        .register(Slow)
        .register(Panics)
        .options(fast_options())
        .start()
        .unwrap();
    let a = account(4);
    let slow = f
        .client
        .enqueue(&a, NewJob::from_json("slow", serde_json::json!({})).max_attempts(1))
        .await
        .unwrap();
    let panics = f
        .client
        .enqueue(&a, NewJob::from_json("panics", serde_json::json!({})).max_attempts(1))
        .await
        .unwrap();
    let unknown = f
        .client
        .enqueue(
            &a,
            NewJob::from_json("nobody_handles_this", serde_json::json!({})).max_attempts(1),
        )
        .await
        .unwrap();
    for id in [&slow, &panics, &unknown] {
        wait_for("job discarded", WAIT, || async {
            f.client.job(id).await.unwrap().state == "discarded"
        })
        .await;
    }
    rt.shutdown(Duration::from_secs(5)).await;
    let error = |j: shardq::JobRecord| j.errors[0]["error"].as_str().unwrap().to_string();
    assert!(error(f.client.job(&slow).await.unwrap()).contains("timed out after 100 ms"));
    assert!(error(f.client.job(&panics).await.unwrap()).contains("panicked: the handler fell over"));
    assert!(error(f.client.job(&unknown).await.unwrap()).contains("no handler for kind \"nobody_handles_this\""));
}

#[tokio::test]
async fn args_that_do_not_fit_the_handler_fail_with_the_serde_message() {
    let f = fleet().await;
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 4)
        .register(Fail)
        .options(fast_options())
        .start()
        .unwrap();
    let id = f
        .client
        .enqueue(
            &account(5),
            NewJob::from_json("fail", serde_json::json!({ "times": "x" })).max_attempts(2),
        )
        .await
        .unwrap();
    wait_for("job discarded", WAIT, || async {
        f.client.job(&id).await.unwrap().state == "discarded"
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await;
    let job = f.client.job(&id).await.unwrap();
    assert_eq!(job.errors.as_array().unwrap().len(), 2);
    assert!(
        job.errors[1]["error"]
            .as_str()
            .unwrap()
            .contains("invalid type: string \"x\", expected i32"),
        "{}",
        job.errors
    );
}

#[tokio::test]
async fn shutdown_hands_running_jobs_back_without_counting_the_attempt() {
    let f = fleet().await;
    let a = account(6);
    let ids = f
        .client
        .enqueue_many((0..3).map(|_| (a.clone(), NewJob::from_json("hang", serde_json::json!({})))))
        .await
        .unwrap();
    let shard = ids[0].shard.clone();
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 8)
        .register(Hang(started.clone()))
        .options(fast_options())
        .start()
        .unwrap();
    // Their handlers started (a claimed job may wait in the node's buffer first).
    wait_for("3 jobs running", WAIT, || async {
        count_state(&f.router, &shard, "running").await == 3 && started.load(std::sync::atomic::Ordering::SeqCst) == 3
    })
    .await;
    rt.shutdown(Duration::from_millis(100)).await;
    for id in &ids {
        let j = f.client.job(id).await.unwrap();
        assert_eq!(j.state, "available", "{id} handed back");
        assert_eq!(j.locked_by, None);
        assert_eq!(
            (j.attempt, j.max_attempts),
            (1, 21),
            "the interrupted attempt is not counted against the job"
        );
    }
}

#[tokio::test]
async fn shutdown_hands_buffered_jobs_back_as_never_claimed() {
    let f = fleet().await;
    let a = account(7);
    let ids = f
        .client
        .enqueue_many((0..4).map(|_| (a.clone(), NewJob::from_json("hang", serde_json::json!({})))))
        .await
        .unwrap();
    let shard = ids[0].shard.clone();
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // One slot: one job runs, the node claims two more ahead into its buffer
    // (a queue this small buffers up to its limit beyond a claim's worth).
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 1)
        .register(Hang(started.clone()))
        .options(fast_options())
        .start()
        .unwrap();
    wait_for("one job running and two buffered", WAIT, || async {
        count_state(&f.router, &shard, "running").await == 3 && started.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(rt.leased(), 3, "buffered jobs are leased");
    rt.shutdown(Duration::from_millis(100)).await;
    assert_eq!(
        started.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "no buffered job started"
    );
    let mut ran = 0;
    for id in &ids {
        let j = f.client.job(id).await.unwrap();
        assert_eq!(j.state, "available", "{id} handed back");
        assert_eq!(j.locked_by, None);
        match (j.attempt, j.max_attempts) {
            (1, 21) => ran += 1, // the running one: its attempt is not counted
            (0, 20) => {}        // buffered ones: as if never claimed (and the one never claimed)
            other => panic!("{id}: attempt and max_attempts {other:?}"),
        }
    }
    assert_eq!(ran, 1);
}

#[tokio::test]
async fn an_expired_lease_is_rescued_and_the_old_nodes_late_completion_is_fenced() {
    let f = fleet().await;
    let a = account(9);
    let id = f
        .client
        .enqueue(&a, NewJob::from_json("count", serde_json::json!({})))
        .await
        .unwrap();
    let db = f.router.shard(&id.shard).unwrap();
    // A node claims the job with a short lease, then goes silent.
    let claimed = store::job_fetch_available(
        &db.pool,
        &FetchParams {
            queue: "default",
            limit: 10,
            node: "dead-node",
            lease_secs: 0.2,
            aging_secs: None,
            fair: true,
            after: None,
            limited: true,
        },
    )
    .await
    .unwrap();
    assert_eq!(claimed.len(), 1);
    let runs = Counting::default();
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 4)
        .register(runs.clone())
        .options(fast_options())
        .start()
        .unwrap();
    wait_for("rescued job completed", WAIT, || async {
        f.client.job(&id).await.unwrap().state == "completed"
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await;

    let job = f.client.job(&id).await.unwrap();
    assert_eq!(job.attempt, 2);
    assert!(job.errors[0]["error"]
        .as_str()
        .unwrap()
        .contains("lease expired: node dead-node"));
    // The dead node comes back and reports attempt 1 as failed: fenced, nothing changes.
    let dead_run = claimed[0].key();
    assert_eq!(dead_run.attempt, 1);
    let finish = store::Finish {
        run: dead_run,
        state: shardq::JobState::Discarded,
        retry_in: None,
        error: Some("late".into()),
        extra_attempts: 0,
    };
    assert_eq!(store::job_finish_many(db, &[finish]).await.unwrap(), 0);
    assert_eq!(store::job_complete_many(db, &[dead_run]).await.unwrap(), 0);
    assert_eq!(f.client.job(&id).await.unwrap().state, "completed");
    assert_eq!(runs.0.lock().unwrap().get(&id), Some(&1));
}

#[tokio::test]
async fn a_backlogged_shard_does_not_starve_another_on_the_same_queue() {
    let f = fleet().await;
    let shards = f.config.shard_names();
    // One account on the first shard with a big backlog, one on the second with a few jobs.
    let big = Account::new("big-customer").unwrap();
    let small = Account::new("small-customer").unwrap();
    f.router.place(&big, &shards[0]).await.unwrap();
    f.router.place(&small, &shards[1]).await.unwrap();
    let slow = serde_json::json!({ "ms": 20 });
    f.client
        .enqueue_many((0..3000).map(|_| (big.clone(), NewJob::from_json("sleepy", slow.clone()))))
        .await
        .unwrap();

    struct Sleepy;
    impl Worker for Sleepy {
        type Args = serde_json::Value;
        const KIND: &'static str = "sleepy";
        async fn work(&self, _: JobContext, _: serde_json::Value) -> Result<(), JobError> {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(())
        }
    }
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 8)
        .register(Sleepy)
        .options(fast_options())
        .start()
        .unwrap();
    wait_for("the backlog is being worked", WAIT, || async {
        count_state(&f.router, &shards[0], "completed").await > 0
    })
    .await;
    let ids = f
        .client
        .enqueue_many((0..10).map(|_| (small.clone(), NewJob::from_json("sleepy", slow.clone()))))
        .await
        .unwrap();
    wait_for("the small shard's jobs completed", WAIT, || async {
        count_state(&f.router, &shards[1], "completed").await == 10
    })
    .await;
    let backlog_left = count_state(&f.router, &shards[0], "available").await;
    rt.shutdown(Duration::from_secs(5)).await;
    assert_eq!(ids.len(), 10);
    assert!(
        backlog_left > 1000,
        "the small shard finished while the big one still had {backlog_left} jobs waiting"
    );
}

#[tokio::test]
async fn bad_jobs_are_rejected_before_anything_is_written() {
    let f = fleet().await;
    let a = account(11);
    let too_big = NewJob::from_json(
        "count",
        serde_json::json!({ "blob": "x".repeat(shardq::job::MAX_ARGS_BYTES) }),
    );
    let err = f.client.enqueue(&a, too_big.clone()).await.unwrap_err().to_string();
    assert!(err.contains("args") && err.contains("exceed"), "{err}");
    let good = NewJob::from_json("count", serde_json::json!({}));
    let err = f
        .client
        .enqueue_many([(a.clone(), good), (a.clone(), too_big)])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("args"), "{err}");
    assert_eq!(
        f.client.jobs_of(&a, None, 10).await.unwrap().len(),
        0,
        "nothing was inserted"
    );
    let new = account(12);
    let good = NewJob::from_json("count", serde_json::json!({}));
    let bad = NewJob::from_json("count", serde_json::json!({})).queue("");
    f.client
        .enqueue_many([(new.clone(), good), (new.clone(), bad)])
        .await
        .unwrap_err();
    assert_eq!(
        f.router.placement(&new).await.unwrap(),
        None,
        "an invalid batch places none of its accounts"
    );
    // Quotes, semicolons, unicode and SQL fragments are data.
    let q = "q'; DROP TABLE shardq.jobs; --ü";
    let odd = Account::new("O'Brien; DELETE FROM x; -- 日本").unwrap();
    let id = f
        .client
        .enqueue(&odd, NewJob::from_json("count", serde_json::json!({ "s": q })).queue(q))
        .await
        .unwrap();
    let j = f.client.job(&id).await.unwrap();
    assert_eq!(
        (j.account.as_str(), j.queue.as_str(), j.args["s"].as_str()),
        (odd.as_str(), q, Some(q))
    );
}

#[tokio::test]
async fn a_batch_of_lent_accounts_lands_every_job_on_its_accounts_placement_cached_or_not() {
    let f = fleet().await;
    let accounts: Vec<Account> = (0..300).map(|i| Account::new(format!("batch-{i}")).unwrap()).collect();
    // 0..100 placed by another router (not in this one's cache), 100..200
    // in this router's cache, 200..300 new.
    let other = shardq_router::Router::connect(&f.config).await.unwrap();
    for a in &accounts[..100] {
        other.shard_for(a).await.unwrap();
    }
    for a in &accounts[100..200] {
        f.router.shard_for(a).await.unwrap();
    }
    // The accounts are lent, not cloned: a batch takes owned or borrowed items.
    let jobs = accounts
        .iter()
        .flat_map(|a| (0..2).map(move |_| (a, NewJob::from_json("count", serde_json::json!({})))));
    let ids = f.client.enqueue_many(jobs).await.unwrap();
    assert_eq!(ids.len(), 600);
    let fresh = shardq_router::Router::connect(&f.config).await.unwrap();
    let mut shards_used = std::collections::BTreeSet::new();
    for (i, id) in ids.iter().enumerate() {
        let a = &accounts[i / 2];
        let (placed, _) = fresh.placement(a).await.unwrap().expect("every account is placed");
        assert_eq!(id.shard, placed, "job {id} of account {a} is on its placement's shard");
        assert_eq!(f.client.job(id).await.unwrap().account.as_str(), a.as_str());
        shards_used.insert(placed);
    }
    assert!(
        shards_used.len() > 1,
        "300 accounts spread over the ring: {shards_used:?}"
    );
}

/// A batch's ids come back in input order whether they are one contiguous
/// run of the identity sequence (returned as first id and count) or not
/// (the sequence stepping by 2 here, as when concurrent inserts interleave:
/// returned as the sorted array); each id names the job with that input's
/// args; the batch's wake-ups start every job with the poll an hour away;
/// and a batch holding a job of an account fenced off the shard is refused
/// whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_returns_ids_in_input_order_wakes_producers_and_is_refused_for_a_fenced_account() {
    let f = fleet().await;
    let a = account(21);
    let shard = f.router.shard_for(&a).await.unwrap().shard;
    let db = f.router.shard(&shard).unwrap().clone();
    let runs = Counting::default();
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 8)
        .register(runs.clone())
        .options(RuntimeOptions {
            poll_interval: Duration::from_secs(3600),
            ..fast_options()
        })
        .start()
        .unwrap();
    wait_listening(&f, &shard).await;
    let batch = |from: usize| {
        (from..from + 50)
            .map(|i| (a.clone(), NewJob::from_json("count", serde_json::json!({ "i": i }))))
            .collect::<Vec<_>>()
    };
    let contiguous = f.client.enqueue_many(batch(0)).await.unwrap();
    sqlx::query("ALTER TABLE shardq.jobs ALTER COLUMN id SET INCREMENT BY 2")
        .execute(&db.pool)
        .await
        .unwrap();
    let stepped = f.client.enqueue_many(batch(50)).await.unwrap();
    for (ids, step) in [(&contiguous, 1), (&stepped, 2)] {
        assert_eq!(ids.len(), 50);
        assert!(
            ids.windows(2).all(|w| w[1].id == w[0].id + step),
            "ids step by {step} in input order: {ids:?}"
        );
    }
    for (i, id) in contiguous.iter().chain(&stepped).enumerate() {
        let job = f.client.job(id).await.unwrap();
        assert_eq!(
            (job.account.as_str(), &job.args),
            (a.as_str(), &serde_json::json!({ "i": i }))
        );
    }
    wait_for("the 100 woken jobs completed", WAIT, || async {
        let runs = runs.0.lock().unwrap();
        contiguous.iter().chain(&stepped).all(|id| runs.get(id) == Some(&1))
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await;

    sqlx::query(
        "INSERT INTO shardq.fences (account, moved_to, epoch, fenced_at) VALUES ('gone', 'elsewhere', 2, now())",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let job = NewJob::from_json("count", serde_json::json!({}));
    let mut conn = db.pool.acquire().await.unwrap();
    let err = store::job_insert_many(
        &mut db.conn(&mut conn),
        &[(a.as_str(), &job, "{}"), ("gone", &job, "{}")],
    )
    .await
    .unwrap_err();
    let fenced = shardq_router::router::fenced(&err).expect("refused by the fence");
    assert_eq!(
        (fenced.account.as_str(), fenced.moved_to.as_str()),
        ("gone", "elsewhere")
    );
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM shardq.jobs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(jobs, 100, "nothing of the refused batch was written");
}

#[tokio::test]
async fn a_backlog_is_claimed_batch_after_batch_without_waiting_out_the_cooldown() {
    let f = fleet().await;
    let a = account(31);
    // 48 jobs for a queue of 4 slots: a claim asks for 8, so the backlog
    // takes at least six claims, each of them full.
    let ids = f
        .client
        .enqueue_many((0..48).map(|_| (a.clone(), NewJob::from_json("count", serde_json::json!({})))))
        .await
        .unwrap();
    let shard = ids[0].shard.clone();
    let cooldown = Duration::from_secs(2);
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 4)
        .register(Counting::default())
        .options(RuntimeOptions {
            fetch_cooldown: cooldown,
            ..fast_options()
        })
        .start()
        .unwrap();
    wait_for("the backlog completed", WAIT, || async {
        count_state(&f.router, &shard, "completed").await == 48
    })
    .await;
    rt.shutdown(Duration::from_secs(1)).await;
    // Each claim stamps its jobs with its transaction's start: the claims
    // followed each other without the cooldown between them, which would
    // have spread six claims over at least five cooldowns.
    let mut claims: Vec<_> = f
        .client
        .jobs_of(&a, Some("completed"), 100)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.attempted_at.unwrap())
        .collect();
    claims.sort();
    claims.dedup();
    assert!(claims.len() >= 6, "at least six claims: {claims:?}");
    let span = (*claims.last().unwrap() - claims[0]).to_std().unwrap();
    assert!(
        span < cooldown,
        "{} full claims took {span:?}, more than one cooldown of {cooldown:?}",
        claims.len()
    );
}
