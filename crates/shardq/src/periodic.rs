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
//! recorded. [`PeriodicJob::jitter`] delays each job's `run_at` by a random
//! offset, so many schedules firing on the same minute do not start at once.
//! [`Overlap`] chooses what an occurrence does while the previous run of the
//! job is not done.
//!
//! One sick shard never slows the healthy ones: a node keeps its place in a
//! job's schedule per [`Target`] (each shard of a per-shard job; the one
//! target of a global job) in a [`Progress`]. Every write to one target is
//! bounded by [`PeriodicJob::write_timeout`] (default 10 s) and moves only
//! that target's cursor, so a shard that is down or hangs keeps its cursor
//! where it was and is retried on the next pass while the others go on. A
//! returning shard gets at most the occurrences of the catch-up window (and
//! at most [`MAX_OCCURRENCES_PER_PASS`]), like a starting node. Records
//! older than twice the window are pruned, never one a pass can still look
//! at (passes look back one window at most).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
pub use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::{Cron, Direction};
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
    write_timeout: Duration,
}

/// One occurrence a write ([`PeriodicJob::pass`], [`PeriodicJob::enqueue_due`]) recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Occurrence {
    /// The shard it was recorded on.
    pub shard: String,
    /// The occurrence (the cron time, before jitter).
    pub at: DateTime<Utc>,
    /// The job enqueued; `None` when it was skipped ([`Overlap::Skip`]).
    pub job: Option<JobId>,
}

/// Where one write of a periodic job goes: what a [`Progress`] keeps a
/// cursor for, and what a failed write names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// One shard of a per-shard job, by name.
    Shard(String),
    /// The one target of a global job: the shard this account lives on,
    /// looked up at every write (so it follows a move).
    Account(Account),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Shard(name) => write!(f, "shard {name}"),
            Target::Account(account) => write!(f, "the shard of account {account}"),
        }
    }
}

/// What one write of a [`PeriodicJob::pass`] or [`PeriodicJob::prune`] did
/// on one target.
#[derive(Debug)]
pub struct TargetOutcome<T> {
    /// The target written to.
    pub target: Target,
    /// What the write returned: the occurrences recorded (a pass) or the
    /// records deleted (a prune), or why it failed or timed out.
    pub result: Result<T>,
}

/// A node's place in one periodic job's schedule: per [`Target`], the time
/// up to which every occurrence is handled there (recorded by this node or
/// found recorded). Made by [`PeriodicJob::progress`], moved by
/// [`PeriodicJob::pass`] (or [`Progress::advance`]); a target whose write
/// fails keeps its cursor, the others move on.
#[derive(Debug, Clone)]
pub struct Progress {
    /// The job's catch-up window: no pass looks further back.
    window: chrono::Duration,
    /// The cursor of a target not written yet: the start minus the window.
    origin: DateTime<Utc>,
    /// Cursors of the targets written at least once.
    cursors: BTreeMap<Target, DateTime<Utc>>,
}

impl Progress {
    /// Every occurrence of the job up to this time is handled on `target`.
    pub fn cursor(&self, target: &Target) -> DateTime<Utc> {
        self.cursors.get(target).copied().unwrap_or(self.origin)
    }

    /// Where a pass at `now` starts on `target` (it covers `(after, now]`):
    /// the target's cursor, but never more than the catch-up window back, so
    /// a shard that returns after a long outage gets the window's
    /// occurrences only, as a starting node would.
    pub fn after(&self, target: &Target, now: DateTime<Utc>) -> DateTime<Utc> {
        self.cursor(target).max(earlier(now, self.window))
    }

    /// Marks every occurrence up to `to` as handled on `target` (a cursor
    /// never moves back).
    pub fn advance(&mut self, target: &Target, to: DateTime<Utc>) {
        let cursor = self.cursor(target).max(to);
        self.cursors.insert(target.clone(), cursor);
    }

    /// The records of `target` a prune at `now` may delete: those before
    /// twice the window back, and never one at or after where this node's
    /// next pass starts ([`Progress::after`]), which it still needs to tell
    /// handled occurrences from missed ones.
    pub fn prune_before(&self, target: &Target, now: DateTime<Utc>) -> DateTime<Utc> {
        earlier(earlier(now, self.window), self.window).min(self.after(target, now))
    }
}

/// `t - d`, or the earliest time there is when that is out of range.
fn earlier(t: DateTime<Utc>, d: chrono::Duration) -> DateTime<Utc> {
    t.checked_sub_signed(d).unwrap_or(DateTime::<Utc>::MIN_UTC)
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
            write_timeout: Duration::from_secs(10),
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

    /// How far back a starting node, or a shard coming back, looks for
    /// occurrences no node recorded (default 1 h). Records are kept twice
    /// this long.
    pub fn catch_up(mut self, window: Duration) -> Self {
        self.catch_up = window;
        self
    }

    /// How long one write of occurrences to one shard may take, connecting
    /// included (default 10 s). A write that takes longer is abandoned (its
    /// transaction rolls back) and counts as failed: that shard is retried
    /// on the next pass, and no other shard waits for it.
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
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

    /// The catch-up window as a signed duration (an unrepresentable one is
    /// the longest there is).
    fn window(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.catch_up).unwrap_or(chrono::Duration::MAX)
    }

    /// Occurrences in `(after, up_to]`, oldest first, at most
    /// [`MAX_OCCURRENCES_PER_PASS`] (the newest). Walks back from `up_to`,
    /// so the cost is bounded by that cap however long the range.
    pub fn occurrences(&self, after: DateTime<Utc>, up_to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        for at in self.cron.iter_from(up_to.with_timezone(&self.tz), Direction::Backward) {
            let at = at.with_timezone(&Utc);
            if at <= after || out.len() == MAX_OCCURRENCES_PER_PASS {
                break;
            }
            out.push(at);
        }
        out.reverse();
        out
    }

    /// The first occurrence after `after`.
    pub(crate) fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&after.with_timezone(&self.tz), false)
            .ok()
            .map(|at| at.with_timezone(&Utc))
    }

    /// The targets it writes to: every shard of `router` (per shard), or
    /// the account's shard (global).
    pub fn targets(&self, router: &Router) -> Vec<Target> {
        match &self.scope {
            Scope::PerShard(_) => router
                .shards()
                .iter()
                .map(|db| Target::Shard(db.name.clone()))
                .collect(),
            Scope::Global(account) => vec![Target::Account(account.clone())],
        }
    }

    /// A fresh place in its schedule for a node starting at `start`: every
    /// target begins one catch-up window back.
    pub fn progress(&self, start: DateTime<Utc>) -> Progress {
        let window = self.window();
        Progress {
            window,
            origin: earlier(start, window),
            cursors: BTreeMap::new(),
        }
    }

    /// One pass at `now`: writes the due occurrences to every target at
    /// once, each from where `progress` says it is ([`Progress::after`])
    /// and bounded by [`PeriodicJob::write_timeout`], and advances the
    /// cursor of each target that succeeded. A target that fails keeps its
    /// cursor, so the next pass retries it; the others never wait for it
    /// longer than the timeout. What a node's scheduler does on every pass
    /// (without even that wait); public so the schedule can be driven with
    /// explicit times.
    pub async fn pass(
        &self,
        router: &Router,
        progress: &mut Progress,
        now: DateTime<Utc>,
    ) -> Vec<TargetOutcome<Vec<Occurrence>>> {
        let writes = self.targets(router).into_iter().map(|target| {
            let after = progress.after(&target, now);
            async move {
                let result = self.enqueue_due_on(router, &target, after, now).await;
                TargetOutcome { target, result }
            }
        });
        let outcomes = futures::future::join_all(writes).await;
        for outcome in &outcomes {
            if outcome.result.is_ok() {
                progress.advance(&outcome.target, now);
            }
        }
        outcomes
    }

    /// Enqueues the occurrences in `(after, up_to]` that no node recorded
    /// yet, on every target at once, and returns those this call recorded;
    /// or, when a target fails, the first failure once every target was
    /// tried (the targets that succeeded keep what they recorded: to retry
    /// only the failed ones, use [`PeriodicJob::pass`] with a [`Progress`]).
    pub async fn enqueue_due(
        &self,
        router: &Router,
        after: DateTime<Utc>,
        up_to: DateTime<Utc>,
    ) -> Result<Vec<Occurrence>> {
        let targets = self.targets(router);
        let writes = targets
            .iter()
            .map(|target| self.enqueue_due_on(router, target, after, up_to));
        let mut out = Vec::new();
        for written in futures::future::join_all(writes).await {
            out.extend(written?);
        }
        Ok(out)
    }

    /// Enqueues on one target the occurrences in `(after, up_to]` that no
    /// node recorded yet, and returns those this call recorded. Bounded by
    /// [`PeriodicJob::write_timeout`]; the error names the job and the
    /// target.
    pub async fn enqueue_due_on(
        &self,
        router: &Router,
        target: &Target,
        after: DateTime<Utc>,
        up_to: DateTime<Utc>,
    ) -> Result<Vec<Occurrence>> {
        let due = self.occurrences(after, up_to);
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let write = async {
            let (db, account) = self.resolve(router, target).await?;
            self.enqueue_on(db, account, &due).await
        };
        match tokio::time::timeout(self.write_timeout, write).await {
            Ok(written) => written,
            Err(_) => Err(self.timed_out(target, &format!("writing {} occurrences", due.len()))),
        }
    }

    /// The database and the account name of one of its targets.
    async fn resolve<'r>(&'r self, router: &'r Router, target: &Target) -> Result<(&'r Database, &'r str)> {
        match (&self.scope, target) {
            (Scope::PerShard(account), Target::Shard(name)) => Ok((router.shard(name)?, account.as_str())),
            (Scope::Global(account), Target::Account(a)) if a == account => {
                Ok((router.pool_for(account).await?, account.as_str()))
            }
            _ => Err(Error::Periodic {
                name: self.name.clone(),
                message: format!("{target} is not one of its targets"),
            }),
        }
    }

    /// The error of a write to `target` that took longer than the timeout.
    fn timed_out(&self, target: &Target, what: &str) -> Error {
        Error::Periodic {
            name: self.name.clone(),
            message: format!(
                "{what} on {target} timed out after {:?} (write_timeout)",
                self.write_timeout
            ),
        }
    }

    /// Records `due` on one shard and enqueues a job for each occurrence
    /// this call recorded, in one transaction.
    async fn enqueue_on(&self, db: &Database, account: &str, due: &[DateTime<Utc>]) -> Result<Vec<Occurrence>> {
        let mut job = self.job.clone();
        if self.overlap == Overlap::Skip {
            job.unique = Some(UniqueOpts::new().key(format!("periodic:{}", self.name)));
        }
        let args = job.validate()?.to_string();
        let mut tx = db.begin().await.map_err(|e| db.error(e))?;
        let recorded = store::periodic_runs_record(&mut tx.conn(), &self.name, due)
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
                store::job_insert_keyed(&mut tx.conn(), account, &job, &args)
                    .await
                    .map_err(|e| db.error(e))?
                    .and_then(|(id, inserted)| inserted.then_some(id))
            } else {
                Some(
                    store::job_insert(&mut tx.conn(), account, &job, &args, store::Notify::AtCommit)
                        .await
                        .map_err(|e| db.error(e))?,
                )
            };
            if let Some(id) = id {
                store::periodic_run_set_job(&mut tx.conn(), &self.name, at, id)
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

    /// Forgets, on every target at once, the records `progress` no longer
    /// needs at `now` ([`Progress::prune_before`]); each target bounded by
    /// [`PeriodicJob::write_timeout`]. Returns how many records each target
    /// deleted.
    pub async fn prune(&self, router: &Router, progress: &Progress, now: DateTime<Utc>) -> Vec<TargetOutcome<u64>> {
        let prunes = self.targets(router).into_iter().map(|target| {
            let before = progress.prune_before(&target, now);
            async move {
                let result = self.prune_on(router, &target, before).await;
                TargetOutcome { target, result }
            }
        });
        futures::future::join_all(prunes).await
    }

    /// Forgets this job's records before `before` on one target, bounded by
    /// [`PeriodicJob::write_timeout`]; returns how many it deleted.
    pub async fn prune_on(&self, router: &Router, target: &Target, before: DateTime<Utc>) -> Result<u64> {
        let prune = async {
            let (db, _) = self.resolve(router, target).await?;
            store::periodic_runs_prune(db, &self.name, before)
                .await
                .map_err(|e| Error::from(db.error(e)))
        };
        match tokio::time::timeout(self.write_timeout, prune).await {
            Ok(pruned) => pruned,
            Err(_) => Err(self.timed_out(target, "pruning records")),
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

    #[test]
    fn progress_is_kept_per_target_and_looks_back_one_window_at_most() {
        let p = PeriodicJob::new("p", "*/5 * * * *", Tz::UTC, job())
            .unwrap_or_else(|e| panic!("{e}"))
            .catch_up(Duration::from_secs(15 * 60));
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap_or_default();
        let (a, b) = (Target::Shard("a".into()), Target::Shard("b".into()));
        let mut progress = p.progress(t("2026-01-01T10:00:00Z"));
        assert_eq!(progress.cursor(&a), t("2026-01-01T09:45:00Z"));
        progress.advance(&a, t("2026-01-01T11:00:00Z"));
        progress.advance(&a, t("2026-01-01T10:30:00Z"));
        assert_eq!(
            progress.cursor(&a),
            t("2026-01-01T11:00:00Z"),
            "a cursor never moves back"
        );
        assert_eq!(progress.cursor(&b), t("2026-01-01T09:45:00Z"), "b kept its own cursor");
        let now = t("2026-01-01T11:01:00Z");
        assert_eq!(progress.after(&a, now), t("2026-01-01T11:00:00Z"));
        assert_eq!(
            progress.after(&b, now),
            t("2026-01-01T10:46:00Z"),
            "one window back at most"
        );
        for target in [&a, &b] {
            let before = progress.prune_before(target, now);
            assert_eq!(before, t("2026-01-01T10:31:00Z"));
            assert!(
                before <= progress.after(target, now),
                "never prunes what a pass looks at"
            );
        }
        // A window too long to represent neither panics nor overflows.
        let long = p.clone().catch_up(Duration::MAX).progress(now);
        assert_eq!(long.after(&a, now), DateTime::<Utc>::MIN_UTC);
        assert_eq!(long.prune_before(&a, now), DateTime::<Utc>::MIN_UTC);
    }

    #[test]
    fn walking_back_finds_what_walking_forward_finds_across_clock_changes() {
        let forward = |p: &PeriodicJob, after: DateTime<Utc>, up_to: DateTime<Utc>| -> Vec<DateTime<Utc>> {
            p.cron
                .iter_after(after.with_timezone(&p.tz))
                .map(|at| at.with_timezone(&Utc))
                .take_while(|at| *at <= up_to)
                .collect()
        };
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap_or_default();
        for zone in ["Europe/Paris", "America/New_York", "Australia/Lord_Howe", "UTC"] {
            let tz = PeriodicJob::tz(zone).unwrap_or(Tz::UTC);
            for expression in ["*/15 * * * *", "30 2 * * *", "0 * * * *", "0 3 * * 0", "*/20 * * * * *"] {
                let p = PeriodicJob::new("w", expression, tz, job()).unwrap_or_else(|e| panic!("{e}"));
                // Both clock changes of 2026 in Europe and in the US.
                for (after, up_to) in [
                    ("2026-03-07T00:00:00Z", "2026-03-09T12:00:00Z"),
                    ("2026-03-28T12:00:00Z", "2026-03-29T12:00:00Z"),
                    ("2026-04-04T12:00:00Z", "2026-04-05T18:00:00Z"),
                    ("2026-10-24T12:00:00Z", "2026-10-25T12:00:00Z"),
                    ("2026-10-31T12:00:00Z", "2026-11-01T12:00:00Z"),
                ] {
                    let (after, up_to) = (t(after), t(up_to));
                    let mut expected = forward(&p, after, up_to);
                    let excess = expected.len().saturating_sub(MAX_OCCURRENCES_PER_PASS);
                    expected.drain(..excess);
                    assert_eq!(p.occurrences(after, up_to), expected, "{zone} {expression} {after}");
                }
            }
        }
        // A range far longer than the cap costs the cap, not the range.
        let every_second = PeriodicJob::new("s", "* * * * * *", Tz::UTC, job()).unwrap_or_else(|e| panic!("{e}"));
        let now = t("2026-01-01T00:00:00Z");
        let got = every_second.occurrences(DateTime::<Utc>::MIN_UTC, now);
        assert_eq!(got.len(), MAX_OCCURRENCES_PER_PASS);
        assert_eq!(got.last(), Some(&now));
    }
}
