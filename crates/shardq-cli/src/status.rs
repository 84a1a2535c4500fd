//! `shardq status`: per shard and queue, whether work keeps up; each
//! database's reachability, schema version and LISTEN connections.
//! `--json` for scripts, `--watch` to refresh in place.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use shardq::observe::health::{DatabaseHealth, Readiness};
use shardq::observe::status::{self, FleetStatus, ShardStatus, DEPTH_CAP};
use shardq_router::{Config, Router};

/// Arguments of `status`.
#[derive(clap::Args)]
pub struct StatusArgs {
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Refresh in place until ctrl-c.
    #[arg(long)]
    watch: bool,
    /// Refresh interval of `--watch`.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// How long to wait for each database before reporting it down.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Prints the fleet's status; exits 1 when it is not `ready` (without `--watch`).
pub async fn run(config: &Config, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let router = Router::connect(config).await?;
    if !args.watch {
        let fleet = status::fleet(&router, args.timeout).await;
        print(&fleet, args.json)?;
        let ready = fleet.status == Readiness::Ready;
        return Ok(if ready { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }
    loop {
        let fleet = status::fleet(&router, args.timeout).await;
        // Clear the screen and home the cursor, then draw.
        print!("\x1b[2J\x1b[H");
        print(&fleet, args.json)?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            _ = tokio::time::sleep(args.interval) => {}
        }
    }
}

fn print(fleet: &FleetStatus, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(fleet)?);
    } else {
        print!("{}", render(fleet));
    }
    Ok(())
}

/// The human-readable tables.
pub fn render(fleet: &FleetStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "fleet: {}   ({})",
        fleet.status,
        chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC")
    );
    let _ = writeln!(out, "{}", database_line(&fleet.master, None));
    for shard in &fleet.shards {
        out.push('\n');
        let _ = writeln!(out, "{}", database_line(&shard.health, Some(shard)));
        if shard.health.reachable && !shard.queues.is_empty() {
            queue_table(&mut out, shard);
        }
    }
    out.push('\n');
    node_table(&mut out, fleet);
    out
}

/// Per node: live or lapsed, its shards, queues (with limits) and engine
/// connections; the owners per shard are on each shard's line.
fn node_table(out: &mut String, fleet: &FleetStatus) {
    if let Some(e) = &fleet.nodes_error {
        let _ = writeln!(out, "nodes: registry not readable: {e}");
        return;
    }
    let live = fleet.nodes.iter().filter(|n| n.live).count();
    let _ = writeln!(out, "nodes: {live} live");
    if fleet.nodes.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "  {:<28} {:<7} {:>6} {:>11}  {:<24} shards",
        "node", "state", "shards", "connections", "queues"
    );
    for n in &fleet.nodes {
        let queues: Vec<String> = n
            .queues
            .iter()
            .map(|(q, l)| match n.adaptive.get(q) {
                Some((min, max)) => format!("{q}={l} (adaptive {min}..{max})"),
                None => format!("{q}={l}"),
            })
            .collect();
        let _ = writeln!(
            out,
            "  {:<28} {:<7} {:>6} {:>11}  {:<24} {}",
            n.id,
            if n.live { "live" } else { "lapsed" },
            n.shards.len(),
            n.connections,
            queues.join(","),
            n.shards.join(",")
        );
    }
}

fn database_line(h: &DatabaseHealth, shard: Option<&ShardStatus>) -> String {
    let state = if !h.reachable {
        "DOWN"
    } else if h.ok() {
        "up"
    } else {
        "NOT READY"
    };
    let version = match (h.version, h.expected) {
        (Some(v), Some(e)) => format!("schema v{v}/{e}"),
        (None, Some(e)) => format!("schema none/{e}"),
        (v, None) => format!("schema v{}", v.map_or("-".into(), |v| v.to_string())),
    };
    let mut line = format!("{:<12} {:<9}", h.name, state);
    if h.reachable {
        line.push_str(&format!(" {version}"));
        if let Some(listeners) = shard.and_then(|s| s.listeners) {
            let note = if listeners == 0 { " (no node listening)" } else { "" };
            line.push_str(&format!("  listeners {listeners}{note}"));
        }
        if let Some(s) = shard.filter(|s| !s.owners.is_empty()) {
            line.push_str(&format!("  owners {}", s.owners.join(",")));
        }
    }
    if let Some(s) = shard.filter(|s| s.wakeups != "notify") {
        line.push_str(&format!("  wakeups: {}", s.wakeups));
    }
    line.push_str(&format!("  {}", h.target));
    if let Some(e) = &h.error {
        line.push_str(&format!("\n             {e}"));
    }
    line
}

fn queue_table(out: &mut String, shard: &ShardStatus) {
    let _ = writeln!(
        out,
        "  {:<16} {:>10} {:>10} {:>8} {:>10} {:>9} {:>9} {:>9} {:>9}",
        "queue", "available", "scheduled", "running", "oldest", "done 1m", "done 1h", "failed 1m", "failed 1h"
    );
    for q in &shard.queues {
        let cap = |n: i64| {
            if q.capped {
                format!("{n}+")
            } else {
                n.to_string()
            }
        };
        let _ = writeln!(
            out,
            "  {:<16} {:>10} {:>10} {:>8} {:>10} {:>9} {:>9} {:>9} {:>9}",
            q.queue,
            cap(q.available),
            cap(q.scheduled),
            q.running,
            age(q.oldest_available_secs),
            q.completed_1m,
            q.completed_1h,
            q.failed_1m,
            q.failed_1h
        );
    }
    if shard.queues.iter().any(|q| q.capped) {
        let _ = writeln!(out, "  (+: counting stopped at {DEPTH_CAP} jobs)");
    }
}

fn age(secs: f64) -> String {
    if secs <= 0.0 {
        "-".into()
    } else if secs < 1.0 {
        format!("{:.0} ms", secs * 1000.0)
    } else if secs < 120.0 {
        format!("{secs:.1} s")
    } else if secs < 7200.0 {
        format!("{:.1} min", secs / 60.0)
    } else {
        format!("{:.1} h", secs / 3600.0)
    }
}
