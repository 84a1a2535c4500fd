//! `refresh_user_stats`: recounts a user's processed documents, the
//! follow-up of every `process_document` run on one of their documents.
//!
//! The handler locks the user's row first and counts in a statement of its
//! own: under READ COMMITTED that statement reads everything committed
//! before the lock was granted, so when two refreshes of one user overlap,
//! the one that writes last has counted last and the count is never stale.

use serde::{Deserialize, Serialize};
use shardq::{Account, Client, JobContext, JobError, NewJob, Worker};
use uuid::Uuid;

use crate::fenced::{begin_in_job, job_write};
use crate::jobs::QUEUE_ACCOUNTS;
use crate::store;

/// The job's args.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefreshUserStatsArgs {
    /// The user (of the job's account).
    pub user: Uuid,
}

/// The job that refreshes `user`'s statistics.
pub fn job(user: Uuid) -> shardq::Result<NewJob> {
    Ok(NewJob::new(RefreshUserStats::KIND, &RefreshUserStatsArgs { user })?.queue(QUEUE_ACCOUNTS))
}

/// The handler.
pub struct RefreshUserStats {
    /// Routes the account to its shard.
    pub client: Client,
}

impl Worker for RefreshUserStats {
    type Args = RefreshUserStatsArgs;
    const KIND: &'static str = "refresh_user_stats";

    async fn work(&self, ctx: JobContext, args: RefreshUserStatsArgs) -> Result<(), JobError> {
        let account = Account::new(ctx.account.as_str())?;
        job_write(|| self.refresh(&account, args.user)).await
    }
}

impl RefreshUserStats {
    /// The job's transaction, fenced ([`crate::fenced`]).
    async fn refresh(&self, account: &Account, user: Uuid) -> shardq::Result<()> {
        let router = self.client.router();
        let mut tx = begin_in_job(router, account).await?;
        let db = router.shard(tx.shard())?;
        if !store::user_lock(&mut *tx, account.as_str(), user)
            .await
            .map_err(|e| db.error(e))?
        {
            return Ok(()); // the user is gone
        }
        store::user_recount_processed(&mut *tx, account.as_str(), user)
            .await
            .map_err(|e| db.error(e))?;
        tx.commit().await.map_err(|e| db.error(e))?;
        Ok(())
    }
}
