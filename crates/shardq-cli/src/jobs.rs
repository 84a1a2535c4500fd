//! `shardq jobs show|list|cancel|retry`.

use std::process::ExitCode;
use std::sync::Arc;

use shardq::{Client, JobId, JobRecord};
use shardq_router::{Account, Config, Router};

/// Arguments of `jobs`.
#[derive(clap::Args)]
pub struct JobsArgs {
    #[command(subcommand)]
    command: JobsCommand,
}

#[derive(clap::Subcommand)]
enum JobsCommand {
    /// One job: args, state, attempts and every error.
    Show {
        /// The job id, SHARD:ID.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// An account's most recent jobs.
    List {
        /// The account.
        #[arg(long)]
        account: String,
        /// Only jobs in this state (available, running, completed, discarded, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// Most jobs to list.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Cancel a job: one not yet run never runs; a running one is signalled
    /// to stop and ends cancelled. Cancelling a cancelled job does nothing.
    Cancel {
        /// The job id, SHARD:ID.
        id: String,
    },
    /// Retry a discarded or cancelled job now (errors are kept; it gets one
    /// more attempt if it had none left).
    Retry {
        /// The job id, SHARD:ID.
        id: String,
    },
}

/// Runs a `jobs` subcommand.
pub async fn run(config: &Config, args: JobsArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(Arc::new(Router::connect(config).await?));
    match args.command {
        JobsCommand::Show { id, json } => {
            let job = client.job(&id.parse::<JobId>()?).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&job)?);
            } else {
                print_job(&job);
            }
        }
        JobsCommand::List { account, state, limit } => {
            let account = Account::new(account)?;
            println!(
                "{:<16} {:<12} {:<10} {:<16} {:>8}  run_at",
                "id", "state", "queue", "kind", "attempt"
            );
            for j in client.jobs_of(&account, state.as_deref(), limit).await? {
                println!(
                    "{:<16} {:<12} {:<10} {:<16} {:>4}/{:<3}  {}",
                    j.id.to_string(),
                    j.state,
                    j.queue,
                    j.kind,
                    j.attempt,
                    j.max_attempts,
                    j.run_at.to_rfc3339()
                );
            }
        }
        JobsCommand::Cancel { id } => {
            let job = client.cancel(&id.parse::<JobId>()?).await?;
            println!("{}: {}", job.id, job.state);
        }
        JobsCommand::Retry { id } => {
            let job = client.retry(&id.parse::<JobId>()?).await?;
            println!(
                "{}: {} (attempt {} of {})",
                job.id, job.state, job.attempt, job.max_attempts
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_job(j: &JobRecord) {
    println!("id:        {}", j.id);
    println!("account:   {}", j.account);
    println!("queue:     {}", j.queue);
    println!("kind:      {}", j.kind);
    println!("args:      {}", j.args);
    println!("state:     {}", j.state);
    println!("priority:  {}", j.priority);
    println!("attempts:  {} of {}", j.attempt, j.max_attempts);
    println!("run_at:    {}", j.run_at.to_rfc3339());
    println!("created:   {}", j.created_at.to_rfc3339());
    if let Some(node) = &j.locked_by {
        println!("leased by: {node}");
    }
    if let Some(errors) = j.errors.as_array().filter(|e| !e.is_empty()) {
        println!("errors:");
        for e in errors {
            println!(
                "  attempt {}  {}  {}",
                e["attempt"],
                e["at"].as_str().unwrap_or(""),
                e["error"].as_str().unwrap_or("")
            );
        }
    }
}
