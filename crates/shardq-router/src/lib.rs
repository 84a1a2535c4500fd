//! Sharding for shardq: which shard an account lives on, the connection pool
//! for it, and the migrations that bring every database to the same schema.
//!
//! Layout:
//! - [`config`]: `shards.toml`, parsed, `${VAR}`-expanded and validated.
//! - [`account`]: the account id type and its rules.
//! - [`ring`]: the consistent-hash ring that proposes a shard for a new account.
//! - [`router`]: [`Router`], cached placements, reload of shards.toml, the
//!   shard registry (draining, pins), and [`router::AccountTx`], the fenced
//!   transaction for an account's writes.
//! - `database`: one database's lazy pool ([`router::Database`]).
//! - `executor`: how statements run on a database, prepared and cached or,
//!   behind a transaction pooler, unnamed and inside a transaction
//!   (`&Database` and [`Conn`] are sqlx executors).
//! - `topology`: the router's live configuration and pools, what it knows of
//!   each shard (draining, schema), and which shards new accounts are
//!   offered (ring or least loaded).
//! - `placement_watch`: evicts cached placements that changed in the master
//!   and refreshes the topology every second.
//! - `stamp`: the fleet stamps (fleet id and name) the migrator writes
//!   into every database and the router checks after connecting.
//! - [`planner`]: the pure rebalance planner (which accounts move where).
//! - [`migrator`]: [`Migrator`], platform and application migrations on the
//!   master and every shard, with a per-database report.
//! - [`tls`]: what each `sslmode` means, for sqlx and the migrator's
//!   tokio-postgres connections alike.
//! - [`privileges`]: the GRANT statements for a least-privilege
//!   application role.
//! - `store`: every SQL statement of this crate.
//! - [`error`]: the crate's one error type.
//!
//! ```no_run
//! # async fn demo() -> shardq_router::Result<()> {
//! use shardq_router::{Account, Config, Router};
//! let config = Config::load("shards.toml")?;
//! let router = Router::connect(&config).await?;
//! let account = Account::new("acme")?;
//! let pool = router.pool_for(&account).await?; // the application's own tables live here too
//! # let _ = pool; Ok(()) }
//! ```

pub mod account;
pub mod config;
mod database;
pub mod error;
mod executor;
pub mod migrator;
mod placement_watch;
pub mod planner;
pub mod privileges;
pub mod ring;
pub mod router;
mod stamp;
mod store;
pub mod tls;
mod topology;

pub use account::Account;
pub use config::{
    AccountTable, Config, ConnectOptions, DatabaseConfig, PlacementStrategy, PoolConfig, Pooler, ShardConfig, Target,
};
pub use error::{Error, Result};
pub use executor::{Conn, Tx};
pub use migrator::{MigrationReport, Migrator};
pub use router::{AccountTx, Placement, Reloaded, Router, SchemaState, ShardState};
