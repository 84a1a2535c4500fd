//! `shardq queues pause|resume|paused`: stop and restart claiming a queue's
//! jobs on one shard (the same queue on other shards keeps running).

use std::process::ExitCode;
use std::sync::Arc;

use shardq::Client;
use shardq_router::{Config, Router};

/// Arguments of `queues`.
#[derive(clap::Args)]
pub struct QueuesArgs {
    #[command(subcommand)]
    command: QueuesCommand,
}

#[derive(clap::Subcommand)]
enum QueuesCommand {
    /// Pause a queue on a shard: no node claims its jobs there until it is
    /// resumed (running jobs finish; enqueues go on).
    Pause {
        /// The shard.
        #[arg(long)]
        shard: String,
        /// The queue.
        queue: String,
    },
    /// Resume a paused queue on a shard and wake its producers.
    Resume {
        /// The shard.
        #[arg(long)]
        shard: String,
        /// The queue.
        queue: String,
    },
    /// The queues paused on a shard.
    Paused {
        /// The shard.
        #[arg(long)]
        shard: String,
        /// Print a JSON array of `{queue, paused_at, paused_by}` instead.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `queues` subcommand.
pub async fn run(config: &Config, args: QueuesArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(Arc::new(Router::connect(config).await?));
    match args.command {
        QueuesCommand::Pause { shard, queue } => {
            let by = format!(
                "shardq queues pause (user {})",
                std::env::var("USER").unwrap_or_default()
            );
            if client.pause_queue(&shard, &queue, &by).await? {
                println!("queue {queue} paused on shard {shard}");
            } else {
                println!("queue {queue} was paused on shard {shard} already");
            }
        }
        QueuesCommand::Resume { shard, queue } => {
            if client.resume_queue(&shard, &queue).await? {
                println!("queue {queue} resumed on shard {shard}");
            } else {
                println!("queue {queue} was not paused on shard {shard}");
            }
        }
        QueuesCommand::Paused { shard, json } => {
            let paused = client.paused_queues(&shard).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&paused)?);
                return Ok(ExitCode::SUCCESS);
            }
            if paused.is_empty() {
                println!("no queue is paused on shard {shard}");
            }
            for p in paused {
                println!(
                    "{}\tpaused {}\tby {}",
                    p.queue,
                    p.paused_at.format("%Y-%m-%d %H:%M:%S UTC"),
                    p.paused_by
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
