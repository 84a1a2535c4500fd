//! `shardq testbed up|down|status`: one local Postgres server per database of
//! the configuration, data under `.shardq/testbed/<name>` next to the
//! configuration file (so every working directory finds the same bed).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use shardq_router::{Config, Target};
use shardq_testbed::Server;

/// The directory next to the configuration file `config_path` that holds
/// the test bed's and the demo's files (`.shardq`), made absolute.
pub fn state_dir(config_path: &Path) -> anyhow::Result<PathBuf> {
    let parent = config_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let parent = std::path::absolute(parent)
        .with_context(|| format!("--config {}: cannot resolve its directory", config_path.display()))?;
    Ok(parent.join(".shardq"))
}

/// The data directory of the test bed of the configuration file
/// `config_path`: `.shardq/testbed` next to it.
pub fn data_dir(config_path: &Path) -> anyhow::Result<PathBuf> {
    Ok(state_dir(config_path)?.join("testbed"))
}

/// Arguments of `testbed`.
#[derive(clap::Args)]
pub struct TestbedArgs {
    #[command(subcommand)]
    command: TestbedCommand,
}

#[derive(clap::Subcommand)]
enum TestbedCommand {
    /// Init (first time) and start every server; create the configured databases. Idempotent.
    Up,
    /// Stop every server (data is kept).
    Down,
    /// Show each server and whether it accepts connections.
    Status,
}

/// The servers of the configuration: `(name, target)` for master and shards.
fn entries(config: &Config) -> Vec<(String, &Target)> {
    std::iter::once(("master".to_string(), &config.master.target))
        .chain(config.shards.iter().map(|s| (s.name.clone(), &s.database.target)))
        .collect()
}

fn server(data_dir: &Path, name: &str, target: &Target) -> anyhow::Result<Server> {
    if !matches!(target.host.as_str(), "127.0.0.1" | "localhost" | "::1") {
        bail!(
            "{name}: host {} is not local; the test bed only runs servers on 127.0.0.1",
            target.host
        );
    }
    Ok(Server::new(name, target.port, data_dir.join(name))?)
}

/// Brings every server of the configuration up (see [`TestbedArgs`]), with
/// data under `data_dir`.
pub async fn up(config: &Config, data_dir: &Path) -> anyhow::Result<()> {
    for (name, target) in entries(config) {
        let s = server(data_dir, &name, target)?;
        let started = tokio::task::spawn_blocking(move || -> anyhow::Result<Server> {
            s.init()?;
            s.start()?;
            Ok(s)
        })
        .await??;
        let created = shardq_testbed::bed::ensure_database(&started, &target.dbname)
            .await
            .with_context(|| format!("{name}: creating database {}", target.dbname))?;
        println!(
            "{name:<10} up   127.0.0.1:{:<5} database {}{}",
            target.port,
            target.dbname,
            if created { " (created)" } else { "" }
        );
    }
    Ok(())
}

/// Runs a `testbed` subcommand on the bed of the configuration file
/// `config_path`.
pub async fn run(config: &Config, config_path: &Path, args: TestbedArgs) -> anyhow::Result<ExitCode> {
    let data_dir = data_dir(config_path)?;
    match args.command {
        TestbedCommand::Up => up(config, &data_dir).await?,
        TestbedCommand::Down => {
            for (name, target) in entries(config) {
                let s = server(&data_dir, &name, target)?;
                tokio::task::spawn_blocking(move || s.stop().map_err(anyhow::Error::from)).await??;
                println!("{name:<10} stopped");
            }
        }
        TestbedCommand::Status => {
            let mut all = true;
            for (name, target) in entries(config) {
                let s = server(&data_dir, &name, target)?;
                let ok = tokio::task::spawn_blocking(move || s.is_accepting()).await?;
                all &= ok;
                println!(
                    "{name:<10} 127.0.0.1:{:<5} {}",
                    target.port,
                    if ok { "accepting connections" } else { "down" }
                );
            }
            if !all {
                return Ok(ExitCode::from(3));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
