//! Real `shardq worker` processes dividing 6 shards (2 owners each) under
//! steady load: one SIGKILLed, started again, then a fourth added; no job
//! is lost, every job completes, and the registry converges on the
//! rendezvous owners each time, within the connection bound per server.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shardq::runtime::fleet::owners;
use shardq::{Account, Client, Config, NewJob, Router};
use shardq_testbed::TestBed;
use shardq_tests::{count_state_all, many_shards, wait_for};

const WAIT: Duration = Duration::from_secs(60);
/// Owners per shard.
const K: usize = 2;
/// Engine connections per shard of a worker with one queue (Q + 4).
const POOL: i64 = 5;

/// A `shardq worker` child process; SIGKILLed and reaped on drop.
struct WorkerProcess {
    child: Child,
}

impl WorkerProcess {
    fn spawn(config: &Path, node_id: &str, dir: &Path) -> WorkerProcess {
        let child = Command::new(env!("CARGO_BIN_EXE_shardq"))
            .arg("--config")
            .arg(config)
            .args([
                "worker",
                "--queues",
                "default=20",
                "--lease",
                "2s",
                "--heartbeat",
                "500ms",
            ])
            .args(["--rescue", "500ms", "--poll", "200ms", "--node-id", node_id])
            .args([
                "--nodes-per-shard",
                "2",
                "--fleet-heartbeat",
                "300ms",
                "--handover-grace",
                "500ms",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(dir.join(format!("{node_id}.stderr"))).unwrap())
            .spawn()
            .unwrap();
        WorkerProcess { child }
    }

    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn write_config(config: &Config, dir: &Path) -> PathBuf {
    let mut text = format!("[master]\nurl = \"{}\"\n", config.master.target);
    for s in &config.shards {
        text.push_str(&format!(
            "[[shards]]\nname = \"{}\"\nurl = \"{}\"\n",
            s.name, s.database.target
        ));
    }
    let path = dir.join("shards.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Live nodes of the registry → the shards each works.
async fn registry(router: &Router) -> BTreeMap<String, BTreeSet<String>> {
    let rows: Vec<(String, Vec<String>)> = sqlx::query_as(
        "SELECT id, working FROM shardq.nodes WHERE heartbeat_at >= now() - make_interval(secs => ttl_secs)",
    )
    .fetch_all(&router.master().pool)
    .await
    .unwrap();
    rows.into_iter().map(|(id, w)| (id, w.into_iter().collect())).collect()
}

/// Waits until exactly `nodes` are live and each works exactly the shards
/// it owns by rendezvous among them.
async fn converged(what: &str, router: &Router, shards: &[String], nodes: &[&str]) {
    let mut want: BTreeMap<String, BTreeSet<String>> = nodes.iter().map(|n| (n.to_string(), BTreeSet::new())).collect();
    for s in shards {
        for o in owners(s, nodes, K) {
            want.get_mut(o).unwrap().insert(s.clone());
        }
    }
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let last = registry(router).await;
        if last == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{what}: registry {last:?}, owners {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each live node's engine connections (its own count, in the registry)
/// ≤ the shards it works × (pool + 1).
async fn within_bound(router: &Router) {
    let rows: Vec<(String, i32, i32)> = sqlx::query_as(
        "SELECT id, cardinality(working), connections FROM shardq.nodes
          WHERE heartbeat_at >= now() - make_interval(secs => ttl_secs)",
    )
    .fetch_all(&router.master().pool)
    .await
    .unwrap();
    for (node, shards, open) in rows {
        assert!(
            i64::from(open) <= i64::from(shards) * (POOL + 1),
            "node {node} holds {open} engine connections for {shards} shards"
        );
    }
}

#[tokio::test]
async fn workers_divide_shards_through_a_kill_a_restart_and_a_join_losing_no_job() {
    let bed = tokio::task::spawn_blocking(TestBed::shared).await.unwrap().unwrap();
    let (config, _) = many_shards(bed, 6).await;
    let shards = config.shard_names();
    let router = Arc::new(Router::connect(&config).await.unwrap());
    let client = Client::new(router.clone());
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&config, dir.path());

    // Steady load: a few short jobs every 20 ms over many accounts.
    let enqueued = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (client, enqueued, stop) = (client.clone(), enqueued.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let jobs = (0..5).map(|j| {
                    let a = Account::new(format!("acct-{}", (i * 5 + j) % 60)).unwrap();
                    (a, NewJob::new("sleep", &serde_json::json!({"ms": 20})).unwrap())
                });
                let n = client.enqueue_many(jobs).await.unwrap().len() as u64;
                enqueued.fetch_add(n, Ordering::Relaxed);
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let mut a = WorkerProcess::spawn(&path, "w-a", dir.path());
    let _b = WorkerProcess::spawn(&path, "w-b", dir.path());
    let _c = WorkerProcess::spawn(&path, "w-c", dir.path());
    converged("three workers", &router, &shards, &["w-a", "w-b", "w-c"]).await;
    within_bound(&router).await;

    a.kill();
    converged("w-a killed", &router, &shards, &["w-b", "w-c"]).await;
    let _a = WorkerProcess::spawn(&path, "w-a", dir.path());
    converged("w-a started again", &router, &shards, &["w-a", "w-b", "w-c"]).await;
    let _d = WorkerProcess::spawn(&path, "w-d", dir.path());
    converged("w-d joined", &router, &shards, &["w-a", "w-b", "w-c", "w-d"]).await;
    within_bound(&router).await;

    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let total = enqueued.load(Ordering::Relaxed) as i64;
    assert!(total > 0);
    wait_for("every job completed", WAIT, || async {
        count_state_all(&router, "completed").await == total
    })
    .await;
    for state in ["available", "running", "retryable", "discarded", "cancelled"] {
        assert_eq!(count_state_all(&router, state).await, 0, "jobs left {state}");
    }
}
