//! Outcomes that must never jam, duplicate or lose work: text the database
//! refuses, runs whose lease is lost, re-claims, and shutdown ordering.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use shardq::{Account, JobContext, JobError, NewJob, Runtime};
use shardq_tests::{count_state, fast_options, fleet, wait_for};

const WAIT: Duration = Duration::from_secs(30);

/// Ends its run as `args.mode` says, with a NUL byte in every text it returns.
struct Poison;

#[derive(serde::Deserialize)]
struct PoisonArgs {
    mode: String,
}

impl shardq::Worker for Poison {
    type Args = PoisonArgs;
    const KIND: &'static str = "poison";
    async fn work(&self, _: JobContext, a: PoisonArgs) -> Result<(), JobError> {
        match a.mode.as_str() {
            "fail" => Err(JobError::failed("bad\0byte")),
            "cancel" => Err(JobError::Cancel("stop\0here".into())),
            "panic" => panic!("fell\0over"),
            _ => Ok(()),
        }
    }
}

fn poison(mode: &str) -> NewJob {
    NewJob::from_json("poison", serde_json::json!({ "mode": mode })).max_attempts(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcome_text_with_a_nul_byte_never_jams_the_shard_completer() {
    let f = fleet().await;
    let a = Account::new("nul-account").unwrap();
    let shard = f.router.shard_for(&a).await.unwrap().shard;
    let failed = f.client.enqueue(&a, poison("fail")).await.unwrap();
    let cancelled = f.client.enqueue(&a, poison("cancel")).await.unwrap();
    let panicked = f.client.enqueue(&a, poison("panic")).await.unwrap();
    let mut fine = Vec::new();
    for _ in 0..20 {
        fine.push(f.client.enqueue(&a, poison("ok")).await.unwrap());
    }
    let rt = Runtime::builder(f.router.clone())
        .queue("default", 8)
        .register(Poison)
        .options(fast_options())
        .start()
        .unwrap();
    wait_for("every outcome written", WAIT, || async {
        count_state(&f.router, &shard, "completed").await == 20
            && count_state(&f.router, &shard, "discarded").await == 2
            && count_state(&f.router, &shard, "cancelled").await == 1
    })
    .await;
    // Later runs on the shard are written too: the completer is not stuck.
    let later = f.client.enqueue(&a, poison("ok")).await.unwrap();
    wait_for("a later job completed", WAIT, || async {
        f.client.job(&later).await.unwrap().state == "completed"
    })
    .await;
    rt.shutdown(Duration::from_secs(5)).await;
    let error_of = |j: shardq::JobRecord| j.errors[0]["error"].as_str().unwrap_or_default().to_string();
    assert_eq!(error_of(f.client.job(&failed).await.unwrap()), "bad\\0byte");
    assert!(
        error_of(f.client.job(&cancelled).await.unwrap()).ends_with("stop\\0here"),
        "the cancel reason is kept, its NUL escaped"
    );
    assert!(
        error_of(f.client.job(&panicked).await.unwrap()).contains("fell\\0over"),
        "the panic text is kept, its NUL escaped"
    );
}
