//! The notifier: one task per shard that owns the shard's one LISTEN
//! connection and wakes that shard's producer of the queue named in each
//! notification. After every (re)connect it wakes all of the shard's
//! producers, since notifications sent while it was away are lost. The same
//! connection listens on `shardq_cancel` and signals the handler of a job
//! this node runs when that job is cancelled (see `cancel`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::{watch, Notify};

use crate::cancel;
use crate::error::ErrorChain;
use crate::metrics::{self, NotifierState};
use crate::shard::ShardWork;
use crate::store;

/// Longest wait between two LISTEN connection attempts.
const MAX_WAIT: Duration = Duration::from_secs(5);

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
    let mut was_listening = false;
    loop {
        let connected = async {
            let mut l = PgListener::connect_with(&shard.db.pool).await?;
            l.listen_all([CHANNEL, store::CANCEL_CHANNEL]).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            _ = stop.changed() => return,
            r = connected => match r {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(shard = %shard.db.name, error = %ErrorChain(&shard.db.error(e)), "LISTEN connection failed; polling until it is back");
                    // Once the backoff reaches its cap LISTEN keeps failing
                    // (server down, or a pooler that cannot LISTEN): poll only.
                    let state = if wait >= MAX_WAIT { NotifierState::Polling } else { NotifierState::Reconnecting };
                    metrics::notifier_state(&shard.db.name, state);
                    tokio::select! {
                        _ = stop.changed() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(MAX_WAIT);
                    continue;
                }
            }
        };
        tracing::debug!(shard = %shard.db.name, "listening");
        metrics::notifier_state(&shard.db.name, NotifierState::Listening);
        if was_listening {
            metrics::notifier_reconnected(&shard.db.name);
        }
        was_listening = true;
        wait = Duration::from_millis(100);
        wake_all();
        loop {
            let next = tokio::select! {
                _ = stop.changed() => return,
                n = listener.try_recv() => n,
            };
            match next {
                Ok(Some(n)) if n.channel() == store::CANCEL_CHANNEL => cancel::on_notification(&shard, n.payload()),
                Ok(Some(n)) => {
                    if let Some(w) = producers.get(n.payload()) {
                        w.notify_one();
                    }
                }
                // The connection dropped and will be re-established on the next call.
                Ok(None) => {
                    metrics::notifier_reconnected(&shard.db.name);
                    wake_all();
                }
                Err(e) => {
                    tracing::warn!(shard = %shard.db.name, error = %ErrorChain(&shard.db.error(e)), "LISTEN connection lost");
                    metrics::notifier_state(&shard.db.name, NotifierState::Reconnecting);
                    wake_all();
                    break;
                }
            }
        }
    }
}
