//! Moving an account to another shard, online: [`Mover`].
//!
//! A move is a state machine recorded in the master (`shardq.moves`, with
//! the account-scoped tables it carries); every step is idempotent, so a
//! mover killed at any point (or a shard's server crashing mid-move) is
//! finished by [`Mover::resume`], or undone by [`Mover::abort`] before the
//! switch. It copies first while the account's writes continue (as Vitess
//! MoveTables does: copy, catch-up, switch), so writes pause only for the
//! catch-up and the switch.
//!
//! | step done   | what it did |
//! |-------------|-------------|
//! | `started`   | recorded the move, the account's epoch, both shards and the tables |
//! | `paused`    | attached the change capture to the account's tables on the old shard and started capturing the account's changes (rows and jobs: their keys go to `shardq.move_changes`), and put a fence for the account there that stops its jobs from being claimed; its writes still land |
//! | `precopied` | waited for claims and captures in flight and for the account's running jobs to end, then copied its rows (parents first, in key order) and jobs (in id order; new ids, mapped in `shardq.move_jobs`) and their periodic records to the new shard in batches from one snapshot; they are held there (a fence the claim skips) and nothing routes to them yet |
//! | `fenced`    | copied what changed since (rounds of catch-up, while writes continue), then fenced the account's writes: inserts of its jobs by transactions that begin later are refused, and `Router::begin` waits for the switch (the pause) |
//! | `copied`    | waited for every transaction that began before the write fence, then copied the last changes (the bounded catch-up) in one transaction marked with the move's id; the hold on the new shard now stops claims only |
//! | `switched`  | placed the account on the new shard with epoch + 1 (one master transaction with the step), then lifted the hold: its jobs run there |
//! | `done`      | stopped the capture and deleted the account's rows from the old shard; the fence stays |
//!
//! Between `fenced` and `switched` the account's writes wait (the pause);
//! between `paused` and `switched` its jobs wait. A catch-up overwrites a
//! copied row by key and a copied job in place (its new id, and so its
//! serial order, kept); rows and jobs deleted on the old shard are deleted
//! on the new one. Job ids change with the shard: a `JobId` read before the
//! move names the old copy. Writes the old shard refuses are those of
//! `Router::begin` transactions and of `Client::enqueue*`; writes through
//! `Router::pool_for` are not fenced. An abort before the switch deletes
//! the copy on the new shard (whose fence then refuses the account's
//! writes) and lifts the old shard's fence.

use std::sync::Arc;
use std::time::Duration;

use shardq_router::router::Database;
use shardq_router::{Account, Router};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::store::{self, MoveRow};

pub use shardq_router::AccountTable;

/// How a [`Mover`] works.
#[derive(Debug, Clone)]
pub struct MoveOptions {
    /// The application's account-scoped tables a move started by this
    /// mover carries (default none: jobs only; [`MoveOptions::for_config`]
    /// takes those of `[[accounts.tables]]`). A move records them when it
    /// starts; resuming it uses those recorded.
    pub tables: Vec<AccountTable>,
    /// Longest wait for transactions that began before the pause, and
    /// before the fence (default 30 s).
    pub writers_wait: Duration,
    /// Longest wait for the account's running jobs to end (default 60 s).
    pub running_wait: Duration,
    /// Rows (or jobs) per batch of the copy (default 5,000).
    pub batch: i64,
}

impl Default for MoveOptions {
    fn default() -> Self {
        MoveOptions {
            tables: Vec::new(),
            writers_wait: Duration::from_secs(30),
            running_wait: Duration::from_secs(60),
            batch: 5_000,
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

/// Catch-up rounds before the write fence, while writes continue: each
/// copies what changed during the one before, so the last one, inside the
/// pause, has little left.
const CATCH_UP_ROUNDS: usize = 4;
/// A round of catch-up that copied at most this many changes is the last
/// before the fence.
const CATCH_UP_SMALL: usize = 200;
/// The jobs table, as the capture names it.
const JOBS_TABLE: &str = "shardq.jobs";

/// Where a move is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Recorded; nothing changed yet.
    Started,
    /// The old shard no longer claims the account's jobs and captures its changes.
    Paused,
    /// The new shard holds a copy of the account's rows and jobs, held
    /// there; writes still land on the old shard.
    Precopied,
    /// The old shard refuses the account's new writes too.
    Fenced,
    /// The new shard holds the account's rows and jobs, caught up.
    Copied,
    /// The master places the account on the new shard.
    Switched,
    /// The old shard's copy is deleted.
    Done,
    /// Given up before the switch; the account stays where it was.
    Aborted,
}

impl Step {
    fn parse(s: &str) -> Step {
        match s {
            "paused" => Step::Paused,
            "precopied" => Step::Precopied,
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
            Step::Precopied => "precopied",
            Step::Fenced => "fenced",
            Step::Copied => "copied",
            Step::Switched => "switched",
            Step::Done => "done",
            Step::Aborted => "aborted",
        }
    }

    /// Whether a move whose last step is this one can still be aborted
    /// (the switch has not happened).
    pub fn abortable(self) -> bool {
        matches!(
            self,
            Step::Started | Step::Paused | Step::Precopied | Step::Fenced | Step::Copied
        )
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
    /// The account-scoped tables it carries, as recorded when it started;
    /// `None` for a move recorded before moves kept them (the mover's
    /// options then say).
    #[serde(serialize_with = "table_names")]
    pub tables: Option<Vec<AccountTable>>,
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

fn table_names<S: serde::Serializer>(tables: &Option<Vec<AccountTable>>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match tables {
        Some(t) => tables_json(t).serialize(s),
        None => s.serialize_none(),
    }
}

/// `tables` as recorded: `[{"table": .., "column": ..}]`.
fn tables_json(tables: &[AccountTable]) -> serde_json::Value {
    serde_json::Value::Array(
        tables
            .iter()
            .map(|t| serde_json::json!({ "table": t.table, "column": t.column }))
            .collect(),
    )
}

/// Recorded tables back; entries without a table or column are skipped
/// (only this module writes them).
fn tables_from_json(v: &serde_json::Value) -> Vec<AccountTable> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| {
                    Some(AccountTable {
                        table: t["table"].as_str()?.to_string(),
                        column: t["column"].as_str()?.to_string(),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
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
            tables: r.tables.map(|t| tables_from_json(&t.0)),
            error: r.error,
            started_at: r.started_at,
            updated_at: r.updated_at,
        }
    }
}

/// An account-scoped table as a move copies it: its name, account column,
/// primary key and columns.
struct Carried {
    table: String,
    column: String,
    key: Vec<String>,
    columns: Vec<String>,
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

    /// The account-scoped tables move `m` carries: those it recorded, or
    /// this mover's for a move that recorded none.
    pub fn tables_of(&self, m: &Move) -> Vec<AccountTable> {
        m.tables.clone().unwrap_or_else(|| self.options.tables.clone())
    }

    /// Records a move of `account` to `to` after checking it can be made:
    /// `to` is a configured shard other than the account's, no move of the
    /// account is in progress, and every account-scoped table exists on both
    /// shards with the same columns and has a primary key. Changes nothing
    /// else.
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
            let here = store::table_columns(source, &t.table)
                .await
                .map_err(|e| source.error(e))?;
            let there = store::table_columns(target, &t.table)
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
            let key = store::table_key(source, &t.table).await.map_err(|e| source.error(e))?;
            if key.is_empty() {
                return Err(bad(format!(
                    "account-scoped table {} has no primary key on shard {from} (a move copies and catches up rows by key)",
                    t.table
                )));
            }
        }
        let master = self.router.master();
        let tables = tables_json(&self.options.tables);
        match store::move_start(master, account.as_str(), to, &tables).await {
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
                let _ = store::move_fail(master, m.id, &text).await;
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
                for t in self.carried(m, source).await? {
                    store::capture_attach(source, &t.table, &t.column, &t.key)
                        .await
                        .map_err(|e| source.error(e))?;
                }
                store::capture_start(source, &m.account, m.id)
                    .await
                    .map_err(|e| source.error(e))?;
                store::fence_pause(source, &m.account, &m.to, m.epoch + 1)
                    .await
                    .map_err(|e| source.error(e))?;
                (Step::Started, Step::Paused)
            }
            Step::Paused => {
                // Claims in flight when the pause committed, and writes whose
                // statements began before the capture, have ended once every
                // transaction older than now has.
                let cutoff = store::shard_now(source).await.map_err(|e| source.error(e))?;
                self.wait_writers(m, source, cutoff, "the pause").await?;
                // The account's running jobs end next: their handlers may
                // write the account's rows (through `Router::begin`), which
                // the write fence would make wait for this very move.
                let done = wait_until(self.options.running_wait, || async {
                    store::jobs_running_of_account(source, &m.account)
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
                self.precopy(m).await?;
                (Step::Paused, Step::Precopied)
            }
            Step::Precopied => {
                let tables = self.carried(m, target).await?;
                for _ in 0..CATCH_UP_ROUNDS {
                    if self.catch_up(m, &tables, false).await? <= CATCH_UP_SMALL {
                        break;
                    }
                }
                store::fence_writes(source, &m.account, &m.to, m.epoch + 1)
                    .await
                    .map_err(|e| source.error(e))?;
                (Step::Precopied, Step::Fenced)
            }
            Step::Fenced => {
                self.final_catch_up(m).await?;
                (Step::Fenced, Step::Copied)
            }
            Step::Copied => {
                // Scheduling settings: frozen since the pause (the fence
                // refuses them), carried before the switch.
                let weight = store::account_weight_of(source, &m.account)
                    .await
                    .map_err(|e| source.error(e))?;
                store::account_weight_put(target, &m.account, weight)
                    .await
                    .map_err(|e| target.error(e))?;
                let limits = store::account_limits_of(source, &m.account)
                    .await
                    .map_err(|e| source.error(e))?;
                store::account_limits_put(target, &m.account, &limits)
                    .await
                    .map_err(|e| target.error(e))?;
                store::move_switch(master, &m.into())
                    .await
                    .map_err(|e| master.error(e))?;
                self.router.forget(&account(m)?);
                tracing::info!(account = %m.account, from = %m.from, to = %m.to, epoch = m.epoch + 1, "placement switched");
                // Its jobs run on the new shard from here (done again by
                // the next step if this fails).
                if let Err(e) = store::target_release(target, &m.account, m.id).await {
                    tracing::warn!(account = %m.account, shard = %m.to, error = %e, "lifting the hold failed; the next step lifts it");
                }
                return self.get(m.id).await;
            }
            Step::Switched => {
                store::target_release(target, &m.account, m.id)
                    .await
                    .map_err(|e| target.error(e))?;
                store::capture_stop(source, &m.account, m.id)
                    .await
                    .map_err(|e| source.error(e))?;
                let tables = self.table_pairs(m);
                let n = store::account_delete(source, &tables, &m.account)
                    .await
                    .map_err(|e| source.error(e))?;
                tracing::info!(account = %m.account, shard = %m.from, rows = n, "old copy deleted");
                (Step::Switched, Step::Done)
            }
            Step::Done | Step::Aborted => return Ok(m.clone()),
        };
        store::move_advance(master, m.id, done.as_str(), next.as_str())
            .await
            .map_err(|e| master.error(e))?;
        self.get(m.id).await
    }

    /// Gives up move `id` before its switch (step `started`, `paused`,
    /// `precopied`, `fenced` or `copied`): deletes the copy on the new shard
    /// (whose fence then refuses the account's writes), stops the capture
    /// and lifts the fence on the old one; the account stays where it was.
    /// After the switch it cannot be undone: resume instead.
    pub async fn abort(&self, id: i64) -> Result<Move> {
        let m = self.get(id).await?;
        if m.step == Step::Aborted {
            return Ok(m);
        }
        if !m.step.abortable() {
            return Err(Error::Move {
                account: m.account.clone(),
                message: format!("move {id} is past its switch (step {}); it can only be resumed", m.step),
            });
        }
        let source = self.router.shard(&m.from)?;
        let target = self.router.shard(&m.to)?;
        let tables = self.table_pairs(&m);
        let n = store::target_clear(target, &tables, &m.account, m.id)
            .await
            .map_err(|e| target.error(e))?;
        store::target_refuse(target, &m.account, &m.from)
            .await
            .map_err(|e| target.error(e))?;
        store::capture_stop(source, &m.account, m.id)
            .await
            .map_err(|e| source.error(e))?;
        store::fence_delete(source, &m.account, &m.to, m.epoch + 1)
            .await
            .map_err(|e| source.error(e))?;
        let master = self.router.master();
        store::move_advance(master, id, m.step.as_str(), Step::Aborted.as_str())
            .await
            .map_err(|e| master.error(e))?;
        tracing::info!(account = %m.account, id, copied_rows_deleted = n, "move aborted");
        self.get(id).await
    }

    /// Move `id`.
    pub async fn get(&self, id: i64) -> Result<Move> {
        let master = self.router.master();
        store::move_get(master, id)
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
        Ok(store::move_list(master, recent)
            .await
            .map_err(|e| master.error(e))?
            .into_iter()
            .map(Move::from)
            .collect())
    }

    /// Waits (up to `writers_wait`) until no transaction that began on
    /// `pool` before `cutoff` is open.
    async fn wait_writers(
        &self,
        m: &Move,
        pool: &Database,
        cutoff: chrono::DateTime<chrono::Utc>,
        what: &str,
    ) -> Result<()> {
        let source = self.router.shard(&m.from)?;
        let quiet = wait_until(self.options.writers_wait, || async {
            store::writers_before(pool, cutoff)
                .await
                .map(|n| n == 0)
                .map_err(|e| source.error(e).into())
        })
        .await?;
        if quiet {
            Ok(())
        } else {
            Err(Error::Move {
                account: m.account.clone(),
                message: format!(
                    "transactions that began before {what} on shard {} are still open",
                    m.from
                ),
            })
        }
    }

    /// The tables move `m` carries, with their keys and columns as `db`
    /// has them.
    async fn carried(&self, m: &Move, db: &Database) -> Result<Vec<Carried>> {
        let mut out = Vec::new();
        for t in self.tables_of(m) {
            let key = store::table_key(db, &t.table).await.map_err(|e| db.error(e))?;
            if key.is_empty() {
                return Err(Error::Move {
                    account: m.account.clone(),
                    message: format!(
                        "account-scoped table {} has no primary key on shard {}",
                        t.table, db.name
                    ),
                });
            }
            let columns = store::table_columns(db, &t.table)
                .await
                .map_err(|e| db.error(e))?
                .into_iter()
                .map(|(c, _)| c)
                .collect();
            out.push(Carried {
                table: t.table,
                column: t.column,
                key,
                columns,
            });
        }
        Ok(out)
    }

    /// The copy before the pause: clears what an earlier try left on the
    /// new shard, holds the account's jobs there, then copies its rows
    /// (table by table, parents first) and jobs in batches read from one
    /// snapshot of the old shard, each batch in its own transaction on the
    /// new one. Changes committed after the snapshot are captured.
    async fn precopy(&self, m: &Move) -> Result<()> {
        let source = self.router.shard(&m.from)?;
        let target = self.router.shard(&m.to)?;
        let tables = self.carried(m, target).await?;
        store::target_hold(target, &m.account, &m.from, m.epoch + 1)
            .await
            .map_err(|e| target.error(e))?;
        store::target_clear(target, &self.table_pairs(m), &m.account, m.id)
            .await
            .map_err(|e| target.error(e))?;
        let started = std::time::Instant::now();
        let mut read = source.begin().await.map_err(|e| source.error(e))?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut read)
            .await
            .map_err(|e| source.error(e))?;
        let (mut rows, mut jobs) = (0usize, 0usize);
        for t in &tables {
            let mut after: Option<serde_json::Value> = None;
            loop {
                let batch = store::rows_batch(
                    &mut read.conn(),
                    &t.table,
                    &t.column,
                    &t.key,
                    &m.account,
                    after.as_ref(),
                    self.options.batch,
                )
                .await
                .map_err(|e| source.error(e))?;
                let Some(last) = batch.as_array().and_then(|a| a.last()) else {
                    break;
                };
                let n = batch.as_array().map_or(0, Vec::len);
                after = Some(serde_json::Value::Object(
                    t.key.iter().map(|k| (k.clone(), last[k.as_str()].clone())).collect(),
                ));
                let mut write = target.begin().await.map_err(|e| target.error(e))?;
                store::rows_upsert(&mut write.conn(), &t.table, &t.key, &t.columns, &batch)
                    .await
                    .map_err(|e| target.error(e))?;
                write.commit().await.map_err(|e| target.error(e))?;
                rows += n;
                if (n as i64) < self.options.batch {
                    break;
                }
            }
        }
        let mut after = 0i64;
        loop {
            let batch = store::jobs_batch(&mut read.conn(), &m.account, after, self.options.batch)
                .await
                .map_err(|e| source.error(e))?;
            let ids: Vec<i64> = batch
                .as_array()
                .map(|a| a.iter().filter_map(|j| j["id"].as_i64()).collect())
                .unwrap_or_default();
            let Some(&last) = ids.last() else { break };
            after = last;
            let runs = store::periodic_runs_of_jobs(&mut read.conn(), &ids)
                .await
                .map_err(|e| source.error(e))?;
            let mut write = target.begin().await.map_err(|e| target.error(e))?;
            store::jobs_apply(&mut write.conn(), m.id, &batch, &[], &runs)
                .await
                .map_err(|e| target.error(e))?;
            write.commit().await.map_err(|e| target.error(e))?;
            jobs += ids.len();
            if (ids.len() as i64) < self.options.batch {
                break;
            }
        }
        read.rollback().await.map_err(|e| source.error(e))?;
        tracing::info!(account = %m.account, to = %m.to, rows, jobs, seconds = started.elapsed().as_secs_f64(), "account pre-copied");
        Ok(())
    }

    /// One catch-up: reads the captured changes and the changed rows and
    /// jobs from one snapshot of the old shard and writes them on the new
    /// one in one transaction (rows upserted parents first, then jobs, then
    /// rows gone deleted children first). `last`: the one inside the pause,
    /// which marks the copy applied in the same transaction; before it,
    /// the changes copied are removed from the capture. Returns the changes
    /// copied.
    async fn catch_up(&self, m: &Move, tables: &[Carried], last: bool) -> Result<usize> {
        let source = self.router.shard(&m.from)?;
        let target = self.router.shard(&m.to)?;
        let mut read = source.begin().await.map_err(|e| source.error(e))?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut read)
            .await
            .map_err(|e| source.error(e))?;
        let mut seqs = Vec::new();
        let mut changed = Vec::new();
        for t in tables {
            let (keys, s) = store::changes_of(&mut read.conn(), m.id, &t.table)
                .await
                .map_err(|e| source.error(e))?;
            let rows = if s.is_empty() {
                serde_json::json!([])
            } else {
                store::rows_by_keys(&mut read.conn(), &t.table, &t.column, &t.key, &m.account, &keys)
                    .await
                    .map_err(|e| source.error(e))?
            };
            seqs.extend(s);
            changed.push((keys, rows));
        }
        let (keys, s) = store::changes_of(&mut read.conn(), m.id, JOBS_TABLE)
            .await
            .map_err(|e| source.error(e))?;
        let ids: Vec<i64> = keys
            .as_array()
            .map(|a| a.iter().filter_map(|k| k["id"].as_i64()).collect())
            .unwrap_or_default();
        seqs.extend(s);
        let (jobs, runs) = if ids.is_empty() {
            (serde_json::json!([]), serde_json::json!([]))
        } else {
            let id_key = ["id".to_string()];
            let jobs = store::rows_by_keys(&mut read.conn(), JOBS_TABLE, "account", &id_key, &m.account, &keys)
                .await
                .map_err(|e| source.error(e))?;
            let runs = store::periodic_runs_of_jobs(&mut read.conn(), &ids)
                .await
                .map_err(|e| source.error(e))?;
            (jobs, runs)
        };
        read.rollback().await.map_err(|e| source.error(e))?;
        if seqs.is_empty() && !last {
            return Ok(0);
        }
        let mut write = target.begin().await.map_err(|e| target.error(e))?;
        sqlx::query("SET CONSTRAINTS ALL DEFERRED")
            .execute(&mut write)
            .await
            .map_err(|e| target.error(e))?;
        for (t, (_, rows)) in tables.iter().zip(&changed) {
            store::rows_upsert(&mut write.conn(), &t.table, &t.key, &t.columns, rows)
                .await
                .map_err(|e| target.error(e))?;
        }
        store::jobs_apply(&mut write.conn(), m.id, &jobs, &ids, &runs)
            .await
            .map_err(|e| target.error(e))?;
        for (t, (keys, rows)) in tables.iter().zip(&changed).rev() {
            store::rows_delete_missing(&mut write.conn(), &t.table, &t.column, &t.key, &m.account, keys, rows)
                .await
                .map_err(|e| target.error(e))?;
        }
        if last {
            store::copy_applied(&mut write.conn(), m.id, &m.account)
                .await
                .map_err(|e| target.error(e))?;
        }
        write.commit().await.map_err(|e| target.error(e))?;
        if !last {
            store::changes_done(source, m.id, &seqs)
                .await
                .map_err(|e| source.error(e))?;
        }
        tracing::debug!(account = %m.account, changes = seqs.len(), last, "caught up");
        Ok(seqs.len())
    }

    /// The catch-up inside the pause: waits for the writers that began
    /// before the write fence, then copies the last changes (skipped when
    /// a previous try committed it).
    async fn final_catch_up(&self, m: &Move) -> Result<()> {
        let source = self.router.shard(&m.from)?;
        let target = self.router.shard(&m.to)?;
        if store::move_applied(target, m.id).await.map_err(|e| target.error(e))? {
            return Ok(());
        }
        // Every transaction the write fence did not refuse began before
        // this moment (read after the fence committed; a resumed move reads
        // a later one, which waits for more, never less).
        let cutoff = store::shard_now(source).await.map_err(|e| source.error(e))?;
        self.wait_writers(m, source, cutoff, "the fence").await?;
        // Jobs claimed before the pause have ended (step `precopied`) and
        // none is claimed since; a running one here would be copied mid-run.
        let running = store::jobs_running_of_account(source, &m.account)
            .await
            .map_err(|e| source.error(e))?;
        if running > 0 {
            return Err(Error::Move {
                account: m.account.clone(),
                message: format!(
                    "{running} jobs of the account are running on shard {} after the pause",
                    m.from
                ),
            });
        }
        let tables = self.carried(m, target).await?;
        let n = self.catch_up(m, &tables, true).await?;
        tracing::info!(account = %m.account, to = %m.to, changes = n, "account caught up");
        Ok(())
    }

    fn table_pairs(&self, m: &Move) -> Vec<(String, String)> {
        self.tables_of(m).into_iter().map(|t| (t.table, t.column)).collect()
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
            tables: m.tables.as_deref().map(|t| sqlx::types::Json(tables_json(t))),
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
