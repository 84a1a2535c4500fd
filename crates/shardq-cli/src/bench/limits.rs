//! Global limits of named resources over 3 nodes and 3 shards: a
//! concurrency limit of 10 over jobs of 100 ms and over jobs of 20 ms (the
//! most running at once, and how much of the 10 is in use while work
//! waits: short jobs show what a freed permit costs before the next job
//! starts) and a rate of 100 starts per second held over 30 s (or
//! `--seconds`, when longer than 10).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardq::{Account, JobContext, JobError, NewJob, Runtime, RuntimeOptions, Worker};
use shardq_testbed::TestBed;

use super::{BenchArgs, BenchFleet, Results};

/// The concurrency limit measured.
const CONCURRENCY: usize = 10;
/// The cases of the concurrency phase: how long each job works, and how
/// many jobs (about 4 s of work at the limit).
const CONCURRENCY_CASES: [(Duration, usize); 2] =
    [(Duration::from_millis(100), 400), (Duration::from_millis(20), 2_000)];
/// The rate measured, starts per second.
const RATE: f64 = 100.0;
/// The seconds of the rate phase unless `--seconds` asks for more than 10.
const RATE_SECONDS: u64 = 30;
/// Nodes, and slots of each (more than the limit, so permits decide).
const NODES: usize = 3;
const SLOTS: usize = 16;

/// Running handlers now and the most seen; start times.
#[derive(Default)]
struct Meter {
    now: AtomicUsize,
    most: AtomicUsize,
    starts: Mutex<Vec<Instant>>,
}

#[derive(Clone)]
struct Metered(Arc<Meter>);

#[derive(serde::Serialize, serde::Deserialize)]
struct Args {
    /// Milliseconds of work.
    ms: u64,
}

impl Worker for Metered {
    type Args = Args;
    const KIND: &'static str = "bench_metered";
    async fn work(&self, _: JobContext, a: Args) -> Result<(), JobError> {
        let m = &self.0;
        if let Ok(mut s) = m.starts.lock() {
            s.push(Instant::now());
        }
        let n = m.now.fetch_add(1, Ordering::SeqCst) + 1;
        m.most.fetch_max(n, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(a.ms)).await;
        m.now.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

/// `per_shard` accounts placed on each shard of the fleet.
async fn accounts(fleet: &BenchFleet, per_shard: usize) -> anyhow::Result<Vec<Account>> {
    let shards = fleet.router.shards().len();
    let mut by_shard: std::collections::BTreeMap<String, Vec<Account>> = Default::default();
    for i in 0..10_000 {
        let a = Account::new(format!("limits-{i}"))?;
        let on = by_shard.entry(fleet.router.shard_for(&a).await?.shard).or_default();
        if on.len() < per_shard {
            on.push(a);
        }
        if by_shard.len() == shards && by_shard.values().all(|v| v.len() == per_shard) {
            return Ok(by_shard.into_values().flatten().collect());
        }
    }
    anyhow::bail!("accounts did not reach every shard")
}

/// Enqueues `n` metered jobs of `ms` using `resource`, over `accounts`.
async fn enqueue(fleet: &BenchFleet, accounts: &[Account], n: usize, ms: u64, resource: &str) -> anyhow::Result<()> {
    let job = NewJob::new(Metered::KIND, &Args { ms })?.resources([resource]);
    for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
        fleet
            .client
            .enqueue_many(
                chunk
                    .iter()
                    .map(|i| (accounts[i % accounts.len()].clone(), job.clone())),
            )
            .await?;
    }
    Ok(())
}

fn nodes(fleet: &BenchFleet, meter: &Arc<Meter>) -> anyhow::Result<Vec<Runtime>> {
    let options = RuntimeOptions {
        heartbeat_interval: Duration::from_secs(1),
        lease: Duration::from_secs(5),
        ..RuntimeOptions::default()
    };
    (0..NODES)
        .map(|_| {
            Ok(Runtime::builder(fleet.router.clone())
                .queue(shardq::job::DEFAULT_QUEUE, SLOTS)
                .register(Metered(meter.clone()))
                .options(options.clone())
                .start()?)
        })
        .collect()
}

/// Waits until `meter` counted `n` starts and nothing runs, sampling the
/// running handlers every 2 ms while fewer than `n - limit` had started
/// (work waited); returns the mean of the samples.
async fn run_out(meter: &Meter, n: usize, limit: usize) -> anyhow::Result<f64> {
    let until = Instant::now() + Duration::from_secs(600);
    let (mut sum, mut samples) = (0usize, 0usize);
    loop {
        let started = meter.starts.lock().map(|s| s.len()).unwrap_or(0);
        let now = meter.now.load(Ordering::SeqCst);
        if started >= n && now == 0 {
            break;
        }
        if started > 0 && started + limit < n {
            sum += now;
            samples += 1;
        }
        anyhow::ensure!(Instant::now() < until, "stalled at {started} of {n} starts");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(if samples == 0 { 0.0 } else { sum as f64 / samples as f64 })
}

/// One case of the concurrency phase: `jobs` jobs of `work` using a
/// resource of concurrency [`CONCURRENCY`] of its own.
async fn concurrency_case(
    fleet: &BenchFleet,
    accounts: &[Account],
    work: Duration,
    jobs: usize,
    results: &mut Results,
) -> anyhow::Result<()> {
    let ms = work.as_millis() as u64;
    let resource = format!("bench_concurrency_{ms}");
    eprintln!("limits: concurrency {CONCURRENCY} over {NODES} nodes x 3 shards, {jobs} jobs of {work:?}...");
    enqueue(fleet, accounts, jobs, ms, &resource).await?;
    fleet
        .client
        .set_resource(&resource, Some(CONCURRENCY as u32), None, None)
        .await?;
    let meter = Arc::new(Meter::default());
    let running = nodes(fleet, &meter)?;
    let busy = run_out(&meter, jobs, CONCURRENCY).await?;
    for n in running {
        n.shutdown(Duration::from_secs(5)).await;
    }
    let most = meter.most.load(Ordering::SeqCst) as f64;
    results.add_target(
        "limits",
        &format!("concurrency 10, {ms} ms jobs: most running at once"),
        most,
        "jobs",
        CONCURRENCY as f64,
        false,
    );
    results.add_target(
        "limits",
        &format!("concurrency 10, {ms} ms jobs: utilisation while work waits"),
        busy / CONCURRENCY as f64,
        "",
        0.9,
        true,
    );
    Ok(())
}

/// The limits scenario.
pub(super) async fn limits(bed: &TestBed, args: &BenchArgs, results: &mut Results) -> anyhow::Result<()> {
    let dbs = bed.fresh_fleet().await?;
    let shards: Vec<(String, &shardq_testbed::FleetDb)> = dbs
        .shards
        .iter()
        .take(3)
        .enumerate()
        .map(|(i, db)| (format!("shard_{}", i + 1), db))
        .collect();
    let named: Vec<(&str, &shardq_testbed::FleetDb)> = shards.iter().map(|(n, db)| (n.as_str(), *db)).collect();
    let fleet = BenchFleet::new(&dbs.master, &named, 20).await?;
    let accounts = accounts(&fleet, 10).await?;

    for (work, jobs) in CONCURRENCY_CASES {
        concurrency_case(&fleet, &accounts, work, jobs, results).await?;
    }

    let seconds = if args.seconds > 10 { args.seconds } else { RATE_SECONDS };
    let n = (RATE as u64 * (seconds + 5)) as usize;
    eprintln!("limits: rate {RATE}/s over {NODES} nodes x 3 shards for {seconds} s ({n} jobs)...");
    enqueue(&fleet, &accounts, n, 0, "bench_rate").await?;
    fleet
        .client
        .set_resource("bench_rate", None, Some(RATE), Some(10))
        .await?;
    let meter = Arc::new(Meter::default());
    let running = nodes(&fleet, &meter)?;
    // Measured from the first start, over `seconds`, while work waits.
    let until = Instant::now() + Duration::from_secs(seconds + 120);
    let first = loop {
        if let Some(t) = meter.starts.lock().ok().and_then(|s| s.first().copied()) {
            break t;
        }
        anyhow::ensure!(Instant::now() < until, "no job of the rate phase started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    tokio::time::sleep_until((first + Duration::from_secs(seconds) + Duration::from_millis(100)).into()).await;
    let window = Duration::from_secs(seconds);
    let started = meter
        .starts
        .lock()
        .map(|s| s.iter().filter(|t| **t >= first && **t < first + window).count())
        .unwrap_or(0);
    for n in running {
        n.shutdown(Duration::from_secs(5)).await;
    }
    let rate = started as f64 / seconds as f64;
    results.add(
        "limits",
        &format!("rate {RATE}/s: starts per second over {seconds} s"),
        rate,
        "jobs/s",
    );
    results.add_target(
        "limits",
        &format!("rate {RATE}/s: deviation from the rate"),
        (rate / RATE - 1.0).abs(),
        "",
        0.05,
        false,
    );
    Ok(())
}
