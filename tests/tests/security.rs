//! Security against real servers: TLS per database for both drivers (sqlx
//! for the router and the job engine, tokio-postgres for the migrator),
//! passwords kept out of every error, report and log line, and an
//! application role with only the documented grants.
//!
//! The TLS tests share one private bed (a master and three shards) whose
//! master and `shard_1` have `ssl = on` with certificates from one CA, whose
//! `shard_2` has no TLS, and whose `shard_3` has a certificate from the same
//! CA for another host name only. Every server trusts that CA for client
//! certificates and has three roles: one that needs a client certificate,
//! one a password (SCRAM), one both.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardq::{Account, Client, JobContext, JobError, NewJob, Runtime, RuntimeOptions, Worker};
use shardq_router::tls::SslMode;
use shardq_router::{Config, Migrator, Router, Target};
use shardq_testbed::bed::ensure_role;
use shardq_testbed::{ClientAuth, ClientFiles, Fleet, TestBed, TestCa};
use shardq_tests::{app_role, fleet, wait_for};
use tokio::sync::OnceCell;

const WAIT: Duration = Duration::from_secs(60);

/// The role that needs a client certificate.
const CERT_ROLE: &str = "shardq_cert";
/// The role that needs a password.
const PASSWORD_ROLE: &str = "shardq_pw";
/// The role that needs both.
const BOTH_ROLE: &str = "shardq_both";
/// The password of the password roles.
const ROLE_PASSWORD: &str = "Right-Secret-pw8";
/// The host name `shard_3`'s certificate is for (and the only one).
const OTHER_HOST: &str = "db.example.invalid";

/// The TLS bed, the CA its servers' certificates come from, a second CA
/// that signed nothing of it, and client certificates for the roles.
struct TlsBed {
    bed: TestBed,
    ca: PathBuf,
    wrong_ca: PathBuf,
    /// For [`CERT_ROLE`], from the bed's CA.
    cert_client: ClientFiles,
    /// For [`BOTH_ROLE`], from the bed's CA.
    both_client: ClientFiles,
    /// For [`CERT_ROLE`], from the other CA.
    untrusted_client: ClientFiles,
}

static TLS_BED: OnceCell<TlsBed> = OnceCell::const_new();

async fn tls_bed() -> &'static TlsBed {
    TLS_BED
        .get_or_init(|| async {
            let (bed, ca) = tokio::task::spawn_blocking(|| {
                let bed = TestBed::start(3).unwrap();
                let ca = TestCa::generate("shardq security test CA").unwrap();
                for name in ["master", "shard_1"] {
                    bed.server(name).unwrap().enable_tls_with(&ca).unwrap();
                }
                bed.server("shard_3")
                    .unwrap()
                    .enable_tls_for(&ca, &[OTHER_HOST])
                    .unwrap();
                (bed, ca)
            })
            .await
            .unwrap();
            for server in bed.servers() {
                ensure_role(server, CERT_ROLE, None).await.unwrap();
                ensure_role(server, PASSWORD_ROLE, Some(ROLE_PASSWORD)).await.unwrap();
                ensure_role(server, BOTH_ROLE, Some(ROLE_PASSWORD)).await.unwrap();
                // Superusers, so that they can migrate the fresh databases.
                let admin = server.url("postgres");
                let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin).await.unwrap();
                for role in [CERT_ROLE, PASSWORD_ROLE, BOTH_ROLE] {
                    sqlx::query(&format!("ALTER ROLE {role} SUPERUSER"))
                        .execute(&mut conn)
                        .await
                        .unwrap();
                }
            }
            let bed = tokio::task::spawn_blocking(move || {
                for server in bed.servers() {
                    server
                        .require_client_auth(&[
                            (CERT_ROLE, ClientAuth::Certificate),
                            (PASSWORD_ROLE, ClientAuth::Password),
                            (BOTH_ROLE, ClientAuth::PasswordAndCertificate),
                        ])
                        .unwrap();
                }
                bed
            })
            .await
            .unwrap();
            let ca_path = bed.dir().join("ca.crt");
            ca.write_cert(&ca_path).unwrap();
            let wrong = TestCa::generate("some other CA").unwrap();
            let wrong_ca = bed.dir().join("wrong-ca.crt");
            wrong.write_cert(&wrong_ca).unwrap();
            let client =
                |ca: &TestCa, role: &str, stem: &str| ca.issue_client(role).unwrap().write(bed.dir(), stem).unwrap();
            TlsBed {
                cert_client: client(&ca, CERT_ROLE, "cert-client"),
                both_client: client(&ca, BOTH_ROLE, "both-client"),
                untrusted_client: client(&wrong, CERT_ROLE, "untrusted-client"),
                bed,
                ca: ca_path,
                wrong_ca,
            }
        })
        .await
}

/// `url` with libpq-style parameters appended.
fn with(url: &str, params: &str) -> String {
    format!("{url}?{params}")
}

/// `url` (as the test bed gives it, for user `postgres`) for `user`, with
/// `password` if not empty.
fn as_user(url: &str, user: &str, password: &str) -> String {
    let who = if password.is_empty() {
        user.to_owned()
    } else {
        format!("{user}:{password}")
    };
    url.replacen("postgres://postgres@", &format!("postgres://{who}@"), 1)
}

/// `sslcert=...&sslkey=...` for `files`.
fn client_params(files: &ClientFiles) -> String {
    format!("sslcert={}&sslkey={}", files.cert.display(), files.key.display())
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

/// The migrator's connection setup for `target`, used directly: the value of
/// `sql` (one text column) on it.
async fn migrator_query(target: &Target, sql: &str) -> Result<String, String> {
    let tls_connector = shardq_router::tls::tokio_postgres_connector(target).map_err(|e| e.to_string())?;
    let (pg, connection) = target
        .tokio_postgres_config()
        .connect(tls_connector)
        .await
        .map_err(|e| format!("{e} ({e:?})"))?;
    let driver = tokio::spawn(connection);
    let value = pg
        .query_one(sql, &[])
        .await
        .map_err(|e| e.to_string())?
        .get::<_, String>(0);
    drop(pg);
    driver.await.unwrap().unwrap();
    Ok(value)
}

/// The client certificate's DN of this connection, "" without one.
const CLIENT_DN: &str = "SELECT coalesce(client_dn, '') FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

/// The error of a connection of the router's driver to `database` (its
/// pool), as the router reports it.
async fn router_error(router: &Router, database: &str) -> String {
    let db = if database == "master" {
        router.master()
    } else {
        router.shard(database).unwrap()
    };
    db.error(db.pool.acquire().await.unwrap_err()).to_string()
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
    let f = fleet().await; // migrated as the owner (the postgres superuser)
    let (role, app) = app_role(&f, "shardq_app").await;
    let master = &f.router.master().pool;
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

#[tokio::test]
async fn an_upper_case_sslmode_is_refused_for_both_drivers_naming_the_field() {
    // It used to pass the config's check (which lower-cased it) while the
    // migrator, holding the owner's credentials, fell back to `prefer`.
    let tls = tls_bed().await;
    let dbs = tls.bed.fresh_fleet().await.unwrap();
    let vf = format!("sslmode=verify-full&sslrootcert={}", tls.ca.display());
    let err = Config::from_urls(
        &with(&dbs.master.url, &vf),
        &[
            ("shard_1", &with(&dbs.shards[0].url, &vf)),
            ("shard_2", &with(&dbs.shards[1].url, "sslmode=VERIFY-FULL")),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("<inline>: shards[1].sslmode: \"VERIFY-FULL\"") && err.contains("lower case"),
        "{err}"
    );
}

#[tokio::test]
async fn require_with_a_root_file_verifies_the_chain_for_both_drivers() {
    // libpq: with an sslrootcert file, `require` verifies as `verify-ca`.
    let tls = tls_bed().await;
    let dbs = tls.bed.fresh_fleet().await.unwrap();
    let good = format!("sslmode=require&sslrootcert={}", tls.ca.display());
    let bad = format!("sslmode=require&sslrootcert={}", tls.wrong_ca.display());
    let report = Migrator::new(&config(&dbs, &good, &bad, "sslmode=disable"))
        .run()
        .await
        .unwrap();
    let text = report.to_string();
    assert!(report.database("master").unwrap().error.is_none(), "{text}");
    let line = failure_line(&text, "shard_1");
    assert!(line.contains("UnknownIssuer"), "{line}");

    let router = Router::connect(&config(&dbs, &good, &bad, "sslmode=disable"))
        .await
        .unwrap();
    assert!(pool_is_encrypted(&router.master().pool).await);
    let err = router_error(&router, "shard_1").await;
    assert!(
        err.starts_with("shard shard_1 (") && err.contains("TLS") && err.contains("UnknownIssuer"),
        "{err}"
    );
}

#[tokio::test]
async fn verify_ca_checks_the_chain_and_not_the_host_name_verify_full_both() {
    // shard_3's certificate is from the bed's CA, for another host name.
    let tls = tls_bed().await;
    let dbs = tls.bed.fresh_fleet().await.unwrap();
    let shard_3 = &dbs.shards[2].url;
    let on_shard_3 = |params: &str| {
        Config::from_urls(
            &with(&dbs.master.url, "sslmode=disable"),
            &[("shard_3", &with(shard_3, params))],
        )
        .unwrap()
    };
    let ca = |mode: &str, file: &PathBuf| format!("sslmode={mode}&sslrootcert={}", file.display());

    // verify-ca with the right CA: both drivers connect, encrypted.
    let config = on_shard_3(&ca("verify-ca", &tls.ca));
    let report = Migrator::new(&config).run().await.unwrap();
    assert!(!report.failed(), "{report}");
    let router = Router::connect(&config).await.unwrap();
    assert!(pool_is_encrypted(&router.shard("shard_3").unwrap().pool).await);

    // verify-full with the right CA: the name does not match, for both.
    let config = on_shard_3(&ca("verify-full", &tls.ca));
    let report = Migrator::new(&config).run().await.unwrap();
    let line = failure_line(&report.to_string(), "shard_3");
    assert!(line.contains("not valid for name"), "{line}");
    let router = Router::connect(&config).await.unwrap();
    let err = router_error(&router, "shard_3").await;
    assert!(
        err.starts_with("shard shard_3 (") && err.contains("not valid for name"),
        "{err}"
    );

    // verify-ca with another CA: the chain does not lead to it, for both.
    let config = on_shard_3(&ca("verify-ca", &tls.wrong_ca));
    let report = Migrator::new(&config).run().await.unwrap();
    let line = failure_line(&report.to_string(), "shard_3");
    assert!(line.contains("UnknownIssuer"), "{line}");
    let router = Router::connect(&config).await.unwrap();
    let err = router_error(&router, "shard_3").await;
    assert!(
        err.starts_with("shard shard_3 (") && err.contains("UnknownIssuer"),
        "{err}"
    );
}

#[tokio::test]
async fn sslrootcert_system_means_verify_full_against_the_public_roots_only() {
    let tls = tls_bed().await;
    let dbs = tls.bed.fresh_fleet().await.unwrap();
    // No sslmode: system makes it verify-full.
    let config = config(&dbs, "sslrootcert=system", "sslrootcert=system", "sslrootcert=system");
    assert!(config
        .shards
        .iter()
        .all(|s| s.database.target.sslmode == SslMode::VerifyFull));
    // A private CA is not a public root (master, shard_1); a server without
    // TLS is refused (shard_2): for both drivers.
    let report = Migrator::new(&config).run().await.unwrap();
    let text = report.to_string();
    for database in ["master", "shard_1"] {
        let line = failure_line(&text, database);
        assert!(line.contains("UnknownIssuer"), "{line}");
    }
    assert!(
        failure_line(&text, "shard_2").contains("does not support TLS"),
        "{text}"
    );
    let router = Router::connect(&config).await.unwrap();
    for database in ["master", "shard_1"] {
        let err = router_error(&router, database).await;
        assert!(err.contains("TLS") && err.contains("UnknownIssuer"), "{err}");
    }
    let err = router_error(&router, "shard_2").await;
    assert!(
        err.starts_with("shard shard_2 (") && err.contains("does not support TLS"),
        "{err}"
    );
    // Nothing weaker goes with it.
    let err = Config::from_urls(
        &with(&dbs.master.url, "sslmode=verify-ca&sslrootcert=system"),
        &[("shard_1", &dbs.shards[0].url)],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("master.sslmode") && err.contains("sslrootcert=system"),
        "{err}"
    );
}

#[tokio::test]
async fn client_certificates_work_for_both_drivers() {
    let tls = tls_bed().await;
    let dbs = tls.bed.fresh_fleet().await.unwrap();
    let vf = format!("sslmode=verify-full&sslrootcert={}", tls.ca.display());
    let with_cert = format!("{vf}&{}", client_params(&tls.cert_client));
    let cert_config = |params: &str| {
        Config::from_urls(
            &with(&as_user(&dbs.master.url, CERT_ROLE, ""), params),
            &[
                ("shard_1", &with(&as_user(&dbs.shards[0].url, CERT_ROLE, ""), params)),
                ("shard_2", &with(&dbs.shards[1].url, "sslmode=disable")),
            ],
        )
        .unwrap()
    };
    let config = cert_config(&with_cert);

    // The migrator migrates as the role, authenticated by its certificate.
    let report = Migrator::new(&config).run().await.unwrap();
    assert!(!report.failed(), "{report}");
    assert_eq!(
        migrator_query(&config.master.target, CLIENT_DN).await.unwrap(),
        format!("/CN={CERT_ROLE}")
    );
    // The router, client and a worker node too.
    let router = Arc::new(Router::connect(&config).await.unwrap());
    job_completes(&router, &Account::new("cert-acct").unwrap(), "shard_1").await;
    for pool in [&router.master().pool, &router.shard("shard_1").unwrap().pool] {
        let dn: String = sqlx::query_scalar(CLIENT_DN).fetch_one(pool).await.unwrap();
        assert_eq!(dn, format!("/CN={CERT_ROLE}"));
    }

    // Without the certificate, or with one of another CA, the server
    // refuses both drivers, and the errors name the database.
    for params in [vf.clone(), format!("{vf}&{}", client_params(&tls.untrusted_client))] {
        let config = cert_config(&params);
        let report = Migrator::new(&config).run().await.unwrap();
        let text = report.to_string();
        for database in ["master", "shard_1"] {
            let line = failure_line(&text, database);
            assert!(line.contains("certificate") || line.contains("UnknownCA"), "{line}");
        }
        // The router refuses to start when the master's server refuses the
        // role (no certificate); a failed handshake (a certificate the
        // server does not trust) leaves it to the first call, as any TLS
        // failure does.
        let err = match Router::connect(&config).await {
            Err(e) => e.to_string(),
            Ok(router) => router_error(&router, "shard_1").await,
        };
        assert!(
            (err.starts_with("master (") || err.starts_with("shard shard_1 ("))
                && (err.contains("certificate") || err.contains("UnknownCA")),
            "{err}"
        );
    }
}

#[tokio::test]
async fn both_drivers_read_the_same_libpq_environment() {
    let tls = tls_bed().await;
    let dbs = tls.bed.fresh_fleet().await.unwrap();
    let ca = tls.ca.display().to_string();
    let (cert, key) = (
        tls.both_client.cert.display().to_string(),
        tls.both_client.key.display().to_string(),
    );
    let env = move |name: &str| {
        Some(match name {
            "PGPASSWORD" => ROLE_PASSWORD.to_owned(),
            "PGSSLMODE" => "verify-full".to_owned(),
            "PGSSLROOTCERT" => ca.clone(),
            "PGSSLCERT" => cert.clone(),
            "PGSSLKEY" => key.clone(),
            "PGOPTIONS" => "-c shardq.test_marker=from-the-environment".to_owned(),
            _ => return None,
        })
    };
    // The file says only where the databases are and as whom: password,
    // TLS and options come from the environment.
    let text = format!(
        "[master]\nurl = \"{}\"\n[[shards]]\nname = \"shard_1\"\nurl = \"{}\"\n\
         [[shards]]\nname = \"shard_2\"\nurl = \"{}?sslmode=disable\"\n",
        as_user(&dbs.master.url, BOTH_ROLE, ""),
        as_user(&dbs.shards[0].url, BOTH_ROLE, ""),
        dbs.shards[1].url,
    );
    let config = Config::parse(&text, std::path::Path::new("env.toml"), &env).unwrap();

    let report = Migrator::new(&config).run().await.unwrap();
    assert!(!report.failed(), "{report}");
    let marker = "SELECT current_setting('shardq.test_marker')";
    for target in [&config.master.target, &config.shards[0].database.target] {
        assert_eq!(migrator_query(target, marker).await.unwrap(), "from-the-environment");
        assert_eq!(
            migrator_query(target, CLIENT_DN).await.unwrap(),
            format!("/CN={BOTH_ROLE}")
        );
    }
    let router = Arc::new(Router::connect(&config).await.unwrap());
    job_completes(&router, &Account::new("env-acct").unwrap(), "shard_1").await;
    for pool in [&router.master().pool, &router.shard("shard_1").unwrap().pool] {
        let value: String = sqlx::query_scalar(marker).fetch_one(pool).await.unwrap();
        assert_eq!(value, "from-the-environment");
        let dn: String = sqlx::query_scalar(CLIENT_DN).fetch_one(pool).await.unwrap();
        assert_eq!(dn, format!("/CN={BOTH_ROLE}"));
    }
}

#[tokio::test]
async fn a_wrong_password_for_one_shard_names_the_shard_and_never_the_password() {
    let tls = tls_bed().await;
    let dbs = tls.bed.fresh_fleet().await.unwrap();
    let wrong = "Wrong-Secret-pw9";
    let text = format!(
        "[master]\nurl = \"{}?sslmode=disable\"\n\
         [[shards]]\nname = \"shard_1\"\nurl = \"{}?sslmode=disable\"\npassword = \"{wrong}\"\n\
         [[shards]]\nname = \"shard_2\"\nurl = \"{}?sslmode=disable\"\n",
        as_user(&dbs.master.url, PASSWORD_ROLE, ROLE_PASSWORD),
        as_user(&dbs.shards[0].url, PASSWORD_ROLE, ""),
        as_user(&dbs.shards[1].url, PASSWORD_ROLE, ROLE_PASSWORD),
    );
    let config = Config::parse(&text, std::path::Path::new("pw.toml"), &|_| None).unwrap();
    let mut seen: Vec<(&str, String)> = Vec::new();

    // The migrator: shard_1 fails, naming it; the others migrate.
    let report = Migrator::new(&config).run().await.unwrap();
    let text = report.to_string();
    let line = failure_line(&text, "shard_1");
    assert!(line.contains("password authentication failed"), "{line}");
    assert!(report.database("master").unwrap().error.is_none(), "{text}");
    assert!(report.database("shard_2").unwrap().error.is_none(), "{text}");
    seen.push(("report", text));
    seen.push(("report debug", format!("{report:?}")));
    seen.push(("report json", serde_json::to_string(&report).unwrap()));

    // The router and the job client: an enqueue for an account on shard_1.
    let router = Arc::new(Router::connect(&config).await.unwrap());
    let err = router_error(&router, "shard_1").await;
    assert!(
        err.starts_with("shard shard_1 (postgres://shardq_pw@127.0.0.1:")
            && err.contains("password authentication failed"),
        "{err}"
    );
    seen.push(("pool error", err));
    let account = Account::new("pw-acct").unwrap();
    router.place(&account, "shard_1").await.unwrap();
    let err = Client::new(router.clone())
        .enqueue(&account, NewJob::from_json("count", serde_json::json!({})))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("shard shard_1"), "{err}");
    seen.push(("enqueue error", err.to_string()));
    seen.push(("enqueue error debug", format!("{err:?}")));
    seen.push(("config debug", format!("{config:?}")));
    for (what, shown) in &seen {
        for secret in [wrong, ROLE_PASSWORD] {
            assert!(!shown.contains(secret), "{what} shows the password {secret}:\n{shown}");
        }
    }
    // The right password on the other shard works.
    job_completes(&router, &Account::new("pw-acct-2").unwrap(), "shard_2").await;
}

#[tokio::test]
async fn a_verified_database_that_is_down_fails_as_a_direct_connection_does() {
    // Verified connections of the router go through the TLS relay; a
    // refused connection still reads as one, and the pool retries it until
    // its acquire_timeout, as it does a refused direct connection.
    let tls = tls_bed().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = format!(
        "[master]\nport = {closed}\nsslmode = \"verify-full\"\nsslrootcert = \"{ca}\"\npool = {{ acquire_timeout = \"300ms\" }}\n\
         [[shards]]\nname = \"shard_1\"\nport = {closed}\ndbname = \"other\"\n",
        ca = tls.ca.display()
    );
    let config = Config::parse(&text, std::path::Path::new("down.toml"), &|_| None).unwrap();
    let router = Router::connect(&config).await.unwrap();
    let err = router_error(&router, "master").await;
    assert!(
        err.starts_with("master (") && err.contains("no connection within the acquire_timeout of 300ms"),
        "{err}"
    );
    let direct = <sqlx::PgConnection as sqlx::Connection>::connect_with(&config.master.target.connect_options())
        .await
        .unwrap_err();
    let direct = shardq_router::tls::classify(direct);
    assert!(
        matches!(&direct, sqlx::Error::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "{direct:?}"
    );
}
