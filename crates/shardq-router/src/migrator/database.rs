//! The work on one database: connect, lock, compare, run refinery, report.

use std::time::Instant;

use refinery::Runner;
use tokio_postgres::Client;

use super::failure::{Failure, Stage};
use super::plan::{plan, MigrationId};
use super::report::{DatabaseReport, HistoryReport};
use super::sources::{History, Role, RoleSources};
use super::status::{DatabaseStatus, HistoryStatus};
use crate::config::Target;
use crate::store;

/// One database of the selection.
#[derive(Debug, Clone)]
pub(crate) struct Db {
    /// `master` or the shard's name.
    pub name: String,
    /// Master or shard.
    pub role: Role,
    /// Where it is.
    pub target: Target,
}

/// What a run does on each database.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunOptions {
    /// Stop the application history at this version.
    pub app_target: Option<u32>,
    /// Only compare; run nothing and take no lock.
    pub dry_run: bool,
}

/// Both histories, platform first.
const HISTORIES: [History; 2] = [History::Platform, History::Application];

/// Migrates one database. Never fails: a failure is inside the report.
pub(crate) async fn migrate(db: &Db, sources: &RoleSources, opts: RunOptions) -> DatabaseReport {
    let started = Instant::now();
    let mut report = DatabaseReport {
        database: db.name.clone(),
        role: db.role,
        target: db.target.to_string(),
        platform: None,
        application: None,
        duration: Default::default(),
        error: None,
    };
    report.error = migrate_locked(db, sources, opts, &mut report).await.err();
    report.duration = started.elapsed();
    match &report.error {
        None => tracing::info!(database = %db.name, applied = report.applied_count(), "migrated"),
        Some(e) => tracing::warn!(database = %db.name, error = %e, "migration failed"),
    }
    report
}

/// Connects and, unless dry, runs both histories under the advisory lock.
async fn migrate_locked(
    db: &Db,
    sources: &RoleSources,
    opts: RunOptions,
    report: &mut DatabaseReport,
) -> Result<(), Failure> {
    let mut client = connect(&db.target).await?;
    if !opts.dry_run {
        store::migration_lock(&client)
            .await
            .map_err(|e| Failure::from_error(Stage::Lock, None, &e))?;
    }
    let mut result = Ok(());
    for history in HISTORIES {
        let Some(files) = sources.files(history) else { continue };
        let target = if history == History::Application {
            opts.app_target
        } else {
            None
        };
        let slot = match history {
            History::Platform => &mut report.platform,
            History::Application => &mut report.application,
        };
        result = migrate_history(&mut client, history, files, target, opts.dry_run, slot).await;
        if result.is_err() {
            break; // the application schema builds on the platform's
        }
    }
    if !opts.dry_run {
        // Closing the connection releases the lock too; a failed unlock only
        // means the connection is already gone.
        if let Err(e) = store::migration_unlock(&client).await {
            tracing::debug!(database = %db.name, error = %e, "migration unlock failed");
        }
    }
    result
}

/// Reads one history, refuses if it diverged, and runs (or, dry, lists)
/// what is pending. Fills `slot` with what happened, also on failure.
async fn migrate_history(
    client: &mut Client,
    history: History,
    files: &[refinery::Migration],
    target: Option<u32>,
    dry_run: bool,
    slot: &mut Option<HistoryReport>,
) -> Result<(), Failure> {
    let applied = store::migration_history(client, history.table())
        .await
        .map_err(|e| Failure::from_error(Stage::ReadHistory, Some(history), &e))?;
    let plan = plan(history, &applied, files, target);
    let report = slot.insert(HistoryReport {
        history,
        version_before: plan.current,
        applied: Vec::new(),
        version_after: plan.current,
    });
    if !plan.divergences.is_empty() {
        return Err(Failure::diverged(history, plan.divergences));
    }
    if dry_run || plan.pending.is_empty() {
        record(report, plan.pending);
        return Ok(());
    }
    let mut runner = Runner::new(files)
        .set_target(target.map_or(refinery::Target::Latest, refinery::Target::Version))
        .set_abort_divergent(true)
        .set_abort_missing(true);
    runner.set_migration_table_name(history.table());
    match runner.run_async(client).await {
        Ok(done) => {
            record(report, done.applied_migrations().iter().map(MigrationId::of).collect());
            Ok(())
        }
        Err(e) => {
            let done: Vec<MigrationId> = e
                .report()
                .map(|r| r.applied_migrations().iter().map(MigrationId::of).collect())
                .unwrap_or_default();
            let mut failure = Failure::from_error(Stage::Migrate, Some(history), &e);
            failure.migration = plan.pending.get(done.len()).cloned();
            record(report, done);
            Err(failure)
        }
    }
}

fn record(report: &mut HistoryReport, applied: Vec<MigrationId>) {
    if let Some(last) = applied.last() {
        report.version_after = Some(report.version_before.map_or(last.version, |v| v.max(last.version)));
    }
    report.applied = applied;
}

/// Reads both histories of one database and compares them with the files.
pub(crate) async fn status(db: &Db, sources: &RoleSources) -> DatabaseStatus {
    let histories = read_status(db, sources).await;
    DatabaseStatus::new(db.name.clone(), db.role, db.target.to_string(), histories)
}

async fn read_status(db: &Db, sources: &RoleSources) -> Result<(HistoryStatus, Option<HistoryStatus>), Failure> {
    let client = connect(&db.target).await?;
    let platform = history_status(&client, History::Platform, &sources.platform).await?;
    let application = match &sources.application {
        Some(files) => Some(history_status(&client, History::Application, files).await?),
        None => None,
    };
    Ok((platform, application))
}

async fn history_status(
    client: &Client,
    history: History,
    files: &[refinery::Migration],
) -> Result<HistoryStatus, Failure> {
    let applied = store::migration_history(client, history.table())
        .await
        .map_err(|e| Failure::from_error(Stage::ReadHistory, Some(history), &e))?;
    let plan = plan(history, &applied, files, None);
    Ok(HistoryStatus {
        history,
        applied: plan.current,
        latest: plan.latest,
        pending: plan.pending,
        divergences: plan.divergences,
    })
}

/// Opens one connection for the migrator; its driver task runs until the
/// client is dropped.
/// TLS as `target.sslmode` says (see [`crate::tls`]).
async fn connect(target: &Target) -> Result<Client, Failure> {
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
