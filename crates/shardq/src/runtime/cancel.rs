//! How a worker node learns that a job it runs was cancelled, and tells the
//! handler. The request itself is `Client::cancel`.
//!
//! Cancelling a running job writes `cancelled` to its row at once (with the
//! reason in its errors) and, in the same transaction, sends
//! `NOTIFY shardq_cancel, '<id>'` on the job's shard. Only that shard's
//! listeners hear it: each node's notifier for the shard already holds the
//! one LISTEN connection, so no extra connection or polling is needed, and
//! the node running the job sets the run's cancel flag, which the handler
//! observes through `JobContext::cancelled`.
//! Notifications are lost across reconnects, so a per-shard sweeper also
//! checks, every heartbeat interval, whether any job this node runs has been
//! cancelled (one indexed query by id, only while it holds leases).
//!
//! The job ends `cancelled` whatever its handler then returns: the node's
//! outcome write matches `state = 'running'` and changes nothing, as for
//! Oban, where a cancelled job that completes anyway stays cancelled.

use std::sync::Arc;

use tokio::sync::watch;

use super::node::{Node, ShardWork};
use crate::store;

/// Handles a `shardq_cancel` notification: signals the run of job `payload`
/// if this node runs it on `shard`. The composer subscribes it to the
/// shard's notifier.
pub(crate) fn on_notification(shard: &ShardWork, payload: &str) {
    match payload.parse::<i64>() {
        Ok(id) => signal(shard, &[id]),
        Err(_) => {
            tracing::warn!(shard = %shard.db.name, payload, "ignoring a shardq_cancel notification that is not a job id")
        }
    }
}

/// Sets the cancel flag of the runs of `ids` this node holds on `shard`.
fn signal(shard: &ShardWork, ids: &[i64]) {
    for id in shard.leases.signal_cancel(ids) {
        tracing::info!(shard = %shard.db.name, id, "signalled cancellation to the running handler");
    }
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
        let running = shard.leases.running_unsignalled();
        if running.is_empty() {
            continue;
        }
        match store::job_cancelled_among(&shard.db, &running).await {
            Ok(cancelled) => signal(&shard, &cancelled),
            Err(e) => tracing::warn!(shard = %shard.db.name, error = %shard.db.error(e), "cancel sweep failed"),
        }
    }
}
