//! [`Runtime`]: a worker node. This file only wires: per node, the shard
//! set (which starts and stops each shard's unit of work as the router's
//! shards and this node's ownership change), the scheduler of periodic
//! jobs, the slot sampler and the metrics endpoint; and it shuts them down
//! in order.
//!
//! The stages, each in its own file (they import [`node`] and the store,
//! never this file nor each other, except the producer, which runs jobs
//! through the executor and gates them with its queue's slots):
//! - `node`: the shared types at the bottom: `Node`, `ShardWork`, `Leases`,
//!   `Done`, run statistics.
//! - [`options`]: [`RuntimeOptions`] and [`Backoff`].
//! - `shard_set`: keeps the running shard units equal to the shards this
//!   node should work (router reloads, ownership, handover).
//! - [`fleet`]: the node registry heartbeat and rendezvous ownership.
//! - `shard_work`: one shard's unit of work: starts its stages over its own
//!   engine pool, stops them in order (stop claiming, grace, hand back,
//!   flush, release).
//! - `notifier`: per shard, the one LISTEN connection; hands payloads to
//!   subscribers by channel.
//! - `producer`: per (shard, queue), claims due jobs ahead of the free slots
//!   into a bounded buffer and runs each in its own task as slots free; its
//!   callback hands the outcome on.
//! - `wakeup`: a producer's next wake-up, from its queue's earliest scheduled job.
//! - `slots`: a queue's node-wide limit, shared fairly across shards.
//! - `adaptive`: the gradient limiter that sizes a queue's limit when
//!   adaptive concurrency is on.
//! - `executor`: runs a handler with timeout and panic capture.
//! - `completer`: per shard, writes outcomes in batches, fenced by each run's key.
//! - `heartbeat`: renews this node's leases; hands running jobs back at shutdown.
//! - `rescuer`: returns jobs whose lease expired to the queue.
//! - `cancel`: signals a running job's handler when it is cancelled.
//! - `retention`: prunes finished jobs past their retention.
//! - `sampler`: depth, oldest-job, pool and slot gauges.
//! - `scheduler`: enqueues periodic jobs' occurrences.
//! - `permits`: permits of named resources, leased from the master in
//!   batches and renewed every heartbeat; taken by producers per job.

mod adaptive;
mod cancel;
mod completer;
mod executor;
pub mod fleet;
mod heartbeat;
mod node;
mod notifier;
pub mod options;
mod permits;
mod producer;
mod rescuer;
mod retention;
mod sampler;
mod scheduler;
mod shard_set;
mod shard_work;
mod slots;
mod wakeup;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shardq_router::Router;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::periodic::PeriodicJob;
use crate::worker::{Registry, Worker};
use node::Node;
pub use node::ShardRunStats;
pub use notifier::CHANNEL;
pub use options::{AdaptiveConcurrency, Backoff, RuntimeOptions};
use shard_set::{ShardSet, Works};
use shard_work::{Plant, STOP_AFTER_GRACE};
use slots::QueueSlots;

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
    /// runs, installing the Prometheus recorder first (see [`crate::observe::http`]).
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

    /// Schedules a periodic job on this node (see [`crate::periodic`]; the
    /// node's scheduler enqueues its occurrences).
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

    /// Starts every task; returns at once. Must be called inside a tokio
    /// runtime. The shards' work starts in the background: at once for
    /// every shard when `nodes_per_shard` is 0 or this node is alone in
    /// the node registry, else for the shards it owns one fleet heartbeat
    /// after it registered (see [`fleet`]).
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
            Some(addr) => Some((
                crate::observe::http::bind(addr)?,
                crate::observe::http::install_prometheus()?,
            )),
            None => None,
        };
        let node = Arc::new(Node {
            id: self.options.node_id.clone().unwrap_or_else(default_node_id),
            registry: self.registry,
            options: self.options,
            permits: Arc::new(permits::Permits::new(self.router.master().clone())),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let (end_tx, end_rx) = watch::channel(false);
        // The engine's own connections per shard, apart from the pools the
        // application's handlers use through the router.
        let engine_connections = node.options.engine_connections.unwrap_or(self.queues.len() as u32 + 4);
        let n = self.router.shards().len();
        let queues: Vec<Arc<str>> = self.queues.keys().map(|q| Arc::from(q.as_str())).collect();
        // Slot tables grow with the positions the shard set hands out.
        let adaptive = node.options.adaptive.clone();
        let slots: BTreeMap<Arc<str>, Arc<QueueSlots>> = queues
            .iter()
            .map(|q| {
                let limit = self.queues[&**q];
                let limiter = adaptive
                    .as_ref()
                    .filter(|a| a.covers(q))
                    .map(|a| adaptive::Limiter::new(a.min, limit, a.window, a.tolerance, tokio::time::Instant::now()));
                (q.clone(), Arc::new(QueueSlots::new(q.clone(), limit, limiter)))
            })
            .collect();
        let queue_slots: Vec<(Arc<str>, Arc<QueueSlots>)> = slots.iter().map(|(q, s)| (q.clone(), s.clone())).collect();
        let limits = queue_slots.clone();
        let plant = Arc::new(Plant {
            node: node.clone(),
            queues,
            slots,
            engine_connections,
        });
        let membership = (node.options.nodes_per_shard > 0).then(|| {
            let limits: Vec<(String, usize)> = self.queues.iter().map(|(q, l)| (q.clone(), *l)).collect();
            fleet::Membership::new(self.router.master().clone(), &limits)
        });
        let works = Arc::new(Works::default());
        let (shutdown_tx, shutdown_rx) = watch::channel(None);
        let shard_set =
            tokio::spawn(ShardSet::new(plant, self.router.clone(), membership, works.clone()).run(shutdown_rx));
        let mut tasks = Vec::new();
        if !self.periodic.is_empty() {
            tasks.push(tokio::spawn(scheduler::run(
                self.router.clone(),
                Arc::new(self.periodic),
                worked(&works),
                stop_rx.clone(),
            )));
        }
        tasks.push(tokio::spawn(permits::run(
            node.permits.clone(),
            node.id.clone(),
            node.options.lease,
            node.options.heartbeat_interval,
            end_rx.clone(),
        )));
        tasks.push(tokio::spawn(sampler::slots(
            move || {
                queue_slots
                    .iter()
                    .map(|(q, s)| (q.clone(), s.free(), s.limit()))
                    .collect()
            },
            sampler::INTERVAL,
            stop_rx.clone(),
        )));
        #[cfg_attr(not(feature = "http"), allow(unused_mut))]
        let mut metrics_addr = None;
        #[cfg(feature = "http")]
        if let Some((listener, handle)) = endpoint {
            metrics_addr = listener.local_addr().ok();
            let router = self.router.clone();
            let works_read = works.clone();
            let mut stop = end_rx.clone();
            tasks.push(tokio::spawn(async move {
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                let shards = worked(&works_read);
                let served = crate::observe::http::serve_node(listener, router, handle, shards, stopped);
                if let Err(e) = served.await {
                    tracing::warn!(error = %crate::error::ErrorChain(&e), "metrics endpoint stopped");
                }
            }));
            tracing::info!(addr = ?metrics_addr, "serving /metrics and /healthz");
        }
        tracing::info!(node = %node.id, shards = n, nodes_per_shard = node.options.nodes_per_shard, queues = ?self.queues, "worker node started");
        Ok(Runtime {
            node,
            limits,
            works,
            stop_tx,
            end_tx,
            shutdown_tx,
            shard_set,
            tasks,
            metrics_addr,
        })
    }
}

/// A running worker node. Call [`Runtime::shutdown`] to stop it cleanly.
pub struct Runtime {
    node: Arc<Node>,
    /// Each queue's slots (read for its limit now); set at start.
    limits: Vec<(Arc<str>, Arc<QueueSlots>)>,
    /// The shards worked now and every shard unit started so far.
    works: Arc<Works>,
    /// Stops the scheduler and the slot sampler.
    stop_tx: watch::Sender<bool>,
    /// Stops the metrics endpoint, at the very end of shutdown.
    end_tx: watch::Sender<bool>,
    /// Carries the shutdown's grace to the shard set.
    shutdown_tx: watch::Sender<Option<Duration>>,
    /// The shard set's task; returns once every unit stopped.
    shard_set: JoinHandle<()>,
    /// Every other task.
    tasks: Vec<JoinHandle<()>>,
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
    /// A shard this node stopped and started again adds up over its runs.
    pub fn stats(&self) -> Vec<ShardRunStats> {
        self.snapshots(true)
    }

    /// Per-shard outcome counters so far, without latency (cheap to poll).
    pub fn counts(&self) -> Vec<ShardRunStats> {
        self.snapshots(false)
    }

    /// Starts the run statistics afresh: every shard's counters back to 0
    /// and its pickup samples dropped, so that [`stats`](Self::stats) and
    /// [`counts`](Self::counts) cover only what runs from now on (a
    /// benchmark's measured window after its warm-up).
    pub fn reset_stats(&self) {
        let all = self.works.all.lock().map(|a| a.clone()).unwrap_or_default();
        for s in all {
            s.stats.reset();
        }
    }

    fn snapshots(&self, latency: bool) -> Vec<ShardRunStats> {
        let all = self.works.all.lock().map(|a| a.clone()).unwrap_or_default();
        let mut by_shard: BTreeMap<String, ShardRunStats> = BTreeMap::new();
        let mut order = Vec::new();
        for s in all {
            let snap = s.stats.snapshot(&s.db.name, latency);
            match by_shard.get_mut(&s.db.name) {
                Some(sum) => sum.add(&snap),
                None => {
                    order.push(s.db.name.clone());
                    by_shard.insert(s.db.name.clone(), snap);
                }
            }
        }
        order.into_iter().filter_map(|n| by_shard.remove(&n)).collect()
    }

    /// Each queue's concurrency limit on this node now: the configured one,
    /// or where adaptive concurrency put it (see [`AdaptiveConcurrency`]).
    pub fn concurrency(&self) -> BTreeMap<String, usize> {
        self.limits.iter().map(|(q, s)| (q.to_string(), s.limit())).collect()
    }

    /// Permits of resource `name` this node may use now (granted by the
    /// master and within their lease); `None` when the resource is not
    /// declared or has no concurrency limit.
    pub fn permits_of(&self, name: &str) -> Option<u32> {
        self.node.permits.granted(name)
    }

    /// Jobs this node holds leases on right now.
    pub fn leased(&self) -> usize {
        let active = self
            .works
            .active
            .lock()
            .map(|a| a.values().cloned().collect::<Vec<_>>());
        active.unwrap_or_default().iter().map(|s| s.leases.count()).sum()
    }

    /// The shards this node works now (owned, or still being handed over),
    /// by name.
    pub fn working(&self) -> Vec<String> {
        self.works
            .active
            .lock()
            .map(|a| a.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The shards this node stopped owning whose work is still stopping
    /// (the handover: finishing or handing back runs, releasing connections).
    pub fn releasing(&self) -> Vec<String> {
        self.works
            .releasing
            .lock()
            .map(|r| r.iter().map(|s| s.db.name.clone()).collect())
            .unwrap_or_default()
    }

    /// Open engine connections of this node per shard, over the shards it
    /// works and those still being released (the node's own pools; the
    /// router's application pools are not counted).
    pub fn engine_connections(&self) -> BTreeMap<String, u32> {
        let mut out: BTreeMap<String, u32> = BTreeMap::new();
        let active = self
            .works
            .active
            .lock()
            .map(|a| a.values().cloned().collect::<Vec<_>>());
        let releasing = self.works.releasing.lock().map(|r| r.clone());
        for s in active
            .unwrap_or_default()
            .into_iter()
            .chain(releasing.unwrap_or_default())
        {
            *out.entry(s.db.name.clone()).or_default() += s.db.pool.size();
        }
        out
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
        let start = tokio::time::Instant::now();
        let _ = self.stop_tx.send(true);
        let _ = self.shutdown_tx.send(Some(grace));
        // Each unit returns within grace + STOP_AFTER_GRACE (plus closing its
        // pool); leaving the registry is bounded by the fleet heartbeat.
        let last = start + grace + STOP_AFTER_GRACE * 2 + self.node.options.fleet_heartbeat;
        let abort = self.shard_set.abort_handle();
        if tokio::time::timeout_at(last, self.shard_set).await.is_err() {
            abort.abort();
            tracing::warn!("some shards did not answer within the shutdown deadline; their jobs will be rescued when their leases expire");
        }
        let _ = self.end_tx.send(true);
        self.node.permits.end(&self.node.id, Duration::from_secs(1)).await;
        for t in &self.tasks {
            t.abort();
        }
        tracing::info!(took = ?start.elapsed(), "worker node stopped");
    }
}

/// Reads the names of the shards this node works now (owned, or still
/// handed over): what the scheduler and `/healthz` reach.
fn worked(works: &Arc<Works>) -> impl Fn() -> std::collections::BTreeSet<String> + Send + Sync + 'static {
    let works = works.clone();
    move || {
        works
            .active
            .lock()
            .map(|a| a.keys().cloned().collect())
            .unwrap_or_default()
    }
}

fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "node".into());
    format!("{host}-{}-{:04x}", std::process::id(), rand::random::<u16>())
}
