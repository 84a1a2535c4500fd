//! [`TestBed`]: a master plus N shard servers in a temporary directory, for
//! tests and benchmarks, and [`Fleet`]: fresh databases on all of them.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::thread;

use sqlx::{Connection, Executor, PgConnection};

use crate::error::{Error, Result};
use crate::exit_guard::ExitGuard;
use crate::pg_bin::PgBin;
use crate::server::Server;
use crate::server_user::ServerUser;
use crate::tls::{TestCa, TlsFiles};

/// Shard count of [`TestBed::shared`].
const SHARED_SHARDS: usize = 3;
/// Port picks per server before a "port already in use" start fails.
const PORT_ATTEMPTS: u32 = 3;

/// A master and N shard servers on free loopback ports, with data in a fresh
/// temporary directory.
///
/// The servers are stopped and the directory removed when the bed is dropped
/// and, in any case, when the process exits, even if it is killed (see the
/// exit guard in this crate's layout).
#[derive(Debug)]
pub struct TestBed {
    /// The "master" server.
    master: Server,
    /// "shard_1".."shard_N".
    shards: Vec<Server>,
    /// The temporary directory holding every data directory.
    dir: PathBuf,
    /// Stops the servers and removes `dir` on drop or process exit.
    _guard: ExitGuard,
}

/// One brand-new database on every server of a bed; see [`TestBed::fresh_fleet`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fleet {
    /// The database on the master server.
    pub master: FleetDb,
    /// The database on each shard server, in order.
    pub shards: Vec<FleetDb>,
}

/// One database of a [`Fleet`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetDb {
    /// The server's name: "master", "shard_1", ...
    pub name: String,
    /// Full URL of the new database.
    pub url: String,
}

impl TestBed {
    /// Starts a master and `shards` shard servers ("shard_1".."shard_N"),
    /// concurrently. Blocks for a few seconds (initdb is slow).
    pub fn start(shards: usize) -> Result<TestBed> {
        TestBed::start_with(shards, false)
    }

    /// [`TestBed::start`], with every server durable or not (see
    /// [`Server::durable`]): benchmarks measure durable servers, as users
    /// deploy them.
    pub fn start_with(shards: usize, durable: bool) -> Result<TestBed> {
        let bin = PgBin::find()?;
        let user = ServerUser::resolve()?;
        let temp = tempfile::Builder::new()
            .prefix("shardq-testbed-")
            .tempdir()
            .map_err(|e| Error::io("create a temporary directory in", std::env::temp_dir(), e))?;
        user.chown(temp.path())?;
        let names: Vec<String> = std::iter::once("master".to_owned())
            .chain((1..=shards).map(|i| format!("shard_{i}")))
            .collect();
        let data_dirs: Vec<PathBuf> = names.iter().map(|n| temp.path().join(n)).collect();
        let guard = ExitGuard::spawn(&bin, &user, temp.path(), &data_dirs)?;
        // From here on the guard owns the directory's removal.
        let dir = temp.keep();
        let mut servers = thread::scope(|scope| {
            let handles: Vec<_> = names
                .iter()
                .zip(&data_dirs)
                .map(|(name, data_dir)| scope.spawn(|| start_on_free_port(&bin, &user, name, data_dir, durable)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                .collect::<Result<Vec<Server>>>()
        })?;
        let master = servers.remove(0);
        tracing::info!(dir = %dir.display(), shards, "test bed started");
        Ok(TestBed {
            master,
            shards: servers,
            dir,
            _guard: guard,
        })
    }

    /// The bed shared by every test of this test binary: a master and 3
    /// shards, started on first call and stopped when the process exits.
    ///
    /// Tests must not stop, kill or restart its servers; fault tests start
    /// their own bed with [`TestBed::start`]. Give each test its own
    /// databases with [`TestBed::fresh_fleet`]. The first call blocks while
    /// the servers start; a failed start is retried by the next call.
    pub fn shared() -> Result<&'static TestBed> {
        static SHARED: Mutex<Option<&'static TestBed>> = Mutex::new(None);
        let mut slot = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(bed) = *slot {
            return Ok(bed);
        }
        let bed: &'static TestBed = Box::leak(Box::new(TestBed::start(SHARED_SHARDS)?));
        *slot = Some(bed);
        Ok(bed)
    }

    /// The master server.
    pub fn master(&self) -> &Server {
        &self.master
    }

    /// The shard servers, "shard_1" first.
    pub fn shards(&self) -> &[Server] {
        &self.shards
    }

    /// The server called `name` ("master", "shard_1", ...).
    pub fn server(&self, name: &str) -> Result<&Server> {
        self.servers()
            .find(|s| s.name() == name)
            .ok_or_else(|| Error::UnknownServer {
                name: name.to_owned(),
                known: self.servers().map(Server::name).collect::<Vec<_>>().join(", "),
            })
    }

    /// The master, then the shards.
    pub fn servers(&self) -> impl Iterator<Item = &Server> {
        std::iter::once(&self.master).chain(&self.shards)
    }

    /// Turns TLS on for every server of the bed, with server certificates
    /// from one new CA, restarting them; returns the CA certificate's file
    /// (in the bed's directory), to set as `sslrootcert`. Blocks while the
    /// servers restart.
    pub fn enable_tls(&self) -> Result<TlsFiles> {
        let ca = TestCa::generate("shardq test bed CA")?;
        let ca_cert = self.dir.join("ca.crt");
        ca.write_cert(&ca_cert)?;
        for server in self.servers() {
            server.enable_tls_with(&ca)?;
        }
        Ok(TlsFiles { ca_cert })
    }

    /// The temporary directory holding the data directories.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates a new database with a unique name (`t<pid>_<n>`) on every
    /// server and returns their URLs, so tests can run in parallel.
    pub async fn fresh_fleet(&self) -> Result<Fleet> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let db = format!("t{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let master = create_database(&self.master, &db).await?;
        let mut shards = Vec::with_capacity(self.shards.len());
        for shard in &self.shards {
            shards.push(create_database(shard, &db).await?);
        }
        Ok(Fleet { master, shards })
    }
}

/// Creates database `db` on `server` unless it exists; returns whether it
/// was created. Used by `shardq testbed up` for the configured databases.
pub async fn ensure_database(server: &Server, db: &str) -> Result<bool> {
    let admin = server.url("postgres");
    let sql_error = |action: &str, source| Error::Sql {
        server: server.name().to_owned(),
        action: action.to_owned(),
        url: admin.clone(),
        source,
    };
    let mut conn = PgConnection::connect(&admin)
        .await
        .map_err(|e| sql_error("connect", e))?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(db)
        .fetch_one(&mut conn)
        .await
        .map_err(|e| sql_error("look up databases", e))?;
    if !exists {
        let quoted = db.replace('"', "\"\"");
        conn.execute(format!(r#"CREATE DATABASE "{quoted}""#).as_str())
            .await
            .map_err(|e| sql_error(&format!("CREATE DATABASE {db}"), e))?;
    }
    conn.close().await.map_err(|e| sql_error("close", e))?;
    Ok(!exists)
}

/// Creates role `role` (LOGIN) on `server` unless it exists, and sets its
/// password (SCRAM-SHA-256), or removes it when `password` is `None`. Roles
/// belong to a server, not a database: call it on every server a test
/// connects to as that role. Pair it with
/// [`Server::require_client_auth`] to make the server ask for the password.
pub async fn ensure_role(server: &Server, role: &str, password: Option<&str>) -> Result<()> {
    if role.is_empty()
        || !role
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(Error::InvalidRole { role: role.to_owned() });
    }
    let admin = server.url("postgres");
    // The statements carry the password: errors name the action, not the SQL.
    let sql_error = |action: &str, source| Error::Sql {
        server: server.name().to_owned(),
        action: action.to_owned(),
        url: admin.clone(),
        source,
    };
    let mut conn = PgConnection::connect(&admin)
        .await
        .map_err(|e| sql_error("connect", e))?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
        .bind(role)
        .fetch_one(&mut conn)
        .await
        .map_err(|e| sql_error("look up roles", e))?;
    if !exists {
        conn.execute(format!(r#"CREATE ROLE "{role}" LOGIN"#).as_str())
            .await
            .map_err(|e| sql_error(&format!("CREATE ROLE {role}"), e))?;
    }
    let password = match password {
        Some(p) => format!("'{}'", p.replace('\'', "''")),
        None => "NULL".to_owned(),
    };
    conn.execute("SET password_encryption = 'scram-sha-256'")
        .await
        .map_err(|e| sql_error("SET password_encryption", e))?;
    conn.execute(format!(r#"ALTER ROLE "{role}" LOGIN PASSWORD {password}"#).as_str())
        .await
        .map_err(|e| sql_error(&format!("set the password of role {role}"), e))?;
    conn.close().await.map_err(|e| sql_error("close", e))?;
    Ok(())
}

/// Creates the fresh database `db` on `server` (names are unique per bed).
async fn create_database(server: &Server, db: &str) -> Result<FleetDb> {
    ensure_database(server, db).await?;
    Ok(FleetDb {
        name: server.name().to_owned(),
        url: server.url(db),
    })
}

/// Inits and starts one server, picking another free port if the chosen one
/// was taken between picking and binding.
fn start_on_free_port(bin: &PgBin, user: &ServerUser, name: &str, data_dir: &Path, durable: bool) -> Result<Server> {
    let mut attempt = 1;
    loop {
        let server = Server::with(
            bin.clone(),
            user.clone(),
            name.to_owned(),
            free_port()?,
            data_dir.to_path_buf(),
        )
        .durable(durable);
        server.init()?;
        match server.start() {
            Err(Error::Start { log_tail, .. }) if attempt < PORT_ATTEMPTS && log_tail.contains("could not bind") => {
                tracing::debug!(server = name, "port taken, picking another");
                attempt += 1;
            }
            result => return result.map(|()| server),
        }
    }
}

/// A port that was free on 127.0.0.1 a moment ago.
pub(crate) fn free_port() -> Result<u16> {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| Error::io("bind a free port on", "127.0.0.1:0", e))
}
