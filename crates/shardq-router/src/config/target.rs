//! [`Target`]: the address of one database (host, port, role, password,
//! dbname, sslmode, root certificate) and the connect options both drivers
//! are built from.
//!
//! `Check::database` in `mod.rs` fills it in from `shards.toml`; the router
//! calls [`Target::connect_options`] (sqlx), the migrator
//! [`Target::tokio_postgres_config`] together with the `tls` module's
//! connector. `Display` and `Debug` never show the password.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgSslMode};

use super::ssl_mode::SslMode;

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
    /// sslmode mapped as the `tls` module describes; pair them with
    /// `tls::tokio_postgres_connector`.
    pub fn tokio_postgres_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host).port(self.port).user(&self.user).dbname(&self.dbname);
        c.application_name("shardq-migrate");
        c.connect_timeout(Duration::from_secs(5));
        // TLS itself comes from `tls::tokio_postgres_connector`.
        c.ssl_mode(
            SslMode::parse(&self.sslmode)
                .unwrap_or(SslMode::Prefer)
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
