//! [`App`]: the HTTP API and the worker node of one process, started
//! together and stopped together by one signal.
//!
//! Shutdown, once the signal passed to [`App::serve`] resolves: the HTTP
//! server stops accepting connections and finishes the requests in flight
//! while, at the same time, the worker node stops claiming jobs and lets the
//! running ones finish ([`shardq::Runtime::shutdown`]); both get the same
//! grace period. A request in flight may still enqueue: its job waits in
//! the database for the next node.

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use shardq::{Client, Config, Router, Runtime, RuntimeOptions};
use shardq_router::Migrator;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, AppState};
use crate::directory::Directory;
use crate::error::Error;
use crate::jobs::{self, CleanupOptions, QueueLimits};

/// How the service runs.
#[derive(Debug, Clone)]
pub struct AppOptions {
    /// The worker node's options (poll interval, leases, backoff, retention).
    pub runtime: RuntimeOptions,
    /// Concurrency of each queue on this node.
    pub queues: QueueLimits,
    /// The per-shard cleanup's schedule and retention.
    pub cleanup: CleanupOptions,
    /// How long shutdown waits for requests in flight and running jobs.
    pub grace: Duration,
}

impl Default for AppOptions {
    fn default() -> Self {
        AppOptions {
            runtime: RuntimeOptions::default(),
            queues: QueueLimits::default(),
            cleanup: CleanupOptions::default(),
            grace: Duration::from_secs(10),
        }
    }
}

/// A started service: its worker node runs; [`App::serve`] runs the API.
pub struct App {
    /// The API's routes, with their state.
    api: axum::Router,
    /// The worker node, shut down by [`App::serve`].
    runtime: Runtime,
    /// Shutdown's grace period.
    grace: Duration,
}

impl App {
    /// Starts the worker node (every handler, queue and the periodic
    /// cleanup) over `router`, and builds the API. The databases must be
    /// migrated (`shardq migrate` with this application's `shards.toml`).
    /// Must be called inside a tokio runtime.
    pub fn start(router: Arc<Router>, options: AppOptions) -> Result<App, Error> {
        let client = Client::new(router.clone());
        let node = Runtime::builder(router.clone()).options(options.runtime);
        let runtime = jobs::install(node, &client, &options.queues, &options.cleanup)?.start()?;
        let state = Arc::new(AppState {
            router,
            client,
            directory: Directory::default(),
        });
        Ok(App {
            api: api::routes(state),
            runtime,
            grace: options.grace,
        })
    }

    /// This node's id (the `locked_by` of the jobs it runs).
    pub fn node_id(&self) -> &str {
        self.runtime.node_id()
    }

    /// Serves the API on `listener` until `shutdown` resolves, then stops
    /// the server and the worker node together (see the module doc).
    /// Returns once both have stopped.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let stopped = async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        };
        let mut server = tokio::spawn(
            axum::serve(listener, self.api)
                .with_graceful_shutdown(stopped)
                .into_future(),
        );
        shutdown.await;
        tracing::info!(grace = ?self.grace, "shutting down: HTTP server and worker node");
        let _ = stop_tx.send(true);
        let grace = self.grace;
        let http = async move {
            match tokio::time::timeout(grace, &mut server).await {
                Ok(Ok(served)) => served.map_err(Error::Http),
                Ok(Err(join)) => Err(Error::Http(std::io::Error::other(join))),
                Err(_) => {
                    tracing::warn!(?grace, "requests still in flight after the grace period; closing them");
                    server.abort();
                    Ok(())
                }
            }
        };
        let (served, ()) = tokio::join!(http, self.runtime.shutdown(grace));
        served
    }
}

/// Fails unless every reachable database is at the latest platform and
/// application migration of `config` (its `[migrations]` folders), naming
/// the databases behind or diverged: the service refuses to serve an old
/// schema. A database that cannot be read is logged and skipped, as the
/// router does at start-up: calls that need it fail on their own.
pub async fn check_schema(config: &Config) -> Result<(), Error> {
    let status = Migrator::new(config).status().await.map_err(Error::Schema)?;
    for db in status.databases.iter().filter(|d| d.error.is_some()) {
        tracing::warn!(database = %db.database, target = %db.target, "schema not checked: database unreachable");
    }
    let behind = status.lagging();
    let diverged = status.diverged();
    if behind.is_empty() && diverged.is_empty() {
        return Ok(());
    }
    Err(Error::NotMigrated {
        file: config.file.display().to_string(),
        behind: behind.join(", "),
        diverged: diverged.join(", "),
    })
}

/// Resolves at the first Ctrl-C (SIGINT) or SIGTERM: what a deployed
/// process is stopped with.
pub async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
    }
}
