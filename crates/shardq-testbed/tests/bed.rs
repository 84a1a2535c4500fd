//! Starts real servers: a two-shard bed, faults on one shard, cleanup at
//! exit, and the server user's access check.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use shardq_testbed::{Server, TestBed};
use sqlx::{Connection, PgConnection};

/// Polls `cond` every 50 ms until it holds or `secs` pass.
fn wait_until(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

async fn select_one(url: &str) {
    let mut conn = PgConnection::connect(url).await.unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut conn).await.unwrap();
    assert_eq!(one, 1);
    conn.close().await.unwrap();
}

#[tokio::test]
async fn two_shard_bed_fleets_and_faults() {
    let bed = TestBed::start(2).unwrap();
    let names: Vec<&str> = bed.servers().map(Server::name).collect();
    assert_eq!(names, ["master", "shard_1", "shard_2"]);
    assert!(bed.servers().all(Server::is_accepting));
    assert!(bed.server("shard_9").unwrap_err().to_string().contains("shard_9"));

    let first = bed.fresh_fleet().await.unwrap();
    let second = bed.fresh_fleet().await.unwrap();
    assert_ne!(first.master.url, second.master.url);
    assert_eq!(first.shards.len(), 2);
    assert_eq!(second.shards[1].name, "shard_2");
    for db in [&first, &second]
        .into_iter()
        .flat_map(|f| std::iter::once(&f.master).chain(&f.shards))
    {
        select_one(&db.url).await;
    }

    let shard = bed.server("shard_1").unwrap();
    shard.kill().unwrap();
    assert!(!shard.is_accepting());
    assert!(bed.master().is_accepting() && bed.shards()[1].is_accepting());
    shard.start().unwrap();
    assert!(shard.is_accepting());
    shard.start().unwrap(); // idempotent
    shard.restart().unwrap();
    select_one(&first.shards[0].url).await;

    let dir = bed.dir().to_path_buf();
    let port = bed.master().port();
    drop(bed);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(!Server::new("probe", port, &dir).unwrap().is_accepting());
}

const CHILD_ENV: &str = "SHARDQ_TESTBED_GUARD_CHILD";

/// Run by `killed_process_cleans_up` as a separate process: starts a bed,
/// freezes shard_1, reports the bed and that postmaster's pid, and blocks
/// until killed.
#[test]
fn guard_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let bed = TestBed::shared().unwrap();
    // A frozen server must not keep the guard from stopping it.
    let frozen = bed.server("shard_1").unwrap();
    frozen.freeze().unwrap();
    let pid = std::fs::read_to_string(frozen.data_dir().join("postmaster.pid")).unwrap();
    let pid = pid.lines().next().unwrap();
    println!("BED {} {} {pid}", bed.master().port(), bed.dir().display());
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
}

#[test]
fn killed_process_cleans_up() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "guard_child", "--nocapture"])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let report = stdout
        .lines()
        .map(Result::unwrap)
        .find_map(|line| line.strip_prefix("BED ").map(str::to_owned))
        .expect("child reported its bed");
    let (port, rest) = report.split_once(' ').unwrap();
    let (dir, frozen_pid) = rest.rsplit_once(' ').unwrap();
    let (port, dir): (u16, PathBuf) = (port.parse().unwrap(), dir.into());
    let master = Server::new("master", port, dir.join("master")).unwrap();
    assert!(master.is_accepting());

    child.kill().unwrap(); // SIGKILL: no destructor runs
    child.wait().unwrap();
    assert!(wait_until(60, || !dir.exists()), "{} left behind", dir.display());
    assert!(!master.is_accepting());
    // The guard thawed the frozen shard before stopping it: its postmaster
    // is gone (or a zombie about to be reaped), not stopped forever.
    let stat = format!("/proc/{frozen_pid}/stat");
    assert!(
        wait_until(30, || std::fs::read_to_string(&stat)
            .map_or(true, |s| s.contains(") Z "))),
        "the frozen postmaster {frozen_pid} outlived the killed process"
    );
}

#[test]
fn unreachable_data_dir_is_reported() {
    if !nix::unistd::Uid::effective().is_root() {
        return; // only root switches to another user
    }
    // A root-owned directory with mode 0700 is closed to `postgres`.
    let closed = tempfile::tempdir().unwrap();
    let mode = std::os::unix::fs::PermissionsExt::from_mode(0o700);
    std::fs::set_permissions(closed.path(), mode).unwrap();
    let server = Server::new("closed", 1, closed.path().join("testbed/closed")).unwrap();
    let msg = server.init().unwrap_err().to_string();
    let blocked = format!("cannot enter or write {};", closed.path().display());
    assert!(msg.contains(&blocked) && msg.contains("testbed/closed"), "{msg}");
}
