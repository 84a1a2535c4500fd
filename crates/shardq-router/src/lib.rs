//! Sharding for shardq: which shard an account lives on, the connection pool
//! for it, and the migrations that bring every database to the same schema.
//!
//! Layout:
//! - [`config`]: `shards.toml`, parsed, `${VAR}`-expanded and validated.
//! - [`account`]: the account id type and its rules.
//! - [`ring`]: the consistent-hash ring that proposes a shard for a new account.
//! - [`router`]: [`Router`], lazy pools per database, cached placements,
//!   and [`router::AccountTx`], the fenced transaction for an account's writes.
//! - `placement_watch`: evicts cached placements that changed in the master.
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
pub mod error;
pub mod migrator;
mod placement_watch;
pub mod privileges;
pub mod ring;
pub mod router;
mod store;
pub mod tls;

pub use account::Account;
pub use config::{AccountTable, Config, ConnectOptions, DatabaseConfig, PoolConfig, ShardConfig, Target};
pub use error::{Error, Result};
pub use migrator::{MigrationReport, Migrator};
pub use router::{AccountTx, Placement, Router};
