//! Trouble on one shard stays on that shard: a node's slots, connections and
//! shutdown are not held by a shard whose server is down. Each test starts
//! its own bed, since it stops servers.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::atomic::{AtomicUsize, Ordering};
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

/// `hold`: runs until the node hands it back, counted in its gauge while
/// it runs (a claimed job may wait in the node's buffer before it runs, so
/// the shard's `running` rows count more than the slots in use).
struct Hold(Arc<AtomicUsize>);
impl Worker for Hold {
    type Args = serde_json::Value;
    const KIND: &'static str = "hold";
    fn timeout(&self) -> Duration {
        Duration::from_secs(3600)
    }
    async fn work(&self, _: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        let _running = Running::start(&self.0);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(())
    }
}

/// One run counted in a gauge until dropped (the run ended or was aborted).
struct Running(Arc<AtomicUsize>);
impl Running {
    fn start(gauge: &Arc<AtomicUsize>) -> Running {
        gauge.fetch_add(1, Ordering::SeqCst);
        Running(gauge.clone())
    }
}
impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What happens to the sick shard's server.
#[derive(Clone, Copy)]
enum Fault {
    Stop,
    Freeze,
}

async fn fault(bed: &Arc<TestBed>, name: &str, fault: Fault) {
    let (bed, name) = (bed.clone(), name.to_string());
    tokio::task::spawn_blocking(move || {
        let server = bed.server(&name).map_err(|e| e.to_string())?;
        match fault {
            Fault::Stop => server.stop(),
            Fault::Freeze => server.freeze(),
        }
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
    sick_shard_holds_no_share(Fault::Stop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_stopped_answering_does_not_keep_slots_from_the_others() {
    sick_shard_holds_no_share(Fault::Freeze).await;
}

async fn sick_shard_holds_no_share(kind: Fault) {
    const LIMIT: usize = 6;
    let bed = private_bed(3).await;
    let f = fleet_on(&bed).await;
    let names: Vec<String> = f.router.shards().iter().map(|d| d.name.clone()).collect();
    let (sick, healthy) = (&names[0], &names[1..]);
    // The sick shard has a backlog (its fetches come back full).
    work_on(&f, sick, "tick", 5_000).await;
    let holding = Arc::new(AtomicUsize::new(0));
    let rt = Runtime::builder(f.router.clone())
        .queue("default", LIMIT)
        .register(Tick)
        .register(Hold(holding.clone()))
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
        holding.load(Ordering::SeqCst) > 0
    })
    .await;
    fault(&bed, sick, kind).await;
    wait_for("the healthy shards use every slot of the queue", WAIT, || async {
        holding.load(Ordering::SeqCst) == LIMIT
    })
    .await;
    rt.shutdown(Duration::from_millis(200)).await;
}

/// `grab`: holds a connection of the application's pool on the job's shard
/// for a while, as a busy handler does, and counts its runs.
#[derive(Clone)]
struct Grab {
    router: Arc<shardq::Router>,
    runs: Arc<std::sync::Mutex<std::collections::HashMap<i64, u32>>>,
}

impl Worker for Grab {
    type Args = serde_json::Value;
    const KIND: &'static str = "grab";
    async fn work(&self, ctx: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        *self.runs.lock().unwrap().entry(ctx.id.id).or_default() += 1;
        let db = self
            .router
            .shard(&ctx.id.shard)
            .map_err(|e| JobError::failed(e.to_string()))?;
        let _held = db.pool.acquire().await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_holding_every_pool_connection_do_not_starve_lease_renewals() {
    const LIMIT: usize = 4;
    let f = shardq_tests::fleet().await;
    // The application's pool on every shard has exactly as many connections
    // as the node runs handlers.
    let mut config = f.config.clone();
    for s in &mut config.shards {
        s.database.pool.max_connections = LIMIT as u32;
    }
    let router = Arc::new(shardq::Router::connect(&config).await.unwrap());
    let a = Account::new("busy-handlers").unwrap();
    let shard = f.router.shard_for(&a).await.unwrap().shard;
    let jobs = (0..LIMIT).map(|_| (a.clone(), NewJob::from_json("grab", serde_json::json!({}))));
    f.client.enqueue_many(jobs).await.unwrap();
    let runs = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let busy = Runtime::builder(router.clone())
        .queue("default", LIMIT)
        .register(Grab {
            router: router.clone(),
            runs: runs.clone(),
        })
        .options(shardq::RuntimeOptions {
            lease: Duration::from_secs(1),
            heartbeat_interval: Duration::from_millis(250),
            ..fast_options()
        })
        .start()
        .unwrap();
    // Another node, on its own pools, rescues whatever lease runs out.
    let rescuer = Runtime::builder(f.router.clone())
        .queue("elsewhere", 1)
        .options(fast_options())
        .start()
        .unwrap();
    wait_for("every job completed", WAIT, || async {
        count_state(&f.router, &shard, "completed").await == LIMIT as i64
    })
    .await;
    busy.shutdown(Duration::from_millis(100)).await;
    rescuer.shutdown(Duration::from_millis(100)).await;
    let runs = runs.lock().unwrap();
    assert_eq!(runs.len(), LIMIT);
    assert!(
        runs.values().all(|n| *n == 1),
        "no lease expired under busy handlers: {runs:?}"
    );
}
