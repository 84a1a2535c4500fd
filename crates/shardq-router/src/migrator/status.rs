//! [`StatusReport`]: the version matrix of the fleet, with the databases that
//! lag behind the files and those whose history diverged from them.

use serde::Serialize;

use super::failure::Failure;
use super::plan::{Ahead, Divergence, MigrationId};
use super::sources::{History, Role};
use super::table::{version, write_table};

/// The schema state of every selected database.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// One entry per database, the master first, then shards in config order.
    pub databases: Vec<DatabaseStatus>,
}

/// The schema state of one database.
#[derive(Debug, Clone, Serialize)]
pub struct DatabaseStatus {
    /// `master` or the shard's name.
    pub database: String,
    /// Master or shard.
    pub role: Role,
    /// The address, without the password.
    pub target: String,
    /// The platform history; `None` when the database could not be read.
    pub platform: Option<HistoryStatus>,
    /// The application history; `None` when no application folder is
    /// configured for this role or the database could not be read.
    pub application: Option<HistoryStatus>,
    /// Why the database could not be read (unreachable, no permission).
    pub error: Option<Failure>,
    /// Summary of the above.
    pub state: State,
}

/// One history of one database compared with its files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryStatus {
    /// Which history.
    pub history: History,
    /// Highest applied version (`None`: nothing applied).
    pub applied: Option<u32>,
    /// Highest version among the files.
    pub latest: Option<u32>,
    /// Files not applied yet, in order.
    pub pending: Vec<MigrationId>,
    /// Mismatches between the history and the files.
    pub divergences: Vec<Divergence>,
    /// Set when the history holds versions above every file (a newer
    /// release migrated it); `migrate` leaves such a database alone.
    pub ahead: Option<Ahead>,
}

/// The summary state of one database, worst first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// The database could not be read.
    Unreachable,
    /// A history no longer matches the files; `migrate` refuses to run here.
    Diverged,
    /// A history holds versions this binary does not know (applied by a
    /// newer release); `migrate` leaves it alone. Not an error.
    Ahead,
    /// Some history's applied version is below the latest file version.
    Behind,
    /// Every history is at its latest file version.
    UpToDate,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Unreachable => "UNREACHABLE",
            State::Diverged => "DIVERGED",
            State::Ahead => "ahead of this binary",
            State::Behind => "behind",
            State::UpToDate => "up to date",
        })
    }
}

impl HistoryStatus {
    /// Whether the applied version is below the latest file version.
    pub fn lagging(&self) -> bool {
        match (self.applied, self.latest) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(a), Some(l)) => a < l,
        }
    }

    /// Whether the history no longer matches the files.
    pub fn diverged(&self) -> bool {
        !self.divergences.is_empty()
    }
}

impl DatabaseStatus {
    /// Builds a status and its summary state.
    pub(crate) fn new(
        database: String,
        role: Role,
        target: String,
        histories: Result<(HistoryStatus, Option<HistoryStatus>), Failure>,
    ) -> DatabaseStatus {
        let (platform, application, error) = match histories {
            Ok((p, a)) => (Some(p), a, None),
            Err(e) => (None, None, Some(e)),
        };
        let all: Vec<&HistoryStatus> = platform.iter().chain(application.iter()).collect();
        let state = if error.is_some() {
            State::Unreachable
        } else if all.iter().any(|h| h.diverged()) {
            State::Diverged
        } else if all.iter().any(|h| h.ahead.is_some()) {
            State::Ahead
        } else if all.iter().any(|h| h.lagging()) {
            State::Behind
        } else {
            State::UpToDate
        };
        DatabaseStatus {
            database,
            role,
            target,
            platform,
            application,
            error,
            state,
        }
    }

    /// The divergences of both histories.
    pub fn divergences(&self) -> impl Iterator<Item = &Divergence> {
        self.platform
            .iter()
            .chain(self.application.iter())
            .flat_map(|h| h.divergences.iter())
    }
}

impl StatusReport {
    /// Whether any database diverged or could not be read: the cases a
    /// person must look at (`shardq migrate status` exits non-zero).
    pub fn has_errors(&self) -> bool {
        self.databases
            .iter()
            .any(|d| matches!(d.state, State::Diverged | State::Unreachable))
    }

    /// The databases whose history diverged from the files.
    pub fn diverged(&self) -> Vec<&str> {
        self.named(State::Diverged)
    }

    /// The databases behind the latest file version (and not diverged).
    pub fn lagging(&self) -> Vec<&str> {
        self.named(State::Behind)
    }

    /// The databases ahead of this binary (migrated by a newer release).
    pub fn ahead(&self) -> Vec<&str> {
        self.named(State::Ahead)
    }

    /// The status of one database (`master` or a shard name).
    pub fn database(&self, name: &str) -> Option<&DatabaseStatus> {
        self.databases.iter().find(|d| d.database == name)
    }

    fn named(&self, state: State) -> Vec<&str> {
        self.databases
            .iter()
            .filter(|d| d.state == state)
            .map(|d| d.database.as_str())
            .collect()
    }
}

fn cell(h: Option<&HistoryStatus>) -> String {
    match h {
        None => "-".into(),
        Some(h) => format!("{}/{}", version(h.applied), version(h.latest)),
    }
}

impl std::fmt::Display for StatusReport {
    /// The matrix (applied/latest per history), then every divergence and
    /// unreachable database in full, then a one-line verdict.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rows: Vec<Vec<String>> = self
            .databases
            .iter()
            .map(|d| {
                vec![
                    d.database.clone(),
                    d.target.clone(),
                    cell(d.platform.as_ref()),
                    cell(d.application.as_ref()),
                    d.state.to_string(),
                ]
            })
            .collect();
        write_table(f, &["database", "address", "platform", "application", "state"], &rows)?;
        for d in &self.databases {
            for div in d.divergences() {
                writeln!(f, "\n{} DIVERGED: {div}", d.database)?;
            }
            for a in d
                .platform
                .iter()
                .chain(d.application.iter())
                .filter_map(|h| h.ahead.as_ref())
            {
                writeln!(f, "\n{} {a}", d.database)?;
            }
            if let Some(e) = &d.error {
                writeln!(f, "\n{} UNREACHABLE: {e}", d.database)?;
            }
        }
        let (diverged, lagging) = (self.diverged(), self.lagging());
        writeln!(f)?;
        if !diverged.is_empty() {
            writeln!(
                f,
                "diverged: {} (migrate refuses to run there; restore the original files or repair the history by hand)",
                diverged.join(", ")
            )?;
        }
        if !lagging.is_empty() {
            writeln!(f, "behind: {} (run `shardq migrate`)", lagging.join(", "))?;
        }
        let ahead = self.named(State::Ahead);
        if !ahead.is_empty() {
            writeln!(
                f,
                "ahead of this binary: {} (migrated by a newer release; run that release's migrate)",
                ahead.join(", ")
            )?;
        }
        if diverged.is_empty() && lagging.is_empty() && ahead.is_empty() && !self.has_errors() {
            writeln!(f, "all {} database(s) up to date", self.databases.len())?;
        }
        Ok(())
    }
}
