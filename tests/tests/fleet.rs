//! A fleet of worker nodes dividing the shards: a running node starts work
//! for a shard a router reload adds, also when the reload adds many more
//! shards than it started with; 16 in-process nodes over 64 shard
//! databases keep every shard owned, their connections per server within
//! the bound, and move few ownerships when a node joins or leaves; a node
//! whose own heartbeat came late does not find equally late nodes gone.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use shardq::periodic::Tz;
use shardq::runtime::fleet::owners;
use shardq::{Account, NewJob, PeriodicJob, Runtime, RuntimeOptions};
use shardq_router::Router;
use shardq_testbed::TestBed;
use shardq_tests::{count_state, count_state_all, fast_options, fleet, many_shards, wait_for, Noop};

const WAIT: Duration = Duration::from_secs(60);

fn quick(node: &str) -> RuntimeOptions {
    RuntimeOptions {
        node_id: Some(node.to_string()),
        fleet_heartbeat: Duration::from_millis(200),
        handover_grace: Duration::from_millis(200),
        ..fast_options()
    }
}

#[tokio::test]
async fn a_shard_added_by_reload_gets_its_jobs_worked_without_restart() {
    let f = fleet().await;
    let mut two = f.config.clone();
    two.shards.truncate(2);
    let router = Arc::new(Router::connect(&two).await.unwrap());
    let rt = Runtime::builder(router.clone())
        .queue("default", 10)
        .register(Noop)
        .options(quick("reload-node"))
        .start()
        .unwrap();
    // The full configuration's client places accounts on all three shards.
    for i in 0..30 {
        let a = Account::new(format!("reload-{i}")).unwrap();
        f.client
            .enqueue(&a, NewJob::new("noop", &serde_json::json!({})).unwrap())
            .await
            .unwrap();
    }
    let on_3 = count_state(&f.router, "shard_3", "available").await;
    assert!(on_3 > 0, "no job landed on shard_3");
    wait_for("shard_1 and shard_2 worked", WAIT, || async {
        count_state(&f.router, "shard_1", "completed").await + count_state(&f.router, "shard_2", "completed").await
            == 30 - on_3
    })
    .await;
    assert_eq!(rt.working(), ["shard_1", "shard_2"]);
    assert_eq!(
        count_state(&f.router, "shard_3", "available").await,
        on_3,
        "shard_3 is not worked before the reload"
    );

    let reloaded = router.reload(&f.config).await.unwrap();
    assert_eq!(reloaded.added, ["shard_3"]);
    wait_for("every job completed after the reload", WAIT, || async {
        count_state_all(&f.router, "completed").await == 30
    })
    .await;
    assert_eq!(rt.working(), ["shard_1", "shard_2", "shard_3"]);
    rt.shutdown(Duration::from_secs(1)).await;
}

/// A node started with 2 shards and reloaded to 42 works every one: its
/// slot positions grow with the shards it works (they were sized at start).
#[tokio::test]
async fn a_reload_that_adds_forty_shards_to_two_gets_every_shard_worked() {
    let bed = tokio::task::spawn_blocking(TestBed::shared).await.unwrap().unwrap();
    let (config, _) = many_shards(bed, 42).await;
    let shards = config.shard_names();
    let full = Arc::new(Router::connect(&config).await.unwrap());
    let client = shardq::Client::new(full.clone());
    for (i, shard) in shards.iter().enumerate() {
        let a = Account::new(format!("grow-{i}")).unwrap();
        full.place(&a, shard).await.unwrap();
        for _ in 0..2 {
            client
                .enqueue(&a, NewJob::new("noop", &serde_json::json!({})).unwrap())
                .await
                .unwrap();
        }
    }
    let mut two = config.clone();
    two.shards.truncate(2);
    let router = Arc::new(Router::connect(&two).await.unwrap());
    let rt = Runtime::builder(router.clone())
        .queue("default", 4)
        .register(Noop)
        .options(RuntimeOptions {
            engine_connections: Some(3),
            ..quick("grow-node")
        })
        .start()
        .unwrap();
    wait_for("the first two shards worked", WAIT, || async {
        count_state(&full, &shards[0], "completed").await + count_state(&full, &shards[1], "completed").await == 4
    })
    .await;
    let reloaded = router.reload(&config).await.unwrap();
    assert_eq!(reloaded.added.len(), 40);
    wait_for("every shard's jobs completed after the reload", WAIT, || async {
        count_state_all(&full, "completed").await == 2 * 42
    })
    .await;
    for shard in &shards {
        assert_eq!(count_state(&full, shard, "completed").await, 2, "shard {shard}");
    }
    assert_eq!(rt.working().len(), 42);
    rt.shutdown(Duration::from_secs(1)).await;
    for db in full.shards() {
        db.pool.close().await;
    }
}

/// The shards `id` owns among `ids` with one owner per shard.
fn owned_by(shards: &[String], ids: &[&str], id: &str) -> Vec<String> {
    shards.iter().filter(|s| owners(s, ids, 1) == [id]).cloned().collect()
}

/// A node with its own router over `config`, one owner per shard, that
/// schedules `tick` and serves `/healthz`.
async fn start_owner(config: &shardq::Config, id: &str, tick: &PeriodicJob) -> (Arc<Router>, Runtime) {
    let router = Arc::new(Router::connect(config).await.unwrap());
    let rt = Runtime::builder(router.clone())
        .queue("default", 4)
        .register(Noop)
        .periodic(tick.clone())
        .metrics_addr("127.0.0.1:0".parse().unwrap())
        .options(RuntimeOptions {
            nodes_per_shard: 1,
            engine_connections: Some(3),
            ..quick(id)
        })
        .start()
        .unwrap();
    (router, rt)
}

/// With ownership on (one node per shard, 2 nodes, 4 shards), a node
/// reaches only the shards it owns: its scheduler and `/healthz` leave its
/// router's pools to the other shards without a connection, also after a
/// third node joins and takes some of its shards, and every periodic
/// occurrence is still enqueued exactly once on every shard.
#[tokio::test]
async fn a_node_reaches_only_its_own_shards_for_periodic_jobs_and_health() {
    let bed = tokio::task::spawn_blocking(TestBed::shared).await.unwrap().unwrap();
    let (config, _) = many_shards(bed, 4).await;
    let shards = config.shard_names();
    // Two node ids that split the shards between them.
    let (a, b) = (0..)
        .map(|i| (format!("own-a{i}"), format!("own-b{i}")))
        .find(|(a, b)| {
            let n = owned_by(&shards, &[a, b], a).len();
            n > 0 && n < shards.len()
        })
        .unwrap();
    let tick = PeriodicJob::new(
        "tick",
        "* * * * * *",
        Tz::UTC,
        NewJob::from_json("noop", serde_json::json!({})),
    )
    .unwrap()
    .catch_up(Duration::from_secs(5));
    let mut nodes = Vec::new();
    for id in [&a, &b] {
        let (router, rt) = start_owner(&config, id, &tick).await;
        let mine = owned_by(&shards, &[&a, &b], id);
        nodes.push((router, rt, mine));
    }
    wait_for("each node works exactly the shards it owns", WAIT, || async {
        nodes.iter().all(|(_, rt, mine)| rt.working() == *mine)
    })
    .await;
    let others = |mine: &[String]| -> Vec<String> { shards.iter().filter(|s| !mine.contains(s)).cloned().collect() };
    let unowned_connections = |router: &Router, mine: &[String]| -> u32 {
        others(mine).iter().map(|s| router.shard(s).unwrap().pool.size()).sum()
    };
    wait_for(
        "no router connection left to a shard a node does not own",
        WAIT,
        || async {
            nodes
                .iter()
                .all(|(router, _, mine)| unowned_connections(router, mine) == 0)
        },
    )
    .await;

    let full = Router::connect(&config).await.unwrap();
    let runs = |shard: String| {
        let pool = full.shard(&shard).unwrap().pool.clone();
        async move {
            let (runs,): (i64,) = sqlx::query_as("SELECT count(*) FROM shardq.periodic_runs WHERE name = 'tick'")
                .fetch_one(&pool)
                .await
                .unwrap();
            runs
        }
    };
    let mut before = BTreeMap::new();
    for s in &shards {
        before.insert(s.clone(), runs(s.clone()).await);
    }
    // Health checks and a few occurrences on every shard meanwhile.
    for (_, rt, mine) in &nodes {
        let addr = rt.metrics_addr().unwrap();
        let body = reqwest::get(format!("http://{addr}/healthz"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let health: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(health["status"], "ready", "{body}");
        let checked: Vec<String> = health["databases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_string())
            .collect();
        let mut want = vec!["master".to_string()];
        want.extend(mine.iter().cloned());
        assert_eq!(
            checked,
            want,
            "/healthz of {} checks only the master and its shards",
            rt.node_id()
        );
    }
    wait_for("three more occurrences recorded on every shard", WAIT, || async {
        for s in &shards {
            if runs(s.clone()).await < before[s] + 3 {
                return false;
            }
        }
        true
    })
    .await;
    for (router, rt, mine) in &nodes {
        assert_eq!(
            unowned_connections(router, mine),
            0,
            "node {} opened router connections to shards it does not own",
            rt.node_id()
        );
    }

    // A third node joins: the shards it takes leave their old owner, which
    // closes its router connections to them once their work stopped.
    let c = (0..)
        .map(|i| format!("own-c{i}"))
        .find(|c| !owned_by(&shards, &[&a, &b, c], c).is_empty())
        .unwrap();
    let (router, rt) = start_owner(&config, &c, &tick).await;
    nodes.push((router, rt, Vec::new()));
    for (_, rt, mine) in &mut nodes {
        *mine = owned_by(&shards, &[&a, &b, &c], rt.node_id());
    }
    wait_for(
        "after the join each node works exactly the shards it owns",
        WAIT,
        || async { nodes.iter().all(|(_, rt, mine)| rt.working() == *mine) },
    )
    .await;
    wait_for(
        "no router connection left to a shard a node no longer owns",
        WAIT,
        || async {
            nodes
                .iter()
                .all(|(router, _, mine)| unowned_connections(router, mine) == 0)
        },
    )
    .await;
    let mut before = BTreeMap::new();
    for s in &shards {
        before.insert(s.clone(), runs(s.clone()).await);
    }
    wait_for("two more occurrences on every shard after the join", WAIT, || async {
        for s in &shards {
            if runs(s.clone()).await < before[s] + 2 {
                return false;
            }
        }
        true
    })
    .await;
    for (router, rt, mine) in &nodes {
        assert_eq!(
            unowned_connections(router, mine),
            0,
            "node {} holds router connections to shards it does not own after the join",
            rt.node_id()
        );
    }
    for s in &shards {
        let pool = &full.shard(s).unwrap().pool;
        let (runs, first, last): (i64, f64, f64) = sqlx::query_as(
            "SELECT count(*), extract(epoch FROM min(occurrence))::float8, extract(epoch FROM max(occurrence))::float8
               FROM shardq.periodic_runs WHERE name = 'tick'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        let (jobs,): (i64,) = sqlx::query_as("SELECT count(*) FROM shardq.jobs WHERE kind = 'noop'")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(jobs, runs, "shard {s}: one job per occurrence");
        assert_eq!(
            (last - first).round() as i64 + 1,
            runs,
            "shard {s}: every second from the first occurrence to the last, none missed"
        );
    }
    for (_, rt, _) in nodes {
        rt.shutdown(Duration::from_secs(1)).await;
    }
}

/// Shard → the nodes working it, over `nodes`.
fn workers(nodes: &BTreeMap<String, Runtime>) -> BTreeMap<String, BTreeSet<String>> {
    let mut by_shard: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (id, rt) in nodes {
        for s in rt.working() {
            by_shard.entry(s).or_default().insert(id.clone());
        }
    }
    by_shard
}

/// Shard → its owners by rendezvous over `nodes`' ids.
fn expected(shards: &[String], nodes: &BTreeMap<String, Runtime>, k: usize) -> BTreeMap<String, BTreeSet<String>> {
    let ids: Vec<&str> = nodes.keys().map(String::as_str).collect();
    shards
        .iter()
        .map(|s| (s.clone(), owners(s, &ids, k).into_iter().map(str::to_string).collect()))
        .collect()
}

/// Checks one sample: every shard is worked, and no node holds more engine
/// connections on a server than its shards there (worked or still being
/// released) × (pool + 1), counted from the node's own pools.
async fn sample(shards: &[String], nodes: &BTreeMap<String, Runtime>, server_of: &BTreeMap<String, String>, pool: i64) {
    let by_shard = workers(nodes);
    for s in shards {
        assert!(by_shard.get(s).is_some_and(|w| !w.is_empty()), "shard {s} has no owner");
    }
    for (id, rt) in nodes {
        let mut per_server: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
        for (shard, open) in rt.engine_connections() {
            let e = per_server.entry(server_of[&shard].as_str()).or_default();
            e.0 += i64::from(open);
            e.1 += 1;
        }
        for (server, (open, held)) in per_server {
            assert!(
                open <= held * (pool + 1),
                "node {id} holds {open} connections on {server} for {held} shards there (pool {pool})"
            );
        }
    }
}

/// Waits until every shard is worked by exactly its rendezvous owners;
/// the failure names the shards that differ.
async fn converge(what: &str, shards: &[String], nodes: &BTreeMap<String, Runtime>, k: usize) {
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let (got, want) = (workers(nodes), expected(shards, nodes, k));
        if got == want {
            return;
        }
        if tokio::time::Instant::now() > until {
            panic!(
                "{what}: no convergence within {WAIT:?}:\n{}",
                off_shards(shards, &got, &want)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The shards whose workers `got` differ from their owners `want`, one
/// line each, for a convergence that did not come.
fn off_shards(
    shards: &[String],
    got: &BTreeMap<String, BTreeSet<String>>,
    want: &BTreeMap<String, BTreeSet<String>>,
) -> String {
    shards
        .iter()
        .filter(|s| got.get(*s) != want.get(*s))
        .map(|s| format!("{s}: worked by {:?}, owners {:?}", got.get(s), want.get(s)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Ownerships (shard, node) in `before` not in `after`.
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

fn start_node(router: &Arc<Router>, id: &str, pool: u32) -> Runtime {
    Runtime::builder(router.clone())
        .queue("default", 4)
        .register(Noop)
        .options(RuntimeOptions {
            engine_connections: Some(pool),
            nodes_per_shard: 3,
            poll_interval: Duration::from_secs(1),
            rescue_interval: Duration::from_secs(5),
            // Lenient on a loaded machine: entries live 3 s. With 1.5 s,
            // 17 nodes over 64 shards on 2 cores sometimes found most
            // entries lapsed at once, each node then owned every shard,
            // and the load of working them all kept the heartbeats late.
            fleet_heartbeat: Duration::from_secs(1),
            ..quick(id)
        })
        .start()
        .unwrap()
}

/// Samples until the fleet works exactly the rendezvous owners again.
async fn converge_sampled(
    what: &str,
    shards: &[String],
    nodes: &BTreeMap<String, Runtime>,
    server_of: &BTreeMap<String, String>,
    pool: i64,
) {
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let (got, want) = (workers(nodes), expected(shards, nodes, 3));
        if got == want {
            return;
        }
        sample(shards, nodes, server_of, pool).await;
        assert!(
            tokio::time::Instant::now() < until,
            "no convergence after {what} within {WAIT:?}:\n{}",
            off_shards(shards, &got, &want)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sixteen_nodes_over_64_shards_keep_every_shard_owned_within_the_connection_bound() {
    let bed = tokio::task::spawn_blocking(TestBed::shared).await.unwrap().unwrap();
    let (config, server_of) = many_shards(bed, 64).await;
    let shards = config.shard_names();
    let router = Arc::new(Router::connect(&config).await.unwrap());
    let pool = 2;
    let k = 3;
    let mut nodes: BTreeMap<String, Runtime> = BTreeMap::new();
    for i in 0..16 {
        let id = format!("sim-{i:02}");
        nodes.insert(id.clone(), start_node(&router, &id, pool));
    }
    // Converges to the rendezvous owners: each shard worked by exactly its 3.
    converge("16 nodes", &shards, &nodes, k).await;
    sample(&shards, &nodes, &server_of, i64::from(pool)).await;
    let before = workers(&nodes);

    // A join: the new owners start before the old ones stop, so every
    // sample on the way finds every shard owned.
    nodes.insert("sim-16".into(), start_node(&router, "sim-16", pool));
    converge_sampled("the join", &shards, &nodes, &server_of, i64::from(pool)).await;
    let after = workers(&nodes);
    let joined = moved(&before, &after);
    let total = shards.len() * k;
    assert!(
        joined * 17 <= 2 * total,
        "the join moved {joined} of {total} ownerships"
    );
    assert!(joined > 0, "the new node owns nothing");

    // A leave: the node leaves the registry and stops; the others take over.
    let gone = nodes.remove("sim-03").unwrap();
    let leaving = tokio::spawn(gone.shutdown(Duration::from_millis(200)));
    converge_sampled("the leave", &shards, &nodes, &server_of, i64::from(pool)).await;
    leaving.await.unwrap();
    let left = moved(&after, &workers(&nodes));
    assert!(left * 17 <= 2 * total, "the leave moved {left} of {total} ownerships");
    sample(&shards, &nodes, &server_of, i64::from(pool)).await;

    futures::future::join_all(nodes.into_values().map(|rt| rt.shutdown(Duration::from_millis(200)))).await;
}

/// A stall that holds up every node (an overloaded host) makes every
/// heartbeat late. The first node to beat again must not find the others
/// gone (and take all their shards) when it was held up as long as they
/// were; a node that is on time still finds a stalled one gone after its
/// time to live.
#[tokio::test]
async fn a_late_heartbeat_does_not_find_nodes_gone_that_were_held_up_as_long() {
    let f = fleet().await;
    let master = f.router.master();
    let queues = serde_json::json!({"default": 1});
    let ttl = 1.5;
    let beat = |id: &'static str, late: f64| {
        shardq::store::node_beat(master, id, chrono::Utc::now(), ttl, late, &queues, &[], 0)
    };
    let others = |rows: Vec<(String, Vec<String>)>| rows.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
    assert_eq!(others(beat("late-a", 0.0).await.unwrap()), Vec::<String>::new());
    assert_eq!(others(beat("late-b", 0.0).await.unwrap()), vec!["late-a".to_string()]);
    // Both held up for 2.5 s: their last heartbeats are 2.5 s old, a
    // second past their time to live.
    let stall = "UPDATE shardq.nodes SET heartbeat_at = now() - interval '2.5 seconds' WHERE id = 'late-b'";
    sqlx::query(stall).execute(&master.pool).await.unwrap();
    assert_eq!(
        others(beat("late-a", 2.5).await.unwrap()),
        vec!["late-b".to_string()],
        "a node held up 2.5 s found a node held up as long gone"
    );
    // On time, node a finds the stalled node gone, and its row is deleted.
    sqlx::query(stall).execute(&master.pool).await.unwrap();
    assert_eq!(others(beat("late-a", 0.0).await.unwrap()), Vec::<String>::new());
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM shardq.nodes WHERE id = 'late-b'")
        .fetch_one(&master.pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "the lapsed row is deleted");
}
