//! The sampler: gauges that are read rather than counted. Per shard, a
//! cheap periodic query gives each queue's depth and the age of its oldest
//! due job (bounded index reads, see `store::QUEUE_DEPTH_SQL`), plus the
//! pool's connections in use; per node, each queue's free slots and
//! concurrency limit (read through a callback the composer gives it). Spawned by the composer.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::node::ShardWork;
use crate::error::ErrorChain;
use crate::observe::metrics;
use crate::store;

/// How often the sampler reads depths, pool and slot gauges.
pub(crate) const INTERVAL: Duration = Duration::from_secs(5);

/// Samples `queues` on `shard` every `interval` until `stop`.
pub(crate) async fn shard(
    shard: Arc<ShardWork>,
    queues: Vec<Arc<str>>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let pool = &shard.db;
        metrics::pool_connections(&shard.db.name, pool.pool.size(), pool.pool.num_idle());
        for queue in &queues {
            match store::queue_depth(pool, queue, store::QUEUE_DEPTH_CAP).await {
                Ok(d) => metrics::queue_depth(
                    &shard.db.name,
                    queue,
                    d.available,
                    d.scheduled,
                    Duration::from_secs_f64(d.oldest_secs.max(0.0)),
                ),
                Err(e) => {
                    tracing::debug!(shard = %shard.db.name, queue = %queue, error = %ErrorChain(&shard.db.error(e)), "depth sample failed");
                    break;
                }
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Sets each queue's free slots and concurrency limit on this node every
/// `interval` until `stop`; `read` reads them as (queue, free slots, limit).
pub(crate) async fn slots(
    read: impl Fn() -> Vec<(Arc<str>, usize, usize)>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        for (queue, free, limit) in read() {
            metrics::queue_free_slots(&queue, free);
            metrics::queue_concurrency(&queue, limit);
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
