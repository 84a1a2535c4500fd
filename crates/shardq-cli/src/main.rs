//! The `shardq` command. One module per command; this file only parses
//! arguments and dispatches. Besides the commands: `logging` (where log
//! lines go), `hint` (the fix an error suggests), `progress` (progress
//! lines and bars on a terminal's stderr).

mod accounts;
mod bench;
mod chaos;
mod dashboard;
mod demo;
mod enqueue;
mod hint;
mod jobs;
mod kinds;
mod logging;
mod migrate;
mod moves;
mod progress;
mod queues;
mod rebalance;
mod resources;
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

/// Help text after the top-level options: a first session on the local bed.
const EXAMPLES: &str = "\
Examples:
  shardq testbed up                      # local master + shards of ./shards.toml
  shardq migrate                         # platform and app schema everywhere
  shardq enqueue --account acct-1 --kind noop --count 100
  shardq worker --queues default=32      # work them
  shardq status                          # per shard and queue: counts, oldest, rates
  shardq demo                            # all of the above in one go

Every command that prints a report takes --json (one JSON document on stdout).";

/// shardq: a sharded job platform on Postgres.
#[derive(Parser)]
#[command(
    name = "shardq",
    version,
    about,
    long_about = "shardq: a sharded job platform on Postgres. Every account lives on one shard \
(placements are kept in the master); each shard has its own jobs, producers and LISTEN \
connection. This command runs the local test bed, migrations, routing, account moves, \
workers, status, the dashboard, the demo, benchmarks and fault scenarios.",
    after_help = EXAMPLES
)]
struct Cli {
    /// Topology file (master and shards); the test bed keeps its data next to it.
    #[arg(long, global = true, env = "SHARDQ_CONFIG", default_value = shardq_router::config::DEFAULT_CONFIG_FILE)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start, stop or inspect the local Postgres servers of the configuration.
    #[command(after_help = "\
Examples:
  shardq testbed up                         # init (first time) and start every server
  shardq --config /x/shards.toml testbed up # data under /x/.shardq/testbed, from any directory
  shardq testbed status                     # exit 3 when one is down")]
    Testbed(testbed::TestbedArgs),
    /// Run migrations on the master and every shard (or show the version matrix).
    #[command(after_help = "\
Examples:
  shardq migrate                  # every database, printing each as it finishes
  shardq migrate --dry-run        # what would run
  shardq migrate status --json    # the version matrix for scripts")]
    Migrate(migrate::MigrateArgs),
    /// Print the shard an account lives on (an account not placed stays so; `--pin` places).
    #[command(after_help = "\
Examples:
  shardq route acct-1               # shard_2, or the proposal when not placed
  shardq route acct-1 --json        # {\"account\":..., \"shard\":..., \"placed\":...}
  shardq route acct-9 --pin shard_3 # place a new account")]
    Route(route::RouteArgs),
    /// Move accounts between shards, list them, show one, pin a new one to a shard.
    #[command(after_help = "\
Examples:
  shardq accounts list --shard shard_1
  shardq accounts show acct-1 --json
  shardq accounts move acct-1 --to shard_3
  shardq accounts limit acct-1 --queue email 5   # at most 5 of its email jobs at once")]
    Accounts(accounts::AccountsArgs),
    /// Moves in progress and recent ones; resume or abort one.
    #[command(after_help = "\
Examples:
  shardq moves status --json
  shardq moves resume 7            # the id from `moves status`")]
    Moves(moves::MovesArgs),
    /// List shards; drain one (no new accounts, every account moved off).
    #[command(after_help = "\
Examples:
  shardq shards list --json
  shardq shards drain shard_3")]
    Shards(shards::ShardsArgs),
    /// Plan (`--plan`) or run (`--apply`) the moves that even the load across shards.
    #[command(after_help = "\
Examples:
  shardq rebalance --plan --json
  shardq rebalance --apply        # a progress bar on a terminal")]
    Rebalance(rebalance::RebalanceArgs),
    /// Enqueue jobs for an account.
    #[command(after_help = "\
Examples:
  shardq enqueue --account acct-1 --kind noop
  shardq enqueue --account acct-1 --kind sleep --args '{\"ms\": 500}' --count 10 --delay 5s")]
    Enqueue(enqueue::EnqueueArgs),
    /// Inspect jobs.
    #[command(after_help = "\
Examples:
  shardq jobs show shard_1:42 --json")]
    Jobs(jobs::JobsArgs),
    /// Pause or resume a queue on one shard.
    #[command(after_help = "\
Examples:
  shardq queues pause --shard shard_1 reports
  shardq queues paused --shard shard_1 --json
  shardq queues resume --shard shard_1 reports")]
    Queues(queues::QueuesArgs),
    /// Named resources whose limits hold across every node and shard:
    /// declare one, list them with the permits leased now, remove one.
    #[command(after_help = "\
Examples:
  shardq resources set payments --concurrency 10
  shardq resources list --json
  shardq resources remove payments")]
    Resources(resources::ResourcesArgs),
    /// Per shard and queue: jobs by state, oldest waiting job, throughput, reachability.
    #[command(after_help = "\
Examples:
  shardq status
  shardq status --json            # exit 0 ready, 1 degraded, 2 down
  shardq status --watch --interval 5s")]
    Status(status::StatusArgs),
    /// Serve the web dashboard over the whole fleet (read-only unless given a token).
    #[command(after_help = "\
Examples:
  shardq dashboard                           # http://127.0.0.1:9188, read-only
  SHARDQ_DASHBOARD_TOKEN=s3cret shardq dashboard")]
    Dashboard(dashboard::DashboardArgs),
    /// Run a worker node with the built-in kinds (noop, sleep, fail, panic).
    #[command(after_help = "\
Examples:
  shardq worker --queues default=32,reports=4")]
    Worker(worker::WorkerArgs),
    /// Run the whole path on the local test bed and print a per-shard table.
    #[command(
        long_about = "Run the whole path on the local test bed: servers up, migrate, enqueue a \
workload over many accounts (a few jobs fail on purpose: retried, or discarded), work it with one \
node, and print a per-shard table. Log lines go to .shardq/demo.log next to the configuration \
file unless RUST_LOG is set.",
        after_help = "\
Examples:
  shardq demo
  shardq demo --accounts 50 --jobs-per-account 2   # a smaller run
  RUST_LOG=info shardq demo                         # log lines on stderr instead"
    )]
    Demo(demo::DemoArgs),
    /// Measure throughput, pickup latency, shard scaling, notification isolation, sick-shard isolation and storage.
    #[command(after_help = "\
Examples:
  shardq bench                    # every scenario on a private bed (build with --release)
  shardq bench --json > bench.json")]
    Bench(bench::BenchArgs),
    /// Run fault scenarios under load and report enqueued, finished, lost and recovery time.
    #[command(after_help = "\
Examples:
  shardq chaos
  shardq chaos --json")]
    Chaos(chaos::ChaosArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo tells a story on stdout: its log lines go to a file unless
    // RUST_LOG asks for them.
    let log_file = match &cli.command {
        Command::Demo(_) if std::env::var_os("RUST_LOG").is_none() => match testbed::state_dir(&cli.config) {
            Ok(dir) => Some(dir.join("demo.log")),
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    if let Err(e) = logging::init(log_file.as_deref()) {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config_path = cli.config.clone();
    match runtime.block_on(run(cli, log_file)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(hint) = hint::for_error(&e, &config_path) {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, log_file: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let config = || Config::load(&cli.config);
    match cli.command {
        Command::Testbed(args) => testbed::run(&config()?, &cli.config, args).await,
        Command::Migrate(args) => migrate::run(&config()?, args).await,
        Command::Route(args) => route::run(&config()?, args).await,
        Command::Accounts(args) => accounts::run(&config()?, args).await,
        Command::Moves(args) => moves::run(&config()?, args).await,
        Command::Shards(args) => shards::run(&config()?, args).await,
        Command::Rebalance(args) => rebalance::run(&config()?, args).await,
        Command::Enqueue(args) => enqueue::run(&config()?, args).await,
        Command::Jobs(args) => jobs::run(&config()?, args).await,
        Command::Queues(args) => queues::run(&config()?, args).await,
        Command::Resources(args) => resources::run(&config()?, args).await,
        Command::Status(args) => status::run(&config()?, args).await,
        Command::Dashboard(args) => dashboard::run(&config()?, args).await,
        Command::Worker(args) => worker::run(&config()?, args).await,
        Command::Demo(args) => demo::run(&config()?, &cli.config, log_file, args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Chaos(args) => chaos::run(args).await,
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn the_help_of_shardq_and_of_every_command_shows_examples_of_it() {
        let mut cli = Cli::command();
        let top = cli.render_long_help().to_string();
        assert!(top.contains("Examples:") && top.contains("shardq demo"), "{top}");
        // `help` is clap's own.
        for sub in cli.get_subcommands_mut().filter(|s| s.get_name() != "help") {
            let name = sub.get_name().to_owned();
            let help = sub.render_long_help().to_string();
            assert!(
                sub.get_about().is_some() && help.contains("Examples:"),
                "{name}: no description or examples:\n{help}"
            );
            assert!(
                help.contains(&format!("shardq {name}")),
                "{name}: no example runs it:\n{help}"
            );
        }
    }
}
