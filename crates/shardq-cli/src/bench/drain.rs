//! Drain (enqueue rate, drain rate), the bare-SQL floor, and drain across 1, 2
//! and 4 shards.

use std::time::{Duration, Instant};

use nix::sys::resource::{getrusage, UsageWho};
use shardq::{Account, NewJob, RuntimeOptions};
use shardq_testbed::{Server, TestBed};

use super::{BenchArgs, BenchFleet, Results};
use crate::store;

/// Rows per statement when filling tables directly.
const CHUNK: usize = 10_000;
/// Jobs per `enqueue_many` call, and rows per `UNNEST` insert of the enqueue floor.
const ENQUEUE_BATCH: usize = 1_000;
/// Batches in a row of one side when `enqueue_many` and the floor alternate
/// (reading the server's CPU clock walks `/proc`, so not after every batch).
const ALTERNATE_BATCHES: usize = 5;
/// Rows the floor claims per statement.
const FLOOR_BATCH: i64 = 100;
/// Concurrent claim-and-complete loops of the floor.
const FLOOR_LOOPS: usize = 2;

/// The args of the benchmark's no-op jobs; the floor inserts the same
/// args, as JSON text per row.
fn noop_args() -> serde_json::Value {
    serde_json::json!({})
}

/// Enqueues `n` no-op jobs spread over `accounts` in batches; returns jobs/s.
pub(super) async fn preload(fleet: &BenchFleet, n: usize, accounts: &[Account], batch: usize) -> anyhow::Result<f64> {
    let job = NewJob::from_json("noop", noop_args());
    let started = Instant::now();
    let mut left = n;
    let mut i = 0;
    while left > 0 {
        let take = left.min(batch);
        let jobs = (0..take).map(|k| (accounts[(i + k) % accounts.len()].clone(), job.clone()));
        fleet.client.enqueue_many(jobs).await?;
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

/// Scenario 1 (drain) and 2 (SQL floor) on one shard's server, with the
/// CPU each used per 1,000 jobs.
pub(super) async fn drain_and_floor(
    bed: &TestBed,
    args: &BenchArgs,
    results: &mut Results,
    drain_it: bool,
    floor_it: bool,
) -> anyhow::Result<()> {
    let n = args.drain_jobs();
    let server = &bed.shards()[0];
    let accounts = accounts_on(1000);
    if drain_it {
        eprintln!("drain: enqueueing {n} jobs on one shard, {ENQUEUE_BATCH} per call...");
        let dbs = bed.fresh_fleet().await?;
        let fleet = BenchFleet::new(&dbs.master, &[("shard_1", &dbs.shards[0])], 20).await?;
        let shard_pool = fleet.router.shards()[0].pool.clone();
        if args.statements {
            store::statements_reset(&shard_pool).await?;
        }
        let cpu = CpuClock::start(server)?;
        let enqueue = preload(&fleet, n, &accounts, ENQUEUE_BATCH).await?;
        let (server_ms, node_ms) = cpu.per_thousand(server, n)?;
        if args.statements {
            print_statements("enqueue", &shard_pool, n).await?;
        }
        results.add("drain", "enqueue (enqueue_many, 1,000 per call)", enqueue, "jobs/s");
        results.add("drain", "enqueue: server CPU per 1,000 jobs", server_ms, "ms");
        results.add("drain", "enqueue: node CPU per 1,000 jobs", node_ms, "ms");
        eprintln!("drain: working {n} jobs with {} slots...", args.concurrency);
        if args.statements {
            store::statements_reset(&shard_pool).await?;
        }
        let cpu = CpuClock::start(server)?;
        let (rate, _) = drain(&fleet, n, args.concurrency).await?;
        let (server_ms, node_ms) = cpu.per_thousand(server, n)?;
        if args.statements {
            print_statements("drain", &shard_pool, n).await?;
        }
        results.add("drain", "drain, one shard", rate, "jobs/s");
        results.add("drain", "server CPU per 1,000 jobs", server_ms, "ms");
        results.add("drain", "node CPU per 1,000 jobs", node_ms, "ms");
        if let Some(backlog) = args.backlog {
            let backlog = backlog.max(n);
            eprintln!("drain: loading a backlog of {backlog} jobs (UNNEST inserts of {CHUNK})...");
            let dbs = bed.fresh_fleet().await?;
            let fleet = BenchFleet::new(&dbs.master, &[("shard_1", &dbs.shards[0])], 20).await?;
            let pool = fleet.router.shards()[0].pool.clone();
            let names: Vec<&str> = accounts.iter().map(|a| a.as_str()).collect();
            let rows: Vec<&str> = names.iter().cycle().take(CHUNK).copied().collect();
            let noop = noop_args().to_string();
            let noop_args = vec![noop.as_str(); CHUNK];
            let mut left = backlog;
            while left > 0 {
                let take = left.min(CHUNK);
                store::floor_enqueue(&pool, &rows[..take], &noop_args[..take]).await?;
                left -= take;
            }
            store::jobs_analyze(&pool).await?;
            eprintln!("drain: working {n} of the {backlog} jobs...");
            if args.statements {
                store::statements_reset(&pool).await?;
            }
            let cpu = CpuClock::start(server)?;
            let (big, _) = drain(&fleet, n, args.concurrency).await?;
            let (server_ms, node_ms) = cpu.per_thousand(server, n)?;
            if args.statements {
                print_statements(&format!("drain, {backlog} backlog"), &pool, n).await?;
            }
            results.add("drain", &format!("drain, {backlog} backlog"), big, "jobs/s");
            results.add("drain", "server CPU per 1,000 jobs, backlog", server_ms, "ms");
            results.add("drain", "node CPU per 1,000 jobs, backlog", node_ms, "ms");
            results.add_target(
                "drain",
                &format!("drain with {backlog} backlog / with {n}"),
                big / rate,
                "",
                0.8,
                true,
            );
        }
    }
    if floor_it {
        eprintln!(
            "floor: {n} jobs enqueued by UNNEST inserts of {ENQUEUE_BATCH} rows (accounts and args per row, no ids back, no wake-up)..."
        );
        let dbs = bed.fresh_fleet().await?;
        let fleet = BenchFleet::new(&dbs.master, &[("shard_1", &dbs.shards[0])], 20).await?;
        let pool = fleet.router.shards()[0].pool.clone();
        let names: Vec<&str> = accounts.iter().map(|a| a.as_str()).collect();
        let rows: Vec<&str> = names.iter().cycle().take(ENQUEUE_BATCH).copied().collect();
        let noop = noop_args().to_string();
        let noop_args = vec![noop.as_str(); ENQUEUE_BATCH];
        if args.statements {
            store::statements_reset(&pool).await?;
        }
        let cpu = CpuClock::start(server)?;
        let started = Instant::now();
        let mut left = n;
        while left > 0 {
            let take = left.min(ENQUEUE_BATCH);
            store::floor_enqueue(&pool, &rows[..take], &noop_args[..take]).await?;
            left -= take;
        }
        let enqueue_floor = n as f64 / started.elapsed().as_secs_f64();
        let (server_ms, client_ms) = cpu.per_thousand(server, n)?;
        if args.statements {
            print_statements("enqueue floor", &pool, n).await?;
        }
        results.add(
            "floor",
            "enqueue, one UNNEST insert (accounts, args) per 1,000 rows",
            enqueue_floor,
            "jobs/s",
        );
        results.add("floor", "enqueue: server CPU per 1,000 jobs", server_ms, "ms");
        results.add("floor", "enqueue: client CPU per 1,000 jobs", client_ms, "ms");
        eprintln!("floor: {n} jobs by enqueue_many and {n} by the floor's insert, alternating in turns of {ALTERNATE_BATCHES} batches...");
        if args.statements {
            store::statements_reset(&pool).await?;
        }
        let [shardq, floor] = enqueue_alternating(&fleet, server, &accounts, n).await?;
        if args.statements {
            print_statements("enqueue_many and floor, alternating", &pool, 2 * n).await?;
        }
        for (who, cost) in [("enqueue_many", &shardq), ("floor", &floor)] {
            let label = |what: &str| format!("alternating: {who}, {what}");
            results.add("floor", &label("jobs/s"), cost.rate(n), "jobs/s");
            results.add("floor", &label("server CPU per 1,000 jobs"), cost.server_ms(n), "ms");
            results.add("floor", &label("client CPU per 1,000 jobs"), cost.node_ms(n), "ms");
        }
        results.add_target(
            "floor",
            "shardq enqueue / floor (alternating)",
            shardq.rate(n) / floor.rate(n),
            "",
            1.0,
            true,
        );

        eprintln!("floor: the bare lifecycle on its own table...");
        store::floor_create(&pool).await?;
        let mut left = n as i64;
        while left > 0 {
            let take = left.min(CHUNK as i64);
            store::floor_fill(&pool, take).await?;
            left -= take;
        }
        if args.statements {
            store::statements_reset(&pool).await?;
        }
        let cpu = CpuClock::start(server)?;
        let started = Instant::now();
        let loops = (0..FLOOR_LOOPS).map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut done = 0u64;
                loop {
                    let ids = store::floor_claim(&pool, FLOOR_BATCH).await?;
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
        let (server_ms, node_ms) = cpu.per_thousand(server, total as usize)?;
        if args.statements {
            print_statements("floor", &pool, total as usize).await?;
        }
        results.add(
            "floor",
            &format!("bare lifecycle, claim {FLOOR_BATCH}, {FLOOR_LOOPS} loops"),
            floor,
            "jobs/s",
        );
        results.add("floor", "server CPU per 1,000 jobs", server_ms, "ms");
        results.add("floor", "client CPU per 1,000 jobs", node_ms, "ms");
        if let Some(drain) = results.value("drain", "drain, one shard") {
            results.add_target("floor", "shardq drain / floor", drain / floor, "", 0.9, true);
        }
    }
    Ok(())
}

/// Time and CPU spent on one side of [`enqueue_alternating`].
#[derive(Default)]
struct EnqueueCost {
    /// Wall time inside its batches.
    elapsed: Duration,
    /// The server's CPU time across its batches.
    server: Duration,
    /// This process's CPU time across its batches.
    node: Duration,
}

impl EnqueueCost {
    fn rate(&self, jobs: usize) -> f64 {
        jobs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    fn server_ms(&self, jobs: usize) -> f64 {
        self.server.as_secs_f64() * 1e6 / jobs.max(1) as f64
    }
    fn node_ms(&self, jobs: usize) -> f64 {
        self.node.as_secs_f64() * 1e6 / jobs.max(1) as f64
    }
}

/// Enqueues `n` no-op jobs through `enqueue_many` and `n` through the
/// floor's `UNNEST` insert (the same rows: accounts and args), in
/// batches of [`ENQUEUE_BATCH`], the two sides taking turns of
/// [`ALTERNATE_BATCHES`] batches (each round starts with the other side),
/// on the first shard of `fleet`: both see the same table size and the
/// same load of this shared machine. Returns the cost of each side,
/// `enqueue_many` first; CPU is read between turns.
async fn enqueue_alternating(
    fleet: &BenchFleet,
    server: &Server,
    accounts: &[Account],
    n: usize,
) -> anyhow::Result<[EnqueueCost; 2]> {
    let pool = fleet.router.shards()[0].pool.clone();
    let job = NewJob::from_json("noop", noop_args());
    let noop = noop_args().to_string();
    let names: Vec<&str> = accounts.iter().map(|a| a.as_str()).collect();
    // Untimed: the accounts placed and cached, both statements prepared.
    let warm = ENQUEUE_BATCH.min(accounts.len());
    fleet
        .client
        .enqueue_many(accounts.iter().map(|a| (a.clone(), job.clone())))
        .await?;
    store::floor_enqueue(&pool, &names[..warm], &vec![noop.as_str(); warm]).await?;
    let mut costs = [EnqueueCost::default(), EnqueueCost::default()];
    let mut done = 0;
    let mut round = 0;
    while done < n {
        let take = (n - done).min(ENQUEUE_BATCH * ALTERNATE_BATCHES);
        for side in [round % 2, 1 - round % 2] {
            // Each clock read outside the other's span: reading the
            // server's clock costs this process CPU.
            let server_before = server.cpu_time()?;
            let node_before = own_cpu_time()?;
            let started = Instant::now();
            for from in (done..done + take).step_by(ENQUEUE_BATCH) {
                let to = (from + ENQUEUE_BATCH).min(done + take);
                if side == 0 {
                    // Borrowed, as the floor's rows are: the application's
                    // jobs are handed over, not copied.
                    let jobs = (from..to).map(|i| (&accounts[i % accounts.len()], &job));
                    fleet.client.enqueue_many(jobs).await?;
                } else {
                    let rows: Vec<&str> = (from..to).map(|i| names[i % names.len()]).collect();
                    store::floor_enqueue(&pool, &rows, &vec![noop.as_str(); to - from]).await?;
                }
            }
            let elapsed = started.elapsed();
            let node_after = own_cpu_time()?;
            let cost = &mut costs[side];
            cost.elapsed += elapsed;
            cost.node += node_after.saturating_sub(node_before);
            cost.server += server.cpu_time()?.saturating_sub(server_before);
        }
        done += take;
        round += 1;
    }
    Ok(costs)
}

/// Prints the statements with the most execution time since the last
/// reset, per call and per 1,000 of `jobs` (the `--statements` profile).
pub(super) async fn print_statements(scenario: &str, pool: &sqlx::PgPool, jobs: usize) -> anyhow::Result<()> {
    let per = jobs.max(1) as f64 / 1000.0;
    eprintln!("{scenario}: statements by execution time (pg_stat_statements), {jobs} jobs");
    eprintln!(
        "  calls | rows/call | mean ms | exec ms per 1,000 jobs | plans | mean plan ms | blks/call | WAL B/call | statement"
    );
    for s in store::statements_top(pool, 12).await? {
        eprintln!(
            "  {} | {:.1} | {:.3} | {:.2} | {} | {:.3} | {:.0} | {:.0} | {}",
            s.calls,
            s.rows as f64 / s.calls.max(1) as f64,
            s.mean_ms,
            s.total_ms / per,
            s.plans,
            s.mean_plan_ms,
            s.blks_per_call,
            s.wal_per_call,
            s.query
        );
    }
    Ok(())
}

/// CPU time of one server and of this process, from a starting point.
struct CpuClock {
    server: Duration,
    node: Duration,
}

impl CpuClock {
    fn start(server: &Server) -> anyhow::Result<CpuClock> {
        Ok(CpuClock {
            server: server.cpu_time()?,
            node: own_cpu_time()?,
        })
    }

    /// Milliseconds of server and of node CPU used since the start, per 1,000 of `jobs`.
    fn per_thousand(&self, server: &Server, jobs: usize) -> anyhow::Result<(f64, f64)> {
        let per = |d: Duration| d.as_secs_f64() * 1000.0 / (jobs.max(1) as f64 / 1000.0);
        Ok((
            per(server.cpu_time()?.saturating_sub(self.server)),
            per(own_cpu_time()?.saturating_sub(self.node)),
        ))
    }
}

/// CPU time (user + system) this process used so far.
fn own_cpu_time() -> anyhow::Result<Duration> {
    let usage = getrusage(UsageWho::RUSAGE_SELF)?;
    let time = |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    Ok(time(usage.user_time()) + time(usage.system_time()))
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
        preload(&fleet, args.shard_jobs, &accounts_on(1000), CHUNK).await?;
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
