//! Faults of the servers under a running worker node: a shard's server
//! crashes and comes back, every connection of the node is terminated from
//! the server side, the master's server stops. Each test starts its own bed,
//! since it stops servers.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardq::store;
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

/// Completions commit without waiting for their WAL flush. Here the WAL
/// writer flushes such commits only every 10 s and nothing else flushes
/// (the node is idle once its job completed), so a crash right after the
/// completion was read back loses it: the job, `running` again after the
/// restart, runs a second time and completes. It is never lost. (Should the
/// WAL writer's turn come between the completion and the crash, nothing is
/// lost and another job is tried.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_lost_in_a_server_crash_runs_the_job_again() {
    let bed = private_bed(1).await;
    let f = fleet_on(&bed).await;
    let a = Account::new("crash").unwrap();
    f.router.place(&a, "shard_1").await.unwrap();
    let shard = f.router.shard("shard_1").unwrap();
    for setting in [
        "ALTER SYSTEM SET wal_writer_delay = '10s'",
        "ALTER SYSTEM SET wal_writer_flush_after = '16MB'",
        "ALTER SYSTEM SET bgwriter_lru_maxpages = 0",
        "ALTER SYSTEM SET autovacuum = off",
    ] {
        sqlx::query(setting).execute(&shard.pool).await.unwrap();
    }
    sqlx::query("SELECT pg_reload_conf()")
        .execute(&shard.pool)
        .await
        .unwrap();
    let runs = Runs::default();
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 4)
        .register(Count(runs.clone()))
        .options(fast_options())
        .start()
        .unwrap();
    let mut lost = None;
    for _ in 0..3 {
        let id = f.client.enqueue(&a, count_job()).await.unwrap();
        wait_for("the job completed", WAIT, || async {
            runs.of(&id) == 1 && job(&f, &id).await.state == "completed"
        })
        .await;
        on_server(&bed, "shard_1", Server::kill).await;
        on_server(&bed, "shard_1", Server::start).await;
        let state = job(&f, &id).await.state;
        // Lost: `running` again, or already `available` when the node's
        // heartbeat found the row running under its name without a lease
        // for it (the run had ended here) and released it.
        if state == "running" || state == "available" {
            lost = Some(id);
            break;
        }
        assert_eq!(state, "completed", "{id}");
    }
    let id = lost.expect("a completion lost in the crash (the WAL writer flushed every time)");
    wait_for(
        "the job whose completion was lost ran again and completed",
        WAIT,
        || async { runs.of(&id) == 2 && job(&f, &id).await.state == "completed" },
    )
    .await;
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
