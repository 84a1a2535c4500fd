//! The migrator against locks it cannot get: a migration behind a long
//! transaction gives up within its lock timeout (so writes do not queue
//! behind it), is retried, and is reported with the lock it waited for;
//! a shard whose advisory lock is held elsewhere neither holds up the other
//! shards nor outlives its deadline, and neither does a frozen server; a
//! statement timeout reaches the migrator's session. The frozen test starts
//! its own bed; the others take fresh databases on the shared one.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use shardq_router::migrator::{MigrationReport, Stage};
use shardq_router::{Config, Migrator};
use shardq_testbed::{Fleet, Server, TestBed};
use shardq_tests::{private_bed, wait_for};
use sqlx::{Connection, PgConnection};
use tempfile::TempDir;

/// The migration advisory lock key ("shardqmg" as big-endian bytes), fixed
/// forever so that any two releases exclude each other.
const MIGRATION_LOCK_KEY: i64 = 0x7368_6172_6471_6d67;

/// Longest a condition these tests wait on may take; far above every
/// timeout the tests configure.
const PATIENCE: Duration = Duration::from_secs(60);

const WIDGETS: (&str, &str) = ("V1__widgets.sql", "CREATE TABLE widgets (id int PRIMARY KEY);");

/// A fresh fleet, its config, and its shards' application migration folder.
struct Case {
    fleet: Fleet,
    config: Config,
    app: TempDir,
}

impl Case {
    async fn new(files: &[(&str, &str)]) -> Case {
        let bed = tokio::task::spawn_blocking(|| TestBed::shared().map_err(|e| e.to_string()))
            .await
            .unwrap()
            .unwrap();
        Case::on(bed, files).await
    }

    async fn on(bed: &TestBed, files: &[(&str, &str)]) -> Case {
        let fleet = bed.fresh_fleet().await.unwrap();
        let shards: Vec<(&str, &str)> = fleet.shards.iter().map(|s| (s.name.as_str(), s.url.as_str())).collect();
        let mut config = Config::from_urls(&fleet.master.url, &shards).unwrap();
        let app = tempfile::tempdir().unwrap();
        config.migrations.shard = Some(app.path().to_path_buf());
        let case = Case { fleet, config, app };
        for (name, sql) in files {
            case.write(name, sql);
        }
        case
    }

    fn write(&self, name: &str, sql: &str) {
        std::fs::write(self.app.path().join(name), sql).unwrap();
    }

    fn url(&self, shard: &str) -> String {
        self.fleet.shards.iter().find(|s| s.name == shard).unwrap().url.clone()
    }

    async fn connect(&self, shard: &str) -> PgConnection {
        PgConnection::connect(&self.url(shard)).await.unwrap()
    }
}

async fn has_column(url: &str, table: &str, column: &str) -> bool {
    let mut conn = PgConnection::connect(url).await.unwrap();
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = $2 AND NOT attisdropped)",
    )
    .bind(table)
    .bind(column)
    .fetch_one(&mut conn)
    .await
    .unwrap()
}

async fn table_exists(url: &str, table: &str) -> bool {
    let mut conn = PgConnection::connect(url).await.unwrap();
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(table)
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

fn failures(report: &MigrationReport) -> Vec<&str> {
    report.failures().map(|d| d.database.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn migration_behind_a_long_transaction_gives_up_within_its_lock_timeout_and_a_rerun_succeeds() {
    let case = Case::new(&[WIDGETS]).await;
    assert!(!Migrator::new(&case.config).run().await.unwrap().failed());

    // A long transaction on shard_2 has read the jobs table and stays open.
    let mut blocker = case.connect("shard_2").await;
    sqlx::raw_sql("BEGIN; LOCK TABLE shardq.jobs IN ACCESS SHARE MODE")
        .execute(&mut blocker)
        .await
        .unwrap();
    // The application's next migration needs ACCESS EXCLUSIVE on that table.
    case.write("V2__jobs_note.sql", "ALTER TABLE shardq.jobs ADD COLUMN note text;");

    let migrator = Migrator::new(&case.config)
        .lock_timeout(Duration::from_millis(500))
        .lock_retries(2)
        .retry_backoff(Duration::from_millis(200));
    let run = tokio::spawn(async move { migrator.run().await.unwrap() });

    // Once the migration queues for its lock, an ordinary write queues
    // behind it; it must get through as soon as the migrator's try gives
    // up, far within the write's own 10 s lock timeout (without a lock
    // timeout the migrator would wait for the blocker forever, and so would
    // the write).
    wait_for(
        "the migration to wait for its lock on shardq.jobs",
        PATIENCE,
        || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE relation = 'shardq.jobs'::regclass \
             AND mode = 'AccessExclusiveLock' AND NOT granted)",
            )
            .fetch_one(&mut case.connect("shard_2").await)
            .await
            .unwrap()
        },
    )
    .await;
    let mut writer = case.connect("shard_2").await;
    sqlx::raw_sql(
        "SET lock_timeout = '10s'; \
         INSERT INTO shardq.jobs (account, queue, kind) VALUES ('acme', 'default', 'probe')",
    )
    .execute(&mut writer)
    .await
    .expect("the write is not held up behind the waiting migration beyond its lock timeout");

    let report = run.await.unwrap();
    assert_eq!(failures(&report), ["shard_2"], "{report}");
    let stuck = report.database("shard_2").unwrap();
    let error = stuck.error.as_ref().unwrap();
    assert_eq!(error.stage, Stage::LockTimeout, "{error}");
    assert_eq!(error.sqlstate.as_deref(), Some("55P03"));
    assert_eq!(error.migration.as_ref().unwrap().to_string(), "V2__jobs_note");
    assert!(
        error
            .message
            .contains("AccessExclusiveLock on relation shardq.jobs, held by pid"),
        "{}",
        error.message
    );
    assert_eq!((stuck.lock_timeouts, stuck.retries), (3, 2), "{report}");
    let text = report.to_string();
    assert!(text.contains("shard_2 (") && text.contains("lock timeout"), "{text}");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["databases"][2]["lock_timeouts"], 3);
    assert!(!has_column(&case.url("shard_2"), "shardq.jobs", "note").await);
    for name in ["shard_1", "shard_3"] {
        let db = report.database(name).unwrap();
        assert!(db.error.is_none() && db.lock_timeouts == 0, "{report}");
        assert!(has_column(&case.url(name), "shardq.jobs", "note").await, "{name}");
    }

    // The long transaction ends; the next run gets the lock.
    sqlx::raw_sql("ROLLBACK").execute(&mut blocker).await.unwrap();
    let rerun = Migrator::new(&case.config).run().await.unwrap();
    assert!(!rerun.failed(), "{rerun}");
    assert_eq!(rerun.applied_count(), 1, "{rerun}");
    assert!(has_column(&case.url("shard_2"), "shardq.jobs", "note").await);
}

#[tokio::test(flavor = "multi_thread")]
async fn locked_shard_does_not_hold_up_the_others_and_fails_at_its_deadline() {
    let case = Case::new(&[WIDGETS]).await;
    // Another migrator (as far as shardq can tell) holds shard_1's lock.
    let mut holder = case.connect("shard_1").await;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK_KEY)
        .execute(&mut holder)
        .await
        .unwrap();

    // Two at a time: shard_1 takes one slot and waits; shard_2 and then
    // shard_3 go through the other slot while it does.
    let migrator = Migrator::new(&case.config).parallel(2).deadline(Some(PATIENCE * 2));
    let run = tokio::spawn(async move { migrator.run().await.unwrap() });
    wait_for("shard_2 and shard_3 to be migrated", PATIENCE, || async {
        table_exists(&case.url("shard_2"), "widgets").await && table_exists(&case.url("shard_3"), "widgets").await
    })
    .await;
    assert!(!run.is_finished(), "shard_1 still waits for its lock");
    assert!(!table_exists(&case.url("shard_1"), "widgets").await);
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK_KEY)
        .execute(&mut holder)
        .await
        .unwrap();
    let report = run.await.unwrap();
    assert!(!report.failed(), "{report}");
    assert!(table_exists(&case.url("shard_1"), "widgets").await);

    // Held again: past its deadline shard_1 is reported timed out, and the
    // others are migrated all the same.
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK_KEY)
        .execute(&mut holder)
        .await
        .unwrap();
    case.write("V2__gadgets.sql", "CREATE TABLE gadgets (id int PRIMARY KEY);");
    let report = Migrator::new(&case.config)
        .deadline(Some(Duration::from_secs(1)))
        .run()
        .await
        .unwrap();
    assert_eq!(failures(&report), ["shard_1"], "{report}");
    let late = report.database("shard_1").unwrap();
    assert!(late.timed_out, "{report}");
    let error = late.error.as_ref().unwrap();
    assert_eq!(error.stage, Stage::TimedOut);
    assert!(
        error
            .message
            .contains("deadline (1s) passed while waiting for the migration advisory lock"),
        "{}",
        error.message
    );
    assert!(report.to_string().contains("TIMED OUT"), "{report}");
    assert!(!table_exists(&case.url("shard_1"), "gadgets").await);
    for name in ["shard_2", "shard_3"] {
        assert!(table_exists(&case.url(name), "gadgets").await, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn frozen_shard_is_reported_timed_out_while_the_others_migrate() {
    let bed = private_bed(2).await;
    let case = Case::on(&bed, &[WIDGETS]).await;
    let on_server = |op: fn(&Server) -> shardq_testbed::Result<()>| {
        let bed = bed.clone();
        tokio::task::spawn_blocking(move || bed.server("shard_2").and_then(op).map_err(|e| e.to_string()))
    };
    // SIGSTOP: its socket accepts connections and nothing ever answers.
    on_server(Server::freeze).await.unwrap().unwrap();
    let report = Migrator::new(&case.config)
        .deadline(Some(Duration::from_secs(2)))
        .run()
        .await
        .unwrap();
    on_server(Server::thaw).await.unwrap().unwrap();

    assert_eq!(failures(&report), ["shard_2"], "{report}");
    let frozen = report.database("shard_2").unwrap();
    assert!(frozen.timed_out, "{report}");
    assert_eq!(frozen.error.as_ref().unwrap().stage, Stage::TimedOut, "{report}");
    assert!(report.database("master").unwrap().error.is_none());
    assert!(table_exists(&case.url("shard_1"), "widgets").await);
}

#[tokio::test(flavor = "multi_thread")]
async fn statement_timeout_reaches_the_migrator_session_and_fails_only_that_migration() {
    let case = Case::new(&[WIDGETS]).await;
    case.write(
        "V2__slow.sql",
        "-- shardq:no-transaction\nSELECT pg_sleep(30);\nCREATE TABLE after_sleep (id int);",
    );
    let report = Migrator::new(&case.config)
        .statement_timeout(Some(Duration::from_millis(200)))
        .lock_retries(0)
        .run()
        .await
        .unwrap();
    assert_eq!(failures(&report), ["shard_1", "shard_2", "shard_3"], "{report}");
    for shard in &case.fleet.shards {
        let db = report.database(&shard.name).unwrap();
        let error = db.error.as_ref().unwrap();
        assert_eq!(error.sqlstate.as_deref(), Some("57014"), "{report}");
        assert_eq!(error.migration.as_ref().unwrap().to_string(), "V2__slow");
        assert_eq!(db.retries, 0, "a statement timeout is not retried");
        assert_eq!(db.application.as_ref().unwrap().version_after, Some(1));
        assert!(table_exists(&shard.url, "widgets").await);
        assert!(!table_exists(&shard.url, "after_sleep").await);
    }
}
