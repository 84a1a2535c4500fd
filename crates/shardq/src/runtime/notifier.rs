//! The notifier: one task per shard that owns the shard's one LISTEN
//! connection and hands each notification's payload to the subscriber of
//! its channel. After every (re)connect it calls `on_listen`, since
//! notifications sent while it was away are lost. The composer subscribes
//! the producers (to [`CHANNEL`]) and the cancel stage (to `shardq_cancel`).
//!
//! The LISTEN connection comes from the shard's `listen_url` when set (its
//! direct address), else from its pool; a shard behind a transaction
//! pooler without `listen_url` is not listened to at all (logged at start,
//! state `poll_only`): its producers find work by polling.

use std::collections::HashMap;
use std::time::Duration;

use shardq_router::router::Database;
use tokio::sync::watch;

use crate::error::ErrorChain;
use crate::observe::metrics::{self, NotifierState};

/// Longest wait between two LISTEN connection attempts.
const MAX_WAIT: Duration = Duration::from_secs(5);

/// The channel the shard's insert trigger notifies, with the queue as payload.
pub const CHANNEL: &str = "shardq_jobs";

/// Called with a notification's payload.
pub(crate) type Subscriber = Box<dyn Fn(&str) + Send + Sync>;

/// Who hears what on one shard's LISTEN connection.
pub(crate) struct Subscriptions {
    /// Channel → the subscriber its payloads go to.
    pub channels: HashMap<&'static str, Subscriber>,
    /// Called once LISTEN is in place after every (re)connect: whatever was
    /// sent meanwhile is gone, so subscribers must look for themselves.
    pub on_listen: Box<dyn Fn() + Send + Sync>,
}

/// Listens on `db` and hands notifications to `subs` until `stop`.
pub(crate) async fn run(db: Database, subs: Subscriptions, mut stop: watch::Receiver<bool>) {
    let channels: Vec<&str> = subs.channels.keys().copied().collect();
    let mut wait = Duration::from_millis(100);
    let mut was_listening = false;
    let Some(listen_pool) = db.listen_pool() else {
        tracing::info!(
            shard = %db.name,
            "the shard is behind a transaction pooler and has no listen_url: not listening; its producers poll"
        );
        metrics::notifier_state(&db.name, NotifierState::PollOnly);
        let _ = stop.changed().await;
        return;
    };
    loop {
        let connected = async {
            let mut l = sqlx::postgres::PgListener::connect_with(listen_pool).await?;
            // A lost connection is reported at once and reconnected below,
            // where the producers are woken only after the new LISTEN.
            l.eager_reconnect(false);
            l.listen_all(channels.iter().copied()).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            _ = stop.changed() => return,
            r = connected => match r {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(shard = %db.name, error = %ErrorChain(&db.error(e)), "LISTEN connection failed; polling until it is back");
                    // Once the backoff reaches its cap LISTEN keeps failing
                    // (server down, or a pooler that cannot LISTEN): poll only.
                    let state = if wait >= MAX_WAIT { NotifierState::Polling } else { NotifierState::Reconnecting };
                    metrics::notifier_state(&db.name, state);
                    tokio::select! {
                        _ = stop.changed() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(MAX_WAIT);
                    continue;
                }
            }
        };
        tracing::debug!(shard = %db.name, "listening");
        metrics::notifier_state(&db.name, NotifierState::Listening);
        if was_listening {
            metrics::notifier_reconnected(&db.name);
        }
        was_listening = true;
        wait = Duration::from_millis(100);
        (subs.on_listen)();
        loop {
            let next = tokio::select! {
                _ = stop.changed() => return,
                n = listener.try_recv() => n,
            };
            match next {
                Ok(Some(n)) => {
                    if let Some(subscriber) = subs.channels.get(n.channel()) {
                        subscriber(n.payload());
                    }
                }
                // The connection dropped. Reconnect here rather than in the
                // listener's next call, so producers are woken only once the
                // new LISTEN is in place (a wake before it could miss a job
                // inserted in between; tests/tests/faults.rs holds that
                // window open).
                Ok(None) => {
                    tracing::warn!(shard = %db.name, "LISTEN connection lost");
                    metrics::notifier_state(&db.name, NotifierState::Reconnecting);
                    break;
                }
                Err(e) => {
                    tracing::warn!(shard = %db.name, error = %ErrorChain(&db.error(e)), "LISTEN connection lost");
                    metrics::notifier_state(&db.name, NotifierState::Reconnecting);
                    break;
                }
            }
        }
    }
}
