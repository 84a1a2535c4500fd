//! Placeholder.
/// x
pub struct Migrator;
/// x
pub struct MigrationReport;
