//! Pausing a queue on one shard: the claim statement takes nothing from it
//! there while the same queue on another shard is claimed, a worker node
//! leaves its jobs alone, and resuming lets them run.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use shardq::store::{self, FetchParams};
use shardq::{Account, NewJob, Runtime};
use shardq_tests::{fast_options, fleet, wait_for, Noop};

const WAIT: Duration = Duration::from_secs(30);

fn fetch(queue: &str) -> FetchParams<'_> {
    FetchParams {
        queue,
        limit: 10,
        node: "test-node",
        lease_secs: 30.0,
        aging_secs: None,
        fair: true,
        after: None,
        limited: true,
    }
}

#[tokio::test]
async fn the_claim_skips_a_queue_paused_on_its_shard_and_claims_it_elsewhere() {
    let f = fleet().await;
    let (one, two) = (f.router.shards()[0].name.clone(), f.router.shards()[1].name.clone());
    let (a, b) = (Account::new("paused-a").unwrap(), Account::new("running-b").unwrap());
    f.router.place(&a, &one).await.unwrap();
    f.router.place(&b, &two).await.unwrap();
    let job = |_: ()| NewJob::from_json("noop", serde_json::json!({})).queue("mail");
    let on_one = f.client.enqueue(&a, job(())).await.unwrap();
    let on_two = f.client.enqueue(&b, job(())).await.unwrap();
    // Another queue on the paused shard is not affected.
    let other = f
        .client
        .enqueue(&a, NewJob::from_json("noop", serde_json::json!({})).queue("other"))
        .await
        .unwrap();

    assert!(f.client.pause_queue(&one, "mail", "test").await.unwrap());
    assert!(
        !f.client.pause_queue(&one, "mail", "test again").await.unwrap(),
        "paused already"
    );
    let paused = f.client.paused_queues(&one).await.unwrap();
    assert_eq!(paused.len(), 1);
    assert_eq!(paused[0].paused_by, "test", "the first pause is kept");

    let pool_one = &f.router.shard(&one).unwrap().pool;
    let pool_two = &f.router.shard(&two).unwrap().pool;
    assert!(store::job_fetch_available(pool_one, &fetch("mail"))
        .await
        .unwrap()
        .is_empty());
    let claimed = store::job_fetch_available(pool_two, &fetch("mail")).await.unwrap();
    assert_eq!(claimed.iter().map(|j| j.id).collect::<Vec<_>>(), vec![on_two.id]);
    let claimed = store::job_fetch_available(pool_one, &fetch("other")).await.unwrap();
    assert_eq!(claimed.iter().map(|j| j.id).collect::<Vec<_>>(), vec![other.id]);

    assert!(f.client.resume_queue(&one, "mail").await.unwrap());
    assert!(
        !f.client.resume_queue(&one, "mail").await.unwrap(),
        "not paused any more"
    );
    let claimed = store::job_fetch_available(pool_one, &fetch("mail")).await.unwrap();
    assert_eq!(claimed.iter().map(|j| j.id).collect::<Vec<_>>(), vec![on_one.id]);
}

#[tokio::test]
async fn a_node_leaves_a_paused_queue_alone_on_that_shard_and_runs_it_after_resume() {
    let f = fleet().await;
    let (one, two) = (f.router.shards()[0].name.clone(), f.router.shards()[1].name.clone());
    let (a, b) = (Account::new("node-a").unwrap(), Account::new("node-b").unwrap());
    f.router.place(&a, &one).await.unwrap();
    f.router.place(&b, &two).await.unwrap();
    f.client.pause_queue(&one, "mail", "test").await.unwrap();
    let job = || NewJob::from_json("noop", serde_json::json!({})).queue("mail");
    let held = f.client.enqueue(&a, job()).await.unwrap();
    let rt = Runtime::builder(f.router.clone())
        .queue("mail", 4)
        .register(Noop)
        .options(fast_options())
        .start()
        .unwrap();
    // Jobs enqueued after the held one on the other shard run, several polls
    // of the paused shard's producer go by, and the held job stays put.
    for _ in 0..3 {
        let id = f.client.enqueue(&b, job()).await.unwrap();
        wait_for("the other shard's job to complete", WAIT, || async {
            f.client.job(&id).await.unwrap().state == "completed"
        })
        .await;
    }
    let still = f.client.job(&held).await.unwrap();
    assert_eq!(still.state, "available");
    assert_eq!(still.attempt, 0, "never claimed");

    f.client.resume_queue(&one, "mail").await.unwrap();
    wait_for("the resumed queue's job to complete", WAIT, || async {
        f.client.job(&held).await.unwrap().state == "completed"
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_bad_queue_name_or_shard_is_refused_and_changes_nothing() {
    let f = fleet().await;
    let one = f.router.shards()[0].name.clone();
    let e = f.client.pause_queue(&one, "", "test").await.unwrap_err().to_string();
    assert!(e.contains(&one) && e.contains("1 to 128 bytes"), "{e}");
    let e = f
        .client
        .pause_queue("nowhere", "mail", "test")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("nowhere"), "{e}");
    assert!(f.client.paused_queues(&one).await.unwrap().is_empty());
}
