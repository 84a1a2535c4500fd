//! The crate's one error type.

use std::path::PathBuf;
use std::process::ExitStatus;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while finding, preparing or running a server.
///
/// Every message names what failed and where: the server, its port, the
/// binary, or the path involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `SHARDQ_PG_BIN` is set but does not point at usable server binaries.
    #[error("SHARDQ_PG_BIN={dir}: {reason}; point SHARDQ_PG_BIN at the directory that holds initdb, pg_ctl and postgres (e.g. /usr/lib/postgresql/15/bin)", dir = dir.display())]
    BinEnv {
        /// The value of `SHARDQ_PG_BIN`.
        dir: PathBuf,
        /// Why that directory was rejected.
        reason: String,
    },

    /// No PostgreSQL server binaries were found anywhere.
    #[error("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; looked at: {tried}. Install the distribution's postgresql package (e.g. `apt-get install postgresql`), set SHARDQ_PG_BIN to their directory, or run the servers with `docker compose up -d`")]
    BinNotFound {
        /// The places looked at, in order.
        tried: String,
    },

    /// Running as root, but there is no unprivileged user to run the servers as.
    #[error("running as root, and PostgreSQL refuses to run as root, but the system user `{user}` does not exist; create it (e.g. `useradd --system {user}`) or run as a normal user")]
    NoServerUser {
        /// The user name looked up.
        user: String,
    },

    /// The server user cannot enter or write a directory it needs.
    #[error("user `{user}` (which runs the servers) cannot use {path}: it cannot enter or write {blocked}; put the data under a directory every user can traverse (not under /root), e.g. the repository at /work/main or /tmp", path = path.display(), blocked = blocked.display())]
    NotTraversable {
        /// The user that runs the servers.
        user: String,
        /// The directory it needs.
        path: PathBuf,
        /// The first directory on the way it cannot enter (or `path` itself
        /// if it can enter but not write it).
        blocked: PathBuf,
    },

    /// A file system or OS operation failed.
    #[error("{action} {path}: {source}", path = path.display())]
    Io {
        /// What was being done ("create directory", "chown", ...).
        action: &'static str,
        /// The path (or address) involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A server binary could not be spawned at all.
    #[error("server {server}: could not run {binary}: {source}", binary = binary.display())]
    Spawn {
        /// The server name ("master", "shard_1", ...).
        server: String,
        /// The binary that could not be run.
        binary: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A server binary ran and failed.
    #[error("server {server}: {binary} {args} failed ({status}): {output}", binary = binary.display())]
    Command {
        /// The server name.
        server: String,
        /// The binary that failed.
        binary: PathBuf,
        /// Its arguments, space separated.
        args: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its trimmed stdout and stderr.
        output: String,
    },

    /// A server did not come up.
    #[error("server {server} on port {port} (data dir {data_dir}) did not start: {reason}\n--- last lines of {log} ---\n{log_tail}", data_dir = data_dir.display(), log = log.display())]
    Start {
        /// The server name.
        server: String,
        /// Its port.
        port: u16,
        /// Its data directory.
        data_dir: PathBuf,
        /// Its log file.
        log: PathBuf,
        /// What went wrong.
        reason: String,
        /// The last lines of the log file.
        log_tail: String,
    },

    /// A test bed has no server with that name.
    #[error("the test bed has no server named {name:?} (it has: {known})")]
    UnknownServer {
        /// The name asked for.
        name: String,
        /// The names it has.
        known: String,
    },

    /// A role name the test bed cannot put in pg_hba.conf or SQL unquoted
    /// (`Server::require_client_auth`,
    /// `bed::ensure_role`).
    #[error("role {role:?} is not a simple identifier (lowercase letters, digits and _)")]
    InvalidRole {
        /// The name given.
        role: String,
    },

    /// A server's processes could not be frozen or thawed
    /// (`Server::freeze`, `Server::thaw`).
    #[error("server {server}: cannot {action} it: {reason}")]
    Freeze {
        /// The server name.
        server: String,
        /// `freeze` or `thaw`.
        action: &'static str,
        /// What went wrong, naming the process.
        reason: String,
    },

    /// A server's CPU time could not be read consistently: its processes
    /// kept exiting while they were read (`Server::cpu_time`).
    #[error("cannot read {what}")]
    Unsettled {
        /// What was read, naming the server's data directory.
        what: String,
    },

    /// A server's clock cannot be shifted: libfaketime is not installed
    /// (`Server::restart_clock_ahead`).
    #[error("server {server}: cannot shift its clock: libfaketime is not installed (looked for {looked}; on Debian: apt-get install libfaketime)")]
    NoFaketime {
        /// The server name.
        server: String,
        /// The paths looked at.
        looked: String,
    },

    /// PgBouncer is not installed (`PgBouncer::start`).
    #[error("pgbouncer not found (looked for {looked}; on Debian: apt-get install pgbouncer)")]
    NoPgBouncer {
        /// The paths looked at.
        looked: String,
    },

    /// PgBouncer did not come up.
    #[error("pgbouncer on port {port} in front of server {server} did not start: {reason}\n--- last lines of {log} ---\n{log_tail}", log = log.display())]
    PgBouncerStart {
        /// The server it fronts.
        server: String,
        /// Its port.
        port: u16,
        /// Its log file.
        log: PathBuf,
        /// What went wrong.
        reason: String,
        /// The last lines of the log file.
        log_tail: String,
    },

    /// A test certificate could not be generated.
    #[error("generating a test certificate: {message}")]
    Certificate {
        /// What failed.
        message: String,
    },

    /// A SQL statement against a server failed.
    #[error("server {server}: {action} via {url} failed: {source}")]
    Sql {
        /// The server name.
        server: String,
        /// What was being done.
        action: String,
        /// The URL connected to.
        url: String,
        /// The underlying error.
        #[source]
        source: sqlx::Error,
    },
}

impl Error {
    /// Builds an [`Error::Io`].
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
