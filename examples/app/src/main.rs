//! The example service's binary: reads the topology, connects, and runs the
//! HTTP API and the worker node until SIGINT or SIGTERM. Everything else is
//! in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use shardq::{Config, Router};
use shardq_example_app::{service, App, AppOptions};

/// An axum service with per-account tables and jobs on shardq's shards.
#[derive(Parser)]
#[command(name = "shardq-example-app", about)]
struct Args {
    /// Topology file (migrate it first: `shardq migrate --config PATH`).
    #[arg(long, env = "SHARDQ_CONFIG", default_value = "examples/app/shards.toml")]
    config: PathBuf,
    /// Address the HTTP API listens on.
    #[arg(long, env = "APP_LISTEN", default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let config = Config::load(&args.config)?;
    service::check_schema(&config).await?;
    let router = Arc::new(Router::connect(&config).await?);
    let app = App::start(router, AppOptions::default())?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(addr = %args.listen, node = %app.node_id(), "serving");
    app.serve(listener, service::shutdown_signal()).await?;
    Ok(())
}
