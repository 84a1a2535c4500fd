//! `shardq resources set|list|remove`: named resources, declared once in
//! the master, whose limits hold across every node and shard.

use std::process::ExitCode;
use std::sync::Arc;

use shardq::Client;
use shardq_router::{Config, Router};

/// Arguments of `resources`.
#[derive(clap::Args)]
pub struct ResourcesArgs {
    #[command(subcommand)]
    command: ResourcesCommand,
}

#[derive(clap::Subcommand)]
enum ResourcesCommand {
    /// Declare a resource or change its limits (a limit not given is
    /// removed): jobs that name it (`NewJob::resources`) start only holding
    /// one of its permits.
    Set {
        /// The resource's name (1 to 64 letters, digits, '_', '.' or '-').
        name: String,
        /// Most running jobs that use it, across every node and shard.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        concurrency: Option<u32>,
        /// Most starts per second (stored with the resource).
        #[arg(long)]
        rate: Option<f64>,
        /// Starts allowed at once above the rate (stored with the resource).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        burst: Option<u32>,
    },
    /// Every declared resource: its limits and the permits nodes lease now.
    List {
        /// Print a JSON array of `{name, concurrency, rate, burst, leased, nodes}`.
        #[arg(long)]
        json: bool,
    },
    /// Remove a resource (its jobs wait until it is declared again).
    Remove {
        /// The resource.
        name: String,
    },
}

/// Runs a `resources` subcommand.
pub async fn run(config: &Config, args: ResourcesArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(Arc::new(Router::connect(config).await?));
    match args.command {
        ResourcesCommand::Set {
            name,
            concurrency,
            rate,
            burst,
        } => {
            client.set_resource(&name, concurrency, rate, burst).await?;
            println!("resource {name}: {}", limits(concurrency, rate, burst));
            Ok(ExitCode::SUCCESS)
        }
        ResourcesCommand::List { json } => {
            let list = client.resources().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(ExitCode::SUCCESS);
            }
            if list.is_empty() {
                println!("no resources");
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<24} {:>11} {:>10} {:>7} {:>7} {:>6}",
                "resource", "concurrency", "rate/s", "burst", "leased", "nodes"
            );
            for r in &list {
                let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
                println!(
                    "{:<24} {:>11} {:>10} {:>7} {:>7} {:>6}",
                    r.name,
                    or_dash(r.concurrency.map(|c| c.to_string())),
                    or_dash(r.rate.map(|v| v.to_string())),
                    or_dash(r.burst.map(|b| b.to_string())),
                    r.leased,
                    r.nodes
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ResourcesCommand::Remove { name } => {
            if client.remove_resource(&name).await? {
                println!("resource {name} removed");
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("no resource {name} is declared");
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

/// The limits as one line: `concurrency 10, rate 100/s, burst 20`.
fn limits(concurrency: Option<u32>, rate: Option<f64>, burst: Option<u32>) -> String {
    let mut parts = Vec::new();
    if let Some(c) = concurrency {
        parts.push(format!("concurrency {c}"));
    }
    if let Some(r) = rate {
        parts.push(format!("rate {r}/s"));
    }
    if let Some(b) = burst {
        parts.push(format!("burst {b}"));
    }
    if parts.is_empty() {
        "no limits".into()
    } else {
        parts.join(", ")
    }
}
