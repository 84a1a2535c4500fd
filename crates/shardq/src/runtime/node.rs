//! The shared types at the bottom of the runtime: [`Node`] (what every task
//! of a node reads), [`ShardWork`] (what a node's tasks for one shard
//! share), [`Leases`] (the jobs this node holds on a shard, from claim until
//! their outcome is written), [`Done`] (the hand-off from a run to the
//! completer) and run statistics. Every stage imports this file; it imports
//! no stage.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use shardq_router::router::Database;
use tokio::sync::{watch, Notify};
use tokio::task::AbortHandle;

use super::options::RuntimeOptions;
use crate::observe::metrics::{JobMetrics, JobMetricsCache};
use crate::store::FetchedJob;
use crate::worker::{Outcome, Registry};

/// What every task of a node reads: its id, handlers and options. Set at
/// start by the composer, never written after.
pub(crate) struct Node {
    /// Recorded as `locked_by` on the jobs this node claims.
    pub id: String,
    /// The handlers, by kind; read by the executor.
    pub registry: Registry,
    /// The node's tunables; read by every stage.
    pub options: RuntimeOptions,
}

/// Per-shard state of one node, shared by that shard's stages.
pub(crate) struct ShardWork {
    /// Position in the router's shard list; indexes per-queue slot tables.
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
    /// Row id on the shard.
    pub id: i64,
    /// The attempt that ran (the fence).
    pub attempt: i32,
    /// Attempts allowed: a failure on the last one discards the job.
    pub max_attempts: i32,
    /// How the run ended.
    pub outcome: Outcome,
    /// When the job was due (total latency counts from here).
    pub run_at: DateTime<Utc>,
    /// The (shard, queue, kind) handles the outcome is recorded into once written.
    pub metrics: Arc<JobMetrics>,
}

/// One job this node holds a lease on.
struct Lease {
    /// The attempt it runs (the fence).
    attempt: i32,
    /// Aborts the run; `None` once the run has ended (outcome pending write).
    run: Option<AbortHandle>,
    /// Set to true when the job is cancelled while it runs; the handler
    /// observes it through `JobContext::cancelled`.
    cancel: watch::Sender<bool>,
}

/// The jobs this node holds on one shard, from claim until their outcome is
/// written. The producer starts them, the run's end marks them ended, the
/// completer releases them once written, the heartbeat renews them, the
/// cancel stage signals them, and shutdown waits for them or hands them
/// back. Only this type knows their shape.
#[derive(Default)]
pub(crate) struct Leases {
    held: Mutex<HashMap<i64, Lease>>,
    /// Notified whenever leases are released (shutdown waits on it).
    released: Notify,
}

impl Leases {
    /// Records `jobs` as held and starts each with `spawn`, which gets the
    /// job and its cancel flag and returns the run's abort handle. The lock
    /// is held across the spawns, so a run that ends at once still finds
    /// its lease.
    pub(crate) fn start(
        &self,
        jobs: Vec<FetchedJob>,
        mut spawn: impl FnMut(FetchedJob, watch::Receiver<bool>) -> AbortHandle,
    ) {
        let Ok(mut held) = self.held.lock() else { return };
        for job in jobs {
            let (id, attempt) = (job.id, job.attempt);
            let (cancel, cancelled) = watch::channel(false);
            let run = Some(spawn(job, cancelled));
            held.insert(id, Lease { attempt, run, cancel });
        }
    }

    /// The run of job `id` ended; its outcome is on its way to the completer.
    pub(crate) fn run_ended(&self, id: i64) {
        if let Ok(mut held) = self.held.lock() {
            if let Some(lease) = held.get_mut(&id) {
                lease.run = None;
            }
        }
    }

    /// Releases the leases whose outcomes were written (matching attempt).
    pub(crate) fn release(&self, written: impl IntoIterator<Item = (i64, i32)>) {
        if let Ok(mut held) = self.held.lock() {
            for (id, attempt) in written {
                if held.get(&id).is_some_and(|l| l.attempt == attempt) {
                    held.remove(&id);
                }
            }
        }
        self.released.notify_waiters();
    }

    /// Ids and attempts of every held job.
    pub(crate) fn held(&self) -> (Vec<i64>, Vec<i32>) {
        self.held
            .lock()
            .map(|l| l.iter().map(|(id, l)| (*id, l.attempt)).unzip())
            .unwrap_or_default()
    }

    /// Number of held jobs.
    pub(crate) fn count(&self) -> usize {
        self.held.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// Ids of the jobs still running whose handler was not signalled to cancel.
    pub(crate) fn running_unsignalled(&self) -> Vec<i64> {
        self.held
            .lock()
            .map(|held| {
                held.iter()
                    .filter(|(_, l)| l.run.is_some() && !*l.cancel.borrow())
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Sets the cancel flag of the runs of `ids` still going; returns the
    /// ids it signalled (not those signalled before).
    pub(crate) fn signal_cancel(&self, ids: &[i64]) -> Vec<i64> {
        let Ok(held) = self.held.lock() else { return Vec::new() };
        let mut signalled = Vec::new();
        for id in ids {
            if let Some(lease) = held.get(id).filter(|l| l.run.is_some()) {
                if !*lease.cancel.borrow() {
                    lease.cancel.send_replace(true);
                    signalled.push(*id);
                }
            }
        }
        signalled
    }

    /// Aborts the runs still going, drops their leases and returns their ids
    /// and attempts (for the hand-back at shutdown).
    pub(crate) fn abort_running(&self) -> (Vec<i64>, Vec<i32>) {
        let Ok(mut held) = self.held.lock() else {
            return Default::default();
        };
        let running: Vec<(i64, i32)> = held
            .iter_mut()
            .filter_map(|(id, l)| {
                l.run.take().map(|run| {
                    run.abort();
                    (*id, l.attempt)
                })
            })
            .collect();
        for (id, _) in &running {
            held.remove(id);
        }
        running.into_iter().unzip()
    }

    /// Waits until no lease is held, or `deadline` passes.
    pub(crate) async fn wait_released(&self, deadline: tokio::time::Instant) {
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
