//! The scheduler: a node's one task that enqueues the due occurrences of its
//! periodic jobs (see `periodic`), prunes their old records every ten
//! minutes, and sleeps until the next occurrence (at most 30 s). Spawned by
//! the composer when the node declares periodic jobs.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use shardq_router::Router;
use tokio::sync::watch;

use crate::error::ErrorChain;
use crate::periodic::PeriodicJob;

/// Longest sleep between two passes, so a clock change or a newly
/// reachable shard is noticed.
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// A node's scheduler: enqueues due occurrences of `jobs` until `stop`.
/// Starts `catch_up` back for each job; a pass that fails for a job is
/// repeated from the same point on the next pass.
pub(crate) async fn run(router: Arc<Router>, jobs: Arc<Vec<PeriodicJob>>, mut stop: watch::Receiver<bool>) {
    let start = Utc::now();
    let mut after: Vec<DateTime<Utc>> = jobs
        .iter()
        .map(|j| start - chrono::Duration::from_std(j.catch_up_window()).unwrap_or_default())
        .collect();
    let mut last_prune: Option<DateTime<Utc>> = None;
    loop {
        let now = Utc::now();
        for (job, after) in jobs.iter().zip(after.iter_mut()) {
            match job.enqueue_due(&router, *after, now).await {
                Ok(done) => {
                    *after = now;
                    let enqueued = done.iter().filter(|o| o.job.is_some()).count();
                    if !done.is_empty() {
                        tracing::debug!(periodic = %job.name(), enqueued, skipped = done.len() - enqueued, "periodic occurrences recorded");
                    }
                }
                Err(e) => {
                    tracing::warn!(periodic = %job.name(), error = %ErrorChain(&e), "enqueueing periodic occurrences failed; retrying next pass");
                }
            }
        }
        if last_prune.is_none_or(|at| now - at > chrono::Duration::minutes(10)) {
            for job in jobs.iter() {
                job.prune(&router, now).await;
            }
            last_prune = Some(now);
        }
        let next = jobs.iter().filter_map(|j| j.next_after(now)).min();
        let sleep = next
            .and_then(|at| (at - Utc::now()).to_std().ok())
            .unwrap_or(Duration::ZERO)
            .min(MAX_SLEEP)
            // A little past the occurrence, so it is not missed by rounding.
            + Duration::from_millis(5);
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(sleep) => {}
        }
        if *stop.borrow() {
            return;
        }
    }
}
