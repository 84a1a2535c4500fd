//! `shardq shards list|drain|undrain`: the fleet's shards with their weight,
//! registry state and accounts; draining one (no new accounts, every
//! account moved off).

use std::process::ExitCode;
use std::sync::Arc;

use shardq::rebalance::{Applied, Rebalancer};
use shardq_router::{Config, Router};

use crate::moves::MoveArgs;
use crate::progress;
use crate::rebalance::{applied_line, ApplyArgs};

/// Arguments of `shards`.
#[derive(clap::Args)]
pub struct ShardsArgs {
    #[command(subcommand)]
    command: ShardsCommand,
}

#[derive(clap::Subcommand)]
enum ShardsCommand {
    /// Every configured shard: weight, whether it is draining, whether new
    /// accounts are offered to it (and why not), its accounts and pinned ones.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop placing new accounts on a shard and move every account off it,
    /// a line per move. Resumable: running it again finishes moves left in
    /// progress and moves what is still there.
    Drain {
        /// The shard.
        name: String,
        /// Move pinned accounts too (they stay pinned on their new shard);
        /// without it a shard holding pinned accounts is refused.
        #[arg(long)]
        include_pinned: bool,
        #[command(flatten)]
        apply: ApplyArgs,
        #[command(flatten)]
        options: MoveArgs,
    },
    /// Offer a drained (or draining) shard new accounts again; moves
    /// nothing back.
    Undrain {
        /// The shard.
        name: String,
    },
}

/// Runs a `shards` subcommand.
pub async fn run(config: &Config, args: ShardsArgs) -> anyhow::Result<ExitCode> {
    let router = Arc::new(Router::connect(config).await?);
    match args.command {
        ShardsCommand::List { json } => {
            let states = router.shard_states().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&states)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<16} {:>6}  {:<8} {:>9} {:>7}  new accounts",
                "shard", "weight", "draining", "accounts", "pinned"
            );
            for s in &states {
                println!(
                    "{:<16} {:>6}  {:<8} {:>9} {:>7}  {}",
                    s.name,
                    s.weight,
                    if s.draining { "yes" } else { "no" },
                    s.accounts,
                    s.pinned,
                    match &s.not_offered {
                        None => "offered".to_string(),
                        Some(why) => format!("not offered: {why}"),
                    }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ShardsCommand::Undrain { name } => {
            router.set_draining(&name, false).await?;
            println!("shard {name} takes new accounts again");
            Ok(ExitCode::SUCCESS)
        }
        ShardsCommand::Drain {
            name,
            include_pinned,
            apply,
            options,
        } => {
            router.shard(&name)?;
            let options = options.options(config)?;
            let rebalancer = Rebalancer::new(router.clone(), options);
            println!("draining shard {name}: no new accounts from now on; moving every account off it");
            let to_move = router
                .placements(Some(&name))
                .await?
                .iter()
                .filter(|(_, _, pinned)| include_pinned || !pinned)
                .count();
            let bar = progress::bar(to_move as u64, &format!("drain {name}: moves"));
            let on_move = |a: &Applied| {
                bar.suspend(|| println!("{}", applied_line(a)));
                bar.inc(1);
            };
            let applied = rebalancer
                .drain(&name, include_pinned, &apply.options(), &on_move)
                .await?;
            bar.finish_and_clear();
            let failed = applied.iter().filter(|a| a.outcome.is_err()).count();
            let left = router.placements(Some(&name)).await?.len();
            if failed == 0 && left == 0 {
                println!(
                    "shard {name} drained: {} account(s) moved, none left; it stays draining (remove it from shards.toml, or `shardq shards undrain {name}`)",
                    applied.len()
                );
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!(
                    "shard {name}: {failed} move(s) failed, {left} account(s) left; run the drain again to resume (`shardq moves status` lists the moves)"
                );
                Ok(ExitCode::FAILURE)
            }
        }
    }
}
