//! `shardq rebalance --plan|--apply`: even the fleet's load after adding
//! shards or changing weights, and the parts `shards drain` shares: the
//! `--concurrency`/`--throttle` arguments and the line printed per move.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use shardq::rebalance::{Applied, ApplyOptions, LoadBy, Rebalancer};
use shardq_router::planner::{Plan, DEFAULT_TOLERANCE};
use shardq_router::{Config, Router};

use crate::moves::MoveArgs;
use crate::progress;

/// One planned move as it ended (the `--apply --json` report).
#[derive(Serialize)]
struct AppliedRow<'a> {
    /// The account.
    account: &'a str,
    /// The shard it left (or was to leave).
    from: &'a str,
    /// The shard it went to.
    to: &'a str,
    /// Its load, in the unit of `--by`.
    load: u64,
    /// The move's id, when it succeeded.
    #[serde(rename = "move")]
    move_id: Option<i64>,
    /// Why it failed.
    error: Option<String>,
}

/// Arguments of `rebalance`.
#[derive(clap::Args)]
pub struct RebalanceArgs {
    /// Print the plan (which accounts, from where, to where, their size)
    /// and change nothing.
    #[arg(long, conflicts_with = "apply", required_unless_present = "apply")]
    plan: bool,
    /// Resume moves left in progress, then plan anew and run the plan.
    #[arg(long)]
    apply: bool,
    /// What to even out: accounts (1 each), jobs (the account's jobs on
    /// its shard) or bytes (estimated: pg_column_size of its job rows and
    /// its rows of the account-scoped tables).
    #[arg(long, default_value = "accounts", value_parser = parse_by)]
    by: LoadBy,
    /// A shard within this fraction of its weight's share is left alone.
    #[arg(long, default_value_t = DEFAULT_TOLERANCE, value_parser = parse_tolerance)]
    tolerance: f64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    run: ApplyArgs,
    #[command(flatten)]
    options: MoveArgs,
}

/// How planned moves run: shared by `rebalance --apply` and `shards drain`.
#[derive(clap::Args)]
pub struct ApplyArgs {
    /// Moves running at the same time.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    concurrency: u16,
    /// Pause after each move before the next one starts, e.g. 2s.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    throttle: Duration,
}

impl ApplyArgs {
    /// The rebalancer's options.
    pub fn options(&self) -> ApplyOptions {
        ApplyOptions {
            concurrency: usize::from(self.concurrency),
            throttle: self.throttle,
        }
    }
}

fn parse_by(s: &str) -> Result<LoadBy, String> {
    LoadBy::parse(s).ok_or_else(|| format!("{s:?}: expected accounts, jobs or bytes"))
}

fn parse_tolerance(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|t| t.is_finite() && (0.0..=1.0).contains(t))
        .ok_or_else(|| format!("{s:?}: expected a fraction between 0 and 1, e.g. 0.05"))
}

/// The line printed when a planned move ends.
pub fn applied_line(a: &Applied) -> String {
    let p = &a.planned;
    match &a.outcome {
        Ok(m) => format!(
            "  moved  {:<32} {} -> {}  (move {}, epoch {})",
            p.account,
            p.from,
            p.to,
            m.id,
            m.epoch + 1
        ),
        Err(e) => format!("  FAILED {:<32} {} -> {}: {e}", p.account, p.from, p.to),
    }
}

fn print_plan(plan: &Plan, by: LoadBy) {
    let size = if by == LoadBy::Bytes { "est. bytes" } else { by.as_str() };
    println!("{:<16} {:>12} {:>12} {:>12}", "shard", "now", "share", "after");
    for s in &plan.shards {
        println!("{:<16} {:>12} {:>12.1} {:>12}", s.shard, s.before, s.target, s.after);
    }
    if plan.moves.is_empty() {
        println!("no moves: every shard is within the tolerance of its share");
        return;
    }
    println!();
    println!("{:<32} {:<16} {:<16} {:>12}", "account", "from", "to", size);
    for m in &plan.moves {
        println!("{:<32} {:<16} {:<16} {:>12}", m.account, m.from, m.to, m.load);
    }
    println!("{} move(s)", plan.moves.len());
}

/// Runs `rebalance`.
pub async fn run(config: &Config, args: RebalanceArgs) -> anyhow::Result<ExitCode> {
    let router = Arc::new(Router::connect(config).await?);
    let rebalancer = Rebalancer::new(router, args.options.options(config)?);
    if args.plan {
        let plan = rebalancer.plan(args.by, args.tolerance).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&plan)?);
        } else {
            print_plan(&plan, args.by);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut failed = 0;
    let resumed = rebalancer
        .resume_in_progress(None, &|m| {
            let line = format!(
                "  resumed move {} of {}: {} -> {} ({})",
                m.id, m.account, m.from, m.to, m.step
            );
            // With --json, stdout holds the report alone.
            if args.json {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
        })
        .await?;
    for r in &resumed {
        if let Err(e) = r {
            eprintln!("  FAILED to resume: {e}");
            failed += 1;
        }
    }
    let plan = rebalancer.plan(args.by, args.tolerance).await?;
    if !args.json {
        print_plan(&plan, args.by);
    }
    let bar = progress::bar(plan.moves.len() as u64, "rebalance: moves");
    let applied = rebalancer
        .apply(&plan.moves, &args.run.options(), &|a| {
            if !args.json {
                bar.suspend(|| println!("{}", applied_line(a)));
            }
            bar.inc(1);
        })
        .await;
    bar.finish_and_clear();
    failed += applied.iter().filter(|a| a.outcome.is_err()).count();
    if args.json {
        let rows: Vec<AppliedRow<'_>> = applied
            .iter()
            .map(|a| AppliedRow {
                account: &a.planned.account,
                from: &a.planned.from,
                to: &a.planned.to,
                load: a.planned.load,
                move_id: a.outcome.as_ref().ok().map(|m| m.id),
                error: a.outcome.as_ref().err().map(|e| e.to_string()),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    if failed == 0 {
        if !args.json {
            println!("rebalanced: {} move(s) done", applied.len());
        }
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "{failed} move(s) failed; `shardq rebalance --apply` again resumes them (`shardq moves status` lists them)"
        );
        Ok(ExitCode::FAILURE)
    }
}
