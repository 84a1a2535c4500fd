//! One PostgreSQL server: its data directory, port and log, and the
//! initdb/pg_ctl commands that manage it.
//!
//! All methods are synchronous: they run short-lived processes and wait for
//! them (with deadlines). Calling them from async tests is fine; from a busy
//! multi-threaded runtime, wrap them in `tokio::task::spawn_blocking`.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::pg_bin::PgBin;
use crate::server_user::ServerUser;
use crate::tls::{write_private, ServerCert, TestCa, TlsFiles};

/// How long `pg_ctl -w` may wait for a start or stop, in seconds.
const PG_CTL_TIMEOUT_SECS: &str = "60";
/// How long a started server may take to accept TCP connections.
const ACCEPT_DEADLINE: Duration = Duration::from_secs(30);
/// Where libfaketime may be (Debian's multi-threaded build first).
const FAKETIME_LIBRARIES: [&str; 3] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
];
/// The line `enable_tls_with` adds to postgresql.conf before its settings.
const TLS_CONF_MARKER: &str = "# shardq-testbed: TLS";
/// The lines around the rules `require_client_auth` puts first in pg_hba.conf.
const HBA_BEGIN: &str = "# shardq-testbed: client auth (begin)";
/// See [`HBA_BEGIN`].
const HBA_END: &str = "# shardq-testbed: client auth (end)";

/// How a role must authenticate to a server, over TCP from 127.0.0.1; see
/// [`Server::require_client_auth`]. Roles without a rule stay on `trust`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// A password, with SCRAM (`host ... scram-sha-256`), with or without
    /// TLS.
    Password,
    /// A client certificate whose common name is the role, from the CA the
    /// server trusts, over TLS only (`hostssl ... cert
    /// clientcert=verify-full`); plain connections are rejected.
    Certificate,
    /// Both: TLS with a client certificate naming the role, and a password
    /// (`hostssl ... scram-sha-256 clientcert=verify-full`); plain
    /// connections are rejected.
    PasswordAndCertificate,
}

impl ClientAuth {
    /// The pg_hba.conf lines for `user` (a quoted role name).
    fn hba_lines(self, user: &str) -> Vec<String> {
        let reject = format!("host all {user} 127.0.0.1/32 reject");
        match self {
            ClientAuth::Password => vec![format!("host all {user} 127.0.0.1/32 scram-sha-256")],
            ClientAuth::Certificate => vec![
                format!("hostssl all {user} 127.0.0.1/32 cert clientcert=verify-full"),
                reject,
            ],
            ClientAuth::PasswordAndCertificate => vec![
                format!("hostssl all {user} 127.0.0.1/32 scram-sha-256 clientcert=verify-full"),
                reject,
            ],
        }
    }
}
/// Interval between readiness probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(25);
/// How many log lines a start error shows.
const LOG_TAIL_LINES: usize = 20;

/// One local PostgreSQL server listening on `127.0.0.1:port`.
#[derive(Debug, Clone)]
pub struct Server {
    /// Server name ("master", "shard_1", ...), used in messages.
    name: String,
    /// TCP port on 127.0.0.1.
    port: u16,
    /// Absolute data directory (PGDATA); also holds the socket and the log.
    data_dir: PathBuf,
    /// The binaries that manage it.
    bin: PgBin,
    /// Who runs its commands.
    user: ServerUser,
    /// Whether it syncs to disk (`fsync` and `full_page_writes` on), as
    /// production servers do; off unless made [`Server::durable`].
    durable: bool,
}

impl Server {
    /// Describes a server (nothing is started): finds the binaries and the
    /// user to run them as. `data_dir` is made absolute.
    pub fn new(name: impl Into<String>, port: u16, data_dir: impl AsRef<Path>) -> Result<Server> {
        let data_dir = data_dir.as_ref();
        let data_dir = std::path::absolute(data_dir).map_err(|e| Error::io("make absolute", data_dir, e))?;
        Ok(Server::with(
            PgBin::find()?,
            ServerUser::resolve()?,
            name.into(),
            port,
            data_dir,
        ))
    }

    /// Describes a server with already resolved binaries and user.
    pub(crate) fn with(bin: PgBin, user: ServerUser, name: String, port: u16, data_dir: PathBuf) -> Server {
        Server {
            name,
            port,
            data_dir,
            bin,
            user,
            durable: false,
        }
    }

    /// The same server, started durable (`fsync` and `full_page_writes`
    /// on) or not (both off, the default: faster, and safe against a crash
    /// of the server process, only not of the operating system).
    pub fn durable(mut self, on: bool) -> Server {
        self.durable = on;
        self
    }

    /// Whether the server syncs to disk; see [`Server::durable`].
    pub fn is_durable(&self) -> bool {
        self.durable
    }

    /// The server's name ("master", "shard_1", ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory (PGDATA).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server's log file (inside the data directory).
    pub fn log_file(&self) -> PathBuf {
        self.data_dir.join("server.log")
    }

    /// URL of database `dbname` on this server, as user `postgres`.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    /// Creates the cluster with initdb unless the data directory already
    /// holds one. Directories this creates are given to the server user,
    /// which must be able to reach the data directory.
    pub fn init(&self) -> Result<()> {
        if self.data_dir.join("PG_VERSION").is_file() {
            return Ok(());
        }
        let mut created = Vec::new();
        let mut missing = Some(self.data_dir.as_path());
        while let Some(dir) = missing.filter(|d| !d.exists()) {
            created.push(dir.to_path_buf());
            missing = dir.parent();
        }
        if let Some(existing) = missing.filter(|_| !created.is_empty()) {
            self.user.check_access(&self.data_dir, existing, false)?; // before creating anything
        }
        fs::create_dir_all(&self.data_dir).map_err(|e| Error::io("create directory", &self.data_dir, e))?;
        for dir in created.iter().rev() {
            self.user.chown(dir)?;
        }
        self.user.chown(&self.data_dir)?;
        self.user.check_access(&self.data_dir, &self.data_dir, true)?;
        let mut cmd = self.command(self.bin.initdb());
        cmd.arg("-D").arg(&self.data_dir);
        cmd.args("-A trust -U postgres --no-sync -E UTF8 --locale=C".split(' '));
        self.run_ok(cmd).map(drop)
    }

    /// Starts the server and waits until it accepts TCP connections. Does
    /// nothing if it already runs and accepts them; a frozen server is
    /// thawed.
    pub fn start(&self) -> Result<()> {
        self.start_env(&[])
    }

    /// Restarts the server with its clock `ahead` of this machine's (through
    /// libfaketime, preloaded into the postmaster and so into every backend:
    /// `now()` on it reads `ahead` later), to show which clock a statement
    /// uses. A later [`Server::restart`] brings its clock back. Fails when
    /// libfaketime is not installed.
    pub fn restart_clock_ahead(&self, ahead: Duration) -> Result<()> {
        let library = FAKETIME_LIBRARIES
            .iter()
            .find(|p| Path::new(p).is_file())
            .ok_or_else(|| Error::NoFaketime {
                server: self.name.clone(),
                looked: FAKETIME_LIBRARIES.join(", "),
            })?;
        self.stop()?;
        self.start_env(&[
            ("LD_PRELOAD", (*library).to_owned()),
            ("FAKETIME", format!("+{}s", ahead.as_secs())),
            ("FAKETIME_DONT_RESET", "1".to_owned()),
        ])
    }

    /// [`Server::start`], with `env` set for pg_ctl and so for the server.
    fn start_env(&self, env: &[(&str, String)]) -> Result<()> {
        self.thaw_before("start");
        if self.is_running()? {
            return self.wait_accepting();
        }
        let dir = self.data_dir.display().to_string().replace('\'', r"'\''");
        // Unless durable, fsync and full_page_writes are off for speed: they
        // only guard against an operating-system crash. synchronous_commit
        // stays on, so a commit that returned survives `kill()` (a server
        // process crash).
        let sync = if self.durable { "on" } else { "off" };
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k '{dir}' -c fsync={sync} \
             -c full_page_writes={sync} -c synchronous_commit=on -c max_connections=300 -c shared_buffers=128MB",
            self.port
        );
        let mut cmd = self.command(self.bin.pg_ctl());
        cmd.args(["start", "-w", "-t", PG_CTL_TIMEOUT_SECS, "-D"])
            .arg(&self.data_dir);
        cmd.arg("-l").arg(self.log_file()).arg("-o").arg(options);
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        match self.run_ok(cmd) {
            Ok(_) => self.wait_accepting(),
            Err(Error::Command { output, status, .. }) => {
                Err(self.start_error(format!("pg_ctl start failed ({status}): {output}")))
            }
            Err(e) => Err(e),
        }
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`), thawing it first if
    /// it is frozen; nothing to do if it is not running.
    pub fn stop(&self) -> Result<()> {
        self.stop_mode("fast")
    }

    /// Crashes the server (`pg_ctl stop -m immediate`: no checkpoint, crash
    /// recovery on next start), thawing it first if it is frozen; nothing to
    /// do if it is not running.
    pub fn kill(&self) -> Result<()> {
        self.stop_mode("immediate")
    }

    /// Freezes the server, to simulate one that stopped answering without
    /// closing its sockets: SIGSTOP to its postmaster and, once that has
    /// stopped (so it forks no more), to every process below it (backends,
    /// checkpointer, walwriter, ...). The kernel still completes TCP
    /// handshakes and buffers what clients send, but nothing answers: a
    /// connection attempt hangs at startup and a query on an open
    /// connection hangs, until [`Server::thaw`].
    ///
    /// [`Server::stop`], [`Server::kill`] and [`Server::restart`] thaw
    /// first, and a [`TestBed`](crate::TestBed) thaws its servers when it is
    /// dropped or its process exits. Fails when the server is not running.
    /// Linux only (it reads `/proc`).
    pub fn freeze(&self) -> Result<()> {
        crate::freeze::freeze(&self.name, &self.data_dir, false)
    }

    /// Freezes only the postmaster (SIGSTOP), to simulate a server that
    /// accepts no new session while the open ones keep working: a
    /// connection attempt hangs at startup (nothing forks a backend for it),
    /// queries on open connections are answered. Undone by
    /// [`Server::thaw`]; [`Server::stop`], [`Server::kill`] and
    /// [`Server::restart`] thaw first. Linux only (it reads `/proc`).
    pub fn freeze_postmaster(&self) -> Result<()> {
        crate::freeze::freeze(&self.name, &self.data_dir, true)
    }

    /// CPU time (user + system) the server's processes used since it
    /// started: the postmaster, its running children and every backend
    /// that has exited, each counted once even while backends exit. Zero
    /// when it is not running. Linux only.
    pub fn cpu_time(&self) -> Result<Duration> {
        crate::process_tree::cpu_time(&self.data_dir)
    }

    /// Undoes [`Server::freeze`]: SIGCONT to every process below the
    /// postmaster, then to the postmaster. Nothing to do when the server is
    /// not running or not frozen.
    pub fn thaw(&self) -> Result<()> {
        crate::freeze::thaw(&self.name, &self.data_dir)
    }

    /// Turns TLS on with a certificate from a new CA; see
    /// [`Server::enable_tls_with`].
    pub fn enable_tls(&self) -> Result<TlsFiles> {
        let ca = TestCa::generate(&format!("shardq test CA for {}", self.name))?;
        let ca_cert = self.data_dir.join("ca.crt");
        ca.write_cert(&ca_cert)?;
        self.enable_tls_with(&ca)?;
        Ok(TlsFiles { ca_cert })
    }

    /// Turns TLS on with a server certificate issued by `ca` (for
    /// `127.0.0.1` and `localhost`): writes `server.crt` and `server.key`
    /// (mode 0600, owned by the server user: Postgres refuses a key others
    /// can read) into the data directory, sets `ssl = on` in
    /// `postgresql.conf` and restarts the server if it runs. Plain
    /// connections are still accepted, so clients choose with `sslmode`.
    ///
    /// `ca` is also the server's `ssl_ca_file`: client certificates it
    /// issued ([`TestCa::issue_client`]) are verified, and roles can be made
    /// to need one with [`Server::require_client_auth`].
    pub fn enable_tls_with(&self, ca: &TestCa) -> Result<()> {
        self.enable_tls_with_cert(ca, &ca.issue_server()?)
    }

    /// [`Server::enable_tls_with`], with a server certificate from `ca` for
    /// `names` only (e.g. a host name clients do not connect by, so that
    /// `verify-full` fails where `verify-ca` passes).
    pub fn enable_tls_for(&self, ca: &TestCa, names: &[&str]) -> Result<()> {
        self.enable_tls_with_cert(ca, &ca.issue_server_for(names)?)
    }

    fn enable_tls_with_cert(&self, ca: &TestCa, issued: &ServerCert) -> Result<()> {
        for (file, contents, mode) in [
            ("server.crt", &issued.cert_pem, 0o600),
            ("server.key", &issued.key_pem, 0o600),
            ("root.crt", &ca.cert_pem().to_owned(), 0o644),
        ] {
            let path = self.data_dir.join(file);
            write_private(&path, contents, mode)?;
            self.user.chown(&path)?;
        }
        let conf = self.data_dir.join("postgresql.conf");
        let text = fs::read_to_string(&conf).map_err(|e| Error::io("read", &conf, e))?;
        if !text.contains(TLS_CONF_MARKER) {
            let mut file = fs::OpenOptions::new()
                .append(true)
                .open(&conf)
                .map_err(|e| Error::io("open for append", &conf, e))?;
            writeln!(
                file,
                "\n{TLS_CONF_MARKER}\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
                 ssl_ca_file = 'root.crt'"
            )
            .map_err(|e| Error::io("append to", &conf, e))?;
        }
        if self.is_running()? {
            self.restart()?;
        }
        Ok(())
    }

    /// Makes each `(role, how)` of `rules` authenticate as [`ClientAuth`]
    /// says (TCP from 127.0.0.1), replacing the rules an earlier call set,
    /// and restarts the server if it runs (a restart, not a reload, so the
    /// rules are in force when this returns). The roles are created
    /// separately (`bed::ensure_role`); other roles,
    /// `postgres` among them, stay on `trust`. Role names must be simple
    /// identifiers (lowercase letters, digits, `_`).
    pub fn require_client_auth(&self, rules: &[(&str, ClientAuth)]) -> Result<()> {
        let mut block = vec![HBA_BEGIN.to_owned()];
        for (user, auth) in rules {
            if user.is_empty()
                || !user
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return Err(Error::InvalidRole {
                    role: (*user).to_owned(),
                });
            }
            block.extend(auth.hba_lines(&format!("\"{user}\"")));
        }
        block.push(HBA_END.to_owned());
        let hba = self.data_dir.join("pg_hba.conf");
        let text = fs::read_to_string(&hba).map_err(|e| Error::io("read", &hba, e))?;
        // Drop an earlier block; the new one goes first (the first matching line wins).
        let rest = match (text.find(HBA_BEGIN), text.find(HBA_END)) {
            (Some(begin), Some(end)) if begin < end => {
                format!(
                    "{}{}",
                    &text[..begin],
                    text[end + HBA_END.len()..].trim_start_matches('\n')
                )
            }
            _ => text,
        };
        fs::write(&hba, format!("{}\n{rest}", block.join("\n"))).map_err(|e| Error::io("write", &hba, e))?;
        if self.is_running()? {
            self.restart()?;
        }
        Ok(())
    }

    /// Stops (fast) and starts the server.
    pub fn restart(&self) -> Result<()> {
        self.stop()?;
        self.start()
    }

    /// Whether a connection to database `postgres` as user `postgres` on
    /// 127.0.0.1:port is accepted right now (a protocol-level probe that
    /// expects `AuthenticationOk`, like `pg_isready` but also checking auth).
    pub fn is_accepting(&self) -> bool {
        probe(self.port).unwrap_or(false)
    }

    /// Whether the postmaster of this data directory runs (`pg_ctl status`).
    fn is_running(&self) -> Result<bool> {
        let mut cmd = self.command(self.bin.pg_ctl());
        cmd.arg("status").arg("-D").arg(&self.data_dir);
        Ok(self.output(&mut cmd)?.status.success())
    }

    fn stop_mode(&self, mode: &str) -> Result<()> {
        self.thaw_before("stop");
        if !self.is_running()? {
            return Ok(());
        }
        let mut cmd = self.command(self.bin.pg_ctl());
        cmd.args(["stop", "-w", "-t", PG_CTL_TIMEOUT_SECS, "-m", mode, "-D"])
            .arg(&self.data_dir);
        self.run_ok(cmd).map(drop)
    }

    /// Thaws the server before pg_ctl acts on it (a frozen postmaster would
    /// not act on pg_ctl's signal). A failure is logged, not returned: the
    /// server is most likely not frozen, and pg_ctl says if it is.
    fn thaw_before(&self, action: &str) {
        if let Err(e) = self.thaw() {
            tracing::warn!(server = %self.name, error = %e, "could not thaw the server before {action}");
        }
    }

    /// Polls until the server accepts connections, up to [`ACCEPT_DEADLINE`].
    fn wait_accepting(&self) -> Result<()> {
        let deadline = Instant::now() + ACCEPT_DEADLINE;
        while !self.is_accepting() {
            if Instant::now() >= deadline {
                return Err(self.start_error(format!(
                    "not accepting connections on 127.0.0.1:{} after {ACCEPT_DEADLINE:?}",
                    self.port
                )));
            }
            thread::sleep(PROBE_INTERVAL);
        }
        Ok(())
    }

    fn start_error(&self, reason: String) -> Error {
        Error::Start {
            server: self.name.clone(),
            port: self.port,
            data_dir: self.data_dir.clone(),
            log: self.log_file(),
            reason,
            log_tail: log_tail(&self.log_file()),
        }
    }

    /// A command for `binary` run as the server user, in the C locale.
    fn command(&self, binary: PathBuf) -> Command {
        let mut cmd = Command::new(binary);
        cmd.env("LC_ALL", "C").stdin(Stdio::null());
        self.user.apply(&mut cmd);
        cmd
    }

    fn output(&self, cmd: &mut Command) -> Result<Output> {
        cmd.output().map_err(|source| Error::Spawn {
            server: self.name.clone(),
            binary: PathBuf::from(cmd.get_program()),
            source,
        })
    }

    /// Runs `cmd`; a non-zero exit is an [`Error::Command`].
    fn run_ok(&self, mut cmd: Command) -> Result<Output> {
        let out = self.output(&mut cmd)?;
        if out.status.success() {
            return Ok(out);
        }
        let args: Vec<OsString> = cmd.get_args().map(OsString::from).collect();
        Err(Error::Command {
            server: self.name.clone(),
            binary: PathBuf::from(cmd.get_program()),
            args: args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "),
            status: out.status,
            output: [&out.stdout, &out.stderr]
                .map(|bytes| String::from_utf8_lossy(bytes).trim().to_owned())
                .into_iter()
                .filter(|text| !text.is_empty())
                .collect::<Vec<_>>()
                .join("\n"),
        })
    }
}

/// Sends a v3 startup message for user/database `postgres` and reports
/// whether the server answered `AuthenticationOk`; then says goodbye.
fn probe(port: u16) -> std::io::Result<bool> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut body = 196_608_u32.to_be_bytes().to_vec(); // protocol 3.0
    for part in ["user", "postgres", "database", "postgres", ""] {
        body.extend_from_slice(part.as_bytes());
        body.push(0);
    }
    let len = u32::try_from(body.len() + 4).unwrap_or(u32::MAX);
    stream.write_all(&[len.to_be_bytes().as_slice(), &body].concat())?;
    let mut reply = [0_u8; 9];
    stream.read_exact(&mut reply)?;
    let ok = reply == [b'R', 0, 0, 0, 8, 0, 0, 0, 0];
    if ok {
        stream.write_all(&[b'X', 0, 0, 0, 4])?; // Terminate
    }
    Ok(ok)
}

/// The last [`LOG_TAIL_LINES`] lines of a log file (reads at most 64 KiB).
pub(crate) fn log_tail(path: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
        }
        Err(e) => format!("(log not readable: {e})"),
    }
}
