//! `shardq route ACCOUNT`.

use std::process::ExitCode;

use shardq_router::{Account, Config, Router};

/// Arguments of `route`.
#[derive(clap::Args)]
pub struct RouteArgs {
    /// The account id.
    account: String,
    /// Pin a new account to this shard instead of letting the ring choose.
    #[arg(long)]
    pin: Option<String>,
}

/// Prints the account's shard, and whether it was just placed.
pub async fn run(config: &Config, args: RouteArgs) -> anyhow::Result<ExitCode> {
    let router = Router::connect(config).await?;
    let account = Account::new(args.account)?;
    let placement = match args.pin {
        Some(shard) => router.place(&account, &shard).await?,
        None => router.shard_for(&account).await?,
    };
    if placement.placed_now {
        println!("{} (placed now)", placement.shard);
    } else {
        println!("{}", placement.shard);
    }
    Ok(ExitCode::SUCCESS)
}
