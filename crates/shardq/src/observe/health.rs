//! Readiness of the fleet, for embedding applications, `/healthz` and
//! `shardq status`: is the master and every shard reachable, and is its
//! platform schema at the version this code expects? A worker node's
//! `/healthz` asks only about the shards it works ([`check_shards`]).
//!
//! ```no_run
//! # async fn demo(router: &shardq::Router) {
//! let health = shardq::observe::health::check(router).await;
//! if health.status != shardq::observe::health::Readiness::Ready {
//!     eprintln!("{}", serde_json::to_string_pretty(&health).unwrap_or_default());
//! }
//! # }
//! ```

use std::time::Duration;

use serde::Serialize;
use shardq_router::migrator::Role;
use shardq_router::router::Database;
use shardq_router::Router;
use sqlx::{Connection, PgConnection};

use crate::error::ErrorChain;
use crate::store;

/// How long [`check`] waits for each database.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// The fleet's readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Readiness {
    /// The master and every shard are reachable and migrated.
    Ready,
    /// Some database is down or not migrated; at least one shard is fine,
    /// so the node still works the jobs of the healthy shards.
    Degraded,
    /// No shard is reachable and migrated: no job can run.
    Unavailable,
}

impl std::fmt::Display for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Readiness::Ready => "ready",
            Readiness::Degraded => "degraded",
            Readiness::Unavailable => "unavailable",
        })
    }
}

/// The result of a health check.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// The summary.
    pub status: Readiness,
    /// The master first, then the shards in configuration order.
    pub databases: Vec<DatabaseHealth>,
}

/// One database's health.
#[derive(Debug, Clone, Serialize)]
pub struct DatabaseHealth {
    /// `master` or the shard's name.
    pub name: String,
    /// Master or shard.
    pub role: Role,
    /// The address, without the password.
    pub target: String,
    /// Whether a connection could be had within the timeout.
    pub reachable: bool,
    /// Highest applied platform migration (`None`: none, or unreachable).
    pub version: Option<i32>,
    /// The platform version this code expects.
    pub expected: Option<u32>,
    /// Why it is not healthy (password-free), if it is not.
    pub error: Option<String>,
}

impl DatabaseHealth {
    /// Reachable and migrated to at least the expected platform version.
    pub fn ok(&self) -> bool {
        let migrated = match (self.version, self.expected) {
            (_, None) => true,
            (Some(v), Some(e)) => i64::from(v) >= i64::from(e),
            (None, Some(_)) => false,
        };
        self.reachable && migrated && self.error.is_none()
    }
}

/// Checks the master and every shard concurrently, [`DEFAULT_TIMEOUT`] each.
pub async fn check(router: &Router) -> Health {
    check_within(router, DEFAULT_TIMEOUT).await
}

/// Checks the master and every shard concurrently, waiting `timeout` for each.
pub async fn check_within(router: &Router, timeout: Duration) -> Health {
    check_shards(router, |_| true, timeout).await
}

/// Checks the master and the shards whose name `include` accepts (a worker
/// node's: those it works), concurrently, waiting `timeout` for each; no
/// other shard is reached. With no shard included, the status is the
/// master's (see [`summarize`]).
pub async fn check_shards(router: &Router, include: impl Fn(&str) -> bool, timeout: Duration) -> Health {
    let master = database(router.master(), Role::Master, timeout);
    let included = router.shards().iter().filter(|db| include(&db.name));
    let shards = futures::future::join_all(included.map(|db| database(db, Role::Shard, timeout)));
    let (master, shards) = futures::join!(master, shards);
    let status = summarize(&master, &shards);
    let mut databases = vec![master];
    databases.extend(shards);
    Health { status, databases }
}

/// The readiness of a fleet whose master and shards are as given. With no
/// shard given (a node that works none yet), ready when the master is,
/// else degraded.
pub fn summarize(master: &DatabaseHealth, shards: &[DatabaseHealth]) -> Readiness {
    if shards.is_empty() {
        return if master.ok() {
            Readiness::Ready
        } else {
            Readiness::Degraded
        };
    }
    if !shards.iter().any(DatabaseHealth::ok) {
        Readiness::Unavailable
    } else if master.ok() && shards.iter().all(DatabaseHealth::ok) {
        Readiness::Ready
    } else {
        Readiness::Degraded
    }
}

/// Checks one database: reachability, then its platform schema version.
pub async fn database(db: &Database, role: Role, timeout: Duration) -> DatabaseHealth {
    let mut health = DatabaseHealth {
        name: db.name.clone(),
        role,
        target: db.target.clone(),
        reachable: false,
        version: None,
        expected: role.platform_latest(),
        error: None,
    };
    if let Err(e) = reach(db, timeout).await {
        health.error = Some(e);
        return health;
    }
    health.reachable = true;
    match tokio::time::timeout(timeout, store::schema_version(db)).await {
        Ok(Ok(version)) => {
            health.version = version;
            if let Some(expected) = health.expected {
                if !matches!(version, Some(v) if i64::from(v) >= i64::from(expected)) {
                    health.error = Some(format!(
                        "platform schema at version {} but this code needs {expected}: run `shardq migrate`",
                        version.map_or("none".to_string(), |v| v.to_string())
                    ));
                }
            }
        }
        Ok(Err(e)) => health.error = Some(ErrorChain(&db.error(e)).to_string()),
        Err(_) => health.error = Some(no_answer(db, timeout)),
    }
    health
}

/// A pool connection within `timeout`; when none comes, a direct connection
/// attempt tells why (the pool only says it timed out).
pub(crate) async fn reach(db: &Database, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, db.pool.acquire()).await {
        Ok(Ok(_conn)) => return Ok(()),
        Ok(Err(e)) if !matches!(e, sqlx::Error::PoolTimedOut) => return Err(ErrorChain(&db.error(e)).to_string()),
        _ => {}
    }
    let options = db.pool.connect_options();
    match tokio::time::timeout(timeout, PgConnection::connect_with(&options)).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            Err(format!(
                "{} ({}): no pool connection free within {timeout:?}",
                db.name, db.target
            ))
        }
        Ok(Err(e)) => Err(ErrorChain(&db.error(e)).to_string()),
        Err(_) => Err(no_answer(db, timeout)),
    }
}

fn no_answer(db: &Database, timeout: Duration) -> String {
    format!("{} ({}): no answer within {timeout:?}", db.name, db.target)
}
