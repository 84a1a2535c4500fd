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
//! - `schedule`: a producer's next wake-up, from its queue's earliest scheduled job.
//! - `cancel`: [`Client::cancel`] / [`Client::retry`], and signalling a
//!   running job's handler when it is cancelled (`shardq_cancel`).
//! - `retention`: per shard, prunes finished jobs past their retention.
//! - `shard`: what a node's tasks for one shard share.
//! - [`metrics`]: the metric names and the handles the stages record into.
//! - `sampler`: per shard, periodic depth / oldest-job / pool gauges.
//! - [`health`]: readiness of the master and every shard.
//! - [`status`]: [`status::FleetStatus`], per shard and queue (`shardq status`).
//! - [`http`]: `/metrics` and `/healthz` (feature `http`).
//! - [`unique`]: unique jobs ([`NewJob::unique`], [`Client::enqueue_unique`]).
//! - [`periodic`]: cron-scheduled jobs, enqueued once per occurrence across nodes.
//! - `store`: every SQL statement of this crate.
//! - [`error`]: the crate's one error type.
//!
//! Wake-ups: an insert into a shard's jobs table fires a statement trigger
//! that sends `NOTIFY shardq_jobs, '<queue>'` once per queue per statement
//! (Postgres folds duplicates within a transaction). Producers also poll
//! (default every second, jittered), because notifications are lost across
//! reconnects and through transaction-mode poolers.

mod cancel;
pub mod client;
mod completer;
pub mod error;
mod executor;
pub mod health;
#[cfg(feature = "http")]
pub mod http;
pub mod job;
mod lease;
pub mod metrics;
mod notifier;
pub mod periodic;
mod producer;
mod retention;
pub mod runtime;
mod sampler;
mod schedule;
mod shard;
mod slots;
pub mod status;
pub mod store;
pub mod unique;
pub mod worker;

pub use client::Client;
pub use completer::Backoff;
pub use error::{Error, Result};
pub use job::{JobId, JobRecord, NewJob};
pub use notifier::CHANNEL;
pub use periodic::{Overlap, PeriodicJob};
pub use runtime::{Runtime, RuntimeBuilder, RuntimeOptions};
pub use shard::ShardRunStats;
pub use shardq_router::{Account, Config, Router};
pub use unique::{Enqueued, UniqueOpts, UniqueStates};
pub use worker::{JobContext, JobError, Worker};
