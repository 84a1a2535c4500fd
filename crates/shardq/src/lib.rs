//! shardq's job engine: jobs live on their account's shard and every shard
//! is worked by its own producers, woken by its own LISTEN connection.
//!
//! Layout (the public API at the top, the node's stages under `runtime/`):
//! - [`job`]: [`NewJob`], [`JobId`] (`SHARD:ID`; its own file `job_id` at the bottom, since the
//!   error enum names job ids), [`JobState`], [`JobRecord`], [`Enqueued`].
//! - [`client`]: [`Client`]: enqueue (one INSERT, or one per shard for a
//!   batch; or inside the application's transaction), look jobs up, cancel, retry,
//!   pause and resume a queue on a shard ([`QueuePause`]).
//! - `wakeups`: the client's coalesced wake-ups after its inserts (one task
//!   per shard sends the NOTIFYs of concurrent enqueues in one statement).
//! - [`worker`]: the [`Worker`] trait handlers implement, [`JobContext`], [`JobError`].
//! - [`unique`]: unique jobs' options and key texts ([`UniqueOpts`]).
//! - [`periodic`]: cron-scheduled jobs, enqueued once per occurrence across nodes.
//! - [`runtime`]: [`Runtime`], a worker node: builder, options, shutdown; one
//!   file per stage (notifier, producer, wakeup, slots, adaptive, executor, completer,
//!   heartbeat, rescuer, cancel, retention, sampler, scheduler, permits) over `node`,
//!   the shared per-shard state; `shard_work` (one shard's stages as a unit
//!   started and stopped while the node runs), `shard_set` (which units
//!   run) and [`runtime::fleet`] (node registry, rendezvous ownership).
//! - The node registry's SQL lives in this crate's store (`store::fleet`),
//!   not the router's: the master's migrations are the router's, but only
//!   worker nodes, which this crate defines, read and write the registry.
//! - [`moves`]: [`moves::Mover`], moving an account to another shard online.
//! - [`rebalance`]: [`rebalance::Rebalancer`], planning and running the
//!   moves that even the fleet's load, and draining a shard.
//! - [`observe`]: metrics, health, fleet status and the `/metrics` endpoint.
//! - `store`: every SQL statement of this crate, split by caller (private;
//!   the `testing` feature exposes it to plan tests).
//! - [`error`]: the crate's one error type.
//!
//! Dependencies point down: `runtime` → `observe`, `periodic`, `worker` →
//! `store` → `job`, `unique` → `error`. No stage imports the composer
//! (`runtime/mod.rs`).
//!
//! Limits (issue 16): a per-account concurrency limit per queue
//! ([`Client::set_account_limit`]) is counted in the shard's database, not
//! in a node's memory. A run of a limited account holds a slot number under
//! a unique index (`store::limits`), as a serial key's run holds its key:
//! concurrent claims on different nodes cannot both take one slot, and the
//! slot is freed by the statements that already end a hold. Peers count
//! running jobs in shared producer records (Oban Pro's Smart engine), under
//! an advisory lock before a job performs (GoodJob's concurrency keys) or
//! in Redis (Sidekiq Enterprise's limiters); a count read in a claim's
//! snapshot would let two claims both see the last free slot, and a lock
//! would serialise every claim of the account, so shardq keeps no counter
//! at all: the held rows are the count. Limited accounts' jobs are claimed
//! by their own part of the claim statement, so other jobs pay one probe of
//! a small primary key.
//!
//! Named resources (`NewJob::resources`, `Client::set_resource`) span
//! shards, so their limits live in the master; a node leases permits
//! (concurrency) and tokens (rate, a token bucket in the resource's row) in
//! batches, renews its leases every heartbeat and takes a permit per job in
//! memory (`runtime/permits.rs`): no master round trip per job, and a dead
//! node's permits come back when its lease runs out (Oban Pro's Smart
//! engine coordinates its global limits through shared producer records
//! too). Jobs that use resources are claimed by their own statement
//! and index, only while the node holds permits.
//!
//! Wake-ups: an insert into a shard's jobs table fires a statement trigger
//! that sends `NOTIFY shardq_jobs, '<queue>'` once per queue per statement
//! (Postgres folds duplicates within a transaction); the client's own
//! inserts skip the trigger and have `wakeups` send the NOTIFY after their
//! commit, coalesced across concurrent enqueues. Producers also poll
//! (default every second, jittered), because notifications are lost across
//! reconnects and through transaction-mode poolers.

pub mod client;
pub mod error;
pub mod job;
mod job_id;
pub mod moves;
pub mod observe;
pub mod periodic;
pub mod rebalance;
pub mod runtime;
#[cfg(not(feature = "testing"))]
mod store;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod store;
pub mod unique;
mod wakeups;
pub mod worker;

pub use client::Client;
pub use error::{Error, Result};
pub use job::{Enqueued, JobId, JobRecord, JobState, NewJob};
pub use periodic::{Overlap, PeriodicJob};
pub use runtime::{Backoff, Runtime, RuntimeBuilder, RuntimeOptions, ShardRunStats, CHANNEL};
pub use shardq_router::{Account, Config, Router};
pub use store::{QueuePause, Resource};
pub use unique::{UniqueOpts, UniqueStates};
pub use worker::{CancelReason, JobContext, JobError, Worker};
