//! The fix an error suggests: a database that cannot be reached (its
//! address, and `testbed up` when it is a local bed) or one that is not
//! migrated (`shardq migrate`).

use std::path::Path;

/// SQLSTATE of a missing table: the database was never migrated.
const UNDEFINED_TABLE: &str = "42P01";

/// A line telling how to fix `error`, when one is known.
pub fn for_error(error: &anyhow::Error, config_path: &Path) -> Option<String> {
    error.chain().find_map(|cause| {
        let router =
            cause
                .downcast_ref::<shardq_router::Error>()
                .or_else(|| match cause.downcast_ref::<shardq::Error>() {
                    Some(shardq::Error::Router(e)) => Some(e),
                    _ => None,
                })?;
        for_router_error(router, config_path)
    })
}

fn for_router_error(error: &shardq_router::Error, config_path: &Path) -> Option<String> {
    let shardq_router::Error::Database {
        database,
        target,
        source,
        ..
    } = error
    else {
        return None;
    };
    match source {
        sqlx::Error::Database(db) if db.code().as_deref() == Some(UNDEFINED_TABLE) => Some(format!(
            "{database} is not migrated: run `shardq --config {} migrate`",
            config_path.display()
        )),
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) => {
            let local = ["127.0.0.1", "localhost", "[::1]", "::1"]
                .iter()
                .any(|h| target.contains(&format!("@{h}:")));
            let mut hint = format!(
                "{database} at {target} cannot be reached: is the server running and the address in {} right?",
                config_path.display()
            );
            if local {
                hint.push_str(&format!(
                    " For the local test bed: `shardq --config {} testbed up`",
                    config_path.display()
                ));
            }
            Some(hint)
        }
        _ => None,
    }
}
