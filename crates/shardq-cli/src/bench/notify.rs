//! Concurrent single-row enqueues with the insert trigger's NOTIFY and
//! without it: every notifying transaction takes a server-wide lock at
//! commit, so concurrent notifying commits can lose group commit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardq::{Account, NewJob};
use shardq_testbed::TestBed;

use super::{BenchArgs, BenchFleet, Results};
use crate::store;

/// Concurrent enqueuers, each one single-row enqueue at a time.
const CLIENTS: usize = 32;

/// Single-row enqueues per second from [`CLIENTS`] tasks over `seconds`:
/// through the client (`plain` false), or as the same insert in bare SQL
/// with no wake-up (`plain` true, with the trigger disabled: the baseline).
async fn enqueue_rate(fleet: &BenchFleet, seconds: u64, plain: bool) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let accounts: Vec<Account> = (0..CLIENTS)
        .filter_map(|i| Account::new(format!("notify-{i}")).ok())
        .collect();
    let placed: Vec<&Account> = accounts.iter().collect();
    fleet.router.shards_for(&placed).await?;
    let started = Instant::now();
    let tasks: Vec<_> = accounts
        .into_iter()
        .map(|a| {
            let (client, stop) = (fleet.client.clone(), stop.clone());
            let pool = fleet.router.shards()[0].pool.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if plain {
                        store::enqueue_plain(&pool, a.as_str()).await?;
                    } else {
                        client
                            .enqueue(&a, NewJob::from_json("noop", serde_json::json!({})))
                            .await?;
                    }
                    n += 1;
                }
                Ok::<u64, anyhow::Error>(n)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Scenario: single-row enqueues from 32 clients through the client (which
/// wakes workers), against the same inserts in bare SQL with the trigger
/// disabled (no wake-up at all), on fresh databases of one server.
pub(super) async fn notify(bed: &TestBed, args: &BenchArgs, results: &mut Results) -> anyhow::Result<()> {
    let mut rates = [0.0; 2];
    for (i, trigger) in [true, false].into_iter().enumerate() {
        eprintln!(
            "notify: {CLIENTS} clients inserting one job at a time for {} s, {}...",
            args.seconds,
            if trigger {
                "through Client::enqueue"
            } else {
                "bare SQL, trigger off"
            }
        );
        let dbs = bed.fresh_fleet().await?;
        let fleet = BenchFleet::new(&dbs.master, &[("shard_1", &dbs.shards[0])], CLIENTS as u32 + 8).await?;
        if !trigger {
            store::notify_trigger_disable(&fleet.router.shards()[0].pool).await?;
        }
        rates[i] = enqueue_rate(&fleet, args.seconds, !trigger).await?;
    }
    results.add(
        "notify",
        "single-row Client::enqueue, 32 clients (wakes workers)",
        rates[0],
        "jobs/s",
    );
    results.add(
        "notify",
        "single-row bare SQL inserts, 32 clients, trigger off (no wake-up)",
        rates[1],
        "jobs/s",
    );
    results.add_target(
        "notify",
        "Client::enqueue / bare insert",
        rates[0] / rates[1],
        "",
        0.8,
        true,
    );
    Ok(())
}
