//! [`Router`]: one lazy pool per database, and the account → shard mapping
//! (ring proposes, the master's placement table decides, memory caches,
//! the placement watch evicts what moved). [`Router::begin`] opens the
//! fenced transaction application writes go through.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use crate::account::Account;
use crate::config::{Config, DatabaseConfig, PoolConfig};
use crate::error::{Error, Result};
use crate::placement_watch::{self, Cache};
use crate::ring::Ring;
use crate::store;

/// How long a write waits for a move that has fenced its account off the
/// old shard to switch the placement, before it fails.
const MOVE_WAIT: Duration = Duration::from_secs(30);

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
        let mut connect = db.target.connect_options().into_inner();
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
    /// Placements seen so far (shard, epoch): written on every first lookup
    /// of an account, evicted by the placement watch when they change.
    cache: Arc<Cache>,
}

/// A transaction on the shard an account lives on, opened by
/// [`Router::begin`]: the shard was checked to still own the account after
/// the transaction began, and a move of the account waits for this
/// transaction to end and carries what it wrote. Derefs to the sqlx
/// transaction; end it with [`AccountTx::commit`] (dropping it rolls back).
pub struct AccountTx {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    shard: String,
}

impl AccountTx {
    /// The shard this transaction runs on.
    pub fn shard(&self) -> &str {
        &self.shard
    }

    /// Commits the transaction.
    pub async fn commit(self) -> std::result::Result<(), sqlx::Error> {
        self.tx.commit().await
    }

    /// Rolls the transaction back.
    pub async fn rollback(self) -> std::result::Result<(), sqlx::Error> {
        self.tx.rollback().await
    }
}

impl std::ops::Deref for AccountTx {
    type Target = sqlx::PgConnection;
    fn deref(&self) -> &sqlx::PgConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for AccountTx {
    fn deref_mut(&mut self) -> &mut sqlx::PgConnection {
        &mut self.tx
    }
}

/// A shard's refusal of a write for an account fenced off it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fenced {
    /// The account whose write was refused.
    pub account: String,
    /// The shard it moved to.
    pub moved_to: String,
}

/// Whether `e` is a shard refusing a write of an account fenced off it
/// (SQLSTATE `SQ001`: the account moved away), and which account.
pub fn fenced(e: &sqlx::Error) -> Option<Fenced> {
    let sqlx::Error::Database(db) = e else { return None };
    if db.code().as_deref() != Some(store::FENCED_SQLSTATE) {
        return None;
    }
    let pg = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()?;
    Some(Fenced {
        account: pg.detail().unwrap_or_default().to_string(),
        moved_to: pg.hint().unwrap_or_default().to_string(),
    })
}

impl Router {
    /// Builds one lazy pool per database (a shard that is down does not stop
    /// start-up; only calls that need it fail) and, when the master is
    /// reachable and migrated, warns when placements name a shard missing
    /// from the configuration: routing those accounts fails
    /// ([`Error::AccountOnUnknownShard`]); the others route as usual.
    pub async fn connect(config: &Config) -> Result<Router> {
        let router = Router {
            master: Database::open("master", &config.master),
            shards: config
                .shards
                .iter()
                .map(|s| Database::open(&s.name, &s.database))
                .collect(),
            ring: Ring::new(config.shards.iter().map(|s| (s.name.as_str(), s.weight))),
            cache: Arc::new(RwLock::new(HashMap::new())),
            config: config.clone(),
        };
        // Accounts placed on a shard this configuration lacks fail their
        // own routing (naming the account and the shard); every other
        // account routes as usual.
        if let Err(e) = router.check_placements().await {
            tracing::warn!(error = %e, "some accounts cannot be routed until their shard is configured");
        }
        tokio::spawn(placement_watch::run(
            router.master.pool.clone(),
            Arc::downgrade(&router.cache),
        ));
        Ok(router)
    }

    /// Fails when the master's placement table names a shard that the
    /// configuration does not define. A master that is not migrated yet has
    /// no placements; a master that is unreachable is logged and skipped, so
    /// start-up does not depend on it (accounts whose placement is cached
    /// keep working; routing a new one fails with the connection error).
    pub async fn check_placements(&self) -> Result<()> {
        let unknown = match store::placement_unknown_shards(&self.master.pool, &self.config.shard_names())
            .await
            .map_err(crate::tls::classify)
        {
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
            if let Some((shard, epoch)) = store::placement_get_epoch(&master.pool, account.as_str())
                .await
                .map_err(|e| master.error(e))?
            {
                if self.shard(&shard).is_err() {
                    return Err(Error::AccountOnUnknownShard {
                        account: account.to_string(),
                        shard,
                        known: self.config.shard_names().join(", "),
                    });
                }
                self.remember(account, &shard, epoch);
                return Ok(Placement {
                    shard,
                    placed_now: false,
                });
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
        self.remember(account, &placement.shard, 1);
        Ok(placement)
    }

    /// The shard of each of `accounts`, in order, placing new ones: what
    /// [`Router::shard_for`] gives one by one, with one round trip to the
    /// master for every account the cache does not know, and one more to
    /// place the new ones (a batch enqueue of a thousand new accounts does
    /// not wait for a thousand placements).
    pub async fn shards_for(&self, accounts: &[&Account]) -> Result<Vec<String>> {
        let mut known: HashMap<&str, String> = HashMap::new();
        let mut missing: Vec<&str> = Vec::new();
        for account in accounts {
            match self.cached(account) {
                Some(shard) => {
                    known.insert(account.as_str(), shard);
                }
                None => missing.push(account.as_str()),
            }
        }
        missing.sort_unstable();
        missing.dedup();
        let master = &self.master;
        while !missing.is_empty() {
            let found = store::placements_get_many(&master.pool, &missing)
                .await
                .map_err(|e| master.error(e))?;
            for (account, shard, epoch) in found {
                if self.shard(&shard).is_err() {
                    return Err(Error::AccountOnUnknownShard {
                        account,
                        shard,
                        known: self.config.shard_names().join(", "),
                    });
                }
                if let Some(name) = missing.iter().find(|a| **a == account) {
                    if let Ok(a) = Account::new(account.as_str()) {
                        self.remember(&a, &shard, epoch);
                    }
                    known.insert(name, shard);
                }
            }
            missing.retain(|a| !known.contains_key(a));
            if missing.is_empty() {
                break;
            }
            let mut shards = Vec::with_capacity(missing.len());
            for account in &missing {
                let shard = self
                    .ring
                    .propose(account)
                    .ok_or_else(|| Error::NoShardAcceptsAccounts {
                        account: account.to_string(),
                    })?;
                self.shard(shard)?;
                shards.push(shard);
            }
            let placed = store::placements_insert_many(&master.pool, &missing, &shards)
                .await
                .map_err(|e| master.error(e))?;
            for (account, shard) in missing.iter().zip(&shards) {
                if placed.iter().any(|p| p == account) {
                    if let Ok(a) = Account::new(*account) {
                        self.remember(&a, shard, 1);
                    }
                    known.insert(account, shard.to_string());
                }
            }
            // Accounts someone else placed meanwhile are read again.
            missing.retain(|a| !known.contains_key(a));
        }
        Ok(accounts
            .iter()
            .map(|a| known.get(a.as_str()).cloned().unwrap_or_default())
            .collect())
    }

    /// The shard and epoch of `account`'s placement, read from the master;
    /// `None` when the account has never been placed. Read-only: it never
    /// places the account and neither reads nor fills the cache (for
    /// inspection, e.g. `shardq route`; writers use [`Router::shard_for`]).
    pub async fn placement(&self, account: &Account) -> Result<Option<(String, i64)>> {
        store::placement_get_epoch(&self.master.pool, account.as_str())
            .await
            .map_err(|e| self.master.error(e))
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
        let (placement, epoch) = loop {
            if let Some((current, epoch)) = store::placement_get_epoch(&master.pool, account.as_str())
                .await
                .map_err(|e| master.error(e))?
            {
                break (
                    Placement {
                        shard: current,
                        placed_now: false,
                    },
                    epoch,
                );
            }
            if let Some((current, placed_now)) =
                store::placement_insert_if_absent(&master.pool, account.as_str(), shard)
                    .await
                    .map_err(|e| master.error(e))?
            {
                break (
                    Placement {
                        shard: current,
                        placed_now,
                    },
                    1,
                );
            }
        };
        if placement.shard != shard {
            return Err(Error::AlreadyPlaced {
                account: account.to_string(),
                current: placement.shard,
                requested: shard.to_string(),
            });
        }
        self.remember(account, &placement.shard, epoch);
        Ok(placement)
    }

    /// Opens a transaction on the shard `account` lives on, for the
    /// application's writes: after `BEGIN` it checks that the shard has no
    /// fence for the account (it did not move away). A move waits for
    /// transactions that began before its fence and carries what they
    /// wrote, so this transaction's writes follow the account wherever it
    /// goes. When the account has moved (a stale cache, a lost
    /// notification), the cache entry is dropped and the transaction is
    /// opened on the new shard; while a move is switching it, this waits
    /// (up to 30 s) for the switch.
    ///
    /// Fenced writes are those made in this transaction, and jobs enqueued
    /// through `shardq::Client` (which refuses a moved account's insert in
    /// the database itself). Writes through [`Router::pool_for`] are not
    /// fenced: a writer with a stale placement can land them on the shard
    /// the account left.
    pub async fn begin(&self, account: &Account) -> Result<AccountTx> {
        let deadline = tokio::time::Instant::now() + MOVE_WAIT;
        loop {
            let db = self.pool_for(account).await?;
            let mut tx = db.pool.begin().await.map_err(|e| db.error(e))?;
            let fenced = store::fence_get(&mut tx, account.as_str())
                .await
                .map_err(|e| db.error(e))?;
            match fenced {
                None => {
                    return Ok(AccountTx {
                        tx,
                        shard: db.name.clone(),
                    })
                }
                Some(_) => {
                    let from = db.name.clone();
                    drop(tx);
                    self.await_move(account, &from, deadline).await?;
                }
            }
        }
    }

    /// After a shard refused `account`'s write because the account moved
    /// off `from` (see [`fenced`]): drops the cached placement and waits
    /// until the master places the account elsewhere (a move in its switch
    /// has fenced the old shard before it flips the placement), up to
    /// `deadline`. Then the write can be tried again on the new shard.
    pub async fn await_move(&self, account: &Account, from: &str, deadline: tokio::time::Instant) -> Result<()> {
        let mut wait = Duration::from_millis(5);
        loop {
            self.forget(account);
            let placement = self.shard_for(account).await?;
            if placement.shard != from {
                tracing::debug!(account = %account, from, to = %placement.shard, "account moved; writing to its new shard");
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::AccountMoving {
                    account: account.to_string(),
                    shard: from.to_string(),
                });
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(200));
        }
    }

    /// Drops `account`'s cached placement: the next lookup asks the master.
    pub fn forget(&self, account: &Account) {
        if let Ok(mut c) = self.cache.write() {
            c.remove(account);
        }
    }

    /// Number of placed accounts per shard, from the master.
    pub async fn placement_counts(&self) -> Result<Vec<(String, i64)>> {
        store::placement_counts(&self.master.pool)
            .await
            .map_err(|e| self.master.error(e))
    }

    fn cached(&self, account: &Account) -> Option<String> {
        self.cache
            .read()
            .ok()
            .and_then(|c| c.get(account).map(|(s, _)| s.clone()))
    }

    fn remember(&self, account: &Account, shard: &str, epoch: i64) {
        if let Ok(mut c) = self.cache.write() {
            c.insert(account.clone(), (shard.to_string(), epoch));
        }
    }
}
