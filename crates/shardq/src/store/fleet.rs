//! The node registry in the master (`shardq.nodes`, master migration V5):
//! a node's heartbeat with what it works, the live nodes, a node leaving,
//! and the list `shardq status` shows. Called by `runtime::fleet` and
//! `observe::status`.

use chrono::{DateTime, Utc};
use shardq_router::router::Database;

/// A node as the registry records it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct NodeRow {
    /// The node's id (`locked_by` on the jobs it runs).
    pub id: String,
    /// When the node started.
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat (the master's clock).
    pub heartbeat_at: DateTime<Utc>,
    /// Whether that heartbeat is within the node's time to live.
    pub live: bool,
    /// Queue name → the node's limit for it now: a number, or for an
    /// adaptive queue `{"limit": now, "min": least, "max": most}`.
    pub queues: sqlx::types::Json<std::collections::BTreeMap<String, serde_json::Value>>,
    /// The shards it works.
    pub working: Vec<String>,
    /// Its open engine connections over all shards.
    pub connections: i32,
}

/// One heartbeat of node `id`, in one statement: upserts its row (queues as
/// JSON, the shards it works, its engine connections), deletes rows whose
/// heartbeat lapsed, and returns the other live nodes with the shards each
/// works.
///
/// `late_secs` is how much later than its heartbeat this beat comes (the
/// node's own round took that long, or its process or host stalled): a row
/// counts as lapsed, for this beat, only when its heartbeat is older than
/// its time to live plus that. A stall that holds up every node (an
/// overloaded host, a paused virtual machine) thus does not make the first
/// to wake find the others gone, take all their shards, and, loaded with
/// them, lapse in turn; a node that is on time still finds a stalled or
/// crashed one gone after its time to live.
#[allow(clippy::too_many_arguments)]
pub async fn node_beat(
    master: &Database,
    id: &str,
    started_at: DateTime<Utc>,
    ttl_secs: f64,
    late_secs: f64,
    queues: &serde_json::Value,
    working: &[String],
    connections: i32,
) -> sqlx::Result<Vec<(String, Vec<String>)>> {
    sqlx::query_as(
        "WITH beat AS (
             INSERT INTO shardq.nodes (id, started_at, heartbeat_at, ttl_secs, queues, working, connections)
             VALUES ($1, $2, now(), $3, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE
                SET heartbeat_at = now(), ttl_secs = EXCLUDED.ttl_secs, queues = EXCLUDED.queues,
                    working = EXCLUDED.working, connections = EXCLUDED.connections
             RETURNING id
         ), gone AS (
             DELETE FROM shardq.nodes
              WHERE heartbeat_at < now() - make_interval(secs => ttl_secs + $7) AND id <> $1
             RETURNING id
         )
         SELECT id, working FROM shardq.nodes
          WHERE id <> $1 AND heartbeat_at >= now() - make_interval(secs => ttl_secs + $7)
            AND id NOT IN (SELECT id FROM gone)
          ORDER BY id",
    )
    .bind(id)
    .bind(started_at)
    .bind(ttl_secs)
    .bind(queues)
    .bind(working)
    .bind(connections)
    .bind(late_secs.max(0.0))
    .fetch_all(master)
    .await
}

/// Removes node `id` from the registry (it is leaving); true when it was there.
pub(crate) async fn node_leave(master: &Database, id: &str) -> sqlx::Result<bool> {
    sqlx::query("DELETE FROM shardq.nodes WHERE id = $1")
        .bind(id)
        .execute(master)
        .await
        .map(|r| r.rows_affected() > 0)
}

/// Every node in the registry, live or lapsed, by id.
pub(crate) async fn nodes_list(master: &Database) -> sqlx::Result<Vec<NodeRow>> {
    sqlx::query_as(
        "SELECT id, started_at, heartbeat_at,
                heartbeat_at >= now() - make_interval(secs => ttl_secs) AS live,
                queues, working, connections
           FROM shardq.nodes ORDER BY id",
    )
    .fetch_all(master)
    .await
}
