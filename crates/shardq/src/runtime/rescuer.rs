//! The rescuer: per shard, every `rescue_interval` (jittered), returns jobs
//! whose lease expired (their node died or was cut off) to the queue, or
//! discards them when they had no attempt left, and frees serial keys still
//! held by runs whose lease expired. Any node rescues any node's
//! jobs on the shards it works. Spawned by the composer.

use std::sync::Arc;

use rand::Rng;
use tokio::sync::watch;

use super::node::{Node, ShardWork};
use crate::error::ErrorChain;
use crate::observe::metrics;
use crate::store;

/// Rescues expired leases on `shard` every `rescue_interval` (jittered), until `stop`.
pub(crate) async fn run(node: Arc<Node>, shard: Arc<ShardWork>, mut stop: watch::Receiver<bool>) {
    const BATCH: i64 = 1_000;
    loop {
        let wait = node.options.rescue_interval.mul_f64(rand::rng().random_range(0.8..1.2));
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        loop {
            match store::job_rescue_expired(&shard.db, BATCH).await {
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
        match store::job_serial_release_expired(&shard.db, BATCH).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(shard = %shard.db.name, released = n, "released serial keys of runs whose lease expired")
            }
            Err(e) => {
                tracing::warn!(shard = %shard.db.name, error = %ErrorChain(&shard.db.error(e)), "releasing expired serial keys failed")
            }
        }
    }
}
