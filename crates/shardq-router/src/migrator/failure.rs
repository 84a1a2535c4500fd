//! Why one database could not be migrated, with the full Postgres error text.

use std::error::Error as StdError;

use serde::Serialize;

use super::plan::{Divergence, MigrationId};
use super::sources::History;

/// The step at which a database failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Opening the connection (server down, wrong password, no such database).
    Connect,
    /// Taking the migration advisory lock.
    Lock,
    /// Reading a history table.
    ReadHistory,
    /// The history does not match the files; nothing was run.
    Diverged,
    /// Running a migration.
    Migrate,
    /// A migration waited for a lock longer than the lock timeout at every
    /// try; it was rolled back each time.
    LockTimeout,
    /// The database's deadline passed before its work was done; the
    /// statement running then was cancelled.
    TimedOut,
    /// The database is stamped for another shard or another fleet: the
    /// address leads to another database than the configuration means;
    /// nothing was run.
    Stamp,
    /// The migrator itself failed on this database (a bug); the other
    /// databases are not affected.
    Panicked,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Connect => "cannot connect",
            Stage::Lock => "cannot take the migration lock",
            Stage::ReadHistory => "cannot read the migration history",
            Stage::Diverged => "history diverged from the migration files",
            Stage::Migrate => "migration failed",
            Stage::LockTimeout => "lock timeout",
            Stage::TimedOut => "deadline passed",
            Stage::Stamp => "stamped as another database",
            Stage::Panicked => "internal error",
        })
    }
}

/// Why one database failed. The other databases are not affected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// The step that failed.
    pub stage: Stage,
    /// The history being read or migrated, if the failure is inside one.
    pub history: Option<History>,
    /// The migration that failed, for [`Stage::Migrate`].
    pub migration: Option<MigrationId>,
    /// The SQLSTATE of the Postgres error, when the server reported one.
    pub sqlstate: Option<String>,
    /// The full error text: for a server error its severity, SQLSTATE,
    /// message, detail, hint and context; otherwise the error and its causes.
    pub message: String,
    /// The mismatches, for [`Stage::Diverged`].
    pub divergences: Vec<Divergence>,
}

impl Failure {
    /// A failure caused by `error` (any error; its source chain is searched
    /// for a Postgres error).
    pub(crate) fn from_error(stage: Stage, history: Option<History>, error: &(dyn StdError + 'static)) -> Failure {
        let (sqlstate, message) = describe(error);
        Failure {
            stage,
            history,
            migration: None,
            sqlstate,
            message,
            divergences: Vec::new(),
        }
    }

    /// A failure described by the migrator itself (no Postgres error).
    pub(crate) fn new(stage: Stage, history: Option<History>, message: String) -> Failure {
        Failure {
            stage,
            history,
            migration: None,
            sqlstate: None,
            message,
            divergences: Vec::new(),
        }
    }

    /// Whether Postgres cancelled the statement for its lock timeout.
    pub(crate) fn is_lock_timeout(&self) -> bool {
        self.sqlstate.as_deref() == Some(LOCK_NOT_AVAILABLE)
    }

    /// A refusal to run a diverged history.
    pub(crate) fn diverged(history: History, divergences: Vec<Divergence>) -> Failure {
        let message = divergences
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        Failure {
            stage: Stage::Diverged,
            history: Some(history),
            migration: None,
            sqlstate: None,
            message,
            divergences,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.stage)?;
        match (&self.history, &self.migration) {
            (Some(h), Some(m)) => write!(f, " ({h} {m})")?,
            (Some(h), None) => write!(f, " ({h})")?,
            _ => {}
        }
        write!(f, ": {}", self.message)
    }
}

/// SQLSTATE 55P03, `lock_not_available`: what a lock timeout raises.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// The SQLSTATE and full text of an error: the Postgres fields when a
/// `tokio_postgres::Error` carrying a server error is in the chain, else
/// the chain's messages joined with `: `.
pub(crate) fn describe(error: &(dyn StdError + 'static)) -> (Option<String>, String) {
    if let Some(db) = chain(error).find_map(|e| e.downcast_ref::<tokio_postgres::Error>()?.as_db_error()) {
        return (Some(db.code().code().to_string()), describe_db(db));
    }
    let mut parts: Vec<String> = Vec::new();
    for e in chain(error) {
        let text = e.to_string();
        // refinery repeats its cause inside its own message; skip repeats.
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    (None, parts.join(": "))
}

fn describe_db(db: &tokio_postgres::error::DbError) -> String {
    let mut text = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
    let fields = [("detail", db.detail()), ("hint", db.hint()), ("where", db.where_())];
    for (label, value) in fields {
        if let Some(v) = value {
            text.push_str(&format!("; {label}: {v}"));
        }
    }
    text
}

fn chain<'a>(error: &'a (dyn StdError + 'static)) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(error), |e: &&'a (dyn StdError + 'static)| (*e).source())
}
