//! Pickup latency under a steady load (with notifications and poll-only),
//! and notification isolation between shards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shardq::{Account, NewJob, RuntimeOptions, ShardRunStats};
use shardq_testbed::TestBed;

use super::{BenchArgs, BenchFleet, Results};
use crate::store;

/// Enqueues single jobs for `account` at `rate` per second for `seconds`
/// through the client (which wakes workers), or with `plain` as bare SQL
/// inserts that send no wake-up; returns how many were enqueued.
async fn steady(fleet: &BenchFleet, account: Account, rate: u32, seconds: u64, plain: bool) -> anyhow::Result<u64> {
    let client = fleet.client.clone();
    let pool = fleet.router.shards()[0].pool.clone();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut sent = Vec::new();
    while Instant::now() < until {
        tick.tick().await;
        let (client, account, pool) = (client.clone(), account.clone(), pool.clone());
        sent.push(tokio::spawn(async move {
            if plain {
                store::enqueue_plain(&pool, account.as_str()).await?;
            } else {
                client
                    .enqueue(&account, NewJob::from_json("noop", serde_json::json!({})))
                    .await?;
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    let n = sent.len() as u64;
    for s in sent {
        s.await??;
    }
    Ok(n)
}

/// Waits until the node completed `n` jobs on `shard`, then returns its stats.
async fn settle(node: &shardq::Runtime, shard: &str, n: u64) -> anyhow::Result<ShardRunStats> {
    let started = Instant::now();
    loop {
        let counts = node.counts().into_iter().find(|s| s.shard == shard).unwrap_or_default();
        if counts.completed >= n {
            return Ok(node.stats().into_iter().find(|s| s.shard == shard).unwrap_or_default());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "only {} of {n} completed",
            counts.completed
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Scenario 3: p50/p95/p99/max pickup at a steady rate after a warm-up
/// (reported on its own: the longest pickup right after the node starts),
/// with notifications (`--repeat` runs, stalls counted over all, warm-ups
/// included) and poll-only.
pub(super) async fn pickup(bed: &TestBed, args: &BenchArgs, results: &mut Results) -> anyhow::Result<()> {
    let runs = args.repeat.max(1);
    let poll = RuntimeOptions::default().poll_interval;
    let mut stalls = 0u32;
    let mut notified = Vec::new();
    // The longest pickup of any run's warm-up.
    let mut warm_up_max = 0.0f64;
    for run_no in 1..=runs {
        eprintln!(
            "latency: {} jobs/s for {WARM_UP_SECS} s of warm-up and {} s measured, notify, run {run_no} of {runs}...",
            args.rate, args.seconds
        );
        match pickup_once(bed, args, true).await {
            Ok(run) => {
                let [.., warm_max] = run.warm_up.pickup_ms.unwrap_or_default();
                warm_up_max = warm_up_max.max(warm_max);
                let [p50, p95, p99, max] = run.measured.pickup_ms.unwrap_or_default();
                eprintln!(
                    "latency: run {run_no}: warm-up max {warm_max:.1} ms; p50 {p50:.2} ms, p95 {p95:.2} ms, p99 {p99:.2} ms, max {max:.1} ms"
                );
                // A job that waited for the poll is a stall, in the warm-up too.
                if max.max(warm_max) > poll.as_secs_f64() * 1000.0 / 2.0 {
                    stalls += 1;
                }
                notified.push([p50, p95, p99, max]);
            }
            Err(e) => {
                eprintln!("latency: run {run_no} stalled: {e:#}");
                stalls += 1;
            }
        }
    }
    if !notified.is_empty() {
        // Each percentile's median over the runs.
        let median = |i: usize| {
            let mut v: Vec<f64> = notified.iter().map(|p| p[i]).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let over = if runs > 1 {
            format!(" (median of {runs} runs)")
        } else {
            String::new()
        };
        results.add_target(
            "latency",
            &format!("p50 pickup, notify{over}"),
            median(0),
            "ms",
            1.5,
            false,
        );
        results.add("latency", &format!("p95 pickup, notify{over}"), median(1), "ms");
        results.add_target(
            "latency",
            &format!("p99 pickup, notify{over}"),
            median(2),
            "ms",
            5.0,
            false,
        );
        let worst = notified.iter().map(|p| p[3]).fold(0.0, f64::max);
        results.add("latency", "max pickup, notify (worst run)", worst, "ms");
        results.add(
            "latency",
            &format!("max pickup, notify, first {WARM_UP_SECS} s after the node starts (worst run)"),
            warm_up_max,
            "ms",
        );
    }
    results.add_target(
        "latency",
        &format!("stalls over {runs} runs"),
        stalls as f64,
        "",
        0.0,
        false,
    );
    eprintln!("latency: {} jobs/s for {} s, poll-only...", args.rate, args.seconds);
    let run = pickup_once(bed, args, false).await?;
    let [p50, _, p99, _] = run.measured.pickup_ms.unwrap_or_default();
    results.add("latency", "p50 pickup, poll-only (1 s poll)", p50, "ms");
    results.add("latency", "p99 pickup, poll-only (1 s poll)", p99, "ms");
    Ok(())
}

/// Seconds of load at the same rate before the measured window: the
/// node's first jobs wait for its engine connections to open and for each
/// connection's first claim to load the catalog and plan the statement.
const WARM_UP_SECS: u64 = 1;

/// One latency run's statistics: the warm-up after the node started, then
/// the measured window.
struct PickupRun {
    warm_up: ShardRunStats,
    measured: ShardRunStats,
}

/// One latency run on fresh databases: with notifications, or poll-only
/// (trigger off, bare inserts). The node starts with the load: the first
/// [`WARM_UP_SECS`] are reported on their own, then the statistics start
/// afresh for `--seconds` of the same load.
async fn pickup_once(bed: &TestBed, args: &BenchArgs, notify: bool) -> anyhow::Result<PickupRun> {
    let dbs = bed.fresh_fleet().await?;
    let fleet = BenchFleet::new(&dbs.master, &[("shard_1", &dbs.shards[0])], 20).await?;
    if !notify {
        store::notify_trigger_disable(&fleet.router.shards()[0].pool).await?;
    }
    let node = fleet.node(64, RuntimeOptions::default())?;
    let account = Account::new("latency")?;
    fleet.router.shard_for(&account).await?;
    let run = async {
        let n = steady(&fleet, account.clone(), args.rate, WARM_UP_SECS, !notify).await?;
        let warm_up = settle(&node, "shard_1", n).await?;
        node.reset_stats();
        let n = steady(&fleet, account, args.rate, args.seconds, !notify).await?;
        let measured = settle(&node, "shard_1", n).await?;
        Ok(PickupRun { warm_up, measured })
    }
    .await;
    node.shutdown(Duration::from_secs(5)).await;
    run
}

/// Scenario 5: shard A flooded by single-row enqueues while shard B serves a
/// steady stream; B's p99 pickup with A on another server, then on B's server.
pub(super) async fn isolation(bed: &TestBed, args: &BenchArgs, results: &mut Results) -> anyhow::Result<()> {
    for same_server in [false, true] {
        let label = if same_server {
            "A and B on one server"
        } else {
            "A and B on separate servers"
        };
        eprintln!("isolation: {label}...");
        let one = bed.fresh_fleet().await?;
        let two = bed.fresh_fleet().await?;
        let a_db = if same_server { &two.shards[1] } else { &one.shards[0] };
        let fleet = BenchFleet::new(&one.master, &[("shard_a", a_db), ("shard_b", &one.shards[1])], 20).await?;
        let (a, b) = (Account::new("flooder")?, Account::new("steady")?);
        fleet.router.place(&a, "shard_a").await?;
        fleet.router.place(&b, "shard_b").await?;
        let node = fleet.node(64, RuntimeOptions::default())?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flooders: Vec<_> = (0..4)
            .map(|_| {
                let (client, a, stop) = (fleet.client.clone(), a.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if client
                            .enqueue(&a, NewJob::from_json("noop", serde_json::json!({})))
                            .await
                            .is_ok()
                        {
                            n += 1;
                        }
                    }
                    n
                })
            })
            .collect();
        let rate = (args.rate / 5).max(1);
        let n = steady(&fleet, b, rate, args.seconds, false).await?;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut flooded = 0;
        for f in flooders {
            flooded += f.await?;
        }
        let stats = settle(&node, "shard_b", n).await?;
        node.shutdown(Duration::from_secs(5)).await;
        let p99 = stats.pickup_ms.map(|p| p[2]).unwrap_or_default();
        results.add("isolation", &format!("B p99 pickup at {rate}/s, {label}"), p99, "ms");
        results.add(
            "isolation",
            &format!("A flood, {label}"),
            flooded as f64 / args.seconds as f64,
            "enqueues/s",
        );
    }
    Ok(())
}
