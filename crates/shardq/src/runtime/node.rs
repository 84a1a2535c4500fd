//! The shared types at the bottom of the runtime: [`Node`] (what every task
//! of a node reads), [`ShardWork`] (what a node's tasks for one shard
//! share), [`Leases`] (the jobs this node holds on a shard, from claim until
//! their outcome is written), [`Done`] (the hand-off from a run to the
//! completer) and run statistics; [`Node`] carries the node's permits of
//! named resources (`permits`). Every stage imports this file; it imports
//! no stage.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use shardq_router::router::Database;
use tokio::sync::{watch, Notify};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::options::RuntimeOptions;
use super::permits::Permits;
use crate::observe::metrics::{JobMetrics, JobMetricsCache};
use crate::store::{FetchedJob, RunKey};
use crate::worker::{CancelReason, Outcome, Registry};

/// What every task of a node reads: its id, handlers and options. Set at
/// start by the composer, never written after.
pub(crate) struct Node {
    /// Recorded as `locked_by` on the jobs this node claims.
    pub id: String,
    /// The handlers, by kind; read by the executor.
    pub registry: Registry,
    /// The node's tunables; read by every stage.
    pub options: RuntimeOptions,
    /// Permits of named resources: taken and given back by producers,
    /// leased by the composer's leaser task.
    pub permits: Arc<Permits>,
}

/// Per-shard state of one node, shared by that shard's stages.
pub(crate) struct ShardWork {
    /// The unit's slot position on this node; indexes per-queue slot tables.
    pub index: usize,
    /// The shard's pool and names.
    pub db: Database,
    /// The jobs this node holds on the shard (see [`Leases`] for who writes).
    pub leases: Leases,
    /// Counters and pickup samples: written by the executor and completer,
    /// read by `Runtime::stats`.
    pub stats: ShardStats,
    /// Metric handles per (queue, kind): filled by the executor, recorded
    /// into by the executor and the completer.
    pub metrics: JobMetricsCache,
}

/// A run's outcome, made by the executor and written by the completer.
#[derive(Debug)]
pub(crate) struct Done {
    /// The run (the fence): row id on the shard, attempt, claim token.
    pub run: RunKey,
    /// Attempts allowed: a failure on the last one discards the job.
    pub max_attempts: i32,
    /// Whether the run holds a serial key, released once the outcome is written.
    pub keyed: bool,
    /// How the run ended.
    pub outcome: Outcome,
    /// When the job was due (total latency counts from here).
    pub run_at: DateTime<Utc>,
    /// The (shard, queue, kind) handles the outcome is recorded into once written.
    pub metrics: Arc<JobMetrics>,
}

/// One run this node holds a lease for.
struct Lease {
    /// Aborts the run; `None` while the job waits in its producer's buffer
    /// (`buffered`) and once the run has ended (outcome pending write).
    run: Option<AbortHandle>,
    /// Claimed and not started yet: the job waits in its producer's buffer
    /// for a slot.
    buffered: bool,
    /// Set when the run must stop (cancelled, or the lease was lost); the
    /// handler observes it through `JobContext::cancelled`, and a buffered
    /// job so marked is never started.
    stop: watch::Sender<Option<CancelReason>>,
    /// When the lease ends on this node's clock unless renewed: counted from
    /// before the claim or renewal was sent, so never later than the shard's.
    expires: Instant,
}

impl Lease {
    /// Whether the job is buffered or running (not ended).
    fn live(&self) -> bool {
        self.run.is_some() || self.buffered
    }
}

/// The runs this node holds on one shard, from claim until their outcome is
/// written, keyed by [`RunKey`] (job id, attempt, claim token): a job
/// rescued and claimed again by this node while its old run goes on has two
/// entries, and so has a job whose claim was lost in a server crash and
/// that this node claimed again under the same attempt number. The producer holds
/// them at claim time (buffered) and starts them, the run's end marks them
/// ended, the completer releases them once written, the heartbeat renews
/// them (and stops those whose lease it lost), the cancel stage signals
/// them, and shutdown hands the buffered ones back, waits for the running
/// ones or hands them back. Only this type knows their shape.
#[derive(Default)]
pub(crate) struct Leases {
    held: Mutex<HashMap<RunKey, Lease>>,
    /// Notified whenever leases are released (shutdown and a producer held
    /// back by outcomes not yet written wait on it).
    released: Notify,
    /// Claims sent and not yet recorded here (see [`Leases::claiming`]).
    claims_in_flight: AtomicU64,
    /// Claims ever sent; tells the orphan check that one came and went.
    claims_sent: AtomicU64,
}

/// A claim in flight on the shard; recorded as ended when dropped.
pub(crate) struct Claiming<'a>(&'a Leases);

impl Drop for Claiming<'_> {
    fn drop(&mut self) {
        self.0.claims_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A claimed job waiting in its producer's buffer, with the stop signal its
/// run will observe.
pub(crate) type Buffered = (FetchedJob, watch::Receiver<Option<CancelReason>>);

impl Leases {
    /// Records `jobs`, claimed with leases of `lease` from `claimed_at`, as
    /// held and buffered (not started); returns them with their stop
    /// signals, and how many older runs lost their lease: another run of
    /// the same job still going here lost it (the job was rescued, or its
    /// claim lost in a crash, and claimed again), and is told so.
    pub(crate) fn hold(&self, jobs: Vec<FetchedJob>, claimed_at: Instant, lease: Duration) -> (Vec<Buffered>, usize) {
        let Ok(mut held) = self.held.lock() else {
            return (Vec::new(), 0);
        };
        let mut lost = 0;
        let mut out = Vec::with_capacity(jobs.len());
        // One pass over the held runs for the whole claim (not one per job).
        let newest: HashMap<i64, RunKey> = jobs.iter().map(|j| (j.id, j.key())).collect();
        for (key, old) in held.iter() {
            if newest.get(&key.id).is_some_and(|newer| newer != key)
                && old.live()
                && old.stop.send_replace(Some(CancelReason::LeaseLost)).is_none()
            {
                tracing::warn!(
                    id = key.id,
                    attempt = key.attempt,
                    "this job was claimed again here: the older run lost its lease"
                );
                lost += 1;
            }
        }
        for job in jobs {
            let key = job.key();
            let (stop, stopped) = watch::channel(None);
            held.insert(
                key,
                Lease {
                    run: None,
                    buffered: true,
                    stop,
                    expires: claimed_at + lease,
                },
            );
            out.push((job, stopped));
        }
        (out, lost)
    }

    /// Starts the buffered `job` with `spawn`, which gets the job and its
    /// stop signal and returns the run's abort handle. The lock is held
    /// across the spawn, so a run that ends at once still finds its lease.
    /// A job no longer held (handed back meanwhile) is not started: returns
    /// false.
    pub(crate) fn begin(
        &self,
        (job, stop): Buffered,
        spawn: impl FnOnce(FetchedJob, watch::Receiver<Option<CancelReason>>) -> AbortHandle,
    ) -> bool {
        let Ok(mut held) = self.held.lock() else { return false };
        let Some(lease) = held.get_mut(&job.key()).filter(|l| l.buffered) else {
            return false;
        };
        lease.buffered = false;
        lease.run = Some(spawn(job, stop));
        true
    }

    /// Drops the leases of the buffered jobs among `keys` (never started):
    /// returns the runs dropped, in id order, for the caller to hand back.
    pub(crate) fn take_buffered(&self, keys: impl IntoIterator<Item = RunKey>) -> Vec<RunKey> {
        let mut taken: Vec<RunKey> = match self.held.lock() {
            Ok(mut held) => keys
                .into_iter()
                .filter(|k| {
                    let buffered = held.get(k).is_some_and(|l| l.buffered);
                    buffered && held.remove(k).is_some()
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        self.released.notify_waiters();
        taken.sort_unstable();
        taken
    }

    /// Resolves at the next release of leases (see [`Leases::release`]).
    pub(crate) fn released(&self) -> tokio::sync::futures::Notified<'_> {
        self.released.notified()
    }

    /// Marks a claim as sent until the returned guard drops (after its jobs
    /// were started, or the claim failed). While any claim is in flight,
    /// running rows of this node that it does not hold may be that claim's
    /// and are left alone.
    pub(crate) fn claiming(&self) -> Claiming<'_> {
        self.claims_sent.fetch_add(1, Ordering::SeqCst);
        self.claims_in_flight.fetch_add(1, Ordering::SeqCst);
        Claiming(self)
    }

    /// A mark of the claims so far, when none is in flight: the same mark
    /// later means no claim started or ended in between.
    pub(crate) fn claims_quiet(&self) -> Option<u64> {
        let sent = self.claims_sent.load(Ordering::SeqCst);
        (self.claims_in_flight.load(Ordering::SeqCst) == 0).then_some(sent)
    }

    /// The run `key` ended; its outcome is on its way to the completer.
    pub(crate) fn run_ended(&self, key: &RunKey) {
        if let Ok(mut held) = self.held.lock() {
            if let Some(lease) = held.get_mut(key) {
                lease.run = None;
            }
        }
    }

    /// Releases the leases whose outcomes were written (or dropped).
    pub(crate) fn release(&self, written: impl IntoIterator<Item = RunKey>) {
        if let Ok(mut held) = self.held.lock() {
            for key in written {
                held.remove(&key);
            }
        }
        self.released.notify_waiters();
    }

    /// Every held run, in id order (statements that lock many jobs lock
    /// them in id order, so two never deadlock).
    pub(crate) fn held(&self) -> Vec<RunKey> {
        let mut keys: Vec<RunKey> = self
            .held
            .lock()
            .map(|l| l.keys().copied().collect())
            .unwrap_or_default();
        keys.sort_unstable();
        keys
    }

    /// Number of held runs.
    pub(crate) fn count(&self) -> usize {
        self.held.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// After a renewal sent at `sent_at` for `asked`: the runs in `held`
    /// now last until `sent_at` plus their remaining seconds (as the shard
    /// counted them: a lease the renewal left alone because it was fresh
    /// keeps its end); those asked for but not among them were taken from
    /// this node (rescued, cancelled or finished by someone else), and those
    /// whose lease ran out meanwhile are lost too. Runs still going (or
    /// buffered) among the lost are told to stop; returns how many.
    pub(crate) fn renewed(&self, asked: &[RunKey], held_now: &[(RunKey, f64)], sent_at: Instant) -> usize {
        let Ok(mut held) = self.held.lock() else { return 0 };
        let kept: HashMap<RunKey, f64> = held_now.iter().copied().collect();
        for key in asked {
            if let Some(l) = held.get_mut(key) {
                match kept.get(key) {
                    Some(secs) => {
                        l.expires = sent_at + Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or_default();
                    }
                    None => l.expires = l.expires.min(sent_at),
                }
            }
        }
        Self::stop_expired(&mut held, Instant::now())
    }

    /// Tells the runs still going whose lease ran out (renewals failed) to
    /// stop; returns how many were told.
    pub(crate) fn expire(&self, now: Instant) -> usize {
        let Ok(mut held) = self.held.lock() else { return 0 };
        Self::stop_expired(&mut held, now)
    }

    fn stop_expired(held: &mut HashMap<RunKey, Lease>, now: Instant) -> usize {
        let mut lost = 0;
        for (key, l) in held.iter() {
            if l.live() && l.expires <= now && l.stop.borrow().is_none() {
                l.stop.send_replace(Some(CancelReason::LeaseLost));
                tracing::warn!(
                    id = key.id,
                    attempt = key.attempt,
                    "lease lost while the job runs: its handler is told to stop and its outcome will not be written"
                );
                lost += 1;
            }
        }
        lost
    }

    /// Ids of the jobs still running or buffered whose handler was not told to stop.
    pub(crate) fn running_unsignalled(&self) -> Vec<i64> {
        self.held
            .lock()
            .map(|held| {
                held.iter()
                    .filter(|(_, l)| l.live() && l.stop.borrow().is_none())
                    .map(|(key, _)| key.id)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Tells the runs of `ids` still going (or buffered: they will not
    /// start) that their job was cancelled; returns the ids it signalled
    /// (not those told to stop before).
    pub(crate) fn signal_cancel(&self, ids: &[i64]) -> Vec<i64> {
        let Ok(held) = self.held.lock() else { return Vec::new() };
        let mut signalled = Vec::new();
        for (key, lease) in held.iter() {
            if ids.contains(&key.id) && lease.live() && lease.stop.borrow().is_none() {
                lease.stop.send_replace(Some(CancelReason::Requested));
                signalled.push(key.id);
            }
        }
        signalled
    }

    /// Aborts the runs still going, drops their leases and those of jobs
    /// still buffered (their producer stopped before handing them back),
    /// and returns them (for the hand-back at shutdown).
    pub(crate) fn abort_running(&self) -> Vec<RunKey> {
        let Ok(mut held) = self.held.lock() else {
            return Default::default();
        };
        let running: Vec<RunKey> = held
            .iter_mut()
            .filter_map(|(key, l)| {
                let buffered = std::mem::take(&mut l.buffered);
                match l.run.take() {
                    Some(run) => {
                        run.abort();
                        Some(*key)
                    }
                    None => buffered.then_some(*key),
                }
            })
            .collect();
        for key in &running {
            held.remove(key);
        }
        let mut running = running;
        running.sort_unstable();
        running
    }

    /// Waits until no lease is held, or `deadline` passes.
    pub(crate) async fn wait_released(&self, deadline: Instant) {
        loop {
            let released = self.released.notified();
            if self.count() == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return;
            }
        }
    }
}

/// Run statistics of one shard on this node.
#[derive(Default)]
pub(crate) struct ShardStats {
    pub completed: AtomicU64,
    pub retried: AtomicU64,
    pub discarded: AtomicU64,
    pub cancelled: AtomicU64,
    pub snoozed: AtomicU64,
    /// Microseconds from due time to handler start, one per run (bounded).
    pub pickup_us: Mutex<Vec<u64>>,
}

/// Pickup samples kept per shard.
const MAX_PICKUP_SAMPLES: usize = 1_000_000;

impl ShardStats {
    pub(crate) fn record_pickup(&self, us: u64) {
        if let Ok(mut v) = self.pickup_us.lock() {
            if v.len() < MAX_PICKUP_SAMPLES {
                v.push(us);
            }
        }
    }

    /// Zeroes the counters and drops the pickup samples.
    pub(crate) fn reset(&self) {
        for c in [
            &self.completed,
            &self.retried,
            &self.discarded,
            &self.cancelled,
            &self.snoozed,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        if let Ok(mut v) = self.pickup_us.lock() {
            v.clear();
        }
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A snapshot of one shard's run statistics on this node.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ShardRunStats {
    /// The shard's name.
    pub shard: String,
    /// Runs written as completed.
    pub completed: u64,
    /// Failed runs scheduled for retry.
    pub retried: u64,
    /// Runs that used their last attempt and were discarded.
    pub discarded: u64,
    /// Runs that ended cancelled.
    pub cancelled: u64,
    /// Runs snoozed.
    pub snoozed: u64,
    /// Pickup latency (due → handler start) percentiles in milliseconds: p50, p95, p99, max.
    pub pickup_ms: Option<[f64; 4]>,
}

impl ShardRunStats {
    /// Adds `other`'s counters (a later run of the same shard on this
    /// node); keeps this one's latency unless it has none.
    pub(crate) fn add(&mut self, other: &ShardRunStats) {
        self.completed += other.completed;
        self.retried += other.retried;
        self.discarded += other.discarded;
        self.cancelled += other.cancelled;
        self.snoozed += other.snoozed;
        if self.pickup_ms.is_none() {
            self.pickup_ms = other.pickup_ms;
        }
    }
}

impl ShardStats {
    /// Counters and, when `latency` is set, pickup percentiles (which copy
    /// and sort every sample: not for a hot loop).
    pub(crate) fn snapshot(&self, shard: &str, latency: bool) -> ShardRunStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let samples = if latency { self.pickup_us.lock().ok() } else { None };
        let pickup_ms = samples.and_then(|v| {
            let mut v = v.clone();
            if v.is_empty() {
                return None;
            }
            v.sort_unstable();
            let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
            Some([at(0.50), at(0.95), at(0.99), at(1.0)])
        });
        ShardRunStats {
            shard: shard.to_string(),
            completed: get(&self.completed),
            retried: get(&self.retried),
            discarded: get(&self.discarded),
            cancelled: get(&self.cancelled),
            snoozed: get(&self.snoozed),
            pickup_ms,
        }
    }
}
