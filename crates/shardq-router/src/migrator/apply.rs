//! Applying one migration file on one database: in a transaction together
//! with its history row, or (marked `-- shardq:no-transaction`) statement by
//! statement with the row written after the last one. A try that hits the
//! lock timeout is tried again after a pause, up to the configured number
//! of retries; meanwhile a second connection notes which lock it waited for.

use std::time::Duration;

use refinery::Migration;
use tokio_postgres::Client;

use super::failure::{Failure, Stage};
use super::plan::MigrationId;
use super::session::Session;
use super::settings::Settings;
use super::sources::History;
use super::statements;
use crate::store::{self, MigrationLockWait};

/// Lock-timeout counts of one database, for its report.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Tries {
    /// Tries beyond the first, over all migrations.
    pub retries: u32,
    /// Tries cancelled by the lock timeout.
    pub lock_timeouts: u32,
}

/// Applies `file` (not applied yet) to `history`, retrying on lock timeouts.
pub(crate) async fn apply(
    session: &mut Session,
    history: History,
    file: &Migration,
    settings: &Settings,
    tries: &mut Tries,
) -> Result<(), Failure> {
    let id = MigrationId::of(file);
    let sql = file.sql().unwrap_or_default();
    let no_transaction = statements::no_transaction(sql);
    let parts = if no_transaction {
        statements::split(sql)
    } else {
        Vec::new()
    };
    let mut waited = None;
    let mut attempt = 0;
    loop {
        session
            .set_timeouts(settings)
            .await
            .map_err(|e| Failure::from_error(Stage::Migrate, Some(history), &e))?;
        let mut ran = 0;
        let step = Step {
            history,
            file,
            parts: no_transaction.then_some(parts.as_slice()),
        };
        let (client, observer, target, pid) = session.split();
        let look = Look {
            observer,
            target,
            pid,
            lock_timeout: settings.lock_timeout,
        };
        let result = look.observe(step.run(client, &mut ran), &mut waited).await;
        let Err(mut failure) = result else { return Ok(()) };
        failure.migration = Some(id.clone());
        if !failure.is_lock_timeout() {
            if no_transaction && ran > 0 {
                note_partial(session, &mut failure, ran, parts.len()).await;
            }
            return Err(failure);
        }
        tries.lock_timeouts += 1;
        if attempt >= settings.lock_retries {
            return Err(gave_up(failure, settings, attempt + 1, waited.as_ref()));
        }
        attempt += 1;
        tries.retries += 1;
        let pause = settings.backoff(attempt);
        tracing::warn!(
            migration = %id, %history, retry = attempt, pause_ms = pause.as_millis() as u64,
            waited_for = waited.as_ref().map(describe_wait).unwrap_or_default(),
            "migration hit the lock timeout; trying again"
        );
        tokio::time::sleep(pause).await;
    }
}

/// One try of one file.
struct Step<'a> {
    history: History,
    file: &'a Migration,
    /// The statements of a no-transaction file; `None`: one transaction.
    parts: Option<&'a [String]>,
}

impl Step<'_> {
    /// Runs the file and writes its history row; counts in `ran` the
    /// statements of a no-transaction file that succeeded.
    async fn run(&self, client: &mut Client, ran: &mut usize) -> Result<(), Failure> {
        let failed = |e: tokio_postgres::Error| Failure::from_error(Stage::Migrate, Some(self.history), &e);
        let (table, version, name) = (self.history.table(), self.version(), self.file.name());
        let checksum = self.file.checksum().to_string();
        match self.parts {
            None => {
                let tx = client.transaction().await.map_err(failed)?;
                tx.batch_execute(self.file.sql().unwrap_or_default())
                    .await
                    .map_err(failed)?;
                store::migration_record(&tx, table, version, name, &checksum)
                    .await
                    .map_err(failed)?;
                tx.commit().await.map_err(failed)
            }
            Some(parts) => {
                for statement in parts {
                    client.batch_execute(statement).await.map_err(failed)?;
                    *ran += 1;
                }
                store::migration_record(&*client, table, version, name, &checksum)
                    .await
                    .map_err(failed)
            }
        }
    }

    fn version(&self) -> i32 {
        i32::try_from(self.file.version()).unwrap_or(i32::MAX)
    }
}

/// Where to look at what a running try waits for.
struct Look<'a> {
    observer: &'a mut Option<Client>,
    target: &'a crate::config::Target,
    pid: i32,
    lock_timeout: Duration,
}

impl Look<'_> {
    /// Runs one try; when it takes more than half the lock timeout, looks
    /// (once) at what it waits for and keeps that in `waited`.
    async fn observe<F>(self, work: F, waited: &mut Option<MigrationLockWait>) -> Result<(), Failure>
    where
        F: std::future::Future<Output = Result<(), Failure>>,
    {
        tokio::pin!(work);
        if self.lock_timeout.is_zero() {
            return work.await;
        }
        let look_after = (self.lock_timeout / 2).max(Duration::from_millis(10));
        tokio::select! {
            done = &mut work => return done,
            () = tokio::time::sleep(look_after) => {}
        }
        if let Some(wait) = Session::lock_wait(self.observer, self.target, self.pid).await {
            *waited = Some(wait);
        }
        work.await
    }
}

/// The failure after the last try hit the lock timeout.
fn gave_up(last: Failure, settings: &Settings, tries: u32, waited: Option<&MigrationLockWait>) -> Failure {
    let what = waited.map_or_else(|| "a lock (which one could not be seen)".to_string(), describe_wait);
    let mut failure = Failure::new(
        Stage::LockTimeout,
        last.history,
        format!(
            "waited for {what} longer than the lock timeout ({}) in each of {tries} tries; \
             every try was rolled back. End or wait out the session holding the lock, then run again. \
             Last error: {}",
            humantime::format_duration(settings.lock_timeout),
            last.message
        ),
    );
    failure.migration = last.migration;
    failure.sqlstate = last.sqlstate;
    failure
}

fn describe_wait(w: &MigrationLockWait) -> String {
    let holders = if w.holders.is_empty() {
        String::new()
    } else {
        format!(", held by {}", w.holders.join(", "))
    };
    format!("{} on {}{holders}", w.mode, w.object)
}

/// Adds to the failure of a no-transaction file what stays applied.
async fn note_partial(session: &Session, failure: &mut Failure, ran: usize, total: usize) {
    let invalid = store::migration_invalid_indexes(&session.client)
        .await
        .unwrap_or_default();
    let invalid = if invalid.is_empty() {
        String::new()
    } else {
        format!("; INVALID indexes in this database now: {}", invalid.join(", "))
    };
    failure.message.push_str(&format!(
        " (no-transaction migration: {ran} of its {total} statements ran before this one and stay applied{invalid}; \
         the next run starts it again from its first statement)"
    ));
}
