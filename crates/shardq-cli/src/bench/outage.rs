//! Outage: one sick shard must not slow the healthy ones. A node works three
//! shards, each on its own server, with one queue of 30 slots and 100 ms
//! jobs, and every shard with work keeps a backlog for the whole run.
//!
//! - baseline: only shard_2 and shard_3 have work; their throughput;
//! - stopped: all three have work, shard_1's server is stopped for the
//!   window; the throughput of shard_2 and shard_3;
//! - frozen: the same with shard_1's server frozen (SIGSTOP), then thawed;
//! - shutdown: how long a node takes to shut down with shard_1 frozen and
//!   jobs held on every shard.
//!
//! Each phase has fresh databases and its own node with the default
//! `RuntimeOptions` and pool settings; the window starts just before the
//! fault is applied, after a warm-up in which every shard with work reaches
//! its share of the slots. The servers are restored (started, thawed) after
//! each phase, also when it fails.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shardq::{Account, NewJob, Runtime, RuntimeOptions};
use shardq_router::config::PoolConfig;
use shardq_testbed::{Server, TestBed};

use super::{BenchArgs, BenchFleet, Results};

/// The node's slots on its one queue.
const SLOTS: usize = 30;
/// How long each job's handler sleeps, in milliseconds.
const JOB_MS: u64 = 100;
/// From node start to the window: every shard with work reaches its share.
const WARM_UP: Duration = Duration::from_secs(3);
/// The grace of the timed shutdown.
const GRACE: Duration = Duration::from_secs(2);
/// What the timed shutdown may take beyond its grace.
const SHUTDOWN_SLACK: Duration = Duration::from_secs(1);
/// Jobs held (running for minutes) on each shard when the node shuts down.
const HELD_PER_SHARD: usize = 8;
/// The shards, each on the test-bed server of the same name; the first is
/// the sick one.
const SHARDS: [&str; 3] = ["shard_1", "shard_2", "shard_3"];
/// The shard whose server is stopped or frozen.
const SICK: &str = SHARDS[0];
/// Accounts per shard the jobs are spread over.
const ACCOUNTS_PER_SHARD: usize = 10;
/// Enqueue batch size.
const CHUNK: usize = 10_000;
/// Least throughput on the healthy shards during the fault, as a share of
/// the baseline.
const RATIO_TARGET: f64 = 0.9;

/// What happens to the sick shard's server during a phase.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Nothing, and the sick shard has no work: the baseline.
    None,
    /// `Server::stop` (clean shutdown: connections refused).
    Stop,
    /// `Server::freeze` (SIGSTOP: connections accepted by the kernel, nothing answers).
    Freeze,
}

impl Fault {
    fn label(self) -> &'static str {
        match self {
            Fault::None => "baseline",
            Fault::Stop => "stopped",
            Fault::Freeze => "frozen",
        }
    }

    /// Applies the fault to `server` or, with `undo`, restores it.
    fn run(self, server: &Server, undo: bool) -> anyhow::Result<()> {
        match (self, undo) {
            (Fault::None, _) => {}
            (Fault::Stop, false) => server.stop()?,
            (Fault::Stop, true) => server.start()?,
            (Fault::Freeze, false) => server.freeze()?,
            (Fault::Freeze, true) => server.thaw()?,
        }
        Ok(())
    }
}

/// Applies `fault` to the sick shard's server (or, with `undo`, restores
/// it) off the async threads (pg_ctl blocks), so the node under test keeps
/// both of its worker threads.
async fn on_sick(bed: &Arc<TestBed>, fault: Fault, undo: bool) -> anyhow::Result<()> {
    let bed = bed.clone();
    tokio::task::spawn_blocking(move || fault.run(bed.server(SICK)?, undo)).await?
}

/// A fresh fleet of the three shards with `ACCOUNTS_PER_SHARD` accounts
/// placed on each; returns the accounts by shard, in `SHARDS` order.
async fn stage(bed: &TestBed) -> anyhow::Result<(BenchFleet, Vec<Vec<Account>>)> {
    let dbs = bed.fresh_fleet().await?;
    let shards: Vec<(&str, &shardq_testbed::FleetDb)> = SHARDS.iter().copied().zip(&dbs.shards).collect();
    let fleet = BenchFleet::new(&dbs.master, &shards, PoolConfig::default().max_connections).await?;
    let mut accounts = Vec::new();
    for shard in SHARDS {
        let mut on = Vec::new();
        for i in 0..ACCOUNTS_PER_SHARD {
            let account = Account::new(format!("outage-{shard}-{i}"))?;
            fleet.router.place(&account, shard).await?;
            on.push(account);
        }
        accounts.push(on);
    }
    Ok((fleet, accounts))
}

/// Enqueues `n` copies of `job` spread over `accounts`, in batches.
async fn preload(fleet: &BenchFleet, accounts: &[Account], n: usize, job: &NewJob) -> anyhow::Result<()> {
    let mut left = n;
    let mut i = 0;
    while left > 0 {
        let take = left.min(CHUNK);
        let batch = (0..take).map(|k| (accounts[(i + k) % accounts.len()].clone(), job.clone()));
        fleet.client.enqueue_many(batch).await?;
        left -= take;
        i += take;
    }
    Ok(())
}

/// Jobs completed so far on each shard, in `SHARDS` order.
fn completed(node: &Runtime) -> [u64; 3] {
    let counts = node.counts();
    SHARDS.map(|name| {
        counts
            .iter()
            .find(|s| s.shard == name)
            .map(|s| s.completed)
            .unwrap_or(0)
    })
}

/// Jobs completed so far on the healthy shards.
fn healthy(node: &Runtime) -> u64 {
    completed(node)[1..].iter().sum()
}

/// What one throughput phase measured.
struct Phase {
    /// Completions per second on the healthy shards over the window.
    rate: f64,
    /// Completions on the healthy shards in each second of the window.
    per_second: Vec<u64>,
}

/// One throughput phase: preload, start a node, warm up, apply `fault` to
/// the sick shard's server and measure the healthy shards for `window`.
async fn phase(bed: &Arc<TestBed>, fault: Fault, window: u64) -> anyhow::Result<Phase> {
    let (fleet, accounts) = stage(bed).await?;
    // Enough for one shard alone at the node's full rate, for the whole
    // phase, with margin: no producer ever runs out of work.
    let full_rate = SLOTS as u64 * 1000 / JOB_MS;
    let backlog = (full_rate * (WARM_UP.as_secs() + window + 5)) as usize;
    let job = NewJob::from_json("sleep", serde_json::json!({ "ms": JOB_MS }));
    let working: Vec<usize> = if fault == Fault::None {
        vec![1, 2]
    } else {
        vec![0, 1, 2]
    };
    for &i in &working {
        preload(&fleet, &accounts[i], backlog, &job).await?;
    }
    let node = fleet.node(SLOTS, RuntimeOptions::default())?;
    tokio::time::sleep(WARM_UP).await;
    let warm = completed(&node);
    eprintln!(
        "outage: {}: warm-up completions by shard {:?} ({} s)",
        fault.label(),
        warm,
        WARM_UP.as_secs()
    );
    let start = Instant::now();
    let first = healthy(&node);
    let measured = async {
        on_sick(bed, fault, false).await?;
        let mut per_second = Vec::new();
        let mut last = first;
        for second in 1..=window {
            tokio::time::sleep_until((start + Duration::from_secs(second)).into()).await;
            let now = healthy(&node);
            per_second.push(now - last);
            last = now;
        }
        let rate = (last - first) as f64 / start.elapsed().as_secs_f64();
        let done = completed(&node);
        for i in 1..SHARDS.len() {
            anyhow::ensure!(
                (done[i] as usize) < backlog,
                "outage: {}: {} ran out of work ({} of {backlog} jobs done)",
                fault.label(),
                SHARDS[i],
                done[i]
            );
        }
        Ok(Phase { rate, per_second })
    }
    .await;
    let restored = on_sick(bed, fault, true).await;
    node.shutdown(Duration::from_secs(5)).await;
    let measured = measured?;
    restored?;
    Ok(measured)
}

/// The shutdown phase: jobs held on every shard, shard_1 frozen, then
/// `shutdown(GRACE)` timed; returns how long it took.
async fn shutdown_frozen(bed: &Arc<TestBed>) -> anyhow::Result<Duration> {
    let (fleet, accounts) = stage(bed).await?;
    let held = NewJob::from_json("sleep", serde_json::json!({ "ms": 600_000 }));
    for on in &accounts {
        preload(&fleet, on, HELD_PER_SHARD, &held).await?;
    }
    let node = fleet.node(SLOTS, RuntimeOptions::default())?;
    let want = HELD_PER_SHARD * SHARDS.len();
    let since = Instant::now();
    while node.leased() < want {
        anyhow::ensure!(
            since.elapsed() < Duration::from_secs(30),
            "outage: shutdown: only {} of {want} held jobs started",
            node.leased()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Short jobs in the slots left, so outcomes are being written on every
    // shard when it freezes.
    let job = NewJob::from_json("sleep", serde_json::json!({ "ms": JOB_MS }));
    for on in &accounts {
        preload(&fleet, on, 2_000, &job).await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let timed = async {
        on_sick(bed, Fault::Freeze, false).await?;
        // Let shard_1's outcomes, heartbeats and claims pile up against it.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let start = Instant::now();
        node.shutdown(GRACE).await;
        Ok::<Duration, anyhow::Error>(start.elapsed())
    }
    .await;
    let restored = on_sick(bed, Fault::Freeze, true).await;
    let took = timed?;
    restored?;
    Ok(took)
}

/// Runs the scenario's four phases and adds their figures.
pub(super) async fn outage(bed: &Arc<TestBed>, args: &BenchArgs, results: &mut Results) -> anyhow::Result<()> {
    let window = args.seconds.max(1);
    let mut baseline = None;
    for fault in [Fault::None, Fault::Stop, Fault::Freeze] {
        eprintln!(
            "outage: {}: {SLOTS} slots, {JOB_MS} ms jobs, {window} s window...",
            fault.label()
        );
        let p = phase(bed, fault, window).await?;
        eprintln!(
            "outage: {}: healthy-shard completions per second: {:?}",
            fault.label(),
            p.per_second
        );
        match (fault, baseline) {
            (Fault::None, _) => {
                results.add("outage", "healthy shards, work on 2 of 3 (baseline)", p.rate, "jobs/s");
                baseline = Some(p.rate);
            }
            (_, Some(base)) => {
                let what = if fault == Fault::Stop {
                    "stopped"
                } else {
                    "frozen (SIGSTOP)"
                };
                results.add("outage", &format!("healthy shards, {SICK} {what}"), p.rate, "jobs/s");
                results.add_target(
                    "outage",
                    &format!("{SICK} {what} / baseline"),
                    p.rate / base,
                    "",
                    RATIO_TARGET,
                    true,
                );
            }
            (_, None) => {}
        }
    }
    eprintln!(
        "outage: shutdown with {SICK} frozen and {HELD_PER_SHARD} held jobs per shard, grace {} s...",
        GRACE.as_secs()
    );
    let took = shutdown_frozen(bed).await?;
    results.add_target(
        "outage",
        &format!("shutdown, {SICK} frozen, jobs held, grace {} s", GRACE.as_secs()),
        took.as_secs_f64(),
        "s",
        (GRACE + SHUTDOWN_SLACK).as_secs_f64(),
        false,
    );
    Ok(())
}
