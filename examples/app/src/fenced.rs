//! Fenced writes: every write of the application to an account's rows (the
//! API's and the job handlers') runs in one transaction opened by
//! [`Router::begin`](shardq::Router::begin), and jobs it enqueues go in that
//! transaction too (`client.enqueue_in(&mut tx, ..)`). Such a transaction
//! follows the account when it moves to another shard; a write through
//! `router.pool_for` would not (see the README's "Moving accounts").
//!
//! The one exception is the per-shard cleanup (`jobs::cleanup`):
//! it works a shard, for every account on it, and only removes documents
//! deleted long ago, which is harmless on either copy of a moving account.

use std::future::Future;
use std::time::Duration;

use shardq::{Account, JobError, Router};
use shardq_router::router::{fenced, AccountTx};

/// Longest wait of a job's handler for its fenced transaction to begin
/// ([`begin_in_job`]); a normal `begin` takes milliseconds.
pub const JOB_BEGIN_WAIT: Duration = Duration::from_secs(1);

/// How long a job given back during its account's move waits before it
/// runs again ([`job_write`]).
pub const MOVING_SNOOZE: Duration = Duration::from_secs(1);

/// Runs `write` (one transaction from `router.begin`, committed by `write`)
/// and runs it once more if the account's shard refused it because a move
/// fenced the account off (SQLSTATE `SQ001`, [`is_fenced`]).
///
/// Why once: a transaction that began before a move's fence is carried by
/// the move (the move waits for it to end), so the fence never refuses it;
/// one that began after the fence sees it at `begin`, which waits for the
/// move's switch and opens the transaction on the new shard. So a refusal
/// mid-transaction only meets a transaction that began while the fence was
/// going up, too late to be carried and too early to see it at `begin`;
/// its retry begins after the fence, and lands on the new shard.
pub async fn retry_fenced<T, E, F, Fut>(mut write: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::error::Error + 'static,
{
    match write().await {
        Err(e) if is_fenced(&e) => {
            tracing::debug!(error = %e, "write refused by a move's fence; trying again");
            write().await
        }
        other => other,
    }
}

/// Whether `e`, or an error that caused it, is a shard refusing a write of
/// an account fenced off it ([`shardq_router::router::fenced`]).
pub fn is_fenced(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<sqlx::Error>().is_some_and(|e| fenced(e).is_some()) {
            return true;
        }
        cause = c.source();
    }
    false
}

/// `router.begin(account)` for a job's handler: the same fenced transaction,
/// but a job waits at most [`JOB_BEGIN_WAIT`] for it, then fails with
/// `AccountMoving`, which [`job_write`] turns into a snooze.
///
/// A job must not wait for its account's move: `begin` on a fenced shard
/// waits for the move to switch the account, while the move waits for the
/// account's running jobs (this one too) to end before it copies, so both
/// would wait until `begin` gives up after 30 s, holding up the move and
/// every write of the account paused behind it.
pub async fn begin_in_job(router: &Router, account: &Account) -> shardq::Result<AccountTx> {
    match tokio::time::timeout(JOB_BEGIN_WAIT, router.begin(account)).await {
        Ok(tx) => Ok(tx?),
        Err(_) => {
            let shard = router.shard_for(account).await?.shard;
            Err(shardq_router::Error::AccountMoving {
                account: account.to_string(),
                shard,
            }
            .into())
        }
    }
}

/// Runs a job handler's fenced transaction `write` ([`retry_fenced`]; it
/// begins with [`begin_in_job`]) and, when the account is being moved, gives
/// the job back for [`MOVING_SNOOZE`] (not a failure): the move then carries
/// it, and it runs again on the account's new shard.
pub async fn job_write<F, Fut>(write: F) -> Result<(), JobError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = shardq::Result<()>>,
{
    match retry_fenced(write).await {
        Err(shardq::Error::Router(shardq_router::Error::AccountMoving { account, shard })) => {
            tracing::debug!(%account, %shard, "account is moving; job given back for {MOVING_SNOOZE:?}");
            Err(JobError::Snooze(MOVING_SNOOZE))
        }
        other => Ok(other?),
    }
}
