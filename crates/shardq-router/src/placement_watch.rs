//! The placement watch: one task per [`Router`](crate::Router) that drops
//! cached placements the moment they change in the master, so every router
//! learns of a move within about a second.
//!
//! It LISTENs on `shardq_placements` (the master's trigger notifies every
//! change of an account's shard or epoch) and, because notifications are
//! lost across reconnects, also asks the master every second which
//! placements moved since it last looked. At that look it also refreshes
//! the router's topology (`topology::Live::refresh`): which shards are
//! draining, the schema of shards not seen current, and every
//! [`COUNT_EVERY`] looks the placement counts of least-loaded placement.
//! Spawned by `Router::connect`; it ends when the router is dropped.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;

use crate::account::Account;
use crate::database::Database;
use crate::store;
use crate::topology::Live;

/// The router's placement cache: account → (shard, epoch). The shard's
/// name is shared, so a batch's lookups copy a pointer, not the name, and
/// accounts are hashed with foldhash (seeded per process), which takes a
/// fraction of the default hasher's time on short keys: a batch enqueue
/// looks up every job's account.
pub(crate) type Cache = RwLock<HashMap<Account, (Arc<str>, i64), foldhash::fast::RandomState>>;

/// How often the master is asked what moved, whatever the notifications say.
pub(crate) const POLL: Duration = Duration::from_secs(1);

/// Every how many looks the placement counts are read again (least-loaded
/// placement; in between, the router counts its own placements).
pub(crate) const COUNT_EVERY: u64 = 10;

/// Watches the master's placements and evicts changed ones from `cache`,
/// and refreshes `live`, until the router is dropped.
pub(crate) async fn run(master: Database, cache: Weak<Cache>, live: Weak<Live>) {
    let mut since = None;
    let mut looks: u64 = 0;
    let mut listener: Option<PgListener> = None;
    loop {
        if cache.strong_count() == 0 {
            return;
        }
        if listener.is_none() {
            // Behind a transaction pooler without listen_url: polls only.
            if let Some(pool) = master.listen_pool() {
                listener = listen(pool).await;
            }
        }
        // Wait for a notification or the poll, whichever comes first.
        let notified = match listener.as_mut() {
            Some(l) => match tokio::time::timeout(POLL, l.try_recv()).await {
                Ok(Ok(Some(n))) => Some(n.payload().to_string()),
                Ok(Ok(None)) | Ok(Err(_)) => {
                    listener = None;
                    None
                }
                Err(_) => None,
            },
            None => {
                tokio::time::sleep(POLL).await;
                None
            }
        };
        let Some(cache) = cache.upgrade() else { return };
        if let Some(account) = notified {
            evict(&cache, [account]);
            continue;
        }
        match store::placements_moved_since(&master, since).await {
            Ok((moved, now)) => {
                evict(&cache, moved);
                since = Some(now);
            }
            Err(e) => tracing::debug!(error = %e, "placement poll failed; retrying"),
        }
        drop(cache);
        looks += 1;
        let Some(live) = live.upgrade() else { return };
        live.refresh(&master, looks.is_multiple_of(COUNT_EVERY)).await;
    }
}

async fn listen(master: &PgPool) -> Option<PgListener> {
    let mut l = PgListener::connect_with(master).await.ok()?;
    l.listen(store::PLACEMENTS_CHANNEL).await.ok()?;
    Some(l)
}

fn evict(cache: &Cache, accounts: impl IntoIterator<Item = String>) {
    if let Ok(mut c) = cache.write() {
        for a in accounts {
            if let Ok(account) = Account::new(a) {
                if c.remove(&account).is_some() {
                    tracing::debug!(account = %account, "placement changed; cache entry dropped");
                }
            }
        }
    }
}
