//! Outcomes that must never jam, duplicate or lose work: text the database
//! refuses, runs whose lease is lost, re-claims, and shutdown ordering.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardq::{Account, CancelReason, JobContext, JobError, JobId, NewJob, Runtime, RuntimeOptions};
use shardq_tests::{count_state, fast_options, fleet, wait_for};

const WAIT: Duration = Duration::from_secs(30);

/// Ends its run as `args.mode` says, with a NUL byte in every text it returns.
struct Poison;

#[derive(serde::Deserialize)]
struct PoisonArgs {
    mode: String,
}

impl shardq::Worker for Poison {
    type Args = PoisonArgs;
    const KIND: &'static str = "poison";
    async fn work(&self, _: JobContext, a: PoisonArgs) -> Result<(), JobError> {
        match a.mode.as_str() {
            "fail" => Err(JobError::failed("bad\0byte")),
            "cancel" => Err(JobError::Cancel("stop\0here".into())),
            "panic" => panic!("fell\0over"),
            _ => Ok(()),
        }
    }
}

fn poison(mode: &str) -> NewJob {
    NewJob::from_json("poison", serde_json::json!({ "mode": mode })).max_attempts(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcome_text_with_a_nul_byte_never_jams_the_shard_completer() {
    let f = fleet().await;
    let a = Account::new("nul-account").unwrap();
    let shard = f.router.shard_for(&a).await.unwrap().shard;
    let failed = f.client.enqueue(&a, poison("fail")).await.unwrap();
    let cancelled = f.client.enqueue(&a, poison("cancel")).await.unwrap();
    let panicked = f.client.enqueue(&a, poison("panic")).await.unwrap();
    let mut fine = Vec::new();
    for _ in 0..20 {
        fine.push(f.client.enqueue(&a, poison("ok")).await.unwrap());
    }
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 8)
        .register(Poison)
        .options(fast_options())
        .start()
        .unwrap();
    wait_for("every outcome written", WAIT, || async {
        count_state(&f.router, &shard, "completed").await == 20
            && count_state(&f.router, &shard, "discarded").await == 2
            && count_state(&f.router, &shard, "cancelled").await == 1
    })
    .await;
    // Later runs on the shard are written too: the completer is not stuck.
    let later = f.client.enqueue(&a, poison("ok")).await.unwrap();
    wait_for("a later job completed", WAIT, || async {
        f.client.job(&later).await.unwrap().state == "completed"
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await;
    let error_of = |j: shardq::JobRecord| j.errors[0]["error"].as_str().unwrap_or_default().to_string();
    assert_eq!(error_of(f.client.job(&failed).await.unwrap()), "bad\\0byte");
    assert!(
        error_of(f.client.job(&cancelled).await.unwrap()).ends_with("stop\\0here"),
        "the cancel reason is kept, its NUL escaped"
    );
    assert!(
        error_of(f.client.job(&panicked).await.unwrap()).contains("fell\\0over"),
        "the panic text is kept, its NUL escaped"
    );
}

/// Records each run's attempt and why it was told to stop; attempt 1 waits
/// for the stop signal, later attempts until shutdown hands them back.
#[derive(Clone, Default)]
struct Watch {
    stops: Arc<Mutex<Vec<Stop>>>,
}

/// A run's attempt and why it was told to stop.
type Stop = (i32, Option<CancelReason>);

impl shardq::Worker for Watch {
    type Args = serde_json::Value;
    const KIND: &'static str = "watch";
    fn timeout(&self) -> Duration {
        Duration::from_secs(3600)
    }
    async fn work(&self, ctx: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        if ctx.attempt == 1 {
            ctx.cancelled().await;
        } else {
            std::future::pending::<()>().await;
        }
        self.stops.lock().unwrap().push((ctx.attempt, ctx.cancel_reason()));
        Ok(())
    }
}

/// What a rescue by another node does to a running job: available again,
/// its lease gone (held back by `run_at` when `later`).
async fn rescue_behind_the_nodes_back(f: &shardq_tests::Fleet, id: &JobId, later: bool) {
    let db = f.router.shard(&id.shard).unwrap();
    sqlx::query(
        "UPDATE shardq.jobs SET state = 'available', locked_by = NULL, lease_expires_at = NULL,
                run_at = CASE WHEN $2 THEN now() + interval '1 hour' ELSE now() END
          WHERE id = $1 AND state = 'running'",
    )
    .bind(id.id)
    .bind(later)
    .execute(&db.pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_lease_is_lost_is_told_to_stop_and_writes_nothing() {
    let f = fleet().await;
    let a = Account::new("lease-lost").unwrap();
    let id = f
        .client
        .enqueue(&a, NewJob::from_json("watch", serde_json::json!({})))
        .await
        .unwrap();
    let w = Watch::default();
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 2)
        .register(w.clone())
        .options(fast_options())
        .start()
        .unwrap();
    wait_for("the job runs", WAIT, || async {
        f.client.job(&id).await.unwrap().state == "running"
    })
    .await;
    rescue_behind_the_nodes_back(&f, &id, true).await;
    wait_for("the run is told its lease is lost", WAIT, || async {
        w.stops.lock().unwrap().clone() == vec![(1, Some(CancelReason::LeaseLost))]
    })
    .await;
    wait_for("the run's lease is released", WAIT, || async { rt.leased() == 0 }).await;
    let job = f.client.job(&id).await.unwrap();
    assert_eq!(
        (job.state, job.attempt),
        (shardq::JobState::Available, 1),
        "the lost run's outcome (Ok) is not written"
    );
    rt.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_claimed_again_by_the_same_node_keeps_both_runs_apart() {
    let f = fleet().await;
    let a = Account::new("reclaimed").unwrap();
    let id = f
        .client
        .enqueue(&a, NewJob::from_json("watch", serde_json::json!({})))
        .await
        .unwrap();
    let w = Watch::default();
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 2)
        .register(w.clone())
        .options(RuntimeOptions {
            // Renewals must not notice the rescue first: the re-claim must.
            heartbeat_interval: Duration::from_secs(20),
            lease: Duration::from_secs(30),
            ..fast_options()
        })
        .start()
        .unwrap();
    wait_for("the job runs", WAIT, || async {
        f.client.job(&id).await.unwrap().state == "running"
    })
    .await;
    rescue_behind_the_nodes_back(&f, &id, false).await;
    wait_for("this node claims it again", WAIT, || async {
        let j = f.client.job(&id).await.unwrap();
        j.state == "running" && j.attempt == 2
    })
    .await;
    wait_for("the old run is told its lease is lost", WAIT, || async {
        w.stops.lock().unwrap().clone() == vec![(1, Some(CancelReason::LeaseLost))]
    })
    .await;
    // The old run's end must not touch the new run: shutdown still hands the
    // new run back, without counting its attempt.
    rt.shutdown(Duration::from_millis(100)).await;
    let job = f.client.job(&id).await.unwrap();
    assert_eq!((job.state, job.attempt), (shardq::JobState::Available, 2), "{job:?}");
    assert_eq!(
        job.max_attempts,
        shardq::job::DEFAULT_MAX_ATTEMPTS + 1,
        "the handed-back attempt does not count"
    );
}

/// Options for a node that only notifications can wake (1 h poll).
fn woken_only_by_notify() -> RuntimeOptions {
    RuntimeOptions {
        poll_interval: Duration::from_secs(3600),
        ..fast_options()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_handed_back_at_shutdown_wakes_another_node_at_once() {
    let f = fleet().await;
    let a = Account::new("handed-back").unwrap();
    let id = f
        .client
        .enqueue(&a, NewJob::from_json("watch", serde_json::json!({})))
        .await
        .unwrap();
    let first = Runtime::builder(f.router.clone())
        .queue("default", 2)
        .register(Watch::default())
        .options(fast_options())
        .start()
        .unwrap();
    wait_for("the first node runs the job", WAIT, || async {
        f.client.job(&id).await.unwrap().state == "running"
    })
    .await;
    let second = Runtime::builder(f.router.clone())
        .queue("default", 2)
        .register(Watch::default())
        .options(woken_only_by_notify())
        .start()
        .unwrap();
    // Let the second node's first fetch (at start) find nothing.
    wait_for("the second node is listening", WAIT, || async {
        let db = f.router.shard(&id.shard).unwrap();
        shardq::store::listener_count(db).await.unwrap() >= 2
    })
    .await;
    first.shutdown(Duration::from_millis(100)).await;
    wait_for("the second node runs the handed-back job", WAIT, || async {
        let j = f.client.job(&id).await.unwrap();
        j.state == "running" && j.locked_by.as_deref() == Some(second.node_id())
    })
    .await;
    second.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescued_job_wakes_a_producer_at_once() {
    let f = fleet().await;
    let a = Account::new("rescued").unwrap();
    let id = f
        .client
        .enqueue(&a, NewJob::from_json("watch", serde_json::json!({})))
        .await
        .unwrap();
    let db = f.router.shard(&id.shard).unwrap();
    // A node that claimed the job and died: its lease has run out.
    sqlx::query(
        "UPDATE shardq.jobs SET state = 'running', attempt = 1, locked_by = 'dead-node',
                lease_expires_at = now() - interval '1 second' WHERE id = $1",
    )
    .bind(id.id)
    .execute(&db.pool)
    .await
    .unwrap();
    let node = Runtime::builder(f.router.clone())
        .queue("default", 2)
        .register(Watch::default())
        .options(woken_only_by_notify())
        .start()
        .unwrap();
    wait_for("the rescued job runs again", WAIT, || async {
        let j = f.client.job(&id).await.unwrap();
        j.state == "running" && j.attempt == 2
    })
    .await;
    node.shutdown(Duration::from_millis(100)).await;
}

/// Counts runs.
#[derive(Clone, Default)]
struct Once(Arc<Mutex<u32>>);

impl shardq::Worker for Once {
    type Args = serde_json::Value;
    const KIND: &'static str = "once";
    async fn work(&self, _: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        *self.0.lock().unwrap() += 1;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_reply_is_lost_runs_the_job_instead_of_discarding_it() {
    let f = fleet().await;
    let a = Account::new("lost-reply").unwrap();
    let id = f
        .client
        .enqueue(&a, NewJob::from_json("once", serde_json::json!({})).max_attempts(1))
        .await
        .unwrap();
    // The first claim commits only after the node stopped waiting for its
    // reply: the job is `running` under the node's name, unknown to it.
    let db = f.router.shard(&id.shard).unwrap();
    sqlx::raw_sql(
        "CREATE TABLE slept (n int);
         CREATE FUNCTION slow_first_claim() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NOT EXISTS (SELECT 1 FROM slept) THEN
                 INSERT INTO slept VALUES (1);
                 PERFORM pg_sleep(1.5);
             END IF;
             RETURN NULL;
         END $$;
         CREATE TRIGGER slow_first_claim AFTER UPDATE ON shardq.jobs
             FOR EACH ROW WHEN (OLD.state = 'available' AND NEW.state = 'running')
             EXECUTE FUNCTION slow_first_claim();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let runs = Once::default();
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 2)
        .register(runs.clone())
        .options(RuntimeOptions {
            shard_timeout: Duration::from_millis(300),
            lease: Duration::from_secs(5),
            ..fast_options()
        })
        .start()
        .unwrap();
    wait_for("the job is finished", WAIT, || async {
        f.client.job(&id).await.unwrap().state.is_final()
    })
    .await;
    rt.shutdown(Duration::from_millis(100)).await;
    let job = f.client.job(&id).await.unwrap();
    assert_eq!(job.state, "completed", "{job:?}");
    assert_eq!(
        (*runs.0.lock().unwrap(), job.attempt),
        (1, 1),
        "ran once, on its one attempt"
    );
}

#[tokio::test]
async fn a_delay_is_counted_on_the_shards_clock_from_the_insert() {
    let f = fleet().await;
    let a = Account::new("delayed").unwrap();
    let delay = Duration::from_secs(90);
    let one = f
        .client
        .enqueue(&a, NewJob::from_json("once", serde_json::json!({})).delay(delay))
        .await
        .unwrap();
    let many = f
        .client
        .enqueue_many([(a.clone(), NewJob::from_json("once", serde_json::json!({})).delay(delay))])
        .await
        .unwrap();
    let keyed = f
        .client
        .enqueue(
            &a,
            NewJob::from_json("once", serde_json::json!({}))
                .serial_key("k")
                .delay(delay),
        )
        .await
        .unwrap();
    for id in [&one, &many[0], &keyed] {
        let job = f.client.job(id).await.unwrap();
        // Both come from the insert's now(): exactly the delay apart.
        assert_eq!((job.run_at - job.created_at).to_std().unwrap(), delay, "{id}");
    }
}

/// Fails its first run and snoozes its second, for the clock test.
struct FailThenSnooze;

impl shardq::Worker for FailThenSnooze {
    type Args = serde_json::Value;
    const KIND: &'static str = "fail_then_snooze";
    async fn work(&self, ctx: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        match ctx.attempt {
            1 => Err(JobError::failed("first run fails")),
            2 => Err(JobError::Snooze(Duration::from_secs(SNOOZE_SECS))),
            _ => Ok(()),
        }
    }
}

/// The snooze of [`FailThenSnooze`]'s second run.
const SNOOZE_SECS: u64 = 40;

#[tokio::test]
async fn retry_and_snooze_times_come_from_the_shards_clock() {
    // The shard's server runs an hour ahead of this machine (and of the
    // node): a time the node computed would land an hour early there.
    let bed = tokio::task::spawn_blocking(|| shardq_testbed::TestBed::start(1).map_err(|e| e.to_string()))
        .await
        .unwrap()
        .unwrap();
    let shard = bed.shards()[0].clone();
    tokio::task::spawn_blocking(move || {
        shard
            .restart_clock_ahead(Duration::from_secs(3600))
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap()
    .unwrap();
    let f = shardq_tests::fleet_on(&bed).await;
    let db = f.router.shards()[0].clone();
    let ahead: f64 = sqlx::query_scalar("SELECT extract(epoch FROM now())::float8")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let here = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(ahead - here > 3000.0, "the shard's clock is an hour ahead");
    let backoff = Duration::from_secs(20);
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 2)
        .register(FailThenSnooze)
        .options(RuntimeOptions {
            backoff: shardq::Backoff {
                base: backoff,
                max: backoff,
            },
            ..fast_options()
        })
        .start()
        .unwrap();
    let a = Account::new("clocked").unwrap();
    let id = f
        .client
        .enqueue(&a, NewJob::from_json("fail_then_snooze", serde_json::json!({})))
        .await
        .unwrap();
    wait_for("the first run failed", Duration::from_secs(30), || async {
        f.client
            .job(&id)
            .await
            .unwrap()
            .errors
            .as_array()
            .is_some_and(|e| e.len() == 1)
    })
    .await;
    let job = f.client.job(&id).await.unwrap();
    let failed_at: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(job.errors[0]["at"].clone()).expect("the error's time");
    // Backoff jitter is ±20%; a node-clock time would be an hour early.
    let wait = (job.run_at - failed_at)
        .to_std()
        .map(|d| d.as_secs_f64())
        .unwrap_or(-1.0);
    assert!(
        (15.9..=24.1).contains(&wait),
        "the retry waits its backoff from the shard's clock: {wait} s after the failure"
    );
    // Let the retry run now, then look at its snooze.
    sqlx::query("UPDATE shardq.jobs SET run_at = now() WHERE id = $1")
        .bind(id.id)
        .execute(&db.pool)
        .await
        .unwrap();
    wait_for("the second run snoozed", Duration::from_secs(30), || async {
        let j = f.client.job(&id).await.unwrap();
        j.attempt == 2 && j.state == "available"
    })
    .await;
    let job = f.client.job(&id).await.unwrap();
    let attempted_at = job.attempted_at.expect("claimed once more");
    let wait = (job.run_at - attempted_at)
        .to_std()
        .map(|d| d.as_secs_f64())
        .unwrap_or(-1.0);
    assert!(
        (SNOOZE_SECS as f64..SNOOZE_SECS as f64 + 20.0).contains(&wait),
        "the snooze counts from the shard's clock: {wait} s after the claim"
    );
    rt.shutdown(Duration::from_secs(5)).await;
}

/// Counts its runs; the first waits for the test's go.
#[derive(Clone)]
struct Gated {
    runs: Arc<std::sync::atomic::AtomicUsize>,
    started: Arc<tokio::sync::Notify>,
    go: Arc<tokio::sync::Notify>,
}

impl shardq::Worker for Gated {
    type Args = serde_json::Value;
    const KIND: &'static str = "gated";
    async fn work(&self, _: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        let run = self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        self.started.notify_one();
        if run == 1 {
            self.go.notified().await;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_stay_renewed_at_shutdown_until_the_last_outcome_is_written() {
    let f = fleet().await;
    let a = Account::new("slow-flush-account").unwrap();
    let shard = f.router.shard_for(&a).await.unwrap().shard;
    let db = f.router.shard(&shard).unwrap();
    // Completions wait 1.2 s at the server before touching a row (a slow
    // disk, say); renewals and rescues do not. Four leases would lapse
    // meanwhile if renewals stopped before the completer's last flush.
    sqlx::raw_sql(
        "CREATE FUNCTION public.slow_completions() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF current_query() LIKE '%SET state = ''completed''%' THEN PERFORM pg_sleep(1.2); END IF;
             RETURN NULL;
         END $$;
         CREATE TRIGGER slow_completions BEFORE UPDATE ON shardq.jobs
             FOR EACH STATEMENT EXECUTE FUNCTION public.slow_completions();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let options = RuntimeOptions {
        lease: Duration::from_millis(300),
        heartbeat_interval: Duration::from_millis(50),
        rescue_interval: Duration::from_millis(50),
        fleet_heartbeat: Duration::from_millis(100),
        ..fast_options()
    };
    let gated = Gated {
        runs: Arc::default(),
        started: Arc::default(),
        go: Arc::default(),
    };
    let id = f
        .client
        .enqueue(&a, NewJob::from_json("gated", serde_json::json!({})))
        .await
        .unwrap();
    let first = Runtime::builder(f.router.clone())
        .queue("default", 2)
        .register(gated.clone())
        .options(options.clone())
        .start()
        .unwrap();
    tokio::time::timeout(WAIT, gated.started.notified())
        .await
        .expect("the job started");
    // A second node rescues any lease of the first that lapses.
    let second = Runtime::builder(f.router.clone())
        .queue("default", 2)
        .register(gated.clone())
        .options(options)
        .start()
        .unwrap();
    wait_for("the second node works the job's shard", WAIT, || async {
        second.working().contains(&shard)
    })
    .await;
    let stopping = tokio::spawn(first.shutdown(Duration::from_secs(5)));
    gated.go.notify_one();
    stopping.await.unwrap();
    wait_for("the job completed", WAIT, || async {
        f.client.job(&id).await.unwrap().state == "completed"
    })
    .await;
    second.shutdown(Duration::from_secs(5)).await;
    let job = f.client.job(&id).await.unwrap();
    assert_eq!(
        gated.runs.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the job ran once: its lease was renewed while its outcome was written"
    );
    assert_eq!(job.attempt, 1);
}
