//! Coalesced wake-ups after a client's inserts. An insert marked
//! [`Notify::Deferred`](crate::store::Notify) commits without a NOTIFY (a
//! notifying commit holds the server's notify lock until its flush, which
//! serialises concurrent enqueues); the client then hands the queue to its
//! [`Wakeups`], and returns. One task per shard sends the NOTIFYs: it takes
//! every queue handed in since its last round and sends them in one
//! statement, so concurrent enqueues share a round trip instead of paying
//! one each, and none waits for it. A wake-up that is lost (the task's
//! statement fails, or the process exits first) only leaves the jobs to
//! the producers' next poll.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use shardq_router::router::Database;
use tokio::sync::mpsc;

use crate::store;

/// The wake-up tasks of one client, one per shard it has enqueued on. The
/// tasks end when the client (and so this) is dropped.
#[derive(Default)]
pub(crate) struct Wakeups {
    shards: Mutex<HashMap<String, mpsc::UnboundedSender<String>>>,
}

impl Wakeups {
    /// Has `queues` on `db` woken soon, without waiting for it. Starts the
    /// shard's task on first use (so it must be called inside a runtime).
    pub(crate) fn wake(&self, db: &Database, queues: &[&str]) {
        let mut shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        let tx = shards.entry(db.name.clone()).or_insert_with(|| start(db.clone()));
        let unique: BTreeSet<&str> = queues.iter().copied().collect();
        for q in unique {
            if tx.send(q.to_string()).is_err() {
                // The task is gone (its runtime ended): start another.
                let fresh = start(db.clone());
                let _ = fresh.send(q.to_string());
                *tx = fresh;
            }
        }
    }
}

/// Spawns `db`'s task: each round takes every queue handed in so far and
/// notifies them in one statement; queues handed in meanwhile go in the
/// next round.
fn start(db: Database) -> mpsc::UnboundedSender<String> {
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut queues = BTreeSet::from([first]);
            while let Ok(q) = rx.try_recv() {
                queues.insert(q);
            }
            let queues: Vec<&str> = queues.iter().map(String::as_str).collect();
            let sent = match db.pool.acquire().await {
                Ok(mut conn) => store::jobs_notify(&mut db.conn(&mut conn), &queues).await,
                Err(e) => Err(e),
            };
            if let Err(e) = sent {
                tracing::warn!(shard = %db.name, error = %db.error(e), "jobs enqueued, but their wake-up was not sent; producers find them at their next poll");
            }
        }
    });
    tx
}
