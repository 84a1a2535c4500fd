//! Faults of the servers under a running worker node: a shard's server
//! crashes and comes back, every connection of the node is terminated from
//! the server side, the master's server stops. Each test starts its own bed,
//! since it stops servers.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardq::store::{self, FetchParams};
use shardq::{Account, JobContext, JobError, JobId, NewJob, Runtime, RuntimeOptions, Worker};
use shardq_router::Router;
use shardq_testbed::Server;
use shardq_tests::{count_state, fast_options, fleet_on, on_server, private_bed, wait_for, Fleet};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(30);

/// Runs per job id, shared by every kind below.
#[derive(Clone, Default)]
struct Runs(Arc<Mutex<HashMap<JobId, u32>>>);

impl Runs {
    fn record(&self, id: JobId) {
        *self.0.lock().unwrap().entry(id).or_default() += 1;
    }
    fn of(&self, id: &JobId) -> u32 {
        self.0.lock().unwrap().get(id).copied().unwrap_or(0)
    }
}

/// `count`: records the run and completes.
struct Count(Runs);
impl Worker for Count {
    type Args = serde_json::Value;
    const KIND: &'static str = "count";
    async fn work(&self, ctx: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        self.0.record(ctx.id);
        Ok(())
    }
}

/// `gate`: records the run, then waits until the test opens the gate.
struct Gate(Runs, watch::Receiver<bool>);
impl Worker for Gate {
    type Args = serde_json::Value;
    const KIND: &'static str = "gate";
    fn timeout(&self) -> Duration {
        Duration::from_secs(3600)
    }
    async fn work(&self, ctx: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        self.0.record(ctx.id);
        let mut open = self.1.clone();
        open.wait_for(|o| *o).await.map_err(JobError::from)?;
        Ok(())
    }
}

fn count_job() -> NewJob {
    NewJob::from_json("count", serde_json::json!({}))
}

/// The pid of the shard's LISTEN backend opened by a shardq pool, if any.
async fn listen_pid(pool: &PgPool) -> Option<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity
          WHERE datname = current_database() AND application_name = 'shardq' AND query LIKE 'LISTEN%'
          ORDER BY backend_start DESC LIMIT 1",
    )
    .fetch_optional(pool)
    .await
    .unwrap()
}

async fn job(f: &Fleet, id: &JobId) -> shardq::JobRecord {
    f.client.job(id).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_shard_stops_only_its_own_jobs_and_they_complete_after_restart() {
    let bed = private_bed(2).await;
    let f = fleet_on(&bed).await;
    let on_1 = Account::new("on-shard-1").unwrap();
    let on_2 = Account::new("on-shard-2").unwrap();
    f.router.place(&on_1, "shard_1").await.unwrap();
    f.router.place(&on_2, "shard_2").await.unwrap();

    let runs = Runs::default();
    let (open_gate, gate) = watch::channel(false);
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 8)
        .register(Count(runs.clone()))
        .register(Gate(runs.clone(), gate))
        .options(fast_options())
        .start()
        .unwrap();

    // The node works both shards.
    let mut before = Vec::new();
    for a in [&on_1, &on_2] {
        for _ in 0..5 {
            before.push(f.client.enqueue(a, count_job()).await.unwrap());
        }
    }
    wait_for("jobs on both shards completed", WAIT, || async {
        count_state(&f.router, "shard_1", "completed").await == 5
            && count_state(&f.router, "shard_2", "completed").await == 5
    })
    .await;
    // Jobs running on shard_1 when it crashes; their outcomes are written after it is back.
    let mut gated = Vec::new();
    for _ in 0..3 {
        gated.push(
            f.client
                .enqueue(&on_1, NewJob::from_json("gate", serde_json::json!({})))
                .await
                .unwrap(),
        );
    }
    wait_for("the gated jobs running on shard_1", WAIT, || async {
        count_state(&f.router, "shard_1", "running").await == 3
    })
    .await;
    // Jobs enqueued on shard_1 before the crash and due only after it: still available when it crashes.
    let shard_1 = f.router.shard("shard_1").unwrap();
    let due: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now() + interval '4 seconds'")
        .fetch_one(&shard_1.pool)
        .await
        .unwrap();
    let mut waiting = Vec::new();
    for _ in 0..20 {
        waiting.push(f.client.enqueue(&on_1, count_job().run_at(due)).await.unwrap());
    }

    on_server(&bed, "shard_1", Server::kill).await;
    let shard_2 = f.router.shard("shard_2").unwrap();
    let now_2: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&shard_2.pool)
        .await
        .unwrap();
    assert!(now_2 < due, "shard_1 crashed before its waiting jobs were due");
    open_gate.send(true).unwrap(); // the gated runs end while their shard is down

    // shard_2 keeps working jobs enqueued after the crash.
    let mut after = Vec::new();
    for _ in 0..20 {
        after.push(f.client.enqueue(&on_2, count_job()).await.unwrap());
    }
    wait_for("shard_2's new jobs completed while shard_1 is down", WAIT, || async {
        count_state(&f.router, "shard_2", "completed").await == 25
    })
    .await;
    assert!(
        !bed.server("shard_1").unwrap().is_accepting(),
        "shard_1 was down all along"
    );

    on_server(&bed, "shard_1", Server::start).await;
    wait_for("shard_1's jobs completed after its restart", WAIT, || async {
        count_state(&f.router, "shard_1", "completed").await == 5 + 3 + 20
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await;

    for id in before.iter().chain(&waiting).chain(&after) {
        let j = job(&f, id).await;
        assert_eq!(j.state, "completed", "{id}");
        assert_eq!((j.attempt, runs.of(id)), (1, 1), "{id} ran once");
        assert_eq!(j.errors, serde_json::json!([]), "{id}");
    }
    for id in &gated {
        // Either the completion written after the restart landed (attempt 1),
        // or the rescuer saw the expired lease first and attempt 2 completed;
        // either way every run but the last is recorded as an error.
        let j = job(&f, id).await;
        assert_eq!(j.state, "completed", "{id}");
        assert_eq!(u32::try_from(j.attempt).unwrap(), runs.of(id), "{id}: {}", j.errors);
        assert_eq!(j.errors.as_array().unwrap().len(), runs.of(id) as usize - 1, "{id}");
    }
    for shard in ["shard_1", "shard_2"] {
        for state in ["available", "running", "discarded", "cancelled"] {
            assert_eq!(count_state(&f.router, shard, state).await, 0, "{shard} {state}");
        }
    }
}

/// Makes the server behind `pool` keep commits that did not wait for their
/// flush in its WAL buffers for up to 10 s (the WAL writer's turn), with
/// nothing else writing them out (no background writer, no autovacuum): a
/// crash meanwhile loses them.
async fn slow_wal_writer(pool: &PgPool) {
    for setting in [
        "ALTER SYSTEM SET wal_writer_delay = '10s'",
        "ALTER SYSTEM SET wal_writer_flush_after = '16MB'",
        "ALTER SYSTEM SET bgwriter_lru_maxpages = 0",
        "ALTER SYSTEM SET autovacuum = off",
    ] {
        sqlx::query(setting).execute(pool).await.unwrap();
    }
    sqlx::query("SELECT pg_reload_conf()").execute(pool).await.unwrap();
}

/// Completions commit without waiting for their WAL flush. Here the WAL
/// writer flushes such commits only every 10 s and nothing else flushes
/// (the node is idle once its job completed), so a crash right after the
/// completion was read back loses it (and the claim before it, which did
/// not wait for its flush either): the job, `running` or `available` again
/// after the restart, runs a second time and completes. It is never lost.
/// A job whose completion survived completes after the restart having run
/// once.
/// (Should the WAL writer write them out between the completion and the
/// crash, as it does when they fill a WAL page, nothing is lost and
/// another job is tried.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_lost_in_a_server_crash_runs_the_job_again() {
    let bed = private_bed(1).await;
    let f = fleet_on(&bed).await;
    let a = Account::new("crash").unwrap();
    f.router.place(&a, "shard_1").await.unwrap();
    let shard = f.router.shard("shard_1").unwrap();
    slow_wal_writer(&shard.pool).await;
    let runs = Runs::default();
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 4)
        .register(Count(runs.clone()))
        .options(fast_options())
        .start()
        .unwrap();
    let mut lost = None;
    for _ in 0..10 {
        let id = f.client.enqueue(&a, count_job()).await.unwrap();
        wait_for("the job completed", WAIT, || async {
            runs.of(&id) == 1 && job(&f, &id).await.state == "completed"
        })
        .await;
        on_server(&bed, "shard_1", Server::kill).await;
        on_server(&bed, "shard_1", Server::start).await;
        // Either way the job ends completed: at once when its completion
        // survived, or after a second run when it was lost (the row came
        // back `running`, or `available` when its claim was lost too, and
        // the node may run it again before this reads it back).
        wait_for("the job is completed after the restart", WAIT, || async {
            job(&f, &id).await.state == "completed"
        })
        .await;
        if runs.of(&id) > 1 {
            lost = Some(id);
            break;
        }
    }
    let id = lost.expect("a completion lost in the crash (the WAL writer flushed every time)");
    assert_eq!(
        runs.of(&id),
        2,
        "the job whose completion was lost ran exactly once more"
    );
    rt.shutdown(Duration::from_secs(5)).await;
    for state in ["available", "running", "discarded", "cancelled"] {
        assert_eq!(count_state(&f.router, "shard_1", state).await, 0, "{state}");
    }
}

/// Terminates every backend of the shardq pools on a database; returns how many.
async fn terminate_shardq_backends(admin: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name = 'shardq'
         ) t",
    )
    .fetch_one(admin)
    .await
    .unwrap()
}

/// A pool that is not one of shardq's (another application_name), so terminating those spares it.
fn outside_pool(router: &Router, shard: &str) -> PgPool {
    let target = &router.config().shard(shard).unwrap().database.target;
    PgPoolOptions::new()
        .max_connections(2)
        .connect_lazy_with(target.connect_options().into_inner().application_name("faults-test"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_connections_are_all_terminated_reconnects_listens_again_and_loses_nothing() {
    let bed = private_bed(2).await;
    let f = fleet_on(&bed).await;
    let shards = f.config.shard_names();
    let accounts: Vec<(Account, String)> = shards
        .iter()
        .map(|s| {
            let a = Account::new(format!("on-{s}")).unwrap();
            (a, s.clone())
        })
        .collect();
    for (a, s) in &accounts {
        f.router.place(a, s).await.unwrap();
    }
    let outside: HashMap<String, PgPool> = shards.iter().map(|s| (s.clone(), outside_pool(&f.router, s))).collect();

    let runs = Runs::default();
    // No poll within the test: only notifications and reconnects wake the producers.
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 16)
        .register(Count(runs.clone()))
        .options(RuntimeOptions {
            poll_interval: Duration::from_secs(3600),
            ..fast_options()
        })
        .start()
        .unwrap();
    for s in &shards {
        wait_for("the notifier's LISTEN", WAIT, || async {
            listen_pid(&outside[s]).await.is_some()
        })
        .await;
    }

    // Enqueue continuously (through pools that are not terminated) while the node's connections are cut.
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let enqueuer = {
        let (accounts, outside) = (accounts.clone(), outside.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut pace = tokio::time::interval(Duration::from_millis(5));
            for i in 0usize.. {
                tokio::select! {
                    _ = stop_rx.changed() => break,
                    _ = pace.tick() => {}
                }
                let (a, s) = &accounts[i % accounts.len()];
                let mut conn = outside[s].acquire().await.unwrap();
                let id = store::job_insert(
                    &mut shardq_router::Conn::new(&mut conn, shardq_router::Pooler::None),
                    a.as_str(),
                    &count_job(),
                    "{}",
                    store::Notify::AtCommit,
                )
                .await
                .unwrap();
                ids.push(JobId { shard: s.clone(), id });
            }
            ids
        })
    };

    let completed = || async {
        let mut n = 0;
        for s in &shards {
            n += count_state(&f.router, s, "completed").await;
        }
        n
    };
    for round in 0..4 {
        for s in &shards {
            let old = listen_pid(&outside[s]).await;
            assert!(old.is_some(), "round {round}: {s} has a LISTEN backend");
            let n = terminate_shardq_backends(&outside[s]).await;
            assert!(n >= 1, "round {round}: terminated the node's backends on {s}");
            wait_for("a new LISTEN backend", WAIT, || async {
                let now = listen_pid(&outside[s]).await;
                now.is_some() && now != old
            })
            .await;
        }
        let done = completed().await;
        wait_for("jobs to complete again after the terminations", WAIT, || async {
            completed().await >= done + 20
        })
        .await;
    }
    stop_tx.send(true).unwrap();
    let mut ids = enqueuer.await.unwrap();
    // One last job per shard, enqueued after the last reconnect, is woken by its notification.
    for (a, _) in &accounts {
        ids.push(f.client.enqueue(a, count_job()).await.unwrap());
    }
    let total = ids.len() as i64;
    assert!(total > 80, "enqueued {total} jobs during the terminations");
    wait_for("every enqueued job completed", WAIT, || async {
        completed().await == total
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await;

    for id in &ids {
        assert_eq!(runs.of(id), 1, "{id} ran once");
        assert_eq!(job(&f, id).await.state, "completed", "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_master_down_cached_accounts_keep_working_and_new_ones_fail_naming_the_master() {
    let bed = private_bed(2).await;
    let f = fleet_on(&bed).await;
    let known: Vec<Account> = ["shard_1", "shard_2"]
        .iter()
        .map(|s| Account::new(format!("known-on-{s}")).unwrap())
        .collect();
    for (a, s) in known.iter().zip(["shard_1", "shard_2"]) {
        f.router.place(a, s).await.unwrap();
    }
    let runs = Runs::default();
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 8)
        .register(Count(runs.clone()))
        .options(fast_options())
        .start()
        .unwrap();

    on_server(&bed, "master", Server::stop).await;
    let mut ids = Vec::new();
    for (a, s) in known.iter().zip(["shard_1", "shard_2"]) {
        assert_eq!(f.router.shard_for(a).await.unwrap().shard, s, "cached placement of {a}");
        for _ in 0..5 {
            ids.push(f.client.enqueue(a, count_job()).await.unwrap());
        }
    }
    wait_for(
        "the known accounts' jobs completed with the master down",
        WAIT,
        || async {
            count_state(&f.router, "shard_1", "completed").await == 5
                && count_state(&f.router, "shard_2", "completed").await == 5
        },
    )
    .await;

    let new = Account::new("never-seen").unwrap();
    let err = f.router.shard_for(&new).await.unwrap_err();
    assert!(
        matches!(&err, shardq_router::Error::Database { database, .. } if database == "master"),
        "{err:?}"
    );
    assert!(err.to_string().starts_with("master ("), "{err}");
    let err = f.client.enqueue(&new, count_job()).await.unwrap_err();
    assert!(err.to_string().starts_with("master ("), "{err}");

    on_server(&bed, "master", Server::start).await;
    let placed = f.router.shard_for(&new).await.unwrap();
    assert!(placed.placed_now, "placed once the master is back");
    let id = f.client.enqueue(&new, count_job()).await.unwrap();
    assert_eq!(id.shard, placed.shard);
    wait_for("the new account's job completed", WAIT, || async {
        job(&f, &id).await.state == "completed"
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await;
    for id in ids.iter().chain([&id]) {
        assert_eq!(runs.of(id), 1, "{id} ran once");
    }
}

/// `hang`: runs until aborted; counts the runs in progress (the count drops when its future is dropped).
struct Hang(Arc<std::sync::atomic::AtomicUsize>);
struct InProgress(Arc<std::sync::atomic::AtomicUsize>);
impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}
impl Worker for Hang {
    type Args = serde_json::Value;
    const KIND: &'static str = "hang";
    fn timeout(&self) -> Duration {
        Duration::from_secs(3600)
    }
    async fn work(&self, _: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let _running = InProgress(self.0.clone());
        std::future::pending::<()>().await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_the_handlers_of_the_jobs_it_hands_back() {
    let bed = private_bed(1).await;
    let f = fleet_on(&bed).await;
    let a = Account::new("hands-back").unwrap();
    let ids = f
        .client
        .enqueue_many((0..3).map(|_| (a.clone(), NewJob::from_json("hang", serde_json::json!({})))))
        .await
        .unwrap();
    let in_progress = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 8)
        .register(Hang(in_progress.clone()))
        .options(fast_options())
        .start()
        .unwrap();
    let running = || in_progress.load(std::sync::atomic::Ordering::SeqCst);
    wait_for("3 handlers running", WAIT, || std::future::ready(running() == 3)).await;
    rt.shutdown(Duration::from_millis(100)).await;
    for id in &ids {
        assert_eq!(job(&f, id).await.state, "available", "{id} handed back");
    }
    // A handed-back job may run on another node at once: this node's run must be stopped.
    wait_for("the handed-back handlers to be stopped", WAIT, || {
        std::future::ready(running() == 0)
    })
    .await;
}

/// Whether a claim of the node's started on the shard after `since` (the
/// server's clock), seen in `pg_stat_activity` over `conn`.
async fn claimed_since(conn: &mut sqlx::PgConnection, since: chrono::DateTime<chrono::Utc>) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
          WHERE datname = current_database() AND application_name = 'shardq'
            AND query LIKE '%SET state = ''running''%' AND query_start > $1)",
    )
    .bind(since)
    .fetch_one(conn)
    .await
    .unwrap()
}

/// Producers are woken once a new LISTEN is in place, never before it: a
/// job inserted after the LISTEN connection was lost and before the new one
/// listens (its notification reaches no one) is found by that wake, not by
/// the next poll (an hour away here). The window is held open by freezing
/// only the shard's postmaster: the node's open sessions keep answering,
/// while the new LISTEN session (the shard's `listen_url` pool, which holds
/// no other session) hangs at startup until the thaw. A notifier that woke
/// its producers when the connection dropped would have them claim before
/// the insert and find nothing, then listen again silently (shown by
/// turning off sqlx's `eager_reconnect`, which makes `try_recv` report the
/// loss before it has reconnected: the job then waits for the poll).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_inserted_while_the_listener_reconnects_is_claimed_once_it_listens_again() {
    let bed = private_bed(1).await;
    let f = fleet_on(&bed).await;
    let shard = f.config.shard_names()[0].clone();
    let mut config = f.config.clone();
    let direct = config.shards[0].database.target.clone();
    config.shards[0].database.listen = Some(direct);
    let router = Arc::new(Router::connect(&config).await.unwrap());
    let client = shardq::Client::new(router.clone());
    let account = Account::new("relisten").unwrap();
    router.place(&account, &shard).await.unwrap();
    let outside = outside_pool(&router, &shard);

    let runs = Runs::default();
    let rt = Runtime::builder(router.clone())
        .queue("default", 4)
        .register(Count(runs.clone()))
        .options(RuntimeOptions {
            poll_interval: Duration::from_secs(3600),
            ..fast_options()
        })
        .start()
        .unwrap();
    // A first job run leaves open sessions in the node's engine pool.
    let first = client.enqueue(&account, count_job()).await.unwrap();
    wait_for("the first job to complete", WAIT, || async {
        client.job(&first).await.unwrap().state == "completed"
    })
    .await;
    wait_for("the notifier's LISTEN", WAIT, || async {
        listen_pid(&outside).await.is_some()
    })
    .await;
    let listener = listen_pid(&outside).await.unwrap();
    let mut conn = outside.acquire().await.unwrap();

    on_server(&bed, "shard_1", Server::freeze_postmaster).await;
    let cut_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(listener)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert!(terminated, "terminated the LISTEN backend {listener}");
    // A wake before the new LISTEN would claim right away, over the open
    // sessions; let such a claim run before the insert (the fixed notifier
    // makes none, and this look ends after its deadline).
    let look_until = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < look_until && !claimed_since(&mut conn, cut_at).await {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut direct = shardq_router::Conn::new(&mut conn, shardq_router::Pooler::None);
    let id = store::job_insert(
        &mut direct,
        account.as_str(),
        &count_job(),
        "{}",
        store::Notify::AtCommit,
    )
    .await
    .unwrap();
    let id = JobId {
        shard: shard.clone(),
        id,
    };
    drop(conn);
    on_server(&bed, "shard_1", Server::thaw).await;

    wait_for("a new LISTEN backend", WAIT, || async {
        listen_pid(&outside).await.is_some_and(|pid| pid != listener)
    })
    .await;
    wait_for(
        "the job inserted while the listener reconnected to complete",
        Duration::from_secs(20),
        || async { client.job(&id).await.unwrap().state == "completed" },
    )
    .await;
    rt.shutdown(Duration::from_secs(5)).await;
    assert_eq!(runs.of(&id), 1, "{id} ran once");
}

/// A claim of jobs that hold nothing across nodes commits without waiting
/// for its WAL flush; lost in a crash, it gives its attempt number back, so
/// the next claim of the job (here by the same node) has the same `(id,
/// attempt)`. The run of the lost claim still cannot complete, renew,
/// finish or hand back the later one: its claim token (`attempted_at`)
/// differs. (Should the WAL writer's turn come between the claim and the
/// crash, nothing is lost and another job is tried.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_claim_was_lost_in_a_crash_cannot_write_over_the_next_claim_of_its_job() {
    let bed = private_bed(1).await;
    let f = fleet_on(&bed).await;
    let a = Account::new("lost-claim").unwrap();
    f.router.place(&a, "shard_1").await.unwrap();
    let shard = f.router.shard("shard_1").unwrap().clone();
    slow_wal_writer(&shard.pool).await;
    let claim = FetchParams {
        queue: "default",
        limit: 1,
        node: "node-a",
        lease_secs: 30.0,
        aging_secs: None,
        fair: true,
        after: None,
        limited: false,
    };
    let mut lost = None;
    for _ in 0..10 {
        // The insert waits for its flush; the claim after it does not.
        let id = f.client.enqueue(&a, count_job()).await.unwrap();
        let claimed = store::job_fetch_available(&shard.pool, &claim).await.unwrap();
        assert_eq!(claimed.len(), 1, "{id} claimed");
        on_server(&bed, "shard_1", Server::kill).await;
        on_server(&bed, "shard_1", Server::start).await;
        let j = job(&f, &id).await;
        if (j.state.as_str(), j.attempt) == ("available", 0) {
            lost = Some(claimed[0].key());
            break;
        }
        assert_eq!(
            (j.state.as_str(), j.attempt),
            ("running", 1),
            "{id}: the claim survived"
        );
        assert_eq!(store::job_complete_many(&shard, &[claimed[0].key()]).await.unwrap(), 1);
    }
    let old = lost.expect("a claim lost in the crash (the WAL writer flushed every time)");

    let again = store::job_fetch_available(&shard.pool, &claim).await.unwrap();
    assert_eq!(again.len(), 1, "the job is claimed again after the restart");
    let new = again[0].key();
    assert_eq!(
        (new.id, new.attempt),
        (old.id, old.attempt),
        "the later claim has the lost claim's id and attempt"
    );
    assert_ne!(new.attempted_at, old.attempted_at, "but not its token");

    // The lost claim's run: nothing it writes lands on the later run.
    let renewed = store::job_lease_renew(&shard.pool, &[old], "node-a", 30.0, 0.0)
        .await
        .unwrap();
    assert!(
        renewed.is_empty(),
        "the lost run renewed the later run's lease: {renewed:?}"
    );
    assert_eq!(store::job_complete_many(&shard, &[old]).await.unwrap(), 0, "completed");
    let retry = store::Finish {
        run: old,
        state: shardq::JobState::Available,
        retry_in: Some(Duration::from_secs(60)),
        error: Some("late failure of the lost run".into()),
        extra_attempts: 0,
    };
    assert_eq!(store::job_finish_many(&shard, &[retry]).await.unwrap(), 0, "retried");
    assert_eq!(
        store::job_give_back(&shard, &[old], "node-a").await.unwrap(),
        0,
        "given back"
    );
    assert_eq!(
        store::job_release_unclaimed(&shard, &[old], "node-a").await.unwrap(),
        0,
        "released"
    );
    let id = JobId {
        shard: "shard_1".into(),
        id: new.id,
    };
    let j = job(&f, &id).await;
    assert_eq!(
        (j.state.as_str(), j.attempt, j.attempted_at, j.errors.clone()),
        ("running", 1, Some(new.attempted_at), serde_json::json!([])),
        "the later run is untouched"
    );

    // The later claim's own run renews and completes.
    let renewed = store::job_lease_renew(&shard.pool, &[new], "node-a", 30.0, 0.0)
        .await
        .unwrap();
    assert_eq!(renewed.iter().map(|(r, _)| *r).collect::<Vec<_>>(), vec![new]);
    assert_eq!(store::job_complete_many(&shard, &[new]).await.unwrap(), 1);
    assert_eq!(job(&f, &id).await.state, "completed");
}

/// Runs of `span` jobs: (job, serial key, start, end) on the test's clock;
/// a run whose handler was dropped ends when it was dropped.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<RunSpan>>>);

/// One run of a `span` job: its job, serial key, start and end.
type RunSpan = (JobId, Option<String>, Instant, Option<Instant>);

/// Closes a span when its run ends or is dropped.
struct Open(Spans, usize);
impl Drop for Open {
    fn drop(&mut self) {
        if let Ok(mut v) = self.0 .0.lock() {
            v[self.1].3 = Some(Instant::now());
        }
    }
}

/// `span`: records its run's start and end, working `ms` in between.
struct Span(Spans);
impl Worker for Span {
    type Args = serde_json::Value;
    const KIND: &'static str = "span";
    async fn work(&self, ctx: JobContext, args: serde_json::Value) -> Result<(), JobError> {
        let key = args["key"].as_str().map(str::to_string);
        let at = {
            let mut v = self.0 .0.lock().unwrap();
            v.push((ctx.id.clone(), key, Instant::now(), None));
            v.len() - 1
        };
        let _open = Open(self.0.clone(), at);
        tokio::time::sleep(Duration::from_millis(args["ms"].as_u64().unwrap_or(0))).await;
        Ok(())
    }
}

fn span_job(key: Option<&str>, ms: u64) -> NewJob {
    let job = NewJob::from_json("span", serde_json::json!({ "key": key, "ms": ms }));
    match key {
        Some(k) => job.serial_key(k),
        None => job,
    }
}

/// A shard's server crashes while a node drains it with claims and
/// completions that do not wait for their flush (and keyed runs that
/// do): after the restart every job completes, none is lost (a run whose
/// claim or completion was lost runs again), no two runs of one serial key
/// ever overlap, and the jobs enqueued after the restart all start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_crash_under_asynchronous_claims_loses_no_job_and_never_overlaps_a_key() {
    let bed = private_bed(1).await;
    let f = fleet_on(&bed).await;
    let a = Account::new("crash-drain").unwrap();
    f.router.place(&a, "shard_1").await.unwrap();
    let shard = f.router.shard("shard_1").unwrap().clone();
    slow_wal_writer(&shard.pool).await;
    let keys = ["k1", "k2", "k3"];
    // Keyed runs outlast the crash, the restart and the claims' backoff
    // meanwhile; unkeyed ones are short.
    let mut jobs: Vec<(Account, NewJob)> = Vec::new();
    for _ in 0..2 {
        for k in keys {
            jobs.push((a.clone(), span_job(Some(k), 4_000)));
        }
    }
    // The keyed jobs first (lower ids), so they run when the crash comes.
    let mut ids = f.client.enqueue_many(jobs).await.unwrap();
    let unkeyed = (0..2_000).map(|_| (a.clone(), span_job(None, 10)));
    ids.extend(f.client.enqueue_many(unkeyed).await.unwrap());

    let spans = Spans::default();
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 16)
        .register(Span(spans.clone()))
        .options(fast_options())
        .start()
        .unwrap();
    let started = || spans.0.lock().unwrap().len();
    let keyed_running = || {
        let v = spans.0.lock().unwrap();
        v.iter().filter(|(_, k, _, end)| k.is_some() && end.is_none()).count()
    };
    wait_for("the first job of each key and 300 runs started", WAIT, || {
        std::future::ready(started() >= 300 && keyed_running() == keys.len())
    })
    .await;
    on_server(&bed, "shard_1", Server::kill).await;
    on_server(&bed, "shard_1", Server::start).await;

    let mut after = Vec::new();
    for k in keys {
        after.push(f.client.enqueue(&a, span_job(Some(k), 10)).await.unwrap());
    }
    for _ in 0..20 {
        after.push(f.client.enqueue(&a, span_job(None, 10)).await.unwrap());
    }
    ids.extend(after.iter().cloned());
    let total = ids.len() as i64;
    wait_for(
        "every job completed after the restart",
        Duration::from_secs(60),
        || async { count_state(&f.router, "shard_1", "completed").await == total },
    )
    .await;
    rt.shutdown(Duration::from_secs(5)).await;

    let spans = spans.0.lock().unwrap().clone();
    let mut runs: HashMap<&JobId, usize> = HashMap::new();
    for (id, _, _, _) in &spans {
        *runs.entry(id).or_default() += 1;
    }
    for id in &ids {
        assert!(runs.get(id).is_some_and(|n| *n >= 1), "{id} never ran");
    }
    for id in &after {
        assert!(runs.contains_key(id), "{id}, enqueued after the restart, never started");
    }
    assert_eq!(runs.len(), ids.len(), "runs only of the enqueued jobs");
    for state in ["available", "running", "discarded", "cancelled"] {
        assert_eq!(count_state(&f.router, "shard_1", state).await, 0, "{state}");
    }
    for k in keys {
        let mut of_key: Vec<(Instant, Instant, &JobId)> = spans
            .iter()
            .filter(|(_, key, _, _)| key.as_deref() == Some(k))
            .map(|(id, _, start, end)| (*start, end.expect("every run ended"), id))
            .collect();
        of_key.sort();
        assert!(of_key.len() >= 3, "{k}: {} runs", of_key.len());
        for w in of_key.windows(2) {
            assert!(
                w[0].1 <= w[1].0,
                "{k}: {} ran until {:?} after {} started",
                w[0].2,
                w[0].1 - w[1].0,
                w[1].2
            );
        }
    }
    let again = runs.values().filter(|n| **n > 1).count();
    eprintln!("{again} of {total} jobs ran more than once (their claim or completion was lost in the crash)");
}
