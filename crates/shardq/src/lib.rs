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
//!   heartbeat, rescuer, cancel, retention, sampler, scheduler) over `node`,
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
pub use store::QueuePause;
pub use unique::{UniqueOpts, UniqueStates};
pub use worker::{CancelReason, JobContext, JobError, Worker};
