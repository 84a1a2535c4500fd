//! `shardq migrate`: bring the master and every shard to the same schema, or
//! (`shardq migrate status`) show where each database stands.
//!
//! Exit status: 0 when every selected database succeeded (or, for `status`,
//! none diverged and all could be read; lagging behind is not an error);
//! 1 when any database failed, diverged or could not be reached. A problem
//! that stops the run before it starts (bad migration folder, unknown shard)
//! is returned as an error.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use shardq_router::migrator::{Migrator, DEFAULT_LOCK_RETRIES, DEFAULT_PARALLEL};
use shardq_router::Config;

/// Arguments of `shardq migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// `status` shows the version matrix instead of migrating.
    #[command(subcommand)]
    pub command: Option<MigrateCommand>,
    /// Most shards worked on at the same time (the master always runs first, alone).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_PARALLEL, value_parser = parse_parallel, global = true)]
    pub parallel: usize,
    /// Stop the application migrations at VERSION. The platform's own
    /// migrations always go to their latest version.
    #[arg(long, value_name = "VERSION")]
    pub target: Option<u32>,
    /// Only this shard (repeatable). The master is then skipped unless
    /// `--master` is also given.
    #[arg(long = "shard", value_name = "NAME", global = true)]
    pub shards: Vec<String>,
    /// With `--shard`: include the master too.
    #[arg(long, global = true)]
    pub master: bool,
    /// List what would run on each database; change nothing, take no lock.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// How long one migration statement may wait for a lock (Postgres
    /// `lock_timeout`) before it is rolled back and tried again; while it
    /// waits, writes to that table queue behind it. `0s` turns it off.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub lock_timeout: Duration,
    /// How many times a migration rolled back by the lock timeout is tried
    /// again (after 1 s, 2 s, 4 s, ... at most 30 s) before its database
    /// is reported failed.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_LOCK_RETRIES)]
    pub lock_retries: u32,
    /// Postgres `statement_timeout` of the migrator's sessions (default: the
    /// server's setting).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub statement_timeout: Option<Duration>,
    /// Time allowed to each database, from connecting to its last migration
    /// (and for reading it, with `status`); past it the database is reported
    /// timed out and the others go on. `0s`: no deadline.
    #[arg(long, value_name = "DURATION", default_value = "30m", value_parser = humantime::parse_duration, global = true)]
    pub deadline: Duration,
    /// Migrate the master and then this shard first; if either fails, no
    /// other shard is touched.
    #[arg(long, value_name = "SHARD")]
    pub canary: Option<String>,
}

/// Subcommands of `shardq migrate`.
#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// Show each database's applied platform and application versions, and
    /// which databases lag behind the files or have diverged from them.
    Status,
}

/// Runs `shardq migrate` (or `shardq migrate status`) and returns the exit status.
pub async fn run(config: &Config, args: MigrateArgs) -> anyhow::Result<ExitCode> {
    let migrator = migrator(config, &args);
    match args.command {
        Some(MigrateCommand::Status) => {
            if args.target.is_some() || args.dry_run || args.canary.is_some() {
                bail!("--target, --dry-run and --canary apply to `shardq migrate`, not to `shardq migrate status`");
            }
            let report = migrator.status().await.context("migrate status")?;
            print(&report, args.json)?;
            Ok(exit_code(report.has_errors()))
        }
        None => {
            let bar = crate::progress::bar(databases_selected(config, &args), "migrate");
            let lines = bar.clone();
            let migrator = migrator.on_database(move |d| {
                let outcome = match &d.error {
                    Some(e) => format!("failed: {e}"),
                    None if !d.ahead.is_empty() => "ahead of this binary, left alone".to_owned(),
                    None => format!("{} applied in {} ms", d.applied_count(), d.duration.as_millis()),
                };
                lines.println(format!("{}: {outcome}", d.database));
                lines.inc(1);
            });
            let report = migrator.run().await.context("migrate");
            bar.finish_and_clear();
            let report = report?;
            print(&report, args.json)?;
            Ok(exit_code(report.failed()))
        }
    }
}

/// How many databases `shardq migrate` works on: the selected shards, and
/// the master unless only shards were named without `--master`.
fn databases_selected(config: &Config, args: &MigrateArgs) -> u64 {
    let (shards, master) = if args.shards.is_empty() {
        (config.shards.len(), true)
    } else {
        (args.shards.len(), args.master)
    };
    (shards + usize::from(master)) as u64
}

fn migrator(config: &Config, args: &MigrateArgs) -> Migrator {
    let mut m = Migrator::new(config)
        .parallel(args.parallel)
        .dry_run(args.dry_run)
        .lock_timeout(args.lock_timeout)
        .lock_retries(args.lock_retries)
        .statement_timeout(args.statement_timeout)
        .deadline(Some(args.deadline).filter(|d| !d.is_zero()));
    if let Some(v) = args.target {
        m = m.target(v);
    }
    if let Some(shard) = &args.canary {
        m = m.canary(shard.clone());
    }
    if !args.shards.is_empty() {
        m = m.only_shards(args.shards.iter().cloned()).master(args.master);
    }
    m
}

fn print<R: serde::Serialize + std::fmt::Display>(report: &R, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}

fn exit_code(failed: bool) -> ExitCode {
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn parse_parallel(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?} is not a number of at least 1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: MigrateArgs,
    }

    fn parse(argv: &[&str]) -> Result<MigrateArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("migrate").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn flags_parse() {
        let a = parse(&[
            "--parallel",
            "8",
            "--target",
            "3",
            "--shard",
            "a",
            "--shard",
            "b",
            "--dry-run",
            "--json",
        ])
        .expect("parses");
        assert_eq!(
            (a.parallel, a.target, a.shards.len(), a.dry_run, a.json),
            (8, Some(3), 2, true, true)
        );
        assert!(a.command.is_none());
        let d = parse(&[]).expect("parses");
        assert_eq!(d.parallel, DEFAULT_PARALLEL);
        assert_eq!(d.lock_timeout, shardq_router::migrator::DEFAULT_LOCK_TIMEOUT);
        assert_eq!(d.deadline, shardq_router::migrator::DEFAULT_DEADLINE);
        assert_eq!(
            (d.lock_retries, d.statement_timeout, d.canary),
            (DEFAULT_LOCK_RETRIES, None, None)
        );
    }

    #[test]
    fn safety_flags_parse() {
        let a = parse(&[
            "--lock-timeout",
            "750ms",
            "--lock-retries",
            "0",
            "--statement-timeout",
            "10m",
            "--deadline",
            "5m",
            "--canary",
            "shard_2",
        ])
        .expect("parses");
        assert_eq!(a.lock_timeout, Duration::from_millis(750));
        assert_eq!(a.lock_retries, 0);
        assert_eq!(a.statement_timeout, Some(Duration::from_secs(600)));
        assert_eq!(a.deadline, Duration::from_secs(300));
        assert_eq!(a.canary.as_deref(), Some("shard_2"));
        let bad = parse(&["--lock-timeout", "soon"]).map(drop).unwrap_err().to_string();
        assert!(bad.contains("--lock-timeout"), "{bad}");
    }

    #[test]
    fn status_takes_json_and_shard_after_it() {
        let a = parse(&["status", "--json", "--shard", "a"]).expect("parses");
        assert!(matches!(a.command, Some(MigrateCommand::Status)));
        assert!(a.json);
        assert_eq!(a.shards, vec!["a".to_string()]);
    }

    #[test]
    fn zero_parallel_is_rejected() {
        assert!(parse(&["--parallel", "0"]).is_err());
    }
}
