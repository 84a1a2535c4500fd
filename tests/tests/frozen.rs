//! A shard whose server stopped answering (frozen with SIGSTOP: its sockets
//! stay open, nothing replies) fails its own calls within the pool's
//! timeouts, with an error naming the shard, while the other databases keep
//! answering; and the pools' `statement_timeout` and `lock_timeout` reach
//! the server. The frozen test starts its own bed.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use shardq_router::router::Database;
use shardq_router::{Config, PoolConfig, Router};
use shardq_testbed::Server;
use shardq_tests::{fleet, fleet_on, on_server, private_bed, wait_for};

/// The acquire timeout of the frozen test's pools.
const ACQUIRE: Duration = Duration::from_secs(1);
/// A call that has not returned by then hangs: far above every timeout the
/// tests configure (the tests assert errors, never how long they took).
const HANG: Duration = Duration::from_secs(30);

/// `SELECT 1` on `db`'s pool: `Ok(Ok(1))`, `Ok(Err(message))` with the
/// router's error, or `Err(())` when it did not return within [`HANG`].
async fn select_one(db: &Database) -> Result<Result<i32, String>, ()> {
    let query = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&db.pool);
    match tokio::time::timeout(HANG, query).await {
        Ok(Ok(one)) => Ok(Ok(one)),
        Ok(Err(e)) => Ok(Err(db.error(e).to_string())),
        Err(_) => Err(()),
    }
}

/// A router over `config` with every pool changed by `change`.
async fn router_with(config: &Config, change: impl Fn(&mut PoolConfig)) -> Router {
    let mut config = config.clone();
    change(&mut config.master.pool);
    for shard in &mut config.shards {
        change(&mut shard.database.pool);
    }
    Router::connect(&config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_shard_fails_its_calls_naming_it_while_the_others_answer() {
    let bed = private_bed(2).await;
    let f = fleet_on(&bed).await;
    let router = router_with(&f.config, |pool| pool.acquire_timeout = ACQUIRE).await;
    let (healthy, sick) = (router.shard("shard_1").unwrap(), router.shard("shard_2").unwrap());
    // One idle connection in the sick shard's pool: the first call after the
    // freeze checks it (a ping that gets no answer), the next ones open new
    // connections (the TCP handshake succeeds, the startup gets no answer).
    assert_eq!(select_one(sick).await, Ok(Ok(1)));

    on_server(&bed, "shard_2", Server::freeze).await;
    for attempt in 1..=3 {
        let (sick_result, healthy_result, master_result) =
            tokio::join!(select_one(sick), select_one(healthy), select_one(router.master()));
        let message = match sick_result {
            Ok(Err(message)) => message,
            Ok(Ok(_)) => panic!("attempt {attempt}: the frozen shard answered"),
            Err(()) => panic!("attempt {attempt}: a call to the frozen shard still hung after {HANG:?}"),
        };
        for needle in [
            "shard shard_2 (postgres://",
            "pool timed out",
            "no connection within the acquire_timeout of 1s",
            "did not accept or answer",
        ] {
            assert!(
                message.contains(needle),
                "attempt {attempt}: {needle:?} not in: {message}"
            );
        }
        assert_eq!(
            healthy_result,
            Ok(Ok(1)),
            "attempt {attempt}: shard_1 while shard_2 is frozen"
        );
        assert_eq!(
            master_result,
            Ok(Ok(1)),
            "attempt {attempt}: master while shard_2 is frozen"
        );
    }

    on_server(&bed, "shard_2", Server::thaw).await;
    wait_for("the thawed shard answers again", HANG, || async {
        select_one(sick).await == Ok(Ok(1))
    })
    .await;
}

#[tokio::test]
async fn a_statement_waiting_on_a_row_lock_fails_with_lock_timeout() {
    let f = fleet().await;
    let router = router_with(&f.config, |pool| pool.lock_timeout = Duration::from_millis(300)).await;
    let db = router.shard("shard_1").unwrap();
    sqlx::query("CREATE TABLE frozen_lock (id int PRIMARY KEY, n int NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO frozen_lock VALUES (1, 0)")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("UPDATE frozen_lock SET n = 1 WHERE id = 1")
        .execute(&mut *holder)
        .await
        .unwrap();

    let waiter = sqlx::query("UPDATE frozen_lock SET n = 2 WHERE id = 1").execute(&db.pool);
    let err = match tokio::time::timeout(HANG, waiter).await {
        Ok(Ok(_)) => panic!("the update ran while another transaction held the row"),
        Ok(Err(e)) => db.error(e),
        Err(_) => panic!("the update still waited for the row lock after {HANG:?}: no lock_timeout"),
    };
    assert_eq!(err.sqlstate().as_deref(), Some("55P03"), "{err}");
    assert!(err.to_string().contains("shard shard_1"), "{err}");

    holder.rollback().await.unwrap();
    sqlx::query("UPDATE frozen_lock SET n = 2 WHERE id = 1")
        .execute(&db.pool)
        .await
        .unwrap();
}

/// `SHOW name` on a connection of `db`'s pool.
async fn show(db: &Database, name: &str) -> String {
    sqlx::query_scalar(&format!("SHOW {name}"))
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_pools_statement_timeout_reaches_the_server() {
    let f = fleet().await;
    // The defaults, on the harness's router.
    for db in f.router.shards().iter().chain([f.router.master()]) {
        assert_eq!(show(db, "statement_timeout").await, "30s", "{}", db.name);
        assert_eq!(show(db, "lock_timeout").await, "10s", "{}", db.name);
    }

    let router = router_with(&f.config, |pool| pool.statement_timeout = Duration::from_millis(1234)).await;
    let db = router.shard("shard_2").unwrap();
    assert_eq!(show(db, "statement_timeout").await, "1234ms");
    let slow = sqlx::query("SELECT pg_sleep(60)").execute(&db.pool);
    let err = match tokio::time::timeout(HANG, slow).await {
        Ok(Ok(_)) => panic!("a 60 s sleep ran to its end under a 1234 ms statement_timeout"),
        Ok(Err(e)) => db.error(e),
        Err(_) => panic!("a 60 s sleep was not cancelled by the server within {HANG:?}"),
    };
    assert_eq!(err.sqlstate().as_deref(), Some("57014"), "{err}"); // query_canceled

    // Zero leaves both to the server (whose default is no limit).
    let router = router_with(&f.config, |pool| {
        pool.statement_timeout = Duration::ZERO;
        pool.lock_timeout = Duration::ZERO;
    })
    .await;
    let db = router.shard("shard_2").unwrap();
    assert_eq!(show(db, "statement_timeout").await, "0");
    assert_eq!(show(db, "lock_timeout").await, "0");

    // The migrator's driver (tokio-postgres) gets neither: a long migration
    // is never cancelled by the pools' timeouts.
    let target = &f.config.shards[1].database.target;
    let (client, connection) = target
        .tokio_postgres_config()
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    let row = client.query_one("SHOW statement_timeout", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "0");
    drop(client);
    driver.await.unwrap().unwrap();
}
