//! Real local PostgreSQL servers (initdb/pg_ctl, no Docker, no mocks) for
//! the shardq CLI demo, integration tests and benchmarks.
//!
//! Layout:
//!
//! - [`pg_bin`]: finding `initdb`/`pg_ctl`/`postgres` ([`PgBin`]).
//! - `server_user`: who runs the servers (the `postgres` user when we are
//!   root, since PostgreSQL refuses to run as root).
//! - [`server`]: one server ([`Server`]): init, start, stop, kill, freeze,
//!   probe.
//! - `process_tree`: a server's postmaster and the processes below it,
//!   from `/proc`, and the CPU time they used ([`Server::cpu_time`]).
//! - `freeze`: SIGSTOP / SIGCONT to a server's postmaster and its children,
//!   found through `/proc` ([`Server::freeze`], [`Server::thaw`]).
//! - [`bed`]: a master plus N shards in a temp dir ([`TestBed`]) and fresh
//!   databases on all of them ([`Fleet`]).
//! - [`tls`]: test certificates ([`TestCa`]) for servers with `ssl = on`
//!   ([`Server::enable_tls`], [`TestBed::enable_tls`]) and for clients
//!   ([`ClientCert`]); [`Server::require_client_auth`] and
//!   [`bed::ensure_role`] make a role need a password (SCRAM) and/or a
//!   client certificate.
//! - [`pgbouncer`]: a real PgBouncer in transaction mode in front of one
//!   server ([`PgBouncer`]).
//! - `exit_guard`: the child process that stops a bed's servers and removes
//!   its directory when this process exits, even when killed (thawing
//!   frozen servers first).
//! - [`error`]: the crate's [`Error`] and [`Result`].
//!
//! Tests share one bed per test binary and take fresh databases:
//!
//! ```no_run
//! # async fn demo() -> shardq_testbed::Result<()> {
//! let bed = shardq_testbed::TestBed::shared()?;
//! let fleet = bed.fresh_fleet().await?;
//! println!("master at {}", fleet.master.url);
//! # Ok(()) }
//! ```
//!
//! The CLI keeps persistent servers with [`Server::new`] plus
//! [`Server::init`]/[`Server::start`]/[`Server::stop`]; those outlive the
//! process.

pub mod bed;
pub mod error;
mod exit_guard;
mod freeze;
pub mod pg_bin;
pub mod pgbouncer;
mod process_tree;
pub mod server;
mod server_user;
pub mod tls;

pub use bed::{Fleet, FleetDb, TestBed};
pub use error::{Error, Result};
pub use pg_bin::{PgBin, PG_BIN_ENV};
pub use pgbouncer::PgBouncer;
pub use server::{ClientAuth, Server};
pub use tls::{ClientCert, ClientFiles, TestCa, TlsFiles};
