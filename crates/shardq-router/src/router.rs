//! [`Router`]: one lazy pool per database, and the account → shard mapping
//! (ring proposes, the master's placement table decides, memory caches).

use std::collections::HashMap;
use std::sync::RwLock;

use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use crate::account::Account;
use crate::config::{Config, DatabaseConfig, PoolConfig};
use crate::error::{Error, Result};
use crate::ring::Ring;
use crate::store;

/// SQLSTATE of `undefined_table`.
const UNDEFINED_TABLE: &str = "42P01";

/// Where an account lives, and whether this lookup placed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The shard's name.
    pub shard: String,
    /// True when this call created the placement (the account was new).
    pub placed_now: bool,
}

/// A database's pool with the names used in errors.
#[derive(Debug, Clone)]
pub struct Database {
    /// `master` or the shard's name.
    pub name: String,
    /// The connection pool (connects lazily).
    pub pool: PgPool,
    /// The address without the password, for messages.
    pub target: String,
}

impl Database {
    /// A lazy pool with `db.pool`'s limits; its connections carry the
    /// session settings of [`session_settings`] (see [`PoolConfig`] for what
    /// bounds time).
    fn open(name: &str, db: &DatabaseConfig) -> Database {
        let mut connect = db.target.connect_options();
        let settings = session_settings(&db.pool);
        if !settings.is_empty() {
            connect = connect.options(settings);
        }
        let pool = PgPoolOptions::new()
            .max_connections(db.pool.max_connections)
            .min_connections(db.pool.min_connections)
            .acquire_timeout(db.pool.acquire_timeout)
            .connect_lazy_with(connect);
        Database {
            name: name.to_string(),
            pool,
            target: db.target.to_string(),
        }
    }

    /// Wraps a driver error with this database's name and address. A pool
    /// timeout also says which limit ran out: sqlx's own message ("pool timed
    /// out while waiting for an open connection") reads as if the pool were
    /// full, also when the server did not answer.
    pub fn error(&self, source: sqlx::Error) -> Error {
        let database = if self.name == "master" {
            "master".to_string()
        } else {
            format!("shard {}", self.name)
        };
        let detail = matches!(source, sqlx::Error::PoolTimedOut).then(|| {
            let options = self.pool.options();
            format!(
                "no connection within the acquire_timeout of {:?}: the server did not accept or answer \
                 a new connection in time, or all {} pool connections stayed busy",
                options.get_acquire_timeout(),
                options.get_max_connections()
            )
        });
        Error::Database {
            database,
            target: self.target.clone(),
            source: crate::tls::classify(source),
            detail,
        }
    }
}

/// The server settings every pool connection starts with: the timeouts of
/// `pool` in milliseconds, leaving out those set to zero (left to the
/// server).
fn session_settings(pool: &PoolConfig) -> Vec<(&'static str, u128)> {
    [
        ("statement_timeout", pool.statement_timeout),
        ("lock_timeout", pool.lock_timeout),
    ]
    .into_iter()
    .filter(|(_, value)| !value.is_zero())
    .map(|(name, value)| (name, value.as_millis()))
    .collect()
}

/// Routes accounts to shards and hands out connection pools.
///
/// Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Router {
    /// Read by everyone; set once in `connect`.
    config: Config,
    /// The master's pool.
    master: Database,
    /// The shards' pools, in config order.
    shards: Vec<Database>,
    /// Proposes shards for new accounts; built once from the weights.
    ring: Ring,
    /// Placements seen so far; written on every first lookup of an account.
    cache: RwLock<HashMap<Account, String>>,
}

impl Router {
    /// Builds one lazy pool per database (a shard that is down does not stop
    /// start-up; only calls that need it fail) and, when the master is
    /// reachable and migrated, checks that no placement names a shard missing
    /// from the configuration.
    pub async fn connect(config: &Config) -> Result<Router> {
        let router = Router {
            master: Database::open("master", &config.master),
            shards: config
                .shards
                .iter()
                .map(|s| Database::open(&s.name, &s.database))
                .collect(),
            ring: Ring::new(config.shards.iter().map(|s| (s.name.as_str(), s.weight))),
            cache: RwLock::new(HashMap::new()),
            config: config.clone(),
        };
        router.check_placements().await?;
        Ok(router)
    }

    /// Fails when the master's placement table names a shard that the
    /// configuration does not define. A master that is not migrated yet has
    /// no placements; a master that is unreachable is logged and skipped, so
    /// start-up does not depend on it (accounts whose placement is cached
    /// keep working; routing a new one fails with the connection error).
    pub async fn check_placements(&self) -> Result<()> {
        let unknown = match store::placement_unknown_shards(&self.master.pool, &self.config.shard_names()).await {
            Ok(unknown) => unknown,
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(UNDEFINED_TABLE) => return Ok(()),
            Err(e @ (sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_))) => {
                tracing::warn!(error = %self.master.error(e), "master unreachable; placement check skipped");
                return Ok(());
            }
            Err(e) => return Err(self.master.error(e)),
        };
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(Error::PlacementsOnUnknownShards {
                shards: unknown.join(", "),
            })
        }
    }

    /// The configuration this router was built from.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The master's pool.
    pub fn master(&self) -> &Database {
        &self.master
    }

    /// All shards' pools, in configuration order.
    pub fn shards(&self) -> &[Database] {
        &self.shards
    }

    /// The pool of the shard named `name`.
    pub fn shard(&self, name: &str) -> Result<&Database> {
        self.shards
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| Error::UnknownShard {
                shard: name.to_string(),
                known: self.config.shard_names().join(", "),
            })
    }

    /// The shard `account` lives on, placing it first if it is new.
    pub async fn shard_for(&self, account: &Account) -> Result<Placement> {
        if let Some(shard) = self.cached(account) {
            return Ok(Placement {
                shard,
                placed_now: false,
            });
        }
        let master = &self.master;
        let placement = loop {
            if let Some(shard) = store::placement_get(&master.pool, account.as_str())
                .await
                .map_err(|e| master.error(e))?
            {
                break Placement {
                    shard,
                    placed_now: false,
                };
            }
            let proposed = self
                .ring
                .propose(account.as_str())
                .ok_or_else(|| Error::NoShardAcceptsAccounts {
                    account: account.to_string(),
                })?;
            if let Some((shard, placed_now)) =
                store::placement_insert_if_absent(&master.pool, account.as_str(), proposed)
                    .await
                    .map_err(|e| master.error(e))?
            {
                break Placement { shard, placed_now };
            }
        };
        self.shard(&placement.shard)?;
        self.remember(account, &placement.shard);
        Ok(placement)
    }

    /// The pool of the shard `account` lives on (placing it first if new).
    pub async fn pool_for(&self, account: &Account) -> Result<&Database> {
        let placement = self.shard_for(account).await?;
        self.shard(&placement.shard)
    }

    /// Pins a new account to `shard` (e.g. a dedicated shard for a large
    /// customer). Re-pinning an account already placed elsewhere is refused;
    /// pinning it to the shard it is already on is a no-op.
    pub async fn place(&self, account: &Account, shard: &str) -> Result<Placement> {
        self.shard(shard)?;
        let master = &self.master;
        let placement = loop {
            if let Some(current) = store::placement_get(&master.pool, account.as_str())
                .await
                .map_err(|e| master.error(e))?
            {
                break Placement {
                    shard: current,
                    placed_now: false,
                };
            }
            if let Some((current, placed_now)) =
                store::placement_insert_if_absent(&master.pool, account.as_str(), shard)
                    .await
                    .map_err(|e| master.error(e))?
            {
                break Placement {
                    shard: current,
                    placed_now,
                };
            }
        };
        if placement.shard != shard {
            return Err(Error::AlreadyPlaced {
                account: account.to_string(),
                current: placement.shard,
                requested: shard.to_string(),
            });
        }
        self.remember(account, &placement.shard);
        Ok(placement)
    }

    /// Number of placed accounts per shard, from the master.
    pub async fn placement_counts(&self) -> Result<Vec<(String, i64)>> {
        store::placement_counts(&self.master.pool)
            .await
            .map_err(|e| self.master.error(e))
    }

    fn cached(&self, account: &Account) -> Option<String> {
        self.cache.read().ok().and_then(|c| c.get(account).cloned())
    }

    fn remember(&self, account: &Account, shard: &str) {
        if let Ok(mut c) = self.cache.write() {
            c.insert(account.clone(), shard.to_string());
        }
    }
}
