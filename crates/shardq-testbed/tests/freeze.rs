//! A frozen server keeps its sockets but answers nothing until thawed; stop,
//! kill and dropping the bed all work on a frozen server.
#![allow(clippy::unwrap_used)]

use std::thread;
use std::time::{Duration, Instant};

use shardq_testbed::{Server, TestBed};
use sqlx::{Connection, PgConnection};

/// How long a client waits before calling a server silent. A live server
/// on loopback answers in milliseconds.
const SILENCE: Duration = Duration::from_secs(1);
/// Deadline for a thawed server to answer again.
const ANSWER: Duration = Duration::from_secs(30);

/// Polls `cond` every 50 ms until it holds or `deadline` passes.
fn wait_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + deadline;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Connects to `url` and runs `SELECT 1`, all within `deadline`; `None`
/// when the server did not answer in time.
async fn select_one_within(url: &str, deadline: Duration) -> Option<i32> {
    tokio::time::timeout(deadline, async {
        let mut conn = PgConnection::connect(url).await.unwrap();
        let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut conn).await.unwrap();
        conn.close().await.unwrap();
        one
    })
    .await
    .ok()
}

/// The postmaster's pid, from `postmaster.pid`.
fn postmaster_pid(server: &Server) -> u32 {
    let text = std::fs::read_to_string(server.data_dir().join("postmaster.pid")).unwrap();
    text.lines().next().unwrap().trim().parse().unwrap()
}

/// The state letter of a process (`T` = stopped), or `None` once it is gone.
fn state(pid: u32) -> Option<char> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    text[text.rfind(')')? + 1..].split_whitespace().next()?.chars().next()
}

#[tokio::test]
async fn a_frozen_server_answers_nothing_until_thawed() {
    let bed = TestBed::start(1).unwrap();
    let shard = bed.server("shard_1").unwrap();
    let url = shard.url("postgres");
    let mut open = PgConnection::connect(&url).await.unwrap();
    let pid = postmaster_pid(shard);

    shard.freeze().unwrap();
    assert_eq!(state(pid), Some('T'), "postmaster {pid} is not stopped");
    shard.freeze().unwrap(); // idempotent
    let query = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&mut open);
    assert!(
        tokio::time::timeout(SILENCE, query).await.is_err(),
        "a frozen server answered a query on an open connection"
    );
    assert_eq!(
        select_one_within(&url, SILENCE).await,
        None,
        "a frozen server accepted a new connection"
    );
    assert_eq!(
        select_one_within(&bed.master().url("postgres"), ANSWER).await,
        Some(1),
        "the master stopped answering while shard_1 was frozen"
    );

    shard.thaw().unwrap();
    assert_eq!(select_one_within(&url, ANSWER).await, Some(1), "thawed server");
    shard.thaw().unwrap(); // nothing frozen: nothing to do

    // Stopping or crashing a frozen server thaws it first (a stopped
    // postmaster would ignore pg_ctl).
    shard.freeze().unwrap();
    shard.kill().unwrap();
    assert!(!shard.is_accepting());
    shard.thaw().unwrap(); // not running: nothing to do
    assert!(shard.freeze().unwrap_err().to_string().contains("shard_1"));
    shard.start().unwrap();
    assert_eq!(select_one_within(&url, ANSWER).await, Some(1), "restarted server");

    // Dropping the bed stops a frozen server too.
    shard.freeze().unwrap();
    let pid = postmaster_pid(shard);
    let dir = bed.dir().to_path_buf();
    drop(bed);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        wait_until(ANSWER, || matches!(state(pid), None | Some('Z'))),
        "the frozen postmaster {pid} outlived its bed (state {:?})",
        state(pid)
    );
}
