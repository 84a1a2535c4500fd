//! Drain (enqueue rate, drain rate), the bare-SQL floor, and drain across 1, 2
//! and 4 shards.

use std::time::{Duration, Instant};

use shardq::{Account, NewJob, RuntimeOptions};
use shardq_testbed::TestBed;

use super::{BenchArgs, BenchFleet, Results};
use crate::store;

/// Enqueue batch size.
const CHUNK: usize = 10_000;

/// Enqueues `n` no-op jobs spread over `accounts` in batches; returns jobs/s.
async fn preload(fleet: &BenchFleet, n: usize, accounts: &[Account]) -> anyhow::Result<f64> {
    let job = NewJob::from_json("noop", serde_json::json!({}));
    let started = Instant::now();
    let mut left = n;
    let mut i = 0;
    while left > 0 {
        let take = left.min(CHUNK);
        let batch = (0..take).map(|k| (accounts[(i + k) % accounts.len()].clone(), job.clone()));
        fleet.client.enqueue_many(batch).await?;
        left -= take;
        i += take;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Runs one node until `n` jobs completed; returns (jobs/s, most connections seen on one server).
async fn drain(fleet: &BenchFleet, n: usize, concurrency: usize) -> anyhow::Result<(f64, i64)> {
    let node = fleet.node(concurrency, RuntimeOptions::default())?;
    let started = Instant::now();
    let mut peak = 0;
    let mut ticks = 0u32;
    loop {
        let done: u64 = node.counts().iter().map(|s| s.completed).sum();
        if done as usize >= n {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "drain stalled at {done} of {n}"
        );
        ticks += 1;
        if ticks.is_multiple_of(20) {
            for db in fleet.router.shards() {
                peak = peak.max(store::server_connections(&db.pool).await.unwrap_or(0));
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    node.shutdown(Duration::from_secs(5)).await;
    Ok((rate, peak))
}

fn accounts_on(n: usize) -> Vec<Account> {
    (0..n).filter_map(|i| Account::new(format!("bench-{i}")).ok()).collect()
}

/// Scenario 1 (drain) and 2 (SQL floor) on one shard.
pub(super) async fn drain_and_floor(
    bed: &TestBed,
    args: &BenchArgs,
    results: &mut Results,
    drain_it: bool,
    floor_it: bool,
) -> anyhow::Result<()> {
    if drain_it {
        eprintln!("drain: preloading {} jobs on one shard...", args.drain_jobs());
        let dbs = bed.fresh_fleet().await?;
        let fleet = BenchFleet::new(&dbs.master, &[("shard_1", &dbs.shards[0])], 20).await?;
        let enqueue = preload(&fleet, args.drain_jobs(), &accounts_on(1000)).await?;
        results.add_target("drain", "enqueue (batched)", enqueue, "jobs/s", 100_000.0, true);
        eprintln!(
            "drain: working {} jobs with {} slots...",
            args.drain_jobs(),
            args.concurrency
        );
        let (rate, _) = drain(&fleet, args.drain_jobs(), args.concurrency).await?;
        results.add_target("drain", "drain, one shard", rate, "jobs/s", 20_000.0, true);
    }
    if floor_it {
        eprintln!("floor: the same lifecycle in bare SQL...");
        let dbs = bed.fresh_fleet().await?;
        let fleet = BenchFleet::new(&dbs.master, &[("shard_1", &dbs.shards[0])], 20).await?;
        let pool = fleet.router.shards()[0].pool.clone();
        let mut left = args.drain_jobs() as i64;
        while left > 0 {
            let n = left.min(CHUNK as i64);
            store::floor_insert(&pool, n).await?;
            left -= n;
        }
        let batch = args.concurrency as i64;
        let started = Instant::now();
        let loops = (0..2).map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut done = 0u64;
                loop {
                    let ids = store::floor_claim(&pool, batch).await?;
                    if ids.is_empty() {
                        return Ok::<u64, sqlx::Error>(done);
                    }
                    store::floor_complete(&pool, &ids).await?;
                    done += ids.len() as u64;
                }
            })
        });
        let mut total = 0;
        for l in futures::future::join_all(loops).await {
            total += l??;
        }
        let floor = total as f64 / started.elapsed().as_secs_f64();
        results.add("floor", &format!("bare SQL, batch {batch}, 2 loops"), floor, "jobs/s");
        if let Some(drain) = results.value("drain", "drain, one shard") {
            results.add_target("floor", "shardq drain / floor", drain / floor, "", 0.6, true);
        }
    }
    Ok(())
}

/// Scenario 4: drain with 1, 2 and 4 shards on separate servers.
pub(super) async fn shards(bed: &TestBed, args: &BenchArgs, results: &mut Results) -> anyhow::Result<()> {
    for n in [1usize, 2, 4] {
        eprintln!("shards: {n} shard(s), {} jobs...", args.shard_jobs);
        let dbs = bed.fresh_fleet().await?;
        let names: Vec<String> = (1..=n).map(|i| format!("shard_{i}")).collect();
        let shards: Vec<(&str, &shardq_testbed::FleetDb)> = names
            .iter()
            .zip(&dbs.shards)
            .map(|(name, db)| (name.as_str(), db))
            .collect();
        let fleet = BenchFleet::new(&dbs.master, &shards, 20).await?;
        preload(&fleet, args.shard_jobs, &accounts_on(1000)).await?;
        let (rate, peak) = drain(&fleet, args.shard_jobs, args.concurrency).await?;
        results.add("shards", &format!("drain, {n} shard(s)"), rate, "jobs/s");
        results.add(
            "shards",
            &format!("connections per server, {n} shard(s)"),
            peak as f64,
            "",
        );
    }
    Ok(())
}
