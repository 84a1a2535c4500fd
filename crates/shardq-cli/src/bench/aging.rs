//! Priority aging under load above capacity: 20 priority-4 jobs enqueued
//! first, then priority-1 jobs at twice what the node can run for
//! `--seconds`, once with `priority_aging` at 2 s (the default, 5 min, is
//! too long for a run) and once with it off. Each priority-4 job's wait,
//! from its enqueue to its completion, against the bound the README
//! states: the aging plus a second.

use std::time::{Duration, Instant};

use shardq::{Account, NewJob, RuntimeOptions};
use shardq_testbed::TestBed;

use super::{BenchArgs, BenchFleet, Results};
use crate::store;

/// Slots of the node.
const SLOTS: usize = 16;
/// How long each job runs.
const JOB_MS: u64 = 5;
/// The priority-4 jobs enqueued before the load.
const LOW_JOBS: usize = 20;
/// Their priority, and the load's.
const LOW: i16 = 4;
const HIGH: i16 = 1;
/// The aging of the run with it on.
const AGING: Duration = Duration::from_secs(2);
/// What the README bounds an aged job's wait by, beyond the aging: the
/// claim that takes it and the jobs already buffered ahead of it take a
/// few milliseconds; the rest is margin for a loaded machine.
const BEYOND_AGING: Duration = Duration::from_secs(1);
/// The load is enqueued every `TICK`, `PER_TICK` jobs at a time: twice
/// what `SLOTS` slots of `JOB_MS` jobs run.
const TICK: Duration = Duration::from_millis(10);
const PER_TICK: usize = 2 * SLOTS * 10 / JOB_MS as usize;

/// What one run measured.
struct Run {
    /// Priority-4 jobs completed while the load ran.
    completed: usize,
    /// The longest wait of those, in seconds.
    longest: Option<f64>,
}

/// One run on a fresh fleet, aging `aging`.
async fn run_once(bed: &TestBed, seconds: u64, aging: Option<Duration>) -> anyhow::Result<Run> {
    let dbs = bed.fresh_fleet().await?;
    let fleet = BenchFleet::new(&dbs.master, &[("shard_1", &dbs.shards[0])], 20).await?;
    let account = Account::new("aging")?;
    fleet.router.shard_for(&account).await?;
    let job = |priority| NewJob::from_json("sleep", serde_json::json!({ "ms": JOB_MS })).priority(priority);
    fleet
        .client
        .enqueue_many((0..LOW_JOBS).map(|_| (account.clone(), job(LOW))))
        .await?;
    let options = RuntimeOptions {
        priority_aging: aging,
        ..RuntimeOptions::default()
    };
    let node = fleet.node(SLOTS, options)?;
    let mut tick = tokio::time::interval(TICK);
    let until = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < until {
        tick.tick().await;
        fleet
            .client
            .enqueue_many((0..PER_TICK).map(|_| (account.clone(), job(HIGH))))
            .await?;
    }
    node.shutdown(Duration::from_secs(5)).await;
    let (completed, longest) = store::priority_waits(&fleet.router.shards()[0].pool, LOW).await?;
    Ok(Run {
        completed: completed as usize,
        longest,
    })
}

/// The aging runs of the fairness scenario.
pub(super) async fn aging(bed: &TestBed, args: &BenchArgs, results: &mut Results) -> anyhow::Result<()> {
    // The load must outlast the bound, or a miss would read as starvation.
    let seconds = args.seconds.max((AGING + BEYOND_AGING).as_secs() + 2);
    let capacity = SLOTS as u64 * 1_000 / JOB_MS;
    eprintln!(
        "fairness: {LOW_JOBS} priority-{LOW} jobs, then priority-{HIGH} load at {} jobs/s \
         ({SLOTS} slots of {JOB_MS} ms jobs run {capacity}/s) for {seconds} s, aging {} s...",
        PER_TICK as u64 * 1_000 / TICK.as_millis() as u64,
        AGING.as_secs()
    );
    let on = run_once(bed, seconds, Some(AGING)).await?;
    eprintln!("fairness: the same with priority aging off...");
    let off = run_once(bed, seconds, None).await?;
    let aging_s = AGING.as_secs();
    results.add(
        "fairness",
        &format!(
            "priority aging {aging_s} s: priority-{LOW} jobs enqueued first, completed under the load (of {LOW_JOBS})"
        ),
        on.completed as f64,
        "",
    );
    // A job that never ran waited the whole load at least.
    let longest = if on.completed == LOW_JOBS {
        on.longest.unwrap_or_default()
    } else {
        seconds as f64
    };
    results.add_target(
        "fairness",
        &format!("priority aging {aging_s} s: longest wait of those, enqueue to completion"),
        longest,
        "s",
        (AGING + BEYOND_AGING).as_secs_f64(),
        false,
    );
    results.add(
        "fairness",
        &format!("priority aging off: priority-{LOW} jobs completed under the load (of {LOW_JOBS})"),
        off.completed as f64,
        "",
    );
    Ok(())
}
