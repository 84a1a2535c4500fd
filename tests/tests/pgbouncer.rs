//! Databases behind a transaction pooler (`pooler = "transaction"`): no
//! settings sent at connect (a real PgBouncer refuses them otherwise), the
//! migrator against a real PgBouncer in transaction mode (refused without a
//! direct `listen_url`, migrated over it with one), and the worker node's
//! wake-ups for a pooled shard: LISTEN over `listen_url` when set, polling
//! only when not.
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
    let bouncer = tokio::task::spawn_blocking({
        let server = server.clone();
        move || PgBouncer::start(&server).map_err(|e| e.to_string())
    })
    .await
    .unwrap()
    .unwrap();
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
    let bouncer = tokio::task::spawn_blocking({
        let server = server.clone();
        move || PgBouncer::start(&server).map_err(|e| e.to_string())
    })
    .await
    .unwrap()
    .unwrap();
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
