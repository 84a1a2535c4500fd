//! The one error type of the router crate.

use std::path::PathBuf;

/// Result alias used throughout the router crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while loading the topology, routing an
/// account or migrating the fleet. Messages say what and where: the file and
/// field, the shard, the account.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration file could not be read.
    #[error("{file}: cannot read: {source}")]
    ConfigRead {
        /// The file that was read.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML or has unknown or mistyped
    /// keys. The message shows no value of the file (toml's own error text
    /// quotes the offending line, which may hold a password).
    #[error(
        "{file}: {}{message}",
        .position.map(|(line, column)| format!("line {line}, column {column}: ")).unwrap_or_default()
    )]
    ConfigSyntax {
        /// The file that was parsed.
        file: PathBuf,
        /// Line and column (from 1) of the error, when the parser knows them.
        position: Option<(usize, usize)>,
        /// What is wrong, e.g. "unknown field `pasword`, expected one of ...".
        message: String,
    },
    /// A field of the configuration has a bad value.
    #[error("{file}: {field}: {message}")]
    Config {
        /// The file (or `<inline>` for configs built in code).
        file: PathBuf,
        /// The field, e.g. `shards[1].weight`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// An account id was rejected.
    #[error("invalid account id {account:?}: {message}")]
    InvalidAccount {
        /// The rejected id (truncated when long).
        account: String,
        /// Why it was rejected.
        message: String,
    },
    /// A shard name was used that the configuration does not define.
    #[error("unknown shard {shard:?} (configured shards: {known})")]
    UnknownShard {
        /// The name asked for.
        shard: String,
        /// The configured names, comma-separated.
        known: String,
    },
    /// An account is placed on a shard the configuration does not define.
    #[error("account {account} is placed on shard {shard}, which the configuration does not define (configured: {known}); add the shard back or move the account")]
    AccountOnUnknownShard {
        /// The account.
        account: String,
        /// The shard its placement names.
        shard: String,
        /// The configured names, comma-separated.
        known: String,
    },
    /// The placement directory names shards that shards.toml no longer has.
    #[error(
        "the master's placement table names shards missing from the configuration: {shards}; \
             add them back to shards.toml (accounts are never remapped silently)"
    )]
    PlacementsOnUnknownShards {
        /// The missing shard names, comma-separated.
        shards: String,
    },
    /// No shard accepts new accounts.
    #[error("cannot place account {account:?}: no shard accepts new accounts ({why})")]
    NoShardAcceptsAccounts {
        /// The account that needed a placement.
        account: String,
        /// Why each configured shard is left out (weight 0, draining,
        /// schema behind or not checked).
        why: String,
    },
    /// A shard was asked to take an account it does not accept.
    #[error("shard {shard} takes no new accounts: {why}")]
    ShardNotAccepting {
        /// The shard.
        shard: String,
        /// Why (draining, schema behind).
        why: String,
    },
    /// A shard is missing from the master's registry, which only the schema
    /// owner writes.
    #[error(
        "shard {shard} is not in the master's shard registry{}; the schema owner registers configured \
         shards (connect once as the owner, e.g. `shardq shards list`)",
        .account.as_deref().map(|a| format!(", so account {a} cannot be placed there")).unwrap_or_default()
    )]
    ShardNotRegistered {
        /// The shard.
        shard: String,
        /// The account being placed, if one was.
        account: Option<String>,
    },
    /// A reload would drop a shard that still holds accounts.
    #[error("{file}: refusing to reload: shard {shard} is missing from the file but {accounts} accounts are placed on it; drain it first (`shardq shards drain {shard}`)", file = file.display())]
    ReloadDropsShard {
        /// The new configuration's file.
        file: PathBuf,
        /// The shard.
        shard: String,
        /// Accounts placed on it.
        accounts: i64,
    },
    /// An account that already has a placement was asked to be pinned elsewhere.
    #[error("account {account:?} is already placed on shard {current:?}; refusing to pin it to {requested:?} (moving an account is a separate operation)")]
    AlreadyPlaced {
        /// The account.
        account: String,
        /// Where it lives.
        current: String,
        /// Where it was asked to go.
        requested: String,
    },
    /// A shard's address leads to a database stamped as another shard: two
    /// shards' addresses swapped in shards.toml, or a DNS alias to the wrong
    /// server. Routing would write one shard's accounts into another's.
    #[error(
        "shard {shard} ({target}) is stamped as shard {found}: the address configured for {shard} leads to \
         {found}'s database (addresses swapped in shards.toml, or a DNS alias to the wrong server); \
         fix the address of {shard}"
    )]
    ShardStampedAsAnother {
        /// The shard's configured name.
        shard: String,
        /// Its configured address, without the password.
        target: String,
        /// The shard name its stamp carries.
        found: String,
    },
    /// A shard's address leads to a database stamped by another fleet (its
    /// master has another fleet id).
    #[error(
        "shard {shard} ({target}) belongs to another fleet: it is stamped with fleet id {found}, and this \
         fleet's master has fleet id {fleet}; fix the address of {shard}"
    )]
    ShardOfAnotherFleet {
        /// The shard's configured name.
        shard: String,
        /// Its configured address, without the password.
        target: String,
        /// This fleet's id, from the master's stamp.
        fleet: String,
        /// The fleet id in the shard's stamp.
        found: String,
    },
    /// A database call failed; `database` names the master or the shard and
    /// `target` is its address without the password.
    #[error("{database} ({target}): {source}{}", .detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Database {
        /// `master` or `shard NAME`.
        database: String,
        /// Connection address with the password left out.
        target: String,
        /// The driver's error.
        source: sqlx::Error,
        /// What the driver's message leaves out, e.g. which limit a pool
        /// timeout hit.
        detail: Option<String>,
    },
    /// A move of the account has fenced it off its old shard and did not
    /// switch its placement in time: the write was not made; try again.
    #[error("account {account} is being moved off shard {shard}; its writes wait for the switch and it did not come in time; try again")]
    AccountMoving {
        /// The account.
        account: String,
        /// The shard it is leaving.
        shard: String,
    },
    /// A TLS file of a database (`sslrootcert`, `sslcert`, `sslkey`) cannot
    /// be used.
    #[error("{setting} {file}: {message}", file = file.display())]
    TlsFile {
        /// Which setting names it: `sslrootcert`, `sslcert` or `sslkey`.
        setting: &'static str,
        /// The file.
        file: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The TLS client could not be set up (not a connection failure).
    #[error("TLS setup: {message}")]
    Tls {
        /// What went wrong.
        message: String,
    },
    /// A migration run could not even start (bad migration files).
    #[error("migrations: {0}")]
    Migrations(String),
    /// An application migration folder is missing or holds a bad file
    /// (not UTF-8, a repeated version).
    #[error("migrations folder {folder}: {message}")]
    MigrationFiles {
        /// The folder, as resolved from shards.toml.
        folder: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl Error {
    /// The SQLSTATE code of a database error, if this is one.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            Error::Database {
                source: sqlx::Error::Database(e),
                ..
            } => e.code().map(|c| c.into_owned()),
            _ => None,
        }
    }
}
