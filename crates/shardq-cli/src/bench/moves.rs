//! Move: an account with 100,000 rows over two application tables and
//! 10,000 jobs moves from shard_1 to shard_2 while writers keep writing
//! for it: each writer, in a loop, opens `router.begin` for the account,
//! inserts a row and updates an existing one, commits, and enqueues a job
//! through the client. Reported: how long each step of the move took (the
//! copy, the catch-up before the fence, the pause from the write fence to
//! the switch), the latencies of the writes made during the move (p50,
//! p99, and the longest: the pause a writer saw), and, counted on both
//! shards after the move, rows and jobs lost or duplicated and updates
//! lost (each must be 0).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardq::moves::{AccountTable, MoveOptions, Mover, Step};
use shardq::{Account, NewJob};
use shardq_testbed::TestBed;

use super::{BenchArgs, BenchFleet, Results};

/// Rows per application table (two tables).
const ROWS_PER_TABLE: i64 = 50_000;
/// Jobs of the account before the move.
const JOBS: usize = 10_000;
/// Concurrent writers during the move.
const WRITERS: usize = 4;
/// Each writer's pause between two writes.
const WRITE_EVERY: Duration = Duration::from_millis(10);
/// Writes before and after the move that are not measured.
const SETTLE: Duration = Duration::from_secs(1);

/// The application's tables, on both shards.
const TABLES_SQL: &str = "
CREATE TABLE bench_users (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), account text NOT NULL,
                          name text NOT NULL, v bigint NOT NULL DEFAULT 0);
CREATE INDEX ON bench_users (account);
CREATE TABLE bench_docs (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), account text NOT NULL,
                         title text NOT NULL, body text NOT NULL, v bigint NOT NULL DEFAULT 0);
CREATE INDEX ON bench_docs (account);";

/// What one writer did: the rows it inserted, the last value it wrote to
/// each row it updated, the jobs it enqueued (by their `i`), and each
/// write's start (since the bench began) and duration.
#[derive(Default)]
struct Written {
    inserted: Vec<String>,
    updated: BTreeMap<String, i64>,
    jobs: Vec<i64>,
    latencies: Vec<(Duration, Duration)>,
}

/// The move scenario.
pub(super) async fn moves(bed: &TestBed, _args: &BenchArgs, results: &mut Results) -> anyhow::Result<()> {
    let dbs = bed.fresh_fleet().await?;
    let fleet = Arc::new(
        BenchFleet::new(
            &dbs.master,
            &[("shard_1", &dbs.shards[0]), ("shard_2", &dbs.shards[1])],
            20,
        )
        .await?,
    );
    let router = fleet.router.clone();
    let (from, to) = ("shard_1", "shard_2");
    for name in [from, to] {
        sqlx::raw_sql(TABLES_SQL).execute(&router.shard(name)?.pool).await?;
    }
    let account = Account::new("bench-mover")?;
    router.place(&account, from).await?;
    eprintln!(
        "move: loading {} rows and {JOBS} jobs for one account...",
        2 * ROWS_PER_TABLE
    );
    let old = &router.shard(from)?.pool;
    sqlx::query("INSERT INTO bench_users (account, name) SELECT $1, 'user ' || i FROM generate_series(1, $2) AS i")
        .bind(account.as_str())
        .bind(ROWS_PER_TABLE)
        .execute(old)
        .await?;
    sqlx::query(
        "INSERT INTO bench_docs (account, title, body)
         SELECT $1, 'doc ' || i, repeat('x', 200) FROM generate_series(1, $2) AS i",
    )
    .bind(account.as_str())
    .bind(ROWS_PER_TABLE)
    .execute(old)
    .await?;
    let later = Duration::from_secs(3600);
    let preload = (0..JOBS).map(|i| {
        (
            account.clone(),
            NewJob::from_json("noop", serde_json::json!({ "w": -1, "i": i })).delay(later),
        )
    });
    fleet.client.enqueue_many(preload).await?;
    // Rows the writers update: a sample of the existing docs.
    let targets: Vec<String> =
        sqlx::query_scalar("SELECT id::text FROM bench_docs WHERE account = $1 ORDER BY id LIMIT 2000")
            .bind(account.as_str())
            .fetch_all(old)
            .await?;
    let before: Vec<String> = sqlx::query_scalar(
        "SELECT id::text FROM bench_users WHERE account = $1 UNION ALL SELECT id::text FROM bench_docs WHERE account = $1",
    )
    .bind(account.as_str())
    .fetch_all(old)
    .await?;

    let began = Instant::now();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let fleet = fleet.clone();
        let account = account.clone();
        let targets = targets.clone();
        let stopped = stopped.clone();
        writers.push(tokio::spawn(async move {
            let mut out = Written::default();
            let mut i = 0i64;
            while !*stopped.borrow() {
                let start = Instant::now();
                let mut tx = fleet.router.begin(&account).await?;
                let id: String = sqlx::query_scalar(
                    "INSERT INTO bench_docs (account, title, body, v) VALUES ($1, $2, 'written', $3) RETURNING id::text",
                )
                .bind(account.as_str())
                .bind(format!("writer {w} {i}"))
                .bind(i)
                .fetch_one(&mut *tx)
                .await?;
                let target = targets[(w + WRITERS * i as usize) % targets.len()].clone();
                sqlx::query("UPDATE bench_docs SET v = $2 WHERE id = $1::uuid")
                    .bind(&target)
                    .bind(i)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                out.inserted.push(id);
                out.updated.insert(target, i);
                out.latencies.push((start - began, start.elapsed()));
                let start = Instant::now();
                let job = NewJob::from_json("noop", serde_json::json!({ "w": w, "i": i })).delay(later);
                fleet.client.enqueue(&account, job).await?;
                out.jobs.push(i);
                out.latencies.push((start - began, start.elapsed()));
                i += 1;
                tokio::time::sleep(WRITE_EVERY).await;
            }
            anyhow::Ok(out)
        }));
    }
    tokio::time::sleep(SETTLE).await;

    eprintln!("move: moving the account while {WRITERS} writers write for it...");
    let mover = Mover::new(
        router.clone(),
        MoveOptions {
            tables: vec![
                AccountTable {
                    table: "bench_users".into(),
                    column: "account".into(),
                },
                AccountTable {
                    table: "bench_docs".into(),
                    column: "account".into(),
                },
            ],
            ..MoveOptions::default()
        },
    );
    let move_began = began.elapsed();
    let mut m = mover.start(&account, to).await?;
    let mut took: BTreeMap<&'static str, f64> = BTreeMap::new();
    let mut fenced_at = None;
    while m.step != Step::Done {
        let t = Instant::now();
        m = mover.step(&m).await?;
        took.insert(m.step.as_str(), t.elapsed().as_secs_f64());
        if m.step == Step::Fenced {
            fenced_at = Some(Instant::now());
        }
        if m.step == Step::Switched {
            if let Some(f) = fenced_at {
                took.insert("pause", f.elapsed().as_secs_f64());
            }
        }
    }
    let move_ended = began.elapsed();
    tokio::time::sleep(SETTLE).await;
    stop.send(true)?;
    let mut written = Vec::new();
    for w in writers {
        written.push(w.await??);
    }

    // Latencies of the writes that began during the move.
    let mut during: Vec<Duration> = written
        .iter()
        .flat_map(|w| w.latencies.iter())
        .filter(|(start, _)| *start >= move_began && *start <= move_ended)
        .map(|(_, d)| *d)
        .collect();
    during.sort();
    let pct = |p: f64| -> f64 {
        if during.is_empty() {
            return 0.0;
        }
        let i = ((during.len() as f64 * p).ceil() as usize).clamp(1, during.len()) - 1;
        during[i].as_secs_f64() * 1000.0
    };

    // What both shards hold afterwards.
    let new = &router.shard(to)?.pool;
    let ids_on = |pool: sqlx::PgPool| {
        let account = account.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT id::text FROM bench_users WHERE account = $1 UNION ALL SELECT id::text FROM bench_docs WHERE account = $1",
            )
            .bind(account.as_str())
            .fetch_all(&pool)
            .await
        }
    };
    let left_behind = ids_on(old.clone()).await?.len();
    let found = ids_on(new.clone()).await?;
    let found_set: BTreeSet<String> = found.iter().cloned().collect();
    let expected: BTreeSet<String> = before
        .iter()
        .cloned()
        .chain(written.iter().flat_map(|w| w.inserted.iter().cloned()))
        .collect();
    let rows_lost = expected.difference(&found_set).count();
    let rows_duplicated = left_behind + found_set.difference(&expected).count() + (found.len() - found_set.len());
    let values: BTreeMap<String, i64> =
        sqlx::query_as("SELECT id::text, v FROM bench_docs WHERE id = ANY($1::text[]::uuid[])")
            .bind(&targets)
            .fetch_all(new)
            .await?
            .into_iter()
            .collect();
    let mut last_write: BTreeMap<String, i64> = BTreeMap::new();
    for w in &written {
        for (id, v) in &w.updated {
            // Every writer writes its own rows of the sample.
            last_write.insert(id.clone(), *v);
        }
    }
    let updates_lost = last_write.iter().filter(|(id, v)| values.get(*id) != Some(v)).count();
    let jobs_of = |pool: sqlx::PgPool| {
        let account = account.clone();
        async move {
            sqlx::query_as::<_, (i64, i64)>(
                "SELECT (args ->> 'w')::bigint, (args ->> 'i')::bigint FROM shardq.jobs WHERE account = $1",
            )
            .bind(account.as_str())
            .fetch_all(&pool)
            .await
        }
    };
    let jobs_behind = jobs_of(old.clone()).await?.len();
    let jobs_found = jobs_of(new.clone()).await?;
    let jobs_set: BTreeSet<(i64, i64)> = jobs_found.iter().copied().collect();
    let jobs_expected: BTreeSet<(i64, i64)> = (0..JOBS as i64)
        .map(|i| (-1, i))
        .chain(
            written
                .iter()
                .enumerate()
                .flat_map(|(w, out)| out.jobs.iter().map(move |i| (w as i64, *i))),
        )
        .collect();
    let jobs_lost = jobs_expected.difference(&jobs_set).count();
    let jobs_duplicated =
        jobs_behind + jobs_set.difference(&jobs_expected).count() + (jobs_found.len() - jobs_set.len());

    let s = "move";
    let step = |name: &str| took.get(name).copied().unwrap_or(0.0);
    results.add(s, "rows moved", found.len() as f64, "rows");
    results.add(s, "jobs moved", jobs_found.len() as f64, "jobs");
    results.add(s, "writes during the move", during.len() as f64, "writes");
    results.add(s, "copy (step precopied)", step("precopied"), "s");
    results.add(s, "catch-up and write fence (step fenced)", step("fenced"), "s");
    results.add(s, "final catch-up (step copied)", step("copied"), "s");
    results.add(s, "write fence to switch", step("pause"), "s");
    results.add(s, "whole move", (move_ended - move_began).as_secs_f64(), "s");
    results.add(s, "write latency p50", pct(0.50), "ms");
    results.add_target(s, "write latency p99", pct(0.99), "ms", 1000.0, false);
    results.add_target(s, "longest write wait (the pause)", pct(1.0), "ms", 1000.0, false);
    results.add_target(s, "rows lost", rows_lost as f64, "rows", 0.0, false);
    results.add_target(s, "rows duplicated", rows_duplicated as f64, "rows", 0.0, false);
    results.add_target(s, "updates lost", updates_lost as f64, "rows", 0.0, false);
    results.add_target(s, "jobs lost", jobs_lost as f64, "jobs", 0.0, false);
    results.add_target(s, "jobs duplicated", jobs_duplicated as f64, "jobs", 0.0, false);
    Ok(())
}
