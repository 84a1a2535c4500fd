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
    /// At this binary's version but not stamped with the fleet's id (the
    /// migrator stamps a shard after migrating it, once the master has a
    /// fleet id).
    Unstamped,
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
            SchemaState::Unstamped => f.write_str("not stamped with the fleet's id: run `shardq migrate`"),
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
    pub(crate) async fn refresh(&self, master: &Database, count: bool) {
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
                if matches!(state, SchemaState::Behind { .. } | SchemaState::Unstamped)
                    && facts.schema.get(&db.name) != Some(&state)
                {
                    tracing::warn!(shard = %db.name, "{state}; no new account is placed on it until then");
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
    match tokio::time::timeout(SCHEMA_CHECK_TIMEOUT, store::shard_schema_version(db)).await {
        Ok(Ok(Some(applied))) if applied >= expected => {
            match tokio::time::timeout(SCHEMA_CHECK_TIMEOUT, store::fleet_stamp(db)).await {
                Ok(Ok(Some(_))) => SchemaState::Current,
                Ok(Ok(None)) => SchemaState::Unstamped,
                Ok(Err(e)) => SchemaState::Unknown(crate::tls::classify(e).to_string()),
                Err(_) => SchemaState::Unknown(format!("no answer within {SCHEMA_CHECK_TIMEOUT:?}")),
            }
        }
        Ok(Ok(applied)) => SchemaState::Behind { applied, expected },
        Ok(Err(e)) => SchemaState::Unknown(crate::tls::classify(e).to_string()),
        Err(_) => SchemaState::Unknown(format!("no answer within {SCHEMA_CHECK_TIMEOUT:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(strategy: PlacementStrategy, weights: &[(&str, u32)]) -> Config {
        let urls: Vec<(String, String)> = weights
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.to_string(), format!("postgres://postgres@127.0.0.1:{}/s", 6000 + i)))
            .collect();
        let pairs: Vec<(&str, &str)> = urls.iter().map(|(n, u)| (n.as_str(), u.as_str())).collect();
        let mut c = Config::from_urls("postgres://postgres@127.0.0.1:5999/m", &pairs).unwrap();
        for (s, (_, w)) in c.shards.iter_mut().zip(weights) {
            s.weight = *w;
        }
        c.placement = strategy;
        c
    }

    fn all_current(c: &Config) -> Facts {
        Facts {
            schema: c.shard_names().into_iter().map(|n| (n, SchemaState::Current)).collect(),
            ..Facts::default()
        }
    }

    #[test]
    fn only_shards_with_weight_not_draining_and_current_are_offered() {
        let c = config(PlacementStrategy::Ring, &[("a", 1), ("b", 0), ("c", 1), ("d", 1)]);
        let mut facts = all_current(&c);
        facts.draining.insert("c".into());
        facts.schema.insert(
            "d".into(),
            SchemaState::Behind {
                applied: Some(3),
                expected: 9,
            },
        );
        let offer = Offer::build(&c, &facts);
        assert!(offer.offers("a") && !offer.offers("b") && !offer.offers("c") && !offer.offers("d"));
        let why: Vec<(&str, &str)> = offer.left_out().iter().map(|(n, w)| (n.as_str(), w.as_str())).collect();
        assert_eq!(why[0], ("b", "weight 0"));
        assert_eq!(why[1], ("c", "draining"));
        assert!(
            why[2].1.contains("version 3 of 9") && why[2].1.contains("shardq migrate"),
            "{why:?}"
        );
        for i in 0..50 {
            assert_eq!(offer.choose(&i.to_string()).as_deref(), Some("a"));
        }
        // A shard never checked is not offered either.
        let offer = Offer::build(&c, &Facts::default());
        assert_eq!(offer.choose("x"), None);
    }

    #[test]
    fn least_loaded_takes_the_fewest_placements_per_weight_and_counts_its_own() {
        let c = config(PlacementStrategy::LeastLoaded, &[("a", 1), ("b", 2)]);
        let mut facts = all_current(&c);
        facts.counts = [("a".to_string(), 3), ("b".to_string(), 4)].into_iter().collect();
        let offer = Offer::build(&c, &facts);
        // b: 4/2 = 2 per weight < a: 3.
        assert_eq!(offer.choose("x").as_deref(), Some("b"));
        offer.placed("b");
        offer.placed("b");
        // b: 6/2 = 3 = a: the tie goes to the first in file order.
        assert_eq!(offer.choose("x").as_deref(), Some("a"));
    }

    #[test]
    fn versions_keep_old_references_valid_and_serve_the_newest() {
        let c = config(PlacementStrategy::Ring, &[("a", 1)]);
        let versions = Versions::new(Topology {
            config: c.clone(),
            shards: Vec::new(),
        });
        let first = versions.current();
        let mut c2 = c.clone();
        c2.placement = PlacementStrategy::LeastLoaded;
        versions.push(Topology {
            config: c2,
            shards: Vec::new(),
        });
        assert_eq!(first.config.placement, PlacementStrategy::Ring);
        assert_eq!(versions.current().config.placement, PlacementStrategy::LeastLoaded);
    }
}
