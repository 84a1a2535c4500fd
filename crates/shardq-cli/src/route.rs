//! `shardq route ACCOUNT`: where an account lives, without placing it.

use std::process::ExitCode;

use serde::Serialize;
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
    /// Print one JSON object (`account`, `shard`, `placed`, `placed_now`,
    /// `epoch`, `why_none`: `[{shard, why}]`) instead of a line.
    #[arg(long)]
    json: bool,
}

/// Where an account lives, or would go (the `--json` form of `route`).
#[derive(Serialize)]
struct Route {
    /// The account.
    account: String,
    /// Its shard; when not placed, the router's proposal (`None`: no shard
    /// takes new accounts).
    shard: Option<String>,
    /// Whether the master holds its placement (after this call).
    placed: bool,
    /// Whether this call placed it (`--pin` of a new account).
    placed_now: bool,
    /// Its placement's epoch, when placed and looked up.
    epoch: Option<i64>,
    /// Why no shard is proposed: each shard with the reason it takes no new
    /// accounts.
    why_none: Vec<Refusal>,
}

/// A shard that takes no new accounts, and why.
#[derive(Serialize)]
struct Refusal {
    /// The shard.
    shard: String,
    /// Why it takes no new accounts.
    why: String,
}

/// Prints the account's shard. An account that is not placed stays so: the
/// shard the ring would propose for it is printed, marked as not placed.
/// Only `--pin` places.
pub async fn run(config: &Config, args: RouteArgs) -> anyhow::Result<ExitCode> {
    let router = Router::connect(config).await?;
    let account = Account::new(args.account)?;
    let route = if let Some(shard) = args.pin {
        let placement = router.place(&account, &shard).await?;
        Route {
            account: account.to_string(),
            shard: Some(placement.shard),
            placed: true,
            placed_now: placement.placed_now,
            epoch: None,
            why_none: Vec::new(),
        }
    } else {
        match router.placement(&account).await? {
            Some((shard, epoch)) => Route {
                account: account.to_string(),
                shard: Some(shard),
                placed: true,
                placed_now: false,
                epoch: Some(epoch),
                why_none: Vec::new(),
            },
            // The router's own choice: the shards it offers new accounts
            // (weight, draining, schema) and its placement strategy.
            None => {
                let shard = router.propose(&account);
                let why_none = match shard {
                    Some(_) => Vec::new(),
                    None => router
                        .offered()
                        .1
                        .into_iter()
                        .map(|(shard, why)| Refusal { shard, why })
                        .collect(),
                };
                Route {
                    account: account.to_string(),
                    shard,
                    placed: false,
                    placed_now: false,
                    epoch: None,
                    why_none,
                }
            }
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&route)?);
        return Ok(ExitCode::SUCCESS);
    }
    match (&route.shard, route.placed) {
        (Some(shard), true) if route.placed_now => println!("{shard} (placed now)"),
        (Some(shard), true) => println!("{shard}"),
        (Some(shard), false) => println!(
            "{shard} (not placed: the router's proposal; its first job or `shardq accounts pin {account} --to SHARD` places it)"
        ),
        (None, _) => println!(
            "none (not placed, and no shard accepts new accounts: {})",
            route
                .why_none
                .iter()
                .map(|r| format!("{}: {}", r.shard, r.why))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    }
    Ok(ExitCode::SUCCESS)
}
