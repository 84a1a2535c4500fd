//! One shard's work on this node as a unit that starts and stops while the
//! node runs: [`ShardUnit`] spawns the shard's notifier, one producer per
//! queue, its completer, heartbeat, rescuer, pruner, cancel sweeper and
//! sampler over the shard's own engine pool, and [`ShardUnit::stop`] ends
//! them in order: stop claiming, let running jobs finish within grace, hand
//! the rest back, flush outcomes, release the connections.
//!
//! [`Plant`] holds what every unit of a node is started with: the node, its
//! queues and their node-wide slots, where each unit's producers get their
//! wake-ups by the unit's slot position (the shard set hands positions out).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shardq_router::router::Database;
use shardq_router::Pooler;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use super::node::{Node, ShardStats, ShardWork};
use super::notifier::{self, Subscriber, Subscriptions, CHANNEL};
use super::producer::Producer;
use super::slots::QueueSlots;
use super::{cancel, completer, heartbeat, rescuer, retention, sampler};
use crate::observe::metrics::JobMetricsCache;
use crate::store;

/// How long a stop goes on after its grace period, at most: handing back
/// the runs still going and flushing the last outcomes.
pub(crate) const STOP_AFTER_GRACE: Duration = Duration::from_millis(900);

/// What every shard unit of a node is started with; set once at start.
pub(crate) struct Plant {
    /// The node's id, handlers and options.
    pub node: Arc<Node>,
    /// The queues this node works, in order.
    pub queues: Vec<Arc<str>>,
    /// Each queue's node-wide slots, shared by its producers on every
    /// shard; they hold the producers' wake-ups by slot position.
    pub slots: BTreeMap<Arc<str>, Arc<QueueSlots>>,
    /// Most connections of a unit's engine pool.
    pub engine_connections: u32,
}

/// One shard's running work on this node.
pub(crate) struct ShardUnit {
    /// The state its stages share.
    pub shard: Arc<ShardWork>,
    /// Stops producers, notifier, rescuer, pruner and sampler.
    stop_tx: watch::Sender<bool>,
    /// Tells the completer to write what is queued and stop.
    finish_tx: watch::Sender<bool>,
    /// Stops the heartbeat and the cancel sweeper, at the very end.
    end_tx: watch::Sender<bool>,
    producers: Vec<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
    completer: JoinHandle<()>,
}

impl ShardUnit {
    /// Starts `db`'s work at slot `position` over a new engine pool (opened
    /// lazily: the notifier's LISTEN and the first claims open it).
    pub(crate) fn start(plant: &Plant, db: &Database, position: usize) -> ShardUnit {
        let node = &plant.node;
        let db = engine_database(db, plant.engine_connections);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (finish_tx, finish_rx) = watch::channel(false);
        let (end_tx, end_rx) = watch::channel(false);
        let (done_tx, done_rx) = mpsc::channel(10_000);
        let shard = Arc::new(ShardWork {
            index: position,
            leases: Default::default(),
            stats: ShardStats::default(),
            metrics: JobMetricsCache::new(&db.name),
            db,
        });
        let completer = tokio::spawn(completer::run(shard.clone(), done_rx, node.options.backoff, finish_rx));
        let mut producers = Vec::new();
        let mut wakes = HashMap::new();
        for q in &plant.queues {
            let wake = plant.slots[q].waker(position);
            let limits_changed = Arc::new(AtomicBool::new(false));
            wakes.insert(
                q.to_string(),
                QueueWake {
                    wake: wake.clone(),
                    limits_changed: limits_changed.clone(),
                },
            );
            let p = Producer {
                node: node.clone(),
                shard: shard.clone(),
                queue: q.clone(),
                slots: plant.slots[q].clone(),
                wake,
                done: done_tx.clone(),
                limits_changed,
            };
            producers.push(tokio::spawn(p.run(stop_rx.clone())));
        }
        let tasks = vec![
            tokio::spawn(notifier::run(
                shard.db.clone(),
                subscriptions(&shard, wakes),
                stop_rx.clone(),
            )),
            // Leases are renewed until the end of the stop: jobs keep
            // running through the grace period.
            tokio::spawn(heartbeat::run(node.clone(), shard.clone(), end_rx.clone())),
            tokio::spawn(rescuer::run(node.clone(), shard.clone(), stop_rx.clone())),
            tokio::spawn(retention::pruner(node.clone(), shard.clone(), stop_rx.clone())),
            // Cancel signals reach running jobs until the end of the stop.
            tokio::spawn(cancel::sweeper(node.clone(), shard.clone(), end_rx)),
            tokio::spawn(sampler::shard(
                shard.clone(),
                plant.queues.clone(),
                sampler::INTERVAL,
                stop_rx,
            )),
        ];
        tracing::info!(shard = %shard.db.name, position, "shard work started");
        ShardUnit {
            shard,
            stop_tx,
            finish_tx,
            end_tx,
            producers,
            tasks,
            completer,
        }
    }

    /// Stops claiming, lets running jobs finish for up to `grace`, hands the
    /// rest back (available at once, the interrupted attempt not counted),
    /// flushes pending outcomes, stops every task, frees the unit's slots
    /// and closes its engine pool. Returns within `grace` +
    /// [`STOP_AFTER_GRACE`] (plus closing the pool) whatever the shard does:
    /// what is not done by then is left to lease expiry and rescue.
    pub(crate) async fn stop(self, plant: &Plant, grace: Duration) {
        let _ = self.stop_tx.send(true);
        let start = tokio::time::Instant::now();
        let deadline = start + grace;
        let last = deadline + STOP_AFTER_GRACE;
        // A producer finishes the fetch it is in (its jobs are then leased
        // and handled below) and returns; one still waiting on the shard at
        // the deadline is stopped.
        for p in self.producers {
            let abort = p.abort_handle();
            if tokio::time::timeout_at(deadline, p).await.is_err() {
                abort.abort();
            }
        }
        self.shard.leases.wait_released(deadline).await;
        // Runs still going are handed back while the completer flushes the
        // outcomes of the ended ones; leases stay renewed until both are done.
        let _ = self.finish_tx.send(true);
        let hand_back = heartbeat::hand_back(&plant.node, &self.shard);
        let completer = {
            let abort = self.completer.abort_handle();
            async move {
                if tokio::time::timeout_at(last, self.completer).await.is_err() {
                    abort.abort();
                }
            }
        };
        if tokio::time::timeout_at(last, futures::future::join(hand_back, completer))
            .await
            .is_err()
        {
            tracing::warn!(shard = %self.shard.db.name, "the shard did not answer within the stop deadline; its jobs will be rescued when their leases expire");
        }
        let _ = self.end_tx.send(true);
        for t in &self.tasks {
            t.abort();
        }
        for slots in plant.slots.values() {
            slots.forget(self.shard.index);
        }
        // Closing waits for checked-out connections; the tasks are aborted,
        // so that is at most the statements in flight.
        let _ = tokio::time::timeout(STOP_AFTER_GRACE, self.shard.db.pool.close()).await;
        tracing::info!(shard = %self.shard.db.name, took = ?start.elapsed(), "shard work stopped");
    }
}

/// A pool of at most `max` connections to `db`'s database, opened lazily
/// with the same connect options and acquire timeout as the router's pool:
/// the engine's stages (producers, completer, heartbeat, upkeep) use it, so
/// handlers that hold every connection of the router's pool cannot starve
/// lease renewals or outcome writes. Its sessions carry
/// `store::ENGINE_SESSION_SETTINGS` (JIT and bitmap scans off, generic plans), except behind a transaction
/// pooler (`pooler = "transaction"`), which refuses settings at connect.
fn engine_database(db: &Database, max: u32) -> Database {
    let mut connect = db.pool.connect_options().as_ref().clone();
    // A transaction pooler refuses settings at connect: behind one they are
    // skipped (set them on the server's role or database instead).
    if db.pooler == Pooler::None {
        connect = connect.options(store::ENGINE_SESSION_SETTINGS);
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(max)
        .min_connections(0)
        .acquire_timeout(db.pool.options().get_acquire_timeout())
        .connect_lazy_with(connect);
    Database { pool, ..db.clone() }
}

/// How the LISTEN connection reaches one queue's producer on the shard.
struct QueueWake {
    /// Wakes the producer.
    wake: Arc<Notify>,
    /// Tells its next claim to read the queue's limits again.
    limits_changed: Arc<AtomicBool>,
}

/// Who hears what on `shard`'s LISTEN connection: job notifications wake the
/// producer of the queue named in the payload, limit notifications also
/// make its next claim read the queue's limits again, cancel notifications
/// go to the cancel stage, and every (re)connect does both for every
/// producer (whatever was sent meanwhile is lost).
fn subscriptions(shard: &Arc<ShardWork>, producers: HashMap<String, QueueWake>) -> Subscriptions {
    let producers = Arc::new(producers);
    let wake_queue: Subscriber = {
        let producers = producers.clone();
        Box::new(move |queue| {
            if let Some(p) = producers.get(queue) {
                p.wake.notify_one();
            }
        })
    };
    let limits_changed: Subscriber = {
        let producers = producers.clone();
        Box::new(move |queue| {
            if let Some(p) = producers.get(queue) {
                p.limits_changed.store(true, Ordering::SeqCst);
                p.wake.notify_one();
            }
        })
    };
    let cancelled: Subscriber = {
        let shard = shard.clone();
        Box::new(move |payload| cancel::on_notification(&shard, payload))
    };
    Subscriptions {
        channels: HashMap::from([
            (CHANNEL, wake_queue),
            (store::LIMITS_CHANNEL, limits_changed),
            (store::CANCEL_CHANNEL, cancelled),
        ]),
        on_listen: Box::new(move || {
            for p in producers.values() {
                p.limits_changed.store(true, Ordering::SeqCst);
                p.wake.notify_one();
            }
        }),
    }
}
