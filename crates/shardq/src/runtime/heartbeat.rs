//! The heartbeat: keeps this node's leases on one shard alive, renewing them
//! all in one statement every `heartbeat_interval`. A lease it could not
//! renew (taken by a rescue, or run out while renewals failed) is lost: the
//! run is told to stop ([`CancelReason::LeaseLost`](crate::worker::CancelReason))
//! and its outcome is not written. At shutdown it hands
//! back the runs still going (available at once, the interrupted attempt not
//! counted). Spawned by the composer; reads `ShardWork::leases`.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;

use super::node::{Node, ShardWork};
use crate::error::ErrorChain;
use crate::observe::metrics;
use crate::store;

/// Renews the leases of every job this node holds on `shard` every
/// `heartbeat_interval`, until `stop`.
pub(crate) async fn run(node: Arc<Node>, shard: Arc<ShardWork>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(node.options.heartbeat_interval) => {}
        }
        let (ids, attempts) = shard.leases.held();
        if ids.is_empty() {
            continue;
        }
        let lease = node.options.lease;
        let sent_at = Instant::now();
        let renewal = store::job_lease_renew(&shard.db.pool, &ids, &attempts, &node.id, lease.as_secs_f64());
        // A renewal that outlasts the lease is as good as failed.
        let lost = match tokio::time::timeout(lease, renewal).await {
            Ok(Ok(renewed)) => {
                tracing::trace!(shard = %shard.db.name, renewed = renewed.len(), held = ids.len(), "leases renewed");
                let asked: Vec<(i64, i32)> = ids.into_iter().zip(attempts).collect();
                shard.leases.renewed(&asked, &renewed, sent_at, lease)
            }
            Ok(Err(e)) => {
                tracing::warn!(shard = %shard.db.name, error = %ErrorChain(&shard.db.error(e)), "lease renewal failed");
                shard.leases.expire(Instant::now())
            }
            Err(_) => {
                tracing::warn!(shard = %shard.db.name, "lease renewal did not answer within the lease");
                shard.leases.expire(Instant::now())
            }
        };
        if lost > 0 {
            metrics::leases_lost(&shard.db.name, lost as u64);
        }
    }
}

/// Aborts this node's runs still going on `shard` and makes their jobs
/// available again (shutdown, after the grace period).
pub(crate) async fn hand_back(node: &Node, shard: &ShardWork) {
    let (ids, attempts) = shard.leases.abort_running();
    if ids.is_empty() {
        return;
    }
    match store::job_give_back(&shard.db.pool, &ids, &attempts, &node.id).await {
        Ok(n) => tracing::info!(shard = %shard.db.name, given_back = n, "handed running jobs back"),
        Err(e) => {
            tracing::warn!(shard = %shard.db.name, error = %shard.db.error(e), "hand-back failed; leases will expire and the jobs be rescued")
        }
    }
}
