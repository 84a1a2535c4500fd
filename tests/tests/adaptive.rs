//! Adaptive concurrency against real servers: with a backlog of handlers
//! that keep their pace the queue's limit climbs to its configured limit;
//! once the handlers contend for a lock two of them can hold at once (so
//! each takes longer the more run), the limit comes down; it never leaves
//! `[min, max]`, and the metrics endpoint shows it.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardq::runtime::AdaptiveConcurrency;
use shardq::{Account, JobContext, JobError, NewJob, Runtime, RuntimeOptions, Worker};
use shardq_tests::{fast_options, fleet, wait_for};
use tokio::sync::Semaphore;

const WAIT: Duration = Duration::from_secs(60);
const QUEUE: &str = "adaptive";
const MIN: usize = 2;
const MAX: usize = 32;
/// How long each handler works (holding the lock, when contended).
const HOLD: Duration = Duration::from_millis(50);

/// Works `HOLD`; while `contended` is set it holds one of the two permits
/// of `lock` meanwhile, so runs beyond two wait for each other.
struct Held {
    contended: Arc<AtomicBool>,
    lock: Arc<Semaphore>,
}

impl Worker for Held {
    type Args = serde_json::Value;
    const KIND: &'static str = "held";
    async fn work(&self, _: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        if self.contended.load(Ordering::SeqCst) {
            let _permit = self.lock.acquire().await.map_err(|e| JobError::failed(e.to_string()))?;
            tokio::time::sleep(HOLD).await;
        } else {
            tokio::time::sleep(HOLD).await;
        }
        Ok(())
    }
}

async fn metric(addr: std::net::SocketAddr) -> Option<f64> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with("shardq_queue_concurrency{") && l.contains(&format!("queue=\"{QUEUE}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn the_limit_climbs_to_the_max_with_a_backlog_and_comes_down_under_contention() {
    let f = fleet().await;
    let account = Account::new("adaptive-backlog").unwrap();
    f.router.place(&account, "shard_1").await.unwrap();
    let jobs = (0..2_000).map(|_| {
        (
            account.clone(),
            NewJob::new("held", &serde_json::json!({})).unwrap().queue(QUEUE),
        )
    });
    f.client.enqueue_many(jobs).await.unwrap();

    let contended = Arc::new(AtomicBool::new(false));
    let rt = Runtime::builder(f.router.clone())
        .queue(QUEUE, MAX)
        .register(Held {
            contended: contended.clone(),
            lock: Arc::new(Semaphore::new(2)),
        })
        .metrics_addr("127.0.0.1:0".parse().unwrap())
        .options(RuntimeOptions {
            adaptive: Some(AdaptiveConcurrency {
                queues: vec![QUEUE.into()],
                min: MIN,
                window: Duration::from_millis(200),
                ..AdaptiveConcurrency::default()
            }),
            ..fast_options()
        })
        .start()
        .unwrap();
    let seen = Mutex::new(Vec::new());
    let limit = || {
        let n = rt.concurrency()[QUEUE];
        seen.lock().unwrap().push(n);
        n
    };
    assert_eq!(limit(), MIN, "an adaptive queue starts at its least limit");
    wait_for("the limit at the max with fast handlers and a backlog", WAIT, || {
        let n = limit();
        async move { n == MAX }
    })
    .await;

    contended.store(true, Ordering::SeqCst);
    wait_for("the limit down to a quarter of the max under contention", WAIT, || {
        let n = limit();
        async move { n <= MAX / 4 }
    })
    .await;
    let shown = metric(rt.metrics_addr().unwrap())
        .await
        .expect("shardq_queue_concurrency on /metrics");
    assert!((MIN as f64..=MAX as f64).contains(&shown), "the gauge shows {shown}");
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter().all(|n| (MIN..=MAX).contains(n)),
        "a limit outside [{MIN}, {MAX}]: {seen:?}"
    );
    rt.shutdown(Duration::from_secs(1)).await;
}
