//! The completer: one task per shard that writes run outcomes in batches
//! (one statement for completions, one for everything else), fenced by
//! attempt, and retries the write until the shard takes it.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use tokio::sync::{mpsc, watch};

use crate::metrics::JobMetrics;
use crate::shard::{ShardStats, ShardWork};
use crate::store::{self, Finish};

/// Most outcomes written in one batch.
const MAX_BATCH: usize = 5_000;

/// How a run ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    Completed,
    Failed(String),
    Snooze(Duration),
    Cancel(String),
}

/// A run's outcome, sent by the executor.
#[derive(Debug)]
pub(crate) struct Done {
    pub id: i64,
    pub attempt: i32,
    pub max_attempts: i32,
    pub outcome: Outcome,
    /// When the job was due (total latency counts from here).
    pub run_at: DateTime<Utc>,
    /// The (shard, queue, kind) handles the outcome is recorded into once written.
    pub metrics: Arc<JobMetrics>,
}

/// Retry backoff: `base · 2^(attempt-1)`, capped at `max`, ±20 % jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Delay after the first failure.
    pub base: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(3600),
        }
    }
}

impl Backoff {
    /// The delay before the run after failed attempt `attempt` (from 1).
    pub fn delay(&self, attempt: i32) -> Duration {
        let exp = attempt.clamp(1, 31) as u32 - 1;
        let d = self.base.saturating_mul(2u32.saturating_pow(exp)).min(self.max);
        d.mul_f64(rand::rng().random_range(0.8..1.2))
    }
}

/// Writes outcomes from `rx` until `finish` turns true, then writes what is
/// still queued and returns.
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
        if let Ok(mut leases) = shard.leases.lock() {
            for d in &batch {
                if leases.get(&d.id).is_some_and(|l| l.attempt == d.attempt) {
                    leases.remove(&d.id);
                }
            }
        }
        shard.leases_changed.notify_waiters();
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
                    state: if last { "discarded" } else { "available" },
                    run_at,
                    error: Some(message.clone()),
                    extra_attempts: 0,
                });
            }
            Outcome::Snooze(after) => finishes.push(Finish {
                id: d.id,
                attempt: d.attempt,
                state: "available",
                run_at: Some(Utc::now() + *after),
                error: None,
                extra_attempts: 1,
            }),
            Outcome::Cancel(reason) => finishes.push(Finish {
                id: d.id,
                attempt: d.attempt,
                state: "cancelled",
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
            "discarded" => &stats.discarded,
            "cancelled" => &stats.cancelled,
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
