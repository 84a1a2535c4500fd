//! The router against real servers: placements that never move, race-safe
//! first lookups, pinning, pools per account, a shard that is down, odd
//! account ids, and docker-compose.yml agreeing with shards.toml.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, StreamExt, TryStreamExt};
use shardq_router::ring::Ring;
use shardq_router::{Account, Config, Error, Migrator, Placement, Router};
use shardq_testbed::TestBed;
use shardq_tests::fleet;

/// The bed shared by this test binary.
async fn bed() -> &'static TestBed {
    tokio::task::spawn_blocking(TestBed::shared).await.unwrap().unwrap()
}

/// Migrates every database of `config`.
async fn migrate(config: &Config) {
    let report = Migrator::new(config).run().await.unwrap();
    assert!(!report.failed(), "migration failed:\n{report}");
}

/// The placement of every account in `ids`, 16 lookups at a time.
async fn place_all(router: &Router, ids: impl Iterator<Item = u64>) -> BTreeMap<u64, Placement> {
    stream::iter(ids)
        .map(|i| async move { router.shard_for(&Account::from(i)).await.map(|p| (i, p)) })
        .buffer_unordered(16)
        .try_collect()
        .await
        .unwrap()
}

/// Number of placement rows of `account` in the master.
async fn placement_rows(router: &Router, account: &Account) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM shardq.placements WHERE account = $1")
        .bind(account.as_str())
        .fetch_one(&router.master().pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn adding_a_shard_never_moves_an_existing_account() {
    let bed = bed().await;
    let dbs = bed.fresh_fleet().await.unwrap();
    let three: Vec<(&str, &str)> = dbs.shards.iter().map(|s| (s.name.as_str(), s.url.as_str())).collect();
    let config3 = Config::from_urls(&dbs.master.url, &three).unwrap();
    migrate(&config3).await;
    let router3 = Router::connect(&config3).await.unwrap();
    let before = place_all(&router3, 0..1_000).await;
    assert!(before.values().all(|p| p.placed_now), "every account was new");
    let shards_used: BTreeSet<&str> = before.values().map(|p| p.shard.as_str()).collect();
    assert_eq!(shards_used, BTreeSet::from(["shard_1", "shard_2", "shard_3"]));

    // shard_4: a fresh database on one of the bed's servers.
    let extra = bed.fresh_fleet().await.unwrap();
    let mut four = three.clone();
    four.push(("shard_4", extra.shards[0].url.as_str()));
    let config4 = Config::from_urls(&dbs.master.url, &four).unwrap();
    migrate(&config4).await;
    // The test only means something if the new ring would propose shard_4
    // for some of the existing accounts.
    let ring4 = Ring::new(config4.shards.iter().map(|s| (s.name.as_str(), s.weight)));
    let tempted = (0..1_000u64)
        .filter(|i| ring4.propose(&i.to_string()) == Some("shard_4"))
        .count();
    assert!(tempted > 100, "only {tempted} existing accounts hash to shard_4");

    let router4 = Router::connect(&config4).await.unwrap();
    let after = place_all(&router4, 0..1_000).await;
    for (i, p) in &after {
        assert_eq!(p.shard, before[i].shard, "account {i} moved");
        assert!(!p.placed_now, "account {i} was placed again");
    }
    let new = place_all(&router4, 1_000..3_000).await;
    assert!(new.values().all(|p| p.placed_now));
    let on_4 = new.values().filter(|p| p.shard == "shard_4").count();
    assert!(
        (250..750).contains(&on_4),
        "about a quarter of 2,000 new accounts should go to shard_4, got {on_4}"
    );
    let counts: BTreeMap<String, i64> = router4.placement_counts().await.unwrap().into_iter().collect();
    assert_eq!(counts.values().sum::<i64>(), 3_000);
    assert_eq!(counts["shard_4"], on_4 as i64, "only new accounts are on shard_4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_lookups_agree_and_place_once() {
    let f = fleet().await;
    let other = Arc::new(Router::connect(&f.config).await.unwrap());
    let routers = [f.router.clone(), other];
    for n in 0..10 {
        let account = Account::new(format!("contended-{n}")).unwrap();
        let barrier = Arc::new(tokio::sync::Barrier::new(32));
        let tasks: Vec<_> = (0..32)
            .map(|t| {
                let router = routers[t % 2].clone();
                let account = account.clone();
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    router.shard_for(&account).await.unwrap()
                })
            })
            .collect();
        let mut placements = Vec::new();
        for t in tasks {
            placements.push(t.await.unwrap());
        }
        let shards: BTreeSet<&str> = placements.iter().map(|p| p.shard.as_str()).collect();
        assert_eq!(shards.len(), 1, "{account}: lookups disagree: {shards:?}");
        let placed_now = placements.iter().filter(|p| p.placed_now).count();
        assert_eq!(placed_now, 1, "{account}: {placed_now} calls report placing it");
        assert_eq!(placement_rows(&f.router, &account).await, 1);
        // Both caches hold the one placement.
        for r in &routers {
            assert_eq!(
                r.shard_for(&account).await.unwrap(),
                Placement {
                    shard: placements[0].shard.clone(),
                    placed_now: false
                }
            );
        }
    }
}

#[tokio::test]
async fn place_pins_a_new_account_and_refuses_to_move_it() {
    let f = fleet().await;
    let router = &f.router;
    let acct = Account::new("big-customer").unwrap();
    let p = router.place(&acct, "shard_2").await.unwrap();
    assert_eq!((p.shard.as_str(), p.placed_now), ("shard_2", true));
    assert_eq!(router.shard_for(&acct).await.unwrap().shard, "shard_2");
    // A router with an empty cache reads the pin from the master.
    let fresh = Router::connect(&f.config).await.unwrap();
    assert_eq!(fresh.shard_for(&acct).await.unwrap().shard, "shard_2");

    let again = router.place(&acct, "shard_2").await.unwrap();
    assert_eq!((again.shard.as_str(), again.placed_now), ("shard_2", false));

    match fresh.place(&acct, "shard_1").await {
        Err(Error::AlreadyPlaced {
            account,
            current,
            requested,
        }) => {
            assert_eq!(
                (account.as_str(), current.as_str(), requested.as_str()),
                ("big-customer", "shard_2", "shard_1")
            );
        }
        other => panic!("expected AlreadyPlaced, got {other:?}"),
    }
    assert_eq!(
        fresh.shard_for(&acct).await.unwrap().shard,
        "shard_2",
        "still on shard_2"
    );
    assert_eq!(placement_rows(router, &acct).await, 1);

    // An account placed by the ring cannot be pinned elsewhere either.
    let ringed = Account::new("ringed").unwrap();
    let home = router.shard_for(&ringed).await.unwrap().shard;
    let elsewhere = if home == "shard_1" { "shard_2" } else { "shard_1" };
    assert!(matches!(
        router.place(&ringed, elsewhere).await,
        Err(Error::AlreadyPlaced { .. })
    ));

    let newcomer = Account::new("newcomer").unwrap();
    match router.place(&newcomer, "shard_9").await {
        Err(Error::UnknownShard { shard, known }) => {
            assert_eq!(shard, "shard_9");
            assert_eq!(known, "shard_1, shard_2, shard_3");
        }
        other => panic!("expected UnknownShard, got {other:?}"),
    }
    assert_eq!(
        placement_rows(router, &newcomer).await,
        0,
        "a refused pin places nothing"
    );
}

#[tokio::test]
async fn placements_on_a_shard_missing_from_the_config_fail_only_those_accounts() {
    let f = fleet().await;
    let pinned = Account::new("lives-on-3").unwrap();
    f.router.place(&pinned, "shard_3").await.unwrap();
    let elsewhere = Account::new("lives-on-1").unwrap();
    f.router.place(&elsewhere, "shard_1").await.unwrap();

    let mut without_3 = f.config.clone();
    without_3.shards.retain(|s| s.name != "shard_3");
    // The operator's check still names the missing shard...
    let router = Router::connect(&without_3).await.expect("a router starts anyway");
    match router.check_placements().await {
        Err(e @ Error::PlacementsOnUnknownShards { .. }) => assert!(e.to_string().contains("shard_3"), "{e}"),
        other => panic!("expected PlacementsOnUnknownShards, got {other:?}"),
    }
    // ...routing fails for the accounts placed there, naming account and shard...
    match router.shard_for(&pinned).await {
        Err(e @ Error::AccountOnUnknownShard { .. }) => {
            let text = e.to_string();
            assert!(text.contains("lives-on-3") && text.contains("shard_3"), "{text}");
        }
        other => panic!("expected AccountOnUnknownShard, got {other:?}"),
    }
    // ...and every other account routes as usual.
    assert_eq!(router.shard_for(&elsewhere).await.unwrap().shard, "shard_1");
}

#[tokio::test]
async fn pool_for_gives_the_accounts_shard_for_app_tables() {
    let f = fleet().await;
    let router = &f.router;
    for db in router.shards() {
        sqlx::query("CREATE TABLE app_notes (account text NOT NULL, body text NOT NULL)")
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let mut accounts = Vec::new();
    for shard in ["shard_1", "shard_2", "shard_3"] {
        let a = Account::new(format!("pinned-to-{shard}")).unwrap();
        router.place(&a, shard).await.unwrap();
        accounts.push(a);
    }
    for i in 0..30u64 {
        accounts.push(Account::from(i));
    }
    for a in &accounts {
        let db = router.pool_for(a).await.unwrap();
        assert_eq!(db.name, router.shard_for(a).await.unwrap().shard);
        sqlx::query("INSERT INTO app_notes (account, body) VALUES ($1, 'hello')")
            .bind(a.as_str())
            .execute(&db.pool)
            .await
            .unwrap();
    }
    for a in &accounts {
        let home = router.shard_for(a).await.unwrap().shard;
        for db in router.shards() {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM app_notes WHERE account = $1")
                .bind(a.as_str())
                .fetch_one(&db.pool)
                .await
                .unwrap();
            let expected = i64::from(db.name == home);
            assert_eq!(n, expected, "{a} (placed on {home}) has {n} rows on {}", db.name);
        }
    }
}

#[tokio::test]
async fn a_shard_that_is_down_fails_only_calls_that_need_it() {
    let f = fleet().await;
    let dead = Config::from_urls(
        "postgres://postgres@127.0.0.1:2/unused",
        &[("deadshard", "postgres://app:sup3r-secret@127.0.0.1:1/gone")],
    )
    .unwrap();
    let mut config = f.config.clone();
    let mut shard = dead.shards[0].clone();
    shard.database.pool.acquire_timeout = Duration::from_secs(1);
    config.shards.push(shard);
    let router = Router::connect(&config).await.unwrap();

    let doomed = Account::new("on-the-dead-shard").unwrap();
    let p = router.place(&doomed, "deadshard").await.unwrap();
    assert_eq!(p.shard, "deadshard");
    let db = router.pool_for(&doomed).await.unwrap();
    assert_eq!(db.name, "deadshard");
    let err = sqlx::query("SELECT 1").execute(&db.pool).await.unwrap_err();
    let msg = db.error(err).to_string();
    assert!(msg.contains("shard deadshard"), "{msg}");
    assert!(msg.contains("postgres://app@127.0.0.1:1/gone"), "{msg}");
    assert!(!msg.contains("sup3r-secret"), "password printed: {msg}");
    assert!(!format!("{db:?}").contains("sup3r-secret"), "password in Debug: {db:?}");

    // Accounts on live shards still work, including new ones.
    let alive = Account::new("on-shard-1").unwrap();
    router.place(&alive, "shard_1").await.unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&router.pool_for(&alive).await.unwrap().pool)
        .await
        .unwrap();
    assert_eq!(one, 1);
    let mut live_new = 0;
    for i in 0..20u64 {
        let a = Account::from(i);
        let db = router.pool_for(&a).await.unwrap();
        if db.name != "deadshard" {
            sqlx::query("SELECT 1").execute(&db.pool).await.unwrap();
            live_new += 1;
        }
    }
    assert!(live_new > 0);
}

#[tokio::test]
async fn odd_account_ids_are_just_data() {
    let f = fleet().await;
    let long_unicode = "é".repeat(127); // 254 bytes
    let ids = [
        "O'Brien",
        "\"quoted\"",
        "a;b;c",
        "'; DROP TABLE shardq.placements; --",
        "Robert'); DELETE FROM shardq.shards; --",
        "1 OR 1=1",
        "$1",
        "%_\\",
        "日本語 🚀",
        "  spaced  ",
        long_unicode.as_str(),
    ];
    let fresh = Router::connect(&f.config).await.unwrap();
    for id in ids {
        let a = Account::new(id).unwrap();
        let p = f.router.shard_for(&a).await.unwrap();
        assert!(p.placed_now, "{id:?} was new");
        let stored: Option<String> = sqlx::query_scalar("SELECT account FROM shardq.placements WHERE account = $1")
            .bind(id)
            .fetch_optional(&f.router.master().pool)
            .await
            .unwrap();
        assert_eq!(stored.as_deref(), Some(id));
        assert_eq!(fresh.shard_for(&a).await.unwrap().shard, p.shard, "{id:?}");
    }
    let counts: i64 = f.router.placement_counts().await.unwrap().iter().map(|(_, n)| n).sum();
    assert_eq!(
        counts,
        ids.len() as i64,
        "every id placed exactly once, nothing else touched"
    );

    for bad in [String::new(), "x".repeat(256), "é".repeat(128)] {
        match Account::new(bad.clone()) {
            Err(Error::InvalidAccount { .. }) => {}
            other => panic!("{} bytes accepted: {other:?}", bad.len()),
        }
    }
    assert!(Account::new("x".repeat(255)).is_ok());
}

#[test]
fn docker_compose_agrees_with_shards_toml() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let config = Config::load(format!("{root}/shards.toml")).unwrap();
    let text = std::fs::read_to_string(format!("{root}/docker-compose.yml")).unwrap();
    let mut compose: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    compose.apply_merge().unwrap();
    let services = compose["services"].as_mapping().unwrap();

    let mut databases = vec![("master".to_string(), &config.master.target)];
    databases.extend(config.shards.iter().map(|s| (s.name.clone(), &s.database.target)));
    let names: BTreeSet<&str> = services.keys().map(|k| k.as_str().unwrap()).collect();
    let expected: BTreeSet<&str> = databases.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, expected, "one service per database of shards.toml");

    for (name, target) in &databases {
        let svc = &services[name.as_str()];
        assert_eq!(svc["image"].as_str(), Some("postgres:16"), "{name}: image");
        let ports: Vec<&str> = svc["ports"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{name}: no ports"))
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        assert_eq!(ports, [format!("127.0.0.1:{}:5432", target.port)], "{name}: ports");
        assert_eq!(
            svc["environment"]["POSTGRES_DB"].as_str(),
            Some(target.dbname.as_str()),
            "{name}: POSTGRES_DB"
        );
        let check = svc["healthcheck"]["test"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{name}: no healthcheck"));
        assert!(
            check
                .iter()
                .any(|s| s.as_str().is_some_and(|s| s.contains("pg_isready"))),
            "{name}: healthcheck {check:?}"
        );
    }
}

#[tokio::test]
async fn swapped_shard_addresses_are_an_error_naming_both_not_misrouting() {
    let bed = bed().await;
    let dbs = bed.fresh_fleet().await.unwrap();
    let urls: Vec<(&str, &str)> = dbs.shards.iter().map(|s| (s.name.as_str(), s.url.as_str())).collect();
    let config = Config::from_urls(&dbs.master.url, &urls).unwrap();
    migrate(&config).await;
    // shard_1 and shard_2 swap addresses, as a wrong edit of shards.toml would.
    let mut swapped = urls.clone();
    swapped[0].1 = urls[1].1;
    swapped[1].1 = urls[0].1;
    let swapped = Config::from_urls(&dbs.master.url, &swapped).unwrap();

    let err = Router::connect(&swapped)
        .await
        .err()
        .expect("connect must refuse swapped addresses");
    assert!(matches!(err, Error::ShardStampedAsAnother { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("shard shard_1") && text.contains("stamped as shard shard_2"),
        "{text}"
    );

    // The migrator refuses both databases and runs nothing on them.
    let report = Migrator::new(&swapped).run().await.unwrap();
    let failed: BTreeSet<&str> = report.failures().map(|d| d.database.as_str()).collect();
    assert_eq!(failed, BTreeSet::from(["shard_1", "shard_2"]), "{report}");
    let refused = report.database("shard_1").unwrap().error.as_ref().unwrap();
    assert_eq!(refused.stage, shardq_router::migrator::Stage::Stamp);
    assert!(refused.message.contains("stamped as shard_2"), "{refused}");

    // The right configuration still connects.
    Router::connect(&config).await.unwrap();
}

#[tokio::test]
async fn a_reload_adding_a_shard_with_another_shards_address_is_refused() {
    let bed = bed().await;
    let dbs = bed.fresh_fleet().await.unwrap();
    let urls: Vec<(&str, &str)> = dbs.shards.iter().map(|s| (s.name.as_str(), s.url.as_str())).collect();
    migrate(&Config::from_urls(&dbs.master.url, &urls).unwrap()).await;
    let config = Config::from_urls(&dbs.master.url, &urls[..2]).unwrap();
    let router = Router::connect(&config).await.unwrap();
    // shard_4 is added with shard_3's address.
    let mut wrong = urls[..2].to_vec();
    wrong.push(("shard_4", urls[2].1));
    let wrong = Config::from_urls(&dbs.master.url, &wrong).unwrap();
    let err = router.reload(&wrong).await.unwrap_err();
    assert!(matches!(err, Error::ShardStampedAsAnother { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("shard shard_4") && text.contains("stamped as shard shard_3"),
        "{text}"
    );
    assert_eq!(router.shards().len(), 2, "the refused reload changed nothing");
}
