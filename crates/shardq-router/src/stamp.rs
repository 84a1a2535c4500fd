//! Fleet stamps: every database carries the fleet's id and its name in the
//! fleet (the shard's name, or `master`), written at migrate time. The
//! migrator refuses a database stamped for another shard or fleet, and a
//! router checks each shard's stamp after connecting ([`check`]), so an
//! address that leads to the wrong database is an error naming both.

use std::time::Duration;

use crate::database::Database;
use crate::error::{Error, Result};
use crate::store;

/// The name the master's stamp carries.
pub(crate) const MASTER_NAME: &str = "master";

/// Longest wait for one database's stamp when a router checks it.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// A database's stamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stamp {
    /// The fleet id (a UUID, as text).
    pub(crate) fleet: String,
    /// The database's name in the fleet: a shard's name, or `master`.
    pub(crate) name: String,
}

impl From<(String, String)> for Stamp {
    fn from((fleet, name): (String, String)) -> Stamp {
        Stamp { fleet, name }
    }
}

/// How a database's stamp differs from what the configuration says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Mismatch {
    /// It is stamped with another name: the address leads to another
    /// database of the fleet (or of another fleet).
    Name {
        /// The name in the stamp.
        found: String,
    },
    /// It is stamped with the right name by another fleet.
    Fleet {
        /// This fleet's id (the master's).
        expected: String,
        /// The id in the stamp.
        found: String,
    },
}

/// Compares `found` with a database the configuration calls `name`, in the
/// fleet `fleet` (`None`: not known, only the name is compared).
pub(crate) fn compare(name: &str, fleet: Option<&str>, found: &Stamp) -> Option<Mismatch> {
    if found.name != name {
        return Some(Mismatch::Name {
            found: found.name.clone(),
        });
    }
    match fleet {
        Some(expected) if expected != found.fleet => Some(Mismatch::Fleet {
            expected: expected.to_string(),
            found: found.fleet.clone(),
        }),
        _ => None,
    }
}

/// Reads one database's stamp within [`CHECK_TIMEOUT`]; `None` when it has
/// none, cannot be reached, or does not answer in time (those are the
/// schema check's to report).
async fn read(db: &Database) -> Option<Stamp> {
    match tokio::time::timeout(CHECK_TIMEOUT, store::fleet_stamp(db)).await {
        Ok(Ok(found)) => found.map(Stamp::from),
        Ok(Err(e)) => {
            tracing::debug!(database = %db.name, error = %e, "stamp not read");
            None
        }
        Err(_) => None,
    }
}

/// Checks the stamp of every shard of `shards` against its configured name
/// and the master's fleet id: the first shard stamped as another shard
/// ([`Error::ShardStampedAsAnother`]) or by another fleet
/// ([`Error::ShardOfAnotherFleet`]) is the error. Unstamped shards, and
/// those that cannot be reached, pass here: the schema check leaves them
/// out of new placements until they are migrated. A master that cannot be
/// read (or is not stamped) leaves only the names compared.
pub(crate) async fn check(master: &Database, shards: &[Database]) -> Result<()> {
    let fleet = read(master).await.filter(|s| s.name == MASTER_NAME).map(|s| s.fleet);
    let found = futures::future::join_all(shards.iter().map(read)).await;
    for (db, found) in shards.iter().zip(found) {
        let Some(found) = found else { continue };
        match compare(&db.name, fleet.as_deref(), &found) {
            None => {}
            Some(Mismatch::Name { found }) => {
                return Err(Error::ShardStampedAsAnother {
                    shard: db.name.clone(),
                    target: db.target.clone(),
                    found,
                })
            }
            Some(Mismatch::Fleet { expected, found }) => {
                return Err(Error::ShardOfAnotherFleet {
                    shard: db.name.clone(),
                    target: db.target.clone(),
                    fleet: expected,
                    found,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(fleet: &str, name: &str) -> Stamp {
        Stamp {
            fleet: fleet.into(),
            name: name.into(),
        }
    }

    #[test]
    fn a_stamp_matches_only_its_own_name_and_fleet() {
        assert_eq!(compare("shard_1", Some("f1"), &stamp("f1", "shard_1")), None);
        assert_eq!(compare("shard_1", None, &stamp("f1", "shard_1")), None);
        assert_eq!(
            compare("shard_1", Some("f1"), &stamp("f1", "shard_2")),
            Some(Mismatch::Name {
                found: "shard_2".into()
            })
        );
        assert_eq!(
            compare("shard_1", None, &stamp("f2", "shard_2")),
            Some(Mismatch::Name {
                found: "shard_2".into()
            })
        );
        assert_eq!(
            compare("shard_1", Some("f1"), &stamp("f2", "shard_1")),
            Some(Mismatch::Fleet {
                expected: "f1".into(),
                found: "f2".into()
            })
        );
    }
}
