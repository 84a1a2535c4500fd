//! `shards.toml`: the topology (one master, one or more shards), parsed,
//! expanded (`${VAR}`, `${VAR:-default}`, `$${` for a literal `${`) and
//! validated, with the libpq environment variables of [`PG_ENV`] filling
//! in what a database leaves unset.
//!
//! Every error names the file, the field and what is wrong, and never shows
//! a value that may be a secret (a TOML error says where, not what the line
//! holds; an expansion error says at which character); nothing gets a
//! silent default except the documented ones (port 5432, user `postgres`,
//! dbname `shardq`, sslmode `prefer`, weight 1, the pool defaults of
//! [`PoolConfig`], placement strategy `ring`).
//!
//! Callers load a [`Config`] with [`Config::load`] (or [`Config::parse`],
//! [`Config::from_urls`]) and hand it to the router and the migrator, which
//! read the [`Target`] of each database.
//!
//! Layout of this folder (dependencies point down; the `tls` module uses
//! this one, and `target.rs` calls back into it only for the relay socket
//! of sqlx's verified connections):
//! - `mod.rs`: [`Config`], [`ShardConfig`], [`DatabaseConfig`],
//!   [`PoolConfig`], [`AppMigrations`], [`PlacementStrategy`] and the topology rules: `Check`
//!   turns the raw file into these types with field-located errors, and
//!   reads the environment variables of [`PG_ENV`].
//! - `raw.rs`: the `Raw*` serde structs (unknown keys rejected), the
//!   `${VAR}` / `${VAR:-default}` / `$${` expansion, and TOML errors
//!   without values.
//! - `target.rs`: [`Target`], the address of one database, and the sqlx and
//!   tokio-postgres connect options built from it.
//! - `ssl_mode.rs`: [`SslMode`], [`SslRootCert`] and [`ServerCheck`], the
//!   one meaning of `sslmode`/`sslrootcert` (re-exported by `tls`).
//! - `tests.rs`: the unit tests of parsing and validation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

mod raw;
mod ssl_mode;
mod target;
#[cfg(test)]
mod tests;

use raw::{RawConfig, RawDatabase, RawPool};
pub use ssl_mode::{ServerCheck, SslMode, SslRootCert, SSL_MODES};
pub use target::{ConnectOptions, Target};

/// The libpq environment variables read, in one place (`Check::database`),
/// for every database that leaves the setting unset, so that both drivers
/// get the same value: the router's (sqlx) and the migrator's
/// (tokio-postgres). They fill in, in this order: `password`, `sslmode`,
/// `sslrootcert`, `sslcert`, `sslkey`, and libpq's `options` (server
/// settings sent at connect, [`Target::options`]). An empty value counts as
/// unset. Nothing else of libpq's environment is read: not `PGHOST`,
/// `PGPORT`, `PGUSER`, `PGDATABASE` (each database has its own, with the
/// documented defaults), `PGAPPNAME`, `PGPASSFILE`/`~/.pgpass`,
/// `PGSERVICE`, nor the default files under `~/.postgresql/`.
pub const PG_ENV: [&str; 6] = [
    "PGPASSWORD",
    "PGSSLMODE",
    "PGSSLROOTCERT",
    "PGSSLCERT",
    "PGSSLKEY",
    "PGOPTIONS",
];

/// The default configuration file, relative to the working directory.
pub const DEFAULT_CONFIG_FILE: &str = "shards.toml";

/// Where a configuration came from, for error messages.
const INLINE: &str = "<inline>";

/// The largest `statement_timeout` / `lock_timeout` the server accepts, in
/// milliseconds (they are `int` settings).
const SERVER_TIMEOUT_MAX_MS: u128 = i32::MAX as u128;

/// The validated topology.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (`<inline>` when built in code).
    pub file: PathBuf,
    /// The global database.
    pub master: DatabaseConfig,
    /// The shards, in file order. Names are unique.
    pub shards: Vec<ShardConfig>,
    /// The application's own migration folders, if any.
    pub migrations: AppMigrations,
    /// The application's account-scoped tables (`[[accounts.tables]]`): a
    /// move of an account carries its rows of each.
    pub account_tables: Vec<AccountTable>,
    /// How new accounts are placed (`[placement] strategy`; default ring).
    pub placement: PlacementStrategy,
}

/// How a new account's shard is chosen among the shards that accept new
/// accounts (weight > 0, not draining, migrated): `[placement] strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PlacementStrategy {
    /// `"ring"`: the consistent-hash ring weighted by `weight` (the
    /// default): a shard gets its weight's share of *new* accounts, so a
    /// shard added to a full fleet never catches up by itself.
    #[default]
    Ring,
    /// `"least_loaded"`: the shard with the fewest placements per unit of
    /// weight (from the master's counts, refreshed every few seconds, plus
    /// the accounts this router placed since), so a new shard takes new
    /// accounts until it has caught up.
    LeastLoaded,
}

impl PlacementStrategy {
    /// The names accepted in shards.toml.
    pub const NAMES: &'static str = "\"ring\" or \"least_loaded\"";

    /// The strategy's name as written in shards.toml.
    pub fn as_str(self) -> &'static str {
        match self {
            PlacementStrategy::Ring => "ring",
            PlacementStrategy::LeastLoaded => "least_loaded",
        }
    }
}

/// An application table whose rows belong to accounts: `[[accounts.tables]]`
/// with `table` (`name` or `schema.name`) and `column` (the column holding
/// the account id; default `account`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountTable {
    /// The table, `schema.name` or `name` (in `public`).
    pub table: String,
    /// Its column holding the account id.
    pub column: String,
}

/// One shard: a stable name, a weight and a database.
#[derive(Debug, Clone)]
pub struct ShardConfig {
    /// Identity of the shard forever; a simple identifier.
    pub name: String,
    /// Share of new accounts; 0 accepts no new accounts.
    pub weight: u32,
    /// Where the shard's database is.
    pub database: DatabaseConfig,
}

/// A database: where it is and how to pool connections to it.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// Connection settings.
    pub target: Target,
    /// Pool settings.
    pub pool: PoolConfig,
    /// The connection pooler between this process and the server
    /// (`pooler = "transaction"` for PgBouncer in transaction mode).
    pub pooler: Pooler,
    /// `listen_url`: the server's direct address, for what a transaction
    /// pooler cannot carry (LISTEN, and the migrator's session advisory
    /// lock). Parts the URL leaves out come from the database's own fields.
    pub listen: Option<Target>,
}

/// What sits between this process and a database's server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Pooler {
    /// Nothing, or a pooler in session mode: every connection is a server
    /// session of its own.
    #[default]
    None,
    /// A pooler in transaction mode (PgBouncer `pool_mode = transaction`):
    /// a connection's session lasts one transaction. No settings are sent
    /// at connect (the pooler refuses the `options` startup parameter), the
    /// node does not LISTEN through it (over `listen_url`, or not at all and
    /// it polls), and the migrator needs `listen_url`.
    Transaction,
}

impl Pooler {
    /// The name used in shards.toml.
    pub fn as_str(self) -> &'static str {
        match self {
            Pooler::None => "none",
            Pooler::Transaction => "transaction",
        }
    }
}

/// Connection pool settings of one database: `pool = { ... }` in
/// shards.toml.
///
/// What bounds time on a database that is down or stopped answering:
///
/// - [`acquire_timeout`](Self::acquire_timeout) bounds getting a
///   connection: waiting for a free one, checking an idle one (a ping) and
///   opening a new one (TCP connect, TLS, startup, authentication; a
///   refused connection is retried until then). sqlx 0.8 has no separate
///   connect timeout: every connection a pool opens is opened inside this
///   deadline, so shards.toml refuses a `connect_timeout` field.
/// - [`statement_timeout`](Self::statement_timeout) and
///   [`lock_timeout`](Self::lock_timeout) are sent to the server in the
///   startup packet (`options=-c ...`), as session defaults of every pool
///   connection; they override `ALTER ROLE/DATABASE ... SET` values, and a
///   transaction may still `SET LOCAL` its own. The server enforces them, so
///   they bound a server that is slow, not one that stopped answering.
/// - Nothing bounds a statement already sent to a server that stopped
///   answering: sqlx 0.8 has no read timeout and cannot set TCP keepalives
///   (which a stopped server's kernel would answer anyway). Callers that
///   must not wait wrap the call in `tokio::time::timeout`.
///
/// The migrator connects with its own driver (tokio-postgres) and gets none
/// of these settings, so a long migration is never cancelled by them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Most connections the pool opens (default 10).
    pub max_connections: u32,
    /// Connections kept open when idle (default 0).
    pub min_connections: u32,
    /// How long a caller waits for a connection, including opening a new
    /// one (default 5 s; more than 0).
    pub acquire_timeout: Duration,
    /// The server cancels a statement of a pool connection that runs
    /// longer (SQLSTATE 57014; default 30 s). Zero leaves the setting to
    /// the server (no limit unless its configuration, role or database sets
    /// one); use zero for both timeouts behind a pooler that refuses the
    /// `options` startup parameter, such as PgBouncer.
    pub statement_timeout: Duration,
    /// The server fails a statement of a pool connection that waits longer
    /// for a lock, row or table (SQLSTATE 55P03; default 10 s). Zero leaves
    /// the setting to the server. Keep it below `statement_timeout`, or
    /// that fires first.
    pub lock_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_connections: 10,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            lock_timeout: Duration::from_secs(10),
        }
    }
}

/// The application's migration folders (refinery `V{n}__name.sql` files).
#[derive(Debug, Clone, Default)]
pub struct AppMigrations {
    /// Folder of migrations for the master, resolved against the config file's folder.
    pub master: Option<PathBuf>,
    /// Folder of migrations for every shard.
    pub shard: Option<PathBuf>,
}

/// Builds field-located errors for one file.
struct Check<'a> {
    file: &'a Path,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Check<'_> {
    fn err(&self, field: &str, message: impl Into<String>) -> Error {
        Error::Config {
            file: self.file.to_path_buf(),
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// Expands `${VAR}`, `${VAR:-default}` and `$${` in a field's value;
    /// `url` percent-encodes what it puts in (see `raw::expand`).
    fn expand(&self, field: &str, value: &str, url: bool) -> Result<String> {
        raw::expand(value, self.env, url).map_err(|message| self.err(field, message))
    }

    fn opt(&self, field: &str, value: &Option<String>) -> Result<Option<String>> {
        value.as_deref().map(|v| self.expand(field, v, false)).transpose()
    }

    /// A variable of [`PG_ENV`]; empty counts as unset.
    fn pg_env(&self, name: &str) -> Option<String> {
        (self.env)(name).filter(|v| !v.is_empty())
    }

    fn database(&self, at: &str, raw: &RawDatabase) -> Result<DatabaseConfig> {
        let f = |name: &str| format!("{at}.{name}");
        let mut t = Target {
            host: "127.0.0.1".into(),
            port: 5432,
            user: "postgres".into(),
            password: None,
            dbname: "shardq".into(),
            sslmode: SslMode::Prefer,
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            options: None,
        };
        // The sslmode as written, and where (for the error if it is bad).
        let mut sslmode: Option<(String, &'static str)> = None;
        if let Some(url) = raw.url.as_deref() {
            let url = self.expand(&f("url"), url, true)?;
            self.apply_url(&f("url"), &url, &mut t, &mut sslmode)?;
        }
        if let Some(h) = self.opt(&f("host"), &raw.host)? {
            t.host = h;
        }
        if let Some(p) = raw.port {
            t.port = u16::try_from(p)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| self.err(&f("port"), format!("{p} is not a TCP port (1-65535)")))?;
        }
        if let Some(u) = self.opt(&f("user"), &raw.user)? {
            t.user = u;
        }
        if let Some(p) = self.opt(&f("password"), &raw.password)? {
            t.password = (!p.is_empty()).then_some(p);
        }
        if let Some(d) = self.opt(&f("dbname"), &raw.dbname)? {
            t.dbname = d;
        }
        if let Some(s) = self.opt(&f("sslmode"), &raw.sslmode)? {
            sslmode = Some((s, ""));
        }
        if let Some(c) = self.opt(&f("sslrootcert"), &raw.sslrootcert)? {
            t.sslrootcert = Some(SslRootCert::parse(&c));
        }
        if let Some(c) = self.opt(&f("sslcert"), &raw.sslcert)? {
            t.sslcert = Some(PathBuf::from(c));
        }
        if let Some(k) = self.opt(&f("sslkey"), &raw.sslkey)? {
            t.sslkey = Some(PathBuf::from(k));
        }
        // The environment, for what the file leaves unset (see PG_ENV).
        if t.password.is_none() {
            t.password = self.pg_env("PGPASSWORD");
        }
        if sslmode.is_none() {
            sslmode = self.pg_env("PGSSLMODE").map(|s| (s, " (from PGSSLMODE)"));
        }
        if t.sslrootcert.is_none() {
            t.sslrootcert = self.pg_env("PGSSLROOTCERT").map(|c| SslRootCert::parse(&c));
        }
        if t.sslcert.is_none() {
            t.sslcert = self.pg_env("PGSSLCERT").map(PathBuf::from);
        }
        if t.sslkey.is_none() {
            t.sslkey = self.pg_env("PGSSLKEY").map(PathBuf::from);
        }
        t.options = self.pg_env("PGOPTIONS");
        t.sslmode = match sslmode {
            Some((s, from)) => SslMode::parse(&s).ok_or_else(|| {
                self.err(
                    &f("sslmode"),
                    format!("{s:?}{from} is not one of {SSL_MODES} (spelt as libpq spells them, in lower case)"),
                )
            })?,
            // As in libpq, the system roots make verify-full the default.
            None if t.sslrootcert == Some(SslRootCert::System) => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        if let Err(message) = t.server_check() {
            let field = if t.sslrootcert.is_none() {
                "sslrootcert"
            } else {
                "sslmode"
            };
            return Err(self.err(&f(field), message));
        }
        match (&t.sslcert, &t.sslkey) {
            (Some(_), None) => {
                return Err(self.err(&f("sslkey"), "is not set, but sslcert is: set both (or neither)"));
            }
            (None, Some(_)) => {
                return Err(self.err(&f("sslcert"), "is not set, but sslkey is: set both (or neither)"));
            }
            _ => {}
        }
        for (name, value) in [("host", &t.host), ("user", &t.user), ("dbname", &t.dbname)] {
            if value.is_empty() {
                return Err(self.err(&f(name), "must not be empty"));
            }
        }
        let pooler = match self.opt(&f("pooler"), &raw.pooler)?.as_deref() {
            None | Some("none") => Pooler::None,
            Some("transaction") => Pooler::Transaction,
            Some(other) => {
                return Err(self.err(
                    &f("pooler"),
                    format!(
                        "{other:?} is not one of none, transaction (a pooler in session mode keeps sessions: use none)"
                    ),
                ))
            }
        };
        let listen = match raw.listen_url.as_deref() {
            None => None,
            Some(url) => {
                let field = f("listen_url");
                let url = self.expand(&field, url, true)?;
                let mut direct = t.clone();
                let mut sslmode = None;
                self.apply_url(&field, &url, &mut direct, &mut sslmode)?;
                if let Some((s, from)) = sslmode {
                    direct.sslmode = SslMode::parse(&s)
                        .ok_or_else(|| self.err(&field, format!("sslmode {s:?}{from} is not one of {SSL_MODES}")))?;
                }
                Some(direct)
            }
        };
        Ok(DatabaseConfig {
            target: t,
            pool: self.pool(&f("pool"), &raw.pool)?,
            pooler,
            listen,
        })
    }

    fn apply_url(
        &self,
        field: &str,
        url: &str,
        t: &mut Target,
        sslmode: &mut Option<(String, &'static str)>,
    ) -> Result<()> {
        // Never echo the URL itself: it may hold a password.
        let u = url::Url::parse(url).map_err(|e| self.err(field, format!("not a valid URL: {e}")))?;
        if u.scheme() != "postgres" && u.scheme() != "postgresql" {
            return Err(self.err(
                field,
                format!("scheme must be postgres:// or postgresql://, not {}://", u.scheme()),
            ));
        }
        // Percent-decoding only: unlike form encoding, `+` and `&` are literal
        // in a URL's userinfo and path.
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B").replace('&', "%26")).as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        if let Some(h) = u.host_str().filter(|h| !h.is_empty()) {
            // A postgres:// host is kept percent-encoded by the URL parser
            // (e.g. a `${HOST}` put in encoded).
            t.host = decode(h.trim_start_matches('[').trim_end_matches(']'));
        }
        if let Some(p) = u.port() {
            t.port = p;
        }
        if !u.username().is_empty() {
            t.user = decode(u.username());
        }
        if let Some(p) = u.password() {
            t.password = Some(decode(p));
        }
        let db = u.path().trim_start_matches('/');
        if !db.is_empty() {
            t.dbname = decode(db);
        }
        for (k, v) in u.query_pairs() {
            match &*k {
                "sslmode" => *sslmode = Some((v.into_owned(), " (in url)")),
                "sslrootcert" => t.sslrootcert = Some(SslRootCert::parse(&v)),
                "sslcert" => t.sslcert = Some(PathBuf::from(v.into_owned())),
                "sslkey" => t.sslkey = Some(PathBuf::from(v.into_owned())),
                other => {
                    return Err(self.err(
                        field,
                        format!(
                            "unsupported URL parameter {other:?} (supported: sslmode, sslrootcert, sslcert, sslkey)"
                        ),
                    ))
                }
            }
        }
        Ok(())
    }

    fn pool(&self, at: &str, raw: &RawPool) -> Result<PoolConfig> {
        let mut p = PoolConfig::default();
        let count = |name: &str, v: i64| {
            u32::try_from(v)
                .ok()
                .filter(|v| *v <= 10_000)
                .ok_or_else(|| self.err(&format!("{at}.{name}"), format!("{v} is out of range (0-10000)")))
        };
        if let Some(v) = raw.max_connections {
            p.max_connections = count("max_connections", v)?;
            if p.max_connections == 0 {
                return Err(self.err(&format!("{at}.max_connections"), "must be at least 1"));
            }
        }
        if let Some(v) = raw.min_connections {
            p.min_connections = count("min_connections", v)?;
        }
        if p.min_connections > p.max_connections {
            return Err(self.err(
                &format!("{at}.min_connections"),
                format!(
                    "{} is more than max_connections ({})",
                    p.min_connections, p.max_connections
                ),
            ));
        }
        if let Some(v) = self.duration(&format!("{at}.acquire_timeout"), &raw.acquire_timeout)? {
            if v.is_zero() {
                return Err(self.err(&format!("{at}.acquire_timeout"), "must be more than 0"));
            }
            p.acquire_timeout = v;
        }
        for (name, raw, slot) in [
            ("statement_timeout", &raw.statement_timeout, &mut p.statement_timeout),
            ("lock_timeout", &raw.lock_timeout, &mut p.lock_timeout),
        ] {
            let field = format!("{at}.{name}");
            if let Some(v) = self.duration(&field, raw)? {
                if v.subsec_nanos() % 1_000_000 != 0 {
                    return Err(self.err(
                        &field,
                        format!("{v:?} is not a whole number of milliseconds (the server counts in ms)"),
                    ));
                }
                if v.as_millis() > SERVER_TIMEOUT_MAX_MS {
                    return Err(self.err(
                        &field,
                        format!("{v:?} is more than the server accepts ({SERVER_TIMEOUT_MAX_MS}ms, about 24 days)"),
                    ));
                }
                *slot = v;
            }
        }
        if raw.connect_timeout.is_some() {
            return Err(self.err(
                &format!("{at}.connect_timeout"),
                "is not a setting: the pool opens every connection (TCP, TLS, startup, authentication) \
                 within acquire_timeout, which bounds it (sqlx 0.8 has no separate connect timeout); \
                 set acquire_timeout instead",
            ));
        }
        Ok(p)
    }

    /// Parses an optional duration field ("5s", "500ms", "1m", "0").
    fn duration(&self, field: &str, value: &Option<String>) -> Result<Option<Duration>> {
        let Some(v) = self.opt(field, value)? else {
            return Ok(None);
        };
        humantime::parse_duration(&v)
            .map(Some)
            .map_err(|e| self.err(field, format!("{v:?} is not a duration like \"5s\" or \"500ms\": {e}")))
    }
}

/// Whether `name` is a simple identifier: a lowercase letter, then lowercase
/// letters, digits or `_`, at most 63 bytes.
pub fn is_simple_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
        && name.len() <= 63
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: impl AsRef<Path>) -> Result<Config> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigRead {
            file: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path, &|name| std::env::var(name).ok())
    }

    /// Parses and validates configuration text. `file` is used in error
    /// messages and to resolve relative migration folders; `env` looks up
    /// `${VAR}` references and the variables of [`PG_ENV`].
    ///
    /// Pass the process environment (as [`Config::load`] does) unless you
    /// know why not: sqlx, the router's driver, also reads `PGPASSWORD`,
    /// `PGSSLCERT` and `PGSSLKEY` from the process for a database the
    /// configuration gives none, so another `env` can make the router and
    /// the migrator authenticate differently.
    pub fn parse(text: &str, file: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let (position, message) = raw::syntax_error(text, &e);
            Error::ConfigSyntax {
                file: file.to_path_buf(),
                position,
                message,
            }
        })?;
        let check = Check { file, env };
        let master = check.database("master", &raw.master)?;
        if raw.shards.is_empty() {
            return Err(check.err("shards", "no shards are defined; add at least one [[shards]] table"));
        }
        let mut shards: Vec<ShardConfig> = Vec::with_capacity(raw.shards.len());
        let mut seen = BTreeMap::new();
        for (i, rs) in raw.shards.iter().enumerate() {
            let at = format!("shards[{i}]");
            if !is_simple_identifier(&rs.name) {
                return Err(check.err(
                    &format!("{at}.name"),
                    format!("{:?} is not a simple identifier (lowercase letter, then lowercase letters, digits or _; at most 63 bytes)", rs.name),
                ));
            }
            if let Some(first) = seen.insert(rs.name.clone(), i) {
                return Err(check.err(
                    &format!("{at}.name"),
                    format!("duplicate shard name {:?} (also shards[{first}])", rs.name),
                ));
            }
            let weight = match rs.weight {
                None => 1,
                Some(w) if w < 0 => {
                    return Err(check.err(
                        &format!("{at}.weight"),
                        format!("{w} is negative; use 0 for a shard that takes no new accounts"),
                    ))
                }
                Some(w) => u32::try_from(w)
                    .ok()
                    .filter(|w| *w <= 1000)
                    .ok_or_else(|| check.err(&format!("{at}.weight"), format!("{w} is too large (at most 1000)")))?,
            };
            let database = check.database(&at, &rs.database)?;
            if database.target.same_database(&master.target) {
                return Err(check.err(
                    &at,
                    format!(
                        "shard {:?} points to the same database as the master ({})",
                        rs.name, master.target
                    ),
                ));
            }
            if let Some(other) = shards
                .iter()
                .find(|s| s.database.target.same_database(&database.target))
            {
                return Err(check.err(
                    &at,
                    format!(
                        "shard {:?} points to the same database as shard {:?} ({})",
                        rs.name, other.name, database.target
                    ),
                ));
            }
            shards.push(ShardConfig {
                name: rs.name.clone(),
                weight,
                database,
            });
        }
        let base = file.parent().unwrap_or(Path::new("."));
        let folder = |field: &str, v: &Option<String>| -> Result<Option<PathBuf>> {
            Ok(check.opt(field, v)?.map(|p| base.join(p)))
        };
        let migrations = AppMigrations {
            master: folder("migrations.master", &raw.migrations.master)?,
            shard: folder("migrations.shard", &raw.migrations.shard)?,
        };
        let mut account_tables: Vec<AccountTable> = Vec::new();
        for (i, t) in raw.accounts.tables.iter().enumerate() {
            let at = format!("accounts.tables[{i}]");
            let table = check.expand(&format!("{at}.table"), &t.table, false)?;
            if !table.split('.').all(is_simple_identifier) || table.split('.').count() > 2 {
                return Err(check.err(
                    &format!("{at}.table"),
                    format!("{table:?} is not a table name (`name` or `schema.name`, simple identifiers)"),
                ));
            }
            let column = match &t.column {
                Some(c) => check.expand(&format!("{at}.column"), c, false)?,
                None => "account".to_string(),
            };
            if !is_simple_identifier(&column) {
                return Err(check.err(
                    &format!("{at}.column"),
                    format!("{column:?} is not a simple identifier"),
                ));
            }
            if account_tables.iter().any(|a| a.table == table) {
                return Err(check.err(&format!("{at}.table"), format!("{table} is declared twice")));
            }
            account_tables.push(AccountTable { table, column });
        }
        let placement = match raw.placement.strategy.as_deref() {
            None | Some("ring") => PlacementStrategy::Ring,
            Some("least_loaded") => PlacementStrategy::LeastLoaded,
            Some(other) => {
                return Err(check.err(
                    "placement.strategy",
                    format!(
                        "{other:?} is not a placement strategy (use {})",
                        PlacementStrategy::NAMES
                    ),
                ))
            }
        };
        Ok(Config {
            file: file.to_path_buf(),
            master,
            shards,
            migrations,
            account_tables,
            placement,
        })
    }

    /// Builds a configuration from database URLs (tests, benchmarks, embedding
    /// apps that keep their topology elsewhere). Shards get weight 1; the
    /// process environment fills in what the URLs leave unset, as for
    /// [`Config::load`] (see [`PG_ENV`]).
    pub fn from_urls(master: &str, shards: &[(&str, &str)]) -> Result<Config> {
        let mut text = format!("[master]\nurl = {}\n", toml_string(master));
        for (name, url) in shards {
            text.push_str(&format!(
                "[[shards]]\nname = {}\nurl = {}\n",
                toml_string(name),
                toml_string(url)
            ));
        }
        Self::parse(&text, Path::new(INLINE), &|name| std::env::var(name).ok())
    }

    /// The shard named `name`.
    pub fn shard(&self, name: &str) -> Result<&ShardConfig> {
        self.shards
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| Error::UnknownShard {
                shard: name.to_string(),
                known: self.shard_names().join(", "),
            })
    }

    /// The shard names in file order.
    pub fn shard_names(&self) -> Vec<String> {
        self.shards.iter().map(|s| s.name.clone()).collect()
    }
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}
