//! `shardq worker`: a worker node with the built-in kinds.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use shardq::runtime::AdaptiveConcurrency;
use shardq::{Runtime, RuntimeOptions};
use shardq_router::{Config, Router};

use crate::kinds;

/// Arguments of `worker`.
#[derive(clap::Args)]
pub struct WorkerArgs {
    /// Queues and this node's concurrency for each: `default=10,email=5`.
    #[arg(long, default_value = "default=64")]
    pub queues: String,
    /// Lease length of a running job.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub lease: Duration,
    /// Lease renewal interval.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,
    /// Check for expired leases this often.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub rescue: Duration,
    /// Fallback poll interval.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub poll: Duration,
    /// On SIGTERM / ctrl-c, let running jobs finish this long before handing them back.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// Node id (default host-pid-random).
    #[arg(long)]
    pub node_id: Option<String>,
    /// How many live nodes work each shard (0: every node works every shard,
    /// without the master's node registry).
    #[arg(long, default_value_t = 3)]
    pub nodes_per_shard: usize,
    /// How often the node renews its registry entry and recomputes which
    /// shards it owns; an entry not renewed for three of these is gone.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub fleet_heartbeat: Duration,
    /// How long a shard the node stops owning lets its running jobs finish
    /// before handing the rest back.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub handover_grace: Duration,
    /// Queues that opt out of fair share across accounts and are claimed
    /// in strict priority then due order (comma-separated; default: none,
    /// every queue shares fairly).
    #[arg(long, value_delimiter = ',', value_name = "QUEUE,...")]
    pub strict_queues: Vec<String>,
    /// Size these queues' concurrency adaptively between
    /// `--adaptive-min` and their `--queues` limit, from their handlers'
    /// latency, failures and backlog (comma-separated; `*`: every queue;
    /// default: none, fixed limits).
    #[arg(long, value_delimiter = ',', value_name = "QUEUE,...")]
    pub adaptive_queues: Vec<String>,
    /// The least concurrency of an adaptive queue.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub adaptive_min: u32,
    /// Serve `/metrics` (Prometheus) and `/healthz` on this address; given
    /// without a value, on loopback only: 127.0.0.1:9187.
    #[arg(long, num_args = 0..=1, default_missing_value = "127.0.0.1:9187")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// Parses `name=limit[,name=limit...]`.
pub fn parse_queues(s: &str) -> Result<Vec<(String, usize)>, String> {
    s.split(',')
        .map(|part| {
            let (name, limit) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected QUEUE=LIMIT, e.g. default=10"))?;
            let limit: usize = limit
                .parse()
                .ok()
                .filter(|l| *l > 0)
                .ok_or_else(|| format!("{part:?}: the limit must be a positive integer"))?;
            if name.is_empty() {
                return Err(format!("{part:?}: the queue name is empty"));
            }
            Ok((name.to_string(), limit))
        })
        .collect()
}

impl WorkerArgs {
    /// The runtime options these arguments ask for.
    pub fn options(&self) -> RuntimeOptions {
        RuntimeOptions {
            lease: self.lease,
            heartbeat_interval: self.heartbeat,
            rescue_interval: self.rescue,
            poll_interval: self.poll,
            node_id: self.node_id.clone(),
            nodes_per_shard: self.nodes_per_shard,
            fleet_heartbeat: self.fleet_heartbeat,
            handover_grace: self.handover_grace,
            strict_queues: self.strict_queues.clone(),
            adaptive: (!self.adaptive_queues.is_empty()).then(|| AdaptiveConcurrency {
                // `*` names every queue: an empty list.
                queues: if self.adaptive_queues.iter().any(|q| q == "*") {
                    Vec::new()
                } else {
                    self.adaptive_queues.clone()
                },
                min: self.adaptive_min as usize,
                ..AdaptiveConcurrency::default()
            }),
            ..RuntimeOptions::default()
        }
    }
}

/// Runs a node until SIGTERM or ctrl-c, then shuts down gracefully. On
/// SIGHUP it reads shards.toml again and reloads its router (new shards,
/// weights, placement strategy; see `Router::reload`); a bad file or one
/// that drops a shard holding accounts is refused and logged, and the node
/// goes on as it was. The runtime's producers keep the shards they started
/// with.
pub async fn run(config: &Config, args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let router = Arc::new(Router::connect(config).await?);
    let mut builder = kinds::register(Runtime::builder(router.clone())).options(args.options());
    let queues = parse_queues(&args.queues).map_err(|e| anyhow::anyhow!("--queues: {e}"))?;
    for (q, limit) in queues {
        builder = builder.queue(q, limit);
    }
    if let Some(addr) = args.metrics_addr {
        builder = builder.metrics_addr(addr);
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let runtime = builder.start()?;
    eprintln!("worker {} running; ctrl-c or SIGTERM to stop", runtime.node_id());
    if let Some(addr) = runtime.metrics_addr() {
        eprintln!("metrics on http://{addr}/metrics, health on http://{addr}/healthz");
    }
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hup.recv() => {
                match Config::load(&config.file) {
                    Ok(new) => match router.reload(&new).await {
                        Ok(report) => eprintln!("reloaded {}: {report}", config.file.display()),
                        Err(e) => eprintln!("reload refused: {e}"),
                    },
                    Err(e) => eprintln!("reload refused: {e}"),
                }
            }
        }
    }
    eprintln!(
        "stopping: finishing running jobs (grace {})",
        humantime::format_duration(args.grace)
    );
    runtime.shutdown(args.grace).await;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        worker: super::WorkerArgs,
    }

    #[test]
    fn metrics_are_off_unless_asked_and_alone_bind_loopback() {
        assert_eq!(Cli::parse_from(["shardq"]).worker.metrics_addr, None);
        let alone = Cli::parse_from(["shardq", "--metrics-addr"]).worker.metrics_addr;
        assert_eq!(alone, Some("127.0.0.1:9187".parse().unwrap()));
        assert!(alone.unwrap().ip().is_loopback());
        let given = Cli::parse_from(["shardq", "--metrics-addr", "0.0.0.0:9999"])
            .worker
            .metrics_addr;
        assert_eq!(given, Some("0.0.0.0:9999".parse().unwrap()));
    }

    #[test]
    fn queues_parse_and_bad_ones_say_what_is_wrong() {
        assert_eq!(
            super::parse_queues("default=10,email=5"),
            Ok(vec![("default".into(), 10), ("email".into(), 5)])
        );
        assert!(super::parse_queues("default")
            .unwrap_err()
            .contains("expected QUEUE=LIMIT"));
        assert!(super::parse_queues("default=0")
            .unwrap_err()
            .contains("positive integer"));
        assert!(super::parse_queues("=3").unwrap_err().contains("queue name is empty"));
    }
}
