//! Trouble on one shard stays on that shard: a node's slots, connections and
//! shutdown are not held by a shard whose server is down. Each test starts
//! its own bed, since it stops servers.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use shardq::{Account, JobContext, JobError, NewJob, Runtime, Worker};
use shardq_testbed::TestBed;
use shardq_tests::{count_state, fast_options, fleet_on, private_bed, wait_for};

const WAIT: Duration = Duration::from_secs(30);

/// `tick`: a short run.
struct Tick;
impl Worker for Tick {
    type Args = serde_json::Value;
    const KIND: &'static str = "tick";
    async fn work(&self, _: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(())
    }
}

/// `hold`: runs until the node hands it back.
struct Hold;
impl Worker for Hold {
    type Args = serde_json::Value;
    const KIND: &'static str = "hold";
    fn timeout(&self) -> Duration {
        Duration::from_secs(3600)
    }
    async fn work(&self, _: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(())
    }
}

async fn stop_server(bed: &Arc<TestBed>, name: &str) {
    let (bed, name) = (bed.clone(), name.to_string());
    tokio::task::spawn_blocking(move || {
        bed.server(&name)
            .map_err(|e| e.to_string())?
            .stop()
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap()
    .unwrap();
}

/// Accounts placed on `shard`, with `n` jobs of `kind` each.
async fn work_on(f: &shardq_tests::Fleet, shard: &str, kind: &str, n: usize) {
    let a = Account::new(format!("on-{shard}")).unwrap();
    f.router.place(&a, shard).await.unwrap();
    let jobs = (0..n).map(|_| (a.clone(), NewJob::from_json(kind, serde_json::json!({}))));
    f.client.enqueue_many(jobs).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_went_down_holds_no_share_of_the_queue_slots() {
    const LIMIT: usize = 6;
    let bed = private_bed(3).await;
    let f = fleet_on(&bed).await;
    let names: Vec<String> = f.router.shards().iter().map(|d| d.name.clone()).collect();
    let (sick, healthy) = (&names[0], &names[1..]);
    // The sick shard has a backlog (its fetches come back full).
    work_on(&f, sick, "tick", 5_000).await;
    let rt = Runtime::builder(f.router.clone())
        .queue("default", LIMIT)
        .register(Tick)
        .register(Hold)
        .options(fast_options())
        .start()
        .unwrap();
    wait_for("the sick shard runs its backlog", WAIT, || async {
        count_state(&f.router, sick, "completed").await > 0
    })
    .await;
    // The healthy shards get more held jobs than the whole limit; they share
    // the slots with the sick shard while it runs.
    for h in healthy {
        work_on(&f, h, "hold", 2 * LIMIT).await;
    }
    wait_for("the healthy shards hold their share", WAIT, || async {
        let mut n = 0;
        for h in healthy {
            n += count_state(&f.router, h, "running").await;
        }
        n > 0
    })
    .await;
    stop_server(&bed, sick).await;
    let running_on_healthy = || async {
        let mut n = 0;
        for h in healthy {
            n += count_state(&f.router, h, "running").await;
        }
        n
    };
    wait_for("the healthy shards use every slot of the queue", WAIT, || async {
        running_on_healthy().await == LIMIT as i64
    })
    .await;
    rt.shutdown(Duration::from_millis(200)).await;
}
