//! Fair share across accounts: one account's large backlog on a shard
//! while 100 other accounts each enqueue 10 jobs/s there. The small
//! accounts' p99 pickup with the backlog against without it, the big
//! account's share of the claims meanwhile, and the drain throughput with
//! fair share on against the queue opted out (strict order), counted while
//! jobs waited for the node (not while it waited for the load). Then
//! priority aging under priority-1 load above capacity (`aging`).

use std::time::{Duration, Instant};

use shardq::{Account, NewJob, RuntimeOptions};
use shardq_testbed::TestBed;

use super::drain::{preload, print_statements};
use super::{BenchArgs, BenchFleet, Results};
use crate::store;

/// Accounts enqueueing at a steady rate beside the backlog.
const SMALL_ACCOUNTS: usize = 100;
/// Jobs per second of each small account.
const SMALL_RATE: u64 = 10;
/// The backlog when `--jobs` is not given.
const DEFAULT_BACKLOG: usize = 100_000;
/// Slots of the node.
const SLOTS: usize = 64;

/// What one run measured.
struct Run {
    small_p99_ms: f64,
    big_share: f64,
    jobs_per_sec: f64,
}

/// The drain rate while work waited: jobs completed by the last sample at
/// which more than two claims' worth of jobs (`2 × SLOTS`) were still to
/// run, over the time to that sample. After that the rate is the load's
/// (or the tail's), not the node's.
#[derive(Default)]
struct Busy {
    at: Duration,
    done: usize,
}

impl Busy {
    /// Records a sample: `done` of `handed_in` jobs completed at `started.elapsed()`.
    fn sample(&mut self, started: Instant, done: usize, handed_in: usize) {
        if handed_in.saturating_sub(done) > 2 * SLOTS {
            self.at = started.elapsed();
            self.done = done;
        }
    }

    /// Jobs per second while work waited (0 when it never did).
    fn jobs_per_sec(&self) -> f64 {
        if self.at.is_zero() {
            return 0.0;
        }
        self.done as f64 / self.at.as_secs_f64()
    }
}

/// Jobs the node completed so far.
fn completed(node: &shardq::Runtime) -> usize {
    node.counts().iter().map(|s| s.completed as usize).sum()
}

/// One run on a fresh fleet: `backlog` jobs of the big account enqueued
/// first, then the small accounts' steady load for `seconds`, worked by
/// one node (fair share on unless `fifo`) until every job ran.
async fn run_once(bed: &TestBed, args: &BenchArgs, backlog: usize, fifo: bool) -> anyhow::Result<Run> {
    let seconds = args.seconds;
    let dbs = bed.fresh_fleet().await?;
    let fleet = BenchFleet::new(&dbs.master, &[("shard_1", &dbs.shards[0])], 20).await?;
    let big = Account::new("big")?;
    let small: Vec<Account> = (0..SMALL_ACCOUNTS)
        .map(|i| Account::new(format!("small-{i:03}")))
        .collect::<Result<_, _>>()?;
    fleet.router.shard_for(&big).await?;
    for a in &small {
        fleet.router.shard_for(a).await?;
    }
    if backlog > 0 {
        preload(&fleet, backlog, std::slice::from_ref(&big), 1_000).await?;
    }
    let options = RuntimeOptions {
        strict_queues: if fifo {
            vec![shardq::job::DEFAULT_QUEUE.to_string()]
        } else {
            Vec::new()
        },
        ..RuntimeOptions::default()
    };
    let shard_pool = fleet.router.shards()[0].pool.clone();
    if args.statements {
        store::statements_reset(&shard_pool).await?;
    }
    let node = fleet.node(SLOTS, options)?;
    let started = Instant::now();
    let mut busy = Busy::default();
    // Every 1/SMALL_RATE s, one job for each small account.
    let mut tick = tokio::time::interval(Duration::from_millis(1_000 / SMALL_RATE));
    let until = Instant::now() + Duration::from_secs(seconds);
    let job = NewJob::from_json("noop", serde_json::json!({}));
    let mut enqueued = 0usize;
    while Instant::now() < until {
        tick.tick().await;
        busy.sample(started, completed(&node), backlog + enqueued);
        fleet
            .client
            .enqueue_many(small.iter().map(|a| (a.clone(), job.clone())))
            .await?;
        enqueued += small.len();
    }
    let total = backlog + enqueued;
    loop {
        let done = completed(&node);
        busy.sample(started, done, total);
        if done >= total {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "stalled at {done} of {total}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let jobs_per_sec = busy.jobs_per_sec();
    node.shutdown(Duration::from_secs(5)).await;
    if args.statements {
        let name = match (backlog, fifo) {
            (0, _) => "fairness, no backlog",
            (_, false) => "fairness, fair",
            (_, true) => "fairness, strict order",
        };
        print_statements(name, &shard_pool, total).await?;
    }
    let (p99, share) = store::fairness_figures(&fleet.router.shards()[0].pool, big.as_str()).await?;
    Ok(Run {
        small_p99_ms: p99.unwrap_or_default(),
        big_share: share.unwrap_or_default(),
        jobs_per_sec,
    })
}

/// The fairness scenario.
pub(super) async fn fairness(bed: &TestBed, args: &BenchArgs, results: &mut Results) -> anyhow::Result<()> {
    let backlog = args.jobs.unwrap_or(DEFAULT_BACKLOG);
    let seconds = args.seconds;
    eprintln!("fairness: {SMALL_ACCOUNTS} accounts at {SMALL_RATE} jobs/s each for {seconds} s, no backlog...");
    let alone = run_once(bed, args, 0, false).await?;
    eprintln!("fairness: the same beside a backlog of {backlog}, fair share on...");
    let fair = run_once(bed, args, backlog, false).await?;
    eprintln!("fairness: the same, the queue opted out (strict order)...");
    let fifo = run_once(bed, args, backlog, true).await?;
    results.add(
        "fairness",
        "small accounts' p99 pickup, no backlog",
        alone.small_p99_ms,
        "ms",
    );
    results.add(
        "fairness",
        &format!("small accounts' p99 pickup, backlog of {backlog}, fair"),
        fair.small_p99_ms,
        "ms",
    );
    results.add(
        "fairness",
        &format!("small accounts' p99 pickup, backlog of {backlog}, strict order"),
        fifo.small_p99_ms,
        "ms",
    );
    results.add_target(
        "fairness",
        "p99 with backlog (fair) / without",
        fair.small_p99_ms / alone.small_p99_ms.max(0.001),
        "",
        2.0,
        false,
    );
    results.add(
        "fairness",
        "big account's share of claims under load, fair",
        fair.big_share,
        "",
    );
    results.add(
        "fairness",
        "big account's share of claims under load, strict order",
        fifo.big_share,
        "",
    );
    results.add("fairness", "drain, fair", fair.jobs_per_sec, "jobs/s");
    results.add("fairness", "drain, strict order", fifo.jobs_per_sec, "jobs/s");
    results.add_target(
        "fairness",
        "drain fair / strict order",
        fair.jobs_per_sec / fifo.jobs_per_sec.max(0.001),
        "",
        0.9,
        true,
    );
    super::aging::aging(bed, args, results).await
}
