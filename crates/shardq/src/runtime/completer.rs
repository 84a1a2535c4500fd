//! The completer: one task per shard that writes run outcomes in batches
//! (one statement for completions, one for everything else), fenced by
//! attempt, retries the write until the shard takes it, then releases the
//! runs' leases. Fed by the producer's run callback with [`Done`] values.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{mpsc, watch};

use super::node::{Done, ShardStats, ShardWork};
use super::options::Backoff;
use crate::job::JobState;
use crate::store::{self, Finish};
use crate::worker::Outcome;

/// Most outcomes written in one batch.
const MAX_BATCH: usize = 5_000;

/// Writes outcomes from `rx` until `finish` turns true (or every sender is
/// gone), then writes what is still queued and returns.
pub(crate) async fn run(
    shard: Arc<ShardWork>,
    mut rx: mpsc::Receiver<Done>,
    backoff: Backoff,
    mut finish: watch::Receiver<bool>,
) {
    let mut batch = Vec::new();
    let mut finishing = false;
    loop {
        let first = if finishing {
            rx.try_recv().ok()
        } else {
            tokio::select! {
                d = rx.recv() => d,
                _ = finish.changed() => {
                    finishing = true;
                    rx.try_recv().ok()
                }
            }
        };
        let Some(first) = first else { return };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(d) => batch.push(d),
                Err(_) => break,
            }
        }
        tracing::debug!(shard = %shard.db.name, outcomes = batch.len(), "writing outcomes");
        write(&shard, &batch, &backoff).await;
        shard.leases.release(batch.iter().map(|d| (d.id, d.attempt)));
        batch.clear();
    }
}

/// Writes one batch, retrying with backoff while the shard is unreachable.
async fn write(shard: &ShardWork, batch: &[Done], backoff: &Backoff) {
    let mut ids = Vec::new();
    let mut attempts = Vec::new();
    let mut finishes = Vec::new();
    let stats = &shard.stats;
    for d in batch {
        match &d.outcome {
            Outcome::Completed => {
                ids.push(d.id);
                attempts.push(d.attempt);
            }
            Outcome::Failed(message) => {
                let last = d.attempt >= d.max_attempts;
                let run_at = (!last).then(|| Utc::now() + backoff.delay(d.attempt));
                finishes.push(Finish {
                    id: d.id,
                    attempt: d.attempt,
                    state: if last { JobState::Discarded } else { JobState::Available },
                    run_at,
                    error: Some(message.clone()),
                    extra_attempts: 0,
                });
            }
            Outcome::Snooze(after) => finishes.push(Finish {
                id: d.id,
                attempt: d.attempt,
                state: JobState::Available,
                run_at: Some(Utc::now() + *after),
                error: None,
                extra_attempts: 1,
            }),
            Outcome::Cancel(reason) => finishes.push(Finish {
                id: d.id,
                attempt: d.attempt,
                state: JobState::Cancelled,
                run_at: None,
                error: Some(format!("cancelled by handler: {reason}")),
                extra_attempts: 0,
            }),
        }
    }
    let mut wait = Duration::from_millis(50);
    loop {
        let result = async {
            if !ids.is_empty() {
                store::job_complete_many(&shard.db.pool, &ids, &attempts).await?;
            }
            if !finishes.is_empty() {
                store::job_finish_many(&shard.db.pool, &finishes).await?;
            }
            Ok::<_, sqlx::Error>(())
        }
        .await;
        match result {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(shard = %shard.db.name, error = %shard.db.error(e), jobs = batch.len(), "writing outcomes failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
                // Completed ids stay pending with the rest; a job completed by
                // a previous try is fenced by `state = 'running'`.
            }
        }
    }
    ShardStats::add(&stats.completed, ids.len() as u64);
    for f in &finishes {
        let counter = match f.state {
            JobState::Discarded => &stats.discarded,
            JobState::Cancelled => &stats.cancelled,
            _ if f.extra_attempts > 0 => &stats.snoozed,
            _ => &stats.retried,
        };
        ShardStats::add(counter, 1);
    }
    let now = Utc::now();
    for d in batch {
        let latency = (now - d.run_at).to_std().unwrap_or_default();
        d.metrics.job_finished(&d.outcome, d.attempt >= d.max_attempts, latency);
    }
}
