//! A web dashboard over a whole shardq fleet: the master and every shard on
//! one screen, fast at millions of jobs per shard, with guarded actions.
//!
//! Layout (dependencies point down):
//! - `lib.rs`: [`router`] (the axum `Router` to mount) and [`serve`] (what
//!   `shardq dashboard` runs).
//! - `pages/`: one module per page, each a handler plus its template's view:
//!   `fleet` (master and shards: up/down, schema, listeners, last hour's
//!   chart), `queues` (per shard and summed), `jobs` (search, keyset pages),
//!   `job` (one job), `accounts` (placements, counts, moves), `actions`
//!   (confirm and run cancel, retry, retry discarded of a kind, pause and
//!   resume a queue); `pages/mod.rs` wires the routes.
//! - `chart`: the last hour per minute as bars for the server-rendered SVG.
//! - `display`: how counts, ages and times are written on the pages.
//! - `state`: [`Dashboard`], what every handler reads, and its
//!   [`DashboardOptions`] (actions allowed or not, per-shard timeout).
//! - `store`: every SQL statement of the dashboard (bounded reads only).
//! - `error`: the crate's one error type; it renders as an error page.
//!
//! Templates live in `templates/` (askama: checked at compile time, HTML
//! escaped by default). No page loads anything from another host, so the
//! dashboard works offline.
//!
//! Bounded reads: every statement reads a bounded part of an index (a
//! `LIMIT`ed keyset range, a time range of the last hour on
//! `jobs_finalized_idx`, or a capped count), never `count(*)` over a table,
//! so a page costs the same at a thousand or a million jobs per shard. Each
//! shard is read concurrently with a timeout; a shard that is down or slow
//! is shown as such, with its error, and the others render.
//!
//! Actions are off unless [`DashboardOptions::actions`] allows them (a
//! token, or [`Actions::Trusted`] when the application mounts the router
//! behind its own authentication). Each action is a POST after a
//! confirmation page, and is logged (`tracing`, target
//! `shardq_dashboard::action`) with the peer address, what and which job,
//! shard or queue.

mod chart;
mod display;
pub mod error;
mod pages;
mod state;
#[cfg(not(feature = "testing"))]
mod store;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod store;

use std::future::Future;
use std::net::SocketAddr;

pub use error::{Error, Result};
pub use state::{Actions, Dashboard, DashboardOptions};

/// The dashboard as an axum `Router`, to serve on its own ([`serve`]) or to
/// nest in an application's router (e.g. behind its authentication, with
/// [`Actions::Trusted`]). Links are relative to the mount point's root, so
/// nest it at `/` or give the prefix in [`DashboardOptions::base`].
pub fn router(dashboard: Dashboard) -> axum::Router {
    pages::routes(dashboard)
}

/// Serves the dashboard on `addr` until `shutdown` resolves. The peer
/// address of every request is known to the action log.
pub async fn serve(
    addr: SocketAddr,
    dashboard: Dashboard,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { addr, source })?;
    serve_on(listener, dashboard, shutdown).await
}

/// [`serve`] on a listener already bound (port 0 picks a free one).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    dashboard: Dashboard,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let addr = listener.local_addr().map_err(|source| Error::Listen {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let app = router(dashboard).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| Error::Listen { addr, source })
}
