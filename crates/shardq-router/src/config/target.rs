//! [`Target`]: the address of one database (host, port, role, password,
//! dbname, TLS settings, startup options) and the connect options both
//! drivers are built from.
//!
//! `Check::database` in `mod.rs` fills it in from `shards.toml` and the
//! libpq environment variables; the router calls [`Target::connect_options`]
//! (sqlx), the migrator [`Target::tokio_postgres_config`] together with
//! `tls::tokio_postgres_connector`. What the server's certificate must pass
//! is [`Target::server_check`], for both. `Display` and `Debug` never show
//! the password, nor does the `Debug` of [`ConnectOptions`] (sqlx's own
//! `Debug` of its options prints it) or of the tokio-postgres config.
//!
//! sqlx cannot be told which roots to trust (it always adds the public web
//! roots) nor be given a rustls configuration, so a target whose
//! certificate is verified, or that presents a client certificate, reaches
//! sqlx through the `tls` module's relay: a local socket behind which that
//! module makes the TLS connection exactly as it does for the migrator.
//! This is the one use of the `tls` module from this folder.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgSslMode};

use super::ssl_mode::{ServerCheck, SslMode, SslRootCert};

/// Connection settings of one database, resolved from a URL, fields and
/// the environment.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Role to connect as.
    pub user: String,
    /// Password, if any (from the file, its URL or `PGPASSWORD`). Never
    /// printed.
    pub password: Option<String>,
    /// Database name.
    pub dbname: String,
    /// Whether TLS is used and what it verifies, with
    /// [`sslrootcert`](Self::sslrootcert): see [`Target::server_check`].
    pub sslmode: SslMode,
    /// The roots the server's certificate is verified against: a PEM file,
    /// or `system`.
    pub sslrootcert: Option<SslRootCert>,
    /// Client certificate (PEM, the chain up to but not including the
    /// root), presented when the server asks; set with [`sslkey`](Self::sslkey).
    pub sslcert: Option<PathBuf>,
    /// The client certificate's private key (PEM; readable by its owner
    /// only, as libpq requires).
    pub sslkey: Option<PathBuf>,
    /// Server settings sent at connect, libpq's `options` (from
    /// `PGOPTIONS`), e.g. `-c search_path=app`.
    pub options: Option<String>,
}

/// The sqlx connect options of a [`Target`], from [`Target::connect_options`].
///
/// They hold the password, and sqlx's `Debug` of `PgConnectOptions` prints
/// it; this wrapper's `Debug` shows only the address. Read them through
/// `Deref`; [`ConnectOptions::into_inner`] hands them to sqlx.
#[derive(Clone)]
pub struct ConnectOptions {
    /// What sqlx connects with.
    options: PgConnectOptions,
    /// The target's address without the password, for `Debug`.
    address: String,
}

impl ConnectOptions {
    /// The options themselves, to pass to sqlx (or to change with sqlx's
    /// builder methods). Their `Debug` prints the password: never log them.
    pub fn into_inner(self) -> PgConnectOptions {
        self.options
    }
}

impl std::ops::Deref for ConnectOptions {
    type Target = PgConnectOptions;

    fn deref(&self) -> &PgConnectOptions {
        &self.options
    }
}

impl From<ConnectOptions> for PgConnectOptions {
    fn from(o: ConnectOptions) -> PgConnectOptions {
        o.options
    }
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConnectOptions({})", self.address)
    }
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
    /// What the server's certificate must pass, following libpq (see
    /// [`ServerCheck::of`]). A target loaded from a configuration is always
    /// `Ok`; one changed in code may not be, and then both drivers refuse
    /// to connect with this message.
    pub fn server_check(&self) -> Result<ServerCheck<'_>, String> {
        ServerCheck::of(self.sslmode, self.sslrootcert.as_ref())
    }

    /// The client certificate and its key, when both are set.
    pub fn client_cert(&self) -> Option<(&Path, &Path)> {
        match (&self.sslcert, &self.sslkey) {
            (Some(cert), Some(key)) => Some((cert, key)),
            _ => None,
        }
    }

    /// Whether the router's driver reaches this database through the `tls`
    /// relay: whenever TLS may be used and sqlx would not do what
    /// [`Target::server_check`] says (it verifies, or is invalid) or a
    /// client certificate is set.
    pub(crate) fn relayed(&self) -> bool {
        self.sslmode.uses_tls()
            && (self.server_check().map_or(true, ServerCheck::verifies)
                || self.sslcert.is_some()
                || self.sslkey.is_some())
    }

    /// Connect options for sqlx (the router, the job engine).
    ///
    /// They hold the password (sqlx authenticates with it); the wrapper's
    /// `Debug` does not print it, sqlx's `Debug` of the inner options does.
    /// A target that verifies the server's certificate or presents a client
    /// certificate gets options that connect to the `tls` relay's local
    /// socket; the relay connects to `host:port` with the same TLS client as
    /// the migrator.
    pub fn connect_options(&self) -> ConnectOptions {
        ConnectOptions {
            options: self.sqlx_options(),
            address: self.to_string(),
        }
    }

    fn sqlx_options(&self) -> PgConnectOptions {
        let mut o = self
            .sqlx_base()
            .host(&self.host)
            .port(self.port)
            .username(&self.user)
            .database(&self.dbname)
            .application_name("shardq");
        if let Some(p) = &self.password {
            o = o.password(p);
        }
        if !self.relayed() {
            let mode = match self.sslmode {
                SslMode::Disable | SslMode::Allow => PgSslMode::Disable,
                SslMode::Prefer => PgSslMode::Prefer,
                SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
            };
            return o.ssl_mode(mode);
        }
        let socket = crate::tls::relay_socket_dir(self).unwrap_or_else(|e| {
            // Never fall back to sqlx's own, weaker, verification: the
            // connections fail (no such socket) and this says why.
            tracing::error!(database = %self, error = %e, "cannot start the TLS relay");
            std::env::temp_dir().join("shardq-tls-relay-failed-to-start")
        });
        o.socket(socket).ssl_mode(PgSslMode::Disable)
    }

    /// sqlx's starting options. sqlx reads `PGPASSWORD`, `PGSSLCERT`,
    /// `PGSSLKEY`, `PGSSLROOTCERT` and `PGOPTIONS` from the process itself;
    /// every one of those it could act on is either set here from the
    /// target or unused (TLS goes through the relay when certificates are
    /// involved), except `PGOPTIONS`, which it appends: the target's
    /// `options` are added unless they are that same text.
    fn sqlx_base(&self) -> PgConnectOptions {
        let Some(options) = self
            .options
            .as_deref()
            .filter(|o| std::env::var("PGOPTIONS").ok().as_deref() != Some(*o))
        else {
            return PgConnectOptions::new_without_pgpass();
        };
        let encoded: String = url::form_urlencoded::byte_serialize(options.as_bytes()).collect();
        PgConnectOptions::from_str(&format!("postgres://localhost/?options={encoded}")).unwrap_or_else(|e| {
            tracing::warn!(database = %self, error = %e, "PGOPTIONS not passed to the router's connections");
            PgConnectOptions::new_without_pgpass()
        })
    }

    /// Connect settings for tokio-postgres (used by the migrator), with the
    /// sslmode mapped as the `tls` module describes; pair them with
    /// `tls::tokio_postgres_connector`, which verifies what
    /// [`Target::server_check`] says and presents the client certificate.
    pub fn tokio_postgres_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host).port(self.port).user(&self.user).dbname(&self.dbname);
        c.application_name("shardq-migrate");
        c.connect_timeout(Duration::from_secs(5));
        // TLS itself comes from `tls::tokio_postgres_connector`.
        c.ssl_mode(self.sslmode.tokio_postgres());
        if let Some(p) = &self.password {
            c.password(p);
        }
        if let Some(options) = &self.options {
            c.options(options);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_debug_or_display_of_a_target_or_its_connect_settings_prints_the_password() {
        let target = Target {
            host: "127.0.0.1".into(),
            port: 5440,
            user: "app".into(),
            password: Some("hunter2".into()),
            dbname: "shardq".into(),
            sslmode: SslMode::Disable,
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            options: None,
        };
        let options = target.connect_options();
        assert!(
            format!("{:?}", options.clone().into_inner()).contains("hunter2"),
            "sqlx's own Debug prints it, which is why the wrapper exists"
        );
        for shown in [
            target.to_string(),
            format!("{target:?}"),
            format!("{target:#?}"),
            format!("{options:?}"),
            format!("{options:#?}"),
            format!("{:?}", target.tokio_postgres_config()),
        ] {
            assert!(!shown.contains("hunter2"), "password printed: {shown}");
        }
        assert_eq!(
            format!("{options:?}"),
            "ConnectOptions(postgres://app@127.0.0.1:5440/shardq)"
        );
        assert_eq!(options.get_port(), 5440, "the options are readable through Deref");
    }
}
