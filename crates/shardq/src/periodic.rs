//! Periodic jobs: [`PeriodicJob`] enqueues a job at every occurrence of a
//! cron expression in a time zone, declared on the node
//! (`RuntimeBuilder::periodic`; the node's scheduler stage runs them).
//!
//! Exactly once across nodes: every node runs the same schedule, and an
//! occurrence is recorded in the target shard's `shardq.periodic_runs`
//! (primary key `(name, occurrence)`) in the same transaction as its job's
//! insert, so however many nodes try, one records it and enqueues its job;
//! the others find it recorded and do nothing. A per-shard job
//! ([`PeriodicJob::per_shard`]) is recorded and enqueued on every shard, for
//! a reserved account (default [`SYSTEM_ACCOUNT`]); a global one
//! ([`PeriodicJob::global`]) once, on the shard of the account given, which
//! keeps the record and the job in one transaction (no master round trip).
//!
//! Nothing missed across a restart: a starting node enqueues the occurrences
//! of the last [`PeriodicJob::catch_up`] window (default 1 h) that no node
//! recorded. Records older than the window are pruned. [`PeriodicJob::jitter`]
//! delays each job's `run_at` by a random offset, so many schedules firing on
//! the same minute do not start at once. [`Overlap`] chooses what an
//! occurrence does while the previous run of the job is not done.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
pub use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::Cron;
use rand::Rng;
use shardq_router::router::Database;
use shardq_router::{Account, Router};

use crate::error::{Error, Result};
use crate::job::{JobId, NewJob};
use crate::store;
use crate::unique::UniqueOpts;

/// The account per-shard periodic jobs belong to unless another is given.
pub const SYSTEM_ACCOUNT: &str = "_shardq";

/// Most occurrences of one job enqueued by one pass (the newest are kept):
/// bounds the catch-up of a per-second schedule after a long stop.
pub const MAX_OCCURRENCES_PER_PASS: usize = 1_000;

/// What an occurrence does while the previous run of the job has not
/// finished (is `available`, scheduled, retrying or `running`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overlap {
    /// Skip the occurrence: it is recorded (so no node enqueues it later)
    /// without a job. Implemented as a unique job keyed by the periodic
    /// job's name among incomplete states, so it holds across nodes.
    Skip,
    /// Enqueue it anyway; it runs when a slot is free. The default.
    #[default]
    Queue,
}

/// Where a periodic job's occurrences are enqueued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// One job per occurrence on every shard, for this account name (not
    /// placed in the master; it names the jobs on each shard).
    PerShard(String),
    /// One job per occurrence, on this account's shard.
    Global(Account),
}

/// A job enqueued at every occurrence of a cron expression.
#[derive(Debug, Clone)]
pub struct PeriodicJob {
    name: String,
    expression: String,
    cron: Cron,
    tz: Tz,
    job: NewJob,
    scope: Scope,
    overlap: Overlap,
    jitter: Duration,
    catch_up: Duration,
}

/// One occurrence a call of [`PeriodicJob::enqueue_due`] recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Occurrence {
    /// The shard it was recorded on.
    pub shard: String,
    /// The occurrence (the cron time, before jitter).
    pub at: DateTime<Utc>,
    /// The job enqueued; `None` when it was skipped ([`Overlap::Skip`]).
    pub job: Option<JobId>,
}

impl PeriodicJob {
    /// A periodic job called `name` (its identity in `periodic_runs`: keep
    /// it stable) enqueueing `job` at every occurrence of `expression` in
    /// time zone `tz`. The expression has five fields (minute to weekday) or
    /// six with seconds first (`*/10 * * * * *`). Per shard by default.
    pub fn new(name: impl Into<String>, expression: &str, tz: Tz, job: NewJob) -> Result<PeriodicJob> {
        let name = name.into();
        let bad = |message: String| Error::Periodic {
            name: name.clone(),
            message,
        };
        if name.is_empty() || name.len() > 128 || name.contains('\0') {
            return Err(bad(format!(
                "name must be 1 to 128 bytes without NUL, got {} bytes",
                name.len()
            )));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(expression)
            .map_err(|e| bad(format!("cron expression {expression:?}: {e}")))?;
        job.validate().map_err(|e| bad(e.to_string()))?;
        Ok(PeriodicJob {
            name,
            expression: expression.to_string(),
            cron,
            tz,
            job,
            scope: Scope::PerShard(SYSTEM_ACCOUNT.to_string()),
            overlap: Overlap::default(),
            jitter: Duration::ZERO,
            catch_up: Duration::from_secs(3600),
        })
    }

    /// Parses a time zone name such as `Europe/Paris` or `UTC`.
    pub fn tz(name: &str) -> Result<Tz> {
        Tz::from_str(name).map_err(|e| Error::Periodic {
            name: String::new(),
            message: format!("time zone {name:?}: {e}"),
        })
    }

    /// One job per occurrence on every shard, for account [`SYSTEM_ACCOUNT`].
    pub fn per_shard(self) -> Self {
        self.per_shard_as(SYSTEM_ACCOUNT)
    }

    /// One job per occurrence on every shard, for the account name `account`.
    pub fn per_shard_as(mut self, account: impl Into<String>) -> Self {
        self.scope = Scope::PerShard(account.into());
        self
    }

    /// One job per occurrence, on `account`'s shard.
    pub fn global(mut self, account: Account) -> Self {
        self.scope = Scope::Global(account);
        self
    }

    /// What an occurrence does while the previous run is not done.
    pub fn overlap(mut self, overlap: Overlap) -> Self {
        self.overlap = overlap;
        self
    }

    /// Delays each job by a random offset in `[0, jitter)` past its occurrence.
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// How far back a starting node looks for occurrences no node recorded
    /// (default 1 h). Records are kept this long.
    pub fn catch_up(mut self, window: Duration) -> Self {
        self.catch_up = window;
        self
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its cron expression.
    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// Its catch-up window.
    pub fn catch_up_window(&self) -> Duration {
        self.catch_up
    }

    /// Occurrences in `(after, up_to]`, oldest first, at most
    /// [`MAX_OCCURRENCES_PER_PASS`] (the newest).
    pub fn occurrences(&self, after: DateTime<Utc>, up_to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let mut out = std::collections::VecDeque::new();
        for at in self.cron.iter_after(after.with_timezone(&self.tz)) {
            let at = at.with_timezone(&Utc);
            if at > up_to {
                break;
            }
            if out.len() == MAX_OCCURRENCES_PER_PASS {
                out.pop_front();
            }
            out.push_back(at);
        }
        out.into()
    }

    /// The first occurrence after `after`.
    pub(crate) fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&after.with_timezone(&self.tz), false)
            .ok()
            .map(|at| at.with_timezone(&Utc))
    }

    /// Enqueues the occurrences in `(after, up_to]` that no node recorded
    /// yet, on every shard (per shard) or the account's shard (global), and
    /// returns those this call recorded. What a node's scheduler calls on
    /// every pass; public so the schedule can be driven with explicit times.
    pub async fn enqueue_due(
        &self,
        router: &Router,
        after: DateTime<Utc>,
        up_to: DateTime<Utc>,
    ) -> Result<Vec<Occurrence>> {
        let due = self.occurrences(after, up_to);
        if due.is_empty() {
            return Ok(Vec::new());
        }
        match &self.scope {
            Scope::PerShard(account) => {
                let writes = router.shards().iter().map(|db| self.enqueue_on(db, account, &due));
                let mut out = Vec::new();
                for written in futures::future::join_all(writes).await {
                    out.extend(written?);
                }
                Ok(out)
            }
            Scope::Global(account) => {
                let db = router.pool_for(account).await?;
                self.enqueue_on(db, account.as_str(), &due).await
            }
        }
    }

    /// Records `due` on one shard and enqueues a job for each occurrence
    /// this call recorded, in one transaction.
    async fn enqueue_on(&self, db: &Database, account: &str, due: &[DateTime<Utc>]) -> Result<Vec<Occurrence>> {
        let mut job = self.job.clone();
        if self.overlap == Overlap::Skip {
            job.unique = Some(UniqueOpts::new().key(format!("periodic:{}", self.name)));
        }
        let args = job.validate()?;
        let mut tx = db.pool.begin().await.map_err(|e| db.error(e))?;
        let recorded = store::periodic_runs_record(&mut tx, &self.name, due)
            .await
            .map_err(|e| db.error(e))?;
        let mut out = Vec::with_capacity(recorded.len());
        for at in recorded {
            let offset = if self.jitter.is_zero() {
                Duration::ZERO
            } else {
                self.jitter.mul_f64(rand::rng().random_range(0.0..1.0))
            };
            job.run_at = Some(at + chrono::Duration::from_std(offset).unwrap_or_default());
            let id = if job.is_keyed() {
                store::job_insert_keyed(&mut tx, account, &job, &args)
                    .await
                    .map_err(|e| db.error(e))?
                    .and_then(|(id, inserted)| inserted.then_some(id))
            } else {
                Some(
                    store::job_insert(&mut tx, account, &job, &args)
                        .await
                        .map_err(|e| db.error(e))?,
                )
            };
            if let Some(id) = id {
                store::periodic_run_set_job(&mut tx, &self.name, at, id)
                    .await
                    .map_err(|e| db.error(e))?;
            }
            out.push(Occurrence {
                shard: db.name.clone(),
                at,
                job: id.map(|id| JobId {
                    shard: db.name.clone(),
                    id,
                }),
            });
        }
        tx.commit().await.map_err(|e| db.error(e))?;
        Ok(out)
    }

    /// Forgets this job's records older than its catch-up window, on the
    /// shards it writes to.
    pub(crate) async fn prune(&self, router: &Router, now: DateTime<Utc>) {
        let before = now - chrono::Duration::from_std(self.catch_up * 2).unwrap_or_default();
        let dbs: Vec<&Database> = match &self.scope {
            Scope::PerShard(_) => router.shards().iter().collect(),
            Scope::Global(account) => match router.pool_for(account).await {
                Ok(db) => vec![db],
                Err(_) => return,
            },
        };
        for db in dbs {
            if let Err(e) = store::periodic_runs_prune(&db.pool, &self.name, before).await {
                tracing::debug!(periodic = %self.name, error = %db.error(e), "pruning periodic records failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> NewJob {
        NewJob::from_json("k", serde_json::json!({}))
    }

    #[test]
    fn occurrences_follow_the_time_zone() {
        let paris = PeriodicJob::tz("Europe/Paris").unwrap_or(Tz::UTC);
        let p = PeriodicJob::new("nightly", "0 3 * * *", paris, job()).unwrap_or_else(|e| panic!("{e}"));
        let from: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap_or_default();
        let to: DateTime<Utc> = "2026-01-03T00:00:00Z".parse().unwrap_or_default();
        let got: Vec<String> = p.occurrences(from, to).iter().map(|t| t.to_rfc3339()).collect();
        // 03:00 in Paris is 02:00 UTC in winter.
        assert_eq!(got, ["2026-01-01T02:00:00+00:00", "2026-01-02T02:00:00+00:00"]);
    }

    #[test]
    fn seconds_are_optional_and_bad_input_names_the_job() {
        let every_second = PeriodicJob::new("s", "* * * * * *", Tz::UTC, job()).unwrap_or_else(|e| panic!("{e}"));
        let from: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap_or_default();
        assert_eq!(
            every_second
                .occurrences(from, from + chrono::Duration::seconds(3))
                .len(),
            3
        );
        let err = PeriodicJob::new("bad", "61 * * * *", Tz::UTC, job())
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad") && err.contains("61 * * * *"), "{err}");
        assert!(PeriodicJob::tz("Mars/Olympus").is_err());
    }
}
