//! Metrics, recorded through the [`metrics`] facade: the names below are
//! what a Prometheus scrape of a node shows (see `observe::http` for the
//! endpoint, or install any `metrics` recorder yourself).
//!
//! Handles are bound to the recorder installed when they are first used:
//! install a recorder (e.g. `observe::http::install_prometheus`, or
//! `RuntimeBuilder::metrics_addr`) before starting the runtime.
//!
//! The per-job handles of a (shard, queue, kind) are built once and cached in
//! [`JobMetricsCache`], so the hot path does no label building per job.
//!
//! Durations are in seconds. Labels: `shard`, `queue`, `kind`; the notifier
//! state gauge also has `state`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Unit};

use crate::worker::Outcome;

/// Runs written as completed. Labels: shard, queue, kind.
pub const JOBS_COMPLETED: &str = "shardq_jobs_completed_total";
/// Runs that failed (error, timeout, panic, unknown kind): retried plus discarded. Labels: shard, queue, kind.
pub const JOBS_FAILED: &str = "shardq_jobs_failed_total";
/// Failed runs scheduled to run again. Labels: shard, queue, kind.
pub const JOBS_RETRIED: &str = "shardq_jobs_retried_total";
/// Failed runs that used the last attempt; the job is kept as `discarded`. Labels: shard, queue, kind.
pub const JOBS_DISCARDED: &str = "shardq_jobs_discarded_total";
/// Runs that ended cancelled. Labels: shard, queue, kind.
pub const JOBS_CANCELLED: &str = "shardq_jobs_cancelled_total";
/// Runs the handler snoozed (run again later, not a failure). Labels: shard, queue, kind.
pub const JOBS_SNOOZED: &str = "shardq_jobs_snoozed_total";
/// Jobs whose lease expired and that this node returned to the queue (or discarded). Label: shard.
pub const JOBS_RESCUED: &str = "shardq_jobs_rescued_total";
/// Runs whose lease this node lost while they ran (the handler is signalled, its outcome dropped).
pub const LEASES_LOST: &str = "shardq_leases_lost_total";
/// Queue time: due (`run_at`) → handler start. Labels: shard, queue, kind.
pub const JOB_QUEUE_SECONDS: &str = "shardq_job_queue_seconds";
/// Run time: handler start → handler end. Labels: shard, queue, kind.
pub const JOB_RUN_SECONDS: &str = "shardq_job_run_seconds";
/// Total latency: due (`run_at`) → outcome written. Labels: shard, queue, kind.
pub const JOB_LATENCY_SECONDS: &str = "shardq_job_latency_seconds";
/// Jobs running on this node now. Labels: shard, queue, kind.
pub const JOBS_RUNNING: &str = "shardq_jobs_running";
/// Free slots of a queue on this node (its limit minus running and reserved). Label: queue.
pub const QUEUE_FREE_SLOTS: &str = "shardq_queue_free_slots";
/// A queue's concurrency limit on this node now: its configured limit, or
/// where adaptive concurrency put it. Label: queue.
pub const QUEUE_CONCURRENCY: &str = "shardq_queue_concurrency";
/// Due jobs waiting, sampled (capped at `sampler::DEPTH_CAP`, shared with scheduled). Labels: shard, queue.
pub const QUEUE_AVAILABLE: &str = "shardq_queue_available";
/// Available jobs not yet due (scheduled, or retrying after a backoff), sampled and capped. Labels: shard, queue.
pub const QUEUE_SCHEDULED: &str = "shardq_queue_scheduled";
/// Age of the oldest due job (its sojourn time so far; 0 when none waits), sampled. Labels: shard, queue.
pub const QUEUE_OLDEST_SECONDS: &str = "shardq_queue_oldest_available_seconds";
/// 1 for the notifier's current state, 0 for the others. Labels: shard, state
/// (`listening`, `reconnecting`, `polling`: LISTEN keeps failing, producers only poll).
pub const NOTIFIER_STATE: &str = "shardq_notifier_state";
/// LISTEN connections re-established after a loss. Label: shard.
pub const NOTIFIER_RECONNECTS: &str = "shardq_notifier_reconnects_total";
/// Connections of the shard's pool in use (open minus idle), sampled. Label: shard.
pub const POOL_IN_USE: &str = "shardq_pool_connections_in_use";
/// Open connections of the shard's pool, sampled. Label: shard.
pub const POOL_OPEN: &str = "shardq_pool_connections_open";

/// Shards this node works now (owns, or still hands over).
pub const OWNED_SHARDS: &str = "shardq_owned_shards";
/// Shards this node started or stopped working. Label: change (`gained`, `released`).
pub const OWNERSHIP_CHANGES: &str = "shardq_ownership_changes_total";

/// Histogram bucket bounds (seconds) for the duration metrics.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Registers the description and unit of every metric with the installed recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(JOBS_COMPLETED, "Runs written as completed");
    describe_counter!(
        JOBS_FAILED,
        "Runs that failed (error, timeout, panic): retried plus discarded"
    );
    describe_counter!(JOBS_RETRIED, "Failed runs scheduled to run again");
    describe_counter!(JOBS_DISCARDED, "Failed runs on the last attempt; the job is discarded");
    describe_counter!(JOBS_CANCELLED, "Runs that ended cancelled");
    describe_counter!(JOBS_SNOOZED, "Runs snoozed by their handler");
    describe_counter!(
        JOBS_RESCUED,
        "Jobs with an expired lease returned to the queue by this node"
    );
    describe_counter!(
        LEASES_LOST,
        "Runs whose lease this node lost while they ran; their outcome is not written"
    );
    describe_histogram!(JOB_QUEUE_SECONDS, Unit::Seconds, "Due time to handler start");
    describe_histogram!(JOB_RUN_SECONDS, Unit::Seconds, "Handler start to handler end");
    describe_histogram!(JOB_LATENCY_SECONDS, Unit::Seconds, "Due time to outcome written");
    describe_gauge!(JOBS_RUNNING, "Jobs running on this node");
    describe_gauge!(QUEUE_FREE_SLOTS, "Free slots of the queue on this node");
    describe_gauge!(
        QUEUE_CONCURRENCY,
        "Concurrency limit of the queue on this node now (adaptive or configured)"
    );
    describe_gauge!(QUEUE_AVAILABLE, "Due jobs waiting (sampled, capped)");
    describe_gauge!(QUEUE_SCHEDULED, "Jobs waiting for a future run_at (sampled, capped)");
    describe_gauge!(
        QUEUE_OLDEST_SECONDS,
        Unit::Seconds,
        "Age of the oldest due job (sampled)"
    );
    describe_gauge!(NOTIFIER_STATE, "1 for the notifier's current state");
    describe_counter!(NOTIFIER_RECONNECTS, "LISTEN connections re-established after a loss");
    describe_gauge!(POOL_IN_USE, "Connections of the shard's pool in use");
    describe_gauge!(POOL_OPEN, "Open connections of the shard's pool");
    describe_gauge!(OWNED_SHARDS, "Shards this node works now");
    describe_counter!(
        OWNERSHIP_CHANGES,
        "Shards this node started (gained) or stopped (released) working"
    );
}

/// The handles of one (shard, queue, kind). Built once by [`JobMetricsCache`];
/// read (recorded into) by executors and the completer.
pub(crate) struct JobMetrics {
    running: Gauge,
    queue_time: Histogram,
    run_time: Histogram,
    latency: Histogram,
    completed: Counter,
    failed: Counter,
    retried: Counter,
    discarded: Counter,
    cancelled: Counter,
    snoozed: Counter,
}

impl JobMetrics {
    fn new(shard: &Arc<str>, queue: &Arc<str>, kind: &str) -> JobMetrics {
        let labels = [
            ("shard", metrics::SharedString::from(shard.clone())),
            ("queue", metrics::SharedString::from(queue.clone())),
            ("kind", metrics::SharedString::from(kind.to_string())),
        ];
        let labels: Vec<metrics::Label> = labels.iter().map(|(k, v)| metrics::Label::new(*k, v.clone())).collect();
        JobMetrics {
            running: metrics::gauge!(JOBS_RUNNING, labels.clone()),
            queue_time: metrics::histogram!(JOB_QUEUE_SECONDS, labels.clone()),
            run_time: metrics::histogram!(JOB_RUN_SECONDS, labels.clone()),
            latency: metrics::histogram!(JOB_LATENCY_SECONDS, labels.clone()),
            completed: metrics::counter!(JOBS_COMPLETED, labels.clone()),
            failed: metrics::counter!(JOBS_FAILED, labels.clone()),
            retried: metrics::counter!(JOBS_RETRIED, labels.clone()),
            discarded: metrics::counter!(JOBS_DISCARDED, labels.clone()),
            cancelled: metrics::counter!(JOBS_CANCELLED, labels.clone()),
            snoozed: metrics::counter!(JOBS_SNOOZED, labels),
        }
    }

    /// A run starts `queue_time` after it was due; the returned guard counts
    /// it as running until dropped (also when the run is aborted).
    pub(crate) fn job_started(&self, queue_time: Duration) -> Running<'_> {
        self.queue_time.record(queue_time.as_secs_f64());
        self.running.increment(1.0);
        Running(&self.running)
    }

    /// The handler returned (or panicked, or timed out) after `run_time`.
    pub(crate) fn job_ran(&self, run_time: Duration) {
        self.run_time.record(run_time.as_secs_f64());
    }

    /// The outcome of a run was written, `latency` after the job was due.
    /// `last_attempt`: a failure discards the job instead of retrying it.
    pub(crate) fn job_finished(&self, outcome: &Outcome, last_attempt: bool, latency: Duration) {
        self.latency.record(latency.as_secs_f64());
        match outcome {
            Outcome::Completed => self.completed.increment(1),
            Outcome::Failed(_) => {
                self.failed.increment(1);
                if last_attempt {
                    self.discarded.increment(1);
                } else {
                    self.retried.increment(1);
                }
            }
            Outcome::Snooze(_) => self.snoozed.increment(1),
            Outcome::Cancel(_) => self.cancelled.increment(1),
            // Counted when detected ([`leases_lost`]); nothing was written.
            Outcome::LeaseLost => {}
        }
    }
}

impl std::fmt::Debug for JobMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobMetrics")
    }
}

/// Counts a run in [`JOBS_RUNNING`] while alive.
pub(crate) struct Running<'a>(&'a Gauge);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// One queue's handles by kind.
type ByKind = HashMap<String, Arc<JobMetrics>>;

/// The [`JobMetrics`] of one shard, by queue and kind. Written (filled) and
/// read by the shard's executors on their first job of a (queue, kind).
pub(crate) struct JobMetricsCache {
    shard: Arc<str>,
    by_queue: Mutex<HashMap<Arc<str>, ByKind>>,
}

impl JobMetricsCache {
    /// An empty cache for `shard`.
    pub(crate) fn new(shard: &str) -> JobMetricsCache {
        JobMetricsCache {
            shard: shard.into(),
            by_queue: Mutex::new(HashMap::new()),
        }
    }

    /// The handles of (`queue`, `kind`) on this shard, built on first use.
    pub(crate) fn get(&self, queue: &Arc<str>, kind: &str) -> Arc<JobMetrics> {
        let Ok(mut by_queue) = self.by_queue.lock() else {
            return Arc::new(JobMetrics::new(&self.shard, queue, kind));
        };
        let kinds = by_queue.entry(queue.clone()).or_default();
        if let Some(m) = kinds.get(kind) {
            return m.clone();
        }
        let m = Arc::new(JobMetrics::new(&self.shard, queue, kind));
        kinds.insert(kind.to_string(), m.clone());
        m
    }
}

/// The notifier's connection state, for [`NOTIFIER_STATE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotifierState {
    /// The LISTEN connection is up.
    Listening,
    /// The connection was lost or failed; retrying with backoff.
    Reconnecting,
    /// Reconnecting keeps failing (backoff at its cap): producers only poll.
    Polling,
    /// Not listening by configuration (a transaction pooler and no
    /// `listen_url`): producers only poll.
    PollOnly,
}

impl NotifierState {
    const ALL: [NotifierState; 4] = [
        NotifierState::Listening,
        NotifierState::Reconnecting,
        NotifierState::Polling,
        NotifierState::PollOnly,
    ];

    fn as_str(self) -> &'static str {
        match self {
            NotifierState::Listening => "listening",
            NotifierState::Reconnecting => "reconnecting",
            NotifierState::Polling => "polling",
            NotifierState::PollOnly => "poll_only",
        }
    }
}

/// Sets `shard`'s notifier state (1 for `state`, 0 for the others).
pub(crate) fn notifier_state(shard: &str, state: NotifierState) {
    for s in NotifierState::ALL {
        let value = if s == state { 1.0 } else { 0.0 };
        metrics::gauge!(NOTIFIER_STATE, "shard" => shard.to_string(), "state" => s.as_str()).set(value);
    }
}

/// `shard`'s notifier re-established its LISTEN connection after a loss.
pub(crate) fn notifier_reconnected(shard: &str) {
    metrics::counter!(NOTIFIER_RECONNECTS, "shard" => shard.to_string()).increment(1);
}

/// The rescuer returned `n` jobs with expired leases on `shard`.
pub(crate) fn leases_lost(shard: &str, n: u64) {
    metrics::counter!(LEASES_LOST, "shard" => shard.to_string()).increment(n);
}

pub(crate) fn jobs_rescued(shard: &str, n: u64) {
    metrics::counter!(JOBS_RESCUED, "shard" => shard.to_string()).increment(n);
}

/// A queue's free slots on this node.
pub(crate) fn queue_free_slots(queue: &str, free: usize) {
    metrics::gauge!(QUEUE_FREE_SLOTS, "queue" => queue.to_string()).set(free as f64);
}

/// `queue`'s concurrency limit on this node is `limit` now.
pub(crate) fn queue_concurrency(queue: &str, limit: usize) {
    metrics::gauge!(QUEUE_CONCURRENCY, "queue" => queue.to_string()).set(limit as f64);
}

/// A sampled depth of (`shard`, `queue`): due and scheduled jobs (capped),
/// and the age of the oldest due job.
pub(crate) fn queue_depth(shard: &str, queue: &str, available: i64, scheduled: i64, oldest: Duration) {
    let labels = [("shard", shard.to_string()), ("queue", queue.to_string())];
    metrics::gauge!(QUEUE_AVAILABLE, &labels).set(available as f64);
    metrics::gauge!(QUEUE_SCHEDULED, &labels).set(scheduled as f64);
    metrics::gauge!(QUEUE_OLDEST_SECONDS, &labels).set(oldest.as_secs_f64());
}

/// The shard pool's open and in-use connections.
pub(crate) fn pool_connections(shard: &str, open: u32, idle: usize) {
    metrics::gauge!(POOL_OPEN, "shard" => shard.to_string()).set(f64::from(open));
    metrics::gauge!(POOL_IN_USE, "shard" => shard.to_string()).set(f64::from(open).max(idle as f64) - idle as f64);
}

/// How many shards this node works now.
pub(crate) fn owned_shards(n: usize) {
    metrics::gauge!(OWNED_SHARDS).set(n as f64);
}

/// This node started (`gained`) or stopped (`released`) working `n` shards.
pub(crate) fn ownership_changed(change: &'static str, n: usize) {
    if n > 0 {
        metrics::counter!(OWNERSHIP_CHANGES, "change" => change).increment(n as u64);
    }
}
