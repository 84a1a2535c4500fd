//! The `shardq` command. One module per command; this file only parses
//! arguments and dispatches.

mod accounts;
mod bench;
mod chaos;
mod dashboard;
mod demo;
mod enqueue;
mod jobs;
mod kinds;
mod migrate;
mod moves;
mod queues;
mod rebalance;
mod route;
mod shards;
mod status;
mod store;
mod testbed;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shardq_router::Config;

/// shardq: a sharded job platform on Postgres.
#[derive(Parser)]
#[command(name = "shardq", version, about)]
struct Cli {
    /// Topology file.
    #[arg(long, global = true, env = "SHARDQ_CONFIG", default_value = shardq_router::config::DEFAULT_CONFIG_FILE)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start, stop or inspect the local Postgres servers of the configuration.
    Testbed(testbed::TestbedArgs),
    /// Run migrations on the master and every shard (or show the version matrix).
    Migrate(migrate::MigrateArgs),
    /// Print the shard an account lives on (an account not placed stays so; `--pin` places).
    Route(route::RouteArgs),
    /// Move accounts between shards, list them, show one, pin a new one to a shard.
    Accounts(accounts::AccountsArgs),
    /// Moves in progress and recent ones; resume or abort one.
    Moves(moves::MovesArgs),
    /// List shards; drain one (no new accounts, every account moved off).
    Shards(shards::ShardsArgs),
    /// Plan (`--plan`) or run (`--apply`) the moves that even the load across shards.
    Rebalance(rebalance::RebalanceArgs),
    /// Enqueue jobs for an account.
    Enqueue(enqueue::EnqueueArgs),
    /// Inspect jobs.
    Jobs(jobs::JobsArgs),
    /// Pause or resume a queue on one shard.
    Queues(queues::QueuesArgs),
    /// Per shard and queue: jobs by state, oldest waiting job, throughput, reachability.
    Status(status::StatusArgs),
    /// Serve the web dashboard over the whole fleet (read-only unless given a token).
    Dashboard(dashboard::DashboardArgs),
    /// Run a worker node with the built-in kinds (noop, sleep, fail, panic).
    Worker(worker::WorkerArgs),
    /// Run the whole path on the local test bed and print a per-shard table.
    Demo(demo::DemoArgs),
    /// Measure throughput, pickup latency, shard scaling, notification isolation, sick-shard isolation and storage.
    Bench(bench::BenchArgs),
    /// Run fault scenarios under load and report enqueued, finished, lost and recovery time.
    Chaos(chaos::ChaosArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,shardq=info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = || Config::load(&cli.config);
    match cli.command {
        Command::Testbed(args) => testbed::run(&config()?, args).await,
        Command::Migrate(args) => migrate::run(&config()?, args).await,
        Command::Route(args) => route::run(&config()?, args).await,
        Command::Accounts(args) => accounts::run(&config()?, args).await,
        Command::Moves(args) => moves::run(&config()?, args).await,
        Command::Shards(args) => shards::run(&config()?, args).await,
        Command::Rebalance(args) => rebalance::run(&config()?, args).await,
        Command::Enqueue(args) => enqueue::run(&config()?, args).await,
        Command::Jobs(args) => jobs::run(&config()?, args).await,
        Command::Queues(args) => queues::run(&config()?, args).await,
        Command::Status(args) => status::run(&config()?, args).await,
        Command::Dashboard(args) => dashboard::run(&config()?, args).await,
        Command::Worker(args) => worker::run(&config()?, args).await,
        Command::Demo(args) => demo::run(&config()?, args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Chaos(args) => chaos::run(args).await,
    }
}
