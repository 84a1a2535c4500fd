//! The heartbeat: keeps this node's leases on one shard alive (running and
//! buffered jobs alike) in one statement every `heartbeat_interval`, which
//! writes only the leases that are no longer fresh. A lease it could not
//! renew (taken by a rescue, or run out while renewals failed) is lost: the
//! run is told to stop ([`CancelReason::LeaseLost`](crate::worker::CancelReason))
//! and its outcome is not written. At shutdown it hands
//! back the runs still going (available at once, the interrupted attempt not
//! counted). Spawned by the composer; reads `ShardWork::leases`.

use std::sync::Arc;
use std::time::Duration;

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
        renew(&node, &shard).await;
        release_orphans(&node, &shard).await;
    }
}

/// Renews the leases this node holds on `shard` in one statement, and
/// stops the runs whose lease it lost. Leases with more than
/// [`fresh_secs`] left (claimed since about half a beat ago) are not
/// written, only confirmed.
async fn renew(node: &Node, shard: &ShardWork) {
    let runs = shard.leases.held();
    if runs.is_empty() {
        return;
    }
    let lease = node.options.lease;
    let fresh = fresh_secs(lease, node.options.heartbeat_interval);
    let sent_at = Instant::now();
    let renewal = store::job_lease_renew(&shard.db, &runs, &node.id, lease.as_secs_f64(), fresh);
    // A renewal that outlasts the lease is as good as failed.
    let lost = match tokio::time::timeout(lease, renewal).await {
        Ok(Ok(held)) => {
            tracing::trace!(shard = %shard.db.name, held = held.len(), asked = runs.len(), "leases renewed");
            shard.leases.renewed(&runs, &held, sent_at)
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

/// Seconds left above which a lease is fresh and a beat leaves it alone:
/// `lease - interval / 2`. A lease skipped at one beat has more than
/// `lease - 1.5 × interval` left at the next (validated options keep the
/// interval under the lease; a lease under 1.5 beats renews every time).
fn fresh_secs(lease: Duration, interval: Duration) -> f64 {
    let fresh = lease.as_secs_f64() - interval.as_secs_f64() / 2.0;
    if fresh - interval.as_secs_f64() > 0.0 {
        fresh
    } else {
        lease.as_secs_f64()
    }
}

/// Claims of this node whose reply never reached it (the connection dropped
/// or timed out after the claim committed) leave rows `running` under its
/// name that it does not hold. Rescue would take them only when their lease
/// expires, counting an attempt that never ran (a `max_attempts = 1` job
/// would be discarded unrun). Each heartbeat finds them and makes them
/// available again with the attempt given back. Skipped while a claim is in
/// flight, whose rows would look the same.
async fn release_orphans(node: &Node, shard: &ShardWork) {
    let Some(mark) = shard.leases.claims_quiet() else {
        return;
    };
    let held: std::collections::HashSet<store::RunKey> = shard.leases.held().into_iter().collect();
    let timeout = node.options.shard_timeout;
    let Ok(Ok(mine)) = tokio::time::timeout(timeout, store::job_running_of_node(&shard.db, &node.id)).await else {
        return;
    };
    let mut orphans: Vec<store::RunKey> = mine.into_iter().filter(|r| !held.contains(r)).collect();
    if orphans.is_empty() || shard.leases.claims_quiet() != Some(mark) {
        return;
    }
    orphans.sort_unstable();
    match tokio::time::timeout(timeout, store::job_release_unclaimed(&shard.db, &orphans, &node.id)).await {
        Ok(Ok(n)) if n > 0 => {
            tracing::warn!(shard = %shard.db.name, released = n, "claims whose reply was lost made available again, their attempt not counted")
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(shard = %shard.db.name, error = %ErrorChain(&shard.db.error(e)), "releasing lost claims failed")
        }
        Err(_) => tracing::warn!(shard = %shard.db.name, "releasing lost claims did not answer in time"),
    }
}

/// Aborts this node's runs still going on `shard` and makes their jobs
/// available again (shutdown, after the grace period).
pub(crate) async fn hand_back(node: &Node, shard: &ShardWork) {
    let runs = shard.leases.abort_running();
    if runs.is_empty() {
        return;
    }
    match store::job_give_back(&shard.db, &runs, &node.id).await {
        Ok(n) => tracing::info!(shard = %shard.db.name, given_back = n, "handed running jobs back"),
        Err(e) => {
            tracing::warn!(shard = %shard.db.name, error = %shard.db.error(e), "hand-back failed; leases will expire and the jobs be rescued")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_skipped_at_one_beat_outlives_the_next() {
        let (lease, beat) = (Duration::from_secs(30), Duration::from_secs(10));
        let fresh = fresh_secs(lease, beat);
        assert_eq!(fresh, 25.0);
        // Skipped with just over `fresh` left, it has this much at the next beat:
        assert!(fresh - beat.as_secs_f64() > 0.0);
        // A lease too short for that is renewed at every beat.
        assert_eq!(fresh_secs(Duration::from_secs(3), Duration::from_secs(2)), 3.0);
    }
}
