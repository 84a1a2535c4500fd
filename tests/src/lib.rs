//! Integration tests of shardq against real Postgres servers.
//!
//! Layout: this file is the harness every test binary shares: a migrated
//! fleet of fresh databases on the test bed ([`fleet`]), and waiting on a
//! condition with a deadline ([`wait_for`]), generic plans and their cost
//! ([`generic_plan`], [`buffers_and_rows`]). The tests are in `tests/`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use shardq::{Backoff, Client, RuntimeOptions};
use shardq_router::{Config, Migrator, Router};
use shardq_testbed::TestBed;

/// A handler of kind `noop` that succeeds at once.
pub struct Noop;

impl shardq::Worker for Noop {
    type Args = serde_json::Value;
    const KIND: &'static str = "noop";
    async fn work(&self, _: shardq::JobContext, _: serde_json::Value) -> Result<(), shardq::JobError> {
        Ok(())
    }
}

/// A migrated fleet of fresh databases (master + every shard of a bed).
pub struct Fleet {
    /// Its configuration.
    pub config: Config,
    /// A router over it.
    pub router: Arc<Router>,
    /// A job client over it.
    pub client: Client,
}

/// A fresh, migrated fleet on the bed shared by this test binary (3 shards).
pub async fn fleet() -> Fleet {
    let bed = tokio::task::spawn_blocking(TestBed::shared)
        .await
        .expect("join")
        .expect("shared test bed");
    fleet_on(bed).await
}

/// A fresh, migrated fleet on `bed`.
pub async fn fleet_on(bed: &TestBed) -> Fleet {
    let dbs = bed.fresh_fleet().await.expect("fresh databases");
    let shards: Vec<(&str, &str)> = dbs.shards.iter().map(|s| (s.name.as_str(), s.url.as_str())).collect();
    let config = Config::from_urls(&dbs.master.url, &shards).expect("config");
    let report = Migrator::new(&config).run().await.expect("migrate");
    assert!(!report.failed(), "migration failed:\n{report}");
    let router = Arc::new(Router::connect(&config).await.expect("router"));
    Fleet {
        config,
        client: Client::new(router.clone()),
        router,
    }
}

/// Runtime options for tests: 200 ms poll, 10-50 ms retry backoff, 2 s
/// leases renewed every 500 ms, rescue every 200 ms.
pub fn fast_options() -> RuntimeOptions {
    RuntimeOptions {
        poll_interval: Duration::from_millis(200),
        backoff: Backoff {
            base: Duration::from_millis(10),
            max: Duration::from_millis(50),
        },
        lease: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(500),
        rescue_interval: Duration::from_millis(200),
        ..RuntimeOptions::default()
    }
}

/// A private bed (master + `shards` shard servers) for a test that stops,
/// crashes or exhausts servers.
pub async fn private_bed(shards: usize) -> Arc<TestBed> {
    let bed = tokio::task::spawn_blocking(move || TestBed::start(shards).map_err(|e| e.to_string()))
        .await
        .expect("join")
        .expect("private test bed");
    Arc::new(bed)
}

/// Polls `check` every 20 ms until it returns true; panics naming `what`
/// after `deadline`. For waiting on conditions, never on time.
pub async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + deadline;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < until,
            "timed out after {deadline:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Counts jobs on a shard in `state`.
pub async fn count_state(router: &Router, shard: &str, state: &str) -> i64 {
    let db = router.shard(shard).expect("shard");
    sqlx::query_scalar("SELECT count(*) FROM shardq.jobs WHERE state = $1")
        .bind(state)
        .fetch_one(&db.pool)
        .await
        .expect("count")
}

/// Counts jobs on every shard in `state`.
pub async fn count_state_all(router: &Router, state: &str) -> i64 {
    let mut n = 0;
    for db in router.shards() {
        n += count_state(router, &db.name, state).await;
    }
    n
}

/// The plan the server uses for `sql` once it switches a prepared statement
/// to a generic plan (what it may do after a few executions): `types` are
/// the parameter types, `args` literal arguments. The session's settings and
/// prepared statements are left as they were.
pub async fn generic_plan(conn: &mut sqlx::PgConnection, types: &str, sql: &str, args: &str) -> String {
    use sqlx::Connection;
    let mut tx = conn.begin().await.expect("begin");
    sqlx::query("SET LOCAL plan_cache_mode = force_generic_plan")
        .execute(&mut *tx)
        .await
        .expect("set");
    sqlx::query(&format!("PREPARE shardq_plan_probe({types}) AS {sql}"))
        .execute(&mut *tx)
        .await
        .expect("prepare");
    let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN EXECUTE shardq_plan_probe({args})"))
        .fetch_all(&mut *tx)
        .await
        .expect("explain");
    sqlx::query("DEALLOCATE shardq_plan_probe")
        .execute(&mut *tx)
        .await
        .expect("deallocate");
    tx.rollback().await.expect("rollback");
    plan.join("\n")
}

/// Asserts that `plan` (of the statement `name`) reads `shardq.jobs` through
/// indexes only, never a sequential scan.
pub fn assert_indexed(name: &str, plan: &str) {
    assert!(
        !plan.contains("Seq Scan"),
        "{name}: the plan scans the whole table:\n{plan}"
    );
    assert!(plan.contains("Index"), "{name}: no index in the plan:\n{plan}");
}

/// A new login role on every server of `f`, given the grants the README
/// documents for the application (`shardq_router::privileges`), and `f`'s
/// configuration connecting as that role. `prefix` starts the role's name,
/// which is unique per process and call.
pub async fn app_role(f: &Fleet, prefix: &str) -> (String, Config) {
    use shardq_router::privileges::{master_grants, quote_identifier, shard_grants};
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let role = format!(
        "{prefix}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let quoted = quote_identifier(&role);
    // Roles are per server (cluster): create it on each, then grant per database.
    let master = &f.router.master().pool;
    sqlx::query(&format!("CREATE ROLE {quoted} LOGIN"))
        .execute(master)
        .await
        .expect("create role on the master");
    for statement in master_grants(&role) {
        sqlx::query(&statement).execute(master).await.expect("master grant");
    }
    for shard in f.router.shards() {
        sqlx::query(&format!("CREATE ROLE {quoted} LOGIN"))
            .execute(&shard.pool)
            .await
            .expect("create role on a shard");
        for statement in shard_grants(&role) {
            sqlx::query(&statement).execute(&shard.pool).await.expect("shard grant");
        }
    }
    let mut app = f.config.clone();
    app.master.target.user = role.clone();
    for shard in &mut app.shards {
        shard.database.target.user = role.clone();
    }
    (role, app)
}

/// Runs a blocking server operation (such as `Server::kill` or
/// `Server::freeze`) on server `name` of `bed`, panicking with its error.
pub async fn on_server(
    bed: &Arc<TestBed>,
    name: &'static str,
    op: fn(&shardq_testbed::Server) -> shardq_testbed::Result<()>,
) {
    let bed = bed.clone();
    tokio::task::spawn_blocking(move || bed.server(name).and_then(op).map_err(|e| e.to_string()))
        .await
        .expect("join")
        .expect("server operation");
}

/// Writes `dir/shards.toml` naming `f`'s master and shards, with `extra`
/// (more TOML) at its end, for tests that run the `shardq` binary.
pub fn write_config(f: &Fleet, dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let mut text = format!("[master]\nurl = \"{}\"\n", f.config.master.target);
    for s in &f.config.shards {
        text.push_str(&format!(
            "[[shards]]\nname = \"{}\"\nurl = \"{}\"\n",
            s.name, s.database.target
        ));
    }
    text.push_str(extra);
    let path = dir.join("shards.toml");
    std::fs::write(&path, text).expect("write shards.toml");
    path
}

/// `n` migrated shard databases spread over `bed`'s shard servers (named
/// `s00`, `s01`, ...), copied from one migrated database per server (a
/// template copy is much faster than migrating each), with a fresh master;
/// returns their configuration and each shard's server name.
pub async fn many_shards(bed: &TestBed, n: usize) -> (Config, std::collections::BTreeMap<String, String>) {
    let dbs = bed.fresh_fleet().await.expect("fresh databases");
    let bases: Vec<(&str, &str)> = dbs.shards.iter().map(|s| (s.name.as_str(), s.url.as_str())).collect();
    let base = Config::from_urls(&dbs.master.url, &bases).expect("config");
    let report = Migrator::new(&base).run().await.expect("migrate");
    assert!(!report.failed(), "migration failed:\n{report}");
    let mut urls = Vec::new();
    let mut server_of = std::collections::BTreeMap::new();
    for i in 0..n {
        let server = &bed.shards()[i % bed.shards().len()];
        let template = &dbs.shards[i % bed.shards().len()];
        let template_db = template.url.rsplit('/').next().expect("database name").to_string();
        let name = format!("{template_db}_s{i:02}");
        let admin = server.url("postgres");
        // The copy fails while the migrator's connections to the template close.
        wait_for("a copy of the migrated shard database", Duration::from_secs(60), || {
            let (admin, name, template_db) = (admin.clone(), name.clone(), template_db.clone());
            async move {
                let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(&admin).await else {
                    return false;
                };
                sqlx::raw_sql(&format!(r#"CREATE DATABASE "{name}" TEMPLATE "{template_db}""#))
                    .execute(&mut conn)
                    .await
                    .is_ok()
            }
        })
        .await;
        let shard = format!("s{i:02}");
        // The copy carries its template's stamp: give it its own name.
        let copy = sqlx::PgPool::connect(&server.url(&name))
            .await
            .expect("connect to the copy");
        sqlx::query("UPDATE shardq.fleet_stamp SET name = $1")
            .bind(&shard)
            .execute(&copy)
            .await
            .expect("stamp the copy");
        copy.close().await;
        server_of.insert(shard.clone(), server.name().to_string());
        urls.push((shard, server.url(&name)));
    }
    let shards: Vec<(&str, &str)> = urls.iter().map(|(n, u)| (n.as_str(), u.as_str())).collect();
    (Config::from_urls(&dbs.master.url, &shards).expect("config"), server_of)
}

/// `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)` of the generic plan of `sql`
/// (parameter types `types`) run with `args`, in a transaction that is
/// rolled back (set `SHOW_PLAN` to print it).
pub async fn analyzed_plan(conn: &mut sqlx::PgConnection, types: &str, sql: &str, args: &str) -> serde_json::Value {
    use sqlx::Connection;
    let mut tx = conn.begin().await.expect("the cost probe runs");
    sqlx::query("SET LOCAL plan_cache_mode = force_generic_plan")
        .execute(&mut *tx)
        .await
        .expect("the cost probe runs");
    sqlx::query(&format!("PREPARE shardq_cost_probe({types}) AS {sql}"))
        .execute(&mut *tx)
        .await
        .expect("the cost probe runs");
    let plan: serde_json::Value = sqlx::query_scalar::<_, sqlx::types::Json<serde_json::Value>>(&format!(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE shardq_cost_probe({args})"
    ))
    .fetch_one(&mut *tx)
    .await
    .expect("the cost probe runs")
    .0;
    sqlx::query("DEALLOCATE shardq_cost_probe")
        .execute(&mut *tx)
        .await
        .expect("the cost probe runs");
    tx.rollback().await.expect("the cost probe runs");
    if std::env::var("SHOW_PLAN").is_ok() {
        eprintln!("{plan:#}");
    }
    plan
}

/// Shared buffers (hit + read) touched by the part of the statement that
/// finds and locks the rows (its InitPlan: `id = ANY(ARRAY(..))`), from
/// `EXPLAIN (ANALYZE, BUFFERS)` of its generic plan, and the rows the
/// statement returned. Runs it in a transaction that is rolled back.
pub async fn buffers_and_rows(conn: &mut sqlx::PgConnection, types: &str, sql: &str, args: &str) -> (i64, i64) {
    let plan = analyzed_plan(conn, types, sql, args).await;
    let top = &plan[0]["Plan"];
    let find = top["Plans"]
        .as_array()
        .and_then(|p| p.iter().find(|n| n["Parent Relationship"] == "InitPlan"))
        .expect("the statement finds its rows in an InitPlan");
    let n = |node: &serde_json::Value, k: &str| node[k].as_i64().unwrap_or(0);
    (
        n(find, "Shared Hit Blocks") + n(find, "Shared Read Blocks"),
        n(top, "Actual Rows"),
    )
}
