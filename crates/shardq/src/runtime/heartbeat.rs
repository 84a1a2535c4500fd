//! Leases: the heartbeat that renews this node's leases on a shard in one
//! statement, and the rescuer that returns jobs whose lease expired (their
//! node died or was cut off) to the queue.

use std::sync::Arc;

use rand::Rng;
use tokio::sync::watch;

use crate::error::ErrorChain;
use crate::metrics;
use crate::runtime::Node;
use crate::shard::ShardWork;
use crate::store;

/// Renews the leases of every job this node holds on `shard` every
/// `heartbeat_interval`, until `stop`.
pub(crate) async fn heartbeat(node: Arc<Node>, shard: Arc<ShardWork>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(node.options.heartbeat_interval) => {}
        }
        let (ids, _) = shard.leased();
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

/// Rescues expired leases on `shard` every `rescue_interval` (jittered), until `stop`.
pub(crate) async fn rescuer(node: Arc<Node>, shard: Arc<ShardWork>, mut stop: watch::Receiver<bool>) {
    const BATCH: i64 = 1_000;
    loop {
        let wait = node.options.rescue_interval.mul_f64(rand::rng().random_range(0.8..1.2));
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        loop {
            match store::job_rescue_expired(&shard.db.pool, BATCH).await {
                Ok(n) => {
                    if n > 0 {
                        metrics::jobs_rescued(&shard.db.name, n);
                        tracing::info!(shard = %shard.db.name, rescued = n, "rescued jobs with expired leases");
                    }
                    if n < BATCH as u64 {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(shard = %shard.db.name, error = %ErrorChain(&shard.db.error(e)), "rescue failed");
                    break;
                }
            }
        }
    }
}
