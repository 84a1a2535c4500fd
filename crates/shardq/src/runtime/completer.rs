//! The completer: one task per shard that writes run outcomes in batches
//! (one statement for completions, one for everything else), fenced by
//! each run's key (id, attempt, claim token), retries the write while the shard is unreachable (and splits a
//! batch the shard refuses, so one bad row never blocks the rest), then
//! releases the runs' leases. Fed by the producer's run callback with [`Done`] values.
//!
//! Batches flush on size or after a short linger: an outcome waits at most
//! [`LINGER`] for others to share its statement and commit. Outcomes queue
//! while a batch is written, so the next batch is as large as the stream
//! that arrived meanwhile. The producer frees a run's slot only after its
//! outcome is queued here, and claims nothing more while too many of its
//! jobs wait for their outcome's write: a completer that falls behind slows
//! claiming instead of piling up outcomes.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{mpsc, watch};

use super::node::{Done, ShardStats, ShardWork};
use super::options::Backoff;
use crate::job::JobState;
use crate::store::{self, Finish, RunKey};
use crate::worker::Outcome;

/// Most outcomes written in one batch.
const MAX_BATCH: usize = 5_000;
/// A batch this large is written at once; a smaller one waits up to
/// [`LINGER`] for more outcomes, so batches stay large under load (where
/// outcomes arrive in a stream) at the cost of that wait when idle.
const FLUSH_AT: usize = 256;
/// Longest a batch smaller than [`FLUSH_AT`] waits for more outcomes.
const LINGER: Duration = Duration::from_millis(1);

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
        let linger_until = tokio::time::Instant::now() + LINGER;
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(d) => batch.push(d),
                Err(_) if finishing || batch.len() >= FLUSH_AT => break,
                Err(_) => match tokio::time::timeout_at(linger_until, rx.recv()).await {
                    Ok(Some(d)) => batch.push(d),
                    _ => break,
                },
            }
        }
        tracing::debug!(shard = %shard.db.name, outcomes = batch.len(), "writing outcomes");
        write(&shard, &batch, &backoff).await;
        shard.leases.release(batch.iter().map(|d| d.run));
        batch.clear();
    }
}

/// Longest error text kept per attempt, in bytes; longer text is cut at a
/// character boundary and says how long it was.
const MAX_ERROR_BYTES: usize = 8 * 1024;

/// `text` as the jobs table can store it: NUL bytes (which Postgres text
/// refuses) written as `\0`, and at most [`MAX_ERROR_BYTES`].
fn storable(text: &str) -> String {
    let text = if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\\0"))
    } else {
        std::borrow::Cow::Borrowed(text)
    };
    if text.len() <= MAX_ERROR_BYTES {
        return text.into_owned();
    }
    let mut cut = MAX_ERROR_BYTES;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… (truncated from {} bytes)", &text[..cut], text.len())
}

/// One outcome as the store writes it.
enum Row {
    /// A completion.
    Complete(RunKey),
    /// Anything else.
    Finish(Finish),
}

impl Row {
    /// The row that writes `d`; `None` for a run whose lease was lost.
    fn of(d: &Done, backoff: &Backoff) -> Option<Row> {
        let finish = |state, retry_in, error: Option<String>, extra_attempts| {
            Some(Row::Finish(Finish {
                run: d.run,
                state,
                retry_in,
                error: error.map(|e| storable(&e)),
                extra_attempts,
            }))
        };
        match &d.outcome {
            Outcome::Completed => Some(Row::Complete(d.run)),
            Outcome::LeaseLost => None,
            Outcome::Failed(message) => {
                let last = d.run.attempt >= d.max_attempts;
                let retry_in = (!last).then(|| backoff.delay(d.run.attempt));
                let state = if last { JobState::Discarded } else { JobState::Available };
                finish(state, retry_in, Some(message.clone()), 0)
            }
            Outcome::Snooze(after) => finish(JobState::Available, Some(*after), None, 1),
            Outcome::Cancel(reason) => finish(
                JobState::Cancelled,
                None,
                Some(format!("cancelled by handler: {reason}")),
                0,
            ),
        }
    }

    fn id(&self) -> i64 {
        match self {
            Row::Complete(run) => run.id,
            Row::Finish(f) => f.run.id,
        }
    }
}

/// Writes one batch. A transient failure (connection lost, shard down) is
/// retried with backoff until the shard takes it; a permanent one splits
/// the batch so one bad row cannot hold back the others. A single row that
/// the shard refuses for good is left to its lease: it expires, and the
/// rescuer records the lost attempt.
async fn write(shard: &ShardWork, batch: &[Done], backoff: &Backoff) {
    let mut rows: Vec<Row> = batch.iter().filter_map(|d| Row::of(d, backoff)).collect();
    // In id order, as the heartbeat renews: two statements locking the same
    // jobs lock them in the same order and never deadlock.
    rows.sort_unstable_by_key(Row::id);
    let mut pending: Vec<&[Row]> = vec![&rows];
    let mut wait = Duration::from_millis(50);
    while let Some(part) = pending.pop() {
        let Err(e) = write_rows(shard, part).await else {
            count(&shard.stats, part);
            continue;
        };
        if store::error_is_transient(&e) {
            tracing::warn!(shard = %shard.db.name, error = %shard.db.error(e), jobs = part.len(), "writing outcomes failed; retrying");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
            // Completed ids stay pending with the rest; a job completed by
            // a previous try is fenced by `state = 'running'`.
            pending.push(part);
        } else if part.len() > 1 {
            let (a, b) = part.split_at(part.len() / 2);
            pending.push(b);
            pending.push(a);
        } else {
            let id = part.first().map(Row::id).unwrap_or_default();
            tracing::error!(shard = %shard.db.name, id, error = %shard.db.error(e), "the shard refused this job's outcome; its lease will expire and the job be rescued");
        }
    }
    release_serial_keys(shard, batch).await;
    let now = Utc::now();
    for d in batch {
        let latency = (now - d.run_at).to_std().unwrap_or_default();
        d.metrics
            .job_finished(&d.outcome, d.run.attempt >= d.max_attempts, latency);
    }
}

/// Releases the serial keys the batch's keyed runs held (their rows may have
/// been cancelled meanwhile, which the fenced writes above leave alone) and
/// wakes the producers waiting on the keys' next jobs. Retried like the
/// writes while the shard is unreachable; left to lease expiry otherwise.
async fn release_serial_keys(shard: &ShardWork, batch: &[Done]) {
    let mut keyed: Vec<RunKey> = batch.iter().filter(|d| d.keyed).map(|d| d.run).collect();
    keyed.sort_unstable();
    if keyed.is_empty() {
        return;
    }
    let mut wait = Duration::from_millis(50);
    for _ in 0..8 {
        match store::job_serial_release(&shard.db, &keyed).await {
            Ok(_) => return,
            Err(e) if store::error_is_transient(&e) => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::warn!(shard = %shard.db.name, error = %shard.db.error(e), "releasing serial keys failed; they are released when the leases expire");
                return;
            }
        }
    }
}

/// Writes `rows` in at most two statements: completions, then the rest.
async fn write_rows(shard: &ShardWork, rows: &[Row]) -> sqlx::Result<()> {
    let (mut completed, mut finishes) = (Vec::new(), Vec::new());
    for row in rows {
        match row {
            Row::Complete(run) => completed.push(*run),
            Row::Finish(f) => finishes.push(f.clone()),
        }
    }
    if !completed.is_empty() {
        store::job_complete_many(&shard.db, &completed).await?;
    }
    if !finishes.is_empty() {
        store::job_finish_many(&shard.db, &finishes).await?;
    }
    Ok(())
}

/// Adds written rows to the shard's run statistics.
fn count(stats: &ShardStats, rows: &[Row]) {
    for row in rows {
        let counter = match row {
            Row::Complete(..) => &stats.completed,
            Row::Finish(f) => match f.state {
                JobState::Discarded => &stats.discarded,
                JobState::Cancelled => &stats.cancelled,
                _ if f.extra_attempts > 0 => &stats.snoozed,
                _ => &stats.retried,
            },
        };
        ShardStats::add(counter, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_text_is_made_storable() {
        assert_eq!(storable("plain"), "plain");
        assert_eq!(storable("a\0b"), "a\\0b");
        let long = "é".repeat(MAX_ERROR_BYTES);
        let kept = storable(&long);
        assert!(kept.len() < MAX_ERROR_BYTES + 64, "{}", kept.len());
        assert!(kept.ends_with(&format!("(truncated from {} bytes)", long.len())));
    }
}
