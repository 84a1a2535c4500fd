//! Cancelling jobs and retrying them by hand: [`Client::cancel`] and
//! [`Client::retry`], and how a worker node learns that a job it runs was
//! cancelled.
//!
//! Cancelling a running job writes `cancelled` to its row at once (with the
//! reason in its errors) and, in the same transaction, sends
//! `NOTIFY shardq_cancel, '<id>'` on the job's shard. Only that shard's
//! listeners hear it: each node's notifier for the shard already holds the
//! one LISTEN connection, so no extra connection or polling is needed, and
//! the node running the job sets the run's cancel flag, which the handler
//! observes through [`JobContext::cancelled`](crate::JobContext::cancelled).
//! Notifications are lost across reconnects, so a per-shard sweeper also
//! checks, every heartbeat interval, whether any job this node runs has been
//! cancelled (one indexed query by id, only while it holds leases).
//!
//! The job ends `cancelled` whatever its handler then returns: the node's
//! outcome write matches `state = 'running'` and changes nothing, as for
//! Oban, where a cancelled job that completes anyway stays cancelled.

use std::sync::Arc;

use tokio::sync::watch;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::job::{JobId, JobRecord};
use crate::runtime::Node;
use crate::shard::ShardWork;
use crate::store::{self, JobChange};

/// Reason recorded in a job's errors when it is cancelled through the client.
const CANCEL_REASON: &str = "cancelled on request";

impl Client {
    /// Cancels a job. One that has not run yet (available, scheduled or
    /// waiting to retry) becomes `cancelled` and never runs. One that is
    /// running becomes `cancelled` at once and its handler is signalled
    /// ([`JobContext::cancelled`](crate::JobContext::cancelled)); it stays
    /// `cancelled` even if the handler ignores the signal and succeeds.
    /// The reason is appended to the job's errors. Cancelling a cancelled job
    /// does nothing; a completed or discarded job is an [`Error::JobState`].
    /// Returns the job as it is afterwards.
    pub async fn cancel(&self, id: &JobId) -> Result<JobRecord> {
        let db = self.router().shard(&id.shard)?;
        let change = store::job_cancel(&db.pool, id.id, CANCEL_REASON)
            .await
            .map_err(|e| db.error(e))?;
        match change {
            JobChange::Changed { was } => {
                tracing::info!(job = %id, was = %was, "job cancelled");
            }
            JobChange::Unchanged { .. } => {}
            JobChange::NotFound => return Err(Error::JobNotFound(id.to_string())),
            JobChange::Refused { state } => {
                return Err(Error::JobState {
                    id: id.to_string(),
                    state,
                    message: "only available (scheduled, retryable) or running jobs can be cancelled".into(),
                })
            }
        }
        self.job(id).await
    }

    /// Retries a discarded or cancelled job by hand: it becomes available
    /// now, keeping its errors, with one more attempt allowed when it had
    /// none left (`max_attempts` becomes at least `attempt + 1`; a job that
    /// still had attempts keeps its `max_attempts`). Any other state is an
    /// [`Error::JobState`] and nothing changes. Returns the job afterwards.
    pub async fn retry(&self, id: &JobId) -> Result<JobRecord> {
        let db = self.router().shard(&id.shard)?;
        let change = store::job_retry(&db.pool, id.id).await.map_err(|e| db.error(e))?;
        match change {
            JobChange::Changed { was } => {
                tracing::info!(job = %id, was = %was, "job retried by hand");
            }
            JobChange::NotFound => return Err(Error::JobNotFound(id.to_string())),
            JobChange::Refused { state } | JobChange::Unchanged { state } => {
                return Err(Error::JobState {
                    id: id.to_string(),
                    state,
                    message: "only discarded or cancelled jobs can be retried".into(),
                })
            }
        }
        self.job(id).await
    }
}

/// Handles a `shardq_cancel` notification: signals the run of job `payload`
/// if this node runs it on `shard`.
pub(crate) fn on_notification(shard: &ShardWork, payload: &str) {
    match payload.parse::<i64>() {
        Ok(id) => {
            signal(shard, &[id]);
        }
        Err(_) => {
            tracing::warn!(shard = %shard.db.name, payload, "ignoring a shardq_cancel notification that is not a job id")
        }
    }
}

/// Sets the cancel flag of the runs of `ids` this node holds on `shard`;
/// returns how many it signalled.
pub(crate) fn signal(shard: &ShardWork, ids: &[i64]) -> usize {
    let Ok(leases) = shard.leases.lock() else { return 0 };
    let mut n = 0;
    for id in ids {
        if let Some(lease) = leases.get(id).filter(|l| l.run.is_some()) {
            if !*lease.cancel.borrow() {
                lease.cancel.send_replace(true);
                tracing::info!(shard = %shard.db.name, id, "signalled cancellation to the running handler");
                n += 1;
            }
        }
    }
    n
}

/// The fallback for lost `shardq_cancel` notifications: every heartbeat
/// interval, signals runs on `shard` whose job has been cancelled. Runs until
/// `stop` (the end of shutdown, so cancels reach jobs in the grace period).
pub(crate) async fn sweeper(node: Arc<Node>, shard: Arc<ShardWork>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(node.options.heartbeat_interval) => {}
        }
        let running: Vec<i64> = match shard.leases.lock() {
            Ok(leases) => leases
                .iter()
                .filter(|(_, l)| l.run.is_some() && !*l.cancel.borrow())
                .map(|(id, _)| *id)
                .collect(),
            Err(_) => return,
        };
        if running.is_empty() {
            continue;
        }
        match store::job_cancelled_among(&shard.db.pool, &running).await {
            Ok(cancelled) => {
                signal(&shard, &cancelled);
            }
            Err(e) => tracing::warn!(shard = %shard.db.name, error = %shard.db.error(e), "cancel sweep failed"),
        }
    }
}
