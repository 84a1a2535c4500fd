//! Job semantics against real servers: scheduled jobs and retries woken at
//! their time, priority order, cancellation and manual retry, jobs enqueued
//! by the database itself, retention, and chained fan-out.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardq::store::{Finished, JOB_NEXT_DUE_SQL};
use shardq::{Account, Backoff, Client, JobContext, JobError, JobId, NewJob, Runtime, RuntimeOptions, Worker};
use shardq_tests::{assert_indexed, fast_options, fleet, generic_plan, wait_for, Fleet};
use sqlx::{Connection, PgPool};

const WAIT: Duration = Duration::from_secs(60);

/// Options under which only notifications and due-time wake-ups can start a
/// job: the fallback poll is an hour away.
fn no_poll() -> RuntimeOptions {
    RuntimeOptions {
        poll_interval: Duration::from_secs(3600),
        ..fast_options()
    }
}

fn account(name: &str) -> Account {
    Account::new(name).unwrap()
}

async fn pool_of(f: &Fleet, a: &Account) -> PgPool {
    f.router.pool_for(a).await.unwrap().pool.clone()
}

/// Waits until the shard has a backend listening (the notifier is up).
async fn wait_listening(pool: &PgPool) {
    wait_for("the notifier's LISTEN", WAIT, || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        n > 0
    })
    .await;
}

async fn state_of(f: &Fleet, id: &JobId) -> shardq::JobState {
    f.client.job(id).await.unwrap().state
}

/// Records the order jobs run in (by their `label` arg).
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<String>>>);

impl Worker for Recorder {
    type Args = serde_json::Value;
    const KIND: &'static str = "record";
    async fn work(&self, _: JobContext, args: serde_json::Value) -> Result<(), JobError> {
        self.0
            .lock()
            .unwrap()
            .push(args["label"].as_str().unwrap_or("").to_string());
        Ok(())
    }
}

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

struct FailTimes;
impl Worker for FailTimes {
    type Args = serde_json::Value;
    const KIND: &'static str = "fail";
    async fn work(&self, ctx: JobContext, a: serde_json::Value) -> Result<(), JobError> {
        if i64::from(ctx.attempt) <= a["times"].as_i64().unwrap() {
            return Err(JobError::failed(format!("boom on attempt {}", ctx.attempt)));
        }
        Ok(())
    }
}

// ---- 1. scheduled jobs and retries wake their producer at their time

#[tokio::test]
async fn a_scheduled_job_runs_at_its_time_without_waiting_for_the_poll() {
    let f = fleet().await;
    let a = account("scheduled");
    let pool = pool_of(&f, &a).await;
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 4)
        .register(Counting::default())
        .options(no_poll())
        .start()
        .unwrap();
    wait_listening(&pool).await;
    let id = f
        .client
        .enqueue(
            &a,
            NewJob::from_json("count", serde_json::json!({})).delay(Duration::from_millis(1500)),
        )
        .await
        .unwrap();
    assert_eq!(state_of(&f, &id).await, "available");
    wait_for(
        "the scheduled job completed (the poll is an hour away)",
        WAIT,
        || async { state_of(&f, &id).await == "completed" },
    )
    .await;
    rt.shutdown(Duration::from_secs(5)).await;
    let job = f.client.job(&id).await.unwrap();
    let attempted = job.attempted_at.unwrap();
    assert!(
        attempted >= job.run_at,
        "ran at {attempted}, before its run_at {}",
        job.run_at
    );
    assert_eq!(job.attempt, 1);
}

#[tokio::test]
async fn a_retry_runs_at_its_backoff_time_without_waiting_for_the_poll() {
    let f = fleet().await;
    let a = account("retried");
    let pool = pool_of(&f, &a).await;
    let opts = RuntimeOptions {
        backoff: Backoff {
            base: Duration::from_millis(800),
            max: Duration::from_millis(800),
        },
        ..no_poll()
    };
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 4)
        .register(FailTimes)
        .options(opts)
        .start()
        .unwrap();
    wait_listening(&pool).await;
    let id = f
        .client
        .enqueue(&a, NewJob::from_json("fail", serde_json::json!({ "times": 1 })))
        .await
        .unwrap();
    wait_for("the job completed on its retry", WAIT, || async {
        state_of(&f, &id).await == "completed"
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await;
    let job = f.client.job(&id).await.unwrap();
    assert_eq!(job.attempt, 2, "failed once, then retried");
    assert_eq!(job.errors.as_array().unwrap().len(), 1);
    // run_at is the retry time the completer wrote; the retry did not start before it.
    assert!(job.attempted_at.unwrap() >= job.run_at);
}

#[tokio::test]
async fn the_next_due_lookup_and_the_prune_statements_use_indexes_under_generic_plans() {
    let f = fleet().await;
    let db = f.router.shards()[0].clone();
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::query(
        "INSERT INTO shardq.jobs (account, queue, kind, args, state, priority, run_at, finalized_at)
         SELECT 'a' || (i % 1000), 'default', 'noop', '{}',
                CASE WHEN i % 3 = 0 THEN 'completed' WHEN i % 7 = 0 THEN 'discarded' ELSE 'available' END,
                (i % 5)::smallint, now() + make_interval(secs => i % 600),
                CASE WHEN i % 3 = 0 OR i % 7 = 0 THEN now() - make_interval(secs => i) END
           FROM generate_series(1, 300000) AS i",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query("ANALYZE shardq.jobs").execute(&mut *conn).await.unwrap();
    let mut statements = vec![("next_due", "text", JOB_NEXT_DUE_SQL, "'default'")];
    for s in Finished::ALL {
        statements.push(("prune", "float8, bigint", s.prune_sql(), "3600, 1000"));
    }
    for (name, types, sql, args) in statements {
        assert_indexed(name, &generic_plan(&mut conn, types, sql, args).await);
    }
    let mut tx = conn.begin().await.unwrap();
    // The lookup finds the earliest available run_at across priorities.
    let (expected,): (f64,) = sqlx::query_as(
        "SELECT EXTRACT(EPOCH FROM min(run_at) - clock_timestamp())::float8
           FROM shardq.jobs WHERE state = 'available' AND queue = 'default'",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    let got: Option<f64> = sqlx::query_scalar(JOB_NEXT_DUE_SQL)
        .bind("default")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert!(
        (got.unwrap() - expected).abs() < 1.0,
        "next due {got:?}, expected {expected}"
    );
    let none: Option<f64> = sqlx::query_scalar(JOB_NEXT_DUE_SQL)
        .bind("no_such_queue")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(none, None);
    tx.rollback().await.unwrap();
}

// ---- 2. priorities

#[tokio::test]
async fn lower_priority_runs_first_and_equal_priority_runs_oldest_first() {
    let f = fleet().await;
    let a = account("prioritised");
    // Enqueued one statement at a time, so equal priorities differ in age.
    let plan = [
        ("p5-a", 5),
        ("p0-a", 0),
        ("p5-b", 5),
        ("pm1-a", -1),
        ("p0-b", 0),
        ("p5-c", 5),
        ("pm1-b", -1),
        ("p0-c", 0),
    ];
    for (label, priority) in plan {
        f.client
            .enqueue(
                &a,
                NewJob::from_json("record", serde_json::json!({ "label": label })).priority(priority),
            )
            .await
            .unwrap();
    }
    let order = Recorder::default();
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 1)
        .register(order.clone())
        .options(fast_options())
        .start()
        .unwrap();
    wait_for("all 8 jobs ran", WAIT, || async { order.0.lock().unwrap().len() == 8 }).await;
    rt.shutdown(Duration::from_secs(5)).await;
    let ran = order.0.lock().unwrap().clone();
    assert_eq!(
        ran,
        ["pm1-a", "pm1-b", "p0-a", "p0-b", "p0-c", "p5-a", "p5-b", "p5-c"],
        "run order"
    );
}

// ---- 3. cancellation and manual retry

/// Waits for the cancel signal, records that it saw it, and returns Ok
/// anyway (the job must still end cancelled).
#[derive(Clone, Default)]
struct Cooperative {
    started: Arc<AtomicUsize>,
    saw_cancel: Arc<AtomicUsize>,
}

impl Worker for Cooperative {
    type Args = serde_json::Value;
    const KIND: &'static str = "cooperative";
    fn timeout(&self) -> Duration {
        Duration::from_secs(3600)
    }
    async fn work(&self, ctx: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        ctx.cancelled().await;
        assert!(ctx.is_cancelled());
        self.saw_cancel.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Ignores the signal: runs until the test opens the gate, then returns Ok.
#[derive(Clone)]
struct Stubborn {
    started: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::Semaphore>,
}

impl Default for Stubborn {
    fn default() -> Self {
        Stubborn {
            started: Arc::default(),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }
}

impl Worker for Stubborn {
    type Args = serde_json::Value;
    const KIND: &'static str = "stubborn";
    fn timeout(&self) -> Duration {
        Duration::from_secs(3600)
    }
    async fn work(&self, _: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let _permit = self.gate.acquire().await.unwrap();
        Ok(())
    }
}

#[tokio::test]
async fn a_cancelled_job_that_has_not_run_never_runs() {
    let f = fleet().await;
    let a = account("cancel-waiting");
    let now = f
        .client
        .enqueue(&a, NewJob::from_json("count", serde_json::json!({})).queue("later"))
        .await
        .unwrap();
    let scheduled = f
        .client
        .enqueue(
            &a,
            NewJob::from_json("count", serde_json::json!({})).delay(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    for id in [&now, &scheduled] {
        let job = f.client.cancel(id).await.unwrap();
        assert_eq!(job.state, "cancelled");
        assert_eq!(job.attempt, 0);
        assert!(job.finalized_at.is_some());
        assert_eq!(job.errors[0]["error"], "cancelled on request");
    }
    let runs = Counting::default();
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 4)
        .queue("later", 4)
        .register(runs.clone())
        .options(fast_options())
        .start()
        .unwrap();
    // A job enqueued after both, due after the scheduled one, on the same
    // shard: once it has run, the producers have been past both.
    let marker = f
        .client
        .enqueue(
            &a,
            NewJob::from_json("count", serde_json::json!({})).delay(Duration::from_millis(400)),
        )
        .await
        .unwrap();
    let marker_later = f
        .client
        .enqueue(&a, NewJob::from_json("count", serde_json::json!({})).queue("later"))
        .await
        .unwrap();
    for m in [&marker, &marker_later] {
        wait_for("the marker job completed", WAIT, || async {
            state_of(&f, m).await == "completed"
        })
        .await;
    }
    rt.shutdown(Duration::from_secs(5)).await;
    let runs = runs.0.lock().unwrap().clone();
    assert_eq!(runs.get(&now), None, "the cancelled job ran");
    assert_eq!(runs.get(&scheduled), None, "the cancelled scheduled job ran");
    for id in [&now, &scheduled] {
        assert_eq!(state_of(&f, id).await, "cancelled");
    }
}

#[tokio::test]
async fn a_running_job_is_signalled_and_ends_cancelled_even_if_its_handler_succeeds() {
    let f = fleet().await;
    let a = account("cancel-running");
    let coop = Cooperative::default();
    let stubborn = Stubborn::default();
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 4)
        .register(coop.clone())
        .register(stubborn.clone())
        .options(fast_options())
        .start()
        .unwrap();
    let c = f
        .client
        .enqueue(&a, NewJob::from_json("cooperative", serde_json::json!({})))
        .await
        .unwrap();
    let s = f
        .client
        .enqueue(&a, NewJob::from_json("stubborn", serde_json::json!({})))
        .await
        .unwrap();
    wait_for("both handlers started", WAIT, || async {
        coop.started.load(Ordering::SeqCst) == 1 && stubborn.started.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(state_of(&f, &c).await, "running");

    let job = f.client.cancel(&c).await.unwrap();
    assert_eq!((job.state.as_str(), job.attempt), ("cancelled", 1));
    wait_for("the cooperative handler saw the signal", WAIT, || async {
        coop.saw_cancel.load(Ordering::SeqCst) == 1
    })
    .await;

    assert_eq!(f.client.cancel(&s).await.unwrap().state, "cancelled");
    stubborn.gate.add_permits(1); // it ignored the signal and now succeeds
    wait_for("both runs' outcomes written", WAIT, || async { rt.leased() == 0 }).await;
    rt.shutdown(Duration::from_secs(5)).await;
    for id in [&c, &s] {
        let job = f.client.job(id).await.unwrap();
        assert_eq!(
            job.state, "cancelled",
            "{id} stays cancelled although its handler returned Ok"
        );
        assert_eq!(job.locked_by, None);
        let errors = job.errors.as_array().unwrap();
        assert_eq!(errors.len(), 1, "{id}: {}", job.errors);
        assert_eq!(errors[0]["attempt"], 1);
        assert_eq!(errors[0]["error"], "cancelled on request");
    }
    assert_eq!(coop.started.load(Ordering::SeqCst), 1, "never ran again");
}

#[tokio::test]
async fn a_cancel_whose_notification_was_lost_still_reaches_the_handler() {
    let f = fleet().await;
    let a = account("cancel-sweep");
    let coop = Cooperative::default();
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 4)
        .register(coop.clone())
        .options(fast_options())
        .start()
        .unwrap();
    let id = f
        .client
        .enqueue(&a, NewJob::from_json("cooperative", serde_json::json!({})))
        .await
        .unwrap();
    wait_for("the handler started", WAIT, || async {
        coop.started.load(Ordering::SeqCst) == 1
    })
    .await;
    // Cancelled without a shardq_cancel notification (as if it was lost):
    // only the sweeper can tell the node.
    sqlx::query("UPDATE shardq.jobs SET state = 'cancelled', finalized_at = now() WHERE id = $1")
        .bind(id.id)
        .execute(&pool_of(&f, &a).await)
        .await
        .unwrap();
    wait_for("the handler saw the signal", WAIT, || async {
        coop.saw_cancel.load(Ordering::SeqCst) == 1
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await;
    assert_eq!(state_of(&f, &id).await, "cancelled");
}

#[tokio::test]
async fn cancel_refuses_finished_jobs_and_is_a_no_op_on_cancelled_ones() {
    let f = fleet().await;
    let a = account("cancel-refused");
    let pool = pool_of(&f, &a).await;
    let done = f
        .client
        .enqueue(&a, NewJob::from_json("count", serde_json::json!({})))
        .await
        .unwrap();
    let gone = f
        .client
        .enqueue(&a, NewJob::from_json("count", serde_json::json!({})))
        .await
        .unwrap();
    sqlx::query("UPDATE shardq.jobs SET state = 'completed', finalized_at = now(), attempt = 1 WHERE id = $1")
        .bind(done.id)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE shardq.jobs SET state = 'discarded', finalized_at = now(), attempt = 1 WHERE id = $1")
        .bind(gone.id)
        .execute(&pool)
        .await
        .unwrap();
    for (id, state) in [(&done, "completed"), (&gone, "discarded")] {
        let before = f.client.job(id).await.unwrap();
        match f.client.cancel(id).await {
            Err(shardq::Error::JobState {
                id: named, state: s, ..
            }) => {
                assert_eq!((named.as_str(), s.as_str()), (id.to_string().as_str(), state));
            }
            other => panic!("cancelling a {state} job: expected a JobState error, got {other:?}"),
        }
        let msg = f.client.cancel(id).await.unwrap_err().to_string();
        assert!(msg.contains(&id.to_string()) && msg.contains(state), "{msg}");
        let after = f.client.job(id).await.unwrap();
        assert_eq!(
            (after.state, after.errors),
            (before.state, before.errors),
            "nothing changed"
        );
    }
    let waiting = f
        .client
        .enqueue(&a, NewJob::from_json("count", serde_json::json!({})))
        .await
        .unwrap();
    let first = f.client.cancel(&waiting).await.unwrap();
    let again = f.client.cancel(&waiting).await.unwrap();
    assert_eq!(again.state, "cancelled");
    assert_eq!(again.errors, first.errors, "a second cancel records nothing");
    assert_eq!(again.finalized_at, first.finalized_at);
    let missing = JobId {
        shard: done.shard.clone(),
        id: 999_999_999,
    };
    assert!(matches!(
        f.client.cancel(&missing).await,
        Err(shardq::Error::JobNotFound(_))
    ));
    assert!(f
        .client
        .cancel(&JobId {
            shard: "no_such_shard".into(),
            id: 1
        })
        .await
        .is_err());
}

#[tokio::test]
async fn cancels_racing_claims_leave_every_job_either_completed_or_never_run() {
    let f = fleet().await;
    let a = account("cancel-race");
    let ids = f
        .client
        .enqueue_many((0..300).map(|_| (a.clone(), NewJob::from_json("count", serde_json::json!({})))))
        .await
        .unwrap();
    let runs = Counting::default();
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 8)
        .register(runs.clone())
        .options(fast_options())
        .start()
        .unwrap();
    let mut refused = 0;
    for id in &ids {
        match f.client.cancel(id).await {
            Ok(j) => assert_eq!(j.state, "cancelled"),
            Err(shardq::Error::JobState { state, .. }) => {
                assert_eq!(state, "completed");
                refused += 1;
            }
            Err(e) => panic!("{id}: {e}"),
        }
    }
    wait_for("no job left available or running", WAIT, || async {
        shardq_tests::count_state_all(&f.router, "available").await == 0
            && shardq_tests::count_state_all(&f.router, "running").await == 0
    })
    .await;
    wait_for("every run's outcome written", WAIT, || async { rt.leased() == 0 }).await;
    rt.shutdown(Duration::from_secs(5)).await;
    let runs = runs.0.lock().unwrap().clone();
    let mut completed = 0;
    for id in &ids {
        let j = f.client.job(id).await.unwrap();
        match j.state.as_str() {
            "completed" => {
                completed += 1;
                assert_eq!(runs.get(id), Some(&1), "{id} completed once");
            }
            "cancelled" if j.attempt == 0 => {
                assert_eq!(runs.get(id), None, "{id} was cancelled before it ran, yet ran")
            }
            "cancelled" => assert!(runs.get(id).copied().unwrap_or(0) <= 1, "{id}"),
            s => panic!("{id} ended {s}"),
        }
    }
    assert_eq!(
        completed, refused,
        "exactly the jobs whose cancel was refused completed"
    );
}

#[tokio::test]
async fn retry_brings_back_discarded_and_cancelled_jobs_keeping_their_errors() {
    let f = fleet().await;
    let a = account("retry-by-hand");
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 4)
        .register(FailTimes)
        .register(Counting::default())
        .options(fast_options())
        .start()
        .unwrap();
    // Fails on its only attempt, then succeeds on the hand retry.
    let doomed = f
        .client
        .enqueue(
            &a,
            NewJob::from_json("fail", serde_json::json!({ "times": 1 })).max_attempts(1),
        )
        .await
        .unwrap();
    wait_for("discarded", WAIT, || async {
        state_of(&f, &doomed).await == "discarded"
    })
    .await;
    let job = f.client.retry(&doomed).await.unwrap();
    // The running node may claim it at once (the retry notifies the queue).
    assert!(
        matches!(job.state.as_str(), "available" | "running" | "completed"),
        "{}",
        job.state
    );
    assert_eq!(
        (job.max_attempts, job.finalized_at),
        (2, None),
        "one more attempt, no longer final"
    );
    wait_for("the retried job completed", WAIT, || async {
        state_of(&f, &doomed).await == "completed"
    })
    .await;
    let job = f.client.job(&doomed).await.unwrap();
    assert_eq!(job.attempt, 2);
    assert_eq!(job.errors[0]["error"], "boom on attempt 1", "errors kept");

    let cancelled = f
        .client
        .enqueue(
            &a,
            NewJob::from_json("count", serde_json::json!({})).delay(Duration::from_secs(3600)),
        )
        .await
        .unwrap();
    f.client.cancel(&cancelled).await.unwrap();
    let job = f.client.retry(&cancelled).await.unwrap();
    assert!(
        matches!(job.state.as_str(), "available" | "running" | "completed"),
        "{}",
        job.state
    );
    assert_eq!(job.max_attempts, 20);
    assert!(job.run_at <= chrono::Utc::now(), "due now, not at its old schedule");
    wait_for("the retried cancelled job completed", WAIT, || async {
        state_of(&f, &cancelled).await == "completed"
    })
    .await;
    assert_eq!(
        f.client.job(&cancelled).await.unwrap().errors[0]["error"],
        "cancelled on request"
    );
    rt.shutdown(Duration::from_secs(5)).await;

    // Completed, available and running jobs cannot be retried; nothing changes.
    let waiting = f
        .client
        .enqueue(&a, NewJob::from_json("count", serde_json::json!({})))
        .await
        .unwrap();
    let running = f
        .client
        .enqueue(&a, NewJob::from_json("count", serde_json::json!({})))
        .await
        .unwrap();
    sqlx::query("UPDATE shardq.jobs SET state = 'running', attempt = 1, locked_by = 'n' WHERE id = $1")
        .bind(running.id)
        .execute(&pool_of(&f, &a).await)
        .await
        .unwrap();
    for (id, state) in [(&doomed, "completed"), (&waiting, "available"), (&running, "running")] {
        let before = f.client.job(id).await.unwrap();
        let err = f.client.retry(id).await.unwrap_err();
        assert!(
            matches!(&err, shardq::Error::JobState { state: s, .. } if s == state),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&id.to_string()) && msg.contains("retried"), "{msg}");
        let after = f.client.job(id).await.unwrap();
        assert_eq!(
            (after.state, after.max_attempts, after.run_at),
            (before.state, before.max_attempts, before.run_at)
        );
    }
}

// ---- 4. jobs enqueued by the database itself

#[tokio::test]
async fn an_application_trigger_enqueues_jobs_in_the_same_transaction() {
    let f = fleet().await;
    let a = account("trigger-shop");
    let pool = pool_of(&f, &a).await;
    // The README's example trigger.
    sqlx::raw_sql(
        "CREATE TABLE orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                              account text NOT NULL, total int NOT NULL);
         CREATE FUNCTION orders_enqueue_receipt() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM shardq.enqueue(NEW.account, 'default', 'count',
                                    jsonb_build_object('order', NEW.id));
             RETURN NEW;
         END;
         $$;
         CREATE TRIGGER orders_enqueue_receipt AFTER INSERT ON orders
             FOR EACH ROW EXECUTE FUNCTION orders_enqueue_receipt();",
    )
    .execute(&pool)
    .await
    .unwrap();

    let mut tx = pool.begin().await.unwrap();
    for total in [10, 20, 30] {
        sqlx::query("INSERT INTO orders (account, total) VALUES ($1, $2)")
            .bind(a.as_str())
            .bind(total)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO orders (account, total) VALUES ($1, 40)")
        .bind(a.as_str())
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    let jobs = f.client.jobs_of(&a, None, 10).await.unwrap();
    let mut orders: Vec<i64> = jobs.iter().map(|j| j.args["order"].as_i64().unwrap()).collect();
    orders.sort_unstable();
    assert_eq!(
        orders,
        [1, 2, 3],
        "one job per committed order, none for the rolled back one"
    );
    assert!(jobs
        .iter()
        .all(|j| j.kind == "count" && j.account == a.as_str() && j.max_attempts == 20));

    let runs = Counting::default();
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 4)
        .register(runs.clone())
        .options(no_poll())
        .start()
        .unwrap();
    wait_for("the trigger's jobs completed", WAIT, || async {
        f.client.jobs_of(&a, Some("completed"), 10).await.unwrap().len() == 3
    })
    .await;
    // With the node up (poll an hour away), a new order's job is woken by its NOTIFY.
    wait_listening(&pool).await;
    sqlx::query("INSERT INTO orders (account, total) VALUES ($1, 50)")
        .bind(a.as_str())
        .execute(&pool)
        .await
        .unwrap();
    wait_for("the notified trigger job completed", WAIT, || async {
        f.client.jobs_of(&a, Some("completed"), 10).await.unwrap().len() == 4
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await;
    assert_eq!(runs.0.lock().unwrap().len(), 4);
}

#[tokio::test]
async fn the_sql_enqueue_function_validates_like_the_client() {
    let f = fleet().await;
    let a = account("sql-enqueue");
    let pool = pool_of(&f, &a).await;
    let id: i64 = sqlx::query_scalar(
        "SELECT shardq.enqueue($1, 'mail', 'send', '{\"to\": \"x\"}', priority => 3::smallint,
                               max_attempts => 2, run_at => now() + interval '1 hour')",
    )
    .bind(a.as_str())
    .fetch_one(&pool)
    .await
    .unwrap();
    let db = f.router.pool_for(&a).await.unwrap();
    let job = f
        .client
        .job(&JobId {
            shard: db.name.clone(),
            id,
        })
        .await
        .unwrap();
    assert_eq!(
        (job.queue.as_str(), job.kind.as_str(), job.priority, job.max_attempts),
        ("mail", "send", 3, 2)
    );
    assert_eq!(job.args["to"], "x");
    assert!(job.run_at > chrono::Utc::now() + chrono::Duration::minutes(59));

    let big = "x".repeat(300_000);
    let long_queue = "q".repeat(129);
    let cases: Vec<(&str, Vec<Option<String>>, &str)> = vec![
        (
            "SELECT shardq.enqueue($1, $2, $3)",
            vec![Some(String::new()), Some("q".into()), Some("k".into())],
            "account must be 1 to 255 bytes, got 0 bytes",
        ),
        (
            "SELECT shardq.enqueue($1, $2, $3)",
            vec![Some("a".into()), Some(long_queue), Some("k".into())],
            "queue must be 1 to 128 bytes, got 129 bytes",
        ),
        (
            "SELECT shardq.enqueue($1, $2, $3)",
            vec![Some("a".into()), Some("q".into()), Some(String::new())],
            "kind must be 1 to 255 bytes",
        ),
        (
            "SELECT shardq.enqueue($1, $2, $3)",
            vec![Some("a".into()), None, Some("k".into())],
            "queue must be 1 to 128 bytes, got NULL",
        ),
        (
            "SELECT shardq.enqueue($1, $2, $3, jsonb_build_object('s', $4::text))",
            vec![Some("a".into()), Some("q".into()), Some("k".into()), Some(big)],
            "args: 300009 bytes of JSON exceed the cap of 262144",
        ),
        (
            "SELECT shardq.enqueue($1, $2, $3, max_attempts => 0)",
            vec![Some("a".into()), Some("q".into()), Some("k".into())],
            "max_attempts must be at least 1, got 0",
        ),
        (
            "SELECT shardq.enqueue($1, $2, $3, NULL)",
            vec![Some("a".into()), Some("q".into()), Some("k".into())],
            "args must be a JSON document, got NULL",
        ),
    ];
    for (sql, binds, expected) in cases {
        let mut q = sqlx::query_scalar::<_, i64>(sql);
        for b in binds {
            q = q.bind(b);
        }
        let err = q.fetch_one(&pool).await.unwrap_err();
        let db_err = err.as_database_error().unwrap();
        assert_eq!(db_err.code().as_deref(), Some("22023"), "{sql}: {db_err}");
        assert!(
            db_err.message().starts_with("shardq.enqueue: ") && db_err.message().contains(expected),
            "{sql}: {}",
            db_err.message()
        );
    }
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM shardq.jobs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 1, "only the valid call wrote a job");
}

// ---- 5. retention

#[tokio::test]
async fn the_pruner_deletes_old_finished_jobs_and_leaves_the_rest() {
    let f = fleet().await;
    let a = account("retention");
    let pool = pool_of(&f, &a).await;
    // On a queue this node does not work, so nothing here changes but by pruning.
    sqlx::query(
        "INSERT INTO shardq.jobs (account, queue, kind, state, attempt, finalized_at, locked_by, lease_expires_at)
         SELECT $1, 'parked', 'count', s.state, 1,
                CASE WHEN s.state IN ('available', 'running') THEN NULL
                     WHEN i % 2 = 0 THEN now() - interval '2 hours' ELSE now() - interval '1 minute' END,
                CASE WHEN s.state = 'running' THEN 'some-node' END,
                CASE WHEN s.state = 'running' THEN now() + interval '1 day' END
           FROM generate_series(1, 2000) AS i,
                unnest(ARRAY['available', 'running', 'completed', 'cancelled', 'discarded']) AS s(state)",
    )
    .bind(a.as_str())
    .execute(&pool)
    .await
    .unwrap();
    let counts = || async {
        let rows: Vec<(String, bool, i64)> = sqlx::query_as(
            "SELECT state, coalesce(finalized_at < now() - interval '1 hour', false), count(*)
               FROM shardq.jobs GROUP BY 1, 2",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        rows.into_iter()
            .map(|(s, old, n)| (format!("{s}{}", if old { " old" } else { "" }), n))
            .collect::<HashMap<String, i64>>()
    };
    let before = counts().await;
    assert_eq!(before["completed old"], 1000);
    let opts = RuntimeOptions {
        retain_completed: Duration::from_secs(3600),
        retain_cancelled: Duration::from_secs(3600),
        retain_discarded: Duration::from_secs(3600),
        prune_interval: Duration::from_millis(50),
        ..fast_options()
    };
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 4)
        .register(Counting::default())
        .options(opts)
        .start()
        .unwrap();
    wait_for("the old finished jobs pruned", WAIT, || async {
        let c = counts().await;
        ["completed old", "cancelled old", "discarded old"]
            .iter()
            .all(|k| !c.contains_key(*k))
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await;
    let after = counts().await;
    for (kept, n) in [
        ("available", 2000),
        ("running", 2000),
        ("completed", 1000),
        ("cancelled", 1000),
        ("discarded", 1000),
    ] {
        assert_eq!(after[kept], n, "{kept}: untouched");
    }
    assert_eq!(after.len(), 5, "{after:?}");
}

#[tokio::test]
async fn the_jobs_table_stays_small_while_thousands_of_jobs_flow_through() {
    let f = fleet().await;
    let a = account("steady-flow");
    let pool = pool_of(&f, &a).await;
    let runs = Counting::default();
    let opts = RuntimeOptions {
        retain_completed: Duration::ZERO,
        prune_interval: Duration::from_millis(50),
        ..fast_options()
    };
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 16)
        .register(runs.clone())
        .options(opts)
        .start()
        .unwrap();
    const WAVES: usize = 20;
    const WAVE: usize = 250;
    let rows = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM shardq.jobs")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let mut most = 0;
    for wave in 1..=WAVES {
        f.client
            .enqueue_many((0..WAVE).map(|_| (a.clone(), NewJob::from_json("count", serde_json::json!({})))))
            .await
            .unwrap();
        most = most.max(rows().await);
        wait_for("the wave ran", WAIT, || async {
            runs.0.lock().unwrap().len() == wave * WAVE
        })
        .await;
        most = most.max(rows().await);
    }
    wait_for("every completed job pruned", WAIT, || async { rows().await == 0 }).await;
    rt.shutdown(Duration::from_secs(5)).await;
    assert_eq!(runs.0.lock().unwrap().len(), WAVES * WAVE, "every job ran");
    assert!(
        most <= (4 * WAVE) as i64,
        "at most {most} rows at once while {} jobs flowed through",
        WAVES * WAVE
    );
}

// ---- 6. chained fan-out

/// Processes one chunk of an account's `items` per job, then enqueues the
/// next chunk in the same transaction (the README's example).
#[derive(Clone)]
struct ProcessItems {
    client: Client,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Chunk {
    /// Last item id done by previous chunks.
    after: i64,
    /// Items per job.
    size: i64,
}

impl Worker for ProcessItems {
    type Args = Chunk;
    const KIND: &'static str = "process_items";
    async fn work(&self, ctx: JobContext, chunk: Chunk) -> Result<(), JobError> {
        let account = Account::new(ctx.account.as_str())?;
        let db = self.client.router().pool_for(&account).await?;
        let mut tx = db.pool.begin().await?;
        // At least once: a rerun of a chunk whose transaction committed does nothing.
        let first = sqlx::query("INSERT INTO item_chunks (account, after) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(account.as_str())
            .bind(chunk.after)
            .execute(&mut *tx)
            .await?;
        if first.rows_affected() == 0 {
            return Ok(());
        }
        let done: Vec<i64> = sqlx::query_scalar(
            "UPDATE items SET processed = processed + 1
              WHERE account = $1 AND id IN (SELECT id FROM items WHERE account = $1 AND id > $2
                                             ORDER BY id LIMIT $3)
             RETURNING id",
        )
        .bind(account.as_str())
        .bind(chunk.after)
        .bind(chunk.size)
        .fetch_all(&mut *tx)
        .await?;
        if done.len() as i64 == chunk.size {
            let next = Chunk {
                after: done.iter().copied().max().unwrap_or(chunk.after),
                size: chunk.size,
            };
            let job = NewJob::new(Self::KIND, &next).map_err(|e| JobError::failed(e.to_string()))?;
            self.client
                .enqueue_in(&mut tx, &account, job)
                .await
                .map_err(|e| JobError::failed(e.to_string()))?;
        }
        tx.commit().await?;
        Ok(())
    }
}

#[tokio::test]
async fn a_chained_fan_out_processes_every_row_once_chunk_by_chunk() {
    let f = fleet().await;
    let a = account("fan-out");
    let pool = pool_of(&f, &a).await;
    sqlx::raw_sql(
        "CREATE TABLE items (account text NOT NULL, id bigint NOT NULL, processed int NOT NULL DEFAULT 0,
                             PRIMARY KEY (account, id));
         CREATE TABLE item_chunks (account text NOT NULL, after bigint NOT NULL, PRIMARY KEY (account, after));",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO items (account, id) SELECT $1, i FROM generate_series(1, 25000) AS i")
        .bind(a.as_str())
        .execute(&pool)
        .await
        .unwrap();
    let first = f
        .client
        .enqueue(
            &a,
            NewJob::new(ProcessItems::KIND, &Chunk { after: 0, size: 10_000 }).unwrap(),
        )
        .await
        .unwrap();
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 4)
        .register(ProcessItems {
            client: f.client.clone(),
        })
        .options(fast_options())
        .start()
        .unwrap();
    wait_for("the chain reached its end", WAIT, || async {
        let jobs = f.client.jobs_of(&a, None, 10).await.unwrap();
        jobs.len() == 3 && jobs.iter().all(|j| j.state == "completed")
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await;
    let mut chain: Vec<i64> = f
        .client
        .jobs_of(&a, None, 10)
        .await
        .unwrap()
        .iter()
        .map(|j| j.args["after"].as_i64().unwrap())
        .collect();
    chain.sort_unstable();
    assert_eq!(
        chain,
        [0, 10_000, 20_000],
        "one job per chunk, each after the previous one's last row"
    );
    assert_eq!(f.client.job(&first).await.unwrap().state, "completed");
    let (rows, once): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE processed = 1) FROM items WHERE account = $1")
            .bind(a.as_str())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((rows, once), (25_000, 25_000), "every row processed exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waiting_past_the_priority_aging_is_claimed_ahead_of_better_priorities() {
    let f = fleet().await;
    let a = account("aging");
    // One low-priority job that has waited ten minutes, behind twenty of
    // the best priority that are due now.
    let old = f
        .client
        .enqueue(
            &a,
            NewJob::from_json("count", serde_json::json!({ "old": true }))
                .priority(4)
                .run_at(chrono::Utc::now() - chrono::Duration::minutes(10)),
        )
        .await
        .unwrap();
    for i in 0..20 {
        f.client
            .enqueue(
                &a,
                NewJob::from_json("count", serde_json::json!({ "i": i })).priority(0),
            )
            .await
            .unwrap();
    }
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 1)
        .register(Counting::default())
        .options(RuntimeOptions {
            max_batch: 1,
            priority_aging: Some(Duration::from_secs(60)),
            ..fast_options()
        })
        .start()
        .unwrap();
    wait_for("the first claim ran", WAIT, || async {
        !f.client.jobs_of(&a, Some("completed"), 30).await.unwrap().is_empty()
    })
    .await;
    rt.shutdown(Duration::from_secs(1)).await;
    let first = f
        .client
        .jobs_of(&a, Some("completed"), 30)
        .await
        .unwrap()
        .into_iter()
        .min_by_key(|j| j.attempted_at)
        .unwrap();
    assert_eq!(first.id, old, "the aged priority-4 job went first");
}
