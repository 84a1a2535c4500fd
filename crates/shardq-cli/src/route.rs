//! `shardq route ACCOUNT`: where an account lives, without placing it.

use std::process::ExitCode;

use shardq_router::{Account, Config, Router};

/// Arguments of `route`.
#[derive(clap::Args)]
pub struct RouteArgs {
    /// The account id.
    account: String,
    /// Place a new account on this shard (as `accounts pin`) instead of only
    /// looking it up.
    #[arg(long)]
    pin: Option<String>,
}

/// Prints the account's shard. An account that is not placed stays so: the
/// shard the ring would propose for it is printed, marked as not placed.
/// Only `--pin` places.
pub async fn run(config: &Config, args: RouteArgs) -> anyhow::Result<ExitCode> {
    let router = Router::connect(config).await?;
    let account = Account::new(args.account)?;
    if let Some(shard) = args.pin {
        let placement = router.place(&account, &shard).await?;
        if placement.placed_now {
            println!("{} (placed now)", placement.shard);
        } else {
            println!("{}", placement.shard);
        }
        return Ok(ExitCode::SUCCESS);
    }
    match router.placement(&account).await? {
        Some((shard, _epoch)) => println!("{shard}"),
        None => {
            // The router's own choice: the shards it offers new accounts
            // (weight, draining, schema) and its placement strategy.
            match router.propose(&account) {
                Some(shard) => println!(
                    "{shard} (not placed: the router's proposal; its first job or `shardq accounts pin {account} --to SHARD` places it)"
                ),
                None => println!(
                    "none (not placed, and no shard accepts new accounts: {})",
                    router.offered().1.iter().map(|(n, why)| format!("{n}: {why}")).collect::<Vec<_>>().join("; ")
                ),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
