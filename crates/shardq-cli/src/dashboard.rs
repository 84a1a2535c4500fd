//! `shardq dashboard`: the web dashboard over the whole fleet
//! (`shardq_dashboard`), on loopback by default. Read-only unless a token
//! is given (`--token` or `SHARDQ_DASHBOARD_TOKEN`); then every action asks
//! for it on its confirmation page.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use shardq_dashboard::{Actions, Dashboard, DashboardOptions};
use shardq_router::{Config, Router};

/// Arguments of `dashboard`.
#[derive(clap::Args)]
pub struct DashboardArgs {
    /// Address to listen on (loopback by default: put it behind your own
    /// proxy and authentication to expose it).
    #[arg(long, default_value = "127.0.0.1:9188")]
    addr: SocketAddr,
    /// Allow actions (cancel, retry, pause, resume) to whoever types this
    /// token into the confirmation form. Without it the dashboard is read-only.
    #[arg(long, env = "SHARDQ_DASHBOARD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// How long a page waits for each database before showing it as down.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Serves the dashboard until ctrl-c.
pub async fn run(config: &Config, args: DashboardArgs) -> anyhow::Result<ExitCode> {
    let actions = match args.token {
        Some(token) if token.is_empty() => anyhow::bail!("--token: the token must not be empty"),
        Some(token) => Actions::Token(token),
        None => Actions::ReadOnly,
    };
    let mode = if matches!(actions, Actions::ReadOnly) {
        "read-only"
    } else {
        "actions need the token"
    };
    let router = Arc::new(Router::connect(config).await?);
    let dashboard = Dashboard::new(
        router,
        DashboardOptions {
            actions,
            shard_timeout: args.timeout,
            ..DashboardOptions::default()
        },
    );
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .map_err(|e| anyhow::anyhow!("--addr {}: cannot listen: {e}", args.addr))?;
    eprintln!("dashboard on http://{} ({mode})", listener.local_addr()?);
    shardq_dashboard::serve_on(listener, dashboard, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}
