//! [`PgBouncer`]: a real PgBouncer (the distribution's `pgbouncer`) in
//! transaction mode in front of one test server, run as the server user,
//! with its config, userlist, log and pid file in its own temp dir. It
//! trusts the test bed's `postgres` user (listed in its userlist, as
//! PgBouncer requires even for `trust`), accepts sqlx's startup parameters
//! and keeps at most 20 server connections per database and user (or as
//! many as [`PgBouncer::start_with_pool_size`] says).
//! Dropping it kills it.

use std::fmt::Write as _;
use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::bed::free_port;
use crate::error::{Error, Result};
use crate::server::{log_tail, Server};
use crate::server_user::ServerUser;

/// Where `pgbouncer` is looked for besides `$PATH`.
const PGBOUNCER_PATHS: [&str; 2] = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"];

/// How long PgBouncer may take to accept TCP connections.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Server connections PgBouncer keeps per database and user.
pub const POOL_SIZE: u32 = 20;

/// A running PgBouncer in transaction mode in front of one server.
#[derive(Debug)]
pub struct PgBouncer {
    /// The server it fronts, for messages.
    server: String,
    /// Its port on 127.0.0.1.
    port: u16,
    /// Its process.
    child: Child,
    /// Its config, userlist and log (removed on drop).
    dir: tempfile::TempDir,
}

impl PgBouncer {
    /// Starts PgBouncer in transaction mode in front of `server` (every
    /// database of it, by the same name) and waits until it accepts TCP
    /// connections.
    pub fn start(server: &Server) -> Result<PgBouncer> {
        PgBouncer::start_with_pool_size(server, POOL_SIZE)
    }

    /// Like [`PgBouncer::start`], keeping at most `pool_size` server
    /// connections per database and user: with fewer than its clients,
    /// clients share server connections transaction by transaction.
    pub fn start_with_pool_size(server: &Server, pool_size: u32) -> Result<PgBouncer> {
        let binary = find()?;
        let user = ServerUser::resolve()?;
        let dir = tempfile::Builder::new()
            .prefix("shardq-pgbouncer-")
            .tempdir()
            .map_err(|e| Error::io("create a temp dir for", "pgbouncer", e))?;
        user.chown(dir.path())?;
        let port = free_port()?;
        let ini = dir.path().join("pgbouncer.ini");
        let userlist = dir.path().join("userlist.txt");
        let log = dir.path().join("pgbouncer.log");
        let mut text = String::new();
        let _ = writeln!(text, "[databases]\n* = host=127.0.0.1 port={}\n", server.port());
        let _ = writeln!(text, "[pgbouncer]");
        let _ = writeln!(text, "listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =");
        let _ = writeln!(text, "auth_type = trust\nauth_file = {}", userlist.display());
        let _ = writeln!(
            text,
            "pool_mode = transaction\nmax_client_conn = 500\ndefault_pool_size = {pool_size}"
        );
        let _ = writeln!(text, "ignore_startup_parameters = extra_float_digits");
        let _ = writeln!(text, "logfile = {}", log.display());
        let _ = writeln!(text, "pidfile = {}", dir.path().join("pgbouncer.pid").display());
        fs::write(&ini, text).map_err(|e| Error::io("write", &ini, e))?;
        fs::write(&userlist, "\"postgres\" \"\"\n").map_err(|e| Error::io("write", &userlist, e))?;
        for file in [&ini, &userlist] {
            user.chown(file)?;
        }
        let mut cmd = Command::new(&binary);
        cmd.arg(&ini)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        user.apply(&mut cmd);
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            server: format!("pgbouncer for {}", server.name()),
            binary: binary.clone(),
            source,
        })?;
        let mut bouncer = PgBouncer {
            server: server.name().to_owned(),
            port,
            child,
            dir,
        };
        bouncer.wait_accepting()?;
        Ok(bouncer)
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its log file.
    pub fn log_file(&self) -> PathBuf {
        self.dir.path().join("pgbouncer.log")
    }

    /// URL of database `dbname` through PgBouncer, as user `postgres`.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    /// `url` (a URL of the fronted server) with its port replaced by
    /// PgBouncer's: the same database, through PgBouncer.
    pub fn through(&self, url: &str, server: &Server) -> String {
        url.replace(&format!(":{}/", server.port()), &format!(":{}/", self.port))
    }

    fn wait_accepting(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            let exited = self.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() >= deadline {
                return Err(Error::PgBouncerStart {
                    server: self.server.clone(),
                    port: self.port,
                    log: self.log_file(),
                    reason: match exited {
                        Some(status) => format!("it exited ({status})"),
                        None => format!("it did not accept connections within {START_TIMEOUT:?}"),
                    },
                    log_tail: log_tail(&self.log_file()),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `pgbouncer` binary: on `$PATH`, else in the distribution's place.
fn find() -> Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("pgbouncer"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let candidates: Vec<PathBuf> = on_path
        .into_iter()
        .chain(PGBOUNCER_PATHS.iter().map(PathBuf::from))
        .collect();
    candidates
        .iter()
        .find(|p| is_file(p))
        .cloned()
        .ok_or_else(|| Error::NoPgBouncer {
            looked: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

fn is_file(path: &Path) -> bool {
    path.is_file()
}
