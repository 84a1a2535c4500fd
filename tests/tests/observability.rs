//! Observability: the Prometheus endpoint's counters match the jobs a node
//! ran, `shardq status`'s library function reports a stopped shard as down
//! (password-free) while the others show correct counts, and the sampler's
//! and status's statements stay index reads on a large backlog; a node's
//! run statistics start afresh on `reset_stats`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shardq::observe::health::Readiness;
use shardq::store::{QUEUE_DEPTH_CAP, QUEUE_DEPTH_SQL, QUEUE_FINISHED_RECENT_SQL, QUEUE_NAMES_SQL, QUEUE_RUNNING_SQL};
use shardq::{Account, Backoff, JobContext, JobError, NewJob, Runtime, RuntimeOptions, Worker};
use shardq_router::{Config, Migrator, Router};
use shardq_testbed::{Server, TestBed};
use shardq_tests::{count_state, fleet, wait_for};
use sqlx::Connection;

const WAIT: Duration = Duration::from_secs(30);

/// `obs_noop`: completes.
struct Noop;
impl Worker for Noop {
    type Args = serde_json::Value;
    const KIND: &'static str = "obs_noop";
    async fn work(&self, _: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        Ok(())
    }
}

/// `obs_fail`: always fails.
struct Fail;
impl Worker for Fail {
    type Args = serde_json::Value;
    const KIND: &'static str = "obs_fail";
    async fn work(&self, _: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        Err(JobError::Failed("always fails".into()))
    }
}

fn fast() -> RuntimeOptions {
    RuntimeOptions {
        poll_interval: Duration::from_millis(200),
        backoff: Backoff {
            base: Duration::from_millis(10),
            max: Duration::from_millis(20),
        },
        ..RuntimeOptions::default()
    }
}

/// The value of the sample of `name` whose labels include all of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
        if metric != name {
            return None;
        }
        let have: Vec<(&str, &str)> = rest
            .trim_end_matches('}')
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('"')))
            .collect();
        labels
            .iter()
            .all(|want| have.contains(want))
            .then(|| value.parse().ok())?
    })
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let response = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    let code = response.status().as_u16();
    (code, response.text().await.unwrap())
}

#[tokio::test]
async fn the_metrics_endpoint_counts_the_jobs_run_per_shard_queue_and_kind() {
    let f = fleet().await;
    let account = Account::new("obs-metrics").unwrap();
    f.router.place(&account, "shard_2").await.unwrap();
    let rt = Runtime::builder(f.router.clone())
        .queue("obs_metrics", 8)
        .register(Noop)
        .register(Fail)
        .options(fast())
        .metrics_addr("127.0.0.1:0".parse().unwrap())
        .start()
        .unwrap();
    let addr = rt.metrics_addr().unwrap();
    let mut jobs = Vec::new();
    for _ in 0..20 {
        jobs.push((
            account.clone(),
            NewJob::from_json("obs_noop", serde_json::json!({})).queue("obs_metrics"),
        ));
    }
    for _ in 0..5 {
        let job = NewJob::from_json("obs_fail", serde_json::json!({}))
            .queue("obs_metrics")
            .max_attempts(2);
        jobs.push((account.clone(), job));
    }
    f.client.enqueue_many(jobs).await.unwrap();
    wait_for("20 completed and 5 discarded", WAIT, || async {
        count_state(&f.router, "shard_2", "completed").await == 20
            && count_state(&f.router, "shard_2", "discarded").await == 5
    })
    .await;

    let noop = [("shard", "shard_2"), ("queue", "obs_metrics"), ("kind", "obs_noop")];
    let fail = [("shard", "shard_2"), ("queue", "obs_metrics"), ("kind", "obs_fail")];
    // Counters go up right after the outcome's write commits: scrape until they show it.
    wait_for("the scrape shows every outcome", WAIT, || async {
        let text = get(addr, "/metrics").await.1;
        sample(&text, "shardq_jobs_completed_total", &noop) == Some(20.0)
            && sample(&text, "shardq_jobs_discarded_total", &fail) == Some(5.0)
    })
    .await;
    let (code, text) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert_eq!(
        sample(&text, "shardq_jobs_completed_total", &noop),
        Some(20.0),
        "{text}"
    );
    assert_eq!(sample(&text, "shardq_jobs_failed_total", &noop), Some(0.0), "{text}");
    assert_eq!(sample(&text, "shardq_jobs_completed_total", &fail), Some(0.0), "{text}");
    assert_eq!(sample(&text, "shardq_jobs_failed_total", &fail), Some(10.0), "{text}");
    assert_eq!(sample(&text, "shardq_jobs_retried_total", &fail), Some(5.0), "{text}");
    assert_eq!(sample(&text, "shardq_jobs_discarded_total", &fail), Some(5.0), "{text}");
    assert_eq!(
        sample(&text, "shardq_job_run_seconds_count", &noop),
        Some(20.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "shardq_job_queue_seconds_count", &fail),
        Some(10.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "shardq_job_latency_seconds_count", &noop),
        Some(20.0),
        "{text}"
    );
    assert_eq!(sample(&text, "shardq_jobs_running", &noop), Some(0.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "shardq_notifier_state",
            &[("shard", "shard_2"), ("state", "listening")]
        ),
        Some(1.0),
        "{text}"
    );

    let (code, body) = get(addr, "/healthz").await;
    assert_eq!(code, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ready", "{body}");
    rt.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn reset_stats_starts_a_nodes_counters_and_pickup_samples_afresh() {
    let f = fleet().await;
    let account = Account::new("obs-reset").unwrap();
    f.router.place(&account, "shard_2").await.unwrap();
    let rt = Runtime::builder(f.router.clone())
        .queue("obs_reset", 8)
        .register(Noop)
        .register(Fail)
        .options(fast())
        .start()
        .unwrap();
    let noop = || NewJob::from_json("obs_noop", serde_json::json!({})).queue("obs_reset");
    let fail = NewJob::from_json("obs_fail", serde_json::json!({}))
        .queue("obs_reset")
        .max_attempts(1);
    let mut jobs: Vec<(Account, NewJob)> = (0..10).map(|_| (account.clone(), noop())).collect();
    jobs.push((account.clone(), fail.clone()));
    jobs.push((account.clone(), fail));
    f.client.enqueue_many(jobs).await.unwrap();
    let on_shard_2 = |stats: Vec<shardq::ShardRunStats>| stats.into_iter().find(|s| s.shard == "shard_2");
    wait_for("10 completed and 2 discarded in the node's counts", WAIT, || async {
        on_shard_2(rt.counts()).is_some_and(|s| s.completed == 10 && s.discarded == 2)
    })
    .await;
    assert!(on_shard_2(rt.stats()).unwrap().pickup_ms.is_some());

    rt.reset_stats();
    let after = on_shard_2(rt.stats()).unwrap();
    assert_eq!((after.completed, after.discarded), (0, 0), "{after:?}");
    assert!(after.pickup_ms.is_none(), "{after:?}");

    f.client
        .enqueue_many((0..3).map(|_| (account.clone(), noop())))
        .await
        .unwrap();
    wait_for("3 more completed in the node's counts", WAIT, || async {
        on_shard_2(rt.counts()).is_some_and(|s| s.completed == 3)
    })
    .await;
    let last = on_shard_2(rt.stats()).unwrap();
    assert_eq!((last.completed, last.discarded), (3, 0), "{last:?}");
    let [p50, .., max] = last.pickup_ms.unwrap();
    assert!(p50 <= max, "{last:?}");
    rt.shutdown(Duration::from_secs(5)).await;
}

/// A private bed, since the test stops a server.
async fn private_bed(shards: usize) -> Arc<TestBed> {
    let bed = tokio::task::spawn_blocking(move || TestBed::start(shards).map_err(|e| e.to_string()))
        .await
        .unwrap()
        .unwrap();
    Arc::new(bed)
}

const PASSWORD: &str = "s3cret-pw";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_a_stopped_shard_as_down_and_the_others_with_their_counts() {
    let bed = private_bed(2).await;
    // The servers trust local connections, so a password in the URLs is
    // accepted and ignored: it must never show in any output.
    let dbs = bed.fresh_fleet().await.unwrap();
    let with_password = |url: &str| url.replace("postgres@", &format!("postgres:{PASSWORD}@"));
    let shards: Vec<(String, String)> = dbs
        .shards
        .iter()
        .map(|s| (s.name.clone(), with_password(&s.url)))
        .collect();
    let shard_refs: Vec<(&str, &str)> = shards.iter().map(|(n, u)| (n.as_str(), u.as_str())).collect();
    let config = Config::from_urls(&with_password(&dbs.master.url), &shard_refs).unwrap();
    let report = Migrator::new(&config).run().await.unwrap();
    assert!(!report.failed(), "{report}");
    let router = Arc::new(Router::connect(&config).await.unwrap());
    let client = shardq::Client::new(router.clone());
    let on_1 = Account::new("status-1").unwrap();
    let on_2 = Account::new("status-2").unwrap();
    router.place(&on_1, "shard_1").await.unwrap();
    router.place(&on_2, "shard_2").await.unwrap();

    // shard_2: 3 jobs completed by a node, 4 waiting and 1 scheduled in a queue no node works.
    let rt = Runtime::builder(router.clone())
        .queue("work", 4)
        .register(Noop)
        .options(fast())
        .start()
        .unwrap();
    for _ in 0..3 {
        client
            .enqueue(
                &on_2,
                NewJob::from_json("obs_noop", serde_json::json!({})).queue("work"),
            )
            .await
            .unwrap();
    }
    wait_for("3 completed on shard_2", WAIT, || async {
        count_state(&router, "shard_2", "completed").await == 3
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await;
    for _ in 0..4 {
        client
            .enqueue(
                &on_2,
                NewJob::from_json("obs_noop", serde_json::json!({})).queue("backlog"),
            )
            .await
            .unwrap();
    }
    let later = NewJob::from_json("obs_noop", serde_json::json!({}))
        .queue("backlog")
        .delay(Duration::from_secs(3600));
    client.enqueue(&on_2, later).await.unwrap();
    client
        .enqueue(
            &on_1,
            NewJob::from_json("obs_noop", serde_json::json!({})).queue("backlog"),
        )
        .await
        .unwrap();

    let all_up = shardq::observe::status::fleet(&router, Duration::from_secs(2)).await;
    assert_eq!(all_up.status, Readiness::Ready, "{all_up:?}");
    assert_eq!(all_up.shards[0].queues[0].available, 1, "{all_up:?}");

    let bed2 = bed.clone();
    tokio::task::spawn_blocking(move || bed2.server("shard_1").and_then(Server::stop).unwrap())
        .await
        .unwrap();

    let fleet = shardq::observe::status::fleet(&router, Duration::from_secs(2)).await;
    let json = serde_json::to_string(&fleet).unwrap();
    assert!(!json.contains(PASSWORD), "a password leaked: {json}");
    assert_eq!(fleet.status, Readiness::Degraded, "{json}");
    assert!(fleet.master.ok(), "{json}");

    let down = &fleet.shards[0];
    assert_eq!(down.health.name, "shard_1");
    assert!(!down.health.reachable, "{json}");
    let error = down.health.error.as_deref().unwrap();
    assert!(error.contains("shard_1"), "the error names the shard: {error}");
    assert!(down.queues.is_empty(), "{json}");

    let up = &fleet.shards[1];
    assert!(up.health.ok(), "{json}");
    assert_eq!(up.health.version.map(|v| v as u32), up.health.expected, "{json}");
    let queue = |name: &str| up.queues.iter().find(|q| q.queue == name).unwrap().clone();
    let backlog = queue("backlog");
    assert_eq!(
        (backlog.available, backlog.scheduled, backlog.running),
        (4, 1, 0),
        "{json}"
    );
    assert!(!backlog.capped, "{json}");
    assert!(backlog.oldest_available_secs > 0.0, "{json}");
    assert_eq!((backlog.completed_1m, backlog.completed_1h), (0, 0), "{json}");
    let work = queue("work");
    assert_eq!((work.available, work.scheduled, work.running), (0, 0, 0), "{json}");
    assert_eq!((work.completed_1m, work.completed_1h), (3, 3), "{json}");
    assert_eq!((work.failed_1m, work.failed_1h), (0, 0), "{json}");
    // The node that listened on shard_2 was shut down.
    assert_eq!(up.listeners, Some(0), "{json}");

    let health = shardq::observe::health::check(&router).await;
    assert_eq!(health.status, Readiness::Degraded);
    assert!(!format!("{health:?}").contains(PASSWORD));
}

/// Rows in the table when the plans are checked.
const ROWS: i64 = 200_000;

/// Every `Seq Scan` on `jobs` in an EXPLAIN (FORMAT JSON) plan.
fn seq_scans_on_jobs(plan: &serde_json::Value, found: &mut Vec<String>) {
    match plan {
        serde_json::Value::Object(node) => {
            if node.get("Node Type").and_then(|t| t.as_str()) == Some("Seq Scan")
                && node.get("Relation Name").and_then(|t| t.as_str()) == Some("jobs")
            {
                found.push(serde_json::Value::Object(node.clone()).to_string());
            }
            node.values().for_each(|v| seq_scans_on_jobs(v, found));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| seq_scans_on_jobs(v, found)),
        _ => {}
    }
}

#[tokio::test]
async fn sampler_and_status_statements_stay_index_reads_on_a_large_backlog() {
    let f = fleet().await;
    let db = f.router.shards()[0].clone();
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::query(
        "INSERT INTO shardq.jobs (account, queue, kind, args, priority, run_at, state, finalized_at)
         SELECT 'a' || (i % 1000), 'default', 'noop', '{}', (i % 4)::smallint,
                CASE WHEN i % 50 = 0 THEN now() + interval '1 hour' ELSE now() - interval '1 minute' END,
                CASE WHEN i % 100 = 1 THEN 'completed' ELSE 'available' END,
                CASE WHEN i % 100 = 1 THEN now() - (i % 7200) * interval '1 second' END
           FROM generate_series(1, $1) AS i",
    )
    .bind(ROWS)
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query("ANALYZE shardq.jobs").execute(&mut *conn).await.unwrap();

    // What the statements report on it, within their bounds.
    let depth = shardq::store::queue_depth(&db, "default", QUEUE_DEPTH_CAP)
        .await
        .unwrap();
    assert!(depth.capped(QUEUE_DEPTH_CAP), "{depth:?}");
    assert!(depth.oldest_secs >= 60.0, "{depth:?}");
    assert_eq!(shardq::store::queue_names_waiting(&db).await.unwrap(), ["default"]);

    let mut tx = conn.begin().await.unwrap();
    for mode in ["force_custom_plan", "force_generic_plan"] {
        sqlx::query(&format!("SET LOCAL plan_cache_mode = {mode}"))
            .execute(&mut *tx)
            .await
            .unwrap();
        for (name, types, sql, args) in [
            ("plan_depth", "(text, bigint)", QUEUE_DEPTH_SQL, "('default', 10000)"),
            ("plan_names", "", QUEUE_NAMES_SQL, ""),
            ("plan_running", "", QUEUE_RUNNING_SQL, ""),
            ("plan_finished", "", QUEUE_FINISHED_RECENT_SQL, ""),
        ] {
            sqlx::query(&format!("PREPARE {name}{types} AS {sql}"))
                .execute(&mut *tx)
                .await
                .unwrap();
            let plan: serde_json::Value = sqlx::query_scalar(&format!("EXPLAIN (FORMAT JSON) EXECUTE {name}{args}"))
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            let mut seq = Vec::new();
            seq_scans_on_jobs(&plan, &mut seq);
            assert!(seq.is_empty(), "{name} ({mode}) scans the whole jobs table:\n{plan:#}");
            assert!(
                plan.to_string().contains("Index"),
                "{name} ({mode}): no index in the plan:\n{plan:#}"
            );
            sqlx::query(&format!("DEALLOCATE {name}"))
                .execute(&mut *tx)
                .await
                .unwrap();
        }
    }
    tx.rollback().await.unwrap();
}
