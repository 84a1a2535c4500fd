//! [`Runtime`]: a worker node. For each shard it runs one notifier, one
//! producer per queue, one completer, a heartbeat and a rescuer; queue limits
//! are per node and shared fairly across shards.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use shardq_router::Router;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use crate::completer::{self, Backoff};
use crate::error::{Error, Result};
use crate::lease;
use crate::notifier;
use crate::producer::Producer;
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
}

impl RuntimeBuilder {
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
            shards.push(shard);
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
}

impl Runtime {
    /// A builder for a node working jobs routed by `router`.
    pub fn builder(router: Arc<Router>) -> RuntimeBuilder {
        RuntimeBuilder {
            router,
            queues: BTreeMap::new(),
            registry: Registry::default(),
            options: RuntimeOptions::default(),
        }
    }

    /// This node's id (recorded as `locked_by` on the jobs it runs).
    pub fn node_id(&self) -> &str {
        &self.node.id
    }

    /// Per-shard run statistics so far.
    pub fn stats(&self) -> Vec<ShardRunStats> {
        self.shards.iter().map(|s| s.stats.snapshot(&s.db.name)).collect()
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
