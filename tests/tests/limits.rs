//! Per-account concurrency limits per queue: at most N runs of one
//! account in one queue at once across every node, counted by the
//! database; other accounts and other queues are not held back.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardq::{Account, JobContext, JobError, JobId, NewJob, Runtime, Worker};
use shardq_tests::{buffers_and_rows, fast_options, fleet, wait_for, Fleet};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(60);

/// A run's start and end.
type Run = (Instant, Instant);

/// Runs of one account: each records its start and end; the number running
/// at once and the most seen.
#[derive(Default)]
struct Tally {
    runs: Mutex<Vec<Run>>,
    now: AtomicUsize,
    most: AtomicUsize,
    /// Notified when a run starts or `released` is set.
    changed: tokio::sync::Notify,
    /// Runs told to `hold` wait until this is set.
    released: std::sync::atomic::AtomicBool,
}

impl Tally {
    fn release(&self) {
        self.released.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
    fn open(&self, a: &Args) -> bool {
        self.most() >= a.gate && (!a.hold || self.released.load(Ordering::SeqCst))
    }
    fn most(&self) -> usize {
        self.most.load(Ordering::SeqCst)
    }
    /// The most runs that overlapped, from the recorded starts and ends.
    fn most_overlapping(&self) -> usize {
        let runs = self.runs.lock().unwrap();
        let mut edges: Vec<(Instant, i32)> = runs.iter().flat_map(|(s, e)| [(*s, 1), (*e, -1)]).collect();
        // An end before a start at the same instant: touching runs do not overlap.
        edges.sort();
        let (mut now, mut most) = (0, 0);
        for (_, d) in edges {
            now += d;
            most = most.max(now);
        }
        most as usize
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Args {
    /// Which tally the run counts in.
    tally: usize,
    /// How long the run works, in milliseconds.
    ms: u64,
    /// The run ends only once this many runs of its tally ran at once
    /// (or after the test's deadline, failing).
    gate: usize,
    /// The run ends only once the test released its tally.
    hold: bool,
}

#[derive(Clone)]
struct Counted(Arc<Vec<Tally>>);

impl Worker for Counted {
    type Args = Args;
    const KIND: &'static str = "counted";
    async fn work(&self, _: JobContext, a: Args) -> Result<(), JobError> {
        let t = &self.0[a.tally];
        let start = Instant::now();
        let n = t.now.fetch_add(1, Ordering::SeqCst) + 1;
        t.most.fetch_max(n, Ordering::SeqCst);
        t.changed.notify_waiters();
        // Work: the time a handler takes (not a wait for a condition).
        tokio::time::sleep(Duration::from_millis(a.ms)).await;
        let until = start + WAIT;
        let mut result = Ok(());
        while !t.open(&a) {
            let changed = t.changed.notified();
            if t.open(&a) {
                break;
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                result = Err(JobError::failed("the gate never opened"));
                break;
            }
        }
        t.now.fetch_sub(1, Ordering::SeqCst);
        t.runs.lock().unwrap().push((start, Instant::now()));
        result
    }
}

fn held(tally: usize) -> NewJob {
    let args = Args {
        tally,
        ms: 0,
        gate: 0,
        hold: true,
    };
    NewJob::from_json("counted", serde_json::to_value(args).unwrap())
}

fn job(tally: usize, ms: u64, gate: usize) -> NewJob {
    let args = Args {
        tally,
        ms,
        gate,
        hold: false,
    };
    NewJob::from_json("counted", serde_json::to_value(args).unwrap())
}

fn node(f: &Fleet, counted: &Counted, queues: &[(&str, usize)]) -> Runtime {
    let mut b = Runtime::builder(f.router.clone()).register(counted.clone());
    for (q, n) in queues {
        b = b.queue(*q, *n);
    }
    b.options(fast_options()).start().unwrap()
}

async fn wait_completed(f: &Fleet, ids: &[JobId]) {
    wait_for("every job completed", WAIT, || async {
        for id in ids {
            if f.client.job(id).await.unwrap().state != "completed" {
                return false;
            }
        }
        true
    })
    .await;
}

/// Two accounts on one shard, so they share its claims.
async fn two_accounts_on_one_shard(f: &Fleet, prefix: &str) -> (Account, Account) {
    let first = Account::new(format!("{prefix}-0")).unwrap();
    let shard = f.router.shard_for(&first).await.unwrap().shard;
    for i in 1..200 {
        let other = Account::new(format!("{prefix}-{i}")).unwrap();
        if f.router.shard_for(&other).await.unwrap().shard == shard {
            return (first, other);
        }
    }
    panic!("no second account on shard {shard}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accounts_limit_holds_across_three_nodes_and_others_run_past_it() {
    let f = fleet().await;
    let (limited, free) = two_accounts_on_one_shard(&f, "lim").await;
    f.client.set_account_limit(&limited, "default", Some(2)).await.unwrap();
    assert_eq!(f.client.account_limit(&limited, "default").await.unwrap(), Some(2));
    assert_eq!(f.client.account_limit(&free, "default").await.unwrap(), None);
    let counted = Counted(Arc::new(vec![Tally::default(), Tally::default()]));
    // Enqueued before any node runs, so every node finds them due at once.
    let mut ids = Vec::new();
    for _ in 0..30 {
        ids.push(f.client.enqueue(&limited, job(0, 30, 0)).await.unwrap());
    }
    // The other account's runs each wait until 4 of them ran at once:
    // they complete only if the limit does not hold them back.
    for _ in 0..8 {
        ids.push(f.client.enqueue(&free, job(1, 0, 4)).await.unwrap());
    }
    let nodes: Vec<Runtime> = (0..3).map(|_| node(&f, &counted, &[("default", 6)])).collect();
    wait_completed(&f, &ids).await;
    for n in nodes {
        n.shutdown(Duration::from_secs(5)).await;
    }
    let limited_runs = counted.0[0].runs.lock().unwrap().len();
    assert_eq!(limited_runs, 30, "every job of the limited account ran once");
    assert!(
        counted.0[0].most() <= 2 && counted.0[0].most_overlapping() <= 2,
        "at most 2 runs of the limited account at once, saw {} ({} overlapping)",
        counted.0[0].most(),
        counted.0[0].most_overlapping()
    );
    assert_eq!(counted.0[0].most(), 2, "the limit's 2 slots were both used");
    assert!(counted.0[1].most() >= 4, "the other account ran past the limit");
    assert_eq!(f.client.account_limit_held(&limited, "default").await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_is_per_queue_and_clearing_it_lifts_it() {
    let f = fleet().await;
    let a = Account::new("lim-queues").unwrap();
    f.client.set_account_limit(&a, "limited", Some(1)).await.unwrap();
    let counted = Counted(Arc::new(vec![Tally::default(), Tally::default(), Tally::default()]));
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(f.client.enqueue(&a, job(0, 20, 0).queue("limited")).await.unwrap());
        // The same account in another queue is not limited there.
        ids.push(f.client.enqueue(&a, job(1, 0, 3).queue("other")).await.unwrap());
    }
    let rt = node(&f, &counted, &[("limited", 4), ("other", 4)]);
    wait_completed(&f, &ids).await;
    assert_eq!(counted.0[0].most(), 1, "one run at a time in the limited queue");
    assert_eq!(counted.0[0].most_overlapping(), 1);
    assert!(counted.0[1].most() >= 3, "the other queue ran past it");
    // Cleared: the account's jobs in the queue run side by side again.
    f.client.set_account_limit(&a, "limited", None).await.unwrap();
    assert!(f.client.account_limits(&a).await.unwrap().is_empty());
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(f.client.enqueue(&a, job(2, 0, 3).queue("limited")).await.unwrap());
    }
    wait_completed(&f, &ids).await;
    rt.shutdown(Duration::from_secs(5)).await;
    assert!(counted.0[2].most() >= 3);
}

/// A node in its own Tokio runtime on its own thread, with its own router:
/// killing it drops every task and connection at once, with no shutdown,
/// as when its process dies.
struct Doomed {
    kill: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Doomed {
    fn start(f: &Fleet, counted: &Counted, slots: usize) -> Doomed {
        let (config, counted) = (f.config.clone(), counted.clone());
        let (kill, killed) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let _node = rt.block_on(async {
                let router = Arc::new(shardq::Router::connect(&config).await.unwrap());
                Runtime::builder(router)
                    .register(counted)
                    .queue("default", slots)
                    .options(fast_options())
                    .start()
                    .unwrap()
            });
            let _ = killed.recv();
            rt.shutdown_background();
        });
        Doomed {
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    fn kill(mut self) {
        drop(self.kill.take());
        self.thread.take().unwrap().join().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_slots_come_back_by_lease() {
    let f = fleet().await;
    let a = Account::new("lim-crash").unwrap();
    f.client.set_account_limit(&a, "default", Some(1)).await.unwrap();
    let counted = Counted(Arc::new(vec![Tally::default()]));
    // The first run holds until the test releases it, which it does only
    // once that run's node is dead.
    let args = Args {
        tally: 0,
        ms: 0,
        gate: 0,
        hold: true,
    };
    let stuck = f
        .client
        .enqueue(&a, NewJob::from_json("counted", serde_json::to_value(args).unwrap()))
        .await
        .unwrap();
    let doomed = Doomed::start(&f, &counted, 2);
    wait_for("the first job runs", WAIT, || async { counted.0[0].most() == 1 }).await;
    assert_eq!(f.client.account_limit_held(&a, "default").await.unwrap(), 1);
    doomed.kill();
    counted.0[0].release();
    let next = f.client.enqueue(&a, job(0, 0, 0)).await.unwrap();
    let second = node(&f, &counted, &[("default", 2)]);
    // The dead node's slot is held until its lease expires and the job is
    // rescued; then both jobs run, one at a time.
    wait_completed(&f, &[next.clone(), stuck.clone()]).await;
    second.shutdown(Duration::from_secs(5)).await;
    let record = f.client.job(&stuck).await.unwrap();
    assert_eq!(record.attempt, 2, "the dead node's run was rescued and ran again");
    assert_eq!(counted.0[0].most_overlapping(), 1, "one run at a time");
}

#[tokio::test]
async fn limits_out_of_range_are_refused_and_name_the_account() {
    let f = fleet().await;
    let a = Account::new("lim-range").unwrap();
    for n in [0, 10_001] {
        match f.client.set_account_limit(&a, "default", Some(n)).await {
            Err(shardq::Error::AccountSetting { account, message, .. }) => {
                assert_eq!(account, "lim-range");
                assert!(message.contains("1 to 10000"), "{message}");
            }
            other => panic!("limit {n}: expected a refusal, got {other:?}"),
        }
    }
    assert!(
        f.client.set_account_limit(&a, "", Some(2)).await.is_err(),
        "an empty queue name"
    );
    assert!(f.client.account_limits(&a).await.unwrap().is_empty());
}

/// Accounts placed on every shard of `f`, `per_shard` on each.
async fn accounts_on_every_shard(f: &Fleet, prefix: &str, per_shard: usize) -> Vec<Account> {
    let mut by_shard: std::collections::BTreeMap<String, Vec<Account>> = std::collections::BTreeMap::new();
    for i in 0..1_000 {
        let a = Account::new(format!("{prefix}-{i}")).unwrap();
        let shard = f.router.shard_for(&a).await.unwrap().shard;
        let on = by_shard.entry(shard).or_default();
        if on.len() < per_shard {
            on.push(a);
        }
        if by_shard.len() == f.router.shards().len() && by_shard.values().all(|v| v.len() == per_shard) {
            return by_shard.into_values().flatten().collect();
        }
    }
    panic!("accounts did not reach every shard");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resources_concurrency_holds_across_three_nodes_and_three_shards() {
    let f = fleet().await;
    assert_eq!(f.router.shards().len(), 3);
    f.client.set_resource("payments", Some(10), None, None).await.unwrap();
    let counted = Counted(Arc::new(vec![Tally::default(), Tally::default()]));
    let accounts = accounts_on_every_shard(&f, "res", 4).await;
    let mut ids = Vec::new();
    for i in 0..72 {
        let a = &accounts[i % accounts.len()];
        ids.push(
            f.client
                .enqueue(a, job(0, 150, 0).resources(["payments"]))
                .await
                .unwrap(),
        );
    }
    // Jobs that use no resource run beside them.
    for a in &accounts {
        ids.push(f.client.enqueue(a, job(1, 0, 0)).await.unwrap());
    }
    let nodes: Vec<Runtime> = (0..3).map(|_| node(&f, &counted, &[("default", 8)])).collect();
    wait_completed(&f, &ids).await;
    for n in nodes {
        n.shutdown(Duration::from_secs(5)).await;
    }
    assert_eq!(
        counted.0[0].runs.lock().unwrap().len(),
        72,
        "every job that uses the resource ran once"
    );
    assert!(
        counted.0[0].most() <= 10 && counted.0[0].most_overlapping() <= 10,
        "at most 10 jobs of the resource at once, saw {} ({} overlapping)",
        counted.0[0].most(),
        counted.0[0].most_overlapping()
    );
    assert!(counted.0[0].most() > 1, "the resource's jobs ran side by side");
    let listed = f.client.resources().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].name.as_str(), listed[0].concurrency), ("payments", Some(10)));
    assert_eq!(listed[0].leased, 0, "a clean shutdown ends the nodes' leases");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_resource_permits_come_back_by_lease() {
    let f = fleet().await;
    f.client.set_resource("api", Some(3), None, None).await.unwrap();
    let counted = Counted(Arc::new(vec![Tally::default()]));
    let a = Account::new("res-dead").unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(f.client.enqueue(&a, held(0).resources(["api"])).await.unwrap());
    }
    let doomed = Doomed::start(&f, &counted, 8);
    wait_for("the dead-to-be node runs 3 jobs of the resource", WAIT, || async {
        counted.0[0].now.load(Ordering::SeqCst) == 3
    })
    .await;
    let leased = f.client.resources().await.unwrap()[0].leased;
    assert_eq!(leased, 3, "its 3 permits are leased");
    doomed.kill();
    counted.0[0].release();
    for _ in 0..3 {
        ids.push(f.client.enqueue(&a, job(0, 20, 0).resources(["api"])).await.unwrap());
    }
    let second = node(&f, &counted, &[("default", 8)]);
    // Its permits come back when its lease expires, and its jobs when
    // their leases do; then every job runs, at most 3 at once.
    wait_completed(&f, &ids).await;
    second.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        counted.0[0].runs.lock().unwrap().len(),
        6,
        "3 rescued runs and 3 new ones"
    );
    assert!(counted.0[0].most_overlapping() <= 3);
}

#[tokio::test]
async fn resource_declarations_out_of_range_are_refused_and_name_the_resource() {
    let f = fleet().await;
    for (name, c) in [("ok", Some(0)), ("bad name", Some(1)), ("ok", Some(1_000_001))] {
        match f.client.set_resource(name, c, None, None).await {
            Err(shardq::Error::Resource { name: n, .. }) => assert_eq!(n, name),
            other => panic!("{name} {c:?}: expected a refusal, got {other:?}"),
        }
    }
    assert!(f.client.resources().await.unwrap().is_empty());
    let bad = f
        .client
        .enqueue(&Account::new("res-bad").unwrap(), job(0, 0, 0).resources(["no,commas"]))
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("resources"), "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resources_rate_bounds_its_starts_across_three_nodes() {
    let f = fleet().await;
    // 20 starts per second, 5 at once above it.
    f.client.set_resource("mail", None, Some(20.0), Some(5)).await.unwrap();
    let counted = Counted(Arc::new(vec![Tally::default()]));
    let accounts = accounts_on_every_shard(&f, "rate", 2).await;
    let mut ids = Vec::new();
    for i in 0..60 {
        ids.push(
            f.client
                .enqueue(&accounts[i % accounts.len()], job(0, 0, 0).resources(["mail"]))
                .await
                .unwrap(),
        );
    }
    let nodes: Vec<Runtime> = (0..3).map(|_| node(&f, &counted, &[("default", 8)])).collect();
    wait_completed(&f, &ids).await;
    for n in nodes {
        n.shutdown(Duration::from_secs(5)).await;
    }
    let mut starts: Vec<Instant> = counted.0[0].runs.lock().unwrap().iter().map(|(s, _)| *s).collect();
    starts.sort();
    assert_eq!(starts.len(), 60);
    // Any one second holds at most the burst, a second of the rate, and
    // the tokens each of the 3 nodes may hold unused (a tenth of a second).
    let bound = 5 + 20 + 3 * 2;
    let most = (0..starts.len())
        .map(|i| {
            starts[i..]
                .iter()
                .take_while(|s| **s < starts[i] + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap();
    assert!(most <= bound, "{most} starts within one second, more than {bound}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accounts_limit_holds_for_its_jobs_that_use_resources() {
    let f = fleet().await;
    f.client.set_resource("payments", Some(10), None, None).await.unwrap();
    let (limited, free) = two_accounts_on_one_shard(&f, "lim-res").await;
    f.client.set_account_limit(&limited, "default", Some(2)).await.unwrap();
    let counted = Counted(Arc::new(vec![Tally::default(), Tally::default()]));
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(
            f.client
                .enqueue(&limited, job(0, 60, 0).resources(["payments"]))
                .await
                .unwrap(),
        );
    }
    // Another account's jobs of the resource: each waits until 3 of them
    // ran at once, so they complete only if the limit holds back none of them.
    for _ in 0..3 {
        ids.push(
            f.client
                .enqueue(&free, job(1, 0, 3).resources(["payments"]))
                .await
                .unwrap(),
        );
    }
    let nodes: Vec<Runtime> = (0..2).map(|_| node(&f, &counted, &[("default", 8)])).collect();
    wait_completed(&f, &ids).await;
    for n in nodes {
        n.shutdown(Duration::from_secs(5)).await;
    }
    assert_eq!(
        counted.0[0].runs.lock().unwrap().len(),
        10,
        "every job of the limited account ran once"
    );
    assert!(
        counted.0[0].most() <= 2 && counted.0[0].most_overlapping() <= 2,
        "at most 2 runs of the limited account at once, saw {} ({} overlapping)",
        counted.0[0].most(),
        counted.0[0].most_overlapping()
    );
    assert!(
        counted.0[1].most() >= 3,
        "the other account's jobs of the resource ran past it"
    );
    assert_eq!(f.client.account_limit_held(&limited, "default").await.unwrap(), 0);
}

#[tokio::test]
async fn a_claim_with_limited_accounts_returns_at_most_its_batch() {
    use shardq::store::{job_fetch_available, job_fetch_resourced, FetchParams};
    let f = fleet().await;
    let db = f.router.shards()[0].clone();
    // An account limited to 3 and another without a limit, 10 due jobs
    // each, and as many of each that use a resource.
    sqlx::query("INSERT INTO shardq.account_limits (queue, account, max_running) VALUES ('default', 'capped', 3)")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO shardq.jobs (account, queue, kind, args, resources)
         SELECT a, 'default', 'noop', '{}', r.res
           FROM unnest(ARRAY['capped', 'open']) AS a, generate_series(1, 10) AS i,
                (VALUES (NULL::text[]), (ARRAY['api'])) AS r(res)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    for fair in [true, false] {
        let params = FetchParams {
            queue: "default",
            limit: 8,
            node: "node",
            lease_secs: 30.0,
            aging_secs: None,
            fair,
            after: None,
            limited: true,
        };
        let mut tx = db.pool.begin().await.unwrap();
        let claimed = job_fetch_available(&mut *tx, &params).await.unwrap();
        tx.rollback().await.unwrap();
        let capped = claimed.iter().filter(|j| j.account == "capped").count();
        assert_eq!(
            (claimed.len(), capped),
            (8, 3),
            "fair {fair}: the batch of 8, 3 of them the limited account's"
        );
    }
    let mut tx = db.pool.begin().await.unwrap();
    let claimed = job_fetch_resourced(&mut *tx, "default", 8, "node", 30.0, &["api".to_string()], true)
        .await
        .unwrap();
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM shardq.jobs WHERE account = 'capped' AND serial_held AND limit_slot IS NOT NULL",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    let capped = claimed.iter().filter(|j| j.account == "capped").count();
    assert_eq!(
        (claimed.len(), capped),
        (8, 3),
        "jobs that use a resource: the batch of 8"
    );
    assert_eq!(held, 3, "each of the limited account's holds a slot");
    assert!(claimed
        .iter()
        .all(|j| j.resources.as_deref() == Some(&["api".to_string()][..])));
}

/// A node of 4 slots in `default` whose poll is too long for the tests:
/// only wake-ups and claims find a limit set.
fn slow_poll_node(f: &Fleet, counted: &Counted) -> Runtime {
    let options = shardq::RuntimeOptions {
        poll_interval: Duration::from_secs(600),
        ..fast_options()
    };
    Runtime::builder(f.router.clone())
        .register(counted.clone())
        .queue("default", 4)
        .options(options)
        .start()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_set_while_a_node_runs_holds_and_its_jobs_run_without_waiting_for_the_poll() {
    let f = fleet().await;
    let a = Account::new("lim-new").unwrap();
    let counted = Counted(Arc::new(vec![Tally::default(), Tally::default()]));
    let rt = slow_poll_node(&f, &counted);
    // The node has claimed, and read that no account has a limit in the queue.
    let first = f.client.enqueue(&a, job(0, 0, 0)).await.unwrap();
    wait_completed(&f, &[first]).await;
    f.client.set_account_limit(&a, "default", Some(1)).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(f.client.enqueue(&a, job(1, 20, 0)).await.unwrap());
    }
    wait_completed(&f, &ids).await;
    rt.shutdown(Duration::from_secs(5)).await;
    assert_eq!(counted.0[1].runs.lock().unwrap().len(), 4);
    assert_eq!(
        counted.0[1].most_overlapping(),
        1,
        "the new limit held: one run at a time"
    );
}

/// While one account's backlog keeps every claim full, a producer never
/// comes back short, so only the limit's notification (not a short claim,
/// and with this poll not the poll either) makes it read that the queue now
/// has a limited account, whose jobs the ordinary claims leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_set_while_claims_come_back_full_lets_its_jobs_run_without_waiting_for_the_poll() {
    let f = fleet().await;
    let (busy, limited) = two_accounts_on_one_shard(&f, "lim-full").await;
    let counted = Counted(Arc::new(vec![Tally::default(), Tally::default()]));
    // 20 ms each on 4 slots: 8,000 jobs keep the claims full for 40 s.
    f.client
        .enqueue_many((0..8_000).map(|_| (busy.clone(), job(0, 20, 0))))
        .await
        .unwrap();
    let rt = slow_poll_node(&f, &counted);
    // The node claims, and has read that no account has a limit in the queue.
    wait_for("the backlog runs", WAIT, || async { counted.0[0].most() >= 1 }).await;
    f.client.set_account_limit(&limited, "default", Some(1)).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(f.client.enqueue(&limited, job(1, 0, 0)).await.unwrap());
    }
    wait_for(
        "the limited account's jobs completed beside the backlog",
        Duration::from_secs(10),
        || async { counted.0[1].runs.lock().unwrap().len() == 3 },
    )
    .await;
    let busy_done = counted.0[0].runs.lock().unwrap().len();
    rt.shutdown(Duration::from_secs(5)).await;
    assert!(
        busy_done < 8_000,
        "the backlog was still running ({busy_done} of 8,000 done)"
    );
    assert_eq!(
        counted.0[1].most_overlapping(),
        1,
        "the new limit held: one run at a time"
    );
}

/// Shared buffers (hit + read) the claim of jobs that use resources touches
/// to find and lock its rows, and the rows it returns, claiming up to 10
/// jobs of `free` resources ([`buffers_and_rows`]).
async fn resourced_claim_cost(conn: &mut sqlx::PgConnection, free: &str) -> (i64, i64) {
    buffers_and_rows(
        conn,
        "text, bigint, text, float8, text[]",
        shardq::store::JOB_FETCH_RESOURCED_SQL,
        &format!("'default', 10, 'node', 30, '{free}'"),
    )
    .await
}

#[tokio::test]
async fn the_claim_of_jobs_that_use_resources_skips_a_backlog_without_permits_in_one_seek() {
    let f = fleet().await;
    let db = f.router.shards()[0].clone();
    let mut conn = db.pool.acquire().await.unwrap();
    let insert = |n: i64, resource: &'static str, ago: &'static str| {
        sqlx::query(
            "INSERT INTO shardq.jobs (account, queue, kind, args, resources, run_at)
             SELECT 'a' || (i % 50), 'default', 'noop', '{}', ARRAY[$2], now() - $3::interval
               FROM generate_series(1, $1) AS i",
        )
        .bind(n)
        .bind(resource)
        .bind(ago)
    };
    // 10 due jobs of a resource with permits, behind 100 older ones of a
    // resource without.
    insert(100, "busy", "2 hours").execute(&mut *conn).await.unwrap();
    insert(10, "open", "1 hour").execute(&mut *conn).await.unwrap();
    sqlx::query("VACUUM ANALYZE shardq.jobs")
        .execute(&mut *conn)
        .await
        .unwrap();
    let (small, rows) = resourced_claim_cost(&mut conn, "{open}").await;
    assert_eq!(rows, 10, "the jobs of the resource with permits");
    // The backlog without permits grows to 20,100: the claim costs about
    // the same (its seeks go one level deeper), not a read per job.
    insert(20_000, "busy", "2 hours").execute(&mut *conn).await.unwrap();
    sqlx::query("VACUUM ANALYZE shardq.jobs")
        .execute(&mut *conn)
        .await
        .unwrap();
    let (large, rows) = resourced_claim_cost(&mut conn, "{open}").await;
    assert_eq!(rows, 10);
    assert!(
        large <= 2 * small,
        "the claim touched {large} buffers beside 20,100 jobs without permits, {small} beside 100"
    );
}
