//! `shardq bench`: throughput, pickup latency, shard scaling, notification
//! isolation, throughput with a sick shard and the jobs table's storage
//! after many jobs, on test-bed servers the command starts itself (free
//! ports, torn down after), durable (fsync, synchronous_commit and
//! full_page_writes on) unless `--fast`. Speed is measured here, never in
//! tests; throughput is reported next to a floor measured in the same run
//! (the bare lifecycle in SQL on its own minimal table), with the CPU both
//! used per 1,000 jobs.
//!
//! Layout: this file parses the arguments, starts the servers, runs the
//! scenarios and prints; `drain` (drain, SQL floor, shards), `latency`
//! (pickup latency, notification isolation), `outage` (a shard stopped
//! or frozen, shutdown with a frozen shard) and `storage` (table and index
//! sizes, dead rows, HOT updates) and `notify` (concurrent single-row
//! enqueues with and without the NOTIFY trigger), `fleet` (ownership
//! across nodes: moves, connections, takeover after a SIGKILL) and
//! `fairness` (one account's backlog beside 100 small accounts, fair share
//! on and off) with `aging` (priority-4 jobs under priority-1 load above
//! capacity, priority aging on and off), `steady` (table and index sizes
//! over a long steady load with pruning) and `limits` (a resource's concurrency and rate over 3
//! nodes and 3 shards) hold the scenarios.

mod aging;
mod drain;
mod fairness;
mod fleet;
mod latency;
mod limits;
mod moves;
mod notify;
mod outage;
mod steady;
mod storage;

use std::process::ExitCode;
use std::sync::Arc;

use serde::Serialize;
use shardq::{Client, Runtime, RuntimeOptions};
use shardq_router::{Config, Migrator, Router};
use shardq_testbed::{FleetDb, TestBed};

use crate::{kinds, store};

/// Every scenario, in the order they run.
const SCENARIOS: [&str; 13] = [
    "drain",
    "floor",
    "latency",
    "notify",
    "shards",
    "isolation",
    "outage",
    "storage",
    "move",
    "fleet",
    "fairness",
    "steady",
    "limits",
];
/// Jobs of the drain and floor scenarios when `--jobs` is not given.
const DEFAULT_DRAIN_JOBS: usize = 200_000;

/// Arguments of `bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Scenarios to run (comma-separated): drain, floor, latency, notify, shards, isolation, outage,
    /// storage, move (an account moved while it is written to; not run by default),
    /// fleet (nodes dividing 32 shards: ownership moves, connections, takeover
    /// after a SIGKILL; not run by default), fairness (one account's backlog of
    /// `--jobs`, default 100,000, beside 100 small accounts, and priority-4 jobs
    /// under priority-1 load above capacity, aging on and off; not run by default),
    /// steady (`--rate` jobs/s for `--steady-seconds` with pruning: table and
    /// index sizes and dead rows over time; not run by default),
    /// limits (a resource's concurrency 10 with 100 ms and 20 ms jobs, and
    /// rate 100/s, over 3 nodes and 3 shards, the rate over 30 s or
    /// `--seconds` above 10; not run by default).
    #[arg(
        long,
        default_value = "drain,floor,latency,notify,shards,isolation,outage,storage",
        value_delimiter = ','
    )]
    scenarios: Vec<String>,
    /// Jobs preloaded for the drain and floor scenarios (default 200,000)
    /// and run through the table by the storage scenario (default 1,000,000).
    #[arg(long)]
    jobs: Option<usize>,
    /// Jobs per shard-count step of the shards scenario.
    #[arg(long, default_value_t = 100_000)]
    shard_jobs: usize,
    /// The node's concurrency (slots) for the drain scenarios; also the floor's batch size.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Steady enqueue rate of the latency scenario, jobs/s.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Seconds of steady load in the latency scenario (measured after 1 s
    /// of warm-up, which is reported on its own) and the isolation scenario; also
    /// the measured window of each outage phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Run the servers with fsync and full_page_writes off (faster, not
    /// what production runs); by default they are durable.
    #[arg(long)]
    fast: bool,
    /// Length of the steady scenario, seconds (default 30 minutes).
    #[arg(long, default_value_t = 1800)]
    steady_seconds: u64,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Runs of the latency scenario's notify case; each run with a job
    /// picked up later than half the poll interval (it waited for the poll,
    /// not a wake-up) or not finished counts as a stall.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Also drain `--jobs` jobs off a shard holding this many (e.g.
    /// 5000000), against the drain of `--jobs` alone, in the same run.
    #[arg(long)]
    backlog: Option<usize>,
    /// Profile the drain (also off `--backlog`), floor and fairness runs with `pg_stat_statements`
    /// on the first shard's server (restarted to load it): the top
    /// statements are printed to stderr after each.
    #[arg(long)]
    statements: bool,
}

impl BenchArgs {
    /// Jobs of the drain and floor scenarios.
    fn drain_jobs(&self) -> usize {
        self.jobs.unwrap_or(DEFAULT_DRAIN_JOBS)
    }
}

/// One measured figure, with its target when it has one.
#[derive(Serialize)]
pub struct Figure {
    scenario: String,
    metric: String,
    value: f64,
    unit: &'static str,
    target: Option<String>,
    met: Option<bool>,
}

/// Collects figures as scenarios produce them.
#[derive(Default, Serialize)]
pub struct Results {
    machine: Machine,
    figures: Vec<Figure>,
}

impl Results {
    fn add(&mut self, scenario: &str, metric: &str, value: f64, unit: &'static str) {
        self.figures.push(Figure {
            scenario: scenario.into(),
            metric: metric.into(),
            value,
            unit,
            target: None,
            met: None,
        });
    }

    /// Adds a figure with a target: `at_least` true means higher is better.
    fn add_target(&mut self, scenario: &str, metric: &str, value: f64, unit: &'static str, bound: f64, at_least: bool) {
        let met = if at_least { value >= bound } else { value <= bound };
        let target = format!("{} {}", if at_least { "≥" } else { "≤" }, fmt_value(bound));
        self.figures.push(Figure {
            scenario: scenario.into(),
            metric: metric.into(),
            value,
            unit,
            target: Some(target),
            met: Some(met),
        });
    }

    fn value(&self, scenario: &str, metric: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|f| f.scenario == scenario && f.metric == metric)
            .map(|f| f.value)
    }
}

fn fmt_value(v: f64) -> String {
    if v >= 100.0 || (v.fract() == 0.0 && v.abs() < 1e15) {
        format!("{:.0}", v)
    } else if v >= 1.0 {
        format!("{:.2}", v)
    } else {
        format!("{:.3}", v)
    }
}

/// What the figures were measured on.
#[derive(Default, Serialize)]
struct Machine {
    cpu: String,
    cores: usize,
    memory_gib: f64,
    postgres: String,
    /// The servers' `fsync`, `synchronous_commit` and `full_page_writes`.
    durability: String,
}

impl Machine {
    fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            memory_gib: (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            postgres: String::new(),
            durability: String::new(),
        }
    }
}

/// A migrated set of databases and what works on it.
pub(crate) struct BenchFleet {
    pub router: Arc<Router>,
    pub client: Client,
}

impl BenchFleet {
    /// Migrates `master` and `shards` and connects a router.
    pub(crate) async fn new(master: &FleetDb, shards: &[(&str, &FleetDb)], pool: u32) -> anyhow::Result<BenchFleet> {
        let pairs: Vec<(&str, &str)> = shards.iter().map(|(n, db)| (*n, db.url.as_str())).collect();
        let mut config = Config::from_urls(&master.url, &pairs)?;
        for s in &mut config.shards {
            s.database.pool.max_connections = pool;
        }
        let report = Migrator::new(&config).run().await?;
        anyhow::ensure!(!report.failed(), "migration failed:\n{report}");
        let router = Arc::new(Router::connect(&config).await?);
        Ok(BenchFleet {
            client: Client::new(router.clone()),
            router,
        })
    }

    /// Starts a node with the built-in kinds.
    pub(crate) fn node(&self, concurrency: usize, options: RuntimeOptions) -> anyhow::Result<Runtime> {
        Ok(kinds::register(Runtime::builder(self.router.clone()))
            .queue(shardq::job::DEFAULT_QUEUE, concurrency)
            .options(options)
            .start()?)
    }
}

/// Runs the benchmark.
pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    for s in &args.scenarios {
        anyhow::ensure!(
            SCENARIOS.contains(&s.as_str()),
            "unknown scenario {s:?}; known: {}",
            SCENARIOS.join(", ")
        );
    }
    let mut results = Results {
        machine: Machine::read(),
        figures: Vec::new(),
    };
    let durable = !args.fast;
    eprintln!(
        "starting test-bed servers (master + 4 shards, {})...",
        if durable {
            "durable"
        } else {
            "fast: fsync and full_page_writes off"
        }
    );
    let bed = Arc::new(
        tokio::task::spawn_blocking(move || TestBed::start_with(4, durable).map_err(anyhow::Error::from)).await??,
    );
    let probe = sqlx::PgPool::connect(&bed.shards()[0].url("postgres")).await?;
    results.machine.postgres = store::server_version(&probe).await?;
    let (fsync, sync_commit, fpw) = store::durability(&probe).await?;
    results.machine.durability = format!("fsync={fsync}, synchronous_commit={sync_commit}, full_page_writes={fpw}");
    if args.statements {
        store::statements_preload(&probe).await?;
        let bed = bed.clone();
        tokio::task::spawn_blocking(move || bed.shards()[0].restart().map_err(anyhow::Error::from)).await??;
    }
    probe.close().await;
    // Progress on a terminal: the scenario running, and how many came before it.
    let (bar, started) = (
        crate::progress::bar(args.scenarios.len() as u64, "bench"),
        std::cell::Cell::new(0),
    );
    let want = |s: &str| {
        let wanted = args.scenarios.iter().any(|x| x == s);
        if wanted {
            bar.set_position(started.replace(started.get() + 1));
            bar.set_message(s.to_owned());
        }
        wanted
    };
    if want("drain") || want("floor") {
        drain::drain_and_floor(&bed, &args, &mut results, want("drain"), want("floor")).await?;
    }
    if want("latency") {
        latency::pickup(&bed, &args, &mut results).await?;
    }
    if want("notify") {
        notify::notify(&bed, &args, &mut results).await?;
    }
    if want("shards") {
        drain::shards(&bed, &args, &mut results).await?;
    }
    if want("isolation") {
        latency::isolation(&bed, &args, &mut results).await?;
    }
    if want("outage") {
        outage::outage(&bed, &args, &mut results).await?;
    }
    if want("storage") {
        storage::storage(&bed, &args, &mut results).await?;
    }
    if want("move") {
        moves::moves(&bed, &args, &mut results).await?;
    }
    if want("fleet") {
        fleet::fleet(&bed, &args, &mut results).await?;
    }
    if want("fairness") {
        fairness::fairness(&bed, &args, &mut results).await?;
    }
    if want("steady") {
        steady::steady(&bed, &args, &mut results).await?;
    }
    if want("limits") {
        limits::limits(&bed, &args, &mut results).await?;
    }
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        print_table(&results);
    }
    drop(bed);
    Ok(ExitCode::SUCCESS)
}

fn print_table(r: &Results) {
    let m = &r.machine;
    println!(
        "machine: {} cores, {} GiB, {}; PostgreSQL {}",
        m.cores, m.memory_gib, m.cpu, m.postgres
    );
    println!("servers: {}", m.durability);
    println!();
    println!("| scenario | metric | value | target |");
    println!("|---|---|---|---|");
    for f in &r.figures {
        let target = match (&f.target, f.met) {
            (Some(t), Some(true)) => format!("{t} (met)"),
            (Some(t), Some(false)) => format!("{t} (missed)"),
            _ => String::new(),
        };
        println!(
            "| {} | {} | {} {} | {} |",
            f.scenario,
            f.metric,
            fmt_value(f.value),
            f.unit,
            target
        );
    }
}
