//! [`MigrationReport`]: what `migrate` did (or, in a dry run, would do) on
//! every database.

use std::time::Duration;

use serde::{Serialize, Serializer};

use super::failure::Failure;
use super::plan::{Ahead, MigrationId};
use super::sources::{History, Role};
use super::table::{version, write_table};

/// The outcome of one run over the fleet. A database that failed is in
/// here too; see [`MigrationReport::failed`].
#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    /// True when nothing was run: `applied` lists what would run.
    pub dry_run: bool,
    /// The application target version, if one was given.
    pub target: Option<u32>,
    /// One entry per database that was worked on, the master first, then
    /// the canary shard (if any), then the other shards in config order.
    pub databases: Vec<DatabaseReport>,
    /// The canary shard, when one was named: it ran (after the master)
    /// before any other shard.
    pub canary: Option<String>,
    /// The shards left untouched because the master or the canary failed.
    pub untouched: Vec<String>,
}

/// What happened on one database.
#[derive(Debug, Clone, Serialize)]
pub struct DatabaseReport {
    /// `master` or the shard's name.
    pub database: String,
    /// Master or shard.
    pub role: Role,
    /// The address, without the password.
    pub target: String,
    /// The platform history; `None` when the run stopped before reading it.
    pub platform: Option<HistoryReport>,
    /// The application history; `None` when no application folder is
    /// configured for this role or the run stopped before reading it.
    pub application: Option<HistoryReport>,
    /// Wall time spent on this database, including waiting for the lock.
    #[serde(rename = "duration_ms", serialize_with = "millis")]
    pub duration: Duration,
    /// Tries of migrations beyond their first, after lock timeouts.
    pub retries: u32,
    /// Tries cancelled by the lock timeout (each rolled back).
    pub lock_timeouts: u32,
    /// Whether the database's deadline passed (then `error` says where).
    pub timed_out: bool,
    /// The histories that hold versions this binary does not know (a newer
    /// release migrated the database). When not empty nothing was run on
    /// this database; it is not a failure.
    pub ahead: Vec<Ahead>,
    /// The fleet id the database is stamped with after the run; `None`
    /// when it is not stamped (a shard migrated while the master's fleet id
    /// could not be read: run again with the master reachable).
    pub fleet_id: Option<String>,
    /// Why the database failed; `None` when it succeeded.
    pub error: Option<Failure>,
}

/// One history of one database, before and after the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryReport {
    /// Which history.
    pub history: History,
    /// Highest applied version before the run (`None`: nothing applied).
    pub version_before: Option<u32>,
    /// The migrations applied by this run, in order (in a dry run: the ones
    /// that would be applied).
    pub applied: Vec<MigrationId>,
    /// Highest applied version after the run (in a dry run: after the
    /// migrations that would be applied).
    pub version_after: Option<u32>,
}

impl MigrationReport {
    /// Whether any database failed (a canary that failed included).
    pub fn failed(&self) -> bool {
        self.databases.iter().any(|d| d.error.is_some())
    }

    /// The databases left alone because they are ahead of this binary.
    pub fn ahead(&self) -> impl Iterator<Item = &DatabaseReport> {
        self.databases.iter().filter(|d| !d.ahead.is_empty())
    }

    /// The databases that failed.
    pub fn failures(&self) -> impl Iterator<Item = &DatabaseReport> {
        self.databases.iter().filter(|d| d.error.is_some())
    }

    /// The report of one database (`master` or a shard name).
    pub fn database(&self, name: &str) -> Option<&DatabaseReport> {
        self.databases.iter().find(|d| d.database == name)
    }

    /// Number of migrations applied (or, in a dry run, to apply) over all databases.
    pub fn applied_count(&self) -> usize {
        self.databases.iter().map(DatabaseReport::applied_count).sum()
    }
}

impl DatabaseReport {
    /// An empty report of one database, filled in as the work goes.
    pub(crate) fn new(database: &str, role: Role, target: String) -> DatabaseReport {
        DatabaseReport {
            database: database.to_string(),
            role,
            target,
            platform: None,
            application: None,
            duration: Duration::ZERO,
            retries: 0,
            lock_timeouts: 0,
            timed_out: false,
            ahead: Vec::new(),
            fleet_id: None,
            error: None,
        }
    }

    /// The report of a database whose task failed unexpectedly.
    pub(crate) fn panicked(database: &str, role: Role, target: String, message: String) -> DatabaseReport {
        let mut report = DatabaseReport::new(database, role, target);
        report.error = Some(Failure::new(super::failure::Stage::Panicked, None, message));
        report
    }

    /// Where a history's report goes.
    pub(crate) fn slot(&mut self, history: History) -> &mut Option<HistoryReport> {
        match history {
            History::Platform => &mut self.platform,
            History::Application => &mut self.application,
        }
    }

    /// The report of one history, if it was reached.
    pub fn history(&self, history: History) -> Option<&HistoryReport> {
        match history {
            History::Platform => self.platform.as_ref(),
            History::Application => self.application.as_ref(),
        }
    }

    /// Number of migrations applied (or to apply) on this database, both histories.
    pub fn applied_count(&self) -> usize {
        self.histories().map(|h| h.applied.len()).sum()
    }

    fn histories(&self) -> impl Iterator<Item = &HistoryReport> {
        self.platform.iter().chain(self.application.iter())
    }
}

fn millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn result(d: &DatabaseReport) -> &'static str {
    match (&d.error, d.timed_out, d.ahead.is_empty()) {
        (Some(_), true, _) => "TIMED OUT",
        (Some(_), false, _) => "FAILED",
        (None, _, false) => "ahead of this binary",
        (None, _, true) => "ok",
    }
}

fn versions(h: Option<&HistoryReport>) -> String {
    h.map_or_else(
        || "-".to_string(),
        |h| format!("{} → {}", version(h.version_before), version(h.version_after)),
    )
}

impl std::fmt::Display for MigrationReport {
    /// A table (one row per database), then what ran where, then each failure in full.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.dry_run { "would apply" } else { "applied" };
        let rows: Vec<Vec<String>> = self
            .databases
            .iter()
            .map(|d| {
                vec![
                    d.database.clone(),
                    d.target.clone(),
                    versions(d.platform.as_ref()),
                    versions(d.application.as_ref()),
                    d.applied_count().to_string(),
                    d.retries.to_string(),
                    format!("{} ms", d.duration.as_millis()),
                    result(d).into(),
                ]
            })
            .collect();
        write_table(
            f,
            &[
                "database",
                "address",
                "platform",
                "application",
                verb,
                "retries",
                "took",
                "result",
            ],
            &rows,
        )?;
        self.write_applied(f, verb)?;
        self.write_failures(f)?;
        for d in self.ahead() {
            for a in &d.ahead {
                writeln!(f, "\n{} ({}) left alone: {a}", d.database, d.target)?;
            }
        }
        if !self.untouched.is_empty() {
            writeln!(
                f,
                "\ncanary {} failed: these shards were not touched: {}",
                self.canary.as_deref().unwrap_or("(master)"),
                self.untouched.join(", ")
            )?;
        }
        self.write_summary(f)
    }
}

impl MigrationReport {
    fn write_applied(&self, f: &mut std::fmt::Formatter<'_>, verb: &str) -> std::fmt::Result {
        let lines: Vec<String> = self
            .databases
            .iter()
            .flat_map(|d| {
                d.histories().filter(|h| !h.applied.is_empty()).map(move |h| {
                    let names: Vec<String> = h.applied.iter().map(ToString::to_string).collect();
                    format!("  {} {}: {}", d.database, h.history, names.join(", "))
                })
            })
            .collect();
        if !lines.is_empty() {
            writeln!(f, "\n{verb}:")?;
            for l in lines {
                writeln!(f, "{l}")?;
            }
        }
        Ok(())
    }

    fn write_failures(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for d in self.failures() {
            if let Some(e) = &d.error {
                let lock_timeouts = match d.lock_timeouts {
                    0 => String::new(),
                    n => format!(" [{n} lock timeout(s), {} retries]", d.retries),
                };
                writeln!(f, "\n{} ({}) FAILED: {e}{lock_timeouts}", d.database, d.target)?;
            }
        }
        Ok(())
    }

    fn write_summary(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let failed = self.failures().count();
        let total = self.databases.len();
        writeln!(f)?;
        match (self.dry_run, failed) {
            (true, 0) => writeln!(f, "dry run: nothing was changed on {total} database(s)"),
            (false, 0) => {
                let ahead = self.ahead().count();
                write!(
                    f,
                    "{} database(s) migrated, {} migration(s) applied",
                    total - ahead,
                    self.applied_count()
                )?;
                match ahead {
                    0 => writeln!(f),
                    n => writeln!(f, "; {n} database(s) ahead of this binary left alone"),
                }
            }
            (dry, _) if self.untouched.is_empty() => writeln!(
                f,
                "{failed} of {total} database(s) FAILED{}; the others are unaffected. \
                 Fix the cause and run again: databases already migrated will do nothing.",
                if dry { " (dry run)" } else { "" }
            ),
            (dry, _) => writeln!(
                f,
                "{failed} of {total} database(s) FAILED{}; {} shard(s) not touched. \
                 Fix the cause and run again.",
                if dry { " (dry run)" } else { "" },
                self.untouched.len()
            ),
        }
    }
}
