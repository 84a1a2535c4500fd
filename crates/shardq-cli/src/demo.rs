//! `shardq demo`: the whole path on the local test bed: servers up, migrate,
//! enqueue a workload across many accounts, run a worker node until the
//! workload is drained, print a per-shard table and where to look next. Its
//! log lines go to a file (see `logging`) so stdout tells the story.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use shardq::{Backoff, Client, NewJob, Runtime, RuntimeOptions};
use shardq_router::migrator::Migrator;
use shardq_router::{Account, Config, Router};

use crate::{kinds, progress, testbed};

/// Arguments of `demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Accounts to spread the workload over.
    #[arg(long, default_value_t = 1000)]
    accounts: usize,
    /// Jobs per account.
    #[arg(long, default_value_t = 5)]
    jobs_per_account: usize,
    /// Concurrency of the worker node's `default` queue.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Give up waiting for the workload after this long.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Runs the demo on the bed of the configuration file `config_path`;
/// `log_file` is where log lines go (`None`: stderr, as `RUST_LOG` asked).
pub async fn run(
    config: &Config,
    config_path: &Path,
    log_file: Option<PathBuf>,
    args: DemoArgs,
) -> anyhow::Result<ExitCode> {
    let data_dir = testbed::data_dir(config_path)?;
    match &log_file {
        Some(path) => println!("log lines go to {} (set RUST_LOG to see them here)", path.display()),
        None => println!("log lines go to stderr (RUST_LOG is set)"),
    }
    println!(
        "\n== test bed: a master and {} shards, local Postgres servers with data in {}",
        config.shards.len(),
        data_dir.display()
    );
    testbed::up(config, &data_dir).await?;
    println!("\n== migrate: the platform's schema on the master and on every shard");
    let report = Migrator::new(config).run().await?;
    print!("{report}");
    if report.failed() {
        bail!("migration failed; see the report above");
    }
    let router = Arc::new(Router::connect(config).await?);
    let client = Client::new(router.clone());

    println!(
        "\n== enqueue: {} jobs for each of {} accounts; each account is placed on one shard the first time it is seen",
        args.jobs_per_account, args.accounts
    );
    let mut jobs = Vec::with_capacity(args.accounts * args.jobs_per_account);
    let mut accounts_per_shard: BTreeMap<String, usize> = BTreeMap::new();
    for a in 0..args.accounts {
        let account = Account::new(format!("acct-{a:05}"))?;
        let shard = router.shard_for(&account).await?.shard;
        *accounts_per_shard.entry(shard).or_default() += 1;
        for j in 0..args.jobs_per_account {
            // Mostly no-ops; one job in 20 fails once and is retried; one in
            // 200 always fails and is discarded after 2 attempts.
            let job = match (a * args.jobs_per_account + j) % 200 {
                0 => NewJob::from_json("fail", serde_json::json!({ "times": 99 })).max_attempts(2),
                n if n % 20 == 0 => NewJob::from_json("fail", serde_json::json!({ "times": 1 })),
                _ => NewJob::from_json("noop", serde_json::json!({ "n": j })),
            };
            jobs.push((account.clone(), job));
        }
    }
    let started = std::time::Instant::now();
    let ids = client.enqueue_many(jobs).await?;
    println!(
        "{} jobs for {} accounts in {:.0} ms",
        ids.len(),
        args.accounts,
        started.elapsed().as_secs_f64() * 1e3
    );

    println!(
        "\n== work: one node, {} slots on queue {}; one job in 20 fails once and is retried, one in 200 always fails and is discarded",
        args.concurrency,
        shardq::job::DEFAULT_QUEUE
    );
    let options = RuntimeOptions {
        backoff: Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        },
        ..RuntimeOptions::default()
    };
    let runtime = kinds::register(Runtime::builder(router.clone()))
        .queue(shardq::job::DEFAULT_QUEUE, args.concurrency)
        .options(options)
        .start()?;
    let expected = ids.len() as u64;
    let deadline = tokio::time::Instant::now() + args.timeout;
    let bar = progress::bar(expected, "work: jobs finished");
    loop {
        let finished: u64 = runtime.counts().iter().map(|s| s.completed + s.discarded).sum();
        bar.set_position(finished);
        if finished >= expected {
            bar.finish_and_clear();
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bar.abandon();
            runtime.shutdown(Duration::from_secs(5)).await;
            bail!(
                "only {finished} of {expected} jobs finished within {}",
                humantime::format_duration(args.timeout)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed();
    let stats = runtime.stats();
    runtime.shutdown(Duration::from_secs(5)).await;

    println!(
        "{:<10} {:>8} {:>10} {:>8} {:>10} {:>10} {:>10}",
        "shard", "accounts", "completed", "retried", "discarded", "p50 ms", "p99 ms"
    );
    for s in &stats {
        let (p50, p99) = s
            .pickup_ms
            .map(|p| (format!("{:.1}", p[0]), format!("{:.1}", p[2])))
            .unwrap_or_default();
        println!(
            "{:<10} {:>8} {:>10} {:>8} {:>10} {:>10} {:>10}",
            s.shard,
            accounts_per_shard.get(&s.shard).copied().unwrap_or(0),
            s.completed,
            s.retried,
            s.discarded,
            p50,
            p99
        );
    }
    println!(
        "\nall {expected} jobs finished in {:.2} s (pickup: due time to handler start)",
        elapsed.as_secs_f64()
    );
    let config_arg = format!("--config {}", config_path.display());
    println!("\n== next");
    let next = [
        ("status", "per shard and queue: jobs by state, oldest waiting, rates"),
        ("dashboard", "the same in a browser: http://127.0.0.1:9188"),
        ("accounts show acct-00000", "one account: its shard, epoch and jobs"),
        ("testbed down", "stop the servers (data is kept)"),
    ];
    let width = next.iter().map(|(c, _)| c.len()).max().unwrap_or(0);
    for (command, what) in next {
        println!("shardq {config_arg} {command:<width$}  {what}");
    }
    if let Some(path) = &log_file {
        println!("logs: {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
