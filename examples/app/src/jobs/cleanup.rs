//! `purge_deleted_documents`: a periodic job enqueued on every shard (for
//! shardq's system account, not a customer's) that removes the documents of
//! all that shard's accounts deleted more than `older_than` ago.
//!
//! It deletes in batches that skip rows other transactions hold, so it
//! never waits on a request; an occurrence is skipped while the previous run
//! is not done, and a starting node catches up only the last minute: the
//! next run removes whatever a missed one would have.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shardq::periodic::Tz;
use shardq::{JobContext, JobError, NewJob, Overlap, PeriodicJob, Router, Worker};

use crate::jobs::{CleanupOptions, QUEUE_MAINTENANCE};
use crate::store;

/// Rows removed per statement.
pub const BATCH: i64 = 1_000;

/// The periodic job's name (its identity in `shardq.periodic_runs`).
pub const NAME: &str = "purge_deleted_documents";

/// The job's args: none; the node's [`CleanupOptions`] say what to remove.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PurgeArgs {}

/// The periodic declaration: one job per shard at every occurrence of the schedule.
pub fn schedule(options: &CleanupOptions) -> shardq::Result<PeriodicJob> {
    let job = NewJob::new(PurgeDeletedDocuments::KIND, &PurgeArgs {})?.queue(QUEUE_MAINTENANCE);
    Ok(PeriodicJob::new(NAME, &options.schedule, Tz::UTC, job)?
        .per_shard()
        .overlap(Overlap::Skip)
        .catch_up(Duration::from_secs(60)))
}

/// The handler.
pub struct PurgeDeletedDocuments {
    /// Gives the pool of the shard the job runs on.
    pub router: Arc<Router>,
    /// How long a deleted document is kept.
    pub older_than: Duration,
}

impl Worker for PurgeDeletedDocuments {
    type Args = PurgeArgs;
    const KIND: &'static str = "purge_deleted_documents";

    async fn work(&self, ctx: JobContext, _args: PurgeArgs) -> Result<(), JobError> {
        // A per-shard job works the shard it was enqueued on, for every
        // account there, so it cannot write through `router.begin(&account)`.
        // It only removes rows deleted long ago, which is harmless on either
        // copy of an account that is moving (the copy locks the rows it reads,
        // and this skips locked rows).
        let db = self.router.shard(&ctx.id.shard)?;
        let mut removed = 0;
        loop {
            let n = store::document_purge_deleted(&db.pool, self.older_than, BATCH)
                .await
                .map_err(|e| db.error(e))?;
            removed += n;
            if n < BATCH.unsigned_abs() || ctx.is_cancelled() {
                break;
            }
        }
        tracing::debug!(shard = %db.name, removed, "purged deleted documents");
        Ok(())
    }
}
