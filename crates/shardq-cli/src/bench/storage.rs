//! Storage: what the job lifecycle leaves in the jobs table. A node works N
//! no-op jobs through one shard while they are enqueued (a backlog of at
//! most `BACKLOG`), then the table's and each index's size, its live and
//! dead row versions and its HOT-update ratio are read from the server's
//! statistics. A second, short phase holds `concurrency` long jobs with a
//! fast heartbeat and reports how many of its updates (mostly lease
//! renewals) were HOT. Last, a plain `VACUUM` of the table is timed.
//!
//! Statistics are read once every other backend of the database has gone
//! (pools closed), so each one has flushed its counters.

use std::time::{Duration, Instant};

use shardq::{Account, NewJob, RuntimeOptions};
use shardq_testbed::{FleetDb, TestBed};

use super::{BenchArgs, BenchFleet, Results};
use crate::store::{self, JobsTableStats};

/// Jobs run through the table when `--jobs` is not given.
pub(super) const DEFAULT_JOBS: usize = 1_000_000;
/// Enqueue batch size.
const CHUNK: usize = 10_000;
/// Most jobs waiting at once while the node works.
const BACKLOG: u64 = 50_000;
/// Accounts the jobs are spread over.
const ACCOUNTS: usize = 1_000;
/// The renewal phase's lease and heartbeat, and how long it holds its jobs.
const RENEW_LEASE: Duration = Duration::from_secs(1);
const RENEW_HEARTBEAT: Duration = Duration::from_millis(100);
const RENEW_HOLD: Duration = Duration::from_secs(3);
/// Longest wait for the other backends to go, for a phase's jobs to start
/// and for the lifecycle to finish.
const WAIT: Duration = Duration::from_secs(30);
const LIFECYCLE_LIMIT: Duration = Duration::from_secs(1800);

const MIB: f64 = 1024.0 * 1024.0;

/// What [`settled`] reads.
struct Settled {
    stats: JobsTableStats,
    indexes: Vec<(String, i64)>,
    vacuum_running: bool,
}

/// Closes the fleet's pools and waits (with a deadline) until no other
/// client backend is connected to the shard's database; then reads the
/// jobs table's statistics, each index's size and whether a vacuum runs.
async fn settled(fleet: BenchFleet, shard: &FleetDb) -> anyhow::Result<Settled> {
    fleet.router.master().pool.close().await;
    for db in fleet.router.shards() {
        db.pool.close().await;
    }
    drop(fleet);
    let probe = sqlx::PgPool::connect(&shard.url).await?;
    let since = Instant::now();
    loop {
        let others = store::storage_other_backends(&probe).await?;
        if others == 0 {
            break;
        }
        anyhow::ensure!(
            since.elapsed() < WAIT,
            "storage: {others} other backends still connected to the shard after {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = store::storage_jobs_table(&probe).await?;
    let indexes = store::storage_jobs_indexes(&probe).await?;
    let vacuum_running = store::storage_vacuum_running(&probe).await?;
    probe.close().await;
    Ok(Settled {
        stats,
        indexes,
        vacuum_running,
    })
}

/// Runs the scenario and adds its figures.
pub(super) async fn storage(bed: &TestBed, args: &BenchArgs, results: &mut Results) -> anyhow::Result<()> {
    let n = args.jobs.unwrap_or(DEFAULT_JOBS);
    let dbs = bed.fresh_fleet().await?;
    let shard = &dbs.shards[0];
    let fleet = BenchFleet::new(&dbs.master, &[("shard_1", shard)], 20).await?;
    let accounts: Vec<Account> = (0..ACCOUNTS)
        .filter_map(|i| Account::new(format!("storage-{i}")).ok())
        .collect();
    eprintln!(
        "storage: {n} no-op jobs through one shard, {} slots, backlog at most {BACKLOG}...",
        args.concurrency
    );
    let node = fleet.node(args.concurrency, RuntimeOptions::default())?;
    let job = NewJob::from_json("noop", serde_json::json!({}));
    let completed = || node.counts().iter().map(|s| s.completed).sum::<u64>();
    let started = Instant::now();
    let mut enqueued = 0usize;
    let mut i = 0usize;
    while completed() < n as u64 {
        anyhow::ensure!(
            started.elapsed() < LIFECYCLE_LIMIT,
            "storage: stalled at {} of {n} jobs completed",
            completed()
        );
        if enqueued < n && (enqueued as u64) < completed() + BACKLOG {
            let take = (n - enqueued).min(CHUNK);
            let batch = (0..take).map(|k| (accounts[(i + k) % accounts.len()].clone(), job.clone()));
            fleet.client.enqueue_many(batch).await?;
            enqueued += take;
            i += take;
        } else {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    node.shutdown(Duration::from_secs(5)).await;
    let Settled {
        stats: a,
        indexes,
        vacuum_running,
    } = settled(fleet, shard).await?;
    anyhow::ensure!(
        a.n_tup_ins >= n as i64,
        "storage: the statistics count {} inserts of {n} jobs; they were not all flushed",
        a.n_tup_ins
    );
    let after = format!("after {n} jobs");
    results.add("storage", &format!("enqueue + work, {n} jobs"), rate, "jobs/s");
    results.add(
        "storage",
        &format!("{after}: table (heap, TOAST, maps)"),
        a.table_bytes as f64 / MIB,
        "MiB",
    );
    results.add("storage", &format!("{after}: heap"), a.heap_bytes as f64 / MIB, "MiB");
    results.add(
        "storage",
        &format!("{after}: indexes, all"),
        a.indexes_bytes as f64 / MIB,
        "MiB",
    );
    for (name, bytes) in &indexes {
        results.add("storage", &format!("{after}: index {name}"), *bytes as f64 / MIB, "MiB");
    }
    results.add(
        "storage",
        &format!("{after}: shardq.account_jobs (table and key)"),
        a.account_jobs_bytes as f64 / MIB,
        "MiB",
    );
    results.add(
        "storage",
        &format!("{after}: bytes per job, table + indexes + account_jobs"),
        (a.table_bytes + a.indexes_bytes + a.account_jobs_bytes) as f64 / n.max(1) as f64,
        "B",
    );
    results.add(
        "storage",
        &format!("{after}: live rows (n_live_tup)"),
        a.n_live_tup as f64,
        "",
    );
    results.add(
        "storage",
        &format!("{after}: dead rows (n_dead_tup)"),
        a.n_dead_tup as f64,
        "",
    );
    results.add(
        "storage",
        &format!("{after}: updates (n_tup_upd)"),
        a.n_tup_upd as f64,
        "",
    );
    results.add(
        "storage",
        &format!("{after}: HOT updates (n_tup_hot_upd)"),
        a.n_tup_hot_upd as f64,
        "",
    );
    results.add(
        "storage",
        &format!("{after}: HOT ratio (n_tup_hot_upd / n_tup_upd)"),
        ratio(a.n_tup_hot_upd, a.n_tup_upd),
        "",
    );
    results.add(
        "storage",
        &format!("{after}: autovacuum runs finished"),
        a.autovacuum_count as f64,
        "",
    );
    results.add(
        "storage",
        &format!("{after}: autovacuum running (1 = yes)"),
        f64::from(u8::from(vacuum_running)),
        "",
    );

    // Renewals: long jobs held with a fast heartbeat, then handed back.
    let held = args.concurrency;
    eprintln!(
        "storage: {held} held jobs, leases of {:?} renewed every {:?}, for {:?}...",
        RENEW_LEASE, RENEW_HEARTBEAT, RENEW_HOLD
    );
    let fleet = BenchFleet::new(&dbs.master, &[("shard_1", shard)], 20).await?;
    let long = NewJob::from_json("sleep", serde_json::json!({ "ms": 600_000 }));
    fleet
        .client
        .enqueue_many((0..held).map(|k| (accounts[k % accounts.len()].clone(), long.clone())))
        .await?;
    let node = fleet.node(
        held,
        RuntimeOptions {
            lease: RENEW_LEASE,
            heartbeat_interval: RENEW_HEARTBEAT,
            ..RuntimeOptions::default()
        },
    )?;
    let since = Instant::now();
    while node.leased() < held {
        anyhow::ensure!(
            since.elapsed() < WAIT,
            "storage: only {} of {held} held jobs started",
            node.leased()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The workload itself: the heartbeat renews every lease meanwhile.
    tokio::time::sleep(RENEW_HOLD).await;
    node.shutdown(Duration::from_millis(100)).await;
    let b = settled(fleet, shard).await?.stats;
    let updates = b.n_tup_upd - a.n_tup_upd;
    let hot = b.n_tup_hot_upd - a.n_tup_hot_upd;
    let label = format!("{held} held jobs, {} s of renewals", RENEW_HOLD.as_secs());
    results.add(
        "storage",
        &format!("{label}: updates (claims, renewals, hand-backs)"),
        updates as f64,
        "",
    );
    results.add("storage", &format!("{label}: HOT updates"), hot as f64, "");
    results.add("storage", &format!("{label}: HOT ratio"), ratio(hot, updates), "");

    // What cleaning up costs: a plain VACUUM of the table as the two
    // phases left it (after any autovacuum still running on it).
    eprintln!("storage: VACUUM shardq.jobs...");
    let probe = sqlx::PgPool::connect(&shard.url).await?;
    let started = Instant::now();
    store::storage_vacuum(&probe).await?;
    let took = started.elapsed();
    let c = store::storage_jobs_table(&probe).await?;
    probe.close().await;
    results.add("storage", "VACUUM after both phases", took.as_secs_f64(), "s");
    results.add(
        "storage",
        "after VACUUM: dead rows (n_dead_tup)",
        c.n_dead_tup as f64,
        "",
    );
    results.add(
        "storage",
        "after VACUUM: table (heap, TOAST, maps)",
        c.table_bytes as f64 / MIB,
        "MiB",
    );
    Ok(())
}

fn ratio(part: i64, whole: i64) -> f64 {
    if whole > 0 {
        part as f64 / whole as f64
    } else {
        0.0
    }
}
