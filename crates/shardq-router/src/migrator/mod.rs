//! [`Migrator`]: brings the master and every shard to the same schema and
//! reports exactly what happened on each database.
//!
//! Layout:
//! - `sources`: the platform's migrations (embedded from `migrations/master`
//!   and `migrations/shard`) and the application's (folders named in
//!   shards.toml, read at run time).
//! - `plan`: applied history compared with the files: pending migrations or
//!   [`Divergence`]s.
//! - `database`: the work on one database (connect, advisory lock, refinery).
//! - `report`, `status`: the [`MigrationReport`] and [`StatusReport`] types.
//! - `failure`: [`Failure`], with the full Postgres error text.
//!
//! Rules:
//! - Two histories per database, in separate refinery tables:
//!   `shardq_schema_history` (platform) and `shardq_app_history`
//!   (application). The platform history runs first.
//! - The master runs first, then the shards concurrently, at most
//!   [`Migrator::parallel`] at a time, each on its own connection under
//!   `pg_advisory_lock`, so concurrent migrators never double-apply: the
//!   second waits and then finds nothing to do.
//! - A failing database never stops the others; it is reported with its
//!   error. A diverged database (an applied migration edited, renamed or
//!   deleted, or an older file never applied) is refused, never repaired.
//! - Each migration runs in its own transaction; re-running after a fix
//!   converges.
//!
//! ```no_run
//! # async fn demo() -> shardq_router::Result<()> {
//! use shardq_router::{Config, Migrator};
//! let config = Config::load("shards.toml")?;
//! let report = Migrator::new(&config).parallel(8).run().await?;
//! println!("{report}");
//! if report.failed() { std::process::exit(1) }
//! # Ok(()) }
//! ```

mod database;
mod failure;
mod plan;
mod report;
mod sources;
mod status;
mod table;

use futures::stream::{self, StreamExt};

use crate::config::Config;
use crate::error::{Error, Result};
use database::{Db, RunOptions};
use sources::Sources;

pub use failure::{Failure, Stage};
pub use plan::{Divergence, DivergenceReason, MigrationId};
pub use report::{DatabaseReport, HistoryReport, MigrationReport};
pub use sources::{History, Role};
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
}

impl Migrator {
    /// A migrator for the whole fleet of `config`: master and all shards, to
    /// the latest version, [`DEFAULT_PARALLEL`] shards at a time.
    pub fn new(config: &Config) -> Migrator {
        Migrator {
            config: config.clone(),
            parallel: DEFAULT_PARALLEL,
            target: None,
            only_shards: None,
            master: None,
            dry_run: false,
        }
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

    /// Migrates the master (when selected), then the selected shards
    /// concurrently. A database that fails (unreachable, failing migration,
    /// diverged history) is reported inside the [`MigrationReport`]; `Err`
    /// only for problems that stop the whole run before it starts: an
    /// unreadable or invalid application migration folder, an unknown shard
    /// name, a target without application migrations.
    pub async fn run(&self) -> Result<MigrationReport> {
        let sources = Sources::load(&self.config)?;
        if self.target.is_some() && self.selected_roles_have_no_app_migrations() {
            return Err(Error::Migrations(
                "a target version applies to application migrations, and none are configured ([migrations] in shards.toml)".into(),
            ));
        }
        let (master, shards) = self.selection()?;
        let opts = RunOptions {
            app_target: self.target,
            dry_run: self.dry_run,
        };
        let mut databases = Vec::with_capacity(shards.len() + 1);
        if let Some(m) = &master {
            databases.push(database::migrate(m, sources.for_role(m.role), opts).await);
        }
        let shard_reports: Vec<_> = stream::iter(&shards)
            .map(|db| database::migrate(db, sources.for_role(db.role), opts))
            .buffered(self.parallel)
            .collect()
            .await;
        databases.extend(shard_reports);
        Ok(MigrationReport {
            dry_run: self.dry_run,
            target: self.target,
            databases,
        })
    }

    /// Reads every selected database's histories and compares them with the
    /// files: applied and latest versions, pending migrations, divergences.
    /// Changes nothing. An unreachable database is reported inside the
    /// [`StatusReport`]; `Err` only for bad migration folders or unknown shards.
    pub async fn status(&self) -> Result<StatusReport> {
        let sources = Sources::load(&self.config)?;
        let (master, shards) = self.selection()?;
        let all: Vec<Db> = master.into_iter().chain(shards).collect();
        let databases = stream::iter(&all)
            .map(|db| database::status(db, sources.for_role(db.role)))
            .buffered(self.parallel)
            .collect()
            .await;
        Ok(StatusReport { databases })
    }

    /// The master (if selected) and the selected shards in config order.
    fn selection(&self) -> Result<(Option<Db>, Vec<Db>)> {
        let master = self.includes_master().then(|| Db {
            name: "master".into(),
            role: Role::Master,
            target: self.config.master.target.clone(),
        });
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
            .map(|s| Db {
                name: s.name.clone(),
                role: Role::Shard,
                target: s.database.target.clone(),
            })
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
