//! The executor: runs one fetched job's handler with its timeout, turns a
//! panic into an error message, and returns the run's [`Done`]. A job told
//! to stop while it waited in its producer's buffer is not run: its `Done`
//! says why (lease lost, or cancelled). Called by
//! the producer inside the run's own task; what happens to the outcome
//! (slot, lease, completer) is the producer's callback.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::FutureExt;
use tokio::sync::watch;
use tracing::Instrument;

use super::node::{Done, Node, ShardWork};
use crate::job::JobId;
use crate::store::FetchedJob;
use crate::worker::{CancelReason, JobContext, JobError, Outcome};

/// Runs one job to its outcome. Called in its own task by the producer.
pub(crate) async fn execute(
    node: &Node,
    shard: &ShardWork,
    queue: &Arc<str>,
    job: FetchedJob,
    cancelled: watch::Receiver<Option<CancelReason>>,
) -> Done {
    let metrics = shard.metrics.get(queue, &job.kind);
    // A job told to stop while it waited in its producer's buffer (lease
    // lost, or cancelled) is not started; its outcome is set below.
    let stopped_before = cancelled.borrow().is_some();
    let mut outcome = if stopped_before {
        Outcome::LeaseLost
    } else {
        let pickup = (Utc::now() - job.run_at).num_microseconds().unwrap_or(0).max(0) as u64;
        shard.stats.record_pickup(pickup);
        let running = metrics.job_started(Duration::from_micros(pickup));
        let span = tracing::info_span!("job", shard = %shard.db.name, queue = %queue, kind = %job.kind, id = job.id, attempt = job.attempt);
        let started = std::time::Instant::now();
        let outcome = run_handler(node, shard, queue, &job, cancelled.clone())
            .instrument(span.clone())
            .await;
        metrics.job_ran(started.elapsed());
        drop(running);
        if let Outcome::Failed(error) = &outcome {
            if job.attempt >= job.max_attempts {
                tracing::warn!(parent: &span, %error, max_attempts = job.max_attempts, "job failed on its last attempt; discarded");
            } else {
                tracing::debug!(parent: &span, %error, "job failed; will retry");
            }
        }
        outcome
    };
    match *cancelled.borrow() {
        // Cancelled while running: the row is already `cancelled` (the write
        // is fenced off), whatever the handler returned.
        Some(CancelReason::Requested) if stopped_before => {
            outcome = Outcome::Cancel("cancelled on request before it started".into())
        }
        Some(CancelReason::Requested) => outcome = Outcome::Cancel("cancelled on request while running".into()),
        // Another node may run the job now: this run's outcome is not written.
        Some(CancelReason::LeaseLost) => outcome = Outcome::LeaseLost,
        None => {}
    }
    Done {
        run: job.key(),
        max_attempts: job.max_attempts,
        keyed: job.keyed,
        outcome,
        run_at: job.run_at,
        metrics,
    }
}

async fn run_handler(
    node: &Node,
    shard: &ShardWork,
    queue: &str,
    job: &FetchedJob,
    cancelled: watch::Receiver<Option<CancelReason>>,
) -> Outcome {
    let Some(handler) = node.registry.get(&job.kind) else {
        return Outcome::Failed(format!(
            "no handler for kind {:?} on node {} (registered: {})",
            job.kind,
            node.id,
            node.registry.kinds().join(", ")
        ));
    };
    let ctx = JobContext {
        id: JobId {
            shard: shard.db.name.clone(),
            id: job.id,
        },
        account: job.account.clone(),
        queue: queue.to_string(),
        kind: job.kind.clone(),
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        cancelled,
    };
    let fut = match (handler.run)(ctx, job.args.0.clone()) {
        Ok(fut) => fut,
        Err(message) => return Outcome::Failed(message),
    };
    // The handler runs inside this task: dropping the run (shutdown hands the
    // job back) drops the handler too, and a panic unwinds only to here.
    match tokio::time::timeout(handler.timeout, AssertUnwindSafe(fut).catch_unwind()).await {
        Ok(Ok(Ok(()))) => Outcome::Completed,
        Ok(Ok(Err(JobError::Failed(m)))) => Outcome::Failed(m),
        Ok(Ok(Err(JobError::Snooze(d)))) => Outcome::Snooze(d),
        Ok(Ok(Err(JobError::Cancel(r)))) => Outcome::Cancel(r),
        Ok(Err(panic)) => Outcome::Failed(format!("handler panicked: {}", panic_message(panic))),
        Err(_) => Outcome::Failed(format!("timed out after {}", human(handler.timeout))),
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_string()
    }
}

fn human(d: Duration) -> String {
    if d.as_millis() < 1000 {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}
