//! The work on one database: connect, lock, compare both histories with
//! the files, apply what is pending, report; all of it within the
//! database's deadline.

use std::time::Instant;

use refinery::Migration;
use tokio_postgres::CancelToken;

use super::apply::{apply, Tries};
use super::failure::{Failure, Stage};
use super::plan::{plan, MigrationId, Plan};
use super::report::{DatabaseReport, HistoryReport};
use super::session::{self, Session};
use super::settings::Settings;
use super::sources::{History, Role, RoleSources};
use super::status::{DatabaseStatus, HistoryStatus};
use crate::config::{DatabaseConfig, Pooler, Target};
use crate::stamp::{self, Mismatch, Stamp};
use crate::store;

/// One database of the selection.
#[derive(Debug, Clone)]
pub(crate) struct Db {
    /// `master` or the shard's name.
    pub name: String,
    /// Master or shard.
    pub role: Role,
    /// Where it is: its direct address (`listen_url`) when it is behind a
    /// transaction pooler.
    pub target: Target,
    /// Behind a transaction pooler with no direct address: refused, since
    /// the migration advisory lock needs a session.
    pub pooled_only: bool,
}

impl Db {
    /// The database of `config` named `name`, as the migrator reaches it.
    pub(crate) fn of(name: &str, role: Role, config: &DatabaseConfig) -> Db {
        Db {
            name: name.to_string(),
            role,
            target: config.listen.clone().unwrap_or_else(|| config.target.clone()),
            pooled_only: config.pooler == Pooler::Transaction && config.listen.is_none(),
        }
    }

    /// The refusal of a database behind a transaction pooler with no
    /// direct address.
    fn pooled_refusal(&self) -> Failure {
        Failure::new(
            Stage::Connect,
            None,
            format!(
                "{} is configured behind a transaction pooler (pooler = \"transaction\") and has no listen_url: \
                 migrations need a session of their own (the migration advisory lock is held across \
                 transactions), which a transaction pooler does not keep; set listen_url to the server's \
                 direct address (the migrator connects there) and run again",
                self.target
            ),
        )
    }
}

/// Both histories, platform first.
const HISTORIES: [History; 2] = [History::Platform, History::Application];

/// Where the work on one database stands, read when its deadline passes.
#[derive(Default)]
struct Progress {
    /// Lock-timeout counts so far.
    tries: Tries,
    /// Cancels the statement running on the session, once connected.
    cancel: Option<CancelToken>,
    /// What is being done, for the timeout message.
    doing: String,
    /// The history being worked on.
    history: Option<History>,
    /// The migration being applied.
    migration: Option<MigrationId>,
}

/// Migrates one database. Never fails: a failure is inside the report.
/// `fleet` is the fleet id from the master's stamp (`None` for the master
/// itself, or when it could not be read): a shard is stamped with it after
/// its migrations, and refused when stamped for another shard or fleet.
pub(crate) async fn migrate(db: &Db, sources: &RoleSources, settings: Settings, fleet: Option<&str>) -> DatabaseReport {
    let started = Instant::now();
    let mut report = DatabaseReport::new(&db.name, db.role, db.target.to_string());
    let mut progress = Progress::default();
    let work = migrate_locked(db, sources, &settings, fleet, &mut report, &mut progress);
    let result = match settings.deadline {
        None => work.await,
        Some(limit) => match tokio::time::timeout(limit, work).await {
            Ok(result) => result,
            Err(_) => {
                report.timed_out = true;
                if let Some(token) = progress.cancel.take() {
                    tokio::spawn(session::cancel(db.target.clone(), token));
                }
                let mut failure = Failure::new(
                    Stage::TimedOut,
                    progress.history,
                    format!(
                        "the database's deadline ({}) passed while {}; that work was cancelled",
                        humantime::format_duration(limit),
                        progress.doing
                    ),
                );
                failure.migration = progress.migration.take();
                Err(failure)
            }
        },
    };
    report.retries = progress.tries.retries;
    report.lock_timeouts = progress.tries.lock_timeouts;
    report.error = result.err();
    report.duration = started.elapsed();
    match (&report.error, report.ahead.is_empty()) {
        (Some(e), _) => tracing::warn!(database = %db.name, error = %e, "migration failed"),
        (None, false) => tracing::warn!(database = %db.name, "database is ahead of this binary; left alone"),
        (None, true) => tracing::info!(database = %db.name, applied = report.applied_count(), "migrated"),
    }
    report
}

/// Connects and, unless dry, runs both histories under the advisory lock.
async fn migrate_locked(
    db: &Db,
    sources: &RoleSources,
    settings: &Settings,
    fleet: Option<&str>,
    report: &mut DatabaseReport,
    progress: &mut Progress,
) -> Result<(), Failure> {
    if db.pooled_only {
        return Err(db.pooled_refusal());
    }
    progress.doing = "connecting".into();
    let mut session = Session::open(&db.target).await?;
    progress.cancel = Some(session.cancel_token());
    session
        .set_timeouts(settings)
        .await
        .map_err(|e| Failure::from_error(Stage::Connect, None, &e))?;
    if settings.dry_run {
        report.fleet_id = check_stamp(&session, db, fleet).await?.map(|s| s.fleet);
        return run_histories(&mut session, sources, settings, report, progress).await;
    }
    progress.doing = "waiting for the migration advisory lock (another migrator holds it)".into();
    session.lock().await?;
    let result = migrate_stamped(&mut session, db, sources, settings, fleet, report, progress).await;
    session.unlock().await;
    result
}

/// Under the advisory lock: refuses a database stamped for another shard or
/// fleet, runs both histories, then stamps a shard that has no stamp yet.
async fn migrate_stamped(
    session: &mut Session,
    db: &Db,
    sources: &RoleSources,
    settings: &Settings,
    fleet: Option<&str>,
    report: &mut DatabaseReport,
    progress: &mut Progress,
) -> Result<(), Failure> {
    progress.doing = "reading the fleet stamp".into();
    let found = check_stamp(session, db, fleet).await?;
    run_histories(session, sources, settings, report, progress).await?;
    if !report.ahead.is_empty() {
        report.fleet_id = found.map(|s| s.fleet);
        return Ok(());
    }
    progress.doing = "stamping the database with the fleet id".into();
    let stamp_failed = |e: tokio_postgres::Error| Failure::from_error(Stage::Stamp, None, &e);
    report.fleet_id = match (db.role, found, fleet) {
        (_, Some(found), _) => Some(found.fleet),
        (Role::Master, None, _) => store::migration_stamp_get(&session.client)
            .await
            .map_err(stamp_failed)?
            .map(|(fleet, _)| fleet),
        (Role::Shard, None, Some(fleet)) => {
            let written = Stamp::from(
                store::migration_stamp_write(&session.client, fleet, &db.name)
                    .await
                    .map_err(stamp_failed)?,
            );
            // Another migrator of another fleet may have stamped it meanwhile.
            if let Some(mismatch) = stamp::compare(&db.name, Some(fleet), &written) {
                return Err(stamp_mismatch(db, &written, mismatch));
            }
            Some(written.fleet)
        }
        (Role::Shard, None, None) => {
            tracing::warn!(
                database = %db.name,
                "migrated but not stamped: the master's fleet id could not be read; \
                 the shard counts as not migrated until `shardq migrate` runs with the master migrated and reachable"
            );
            None
        }
    };
    Ok(())
}

/// The stamp the database carries, if any; a [`Stage::Stamp`] failure when
/// it is stamped for another database than `db` (another name, or another
/// fleet than `fleet`).
async fn check_stamp(session: &Session, db: &Db, fleet: Option<&str>) -> Result<Option<Stamp>, Failure> {
    let found = store::migration_stamp_get(&session.client)
        .await
        .map_err(|e| Failure::from_error(Stage::Stamp, None, &e))?
        .map(Stamp::from);
    let Some(found) = found else { return Ok(None) };
    match stamp::compare(&db.name, fleet, &found) {
        None => Ok(Some(found)),
        Some(mismatch) => Err(stamp_mismatch(db, &found, mismatch)),
    }
}

/// The failure of a database stamped for another database than `db`.
fn stamp_mismatch(db: &Db, found: &Stamp, mismatch: Mismatch) -> Failure {
    let message = match mismatch {
        Mismatch::Name { found: other } => format!(
            "the database at {} is stamped as {other} (fleet {}), but the configuration names it {}: \
             its address leads to {other}'s database (addresses swapped, or a DNS alias to the wrong server); \
             nothing was run",
            db.target, found.fleet, db.name
        ),
        Mismatch::Fleet { expected, found: other } => format!(
            "the database at {} is stamped as {} of fleet {other}, but this fleet's master has fleet id {expected}: \
             it belongs to another fleet; nothing was run",
            db.target, db.name
        ),
    };
    Failure::new(Stage::Stamp, None, message)
}

/// Reads and compares both histories first; runs nothing when one diverged
/// or is ahead of this binary; else applies (or, dry, lists) what is pending.
async fn run_histories(
    session: &mut Session,
    sources: &RoleSources,
    settings: &Settings,
    report: &mut DatabaseReport,
    progress: &mut Progress,
) -> Result<(), Failure> {
    progress.doing = "reading the migration histories".into();
    let mut plans: Vec<(History, &[Migration], Plan)> = Vec::new();
    for history in HISTORIES {
        let Some(files) = sources.files(history) else { continue };
        let target = (history == History::Application)
            .then_some(settings.app_target)
            .flatten();
        let applied = store::migration_history(&session.client, history.table())
            .await
            .map_err(|e| Failure::from_error(Stage::ReadHistory, Some(history), &e))?;
        let plan = plan(history, &applied, files, target);
        *report.slot(history) = Some(HistoryReport {
            history,
            version_before: plan.current,
            applied: Vec::new(),
            version_after: plan.current,
        });
        plans.push((history, files, plan));
    }
    if let Some((history, _, plan)) = plans.iter().find(|(_, _, p)| !p.divergences.is_empty()) {
        return Err(Failure::diverged(*history, plan.divergences.clone()));
    }
    report.ahead = plans.iter().filter_map(|(_, _, p)| p.ahead.clone()).collect();
    if !report.ahead.is_empty() {
        return Ok(()); // a newer release migrated it: leave it alone
    }
    for (history, files, plan) in plans {
        if settings.dry_run {
            for id in plan.pending {
                record(report.slot(history), id);
            }
            continue;
        }
        if plan.pending.is_empty() {
            continue;
        }
        progress.history = Some(history);
        store::migration_history_create(&session.client, history.table())
            .await
            .map_err(|e| Failure::from_error(Stage::Migrate, Some(history), &e))?;
        for id in plan.pending {
            let Some(file) = files.iter().find(|f| f.version() == id.version) else {
                continue;
            };
            progress.doing = format!("applying {history} migration {id}");
            progress.migration = Some(id.clone());
            apply(session, history, file, settings, &mut progress.tries).await?;
            record(report.slot(history), id);
        }
    }
    Ok(())
}

/// Notes one applied (or, dry, pending) migration in its history's report.
fn record(slot: &mut Option<HistoryReport>, id: MigrationId) {
    if let Some(report) = slot {
        report.version_after = Some(report.version_after.map_or(id.version, |v| v.max(id.version)));
        report.applied.push(id);
    }
}

/// Reads both histories of one database and compares them with the files,
/// within the deadline.
pub(crate) async fn status(db: &Db, sources: &RoleSources, settings: Settings) -> DatabaseStatus {
    let read = read_status(db, sources);
    let histories = match settings.deadline {
        None => read.await,
        Some(limit) => tokio::time::timeout(limit, read).await.unwrap_or_else(|_| {
            Err(Failure::new(
                Stage::TimedOut,
                None,
                format!(
                    "the database's deadline ({}) passed while reading its histories",
                    humantime::format_duration(limit)
                ),
            ))
        }),
    };
    DatabaseStatus::new(db.name.clone(), db.role, db.target.to_string(), histories)
}

async fn read_status(db: &Db, sources: &RoleSources) -> Result<(HistoryStatus, Option<HistoryStatus>), Failure> {
    if db.pooled_only {
        return Err(db.pooled_refusal());
    }
    let client = session::connect(&db.target).await?;
    let platform = history_status(&client, History::Platform, &sources.platform).await?;
    let application = match &sources.application {
        Some(files) => Some(history_status(&client, History::Application, files).await?),
        None => None,
    };
    Ok((platform, application))
}

async fn history_status(
    client: &tokio_postgres::Client,
    history: History,
    files: &[Migration],
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
        ahead: plan.ahead,
    })
}
