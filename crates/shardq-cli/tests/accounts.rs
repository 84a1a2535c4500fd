//! `shardq accounts` and `shardq moves` as real processes on a real fleet:
//! `accounts move` carries an account's rows and jobs and `moves status`
//! shows the move done; a mover SIGKILLed while it waits for a running job
//! is finished by `moves resume` with exactly one copy of everything; and
//! `shardq route` on an unknown account does not place it; `rebalance`
//! plans and applies, `shards drain` empties a shard; a worker reloads
//! shards.toml on SIGHUP.
#![allow(clippy::unwrap_used, missing_docs)]

mod finished;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use finished::shardq;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use shardq::{Account, NewJob};
use shardq_tests::{count_state, fleet, wait_for, write_config, Fleet};

const WAIT: Duration = Duration::from_secs(30);

/// A `shardq` child process with its output in files; SIGKILLed and reaped
/// on drop if still running.
struct Process {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Process {
    fn spawn(config: &Path, name: &str, args: &[&str], dir: &Path) -> Process {
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        let child = Command::new(env!("CARGO_BIN_EXE_shardq"))
            .arg("--config")
            .arg(config)
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Process { child, stdout, stderr }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).unwrap())
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits (with a deadline) for the process to exit on its own.
    async fn exited(&mut self, what: &str) -> ExitStatus {
        let mut status = None;
        wait_for(what, WAIT, || {
            status = self.child.try_wait().unwrap();
            std::future::ready(status.is_some())
        })
        .await;
        status.unwrap()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The application's account-scoped table, on every shard.
async fn create_docs(f: &Fleet) {
    for db in f.router.shards() {
        sqlx::raw_sql(
            "CREATE TABLE docs (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
                                account text NOT NULL, title text NOT NULL)",
        )
        .execute(&db.pool)
        .await
        .unwrap();
    }
}

/// Rows of `account` in `docs` on `shard`.
async fn docs_on(f: &Fleet, shard: &str, account: &Account) -> i64 {
    let db = f.router.shard(shard).unwrap();
    sqlx::query_scalar("SELECT count(*) FROM docs WHERE account = $1")
        .bind(account.as_str())
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// The account's jobs on `shard` as (kind, args, queue, state), sorted.
async fn jobs_on(f: &Fleet, shard: &str, account: &Account) -> Vec<(String, String, String, String)> {
    let db = f.router.shard(shard).unwrap();
    sqlx::query_as(
        "SELECT kind, args::text, queue, state FROM shardq.jobs WHERE account = $1
          ORDER BY kind, args::text, queue, state",
    )
    .bind(account.as_str())
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// The account's placement (shard, epoch) in the master.
async fn placement(f: &Fleet, account: &str) -> Option<(String, i64)> {
    sqlx::query_as("SELECT shard, epoch FROM shardq.placements WHERE account = $1")
        .bind(account)
        .fetch_optional(&f.router.master().pool)
        .await
        .unwrap()
}

/// The account's move (id, step) in the master, if it has one.
async fn move_of(f: &Fleet, account: &str) -> Option<(i64, String)> {
    sqlx::query_as("SELECT id, step FROM shardq.moves WHERE account = $1 ORDER BY id DESC LIMIT 1")
        .bind(account)
        .fetch_optional(&f.router.master().pool)
        .await
        .unwrap()
}

/// Gives `account` (pinned to shard_1 by `accounts pin`) 40 rows of docs
/// and 30 jobs in queue `later`, which no worker of these tests works.
async fn an_account_on_shard_1(f: &Fleet, config: &Path, name: &str) -> Account {
    let a = Account::new(name).unwrap();
    let pin = shardq(config, &["accounts", "pin", name, "--to", "shard_1"]).await;
    assert!(pin.ok, "{}{}", pin.stdout, pin.stderr);
    assert_eq!(pin.stdout.trim(), format!("{name}: placed on shard_1"));
    let db = f.router.shard("shard_1").unwrap();
    for i in 0..40 {
        sqlx::query("INSERT INTO docs (account, title) VALUES ($1, $2)")
            .bind(a.as_str())
            .bind(format!("doc {i}"))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    for i in 0..30 {
        let job = NewJob::from_json("noop", serde_json::json!({ "i": i })).queue("later");
        f.client.enqueue(&a, job).await.unwrap();
    }
    a
}

/// `moves status --json`: the move with `id`.
async fn status_of(config: &Path, id: i64) -> serde_json::Value {
    let status = shardq(config, &["moves", "status", "--json"]).await;
    assert!(status.ok, "{}", status.stderr);
    let moves: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    moves
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("move {id} not listed:\n{}", status.stdout))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_move_carries_rows_and_jobs_and_moves_status_shows_it_done() {
    let f = fleet().await;
    create_docs(&f).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&f, dir.path(), "");
    let a = an_account_on_shard_1(&f, &config, "cli-move-1").await;
    let before = jobs_on(&f, "shard_1", &a).await;
    assert_eq!(before.len(), 30);

    let shown = shardq(&config, &["accounts", "show", "cli-move-1", "--json"]).await;
    assert!(shown.ok, "{}", shown.stderr);
    let v: serde_json::Value = serde_json::from_str(&shown.stdout).unwrap();
    assert_eq!(
        (v["shard"].as_str(), v["epoch"].as_i64()),
        (Some("shard_1"), Some(1)),
        "{v}"
    );
    assert_eq!(v["jobs"], serde_json::json!({ "available": 30 }), "{v}");

    let moved = shardq(
        &config,
        &[
            "accounts",
            "move",
            "cli-move-1",
            "--to",
            "shard_2",
            "--table",
            "docs:account",
        ],
    )
    .await;
    assert!(moved.ok, "{}\n{}", moved.stdout, moved.stderr);
    for step in ["paused", "fenced", "copied", "switched", "done"] {
        assert!(
            moved.stdout.lines().any(|l| l.trim_start().starts_with(step)),
            "a progress line for {step}:\n{}",
            moved.stdout
        );
    }

    assert_eq!(
        (docs_on(&f, "shard_1", &a).await, docs_on(&f, "shard_2", &a).await),
        (0, 40)
    );
    assert!(jobs_on(&f, "shard_1", &a).await.is_empty(), "no job left behind");
    assert_eq!(jobs_on(&f, "shard_2", &a).await, before, "every job once");
    assert_eq!(placement(&f, "cli-move-1").await, Some(("shard_2".into(), 2)));

    let (id, step) = move_of(&f, "cli-move-1").await.unwrap();
    assert_eq!(step, "done");
    let m = status_of(&config, id).await;
    assert_eq!(
        (
            m["account"].as_str(),
            m["from"].as_str(),
            m["to"].as_str(),
            m["step"].as_str()
        ),
        (Some("cli-move-1"), Some("shard_1"), Some("shard_2"), Some("done")),
        "{m}"
    );

    let listed = shardq(&config, &["accounts", "list", "--shard", "shard_2", "--json"]).await;
    assert!(listed.ok, "{}", listed.stderr);
    let rows: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(
        (rows[0]["account"].as_str(), rows[0]["epoch"].as_i64()),
        (Some("cli-move-1"), Some(2))
    );
    let shown = shardq(&config, &["accounts", "show", "cli-move-1", "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(&shown.stdout).unwrap();
    assert_eq!(
        (v["shard"].as_str(), v["epoch"].as_i64()),
        (Some("shard_2"), Some(2)),
        "{v}"
    );
    assert_eq!(v["jobs"], serde_json::json!({ "available": 30 }), "{v}");

    // Refusals name what is wrong and exit non-zero.
    let again = shardq(&config, &["accounts", "move", "cli-move-1", "--to", "shard_2"]).await;
    assert!(!again.ok);
    assert!(again.stderr.contains("already on shard shard_2"), "{}", again.stderr);
    let nowhere = shardq(&config, &["accounts", "move", "cli-move-1", "--to", "shard_9"]).await;
    assert!(!nowhere.ok);
    assert!(nowhere.stderr.contains("shard_9"), "{}", nowhere.stderr);
    let bad = shardq(
        &config,
        &["accounts", "move", "cli-move-1", "--to", "shard_3", "--table", "docs"],
    )
    .await;
    assert!(!bad.ok);
    assert!(bad.stderr.contains("TABLE:COLUMN"), "{}", bad.stderr);
    let unknown = shardq(&config, &["moves", "resume", "999999"]).await;
    assert!(!unknown.ok);
    assert!(unknown.stderr.contains("no move has id 999999"), "{}", unknown.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mover_sigkilled_while_it_waits_for_a_running_job_is_finished_by_moves_resume() {
    let f = fleet().await;
    create_docs(&f).await;
    let dir = tempfile::tempdir().unwrap();
    // The table is declared in the configuration: neither the mover nor
    // the resume names it.
    let config = write_config(&f, dir.path(), "[[accounts.tables]]\ntable = \"docs\"\n");
    let a = an_account_on_shard_1(&f, &config, "cli-move-2").await;
    let long = NewJob::from_json("sleep", serde_json::json!({ "ms": 600_000 }));
    f.client.enqueue(&a, long).await.unwrap();

    let mut worker = Process::spawn(
        &config,
        "worker",
        &[
            "worker",
            "--queues",
            "default=4",
            "--grace",
            "200ms",
            "--lease",
            "2s",
            "--heartbeat",
            "500ms",
        ],
        dir.path(),
    );
    wait_for("the worker to run the account's long job", WAIT, || async {
        count_state(&f.router, "shard_1", "running").await == 1
    })
    .await;
    let before = jobs_on(&f, "shard_1", &a).await;
    assert_eq!(before.len(), 31);

    // A move that cannot wait long enough fails naming the cause and how to
    // go on, and is then aborted: the account stays, unfenced.
    let short = shardq(
        &config,
        &[
            "accounts",
            "move",
            "cli-move-2",
            "--to",
            "shard_2",
            "--running-wait",
            "1s",
        ],
    )
    .await;
    assert!(!short.ok, "{}", short.stdout);
    assert!(
        short.stderr.contains("still running on shard shard_1") && short.stderr.contains("shardq moves resume"),
        "{}",
        short.stderr
    );
    let (first, step) = move_of(&f, "cli-move-2").await.unwrap();
    assert_eq!(step, "paused", "stopped waiting for the running job");
    let aborted = shardq(&config, &["moves", "abort", &first.to_string()]).await;
    assert!(aborted.ok, "{}", aborted.stderr);
    assert!(aborted.stdout.contains("stays on shard shard_1"), "{}", aborted.stdout);
    assert_eq!(move_of(&f, "cli-move-2").await, Some((first, "aborted".into())));
    f.client
        .enqueue(
            &a,
            NewJob::from_json("noop", serde_json::json!({ "after": "abort" })).queue("later"),
        )
        .await
        .unwrap();
    let before = jobs_on(&f, "shard_1", &a).await;
    assert_eq!(before.len(), 32, "the aborted move lifted the fence");

    let mut mover = Process::spawn(
        &config,
        "mover",
        &["accounts", "move", "cli-move-2", "--to", "shard_2"],
        dir.path(),
    );
    wait_for(
        "the move to pause the account's claims and wait for the running job",
        WAIT,
        || async {
            move_of(&f, "cli-move-2")
                .await
                .is_some_and(|(_, step)| step == "paused")
        },
    )
    .await;
    wait_for("the mover to print its paused line", WAIT, || {
        std::future::ready(mover.output().contains("paused"))
    })
    .await;
    assert!(
        mover.running(),
        "the mover waits for the running job:\n{}",
        mover.output()
    );
    mover.child.kill().unwrap(); // SIGKILL
    mover.child.wait().unwrap();
    let (id, step) = move_of(&f, "cli-move-2").await.unwrap();
    assert_eq!(step, "paused", "killed mid-move");
    assert_eq!(status_of(&config, id).await["step"], "paused");
    assert_eq!(placement(&f, "cli-move-2").await, Some(("shard_1".into(), 1)));
    assert_eq!(docs_on(&f, "shard_2", &a).await, 0, "nothing copied yet");

    // The operator stops the worker: it hands the running job back.
    signal::kill(worker.pid(), Signal::SIGTERM).unwrap();
    let status = worker.exited("the worker to exit after SIGTERM").await;
    assert!(status.success(), "{status}; {}", worker.output());
    assert_eq!(count_state(&f.router, "shard_1", "running").await, 0);

    let resumed = shardq(&config, &["moves", "resume", &id.to_string()]).await;
    assert!(resumed.ok, "{}\n{}", resumed.stdout, resumed.stderr);
    assert!(resumed.stdout.contains("done"), "{}", resumed.stdout);
    assert!(
        resumed.stdout.contains("docs(account)"),
        "the declared table: {}",
        resumed.stdout
    );

    assert_eq!(move_of(&f, "cli-move-2").await, Some((id, "done".into())));
    assert_eq!(status_of(&config, id).await["step"], "done");
    assert_eq!(placement(&f, "cli-move-2").await, Some(("shard_2".into(), 2)));
    assert_eq!(
        (docs_on(&f, "shard_1", &a).await, docs_on(&f, "shard_2", &a).await),
        (0, 40),
        "one copy of the rows"
    );
    assert!(jobs_on(&f, "shard_1", &a).await.is_empty(), "no job left behind");
    let after = jobs_on(&f, "shard_2", &a).await;
    let expected: Vec<_> = before
        .into_iter()
        .map(|(kind, args, queue, state)| {
            let state = if state == "running" {
                "available".to_string()
            } else {
                state
            };
            (kind, args, queue, state)
        })
        .collect();
    assert_eq!(
        after, expected,
        "one copy of every job; the handed-back one waits on shard_2"
    );

    let again = shardq(&config, &["moves", "resume", &id.to_string()]).await;
    assert!(again.ok, "{}", again.stderr);
    assert!(again.stdout.contains("nothing to do"), "{}", again.stdout);
    let abort = shardq(&config, &["moves", "abort", &id.to_string()]).await;
    assert!(!abort.ok, "a finished move cannot be aborted");
    assert!(abort.stderr.contains("cli-move-2"), "{}", abort.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_on_an_unknown_account_does_not_place_it() {
    let f = fleet().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&f, dir.path(), "");

    let looked = shardq(&config, &["route", "cli-typo"]).await;
    assert!(looked.ok, "{}", looked.stderr);
    assert!(looked.stdout.contains("not placed"), "{}", looked.stdout);
    let proposed = looked.stdout.split_whitespace().next().unwrap().to_string();
    assert!(proposed.starts_with("shard_"), "{}", looked.stdout);
    assert_eq!(placement(&f, "cli-typo").await, None, "route placed nothing");
    let again = shardq(&config, &["route", "cli-typo"]).await;
    assert_eq!(again.stdout, looked.stdout, "the same proposal, still not placed");

    let show = shardq(&config, &["accounts", "show", "cli-typo"]).await;
    assert!(!show.ok);
    assert!(
        show.stderr.contains("cli-typo") && show.stderr.contains("not placed"),
        "{}",
        show.stderr
    );
    let moved = shardq(&config, &["accounts", "move", "cli-typo", "--to", "shard_3"]).await;
    assert!(!moved.ok);
    assert!(
        moved.stderr.contains("cli-typo") && moved.stderr.contains("not placed"),
        "{}",
        moved.stderr
    );
    assert_eq!(placement(&f, "cli-typo").await, None, "a refused move placed nothing");

    let pinned = shardq(&config, &["route", "cli-typo", "--pin", "shard_3"]).await;
    assert!(pinned.ok, "{}", pinned.stderr);
    assert_eq!(pinned.stdout.trim(), "shard_3 (placed now)");
    assert_eq!(placement(&f, "cli-typo").await, Some(("shard_3".into(), 1)));
    let routed = shardq(&config, &["route", "cli-typo"]).await;
    assert_eq!(routed.stdout.trim(), "shard_3");
    // Pinning a placed account elsewhere moves it there first, then pins it.
    let repin = shardq(&config, &["accounts", "pin", "cli-typo", "--to", "shard_1"]).await;
    assert!(repin.ok, "{}{}", repin.stdout, repin.stderr);
    assert!(repin.stdout.contains("done"), "a line per step: {}", repin.stdout);
    assert!(
        repin.stdout.trim_end().ends_with("cli-typo: pinned to shard_1"),
        "{}",
        repin.stdout
    );
    assert_eq!(placement(&f, "cli-typo").await, Some(("shard_1".into(), 2)));
    let shown = shardq(&config, &["accounts", "show", "cli-typo", "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(&shown.stdout).unwrap();
    assert_eq!(v["pinned"], serde_json::Value::Bool(true), "{}", shown.stdout);
    let unknown = shardq(&config, &["accounts", "pin", "cli-typo", "--to", "shard_9"]).await;
    assert!(!unknown.ok && unknown.stderr.contains("shard_9"), "{}", unknown.stderr);
}

/// Accounts per shard, from the master.
async fn accounts_per_shard(f: &Fleet) -> Vec<(String, i64)> {
    sqlx::query_as("SELECT shard, count(*) FROM shardq.placements GROUP BY shard ORDER BY shard")
        .fetch_all(&f.router.master().pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn rebalance_plans_then_applies_and_shards_drain_empties_a_shard() {
    let f = fleet().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&f, dir.path(), "");
    for i in 0..12 {
        f.router
            .place(&Account::new(format!("cli-heavy-{i}")).unwrap(), "shard_1")
            .await
            .unwrap();
    }

    let plan = shardq(&config, &["rebalance", "--plan", "--json", "--tolerance", "0"]).await;
    assert!(plan.ok, "{}", plan.stderr);
    let v: serde_json::Value = serde_json::from_str(&plan.stdout).unwrap();
    let moves = v["moves"].as_array().unwrap();
    assert_eq!(moves.len(), 8, "{}", plan.stdout);
    assert!(moves.iter().all(|m| m["from"] == "shard_1"), "{}", plan.stdout);
    assert_eq!(
        accounts_per_shard(&f).await,
        [("shard_1".to_string(), 12)],
        "--plan changes nothing"
    );

    let applied = shardq(
        &config,
        &["rebalance", "--apply", "--tolerance", "0", "--concurrency", "2"],
    )
    .await;
    assert!(applied.ok, "{}{}", applied.stdout, applied.stderr);
    assert_eq!(applied.stdout.matches("  moved  ").count(), 8, "{}", applied.stdout);
    let even: Vec<(String, i64)> = ["shard_1", "shard_2", "shard_3"]
        .iter()
        .map(|s| (s.to_string(), 4))
        .collect();
    assert_eq!(accounts_per_shard(&f).await, even);

    let drained = shardq(&config, &["shards", "drain", "shard_3"]).await;
    assert!(drained.ok, "{}{}", drained.stdout, drained.stderr);
    assert_eq!(drained.stdout.matches("  moved  ").count(), 4, "{}", drained.stdout);
    let listed = shardq(&config, &["shards", "list", "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    let s3 = v.as_array().unwrap().iter().find(|s| s["name"] == "shard_3").unwrap();
    assert_eq!(
        (s3["draining"].as_bool(), s3["accounts"].as_i64()),
        (Some(true), Some(0)),
        "{s3}"
    );
    assert!(accounts_per_shard(&f).await.iter().all(|(s, _)| s != "shard_3"));
}

#[tokio::test]
async fn a_worker_reloads_shards_toml_on_sighup_and_keeps_running_on_a_bad_one() {
    let f = fleet().await;
    let dir = tempfile::tempdir().unwrap();
    // Start with two of the three shards.
    let mut two = Fleet {
        config: f.config.clone(),
        router: f.router.clone(),
        client: f.client.clone(),
    };
    two.config.shards.truncate(2);
    let config = write_config(&two, dir.path(), "");
    let mut worker = Process::spawn(
        &config,
        "worker",
        &["worker", "--queues", "default=2", "--grace", "1s"],
        dir.path(),
    );
    wait_for("the worker to run", WAIT, || {
        std::future::ready(worker.output().contains("running; ctrl-c or SIGTERM"))
    })
    .await;

    write_config(&f, dir.path(), "");
    signal::kill(worker.pid(), Signal::SIGHUP).unwrap();
    wait_for("the worker to reload", WAIT, || {
        std::future::ready(worker.output().contains("added: shard_3"))
    })
    .await;

    std::fs::write(&config, "[master]\nurl = 3\n").unwrap();
    signal::kill(worker.pid(), Signal::SIGHUP).unwrap();
    wait_for("the worker to refuse the bad file", WAIT, || {
        std::future::ready(worker.output().contains("reload refused"))
    })
    .await;
    assert!(worker.running(), "a bad file stopped the worker:\n{}", worker.output());
    assert!(worker.output().contains("line 2"), "{}", worker.output());

    // A file that drops a shard holding accounts is refused, naming it.
    f.router
        .place(&Account::new("on-the-new-shard").unwrap(), "shard_3")
        .await
        .unwrap();
    write_config(&two, dir.path(), "");
    signal::kill(worker.pid(), Signal::SIGHUP).unwrap();
    wait_for("the worker to refuse dropping shard_3", WAIT, || {
        std::future::ready(worker.output().contains("refusing to reload: shard shard_3"))
    })
    .await;
    assert!(worker.running(), "{}", worker.output());

    signal::kill(worker.pid(), Signal::SIGTERM).unwrap();
    let status = worker.exited("the worker to stop").await;
    assert!(status.success(), "{}", worker.output());
}

#[tokio::test]
async fn accounts_weight_sets_shows_and_resets_an_accounts_fair_share_weight() {
    let f = fleet().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&f, dir.path(), "");
    let pin = shardq(&config, &["accounts", "pin", "weighed", "--to", "shard_1"]).await;
    assert!(pin.ok, "{}{}", pin.stdout, pin.stderr);
    let a = Account::new("weighed").unwrap();
    let set = shardq(&config, &["accounts", "weight", "weighed", "5"]).await;
    assert!(set.ok, "{}{}", set.stdout, set.stderr);
    assert_eq!(set.stdout.trim(), "weighed: weight 5");
    assert_eq!(f.client.account_weight(&a).await.unwrap(), 5);
    let show = shardq(&config, &["accounts", "weight", "weighed"]).await;
    assert_eq!(show.stdout.trim(), "weighed: weight 5");
    let bad = shardq(&config, &["accounts", "weight", "weighed", "0"]).await;
    assert!(!bad.ok && bad.stderr.contains("0"), "{}", bad.stderr);
    let reset = shardq(&config, &["accounts", "weight", "weighed", "--reset"]).await;
    assert!(reset.ok, "{}", reset.stderr);
    assert_eq!(reset.stdout.trim(), "weighed: weight 1");
    let unknown = shardq(&config, &["accounts", "weight", "nobody", "2"]).await;
    assert!(
        !unknown.ok && unknown.stderr.contains("not placed"),
        "{}",
        unknown.stderr
    );
}

#[tokio::test]
async fn accounts_limit_sets_shows_and_clears_an_accounts_concurrency_limit() {
    let f = fleet().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&f, dir.path(), "");
    let pin = shardq(&config, &["accounts", "pin", "limited", "--to", "shard_2"]).await;
    assert!(pin.ok, "{}{}", pin.stdout, pin.stderr);
    let a = Account::new("limited").unwrap();
    let set = shardq(&config, &["accounts", "limit", "limited", "--queue", "email", "3"]).await;
    assert!(set.ok, "{}{}", set.stdout, set.stderr);
    assert_eq!(set.stdout.trim(), "limited: at most 3 running in queue email");
    assert_eq!(f.client.account_limit(&a, "email").await.unwrap(), Some(3));
    let all = shardq(&config, &["accounts", "limit", "limited", "--json"]).await;
    let json: serde_json::Value = serde_json::from_str(&all.stdout).unwrap();
    assert_eq!(json["limits"]["email"], 3, "{}", all.stdout);
    let bad = shardq(&config, &["accounts", "limit", "limited", "--queue", "email", "0"]).await;
    assert!(!bad.ok && bad.stderr.contains("0"), "{}", bad.stderr);
    let no_queue = shardq(&config, &["accounts", "limit", "limited", "4"]).await;
    assert!(
        !no_queue.ok && no_queue.stderr.contains("--queue"),
        "{}",
        no_queue.stderr
    );
    let clear = shardq(
        &config,
        &["accounts", "limit", "limited", "--queue", "email", "--clear"],
    )
    .await;
    assert!(clear.ok, "{}", clear.stderr);
    assert_eq!(clear.stdout.trim(), "limited: no limit in queue email");
    assert_eq!(f.client.account_limit(&a, "email").await.unwrap(), None);
}

#[tokio::test]
async fn resources_set_lists_and_removes_a_named_resource() {
    let f = fleet().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&f, dir.path(), "");
    let set = shardq(
        &config,
        &[
            "resources",
            "set",
            "payments",
            "--concurrency",
            "10",
            "--rate",
            "100",
            "--burst",
            "20",
        ],
    )
    .await;
    assert!(set.ok, "{}{}", set.stdout, set.stderr);
    assert_eq!(
        set.stdout.trim(),
        "resource payments: concurrency 10, rate 100/s, burst 20"
    );
    let list = shardq(&config, &["resources", "list", "--json"]).await;
    let json: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(json[0]["name"], "payments", "{}", list.stdout);
    assert_eq!(json[0]["concurrency"], 10);
    assert_eq!(json[0]["leased"], 0);
    let table = shardq(&config, &["resources", "list"]).await;
    assert!(table.stdout.contains("payments"), "{}", table.stdout);
    let bad = shardq(&config, &["resources", "set", "bad name", "--concurrency", "1"]).await;
    assert!(!bad.ok && bad.stderr.contains("resource"), "{}", bad.stderr);
    let removed = shardq(&config, &["resources", "remove", "payments"]).await;
    assert!(removed.ok, "{}", removed.stderr);
    assert!(f.client.resources().await.unwrap().is_empty());
    let again = shardq(&config, &["resources", "remove", "payments"]).await;
    assert!(!again.ok && again.stderr.contains("no resource"), "{}", again.stderr);
}
