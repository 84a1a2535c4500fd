//! `fleet`: worker nodes dividing 32 shard databases (copies of one
//! migrated database per server) by rendezvous ownership. In-process nodes
//! give the ownership moves per join and leave, the time to converge and
//! the engine connections per node per server; real `shardq worker`
//! processes, one SIGKILLed, give the time until its shards are worked
//! again by the others.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardq::runtime::fleet::owners;
use shardq::{Runtime, RuntimeOptions};
use shardq_router::{Config, Migrator, Router};
use shardq_testbed::TestBed;

use super::{BenchArgs, Results};
use crate::{kinds, store};

/// Shard databases of the scenario.
const SHARDS: usize = 32;
/// In-process nodes before the join.
const NODES: usize = 8;
/// Owners per shard.
const K: usize = 3;
/// Longest wait for the fleet to converge.
const WAIT: Duration = Duration::from_secs(60);

/// Scenario: moves per join and leave, connections, and the time from a
/// worker's SIGKILL to its shards being worked again.
pub(super) async fn fleet(bed: &TestBed, _args: &BenchArgs, results: &mut Results) -> anyhow::Result<()> {
    eprintln!("fleet: {SHARDS} shard databases, {NODES} nodes, nodes_per_shard {K}...");
    let (config, server_of) = shard_copies(bed).await?;
    let shards = config.shard_names();
    let router = Arc::new(Router::connect(&config).await?);
    let options = |id: &str| RuntimeOptions {
        node_id: Some(id.to_string()),
        nodes_per_shard: K,
        fleet_heartbeat: Duration::from_millis(500),
        handover_grace: Duration::from_millis(500),
        ..RuntimeOptions::default()
    };
    let node = |id: &str| -> anyhow::Result<Runtime> {
        Ok(kinds::register(Runtime::builder(router.clone()))
            .queue(shardq::job::DEFAULT_QUEUE, 8)
            .options(options(id))
            .start()?)
    };
    let mut nodes = BTreeMap::new();
    let started = Instant::now();
    for i in 0..NODES {
        let id = format!("bench-{i:02}");
        nodes.insert(id.clone(), node(&id)?);
    }
    converge(&shards, &nodes).await?;
    results.add(
        "fleet",
        "8 nodes start: converged on the owners",
        started.elapsed().as_secs_f64(),
        "s",
    );
    let (max_per_server, total) = connections(&nodes, &server_of);
    results.add(
        "fleet",
        "engine connections per node per server, max (8 nodes)",
        max_per_server as f64,
        "",
    );
    let per_server = (SHARDS / bed.shards().len()) as f64;
    results.add(
        "fleet",
        "engine connections per server, 8 nodes with ownership (mean)",
        total as f64 / bed.shards().len() as f64,
        "",
    );
    results.add(
        "fleet",
        "engine pool bound per server, 8 nodes without ownership (N × S × E)",
        NODES as f64 * per_server * 5.0,
        "",
    );
    let before = workers(&nodes);
    let t = Instant::now();
    nodes.insert("bench-join".into(), node("bench-join")?);
    converge(&shards, &nodes).await?;
    let join_time = t.elapsed().as_secs_f64();
    let after = workers(&nodes);
    let total_ownerships = (SHARDS * K) as f64;
    let n = nodes.len() as f64;
    results.add_target(
        "fleet",
        "join: ownerships moved / all",
        moved(&before, &after) as f64 / total_ownerships,
        "",
        2.0 / n,
        false,
    );
    results.add("fleet", "join: converged", join_time, "s");
    let t = Instant::now();
    let gone = nodes
        .remove("bench-03")
        .ok_or_else(|| anyhow::anyhow!("node bench-03 missing"))?;
    let leaving = tokio::spawn(gone.shutdown(Duration::from_millis(500)));
    converge(&shards, &nodes).await?;
    let leave_time = t.elapsed().as_secs_f64();
    leaving.await?;
    results.add_target(
        "fleet",
        "leave: ownerships moved / all",
        moved(&after, &workers(&nodes)) as f64 / total_ownerships,
        "",
        2.0 / n,
        false,
    );
    results.add("fleet", "leave (clean shutdown): converged", leave_time, "s");
    futures::future::join_all(nodes.into_values().map(|rt| rt.shutdown(Duration::from_millis(500)))).await;

    let taken_over = sigkill(&router, &config, &shards).await?;
    results.add(
        "fleet",
        "SIGKILL of 1 of 4 worker processes → its shards worked again (nodes_per_shard 1, fleet heartbeat 0.5 s)",
        taken_over,
        "s",
    );
    Ok(())
}

/// `SHARDS` migrated shard databases spread over the bed's shard servers,
/// copied from one migrated database per server, with a fresh master.
async fn shard_copies(bed: &TestBed) -> anyhow::Result<(Config, BTreeMap<String, String>)> {
    let dbs = bed.fresh_fleet().await?;
    let bases: Vec<(&str, &str)> = dbs.shards.iter().map(|s| (s.name.as_str(), s.url.as_str())).collect();
    let report = Migrator::new(&Config::from_urls(&dbs.master.url, &bases)?)
        .run()
        .await?;
    anyhow::ensure!(!report.failed(), "migration failed:\n{report}");
    let mut urls = Vec::new();
    let mut server_of = BTreeMap::new();
    for i in 0..SHARDS {
        let server = &bed.shards()[i % bed.shards().len()];
        let template = dbs.shards[i % bed.shards().len()]
            .url
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let name = format!("{template}_f{i:02}");
        let admin = sqlx::PgPool::connect(&server.url("postgres")).await?;
        // The migrator's connections to the template may still be closing.
        let until = Instant::now() + WAIT;
        while let Err(e) = store::database_copy(&admin, &name, &template).await {
            anyhow::ensure!(Instant::now() < until, "copying {template} to {name}: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        admin.close().await;
        let shard = format!("f{i:02}");
        store::stamp_rename(&server.url(&name), &shard).await?;
        server_of.insert(shard.clone(), server.name().to_string());
        urls.push((shard, server.url(&name)));
    }
    let shards: Vec<(&str, &str)> = urls.iter().map(|(n, u)| (n.as_str(), u.as_str())).collect();
    Ok((Config::from_urls(&dbs.master.url, &shards)?, server_of))
}

/// Shard → the nodes working it.
fn workers(nodes: &BTreeMap<String, Runtime>) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (id, rt) in nodes {
        for s in rt.working() {
            out.entry(s).or_default().insert(id.clone());
        }
    }
    out
}

/// Waits until every shard is worked by exactly its owners among `nodes`.
async fn converge(shards: &[String], nodes: &BTreeMap<String, Runtime>) -> anyhow::Result<()> {
    let ids: Vec<&str> = nodes.keys().map(String::as_str).collect();
    let want: BTreeMap<String, BTreeSet<String>> = shards
        .iter()
        .map(|s| (s.clone(), owners(s, &ids, K).into_iter().map(str::to_string).collect()))
        .collect();
    let until = Instant::now() + WAIT;
    while workers(nodes) != want {
        anyhow::ensure!(Instant::now() < until, "the fleet did not converge within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// (most engine connections of one node on one server, all engine connections).
fn connections(nodes: &BTreeMap<String, Runtime>, server_of: &BTreeMap<String, String>) -> (u32, u32) {
    let mut max = 0;
    let mut total = 0;
    for rt in nodes.values() {
        let mut per_server: BTreeMap<&str, u32> = BTreeMap::new();
        for (shard, open) in rt.engine_connections() {
            if let Some(server) = server_of.get(&shard) {
                *per_server.entry(server).or_default() += open;
            }
            total += open;
        }
        max = max.max(per_server.values().copied().max().unwrap_or(0));
    }
    (max, total)
}

/// Ownership pairs (shard, node) of `before` not in `after`.
fn moved(before: &BTreeMap<String, BTreeSet<String>>, after: &BTreeMap<String, BTreeSet<String>>) -> usize {
    before
        .iter()
        .map(|(s, w)| {
            w.iter()
                .filter(|n| !after.get(s).is_some_and(|a| a.contains(*n)))
                .count()
        })
        .sum()
}

/// Starts 4 `shardq worker` processes (one owner per shard), SIGKILLs one
/// once they converged, and returns the seconds until the others' registry
/// entries list every shard it worked.
async fn sigkill(router: &Router, config: &Config, shards: &[String]) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let mut text = format!("[master]\nurl = \"{}\"\n", config.master.target);
    for s in &config.shards {
        text.push_str(&format!(
            "[[shards]]\nname = \"{}\"\nurl = \"{}\"\n",
            s.name, s.database.target
        ));
    }
    let path = dir.path().join("shards.toml");
    std::fs::write(&path, text)?;
    let ids = ["kill-a", "kill-b", "kill-c", "kill-d"];
    let mut children = Vec::new();
    for id in ids {
        children.push(Killed(spawn_worker(&path, id)?));
    }
    registry_converged(router, shards, &ids).await?;
    let victim = registry(router)
        .await?
        .remove("kill-a")
        .ok_or_else(|| anyhow::anyhow!("kill-a not registered"))?;
    let killed = Instant::now();
    children[0].0.kill()?;
    children[0].0.wait()?;
    let until = Instant::now() + WAIT;
    loop {
        let live = registry(router).await?;
        let worked: BTreeSet<&String> = live
            .iter()
            .filter(|(id, _)| id.as_str() != "kill-a")
            .flat_map(|(_, w)| w.iter())
            .collect();
        if victim.iter().all(|s| worked.contains(s)) {
            return Ok(killed.elapsed().as_secs_f64());
        }
        anyhow::ensure!(
            Instant::now() < until,
            "the killed worker's shards were not taken over within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A worker process, SIGKILLed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_worker(config: &Path, id: &str) -> anyhow::Result<Child> {
    Ok(std::process::Command::new(std::env::current_exe()?)
        .arg("--config")
        .arg(config)
        .args(["worker", "--queues", "default=8", "--lease", "3s", "--heartbeat", "1s"])
        .args(["--nodes-per-shard", "1", "--fleet-heartbeat", "500ms", "--node-id", id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

/// Live nodes → the shards each works, from the registry.
async fn registry(router: &Router) -> anyhow::Result<BTreeMap<String, BTreeSet<String>>> {
    let status = shardq::observe::status::fleet(router, Duration::from_secs(5)).await;
    if let Some(e) = status.nodes_error {
        anyhow::bail!("node registry: {e}");
    }
    Ok(status
        .nodes
        .into_iter()
        .filter(|n| n.live)
        .map(|n| (n.id, n.shards.into_iter().collect()))
        .collect())
}

/// Waits until exactly `ids` are live and work their owned shards (one owner each).
async fn registry_converged(router: &Router, shards: &[String], ids: &[&str]) -> anyhow::Result<()> {
    let mut want: BTreeMap<String, BTreeSet<String>> = ids.iter().map(|i| (i.to_string(), BTreeSet::new())).collect();
    for s in shards {
        for o in owners(s, ids, 1) {
            if let Some(w) = want.get_mut(o) {
                w.insert(s.clone());
            }
        }
    }
    let until = Instant::now() + WAIT;
    while registry(router).await? != want {
        anyhow::ensure!(
            Instant::now() < until,
            "the worker processes did not converge within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
