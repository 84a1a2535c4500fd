//! Shard ownership across a fleet of nodes: which shards this node works.
//!
//! Every node upserts its row in the master's node registry every
//! `fleet_heartbeat` (its queues and limits, the shards it works, its open
//! engine connections); a row not renewed within `node_ttl` (three
//! heartbeats) is gone, and the next heartbeat of any node deletes it. A
//! node whose own heartbeat comes late (its round, process or host was
//! held up) waits that much longer before it finds another gone: a stall
//! of the whole fleet does not make each node, as it wakes, take every
//! shard ([`store::node_beat`]).
//! From the live nodes each node computes, on its own and the same way,
//! the owners of every shard: the `nodes_per_shard` nodes with the highest
//! rendezvous score ([`owners`]). A join or a leave thus moves only the
//! ownerships the joining or leaving node wins or held, about
//! `nodes_per_shard / N` of them, and with at most `nodes_per_shard` nodes
//! every node owns every shard.
//!
//! Handover: a node keeps working a shard it no longer owns until every
//! owner's row lists the shard as worked, so the new owner starts before
//! the old one stops (the shard set then stops it: stop claiming, finish
//! within `handover_grace` or hand back, release). A node that crashed
//! stops renewing its row: after `node_ttl` its shards go to other nodes,
//! and its jobs come back through the rescuer when their leases expire.
//!
//! A node that cannot reach the registry (master down, not migrated, no
//! privilege) keeps working what it works; one that never reached it works
//! every shard, as without ownership.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use shardq_router::router::Database;
use xxhash_rust::xxh3::xxh3_64;

use super::node::Node;
use crate::error::ErrorChain;
use crate::store;

/// The rendezvous score of `node` for `shard`: xxh3-64 of explicit bytes
/// (the shard name's length as 8 little-endian bytes, the shard name, the
/// node id, all UTF-8), so every node and version computes the same.
pub fn score(shard: &str, node: &str) -> u64 {
    let mut bytes = Vec::with_capacity(8 + shard.len() + node.len());
    bytes.extend_from_slice(&(shard.len() as u64).to_le_bytes());
    bytes.extend_from_slice(shard.as_bytes());
    bytes.extend_from_slice(node.as_bytes());
    xxh3_64(&bytes)
}

/// The owners of `shard` among `nodes`: the `k` with the highest
/// [`score`] (ties by id), highest first; every node when there are at
/// most `k`, none when `nodes` is empty.
pub fn owners<'a>(shard: &str, nodes: &[&'a str], k: usize) -> Vec<&'a str> {
    let mut ranked: Vec<(u64, &'a str)> = nodes.iter().map(|n| (score(shard, n), *n)).collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    ranked.dedup_by(|a, b| a.1 == b.1);
    ranked.into_iter().take(k).map(|(_, n)| n).collect()
}

/// The shards `me` should work: those of `shards` it owns among itself and
/// `others` (id, shards it works), plus those it works now whose owners
/// do not all work them yet (the handover: the new owners start first).
pub(crate) fn wanted(
    me: &str,
    shards: &[String],
    others: &[(String, Vec<String>)],
    working: &BTreeSet<String>,
    k: usize,
) -> BTreeSet<String> {
    let mut nodes: Vec<&str> = others.iter().map(|(id, _)| id.as_str()).collect();
    nodes.push(me);
    shards
        .iter()
        .filter(|shard| {
            let owners = owners(shard, &nodes, k);
            if owners.contains(&me) {
                return true;
            }
            working.contains(*shard)
                && !owners.iter().all(|o| {
                    others
                        .iter()
                        .any(|(id, works)| id == o && works.iter().any(|w| w == *shard))
                })
        })
        .cloned()
        .collect()
}

/// This node's entry in the registry.
pub(crate) struct Membership {
    master: Database,
    started_at: DateTime<Utc>,
    /// Queue → limit, as the registry stores it (see [`Membership::set_queues`]).
    queues: serde_json::Value,
    /// Whether the last heartbeat failed (to log a change once).
    failing: bool,
    /// When the last heartbeat started: how late the next one comes.
    last_beat: Option<tokio::time::Instant>,
}

impl Membership {
    /// The entry of a node with `queues` (name, limit), in `master`.
    pub(crate) fn new(master: Database, queues: &[(String, usize)]) -> Membership {
        Membership {
            master,
            started_at: Utc::now(),
            queues: serde_json::Value::Object(
                queues
                    .iter()
                    .map(|(q, l)| (q.clone(), serde_json::Value::from(*l)))
                    .collect(),
            ),
            failing: false,
            last_beat: None,
        }
    }

    /// Replaces the queues the next heartbeats record (queue → limit now,
    /// or `{"limit", "min", "max"}` for an adaptive one).
    pub(crate) fn set_queues(&mut self, queues: serde_json::Value) {
        self.queues = queues;
    }

    /// Renews this node's row with the shards it works and its open engine
    /// connections; returns the other live nodes (id, shards they work), or
    /// `None` when the registry could not be reached in time (logged once
    /// per outage).
    pub(crate) async fn beat(
        &mut self,
        node: &Node,
        working: &BTreeSet<String>,
        connections: u32,
    ) -> Option<Vec<(String, Vec<String>)>> {
        let working: Vec<String> = working.iter().cloned().collect();
        // Later than one heartbeat after the last: the round, the process
        // or the host was held up, and the other nodes likely were too.
        let now = tokio::time::Instant::now();
        let late = self
            .last_beat
            .replace(now)
            .map(|at| now.duration_since(at).saturating_sub(node.options.fleet_heartbeat))
            .unwrap_or_default();
        let beat = store::node_beat(
            &self.master,
            &node.id,
            self.started_at,
            node.options.node_ttl().as_secs_f64(),
            late.as_secs_f64(),
            &self.queues,
            &working,
            i32::try_from(connections).unwrap_or(i32::MAX),
        );
        // A slow answer is late, not lost: wait as long as for a shard.
        let wait = node.options.shard_timeout.max(node.options.fleet_heartbeat);
        let result = match tokio::time::timeout(wait, beat).await {
            Ok(Ok(others)) => Ok(others),
            Ok(Err(e)) => Err(ErrorChain(&self.master.error(e)).to_string()),
            Err(_) => Err(format!("no answer within {wait:?}")),
        };
        match result {
            Ok(others) => {
                if std::mem::replace(&mut self.failing, false) {
                    tracing::info!(node = %node.id, "node registry reachable again");
                }
                Some(others)
            }
            Err(e) => {
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(node = %node.id, error = %e, "node registry heartbeat failed; working the shards worked so far");
                }
                None
            }
        }
    }

    /// Removes this node's row (it is stopping), so the others take its
    /// shards at their next heartbeat instead of after its time to live.
    pub(crate) async fn leave(&self, node: &Node) {
        let left = tokio::time::timeout(node.options.fleet_heartbeat, store::node_leave(&self.master, &node.id)).await;
        if let Ok(Err(e)) = left {
            tracing::warn!(node = %node.id, error = %ErrorChain(&self.master.error(e)), "leaving the node registry failed; the entry lapses after its time to live");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize, prefix: &str) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    }

    #[test]
    fn with_at_most_k_nodes_every_node_owns_every_shard() {
        let nodes = ["a", "b", "c"];
        for s in names(20, "shard_") {
            let mut o = owners(&s, &nodes, 3);
            o.sort();
            assert_eq!(o, nodes);
        }
    }

    #[test]
    fn scores_are_stable_across_versions() {
        // Explicit bytes: changing the layout or the hash fails here.
        assert_eq!(score("shard_1", "node-a"), {
            let mut b = 7u64.to_le_bytes().to_vec();
            b.extend_from_slice(b"shard_1node-a");
            xxh3_64(&b)
        });
        assert_ne!(score("ab", "c"), score("a", "bc"));
    }

    #[test]
    fn a_join_or_leave_moves_at_most_two_in_n_of_the_ownerships() {
        let shards = names(64, "shard_");
        let all = names(17, "node-");
        let before: Vec<&str> = all[..16].iter().map(String::as_str).collect();
        let after: Vec<&str> = all.iter().map(String::as_str).collect();
        let k = 3;
        let moved = shards
            .iter()
            .map(|s| {
                let a: BTreeSet<&str> = owners(s, &before, k).into_iter().collect();
                let b: BTreeSet<&str> = owners(s, &after, k).into_iter().collect();
                a.difference(&b).count()
            })
            .sum::<usize>();
        let total = shards.len() * k;
        assert!(
            moved * 16 <= 2 * total,
            "a join moved {moved} of {total} ownerships (more than 2/16)"
        );
    }

    #[test]
    fn a_node_keeps_a_shard_until_its_owners_work_it() {
        let shards = names(8, "s");
        let me = "me";
        let others = vec![("x".to_string(), Vec::new()), ("y".to_string(), Vec::new())];
        // k = 1: each shard has one owner among three nodes.
        let all: BTreeSet<String> = shards.iter().cloned().collect();
        let held = wanted(me, &shards, &others, &all, 1);
        assert_eq!(held, all, "no owner works anything yet: every shard is kept");
        let others: Vec<(String, Vec<String>)> = others.into_iter().map(|(id, _)| (id, shards.clone())).collect();
        let released = wanted(me, &shards, &others, &all, 1);
        let nodes = ["x", "y", "me"];
        let mine: BTreeSet<String> = shards
            .iter()
            .filter(|s| owners(s, &nodes, 1) == ["me"])
            .cloned()
            .collect();
        assert_eq!(released, mine, "once the owners work them, only owned shards are kept");
        assert!(mine.len() < shards.len());
    }
}
