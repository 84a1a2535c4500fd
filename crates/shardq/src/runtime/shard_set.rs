//! The shard set: the task that keeps this node's running [`ShardUnit`]s
//! equal to the shards it should work. Every `fleet_heartbeat` it reads the
//! router's shards (a [`Router::reload`] adds or removes some), asks the
//! fleet which of them this node owns (see `fleet`; every shard when
//! `nodes_per_shard` is 0), starts the units of shards it gained at once
//! and stops those of shards it released in the background (with
//! `handover_grace`). At shutdown it leaves the registry and stops every
//! unit with the shutdown's grace.
//!
//! The router's application pools (what handlers, the scheduler and
//! `/healthz` use) open lazily, and the router's own checks at connect and
//! reload touch every shard: once a shard is neither worked here nor still
//! stopping, the shard set closes that pool's idle connections (once per
//! time it stops being worked), so a node keeps connections only to the
//! shards it owns. A handler that reaches another shard reopens one, which
//! sqlx closes after its idle timeout.
//!
//! [`Works`] is what the runtime's handle reads meanwhile: the shards
//! worked now and every unit ever started (for statistics).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardq_router::Router;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::fleet::{self, Membership};
use super::node::ShardWork;
use super::shard_work::{Plant, ShardUnit};
use crate::observe::metrics;

/// What the runtime's handle reads while the shard set runs.
#[derive(Default)]
pub(crate) struct Works {
    /// The shards worked now, by name.
    pub active: Mutex<BTreeMap<String, Arc<ShardWork>>>,
    /// Every unit ever started here, in start order (statistics add up
    /// over a shard's units).
    pub all: Mutex<Vec<Arc<ShardWork>>>,
    /// Units stopping (handed over, not yet released).
    pub releasing: Mutex<Vec<Arc<ShardWork>>>,
}

/// The task's state.
pub(crate) struct ShardSet {
    plant: Arc<Plant>,
    router: Arc<Router>,
    /// `None` when `nodes_per_shard` is 0: every shard is worked.
    membership: Option<Membership>,
    running: BTreeMap<String, ShardUnit>,
    /// Units stopping in the background; each returns its slot position.
    stopping: Vec<(Arc<ShardWork>, JoinHandle<usize>)>,
    /// Slot positions given out before whose unit stopped (reused first).
    free: Vec<usize>,
    /// The next position never given out: positions grow past it when no
    /// freed one is left.
    next_position: usize,
    works: Arc<Works>,
    /// Whether the registry answered once (until then every shard is worked).
    registered: bool,
    /// Shards not worked here whose router pool's idle connections were
    /// closed since they stopped being worked (or since start).
    idle_closed: BTreeSet<String>,
    /// Shards worked here but owned by others, since when: kept until their
    /// owners work them, for at most [`HANDOVER_HEARTBEATS`] heartbeats.
    handing_over: BTreeMap<String, tokio::time::Instant>,
}

/// Most fleet heartbeats a node keeps a shard it no longer owns while its
/// owners do not list it yet. Bounds what views that disagree for a while
/// (an overloaded master, lapsing entries) can pile up on one node; live
/// owners start the shard at their own next heartbeat anyway.
const HANDOVER_HEARTBEATS: u32 = 5;

impl ShardSet {
    /// A set with no unit running yet.
    pub(crate) fn new(
        plant: Arc<Plant>,
        router: Arc<Router>,
        membership: Option<Membership>,
        works: Arc<Works>,
    ) -> ShardSet {
        ShardSet {
            plant,
            router,
            membership,
            running: BTreeMap::new(),
            stopping: Vec::new(),
            free: Vec::new(),
            next_position: 0,
            works,
            registered: false,
            idle_closed: BTreeSet::new(),
            handing_over: BTreeMap::new(),
        }
    }

    /// Reconciles every `fleet_heartbeat` until `shutdown` carries a grace,
    /// then leaves the registry and stops every unit with that grace.
    pub(crate) async fn run(mut self, mut shutdown: watch::Receiver<Option<Duration>>) {
        let every = self.plant.node.options.fleet_heartbeat;
        // Register first, then look (a second statement sees the nodes
        // that registered concurrently). A node alone in the registry
        // starts at once; one that finds others looks again one heartbeat
        // later, so nodes starting together see each other before they
        // start any shard (instead of each starting every shard and
        // handing most back).
        if let Some(m) = &mut self.membership {
            let registered = m.beat(&self.plant.node, &BTreeSet::new(), 0).await.is_some();
            let others = if registered {
                m.beat(&self.plant.node, &BTreeSet::new(), 0).await
            } else {
                None
            };
            if others.is_some_and(|o| !o.is_empty()) {
                tokio::select! {
                    _ = shutdown.changed() => {}
                    _ = tokio::time::sleep(every) => {}
                }
            }
        }
        loop {
            if shutdown.borrow().is_some() {
                break;
            }
            // A shutdown does not wait for a registry that does not answer:
            // the round stops at its await (the beat), before it changed
            // anything.
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = self.reconcile() => {}
            }
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep(every) => {}
            }
            if shutdown.borrow().is_some() {
                break;
            }
        }
        let grace = shutdown.borrow().unwrap_or_default();
        if let Some(m) = &self.membership {
            m.leave(&self.plant.node).await;
        }
        let plant = self.plant.clone();
        let units = std::mem::take(&mut self.running);
        metrics::ownership_changed("released", units.len());
        futures::future::join_all(units.into_values().map(|u| u.stop(&plant, grace))).await;
        futures::future::join_all(self.stopping.drain(..).map(|(_, h)| h)).await;
        if let Ok(mut active) = self.works.active.lock() {
            active.clear();
        }
        metrics::owned_shards(0);
    }

    /// One round: the shards this node should work now, started and stopped.
    async fn reconcile(&mut self) {
        self.reap().await;
        let shards: Vec<String> = self.router.shards().iter().map(|d| d.name.clone()).collect();
        let working: BTreeSet<String> = self.running.keys().cloned().collect();
        let k = self.plant.node.options.nodes_per_shard;
        let wanted: BTreeSet<String> = match &mut self.membership {
            None => shards.iter().cloned().collect(),
            Some(m) => {
                m.set_queues(queue_limits(&self.plant));
                let connections = self.running.values().map(|u| u.shard.db.pool.size()).sum();
                match m.beat(&self.plant.node, &working, connections).await {
                    Some(others) => {
                        self.registered = true;
                        let me = &self.plant.node.id;
                        let owned = fleet::wanted(me, &shards, &others, &BTreeSet::new(), k);
                        let mut wanted = fleet::wanted(me, &shards, &others, &working, k);
                        let now = tokio::time::Instant::now();
                        let limit = self.plant.node.options.fleet_heartbeat * HANDOVER_HEARTBEATS;
                        self.handing_over
                            .retain(|s, _| wanted.contains(s) && !owned.contains(s));
                        for s in wanted.difference(&owned) {
                            self.handing_over.entry(s.clone()).or_insert(now);
                        }
                        for (s, since) in &self.handing_over {
                            if now.duration_since(*since) > limit {
                                tracing::warn!(shard = %s, "its owners did not list it within {HANDOVER_HEARTBEATS} fleet heartbeats; releasing it anyway");
                                wanted.remove(s);
                            }
                        }
                        wanted
                    }
                    // Unreachable: keep what runs, minus shards the router dropped.
                    None if self.registered => working.iter().filter(|s| shards.contains(s)).cloned().collect(),
                    None => shards.iter().cloned().collect(),
                }
            }
        };
        let mut gained = 0;
        let gaining: Vec<&String> = wanted.iter().filter(|s| !self.running.contains_key(*s)).collect();
        for name in gaining {
            let Ok(db) = self.router.shard(name) else { continue };
            let position = self.free.pop().unwrap_or_else(|| {
                self.next_position += 1;
                self.next_position - 1
            });
            let unit = ShardUnit::start(&self.plant, db, position);
            if let Ok(mut all) = self.works.all.lock() {
                all.push(unit.shard.clone());
            }
            self.running.insert(name.clone(), unit);
            gained += 1;
        }
        let released: Vec<String> = self.running.keys().filter(|s| !wanted.contains(*s)).cloned().collect();
        for name in &released {
            if let Some(unit) = self.running.remove(name) {
                let plant = self.plant.clone();
                let grace = plant.node.options.handover_grace;
                let position = unit.shard.index;
                let shard = unit.shard.clone();
                let stop = tokio::spawn(async move {
                    unit.stop(&plant, grace).await;
                    position
                });
                self.stopping.push((shard, stop));
            }
        }
        metrics::ownership_changed("gained", gained);
        metrics::ownership_changed("released", released.len());
        metrics::owned_shards(self.running.len());
        if gained > 0 || !released.is_empty() {
            tracing::info!(node = %self.plant.node.id, gained, released = released.len(), working = self.running.len(), "shards worked changed");
        }
        if let Ok(mut active) = self.works.active.lock() {
            *active = self.running.iter().map(|(n, u)| (n.clone(), u.shard.clone())).collect();
        }
        self.publish_releasing();
        self.close_idle_unworked().await;
    }

    /// Closes the idle connections of the router's pools of the shards
    /// neither worked here nor still stopping, once per time each stopped
    /// being worked.
    async fn close_idle_unworked(&mut self) {
        let stopping: BTreeSet<&str> = self.stopping.iter().map(|(s, _)| s.db.name.as_str()).collect();
        let running = &self.running;
        self.idle_closed.retain(|s| !running.contains_key(s));
        for db in self.router.shards() {
            if running.contains_key(&db.name)
                || stopping.contains(db.name.as_str())
                || self.idle_closed.contains(&db.name)
            {
                continue;
            }
            let closed = close_idle(&db.pool).await;
            if closed > 0 {
                tracing::debug!(shard = %db.name, closed, "idle router connections closed: the shard is not worked here");
            }
            self.idle_closed.insert(db.name.clone());
        }
    }

    /// Takes back the slot positions of units that finished stopping.
    async fn reap(&mut self) {
        let (done, going): (Vec<_>, Vec<_>) = self.stopping.drain(..).partition(|(_, h)| h.is_finished());
        self.stopping = going;
        for (_, h) in done {
            if let Ok(position) = h.await {
                self.free.push(position);
            }
        }
        self.publish_releasing();
    }

    /// Publishes the units still stopping.
    fn publish_releasing(&self) {
        if let Ok(mut releasing) = self.works.releasing.lock() {
            *releasing = self.stopping.iter().map(|(s, _)| s.clone()).collect();
        }
    }
}

/// Each queue's limit now as the registry records it: a number, or for an
/// adaptive queue `{"limit": now, "min": least, "max": most}`.
fn queue_limits(plant: &Plant) -> serde_json::Value {
    let entries = plant.slots.iter().map(|(q, s)| {
        let limit = s.limit();
        let value = match s.adaptive_range() {
            Some((min, max)) => serde_json::json!({ "limit": limit, "min": min, "max": max }),
            None => serde_json::Value::from(limit),
        };
        (q.to_string(), value)
    });
    serde_json::Value::Object(entries.collect())
}

/// Closes the connections idle in `pool` now (those in use are left alone;
/// the pool reopens lazily); returns how many.
async fn close_idle(pool: &sqlx::PgPool) -> usize {
    let mut closed = 0;
    for _ in 0..pool.size() {
        let Some(conn) = pool.try_acquire() else { break };
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
        closed += 1;
    }
    closed
}
