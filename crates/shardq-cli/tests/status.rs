//! The `shardq status` command on a real fleet: `--json` gives every shard
//! with its queues' counts, and the table names every shard and queue.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::Path;
use std::process::Command;

use shardq::{Account, NewJob};
use shardq_tests::{fleet, write_config};

fn status(config: &Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardq"))
        .arg("--config")
        .arg(config)
        .arg("status")
        .args(extra)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap())
}

#[tokio::test]
async fn status_prints_every_shard_and_the_queues_counts() {
    let f = fleet().await;
    let account = Account::new("cli-status").unwrap();
    f.router.place(&account, "shard_3").await.unwrap();
    for _ in 0..7 {
        f.client
            .enqueue(
                &account,
                NewJob::from_json("noop", serde_json::json!({})).queue("reports"),
            )
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&f, dir.path(), "");

    let (ok, json) = tokio::task::spawn_blocking({
        let config = config.clone();
        move || status(&config, &["--json"])
    })
    .await
    .unwrap();
    assert!(ok, "status exits 0 when the fleet is ready:\n{json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["status"], "ready", "{json}");
    let shards = v["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 3, "{json}");
    assert_eq!(shards[2]["health"]["name"], "shard_3", "{json}");
    assert_eq!(shards[2]["queues"][0]["queue"], "reports", "{json}");
    assert_eq!(shards[2]["queues"][0]["available"], 7, "{json}");
    assert_eq!(shards[0]["queues"], serde_json::json!([]), "{json}");

    let (ok, table) = tokio::task::spawn_blocking(move || status(&config, &[])).await.unwrap();
    assert!(ok, "{table}");
    for shard in ["master", "shard_1", "shard_2", "shard_3"] {
        assert!(table.contains(shard), "{shard} missing:\n{table}");
    }
    let row = table.lines().find(|l| l.trim_start().starts_with("reports")).unwrap();
    assert_eq!(row.split_whitespace().nth(1), Some("7"), "{table}");
}
