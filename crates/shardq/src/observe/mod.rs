//! Watching jobs and the fleet, read-only: what a node records and what an
//! operator reads.
//!
//! - [`metrics`]: metric names and the handles the runtime's stages record into.
//! - [`health`]: readiness of the master and every shard.
//! - [`status`]: [`status::FleetStatus`], per shard and queue (`shardq status`).
//! - [`http`]: `/metrics` and `/healthz` over HTTP (feature `http`).
//!
//! These modules read through the store and never import the runtime.

pub mod health;
#[cfg(feature = "http")]
pub mod http;
pub mod metrics;
pub mod status;
