//! The heartbeat: keeps this node's leases on one shard alive, renewing them
//! all in one statement every `heartbeat_interval`, and at shutdown hands
//! back the runs still going (available at once, the interrupted attempt not
//! counted). Spawned by the composer; reads `ShardWork::leases`.

use std::sync::Arc;

use tokio::sync::watch;

use super::node::{Node, ShardWork};
use crate::error::ErrorChain;
use crate::store;

/// Renews the leases of every job this node holds on `shard` every
/// `heartbeat_interval`, until `stop`.
pub(crate) async fn run(node: Arc<Node>, shard: Arc<ShardWork>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(node.options.heartbeat_interval) => {}
        }
        let (ids, _) = shard.leases.held();
        if ids.is_empty() {
            continue;
        }
        let lease = node.options.lease.as_secs_f64();
        match store::job_lease_renew(&shard.db.pool, &ids, &node.id, lease).await {
            Ok(n) => tracing::trace!(shard = %shard.db.name, renewed = n, held = ids.len(), "leases renewed"),
            Err(e) => {
                tracing::warn!(shard = %shard.db.name, error = %ErrorChain(&shard.db.error(e)), "lease renewal failed")
            }
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
