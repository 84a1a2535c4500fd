//! A server's CPU time, read from `/proc`, never goes back while its
//! backends exit: each backend's time is counted once, alive or reaped.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardq_testbed::TestBed;
use sqlx::{Connection, PgConnection};

/// Backends that burn CPU and exit while the time is read.
const EXITS: usize = 60;
/// Deadline for those exits.
const DEADLINE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_time_never_goes_back_while_backends_exit() {
    let bed = TestBed::start(1).unwrap();
    let url = bed.master().url("postgres");
    let exited = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut churn = Vec::new();
    for _ in 0..2 {
        let (url, exited, stop) = (url.clone(), exited.clone(), stop.clone());
        churn.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut conn = PgConnection::connect(&url).await.unwrap();
                // Some 50-100 ms of the backend's own CPU, then it exits.
                sqlx::query("SELECT count(*) FROM generate_series(1, 1000000)")
                    .execute(&mut conn)
                    .await
                    .unwrap();
                conn.close().await.unwrap();
                exited.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    let master = bed.master().clone();
    let samples = tokio::task::spawn_blocking(move || {
        let until = Instant::now() + DEADLINE;
        let mut last = master.cpu_time().unwrap();
        let mut backwards = Vec::new();
        let mut samples = 0usize;
        while exited.load(Ordering::Relaxed) < EXITS && Instant::now() < until {
            let now = master.cpu_time().unwrap();
            if now < last {
                backwards.push((last, now));
            }
            last = last.max(now);
            samples += 1;
        }
        (samples, exited.load(Ordering::Relaxed), backwards)
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    for task in churn {
        task.await.unwrap();
    }

    let (samples, exits, backwards) = samples;
    assert!(
        exits >= EXITS,
        "only {exits} of {EXITS} backends exited within {DEADLINE:?}"
    );
    assert!(
        backwards.is_empty(),
        "the server's CPU time went back in {} of {samples} readings while {exits} backends exited: {:?}",
        backwards.len(),
        &backwards[..backwards.len().min(5)]
    );
}
