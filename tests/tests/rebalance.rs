//! Operating the fleet: a rebalance plan evens the load after a shard is
//! added and never moves a pinned account, applying it moves the planned
//! accounts with all their jobs exactly once, a drained shard is left empty
//! and takes no new account, least-loaded placement fills the emptiest
//! shard, a running router picks up a new shard by reload, a shard not
//! migrated gets no account, and the application role cannot write the
//! shard registry.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;

use shardq::moves::{MoveOptions, Mover, Step};
use shardq::rebalance::{ApplyOptions, LoadBy, Rebalancer};
use shardq::{Account, Client, NewJob};
use shardq_router::{Config, Error, Migrator, PlacementStrategy, Router};
use shardq_testbed::TestBed;
use shardq_tests::{app_role, fleet, Fleet};

/// `config` with only its first `n` shards.
fn first_shards(config: &Config, n: usize) -> Config {
    let mut c = config.clone();
    c.shards.truncate(n);
    c
}

/// Accounts placed per shard, from the master.
async fn per_shard(router: &Router) -> BTreeMap<String, i64> {
    let mut counts: BTreeMap<String, i64> = router.config().shard_names().into_iter().map(|n| (n, 0)).collect();
    for (shard, n) in router.placement_counts().await.unwrap() {
        counts.insert(shard, n);
    }
    counts
}

/// Places `n` accounts named `{prefix}-{i}` through `router`.
async fn place_new(router: &Router, prefix: &str, n: usize) -> Vec<(Account, String)> {
    let mut out = Vec::new();
    for i in 0..n {
        let a = Account::new(format!("{prefix}-{i}")).unwrap();
        let shard = router.shard_for(&a).await.unwrap().shard;
        out.push((a, shard));
    }
    out
}

/// Jobs of `account` on `shard`.
async fn jobs_of(router: &Router, shard: &str, account: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM shardq.jobs WHERE account = $1")
        .bind(account)
        .fetch_one(&router.shard(shard).unwrap().pool)
        .await
        .unwrap()
}

/// A fleet whose accounts were placed while only shard_1 and shard_2 were
/// configured, and a router that has just reloaded the three-shard file.
async fn grown_fleet(accounts: usize) -> (Fleet, Arc<Router>) {
    let f = fleet().await;
    let router = Arc::new(Router::connect(&first_shards(&f.config, 2)).await.unwrap());
    place_new(&router, "grown", accounts).await;
    let reloaded = router.reload(&f.config).await.unwrap();
    assert_eq!(reloaded.added, ["shard_3"]);
    (f, router)
}

#[tokio::test]
async fn a_plan_evens_accounts_after_adding_a_shard_and_never_moves_a_pinned_one() {
    let (f, router) = grown_fleet(30).await;
    // Pin two accounts where they are.
    let on_1: Vec<String> = router
        .placements(Some("shard_1"))
        .await
        .unwrap()
        .into_iter()
        .map(|(a, _, _)| a)
        .take(2)
        .collect();
    for a in &on_1 {
        router.pin(&Account::new(a.as_str()).unwrap(), "shard_1").await.unwrap();
    }
    assert_eq!(per_shard(&router).await["shard_3"], 0);
    let rebalancer = Rebalancer::new(router.clone(), MoveOptions::for_config(&f.config));
    let plan = rebalancer.plan(LoadBy::Accounts, 0.0).await.unwrap();
    assert!(!plan.moves.is_empty());
    assert!(plan.moves.iter().all(|m| m.to == "shard_3"), "{plan:?}");
    assert!(
        plan.moves.iter().all(|m| !on_1.contains(&m.account)),
        "a pinned account is in the plan: {plan:?}"
    );
    let after: Vec<u64> = plan.shards.iter().map(|s| s.after).collect();
    assert_eq!(after.iter().sum::<u64>(), 30);
    assert!(
        after.iter().max().unwrap() - after.iter().min().unwrap() <= 1,
        "plan leaves the fleet uneven: {plan:?}"
    );
    // A plan only plans.
    assert_eq!(per_shard(&router).await["shard_3"], 0);
}

#[tokio::test]
async fn apply_moves_the_planned_accounts_and_all_their_jobs_exactly_once() {
    let (f, router) = grown_fleet(12).await;
    let client = Client::new(router.clone());
    for (account, _, _) in router.placements(None).await.unwrap() {
        let a = Account::new(account).unwrap();
        for i in 0..3 {
            let job = NewJob::new("noop", &serde_json::json!({ "i": i }))
                .unwrap()
                .delay(std::time::Duration::from_secs(3600));
            client.enqueue(&a, job).await.unwrap();
        }
    }
    let rebalancer = Rebalancer::new(router.clone(), MoveOptions::for_config(&f.config));
    let plan = rebalancer.plan(LoadBy::Jobs, 0.0).await.unwrap();
    assert!(plan.moves.len() >= 3, "{plan:?}");
    assert!(
        plan.moves.iter().all(|m| m.load == 3),
        "each account has 3 jobs: {plan:?}"
    );
    let options = ApplyOptions {
        concurrency: 2,
        ..ApplyOptions::default()
    };
    let applied = rebalancer.apply(&plan.moves, &options, &|_| {}).await;
    assert_eq!(applied.len(), plan.moves.len());
    for a in &applied {
        a.outcome.as_ref().unwrap();
    }
    let moves = Mover::new(router.clone(), MoveOptions::default())
        .list(1_000)
        .await
        .unwrap();
    for m in &plan.moves {
        let account = Account::new(m.account.as_str()).unwrap();
        assert_eq!(router.placement(&account).await.unwrap().unwrap().0, m.to);
        assert_eq!(
            jobs_of(&router, &m.to, &m.account).await,
            3,
            "{} on {}",
            m.account,
            m.to
        );
        assert_eq!(
            jobs_of(&router, &m.from, &m.account).await,
            0,
            "{} left on {}",
            m.account,
            m.from
        );
        let of_account: Vec<_> = moves.iter().filter(|x| x.account == m.account).collect();
        assert_eq!(of_account.len(), 1, "{} moved {} times", m.account, of_account.len());
        assert_eq!(of_account[0].step, Step::Done);
    }
    let planned: Vec<&str> = plan.moves.iter().map(|m| m.account.as_str()).collect();
    assert!(
        moves.iter().all(|m| planned.contains(&m.account.as_str())),
        "an unplanned account moved"
    );
    let total: i64 = {
        let mut n = 0;
        for db in router.shards() {
            n += sqlx::query_scalar::<_, i64>("SELECT count(*) FROM shardq.jobs")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        }
        n
    };
    assert_eq!(total, 36, "every job exists exactly once");
    // Balanced now: planning again finds nothing to do, and nothing is left in progress.
    assert!(rebalancer.plan(LoadBy::Jobs, 0.0).await.unwrap().moves.is_empty());
    assert!(rebalancer.in_progress().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_drained_shard_is_left_empty_and_takes_no_new_account() {
    let f = fleet().await;
    let stale = Router::connect(&f.config).await.unwrap(); // connected before the drain
    place_new(&f.router, "before", 24).await;
    let pinned = Account::new("pinned-on-2").unwrap();
    f.router.pin(&pinned, "shard_2").await.unwrap();
    let rebalancer = Rebalancer::new(f.router.clone(), MoveOptions::for_config(&f.config));

    // A shard with a pinned account is refused, changing nothing.
    let err = rebalancer
        .drain("shard_2", false, &ApplyOptions::default(), &|_| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("pinned-on-2") && err.contains("--include-pinned"), "{err}");
    let states = f.router.shard_states().await.unwrap();
    assert!(!states.iter().any(|s| s.draining), "{states:?}");

    let held = per_shard(&f.router).await["shard_2"];
    assert!(held > 1);
    let applied = rebalancer
        .drain("shard_2", true, &ApplyOptions::default(), &|_| {})
        .await
        .unwrap();
    assert_eq!(applied.len() as i64, held);
    assert_eq!(per_shard(&f.router).await["shard_2"], 0);
    // The pinned account moved and is still pinned.
    let (home, _) = f.router.placement(&pinned).await.unwrap().unwrap();
    assert_ne!(home, "shard_2");
    assert!(f.router.pinned(&pinned).await.unwrap());
    let states = f.router.shard_states().await.unwrap();
    let s2 = states.iter().find(|s| s.name == "shard_2").unwrap();
    assert!(s2.draining && s2.not_offered.as_deref() == Some("draining"), "{s2:?}");

    // New accounts never land there: neither through the draining router,
    // nor through one that connected before the drain, nor by pinning.
    for (a, shard) in place_new(&f.router, "after", 30).await {
        assert_ne!(shard, "shard_2", "{a} placed on the drained shard");
    }
    for (a, shard) in place_new(&stale, "stale", 30).await {
        assert_ne!(shard, "shard_2", "{a} placed on the drained shard by a stale router");
    }
    let err = f
        .router
        .place(&Account::new("explicit").unwrap(), "shard_2")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ShardNotAccepting { .. }), "{err}");
    assert_eq!(per_shard(&f.router).await["shard_2"], 0);
}

#[tokio::test]
async fn least_loaded_sends_new_accounts_to_the_emptiest_shard() {
    let f = fleet().await;
    for i in 0..10 {
        f.router
            .place(&Account::new(format!("one-{i}")).unwrap(), "shard_1")
            .await
            .unwrap();
        f.router
            .place(&Account::new(format!("two-{i}")).unwrap(), "shard_2")
            .await
            .unwrap();
    }
    let mut config = f.config.clone();
    config.placement = PlacementStrategy::LeastLoaded;
    let router = Router::connect(&config).await.unwrap();
    let first = place_new(&router, "new", 10).await;
    assert!(
        first.iter().all(|(_, s)| s == "shard_3"),
        "the first ten go to the empty shard: {first:?}"
    );
    place_new(&router, "more", 15).await;
    let counts = per_shard(&router).await;
    let (max, min) = (counts.values().max().unwrap(), counts.values().min().unwrap());
    assert!(max - min <= 1, "least loaded keeps shards even: {counts:?}");
    // The ring alone would have given shard_3 only about a third of them.
}

#[tokio::test]
async fn a_running_router_picks_up_a_new_shard_by_reload_and_refuses_to_drop_a_used_one() {
    let f = fleet().await;
    let two = first_shards(&f.config, 2);
    let router = Router::connect(&two).await.unwrap();
    assert!(router.shard("shard_3").is_err());
    for (_, shard) in place_new(&router, "two", 20).await {
        assert_ne!(shard, "shard_3");
    }

    let reloaded = router.reload(&f.config).await.unwrap();
    assert_eq!(reloaded.added, ["shard_3"]);
    assert_eq!(router.shards().len(), 3);
    let db = router.shard("shard_3").unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&db.pool).await.unwrap();
    assert_eq!(one, 1);
    let landed = place_new(&router, "three", 60).await;
    assert!(
        landed.iter().any(|(_, s)| s == "shard_3"),
        "no new account on the new shard"
    );
    // Nothing changed: nothing to do.
    assert!(router.reload(&f.config).await.unwrap().is_empty());

    // Re-weighting takes effect at once: weight 0 takes no new account.
    let mut reweighted = f.config.clone();
    reweighted.shards[2].weight = 0;
    assert_eq!(router.reload(&reweighted).await.unwrap().reweighted, ["shard_3"]);
    for (a, shard) in place_new(&router, "weighted", 40).await {
        assert_ne!(shard, "shard_3", "{a} went to a weight-0 shard");
    }

    // Dropping a shard that holds accounts is refused, naming it, and changes nothing.
    let err = router.reload(&two).await.unwrap_err();
    assert!(matches!(err, Error::ReloadDropsShard { .. }), "{err}");
    assert!(err.to_string().contains("shard_3"), "{err}");
    assert_eq!(router.shards().len(), 3);
}

#[tokio::test]
async fn a_shard_not_migrated_gets_no_accounts_until_it_is() {
    let bed = tokio::task::spawn_blocking(TestBed::shared).await.unwrap().unwrap();
    let dbs = bed.fresh_fleet().await.unwrap();
    let shards: Vec<(&str, &str)> = dbs.shards.iter().map(|s| (s.name.as_str(), s.url.as_str())).collect();
    let config = Config::from_urls(&dbs.master.url, &shards).unwrap();
    let report = Migrator::new(&config)
        .only_shards(["shard_1", "shard_2"])
        .master(true)
        .run()
        .await
        .unwrap();
    assert!(!report.failed(), "{report}");
    let router = Router::connect(&config).await.unwrap();
    for (a, shard) in place_new(&router, "early", 40).await {
        assert_ne!(shard, "shard_3", "{a} placed on a shard not migrated");
    }
    let err = router
        .place(&Account::new("explicit").unwrap(), "shard_3")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ShardNotAccepting { .. }), "{err}");
    assert!(
        err.to_string().contains("shard_3") && err.to_string().contains("migrate"),
        "{err}"
    );
    let states = router.shard_states().await.unwrap();
    let s3 = states.iter().find(|s| s.name == "shard_3").unwrap();
    assert!(
        s3.not_offered.as_deref().is_some_and(|w| w.contains("migrate")),
        "{s3:?}"
    );

    let report = Migrator::new(&config).only_shards(["shard_3"]).run().await.unwrap();
    assert!(!report.failed(), "{report}");
    router.refresh().await;
    let landed = place_new(&router, "late", 60).await;
    assert!(
        landed.iter().any(|(_, s)| s == "shard_3"),
        "a migrated shard is offered again"
    );
}

#[tokio::test]
async fn the_application_role_cannot_write_the_shard_registry() {
    let f = fleet().await; // migrated, and the shards registered, as the owner
    let (_role, app) = app_role(&f, "shardq_reg").await;
    let router = Router::connect(&app).await.unwrap();
    let pool = router.master().pool.clone();
    for sql in [
        "INSERT INTO shardq.shards (name) VALUES ('rogue')",
        "UPDATE shardq.shards SET draining = true",
        "DELETE FROM shardq.shards",
    ] {
        let err = sqlx::query(sql).execute(&pool).await.unwrap_err();
        let code = err.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned());
        assert_eq!(code.as_deref(), Some("42501"), "{sql}: {err}");
    }
    // A placement naming a shard the owner did not register fails on the key.
    let err = sqlx::query("INSERT INTO shardq.placements (account, shard) VALUES ('x', 'rogue')")
        .execute(&pool)
        .await
        .unwrap_err();
    let code = err.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("23503"), "{err}");
    // Draining through the role is refused too; placing accounts still works.
    let err = router.set_draining("shard_1", true).await.unwrap_err();
    assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{err}");
    let p = router.shard_for(&Account::new("app-placed").unwrap()).await.unwrap();
    assert!(p.placed_now);
}
