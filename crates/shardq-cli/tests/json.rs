//! Reports for scripts and errors for people, from the real binary on a
//! real fleet: every `--json` report is one JSON document on stdout and
//! nothing else; an unreachable master names its address and the test bed's
//! `up`; a master that is not migrated says to run `shardq migrate`.
#![allow(clippy::unwrap_used, missing_docs)]

mod finished;

use std::net::TcpListener;
use std::path::Path;

use finished::shardq;
use shardq::{Account, NewJob};
use shardq_testbed::TestBed;
use shardq_tests::{fleet, write_config};

/// Runs a command that prints a report with `--json`; its whole stdout
/// must parse as one JSON document.
async fn json(config: &Path, args: &[&str]) -> serde_json::Value {
    let run = shardq(config, args).await;
    assert!(run.ok, "{args:?} failed:\n{}{}", run.stdout, run.stderr);
    serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: stdout is not one JSON document ({e}):\n{}", run.stdout))
}

#[tokio::test]
async fn every_report_is_one_json_document_on_stdout() {
    let f = fleet().await;
    let placed = Account::new("cli-json-placed").unwrap();
    f.router.place(&placed, "shard_2").await.unwrap();
    f.client
        .enqueue(&placed, NewJob::from_json("noop", serde_json::json!({})))
        .await
        .unwrap();
    f.client.pause_queue("shard_1", "reports", "test").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&f, dir.path(), "");

    let route = json(&config, &["route", "cli-json-placed", "--json"]).await;
    assert_eq!(route["shard"], "shard_2", "{route}");
    assert_eq!(
        (route["placed"].as_bool(), route["epoch"].as_i64()),
        (Some(true), Some(1)),
        "{route}"
    );

    let unplaced = json(&config, &["route", "cli-json-nobody", "--json"]).await;
    assert_eq!(unplaced["placed"], false, "{unplaced}");
    assert!(unplaced["shard"].is_string(), "the proposal: {unplaced}");
    assert_eq!(
        f.router
            .placement(&Account::new("cli-json-nobody").unwrap())
            .await
            .unwrap(),
        None
    );

    let pinned = json(&config, &["route", "cli-json-new", "--pin", "shard_3", "--json"]).await;
    assert_eq!(
        (pinned["shard"].as_str(), pinned["placed_now"].as_bool()),
        (Some("shard_3"), Some(true)),
        "{pinned}"
    );

    let paused = json(&config, &["queues", "paused", "--shard", "shard_1", "--json"]).await;
    assert_eq!(paused.as_array().map(Vec::len), Some(1), "{paused}");
    assert_eq!(
        (paused[0]["queue"].as_str(), paused[0]["paused_by"].as_str()),
        (Some("reports"), Some("test")),
        "{paused}"
    );
    let none = json(&config, &["queues", "paused", "--shard", "shard_2", "--json"]).await;
    assert_eq!(none, serde_json::json!([]));

    // The reports that had --json already stay pure JSON.
    let status = json(&config, &["status", "--json"]).await;
    assert_eq!(status["shards"].as_array().map(Vec::len), Some(3), "{status}");
    let shards = json(&config, &["shards", "list", "--json"]).await;
    assert!(shards.is_array(), "{shards}");
    let accounts = json(&config, &["accounts", "list", "--json"]).await;
    assert_eq!(accounts.as_array().map(Vec::len), Some(2), "{accounts}");
    let shown = json(&config, &["accounts", "show", "cli-json-placed", "--json"]).await;
    assert!(shown.is_object(), "{shown}");
    let moves = json(&config, &["moves", "status", "--json"]).await;
    assert_eq!(moves, serde_json::json!([]));
    let plan = json(&config, &["rebalance", "--plan", "--json"]).await;
    assert!(plan["moves"].is_array(), "{plan}");
    let migrate = json(&config, &["migrate", "status", "--json"]).await;
    assert!(migrate.is_object(), "{migrate}");
    let applied = json(&config, &["rebalance", "--apply", "--json"]).await;
    let planned = plan["moves"].as_array().map(Vec::len);
    assert_eq!(applied.as_array().map(Vec::len), planned, "{applied}");
}

#[tokio::test]
async fn an_unreachable_master_names_its_address_and_the_test_beds_up() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("shards.toml");
    std::fs::write(
        &config,
        format!(
            "[master]\nurl = \"postgres://postgres@127.0.0.1:{port}/shardq\"\n[master.pool]\nacquire_timeout = \"1s\"\n\
             [[shards]]\nname = \"shard_1\"\nurl = \"postgres://postgres@127.0.0.1:{port}/shard_1\"\n"
        ),
    )
    .unwrap();
    let run = shardq(&config, &["route", "acct-1"]).await;
    assert!(!run.ok, "{}", run.stdout);
    let hint = run
        .stderr
        .lines()
        .find(|l| l.starts_with("hint: "))
        .unwrap_or_else(|| panic!("no hint:\n{}", run.stderr));
    assert!(hint.contains(&format!("127.0.0.1:{port}")), "{hint}");
    assert!(
        hint.contains(&format!("`shardq --config {} testbed up`", config.display())),
        "{hint}"
    );
}

#[tokio::test]
async fn a_master_not_migrated_says_to_run_migrate() {
    let bed = tokio::task::spawn_blocking(TestBed::shared).await.unwrap().unwrap();
    let dbs = bed.fresh_fleet().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("shards.toml");
    let mut text = format!("[master]\nurl = \"{}\"\n", dbs.master.url);
    for s in &dbs.shards {
        text.push_str(&format!("[[shards]]\nname = \"{}\"\nurl = \"{}\"\n", s.name, s.url));
    }
    std::fs::write(&config, text).unwrap();
    let run = shardq(&config, &["route", "acct-1"]).await;
    assert!(!run.ok, "{}", run.stdout);
    assert!(
        run.stderr.contains(&format!(
            "is not migrated: run `shardq --config {} migrate`",
            config.display()
        )),
        "{}",
        run.stderr
    );
}
