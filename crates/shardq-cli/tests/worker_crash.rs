//! Real `shardq worker` processes under faults: one SIGKILLed mid-batch
//! loses no job (its leases expire and another node rescues and finishes
//! them), and one sent SIGTERM hands its running jobs back at once.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use shardq::store::{self, Finish};
use shardq::{Account, Backoff, JobContext, JobError, JobId, NewJob, Runtime, RuntimeOptions, Worker};
use shardq_tests::{count_state_all, fleet, wait_for, Fleet};

const WAIT: Duration = Duration::from_secs(30);

/// A `shardq worker` child process; SIGKILLed and reaped on drop if still running.
struct WorkerProcess {
    child: Child,
    stderr: PathBuf,
}

impl WorkerProcess {
    fn spawn(config: &Path, node_id: &str, extra: &[&str], dir: &Path) -> WorkerProcess {
        let stderr = dir.join(format!("{node_id}.stderr"));
        let child = Command::new(env!("CARGO_BIN_EXE_shardq"))
            .arg("--config")
            .arg(config)
            .args([
                "worker",
                "--queues",
                "default=50",
                "--lease",
                "2s",
                "--heartbeat",
                "500ms",
            ])
            .args(["--rescue", "500ms", "--poll", "200ms", "--node-id", node_id])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        WorkerProcess { child, stderr }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).unwrap())
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits (with a deadline) for the process to exit on its own.
    async fn exited(&mut self, what: &str) -> ExitStatus {
        let mut status = None;
        wait_for(what, WAIT, || {
            status = self.child.try_wait().unwrap();
            std::future::ready(status.is_some())
        })
        .await;
        status.unwrap()
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

/// Writes a shards.toml for the fleet; shards are reached as role `user`.
fn write_config(f: &Fleet, dir: &Path, user: &str) -> PathBuf {
    let mut text = format!("[master]\nurl = \"{}\"\n", f.config.master.target);
    for s in &f.config.shards {
        let t = &s.database.target;
        text.push_str(&format!(
            "[[shards]]\nname = \"{}\"\nurl = \"postgres://{user}@{}:{}/{}\"\n",
            s.name, t.host, t.port, t.dbname
        ));
    }
    let path = dir.join("shards.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Jobs of every shard in `state` held by `node`.
async fn count_held(f: &Fleet, state: &str, node: &str) -> i64 {
    let mut n = 0;
    for db in f.router.shards() {
        let c: i64 = sqlx::query_scalar("SELECT count(*) FROM shardq.jobs WHERE state = $1 AND locked_by = $2")
            .bind(state)
            .bind(node)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        n += c;
    }
    n
}

/// Every job of the fleet: id → (state, locked_by, attempt, max_attempts, errors).
type Row = (String, Option<String>, i32, i32, serde_json::Value);
/// The same with the id, as selected.
type DbRow = (
    i64,
    String,
    Option<String>,
    i32,
    i32,
    sqlx::types::Json<serde_json::Value>,
);

async fn all_jobs(f: &Fleet) -> BTreeMap<JobId, Row> {
    let mut out = BTreeMap::new();
    for db in f.router.shards() {
        let rows: Vec<DbRow> =
            sqlx::query_as("SELECT id, state, locked_by, attempt, max_attempts, errors FROM shardq.jobs")
                .fetch_all(&db.pool)
                .await
                .unwrap();
        for (id, state, locked_by, attempt, max_attempts, errors) in rows {
            let id = JobId {
                shard: db.name.clone(),
                id,
            };
            out.insert(id, (state, locked_by, attempt, max_attempts, errors.0));
        }
    }
    out
}

/// Counts runs per job id (registered as the CLI's `sleep` kind, without sleeping).
#[derive(Clone, Default)]
struct Counting(Arc<Mutex<HashMap<JobId, u32>>>);

impl Worker for Counting {
    type Args = serde_json::Value;
    const KIND: &'static str = "sleep";
    async fn work(&self, ctx: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        *self.0.lock().unwrap().entry(ctx.id).or_default() += 1;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_sigkilled_mid_batch_loses_no_job_and_its_running_jobs_are_rescued() {
    let f = fleet().await;
    let dir = tempfile::tempdir().unwrap();
    // The victim reaches the shards as its own role, so the test can tell
    // when the server has finished every statement the dead process sent.
    let role = format!("victim_{}", std::process::id());
    for db in f.router.shards() {
        sqlx::query(&format!("CREATE ROLE {role} LOGIN SUPERUSER"))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let config = write_config(&f, dir.path(), &role);

    let jobs = (0..300).map(|i| {
        let account = Account::new(format!("acct-{}", i % 60)).unwrap();
        (account, NewJob::from_json("sleep", serde_json::json!({ "ms": 500 })))
    });
    let ids = f.client.enqueue_many(jobs).await.unwrap();
    let shards_used: BTreeSet<_> = ids.iter().map(|id| id.shard.clone()).collect();
    assert_eq!(shards_used.len(), 3, "60 accounts spread over all 3 shards");

    let mut victim = WorkerProcess::spawn(&config, "victim-node", &[], dir.path());
    wait_for("the victim to complete a batch and run the next", WAIT, || async {
        count_state_all(&f.router, "completed").await >= 50 && count_held(&f, "running", "victim-node").await > 0
    })
    .await;
    victim.child.kill().unwrap(); // SIGKILL
    victim.child.wait().unwrap();
    // Statements the victim had sent may still commit; wait until its backends are gone.
    wait_for("the victim's backends to end", WAIT, || async {
        let mut n = 0;
        for db in f.router.shards() {
            let c: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE usename = $1")
                .bind(&role)
                .fetch_one(&db.pool)
                .await
                .unwrap();
            n += c;
        }
        n == 0
    })
    .await;

    let at_kill = all_jobs(&f).await;
    assert_eq!(at_kill.len(), 300);
    let running: BTreeSet<JobId> = at_kill
        .iter()
        .filter(|(_, r)| r.0 == "running")
        .map(|(id, _)| id.clone())
        .collect();
    let completed: BTreeSet<JobId> = at_kill
        .iter()
        .filter(|(_, r)| r.0 == "completed")
        .map(|(id, _)| id.clone())
        .collect();
    assert!(!running.is_empty(), "jobs were running on the victim when it died");
    assert!(completed.len() >= 50 && completed.len() < 300, "killed mid-batch");
    for id in &running {
        assert_eq!(at_kill[id].1.as_deref(), Some("victim-node"), "{id} ran on the victim");
    }
    for (id, r) in &at_kill {
        assert!(
            matches!(r.0.as_str(), "running" | "completed" | "available"),
            "{id} is {}",
            r.0
        );
    }

    // A second node (in process, counting runs) rescues and finishes the rest.
    let runs = Counting::default();
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 50)
        .register(runs.clone())
        .options(RuntimeOptions {
            poll_interval: Duration::from_millis(200),
            lease: Duration::from_secs(2),
            heartbeat_interval: Duration::from_millis(500),
            rescue_interval: Duration::from_millis(500),
            backoff: Backoff {
                base: Duration::from_millis(10),
                max: Duration::from_millis(50),
            },
            node_id: Some("second-node".into()),
            ..RuntimeOptions::default()
        })
        .start()
        .unwrap();
    wait_for("all 300 jobs completed", WAIT, || async {
        count_state_all(&f.router, "completed").await == 300
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await;

    let end = all_jobs(&f).await;
    let runs = runs.0.lock().unwrap().clone();
    assert_eq!(end.len(), 300, "no job lost or added");
    for id in &ids {
        let (state, locked_by, attempt, max_attempts, errors) = &end[id];
        assert_eq!(
            (state.as_str(), locked_by, *max_attempts),
            ("completed", &None, 20),
            "{id}"
        );
        let errors = errors.as_array().unwrap();
        if running.contains(id) {
            assert_eq!(*attempt, 2, "{id}: the lost attempt counts, the rescue ran attempt 2");
            assert_eq!(errors.len(), 1, "{id}: {errors:?}");
            assert_eq!(errors[0]["attempt"], 1);
            let message = errors[0]["error"].as_str().unwrap();
            assert!(message.contains("lease expired: node victim-node"), "{id}: {message}");
            assert_eq!(runs.get(id), Some(&1), "{id} ran once on the second node");
        } else if completed.contains(id) {
            assert_eq!((*attempt, errors.len()), (1, 0), "{id} completed by the victim");
            assert_eq!(runs.get(id), None, "{id} was completed already and not run again");
        } else {
            assert_eq!((*attempt, errors.len()), (1, 0), "{id} waited and ran once");
            assert_eq!(runs.get(id), Some(&1), "{id} ran once on the second node");
        }
    }
    assert_eq!(runs.values().sum::<u32>() as usize, 300 - completed.len());

    // Were the victim's attempt-1 outcomes to arrive now, they change
    // nothing (even with the token of the rescue's claim).
    for db in f.router.shards() {
        let mut late = Vec::new();
        for id in running.iter().filter(|id| id.shard == db.name) {
            let attempted_at: chrono::DateTime<chrono::Utc> =
                sqlx::query_scalar("SELECT attempted_at FROM shardq.jobs WHERE id = $1")
                    .bind(id.id)
                    .fetch_one(&db.pool)
                    .await
                    .unwrap();
            late.push(store::RunKey {
                id: id.id,
                attempt: 1,
                attempted_at,
            });
        }
        assert_eq!(store::job_complete_many(db, &late).await.unwrap(), 0);
        let finishes: Vec<Finish> = late
            .iter()
            .map(|run| Finish {
                run: *run,
                state: shardq::JobState::Available,
                retry_in: None,
                error: Some("late".into()),
                extra_attempts: 0,
            })
            .collect();
        assert_eq!(store::job_finish_many(db, &finishes).await.unwrap(), 0);
    }
    assert_eq!(all_jobs(&f).await, end, "late writes of the dead node regress nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_running_jobs_back_at_once_without_counting_the_attempt() {
    let f = fleet().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&f, dir.path(), "postgres");
    let jobs = (0..6).map(|i| {
        let account = Account::new(format!("term-{i}")).unwrap();
        (account, NewJob::from_json("sleep", serde_json::json!({ "ms": 60_000 })))
    });
    let ids = f.client.enqueue_many(jobs).await.unwrap();

    let mut worker = WorkerProcess::spawn(&config, "term-node", &["--grace", "200ms"], dir.path());
    wait_for("the worker to run all 6 jobs", WAIT, || async {
        count_held(&f, "running", "term-node").await == 6
    })
    .await;
    wait_for("the worker to say it is running", WAIT, || {
        std::future::ready(worker.stderr().contains("running; ctrl-c or SIGTERM to stop"))
    })
    .await;
    signal::kill(worker.pid(), Signal::SIGTERM).unwrap();
    let status = worker.exited("the worker to exit after SIGTERM").await;
    assert!(status.success(), "{status}; stderr:\n{}", worker.stderr());

    for id in &ids {
        let j = f.client.job(id).await.unwrap();
        assert_eq!(j.state, "available", "{id} handed back");
        assert_eq!(j.locked_by, None, "{id}");
        assert_eq!(
            (j.attempt, j.max_attempts),
            (1, 21),
            "{id}: the interrupted attempt is not counted against the job"
        );
        assert_eq!(j.errors, serde_json::json!([]), "{id}");
    }
    assert!(
        worker.stderr().contains("handed running jobs back"),
        "stderr:\n{}",
        worker.stderr()
    );
}
