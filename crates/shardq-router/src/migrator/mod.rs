//! [`Migrator`]: brings the master and every shard to the same schema and
//! reports exactly what happened on each database.
//!
//! Layout:
//! - `sources`: the platform's migrations (embedded from `migrations/master`
//!   and `migrations/shard`) and the application's (folders named in
//!   shards.toml, read at run time).
//! - `statements`: how a file runs (one transaction, or statement by
//!   statement after the `-- shardq:no-transaction` marker) and which
//!   line-ending forms of it count as the same file.
//! - `plan`: applied history compared with the files: pending migrations,
//!   [`Divergence`]s, or [`Ahead`] of this binary.
//! - `settings`: lock timeout, retries, backoff, statement timeout, deadline.
//! - `session`: the connection to one database (timeouts, the advisory lock
//!   taken without waiting on the server, the lock observer, cancel).
//! - `apply`: one migration file, retried on lock timeouts.
//! - `database`: the work on one database within its deadline.
//! - `report`, `status`: the [`MigrationReport`] and [`StatusReport`] types.
//! - `failure`: [`Failure`], with the full Postgres error text.
//!
//! A database behind a transaction pooler (`pooler = "transaction"`) is
//! migrated over its `listen_url` (the server's direct address): the
//! advisory lock is a session lock, which such a pooler does not keep.
//! Without one it fails, naming what to set.
//!
//! Fleet stamps: the master's first migration creates the fleet id; after
//! migrating a shard the migrator stamps it with that id and the shard's
//! name, and a database already stamped for another shard or fleet fails
//! ([`Stage::Stamp`]) with nothing run on it.
//!
//! Rules:
//! - Two histories per database, in separate tables in refinery's layout:
//!   `shardq_schema_history` (platform) and `shardq_app_history`
//!   (application). Both are read and compared before anything runs; the
//!   platform history runs first.
//! - The master runs first; then the canary shard, if one is named; then
//!   the shards concurrently, at most [`Migrator::parallel`] at a time, each
//!   in its own task, so a stuck database holds one slot and nothing else.
//!   Each database has a deadline; past it, it is reported timed out.
//! - Every session sets `lock_timeout`: a migration that cannot get its lock
//!   in time is rolled back and tried again after a pause, a bounded number
//!   of times, so it never keeps ordinary writes queued for longer than that.
//! - The advisory lock is polled with `pg_try_advisory_lock`, so concurrent
//!   migrators never double-apply: the second waits (up to its deadline)
//!   and then finds nothing to do.
//! - A failing database never stops the others (unless it is the master or
//!   the canary of a canary run); it is reported with its error. A diverged
//!   database (an applied migration edited, renamed or deleted, or an older
//!   file never applied) is refused, never repaired; one ahead of this
//!   binary is left alone.
//! - Each migration runs in its own transaction with its history row, unless
//!   marked no-transaction; re-running after a fix converges.
//!
//! ```no_run
//! # async fn demo() -> shardq_router::Result<()> {
//! use std::time::Duration;
//! use shardq_router::{Config, Migrator};
//! let config = Config::load("shards.toml")?;
//! let report = Migrator::new(&config)
//!     .parallel(8)
//!     .lock_timeout(Duration::from_secs(2))
//!     .canary("shard_1")
//!     .run()
//!     .await?;
//! println!("{report}");
//! if report.failed() { std::process::exit(1) }
//! # Ok(()) }
//! ```

mod apply;
mod database;
mod failure;
mod plan;
mod report;
mod session;
mod settings;
mod sources;
mod statements;
mod status;
mod table;

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, StreamExt};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::{stamp, store};
use database::Db;
use settings::Settings;
use sources::{RoleSources, Sources};

pub use failure::{Failure, Stage};
pub use plan::{Ahead, Divergence, DivergenceReason, MigrationId};
pub use report::{DatabaseReport, HistoryReport, MigrationReport};
pub use settings::{
    DEFAULT_DEADLINE, DEFAULT_LOCK_RETRIES, DEFAULT_LOCK_TIMEOUT, DEFAULT_RETRY_BACKOFF, MAX_RETRY_BACKOFF,
};
pub use sources::{History, Role};
pub use statements::NO_TRANSACTION_MARKER;
pub use status::{DatabaseStatus, HistoryStatus, State, StatusReport};

/// Default number of shards migrated at the same time.
pub const DEFAULT_PARALLEL: usize = 4;

/// Runs the platform's and the application's migrations on the fleet.
///
/// Built with [`Migrator::new`] and configured with the builder methods;
/// [`Migrator::run`] migrates, [`Migrator::status`] only reads.
#[derive(Debug, Clone)]
pub struct Migrator {
    /// The topology and the application's migration folders.
    config: Config,
    /// Most shards migrated at once (at least 1).
    parallel: usize,
    /// Application target version.
    target: Option<u32>,
    /// Shards to work on; `None`: all.
    only_shards: Option<Vec<String>>,
    /// Whether to include the master; `None`: only when no shard filter is set.
    master: Option<bool>,
    /// Report what would run without running it.
    dry_run: bool,
    /// Timeouts, retries and deadline of every database.
    settings: Settings,
    /// The shard migrated (after the master) before all others.
    canary: Option<String>,
    /// Told of each database's report as the database finishes.
    on_database: Option<OnDatabase>,
}

/// A callback given each database's report as soon as that database is
/// done (for progress: `shardq migrate` prints a line per database).
#[derive(Clone)]
struct OnDatabase(Arc<dyn Fn(&DatabaseReport) + Send + Sync>);

impl std::fmt::Debug for OnDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnDatabase(..)")
    }
}

impl Migrator {
    /// A migrator for the whole fleet of `config`: master and all shards, to
    /// the latest version, [`DEFAULT_PARALLEL`] shards at a time, with a
    /// [`DEFAULT_LOCK_TIMEOUT`] lock timeout, [`DEFAULT_LOCK_RETRIES`]
    /// retries and a [`DEFAULT_DEADLINE`] per database, no canary.
    pub fn new(config: &Config) -> Migrator {
        Migrator {
            config: config.clone(),
            parallel: DEFAULT_PARALLEL,
            target: None,
            only_shards: None,
            master: None,
            dry_run: false,
            settings: Settings::default(),
            canary: None,
            on_database: None,
        }
    }

    /// Calls `f` with each database's report as soon as that database is
    /// done (master, canary, then the shards in the order they finish),
    /// before [`Migrator::run`] returns the whole report. For progress.
    pub fn on_database(mut self, f: impl Fn(&DatabaseReport) + Send + Sync + 'static) -> Migrator {
        self.on_database = Some(OnDatabase(Arc::new(f)));
        self
    }

    /// Tells the `on_database` callback, if any, that `report`'s database is done.
    fn finished(&self, report: DatabaseReport) -> DatabaseReport {
        if let Some(f) = &self.on_database {
            (f.0)(&report);
        }
        report
    }

    /// The `lock_timeout` of every migrator session (default
    /// [`DEFAULT_LOCK_TIMEOUT`]): a statement that waits longer for a lock
    /// is cancelled, its migration rolled back and tried again. Zero turns
    /// the timeout off (a migration may then wait, and hold up the writes
    /// queued behind it, for as long as the lock is held).
    pub fn lock_timeout(mut self, timeout: Duration) -> Migrator {
        self.settings.lock_timeout = timeout;
        self
    }

    /// How many times a migration cancelled by the lock timeout is tried
    /// again before its database is reported failed (default
    /// [`DEFAULT_LOCK_RETRIES`]; 0: never).
    pub fn lock_retries(mut self, retries: u32) -> Migrator {
        self.settings.lock_retries = retries;
        self
    }

    /// The pause before the first retry (default [`DEFAULT_RETRY_BACKOFF`]);
    /// it doubles at each retry, up to [`MAX_RETRY_BACKOFF`].
    pub fn retry_backoff(mut self, pause: Duration) -> Migrator {
        self.settings.retry_backoff = pause;
        self
    }

    /// The `statement_timeout` of every migrator session (default `None`:
    /// the server's setting). A statement cancelled by it fails its
    /// migration (no retry).
    pub fn statement_timeout(mut self, timeout: Option<Duration>) -> Migrator {
        self.settings.statement_timeout = timeout;
        self
    }

    /// The deadline of each database, from connecting to its last migration
    /// (default [`DEFAULT_DEADLINE`]; `None`: none). A database not done by
    /// then is reported timed out (its running statement is cancelled and
    /// rolled back); the others go on.
    pub fn deadline(mut self, deadline: Option<Duration>) -> Migrator {
        self.settings.deadline = deadline;
        self
    }

    /// Migrates the master (when selected) and then `shard` alone before
    /// any other shard; if either fails, the other shards are not touched
    /// and the report lists them in [`MigrationReport::untouched`]. The
    /// shard must be configured and selected.
    pub fn canary(mut self, shard: impl Into<String>) -> Migrator {
        self.canary = Some(shard.into());
        self
    }

    /// Migrates at most `n` shards at the same time (0 is taken as 1).
    pub fn parallel(mut self, n: usize) -> Migrator {
        self.parallel = n.max(1);
        self
    }

    /// Stops the **application** history at `version` (migrations above it
    /// are left pending; nothing is ever rolled back). The platform history
    /// always goes to its latest version: shardq's code needs its schema.
    pub fn target(mut self, version: u32) -> Migrator {
        self.target = Some(version);
        self
    }

    /// Works only on the named shards. The master is then left alone unless
    /// [`Migrator::master`]`(true)` is also set. Unknown names make
    /// [`Migrator::run`] and [`Migrator::status`] fail before touching anything.
    pub fn only_shards<I, S>(mut self, names: I) -> Migrator
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.only_shards = Some(names.into_iter().map(Into::into).collect());
        self
    }

    /// Includes (`true`) or skips (`false`) the master, overriding the default
    /// (included unless [`Migrator::only_shards`] is set).
    pub fn master(mut self, include: bool) -> Migrator {
        self.master = Some(include);
        self
    }

    /// When `true`, [`Migrator::run`] takes no lock and changes nothing; its
    /// report lists, per database, the migrations that would run.
    pub fn dry_run(mut self, dry_run: bool) -> Migrator {
        self.dry_run = dry_run;
        self
    }

    /// Migrates the master (when selected), then the canary (if set), then
    /// the selected shards concurrently. A database that fails
    /// (unreachable, failing migration, lock timeout, deadline, diverged
    /// history) is reported inside the [`MigrationReport`]; `Err` only for
    /// problems that stop the whole run before it starts: an unreadable or
    /// invalid application migration folder, an unknown shard name or
    /// canary, a target without application migrations.
    pub async fn run(&self) -> Result<MigrationReport> {
        let sources = Arc::new(Sources::load(&self.config)?);
        if self.target.is_some() && self.selected_roles_have_no_app_migrations() {
            return Err(Error::Migrations(
                "a target version applies to application migrations, and none are configured ([migrations] in shards.toml)".into(),
            ));
        }
        let (master, mut shards) = self.selection()?;
        let canary = self.canary_of(&mut shards)?;
        let settings = Settings {
            app_target: self.target,
            dry_run: self.dry_run,
            ..self.settings
        };
        let mut databases = Vec::with_capacity(shards.len() + 2);
        if let Some(db) = master {
            databases.push(self.finished(spawn_migrate(db, sources.clone(), settings, None).await));
        }
        let fleet: Option<Arc<str>> = self.fleet_id().await.map(Arc::from);
        if let Some(db) = canary {
            databases.push(self.finished(spawn_migrate(db, sources.clone(), settings, fleet.clone()).await));
        }
        let mut untouched = Vec::new();
        if self.canary.is_some() && databases.iter().any(|d| d.error.is_some()) {
            untouched = shards.into_iter().map(|s| s.name).collect();
        } else {
            let mut done: Vec<(usize, DatabaseReport)> = stream::iter(shards.into_iter().enumerate())
                .map(|(i, db)| {
                    let sources = sources.clone();
                    let fleet = fleet.clone();
                    async move { (i, self.finished(spawn_migrate(db, sources, settings, fleet).await)) }
                })
                .buffer_unordered(self.parallel)
                .collect()
                .await;
            done.sort_by_key(|(i, _)| *i);
            databases.extend(done.into_iter().map(|(_, d)| d));
        }
        Ok(MigrationReport {
            dry_run: self.dry_run,
            target: self.target,
            databases,
            canary: self.canary.clone(),
            untouched,
        })
    }

    /// Reads every selected database's histories and compares them with the
    /// files: applied and latest versions, pending migrations, divergences,
    /// histories ahead of this binary. Changes nothing. An unreachable
    /// database (or one past its deadline) is reported inside the
    /// [`StatusReport`]; `Err` only for bad migration folders or unknown shards.
    pub async fn status(&self) -> Result<StatusReport> {
        let sources = Sources::load(&self.config)?;
        let (master, shards) = self.selection()?;
        let all: Vec<Db> = master.into_iter().chain(shards).collect();
        let settings = self.settings;
        let mut databases: Vec<(usize, DatabaseStatus)> = stream::iter(all.iter().enumerate())
            .map(|(i, db)| {
                let sources = &sources;
                async move { (i, database::status(db, sources.for_role(db.role), settings).await) }
            })
            .buffer_unordered(self.parallel)
            .collect()
            .await;
        databases.sort_by_key(|(i, _)| *i);
        Ok(StatusReport {
            databases: databases.into_iter().map(|(_, d)| d).collect(),
        })
    }

    /// The fleet id in the master's stamp (created by its first migrate);
    /// `None` when the master cannot be reached, is not migrated that far,
    /// or is stamped as something else than the master.
    async fn fleet_id(&self) -> Option<String> {
        let master = Db::of(stamp::MASTER_NAME, Role::Master, &self.config.master);
        if master.pooled_only {
            tracing::warn!("the master is behind a transaction pooler and has no listen_url; shards are not stamped");
            return None;
        }
        let client = match session::connect(&master.target).await {
            Ok(client) => client,
            Err(e) => {
                tracing::warn!(error = %e, "the master's fleet id cannot be read; shards are not stamped");
                return None;
            }
        };
        match store::migration_stamp_get(&client).await {
            Ok(Some((fleet, name))) if name == stamp::MASTER_NAME => Some(fleet),
            Ok(Some((_, name))) => {
                tracing::warn!(found = %name, "the master's database is stamped as another database; shards are not stamped");
                None
            }
            Ok(None) => {
                tracing::warn!("the master has no fleet id yet (not migrated); shards are not stamped");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "the master's fleet id cannot be read; shards are not stamped");
                None
            }
        }
    }

    /// Takes the canary out of `shards`; an error when it is not a
    /// configured shard or not among the selected ones.
    fn canary_of(&self, shards: &mut Vec<Db>) -> Result<Option<Db>> {
        let Some(name) = &self.canary else { return Ok(None) };
        self.config.shard(name)?;
        let Some(i) = shards.iter().position(|s| &s.name == name) else {
            return Err(Error::Migrations(format!(
                "canary shard {name:?} is not among the selected shards"
            )));
        };
        Ok(Some(shards.remove(i)))
    }

    /// The master (if selected) and the selected shards in config order.
    fn selection(&self) -> Result<(Option<Db>, Vec<Db>)> {
        let master = self
            .includes_master()
            .then(|| Db::of("master", Role::Master, &self.config.master));
        if let Some(names) = &self.only_shards {
            for name in names {
                self.config.shard(name)?;
            }
        }
        let shards = self
            .config
            .shards
            .iter()
            .filter(|s| self.selects_shard(&s.name))
            .map(|s| Db::of(&s.name, Role::Shard, &s.database))
            .collect();
        Ok((master, shards))
    }

    fn selects_shard(&self, name: &str) -> bool {
        match &self.only_shards {
            None => true,
            Some(names) => names.iter().any(|n| n == name),
        }
    }

    fn includes_master(&self) -> bool {
        self.master.unwrap_or(self.only_shards.is_none())
    }

    fn selected_roles_have_no_app_migrations(&self) -> bool {
        let m = &self.config.migrations;
        let master_has = self.includes_master() && m.master.is_some();
        let shards_have = self.config.shards.iter().any(|s| self.selects_shard(&s.name)) && m.shard.is_some();
        !(master_has || shards_have)
    }
}

/// Migrates one database in its own task, so that a panic there becomes
/// that database's error and the run goes on.
async fn spawn_migrate(db: Db, sources: Arc<Sources>, settings: Settings, fleet: Option<Arc<str>>) -> DatabaseReport {
    let (name, role, target) = (db.name.clone(), db.role, db.target.to_string());
    let task = tokio::spawn(async move {
        let files: &RoleSources = sources.for_role(db.role);
        database::migrate(&db, files, settings, fleet.as_deref()).await
    });
    match task.await {
        Ok(report) => report,
        Err(e) => {
            tracing::error!(database = %name, error = %e, "the migrator failed on this database");
            let message = match e.try_into_panic() {
                Ok(panic) => panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "the migration task panicked".into()),
                Err(e) => e.to_string(),
            };
            DatabaseReport::panicked(&name, role, target, format!("the migration task failed: {message}"))
        }
    }
}
