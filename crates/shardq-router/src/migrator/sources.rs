//! Which migrations exist: the platform's own, embedded at build time, and
//! the application's, loaded from the configured folders at run time.

use std::path::Path;

use refinery::Migration;
use serde::Serialize;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::store;

#[allow(clippy::unwrap_used, missing_docs)]
mod embedded_master {
    refinery::embed_migrations!("../../migrations/master");
}

#[allow(clippy::unwrap_used, missing_docs)]
mod embedded_shard {
    refinery::embed_migrations!("../../migrations/shard");
}

/// The two kinds of database in a fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The global database.
    Master,
    /// One shard.
    Shard,
}

/// The two migration histories every database keeps, in separate tables so
/// they never collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum History {
    /// shardq's own schema (`migrations/master`, `migrations/shard`), kept in
    /// `shardq_schema_history`. Always migrated to its latest version.
    Platform,
    /// The application's schema (`[migrations]` in shards.toml), kept in
    /// `shardq_app_history`. The only history `--target` applies to.
    Application,
}

impl Role {
    /// The latest platform migration version embedded for this role: the
    /// schema version shardq's code expects (health checks compare with it).
    pub fn platform_latest(self) -> Option<u32> {
        let runner = match self {
            Role::Master => embedded_master::migrations::runner(),
            Role::Shard => embedded_shard::migrations::runner(),
        };
        runner.get_migrations().iter().map(|m| m.version()).max()
    }
}

impl History {
    /// The refinery history table of this history.
    pub fn table(self) -> &'static str {
        match self {
            History::Platform => store::MIGRATION_PLATFORM_TABLE,
            History::Application => store::MIGRATION_APP_TABLE,
        }
    }
}

impl std::fmt::Display for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            History::Platform => "platform",
            History::Application => "application",
        })
    }
}

/// The migration files of one role: the platform's, and the application's
/// when a folder is configured.
#[derive(Debug, Clone)]
pub(crate) struct RoleSources {
    /// Embedded platform migrations, sorted by version.
    pub platform: Vec<Migration>,
    /// Application migrations, sorted by version; `None` when not configured.
    pub application: Option<Vec<Migration>>,
}

impl RoleSources {
    /// The files of one history (`None`: the history is not configured).
    pub fn files(&self, history: History) -> Option<&[Migration]> {
        match history {
            History::Platform => Some(&self.platform),
            History::Application => self.application.as_deref(),
        }
    }
}

/// Every migration file a run needs, loaded once per run.
#[derive(Debug, Clone)]
pub(crate) struct Sources {
    /// For the master.
    pub master: RoleSources,
    /// For every shard.
    pub shard: RoleSources,
}

impl Sources {
    /// Loads the embedded platform migrations and reads the application's
    /// folders. Fails on a missing folder or a bad file (not UTF-8, a
    /// repeated version).
    pub fn load(config: &Config) -> Result<Sources> {
        Ok(Sources {
            master: RoleSources {
                platform: sorted(embedded_master::migrations::runner().get_migrations().clone()),
                application: config.migrations.master.as_deref().map(load_folder).transpose()?,
            },
            shard: RoleSources {
                platform: sorted(embedded_shard::migrations::runner().get_migrations().clone()),
                application: config.migrations.shard.as_deref().map(load_folder).transpose()?,
            },
        })
    }

    /// The sources of a role.
    pub fn for_role(&self, role: Role) -> &RoleSources {
        match role {
            Role::Master => &self.master,
            Role::Shard => &self.shard,
        }
    }
}

fn sorted(mut migrations: Vec<Migration>) -> Vec<Migration> {
    migrations.sort();
    migrations
}

/// Reads a folder of `V{n}__name.sql` files (recursively, as refinery does).
fn load_folder(folder: &Path) -> Result<Vec<Migration>> {
    let bad = |message: String| Error::MigrationFiles {
        folder: folder.to_path_buf(),
        message,
    };
    if !folder.is_dir() {
        return Err(bad("is not a folder".into()));
    }
    let migrations = refinery::load_sql_migrations(folder).map_err(|e| bad(e.to_string()))?;
    if let Some(pair) = migrations.windows(2).find(|w| w[0].version() == w[1].version()) {
        return Err(bad(format!("{} and {} have the same version", pair[0], pair[1])));
    }
    Ok(migrations)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_migrations_are_embedded() {
        let config = Config::from_urls("postgres://h/m", &[("a", "postgres://h/a")]).expect("config");
        let sources = Sources::load(&config).expect("load");
        assert!(sources.master.platform.iter().any(|m| m.name() == "placements"));
        assert!(sources.shard.platform.iter().any(|m| m.name() == "jobs"));
        assert!(sources.master.application.is_none());
    }
}
