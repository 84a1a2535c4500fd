//! Moving an account to another shard, online: [`Mover`].
//!
//! A move is a state machine recorded in the master (`shardq.moves`); every
//! step is idempotent, so a mover killed at any point (or a shard's server
//! crashing mid-move) is finished by [`Mover::resume`], or undone by
//! [`Mover::abort`] while the account's rows have not been copied yet.
//!
//! | step done  | what it did |
//! |------------|-------------|
//! | `started`  | recorded the move, the account's epoch and both shards |
//! | `paused`   | put a fence for the account on the old shard that stops its jobs from being claimed there; its writes still land (handlers of its running jobs may be writing) |
//! | `fenced`   | waited for the account's running jobs to end, then fenced its writes: inserts of its jobs by transactions that begin later are refused, and `Router::begin` waits for the switch (the pause) |
//! | `copied`   | waited for every transaction that began before the write fence committed, then copied the account's rows of every account-scoped table (in declared order, parents first) and all of its jobs (history too; order, priority, run time, attempts, errors, unique and serial keys kept; new ids) and its periodic records to the new shard, in one transaction marked with the move's id |
//! | `switched` | placed the account on the new shard with epoch + 1 (one master transaction with the step) |
//! | `done`     | deleted the account's rows from the old shard; the fence stays |
//!
//! Between `fenced` and `switched` the account's writes wait (the pause);
//! between `paused` and `copied` its jobs wait;
//! its jobs run on the new shard as soon as they are copied. Job ids change
//! with the shard: a `JobId` read before the move names the old copy.
//! Writes the old shard refuses are those of `Router::begin` transactions
//! and of `Client::enqueue*`; writes through `Router::pool_for` are not
//! fenced.

use std::sync::Arc;
use std::time::Duration;

use shardq_router::{Account, Router};

use crate::error::{Error, Result};
use crate::store::{self, MoveRow};

pub use shardq_router::AccountTable;

/// How a [`Mover`] works.
#[derive(Debug, Clone)]
pub struct MoveOptions {
    /// The application's account-scoped tables (default none: jobs only;
    /// [`MoveOptions::for_config`] takes those of `[[accounts.tables]]`).
    pub tables: Vec<AccountTable>,
    /// Longest wait for transactions that began before the fence (default 30 s).
    pub writers_wait: Duration,
    /// Longest wait for the account's running jobs to end (default 60 s).
    pub running_wait: Duration,
}

impl Default for MoveOptions {
    fn default() -> Self {
        MoveOptions {
            tables: Vec::new(),
            writers_wait: Duration::from_secs(30),
            running_wait: Duration::from_secs(60),
        }
    }
}

impl MoveOptions {
    /// The defaults, with the account-scoped tables `config` declares.
    pub fn for_config(config: &shardq_router::Config) -> MoveOptions {
        MoveOptions {
            tables: config.account_tables.clone(),
            ..MoveOptions::default()
        }
    }
}

/// Where a move is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Recorded; nothing changed yet.
    Started,
    /// The old shard no longer claims the account's jobs.
    Paused,
    /// The old shard refuses the account's new writes too.
    Fenced,
    /// The new shard holds the account's rows and jobs.
    Copied,
    /// The master places the account on the new shard.
    Switched,
    /// The old shard's copy is deleted.
    Done,
    /// Given up before the copy; nothing changed.
    Aborted,
}

impl Step {
    fn parse(s: &str) -> Step {
        match s {
            "paused" => Step::Paused,
            "fenced" => Step::Fenced,
            "copied" => Step::Copied,
            "switched" => Step::Switched,
            "done" => Step::Done,
            "aborted" => Step::Aborted,
            _ => Step::Started,
        }
    }

    /// The step's name, as recorded.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Started => "started",
            Step::Paused => "paused",
            Step::Fenced => "fenced",
            Step::Copied => "copied",
            Step::Switched => "switched",
            Step::Done => "done",
            Step::Aborted => "aborted",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One move, as recorded in the master.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Move {
    /// Its id (`shardq moves status` lists them).
    pub id: i64,
    /// The account moved.
    pub account: String,
    /// The shard it leaves.
    pub from: String,
    /// The shard it goes to.
    pub to: String,
    /// The account's placement epoch when the move started.
    pub epoch: i64,
    /// The last step done.
    #[serde(serialize_with = "step_name")]
    pub step: Step,
    /// Why the next step failed last time, if it did.
    pub error: Option<String>,
    /// When the move started.
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// When it last changed.
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

fn step_name<S: serde::Serializer>(step: &Step, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(step.as_str())
}

impl From<MoveRow> for Move {
    fn from(r: MoveRow) -> Move {
        Move {
            id: r.id,
            account: r.account,
            from: r.from_shard,
            to: r.to_shard,
            epoch: r.epoch,
            step: Step::parse(&r.step),
            error: r.error,
            started_at: r.started_at,
            updated_at: r.updated_at,
        }
    }
}

/// Moves accounts between shards. Cheap to clone.
#[derive(Clone)]
pub struct Mover {
    router: Arc<Router>,
    options: MoveOptions,
}

impl Mover {
    /// A mover over `router`'s fleet.
    pub fn new(router: Arc<Router>, options: MoveOptions) -> Mover {
        Mover { router, options }
    }

    /// Moves `account` to shard `to`: starts the move and runs it to the end.
    pub async fn move_account(&self, account: &Account, to: &str) -> Result<Move> {
        let m = self.start(account, to).await?;
        self.resume(m.id).await
    }

    /// Records a move of `account` to `to` after checking it can be made:
    /// `to` is a configured shard other than the account's, no move of the
    /// account is in progress, and every account-scoped table exists on both
    /// shards with the same columns. Changes nothing else.
    pub async fn start(&self, account: &Account, to: &str) -> Result<Move> {
        let bad = |message: String| Error::Move {
            account: account.to_string(),
            message,
        };
        if account.as_str() == crate::periodic::SYSTEM_ACCOUNT {
            return Err(bad(
                "the account of per-shard periodic jobs lives on every shard and never moves".into(),
            ));
        }
        let target = self.router.shard(to)?;
        let from = self.router.shard_for(account).await?.shard;
        if from == to {
            return Err(bad(format!("it is already on shard {to}")));
        }
        let source = self.router.shard(&from)?;
        for t in &self.options.tables {
            let here = store::table_columns(&source.pool, &t.table)
                .await
                .map_err(|e| source.error(e))?;
            let there = store::table_columns(&target.pool, &t.table)
                .await
                .map_err(|e| target.error(e))?;
            if here.is_empty() || there.is_empty() {
                let missing = if here.is_empty() { &from } else { to };
                return Err(bad(format!(
                    "account-scoped table {} does not exist on shard {missing}",
                    t.table
                )));
            }
            if here != there {
                return Err(bad(format!(
                    "account-scoped table {} has different columns on shards {from} and {to}",
                    t.table
                )));
            }
            if !here.iter().any(|(c, _)| *c == t.column) {
                return Err(bad(format!(
                    "account-scoped table {} has no column {}",
                    t.table, t.column
                )));
            }
        }
        let master = self.router.master();
        match store::move_start(&master.pool, account.as_str(), to).await {
            Ok(Some(row)) => {
                tracing::info!(account = %account, from = %from, to, id = row.id, "move started");
                Ok(row.into())
            }
            Ok(None) => Err(bad("it has no placement".into())),
            Err(e) if unique_violation(&e) => {
                Err(bad("a move of it is already in progress (`shardq moves status`)".into()))
            }
            Err(e) => Err(master.error(e).into()),
        }
    }

    /// Runs move `id` from its last step to `done`. A step that fails leaves
    /// the move where it was, with the error recorded; run this again.
    pub async fn resume(&self, id: i64) -> Result<Move> {
        loop {
            let m = self.get(id).await?;
            if matches!(m.step, Step::Done | Step::Aborted) {
                return Ok(m);
            }
            if let Err(e) = self.step(&m).await {
                let master = self.router.master();
                let text = crate::error::ErrorChain(&e).to_string();
                let _ = store::move_fail(&master.pool, m.id, &text).await;
                return Err(e);
            }
        }
    }

    /// Does the step after move `m`'s last one. Public so each step can be
    /// taken (and a crash between any two simulated) one at a time.
    pub async fn step(&self, m: &Move) -> Result<Move> {
        let master = self.router.master();
        let source = self.router.shard(&m.from)?;
        let target = self.router.shard(&m.to)?;
        let (done, next) = match m.step {
            Step::Started => {
                store::fence_pause(&source.pool, &m.account, &m.to, m.epoch + 1)
                    .await
                    .map_err(|e| source.error(e))?;
                (Step::Started, Step::Paused)
            }
            Step::Paused => {
                // Claims in flight when the pause committed have ended once
                // every transaction older than now has.
                let cutoff = store::shard_now(&source.pool).await.map_err(|e| source.error(e))?;
                let quiet = wait_until(self.options.writers_wait, || async {
                    store::writers_before(&source.pool, cutoff)
                        .await
                        .map(|n| n == 0)
                        .map_err(|e| source.error(e).into())
                })
                .await?;
                if !quiet {
                    return Err(Error::Move {
                        account: m.account.clone(),
                        message: format!(
                            "transactions that began before the pause on shard {} are still open",
                            m.from
                        ),
                    });
                }
                // The account's running jobs end next: their handlers may
                // write the account's rows (through `Router::begin`), which
                // the write fence would make wait for this very move.
                let done = wait_until(self.options.running_wait, || async {
                    store::jobs_running_of_account(&source.pool, &m.account)
                        .await
                        .map(|n| n == 0)
                        .map_err(|e| source.error(e).into())
                })
                .await?;
                if !done {
                    return Err(Error::Move {
                        account: m.account.clone(),
                        message: format!("jobs of the account are still running on shard {}", m.from),
                    });
                }
                store::fence_writes(&source.pool, &m.account, &m.to, m.epoch + 1)
                    .await
                    .map_err(|e| source.error(e))?;
                (Step::Paused, Step::Fenced)
            }
            Step::Fenced => {
                self.copy(m).await?;
                (Step::Fenced, Step::Copied)
            }
            Step::Copied => {
                store::move_switch(&master.pool, &m.into())
                    .await
                    .map_err(|e| master.error(e))?;
                self.router.forget(&account(m)?);
                tracing::info!(account = %m.account, from = %m.from, to = %m.to, epoch = m.epoch + 1, "placement switched");
                return self.get(m.id).await;
            }
            Step::Switched => {
                let tables = self.table_pairs();
                let n = store::account_delete(&source.pool, &tables, &m.account)
                    .await
                    .map_err(|e| source.error(e))?;
                tracing::info!(account = %m.account, shard = %m.from, rows = n, "old copy deleted");
                (Step::Switched, Step::Done)
            }
            Step::Done | Step::Aborted => return Ok(m.clone()),
        };
        let _ = target;
        store::move_advance(&master.pool, m.id, done.as_str(), next.as_str())
            .await
            .map_err(|e| master.error(e))?;
        self.get(m.id).await
    }

    /// Gives up move `id` while the account's rows have not been copied
    /// (step `started`, `paused` or `fenced`): lifts the fence; the account
    /// stays where it was. Later steps cannot be undone: resume instead.
    pub async fn abort(&self, id: i64) -> Result<Move> {
        let m = self.get(id).await?;
        match m.step {
            Step::Started | Step::Paused | Step::Fenced => {}
            Step::Aborted => return Ok(m),
            step => {
                return Err(Error::Move {
                    account: m.account.clone(),
                    message: format!("move {id} is past its copy (step {step}); it can only be resumed"),
                })
            }
        }
        let source = self.router.shard(&m.from)?;
        store::fence_delete(&source.pool, &m.account, &m.to, m.epoch + 1)
            .await
            .map_err(|e| source.error(e))?;
        let master = self.router.master();
        store::move_advance(&master.pool, id, m.step.as_str(), Step::Aborted.as_str())
            .await
            .map_err(|e| master.error(e))?;
        tracing::info!(account = %m.account, id, "move aborted");
        self.get(id).await
    }

    /// Move `id`.
    pub async fn get(&self, id: i64) -> Result<Move> {
        let master = self.router.master();
        store::move_get(&master.pool, id)
            .await
            .map_err(|e| master.error(e))?
            .map(Move::from)
            .ok_or_else(|| Error::Move {
                account: String::new(),
                message: format!("no move has id {id}"),
            })
    }

    /// Moves in progress, then the last `recent` finished ones.
    pub async fn list(&self, recent: i64) -> Result<Vec<Move>> {
        let master = self.router.master();
        Ok(store::move_list(&master.pool, recent)
            .await
            .map_err(|e| master.error(e))?
            .into_iter()
            .map(Move::from)
            .collect())
    }

    /// The copy: waits for the writers that began before the write fence,
    /// then writes the account's rows and jobs on the new shard in one
    /// transaction (skipped when a previous try committed it).
    async fn copy(&self, m: &Move) -> Result<()> {
        let source = self.router.shard(&m.from)?;
        let target = self.router.shard(&m.to)?;
        if store::move_applied(&target.pool, m.id)
            .await
            .map_err(|e| target.error(e))?
        {
            return Ok(());
        }
        let bad = |message: String| Error::Move {
            account: m.account.clone(),
            message,
        };
        // Every transaction the write fence did not refuse began before
        // this moment (read after the fence committed; a resumed move reads
        // a later one, which waits for more, never less).
        let cutoff = store::shard_now(&source.pool).await.map_err(|e| source.error(e))?;
        wait_until(self.options.writers_wait, || async {
            store::writers_before(&source.pool, cutoff)
                .await
                .map(|n| n == 0)
                .map_err(|e| source.error(e).into())
        })
        .await?
        .then_some(())
        .ok_or_else(|| {
            bad(format!(
                "transactions that began before the fence on shard {} are still open",
                m.from
            ))
        })?;
        // Jobs claimed before the pause have ended (step `paused`) and none
        // is claimed since; a running one here would be copied mid-run.
        let running = store::jobs_running_of_account(&source.pool, &m.account)
            .await
            .map_err(|e| source.error(e))?;
        if running > 0 {
            return Err(bad(format!(
                "{running} jobs of the account are running on shard {} after the pause",
                m.from
            )));
        }
        // Read under row locks held until the copy has committed, so nothing
        // changes the old rows in between.
        let mut read = source.pool.begin().await.map_err(|e| source.error(e))?;
        let mut tables = Vec::new();
        for t in &self.options.tables {
            let rows = store::rows_of_account(&mut read, &t.table, &t.column, &m.account)
                .await
                .map_err(|e| source.error(e))?;
            tables.push((t.table.clone(), t.column.clone(), rows));
        }
        let jobs = store::jobs_of_account(&mut read, &m.account)
            .await
            .map_err(|e| source.error(e))?;
        let old_ids: Vec<i64> = jobs
            .as_array()
            .map(|a| a.iter().filter_map(|j| j["id"].as_i64()).collect())
            .unwrap_or_default();
        let runs = store::periodic_runs_of_jobs(&mut read, &old_ids)
            .await
            .map_err(|e| source.error(e))?;
        let mut write = target.pool.begin().await.map_err(|e| target.error(e))?;
        let mapping = store::account_insert(&mut write, m.id, &m.account, &tables, &jobs)
            .await
            .map_err(|e| target.error(e))?;
        let (from_ids, to_ids): (Vec<i64>, Vec<i64>) = mapping.into_iter().unzip();
        store::periodic_runs_insert(&mut write, &runs, &from_ids, &to_ids)
            .await
            .map_err(|e| target.error(e))?;
        write.commit().await.map_err(|e| target.error(e))?;
        read.rollback().await.map_err(|e| source.error(e))?;
        tracing::info!(account = %m.account, to = %m.to, jobs = to_ids.len(), tables = tables.len(), "account copied");
        Ok(())
    }

    fn table_pairs(&self) -> Vec<(String, String)> {
        self.options
            .tables
            .iter()
            .map(|t| (t.table.clone(), t.column.clone()))
            .collect()
    }
}

impl From<&Move> for MoveRow {
    fn from(m: &Move) -> MoveRow {
        MoveRow {
            id: m.id,
            account: m.account.clone(),
            from_shard: m.from.clone(),
            to_shard: m.to.clone(),
            epoch: m.epoch,
            step: m.step.as_str().to_string(),
            error: m.error.clone(),
            started_at: m.started_at,
            updated_at: m.updated_at,
        }
    }
}

fn account(m: &Move) -> Result<Account> {
    Ok(Account::new(m.account.clone())?)
}

fn unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

/// Polls `check` every 20 ms until it is true (`Ok(true)`) or `limit`
/// passes (`Ok(false)`).
async fn wait_until<F, Fut>(limit: Duration, mut check: F) -> Result<bool>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await? {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
