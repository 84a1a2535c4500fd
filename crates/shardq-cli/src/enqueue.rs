//! `shardq enqueue`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use shardq::{Client, NewJob};
use shardq_router::{Account, Config, Router};

/// Arguments of `enqueue`.
#[derive(clap::Args)]
pub struct EnqueueArgs {
    /// The account the job belongs to.
    #[arg(long)]
    account: String,
    /// Queue.
    #[arg(long, default_value = shardq::job::DEFAULT_QUEUE)]
    queue: String,
    /// Kind (selects the handler).
    #[arg(long)]
    kind: String,
    /// Args as JSON.
    #[arg(long, default_value = "{}")]
    args: String,
    /// Priority; lower runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i16,
    /// Attempts before the job is discarded.
    #[arg(long, default_value_t = shardq::job::DEFAULT_MAX_ATTEMPTS)]
    max_attempts: i32,
    /// Run after this delay, e.g. 10s, 5m.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "run_at")]
    delay: Option<Duration>,
    /// Run at this time (RFC 3339, e.g. 2026-01-01T00:00:00Z).
    #[arg(long)]
    run_at: Option<DateTime<Utc>>,
    /// Enqueue this many copies in one batch.
    #[arg(long, default_value_t = 1)]
    count: usize,
}

/// Enqueues and prints each job id as `SHARD:ID`.
pub async fn run(config: &Config, a: EnqueueArgs) -> anyhow::Result<ExitCode> {
    let account = Account::new(a.account)?;
    let mut job = NewJob::from_json_text(a.kind, &a.args)?
        .queue(a.queue)
        .priority(a.priority)
        .max_attempts(a.max_attempts);
    if let Some(d) = a.delay {
        job = job.delay(d);
    }
    if let Some(t) = a.run_at {
        job = job.run_at(t);
    }
    let client = Client::new(Arc::new(Router::connect(config).await?));
    let ids = if a.count == 1 {
        vec![client.enqueue(&account, job).await?]
    } else {
        client
            .enqueue_many((0..a.count).map(|_| (account.clone(), job.clone())))
            .await?
    };
    for id in ids {
        println!("{id}");
    }
    Ok(ExitCode::SUCCESS)
}
