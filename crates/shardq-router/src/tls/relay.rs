//! The TLS relay: how sqlx's connections get the TLS of [`client_config`],
//! which sqlx cannot be given (it always adds the public web roots to the
//! roots it trusts, and takes no rustls configuration).
//!
//! For each distinct server and TLS settings (host, port, sslmode,
//! sslrootcert, sslcert, sslkey), [`socket_dir`] opens a Unix socket in a
//! private directory (mode 0700) of this process; `Target::connect_options`
//! points sqlx at it, with TLS off on that local hop. For each connection
//! sqlx opens there, the relay reads sqlx's startup message, connects to
//! `host:port`, asks for TLS as libpq does (SSLRequest), makes the TLS
//! connection with [`client_config`] (the migrator's client), passes the
//! startup message on and then copies bytes both ways until either side
//! closes. Authentication (the password, SCRAM) stays between sqlx and the
//! server. Only this process's user can reach the sockets.
//!
//! When the relay cannot make the connection it answers sqlx as a server
//! would, with an error message (routine `shardq_tls_relay`) that
//! [`classify`] turns into the error sqlx gives for the same failure on its
//! own: [`sqlx::Error::Tls`] for a certificate, TLS file or a server
//! without TLS; [`sqlx::Error::Io`] when the server cannot be reached (a
//! refused connection carries SQLSTATE 57P03, so the pool retries it until
//! `acquire_timeout`, as it retries a refused direct connection).
//!
//! The relay runs on one thread of its own (`shardq-tls-relay`, a
//! single-threaded tokio runtime) for the life of the process, so it does
//! not depend on the runtime of whoever made the pool. Its sockets are
//! never closed: there is one per distinct setting, not per pool. The
//! directory stays when the process ends; the next process to start a
//! relay removes those of processes that no longer run (Linux `/proc`).

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::error::DatabaseError;
use sqlx::postgres::PgDatabaseError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::client_config;
use crate::config::{SslMode, Target};
use crate::error::{Error, Result};

/// How the relay's directories in the temporary directory begin; then come
/// the process id, `-` and a number.
const DIR_PREFIX: &str = "shardq-tls-relay-";
/// The `routine` field of the relay's error messages, which marks them.
const ROUTINE: &str = "shardq_tls_relay";
/// How long the relay tries to reach the server and finish the handshake.
/// The pool's `acquire_timeout` normally gives up first; this ends the
/// relay's side of an attempt nobody waits for any more.
const CONNECT_DEADLINE: Duration = Duration::from_secs(30);
/// How long accepting pauses after an accept error (e.g. out of file
/// descriptors), so the loop does not spin.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// libpq's SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
/// The largest startup message accepted from sqlx.
const MAX_STARTUP_LEN: usize = 64 * 1024;
/// SQLSTATE for "the server refused the connection" (cannot_connect_now:
/// sqlx's pool retries it, as it retries a refused TCP connection).
const REFUSED: &str = "57P03";
/// SQLSTATE for "the server could not be reached".
const UNREACHABLE: &str = "08001";
/// SQLSTATE for "the TLS connection could not be made".
const TLS_FAILED: &str = "08006";

/// The relay of this process: its thread's runtime, its directory and one
/// socket directory per distinct TLS setting. Created by the first
/// [`socket_dir`]; read and extended under the lock by every later one.
struct Relays {
    /// Where the listeners run.
    runtime: tokio::runtime::Handle,
    /// The private directory holding every socket.
    dir: PathBuf,
    /// The socket directory of each setting (a target without its user,
    /// password, dbname and options).
    sockets: HashMap<Target, PathBuf>,
}

static RELAYS: Mutex<Option<Relays>> = Mutex::new(None);

/// The directory of the relay socket for `target` (sqlx's `socket`
/// option; the socket in it is `.s.PGSQL.<port>`), started on first use.
pub(crate) fn socket_dir(target: &Target) -> Result<PathBuf> {
    let setting = Target {
        user: String::new(),
        password: None,
        dbname: String::new(),
        options: None,
        ..target.clone()
    };
    let mut slot = RELAYS.lock().unwrap_or_else(PoisonError::into_inner);
    let relays = match &mut *slot {
        Some(relays) => relays,
        empty => empty.insert(Relays::start()?),
    };
    if let Some(dir) = relays.sockets.get(&setting) {
        return Ok(dir.clone());
    }
    let dir = relays.dir.join(relays.sockets.len().to_string());
    private_dir(&dir)?;
    let path = dir.join(format!(".s.PGSQL.{}", setting.port));
    let listener = std::os::unix::net::UnixListener::bind(&path)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| relay_error(format!("cannot listen on {}: {e}", path.display())))?;
    relays.runtime.spawn(serve(listener, Arc::new(setting.clone())));
    relays.sockets.insert(setting, dir.clone());
    Ok(dir)
}

impl Relays {
    /// Creates the private directory and starts the relay's thread.
    fn start() -> Result<Relays> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let temp = std::env::temp_dir();
        remove_stale(&temp);
        let dir = temp.join(format!("{DIR_PREFIX}{}-{nanos}", std::process::id()));
        private_dir(&dir)?;
        let (sender, receiver) = mpsc::channel();
        std::thread::Builder::new()
            .name("shardq-tls-relay".into())
            .spawn(
                move || match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => {
                        let _ = sender.send(Ok(runtime.handle().clone()));
                        runtime.block_on(std::future::pending::<()>());
                    }
                    Err(e) => {
                        let _ = sender.send(Err(e));
                    }
                },
            )
            .map_err(|e| relay_error(format!("cannot start its thread: {e}")))?;
        let runtime = receiver
            .recv()
            .map_err(|_| relay_error("its thread ended at once".into()))?
            .map_err(|e| relay_error(format!("cannot build its runtime: {e}")))?;
        Ok(Relays {
            runtime,
            dir,
            sockets: HashMap::new(),
        })
    }
}

/// Removes the relay directories that processes which have ended left in
/// `temp` (nothing removes a directory at exit). Best effort: a directory
/// that cannot be read or removed (another user's) is left alone.
fn remove_stale(temp: &Path) {
    let Ok(entries) = std::fs::read_dir(temp) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Creates `dir` with mode 0700.
fn private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| relay_error(format!("cannot create {}: {e}", dir.display())))
}

fn relay_error(message: String) -> Error {
    Error::Tls {
        message: format!("TLS relay: {message}"),
    }
}

/// Accepts sqlx's connections on `listener` and relays each.
async fn serve(listener: std::os::unix::net::UnixListener, target: Arc<Target>) {
    let listener = match UnixListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(database = %target, error = %e, "TLS relay cannot listen");
            return;
        }
    };
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                tokio::spawn(relay(client, target.clone()));
            }
            Err(e) => {
                tracing::warn!(database = %target, error = %e, "TLS relay cannot accept a connection");
                tokio::time::sleep(ACCEPT_PAUSE).await;
            }
        }
    }
}

/// Something that is both ends of a byte stream: the server connection,
/// with or without TLS.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Stream for S {}

/// Why the relay could not make the connection.
enum Failure {
    /// The server could not be reached.
    Unreachable(io::Error),
    /// The TLS connection could not be made (certificate, files, no TLS).
    Tls(String),
}

/// Relays one connection of sqlx.
async fn relay(mut client: UnixStream, target: Arc<Target>) {
    let Ok(startup) = read_startup(&mut client).await else {
        return; // sqlx went away or spoke no protocol: nobody to answer
    };
    let opened = tokio::time::timeout(CONNECT_DEADLINE, open(&target))
        .await
        .unwrap_or_else(|_| {
            Err(Failure::Unreachable(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no TLS connection to {}:{} within {CONNECT_DEADLINE:?}",
                    target.host, target.port
                ),
            )))
        });
    let mut server = match opened {
        Ok(server) => server,
        Err(failure) => return refuse(client, failure).await,
    };
    if server.write_all(&startup).await.is_err() {
        return;
    }
    // With TLS 1.3 the server judges the client's certificate after the
    // client's side of the handshake is done: its refusal (an alert) is
    // what the first read returns. Read that first reply here, so that it
    // reaches sqlx as the TLS error it is, not as a closed connection.
    let mut first = vec![0_u8; 8192];
    match server.read(&mut first).await {
        Ok(0) => return,
        Ok(n) => {
            if client.write_all(&first[..n]).await.is_err() {
                return;
            }
        }
        Err(e) if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) => {
            return refuse(client, Failure::Tls(handshake_message(&e))).await
        }
        Err(e) => return refuse(client, Failure::Unreachable(e)).await,
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

/// Answers sqlx with the error message for `failure` and closes.
async fn refuse(mut client: UnixStream, failure: Failure) {
    let (code, message) = match failure {
        Failure::Unreachable(e) if e.kind() == io::ErrorKind::ConnectionRefused => (REFUSED, e.to_string()),
        Failure::Unreachable(e) => (UNREACHABLE, e.to_string()),
        Failure::Tls(message) => (TLS_FAILED, message),
    };
    let _ = client.write_all(&error_response(code, &message)).await;
    let _ = client.shutdown().await;
}

/// Reads sqlx's first message (startup or cancel request): a length that
/// counts itself, then the body.
async fn read_startup(client: &mut UnixStream) -> io::Result<Vec<u8>> {
    let mut len = [0_u8; 4];
    client.read_exact(&mut len).await?;
    let total = usize::try_from(u32::from_be_bytes(len)).unwrap_or(usize::MAX);
    if !(8..=MAX_STARTUP_LEN).contains(&total) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a startup message"));
    }
    let mut packet = vec![0_u8; total];
    packet[..4].copy_from_slice(&len);
    client.read_exact(&mut packet[4..]).await?;
    Ok(packet)
}

/// Connects to the server and makes the TLS connection `target` asks for.
async fn open(target: &Target) -> std::result::Result<Box<dyn Stream>, Failure> {
    let config = client_config(target).map_err(|e| Failure::Tls(e.to_string()))?;
    let mut tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(Failure::Unreachable)?;
    let _ = tcp.set_nodelay(true);
    tcp.write_all(&SSL_REQUEST).await.map_err(Failure::Unreachable)?;
    let mut answer = [0_u8; 1];
    tcp.read_exact(&mut answer).await.map_err(Failure::Unreachable)?;
    match answer[0] {
        b'S' => {
            let mut make = MakeRustlsConnect::new(config);
            let connect = <MakeRustlsConnect as MakeTlsConnect<TcpStream>>::make_tls_connect(&mut make, &target.host)
                .map_err(|e| Failure::Tls(format!("{:?} is not a host name for TLS: {e}", target.host)))?;
            let tls = connect
                .connect(tcp)
                .await
                .map_err(|e| Failure::Tls(handshake_message(&e)))?;
            Ok(Box::new(tls))
        }
        b'N' if target.sslmode == SslMode::Prefer => Ok(Box::new(tcp)),
        b'N' => Err(Failure::Tls("server does not support TLS".into())),
        _ => Err(Failure::Tls("the server did not answer the TLS request".into())),
    }
}

/// The rustls error inside a handshake's I/O error ("invalid peer
/// certificate: UnknownIssuer"), or the I/O error itself.
fn handshake_message(e: &io::Error) -> String {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(tls) => tls.to_string(),
        None => e.to_string(),
    }
}

/// A protocol ErrorResponse (severity FATAL) marked with [`ROUTINE`].
fn error_response(code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', code),
        (b'M', message),
        (b'R', ROUTINE),
    ] {
        body.push(field);
        body.extend(value.bytes().filter(|b| *b != 0));
        body.push(0);
    }
    body.push(0);
    let len = u32::try_from(body.len() + 4).unwrap_or(u32::MAX);
    let mut out = vec![b'E'];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// The sqlx error a direct connection would have given for a failure the
/// relay reported; any other database error as it is.
pub(super) fn classify(error: Box<dyn DatabaseError>) -> sqlx::Error {
    let relayed = error
        .try_downcast_ref::<PgDatabaseError>()
        .filter(|pg| pg.routine() == Some(ROUTINE))
        .map(|pg| (pg.code().to_owned(), pg.message().to_owned()));
    match relayed {
        Some((code, message)) if code == TLS_FAILED => sqlx::Error::Tls(message.into()),
        Some((code, message)) if code == REFUSED => {
            sqlx::Error::Io(io::Error::new(io::ErrorKind::ConnectionRefused, message))
        }
        Some((_, message)) => sqlx::Error::Io(io::Error::other(message)),
        None => sqlx::Error::Database(error),
    }
}
