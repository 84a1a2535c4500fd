//! The scheduler: a node's one task that enqueues the due occurrences of its
//! periodic jobs (see `periodic`), prunes their old records every ten
//! minutes, and sleeps until the next occurrence (at most 30 s). Spawned by
//! the composer when the node declares periodic jobs.
//!
//! Only what the node works: a pass writes to the shards this node works
//! now (owned, or still handed over; read through a callback at every
//! pass), and a global job's target only while its account's shard is one
//! of them, so a node opens no connection to a shard it does not own. Each
//! occurrence is still enqueued once per shard: the shard's owners write
//! it, and a shard a node starts to own gets the occurrences of its
//! catch-up window that no one recorded (its cursor stayed where it was).
//!
//! One sick shard never slows the healthy ones. The scheduler keeps one
//! [`Progress`] per job (a cursor per target shard), and each write of a
//! pass, one per (job, target), runs as its own task, bounded by the job's
//! write timeout. A pass starts the writes that are due and goes back to
//! sleep without waiting for them; a write that ends moves only its own
//! target's cursor (when it succeeded). A (job, target) whose write is
//! still running is left out of the passes that start meanwhile, so a
//! hanging shard has at most one write (and one prune) per job in flight,
//! and it is retried by the first pass after its write gave up. `stop` ends
//! the scheduler at once: the writes in flight are abandoned, their
//! transactions roll back, and their cursors did not move.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use shardq_router::Router;
use tokio::sync::watch;
use tokio::task::{Id, JoinSet};

use crate::error::{ErrorChain, Result};
use crate::periodic::{Occurrence, PeriodicJob, Progress, Target};

/// Longest sleep between two passes, so a clock change or a newly
/// reachable shard is noticed.
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// How often the records of every job are pruned.
const PRUNE_EVERY: chrono::Duration = chrono::Duration::minutes(10);

/// What a task of the scheduler does to one (job, target).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Work {
    /// Records and enqueues due occurrences.
    Write,
    /// Deletes records no pass needs any more.
    Prune,
}

/// One task in flight: the job (its index in `jobs`), the target, the work.
type Key = (usize, Target, Work);

/// What a task returned.
enum Outcome {
    /// A write covering occurrences up to `up_to`.
    Written {
        up_to: DateTime<Utc>,
        result: Result<Vec<Occurrence>>,
    },
    /// A prune.
    Pruned(Result<u64>),
}

/// A node's scheduler: enqueues due occurrences of `jobs` until `stop`, on
/// the shards `worked` names at each pass (see the module doc). Starts
/// `catch_up` back for each job. A write that fails or times out on one
/// target is repeated for that target only, from its own cursor, by the
/// next pass; the other targets go on without waiting for it.
pub(crate) async fn run(
    router: Arc<Router>,
    jobs: Arc<Vec<PeriodicJob>>,
    worked: impl Fn() -> BTreeSet<String>,
    mut stop: watch::Receiver<bool>,
) {
    let start = Utc::now();
    let mut progress: Vec<Progress> = jobs.iter().map(|j| j.progress(start)).collect();
    // Who reads and writes these: this loop only; tasks return their outcome.
    let mut tasks: JoinSet<Outcome> = JoinSet::new();
    let mut running: HashSet<Key> = HashSet::new();
    let mut keys: HashMap<Id, Key> = HashMap::new();
    let mut last_prune: Option<DateTime<Utc>> = None;
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        let now = Utc::now();
        let worked = worked();
        let mut targets = Vec::with_capacity(jobs.len());
        for job in jobs.iter() {
            let mut mine = Vec::new();
            for target in job.targets(&router) {
                if works_on(&router, &target, &worked).await {
                    mine.push(target);
                }
            }
            targets.push(mine);
        }
        for (index, (job, mine)) in jobs.iter().zip(&targets).enumerate() {
            for target in mine {
                let target = target.clone();
                let key = (index, target.clone(), Work::Write);
                if running.contains(&key) {
                    continue;
                }
                let Some(p) = progress.get_mut(index) else { continue };
                let after = p.after(&target, now);
                if job.occurrences(after, now).is_empty() {
                    // Nothing due: handled up to now, without a write.
                    p.advance(&target, now);
                    continue;
                }
                let (router, jobs) = (router.clone(), jobs.clone());
                let task = tasks.spawn(async move {
                    let result = match jobs.get(index) {
                        Some(job) => job.enqueue_due_on(&router, &target, after, now).await,
                        None => Ok(Vec::new()),
                    };
                    Outcome::Written { up_to: now, result }
                });
                keys.insert(task.id(), key.clone());
                running.insert(key);
            }
        }
        if last_prune.is_none_or(|at| now - at > PRUNE_EVERY) {
            for (index, mine) in targets.iter().enumerate() {
                for target in mine {
                    let target = target.clone();
                    let key = (index, target.clone(), Work::Prune);
                    let Some(p) = progress.get(index) else { continue };
                    if running.contains(&key) {
                        continue;
                    }
                    let before = p.prune_before(&target, now);
                    let (router, jobs) = (router.clone(), jobs.clone());
                    let task = tasks.spawn(async move {
                        Outcome::Pruned(match jobs.get(index) {
                            Some(job) => job.prune_on(&router, &target, before).await,
                            None => Ok(0),
                        })
                    });
                    keys.insert(task.id(), key.clone());
                    running.insert(key);
                }
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
        let wake = tokio::time::Instant::now() + sleep;
        // Sleep until the next pass, taking in the tasks that end meanwhile
        // (an ended task does not start a pass: a target that fails at once
        // is retried at the next occurrence, not in a loop).
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep_until(wake) => break,
                Some(ended) = tasks.join_next_with_id() => {
                    let (id, outcome) = match ended {
                        Ok((id, outcome)) => (id, Some(outcome)),
                        Err(e) => (e.id(), None),
                    };
                    let Some(key) = keys.remove(&id) else { continue };
                    running.remove(&key);
                    let (index, target, _) = key;
                    let (Some(job), Some(p)) = (jobs.get(index), progress.get_mut(index)) else { continue };
                    match outcome {
                        Some(Outcome::Written { up_to, result: Ok(done) }) => {
                            p.advance(&target, up_to);
                            let enqueued = done.iter().filter(|o| o.job.is_some()).count();
                            if !done.is_empty() {
                                tracing::debug!(periodic = %job.name(), %target, enqueued, skipped = done.len() - enqueued, "periodic occurrences recorded");
                            }
                        }
                        Some(Outcome::Written { result: Err(e), .. }) => {
                            tracing::warn!(periodic = %job.name(), %target, error = %ErrorChain(&e), "enqueueing periodic occurrences failed; retrying this target next pass");
                        }
                        Some(Outcome::Pruned(Ok(_))) => {}
                        Some(Outcome::Pruned(Err(e))) => {
                            tracing::debug!(periodic = %job.name(), %target, error = %ErrorChain(&e), "pruning periodic records failed");
                        }
                        None => {
                            tracing::warn!(periodic = %job.name(), %target, "a periodic write task ended without an outcome; retrying this target next pass");
                        }
                    }
                }
            }
        }
    }
}

/// Whether `target` is on a shard of `worked`. A global job's account is
/// looked up through the router (its cache, else the master); when that
/// fails the target is kept, and its write reports the error.
async fn works_on(router: &Router, target: &Target, worked: &BTreeSet<String>) -> bool {
    match target {
        Target::Shard(name) => worked.contains(name),
        Target::Account(account) => match router.shard_for(account).await {
            Ok(placement) => worked.contains(&placement.shard),
            Err(_) => true,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use shardq_router::Config;

    use super::*;
    use crate::job::NewJob;
    use crate::periodic::Tz;

    /// A shard whose host takes connections and never answers (frozen):
    /// `stop` ends the scheduler while its write hangs.
    #[tokio::test]
    async fn stop_is_not_held_up_by_a_shard_that_never_answers() {
        let frozen = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let port = frozen.local_addr().map(|a| a.port()).unwrap_or_default();
        let accepted = Arc::new(AtomicUsize::new(0));
        let seen = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = frozen.accept().await {
                seen.fetch_add(1, Ordering::SeqCst);
                held.push(socket);
            }
        });
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
        let closed_port = closed.local_addr().map(|a| a.port()).unwrap_or_default();
        drop(closed);
        let shard_url = format!("postgres://u@127.0.0.1:{port}/s");
        let mut config = Config::from_urls(
            &format!("postgres://u@127.0.0.1:{closed_port}/m"),
            &[("shard_1", shard_url.as_str())],
        )
        .unwrap_or_else(|e| panic!("config: {e}"));
        config.master.pool.acquire_timeout = Duration::from_millis(100);
        config.shards[0].database.pool.acquire_timeout = Duration::from_secs(3600);
        let router = Arc::new(Router::connect(&config).await.unwrap_or_else(|e| panic!("router: {e}")));
        let job = PeriodicJob::new(
            "t",
            "* * * * * *",
            Tz::UTC,
            NewJob::from_json("k", serde_json::json!({})),
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .catch_up(Duration::from_secs(10))
        .write_timeout(Duration::from_secs(3600));
        let (stop_tx, stop_rx) = watch::channel(false);
        let every = || BTreeSet::from(["shard_1".to_string()]);
        let scheduler = tokio::spawn(run(router, Arc::new(vec![job]), every, stop_rx));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while accepted.load(Ordering::SeqCst) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no write reached the frozen shard"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = stop_tx.send(true);
        let stopped = tokio::time::timeout(Duration::from_secs(30), scheduler).await;
        assert!(
            matches!(stopped, Ok(Ok(()))),
            "the scheduler did not return on stop while a shard write hangs"
        );
    }
}
