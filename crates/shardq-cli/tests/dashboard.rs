//! `shardq dashboard` and `shardq queues` on a real fleet: the dashboard
//! serves the fleet page on the address it prints, is read-only without a
//! token and asks for the token with one; `queues pause|paused|resume`
//! change and show one shard's paused queues.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use shardq_tests::{fleet, write_config};

/// A `shardq dashboard` process, killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `shardq dashboard` on a free port; returns it and its base URL.
fn dashboard(config: &Path, token: Option<&str>) -> (Running, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shardq"));
    command
        .arg("--config")
        .arg(config)
        .args(["dashboard", "--addr", "127.0.0.1:0"])
        .env_remove("SHARDQ_DASHBOARD_TOKEN")
        .stderr(Stdio::piped())
        .stdout(Stdio::null());
    if let Some(token) = token {
        command.env("SHARDQ_DASHBOARD_TOKEN", token);
    }
    let mut child = command.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let running = Running(child);
    let mut line = String::new();
    BufReader::new(stderr).read_line(&mut line).unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    (running, url)
}

fn shardq(config: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shardq"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn get(url: &str) -> (u16, String) {
    let response = reqwest::get(url).await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn the_dashboard_command_serves_read_only_without_a_token_and_asks_for_it_with_one() {
    let f = fleet().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&f, dir.path(), "");

    let (_ro, url) = dashboard(&config, None);
    let (code, html) = get(&format!("{url}/")).await;
    assert_eq!(code, 200, "{html}");
    assert!(html.contains("data-name=\"shard_3\" data-state=\"up\""), "{html}");
    assert!(html.contains("read-only"), "{html}");
    let (code, _) = get(&format!("{url}/actions/confirm?action=pause&shard=shard_1&queue=mail")).await;
    assert_eq!(code, 403);

    let (_rw, url) = dashboard(&config, Some("cli-token"));
    let (code, html) = get(&format!("{url}/actions/confirm?action=pause&shard=shard_1&queue=mail")).await;
    assert_eq!(code, 200, "{html}");
    assert!(html.contains("name=\"token\""), "{html}");
}

#[tokio::test]
async fn queues_pause_and_resume_one_shard() {
    let f = fleet().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&f, dir.path(), "");
    let run = |args: &'static [&'static str]| {
        let config = config.clone();
        tokio::task::spawn_blocking(move || shardq(&config, args))
    };
    let (ok, out) = run(&["queues", "pause", "--shard", "shard_1", "mail"]).await.unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("queue mail paused on shard shard_1"), "{out}");
    let (ok, out) = run(&["queues", "paused", "--shard", "shard_1"]).await.unwrap();
    assert!(ok && out.starts_with("mail\t"), "{out}");
    assert_eq!(f.client.paused_queues("shard_1").await.unwrap().len(), 1);
    assert!(f.client.paused_queues("shard_2").await.unwrap().is_empty());
    let (ok, out) = run(&["queues", "resume", "--shard", "shard_1", "mail"]).await.unwrap();
    assert!(ok && out.contains("resumed"), "{out}");
    assert!(f.client.paused_queues("shard_1").await.unwrap().is_empty());
    let (ok, out) = run(&["queues", "pause", "--shard", "nowhere", "mail"]).await.unwrap();
    assert!(!ok && out.contains("nowhere"), "{out}");
}
