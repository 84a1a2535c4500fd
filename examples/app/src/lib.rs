//! An example application that embeds shardq the way users do: an axum
//! HTTP service whose own per-account tables (`users`, `documents`) live on
//! the account's shard next to its jobs, with the job handlers in the same
//! process. The README's section "Embedding shardq in an application"
//! walks through it.
//!
//! Layout:
//! - `migrations/`: the application's schema, declared in this crate's
//!   `shards.toml` and applied by `shardq migrate --config
//!   examples/app/shards.toml`: `master/` (the account directory),
//!   `shard/` (users, documents).
//! - [`service`]: [`App`]: starts the worker node and serves the API;
//!   one shutdown signal stops both. [`service::check_schema`] refuses a
//!   fleet that is not migrated.
//! - [`api`]: the HTTP routes, one module per resource (accounts, users,
//!   documents, jobs), and the extractors that answer the API's errors.
//! - [`jobs`]: the handlers, one module per job kind: document processing
//!   and its follow-up, the unique provisioning job per account, the
//!   periodic per-shard cleanup.
//! - [`fenced`]: how every write runs, in a fenced transaction from
//!   `router.begin(&account)` that follows the account when it moves
//!   (retried once when a move's fence refused it mid-way).
//! - [`directory`]: which accounts exist (the master's `accounts` table,
//!   cached), and the account ids the API accepts.
//! - [`store`]: every SQL statement of the application, and
//!   [`store::account_tables`], the account-scoped tables a move carries.
//! - [`error`]: [`Error`] (start-up, serving) and [`ApiError`] (what a
//!   failed request answers).
//! - `main.rs`: the binary: load `shards.toml`, check the schema, connect,
//!   start, serve until SIGINT or SIGTERM.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use shardq_example_app::{App, AppOptions};
//! let config = shardq::Config::load("examples/app/shards.toml")?;
//! shardq_example_app::service::check_schema(&config).await?;
//! let router = Arc::new(shardq::Router::connect(&config).await?);
//! let app = App::start(router, AppOptions::default())?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! app.serve(listener, shardq_example_app::service::shutdown_signal()).await?;
//! # Ok(()) }
//! ```

pub mod api;
pub mod directory;
pub mod error;
pub mod fenced;
pub mod jobs;
pub mod service;
pub mod store;

pub use error::{ApiError, Error};
pub use service::{App, AppOptions};
