//! The live topology of a router: the configuration and pools it routes
//! with (replaced by `Router::reload`), what it knows of each shard beyond
//! shards.toml (draining, schema version, placement counts), and the
//! [`Offer`] built from both: which shards new accounts may be placed on
//! and how one is chosen.
//!
//! A shard is offered to new accounts when its weight is above 0, the
//! master does not mark it draining, and its platform schema was seen at
//! this binary's version (a shard not migrated yet, or not reachable since
//! the router started, is left out until the next check finds it so).
//!
//! Versions of the topology are kept for the router's lifetime in an
//! append-only list, so `Router::shard` and `Router::shards` hand out plain
//! references that a reload never invalidates; only a reload that changes
//! something adds a version (a few hundred bytes per shard).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use sqlx::PgPool;

use crate::config::{Config, PlacementStrategy};
use crate::database::Database;
use crate::migrator::Role;
use crate::ring::Ring;
use crate::store;

/// Longest wait for one shard's schema version when checking it.
const SCHEMA_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// One version of the topology: the configuration and a pool per shard.
#[derive(Debug)]
pub(crate) struct Topology {
    /// The configuration this version was built from.
    pub(crate) config: Config,
    /// The shards' pools, in configuration order.
    pub(crate) shards: Vec<Database>,
}

/// A node of the append-only list of topology versions.
#[derive(Debug)]
struct Version {
    topology: Topology,
    next: OnceLock<Box<Version>>,
}

/// Every topology version of a router, the newest in force.
#[derive(Debug)]
pub(crate) struct Versions {
    first: Version,
}

impl Versions {
    /// The list with its first version.
    pub(crate) fn new(topology: Topology) -> Versions {
        Versions {
            first: Version {
                topology,
                next: OnceLock::new(),
            },
        }
    }

    /// The version in force.
    pub(crate) fn current(&self) -> &Topology {
        let mut v = &self.first;
        while let Some(next) = v.next.get() {
            v = next;
        }
        &v.topology
    }

    /// Puts `topology` in force. Callers serialize (`Router::reload` holds
    /// a lock); a concurrent push still lands after the other.
    pub(crate) fn push(&self, topology: Topology) {
        let mut node = Box::new(Version {
            topology,
            next: OnceLock::new(),
        });
        loop {
            let mut v = &self.first;
            while let Some(next) = v.next.get() {
                v = next;
            }
            match v.next.set(node) {
                Ok(()) => return,
                Err(back) => node = back,
            }
        }
    }
}

/// What a check of a shard's platform schema found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaState {
    /// At this binary's version (or newer).
    Current,
    /// Migrated to `applied` (none: not at all), below `expected`.
    Behind {
        /// The highest platform version applied.
        applied: Option<i32>,
        /// The version this binary expects.
        expected: i32,
    },
    /// Not checked yet, or the check failed (the shard is down).
    Unknown(String),
}

impl std::fmt::Display for SchemaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SchemaState::Current => f.write_str("current"),
            SchemaState::Behind { applied, expected } => write!(
                f,
                "schema at version {} of {expected}: run `shardq migrate`",
                applied.map(|v| v.to_string()).unwrap_or_else(|| "none".into())
            ),
            SchemaState::Unknown(why) => write!(f, "schema not checked ({why})"),
        }
    }
}

/// What the router knows of the shards beyond shards.toml.
#[derive(Debug, Default)]
struct Facts {
    /// Shards the master marks draining.
    draining: HashSet<String>,
    /// Each configured shard's schema check.
    schema: HashMap<String, SchemaState>,
    /// Placements per shard at the last count.
    counts: HashMap<String, i64>,
}

/// Which shards new accounts are offered, and how one is chosen.
pub(crate) struct Offer {
    strategy: PlacementStrategy,
    /// Offered shards with their weights, in configuration order.
    offered: Vec<(String, u32)>,
    /// The ring over the offered shards.
    ring: Ring,
    /// Placements per offered shard: the last count, plus those this router
    /// made since (least_loaded).
    counts: Mutex<HashMap<String, i64>>,
    /// Configured shards not offered, with the reason.
    left_out: Vec<(String, String)>,
}

impl Offer {
    fn build(config: &Config, facts: &Facts) -> Offer {
        let mut offered = Vec::new();
        let mut left_out = Vec::new();
        for s in &config.shards {
            let schema = facts
                .schema
                .get(&s.name)
                .cloned()
                .unwrap_or_else(|| SchemaState::Unknown("not checked yet".into()));
            let why = if s.weight == 0 {
                Some("weight 0".to_string())
            } else if facts.draining.contains(&s.name) {
                Some("draining".to_string())
            } else if schema != SchemaState::Current {
                Some(schema.to_string())
            } else {
                None
            };
            match why {
                None => offered.push((s.name.clone(), s.weight)),
                Some(why) => left_out.push((s.name.clone(), why)),
            }
        }
        let counts = offered
            .iter()
            .map(|(name, _)| (name.clone(), facts.counts.get(name).copied().unwrap_or(0)))
            .collect();
        Offer {
            strategy: config.placement,
            ring: Ring::new(offered.iter().map(|(n, w)| (n.as_str(), *w))),
            offered,
            counts: Mutex::new(counts),
            left_out,
        }
    }

    /// The shard proposed for the new account `account`; `None` when no
    /// shard is offered.
    pub(crate) fn choose(&self, account: &str) -> Option<String> {
        match self.strategy {
            PlacementStrategy::Ring => self.ring.propose(account).map(str::to_string),
            PlacementStrategy::LeastLoaded => {
                let counts = self.counts.lock().ok()?;
                let mut best: Option<(&str, f64)> = None;
                for (name, weight) in &self.offered {
                    let per_weight = counts.get(name).copied().unwrap_or(0) as f64 / f64::from(*weight);
                    if best.is_none_or(|(_, b)| per_weight < b) {
                        best = Some((name, per_weight));
                    }
                }
                best.map(|(n, _)| n.to_string())
            }
        }
    }

    /// Counts a placement this router made on `shard`.
    pub(crate) fn placed(&self, shard: &str) {
        if let Ok(mut c) = self.counts.lock() {
            if let Some(n) = c.get_mut(shard) {
                *n += 1;
            }
        }
    }

    /// Whether `shard` is offered.
    pub(crate) fn offers(&self, shard: &str) -> bool {
        self.offered.iter().any(|(n, _)| n == shard)
    }

    /// Configured shards not offered, with the reason, in configuration order.
    pub(crate) fn left_out(&self) -> &[(String, String)] {
        &self.left_out
    }
}

/// The router's mutable state besides its placement cache; shared with the
/// placement watch, which refreshes it.
pub(crate) struct Live {
    /// The topology versions (read by every call; pushed by reload).
    pub(crate) versions: Versions,
    /// What the master and the shards said at the last refresh (written by
    /// `refresh`, read to build the offer).
    facts: Mutex<Facts>,
    /// The offer in force (rebuilt by `refresh`; read by every placement).
    offer: RwLock<Arc<Offer>>,
    /// Serializes reloads.
    pub(crate) reload: tokio::sync::Mutex<()>,
}

impl Live {
    /// The state of a router that has checked nothing yet.
    pub(crate) fn new(topology: Topology) -> Live {
        let facts = Facts::default();
        let offer = Offer::build(&topology.config, &facts);
        Live {
            versions: Versions::new(topology),
            facts: Mutex::new(facts),
            offer: RwLock::new(Arc::new(offer)),
            reload: tokio::sync::Mutex::new(()),
        }
    }

    /// The offer in force.
    pub(crate) fn offer(&self) -> Arc<Offer> {
        match self.offer.read() {
            Ok(o) => o.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The last schema check of `shard`.
    pub(crate) fn schema(&self, shard: &str) -> SchemaState {
        self.facts
            .lock()
            .ok()
            .and_then(|f| f.schema.get(shard).cloned())
            .unwrap_or_else(|| SchemaState::Unknown("not checked yet".into()))
    }

    /// Asks the master for the registry (draining shards) and, with
    /// `count`, the placement counts; checks the schema of every shard not
    /// yet seen current; rebuilds the offer. What cannot be read keeps its
    /// last value.
    pub(crate) async fn refresh(&self, master: &PgPool, count: bool) {
        let topology = self.versions.current();
        let registry = store::shard_registry(master).await;
        let unchecked: Vec<&Database> = {
            let facts = match self.facts.lock() {
                Ok(f) => f,
                Err(poisoned) => poisoned.into_inner(),
            };
            topology
                .shards
                .iter()
                .filter(|d| facts.schema.get(&d.name) != Some(&SchemaState::Current))
                .collect()
        };
        let checks = futures::future::join_all(unchecked.iter().map(|d| check_schema(d))).await;
        let counts = if count && topology.config.placement == PlacementStrategy::LeastLoaded {
            store::placement_counts(master).await.ok()
        } else {
            None
        };
        {
            let mut facts = match self.facts.lock() {
                Ok(f) => f,
                Err(poisoned) => poisoned.into_inner(),
            };
            match registry {
                Ok(rows) => {
                    facts.draining = rows.into_iter().filter(|(_, d)| *d).map(|(n, _)| n).collect();
                }
                Err(e) => tracing::debug!(error = %e, "shard registry not read; keeping the last one"),
            }
            for (db, state) in unchecked.iter().zip(checks) {
                if let SchemaState::Behind { .. } = state {
                    if facts.schema.get(&db.name) != Some(&state) {
                        tracing::warn!(shard = %db.name, "{state}; no new account is placed on it until then");
                    }
                }
                facts.schema.insert(db.name.clone(), state);
            }
            if let Some(counts) = counts {
                facts.counts = counts.into_iter().collect();
            }
            let offer = Offer::build(&topology.config, &facts);
            match self.offer.write() {
                Ok(mut o) => *o = Arc::new(offer),
                Err(poisoned) => *poisoned.into_inner() = Arc::new(offer),
            }
        }
    }
}

/// The schema state of one shard, within [`SCHEMA_CHECK_TIMEOUT`].
async fn check_schema(db: &Database) -> SchemaState {
    let Some(expected) = Role::Shard.platform_latest().and_then(|v| i32::try_from(v).ok()) else {
        return SchemaState::Current;
    };
    match tokio::time::timeout(SCHEMA_CHECK_TIMEOUT, store::shard_schema_version(&db.pool)).await {
        Ok(Ok(Some(applied))) if applied >= expected => SchemaState::Current,
        Ok(Ok(applied)) => SchemaState::Behind { applied, expected },
        Ok(Err(e)) => SchemaState::Unknown(crate::tls::classify(e).to_string()),
        Err(_) => SchemaState::Unknown(format!("no answer within {SCHEMA_CHECK_TIMEOUT:?}")),
    }
}
