//! The notifier: one task per shard that owns the shard's one LISTEN
//! connection and wakes that shard's producer of the queue named in each
//! notification. After every (re)connect it wakes all of the shard's
//! producers, since notifications sent while it was away are lost.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::{watch, Notify};

use crate::shard::ShardWork;

/// The channel the shard's insert trigger notifies, with the queue as payload.
pub const CHANNEL: &str = "shardq_jobs";

/// Listens on `shard` and wakes `producers` (queue → wake-up) until `stop`.
pub(crate) async fn run(
    shard: Arc<ShardWork>,
    producers: HashMap<String, Arc<Notify>>,
    mut stop: watch::Receiver<bool>,
) {
    let wake_all = || producers.values().for_each(|w| w.notify_one());
    let mut wait = Duration::from_millis(100);
    loop {
        let connected = async {
            let mut l = PgListener::connect_with(&shard.db.pool).await?;
            l.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            _ = stop.changed() => return,
            r = connected => match r {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(shard = %shard.db.name, error = %shard.db.error(e), "LISTEN connection failed; polling until it is back");
                    tokio::select! {
                        _ = stop.changed() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        };
        tracing::debug!(shard = %shard.db.name, "listening");
        wait = Duration::from_millis(100);
        wake_all();
        loop {
            let next = tokio::select! {
                _ = stop.changed() => return,
                n = listener.try_recv() => n,
            };
            match next {
                Ok(Some(n)) => {
                    if let Some(w) = producers.get(n.payload()) {
                        w.notify_one();
                    }
                }
                // The connection dropped and will be re-established on the next call.
                Ok(None) => wake_all(),
                Err(e) => {
                    tracing::warn!(shard = %shard.db.name, error = %shard.db.error(e), "LISTEN connection lost");
                    wake_all();
                    break;
                }
            }
        }
    }
}
