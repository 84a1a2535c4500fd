//! Serial keys that hold: at most one run of a key at any time, whatever
//! order its jobs became visible, were retried or were cancelled in. Each
//! test records every run's start and end and asserts none overlap.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardq::{Account, JobContext, JobError, JobId, NewJob, Runtime, Worker};
use shardq_tests::{fast_options, fleet, wait_for, Fleet};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(30);

#[derive(serde::Deserialize)]
struct Args {
    name: String,
    #[serde(default)]
    fail: bool,
}

/// A run's start and, once it ended, its end.
type Run = (Instant, Option<Instant>);

/// Records each run's start and end; a run waits until the test releases
/// its name (ignoring cancellation), or fails at once when told to.
#[derive(Clone, Default)]
struct Held {
    runs: Arc<Mutex<BTreeMap<String, Vec<Run>>>>,
    released: Arc<Mutex<BTreeSet<String>>>,
    changed: Arc<tokio::sync::Notify>,
}

impl Held {
    fn release(&self, name: &str) {
        self.released.lock().unwrap().insert(name.to_string());
        self.changed.notify_waiters();
    }
    fn started(&self, name: &str) -> bool {
        self.runs.lock().unwrap().contains_key(name)
    }
    fn ended(&self, name: &str) -> bool {
        self.runs
            .lock()
            .unwrap()
            .get(name)
            .is_some_and(|r| r.iter().all(|(_, end)| end.is_some()))
    }
    /// No two runs (of any job of the key) overlap.
    fn assert_no_overlap(&self) {
        let runs = self.runs.lock().unwrap();
        let mut all: Vec<(Instant, Instant, &String)> = runs
            .iter()
            .flat_map(|(n, rs)| rs.iter().map(move |(s, e)| (*s, e.expect("every run ended"), n)))
            .collect();
        all.sort();
        for w in all.windows(2) {
            assert!(w[0].1 <= w[1].0, "{} and {} ran at the same time", w[0].2, w[1].2);
        }
    }
}

impl Worker for Held {
    type Args = Args;
    const KIND: &'static str = "held";
    fn timeout(&self) -> Duration {
        Duration::from_secs(120)
    }
    async fn work(&self, _: JobContext, a: Args) -> Result<(), JobError> {
        let start = Instant::now();
        self.runs
            .lock()
            .unwrap()
            .entry(a.name.clone())
            .or_default()
            .push((start, None));
        let result = if a.fail {
            Err(JobError::failed("told to fail"))
        } else {
            loop {
                let changed = self.changed.notified();
                if self.released.lock().unwrap().contains(&a.name) {
                    break;
                }
                changed.await;
            }
            Ok(())
        };
        if let Some(run) = self.runs.lock().unwrap().get_mut(&a.name).and_then(|r| r.last_mut()) {
            run.1 = Some(Instant::now());
        }
        result
    }
}

/// `probe`: completes at once. Waiting for one to complete shows the node
/// fetched after the moment it was enqueued.
struct Probe;
impl Worker for Probe {
    type Args = serde_json::Value;
    const KIND: &'static str = "probe";
    async fn work(&self, _: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        Ok(())
    }
}

fn keyed(name: &str) -> NewJob {
    NewJob::from_json("held", serde_json::json!({ "name": name })).serial_key("k")
}

fn node(f: &Fleet, held: &Held) -> Runtime {
    Runtime::builder(f.router.clone())
        .queue("default", 4)
        .register(held.clone())
        .register(Probe)
        .options(fast_options())
        .start()
        .unwrap()
}

/// Lets the node fetch once more after now, and waits until it did.
async fn fetch_once_more(f: &Fleet, a: &Account) {
    let probe = f
        .client
        .enqueue(a, NewJob::from_json("probe", serde_json::json!({})))
        .await
        .unwrap();
    wait_for("a probe job completed", WAIT, || async {
        f.client.job(&probe).await.unwrap().state == "completed"
    })
    .await;
}

async fn wait_done(f: &Fleet, ids: &[&JobId]) {
    wait_for("the keyed jobs finished", WAIT, || async {
        let mut all = true;
        for id in ids {
            all &= f.client.job(id).await.unwrap().state.is_final();
        }
        all
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_job_committed_after_a_later_one_ran_waits_for_it() {
    let f = fleet().await;
    let a = Account::new("serial-a").unwrap();
    let held = Held::default();
    // j1 is enqueued in a transaction that stays open; j2 after it, committed.
    let db = f.router.pool_for(&a).await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    let j1 = f.client.enqueue_in(&mut tx, &a, keyed("j1")).await.unwrap();
    let j2 = f.client.enqueue(&a, keyed("j2")).await.unwrap();
    let rt = node(&f, &held);
    wait_for("j2 runs (j1 is not visible yet)", WAIT, || async { held.started("j2") }).await;
    tx.commit().await.unwrap();
    fetch_once_more(&f, &a).await;
    assert!(!held.started("j1"), "j1 must wait while j2 holds the key");
    held.release("j2");
    wait_for("j1 runs once j2 ended", WAIT, || async { held.started("j1") }).await;
    held.release("j1");
    wait_done(&f, &[&j1, &j2]).await;
    rt.shutdown(Duration::from_secs(1)).await;
    held.assert_no_overlap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_keyed_job_retried_by_hand_waits_for_the_running_one() {
    let f = fleet().await;
    let a = Account::new("serial-b").unwrap();
    let held = Held::default();
    let rt = node(&f, &held);
    let j1 = f
        .client
        .enqueue(
            &a,
            NewJob::from_json("held", serde_json::json!({ "name": "j1", "fail": true }))
                .serial_key("k")
                .max_attempts(1),
        )
        .await
        .unwrap();
    wait_for("j1 is discarded", WAIT, || async {
        f.client.job(&j1).await.unwrap().state == "discarded"
    })
    .await;
    let j2 = f.client.enqueue(&a, keyed("j2")).await.unwrap();
    wait_for("j2 runs", WAIT, || async { held.started("j2") }).await;
    f.client.retry(&j1).await.unwrap();
    fetch_once_more(&f, &a).await;
    assert_eq!(
        held.runs.lock().unwrap()["j1"].len(),
        1,
        "the retried j1 waits while j2 holds the key"
    );
    held.release("j2");
    wait_for("j1 runs again once j2 ended", WAIT, || async {
        held.runs.lock().unwrap()["j1"].len() == 2
    })
    .await;
    wait_done(&f, &[&j1, &j2]).await;
    rt.shutdown(Duration::from_secs(1)).await;
    held.assert_no_overlap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_keyed_job_holds_its_key_until_its_handler_stops() {
    let f = fleet().await;
    let a = Account::new("serial-c").unwrap();
    let held = Held::default();
    let rt = node(&f, &held);
    let j1 = f.client.enqueue(&a, keyed("j1")).await.unwrap();
    wait_for("j1 runs", WAIT, || async { held.started("j1") }).await;
    let j2 = f.client.enqueue(&a, keyed("j2")).await.unwrap();
    // j1 is cancelled, but its handler ignores the signal and runs on.
    assert_eq!(f.client.cancel(&j1).await.unwrap().state, "cancelled");
    fetch_once_more(&f, &a).await;
    assert!(!held.started("j2"), "j2 must wait while j1's handler still runs");
    held.release("j1");
    wait_for("j1's handler ended", WAIT, || async { held.ended("j1") }).await;
    wait_for("j2 runs once j1's handler ended", WAIT, || async { held.started("j2") }).await;
    held.release("j2");
    wait_done(&f, &[&j1, &j2]).await;
    rt.shutdown(Duration::from_secs(1)).await;
    held.assert_no_overlap();
    assert_eq!(f.client.job(&j1).await.unwrap().state, "cancelled");
}
