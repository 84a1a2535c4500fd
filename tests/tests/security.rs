//! Security against real servers: TLS per database for both drivers (sqlx
//! for the router and the job engine, tokio-postgres for the migrator),
//! passwords kept out of every error, report and log line, and an
//! application role with only the documented grants.
//!
//! The TLS tests share one private bed (a master and two shards) whose
//! master and `shard_1` have `ssl = on` with certificates from one CA, and
//! whose `shard_2` has no TLS.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use shardq::{Account, Client, JobContext, JobError, NewJob, Runtime, RuntimeOptions, Worker};
use shardq_router::privileges::{master_grants, quote_identifier, shard_grants};
use shardq_router::{Config, Migrator, Router, Target};
use shardq_testbed::{Fleet, TestBed, TestCa};
use shardq_tests::{fleet, wait_for};

const WAIT: Duration = Duration::from_secs(60);

/// The TLS bed, the CA its servers' certificates come from, and a second CA
/// that signed nothing of it.
struct TlsBed {
    bed: TestBed,
    ca: PathBuf,
    wrong_ca: PathBuf,
}

static TLS_BED: OnceLock<TlsBed> = OnceLock::new();

async fn tls_bed() -> &'static TlsBed {
    tokio::task::spawn_blocking(|| {
        TLS_BED.get_or_init(|| {
            let bed = TestBed::start(2).unwrap();
            let ca = TestCa::generate("shardq security test CA").unwrap();
            let ca_path = bed.dir().join("ca.crt");
            ca.write_cert(&ca_path).unwrap();
            for name in ["master", "shard_1"] {
                bed.server(name).unwrap().enable_tls_with(&ca).unwrap();
            }
            let wrong_ca = bed.dir().join("wrong-ca.crt");
            TestCa::generate("some other CA")
                .unwrap()
                .write_cert(&wrong_ca)
                .unwrap();
            TlsBed {
                bed,
                ca: ca_path,
                wrong_ca,
            }
        })
    })
    .await
    .unwrap()
}

/// `url` with libpq-style parameters appended.
fn with(url: &str, params: &str) -> String {
    format!("{url}?{params}")
}

/// A config over `dbs` where each database gets its own URL parameters.
fn config(dbs: &Fleet, master: &str, shard_1: &str, shard_2: &str) -> Config {
    Config::from_urls(
        &with(&dbs.master.url, master),
        &[
            ("shard_1", &with(&dbs.shards[0].url, shard_1)),
            ("shard_2", &with(&dbs.shards[1].url, shard_2)),
        ],
    )
    .unwrap()
}

/// The failure line of `database` in a migration report's text.
fn failure_line(report: &str, database: &str) -> String {
    report
        .lines()
        .find(|l| l.starts_with(&format!("{database} (")) && l.contains("FAILED:"))
        .unwrap_or_else(|| panic!("no failure line for {database} in:\n{report}"))
        .to_owned()
}

/// `SELECT ssl FROM pg_stat_ssl` for this connection of `pool`.
async fn pool_is_encrypted(pool: &sqlx::PgPool) -> bool {
    sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Counts runs.
#[derive(Clone, Default)]
struct Counting(Arc<Mutex<u32>>);

impl Worker for Counting {
    type Args = serde_json::Value;
    const KIND: &'static str = "count";
    async fn work(&self, _: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        *self.0.lock().unwrap() += 1;
        Ok(())
    }
}

fn fast() -> RuntimeOptions {
    RuntimeOptions {
        poll_interval: Duration::from_millis(200),
        ..RuntimeOptions::default()
    }
}

/// Enqueues one job for `account` (placed on `shard`) and waits until a
/// worker node over `router` completed it.
async fn job_completes(router: &Arc<Router>, account: &Account, shard: &str) {
    let placement = router.place(account, shard).await.unwrap();
    assert_eq!(placement.shard, shard);
    let client = Client::new(router.clone());
    let worker = Counting::default();
    let rt = Runtime::builder(router.clone())
        .queue("default", 4)
        .register(worker.clone())
        .options(fast())
        .start()
        .unwrap();
    let id = client
        .enqueue(account, NewJob::from_json("count", serde_json::json!({})))
        .await
        .unwrap();
    wait_for("the job completed", WAIT, || async {
        client.job(&id).await.unwrap().state == "completed"
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await;
    assert_eq!(*worker.0.lock().unwrap(), 1);
}

#[tokio::test]
async fn verify_full_with_the_right_ca_migrates_runs_jobs_and_encrypts_every_connection() {
    let tls = tls_bed().await;
    let dbs = tls.bed.fresh_fleet().await.unwrap();
    let vf = format!("sslmode=verify-full&sslrootcert={}", tls.ca.display());
    let config = config(&dbs, &vf, &vf, "sslmode=disable");

    // The migrator (tokio-postgres) verifies and migrates every database.
    let report = Migrator::new(&config).run().await.unwrap();
    assert!(!report.failed(), "{report}");
    assert!(report.applied_count() > 0, "{report}");

    // The migrator's connection setup, used directly: it is encrypted.
    let target = &config.master.target;
    let tls_connector = shardq_router::tls::tokio_postgres_connector(target).unwrap();
    let (pg, connection) = target.tokio_postgres_config().connect(tls_connector).await.unwrap();
    let driver = tokio::spawn(connection);
    let row = pg
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "migrator connection not encrypted");
    drop(pg);
    driver.await.unwrap().unwrap();

    // Router, client and worker node (sqlx) over the same config.
    let router = Arc::new(Router::connect(&config).await.unwrap());
    job_completes(&router, &Account::new("tls-acct").unwrap(), "shard_1").await;
    assert!(
        pool_is_encrypted(&router.master().pool).await,
        "master pool not encrypted"
    );
    assert!(
        pool_is_encrypted(&router.shard("shard_1").unwrap().pool).await,
        "shard_1 pool not encrypted"
    );
    // sslmode is per database: shard_2 said disable.
    assert!(!pool_is_encrypted(&router.shard("shard_2").unwrap().pool).await);
}

#[tokio::test]
async fn verify_full_with_a_wrong_ca_fails_naming_the_database_and_the_certificate() {
    let tls = tls_bed().await;
    let dbs = tls.bed.fresh_fleet().await.unwrap();
    let good = format!("sslmode=verify-full&sslrootcert={}", tls.ca.display());
    let bad = format!("sslmode=verify-full&sslrootcert={}", tls.wrong_ca.display());
    let report = Migrator::new(&config(&dbs, &good, &good, "sslmode=disable"))
        .run()
        .await
        .unwrap();
    assert!(!report.failed(), "{report}");

    // The migrator: master and shard_1 refuse the certificate, shard_2 is fine.
    let report = Migrator::new(&config(&dbs, &bad, &bad, "sslmode=disable"))
        .run()
        .await
        .unwrap();
    let text = report.to_string();
    for database in ["master", "shard_1"] {
        let line = failure_line(&text, database);
        assert!(line.contains("TLS") && line.contains("certificate"), "{line}");
        assert!(report.database(database).unwrap().error.is_some());
    }
    assert!(report.database("shard_2").unwrap().error.is_none(), "{text}");

    // The router: a wrong CA for the master fails routing a new account.
    let router = Router::connect(&config(&dbs, &bad, &good, "sslmode=disable"))
        .await
        .unwrap();
    let err = router
        .shard_for(&Account::new("new-acct").unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("master (") && err.contains("TLS") && err.contains("certificate"),
        "{err}"
    );

    // The job client: a wrong CA for shard_1 fails the enqueue, naming it.
    let router = Arc::new(
        Router::connect(&config(&dbs, &good, &bad, "sslmode=disable"))
            .await
            .unwrap(),
    );
    let account = Account::new("acct-on-1").unwrap();
    router.place(&account, "shard_1").await.unwrap();
    let err = Client::new(router)
        .enqueue(&account, NewJob::from_json("count", serde_json::json!({})))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("shard shard_1") && err.contains("TLS") && err.contains("certificate"),
        "{err}"
    );
}

#[tokio::test]
async fn require_on_a_server_without_tls_fails_naming_the_database() {
    let tls = tls_bed().await;
    let dbs = tls.bed.fresh_fleet().await.unwrap();
    let vf = format!("sslmode=verify-full&sslrootcert={}", tls.ca.display());
    // require against a server with TLS works and does not verify: any CA.
    let report = Migrator::new(&config(&dbs, &vf, "sslmode=require", "sslmode=require"))
        .run()
        .await
        .unwrap();
    let text = report.to_string();
    assert!(report.database("master").unwrap().error.is_none(), "{text}");
    assert!(report.database("shard_1").unwrap().error.is_none(), "{text}");
    let line = failure_line(&text, "shard_2");
    assert!(line.contains("does not support TLS"), "{line}");

    let router = Arc::new(
        Router::connect(&config(&dbs, &vf, "sslmode=require", "sslmode=require"))
            .await
            .unwrap(),
    );
    assert!(pool_is_encrypted(&router.shard("shard_1").unwrap().pool).await);
    let account = Account::new("acct-on-2").unwrap();
    router.place(&account, "shard_2").await.unwrap();
    let err = Client::new(router)
        .enqueue(&account, NewJob::from_json("count", serde_json::json!({})))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("shard shard_2") && err.contains("does not support TLS"),
        "{err}"
    );
}

/// A tracing writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn passwords_never_appear_in_errors_reports_or_logs() {
    use tracing_subscriber::util::SubscriberInitExt;
    let logs = Captured::default();
    let writer = logs.clone();
    let _log = tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish()
        .set_default();

    // Nothing listens on this port: every connection attempt fails.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let secrets = [
        "Master-Secret-pw1",
        "Shard-Secret-pw2",
        "Url@Secret-pw3",
        "Url%40Secret-pw3",
    ];
    let text = format!(
        r#"
[master]
url = "postgres://app:Master-Secret-pw1@127.0.0.1:{closed}/db1"
pool = {{ acquire_timeout = "300ms" }}

[[shards]]
name = "shard_1"
host = "127.0.0.1"
port = {closed}
user = "app"
password = "Shard-Secret-pw2"
dbname = "db2"
pool = {{ acquire_timeout = "300ms" }}

[[shards]]
name = "shard_2"
url = "postgres://app:Url%40Secret-pw3@127.0.0.1:{closed}/db3?sslmode=disable"
pool = {{ acquire_timeout = "300ms" }}
"#
    );
    let config = Config::parse(&text, std::path::Path::new("secrets.toml"), &|_| None).unwrap();
    assert_eq!(
        config.shards[1].database.target.password.as_deref(),
        Some("Url@Secret-pw3")
    );

    let mut seen: Vec<(&str, String)> = vec![
        ("config debug", format!("{config:?}")),
        ("target display", config.master.target.to_string()),
        ("target debug", format!("{:?}", config.shards[0].database.target)),
    ];

    let report = Migrator::new(&config).run().await.unwrap();
    assert_eq!(report.failures().count(), 3, "{report}");
    seen.push(("migration report", report.to_string()));
    seen.push(("migration report debug", format!("{report:?}")));
    seen.push(("migration report json", serde_json::to_string(&report).unwrap()));
    let status = Migrator::new(&config).status().await.unwrap();
    seen.push(("migration status", status.to_string()));
    seen.push(("migration status json", serde_json::to_string(&status).unwrap()));

    let router = Arc::new(Router::connect(&config).await.unwrap());
    let err = router.shard_for(&Account::new("a1").unwrap()).await.unwrap_err();
    seen.push(("route error", err.to_string()));
    seen.push(("route error debug", format!("{err:?}")));
    for db in router.shards() {
        let err = db.error(db.pool.acquire().await.unwrap_err());
        seen.push(("shard pool error", err.to_string()));
        seen.push(("shard pool error debug", format!("{err:?}")));
    }
    let err = Client::new(router)
        .enqueue(
            &Account::new("a1").unwrap(),
            NewJob::from_json("count", serde_json::json!({})),
        )
        .await
        .unwrap_err();
    seen.push(("enqueue error", err.to_string()));
    seen.push(("enqueue error debug", format!("{err:?}")));
    seen.push(("logs", String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned()));

    // The captures are about these databases (so the check below is not vacuous).
    assert!(seen.iter().any(|(_, s)| s.contains("shard_1") && s.contains("db2")));
    assert!(seen
        .iter()
        .any(|(what, s)| *what == "logs" && s.contains("migration failed")));
    for (what, s) in &seen {
        for secret in secrets {
            assert!(!s.contains(secret), "{what} shows the password {secret}:\n{s}");
        }
    }
}

#[tokio::test]
async fn an_app_role_with_the_documented_grants_runs_jobs_but_cannot_change_the_schema() {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let f = fleet().await; // migrated as the owner (the postgres superuser)
    let role = format!(
        "shardq_app_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let quoted = quote_identifier(&role);
    // Roles are per server (cluster): create it on each, then grant per database.
    let master = &f.router.master().pool;
    sqlx::query(&format!("CREATE ROLE {quoted} LOGIN"))
        .execute(master)
        .await
        .unwrap();
    for statement in master_grants(&role) {
        sqlx::query(&statement).execute(master).await.unwrap();
    }
    for shard in f.router.shards() {
        sqlx::query(&format!("CREATE ROLE {quoted} LOGIN"))
            .execute(&shard.pool)
            .await
            .unwrap();
        for statement in shard_grants(&role) {
            sqlx::query(&statement).execute(&shard.pool).await.unwrap();
        }
    }

    let mut app = f.config.clone();
    let as_role = |t: &mut Target| t.user = role.clone();
    as_role(&mut app.master.target);
    for shard in &mut app.shards {
        as_role(&mut shard.database.target);
    }
    let router = Arc::new(Router::connect(&app).await.unwrap());
    let who: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&router.master().pool)
        .await
        .unwrap();
    assert_eq!(who, role);

    // Routing (a new placement), enqueue and a worker node, all as the role.
    let account = Account::new("least-privilege").unwrap();
    let shard = router.shard_for(&account).await.unwrap();
    assert!(shard.placed_now);
    let placed: Option<String> = sqlx::query_scalar("SELECT shard FROM shardq.placements WHERE account = $1")
        .bind(account.as_str())
        .fetch_optional(master)
        .await
        .unwrap();
    assert_eq!(placed.as_deref(), Some(shard.shard.as_str()));
    job_completes(&router, &account, &shard.shard).await;

    // ... but no schema changes, and no rewriting placements.
    let denied = |pool: sqlx::PgPool, sql: &'static str| async move {
        let err = sqlx::query(sql).execute(&pool).await.unwrap_err();
        let code = err.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned());
        assert_eq!(code.as_deref(), Some("42501"), "{sql}: {err}");
    };
    let app_shard = router.shard(&shard.shard).unwrap().pool.clone();
    let app_master = router.master().pool.clone();
    denied(app_shard.clone(), "CREATE TABLE shardq.x (id int)").await;
    denied(app_shard.clone(), "DROP TABLE shardq.jobs").await;
    denied(app_shard, "ALTER TABLE shardq.jobs ADD COLUMN y int").await;
    denied(app_master.clone(), "CREATE TABLE shardq.x (id int)").await;
    denied(app_master.clone(), "DROP TABLE shardq.placements").await;
    denied(app_master, "UPDATE shardq.placements SET shard = shard").await;
}
