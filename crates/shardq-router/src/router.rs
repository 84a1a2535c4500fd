//! [`Router`]: one lazy pool per database, and the account → shard mapping
//! (the ring or the least-loaded choice proposes among the shards offered
//! new accounts, the master's placement table decides, memory caches, the
//! placement watch evicts what moved). [`Router::reload`] takes a changed
//! shards.toml without a restart; [`Router::set_draining`] and
//! [`Router::pin`] write the master's registry and pins.
//! [`Router::begin`] opens the fenced transaction application writes go
//! through.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::account::Account;
use crate::config::{Config, Pooler};
use crate::error::{Error, Result};
use crate::executor::Conn;
use crate::placement_watch::{self, Cache};
use crate::stamp;
use crate::store;
use crate::topology::{Live, Topology};

pub use crate::database::Database;
pub use crate::topology::SchemaState;

/// How long a write waits for a move that has fenced its account off the
/// old shard to switch the placement, before it fails.
const MOVE_WAIT: Duration = Duration::from_secs(30);

/// SQLSTATE of `undefined_table`.
const UNDEFINED_TABLE: &str = "42P01";

/// SQLSTATE of `foreign_key_violation`.
const FOREIGN_KEY_VIOLATION: &str = "23503";

/// SQLSTATE of `insufficient_privilege`.
const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// Tries at placing a new account when the chosen shard turned out to be
/// draining (the router's view of the registry was stale).
const PLACE_TRIES: usize = 3;

/// One shard as the fleet sees it: configuration, registry, schema and
/// placements (`shardq shards list`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ShardState {
    /// The shard's name.
    pub name: String,
    /// Its weight in shards.toml.
    pub weight: u32,
    /// Whether the master's registry lists it.
    pub registered: bool,
    /// Whether the master marks it draining.
    pub draining: bool,
    /// Why new accounts are not offered to it; `None` when they are.
    pub not_offered: Option<String>,
    /// Accounts placed on it.
    pub accounts: i64,
    /// Pinned accounts among them.
    pub pinned: i64,
}

/// What a [`Router::reload`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Shards added, with a new pool each.
    pub added: Vec<String>,
    /// Shards removed (they held no placements).
    pub removed: Vec<String>,
    /// Shards whose weight changed.
    pub reweighted: Vec<String>,
    /// Shards whose address or pool settings changed: their pools are kept
    /// as they were until a restart.
    pub unchanged_pools: Vec<String>,
    /// Whether the placement strategy changed.
    pub strategy_changed: bool,
}

impl Reloaded {
    /// Whether the reload changed anything.
    pub fn is_empty(&self) -> bool {
        *self == Reloaded::default()
    }
}

impl std::fmt::Display for Reloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_empty() {
            return f.write_str("nothing changed");
        }
        let mut parts = Vec::new();
        for (what, names) in [
            ("added", &self.added),
            ("removed", &self.removed),
            ("re-weighted", &self.reweighted),
            ("address or pool change ignored until a restart", &self.unchanged_pools),
        ] {
            if !names.is_empty() {
                parts.push(format!("{what}: {}", names.join(", ")));
            }
        }
        if self.strategy_changed {
            parts.push("placement strategy changed".into());
        }
        f.write_str(&parts.join("; "))
    }
}

/// Where an account lives, and whether this lookup placed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The shard's name.
    pub shard: String,
    /// True when this call created the placement (the account was new).
    pub placed_now: bool,
}

/// Routes accounts to shards and hands out connection pools.
///
/// Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Router {
    /// The master's pool; set once in `connect` (a reload never changes it).
    master: Database,
    /// The topology versions, the shard facts and the offer of new
    /// accounts: pushed by `reload`, refreshed by the placement watch.
    live: Arc<Live>,
    /// Placements seen so far (shard, epoch): written on every first lookup
    /// of an account, evicted by the placement watch when they change.
    cache: Arc<Cache>,
}

/// A transaction on the shard an account lives on, opened by
/// [`Router::begin`]: the shard was checked to still own the account after
/// the transaction began, and a move of the account waits for this
/// transaction to end and carries what it wrote. End it with
/// [`AccountTx::commit`] (dropping it rolls back).
///
/// Run statements on `&mut tx` (it is an sqlx executor): behind a
/// transaction pooler (`pooler = "transaction"`) they then run unnamed, as
/// the pooler requires (see [`Conn`]). It also derefs to the sqlx
/// connection (`&mut *tx`), whose statements are prepared and cached by
/// name, which works only without such a pooler.
#[derive(Debug)]
pub struct AccountTx {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    shard: String,
    /// The shard's pooler, which decides how statements run.
    pooler: Pooler,
}

impl AccountTx {
    /// The shard this transaction runs on.
    pub fn shard(&self) -> &str {
        &self.shard
    }

    /// The transaction's connection for statements that run the way the
    /// shard's pooler allows, e.g. to pass on to a function taking a
    /// [`Conn`].
    pub fn conn(&mut self) -> Conn<'_> {
        Conn::new(&mut self.tx, self.pooler)
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

crate::executor::executor_through_conn!(&'c mut AccountTx, conn);

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
    ///
    /// Fails when a shard's address leads to a database stamped as another
    /// shard ([`Error::ShardStampedAsAnother`], e.g. two addresses swapped in
    /// shards.toml) or by another fleet ([`Error::ShardOfAnotherFleet`]).
    /// A shard without a stamp is not migrated: it is offered no new account
    /// until `shardq migrate` has run ([`SchemaState::Unstamped`]).
    ///
    /// It then registers the configured shards the master's registry lacks
    /// (only the schema owner may; for another role this is logged and the
    /// owner must have done it), and checks which shards new accounts may be
    /// placed on: weight above 0, not draining, platform schema at this
    /// binary's version (each checked for at most a second; the placement
    /// watch checks again every second those not seen current).
    pub async fn connect(config: &Config) -> Result<Router> {
        let topology = Topology {
            config: config.clone(),
            shards: config
                .shards
                .iter()
                .map(|s| Database::open(&s.name, &s.database))
                .collect(),
        };
        let router = Router {
            master: Database::open("master", &config.master),
            live: Arc::new(Live::new(topology)),
            cache: Arc::new(RwLock::new(HashMap::default())),
        };
        // Accounts placed on a shard this configuration lacks fail their
        // own routing (naming the account and the shard); every other
        // account routes as usual.
        if let Err(e) = router.check_placements().await {
            tracing::warn!(error = %e, "some accounts cannot be routed until their shard is configured");
        }
        stamp::check(&router.master, router.shards()).await?;
        router.register_shards(&config.shard_names()).await;
        router.live.refresh(&router.master, true).await;
        tokio::spawn(placement_watch::run(
            router.master.clone(),
            Arc::downgrade(&router.cache),
            Arc::downgrade(&router.live),
        ));
        Ok(router)
    }

    /// Registers in the master the shards of `names` its registry lacks.
    /// Best effort: a master not migrated or not reachable is skipped, and a
    /// role that may not write the registry (any but the schema owner) is
    /// logged: the owner registers them (any owner command that connects a
    /// router does, e.g. `shardq shards list`).
    async fn register_shards(&self, names: &[String]) {
        let registered = match store::shard_registry(&self.master).await {
            Ok(rows) => rows.into_iter().map(|(n, _)| n).collect::<Vec<_>>(),
            Err(e) => {
                tracing::debug!(error = %e, "shard registry not read; registration skipped");
                return;
            }
        };
        let missing: Vec<String> = names.iter().filter(|n| !registered.contains(n)).cloned().collect();
        if missing.is_empty() {
            return;
        }
        match store::shard_register(&self.master, &missing).await {
            Ok(added) if !added.is_empty() => {
                tracing::info!(shards = %added.join(", "), "shards registered in the master")
            }
            Ok(_) => {}
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(INSUFFICIENT_PRIVILEGE) => {
                tracing::warn!(
                    shards = %missing.join(", "),
                    "shards not in the master's registry, and this role may not register them: \
                     connect once as the schema owner (e.g. `shardq shards list`) before accounts are placed there"
                );
            }
            Err(e) => tracing::warn!(error = %self.master.error(e), "shards not registered"),
        }
    }

    /// Fails when the master's placement table names a shard that the
    /// configuration does not define. A master that is not migrated yet has
    /// no placements; a master that is unreachable is logged and skipped, so
    /// start-up does not depend on it (accounts whose placement is cached
    /// keep working; routing a new one fails with the connection error).
    pub async fn check_placements(&self) -> Result<()> {
        let unknown = match store::placement_unknown_shards(&self.master, &self.config().shard_names())
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

    /// Picks up a changed shards.toml without a restart: adds a pool for
    /// each new shard (and registers it when this role may), drops shards
    /// that left the file, rebuilds the ring with the new weights, takes the
    /// new placement strategy and account-scoped tables, and checks the new
    /// shards' schema (a shard not migrated to this binary's version is
    /// offered no new account until it is).
    ///
    /// Refused, changing nothing: a configuration whose master differs, one
    /// that drops a shard the master still places accounts on
    /// ([`Error::ReloadDropsShard`], naming it: drain it first), or one
    /// whose new shard's address leads to a database stamped as another
    /// shard or by another fleet ([`Error::ShardStampedAsAnother`],
    /// [`Error::ShardOfAnotherFleet`]). A kept
    /// shard's address or pool settings are not changed (its pool is in use;
    /// the report names it; restart to apply). Pools of a shard dropped
    /// here are kept by callers that still hold them.
    ///
    /// The reload covers routing (new accounts, `shard`, `shards`,
    /// `pool_for`); a worker runtime over this router starts work for an
    /// added shard and stops it for a removed one at its next fleet
    /// heartbeat.
    pub async fn reload(&self, config: &Config) -> Result<Reloaded> {
        let _serial = self.live.reload.lock().await;
        let current = self.live.versions.current();
        let old = &current.config;
        if !config.master.target.same_database(&old.master.target) {
            return Err(Error::Config {
                file: config.file.clone(),
                field: "master".into(),
                message: format!(
                    "points to {} but this router runs on master {}; the master cannot change without a restart",
                    config.master.target, old.master.target
                ),
            });
        }
        let names = config.shard_names();
        let dropped: Vec<String> = old.shard_names().into_iter().filter(|n| !names.contains(n)).collect();
        if !dropped.is_empty() {
            let held = store::placement_counts(&self.master)
                .await
                .map_err(|e| self.master.error(e))?;
            if let Some((shard, accounts)) = held.into_iter().find(|(s, n)| dropped.contains(s) && *n > 0) {
                return Err(Error::ReloadDropsShard {
                    file: config.file.clone(),
                    shard,
                    accounts,
                });
            }
        }
        let mut report = Reloaded {
            removed: dropped,
            strategy_changed: config.placement != old.placement,
            ..Reloaded::default()
        };
        let mut shards = Vec::with_capacity(config.shards.len());
        for s in &config.shards {
            match old.shards.iter().find(|o| o.name == s.name) {
                Some(o) => {
                    if o.weight != s.weight {
                        report.reweighted.push(s.name.clone());
                    }
                    if o.database.target.to_string() != s.database.target.to_string()
                        || o.database.pool != s.database.pool
                    {
                        report.unchanged_pools.push(s.name.clone());
                    }
                    let db = current
                        .shards
                        .iter()
                        .find(|d| d.name == s.name)
                        .cloned()
                        .unwrap_or_else(|| Database::open(&s.name, &s.database));
                    shards.push(db);
                }
                None => {
                    report.added.push(s.name.clone());
                    shards.push(Database::open(&s.name, &s.database));
                }
            }
        }
        let added: Vec<Database> = shards
            .iter()
            .filter(|d| report.added.contains(&d.name))
            .cloned()
            .collect();
        stamp::check(&self.master, &added).await?;
        let tables_changed = config.account_tables != old.account_tables;
        if report.is_empty()
            && !tables_changed
            && config.migrations.master == old.migrations.master
            && config.migrations.shard == old.migrations.shard
        {
            return Ok(report);
        }
        // Kept shards keep their configuration as it was (their pools do).
        let mut kept = config.clone();
        for s in &mut kept.shards {
            if let Some(o) = old.shards.iter().find(|o| o.name == s.name) {
                s.database = o.database.clone();
            }
        }
        self.live.versions.push(Topology { config: kept, shards });
        if !report.added.is_empty() {
            self.register_shards(&report.added).await;
        }
        self.live.refresh(&self.master, true).await;
        for name in &report.unchanged_pools {
            tracing::warn!(shard = %name, "the shard's address or pool settings changed; they apply after a restart");
        }
        tracing::info!(file = %config.file.display(), "{report}");
        Ok(report)
    }

    /// Asks the master again which shards are draining and checks the
    /// schema of shards not seen current, so that new accounts go where
    /// they may now (the placement watch does this every second).
    pub async fn refresh(&self) {
        self.live.refresh(&self.master, true).await;
    }

    /// The configuration in force (the last one `reload` took).
    pub fn config(&self) -> &Config {
        &self.live.versions.current().config
    }

    /// The master's pool.
    pub fn master(&self) -> &Database {
        &self.master
    }

    /// All shards' pools, in configuration order.
    pub fn shards(&self) -> &[Database] {
        &self.live.versions.current().shards
    }

    /// The pool of the shard named `name`.
    pub fn shard(&self, name: &str) -> Result<&Database> {
        self.shards()
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| Error::UnknownShard {
                shard: name.to_string(),
                known: self.config().shard_names().join(", "),
            })
    }

    /// The configured shards new accounts may be placed on, in
    /// configuration order, and those left out with the reason (weight 0,
    /// draining, schema behind or not checked), as of the last refresh.
    pub fn offered(&self) -> (Vec<String>, Vec<(String, String)>) {
        let offer = self.live.offer();
        let offered = self
            .config()
            .shard_names()
            .into_iter()
            .filter(|n| offer.offers(n))
            .collect();
        (offered, offer.left_out().to_vec())
    }

    /// The shard a new account `account` would be placed on now (the ring
    /// or the least-loaded choice among the offered shards); `None` when no
    /// shard is offered. Places nothing.
    pub fn propose(&self, account: &Account) -> Option<String> {
        self.live.offer().choose(account.as_str())
    }

    /// The last schema check of shard `name`.
    pub fn schema_state(&self, name: &str) -> SchemaState {
        self.live.schema(name)
    }

    /// Every configured shard with its registry state, whether it is
    /// offered new accounts and its account counts (read from the master
    /// now; the schema as last checked).
    pub async fn shard_states(&self) -> Result<Vec<ShardState>> {
        self.refresh().await;
        let registry = store::shard_registry(&self.master)
            .await
            .map_err(|e| self.master.error(e))?;
        let counts = store::placement_counts_pinned(&self.master)
            .await
            .map_err(|e| self.master.error(e))?;
        let offer = self.live.offer();
        Ok(self
            .config()
            .shards
            .iter()
            .map(|s| {
                let reg = registry.iter().find(|(n, _)| *n == s.name);
                let (accounts, pinned) = counts
                    .iter()
                    .find(|(n, _, _)| *n == s.name)
                    .map(|(_, a, p)| (*a, *p))
                    .unwrap_or((0, 0));
                ShardState {
                    name: s.name.clone(),
                    weight: s.weight,
                    registered: reg.is_some(),
                    draining: reg.is_some_and(|(_, d)| *d),
                    not_offered: offer
                        .left_out()
                        .iter()
                        .find(|(n, _)| *n == s.name)
                        .map(|(_, why)| why.clone()),
                    accounts,
                    pinned,
                }
            })
            .collect())
    }

    /// Marks shard `name` draining (no new account is placed there, by this
    /// router at once and by every other within about a second; a router
    /// with a stale view is refused by the master) or accepting again. The
    /// schema owner's job (the registry is the owner's); the shard must be
    /// configured.
    pub async fn set_draining(&self, name: &str, draining: bool) -> Result<()> {
        self.shard(name)?;
        self.register_shards(&[name.to_string()]).await;
        let found = store::shard_set_draining(&self.master, name, draining)
            .await
            .map_err(|e| self.master.error(e))?;
        if !found {
            return Err(Error::ShardNotRegistered {
                shard: name.to_string(),
                account: None,
            });
        }
        self.refresh().await;
        Ok(())
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
        let mut tries = 0;
        let placement = loop {
            if let Some((shard, epoch)) = store::placement_get_epoch(master, account.as_str())
                .await
                .map_err(|e| master.error(e))?
            {
                if self.shard(&shard).is_err() {
                    return Err(Error::AccountOnUnknownShard {
                        account: account.to_string(),
                        shard,
                        known: self.config().shard_names().join(", "),
                    });
                }
                self.remember(account, &shard, epoch);
                return Ok(Placement {
                    shard,
                    placed_now: false,
                });
            }
            let mut offer = self.live.offer();
            if offer.choose(account.as_str()).is_none() {
                // Nothing offered as of the last refresh: look again now
                // (e.g. the shards were migrated since).
                self.refresh().await;
                offer = self.live.offer();
            }
            let proposed = offer
                .choose(account.as_str())
                .ok_or_else(|| Error::NoShardAcceptsAccounts {
                    account: account.to_string(),
                    why: left_out_text(offer.left_out()),
                })?;
            match self.insert_placement(account, &proposed, false).await? {
                Some((shard, placed_now)) => {
                    if placed_now {
                        offer.placed(&shard);
                    }
                    break Placement { shard, placed_now };
                }
                None => {
                    // A concurrent first lookup (look again), or the shard
                    // started draining after the last refresh.
                    tries += 1;
                    if tries >= PLACE_TRIES {
                        return Err(Error::NoShardAcceptsAccounts {
                            account: account.to_string(),
                            why: format!("shard {proposed} is draining and no other was offered in time"),
                        });
                    }
                    self.refresh().await;
                }
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
    pub async fn shards_for(&self, accounts: &[&Account]) -> Result<Vec<Arc<str>>> {
        // The cached accounts (nearly all, once warm) are filled in place
        // under one read of the cache: one lookup and one shared name each.
        let mut out: Vec<Option<Arc<str>>> = match self.cache.read() {
            Ok(cache) => accounts
                .iter()
                .map(|a| cache.get(*a).map(|(shard, _)| shard.clone()))
                .collect(),
            Err(_) => vec![None; accounts.len()],
        };
        let mut missing: Vec<&str> = accounts
            .iter()
            .zip(&out)
            .filter(|(_, shard)| shard.is_none())
            .map(|(a, _)| a.as_str())
            .collect();
        if missing.is_empty() {
            // Every account was cached: every entry is `Some`.
            return Ok(out.into_iter().flatten().collect());
        }
        let mut known: HashMap<&str, Arc<str>> = HashMap::new();
        missing.sort_unstable();
        missing.dedup();
        let master = &self.master;
        let mut tries = 0;
        while !missing.is_empty() {
            let found = store::placements_get_many(master, &missing)
                .await
                .map_err(|e| master.error(e))?;
            for (account, shard, epoch) in found {
                if self.shard(&shard).is_err() {
                    return Err(Error::AccountOnUnknownShard {
                        account,
                        shard,
                        known: self.config().shard_names().join(", "),
                    });
                }
                if let Some(name) = missing.iter().find(|a| **a == account) {
                    if let Ok(a) = Account::new(account.as_str()) {
                        self.remember(&a, &shard, epoch);
                    }
                    known.insert(name, Arc::from(shard));
                }
            }
            missing.retain(|a| !known.contains_key(a));
            if missing.is_empty() {
                break;
            }
            tries += 1;
            if tries > PLACE_TRIES {
                return Err(Error::NoShardAcceptsAccounts {
                    account: missing[0].to_string(),
                    why: "the shards offered kept draining before the accounts could be placed".into(),
                });
            }
            if tries > 1 {
                self.refresh().await;
            }
            let offer = self.live.offer();
            let mut shards = Vec::with_capacity(missing.len());
            for account in &missing {
                let shard = offer.choose(account).ok_or_else(|| Error::NoShardAcceptsAccounts {
                    account: account.to_string(),
                    why: left_out_text(offer.left_out()),
                })?;
                self.shard(&shard)?;
                offer.placed(&shard);
                shards.push(shard);
            }
            let names: Vec<&str> = shards.iter().map(String::as_str).collect();
            let placed = match store::placements_insert_many(master, &missing, &names).await {
                Ok(placed) => placed,
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(FOREIGN_KEY_VIOLATION) => {
                    let mut named = names.clone();
                    named.sort_unstable();
                    named.dedup();
                    return Err(Error::ShardNotRegistered {
                        shard: named.join(" or "),
                        account: None,
                    });
                }
                Err(e) => return Err(master.error(e)),
            };
            for (account, shard) in missing.iter().zip(&shards) {
                if placed.iter().any(|p| p == account) {
                    if let Ok(a) = Account::new(*account) {
                        self.remember(&a, shard, 1);
                    }
                    known.insert(account, Arc::from(shard.as_str()));
                }
            }
            // Accounts someone else placed meanwhile are read again; those
            // a shard refused (it started draining) are offered again.
            missing.retain(|a| !known.contains_key(a));
        }
        for (shard, account) in out.iter_mut().zip(accounts) {
            if shard.is_none() {
                *shard = known.get(account.as_str()).cloned();
            }
        }
        Ok(out.into_iter().map(|s| s.unwrap_or_else(|| Arc::from(""))).collect())
    }

    /// Inserts `account`'s placement on `shard` unless it has one (see
    /// `store::placement_insert_if_absent`), turning a shard missing from
    /// the registry into [`Error::ShardNotRegistered`].
    async fn insert_placement(&self, account: &Account, shard: &str, pinned: bool) -> Result<Option<(String, bool)>> {
        match store::placement_insert_if_absent(&self.master, account.as_str(), shard, pinned).await {
            Ok(r) => Ok(r),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(FOREIGN_KEY_VIOLATION) => {
                Err(Error::ShardNotRegistered {
                    shard: shard.to_string(),
                    account: Some(account.to_string()),
                })
            }
            Err(e) => Err(self.master.error(e)),
        }
    }

    /// The shard and epoch of `account`'s placement, read from the master;
    /// `None` when the account has never been placed. Read-only: it never
    /// places the account and neither reads nor fills the cache (for
    /// inspection, e.g. `shardq route`; writers use [`Router::shard_for`]).
    pub async fn placement(&self, account: &Account) -> Result<Option<(String, i64)>> {
        store::placement_get_epoch(&self.master, account.as_str())
            .await
            .map_err(|e| self.master.error(e))
    }

    /// The pool of the shard `account` lives on (placing it first if new).
    pub async fn pool_for(&self, account: &Account) -> Result<&Database> {
        let placement = self.shard_for(account).await?;
        self.shard(&placement.shard)
    }

    /// Places a new account on `shard` (e.g. a dedicated shard for a large
    /// customer). Placing an account already placed elsewhere is refused;
    /// placing it on the shard it is already on is a no-op. Refused too: a
    /// shard that is draining, or whose schema was found behind this
    /// binary's version.
    pub async fn place(&self, account: &Account, shard: &str) -> Result<Placement> {
        self.place_as(account, shard, false).await
    }

    /// Like [`Router::place`], and marks the placement pinned: a rebalance
    /// never moves the account and a drain refuses to (unless told to).
    /// An account already on `shard` is marked pinned; one placed elsewhere
    /// is refused ([`Error::AlreadyPlaced`]: move it first). Marking an
    /// existing placement is the schema owner's job (the application role
    /// may not update placements).
    pub async fn pin(&self, account: &Account, shard: &str) -> Result<Placement> {
        let placement = self.place_as(account, shard, true).await?;
        if !placement.placed_now {
            let marked = store::placement_set_pinned(&self.master, account.as_str(), shard, true)
                .await
                .map_err(|e| self.master.error(e))?;
            if !marked {
                // It moved between the two statements.
                return Err(Error::AlreadyPlaced {
                    account: account.to_string(),
                    current: self
                        .placement(account)
                        .await?
                        .map(|(s, _)| s)
                        .unwrap_or_else(|| "no shard".into()),
                    requested: shard.to_string(),
                });
            }
        }
        Ok(placement)
    }

    /// Whether `account` is pinned (false when it is not placed).
    pub async fn pinned(&self, account: &Account) -> Result<bool> {
        store::placement_pinned(&self.master, account.as_str())
            .await
            .map(|p| p.unwrap_or(false))
            .map_err(|e| self.master.error(e))
    }

    async fn place_as(&self, account: &Account, shard: &str, pinned: bool) -> Result<Placement> {
        self.shard(shard)?;
        let master = &self.master;
        if let SchemaState::Behind { .. } | SchemaState::Unstamped = self.live.schema(shard) {
            return Err(Error::ShardNotAccepting {
                shard: shard.to_string(),
                why: self.live.schema(shard).to_string(),
            });
        }
        let mut looked_again = false;
        let (placement, epoch) = loop {
            if let Some((current, epoch)) = store::placement_get_epoch(master, account.as_str())
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
            if let Some((current, placed_now)) = self.insert_placement(account, shard, pinned).await? {
                break (
                    Placement {
                        shard: current,
                        placed_now,
                    },
                    1,
                );
            }
            if looked_again {
                return Err(Error::ShardNotAccepting {
                    shard: shard.to_string(),
                    why: "draining".into(),
                });
            }
            looked_again = true;
        };
        if placement.shard != shard {
            return Err(Error::AlreadyPlaced {
                account: account.to_string(),
                current: placement.shard,
                requested: shard.to_string(),
            });
        }
        if placement.placed_now {
            self.live.offer().placed(shard);
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
            let tx = db.pool.begin().await.map_err(|e| db.error(e))?;
            let mut tx = AccountTx {
                tx,
                shard: db.name.clone(),
                pooler: db.pooler,
            };
            let fenced = store::fence_get(&mut tx.conn(), account.as_str())
                .await
                .map_err(|e| db.error(e))?;
            match fenced {
                None => return Ok(tx),
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
        store::placement_counts(&self.master)
            .await
            .map_err(|e| self.master.error(e))
    }

    /// Every placement as (account, shard, pinned), in account order; only
    /// those on `shard` when given. Reads the whole directory (or the
    /// shard's part of it) into memory: for planning, not for routing.
    pub async fn placements(&self, shard: Option<&str>) -> Result<Vec<(String, String, bool)>> {
        store::placements_all(&self.master, shard)
            .await
            .map_err(|e| self.master.error(e))
    }

    fn cached(&self, account: &Account) -> Option<String> {
        self.cache
            .read()
            .ok()
            .and_then(|c| c.get(account).map(|(s, _)| s.to_string()))
    }

    fn remember(&self, account: &Account, shard: &str, epoch: i64) {
        if let Ok(mut c) = self.cache.write() {
            c.insert(account.clone(), (Arc::from(shard), epoch));
        }
    }
}

/// The shards left out of the offer, for an error message.
fn left_out_text(left_out: &[(String, String)]) -> String {
    if left_out.is_empty() {
        return "no shard is configured".into();
    }
    left_out
        .iter()
        .map(|(n, why)| format!("{n}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}
