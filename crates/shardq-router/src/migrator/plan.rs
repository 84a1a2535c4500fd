//! What a history needs: the applied rows compared with the files, giving
//! the pending migrations or the divergences that forbid running any.

use refinery::Migration;
use serde::Serialize;

use super::sources::History;
use super::statements::equivalent_checksums;
use crate::store::MigrationHistoryRow;

/// A migration named the way its file is: `V{version}__{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrationId {
    /// The version number.
    pub version: u32,
    /// The name after `V{n}__`.
    pub name: String,
}

impl MigrationId {
    pub(crate) fn of(m: &Migration) -> MigrationId {
        MigrationId {
            version: m.version(),
            name: m.name().to_string(),
        }
    }
}

impl std::fmt::Display for MigrationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "V{}__{}", self.version, self.name)
    }
}

/// Why a database's history no longer matches the migration files. Never
/// repaired automatically: a person decides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum DivergenceReason {
    /// The file of an applied migration was edited after it was applied.
    ChecksumChanged,
    /// The file with an applied version now has another name.
    Renamed {
        /// The name the file has now.
        file_name: String,
    },
    /// An applied version has no file any more.
    MissingFromFiles,
    /// A file's version is below the applied version but it was never applied
    /// (added out of order).
    NeverApplied {
        /// The highest applied version.
        applied_version: u32,
    },
}

/// One mismatch between a database's history and the files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Divergence {
    /// Which history.
    pub history: History,
    /// The migration as the database recorded it (or as the file names it,
    /// for [`DivergenceReason::NeverApplied`]).
    pub migration: MigrationId,
    /// What does not match.
    #[serde(flatten)]
    pub reason: DivergenceReason,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (h, m) = (self.history, &self.migration);
        match &self.reason {
            DivergenceReason::ChecksumChanged => {
                write!(
                    f,
                    "{h} migration {m} was edited after it was applied (checksum differs)"
                )
            }
            DivergenceReason::Renamed { file_name } => write!(
                f,
                "{h} migration {m} was applied, but the file of version {} is now named {file_name:?}",
                m.version
            ),
            DivergenceReason::MissingFromFiles => {
                write!(
                    f,
                    "{h} migration {m} was applied, but no file has version {}",
                    m.version
                )
            }
            DivergenceReason::NeverApplied { applied_version } => write!(
                f,
                "{h} migration {m} is older than the applied version {applied_version} but was never applied"
            ),
        }
    }
}

/// A history that holds versions above every file of this binary: a newer
/// release migrated the database. It is left alone, not reported divergent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ahead {
    /// Which history.
    pub history: History,
    /// The highest version applied to the database.
    pub applied: u32,
    /// The highest version this binary has a file for (`None`: no file).
    pub known: Option<u32>,
    /// The applied migrations this binary has no file for, in order.
    pub unknown: Vec<MigrationId>,
}

impl std::fmt::Display for Ahead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} history ahead of this binary (applied V{}, ",
            self.history, self.applied
        )?;
        match self.known {
            Some(k) => write!(f, "this binary knows up to V{k})"),
            None => write!(f, "this binary has no migration files for it)"),
        }
    }
}

/// The comparison of one history of one database with its files.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// Highest applied version.
    pub current: Option<u32>,
    /// Highest file version.
    pub latest: Option<u32>,
    /// Files to apply, in order, up to the target.
    pub pending: Vec<MigrationId>,
    /// Mismatches; when not empty nothing may run.
    pub divergences: Vec<Divergence>,
    /// Set when the database holds versions above every file; nothing may
    /// run then either.
    pub ahead: Option<Ahead>,
}

/// Compares applied rows with the (sorted) files: every applied version up
/// to the latest file must have its file, unchanged (a line-ending change
/// is no change) and under the same name; every file at or below the
/// applied version must be applied. Versions above the latest file make the
/// history [`Ahead`]. A plan without divergences and not ahead is exactly
/// what the apply step runs.
pub(crate) fn plan(
    history: History,
    applied: &[MigrationHistoryRow],
    files: &[Migration],
    target: Option<u32>,
) -> Plan {
    let current = applied.iter().filter_map(|r| u32::try_from(r.version).ok()).max();
    let latest = files.iter().map(Migration::version).max();
    let is_ahead = |row: &MigrationHistoryRow| !matches!(latest, Some(l) if i64::from(row.version) <= i64::from(l));
    let unknown: Vec<MigrationId> = applied
        .iter()
        .filter(|r| r.version >= 0 && is_ahead(r))
        .map(|r| MigrationId {
            version: u32::try_from(r.version).unwrap_or(0),
            name: r.name.clone(),
        })
        .collect();
    let ahead = current.filter(|_| !unknown.is_empty()).map(|applied| Ahead {
        history,
        applied,
        known: latest,
        unknown,
    });
    let mut divergences: Vec<Divergence> = applied
        .iter()
        .filter(|r| r.version < 0 || !is_ahead(r))
        .filter_map(|row| check_applied(history, row, files))
        .collect();
    let mut pending = Vec::new();
    for file in files {
        if applied
            .iter()
            .any(|r| i64::from(r.version) == i64::from(file.version()))
        {
            continue;
        }
        match current {
            Some(c) if file.version() <= c => divergences.push(Divergence {
                history,
                migration: MigrationId::of(file),
                reason: DivergenceReason::NeverApplied { applied_version: c },
            }),
            _ if target.is_some_and(|t| file.version() > t) => {}
            _ => pending.push(MigrationId::of(file)),
        }
    }
    Plan {
        current,
        latest,
        pending,
        divergences,
        ahead,
    }
}

fn check_applied(history: History, row: &MigrationHistoryRow, files: &[Migration]) -> Option<Divergence> {
    let migration = MigrationId {
        version: u32::try_from(row.version).unwrap_or(0),
        name: row.name.clone(),
    };
    let reason = match files.iter().find(|f| i64::from(f.version()) == i64::from(row.version)) {
        None => DivergenceReason::MissingFromFiles,
        Some(f) if f.name() != row.name => DivergenceReason::Renamed {
            file_name: f.to_string(),
        },
        Some(f) if !equivalent_checksums(f).contains(&row.checksum) => DivergenceReason::ChecksumChanged,
        Some(_) => return None,
    };
    Some(Divergence {
        history,
        migration,
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, sql: &str) -> Migration {
        Migration::unapplied(name, sql).expect("valid name")
    }

    fn row(m: &Migration) -> MigrationHistoryRow {
        MigrationHistoryRow {
            version: m.version() as i32,
            name: m.name().into(),
            checksum: m.checksum().to_string(),
        }
    }

    #[test]
    fn pending_stops_at_target() {
        let files = [file("V1__a", "x"), file("V2__b", "y"), file("V3__c", "z")];
        let p = plan(History::Application, &[row(&files[0])], &files, Some(2));
        assert_eq!(p.current, Some(1));
        assert_eq!(p.latest, Some(3));
        assert_eq!(p.pending.iter().map(|m| m.version).collect::<Vec<_>>(), vec![2]);
        assert!(p.divergences.is_empty());
    }

    #[test]
    fn edited_renamed_missing_and_out_of_order_are_divergences() {
        let old = [file("V1__a", "x"), file("V2__b", "y"), file("V4__d", "w")];
        let now = [
            file("V1__a", "edited"),
            file("V2__bee", "y"),
            file("V3__c", "z"),
            file("V5__e", "v"),
        ];
        let p = plan(History::Platform, &old.iter().map(row).collect::<Vec<_>>(), &now, None);
        let reasons: Vec<_> = p
            .divergences
            .iter()
            .map(|d| (d.migration.version, d.reason.clone()))
            .collect();
        assert_eq!(
            reasons,
            vec![
                (1, DivergenceReason::ChecksumChanged),
                (
                    2,
                    DivergenceReason::Renamed {
                        file_name: "V2__bee".into()
                    }
                ),
                (4, DivergenceReason::MissingFromFiles),
                (3, DivergenceReason::NeverApplied { applied_version: 4 }),
            ]
        );
        assert_eq!(p.pending.iter().map(|m| m.version).collect::<Vec<_>>(), vec![5]);
        assert!(p.ahead.is_none());
    }

    #[test]
    fn versions_above_every_file_are_ahead_not_divergent() {
        let newer = [file("V1__a", "x"), file("V2__b", "y"), file("V3__c", "z")];
        let rows: Vec<_> = newer.iter().map(row).collect();
        let p = plan(History::Platform, &rows, &newer[..2], None);
        assert!(p.divergences.is_empty(), "{:?}", p.divergences);
        assert!(p.pending.is_empty());
        let ahead = p.ahead.expect("ahead");
        assert_eq!((ahead.applied, ahead.known), (3, Some(2)));
        assert_eq!(ahead.unknown, vec![MigrationId::of(&newer[2])]);
        assert_eq!(
            ahead.to_string(),
            "platform history ahead of this binary (applied V3, this binary knows up to V2)"
        );
    }

    #[test]
    fn a_row_recorded_from_a_crlf_checkout_matches_the_lf_file() {
        let crlf = file("V1__a", "CREATE TABLE a (id int);\r\n");
        let lf = file("V1__a", "CREATE TABLE a (id int);\n");
        let p = plan(History::Application, &[row(&crlf)], &[lf], None);
        assert!(p.divergences.is_empty(), "{:?}", p.divergences);
    }
}
