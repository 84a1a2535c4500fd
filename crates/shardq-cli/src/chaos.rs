//! `shardq chaos`: the fault scenarios of the test suite at a larger size,
//! on test-bed servers the command starts itself, with figures: jobs
//! enqueued, finished, lost (must be 0), started more than once, and the
//! time from the end of the fault until every acknowledged job finished.
//!
//! During each scenario a load generator enqueues single `sleep` jobs
//! (20 ms) at a steady rate over accounts on every shard, and an in-process
//! worker node works them (lease 3 s, renewed every second, rescue every
//! second, so recovery is quick to watch). An enqueue that returns an error
//! is counted as rejected: the caller knows it failed; only acknowledged
//! jobs count as enqueued.
//!
//! The scenarios that take shard_1's server out for the middle third of the
//! load (`crash-shard`, `outage`, `frozen`) also report the node's
//! throughput on the other, healthy shards during the fault next to their
//! throughput before it (from a short warm-up to the fault): one sick shard
//! must never slow the healthy ones.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use shardq::{Account, Client, NewJob, Runtime, RuntimeOptions};
use shardq_router::{Config, Migrator, Router};
use shardq_testbed::{Fleet, TestBed};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use crate::{kinds, store};

/// Every scenario, in the order they run.
const SCENARIOS: [&str; 8] = [
    "kill-worker",
    "crash-shard",
    "master-down",
    "terminate",
    "pool-pressure",
    "idle-xmin",
    "outage",
    "frozen",
];

/// The shard (and test-bed server) the single-shard faults hit.
const SICK: &str = "shard_1";

/// Arguments of `chaos`.
#[derive(clap::Args)]
pub struct ChaosArgs {
    /// Scenarios to run (comma-separated): kill-worker, crash-shard, master-down, terminate, pool-pressure, idle-xmin, outage, frozen.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kill-worker,crash-shard,master-down,terminate,pool-pressure,idle-xmin,outage,frozen"
    )]
    scenarios: Vec<String>,
    /// Seconds of load (and fault) per scenario.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Enqueue rate of the load, jobs/s.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// The figures of one scenario.
#[derive(Serialize)]
struct Outcome {
    scenario: String,
    enqueued: u64,
    rejected: u64,
    finished: u64,
    lost: u64,
    started_more_than_once: u64,
    recovery_ms: Option<u128>,
    /// Completions per second on the healthy shards before the fault
    /// (scenarios that take one shard out).
    healthy_before_per_s: Option<f64>,
    /// Completions per second on the healthy shards during the fault.
    healthy_during_per_s: Option<f64>,
    /// `healthy_during_per_s / healthy_before_per_s`.
    healthy_ratio: Option<f64>,
}

/// The healthy shards' throughput around a fault that takes one shard out.
struct Healthy {
    /// Completions per second from the end of the warm-up to the fault.
    before_per_s: f64,
    /// Completions per second while the fault lasted.
    during_per_s: f64,
}

/// Jobs the node completed so far on every shard but [`SICK`].
fn healthy_completed(node: &Runtime) -> u64 {
    node.counts()
        .iter()
        .filter(|s| s.shard != SICK)
        .map(|s| s.completed)
        .sum()
}

/// Takes [`SICK`]'s server out with `down` for the middle third of
/// `seconds` and brings it back with `up`; measures the healthy shards'
/// completions in the first third (after a warm-up) and during the fault.
async fn sick_shard(
    bed: &Arc<TestBed>,
    node: &Runtime,
    seconds: u64,
    down: fn(&shardq_testbed::Server) -> shardq_testbed::Result<()>,
    up: fn(&shardq_testbed::Server) -> shardq_testbed::Result<()>,
) -> anyhow::Result<Healthy> {
    let third = Duration::from_secs(seconds) / 3;
    let warm = (third / 3).min(Duration::from_secs(2));
    tokio::time::sleep(warm).await;
    let (t0, c0) = (Instant::now(), healthy_completed(node));
    tokio::time::sleep(third - warm).await;
    let (t1, c1) = (Instant::now(), healthy_completed(node));
    on_server(bed, SICK, down).await?;
    tokio::time::sleep_until((t1 + third).into()).await;
    let (t2, c2) = (Instant::now(), healthy_completed(node));
    on_server(bed, SICK, up).await?;
    let per_s = |n: u64, from: Instant, to: Instant| n as f64 / (to - from).as_secs_f64().max(1e-3);
    Ok(Healthy {
        before_per_s: per_s(c1 - c0, t0, t1),
        during_per_s: per_s(c2 - c1, t1, t2),
    })
}

/// A migrated fleet on the bed, and what measures it.
struct Stage {
    dbs: Fleet,
    config: Config,
    router: Arc<Router>,
    /// Pools with their own application name, so terminating the node's
    /// backends never cuts the measurement.
    probes: BTreeMap<String, PgPool>,
}

impl Stage {
    async fn new(bed: &TestBed) -> anyhow::Result<Stage> {
        let dbs = bed.fresh_fleet().await?;
        let pairs: Vec<(&str, &str)> = dbs.shards.iter().map(|s| (s.name.as_str(), s.url.as_str())).collect();
        let config = Config::from_urls(&dbs.master.url, &pairs)?;
        let report = Migrator::new(&config).run().await?;
        anyhow::ensure!(!report.failed(), "migration failed:\n{report}");
        let router = Arc::new(Router::connect(&config).await?);
        let mut probes = BTreeMap::new();
        for s in &dbs.shards {
            let options: PgConnectOptions = s.url.parse::<PgConnectOptions>()?.application_name("shardq-chaos");
            probes.insert(
                s.name.clone(),
                PgPoolOptions::new().max_connections(2).connect_with(options).await?,
            );
        }
        Ok(Stage {
            dbs,
            config,
            router,
            probes,
        })
    }

    /// Accounts placed round-robin on every shard (so their placements are cached).
    async fn accounts(&self) -> anyhow::Result<Vec<Account>> {
        let mut out = Vec::new();
        for (i, shard) in self.config.shard_names().iter().cycle().take(60).enumerate() {
            let a = Account::new(format!("chaos-{i}"))?;
            self.router.place(&a, shard).await?;
            out.push(a);
        }
        Ok(out)
    }

    /// Writes a shards.toml for child worker processes.
    fn write_config(&self, path: &Path) -> anyhow::Result<()> {
        let mut text = format!("[master]\nurl = \"{}\"\n", self.dbs.master.url);
        for s in &self.dbs.shards {
            text.push_str(&format!("[[shards]]\nname = \"{}\"\nurl = \"{}\"\n", s.name, s.url));
        }
        std::fs::write(path, text)?;
        Ok(())
    }
}

/// Enqueues at a steady rate until stopped; keeps the acknowledged ids per shard.
struct Load {
    acked: Arc<Mutex<BTreeMap<String, Vec<i64>>>>,
    rejected: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(client: Client, accounts: Vec<Account>, rate: u32) -> Load {
        let acked = Arc::new(Mutex::new(BTreeMap::<String, Vec<i64>>::new()));
        let rejected = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, r, s) = (acked.clone(), rejected.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
            let mut i = 0usize;
            let mut inflight = tokio::task::JoinSet::new();
            while !s.load(Ordering::Relaxed) {
                tick.tick().await;
                let (client, account, a, r) = (
                    client.clone(),
                    accounts[i % accounts.len()].clone(),
                    a.clone(),
                    r.clone(),
                );
                i += 1;
                inflight.spawn(async move {
                    let job = NewJob::from_json("sleep", serde_json::json!({ "ms": 20 }));
                    match client.enqueue(&account, job).await {
                        Ok(id) => a
                            .lock()
                            .map(|mut m| m.entry(id.shard).or_default().push(id.id))
                            .unwrap_or(()),
                        Err(_) => {
                            r.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
                while inflight.try_join_next().is_some() {}
            }
            while inflight.join_next().await.is_some() {}
        });
        Load {
            acked,
            rejected,
            stop,
            task,
        }
    }

    async fn stop(self) -> (BTreeMap<String, Vec<i64>>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let acked = self.acked.lock().map(|m| m.clone()).unwrap_or_default();
        (acked, self.rejected.load(Ordering::Relaxed))
    }
}

/// Starts `shardq worker` on `config` as a child process.
fn spawn_worker(config: &Path) -> anyhow::Result<Child> {
    Ok(std::process::Command::new(std::env::current_exe()?)
        .args(["--config"])
        .arg(config)
        .args([
            "worker",
            "--queues",
            "default=32",
            "--lease",
            "3s",
            "--heartbeat",
            "1s",
            "--rescue",
            "1s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

/// Runs a blocking server operation on server `name` of the bed.
async fn on_server(
    bed: &Arc<TestBed>,
    name: &str,
    op: fn(&shardq_testbed::Server) -> shardq_testbed::Result<()>,
) -> anyhow::Result<()> {
    let (bed, name) = (bed.clone(), name.to_string());
    tokio::task::spawn_blocking(move || bed.server(&name).and_then(op).map_err(anyhow::Error::from)).await?
}

/// Runs the fault of `scenario` for `seconds` while the load runs; returns
/// the healthy shards' throughput for the faults that take one shard out.
async fn fault(
    scenario: &str,
    bed: &Arc<TestBed>,
    stage: &Stage,
    node: &Runtime,
    seconds: u64,
) -> anyhow::Result<Option<Healthy>> {
    let third = Duration::from_secs(seconds) / 3;
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut healthy = None;
    match scenario {
        "kill-worker" => {
            let dir = tempfile::tempdir()?;
            let config = dir.path().join("shards.toml");
            stage.write_config(&config)?;
            while Instant::now() < until {
                let mut child = spawn_worker(&config)?;
                tokio::time::sleep(Duration::from_secs(3)).await;
                child.kill()?; // SIGKILL
                child.wait()?;
            }
        }
        "crash-shard" => {
            let (down, up) = (shardq_testbed::Server::kill, shardq_testbed::Server::start);
            healthy = Some(sick_shard(bed, node, seconds, down, up).await?);
        }
        "outage" => {
            let (down, up) = (shardq_testbed::Server::stop, shardq_testbed::Server::start);
            healthy = Some(sick_shard(bed, node, seconds, down, up).await?);
        }
        "frozen" => {
            let (down, up) = (shardq_testbed::Server::freeze, shardq_testbed::Server::thaw);
            healthy = Some(sick_shard(bed, node, seconds, down, up).await?);
        }
        "master-down" => {
            tokio::time::sleep(third).await;
            on_server(bed, "master", shardq_testbed::Server::stop).await?;
            tokio::time::sleep(third).await;
            on_server(bed, "master", shardq_testbed::Server::start).await?;
        }
        "terminate" => {
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_secs(2)).await;
                for pool in stage.probes.values() {
                    store::chaos_terminate_node_backends(pool).await?;
                }
            }
        }
        "pool-pressure" => {
            tokio::time::sleep(third).await;
            let url = &stage.dbs.shards[0].url;
            let mut hogs = Vec::new();
            while let Ok(c) = PgConnection::connect(url).await {
                hogs.push(c);
            }
            hogs.truncate(hogs.len().saturating_sub(2));
            tokio::time::sleep(third).await;
            drop(hogs);
        }
        "idle-xmin" => {
            let mut pin = PgConnection::connect(&stage.dbs.shards[0].url).await?;
            sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ")
                .execute(&mut pin)
                .await?;
            sqlx::query("SELECT txid_current()").execute(&mut pin).await?;
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            sqlx::query("ROLLBACK").execute(&mut pin).await?;
        }
        other => anyhow::bail!("unknown scenario {other:?}; known: {}", SCENARIOS.join(", ")),
    }
    let left = until.saturating_duration_since(Instant::now());
    tokio::time::sleep(left).await;
    Ok(healthy)
}

/// One scenario from start to recovery.
async fn scenario(name: &str, bed: &Arc<TestBed>, args: &ChaosArgs) -> anyhow::Result<Outcome> {
    let stage = Stage::new(bed).await?;
    let accounts = stage.accounts().await?;
    let options = RuntimeOptions {
        lease: Duration::from_secs(3),
        heartbeat_interval: Duration::from_secs(1),
        rescue_interval: Duration::from_secs(1),
        ..RuntimeOptions::default()
    };
    let node = kinds::register(Runtime::builder(stage.router.clone()))
        .queue("default", 32)
        .options(options)
        .start()?;
    let load = Load::start(Client::new(stage.router.clone()), accounts, args.rate);
    let healthy = fault(name, bed, &stage, &node, args.seconds).await?;
    let (acked, rejected) = load.stop().await;
    let fault_end = Instant::now();
    let enqueued: u64 = acked.values().map(|v| v.len() as u64).sum();
    let deadline = fault_end + Duration::from_secs(180);
    let (finished, again, recovery) = loop {
        let mut finished = 0;
        let mut again = 0;
        for (shard, ids) in &acked {
            if let Some(pool) = stage.probes.get(shard) {
                let (f, a) = store::chaos_finished_of(pool, ids).await.unwrap_or((0, 0));
                finished += f as u64;
                again += a as u64;
            }
        }
        if finished == enqueued {
            break (finished, again, Some(fault_end.elapsed().as_millis()));
        }
        if Instant::now() > deadline {
            break (finished, again, None);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    node.shutdown(Duration::from_secs(5)).await;
    Ok(Outcome {
        scenario: name.to_string(),
        enqueued,
        rejected,
        finished,
        lost: enqueued - finished,
        started_more_than_once: again,
        recovery_ms: recovery,
        healthy_before_per_s: healthy.as_ref().map(|h| h.before_per_s),
        healthy_during_per_s: healthy.as_ref().map(|h| h.during_per_s),
        healthy_ratio: healthy
            .as_ref()
            .filter(|h| h.before_per_s > 0.0)
            .map(|h| h.during_per_s / h.before_per_s),
    })
}

/// Runs the scenarios and prints their figures; fails when a job was lost.
pub async fn run(args: ChaosArgs) -> anyhow::Result<ExitCode> {
    for s in &args.scenarios {
        anyhow::ensure!(
            SCENARIOS.contains(&s.as_str()),
            "unknown scenario {s:?}; known: {}",
            SCENARIOS.join(", ")
        );
    }
    eprintln!("starting test-bed servers (master + 3 shards)...");
    let bed = Arc::new(tokio::task::spawn_blocking(|| TestBed::start(3).map_err(anyhow::Error::from)).await??);
    let mut outcomes = Vec::new();
    let bar = crate::progress::bar(args.scenarios.len() as u64, "chaos: scenarios");
    for name in &args.scenarios {
        let line = format!(
            "{name}: {} s of load at {}/s with the fault...",
            args.seconds, args.rate
        );
        bar.suspend(|| eprintln!("{line}"));
        bar.set_message(name.clone());
        outcomes.push(scenario(name, &bed, &args).await?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcomes)?);
    } else {
        println!(
            "| scenario | enqueued | rejected | finished | lost | started more than once | recovered after | healthy shards, jobs/s before → during fault |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for o in &outcomes {
            let recovery = o
                .recovery_ms
                .map(|ms| format!("{:.1} s", ms as f64 / 1000.0))
                .unwrap_or_else(|| "not within 180 s".into());
            let healthy = match (o.healthy_before_per_s, o.healthy_during_per_s) {
                (Some(before), Some(during)) => {
                    let ratio = o.healthy_ratio.map(|r| format!(" ({r:.2})")).unwrap_or_default();
                    format!("{before:.0} → {during:.0}{ratio}")
                }
                _ => String::new(),
            };
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                o.scenario, o.enqueued, o.rejected, o.finished, o.lost, o.started_more_than_once, recovery, healthy
            );
        }
    }
    let lost: u64 = outcomes.iter().map(|o| o.lost).sum();
    Ok(if lost == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
