//! The migrator's connection to one database: its timeouts, the advisory
//! lock taken without ever waiting on the server, a second connection
//! opened only to see what a migration waits for, and the cancel request
//! sent when the database's deadline passes.

use std::time::Duration;

use tokio_postgres::{CancelToken, Client};

use super::failure::{Failure, Stage};
use super::settings::Settings;
use crate::config::Target;
use crate::store::{self, MigrationLockWait};

/// Longest pause between two tries of the migration advisory lock.
const LOCK_POLL_MAX: Duration = Duration::from_secs(1);

/// One open migrator session.
pub(crate) struct Session {
    /// The connection every migration runs on.
    pub client: Client,
    /// Its server process id, to find what it waits for in `pg_locks`.
    pid: i32,
    /// Where it is connected.
    target: Target,
    /// A second connection, opened the first time a migration seems to wait.
    observer: Option<Client>,
}

impl Session {
    /// Connects and reads the session's process id.
    pub async fn open(target: &Target) -> Result<Session, Failure> {
        let client = connect(target).await?;
        let pid = store::migration_backend_pid(&client)
            .await
            .map_err(|e| Failure::from_error(Stage::Connect, None, &e))?;
        Ok(Session {
            client,
            pid,
            target: target.clone(),
            observer: None,
        })
    }

    /// What to call to cancel whatever this session runs.
    pub fn cancel_token(&self) -> CancelToken {
        self.client.cancel_token()
    }

    /// (Re)applies `lock_timeout` and `statement_timeout`.
    pub async fn set_timeouts(&self, settings: &Settings) -> Result<(), tokio_postgres::Error> {
        store::migration_session_timeouts(
            &self.client,
            millis(settings.lock_timeout),
            settings.statement_timeout.map(millis),
        )
        .await
    }

    /// Takes the migration advisory lock, trying again (every 50 ms at
    /// first, then up to every second) while another migrator holds it.
    /// Nothing waits on the server, so nothing queues behind this; the
    /// database's deadline bounds the wait.
    pub async fn lock(&self) -> Result<(), Failure> {
        let mut pause = Duration::from_millis(50);
        loop {
            let taken = store::migration_try_lock(&self.client)
                .await
                .map_err(|e| Failure::from_error(Stage::Lock, None, &e))?;
            if taken {
                return Ok(());
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(LOCK_POLL_MAX);
        }
    }

    /// Releases the advisory lock (closing the connection would too).
    pub async fn unlock(&self) {
        if let Err(e) = store::migration_unlock(&self.client).await {
            tracing::debug!(database = %self.target, error = %e, "migration unlock failed");
        }
    }

    /// What the migration session waits for right now, seen from a second
    /// connection; `None` when it waits for no lock or that cannot be read.
    pub async fn lock_wait(observer: &mut Option<Client>, target: &Target, pid: i32) -> Option<MigrationLockWait> {
        if observer.is_none() {
            *observer = connect(target).await.ok();
        }
        let client = observer.as_ref()?;
        match store::migration_lock_wait(client, pid).await {
            Ok(wait) => wait,
            Err(e) => {
                tracing::debug!(database = %target, error = %e, "cannot read what the migration waits for");
                None
            }
        }
    }

    /// The parts a running migration and the lock observer use at once.
    pub fn split(&mut self) -> (&mut Client, &mut Option<Client>, &Target, i32) {
        (&mut self.client, &mut self.observer, &self.target, self.pid)
    }
}

/// Sends a cancel request for the statement `token` belongs to, giving up
/// after a few seconds (a frozen server never answers).
pub(crate) async fn cancel(target: Target, token: CancelToken) {
    let Ok(tls) = crate::tls::tokio_postgres_connector(&target) else {
        return;
    };
    let sent = tokio::time::timeout(Duration::from_secs(3), token.cancel_query(tls)).await;
    if !matches!(sent, Ok(Ok(()))) {
        tracing::debug!(database = %target, "cancel request not delivered");
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Opens one connection for the migrator; its driver task runs until the
/// client is dropped. TLS as `target.sslmode` says (see the `tls` module).
pub(crate) async fn connect(target: &Target) -> Result<Client, Failure> {
    let failed = |e: &(dyn std::error::Error + 'static)| Failure::from_error(Stage::Connect, None, e);
    // With sslmode disable the config never asks for TLS, so the connector
    // goes unused.
    let tls = crate::tls::tokio_postgres_connector(target).map_err(|e| failed(&e))?;
    let (client, connection) = target
        .tokio_postgres_config()
        .connect(tls)
        .await
        .map_err(|e| failed(&e))?;
    let address = target.to_string();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(%address, error = %e, "migration connection ended with an error");
        }
    });
    Ok(client)
}
