//! [`FleetStatus`]: per shard and queue, whether work keeps up: jobs by
//! state, the oldest due job's age, jobs finished in the last minute and
//! hour, plus each database's reachability, schema version and (for shards)
//! how many LISTEN connections any node holds on it; and the worker nodes
//! of the master's registry with the shards each works (so each shard's
//! owners), queues and engine connections. Behind `shardq status`.
//!
//! Every shard is read concurrently with a short timeout, through bounded
//! index reads (see the observability statements in `store`); a shard that
//! is down is reported as down, with its (password-free) error.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use shardq_router::migrator::Role;
use shardq_router::router::Database;
use shardq_router::Router;

use crate::error::ErrorChain;
use crate::observe::health::{self, DatabaseHealth, Readiness};
use crate::store;

/// Most jobs one queue's depth counts on a shard; a count at the cap means
/// "at least this many".
pub const DEPTH_CAP: i64 = store::QUEUE_DEPTH_CAP;

/// The fleet's state, as `shardq status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct FleetStatus {
    /// The readiness summary (as `/healthz`).
    pub status: Readiness,
    /// The master's health.
    pub master: DatabaseHealth,
    /// Every shard, in configuration order.
    pub shards: Vec<ShardStatus>,
    /// The worker nodes in the master's registry, by id (lapsed ones
    /// until a live node deletes them).
    pub nodes: Vec<NodeStatus>,
    /// Why the registry could not be read (a master not migrated to V5,
    /// or down); `None` when it was.
    pub nodes_error: Option<String>,
}

/// One worker node as the master's registry records it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// The node's id.
    pub id: String,
    /// Whether its last heartbeat is within its time to live.
    pub live: bool,
    /// When it started.
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// Its last heartbeat (the master's clock).
    pub heartbeat_at: chrono::DateTime<chrono::Utc>,
    /// Queue → the node's concurrency limit for it now (where adaptive
    /// concurrency put it, for the queues in `adaptive`).
    pub queues: BTreeMap<String, i64>,
    /// Queue → the (least, most) limit of each adaptive queue of the node.
    pub adaptive: BTreeMap<String, (i64, i64)>,
    /// The shards it works (owns, or still hands over).
    pub shards: Vec<String>,
    /// Its open engine connections over all those shards.
    pub connections: i32,
}

/// One shard's state.
#[derive(Debug, Clone, Serialize)]
pub struct ShardStatus {
    /// Reachability and schema version; `health.error` says why it is down.
    pub health: DatabaseHealth,
    /// Backends holding a LISTEN on this shard (one per live worker node);
    /// `None` when the shard could not be read.
    pub listeners: Option<i64>,
    /// How nodes learn of new jobs on this shard, from the configuration:
    /// `notify` (LISTEN over the pool), `notify via listen_url` (LISTEN
    /// over the direct address, the pool behind a transaction pooler), or
    /// `polling only` (behind a transaction pooler without `listen_url`).
    pub wakeups: &'static str,
    /// The live nodes working this shard (from the node registry), by id.
    pub owners: Vec<String>,
    /// Queues with waiting, running or recently finished jobs, by name.
    pub queues: Vec<QueueStatus>,
}

/// One queue on one shard.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct QueueStatus {
    /// The queue's name.
    pub queue: String,
    /// Due jobs waiting.
    pub available: i64,
    /// Jobs waiting for a future `run_at`.
    pub scheduled: i64,
    /// Whether `available + scheduled` stopped at [`DEPTH_CAP`]
    /// (the queue holds at least that many).
    pub capped: bool,
    /// Jobs running (on any node).
    pub running: i64,
    /// Age in seconds of the oldest due job; 0 when none is due.
    pub oldest_available_secs: f64,
    /// Completed in the last minute.
    pub completed_1m: i64,
    /// Completed in the last hour.
    pub completed_1h: i64,
    /// Failed for good (discarded, out of attempts) in the last minute.
    pub failed_1m: i64,
    /// Failed for good (discarded, out of attempts) in the last hour.
    pub failed_1h: i64,
    /// Cancelled in the last hour.
    pub cancelled_1h: i64,
}

/// Reads the whole fleet concurrently, waiting at most `timeout` for each database.
pub async fn fleet(router: &Router, timeout: Duration) -> FleetStatus {
    let master = health::database(router.master(), Role::Master, timeout);
    let shards = futures::future::join_all(router.shards().iter().map(|db| shard(db, timeout)));
    let nodes = async {
        match tokio::time::timeout(timeout, store::nodes_list(router.master())).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => Err(ErrorChain(&router.master().error(e)).to_string()),
            Err(_) => Err(format!("node registry: no answer within {timeout:?}")),
        }
    };
    let (master, mut shards, nodes) = futures::join!(master, shards, nodes);
    let healths: Vec<DatabaseHealth> = shards.iter().map(|s| s.health.clone()).collect();
    let (nodes, nodes_error) = match nodes {
        Ok(rows) => (
            rows.into_iter()
                .map(|r| {
                    let (queues, adaptive) = queue_limits(r.queues.0);
                    NodeStatus {
                        id: r.id,
                        live: r.live,
                        started_at: r.started_at,
                        heartbeat_at: r.heartbeat_at,
                        queues,
                        adaptive,
                        shards: r.working,
                        connections: r.connections,
                    }
                })
                .collect::<Vec<_>>(),
            None,
        ),
        Err(e) => (Vec::new(), Some(e)),
    };
    for s in &mut shards {
        s.owners = nodes
            .iter()
            .filter(|n| n.live && n.shards.contains(&s.health.name))
            .map(|n| n.id.clone())
            .collect();
    }
    FleetStatus {
        status: health::summarize(&master, &healths),
        master,
        shards,
        nodes,
        nodes_error,
    }
}

/// A registry entry's queues: each one's limit now, and the range of the
/// adaptive ones (recorded as `{"limit", "min", "max"}`).
fn queue_limits(
    recorded: BTreeMap<String, serde_json::Value>,
) -> (BTreeMap<String, i64>, BTreeMap<String, (i64, i64)>) {
    let mut limits = BTreeMap::new();
    let mut adaptive = BTreeMap::new();
    for (queue, value) in recorded {
        let field = |name: &str| value.get(name).and_then(serde_json::Value::as_i64);
        match (value.as_i64(), field("limit"), field("min"), field("max")) {
            (Some(limit), ..) => {
                limits.insert(queue, limit);
            }
            (None, Some(limit), Some(min), Some(max)) => {
                limits.insert(queue.clone(), limit);
                adaptive.insert(queue, (min, max));
            }
            _ => {}
        }
    }
    (limits, adaptive)
}

/// How nodes learn of `db`'s new jobs (see [`ShardStatus::wakeups`]).
fn wakeups(db: &Database) -> &'static str {
    match (db.direct.is_some(), db.listen_pool().is_some()) {
        (true, _) => "notify via listen_url",
        (false, true) => "notify",
        (false, false) => "polling only (behind a transaction pooler, no listen_url)",
    }
}

/// Reads one shard: its health, then (when reachable) listeners and queues.
pub async fn shard(db: &Database, timeout: Duration) -> ShardStatus {
    let mut health = health::database(db, Role::Shard, timeout).await;
    let mut status = ShardStatus {
        health: health.clone(),
        listeners: None,
        wakeups: wakeups(db),
        owners: Vec::new(),
        queues: Vec::new(),
    };
    if !health.reachable {
        return status;
    }
    match tokio::time::timeout(timeout, queues(db)).await {
        Ok(Ok((listeners, queues))) => {
            status.listeners = Some(listeners);
            status.queues = queues;
        }
        Ok(Err(e)) => {
            health.error.get_or_insert_with(|| ErrorChain(&db.error(e)).to_string());
        }
        Err(_) => {
            health
                .error
                .get_or_insert_with(|| format!("{} ({}): no answer within {timeout:?}", db.name, db.target));
        }
    }
    status.health = health;
    status
}

async fn queues(db: &Database) -> sqlx::Result<(i64, Vec<QueueStatus>)> {
    let pool = db;
    let listeners = store::listener_count(pool).await?;
    let mut by_queue: BTreeMap<String, QueueStatus> = BTreeMap::new();
    for (queue, n) in store::queue_running(pool).await? {
        entry(&mut by_queue, &queue).running = n;
    }
    for (queue, state, minute, hour) in store::queue_finished_recent(pool).await? {
        let q = entry(&mut by_queue, &queue);
        match state.as_str() {
            "completed" => (q.completed_1m, q.completed_1h) = (minute, hour),
            "discarded" => (q.failed_1m, q.failed_1h) = (minute, hour),
            _ => q.cancelled_1h = hour,
        }
    }
    for queue in store::queue_names_waiting(pool).await? {
        entry(&mut by_queue, &queue);
    }
    for q in by_queue.values_mut() {
        let d = store::queue_depth(pool, &q.queue, store::QUEUE_DEPTH_CAP).await?;
        q.available = d.available;
        q.scheduled = d.scheduled;
        q.capped = d.capped(store::QUEUE_DEPTH_CAP);
        q.oldest_available_secs = d.oldest_secs;
    }
    Ok((listeners, by_queue.into_values().collect()))
}

fn entry<'a>(by_queue: &'a mut BTreeMap<String, QueueStatus>, queue: &str) -> &'a mut QueueStatus {
    by_queue.entry(queue.to_string()).or_insert_with(|| QueueStatus {
        queue: queue.to_string(),
        ..QueueStatus::default()
    })
}
