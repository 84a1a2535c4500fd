//! Rebalancing and draining: [`Rebalancer`] measures each account's load,
//! asks the router's planner (shardq_router::planner) which accounts to move
//! where, and runs the moves through [`Mover`].
//!
//! - [`Rebalancer::plan`]: the shards' roles (a shard offered new accounts is
//!   a target; a draining one is emptied; one of weight 0 or whose schema is
//!   behind is kept as it is), the accounts' loads ([`LoadBy`]) and the plan.
//!   Pinned accounts never move.
//! - [`Rebalancer::apply`]: runs a plan's moves, at most `concurrency` at a
//!   time, pausing `throttle` after each; a move that fails stays recorded
//!   in the master, and [`Rebalancer::resume_in_progress`] (run first by
//!   `shardq rebalance --apply`) finishes it next time.
//! - [`Rebalancer::drain`]: marks a shard draining (no new account lands
//!   there) and moves every account off it, until none is left.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use shardq_router::planner::{self, Plan, PlanAccount, PlanShard, PlannedMove, Role};
use shardq_router::{Account, Router};

use crate::error::{Error, Result};
use crate::moves::{MoveOptions, Mover, Step};
use crate::store;

pub use crate::moves::Move;

/// Accounts measured per statement.
const MEASURE_BATCH: usize = 1_000;

/// Rounds of a drain: a round moves what the shard held; a placement that
/// raced the draining mark is moved by the next.
const DRAIN_ROUNDS: usize = 5;

/// What a plan evens out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadBy {
    /// Accounts: each counts 1 (the default).
    #[default]
    Accounts,
    /// Jobs: the account's jobs on its shard (history included), counted
    /// through the account index.
    Jobs,
    /// Bytes, estimated: the sum of `pg_column_size` of the account's job
    /// rows and of its rows of the account-scoped tables (row data as
    /// stored, TOASTed values compressed; indexes and page overhead left
    /// out).
    Bytes,
}

impl LoadBy {
    /// Parses `accounts`, `jobs` or `bytes`.
    pub fn parse(s: &str) -> Option<LoadBy> {
        match s {
            "accounts" => Some(LoadBy::Accounts),
            "jobs" => Some(LoadBy::Jobs),
            "bytes" => Some(LoadBy::Bytes),
            _ => None,
        }
    }

    /// The unit's name.
    pub fn as_str(self) -> &'static str {
        match self {
            LoadBy::Accounts => "accounts",
            LoadBy::Jobs => "jobs",
            LoadBy::Bytes => "bytes",
        }
    }
}

/// How a plan's moves run.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Moves running at the same time (at least 1; default 1).
    pub concurrency: usize,
    /// Pause after each move before the next one starts (default none).
    pub throttle: Duration,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            concurrency: 1,
            throttle: Duration::ZERO,
        }
    }
}

/// What happened to one planned move.
#[derive(Debug)]
pub struct Applied {
    /// The move planned.
    pub planned: PlannedMove,
    /// The move as recorded at its end, or why it stopped (the move, if it
    /// was started, stays recorded in the master for a resume).
    pub outcome: Result<Move>,
}

/// Plans and runs rebalances and drains over a router's fleet.
#[derive(Clone)]
pub struct Rebalancer {
    router: Arc<Router>,
    mover: Mover,
    options: MoveOptions,
}

impl Rebalancer {
    /// A rebalancer whose moves carry `options` (its tables are also those
    /// measured by [`LoadBy::Bytes`]).
    pub fn new(router: Arc<Router>, options: MoveOptions) -> Rebalancer {
        Rebalancer {
            mover: Mover::new(router.clone(), options.clone()),
            router,
            options,
        }
    }

    /// The moves recorded in the master that are neither done nor aborted.
    pub async fn in_progress(&self) -> Result<Vec<Move>> {
        Ok(self
            .mover
            .list(0)
            .await?
            .into_iter()
            .filter(|m| !matches!(m.step, Step::Done | Step::Aborted))
            .collect())
    }

    /// Finishes every move in progress (left by a mover that stopped),
    /// calling `progress` after each; `only_from` keeps those leaving that
    /// shard.
    pub async fn resume_in_progress(
        &self,
        only_from: Option<&str>,
        progress: &(dyn Fn(&Move) + Sync),
    ) -> Result<Vec<Result<Move>>> {
        let mut out = Vec::new();
        for m in self.in_progress().await? {
            if only_from.is_some_and(|s| s != m.from) {
                continue;
            }
            let r = self.mover.resume(m.id).await;
            if let Ok(done) = &r {
                progress(done);
            }
            out.push(r);
        }
        Ok(out)
    }

    /// The shards as the planner sees them: offered shards are targets,
    /// draining ones are emptied, the others kept.
    pub async fn plan_shards(&self) -> Result<Vec<PlanShard>> {
        Ok(self
            .router
            .shard_states()
            .await?
            .into_iter()
            .map(|s| PlanShard {
                role: if s.draining {
                    Role::Empty
                } else if s.not_offered.is_none() {
                    Role::Target
                } else {
                    Role::Keep
                },
                name: s.name,
                weight: s.weight,
            })
            .collect())
    }

    /// Every placed account with its load in `by`'s unit (one statement per
    /// shard and thousand accounts for jobs and bytes).
    pub async fn loads(&self, by: LoadBy) -> Result<Vec<PlanAccount>> {
        let placements = self.router.placements(None).await?;
        let mut accounts: Vec<PlanAccount> = placements
            .into_iter()
            .map(|(account, shard, pinned)| PlanAccount {
                account,
                shard,
                load: 1,
                pinned,
            })
            .collect();
        if by == LoadBy::Accounts {
            return Ok(accounts);
        }
        let tables = self.tables();
        for db in self.router.shards() {
            let mut on: Vec<&mut PlanAccount> = accounts.iter_mut().filter(|a| a.shard == db.name).collect();
            for chunk in on.chunks_mut(MEASURE_BATCH) {
                let names: Vec<String> = chunk.iter().map(|a| a.account.clone()).collect();
                let measured = match by {
                    LoadBy::Jobs => store::rebalance_job_counts(db, &names).await,
                    _ => store::rebalance_bytes(db, &names, &tables).await,
                }
                .map_err(|e| db.error(e))?;
                let measured: std::collections::HashMap<String, i64> = measured.into_iter().collect();
                for a in chunk.iter_mut() {
                    a.load = measured.get(&a.account).copied().unwrap_or(0).max(0) as u64;
                }
            }
        }
        Ok(accounts)
    }

    /// The estimated bytes of `account` on `shard` ([`LoadBy::Bytes`]).
    pub async fn size_of(&self, account: &Account, shard: &str) -> Result<u64> {
        let db = self.router.shard(shard)?;
        let measured = store::rebalance_bytes(db, &[account.to_string()], &self.tables())
            .await
            .map_err(|e| db.error(e))?;
        Ok(measured.first().map(|(_, b)| (*b).max(0) as u64).unwrap_or(0))
    }

    fn tables(&self) -> Vec<(String, String)> {
        self.options
            .tables
            .iter()
            .map(|t| (t.table.clone(), t.column.clone()))
            .collect()
    }

    /// The plan that evens the fleet's load in `by`'s unit, every target
    /// shard within `tolerance` (a fraction of its share) when whole
    /// accounts allow.
    pub async fn plan(&self, by: LoadBy, tolerance: f64) -> Result<Plan> {
        let shards = self.plan_shards().await?;
        let accounts = self.loads(by).await?;
        Ok(planner::plan(&shards, &accounts, tolerance))
    }

    /// Runs `moves` through the mover, at most `options.concurrency` at a
    /// time, pausing `options.throttle` after each, and calls `progress`
    /// after each one ends (done or failed). A failed move does not stop the
    /// others.
    pub async fn apply(
        &self,
        moves: &[PlannedMove],
        options: &ApplyOptions,
        progress: &(dyn Fn(&Applied) + Sync),
    ) -> Vec<Applied> {
        let concurrency = options.concurrency.max(1);
        stream::iter(moves.iter().cloned())
            .map(|planned| async move {
                let outcome = match Account::new(planned.account.clone()) {
                    Ok(account) => self.mover.move_account(&account, &planned.to).await,
                    Err(e) => Err(Error::from(e)),
                };
                let applied = Applied { planned, outcome };
                progress(&applied);
                if !options.throttle.is_zero() {
                    tokio::time::sleep(options.throttle).await;
                }
                applied
            })
            .buffer_unordered(concurrency)
            .collect()
            .await
    }

    /// Drains shard `name`: refuses (changing nothing) while it holds
    /// pinned accounts unless `include_pinned` (they then move and stay
    /// pinned on their new shard); marks it draining, so no new account is
    /// placed there; finishes moves off it left in progress; then moves
    /// every account off it to the shards furthest below their share, round
    /// after round until it holds none. Returns every move's outcome; fails
    /// when a round moved nothing while accounts remain.
    pub async fn drain(
        &self,
        name: &str,
        include_pinned: bool,
        options: &ApplyOptions,
        progress: &(dyn Fn(&Applied) + Sync),
    ) -> Result<Vec<Applied>> {
        self.router.shard(name)?;
        let bad = |message: String| Error::Drain {
            shard: name.to_string(),
            message,
        };
        if !include_pinned {
            let pinned: Vec<String> = self
                .router
                .placements(Some(name))
                .await?
                .into_iter()
                .filter(|(_, _, p)| *p)
                .map(|(a, _, _)| a)
                .collect();
            if !pinned.is_empty() {
                let shown: Vec<&str> = pinned.iter().take(10).map(String::as_str).collect();
                return Err(bad(format!(
                    "{} pinned account(s) live there ({}{}); move them yourself (`shardq accounts pin ACCOUNT --to SHARD`) \
                     or drain with --include-pinned, which moves them and keeps them pinned",
                    pinned.len(),
                    shown.join(", "),
                    if pinned.len() > shown.len() { ", ..." } else { "" }
                )));
            }
        }
        self.router.set_draining(name, true).await?;
        self.resume_in_progress(Some(name), &|_| {}).await?;
        let mut all = Vec::new();
        for _ in 0..DRAIN_ROUNDS {
            let mut shards = self.plan_shards().await?;
            if !shards.iter().any(|s| s.role == Role::Target) {
                return Err(bad(
                    "no other shard takes accounts (weight above 0, not draining, migrated)".into(),
                ));
            }
            for s in &mut shards {
                if s.name == name {
                    s.role = Role::Empty;
                }
            }
            let mut accounts = self.loads(LoadBy::Accounts).await?;
            let left = accounts.iter().filter(|a| a.shard == name).count();
            if left == 0 {
                return Ok(all);
            }
            if include_pinned {
                for a in accounts.iter_mut().filter(|a| a.shard == name) {
                    a.pinned = false;
                }
            }
            // Only empty the drained shard: no evening of the others.
            let plan = planner::plan(&shards, &accounts, f64::INFINITY);
            let moves: Vec<PlannedMove> = plan.moves.into_iter().filter(|m| m.from == name).collect();
            let applied = self.apply(&moves, options, progress).await;
            let moved = applied.iter().filter(|a| a.outcome.is_ok()).count();
            all.extend(applied);
            if moved == 0 {
                return Err(bad(format!(
                    "{left} account(s) are still there and no move of this round succeeded; \
                     `shardq moves status` shows the moves and their errors, and running the drain again resumes them"
                )));
            }
        }
        let left = self.router.placements(Some(name)).await?.len();
        if left == 0 {
            Ok(all)
        } else {
            Err(bad(format!(
                "{left} account(s) are still there after {DRAIN_ROUNDS} rounds (accounts keep being placed there?)"
            )))
        }
    }
}
