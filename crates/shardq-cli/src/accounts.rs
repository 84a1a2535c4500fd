//! `shardq accounts move|list|show|pin|weight|limit`.

use std::process::ExitCode;
use std::sync::Arc;

use serde::Serialize;
use shardq::moves::{MoveOptions, Mover, Step};
use shardq::rebalance::Rebalancer;
use shardq_router::{Account, Config, Router};

use crate::moves::{self, MoveArgs};
use crate::store::{self, PlacementRow};

/// Arguments of `accounts`.
#[derive(clap::Args)]
pub struct AccountsArgs {
    #[command(subcommand)]
    command: AccountsCommand,
}

#[derive(clap::Subcommand)]
enum AccountsCommand {
    /// Move an account to another shard, online, and run the move to its end
    /// with a line per step (`shardq moves resume ID` finishes a move whose
    /// mover was stopped).
    Move {
        /// The account.
        account: String,
        /// The shard it goes to.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        options: MoveArgs,
    },
    /// Placed accounts with their shard and epoch, from the master, in
    /// account order.
    List {
        /// Only accounts on this shard.
        #[arg(long)]
        shard: Option<String>,
        /// Most accounts to list.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=100_000))]
        limit: i64,
        /// List the accounts after this one (the last one of the previous page).
        #[arg(long)]
        after: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One account: its shard and epoch, its jobs by state on that shard,
    /// and a move in progress if there is one.
    Show {
        /// The account.
        account: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pin an account to a chosen shard (e.g. a dedicated shard for a
    /// large customer): a new account is placed there, one placed elsewhere
    /// is moved there first (a line per step); either way it is marked
    /// pinned, so a rebalance never moves it and a drain refuses to.
    Pin {
        /// The account.
        account: String,
        /// The shard to pin it to.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        options: MoveArgs,
    },
    /// Show or set an account's fair-share weight (1 to 10000, default 1):
    /// while its jobs and others' are due in a queue, it gets that many
    /// times the slots of a weight-1 account.
    Weight {
        /// The account.
        account: String,
        /// The new weight; without it, the current one is printed.
        #[arg(value_parser = clap::value_parser!(u32).range(1..=10_000))]
        weight: Option<u32>,
        /// Back to the default weight (1).
        #[arg(long, conflicts_with = "weight")]
        reset: bool,
    },
    /// Show or set an account's concurrency limit in a queue (1 to
    /// 10000): at most that many of its jobs in the queue run at once,
    /// across every node. Without a limit and `--clear`, prints the
    /// account's limits (of `--queue` only, when given).
    Limit {
        /// The account.
        account: String,
        /// The queue the limit is for.
        #[arg(long)]
        queue: Option<String>,
        /// The new limit.
        #[arg(requires = "queue", value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: Option<u32>,
        /// Remove the account's limit in the queue.
        #[arg(long, requires = "queue", conflicts_with = "limit")]
        clear: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// What `accounts limit` prints.
#[derive(Serialize)]
struct Limits {
    /// The account.
    account: String,
    /// Its concurrency limits by queue (queues without one are absent).
    limits: std::collections::BTreeMap<String, u32>,
}

/// What `accounts show` prints.
#[derive(Serialize)]
struct Shown {
    #[serde(flatten)]
    placement: PlacementRow,
    /// Jobs of the account on its shard, by state.
    jobs: serde_json::Map<String, serde_json::Value>,
    /// Bytes of the account's job rows on its shard.
    job_bytes: i64,
    /// Estimated size: its job rows plus its rows of the account-scoped
    /// tables (the `rebalance --by bytes` load); `None` when a table could
    /// not be read.
    size_bytes: Option<u64>,
    /// A move of the account in progress.
    moving: Option<shardq::moves::Move>,
}

/// Runs an `accounts` subcommand.
pub async fn run(config: &Config, args: AccountsArgs) -> anyhow::Result<ExitCode> {
    let router = Arc::new(Router::connect(config).await?);
    match args.command {
        AccountsCommand::Move { account, to, options } => {
            let account = Account::new(account)?;
            router.shard(&to)?;
            // Mover::start routes the account; refuse first, so that a
            // mistyped account is an error and not a new placement.
            if router.placement(&account).await?.is_none() {
                anyhow::bail!(
                    "account {account} is not placed (the master has no placement for it), so there is \
                     nothing to move; `shardq accounts pin {account} --to {to}` places a new account"
                );
            }
            let options = options.options(config)?;
            let mover = Mover::new(router, options.clone());
            let m = mover.start(&account, &to).await?;
            println!("{}", moves::heading(&m, &mover.tables_of(&m)));
            moves::run_to_end(&mover, &options, m).await
        }
        AccountsCommand::List {
            shard,
            limit,
            after,
            json,
        } => {
            if let Some(s) = &shard {
                router.shard(s)?;
            }
            let master = router.master();
            let rows = store::placements_page(&master.pool, shard.as_deref(), after.as_deref(), limit)
                .await
                .map_err(|e| master.error(e))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(ExitCode::SUCCESS);
            }
            if rows.is_empty() {
                println!("no accounts");
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<32} {:<12} {:>5} {:<6}  {:<20}  moved",
                "account", "shard", "epoch", "pinned", "placed"
            );
            for r in &rows {
                println!(
                    "{:<32} {:<12} {:>5} {:<6}  {:<20}  {}",
                    r.account,
                    r.shard,
                    r.epoch,
                    if r.pinned { "yes" } else { "" },
                    r.placed_at.format("%Y-%m-%d %H:%M:%S"),
                    r.moved_at
                        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                        .unwrap_or_default()
                );
            }
            if rows.len() as i64 == limit {
                if let Some(last) = rows.last() {
                    println!("(more may follow: --after {})", last.account);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        AccountsCommand::Show { account, json } => {
            let account = Account::new(account)?;
            let master = router.master();
            let placement = store::placement_of(&master.pool, account.as_str())
                .await
                .map_err(|e| master.error(e))?
                .ok_or_else(|| {
                    anyhow::anyhow!("account {account} is not placed (the master has no placement for it)")
                })?;
            let db = router.shard(&placement.shard)?;
            let (counts, job_bytes) = store::account_job_counts(&db.pool, account.as_str())
                .await
                .map_err(|e| db.error(e))?;
            let moving = Mover::new(router.clone(), Default::default())
                .list(0)
                .await?
                .into_iter()
                .find(|m| m.account == account.as_str() && !matches!(m.step, Step::Done | Step::Aborted));
            let size_bytes = Rebalancer::new(router.clone(), MoveOptions::for_config(config))
                .size_of(&account, &db.name)
                .await
                .ok();
            let shown = Shown {
                size_bytes,
                placement,
                jobs: counts
                    .into_iter()
                    .map(|(state, n)| (state, serde_json::Value::from(n)))
                    .collect(),
                job_bytes,
                moving,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&shown)?);
            } else {
                print_shown(&shown);
            }
            Ok(ExitCode::SUCCESS)
        }
        AccountsCommand::Weight { account, weight, reset } => {
            let account = Account::new(account)?;
            if router.placement(&account).await?.is_none() {
                anyhow::bail!("account {account} is not placed (the master has no placement for it)");
            }
            let client = shardq::Client::new(router.clone());
            if weight.is_some() || reset {
                client.set_account_weight(&account, weight).await?;
            }
            println!("{account}: weight {}", client.account_weight(&account).await?);
            Ok(ExitCode::SUCCESS)
        }
        AccountsCommand::Limit {
            account,
            queue,
            limit,
            clear,
            json,
        } => {
            let account = Account::new(account)?;
            if router.placement(&account).await?.is_none() {
                anyhow::bail!("account {account} is not placed (the master has no placement for it)");
            }
            let client = shardq::Client::new(router.clone());
            if let Some(q) = &queue {
                if limit.is_some() || clear {
                    client.set_account_limit(&account, q, limit).await?;
                }
            }
            let mut limits = client.account_limits(&account).await?;
            if let Some(q) = &queue {
                limits.retain(|k, _| k == q);
            }
            let shown = Limits {
                account: account.to_string(),
                limits,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&shown)?);
            } else if let Some(q) = &queue {
                match shown.limits.get(q) {
                    Some(n) => println!("{account}: at most {n} running in queue {q}"),
                    None => println!("{account}: no limit in queue {q}"),
                }
            } else if shown.limits.is_empty() {
                println!("{account}: no concurrency limits");
            } else {
                for (q, n) in &shown.limits {
                    println!("{account}: at most {n} running in queue {q}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        AccountsCommand::Pin { account, to, options } => {
            let account = Account::new(account)?;
            router.shard(&to)?;
            if let Some((from, _)) = router.placement(&account).await? {
                if from != to {
                    let options = options.options(config)?;
                    let mover = Mover::new(router.clone(), options.clone());
                    let m = mover.start(&account, &to).await?;
                    println!("{}", moves::heading(&m, &options.tables));
                    let code = moves::run_to_end(&mover, &options, m).await?;
                    if code != ExitCode::SUCCESS {
                        eprintln!("{account} is not pinned: its move to {to} did not finish");
                        return Ok(code);
                    }
                }
            }
            let placement = router.pin(&account, &to).await?;
            if placement.placed_now {
                println!("{account}: placed on {}", placement.shard);
            } else {
                println!("{account}: pinned to {}", placement.shard);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_shown(s: &Shown) {
    let p = &s.placement;
    println!("account:  {}", p.account);
    println!("shard:    {}", p.shard);
    println!("epoch:    {}", p.epoch);
    println!("pinned:   {}", if p.pinned { "yes" } else { "no" });
    println!("placed:   {}", p.placed_at.to_rfc3339());
    if let Some(t) = p.moved_at {
        println!("moved:    {}", t.to_rfc3339());
    }
    if s.jobs.is_empty() {
        println!("jobs:     none");
    } else {
        let parts: Vec<String> = s.jobs.iter().map(|(state, n)| format!("{state} {n}")).collect();
        println!("jobs:     {}", parts.join(", "));
    }
    println!("job rows: {} bytes", s.job_bytes);
    if let Some(bytes) = s.size_bytes {
        println!("size:     {bytes} bytes (job rows and rows of the account-scoped tables, as stored)");
    }
    if let Some(m) = &s.moving {
        println!(
            "moving:   move {} to {}, at step {}{}",
            m.id,
            m.to,
            m.step,
            m.error
                .as_deref()
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default()
        );
    }
}
