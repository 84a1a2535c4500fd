//! Steady: whether the jobs table stays bounded under a steady load. A
//! node works one shard while `--rate` no-op jobs per second are enqueued
//! for `--steady-seconds` (default 30 minutes), with completed jobs kept
//! for [`RETAIN`] and pruned every [`PRUNE_EVERY`]. The table's and its
//! indexes' sizes and its live and dead row versions are sampled from the
//! server's statistics throughout; the figures compare the end of the run
//! with its first third (by then the retention window has filled and
//! pruning runs), so growth after it is bloat, not more retained jobs.

use std::time::{Duration, Instant};

use shardq::{Account, NewJob, RuntimeOptions};
use shardq_testbed::TestBed;

use super::{BenchArgs, BenchFleet, Results};
use crate::store::{self, JobsTableStats};

/// How long completed jobs are kept.
const RETAIN: Duration = Duration::from_secs(60);
/// How often the pruner runs.
const PRUNE_EVERY: Duration = Duration::from_secs(10);
/// Accounts the jobs are spread over.
const ACCOUNTS: usize = 100;
/// Enqueue ticks per second (each enqueues `rate / TICKS` jobs in one call).
const TICKS: u32 = 10;
/// Samples of the table over the run.
const SAMPLES: u64 = 30;
/// Bound on the growth of table + indexes (and `shardq.account_jobs`) from
/// the first third to the end.
const GROWTH_TARGET: f64 = 1.10;

const MIB: f64 = 1024.0 * 1024.0;

/// One look at the table.
struct Sample {
    at: Duration,
    stats: JobsTableStats,
}

/// Runs the scenario and adds its figures.
pub(super) async fn steady(bed: &TestBed, args: &BenchArgs, results: &mut Results) -> anyhow::Result<()> {
    let seconds = args.steady_seconds;
    anyhow::ensure!(
        Duration::from_secs(seconds) >= 3 * (RETAIN + PRUNE_EVERY),
        "steady: --steady-seconds {seconds} is too short: the first third must outlast the {RETAIN:?} retention and a prune"
    );
    let dbs = bed.fresh_fleet().await?;
    let shard = &dbs.shards[0];
    let fleet = BenchFleet::new(&dbs.master, &[("shard_1", shard)], 20).await?;
    let probe = sqlx::PgPool::connect(&shard.url).await?;
    let accounts: Vec<Account> = (0..ACCOUNTS)
        .filter_map(|i| Account::new(format!("steady-{i}")).ok())
        .collect();
    let per_tick = (args.rate / TICKS).max(1) as usize;
    eprintln!(
        "steady: {} jobs/s for {seconds} s through one shard, completed jobs kept {RETAIN:?}, pruned every {PRUNE_EVERY:?}...",
        per_tick * TICKS as usize
    );
    let options = RuntimeOptions {
        retain_completed: RETAIN,
        prune_interval: PRUNE_EVERY,
        ..RuntimeOptions::default()
    };
    let node = fleet.node(args.concurrency, options)?;
    let job = NewJob::from_json("noop", serde_json::json!({}));
    let run = Duration::from_secs(seconds);
    let every = run / SAMPLES as u32;
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / TICKS);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut next_sample = started + every;
    let mut samples = Vec::new();
    let (mut enqueued, mut i) = (0usize, 0usize);
    while started.elapsed() < run {
        ticks.tick().await;
        let batch = (0..per_tick).map(|k| (accounts[(i + k) % accounts.len()].clone(), job.clone()));
        fleet.client.enqueue_many(batch).await?;
        enqueued += per_tick;
        i += per_tick;
        if Instant::now() >= next_sample {
            let stats = store::storage_jobs_table(&probe).await?;
            eprintln!(
                "steady: {:>5} s: table {:.1} MiB, indexes {:.1} MiB, live {}, dead {}, autovacuums {}",
                started.elapsed().as_secs(),
                stats.table_bytes as f64 / MIB,
                stats.indexes_bytes as f64 / MIB,
                stats.n_live_tup,
                stats.n_dead_tup,
                stats.autovacuum_count
            );
            samples.push(Sample {
                at: started.elapsed(),
                stats,
            });
            next_sample += every;
        }
    }
    let elapsed = started.elapsed();
    let completed: u64 = node.counts().iter().map(|s| s.completed).sum();
    node.shutdown(Duration::from_secs(5)).await;
    probe.close().await;

    let third = samples
        .iter()
        .find(|s| s.at >= run / 3)
        .ok_or_else(|| anyhow::anyhow!("steady: no sample after the first third of the run"))?;
    let end = samples.last().ok_or_else(|| anyhow::anyhow!("steady: no sample"))?;
    let total = |s: &JobsTableStats| (s.table_bytes + s.indexes_bytes + s.account_jobs_bytes) as f64;
    let worst_dead = samples.iter().map(|s| s.stats.n_dead_tup).max().unwrap_or(0);
    let name = "steady";
    results.add(name, "enqueued", enqueued as f64 / elapsed.as_secs_f64(), "jobs/s");
    results.add(name, "completed", completed as f64 / elapsed.as_secs_f64(), "jobs/s");
    for (when, s) in [
        (format!("at {} s", third.at.as_secs()), third),
        ("at the end".to_string(), end),
    ] {
        results.add(name, &format!("{when}: table"), s.stats.table_bytes as f64 / MIB, "MiB");
        results.add(
            name,
            &format!("{when}: indexes"),
            s.stats.indexes_bytes as f64 / MIB,
            "MiB",
        );
        results.add(
            name,
            &format!("{when}: shardq.account_jobs"),
            s.stats.account_jobs_bytes as f64 / MIB,
            "MiB",
        );
        results.add(name, &format!("{when}: live rows"), s.stats.n_live_tup as f64, "");
        results.add(name, &format!("{when}: dead rows"), s.stats.n_dead_tup as f64, "");
    }
    results.add(name, "most dead rows seen", worst_dead as f64, "");
    results.add(name, "autovacuum runs", end.stats.autovacuum_count as f64, "");
    results.add_target(
        name,
        "table + indexes + account_jobs, end / first third",
        total(&end.stats) / total(&third.stats).max(1.0),
        "",
        GROWTH_TARGET,
        false,
    );
    Ok(())
}
