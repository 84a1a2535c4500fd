//! The producer: one task per (shard, queue). Woken by the shard's notifier,
//! by released slots, or by a jittered poll (the fallback when notifications
//! are lost), it waits out a short cooldown so bursts of wake-ups coalesce,
//! then claims as many due jobs as it has free slots in one statement, and
//! claims again at once while batches come back full.
//!
//! Each claimed job runs in its own task through the executor; when the run
//! ends, the producer's callback frees its slot, marks its lease ended and
//! sends its [`Done`] to the shard's completer.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use super::executor;
use super::node::{Done, Node, ShardWork};
use super::slots::QueueSlots;
use super::wakeup;
use crate::observe::metrics;
use crate::store::{self, FetchParams, FetchedJob};
use crate::worker::CancelReason;

/// One producer's fixed inputs.
pub(crate) struct Producer {
    pub node: Arc<Node>,
    pub shard: Arc<ShardWork>,
    pub queue: Arc<str>,
    pub slots: Arc<QueueSlots>,
    /// Notified by the notifier and by released slots; `notify_one` keeps a permit.
    pub wake: Arc<Notify>,
    /// The shard's completer inbox: every ended run's outcome goes here.
    pub done: mpsc::Sender<Done>,
}

impl Producer {
    /// Runs until `stop` turns true; returns after the fetch in progress, if any.
    pub(crate) async fn run(self, mut stop: watch::Receiver<bool>) {
        let opts = &self.node.options;
        let mut last_fetch = Instant::now() - opts.fetch_cooldown;
        let mut error_wait = Duration::from_millis(100);
        // When the queue's earliest scheduled job is due, read after the last
        // short fetch (see `wakeup`).
        let mut due: Option<Instant> = None;
        // Whether the last short claim left jobs that were already due.
        let mut left_due = false;
        // Where this producer's next fair claim resumes its rotation over accounts.
        let mut after: Option<String> = None;
        loop {
            let poll = opts.poll_interval.mul_f64(rand::rng().random_range(0.9..1.1));
            let sleep = wakeup::sleep_for(poll, due, Instant::now());
            tokio::select! {
                _ = stop.changed() => {}
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
            if *stop.borrow() {
                return;
            }
            // A due time that has passed is used up; the next short fetch reads a new one.
            due = due.filter(|at| *at > Instant::now());
            let since = last_fetch.elapsed();
            if since < opts.fetch_cooldown {
                tokio::time::sleep(opts.fetch_cooldown - since).await;
            }
            while !*stop.borrow() {
                let fetched = self.fetch(&mut after).await;
                // The cooldown counts from the end of the fetch, so slots
                // freed while it ran gather into the next claim.
                last_fetch = Instant::now();
                match fetched {
                    Ok(None) => break, // no free slot: a released slot wakes us
                    Ok(Some((want, got))) => {
                        error_wait = Duration::from_millis(100);
                        if got < want {
                            due = wakeup::next_due(&self.shard, &self.queue, opts.shard_timeout).await;
                            // Due jobs a claim leaves are held by another
                            // claim in flight or blocked behind their serial
                            // key. Look once more shortly; if that claims
                            // nothing either, wait for a notification (a
                            // key's release sends one) or the poll instead
                            // of re-reading the blocked chain every 10 ms.
                            let due_now = due.is_some_and(|at| at <= Instant::now());
                            if due_now && left_due && got == 0 {
                                due = None;
                            }
                            left_due = due_now;
                            break;
                        }
                    }
                    Err(e) if store::claim_lost_serial_race(&e) => {
                        tracing::debug!(shard = %self.shard.db.name, queue = %self.queue, "a concurrent claim took a serial key this claim picked; claiming again");
                    }
                    Err(e) => {
                        // A shard that cannot be fetched from gives up its
                        // share of the slots until it answers again.
                        self.slots.set_failing(self.shard.index);
                        tracing::warn!(shard = %self.shard.db.name, queue = %self.queue, error = %self.shard.db.error(e), "fetch failed; backing off");
                        tokio::select! {
                            _ = stop.changed() => return,
                            _ = tokio::time::sleep(error_wait) => {}
                        }
                        error_wait = (error_wait * 2).min(Duration::from_secs(5));
                        self.wake.notify_one();
                        break;
                    }
                }
            }
        }
    }

    /// Claims as many due jobs as there are free slots, and starts them:
    /// `None` when no slot is free, else (slots reserved, jobs claimed).
    ///
    /// The connection comes first, with no slot reserved: a shard whose
    /// server is down or not answering holds no slot while the node waits
    /// on it. Each wait is bounded by `shard_timeout`; a claim that timed out
    /// closes its connection.
    async fn fetch(&self, after: &mut Option<String>) -> sqlx::Result<Option<(usize, usize)>> {
        let opts = &self.node.options;
        let index = self.shard.index;
        if !self.slots.has_free(index) {
            return Ok(None);
        }
        self.slots.waiting_on_shard(index);
        let mut conn = tokio::time::timeout(opts.shard_timeout, self.shard.db.pool.acquire())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??;
        let want = self.slots.reserve(index, opts.max_batch);
        if want == 0 {
            return Ok(None);
        }
        let params = FetchParams {
            queue: &self.queue,
            limit: want as i64,
            node: &self.node.id,
            lease_secs: opts.lease.as_secs_f64(),
            aging_secs: opts.priority_aging.map(|d| d.as_secs_f64()),
            fair: !opts.fifo_queues.iter().any(|q| **q == *self.queue),
            after: after.as_deref(),
        };
        // Until its jobs are recorded, the orphan check leaves this node's
        // unheld running rows alone: they may be this claim's.
        let _claiming = self.shard.leases.claiming();
        let claimed_at = Instant::now();
        let claimed = tokio::time::timeout(opts.shard_timeout, store::job_fetch_available(&mut *conn, &params)).await;
        let jobs = match claimed {
            Ok(Ok(jobs)) => jobs,
            Ok(Err(e)) => {
                self.slots.unreserve(index, want);
                return Err(e);
            }
            Err(_) => {
                self.slots.unreserve(index, want);
                drop(conn.detach());
                return Err(sqlx::Error::PoolTimedOut);
            }
        };
        let got = jobs.len();
        *after = store::fair_rotation_after(after.as_deref(), &jobs);
        self.slots.unreserve(self.shard.index, want - got);
        self.slots.set_hungry(self.shard.index, got == want);
        if got > 0 {
            tracing::debug!(shard = %self.shard.db.name, queue = %self.queue, got, want, "fetched");
        }
        let lost = self.shard.leases.start(jobs, claimed_at, opts.lease, |job, stop| {
            tokio::spawn(self.run_one(job, stop)).abort_handle()
        });
        if lost > 0 {
            metrics::leases_lost(&self.shard.db.name, lost as u64);
        }
        Ok(Some((want, got)))
    }

    /// One job's run and the callback on its end: the slot is freed, the
    /// lease marked ended, and the outcome sent to the completer.
    fn run_one(
        &self,
        job: FetchedJob,
        stop: watch::Receiver<Option<CancelReason>>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (node, shard, slots, queue, done_tx) = (
            self.node.clone(),
            self.shard.clone(),
            self.slots.clone(),
            self.queue.clone(),
            self.done.clone(),
        );
        async move {
            let done = executor::execute(&node, &shard, &queue, job, stop).await;
            slots.release(shard.index, 1);
            shard.leases.run_ended(done.id, done.attempt);
            let id = done.id;
            if done_tx.send(done).await.is_err() {
                // The completer is gone (shutdown after its grace): the lease
                // expires and the job is rescued.
                tracing::warn!(shard = %shard.db.name, id, "outcome not recorded: completer stopped");
            }
        }
    }
}
