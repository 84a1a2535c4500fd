//! The migrator against real Postgres servers: every test takes fresh
//! databases on the shared test bed (the shard-down test starts its own).
#![allow(clippy::unwrap_used)]

use std::path::Path;

use shardq_router::migrator::{DivergenceReason, History, MigrationReport, Stage, State};
use shardq_router::{Config, Migrator};
use shardq_testbed::{Fleet, TestBed};
use sqlx::{Connection, PgConnection};
use tempfile::TempDir;

/// A fresh fleet, its config, and the folder of its shards' application
/// migrations.
struct Case {
    fleet: Fleet,
    config: Config,
    app: TempDir,
}

impl Case {
    async fn new(bed: &TestBed, files: &[(&str, &str)]) -> Case {
        let fleet = bed.fresh_fleet().await.unwrap();
        let shards: Vec<(&str, &str)> = fleet.shards.iter().map(|s| (s.name.as_str(), s.url.as_str())).collect();
        let config = Config::from_urls(&fleet.master.url, &shards).unwrap();
        Case::with_config(fleet, config, files)
    }

    fn with_config(fleet: Fleet, mut config: Config, files: &[(&str, &str)]) -> Case {
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

    fn shard_url(&self, name: &str) -> &str {
        &self.fleet.shards.iter().find(|s| s.name == name).unwrap().url
    }

    async fn run(&self) -> MigrationReport {
        Migrator::new(&self.config).run().await.unwrap()
    }
}

fn shared() -> &'static TestBed {
    TestBed::shared().unwrap()
}

const WIDGETS: (&str, &str) = ("V1__widgets.sql", "CREATE TABLE widgets (id int PRIMARY KEY);");
const GADGETS: (&str, &str) = ("V2__gadgets.sql", "CREATE TABLE gadgets (id int PRIMARY KEY);");

/// (number of files, highest version) of the platform's own migrations for
/// `role` (`master` or `shard`), read from the repository's folder.
fn platform_files(role: &str) -> (usize, u32) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations").join(role);
    let versions: Vec<u32> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            let rest = name.strip_prefix('V')?.strip_suffix(".sql")?;
            rest.split_once("__")?.0.parse().ok()
        })
        .collect();
    (versions.len(), versions.into_iter().max().unwrap())
}

async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url).await.unwrap()
}

async fn exec(url: &str, sql: &str) {
    sqlx::raw_sql(sql).execute(&mut connect(url).await).await.unwrap();
}

async fn table_exists(url: &str, table: &str) -> bool {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(table)
        .fetch_one(&mut connect(url).await)
        .await
        .unwrap()
}

/// (rows, distinct versions) of a history table.
async fn history_rows(url: &str, table: &str) -> (i64, i64) {
    sqlx::query_as(&format!("SELECT count(*), count(DISTINCT version) FROM {table}"))
        .fetch_one(&mut connect(url).await)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn fresh_fleet_migrates_every_database_to_the_latest_version() {
    let case = Case::new(shared(), &[WIDGETS, GADGETS]).await;
    let report = case.run().await;
    assert!(!report.failed(), "{report}");

    let (master_files, master_latest) = platform_files("master");
    let master = report.database("master").unwrap();
    let platform = master.platform.as_ref().unwrap();
    assert_eq!(
        (platform.version_before, platform.version_after),
        (None, Some(master_latest))
    );
    assert_eq!(platform.applied.len(), master_files);
    assert!(
        master.application.is_none(),
        "no application migrations are configured for the master"
    );
    assert!(table_exists(&case.fleet.master.url, "shardq.placements").await);

    let (shard_files, shard_latest) = platform_files("shard");
    for shard in &case.fleet.shards {
        let db = report.database(&shard.name).unwrap();
        let platform = db.platform.as_ref().unwrap();
        assert_eq!(
            (platform.version_before, platform.version_after),
            (None, Some(shard_latest))
        );
        assert_eq!(platform.applied.len(), shard_files);
        let app = db.application.as_ref().unwrap();
        assert_eq!((app.version_before, app.version_after), (None, Some(2)));
        let names: Vec<String> = app.applied.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["V1__widgets", "V2__gadgets"]);
        for table in ["shardq.jobs", "widgets", "gadgets"] {
            assert!(table_exists(&shard.url, table).await, "{table} on {}", shard.name);
        }
    }

    let status = Migrator::new(&case.config).status().await.unwrap();
    assert_eq!(status.databases.len(), 1 + case.fleet.shards.len());
    assert!(status.databases.iter().all(|d| d.state == State::UpToDate), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn second_run_applies_nothing() {
    let case = Case::new(shared(), &[WIDGETS, GADGETS]).await;
    let first = case.run().await;
    assert!(!first.failed(), "{first}");

    let second = case.run().await;
    assert!(!second.failed(), "{second}");
    assert_eq!(second.applied_count(), 0, "{second}");
    for db in &second.databases {
        for h in db.platform.iter().chain(db.application.iter()) {
            assert!(h.applied.is_empty());
            assert_eq!(h.version_before, h.version_after);
            assert!(h.version_after.is_some(), "{} {} is migrated", db.database, h.history);
        }
    }
    assert_eq!(
        history_rows(case.shard_url("shard_1"), "shardq_app_history").await,
        (2, 2)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_migration_fails_only_its_shard_with_the_postgres_error_then_converges() {
    let conflict = ("V2__specials.sql", "CREATE TABLE specials (id int PRIMARY KEY);");
    let case = Case::new(shared(), &[WIDGETS, conflict]).await;
    // Only shard_2 already has a table of that name, so V2 fails only there.
    exec(case.shard_url("shard_2"), "CREATE TABLE specials (legacy text)").await;

    let report = case.run().await;
    assert!(report.failed());
    let failures: Vec<&str> = report.failures().map(|d| d.database.as_str()).collect();
    assert_eq!(failures, ["shard_2"], "{report}");
    let shard_2 = report.database("shard_2").unwrap();
    let error = shard_2.error.as_ref().unwrap();
    assert_eq!(error.stage, Stage::Migrate);
    assert_eq!(error.history, Some(History::Application));
    assert_eq!(error.migration.as_ref().unwrap().to_string(), "V2__specials");
    assert_eq!(error.sqlstate.as_deref(), Some("42P07"));
    assert!(
        error.message.contains(r#"relation "specials" already exists"#),
        "{}",
        error.message
    );
    let app = shard_2.application.as_ref().unwrap();
    assert_eq!(
        (app.applied.len(), app.version_after),
        (1, Some(1)),
        "V1 was applied before V2 failed"
    );
    assert!(report.to_string().contains("42P07"), "{report}");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["databases"][2]["error"]["sqlstate"], "42P07");
    for name in ["shard_1", "shard_3"] {
        let app = report.database(name).unwrap().application.as_ref().unwrap();
        assert_eq!(app.version_after, Some(2), "{name}");
    }

    // The fix: the operator moves the conflicting table out of the way.
    exec(
        case.shard_url("shard_2"),
        "ALTER TABLE specials RENAME TO specials_legacy",
    )
    .await;
    let rerun = case.run().await;
    assert!(!rerun.failed(), "{rerun}");
    assert_eq!(rerun.applied_count(), 1, "{rerun}");
    let app = rerun.database("shard_2").unwrap().application.as_ref().unwrap();
    assert_eq!(app.applied.iter().map(|m| m.version).collect::<Vec<_>>(), [2]);
    assert_eq!(
        history_rows(case.shard_url("shard_2"), "shardq_app_history").await,
        (2, 2)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_migrators_at_once_both_succeed_and_apply_each_migration_once() {
    let case = Case::new(shared(), &[WIDGETS, GADGETS]).await;
    let one = Migrator::new(&case.config);
    let two = Migrator::new(&case.config).parallel(1);
    let (a, b) = tokio::join!(one.run(), two.run());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(!a.failed(), "{a}");
    assert!(!b.failed(), "{b}");

    let (master_files, _) = platform_files("master");
    let (shard_files, _) = platform_files("shard");
    assert_eq!(
        a.applied_count() + b.applied_count(),
        master_files + case.fleet.shards.len() * (shard_files + 2)
    );
    let master_rows = history_rows(&case.fleet.master.url, "shardq_schema_history").await;
    assert_eq!(master_rows, (master_files as i64, master_files as i64));
    for shard in &case.fleet.shards {
        let platform = history_rows(&shard.url, "shardq_schema_history").await;
        assert_eq!(platform, (shard_files as i64, shard_files as i64), "{}", shard.name);
        assert_eq!(
            history_rows(&shard.url, "shardq_app_history").await,
            (2, 2),
            "{}",
            shard.name
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn edited_applied_migration_is_divergent_in_status_and_refused_by_run() {
    let case = Case::new(shared(), &[WIDGETS]).await;
    assert!(!case.run().await.failed());
    case.write(WIDGETS.0, "CREATE TABLE widgets (id bigint PRIMARY KEY);");
    case.write(GADGETS.0, GADGETS.1);

    let status = Migrator::new(&case.config).status().await.unwrap();
    assert!(status.has_errors());
    assert_eq!(status.diverged(), ["shard_1", "shard_2", "shard_3"], "{status}");
    let divergence = status
        .database("shard_1")
        .unwrap()
        .divergences()
        .next()
        .unwrap()
        .clone();
    assert_eq!(divergence.history, History::Application);
    assert_eq!(divergence.migration.to_string(), "V1__widgets");
    assert_eq!(divergence.reason, DivergenceReason::ChecksumChanged);
    let text = status.to_string();
    assert!(
        text.contains("shard_1 DIVERGED") && text.contains("V1__widgets"),
        "{text}"
    );
    assert_eq!(status.database("master").unwrap().state, State::UpToDate);

    let report = case.run().await;
    let failures: Vec<&str> = report.failures().map(|d| d.database.as_str()).collect();
    assert_eq!(failures, ["shard_1", "shard_2", "shard_3"], "{report}");
    for shard in &case.fleet.shards {
        let error = report.database(&shard.name).unwrap().error.as_ref().unwrap();
        assert_eq!(error.stage, Stage::Diverged);
        assert_eq!(error.divergences, std::slice::from_ref(&divergence));
        assert!(
            !table_exists(&shard.url, "gadgets").await,
            "nothing runs on a diverged database"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn shard_that_is_down_is_reported_failed_while_the_others_migrate() {
    let bed = TestBed::start(2).unwrap();
    let fleet = bed.fresh_fleet().await.unwrap();
    // A password in the URL must never be printed (trust auth ignores it).
    let down_url = fleet.shards[1].url.replace("postgres@", "postgres:s3cret@");
    let config = Config::from_urls(
        &fleet.master.url,
        &[
            (&fleet.shards[0].name, &fleet.shards[0].url),
            (&fleet.shards[1].name, &down_url),
        ],
    )
    .unwrap();
    let case = Case::with_config(fleet, config, &[WIDGETS]);
    bed.server("shard_2").unwrap().stop().unwrap();

    let report = case.run().await;
    let failures: Vec<&str> = report.failures().map(|d| d.database.as_str()).collect();
    assert_eq!(failures, ["shard_2"], "{report}");
    let down = report.database("shard_2").unwrap();
    let error = down.error.as_ref().unwrap();
    assert_eq!(error.stage, Stage::Connect);
    assert!(
        error.message.contains("error connecting to server"),
        "{}",
        error.message
    );
    let text = report.to_string();
    assert!(!text.contains("s3cret") && !serde_json::to_string(&report).unwrap().contains("s3cret"));
    assert!(
        down.target.starts_with("postgres://postgres@127.0.0.1:"),
        "{}",
        down.target
    );
    assert!(report.database("master").unwrap().error.is_none());
    let up = report.database("shard_1").unwrap();
    assert_eq!(up.application.as_ref().unwrap().version_after, Some(1), "{report}");
    assert!(table_exists(case.shard_url("shard_1"), "widgets").await);

    let status = Migrator::new(&case.config).status().await.unwrap();
    assert_eq!(status.database("shard_2").unwrap().state, State::Unreachable);
    assert!(status.has_errors());
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_lists_pending_migrations_and_changes_nothing() {
    let case = Case::new(shared(), &[WIDGETS, GADGETS]).await;
    let report = Migrator::new(&case.config).dry_run(true).run().await.unwrap();
    assert!(report.dry_run && !report.failed(), "{report}");
    let app = report.database("shard_3").unwrap().application.as_ref().unwrap();
    assert_eq!(
        app.applied.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["V1__widgets", "V2__gadgets"]
    );
    assert!(report.to_string().contains("would apply"), "{report}");
    for shard in &case.fleet.shards {
        assert!(!table_exists(&shard.url, "shardq_schema_history").await);
        assert!(!table_exists(&shard.url, "widgets").await);
    }
    assert!(!table_exists(&case.fleet.master.url, "shardq_schema_history").await);
}

#[tokio::test(flavor = "multi_thread")]
async fn only_shards_migrates_the_named_shards_and_leaves_the_master_alone() {
    let case = Case::new(shared(), &[WIDGETS]).await;
    let report = Migrator::new(&case.config)
        .only_shards(["shard_2"])
        .run()
        .await
        .unwrap();
    let names: Vec<&str> = report.databases.iter().map(|d| d.database.as_str()).collect();
    assert_eq!(names, ["shard_2"]);
    assert!(table_exists(case.shard_url("shard_2"), "widgets").await);
    assert!(!table_exists(case.shard_url("shard_1"), "widgets").await);
    assert!(!table_exists(&case.fleet.master.url, "shardq_schema_history").await);

    let with_master = Migrator::new(&case.config)
        .only_shards(["shard_1"])
        .master(true)
        .run()
        .await
        .unwrap();
    let names: Vec<&str> = with_master.databases.iter().map(|d| d.database.as_str()).collect();
    assert_eq!(names, ["master", "shard_1"]);

    let unknown = Migrator::new(&case.config).only_shards(["nope"]).run().await;
    assert!(unknown.unwrap_err().to_string().contains("unknown shard"));
}

#[tokio::test(flavor = "multi_thread")]
async fn target_stops_the_application_history_at_that_version() {
    let case = Case::new(shared(), &[WIDGETS, GADGETS]).await;
    let report = Migrator::new(&case.config).target(1).run().await.unwrap();
    assert!(!report.failed(), "{report}");
    let (_, shard_latest) = platform_files("shard");
    let db = report.database("shard_1").unwrap();
    assert_eq!(
        db.platform.as_ref().unwrap().version_after,
        Some(shard_latest),
        "platform ignores the target"
    );
    assert_eq!(db.application.as_ref().unwrap().version_after, Some(1));
    assert!(!table_exists(case.shard_url("shard_1"), "gadgets").await);

    let status = Migrator::new(&case.config).status().await.unwrap();
    assert_eq!(status.lagging(), ["shard_1", "shard_2", "shard_3"], "{status}");
}

/// Whether `index` exists on the database at `url` and is valid.
async fn index_valid(url: &str, index: &str) -> Option<bool> {
    sqlx::query_scalar("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)")
        .bind(index)
        .fetch_optional(&mut connect(url).await)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn no_transaction_file_builds_an_index_concurrently_and_a_rerun_replaces_an_invalid_leftover() {
    let notes = ("V1__notes.sql", "CREATE TABLE notes (k int);");
    let unique = (
        "V2__notes_k_key.sql",
        "-- shardq:no-transaction\n\
         -- A rerun after a failure drops the INVALID index that failure leaves.\n\
         DROP INDEX CONCURRENTLY IF EXISTS notes_k_key;\n\
         CREATE UNIQUE INDEX CONCURRENTLY notes_k_key ON notes (k);\n",
    );
    let case = Case::new(shared(), &[notes]).await;
    assert!(!case.run().await.failed());
    // Only shard_2 holds duplicates, so building the unique index fails there.
    exec(case.shard_url("shard_2"), "INSERT INTO notes VALUES (1), (1)").await;
    case.write(unique.0, unique.1);

    let report = case.run().await;
    assert_eq!(
        report.failures().map(|d| d.database.as_str()).collect::<Vec<_>>(),
        ["shard_2"],
        "{report}"
    );
    let error = report.database("shard_2").unwrap().error.as_ref().unwrap();
    assert_eq!(
        (error.stage, error.sqlstate.as_deref()),
        (Stage::Migrate, Some("23505"))
    );
    assert_eq!(error.migration.as_ref().unwrap().to_string(), "V2__notes_k_key");
    assert!(
        error.message.contains("1 of its 2 statements ran")
            && error
                .message
                .contains("INVALID indexes in this database now: notes_k_key"),
        "{}",
        error.message
    );
    assert_eq!(index_valid(case.shard_url("shard_2"), "notes_k_key").await, Some(false));
    assert_eq!(
        history_rows(case.shard_url("shard_2"), "shardq_app_history").await,
        (1, 1),
        "a failed no-transaction file is not recorded"
    );
    for name in ["shard_1", "shard_3"] {
        assert_eq!(
            index_valid(case.shard_url(name), "notes_k_key").await,
            Some(true),
            "{name}"
        );
    }

    exec(case.shard_url("shard_2"), "DELETE FROM notes").await;
    let rerun = case.run().await;
    assert!(!rerun.failed(), "{rerun}");
    assert_eq!(rerun.applied_count(), 1, "{rerun}");
    assert_eq!(index_valid(case.shard_url("shard_2"), "notes_k_key").await, Some(true));

    // The same statement in an ordinary (transactional) file is refused by
    // Postgres: the marker is what makes it possible.
    case.write(
        "V3__notes_k_idx.sql",
        "CREATE INDEX CONCURRENTLY notes_k_idx ON notes (k);",
    );
    let refused = case.run().await;
    let error = refused.database("shard_1").unwrap().error.as_ref().unwrap();
    assert_eq!(error.sqlstate.as_deref(), Some("25001"), "{refused}");
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_canary_leaves_the_other_shards_untouched() {
    let conflict = ("V2__specials.sql", "CREATE TABLE specials (id int PRIMARY KEY);");
    let case = Case::new(shared(), &[WIDGETS, conflict]).await;
    exec(case.shard_url("shard_2"), "CREATE TABLE specials (legacy text)").await;

    let report = Migrator::new(&case.config).canary("shard_2").run().await.unwrap();
    assert!(report.failed());
    let names: Vec<&str> = report.databases.iter().map(|d| d.database.as_str()).collect();
    assert_eq!(names, ["master", "shard_2"], "{report}");
    assert_eq!(report.untouched, ["shard_1", "shard_3"]);
    assert!(report.database("master").unwrap().error.is_none());
    for name in ["shard_1", "shard_3"] {
        assert!(
            !table_exists(case.shard_url(name), "shardq_schema_history").await,
            "{name}"
        );
    }
    let text = report.to_string();
    assert!(
        text.contains("canary shard_2 failed: these shards were not touched: shard_1, shard_3"),
        "{text}"
    );
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["untouched"], serde_json::json!(["shard_1", "shard_3"]));

    // A canary that passes comes right after the master; then the rest run.
    let report = Migrator::new(&case.config).canary("shard_3").run().await.unwrap();
    let names: Vec<&str> = report.databases.iter().map(|d| d.database.as_str()).collect();
    assert_eq!(names, ["master", "shard_3", "shard_1", "shard_2"], "{report}");
    assert_eq!(
        report.failures().map(|d| d.database.as_str()).collect::<Vec<_>>(),
        ["shard_2"]
    );
    assert!(report.untouched.is_empty());
    assert!(table_exists(case.shard_url("shard_1"), "specials").await);

    let unknown = Migrator::new(&case.config).canary("nope").run().await;
    assert!(unknown.unwrap_err().to_string().contains("unknown shard \"nope\""));
    let unselected = Migrator::new(&case.config)
        .only_shards(["shard_1"])
        .canary("shard_3")
        .run()
        .await;
    assert!(unselected
        .unwrap_err()
        .to_string()
        .contains("canary shard \"shard_3\" is not among the selected shards"));
}

#[tokio::test(flavor = "multi_thread")]
async fn database_migrated_by_a_newer_release_is_ahead_of_this_binary_and_left_alone() {
    let case = Case::new(shared(), &[WIDGETS]).await;
    assert!(!case.run().await.failed());
    let (_, shard_latest) = platform_files("shard");
    // A newer release applied platform V99 on shard_2.
    exec(
        case.shard_url("shard_2"),
        "INSERT INTO shardq_schema_history VALUES (99, 'from_a_newer_release', '2030-01-01T00:00:00Z', '1')",
    )
    .await;
    case.write(GADGETS.0, GADGETS.1);

    let status = Migrator::new(&case.config).status().await.unwrap();
    assert!(!status.has_errors(), "{status}");
    assert_eq!(status.ahead(), ["shard_2"], "{status}");
    assert_eq!(status.database("shard_2").unwrap().state, State::Ahead);
    let text = status.to_string();
    assert!(
        text.contains(&format!(
            "shard_2 platform history ahead of this binary (applied V99, this binary knows up to V{shard_latest})"
        )),
        "{text}"
    );
    assert!(!text.contains("DIVERGED"), "{text}");

    let report = case.run().await;
    assert!(!report.failed(), "{report}");
    let db = report.database("shard_2").unwrap();
    assert_eq!(db.ahead.len(), 1, "{report}");
    assert_eq!(
        (db.ahead[0].history, db.ahead[0].applied, db.ahead[0].known),
        (History::Platform, 99, Some(shard_latest))
    );
    assert_eq!(db.applied_count(), 0);
    assert!(
        !table_exists(case.shard_url("shard_2"), "gadgets").await,
        "its pending application migration is not run either"
    );
    for name in ["shard_1", "shard_3"] {
        assert!(table_exists(case.shard_url(name), "gadgets").await, "{name}");
    }
    assert!(report.to_string().contains("ahead of this binary"), "{report}");

    // A newer application release applied V7 on shard_3 (after V1 and V2,
    // which this binary has too).
    exec(
        case.shard_url("shard_3"),
        "INSERT INTO shardq_app_history VALUES (7, 'newer_app', '2030-01-01T00:00:00Z', '1')",
    )
    .await;
    let report = case.run().await;
    assert!(!report.failed(), "{report}");
    let ahead = &report.database("shard_3").unwrap().ahead;
    assert_eq!(ahead.len(), 1, "{report}");
    assert_eq!(ahead[0].unknown[0].to_string(), "V7__newer_app");
    let text = report.to_string();
    assert!(
        text.contains("application history ahead of this binary (applied V7, this binary knows up to V2)"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hand_edited_history_rows_are_that_databases_divergence_never_a_panic() {
    let case = Case::new(shared(), &[WIDGETS]).await;
    assert!(!case.run().await.failed());
    // shard_1: a checksum that is not even a number; shard_2: a renamed
    // platform migration; shard_3: only a garbled applied_on (which shardq
    // does not need), so it still migrates.
    exec(
        case.shard_url("shard_1"),
        "UPDATE shardq_app_history SET checksum = 'edited by hand' WHERE version = 1",
    )
    .await;
    exec(
        case.shard_url("shard_2"),
        "UPDATE shardq_schema_history SET name = 'renamed_by_hand' WHERE version = 1",
    )
    .await;
    exec(
        case.shard_url("shard_3"),
        "UPDATE shardq_app_history SET applied_on = 'yesterday, roughly' WHERE version = 1",
    )
    .await;
    case.write(GADGETS.0, GADGETS.1);

    let report = case.run().await;
    assert_eq!(
        report.failures().map(|d| d.database.as_str()).collect::<Vec<_>>(),
        ["shard_1", "shard_2"],
        "{report}"
    );
    let edited = report.database("shard_1").unwrap().error.as_ref().unwrap();
    assert_eq!(edited.stage, Stage::Diverged);
    assert_eq!(edited.divergences[0].migration.to_string(), "V1__widgets");
    assert_eq!(edited.divergences[0].reason, DivergenceReason::ChecksumChanged);
    let renamed = report.database("shard_2").unwrap().error.as_ref().unwrap();
    assert_eq!(renamed.stage, Stage::Diverged);
    assert_eq!(renamed.divergences[0].history, History::Platform);
    assert_eq!(renamed.divergences[0].migration.to_string(), "V1__renamed_by_hand");
    assert!(renamed.message.contains("V1__renamed_by_hand"), "{}", renamed.message);
    for name in ["shard_1", "shard_2"] {
        assert!(!table_exists(case.shard_url(name), "gadgets").await, "{name}");
    }
    assert!(table_exists(case.shard_url("shard_3"), "gadgets").await);
}

#[tokio::test(flavor = "multi_thread")]
async fn file_checked_out_again_with_crlf_line_endings_is_not_an_edit() {
    let case = Case::new(
        shared(),
        &[("V1__widgets.sql", "CREATE TABLE widgets (\n  id int PRIMARY KEY\n);\n")],
    )
    .await;
    assert!(!case.run().await.failed());
    case.write(
        "V1__widgets.sql",
        "CREATE TABLE widgets (\r\n  id int PRIMARY KEY\r\n);\r\n",
    );
    case.write(GADGETS.0, GADGETS.1);
    let status = Migrator::new(&case.config).status().await.unwrap();
    assert!(status.diverged().is_empty(), "{status}");
    let report = case.run().await;
    assert!(!report.failed(), "{report}");
    assert!(table_exists(case.shard_url("shard_1"), "gadgets").await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shard_of_another_fleet_is_refused_while_the_others_migrate() {
    let other = Case::new(shared(), &[]).await;
    let report = other.run().await;
    assert!(!report.failed(), "{report}");
    let other_fleet = report.database("master").unwrap().fleet_id.clone().unwrap();
    for d in &report.databases {
        assert_eq!(d.fleet_id.as_deref(), Some(other_fleet.as_str()), "{}", d.database);
    }

    // This fleet's shard_2 address leads to the other fleet's shard_2.
    let ours = shared().fresh_fleet().await.unwrap();
    let stray = other.shard_url("shard_2").to_string();
    let shards: Vec<(&str, &str)> = ours
        .shards
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                if s.name == "shard_2" {
                    stray.as_str()
                } else {
                    s.url.as_str()
                },
            )
        })
        .collect();
    let config = Config::from_urls(&ours.master.url, &shards).unwrap();
    let case = Case::with_config(ours, config, &[WIDGETS]);
    let report = case.run().await;
    let failures: Vec<&str> = report.failures().map(|d| d.database.as_str()).collect();
    assert_eq!(failures, ["shard_2"], "{report}");
    let fleet = report.database("master").unwrap().fleet_id.clone().unwrap();
    assert_ne!(fleet, other_fleet);
    let refused = report.database("shard_2").unwrap().error.as_ref().unwrap();
    assert_eq!(refused.stage, Stage::Stamp);
    assert!(
        refused.message.contains(&fleet) && refused.message.contains(&other_fleet),
        "{refused}"
    );
    assert!(
        !table_exists(&stray, "widgets").await,
        "nothing ran on the refused shard"
    );
    for name in ["shard_1", "shard_3"] {
        assert!(table_exists(case.shard_url(name), "widgets").await, "{name}");
        assert_eq!(report.database(name).unwrap().fleet_id.as_deref(), Some(fleet.as_str()));
    }

    // A router of this fleet refuses it too, naming both fleet ids.
    let err = shardq_router::Router::connect(&case.config)
        .await
        .err()
        .expect("connect must refuse another fleet's shard");
    assert!(matches!(err, shardq_router::Error::ShardOfAnotherFleet { .. }), "{err}");
    assert!(
        err.to_string().contains(&fleet) && err.to_string().contains(&other_fleet),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shard_migrated_before_the_master_is_stamped_by_the_next_full_run() {
    let case = Case::new(shared(), &[]).await;
    let report = Migrator::new(&case.config)
        .only_shards(["shard_1"])
        .run()
        .await
        .unwrap();
    assert!(!report.failed(), "{report}");
    assert_eq!(report.database("shard_1").unwrap().fleet_id, None, "no fleet id yet");
    // Unstamped counts as not migrated: no new account goes there.
    let router = shardq_router::Router::connect(&case.config).await.unwrap();
    assert_eq!(router.schema_state("shard_1"), shardq_router::SchemaState::Unstamped);
    assert!(router.propose(&shardq_router::Account::new("a1").unwrap()).is_none());
    let report = case.run().await;
    assert!(!report.failed(), "{report}");
    let fleet = report.database("master").unwrap().fleet_id.clone().unwrap();
    assert_eq!(
        report.database("shard_1").unwrap().fleet_id.as_deref(),
        Some(fleet.as_str())
    );
}
