//! [`Database`]: one database's lazy pool, with the name and the
//! password-free address used in its errors.

use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use crate::config::{DatabaseConfig, PoolConfig, Pooler};
use crate::error::Error;

/// A database's pool with the names used in errors.
#[derive(Debug, Clone)]
pub struct Database {
    /// `master` or the shard's name.
    pub name: String,
    /// The connection pool (connects lazily).
    pub pool: PgPool,
    /// The address without the password, for messages.
    pub target: String,
    /// The pooler between this process and the server (`pooler` in
    /// shards.toml): with one in transaction mode no session settings are
    /// sent at connect, LISTEN goes over [`Database::listen_pool`], and
    /// statements run through `&Database` (an sqlx executor) are unnamed
    /// and each inside a transaction (the crate's `executor` module).
    pub pooler: Pooler,
    /// A lazy one-connection pool on the direct address (`listen_url`),
    /// when one is configured.
    pub direct: Option<PgPool>,
}

impl Database {
    /// A lazy pool with `db.pool`'s limits; its connections carry the
    /// session settings of [`session_settings`] (see [`PoolConfig`] for what
    /// bounds time), except behind a transaction pooler, which refuses
    /// them at connect.
    pub(crate) fn open(name: &str, db: &DatabaseConfig) -> Database {
        let mut connect = db.target.connect_options().into_inner();
        let settings = session_settings(&db.pool);
        if !settings.is_empty() && db.pooler == Pooler::None {
            connect = connect.options(settings);
        }
        if db.pooler == Pooler::Transaction {
            // Statements run unnamed there (see `executor`): nothing to cache.
            connect = connect.statement_cache_capacity(0);
        }
        let pool = PgPoolOptions::new()
            .max_connections(db.pool.max_connections)
            .min_connections(db.pool.min_connections)
            .acquire_timeout(db.pool.acquire_timeout)
            .connect_lazy_with(connect);
        let direct = db.listen.as_ref().map(|target| {
            PgPoolOptions::new()
                .max_connections(1)
                .min_connections(0)
                .acquire_timeout(db.pool.acquire_timeout)
                .connect_lazy_with(target.connect_options().into_inner())
        });
        Database {
            name: name.to_string(),
            pool,
            target: db.target.to_string(),
            pooler: db.pooler,
            direct,
        }
    }

    /// Where this database's LISTEN connection comes from: the direct
    /// address (`listen_url`) when configured, else the pool unless a
    /// transaction pooler is in the way (it cannot carry a LISTEN between
    /// transactions): then `None`, and the node polls.
    pub fn listen_pool(&self) -> Option<&PgPool> {
        match (&self.direct, self.pooler) {
            (Some(direct), _) => Some(direct),
            (None, Pooler::None) => Some(&self.pool),
            (None, Pooler::Transaction) => None,
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
