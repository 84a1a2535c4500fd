//! `shards.toml`: the topology (one master, one or more shards), parsed,
//! expanded (`${VAR}`, `${VAR:-default}`) and validated.
//!
//! Every error names the file, the field and what is wrong; nothing gets a
//! silent default except the documented ones (port 5432, user `postgres`,
//! dbname `shardq`, weight 1, the pool defaults of [`PoolConfig`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgSslMode};

use crate::error::{Error, Result};

/// The default configuration file, relative to the working directory.
pub const DEFAULT_CONFIG_FILE: &str = "shards.toml";

/// Where a configuration came from, for error messages.
const INLINE: &str = "<inline>";

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
}

/// Connection settings of one database, resolved from a URL and/or fields.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Role to connect as.
    pub user: String,
    /// Password, if any. Never printed.
    pub password: Option<String>,
    /// Database name.
    pub dbname: String,
    /// libpq sslmode (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`).
    pub sslmode: String,
    /// Root certificate for `verify-ca` / `verify-full`.
    pub sslrootcert: Option<PathBuf>,
}

/// Connection pool settings of one database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Most connections the pool opens (default 10).
    pub max_connections: u32,
    /// Connections kept open when idle (default 0).
    pub min_connections: u32,
    /// How long a caller waits for a connection (default 5 s).
    pub acquire_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_connections: 10,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(5),
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

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Target({self})")
    }
}

impl std::fmt::Display for Target {
    /// The address as a URL without the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "postgres://{}@{}:{}/{}",
            self.user, self.host, self.port, self.dbname
        )
    }
}

impl Target {
    /// Connect options for sqlx.
    pub fn connect_options(&self) -> PgConnectOptions {
        let mut o = PgConnectOptions::new_without_pgpass()
            .host(&self.host)
            .port(self.port)
            .username(&self.user)
            .database(&self.dbname)
            .application_name("shardq")
            .ssl_mode(PgSslMode::from_str(&self.sslmode).unwrap_or(PgSslMode::Prefer));
        if let Some(p) = &self.password {
            o = o.password(p);
        }
        if let Some(cert) = &self.sslrootcert {
            o = o.ssl_root_cert(cert);
        }
        o
    }

    /// Connect settings for tokio-postgres (used by the migrator), with the
    /// sslmode mapped as [`crate::tls`] describes; pair them with
    /// [`crate::tls::tokio_postgres_connector`].
    pub fn tokio_postgres_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host).port(self.port).user(&self.user).dbname(&self.dbname);
        c.application_name("shardq-migrate");
        c.connect_timeout(Duration::from_secs(5));
        // TLS itself comes from `tls::tokio_postgres_connector`.
        c.ssl_mode(
            crate::tls::SslMode::parse(&self.sslmode)
                .unwrap_or(crate::tls::SslMode::Prefer)
                .tokio_postgres(),
        );
        if let Some(p) = &self.password {
            c.password(p);
        }
        c
    }

    /// Whether two targets name the same database (host, port, dbname),
    /// treating `localhost`, `127.0.0.1` and `::1` alike.
    pub fn same_database(&self, other: &Target) -> bool {
        fn norm(h: &str) -> &str {
            match h {
                "localhost" | "127.0.0.1" | "::1" => "loopback",
                h => h,
            }
        }
        norm(&self.host) == norm(&other.host) && self.port == other.port && self.dbname == other.dbname
    }
}

// ---- raw, as written in the file -------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    master: RawDatabase,
    #[serde(default)]
    shards: Vec<RawShard>,
    #[serde(default)]
    migrations: RawMigrations,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMigrations {
    master: Option<String>,
    shard: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShard {
    name: String,
    weight: Option<i64>,
    #[serde(flatten)]
    database: RawDatabase,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: Option<String>,
    host: Option<String>,
    port: Option<i64>,
    user: Option<String>,
    password: Option<String>,
    dbname: Option<String>,
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    #[serde(default)]
    pool: RawPool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPool {
    max_connections: Option<i64>,
    min_connections: Option<i64>,
    acquire_timeout: Option<String>,
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

    /// Expands `${VAR}` and `${VAR:-default}` in a field's value.
    fn expand(&self, field: &str, value: &str) -> Result<String> {
        let mut out = String::with_capacity(value.len());
        let mut rest = value;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| self.err(field, format!("unterminated `${{` in {value:?}")))?;
            let inner = &after[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(self.err(field, format!("`${{{inner}}}` is not a valid variable reference")));
            }
            match ((self.env)(name), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(self.err(
                        field,
                        format!("environment variable {name} is not set and `${{{name}}}` has no default (write `${{{name}:-value}}` to give one)"),
                    ))
                }
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    fn opt(&self, field: &str, value: &Option<String>) -> Result<Option<String>> {
        value.as_deref().map(|v| self.expand(field, v)).transpose()
    }

    fn database(&self, at: &str, raw: &RawDatabase) -> Result<DatabaseConfig> {
        let f = |name: &str| format!("{at}.{name}");
        let mut t = Target {
            host: "127.0.0.1".into(),
            port: 5432,
            user: "postgres".into(),
            password: None,
            dbname: "shardq".into(),
            sslmode: "prefer".into(),
            sslrootcert: None,
        };
        if let Some(url) = self.opt(&f("url"), &raw.url)? {
            self.apply_url(&f("url"), &url, &mut t)?;
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
            t.sslmode = s;
        }
        if let Some(c) = self.opt(&f("sslrootcert"), &raw.sslrootcert)? {
            t.sslrootcert = Some(PathBuf::from(c));
        }
        if PgSslMode::from_str(&t.sslmode).is_err() {
            return Err(self.err(
                &f("sslmode"),
                format!(
                    "{:?} is not one of disable, allow, prefer, require, verify-ca, verify-full",
                    t.sslmode
                ),
            ));
        }
        for (name, value) in [("host", &t.host), ("user", &t.user), ("dbname", &t.dbname)] {
            if value.is_empty() {
                return Err(self.err(&f(name), "must not be empty"));
            }
        }
        Ok(DatabaseConfig {
            target: t,
            pool: self.pool(&f("pool"), &raw.pool)?,
        })
    }

    fn apply_url(&self, field: &str, url: &str, t: &mut Target) -> Result<()> {
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
            t.host = h.trim_start_matches('[').trim_end_matches(']').to_string();
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
                "sslmode" => t.sslmode = v.into_owned(),
                "sslrootcert" => t.sslrootcert = Some(PathBuf::from(v.into_owned())),
                other => {
                    return Err(self.err(
                        field,
                        format!("unsupported URL parameter {other:?} (supported: sslmode, sslrootcert)"),
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
        if let Some(v) = &raw.acquire_timeout {
            let field = format!("{at}.acquire_timeout");
            let v = self.expand(&field, v)?;
            p.acquire_timeout = humantime::parse_duration(&v)
                .map_err(|e| self.err(&field, format!("{v:?} is not a duration like \"5s\" or \"500ms\": {e}")))?;
        }
        Ok(p)
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
    /// `${VAR}` references.
    pub fn parse(text: &str, file: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| Error::ConfigSyntax {
            file: file.to_path_buf(),
            source: Box::new(e),
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
        Ok(Config {
            file: file.to_path_buf(),
            master,
            shards,
            migrations,
        })
    }

    /// Builds a configuration from database URLs (tests, benchmarks, embedding
    /// apps that keep their topology elsewhere). Shards get weight 1.
    pub fn from_urls(master: &str, shards: &[(&str, &str)]) -> Result<Config> {
        let mut text = format!("[master]\nurl = {}\n", toml_string(master));
        for (name, url) in shards {
            text.push_str(&format!(
                "[[shards]]\nname = {}\nurl = {}\n",
                toml_string(name),
                toml_string(url)
            ));
        }
        Self::parse(&text, Path::new(INLINE), &|_| None)
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

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "shards.toml";

    /// A valid master table followed by `shards`.
    fn with_shards(shards: &str) -> String {
        format!("[master]\nurl = \"postgres://postgres@127.0.0.1:5440/shardq\"\n\n{shards}")
    }

    /// Two valid shards on ports 5441 and 5442.
    const TWO: &str = r#"
[[shards]]
name = "shard_1"
port = 5441

[[shards]]
name = "shard_2"
port = 5442
"#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse_with(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config> {
        Config::parse(text, Path::new(FILE), env)
    }

    fn parse(text: &str) -> Result<Config> {
        parse_with(text, &no_env)
    }

    /// The error message of a config that must be rejected; asserts it names
    /// the file and every one of `needles`.
    fn rejected(text: &str, needles: &[&str]) -> String {
        rejected_with(text, &no_env, needles)
    }

    fn rejected_with(text: &str, env: &dyn Fn(&str) -> Option<String>, needles: &[&str]) -> String {
        let err = match parse_with(text, env) {
            Ok(c) => panic!("accepted a config that should be rejected:\n{text}\n=> {c:?}"),
            Err(e) => e,
        };
        let msg = err.to_string();
        assert!(msg.contains(FILE), "error does not name the file: {msg}");
        for n in needles {
            assert!(msg.contains(n), "error does not mention {n:?}: {msg}");
        }
        msg
    }

    #[test]
    fn a_valid_config_parses_with_documented_defaults() {
        let c = parse(&with_shards(TWO)).unwrap();
        assert_eq!(c.file, Path::new(FILE));
        assert_eq!(c.shard_names(), ["shard_1", "shard_2"]);
        let s = &c.shards[0];
        assert_eq!(s.weight, 1);
        assert_eq!(s.database.target.host, "127.0.0.1");
        assert_eq!(s.database.target.port, 5441);
        assert_eq!(s.database.target.user, "postgres");
        assert_eq!(s.database.target.dbname, "shardq");
        assert_eq!(s.database.target.password, None);
        assert_eq!(s.database.pool, PoolConfig::default());
        assert!(c.shard("shard_2").is_ok());
        assert!(matches!(c.shard("nope"), Err(Error::UnknownShard { .. })));
    }

    #[test]
    fn unknown_top_level_key_is_rejected() {
        let text = format!("colour = \"blue\"\n{}", with_shards(TWO));
        let msg = rejected(&text, &["unknown field", "colour"]);
        assert!(matches!(parse(&text), Err(Error::ConfigSyntax { .. })), "{msg}");
    }

    #[test]
    fn unknown_key_in_master_is_rejected() {
        let text = format!("[master]\nport = 5440\nhots = \"db\"\n{TWO}");
        rejected(&text, &["unknown field", "hots"]);
    }

    #[test]
    fn unknown_key_in_a_shard_is_rejected() {
        let text = with_shards("[[shards]]\nname = \"shard_1\"\nport = 5441\nwieght = 2\n");
        rejected(&text, &["unknown field", "wieght"]);
    }

    #[test]
    fn unknown_key_in_a_pool_is_rejected() {
        rejected(
            &with_shards("[[shards]]\nname = \"shard_1\"\nport = 5441\npool = { max_conections = 5 }\n"),
            &["unknown field", "max_conections"],
        );
        rejected(
            &format!("[master]\nport = 5440\n[master.pool]\nmax_size = 3\n{TWO}"),
            &["unknown field", "max_size"],
        );
    }

    #[test]
    fn duplicate_shard_names_are_rejected() {
        let text =
            with_shards("[[shards]]\nname = \"shard_1\"\nport = 5441\n[[shards]]\nname = \"shard_1\"\nport = 5442\n");
        rejected(&text, &["shards[1].name", "duplicate", "shard_1", "shards[0]"]);
    }

    #[test]
    fn a_config_without_shards_is_rejected() {
        rejected("[master]\nport = 5440\n", &["shards", "no shards"]);
        rejected("shards = []\n[master]\nport = 5440\n", &["shards", "no shards"]);
    }

    #[test]
    fn negative_weight_is_rejected_and_zero_accepted() {
        let text = with_shards(
            "[[shards]]\nname = \"shard_1\"\nport = 5441\n[[shards]]\nname = \"shard_2\"\nport = 5442\nweight = -1\n",
        );
        rejected(&text, &["shards[1].weight", "-1", "negative"]);
        let zero = with_shards(
            "[[shards]]\nname = \"shard_1\"\nport = 5441\n[[shards]]\nname = \"shard_2\"\nport = 5442\nweight = 0\n",
        );
        let c = parse(&zero).unwrap();
        assert_eq!(c.shards[1].weight, 0);
        assert_eq!(c.shards[0].weight, 1);
    }

    #[test]
    fn a_shard_on_the_master_database_is_rejected() {
        // Same fields.
        rejected(
            &with_shards("[[shards]]\nname = \"shard_1\"\nport = 5440\n"),
            &["shards[0]", "shard_1", "same database as the master"],
        );
        // localhost vs 127.0.0.1.
        rejected(
            &with_shards("[[shards]]\nname = \"shard_1\"\nhost = \"localhost\"\nport = 5440\n"),
            &["shards[0]", "shard_1", "same database as the master"],
        );
        // url vs structured fields.
        rejected(
            "[master]\nhost = \"localhost\"\nport = 5440\ndbname = \"app\"\n\
             [[shards]]\nname = \"shard_1\"\nurl = \"postgres://other@127.0.0.1:5440/app\"\n",
            &["shards[0]", "shard_1", "same database as the master"],
        );
        // A different database on the master's server is fine.
        let c = parse(&with_shards(
            "[[shards]]\nname = \"shard_1\"\nport = 5440\ndbname = \"s1\"\n",
        ))
        .unwrap();
        assert_eq!(c.shards[0].database.target.dbname, "s1");
    }

    #[test]
    fn two_shards_on_one_database_are_rejected() {
        rejected(
            &with_shards(
                "[[shards]]\nname = \"shard_1\"\nport = 5441\n\
                 [[shards]]\nname = \"shard_2\"\nurl = \"postgres://localhost:5441/shardq\"\n",
            ),
            &["shards[1]", "shard_2", "same database as shard \"shard_1\""],
        );
    }

    #[test]
    fn env_vars_are_expanded() {
        let env = |name: &str| match name {
            "PGHOST" => Some("db.internal".to_string()),
            "PGPASS" => Some("s3cret".to_string()),
            _ => None,
        };
        let text = with_shards(
            "[[shards]]\nname = \"shard_1\"\nhost = \"${PGHOST}\"\nport = 5441\n\
             password = \"${PGPASS}\"\ndbname = \"app_${PGHOST:-x}\"\n",
        );
        let c = parse_with(&text, &env).unwrap();
        let t = &c.shards[0].database.target;
        assert_eq!(t.host, "db.internal");
        assert_eq!(t.password.as_deref(), Some("s3cret"));
        assert_eq!(t.dbname, "app_db.internal");
    }

    #[test]
    fn env_default_is_used_when_unset() {
        let text = with_shards(
            "[[shards]]\nname = \"shard_1\"\nport = 5441\nuser = \"${PGUSER_UNSET:-app}\"\n\
             password = \"${PGPASS_UNSET:-}\"\npool = { acquire_timeout = \"${T:-250ms}\" }\n",
        );
        let c = parse(&text).unwrap();
        let d = &c.shards[0].database;
        assert_eq!(d.target.user, "app");
        assert_eq!(d.target.password, None, "an empty default means no password");
        assert_eq!(d.pool.acquire_timeout, Duration::from_millis(250));
        // A set variable wins over the default.
        let env = |n: &str| (n == "PGUSER_UNSET").then(|| "set".to_string());
        let c = parse_with(&text, &env).unwrap();
        assert_eq!(c.shards[0].database.target.user, "set");
    }

    #[test]
    fn unset_env_var_without_default_is_an_error() {
        let text = with_shards("[[shards]]\nname = \"shard_1\"\nport = 5441\npassword = \"${SHARD1_PASSWORD}\"\n");
        rejected(&text, &["shards[0].password", "SHARD1_PASSWORD", "not set"]);
    }

    #[test]
    fn the_password_is_never_printed() {
        let env = |n: &str| (n == "PW").then(|| "hunter2-env".to_string());
        let text = "[master]\nurl = \"postgres://app:hunter2-url@127.0.0.1:5440/shardq\"\n\
                    [[shards]]\nname = \"shard_1\"\nport = 5441\npassword = \"${PW}\"\n";
        let c = parse_with(text, &env).unwrap();
        let m = &c.master.target;
        let s = &c.shards[0].database.target;
        assert_eq!(m.password.as_deref(), Some("hunter2-url"));
        assert_eq!(s.password.as_deref(), Some("hunter2-env"));
        for shown in [
            m.to_string(),
            format!("{m:?}"),
            s.to_string(),
            format!("{s:?}"),
            format!("{c:?}"),
        ] {
            assert!(!shown.contains("hunter2"), "password printed: {shown}");
        }
        assert_eq!(m.to_string(), "postgres://app@127.0.0.1:5440/shardq");
    }

    #[test]
    fn shard_names_must_be_simple_identifiers() {
        let long = "a".repeat(64);
        for bad in ["Shard-1", "1abc", "a:b", "", "shard 1", "_x", "ünï", long.as_str()] {
            let text = with_shards(&format!("[[shards]]\nname = {}\nport = 5441\n", toml_string(bad)));
            rejected(
                &text,
                &["shards[0].name", "not a simple identifier", &format!("{bad:?}")],
            );
        }
        for good in ["a", "shard_1", "eu_west_2", "a".repeat(63).as_str()] {
            let text = with_shards(&format!("[[shards]]\nname = {}\nport = 5441\n", toml_string(good)));
            assert_eq!(parse(&text).unwrap().shards[0].name, good);
        }
    }

    #[test]
    fn url_parts_are_parsed_and_decoded() {
        let text = "[master]\nurl = \"postgres://u:p%40ss@db.example:6000/app?sslmode=require\"\n\
                    [[shards]]\nname = \"shard_1\"\nport = 5441\n";
        let t = parse(text).unwrap().master.target;
        assert_eq!(t.host, "db.example");
        assert_eq!(t.port, 6000);
        assert_eq!(t.user, "u");
        assert_eq!(t.password.as_deref(), Some("p@ss"));
        assert_eq!(t.dbname, "app");
        assert_eq!(t.sslmode, "require");
        // postgresql:// is accepted too, and missing parts keep their defaults.
        let t = parse("[master]\nurl = \"postgresql://db.example\"\n[[shards]]\nname = \"s\"\n")
            .unwrap()
            .master
            .target;
        assert_eq!(
            (t.host.as_str(), t.port, t.user.as_str()),
            ("db.example", 5432, "postgres")
        );
        assert_eq!((t.dbname.as_str(), t.password.as_deref()), ("shardq", None));
    }

    #[test]
    fn url_userinfo_keeps_plus_and_ampersand() {
        // `+` and `&` are literal in a URL's userinfo and path (only form
        // encoding gives them a meaning).
        let text = "[master]\nurl = \"postgres://a+b:x+y&z=w@db.example/my+db\"\n\
                    [[shards]]\nname = \"shard_1\"\nport = 5441\n";
        let t = parse(text).unwrap().master.target;
        assert_eq!(t.user, "a+b");
        assert_eq!(t.password.as_deref(), Some("x+y&z=w"));
        assert_eq!(t.dbname, "my+db");
    }

    #[test]
    fn structured_fields_override_url_parts() {
        let text = "[master]\nurl = \"postgres://u:pw@db.example:6000/app?sslmode=require\"\n\
                    host = \"other.example\"\nport = 7000\nuser = \"v\"\npassword = \"pw2\"\n\
                    dbname = \"app2\"\nsslmode = \"disable\"\n\
                    [[shards]]\nname = \"shard_1\"\nport = 5441\n";
        let t = parse(text).unwrap().master.target;
        assert_eq!(t.host, "other.example");
        assert_eq!(t.port, 7000);
        assert_eq!(t.user, "v");
        assert_eq!(t.password.as_deref(), Some("pw2"));
        assert_eq!(t.dbname, "app2");
        assert_eq!(t.sslmode, "disable");
    }

    #[test]
    fn a_url_with_another_scheme_is_rejected() {
        let msg = rejected(
            "[master]\nurl = \"mysql://u:topsecret@db.example/app\"\n[[shards]]\nname = \"s\"\n",
            &["master.url", "scheme", "mysql://"],
        );
        assert!(!msg.contains("topsecret"), "the URL's password was echoed: {msg}");
    }

    #[test]
    fn a_bad_sslmode_is_rejected() {
        rejected(
            &with_shards("[[shards]]\nname = \"shard_1\"\nport = 5441\nsslmode = \"sometimes\"\n"),
            &["shards[0].sslmode", "\"sometimes\"", "verify-full"],
        );
        rejected(
            &with_shards("[[shards]]\nname = \"shard_1\"\nurl = \"postgres://h:5441/db?sslmode=bogus\"\n"),
            &["shards[0]", "sslmode", "\"bogus\""],
        );
    }

    #[test]
    fn a_bad_port_is_rejected() {
        for p in ["0", "-5", "65536"] {
            rejected(
                &with_shards(&format!("[[shards]]\nname = \"shard_1\"\nport = {p}\n")),
                &["shards[0].port", p, "not a TCP port"],
            );
        }
        rejected(
            &with_shards("[[shards]]\nname = \"shard_1\"\nurl = \"postgres://u:pw@h:99999/db\"\n"),
            &["shards[0].url", "not a valid URL"],
        );
    }

    #[test]
    fn pool_acquire_timeout_is_a_duration() {
        let c = parse(&with_shards(
            "[[shards]]\nname = \"shard_1\"\nport = 5441\npool = { acquire_timeout = \"5s\", max_connections = 3, min_connections = 1 }\n",
        ))
        .unwrap();
        let pool = &c.shards[0].database.pool;
        assert_eq!(pool.acquire_timeout, Duration::from_secs(5));
        assert_eq!((pool.max_connections, pool.min_connections), (3, 1));
        rejected(
            &with_shards("[[shards]]\nname = \"shard_1\"\nport = 5441\npool = { acquire_timeout = \"five\" }\n"),
            &["shards[0].pool.acquire_timeout", "\"five\"", "not a duration"],
        );
    }

    #[test]
    fn pool_min_above_max_is_rejected() {
        rejected(
            &with_shards(
                "[[shards]]\nname = \"shard_1\"\nport = 5441\npool = { max_connections = 2, min_connections = 3 }\n",
            ),
            &["shards[0].pool.min_connections", "3 is more than max_connections (2)"],
        );
        rejected(
            &format!("[master]\nport = 5440\n[master.pool]\nmin_connections = 11\n{TWO}"),
            &["master.pool.min_connections", "more than max_connections (10)"],
        );
    }

    #[test]
    fn the_committed_shards_toml_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shards.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let c = Config::parse(&text, Path::new(path), &no_env).unwrap();
        assert_eq!(c.master.target.host, "127.0.0.1");
        assert_eq!(c.master.target.port, 5440);
        assert_eq!(c.master.target.user, "postgres");
        assert_eq!(c.master.target.password, None);
        assert_eq!(c.shard_names(), ["shard_1", "shard_2", "shard_3"]);
        let ports: Vec<u16> = c.shards.iter().map(|s| s.database.target.port).collect();
        assert_eq!(ports, [5441, 5442, 5443]);
        assert!(c
            .shards
            .iter()
            .all(|s| s.weight == 1 && s.database.pool.max_connections == 20));
        // The password comes from the environment when it is set.
        let env = |n: &str| (n == "SHARDQ_PGPASSWORD").then(|| "pw".to_string());
        let c = Config::parse(&text, Path::new(path), &env).unwrap();
        assert_eq!(c.shards[2].database.target.password.as_deref(), Some("pw"));
    }

    #[test]
    fn from_urls_builds_an_inline_config() {
        let c = Config::from_urls(
            "postgres://postgres@127.0.0.1:5440/m",
            &[
                ("a", "postgres://127.0.0.1:5441/x"),
                ("b", "postgres://127.0.0.1:5442/x"),
            ],
        )
        .unwrap();
        assert_eq!(c.shard_names(), ["a", "b"]);
        let err = Config::from_urls("postgres://127.0.0.1:5440/m", &[("Bad", "postgres://h/x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("<inline>") && err.contains("shards[0].name"), "{err}");
    }
}
