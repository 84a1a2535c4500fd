//! Least privilege: the statements that let an application role use
//! shardq's tables without being able to change the schema.
//!
//! Run the migrator as the role that owns the schema (it creates and alters
//! tables); run workers and applications as a role that only gets these
//! grants. Execute [`master_grants`] on the master and [`shard_grants`] on
//! every shard, connected as the owner role *after* migrating: the `ALTER
//! DEFAULT PRIVILEGES` lines extend the grants to tables, sequences and
//! functions the owner creates in later migrations, so a new platform
//! version keeps working without granting again.
//!
//! The text with a `{role}` placeholder is [`MASTER_GRANTS`] and
//! [`SHARD_GRANTS`]; the README's "Least privilege" section shows the same
//! statements.

/// Statements for the master, `{role}` standing for the application role.
///
/// The application reads placements and inserts new ones (insert-if-absent);
/// it never updates or deletes them (moving an account is an owner's job).
/// It reads the shard registry but may not write it: only the owner
/// registers shards and marks them draining, so a placement naming a shard
/// the owner did not register fails on the foreign key. The fleet stamp is
/// read-only to it too. Worker nodes renew and delete their rows in the
/// node registry (`shardq.nodes`), and lease permits of named resources
/// (`shardq.resource_leases`, locking the resource's row in
/// `shardq.resources`, which `Client::set_resource` writes).
pub const MASTER_GRANTS: &[&str] = &[
    "GRANT USAGE ON SCHEMA shardq TO {role}",
    "GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA shardq TO {role}",
    "REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON shardq.shards FROM {role}",
    "REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON shardq.fleet_stamp FROM {role}",
    "GRANT UPDATE, DELETE ON shardq.nodes TO {role}",
    "GRANT UPDATE, DELETE ON shardq.resources, shardq.resource_leases TO {role}",
    "GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA shardq TO {role}",
    "GRANT SELECT ON public.shardq_schema_history TO {role}",
    "ALTER DEFAULT PRIVILEGES IN SCHEMA shardq GRANT SELECT, INSERT ON TABLES TO {role}",
    "ALTER DEFAULT PRIVILEGES IN SCHEMA shardq GRANT USAGE, SELECT ON SEQUENCES TO {role}",
];

/// Statements for every shard, `{role}` standing for the application role.
///
/// Workers claim, update and prune jobs, so the role may read and write
/// rows of the job tables, use their sequences and call `shardq.enqueue`.
/// The fleet stamp (which shard of which fleet this database is) is the
/// owner's: the role only reads it.
pub const SHARD_GRANTS: &[&str] = &[
    "GRANT USAGE ON SCHEMA shardq TO {role}",
    "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA shardq TO {role}",
    "REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON shardq.fleet_stamp FROM {role}",
    "GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA shardq TO {role}",
    "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA shardq TO {role}",
    "GRANT SELECT ON public.shardq_schema_history TO {role}",
    "ALTER DEFAULT PRIVILEGES IN SCHEMA shardq GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {role}",
    "ALTER DEFAULT PRIVILEGES IN SCHEMA shardq GRANT USAGE, SELECT ON SEQUENCES TO {role}",
    "ALTER DEFAULT PRIVILEGES IN SCHEMA shardq GRANT EXECUTE ON FUNCTIONS TO {role}",
];

/// [`MASTER_GRANTS`] for `role` (quoted as an SQL identifier).
pub fn master_grants(role: &str) -> Vec<String> {
    render(MASTER_GRANTS, role)
}

/// [`SHARD_GRANTS`] for `role` (quoted as an SQL identifier).
pub fn shard_grants(role: &str) -> Vec<String> {
    render(SHARD_GRANTS, role)
}

/// `name` as a double-quoted SQL identifier.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn render(statements: &[&str], role: &str) -> Vec<String> {
    let quoted = quote_identifier(role);
    statements.iter().map(|s| s.replace("{role}", &quoted)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_is_quoted_in_every_statement() {
        for s in shard_grants("app\"x").iter().chain(&master_grants("app\"x")) {
            assert!(
                s.ends_with("TO \"app\"\"x\"") || s.ends_with("FROM \"app\"\"x\""),
                "{s}"
            );
            assert!(!s.contains("{role}"), "{s}");
        }
    }

    #[test]
    fn the_readme_shows_these_statements() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
        for s in MASTER_GRANTS.iter().chain(SHARD_GRANTS) {
            let line = format!("{};", s.replace("{role}", "app"));
            assert!(readme.contains(&line), "README.md lacks: {line}");
        }
    }
}
