//! shardq's job engine: jobs live on their account's shard and every shard
//! is worked by its own producers, woken by its own LISTEN connection.
//!
//! Layout (one module per stage of a job's path, as in the data flow):
//! - [`job`]: [`NewJob`], [`JobId`] (`SHARD:ID`), [`JobRecord`].
//! - [`client`]: [`Client`]: enqueue (one INSERT, or one per shard for a
//!   batch; or inside the application's transaction), look jobs up.
//! - [`worker`]: the [`Worker`] trait handlers implement, [`JobContext`], [`JobError`].
//! - [`runtime`]: [`Runtime`], a worker node: builder, options, shutdown.
//! - `notifier`: per shard, the one LISTEN connection; wakes producers.
//! - `producer`: per (shard, queue), claims due jobs up to free slots.
//! - `slots`: a queue's node-wide limit, shared fairly across shards.
//! - `executor`: runs a handler with timeout and panic capture.
//! - `completer`: per shard, writes outcomes in batches, fenced by attempt.
//! - `lease`: heartbeat of this node's leases and rescue of expired ones.
//! - `shard`: what a node's tasks for one shard share.
//! - `store`: every SQL statement of this crate.
//! - [`error`]: the crate's one error type.
//!
//! Wake-ups: an insert into a shard's jobs table fires a statement trigger
//! that sends `NOTIFY shardq_jobs, '<queue>'` once per queue per statement
//! (Postgres folds duplicates within a transaction). Producers also poll
//! (default every second, jittered), because notifications are lost across
//! reconnects and through transaction-mode poolers.

pub mod client;
mod completer;
pub mod error;
mod executor;
pub mod job;
mod lease;
mod notifier;
mod producer;
pub mod runtime;
mod shard;
mod slots;
pub mod store;
pub mod worker;

pub use client::Client;
pub use completer::Backoff;
pub use error::{Error, Result};
pub use job::{JobId, JobRecord, NewJob};
pub use notifier::CHANNEL;
pub use runtime::{Runtime, RuntimeBuilder, RuntimeOptions};
pub use shard::ShardRunStats;
pub use shardq_router::{Account, Config, Router};
pub use worker::{JobContext, JobError, Worker};
