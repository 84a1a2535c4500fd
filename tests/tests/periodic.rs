//! Periodic jobs against real servers: two nodes enqueue each occurrence
//! once, a restart catches up on missed occurrences within its window,
//! Overlap::Skip skips while the previous run is not done, and a shard that
//! is down or frozen neither holds back nor duplicates the others' runs.
//! Schedules are driven with explicit times (`enqueue_due`, `pass`) except
//! where nodes run them.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use shardq::periodic::{Target, Tz, MAX_OCCURRENCES_PER_PASS, SYSTEM_ACCOUNT};
use shardq::{Account, JobContext, JobError, NewJob, Overlap, PeriodicJob, Runtime, RuntimeOptions, Worker};
use shardq_router::{Config, Router};
use shardq_tests::{fleet, wait_for, Fleet};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
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

/// A router over `config` in which shard `down` is unreachable: its address
/// is a closed port, and callers give up on it after 200 ms.
async fn with_shard_down(config: &Config, down: &str) -> Router {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut config = config.clone();
    let shard = config.shards.iter_mut().find(|s| s.name == down).unwrap();
    shard.database.target.port = port;
    shard.database.pool.acquire_timeout = Duration::from_millis(200);
    Router::connect(&config).await.unwrap()
}

/// The run_at of every job of `kind` on `shard`, oldest first.
async fn run_ats(f: &Fleet, shard: &str, kind: &str) -> Vec<DateTime<Utc>> {
    sqlx::query_scalar("SELECT run_at FROM shardq.jobs WHERE kind = $1 ORDER BY run_at")
        .bind(kind)
        .fetch_all(&f.router.shard(shard).unwrap().pool)
        .await
        .unwrap()
}

fn minutes(m: i64) -> chrono::Duration {
    chrono::Duration::minutes(m)
}

#[tokio::test]
async fn a_down_shard_neither_holds_back_nor_duplicates_the_others_and_returns_with_one_window() {
    let f = fleet().await;
    let down = f.router.shards()[1].name.clone();
    let sick = with_shard_down(&f.config, &down).await;
    let down_target = Target::Shard(down.clone());
    // Every 5 minutes, 15 minutes of catch-up: records are kept 30 minutes.
    let p = PeriodicJob::new(
        "five",
        "*/5 * * * *",
        Tz::UTC,
        NewJob::from_json("five", serde_json::json!({})),
    )
    .unwrap()
    .per_shard()
    .catch_up(Duration::from_secs(15 * 60));
    let start = at(10, 0, 30);
    let mut progress = p.progress(start);
    for o in p.pass(&f.router, &mut progress, start).await {
        let got: Vec<_> = o.result.unwrap().iter().map(|o| o.at).collect();
        assert_eq!(got, [at(9, 50, 0), at(9, 55, 0), at(10, 0, 0)], "{}", o.target);
    }

    // The shard is down for an hour; the node passes (and prunes) every 5 minutes.
    for k in 1..=12 {
        let now = start + minutes(5 * k);
        for o in p.pass(&sick, &mut progress, now).await {
            if o.target == down_target {
                let err = o.result.unwrap_err().to_string();
                assert!(err.contains(&down), "the error names the shard: {err}");
            } else {
                let got: Vec<_> = o.result.unwrap().iter().map(|o| o.at).collect();
                assert_eq!(got, [now - chrono::Duration::seconds(30)], "{} at {now}", o.target);
            }
        }
        assert_eq!(progress.cursor(&down_target), start, "the down shard's cursor stays");
        for o in p.prune(&sick, &progress, now).await {
            assert_eq!(o.result.is_err(), o.target == down_target, "{}", o.target);
        }
    }

    // It returns at 11:05:30: it gets the window's occurrences only, once.
    let back = start + minutes(65);
    for o in p.pass(&f.router, &mut progress, back).await {
        let got: Vec<_> = o.result.unwrap().iter().map(|o| o.at).collect();
        if o.target == down_target {
            assert_eq!(got, [at(10, 55, 0), at(11, 0, 0), at(11, 5, 0)], "the returning shard");
        } else {
            assert_eq!(got, [at(11, 5, 0)], "{}", o.target);
        }
    }
    let every_five: Vec<_> = (0..16).map(|k| at(9, 50, 0) + minutes(5 * k)).collect();
    for db in f.router.shards() {
        let expected = if db.name == down {
            let mut v = every_five[..3].to_vec();
            v.extend_from_slice(&every_five[13..]);
            v
        } else {
            every_five.clone()
        };
        assert_eq!(
            run_ats(&f, &db.name, "five").await,
            expected,
            "shard {}: each occurrence once, none pruned and enqueued again",
            db.name
        );
    }
}

#[tokio::test]
async fn a_returning_shard_gets_at_most_max_occurrences_per_pass() {
    let f = fleet().await;
    let down = f.router.shards()[0].name.clone();
    let sick = with_shard_down(&f.config, &down).await;
    let down_target = Target::Shard(down.clone());
    let p = PeriodicJob::new(
        "second",
        "* * * * * *",
        Tz::UTC,
        NewJob::from_json("second", serde_json::json!({})),
    )
    .unwrap()
    .per_shard()
    .catch_up(Duration::from_secs(3 * 3600));
    let start = at(12, 0, 0);
    let mut progress = p.progress(start);
    for o in p.pass(&sick, &mut progress, start).await {
        assert_eq!(o.result.is_err(), o.target == down_target, "{}", o.target);
    }
    // Back 30 minutes later: 3 h of missed seconds, of which the newest are kept.
    let back = start + minutes(30);
    let outcomes = p.pass(&f.router, &mut progress, back).await;
    let returned = outcomes.into_iter().find(|o| o.target == down_target).unwrap();
    let got = returned.result.unwrap();
    assert_eq!(got.len(), MAX_OCCURRENCES_PER_PASS);
    assert_eq!(got.first().unwrap().at, back - chrono::Duration::seconds(999));
    assert_eq!(got.last().unwrap().at, back);
    assert_eq!(run_ats(&f, &down, "second").await.len(), MAX_OCCURRENCES_PER_PASS);
}

/// A connection of its own to shard `name` of `f`.
async fn connect(f: &Fleet, name: &str) -> PgConnection {
    let shard = f.config.shards.iter().find(|s| s.name == name).unwrap();
    PgConnection::connect_with(&shard.database.target.connect_options())
        .await
        .unwrap()
}

/// Freezes writes of periodic records on a shard: an open transaction
/// holding an exclusive lock on its `shardq.periodic_runs`.
async fn freeze(conn: &mut PgConnection) {
    sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
    sqlx::query("LOCK TABLE shardq.periodic_runs IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *conn)
        .await
        .unwrap();
}

async fn thaw(conn: &mut PgConnection) {
    sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
}

/// Backends (other than the one asking) of `pool`'s database waiting for a
/// lock while recording periodic occurrences.
async fn waiting_writes(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> pg_backend_pid()
            AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO shardq.periodic_runs%'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_frozen_shard_delays_only_itself_is_retried_after_its_timeout_and_does_not_hold_up_shutdown() {
    let f = fleet().await;
    let frozen = f.router.shards()[1].name.clone();
    let mut lock = connect(&f, &frozen).await;
    let shard = f.config.shards.iter().find(|s| s.name == frozen).unwrap();
    let watch = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(shard.database.target.connect_options().into_inner())
        .await
        .unwrap();
    freeze(&mut lock).await;
    let node = Runtime::builder(f.router.clone())
        .queue("default", 4)
        .periodic(
            PeriodicJob::new(
                "tock",
                "* * * * * *",
                Tz::UTC,
                // Queued where this node does not work, so the jobs stay.
                NewJob::from_json("tock", serde_json::json!({})).queue("unworked"),
            )
            .unwrap()
            .per_shard()
            .catch_up(Duration::from_secs(2))
            .write_timeout(Duration::from_secs(1)),
        )
        .start()
        .unwrap();
    // The first pass writes at most the 2 s window's occurrences: six on a
    // shard means later passes went on while the frozen shard's writes hung.
    wait_for("six occurrences on every healthy shard", WAIT, || async {
        let counts = jobs_per_shard(&f, "tock").await;
        f.router
            .shards()
            .iter()
            .zip(counts)
            .all(|(db, (n, _))| db.name == frozen || n >= 6)
    })
    .await;
    assert!(run_ats(&f, &frozen, "tock").await.is_empty());
    // A write that hangs is given up after 1 s and tried again.
    wait_for("two writes to the frozen shard waiting on its lock", WAIT, || async {
        waiting_writes(&watch).await >= 2
    })
    .await;

    // Thawed, it gets the occurrences of its window, and nothing twice.
    thaw(&mut lock).await;
    wait_for("occurrences on the thawed shard", WAIT, || async {
        !run_ats(&f, &frozen, "tock").await.is_empty()
    })
    .await;

    // Frozen again, with a write hanging: shutdown does not wait for it.
    freeze(&mut lock).await;
    wait_for("a write to the frozen shard waiting on its lock", WAIT, || async {
        waiting_writes(&watch).await >= 1
    })
    .await;
    tokio::time::timeout(WAIT, node.shutdown(Duration::from_secs(1)))
        .await
        .expect("shutdown returned while a shard write hangs");
    thaw(&mut lock).await;
    for (db, (n, distinct)) in f.router.shards().iter().zip(jobs_per_shard(&f, "tock").await) {
        assert_eq!(n, distinct, "shard {}: an occurrence was enqueued twice", db.name);
    }
}
