//! Pressure on a shard's server under a running worker node: another client
//! holding nearly every connection, and a long idle-in-transaction session
//! pinning the xmin horizon. Throughput may drop; nothing is lost, nothing
//! stalls forever. Each test starts its own bed.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardq::{Account, JobContext, JobError, JobId, NewJob, Runtime, Worker};
use shardq_tests::{count_state, fast_options, fleet_on, private_bed, wait_for};
use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::Connection;

const WAIT: Duration = Duration::from_secs(60);

/// Runs per job id.
#[derive(Clone, Default)]
struct Count(Arc<Mutex<HashMap<JobId, u32>>>);

impl Worker for Count {
    type Args = serde_json::Value;
    const KIND: &'static str = "count";
    async fn work(&self, ctx: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        *self.0.lock().unwrap().entry(ctx.id).or_default() += 1;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_holding_nearly_every_connection_slows_the_node_but_loses_nothing() {
    let bed = private_bed(1).await;
    let f = fleet_on(&bed).await;
    let shard = f.router.shards()[0].clone();
    let url = bed.shards()[0].url("postgres");
    // The test's own view of the shard: one connection opened before the
    // pressure starts, so counting never competes with the node.
    let probe = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        .connect_with((*shard.pool.connect_options()).clone())
        .await
        .unwrap();
    let completed = || {
        let probe = probe.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM shardq.jobs WHERE state = 'completed'")
                .fetch_one(&probe)
                .await
                .unwrap()
        }
    };

    // Take every connection slot the server has, then give back two.
    let mut hogs = Vec::new();
    loop {
        match PgConnection::connect(&url).await {
            Ok(c) => hogs.push(c),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("53300") => break, // too_many_connections
            Err(e) => panic!("unexpected error while taking connections: {e}"),
        }
    }
    assert!(
        hogs.len() > 100,
        "the server should have allowed many connections, got {}",
        hogs.len()
    );
    // Three come back: one for the application's enqueue below (its pool
    // keeps it open) and two for the node's engine (its LISTEN connection
    // and one for claims, outcomes and leases: the engine has connections
    // of its own, apart from the application's pool).
    for _ in 0..3 {
        hogs.pop().unwrap().close().await.unwrap();
    }

    let account = Account::new("pressed").unwrap();
    let ids = f
        .client
        .enqueue_many((0..500).map(|i| {
            (
                account.clone(),
                NewJob::from_json("count", serde_json::json!({ "i": i })),
            )
        }))
        .await
        .unwrap();
    let runs = Count::default();
    let node = Runtime::builder(f.router.clone())
        .queue("default", 32)
        .register(runs.clone())
        .options(fast_options())
        .start()
        .unwrap();
    // With one connection for its work, the node still makes progress.
    wait_for("progress under pressure", WAIT, || async { completed().await > 0 }).await;
    drop(hogs); // the other client lets go
    wait_for("all 500 completed", WAIT, || async { completed().await == 500 }).await;
    assert_eq!(node.leased(), 0);
    node.shutdown(Duration::from_secs(5)).await;
    let runs = runs.0.lock().unwrap();
    assert!(
        ids.iter().all(|id| runs.get(id) == Some(&1)),
        "every job ran exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_transaction_pinning_xmin_slows_nothing_to_a_stall() {
    let bed = private_bed(1).await;
    let f = fleet_on(&bed).await;
    let shard = f.router.shards()[0].clone();

    // A session that took a snapshot and an xid, then went idle in transaction.
    let mut pin = shard.pool.acquire().await.unwrap().detach();
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut pin)
        .await
        .unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid() FROM (SELECT txid_current()) AS x")
        .fetch_one(&mut pin)
        .await
        .unwrap();

    let account = Account::new("pinned").unwrap();
    let runs = Count::default();
    let node = Runtime::builder(f.router.clone())
        .queue("default", 32)
        .register(runs.clone())
        .options(fast_options())
        .start()
        .unwrap();
    for round in 1..=3 {
        f.client
            .enqueue_many((0..1000).map(|i| {
                (
                    account.clone(),
                    NewJob::from_json("count", serde_json::json!({ "i": i })),
                )
            }))
            .await
            .unwrap();
        let want = round * 1000;
        wait_for("a round completed while xmin is pinned", WAIT, || async {
            count_state(&f.router, &shard.name, "completed").await == want
        })
        .await;
    }
    // The pin really held the horizon back the whole time.
    let (state, pinned): (String, bool) =
        sqlx::query_as("SELECT state, backend_xmin IS NOT NULL FROM pg_stat_activity WHERE pid = $1")
            .bind(pid)
            .fetch_one(&shard.pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), pinned), ("idle in transaction", true));
    sqlx::query("ROLLBACK").execute(&mut pin).await.unwrap();
    pin.close().await.unwrap();

    // After the pin is gone, work goes on as before.
    f.client
        .enqueue_many((0..1000).map(|i| {
            (
                account.clone(),
                NewJob::from_json("count", serde_json::json!({ "i": i })),
            )
        }))
        .await
        .unwrap();
    wait_for("work after the pin ended", WAIT, || async {
        count_state(&f.router, &shard.name, "completed").await == 4000
    })
    .await;
    node.shutdown(Duration::from_secs(5)).await;
    let runs = runs.0.lock().unwrap();
    assert_eq!(runs.len(), 4000);
    assert!(runs.values().all(|n| *n == 1));
}
