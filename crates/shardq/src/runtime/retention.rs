//! Retention: one pruner task per shard deletes jobs that reached a final
//! state (`completed`, `cancelled`, `discarded`) longer ago than the node's
//! retention for that state (`RuntimeOptions::retain_*`).
//!
//! Each pass deletes in batches of [`BATCH`] rows, oldest `finalized_at`
//! first, walking `jobs_finalized_idx`; each batch is one short statement
//! that skips rows another transaction holds, so pruning never blocks
//! producers, completers or a concurrent retry for long. Every node prunes
//! every shard it works; concurrent pruners skip each other's rows. Spawned
//! by the composer.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;

use super::node::{Node, ShardWork};
use crate::store::{self, Finished};

/// Most jobs deleted by one statement.
pub(crate) const BATCH: i64 = 1_000;

/// Longest retention honoured, in seconds (about 100 years); longer means "keep".
const MAX_RETAIN_SECS: f64 = 100.0 * 365.0 * 86_400.0;

/// Prunes finished jobs on `shard` every `prune_interval` (jittered), until `stop`.
pub(crate) async fn pruner(node: Arc<Node>, shard: Arc<ShardWork>, mut stop: watch::Receiver<bool>) {
    let opts = &node.options;
    loop {
        let wait = opts.prune_interval.mul_f64(rand::rng().random_range(0.8..1.2));
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        for state in Finished::ALL {
            let keep = match state {
                Finished::Completed => opts.retain_completed,
                Finished::Cancelled => opts.retain_cancelled,
                Finished::Discarded => opts.retain_discarded,
            };
            if *stop.borrow() {
                return;
            }
            prune(&shard, state, keep).await;
        }
    }
}

/// Deletes every job of `state` on `shard` older than `keep`, batch by batch.
async fn prune(shard: &ShardWork, state: Finished, keep: Duration) -> u64 {
    let secs = keep.as_secs_f64().min(MAX_RETAIN_SECS);
    let mut total = 0;
    loop {
        match store::job_prune_finished(&shard.db, state, secs, BATCH).await {
            Ok(n) => {
                total += n;
                if n < BATCH as u64 {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(shard = %shard.db.name, state = state.as_str(), error = %shard.db.error(e), "pruning failed; retrying next pass");
                break;
            }
        }
    }
    if total > 0 {
        tracing::debug!(shard = %shard.db.name, state = state.as_str(), pruned = total, "pruned finished jobs");
    }
    total
}
