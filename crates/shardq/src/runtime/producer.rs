//! The producer: one task per (shard, queue). It claims due jobs ahead of
//! the free slots into a bounded local buffer, and starts buffered jobs as
//! slots free, so a slot never waits on a claim's round trip or commit: the
//! next claim is in flight while the last one's jobs run.
//!
//! Claims: woken by the shard's notifier, by released slots, or by a
//! jittered poll (the fallback when notifications are lost), the producer
//! waits out a short cooldown so bursts of wake-ups coalesce, then claims
//! up to twice the queue's limit in one statement (bounded by `max_batch`;
//! a queue with a limit under [`OVERLAP_FROM_LIMIT`] claims up to its limit),
//! and claims again at once while batches come back full. A second claim
//! goes out while the first is in flight once the buffer is below the
//! limit, so claims overlap each other's round trip and commit. Backpressure: the jobs this node holds on the
//! shard (buffered, running, or ended with their outcome not yet written)
//! are bounded; at the bound the producer claims nothing until the
//! completer has written outcomes.
//!
//! Buffered jobs are leased from their claim (the heartbeat renews them
//! with the running ones). A buffered job whose lease was lost, or whose
//! job was cancelled, is never started: its end goes to the completer like
//! a run's. When the producer stops, it waits for its claims in flight,
//! starts what fits the free slots, and hands the other buffered jobs back
//! (available at once, the claim's attempt taken back) in one statement.
//!
//! Each started job runs in its own task through the executor; when the run
//! ends, the producer's callback marks its lease ended, sends its [`Done`]
//! to the shard's completer and then frees its slot, so a completer that
//! falls behind holds slots (and, through the bound on held jobs, claims).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use futures::FutureExt;
use rand::Rng;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use super::executor;
use super::node::{Buffered, Done, Node, ShardWork};
use super::slots::QueueSlots;
use super::wakeup;
use crate::observe::metrics;
use crate::store::{self, FetchParams, FetchedJob};
use crate::worker::{CancelReason, Outcome};

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
    /// Set when a limit in the queue was set or cleared on the shard (or
    /// the LISTEN connection came back, so one may have been missed): the
    /// next claim reads again whether the queue has limited accounts.
    pub limits_changed: Arc<AtomicBool>,
}

/// How soon a producer held back by unwritten outcomes looks again if no
/// release woke it.
const HELD_BACK_RECHECK: Duration = Duration::from_millis(5);

/// Most claims of one producer in flight at once: the next claim's round
/// trip and commit overlap the last one's, while its jobs run. Their jobs
/// join the buffer in the order the claims were sent.
const CLAIMS_IN_FLIGHT: usize = 2;
/// Queues with a smaller limit claim one batch at a time, of at most the
/// limit: a claim returns its jobs in id order (not priority order), and
/// two claims in flight may be served out of order; with so few slots
/// either would show as jobs starting out of priority order.
const OVERLAP_FROM_LIMIT: usize = 4;

/// What one claim brought back.
struct Claimed {
    /// The claimed jobs, held as buffered.
    jobs: Vec<Buffered>,
    /// How many were asked for.
    want: usize,
    /// Whether its claim of jobs that use resources lost a race for a key
    /// or slot: claim again at once.
    claim_again: bool,
    /// Whether it went without the limited part as read before it (a
    /// short claim then reads again whether the queue has limited accounts
    /// now: [`Producer::read_due`]).
    without_limits: bool,
}

/// What a producer reads after a short claim ([`Producer::read_due`]).
struct DueRead {
    /// How many jobs the short claim brought back.
    got: usize,
    /// When the queue's earliest available job is due (`None`: no job, or unknown).
    due: Option<Instant>,
    /// Whether jobs were due and the queue has limited accounts now,
    /// although the claim went without the limited part: claim again at once.
    claim_again: bool,
}

/// The claim bounds of a producer, from its queue's limit and the options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bounds {
    /// A claim starts only while fewer jobs than this are buffered or being
    /// claimed (the limit plus one claim: a second claim goes out once the
    /// buffer is below the limit with one claim in flight).
    refill_below: usize,
    /// Most jobs one claim asks for.
    claim_most: usize,
    /// Most claims in flight at once.
    in_flight: usize,
    /// Most jobs the node holds on the shard for this queue's producer to
    /// claim more (buffered, running, or waiting for their outcome's write).
    held_most: usize,
}

impl Bounds {
    fn new(limit: usize, max_batch: usize) -> Bounds {
        let limit = limit.max(1);
        let small = limit < OVERLAP_FROM_LIMIT;
        let claim_most = if small { limit } else { 2 * limit }.min(max_batch).max(1);
        Bounds {
            refill_below: limit + claim_most,
            claim_most,
            in_flight: if small { 1 } else { CLAIMS_IN_FLIGHT },
            held_most: 8 * limit + claim_most,
        }
    }

    /// How many jobs to claim with `ahead` buffered or being claimed and
    /// `held` held on the shard; 0: none now.
    fn want(&self, ahead: usize, held: usize) -> usize {
        if ahead >= self.refill_below {
            return 0;
        }
        self.claim_most.min(self.held_most.saturating_sub(held))
    }
}

impl Producer {
    /// Runs until `stop` turns true; then waits for the claims in flight, if
    /// any, starts what fits the free slots and hands back the jobs still
    /// buffered.
    pub(crate) async fn run(self, mut stop: watch::Receiver<bool>) {
        let opts = &self.node.options;
        let mut buffer: VecDeque<Buffered> = VecDeque::new();
        // Where this producer's next fair claim resumes its rotation over
        // accounts (claims in flight share it).
        let after: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
        // Whether the queue has limited accounts on the shard, and when
        // that was read (claims in flight share it).
        let limited: std::sync::Mutex<Option<(Instant, bool)>> = std::sync::Mutex::new(None);
        // The claims in flight, in the order sent, each with how many jobs it asked for.
        let mut claims: FuturesOrdered<BoxFuture<'_, (usize, Instant, sqlx::Result<Claimed>)>> = FuturesOrdered::new();
        // The reads of the next due time after short claims, in the order
        // sent: made after a short claim's jobs were handed to the slots,
        // so they never wait for it.
        let mut due_reads: FuturesOrdered<BoxFuture<'_, DueRead>> = FuturesOrdered::new();
        // Jobs asked for by the claims in flight.
        let mut claiming = 0;
        // Whether a claim may find work: set by every wake-up, the poll, a
        // due time, a full claim and a retry after an error.
        let mut maybe_work = true;
        let mut last_claim = Instant::now() - opts.fetch_cooldown;
        let mut error_wait = Duration::from_millis(100);
        let mut retry_at: Option<Instant> = None;
        // When the queue's earliest scheduled job is due, read after the last
        // short claim (see `wakeup`).
        let mut due: Option<Instant> = None;
        // Whether the last short claim left jobs that were already due.
        let mut left_due = false;
        // Sees every permit granted or given back on the node.
        let mut permits_changed = self.node.permits.subscribe();
        loop {
            if *stop.borrow() {
                break;
            }
            self.dispatch(&mut buffer);
            self.hand_back_overdue(&mut buffer).await;
            // From the limit now (adaptive concurrency may move it).
            let bounds = Bounds::new(self.slots.limit(), opts.max_batch);
            let now = Instant::now();
            let mut held_back = false;
            let mut wake_at = None;
            if claims.len() < bounds.in_flight && maybe_work {
                if let Some(at) = retry_at.filter(|at| *at > now) {
                    wake_at = Some(at);
                } else if now < last_claim + opts.fetch_cooldown {
                    wake_at = Some(last_claim + opts.fetch_cooldown);
                } else {
                    let want = bounds.want(buffer.len() + claiming, self.shard.leases.count());
                    if want > 0 {
                        maybe_work = false;
                        retry_at = None;
                        if buffer.is_empty() && claims.is_empty() {
                            self.slots.waiting_on_shard(self.shard.index);
                        }
                        claiming += want;
                        let (this, after, limited) = (&self, &after, &limited);
                        claims.push_back(async move { (want, now, this.claim(want, after, limited).await) }.boxed());
                    } else if buffer.len() + claiming < bounds.refill_below {
                        // Held back by outcomes not yet written: woken by
                        // their release, or shortly in case it came just now.
                        held_back = true;
                        wake_at = Some(now + HELD_BACK_RECHECK);
                    }
                }
            }
            let poll = opts.poll_interval.mul_f64(rand::rng().random_range(0.9..1.1));
            let mut until = now + wakeup::sleep_for(poll, due, now);
            if let Some(at) = wake_at {
                until = until.min(at);
            }
            tokio::select! {
                _ = stop.changed() => {}
                _ = self.wake.notified() => maybe_work = true,
                _ = permits_changed.changed() => maybe_work = true,
                _ = self.shard.leases.released(), if held_back => {}
                Some((asked, sent, claimed)) = claims.next(), if !claims.is_empty() => {
                    claiming -= asked;
                    // The cooldown counts from the start of a short claim,
                    // so wake-ups during it gather into the next claim, and
                    // one that comes after a claim longer than the cooldown
                    // is served at once (a sleep that short would wait for
                    // the next timer tick, a millisecond or more). After a
                    // full claim the backlog is known: the next claim goes
                    // at once.
                    if !matches!(&claimed, Ok(c) if c.jobs.len() >= c.want) {
                        last_claim = sent;
                    }
                    match claimed {
                        Ok(c) => {
                            error_wait = Duration::from_millis(100);
                            let got = c.jobs.len();
                            buffer.extend(c.jobs);
                            if c.claim_again {
                                maybe_work = true;
                            }
                            if got < c.want {
                                // The jobs start first (at the top of the
                                // loop), then the next due time is read.
                                let (this, limited) = (&self, &limited);
                                due_reads.push_back(this.read_due(got, c.without_limits, limited).boxed());
                            } else {
                                maybe_work = true;
                            }
                        }
                        Err(e) if store::claim_lost_serial_race(&e) || store::claim_lost_limit_race(&e) => {
                            tracing::debug!(shard = %self.shard.db.name, queue = %self.queue, "a concurrent claim took a serial key or a limit slot this claim picked; claiming again");
                            maybe_work = true;
                        }
                        Err(e) => {
                            // A shard that cannot be claimed from gives up its
                            // share of the slots until it answers again.
                            self.slots.set_failing(self.shard.index);
                            tracing::warn!(shard = %self.shard.db.name, queue = %self.queue, error = %self.shard.db.error(e), "fetch failed; backing off");
                            retry_at = Some(Instant::now() + error_wait);
                            error_wait = (error_wait * 2).min(Duration::from_secs(5));
                            maybe_work = true;
                        }
                    }
                }
                Some(read) = due_reads.next(), if !due_reads.is_empty() => {
                    due = read.due;
                    // Due jobs a claim leaves are held by another claim in
                    // flight or blocked behind their serial key. Look once
                    // more shortly; if that claims nothing either, wait for a
                    // notification (a key's release sends one) or the poll
                    // instead of re-reading the blocked chain every 10 ms.
                    let due_now = due.is_some_and(|at| at <= Instant::now());
                    if due_now && left_due && read.got == 0 {
                        due = None;
                    }
                    left_due = due_now;
                    if read.claim_again {
                        maybe_work = true;
                    }
                }
                _ = tokio::time::sleep_until(until) => maybe_work = true,
            }
            // A due time that has passed is used up; the next short claim reads a new one.
            due = due.filter(|at| *at > Instant::now());
        }
        // As before a stop: the jobs of claims that were in flight start on
        // the slots free now (shutdown gives them its grace period like the
        // other runs); the rest of the buffer is handed back.
        while let Some((_, _, claimed)) = claims.next().await {
            if let Ok(c) = claimed {
                buffer.extend(c.jobs);
            }
        }
        self.dispatch(&mut buffer);
        self.hand_back(buffer).await;
    }

    /// Starts buffered jobs on the free slots, oldest first. Jobs told to
    /// stop while buffered (lease lost, cancelled) are started without a
    /// slot: their run ends at once and goes to the completer.
    fn dispatch(&self, buffer: &mut VecDeque<Buffered>) {
        if buffer.is_empty() {
            return;
        }
        let index = self.shard.index;
        if buffer.iter().any(|(_, stop)| stop.borrow().is_some()) {
            let (stopped, kept): (VecDeque<Buffered>, VecDeque<Buffered>) =
                buffer.drain(..).partition(|(_, stop)| stop.borrow().is_some());
            *buffer = kept;
            for b in stopped {
                let key = (self.shard.index, b.0.id, b.0.attempt);
                if !self.shard.leases.begin(b, |job, stop| {
                    tokio::spawn(self.run_one(job, stop, false)).abort_handle()
                }) {
                    self.node.permits.release(key);
                }
            }
        }
        if buffer.iter().any(|(job, _)| job.resources.is_some()) {
            self.dispatch_resourced(buffer);
            return;
        }
        // Until no slot is left or the buffer is empty: a reservation that
        // finds no slot marks the shard hungry, so the next release wakes it.
        while !buffer.is_empty() {
            let got = self.slots.reserve(index, buffer.len());
            if got == 0 {
                return;
            }
            let mut started = 0;
            for b in buffer.drain(..got) {
                let key = (self.shard.index, b.0.id, b.0.attempt);
                if self.shard.leases.begin(b, |job, stop| {
                    tokio::spawn(self.run_one(job, stop, true)).abort_handle()
                }) {
                    started += 1;
                } else {
                    self.node.permits.release(key);
                }
            }
            if started < got {
                self.slots.unreserve(index, got - started);
            }
        }
    }

    /// [`Self::dispatch`] of a buffer that holds jobs of named resources:
    /// oldest first, one at a time, each job of resources once it took
    /// their permits; those without permits stay buffered, in order, and
    /// the others go past them.
    fn dispatch_resourced(&self, buffer: &mut VecDeque<Buffered>) {
        let index = self.shard.index;
        let permits = &self.node.permits;
        let mut waiting = VecDeque::new();
        while let Some(b) = buffer.pop_front() {
            let key = (index, b.0.id, b.0.attempt);
            if !permits.start(key) {
                waiting.push_back(b);
                continue;
            }
            if self.slots.reserve(index, 1) == 0 {
                permits.unstart(key);
                buffer.push_front(b);
                break;
            }
            if !self.shard.leases.begin(b, |job, stop| {
                tokio::spawn(self.run_one(job, stop, true)).abort_handle()
            }) {
                permits.release(key);
                self.slots.unreserve(index, 1);
            }
        }
        waiting.append(buffer);
        *buffer = waiting;
    }

    /// Hands back the buffered jobs that waited for their permits longer
    /// than [`permits::WAIT_MOST`](super::permits::WAIT_MOST): the node may
    /// have lost its grant, and another node may have permits.
    async fn hand_back_overdue(&self, buffer: &mut VecDeque<Buffered>) {
        let overdue = self.node.permits.overdue(self.shard.index);
        if overdue.is_empty() {
            return;
        }
        let (late, kept): (VecDeque<Buffered>, VecDeque<Buffered>) = buffer
            .drain(..)
            .partition(|(job, _)| overdue.contains(&(job.id, job.attempt)));
        *buffer = kept;
        if !late.is_empty() {
            tracing::debug!(shard = %self.shard.db.name, queue = %self.queue, jobs = late.len(), "handing back jobs that waited too long for permits");
            self.hand_back(late).await;
        }
    }

    /// Claims up to `want` due jobs in one statement and holds them as
    /// buffered. The connection comes first; each wait is bounded by
    /// `shard_timeout`, and a claim that timed out closes its connection.
    /// After a short claim, reads when the queue's next job is due.
    async fn claim(
        &self,
        want: usize,
        after: &std::sync::Mutex<Option<String>>,
        limited: &std::sync::Mutex<Option<(Instant, bool)>>,
    ) -> sqlx::Result<Claimed> {
        let opts = &self.node.options;
        let mut conn = tokio::time::timeout(opts.shard_timeout, self.shard.db.pool.acquire())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??;
        let from = after.lock().map(|a| a.clone()).unwrap_or_default();
        // Whether the claim needs the limited part: read again after a
        // limit in the queue was set or cleared here (notified), and once a
        // poll interval (a limit written by other means, a lost notification).
        let changed = self.limits_changed.swap(false, Ordering::SeqCst);
        let known = limited
            .lock()
            .ok()
            .and_then(|l| *l)
            .filter(|(at, _)| !changed && at.elapsed() < opts.poll_interval);
        let has_limits = match known {
            Some((_, l)) => l,
            None => {
                let l = tokio::time::timeout(opts.shard_timeout, store::account_limits_exist(&mut *conn, &self.queue))
                    .await
                    .map_err(|_| sqlx::Error::PoolTimedOut)??;
                if let Ok(mut slot) = limited.lock() {
                    *slot = Some((Instant::now(), l));
                }
                l
            }
        };
        let params = FetchParams {
            queue: &self.queue,
            limit: want as i64,
            node: &self.node.id,
            lease_secs: opts.lease.as_secs_f64(),
            aging_secs: opts.priority_aging.map(|d| d.as_secs_f64()),
            fair: !opts.strict_queues.iter().any(|q| **q == *self.queue),
            after: from.as_deref(),
            limited: has_limits,
        };
        // Until its jobs are recorded, the orphan check leaves this node's
        // unheld running rows alone: they may be this claim's.
        let claiming = self.shard.leases.claiming();
        let claimed_at = Instant::now();
        // Jobs of named resources first (bounded by the permits), then the
        // others up to the rest of `want`.
        let mut jobs: Vec<FetchedJob> = Vec::new();
        // Whether that claim lost a race for a key or slot: claim again.
        let mut lost_race = false;
        if self.node.permits.any() {
            let resourced =
                tokio::time::timeout(opts.shard_timeout, self.claim_resourced(&mut conn, want, has_limits)).await;
            match resourced {
                Ok(Ok(some)) => jobs = some,
                Ok(Err(e)) if store::claim_lost_serial_race(&e) || store::claim_lost_limit_race(&e) => {
                    tracing::debug!(shard = %self.shard.db.name, queue = %self.queue, "a concurrent claim took a serial key or a limit slot the claim of jobs that use resources picked; claiming again");
                    lost_race = true;
                }
                Ok(Err(e)) => {
                    tracing::warn!(shard = %self.shard.db.name, queue = %self.queue, error = %self.shard.db.error(e), "claiming jobs that use resources failed");
                }
                Err(_) => {
                    drop(conn.detach());
                    return Err(sqlx::Error::PoolTimedOut);
                }
            }
        }
        let params = FetchParams {
            limit: (want - jobs.len()) as i64,
            ..params
        };
        if params.limit > 0 {
            let claimed = tokio::time::timeout(
                opts.shard_timeout,
                store::job_fetch_available(self.shard.db.conn(&mut conn), &params),
            )
            .await;
            match claimed {
                Ok(Ok(more)) => jobs.extend(more),
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    drop(conn.detach());
                    return Err(sqlx::Error::PoolTimedOut);
                }
            }
        }
        drop(conn);
        let got = jobs.len();
        if let Ok(mut a) = after.lock() {
            *a = store::fair_rotation_after(from.as_deref(), &jobs);
        }
        let (jobs, lost) = self.shard.leases.hold(jobs, claimed_at, opts.lease);
        for (job, _) in &jobs {
            if let Some(names) = &job.resources {
                self.node
                    .permits
                    .claimed((self.shard.index, job.id, job.attempt), names.clone());
            }
        }
        drop(claiming);
        self.slots.set_hungry(self.shard.index, got == want);
        if got > 0 {
            tracing::debug!(shard = %self.shard.db.name, queue = %self.queue, got, want, "fetched");
        }
        if lost > 0 {
            metrics::leases_lost(&self.shard.db.name, lost as u64);
        }
        Ok(Claimed {
            jobs,
            want,
            claim_again: lost_race,
            without_limits: !has_limits && known.is_some(),
        })
    }

    /// After a short claim that brought back `got` jobs: when the queue's
    /// earliest available job is due. A claim that went `without_limits`
    /// (as read before it) and left due jobs may have left them because
    /// their account's limit was set since: whether the queue has limited
    /// accounts is read again, and when it has, the next claim, at once,
    /// has the limited part. (A limit set shows within a claim or two
    /// instead of a poll interval; the ordinary claims never run a limited
    /// account's jobs meanwhile.)
    async fn read_due(
        &self,
        got: usize,
        without_limits: bool,
        limited: &std::sync::Mutex<Option<(Instant, bool)>>,
    ) -> DueRead {
        let timeout = self.node.options.shard_timeout;
        let due = wakeup::next_due(&self.shard, &self.queue, timeout).await;
        let mut claim_again = false;
        if without_limits && due.is_some_and(|at| at <= Instant::now()) {
            let read = tokio::time::timeout(timeout, store::account_limits_exist(&self.shard.db, &self.queue)).await;
            if let Ok(Ok(l)) = read {
                if let Ok(mut slot) = limited.lock() {
                    *slot = Some((Instant::now(), l));
                }
                claim_again = l;
            }
        }
        DueRead { got, due, claim_again }
    }

    /// Claims jobs that use named resources, on `conn`, while the node may
    /// claim more of them (up to `want`, and to the most one resource
    /// allows: [`Permits::claimable`](super::permits::Permits::claimable));
    /// `limited`: the queue has limited accounts, whose jobs each hold a
    /// slot of their account. With resources out of permits, reads whether
    /// their jobs wait, so the leaser asks for more.
    async fn claim_resourced(
        &self,
        conn: &mut sqlx::pool::PoolConnection<sqlx::Postgres>,
        want: usize,
        limited: bool,
    ) -> sqlx::Result<Vec<FetchedJob>> {
        let permits = &self.node.permits;
        let (free, most) = permits.claimable();
        let mut jobs = Vec::new();
        let limit = want.min(most as usize);
        if limit > 0 {
            jobs = store::job_fetch_resourced(
                &mut **conn,
                &self.queue,
                limit as i64,
                &self.node.id,
                self.node.options.lease.as_secs_f64(),
                &free,
                limited,
            )
            .await?;
            if jobs.len() >= limit {
                permits.want(&free);
            }
        }
        // From here on the claimed jobs are the caller's whatever fails:
        // errors are logged, not returned.
        if jobs.len() < limit || limit == 0 {
            match store::job_resourced_waiting(&mut **conn, &self.queue).await {
                Ok(waiting) if waiting.iter().any(|r| !free.contains(r)) || (limit == 0 && !waiting.is_empty()) => {
                    permits.want(&waiting)
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(shard = %self.shard.db.name, error = %self.shard.db.error(e), "reading jobs waiting for permits failed")
                }
            }
        }
        Ok(jobs)
    }

    /// Hands the buffered jobs back (the producer stopped): available at
    /// once, their claim's attempt taken back, in one statement. If the
    /// shard does not take it, the heartbeat's orphan check releases them
    /// (their leases are dropped here), or rescue does once they expire.
    async fn hand_back(&self, buffer: VecDeque<Buffered>) {
        for (job, _) in &buffer {
            self.node.permits.release((self.shard.index, job.id, job.attempt));
        }
        let runs = self.shard.leases.take_buffered(buffer.iter().map(|(job, _)| job.key()));
        if runs.is_empty() {
            return;
        }
        let released = store::job_release_unclaimed(&self.shard.db, &runs, &self.node.id);
        match tokio::time::timeout(self.node.options.shard_timeout, released).await {
            Ok(Ok(n)) => {
                tracing::debug!(shard = %self.shard.db.name, queue = %self.queue, handed_back = n, "buffered jobs handed back")
            }
            Ok(Err(e)) => {
                tracing::warn!(shard = %self.shard.db.name, queue = %self.queue, error = %self.shard.db.error(e), jobs = runs.len(), "handing buffered jobs back failed; their leases will expire and the jobs be rescued")
            }
            Err(_) => {
                tracing::warn!(shard = %self.shard.db.name, queue = %self.queue, jobs = runs.len(), "handing buffered jobs back did not answer in time; their leases will expire and the jobs be rescued")
            }
        }
    }

    /// One job's run and the callback on its end: the lease is marked
    /// ended, the outcome sent to the completer and then the slot freed
    /// (when the run had one).
    fn run_one(
        &self,
        job: FetchedJob,
        stop: watch::Receiver<Option<CancelReason>>,
        slotted: bool,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (node, shard, slots, queue, done_tx) = (
            self.node.clone(),
            self.shard.clone(),
            self.slots.clone(),
            self.queue.clone(),
            self.done.clone(),
        );
        async move {
            let started = Instant::now();
            let done = executor::execute(&node, &shard, &queue, job, stop).await;
            let (took, failed) = (started.elapsed(), matches!(done.outcome, Outcome::Failed(_)));
            shard.leases.run_ended(&done.run);
            node.permits.release((shard.index, done.run.id, done.run.attempt));
            let id = done.run.id;
            if done_tx.send(done).await.is_err() {
                // The completer is gone (shutdown after its grace): the lease
                // expires and the job is rescued.
                tracing::warn!(shard = %shard.db.name, id, "outcome not recorded: completer stopped");
            }
            if slotted {
                slots.finished(shard.index, took, failed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_run_ahead_of_the_slots_within_bounds() {
        let b = Bounds::new(64, 1_000);
        assert_eq!(b.want(0, 0), 128, "an empty buffer claims twice the limit");
        assert_eq!(
            b.want(128 + 63, 100),
            128,
            "a second claim once one is in flight and the buffer is low"
        );
        assert_eq!(
            b.want(128 + 64, 100),
            0,
            "a claim in flight and a buffer at the limit: no claim"
        );
        assert_eq!(b.want(0, b.held_most), 0, "held jobs at the bound hold claims back");
        assert_eq!(b.want(0, b.held_most - 10), 10);
        assert_eq!(Bounds::new(64, 50).want(0, 0), 50, "max_batch bounds a claim");
        assert_eq!(Bounds::new(1, 1).want(0, 0), 1);
        let small = Bounds::new(2, 1_000);
        assert_eq!(
            (small.want(0, 0), small.in_flight),
            (2, 1),
            "a small limit claims at most the limit"
        );
    }
}
