//! [`Runtime`]: a worker node. This file only wires: for each shard it
//! spawns one notifier, one producer per queue, one completer, a heartbeat,
//! a rescuer, a pruner, a cancel sweeper and a sampler; per node, the
//! scheduler of periodic jobs and the slot sampler; and it shuts them down
//! in order.
//!
//! The stages, each in its own file (they import [`node`] and the store,
//! never this file nor each other, except the producer, which runs jobs
//! through the executor and gates them with its queue's slots):
//! - `node`: the shared types at the bottom: `Node`, `ShardWork`, `Leases`,
//!   `Done`, run statistics.
//! - [`options`]: [`RuntimeOptions`] and [`Backoff`].
//! - `notifier`: per shard, the one LISTEN connection; hands payloads to
//!   subscribers by channel.
//! - `producer`: per (shard, queue), claims due jobs ahead of the free slots
//!   into a bounded buffer and runs each in its own task as slots free; its
//!   callback hands the outcome on.
//! - `wakeup`: a producer's next wake-up, from its queue's earliest scheduled job.
//! - `slots`: a queue's node-wide limit, shared fairly across shards.
//! - `executor`: runs a handler with timeout and panic capture.
//! - `completer`: per shard, writes outcomes in batches, fenced by attempt.
//! - `heartbeat`: renews this node's leases; hands running jobs back at shutdown.
//! - `rescuer`: returns jobs whose lease expired to the queue.
//! - `cancel`: signals a running job's handler when it is cancelled.
//! - `retention`: prunes finished jobs past their retention.
//! - `sampler`: depth, oldest-job, pool and slot gauges.
//! - `scheduler`: enqueues periodic jobs' occurrences.

mod cancel;
mod completer;
mod executor;
mod heartbeat;
mod node;
mod notifier;
pub mod options;
mod producer;
mod rescuer;
mod retention;
mod sampler;
mod scheduler;
mod slots;
mod wakeup;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shardq_router::router::Database;
use shardq_router::Router;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::observe::metrics::JobMetricsCache;
use crate::periodic::PeriodicJob;
use crate::store;
use crate::worker::{Registry, Worker};
pub use node::ShardRunStats;
use node::{Node, ShardStats, ShardWork};
pub use notifier::CHANNEL;
use notifier::{Subscriber, Subscriptions};
pub use options::{Backoff, RuntimeOptions};
use producer::Producer;
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
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let (finish_tx, finish_rx) = watch::channel(false);
        let (end_tx, end_rx) = watch::channel(false);
        // The engine's own connections per shard, apart from the pools the
        // application's handlers use through the router.
        let engine_connections = node.options.engine_connections.unwrap_or(self.queues.len() as u32 + 4);
        let databases: Vec<Database> = self
            .router
            .shards()
            .iter()
            .map(|db| engine_database(db, engine_connections))
            .collect();
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
                    done: done_tx.clone(),
                };
                producers_tasks.push(tokio::spawn(p.run(stop_rx.clone())));
            }
            tasks.push(tokio::spawn(notifier::run(
                db.clone(),
                subscriptions(&shard, producers),
                stop_rx.clone(),
            )));
            // Leases are renewed until the end of shutdown: jobs keep running
            // through the grace period.
            tasks.push(tokio::spawn(heartbeat::run(
                node.clone(),
                shard.clone(),
                end_rx.clone(),
            )));
            tasks.push(tokio::spawn(rescuer::run(node.clone(), shard.clone(), stop_rx.clone())));
            tasks.push(tokio::spawn(retention::pruner(
                node.clone(),
                shard.clone(),
                stop_rx.clone(),
            )));
            // Cancel signals reach running jobs until the end of shutdown.
            tasks.push(tokio::spawn(cancel::sweeper(
                node.clone(),
                shard.clone(),
                end_rx.clone(),
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
            tasks.push(tokio::spawn(scheduler::run(
                self.router.clone(),
                Arc::new(self.periodic),
                stop_rx.clone(),
            )));
        }
        let queue_slots: Vec<(Arc<str>, Arc<QueueSlots>)> =
            slots.iter().map(|(q, s)| (q.as_str().into(), s.clone())).collect();
        tasks.push(tokio::spawn(sampler::slots(
            move || queue_slots.iter().map(|(q, s)| (q.clone(), s.free())).collect(),
            sampler::INTERVAL,
            stop_rx.clone(),
        )));
        #[cfg_attr(not(feature = "http"), allow(unused_mut))]
        let mut metrics_addr = None;
        #[cfg(feature = "http")]
        if let Some((listener, handle)) = endpoint {
            metrics_addr = listener.local_addr().ok();
            let router = self.router.clone();
            let mut stop = end_rx.clone();
            tasks.push(tokio::spawn(async move {
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                if let Err(e) = crate::observe::http::serve(listener, router, handle, stopped).await {
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
            end_tx,
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
    /// Stops producers, notifiers, rescuers, pruners, samplers and the scheduler.
    stop_tx: watch::Sender<bool>,
    /// Tells completers to write what is queued and stop.
    finish_tx: watch::Sender<bool>,
    /// Stops heartbeats, cancel sweepers and the metrics endpoint, at the
    /// very end of shutdown (leases stay renewed while runs are handed back
    /// and outcomes flushed).
    end_tx: watch::Sender<bool>,
    /// One per (shard, queue); they return once `stop_tx` is sent.
    producers: Vec<JoinHandle<()>>,
    /// Every other task but the completers.
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
        self.shards.iter().map(|s| s.leases.count()).sum()
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
        let start = tokio::time::Instant::now();
        let deadline = start + grace;
        // Whatever is not done by then is left to lease expiry and rescue:
        // a shard that does not answer never holds the node past it.
        let last = deadline + SHUTDOWN_AFTER_GRACE;
        // A producer finishes the fetch it is in (its jobs are then leased
        // and handled below) and returns; one still waiting on a shard at the
        // deadline is stopped.
        for p in self.producers {
            let abort = p.abort_handle();
            if tokio::time::timeout_at(deadline, p).await.is_err() {
                abort.abort();
            }
        }
        futures::future::join_all(self.shards.iter().map(|s| s.leases.wait_released(deadline))).await;
        // Runs still going are handed back while the completers flush the
        // outcomes of the ended ones, on every shard at once; leases stay
        // renewed until both are done.
        let _ = self.finish_tx.send(true);
        let hand_backs = futures::future::join_all(self.shards.iter().map(|s| heartbeat::hand_back(&self.node, s)));
        let completers = futures::future::join_all(self.completers.into_iter().map(|c| {
            let abort = c.abort_handle();
            async move {
                if tokio::time::timeout_at(last, c).await.is_err() {
                    abort.abort();
                }
            }
        }));
        if tokio::time::timeout_at(last, futures::future::join(hand_backs, completers))
            .await
            .is_err()
        {
            tracing::warn!("some shards did not answer within the shutdown deadline; their jobs will be rescued when their leases expire");
        }
        let _ = self.end_tx.send(true);
        for t in &self.tasks {
            t.abort();
        }
        tracing::info!(took = ?start.elapsed(), "worker node stopped");
    }
}

/// How long shutdown goes on after the grace period, at most: handing back
/// the runs still going and flushing the last outcomes.
const SHUTDOWN_AFTER_GRACE: Duration = Duration::from_millis(900);

/// A pool of at most `max` connections to `db`'s database, opened lazily
/// with the same connect options and acquire timeout as the router's pool:
/// the engine's stages (producers, completer, heartbeat, upkeep) use it, so
/// handlers that hold every connection of the router's pool cannot starve
/// lease renewals or outcome writes. Its sessions carry
/// `store::ENGINE_SESSION_SETTINGS` (JIT off).
fn engine_database(db: &Database, max: u32) -> Database {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(max)
        .min_connections(0)
        .acquire_timeout(db.pool.options().get_acquire_timeout())
        .connect_lazy_with(
            db.pool
                .connect_options()
                .as_ref()
                .clone()
                .options(store::ENGINE_SESSION_SETTINGS),
        );
    Database {
        name: db.name.clone(),
        pool,
        target: db.target.clone(),
    }
}

/// Who hears what on `shard`'s LISTEN connection: job notifications wake the
/// producer of the queue named in the payload, cancel notifications go to
/// the cancel stage, and every (re)connect wakes every producer.
fn subscriptions(shard: &Arc<ShardWork>, producers: HashMap<String, Arc<Notify>>) -> Subscriptions {
    let producers = Arc::new(producers);
    let wake_queue: Subscriber = {
        let producers = producers.clone();
        Box::new(move |queue| {
            if let Some(w) = producers.get(queue) {
                w.notify_one();
            }
        })
    };
    let cancelled: Subscriber = {
        let shard = shard.clone();
        Box::new(move |payload| cancel::on_notification(&shard, payload))
    };
    Subscriptions {
        channels: HashMap::from([(CHANNEL, wake_queue), (store::CANCEL_CHANNEL, cancelled)]),
        on_listen: Box::new(move || producers.values().for_each(|w| w.notify_one())),
    }
}

fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "node".into());
    format!("{host}-{}-{:04x}", std::process::id(), rand::random::<u16>())
}
