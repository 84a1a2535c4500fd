//! Databases behind a transaction pooler (`pooler = "transaction"`): no
//! settings sent at connect (a real PgBouncer refuses them otherwise), the
//! migrator against a real PgBouncer in transaction mode (refused without a
//! direct `listen_url`, migrated over it with one), and the worker node's
//! wake-ups for a pooled shard: LISTEN over `listen_url` when set, polling
//! only when not; the whole job lifecycle, and the application's
//! statements through `pool_for` and `begin`, through a PgBouncer with
//! fewer server connections than clients.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use shardq::{Account, Client, NewJob, Runtime, RuntimeOptions};
use shardq_router::migrator::Stage;
use shardq_router::{Config, Migrator, Pooler, Router};
use shardq_testbed::{PgBouncer, TestBed};
use shardq_tests::{fast_options, fleet, wait_for, Noop};

const WAIT: Duration = Duration::from_secs(60);

async fn bed() -> &'static TestBed {
    tokio::task::spawn_blocking(TestBed::shared).await.unwrap().unwrap()
}

/// A PgBouncer in transaction mode in front of the shared bed's server
/// `name`, with `pool_size` server connections.
async fn bouncer_in_front_of(name: &'static str, pool_size: u32) -> PgBouncer {
    let bed = bed().await;
    tokio::task::spawn_blocking(move || {
        let server = bed.server(name).map_err(|e| e.to_string())?;
        PgBouncer::start_with_pool_size(server, pool_size).map_err(|e| e.to_string())
    })
    .await
    .unwrap()
    .unwrap()
}

/// Backends on `pool`'s database that hold a LISTEN, as `user` (any: `None`).
async fn listeners(pool: &sqlx::PgPool, user: Option<&str>) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND query LIKE 'LISTEN%' AND ($1::text IS NULL OR usename = $1)",
    )
    .bind(user)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_migrator_refuses_a_pooled_shard_without_listen_url_and_migrates_over_it() {
    let bed = bed().await;
    let dbs = bed.fresh_fleet().await.unwrap();
    let server = bed.server("shard_1").unwrap();
    let bouncer = bouncer_in_front_of("shard_1", 20).await;
    let pooled = bouncer.through(&dbs.shards[0].url, server);
    assert_ne!(pooled, dbs.shards[0].url);
    let toml = |listen: &str| {
        let mut text = format!("[master]\nurl = \"{}\"\n", dbs.master.url);
        text.push_str(&format!(
            "[[shards]]\nname = \"shard_1\"\nurl = \"{pooled}\"\npooler = \"transaction\"\n{listen}\n\
             pool = {{ statement_timeout = \"0s\", lock_timeout = \"0s\" }}\n"
        ));
        for s in &dbs.shards[1..] {
            text.push_str(&format!("[[shards]]\nname = \"{}\"\nurl = \"{}\"\n", s.name, s.url));
        }
        Config::parse(&text, Path::new("shards.toml"), &|_| None).unwrap()
    };

    let without = toml("");
    assert_eq!(without.shards[0].database.pooler, Pooler::Transaction);
    let report = Migrator::new(&without).run().await.unwrap();
    let failures: Vec<&str> = report.failures().map(|d| d.database.as_str()).collect();
    assert_eq!(failures, ["shard_1"], "{report}");
    let refused = report.database("shard_1").unwrap().error.as_ref().unwrap();
    assert_eq!(refused.stage, Stage::Connect);
    assert!(
        refused.message.contains("transaction pooler") && refused.message.contains("listen_url"),
        "{refused}"
    );

    let with = toml(&format!("listen_url = \"{}\"", dbs.shards[0].url));
    let report = Migrator::new(&with).run().await.unwrap();
    assert!(!report.failed(), "{report}");
    let fleet_id = report.database("master").unwrap().fleet_id.clone().unwrap();
    assert_eq!(
        report.database("shard_1").unwrap().fleet_id.as_deref(),
        Some(fleet_id.as_str())
    );
    // The migration ran on the server behind PgBouncer, over listen_url.
    let direct = f_pool(&dbs.shards[0].url).await;
    let version: i32 = sqlx::query_scalar("SELECT max(version) FROM shardq_schema_history")
        .fetch_one(&direct)
        .await
        .unwrap();
    assert!(version >= 18, "platform version {version}");
    drop(bouncer);
}

/// A one-connection pool on `url`.
async fn f_pool(url: &str) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .unwrap()
}

/// `f`'s configuration with shard_1 marked as behind a transaction pooler,
/// with `listen` as its direct address.
fn pooled_shard_1(config: &Config, listen: Option<shardq_router::Target>) -> Config {
    let mut c = config.clone();
    c.shards[0].database.pooler = Pooler::Transaction;
    c.shards[0].database.listen = listen;
    c
}

#[tokio::test]
async fn a_pooled_shard_without_listen_url_is_not_listened_to_and_its_jobs_are_polled() {
    let f = fleet().await;
    let config = pooled_shard_1(&f.config, None);
    let router = Arc::new(Router::connect(&config).await.unwrap());
    let client = Client::new(router.clone());
    let a = Account::new("pooled-poll").unwrap();
    router.place(&a, "shard_1").await.unwrap();
    let rt = Runtime::builder(router.clone())
        .queue("default", 4)
        .register(Noop)
        .options(fast_options())
        .start()
        .unwrap();
    // shard_2 is listened to as usual; by then shard_1's notifier has
    // decided, and it holds no LISTEN.
    let shard_2 = f.router.shard("shard_2").unwrap().pool.clone();
    wait_for("the LISTEN on shard_2", WAIT, || {
        let pool = shard_2.clone();
        async move { listeners(&pool, None).await > 0 }
    })
    .await;
    let shard_1 = &f.router.shard("shard_1").unwrap().pool;
    assert_eq!(
        listeners(shard_1, None).await,
        0,
        "a pooled shard without listen_url is not listened to"
    );
    let status = shardq::observe::status::shard(router.shard("shard_1").unwrap(), Duration::from_secs(5)).await;
    assert!(status.wakeups.starts_with("polling only"), "{}", status.wakeups);

    let id = client
        .enqueue(&a, NewJob::from_json("noop", serde_json::json!({})))
        .await
        .unwrap();
    wait_for("the polled job completed", WAIT, || async {
        client.job(&id).await.unwrap().state == "completed"
    })
    .await;
    assert_eq!(listeners(shard_1, None).await, 0);
    rt.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_pooled_shard_with_listen_url_is_listened_to_there_and_woken_by_notify() {
    let f = fleet().await;
    // The direct address logs in as its own role, so its LISTEN is told
    // apart from any connection of the pool.
    let role = format!("listener_{}", std::process::id());
    let shard_1 = f.router.shard("shard_1").unwrap().pool.clone();
    sqlx::query(&format!("DROP ROLE IF EXISTS {role}"))
        .execute(&shard_1)
        .await
        .unwrap();
    sqlx::query(&format!("CREATE ROLE {role} LOGIN"))
        .execute(&shard_1)
        .await
        .unwrap();
    let mut direct = f.config.shards[0].database.target.clone();
    direct.user = role.clone();
    let config = pooled_shard_1(&f.config, Some(direct));
    let router = Arc::new(Router::connect(&config).await.unwrap());
    let client = Client::new(router.clone());
    let a = Account::new("pooled-notify").unwrap();
    router.place(&a, "shard_1").await.unwrap();
    // The poll is an hour away: only a notification can start the job.
    let opts = RuntimeOptions {
        poll_interval: Duration::from_secs(3600),
        ..fast_options()
    };
    let rt = Runtime::builder(router.clone())
        .queue("default", 4)
        .register(Noop)
        .options(opts)
        .start()
        .unwrap();
    wait_for("the LISTEN over listen_url", WAIT, || {
        let pool = shard_1.clone();
        let role = role.clone();
        async move { listeners(&pool, Some(&role)).await > 0 }
    })
    .await;
    let status = shardq::observe::status::shard(router.shard("shard_1").unwrap(), Duration::from_secs(5)).await;
    assert_eq!(status.wakeups, "notify via listen_url");

    let id = client
        .enqueue(&a, NewJob::from_json("noop", serde_json::json!({})))
        .await
        .unwrap();
    wait_for("the notified job completed", WAIT, || async {
        client.job(&id).await.unwrap().state == "completed"
    })
    .await;
    assert_eq!(
        listeners(&shard_1, None).await,
        listeners(&shard_1, Some(&role)).await,
        "every LISTEN on the pooled shard is over listen_url"
    );
    rt.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn behind_a_transaction_pooler_no_settings_are_sent_at_connect() {
    let bed = bed().await;
    let dbs = bed.fresh_fleet().await.unwrap();
    let server = bed.server("shard_2").unwrap();
    let bouncer = bouncer_in_front_of("shard_2", 20).await;
    let pooled = bouncer.through(&dbs.shards[1].url, server);
    // The default pool timeouts (30 s, 10 s) are on; one connection, so
    // only this client's statements reach PgBouncer's servers.
    let config = |pooler: &str| {
        let text = format!(
            "[master]\nurl = \"{}\"\n[[shards]]\nname = \"shard_1\"\nurl = \"{}\"\n\
             [[shards]]\nname = \"shard_2\"\nurl = \"{pooled}\"\n{pooler}pool = {{ max_connections = 1 }}\n",
            dbs.master.url, dbs.shards[0].url
        );
        Config::parse(&text, Path::new("shards.toml"), &|_| None).unwrap()
    };
    let direct = Router::connect(&config("")).await.unwrap();
    let refused = sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(&direct.shard("shard_2").unwrap().pool)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("unsupported startup parameter"),
        "{refused}"
    );

    let behind = Router::connect(&config("pooler = \"transaction\"\n")).await.unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&behind.shard("shard_2").unwrap().pool)
        .await
        .unwrap();
    assert_eq!(one, 1);
    drop(bouncer);
}

/// What [`Mixed`] does with a job, from its args' `mode`.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
enum Mode {
    /// Succeeds.
    Ok,
    /// Fails its first attempt, succeeds its second (an automatic retry).
    Flaky,
    /// Fails (it has one attempt: discarded, then retried by hand).
    FailsFirst,
    /// Runs until the test releases it (its lease is renewed meanwhile).
    Hold,
    /// Runs until it is cancelled.
    UntilCancelled,
}

/// Records every successful run per job id.
#[derive(Clone, Default)]
struct Mixed {
    succeeded: Arc<std::sync::Mutex<std::collections::HashMap<i64, u32>>>,
    release: Arc<tokio::sync::Notify>,
}

impl shardq::Worker for Mixed {
    type Args = serde_json::Value;
    const KIND: &'static str = "mixed";
    async fn work(&self, ctx: shardq::JobContext, args: serde_json::Value) -> Result<(), shardq::JobError> {
        let mode: Mode = serde_json::from_value(args["mode"].clone()).unwrap_or(Mode::Ok);
        match mode {
            Mode::Ok => {}
            Mode::Flaky if ctx.attempt == 1 => return Err(shardq::JobError::failed("first attempt fails")),
            Mode::Flaky => {}
            Mode::FailsFirst if ctx.attempt == 1 => return Err(shardq::JobError::failed("fails until retried")),
            Mode::FailsFirst => {}
            Mode::Hold => self.release.notified().await,
            Mode::UntilCancelled => {
                ctx.cancelled().await;
                return Err(shardq::JobError::failed("cancelled"));
            }
        }
        *self.succeeded.lock().unwrap().entry(ctx.id.id).or_default() += 1;
        Ok(())
    }
}

fn mixed(mode: Mode) -> NewJob {
    NewJob::from_json("mixed", serde_json::json!({ "mode": mode }))
}

/// `f`'s master and shard_1, each through its own PgBouncer (transaction
/// mode, `pool_size` server connections), with their direct addresses as
/// `listen_url`; the other shards are left out.
fn through_bouncers(f: &shardq_tests::Fleet, master: &PgBouncer, shard: &PgBouncer) -> Config {
    let mut c = f.config.clone();
    c.shards.truncate(1);
    for (db, bouncer) in [(&mut c.master, master), (&mut c.shards[0].database, shard)] {
        db.listen = Some(db.target.clone());
        db.target.port = bouncer.port();
        db.pooler = Pooler::Transaction;
        db.pool.max_connections = 8;
        db.pool.statement_timeout = Duration::ZERO;
        db.pool.lock_timeout = Duration::ZERO;
    }
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn behind_pgbouncer_in_transaction_mode_every_job_of_the_lifecycle_completes_exactly_once() {
    let bed = bed().await;
    let f = fleet().await;
    let start = |name: &'static str| bouncer_in_front_of(name, 2);
    let (master_bouncer, shard_bouncer) = (start("master").await, start("shard_1").await);
    assert_eq!(
        f.config.shards[0].database.target.port,
        bed.server("shard_1").unwrap().port()
    );
    let config = through_bouncers(&f, &master_bouncer, &shard_bouncer);
    let router = Arc::new(Router::connect(&config).await.unwrap());
    let client = Client::new(router.clone());
    let direct = f.router.shard("shard_1").unwrap().clone();
    let pooled = router.shard("shard_1").unwrap().clone();
    let a = Account::new("pooled-lifecycle").unwrap();
    let b = Account::new("pooled-lifecycle-b").unwrap();

    // A node that claimed a job with a short lease and died: rescued later.
    let rescued = client.enqueue(&a, mixed(Mode::Ok)).await.unwrap();
    let dead = shardq::store::job_fetch_available(
        &pooled,
        &shardq::store::FetchParams {
            queue: "default",
            limit: 10,
            node: "dead-node",
            lease_secs: 0.2,
            aging_secs: None,
            fair: false,
            after: None,
            limited: false,
        },
    )
    .await
    .unwrap();
    assert_eq!(dead.len(), 1);

    let worker = Mixed::default();
    let every_second = shardq::PeriodicJob::new("tick", "* * * * * *", shardq::periodic::Tz::UTC, mixed(Mode::Ok))
        .unwrap()
        .global(b.clone());
    let rt = Runtime::builder(router.clone())
        .queue("default", 16)
        .register(worker.clone())
        .periodic(every_second)
        .options(fast_options())
        .start()
        .unwrap();

    // Enqueues from many tasks at once, more than the pooler's two server
    // connections: one by one, a batch, unique, and in the application's
    // own transaction.
    let mut completing: Vec<shardq::JobId> = vec![rescued];
    let singles = (0..40).map(|i| {
        let client = client.clone();
        let account = if i % 2 == 0 { a.clone() } else { b.clone() };
        let mode = if i % 8 == 0 { Mode::Flaky } else { Mode::Ok };
        async move { client.enqueue(&account, mixed(mode)).await.unwrap() }
    });
    completing.extend(futures::future::join_all(singles).await);
    completing.extend(
        client
            .enqueue_many((0..20).map(|i| (if i % 2 == 0 { a.clone() } else { b.clone() }, mixed(Mode::Ok))))
            .await
            .unwrap(),
    );
    let unique = || mixed(Mode::Ok).unique(shardq::UniqueOpts::new().key("once"));
    let first = client.enqueue_unique(&a, unique()).await.unwrap();
    let again = client.enqueue_unique(&a, unique()).await.unwrap();
    assert!(!first.duplicate && again.duplicate && again.id == first.id);
    completing.push(first.id);
    let mut tx = router.begin(&a).await.unwrap();
    let one: i32 = sqlx::query_scalar("SELECT $1::int")
        .bind(1)
        .fetch_one(&mut tx)
        .await
        .unwrap();
    assert_eq!(one, 1);
    completing.push(client.enqueue_in(&mut tx, &a, mixed(Mode::Ok)).await.unwrap());
    tx.commit().await.unwrap();

    // A discarded job retried by hand.
    let fails = client
        .enqueue(&a, mixed(Mode::FailsFirst).max_attempts(1))
        .await
        .unwrap();
    wait_for("the failing job discarded", WAIT, || async {
        client.job(&fails).await.unwrap().state == "discarded"
    })
    .await;
    client.retry(&fails).await.unwrap();
    completing.push(fails);

    // A long job whose lease is renewed through the pooler.
    let held = client.enqueue(&a, mixed(Mode::Hold)).await.unwrap();
    let lease = || async {
        sqlx::query_scalar::<_, Option<chrono::DateTime<chrono::Utc>>>(
            "SELECT lease_expires_at FROM shardq.jobs WHERE id = $1 AND state = 'running'",
        )
        .bind(held.id)
        .fetch_optional(&direct.pool)
        .await
        .unwrap()
        .flatten()
    };
    wait_for("the long job running", WAIT, || async { lease().await.is_some() }).await;
    let first_lease = lease().await.unwrap();
    wait_for("the long job's lease renewed", WAIT, || async {
        lease().await.is_some_and(|l| l > first_lease)
    })
    .await;
    worker.release.notify_one();
    completing.push(held);

    // Cancels: a scheduled job, and a running one.
    let later = client
        .enqueue(&a, mixed(Mode::Ok).delay(Duration::from_secs(3600)))
        .await
        .unwrap();
    assert_eq!(client.cancel(&later).await.unwrap().state, "cancelled");
    let running = client.enqueue(&b, mixed(Mode::UntilCancelled)).await.unwrap();
    wait_for("the cancellable job running", WAIT, || async {
        client.job(&running).await.unwrap().state == "running"
    })
    .await;
    client.cancel(&running).await.unwrap();
    wait_for("the running job cancelled", WAIT, || async {
        client.job(&running).await.unwrap().state == "cancelled"
    })
    .await;

    // Periodic occurrences, enqueued by the node's scheduler through the pooler.
    let ticks = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM shardq.periodic_runs WHERE name = 'tick' AND job_id IS NOT NULL",
        )
        .fetch_one(&direct.pool)
        .await
        .unwrap()
    };
    wait_for("two periodic occurrences", WAIT, || async { ticks().await >= 2 }).await;

    wait_for("every job completed", WAIT, || async {
        let open: i64 =
            sqlx::query_scalar("SELECT count(*) FROM shardq.jobs WHERE state NOT IN ('completed', 'cancelled')")
                .fetch_one(&direct.pool)
                .await
                .unwrap();
        open == 0
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await;

    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT id, state FROM shardq.jobs ORDER BY id")
        .fetch_all(&direct.pool)
        .await
        .unwrap();
    let succeeded = worker.succeeded.lock().unwrap().clone();
    for (id, state) in &rows {
        let runs = succeeded.get(id).copied().unwrap_or(0);
        match state.as_str() {
            "completed" => assert_eq!(runs, 1, "job {id} completed after {runs} successful runs"),
            "cancelled" => assert!([later.id, running.id].contains(id) && runs == 0, "job {id} cancelled"),
            other => panic!("job {id} ended {other}"),
        }
    }
    for id in &completing {
        assert_eq!(client.job(id).await.unwrap().state, "completed", "job {}", id.id);
    }
    let completed = rows.iter().filter(|(_, s)| s == "completed").count();
    assert!(completed >= completing.len() + 2, "{completed} completed");
    drop((master_bouncer, shard_bouncer));
}

#[tokio::test(flavor = "multi_thread")]
async fn behind_pgbouncer_the_applications_statements_run_on_pool_for_and_begin() {
    let f = fleet().await;
    let bouncer = bouncer_in_front_of("shard_1", 2).await;
    let direct = f.router.shard("shard_1").unwrap().clone();
    sqlx::query("CREATE TABLE notes (account text NOT NULL, n int NOT NULL)")
        .execute(&direct.pool)
        .await
        .unwrap();
    let mut config = f.config.clone();
    config.shards.truncate(1);
    let db = &mut config.shards[0].database;
    db.target.port = bouncer.port();
    db.pooler = Pooler::Transaction;
    db.pool.max_connections = 8;
    let router = Arc::new(Router::connect(&config).await.unwrap());
    // More tasks than the pooler's two server connections, each writing
    // through the shard's Database, a fenced transaction, and a wrapped
    // pool connection.
    let writers = (0..24).map(|i| {
        let router = router.clone();
        async move {
            let a = Account::new(format!("notes-{}", i % 4)).unwrap();
            let db = router.pool_for(&a).await.unwrap();
            sqlx::query("INSERT INTO notes (account, n) VALUES ($1, $2)")
                .bind(a.as_str())
                .bind(i)
                .execute(db)
                .await
                .unwrap();
            let mut tx = router.begin(&a).await.unwrap();
            sqlx::query("INSERT INTO notes (account, n) VALUES ($1, $2)")
                .bind(a.as_str())
                .bind(i)
                .execute(&mut tx)
                .await
                .unwrap();
            let mine: i64 = sqlx::query_scalar("SELECT count(*) FROM notes WHERE account = $1 AND n = $2")
                .bind(a.as_str())
                .bind(i)
                .fetch_one(&mut tx)
                .await
                .unwrap();
            assert_eq!(mine, 2, "the transaction sees both rows of writer {i}");
            tx.commit().await.unwrap();
            let mut pooled = db.pool.acquire().await.unwrap();
            sqlx::query("INSERT INTO notes (account, n) VALUES ($1, $2)")
                .bind(a.as_str())
                .bind(i)
                .execute(&mut db.conn(&mut pooled))
                .await
                .unwrap();
        }
    });
    futures::future::join_all(writers).await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM notes")
        .fetch_one(&direct.pool)
        .await
        .unwrap();
    assert_eq!(rows, 72);
    drop(bouncer);
}
