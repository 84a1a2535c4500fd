//! [`ShardWork`]: what a node's tasks for one shard share: the pool, the jobs
//! this node holds leases on, the completer's inbox and run statistics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use shardq_router::router::Database;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::AbortHandle;

use crate::completer::Done;
use crate::metrics::JobMetricsCache;

/// A job this node holds a lease on, from fetch until its outcome is written.
pub(crate) struct Lease {
    /// The attempt it runs (the fence).
    pub attempt: i32,
    /// Aborts the run; `None` once the run has ended (outcome pending write).
    pub run: Option<AbortHandle>,
    /// Set to true when the job is cancelled while it runs (see `cancel`);
    /// the handler observes it through `JobContext::cancelled`.
    pub cancel: watch::Sender<bool>,
}

/// Per-shard state of one node.
pub(crate) struct ShardWork {
    /// Position in the router's shard list; indexes per-queue slot tables.
    pub index: usize,
    /// The shard's pool and names.
    pub db: Database,
    /// Written by producers (insert), executors (run ends) and the completer
    /// (remove); read by the heartbeat and shutdown.
    pub leases: Mutex<HashMap<i64, Lease>>,
    /// Notified whenever leases are removed (shutdown waits on it).
    pub leases_changed: Notify,
    /// Executors send outcomes here; the completer batches them.
    pub done_tx: mpsc::Sender<Done>,
    /// Counters and pickup samples, read by `Runtime::stats`.
    pub stats: ShardStats,
    /// Metric handles per (queue, kind): filled and recorded into by
    /// executors, recorded into by the completer.
    pub metrics: JobMetricsCache,
}

impl ShardWork {
    /// Ids and attempts of every leased job.
    pub(crate) fn leased(&self) -> (Vec<i64>, Vec<i32>) {
        self.leases
            .lock()
            .map(|l| l.iter().map(|(id, l)| (*id, l.attempt)).unzip())
            .unwrap_or_default()
    }

    /// Number of leased jobs.
    pub(crate) fn leased_count(&self) -> usize {
        self.leases.lock().map(|l| l.len()).unwrap_or(0)
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
