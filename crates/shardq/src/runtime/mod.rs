//! [`Runtime`]: a worker node. For each shard it runs one notifier, one
//! producer per queue, one completer, a heartbeat and a rescuer; queue limits
//! are per node and shared fairly across shards.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shardq_router::Router;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use crate::cancel;
use crate::completer::{self, Backoff};
use crate::error::{Error, Result};
use crate::lease;
use crate::metrics::JobMetricsCache;
use crate::notifier;
use crate::periodic::{self, PeriodicJob};
use crate::producer::Producer;
use crate::retention;
use crate::sampler;
use crate::shard::{ShardRunStats, ShardStats, ShardWork};
use crate::slots::QueueSlots;
use crate::store;
use crate::worker::{Registry, Worker};

/// Tunables of a worker node. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Fallback poll of each producer, jittered ±10 % (default 1 s).
    pub poll_interval: Duration,
    /// Least time between two fetches of one producer; wake-ups inside it
    /// coalesce into one fetch (default 0.5 ms).
    pub fetch_cooldown: Duration,
    /// Most jobs one fetch claims (default 1,000; free slots bound it too).
    pub max_batch: usize,
    /// How long a fetched job's lease lasts without renewal (default 30 s).
    pub lease: Duration,
    /// How often leases are renewed (default 10 s; must be under `lease`).
    pub heartbeat_interval: Duration,
    /// How often each shard is checked for expired leases (default 15 s, jittered).
    pub rescue_interval: Duration,
    /// Retry delays after failures.
    pub backoff: Backoff,
    /// This node's id (default `host-pid-random`).
    pub node_id: Option<String>,
    /// How long completed jobs are kept before the pruner deletes them (default 24 h).
    pub retain_completed: Duration,
    /// How long cancelled jobs are kept, with their errors (default 7 days).
    pub retain_cancelled: Duration,
    /// How long discarded jobs are kept, with their errors (default 7 days).
    pub retain_discarded: Duration,
    /// How often each shard's pruner deletes jobs past their retention
    /// (default 60 s, jittered ±20 %).
    pub prune_interval: Duration,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            poll_interval: Duration::from_secs(1),
            fetch_cooldown: Duration::from_micros(500),
            max_batch: 1_000,
            lease: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(10),
            rescue_interval: Duration::from_secs(15),
            backoff: Backoff::default(),
            node_id: None,
            retain_completed: Duration::from_secs(24 * 3600),
            retain_cancelled: Duration::from_secs(7 * 24 * 3600),
            retain_discarded: Duration::from_secs(7 * 24 * 3600),
            prune_interval: Duration::from_secs(60),
        }
    }
}

impl RuntimeOptions {
    /// Checks the options; messages name the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Runtime(m.to_string()));
        if self.poll_interval.is_zero() {
            return bad("poll_interval must be more than 0");
        }
        if self.max_batch == 0 {
            return bad("max_batch must be at least 1");
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval >= self.lease {
            return bad("heartbeat_interval must be more than 0 and less than lease");
        }
        if self.rescue_interval.is_zero() {
            return bad("rescue_interval must be more than 0");
        }
        if self.prune_interval.is_zero() {
            return bad("prune_interval must be more than 0");
        }
        Ok(())
    }
}

/// What every task of a node reads: its id, handlers and options. Set at start.
pub(crate) struct Node {
    pub id: String,
    pub registry: Registry,
    pub options: RuntimeOptions,
}

/// Builds a worker node.
pub struct RuntimeBuilder {
    router: Arc<Router>,
    queues: BTreeMap<String, usize>,
    registry: Registry,
    options: RuntimeOptions,
    /// Where to serve `/metrics` and `/healthz`; `None`: not served.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    metrics_addr: Option<SocketAddr>,
    /// Periodic jobs this node schedules (every node may declare the same
    /// ones: each occurrence is enqueued once).
    periodic: Vec<PeriodicJob>,
}

impl RuntimeBuilder {
    /// Serves `/metrics` (Prometheus) and `/healthz` on `addr` while the node
    /// runs, installing the Prometheus recorder first (see [`crate::http`]).
    /// Port 0 picks a free port: [`Runtime::metrics_addr`] tells which.
    #[cfg(feature = "http")]
    pub fn metrics_addr(mut self, addr: SocketAddr) -> Self {
        self.metrics_addr = Some(addr);
        self
    }

    /// Works `queue` with at most `limit` concurrent jobs on this node (across all shards).
    pub fn queue(mut self, queue: impl Into<String>, limit: usize) -> Self {
        self.queues.insert(queue.into(), limit);
        self
    }

    /// Registers a handler for `W::KIND`.
    pub fn register<W: Worker>(mut self, worker: W) -> Self {
        self.registry.register(worker);
        self
    }

    /// Schedules a periodic job on this node (see [`crate::periodic`]).
    /// Declare the same ones on every node: each occurrence is enqueued
    /// exactly once however many nodes run, and a node that starts enqueues
    /// the occurrences of the job's catch-up window that none recorded.
    pub fn periodic(mut self, job: PeriodicJob) -> Self {
        self.periodic.push(job);
        self
    }

    /// Replaces the options.
    pub fn options(mut self, options: RuntimeOptions) -> Self {
        self.options = options;
        self
    }

    /// Starts every task; returns at once. Must be called inside a tokio runtime.
    pub fn start(self) -> Result<Runtime> {
        self.options.validate()?;
        if self.queues.is_empty() {
            return Err(Error::Runtime(
                "no queues: call .queue(name, limit) at least once".into(),
            ));
        }
        if let Some((q, _)) = self.queues.iter().find(|(_, l)| **l == 0) {
            return Err(Error::Runtime(format!("queue {q:?}: limit must be at least 1")));
        }
        let mut names = std::collections::BTreeSet::new();
        if let Some(dup) = self.periodic.iter().find(|p| !names.insert(p.name())) {
            return Err(Error::Periodic {
                name: dup.name().to_string(),
                message: "declared twice on this node; names must be unique".into(),
            });
        }
        // The recorder goes in before any metric handle is made.
        #[cfg(feature = "http")]
        let endpoint = match self.metrics_addr {
            Some(addr) => Some((crate::http::bind(addr)?, crate::http::install_prometheus()?)),
            None => None,
        };
        let node = Arc::new(Node {
            id: self.options.node_id.clone().unwrap_or_else(default_node_id),
            registry: self.registry,
            options: self.options,
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let (finish_tx, finish_rx) = watch::channel(false);
        let databases = self.router.shards();
        // wakes[queue][shard]
        let wakes: BTreeMap<&String, Vec<Arc<Notify>>> = self
            .queues
            .keys()
            .map(|q| (q, databases.iter().map(|_| Arc::new(Notify::new())).collect()))
            .collect();
        let slots: BTreeMap<&String, Arc<QueueSlots>> = self
            .queues
            .iter()
            .map(|(q, limit)| (q, Arc::new(QueueSlots::new(*limit, wakes[q].clone()))))
            .collect();
        let mut shards = Vec::new();
        let mut producers_tasks = Vec::new();
        let mut tasks = Vec::new();
        let mut completers = Vec::new();
        for (index, db) in databases.iter().enumerate() {
            let (done_tx, done_rx) = mpsc::channel(10_000);
            let shard = Arc::new(ShardWork {
                index,
                db: db.clone(),
                leases: Default::default(),
                leases_changed: Notify::new(),
                done_tx,
                stats: ShardStats::default(),
                metrics: JobMetricsCache::new(&db.name),
            });
            completers.push(tokio::spawn(completer::run(
                shard.clone(),
                done_rx,
                node.options.backoff,
                finish_rx.clone(),
            )));
            let mut producers = HashMap::new();
            for q in self.queues.keys() {
                let wake = wakes[q][index].clone();
                producers.insert(q.clone(), wake.clone());
                let p = Producer {
                    node: node.clone(),
                    shard: shard.clone(),
                    queue: q.as_str().into(),
                    slots: slots[q].clone(),
                    wake,
                };
                producers_tasks.push(tokio::spawn(p.run(stop_rx.clone())));
            }
            tasks.push(tokio::spawn(notifier::run(shard.clone(), producers, stop_rx.clone())));
            // Leases are renewed until the end of shutdown: jobs keep running
            // through the grace period.
            tasks.push(tokio::spawn(lease::heartbeat(
                node.clone(),
                shard.clone(),
                finish_rx.clone(),
            )));
            tasks.push(tokio::spawn(lease::rescuer(
                node.clone(),
                shard.clone(),
                stop_rx.clone(),
            )));
            tasks.push(tokio::spawn(retention::pruner(
                node.clone(),
                shard.clone(),
                stop_rx.clone(),
            )));
            // Cancel signals reach running jobs until the end of shutdown.
            tasks.push(tokio::spawn(cancel::sweeper(
                node.clone(),
                shard.clone(),
                finish_rx.clone(),
            )));
            tasks.push(tokio::spawn(sampler::shard(
                shard.clone(),
                self.queues.keys().map(|q| q.as_str().into()).collect(),
                sampler::INTERVAL,
                stop_rx.clone(),
            )));
            shards.push(shard);
        }
        if !self.periodic.is_empty() {
            tasks.push(tokio::spawn(periodic::run(
                self.router.clone(),
                Arc::new(self.periodic),
                stop_rx.clone(),
            )));
        }
        tasks.push(tokio::spawn(sampler::slots(
            slots.iter().map(|(q, s)| (q.as_str().into(), s.clone())).collect(),
            sampler::INTERVAL,
            stop_rx.clone(),
        )));
        #[cfg_attr(not(feature = "http"), allow(unused_mut))]
        let mut metrics_addr = None;
        #[cfg(feature = "http")]
        if let Some((listener, handle)) = endpoint {
            metrics_addr = listener.local_addr().ok();
            let router = self.router.clone();
            let mut stop = finish_rx.clone();
            tasks.push(tokio::spawn(async move {
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                if let Err(e) = crate::http::serve(listener, router, handle, stopped).await {
                    tracing::warn!(error = %crate::error::ErrorChain(&e), "metrics endpoint stopped");
                }
            }));
            tracing::info!(addr = ?metrics_addr, "serving /metrics and /healthz");
        }
        tracing::info!(node = %node.id, shards = shards.len(), queues = ?self.queues, "worker node started");
        Ok(Runtime {
            node,
            shards,
            stop_tx,
            finish_tx,
            producers: producers_tasks,
            tasks,
            completers,
            metrics_addr,
        })
    }
}

/// A running worker node. Call [`Runtime::shutdown`] to stop it cleanly.
pub struct Runtime {
    node: Arc<Node>,
    shards: Vec<Arc<ShardWork>>,
    /// Stops producers, notifiers, heartbeats and rescuers.
    stop_tx: watch::Sender<bool>,
    /// Tells completers to write what is queued and stop, and stops heartbeats.
    finish_tx: watch::Sender<bool>,
    /// One per (shard, queue); they return once `stop_tx` is sent.
    producers: Vec<JoinHandle<()>>,
    /// Notifiers, heartbeats and rescuers.
    tasks: Vec<JoinHandle<()>>,
    completers: Vec<JoinHandle<()>>,
    /// Where `/metrics` and `/healthz` are served, if they are; set at start.
    metrics_addr: Option<SocketAddr>,
}

impl Runtime {
    /// A builder for a node working jobs routed by `router`.
    pub fn builder(router: Arc<Router>) -> RuntimeBuilder {
        RuntimeBuilder {
            router,
            queues: BTreeMap::new(),
            registry: Registry::default(),
            options: RuntimeOptions::default(),
            metrics_addr: None,
            periodic: Vec::new(),
        }
    }

    /// The address `/metrics` and `/healthz` are served on, when
    /// [`RuntimeBuilder::metrics_addr`] was set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// This node's id (recorded as `locked_by` on the jobs it runs).
    pub fn node_id(&self) -> &str {
        &self.node.id
    }

    /// Per-shard run statistics so far, with pickup latency percentiles
    /// (computed from every sample: call it once at the end, not in a loop).
    pub fn stats(&self) -> Vec<ShardRunStats> {
        self.shards.iter().map(|s| s.stats.snapshot(&s.db.name, true)).collect()
    }

    /// Per-shard outcome counters so far, without latency (cheap to poll).
    pub fn counts(&self) -> Vec<ShardRunStats> {
        self.shards
            .iter()
            .map(|s| s.stats.snapshot(&s.db.name, false))
            .collect()
    }

    /// Jobs this node holds leases on right now.
    pub fn leased(&self) -> usize {
        self.shards.iter().map(|s| s.leased_count()).sum()
    }

    /// Runs until `signal` resolves, then shuts down with `grace`.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>, grace: Duration) {
        signal.await;
        self.shutdown(grace).await;
    }

    /// Stops fetching, lets running jobs finish for up to `grace`, hands the
    /// rest back (available at once, the interrupted attempt not counted),
    /// flushes pending outcomes, and stops every task.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.stop_tx.send(true);
        let deadline = tokio::time::Instant::now() + grace;
        // A producer finishes the fetch it is in (its jobs are then leased
        // and handled below) and returns.
        for p in self.producers {
            let _ = p.await;
        }
        for shard in &self.shards {
            loop {
                let changed = shard.leases_changed.notified();
                if shard.leased_count() == 0 {
                    break;
                }
                if tokio::time::timeout_at(deadline, changed).await.is_err() {
                    break;
                }
            }
        }
        for shard in &self.shards {
            give_back(&self.node, shard).await;
        }
        for t in &self.tasks {
            t.abort();
        }
        let _ = self.finish_tx.send(true);
        for c in self.completers {
            // Pending outcomes are flushed; a shard that stays down past a
            // further grace period leaves its jobs to lease expiry and rescue.
            let abort = c.abort_handle();
            if tokio::time::timeout(grace.max(Duration::from_secs(5)), c)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        tracing::info!("worker node stopped");
    }
}

/// Aborts this node's runs still going on `shard` and makes their jobs available again.
async fn give_back(node: &Node, shard: &ShardWork) {
    let (ids, attempts): (Vec<i64>, Vec<i32>) = match shard.leases.lock() {
        Ok(mut leases) => {
            let running: Vec<(i64, i32)> = leases
                .iter_mut()
                .filter_map(|(id, l)| {
                    l.run.take().map(|run| {
                        run.abort();
                        (*id, l.attempt)
                    })
                })
                .collect();
            for (id, _) in &running {
                leases.remove(id);
            }
            running.into_iter().unzip()
        }
        Err(_) => return,
    };
    if ids.is_empty() {
        return;
    }
    match store::job_give_back(&shard.db.pool, &ids, &attempts, &node.id).await {
        Ok(n) => tracing::info!(shard = %shard.db.name, given_back = n, "handed running jobs back"),
        Err(e) => {
            tracing::warn!(shard = %shard.db.name, error = %shard.db.error(e), "hand-back failed; leases will expire and the jobs be rescued")
        }
    }
}

fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "node".into());
    format!("{host}-{}-{:04x}", std::process::id(), rand::random::<u16>())
}
