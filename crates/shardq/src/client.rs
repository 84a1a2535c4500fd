//! [`Client`]: enqueue jobs on their account's shard, and look them up.

use std::collections::BTreeMap;
use std::sync::Arc;

use shardq_router::{Account, Router};
use sqlx::PgConnection;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::job::{JobId, JobRecord, NewJob};
use crate::store;

/// Enqueues and inspects jobs. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    router: Arc<Router>,
}

impl Client {
    /// A client routing through `router`.
    pub fn new(router: Arc<Router>) -> Client {
        Client { router }
    }

    /// The router this client uses.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Enqueues one job on the account's shard: one INSERT in its own
    /// transaction; the shard's trigger sends the queue's NOTIFY at commit.
    pub async fn enqueue(&self, account: &Account, job: NewJob) -> Result<JobId> {
        let args = job.validate()?;
        let span = tracing::debug_span!("enqueue", account = %account, queue = %job.queue, kind = %job.kind, shard = tracing::field::Empty);
        async {
            let db = self.router.pool_for(account).await?;
            tracing::Span::current().record("shard", db.name.as_str());
            let mut conn = db.pool.acquire().await.map_err(|e| db.error(e))?;
            let id = store::job_insert(&mut conn, account.as_str(), &job, &args)
                .await
                .map_err(|e| db.error(e))?;
            Ok(JobId {
                shard: db.name.clone(),
                id,
            })
        }
        .instrument(span)
        .await
    }

    /// Enqueues one job inside the application's own transaction, which must
    /// be open on the account's shard (`router.pool_for(account)`): the job
    /// exists if and only if that transaction commits.
    pub async fn enqueue_in(&self, tx: &mut PgConnection, account: &Account, job: NewJob) -> Result<JobId> {
        let args = job.validate()?;
        let db = self.router.pool_for(account).await?;
        let id = store::job_insert(tx, account.as_str(), &job, &args)
            .await
            .map_err(|e| db.error(e))?;
        Ok(JobId {
            shard: db.name.clone(),
            id,
        })
    }

    /// Enqueues many jobs of one or many accounts: one INSERT per shard
    /// involved (shards written concurrently). Ids come back in input order.
    /// Nothing is written when any job is invalid.
    pub async fn enqueue_many(&self, jobs: impl IntoIterator<Item = (Account, NewJob)>) -> Result<Vec<JobId>> {
        let jobs: Vec<(Account, NewJob)> = jobs.into_iter().collect();
        let mut by_shard: BTreeMap<String, Vec<(usize, &str, &NewJob, String)>> = BTreeMap::new();
        for (i, (account, job)) in jobs.iter().enumerate() {
            let args = job.validate()?;
            let shard = self.router.shard_for(account).await?.shard;
            by_shard
                .entry(shard)
                .or_default()
                .push((i, account.as_str(), job, args));
        }
        let writes = by_shard.into_iter().map(|(shard, rows)| async move {
            let db = self.router.shard(&shard)?;
            let input: Vec<(&str, &NewJob, String)> = rows.iter().map(|r| (r.1, r.2, r.3.clone())).collect();
            let mut conn = db.pool.acquire().await.map_err(|e| db.error(e))?;
            let ids = store::job_insert_many(&mut conn, &input)
                .await
                .map_err(|e| db.error(e))?;
            Ok::<_, Error>(
                rows.iter()
                    .map(|r| r.0)
                    .zip(ids)
                    .map(|(i, id)| {
                        (
                            i,
                            JobId {
                                shard: shard.clone(),
                                id,
                            },
                        )
                    })
                    .collect::<Vec<_>>(),
            )
        });
        let mut out: Vec<Option<JobId>> = vec![None; jobs.len()];
        for written in futures::future::try_join_all(writes).await? {
            for (i, id) in written {
                out[i] = Some(id);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// One job by id.
    pub async fn job(&self, id: &JobId) -> Result<JobRecord> {
        let db = self.router.shard(&id.shard)?;
        store::job_get(&db.pool, &id.shard, id.id)
            .await
            .map_err(|e| db.error(e))?
            .ok_or_else(|| Error::JobNotFound(id.to_string()))
    }

    /// An account's most recent jobs, optionally of one state.
    pub async fn jobs_of(&self, account: &Account, state: Option<&str>, limit: i64) -> Result<Vec<JobRecord>> {
        let db = self.router.pool_for(account).await?;
        store::job_list_for_account(&db.pool, &db.name, account.as_str(), state, limit)
            .await
            .map_err(|e| db.error(e).into())
    }
}
