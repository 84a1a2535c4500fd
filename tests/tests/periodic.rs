//! Periodic jobs against real servers: two nodes enqueue each occurrence
//! once, a restart catches up on missed occurrences within its window, and
//! Overlap::Skip skips while the previous run is not done. Schedules are
//! driven with explicit times (`enqueue_due`) except where nodes run them.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use shardq::periodic::{Tz, SYSTEM_ACCOUNT};
use shardq::{Account, JobContext, JobError, NewJob, Overlap, PeriodicJob, Runtime, RuntimeOptions, Worker};
use shardq_tests::{fleet, wait_for, Fleet};
use tokio::sync::Semaphore;

const WAIT: Duration = Duration::from_secs(60);

fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2020, 6, 1, h, m, s).unwrap()
}

/// (jobs of `kind`, distinct run_at among them) on every shard.
async fn jobs_per_shard(f: &Fleet, kind: &str) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    for db in f.router.shards() {
        out.push(
            sqlx::query_as("SELECT count(*), count(DISTINCT run_at) FROM shardq.jobs WHERE kind = $1")
                .bind(kind)
                .fetch_one(&db.pool)
                .await
                .unwrap(),
        );
    }
    out
}

struct Tick;
impl Worker for Tick {
    type Args = serde_json::Value;
    const KIND: &'static str = "tick";
    async fn work(&self, _: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        Ok(())
    }
}

#[tokio::test]
async fn two_nodes_enqueue_every_occurrence_once_per_shard() {
    let f = fleet().await;
    let every_second = || {
        PeriodicJob::new(
            "tick",
            "* * * * * *",
            Tz::UTC,
            NewJob::from_json("tick", serde_json::json!({})),
        )
        .unwrap()
        .per_shard()
        .catch_up(Duration::from_secs(2))
    };
    let nodes: Vec<Runtime> = (0..2)
        .map(|_| {
            Runtime::builder(f.router.clone())
                .queue("default", 4)
                .register(Tick)
                .periodic(every_second())
                .options(RuntimeOptions::default())
                .start()
                .unwrap()
        })
        .collect();
    wait_for("five occurrences on every shard", WAIT, || async {
        jobs_per_shard(&f, "tick").await.iter().all(|(n, _)| *n >= 5)
    })
    .await;
    for n in nodes {
        n.shutdown(Duration::from_secs(5)).await;
    }
    for (shard, (n, distinct)) in f.router.shards().iter().zip(jobs_per_shard(&f, "tick").await) {
        assert_eq!(n, distinct, "shard {}: an occurrence was enqueued twice", shard.name);
        let account: String = sqlx::query_scalar("SELECT DISTINCT account FROM shardq.jobs WHERE kind = 'tick'")
            .fetch_one(&shard.pool)
            .await
            .unwrap();
        assert_eq!(account, SYSTEM_ACCOUNT);
    }

    // The same, raced by hand with explicit times: 60 occurrences, two callers.
    let p = PeriodicJob::new(
        "raced",
        "* * * * * *",
        Tz::UTC,
        NewJob::from_json("raced", serde_json::json!({})),
    )
    .unwrap();
    let (x, y) = tokio::join!(
        p.enqueue_due(&f.router, at(1, 0, 0), at(1, 1, 0)),
        p.enqueue_due(&f.router, at(1, 0, 0), at(1, 1, 0))
    );
    let shards = f.router.shards().len();
    assert_eq!(x.unwrap().len() + y.unwrap().len(), 60 * shards);
    assert!(jobs_per_shard(&f, "raced").await.iter().all(|c| *c == (60, 60)));
}

#[tokio::test]
async fn a_restart_within_the_catch_up_window_enqueues_the_missed_occurrences() {
    let f = fleet().await;
    let a = Account::new("periodic-global").unwrap();
    let p = PeriodicJob::new(
        "hourly",
        "0 * * * *",
        Tz::UTC,
        NewJob::from_json("hourly", serde_json::json!({})),
    )
    .unwrap()
    .global(a.clone())
    .catch_up(Duration::from_secs(3 * 3600));
    // Before the stop: the node handled 10:00.
    let before = p.enqueue_due(&f.router, at(9, 30, 0), at(10, 0, 30)).await.unwrap();
    assert_eq!(before.iter().map(|o| o.at).collect::<Vec<_>>(), [at(10, 0, 0)]);
    // Down from 10:00:30 to 12:10; on start it looks back over its window.
    let window = chrono::Duration::from_std(p.catch_up_window()).unwrap();
    let restarted = p
        .enqueue_due(&f.router, at(12, 10, 0) - window, at(12, 10, 0))
        .await
        .unwrap();
    assert_eq!(
        restarted.iter().map(|o| o.at).collect::<Vec<_>>(),
        [at(11, 0, 0), at(12, 0, 0)],
        "11:00 and 12:00 were missed; 10:00 was not"
    );
    assert!(restarted.iter().all(|o| o.job.is_some()));
    // Global: one job per occurrence, all on the account's shard.
    let home = f.router.pool_for(&a).await.unwrap().name.clone();
    for (shard, (n, _)) in f.router.shards().iter().zip(jobs_per_shard(&f, "hourly").await) {
        assert_eq!(n, if shard.name == home { 3 } else { 0 }, "shard {}", shard.name);
    }
}

/// Holds each run until a permit is added.
#[derive(Clone)]
struct Held(Arc<Semaphore>);
impl Worker for Held {
    type Args = serde_json::Value;
    const KIND: &'static str = "held";
    async fn work(&self, _: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        self.0.acquire().await.unwrap().forget();
        Ok(())
    }
}

#[tokio::test]
async fn overlap_skip_skips_while_the_previous_run_is_running() {
    let f = fleet().await;
    let a = Account::new("periodic-skip").unwrap();
    let held = Held(Arc::new(Semaphore::new(0)));
    let p = PeriodicJob::new(
        "held",
        "*/5 * * * *",
        Tz::UTC,
        NewJob::from_json("held", serde_json::json!({})),
    )
    .unwrap()
    .global(a.clone())
    .overlap(Overlap::Skip);
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 4)
        .register(held.clone())
        .start()
        .unwrap();
    let first = p.enqueue_due(&f.router, at(9, 59, 0), at(10, 0, 0)).await.unwrap();
    let first_id = first[0].job.clone().unwrap();
    wait_for("the first run is running", WAIT, || async {
        f.client.job(&first_id).await.unwrap().state == "running"
    })
    .await;
    let second = p.enqueue_due(&f.router, at(10, 0, 0), at(10, 5, 0)).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].at, at(10, 5, 0));
    assert_eq!(second[0].job, None, "skipped while the first run runs");
    held.0.add_permits(1);
    wait_for("the first run completed", WAIT, || async {
        f.client.job(&first_id).await.unwrap().state == "completed"
    })
    .await;
    let third = p.enqueue_due(&f.router, at(10, 5, 0), at(10, 10, 0)).await.unwrap();
    assert!(third[0].job.is_some(), "enqueued once the previous run is done");
    held.0.add_permits(1);
    rt.shutdown(Duration::from_secs(5)).await;
    // A skipped occurrence stays recorded: no node enqueues it later.
    let again = p.enqueue_due(&f.router, at(10, 0, 0), at(10, 5, 0)).await.unwrap();
    assert!(again.is_empty());

    // Overlap::Queue enqueues regardless.
    let q = PeriodicJob::new(
        "queued",
        "*/5 * * * *",
        Tz::UTC,
        NewJob::from_json("queued", serde_json::json!({})),
    )
    .unwrap()
    .global(a.clone());
    let queued = q.enqueue_due(&f.router, at(9, 59, 0), at(10, 10, 0)).await.unwrap();
    assert!(queued.len() == 3 && queued.iter().all(|o| o.job.is_some()));
}
