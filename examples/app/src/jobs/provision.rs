//! `provision_account`: the one job each account gets (a unique job), which
//! sets up what a new account starts with: its welcome document, processed
//! like any other.
//!
//! `POST /accounts` enqueues it every time, also for an account that exists
//! (a retry after a failure between the master and the shard must still
//! provision): the unique key `provision` among every state makes the second
//! enqueue return the first job. Once the pruner has removed that job, a new
//! one may run; the welcome document's unique index makes it a no-op.

use serde::{Deserialize, Serialize};
use shardq::{Account, Client, JobContext, JobError, NewJob, UniqueOpts, UniqueStates, Worker};

use crate::fenced::{begin_in_job, job_write};
use crate::jobs::{process_document, QUEUE_ACCOUNTS};
use crate::store;

/// The job's args.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProvisionArgs {
    /// The account's display name, for the welcome text.
    pub name: String,
}

/// The account's provisioning job: unique per account, whatever its args.
pub fn job(name: &str) -> shardq::Result<NewJob> {
    Ok(
        NewJob::new(ProvisionAccount::KIND, &ProvisionArgs { name: name.into() })?
            .queue(QUEUE_ACCOUNTS)
            .unique(UniqueOpts::new().key("provision").states(UniqueStates::Any)),
    )
}

/// The title of every account's welcome document.
pub const WELCOME_TITLE: &str = "Welcome";

/// The handler.
pub struct ProvisionAccount {
    /// Routes the account to its shard, enqueues the welcome document's processing.
    pub client: Client,
}

impl Worker for ProvisionAccount {
    type Args = ProvisionArgs;
    const KIND: &'static str = "provision_account";

    async fn work(&self, ctx: JobContext, args: ProvisionArgs) -> Result<(), JobError> {
        let account = Account::new(ctx.account.as_str())?;
        job_write(|| self.provision(&account, &args.name)).await
    }
}

impl ProvisionAccount {
    /// The job's transaction, fenced ([`crate::fenced`]).
    async fn provision(&self, account: &Account, name: &str) -> shardq::Result<()> {
        let router = self.client.router();
        let mut tx = begin_in_job(router, account).await?;
        let db = router.shard(tx.shard())?;
        let body = format!("Welcome to {name}. Documents you write here are processed in the background.");
        let inserted = store::document_insert_welcome(&mut *tx, account.as_str(), WELCOME_TITLE, &body)
            .await
            .map_err(|e| db.error(e))?;
        if let Some(doc) = inserted {
            self.client
                .enqueue_in(&mut tx, account, process_document::job(doc.id)?)
                .await?;
        }
        tx.commit().await.map_err(|e| db.error(e))?;
        Ok(())
    }
}
