//! [`Client`]: every call an application makes about jobs: enqueue (one,
//! unique, in its own transaction, many), look up (`job`, `jobs_of`),
//! cancel and retry; pause and resume a queue on a shard. Routes through the router, writes through the store.

use std::borrow::Borrow;
use std::sync::Arc;

use shardq_router::router::fenced;
use shardq_router::Conn;
use shardq_router::{Account, Router};
use sqlx::PgConnection;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::job::{Enqueued, JobId, JobRecord, JobState, NewJob};
use crate::store::{self, JobChange, Notify, QueuePause, RetryChange};
use crate::wakeups::Wakeups;

/// How long an enqueue waits for a move that fenced its account off the old
/// shard to switch the placement.
const MOVE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reason recorded in a job's errors when it is cancelled through the client.
const CANCEL_REASON: &str = "cancelled on request";

/// Inserts a unique or serial job: `Ok(Ok((id, inserted)))`; the outer
/// error is the database's, the inner one a duplicate that kept vanishing.
async fn insert_keyed(
    conn: &mut Conn<'_>,
    account: &str,
    job: &NewJob,
    args: &str,
) -> sqlx::Result<Result<(i64, bool)>> {
    Ok(store::job_insert_keyed(conn, account, job, args)
        .await?
        .ok_or_else(|| Error::Unique {
            kind: job.kind.clone(),
            message: "an equal unique job kept finishing between the insert and its lookup; try again".into(),
        }))
}

/// Enqueues and inspects jobs. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    router: Arc<Router>,
    wakeups: Arc<Wakeups>,
}

impl Client {
    /// A client routing through `router`.
    pub fn new(router: Arc<Router>) -> Client {
        Client {
            router,
            wakeups: Arc::default(),
        }
    }

    /// The router this client uses.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Enqueues one job on the account's shard: one INSERT in its own
    /// transaction; the shard's trigger sends the queue's NOTIFY at commit.
    /// A shard the account has moved off refuses the insert in the database
    /// (its fence); the client then waits for the move's switch and inserts
    /// on the new shard, so a stale placement never leaves a job behind.
    /// For a unique job ([`NewJob::unique`]) that duplicates an existing
    /// one, nothing is inserted and the existing job's id is returned; use
    /// [`Client::enqueue_unique`] to learn which happened.
    pub async fn enqueue(&self, account: &Account, job: NewJob) -> Result<JobId> {
        if job.is_keyed() {
            return self.enqueue_unique(account, job).await.map(|e| e.id);
        }
        let args = job.validate()?;
        let span = tracing::debug_span!("enqueue", account = %account, queue = %job.queue, kind = %job.kind, shard = tracing::field::Empty);
        async {
            let deadline = tokio::time::Instant::now() + MOVE_WAIT;
            loop {
                let db = self.router.pool_for(account).await?;
                tracing::Span::current().record("shard", db.name.as_str());
                let mut conn = db.pool.acquire().await.map_err(|e| db.error(e))?;
                let mut conn = db.conn(&mut conn);
                match store::job_insert(&mut conn, account.as_str(), &job, args, Notify::Deferred).await {
                    Ok(id) => {
                        self.wakeups.wake(db, &[job.queue.as_str()]);
                        return Ok(JobId {
                            shard: db.name.clone(),
                            id,
                        });
                    }
                    Err(e) if fenced(&e).is_some() => self.router.await_move(account, &db.name, deadline).await?,
                    Err(e) => return Err(db.error(e).into()),
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Enqueues one job and tells whether it was inserted or duplicates an
    /// existing unique job ([`Enqueued::duplicate`], with that job's id).
    /// For a job that is not unique, `duplicate` is always false. The
    /// database decides (a unique index), so this holds across nodes and
    /// concurrent calls: exactly one of them inserts.
    pub async fn enqueue_unique(&self, account: &Account, job: NewJob) -> Result<Enqueued> {
        let args = job.validate()?;
        let span = tracing::debug_span!("enqueue", account = %account, queue = %job.queue, kind = %job.kind, shard = tracing::field::Empty);
        async {
            let deadline = tokio::time::Instant::now() + MOVE_WAIT;
            loop {
                let db = self.router.pool_for(account).await?;
                tracing::Span::current().record("shard", db.name.as_str());
                let mut conn = db.pool.acquire().await.map_err(|e| db.error(e))?;
                let mut conn = db.conn(&mut conn);
                match insert_keyed(&mut conn, account.as_str(), &job, args).await {
                    Ok(inserted) => {
                        let (id, inserted) = inserted?;
                        return Ok(Enqueued {
                            id: JobId {
                                shard: db.name.clone(),
                                id,
                            },
                            duplicate: !inserted,
                        });
                    }
                    Err(e) if fenced(&e).is_some() => self.router.await_move(account, &db.name, deadline).await?,
                    Err(e) => return Err(db.error(e).into()),
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Enqueues one job inside the application's own transaction, which must
    /// be open on the account's shard (best: `router.begin(account)`, the
    /// fenced transaction): the job exists if and only if that transaction
    /// commits. A shard the account has moved off refuses the insert (the
    /// error's SQLSTATE is `SQ001`); retry the whole transaction through
    /// `router.begin`, which waits for the move and opens it on the new shard. A unique job that
    /// duplicates one this transaction can see returns that job's id (under
    /// REPEATABLE READ or SERIALIZABLE, a duplicate committed after the
    /// transaction's snapshot cannot be read and is an [`Error::Unique`]).
    #[tracing::instrument(level = "debug", name = "enqueue_in", skip_all, fields(account = %account, queue = %job.queue, kind = %job.kind))]
    pub async fn enqueue_in(&self, tx: &mut PgConnection, account: &Account, job: NewJob) -> Result<JobId> {
        let args = job.validate()?;
        let db = self.router.pool_for(account).await?;
        let mut tx = db.conn(tx);
        let id = if job.is_keyed() {
            insert_keyed(&mut tx, account.as_str(), &job, args)
                .await
                .map_err(|e| db.error(e))??
                .0
        } else {
            store::job_insert(&mut tx, account.as_str(), &job, args, Notify::AtCommit)
                .await
                .map_err(|e| db.error(e))?
        };
        Ok(JobId {
            shard: db.name.clone(),
            id,
        })
    }

    /// Enqueues many jobs of one or many accounts: one round trip to the
    /// master for the accounts the router has not cached (placing new ones
    /// in one more), then one INSERT per shard involved (shards written
    /// concurrently). Ids come back in input order. Nothing is written, and
    /// no account placed, when any job is invalid.
    ///
    /// Unique and serial jobs among them are inserted one statement each,
    /// in input order, after the shard's batch (on the same connection, each
    /// committed on its own); a unique job that duplicates an existing job,
    /// or an earlier job of the same call, gets that job's id. When a shard
    /// refuses its batch because one of its accounts moved off it, that
    /// shard's jobs are enqueued one by one, each on its account's new shard.
    ///
    /// Accounts and jobs may be owned or lent (`(Account, NewJob)`,
    /// `(&Account, &NewJob)` or a mix): a batch is read, not kept, so jobs
    /// the application already holds need not be copied.
    #[tracing::instrument(level = "debug", name = "enqueue_many", skip_all, fields(jobs = tracing::field::Empty))]
    pub async fn enqueue_many<A, J>(&self, jobs: impl IntoIterator<Item = (A, J)>) -> Result<Vec<JobId>>
    where
        A: Borrow<Account>,
        J: Borrow<NewJob>,
    {
        let jobs: Vec<(A, J)> = jobs.into_iter().collect();
        tracing::Span::current().record("jobs", jobs.len());
        let args = jobs
            .iter()
            .map(|(_, job)| job.borrow().validate())
            .collect::<Result<Vec<&str>>>()?;
        let accounts: Vec<&Account> = jobs.iter().map(|(account, _)| account.borrow()).collect();
        let shards = self.router.shards_for(&accounts).await?;
        let (jobs, args) = (&jobs, &args);
        let writes = by_shard(&shards)
            .into_iter()
            .map(|(shard, rows)| self.enqueue_on(shard, rows, jobs, args));
        let mut out: Vec<Option<JobId>> = vec![None; jobs.len()];
        for written in futures::future::try_join_all(writes).await? {
            for (i, id) in written {
                out[i] = Some(id);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// The part of an [`Client::enqueue_many`] batch placed on `shard`: the
    /// jobs `rows` (indexes into `jobs` and their validated `args`), one
    /// statement for the plain ones and one each for unique and serial
    /// ones, on one connection; returns each row's index with its id.
    async fn enqueue_on<A, J>(
        &self,
        shard: &str,
        rows: Vec<usize>,
        jobs: &[(A, J)],
        args: &[&str],
    ) -> Result<Vec<(usize, JobId)>>
    where
        A: Borrow<Account>,
        J: Borrow<NewJob>,
    {
        let db = self.router.shard(shard)?;
        let job_id = |id| JobId {
            shard: db.name.clone(),
            id,
        };
        let input = |i: usize| (jobs[i].0.borrow().as_str(), jobs[i].1.borrow(), args[i]);
        let plain: Vec<(&str, &NewJob, &str)> = rows.iter().map(|&i| input(i)).filter(|r| !r.1.is_keyed()).collect();
        let mut pooled = db.pool.acquire().await.map_err(|e| db.error(e))?;
        let mut conn = db.conn(&mut pooled);
        let plain_ids = if plain.is_empty() {
            Ok(Vec::new())
        } else {
            store::job_insert_many(&mut conn, &plain).await
        };
        if plain_ids.is_ok() && !plain.is_empty() {
            let mut queues: Vec<&str> = Vec::new();
            for (_, job, _) in &plain {
                if queues.last() != Some(&job.queue.as_str()) {
                    queues.push(&job.queue);
                }
            }
            self.wakeups.wake(db, &queues);
        }
        let mut plain_ids = match plain_ids {
            Ok(ids) => ids.into_iter(),
            // An account of the batch moved off this shard: nothing of
            // the batch was written; each job goes on its own, rerouted.
            Err(e) if fenced(&e).is_some() => {
                drop(pooled);
                let mut out = Vec::with_capacity(rows.len());
                for i in rows {
                    let (account, job) = (jobs[i].0.borrow(), jobs[i].1.borrow());
                    out.push((i, self.enqueue(account, job.clone()).await?));
                }
                return Ok(out);
            }
            Err(e) => return Err(db.error(e).into()),
        };
        let mut out = Vec::with_capacity(rows.len());
        for i in rows {
            let (account, job, args) = input(i);
            if job.is_keyed() {
                match insert_keyed(&mut conn, account, job, args).await {
                    Ok(inserted) => out.push((i, job_id(inserted?.0))),
                    Err(e) if fenced(&e).is_some() => {
                        out.push((i, self.enqueue(jobs[i].0.borrow(), job.clone()).await?))
                    }
                    Err(e) => return Err(db.error(e).into()),
                }
            } else if let Some(id) = plain_ids.next() {
                out.push((i, job_id(id)));
            }
        }
        Ok(out)
    }

    /// One job by id.
    pub async fn job(&self, id: &JobId) -> Result<JobRecord> {
        let db = self.router.shard(&id.shard)?;
        store::job_get(db, &id.shard, id.id)
            .await
            .map_err(|e| db.error(e))?
            .ok_or_else(|| Error::JobNotFound(id.to_string()))
    }

    /// An account's most recent jobs, optionally of one state.
    /// An unknown state name is an [`Error::InvalidJob`] naming the field `state`.
    pub async fn jobs_of(&self, account: &Account, state: Option<&str>, limit: i64) -> Result<Vec<JobRecord>> {
        let state = state.map(str::parse::<JobState>).transpose()?;
        let db = self.router.pool_for(account).await?;
        store::job_list_for_account(db, &db.name, account.as_str(), state, limit)
            .await
            .map_err(|e| db.error(e).into())
    }

    /// Cancels a job. One that has not run yet (available, scheduled or
    /// waiting to retry) becomes `cancelled` and never runs. One that is
    /// running becomes `cancelled` at once and its handler is signalled
    /// ([`JobContext::cancelled`](crate::worker::JobContext::cancelled)); it stays
    /// `cancelled` even if the handler ignores the signal and succeeds.
    /// The reason is appended to the job's errors. Cancelling a cancelled job
    /// does nothing; a completed or discarded job is an [`Error::JobState`].
    /// Returns the job as it is afterwards.
    pub async fn cancel(&self, id: &JobId) -> Result<JobRecord> {
        let db = self.router().shard(&id.shard)?;
        let change = store::job_cancel(db, id.id, CANCEL_REASON)
            .await
            .map_err(|e| db.error(e))?;
        match change {
            JobChange::Changed { was } => {
                tracing::info!(job = %id, was = %was, "job cancelled");
            }
            JobChange::Unchanged { .. } => {}
            JobChange::NotFound => return Err(Error::JobNotFound(id.to_string())),
            JobChange::Refused { state } => {
                return Err(Error::JobState {
                    id: id.to_string(),
                    state: state.to_string(),
                    message: "only available (scheduled, retryable) or running jobs can be cancelled".into(),
                })
            }
        }
        self.job(id).await
    }

    /// Retries a discarded or cancelled job by hand: it becomes available
    /// now, keeping its errors, with one more attempt allowed when it had
    /// none left (`max_attempts` becomes at least `attempt + 1`; a job that
    /// still had attempts keeps its `max_attempts`). Any other state is an
    /// [`Error::JobState`] and nothing changes. Returns the job as the retry
    /// left it (available), read in the same statement, before any node
    /// could claim it.
    ///
    /// A unique job gets its unique key back, so while it is available or
    /// running a duplicate enqueue returns it, as before it finished. If
    /// another job holds that key by then (one enqueued after this job
    /// released it), the retry is refused with [`Error::UniqueConflict`]
    /// naming that job, and nothing changes: the database's unique index
    /// decides, so a retry racing an enqueue or another retry of the same
    /// key never leaves two jobs holding it.
    pub async fn retry(&self, id: &JobId) -> Result<JobRecord> {
        let db = self.router().shard(&id.shard)?;
        let change = store::job_retry(db, &id.shard, id.id).await.map_err(|e| db.error(e))?;
        match change {
            RetryChange::Retried { was, job } => {
                tracing::info!(job = %id, was = %was, "job retried by hand");
                Ok(*job)
            }
            RetryChange::NotFound => Err(Error::JobNotFound(id.to_string())),
            RetryChange::Refused { state } => Err(Error::JobState {
                id: id.to_string(),
                state: state.to_string(),
                message: "only discarded or cancelled jobs can be retried".into(),
            }),
            RetryChange::KeyHeld {
                state,
                holder: Some(holder),
            } => Err(Error::UniqueConflict {
                id: id.clone(),
                state: state.to_string(),
                holder: JobId {
                    shard: id.shard.clone(),
                    id: holder,
                },
            }),
            RetryChange::KeyHeld { state, holder: None } => Err(Error::JobState {
                id: id.to_string(),
                state: state.to_string(),
                message: "its unique key was taken on every try by jobs that finished before they could be read; \
                              try again"
                    .into(),
            }),
        }
    }

    /// Pauses `queue` on `shard`: from the next claim on, no node claims
    /// its jobs there (jobs already running finish; enqueue, cancel and
    /// retry go on). The same queue on other shards keeps running. `by`
    /// is recorded as who paused it. Returns false when it was paused
    /// already. An unknown shard or a queue name that is empty or longer
    /// than 128 bytes is an error, and nothing changes.
    pub async fn pause_queue(&self, shard: &str, queue: &str, by: &str) -> Result<bool> {
        let db = self.router.shard(shard)?;
        check_queue(shard, queue)?;
        let paused = store::queue_pause(db, queue, by).await.map_err(|e| db.error(e))?;
        if paused {
            tracing::info!(shard, queue, by, "queue paused");
        }
        Ok(paused)
    }

    /// Resumes `queue` on `shard` and wakes its producers. Returns false
    /// when it was not paused.
    pub async fn resume_queue(&self, shard: &str, queue: &str) -> Result<bool> {
        let db = self.router.shard(shard)?;
        check_queue(shard, queue)?;
        let resumed = store::queue_resume(db, queue).await.map_err(|e| db.error(e))?;
        if resumed {
            tracing::info!(shard, queue, "queue resumed");
        }
        Ok(resumed)
    }

    /// The queues paused on `shard`, by name.
    pub async fn paused_queues(&self, shard: &str) -> Result<Vec<QueuePause>> {
        let db = self.router.shard(shard)?;
        store::queue_pauses(db).await.map_err(|e| db.error(e).into())
    }
}

impl Client {
    /// Sets the fair-share weight of `account` (1 to 10,000; `None`: back
    /// to the default, 1), on its shard: while its jobs and others' are
    /// due in a queue, it gets `weight` times the slots of a weight-1
    /// account. Takes effect from the next claim on every node. Refused
    /// while the account is moving (a move carries the weight it had when
    /// it started); set it again after the move.
    pub async fn set_account_weight(&self, account: &Account, weight: Option<u32>) -> Result<()> {
        let db = self.router.pool_for(account).await?;
        let w = match weight {
            None => None,
            Some(w @ 1..=10_000) => Some(w as i32),
            Some(w) => {
                return Err(Error::AccountSetting {
                    account: account.to_string(),
                    shard: db.name.clone(),
                    message: format!("a weight is 1 to 10000, got {w}"),
                })
            }
        };
        if !store::account_weight_set(db, account.as_str(), w)
            .await
            .map_err(|e| db.error(e))?
        {
            return Err(Error::AccountSetting {
                account: account.to_string(),
                shard: db.name.clone(),
                message: "the account is moving or has moved off this shard; set its weight after the move".into(),
            });
        }
        tracing::info!(account = %account, shard = %db.name, weight = ?w, "account weight set");
        Ok(())
    }

    /// The fair-share weight of `account` (1 when none was set).
    pub async fn account_weight(&self, account: &Account) -> Result<u32> {
        let db = self.router.pool_for(account).await?;
        let w = store::account_weight_of(db, account.as_str())
            .await
            .map_err(|e| db.error(e))?;
        Ok(w.map_or(1, |w| w.max(1) as u32))
    }
}

impl Client {
    /// Sets the concurrency limit of `account` in `queue` (1 to 10,000;
    /// `None`: no limit), on its shard: at most `limit` of its jobs in
    /// the queue run at once across every node (a job claimed into a
    /// node's buffer counts as running). Takes effect from the next claim
    /// on every node; runs already holding slots above a lowered limit
    /// finish first. Refused while the account is moving (a move carries
    /// the limits it had when it started); set it again after the move.
    pub async fn set_account_limit(&self, account: &Account, queue: &str, limit: Option<u32>) -> Result<()> {
        let db = self.router.pool_for(account).await?;
        check_queue(&db.name, queue)?;
        let n = match limit {
            None => None,
            Some(n @ 1..=10_000) => Some(n as i32),
            Some(n) => {
                return Err(Error::AccountSetting {
                    account: account.to_string(),
                    shard: db.name.clone(),
                    message: format!("a concurrency limit in queue {queue:?} is 1 to 10000, got {n}"),
                })
            }
        };
        if !store::account_limit_set(db, account.as_str(), queue, n)
            .await
            .map_err(|e| db.error(e))?
        {
            return Err(Error::AccountSetting {
                account: account.to_string(),
                shard: db.name.clone(),
                message: "the account is moving or has moved off this shard; set its limits after the move".into(),
            });
        }
        tracing::info!(account = %account, shard = %db.name, queue, limit = ?n, "account concurrency limit set");
        Ok(())
    }

    /// The concurrency limits of `account`, by queue (queues without one
    /// are absent).
    pub async fn account_limits(&self, account: &Account) -> Result<std::collections::BTreeMap<String, u32>> {
        let db = self.router.pool_for(account).await?;
        let rows = store::account_limits_of(db, account.as_str())
            .await
            .map_err(|e| db.error(e))?;
        Ok(rows.into_iter().map(|(q, n)| (q, n.max(1) as u32)).collect())
    }

    /// The concurrency limit of `account` in `queue`, if it has one.
    pub async fn account_limit(&self, account: &Account, queue: &str) -> Result<Option<u32>> {
        Ok(self.account_limits(account).await?.remove(queue))
    }

    /// How many runs of `account` in `queue` hold one of its limit's slots
    /// now (claimed and not yet ended on their node), across every node.
    pub async fn account_limit_held(&self, account: &Account, queue: &str) -> Result<u64> {
        let db = self.router.pool_for(account).await?;
        let n = store::account_limit_held(db, account.as_str(), queue)
            .await
            .map_err(|e| db.error(e))?;
        Ok(n.max(0) as u64)
    }
}

impl Client {
    /// Declares named resource `name` in the master, or changes its limits:
    /// at most `concurrency` running jobs that name it
    /// ([`NewJob::resources`](crate::NewJob::resources)) across every node
    /// and shard; `rate` starts per second with `burst` are stored with it.
    /// `None` leaves that kind unlimited. Nodes see a change at their next
    /// lease round (a heartbeat).
    pub async fn set_resource(
        &self,
        name: &str,
        concurrency: Option<u32>,
        rate: Option<f64>,
        burst: Option<u32>,
    ) -> Result<()> {
        let bad = |message: String| Error::Resource {
            name: name.to_string(),
            message,
        };
        if !crate::job::resource_name_ok(name) {
            return Err(bad("a resource name is 1 to 64 letters, digits, '_', '.' or '-'".into()));
        }
        if let Some(c) = concurrency.filter(|c| !(1..=1_000_000).contains(c)) {
            return Err(bad(format!("concurrency is 1 to 1000000, got {c}")));
        }
        if let Some(r) = rate.filter(|r| !(r.is_finite() && *r > 0.0 && *r <= 1_000_000.0)) {
            return Err(bad(format!("rate is above 0 and at most 1000000 per second, got {r}")));
        }
        if let Some(b) = burst.filter(|b| !(1..=1_000_000).contains(b)) {
            return Err(bad(format!("burst is 1 to 1000000, got {b}")));
        }
        let master = self.router.master();
        store::resource_put(
            master,
            name,
            concurrency.map(|c| c as i32),
            rate,
            burst.map(|b| b as i32),
        )
        .await
        .map_err(|e| master.error(e))?;
        tracing::info!(resource = name, ?concurrency, ?rate, ?burst, "resource declared");
        Ok(())
    }

    /// Removes resource `name` and its leases; whether it was declared.
    /// Jobs that name it wait until it is declared again.
    pub async fn remove_resource(&self, name: &str) -> Result<bool> {
        let master = self.router.master();
        Ok(store::resource_delete(master, name)
            .await
            .map_err(|e| master.error(e))?)
    }

    /// Every declared resource with the permits nodes hold leased now.
    pub async fn resources(&self) -> Result<Vec<crate::Resource>> {
        let master = self.router.master();
        Ok(store::resources_list(master).await.map_err(|e| master.error(e))?)
    }
}

/// A queue name as the jobs table accepts it: 1 to 128 bytes.
/// The rows of a batch grouped by shard (`shards[i]` is row `i`'s), each
/// group's rows in input order; groups in order of first appearance.
fn by_shard(shards: &[Arc<str>]) -> Vec<(&str, Vec<usize>)> {
    let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
    let mut last = 0;
    for (i, shard) in shards.iter().enumerate() {
        let shard: &str = shard;
        if groups.get(last).is_none_or(|g| g.0 != shard) {
            last = match groups.iter().position(|g| g.0 == shard) {
                Some(at) => at,
                None => {
                    groups.push((shard, Vec::new()));
                    groups.len() - 1
                }
            };
        }
        groups[last].1.push(i);
    }
    groups
}

fn check_queue(shard: &str, queue: &str) -> Result<()> {
    if queue.is_empty() || queue.len() > 128 {
        return Err(Error::InvalidQueue {
            shard: shard.to_string(),
            queue: queue.to_string(),
            message: format!("a queue name is 1 to 128 bytes, got {}", queue.len()),
        });
    }
    Ok(())
}
