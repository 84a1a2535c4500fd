//! The observability endpoint (feature `http`, on by default): `GET /metrics`
//! in the Prometheus text format, and `GET /healthz`, the readiness of the
//! fleet as JSON ([`crate::observe::health::Health`]).
//!
//! `/healthz` answers **200** when the status is `ready` or `degraded` (some
//! database is down or not migrated but at least one shard works: taking the
//! node out of rotation would not help, every node sees the same shard), and
//! **503** when it is `unavailable` (no shard works). Read `status` in the
//! body to tell ready from degraded.
//!
//! A worker node serves it with `RuntimeBuilder::metrics_addr`
//! ([`serve_node`]): its `/healthz` checks the master and the shards the
//! node works (owns, or still hands over), never a shard it does not own,
//! so it opens no connection there; a node that works no shard yet is ready
//! when the master is. An application that wants it elsewhere calls
//! [`install_prometheus`] before starting its runtime and spawns [`serve`],
//! which checks every shard.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use shardq_router::Router;

use crate::error::{Error, Result};
use crate::observe::health::{self, Readiness};
use crate::observe::metrics;

/// The process-wide recorder's handle, or why it could not be installed.
static PROMETHEUS: OnceLock<std::result::Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs a Prometheus recorder as the process's `metrics` recorder (once;
/// later calls return the same handle) with histogram buckets for the
/// duration metrics. Fails when another recorder was installed first.
pub fn install_prometheus() -> Result<PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(metrics::DURATION_BUCKETS)
                .map_err(|e| e.to_string())?
                .build_recorder();
            let handle = recorder.handle();
            ::metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
            metrics::describe();
            Ok(handle)
        })
        .clone()
        .map_err(Error::Metrics)
}

/// Binds `addr` for [`serve`] (port 0 picks a free port; see `local_addr`).
pub fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    let listener =
        std::net::TcpListener::bind(addr).map_err(|e| Error::Metrics(format!("cannot listen on {addr}: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Metrics(format!("{addr}: {e}")))?;
    tokio::net::TcpListener::from_std(listener).map_err(|e| Error::Metrics(format!("{addr}: {e}")))
}

/// The names of the shards `/healthz` checks, read at every request.
type Shards = Arc<dyn Fn() -> BTreeSet<String> + Send + Sync>;

/// What the handlers read: set once in [`serve`] or [`serve_node`].
#[derive(Clone)]
struct Endpoint {
    router: Arc<Router>,
    metrics: PrometheusHandle,
    /// `None`: every shard of the router.
    shards: Option<Shards>,
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` resolves.
/// Also runs the recorder's upkeep every 5 s, so histogram samples are
/// drained even when nobody scrapes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Arc<Router>,
    metrics: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(
        listener,
        Endpoint {
            router,
            metrics,
            shards: None,
        },
        shutdown,
    )
    .await
}

/// As [`serve`], for a worker node: `/healthz` checks the master and the
/// shards `shards` names at each request (those the node works), so it
/// never connects to another shard.
pub async fn serve_node(
    listener: tokio::net::TcpListener,
    router: Arc<Router>,
    metrics: PrometheusHandle,
    shards: impl Fn() -> BTreeSet<String> + Send + Sync + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let shards: Shards = Arc::new(shards);
    let endpoint = Endpoint {
        router,
        metrics,
        shards: Some(shards),
    };
    serve_with(listener, endpoint, shutdown).await
}

async fn serve_with(
    listener: tokio::net::TcpListener,
    endpoint: Endpoint,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let metrics = endpoint.metrics.clone();
    let upkeep = {
        let handle = metrics.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                handle.run_upkeep();
            }
        })
    };
    let app = axum::Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .with_state(endpoint);
    let served = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
    upkeep.abort();
    served
}

async fn render_metrics(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    endpoint.metrics.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        endpoint.metrics.render(),
    )
}

async fn healthz(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    let health = match &endpoint.shards {
        None => health::check(&endpoint.router).await,
        Some(shards) => {
            let names = shards();
            health::check_shards(&endpoint.router, |name| names.contains(name), health::DEFAULT_TIMEOUT).await
        }
    };
    let code = match health.status {
        Readiness::Ready | Readiness::Degraded => StatusCode::OK,
        Readiness::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    };
    let body = serde_json::to_string_pretty(&health).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    (code, [(header::CONTENT_TYPE, "application/json")], body)
}
