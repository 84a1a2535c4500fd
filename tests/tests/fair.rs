//! Fair share across accounts within a queue: one claim interleaves the
//! accounts with due jobs, weights give an account more turns, an account
//! that already runs many jobs (on any node) waits for those that run few,
//! and a queue that opted out claims in strict order.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;

use shardq::store::{self, FetchParams, FetchedJob};
use shardq::{Account, Error};
use shardq_tests::fleet;

fn fetch(limit: i64, node: &str, fair: bool) -> FetchParams<'_> {
    FetchParams {
        queue: "default",
        limit,
        node,
        lease_secs: 30.0,
        aging_secs: Some(300.0),
        fair,
        after: None,
        limited: true,
    }
}

/// Inserts `n` due jobs of `account`, due `age_secs` ago.
async fn due_jobs(pool: &sqlx::PgPool, account: &str, n: i64, age_secs: f64) {
    sqlx::query(
        "INSERT INTO shardq.jobs (account, queue, kind, args, run_at)
         SELECT $1, 'default', 'noop', '{}', now() - make_interval(secs => $3)
           FROM generate_series(1, $2)",
    )
    .bind(account)
    .bind(n)
    .bind(age_secs)
    .execute(pool)
    .await
    .unwrap();
}

fn per_account(jobs: &[FetchedJob]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for j in jobs {
        *m.entry(j.account.clone()).or_insert(0) += 1;
    }
    m
}

#[tokio::test]
async fn one_claim_interleaves_accounts_instead_of_draining_the_oldest_backlog() {
    let f = fleet().await;
    let pool = f.router.shards()[0].pool.clone();
    // The big backlog is older than every small account's jobs.
    due_jobs(&pool, "big", 500, 120.0).await;
    for i in 0..10 {
        due_jobs(&pool, &format!("small-{i}"), 3, 60.0).await;
    }
    // Strict order (a queue that opted out): the whole claim is the backlog's.
    let mut tx = pool.begin().await.unwrap();
    let fifo = store::job_fetch_available(&mut *tx, &fetch(20, "n1", false))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(per_account(&fifo), BTreeMap::from([("big".to_string(), 20)]));
    // Fair: every account's first job, then every account's second.
    let fair = store::job_fetch_available(&pool, &fetch(20, "n1", true)).await.unwrap();
    let got = per_account(&fair);
    assert_eq!(fair.len(), 20, "a full claim: {got:?}");
    assert_eq!(got.len(), 11, "all 11 accounts get turns: {got:?}");
    assert!(got.values().all(|n| (1..=2).contains(n)), "at most two each: {got:?}");
    assert_eq!(got["big"], 2, "the backlog's head is oldest within each round: {got:?}");
}

#[tokio::test]
async fn a_lone_account_takes_the_whole_claim() {
    let f = fleet().await;
    let pool = f.router.shards()[0].pool.clone();
    due_jobs(&pool, "alone", 300, 10.0).await;
    let claimed = store::job_fetch_available(&pool, &fetch(100, "n1", true))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 100);
    let mut ids: Vec<i64> = claimed.iter().map(|j| j.id).collect();
    ids.sort();
    let lowest: Vec<i64> = sqlx::query_scalar("SELECT id FROM shardq.jobs ORDER BY id LIMIT 100")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(ids, lowest, "in run order within the account");
    // The rotation comes back to the account it last served.
    let after = store::fair_rotation_after(None, &claimed);
    assert_eq!(after.as_deref(), Some("alone"));
    let mut p = fetch(100, "n1", true);
    p.after = after.as_deref();
    let again = store::job_fetch_available(&pool, &p).await.unwrap();
    assert_eq!(
        again.len(),
        100,
        "the account the rotation resumes after is claimed too"
    );
}

#[tokio::test]
async fn weights_give_an_account_proportionally_more_turns() {
    let f = fleet().await;
    let (heavy, light) = (Account::new("heavy").unwrap(), Account::new("light").unwrap());
    let shard = f.router.shards()[0].name.clone();
    f.router.place(&heavy, &shard).await.unwrap();
    f.router.place(&light, &shard).await.unwrap();
    f.client.set_account_weight(&heavy, Some(3)).await.unwrap();
    assert_eq!(f.client.account_weight(&heavy).await.unwrap(), 3);
    assert_eq!(f.client.account_weight(&light).await.unwrap(), 1, "the default");
    let pool = f.router.shard(&shard).unwrap().pool.clone();
    due_jobs(&pool, "heavy", 200, 30.0).await;
    due_jobs(&pool, "light", 200, 60.0).await;
    let claimed = store::job_fetch_available(&pool, &fetch(40, "n1", true)).await.unwrap();
    let got = per_account(&claimed);
    assert_eq!(got.get("heavy"), Some(&30), "{got:?}");
    assert_eq!(got.get("light"), Some(&10), "{got:?}");

    // Back to the default: equal turns.
    f.client.set_account_weight(&heavy, None).await.unwrap();
    assert_eq!(f.client.account_weight(&heavy).await.unwrap(), 1);
}

#[tokio::test]
async fn weights_out_of_range_are_refused_and_name_the_account() {
    let f = fleet().await;
    let a = Account::new("weighed").unwrap();
    for w in [0, 10_001] {
        match f.client.set_account_weight(&a, Some(w)).await {
            Err(e @ Error::AccountSetting { .. }) => {
                let text = e.to_string();
                assert!(text.contains("weighed") && text.contains(&w.to_string()), "{text}");
            }
            other => panic!("weight {w}: expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(f.client.account_weight(&a).await.unwrap(), 1, "nothing written");
}

#[tokio::test]
async fn an_account_running_many_jobs_on_another_node_waits_for_those_running_few() {
    let f = fleet().await;
    let pool = f.router.shards()[0].pool.clone();
    due_jobs(&pool, "busy", 100, 120.0).await;
    // Node 1 claims 10 of the busy account's jobs (they keep running).
    let first = store::job_fetch_available(&pool, &fetch(10, "n1", true)).await.unwrap();
    assert_eq!(per_account(&first), BTreeMap::from([("busy".to_string(), 10)]));
    due_jobs(&pool, "quiet", 20, 10.0).await;
    // Node 2's claim: the quiet account's turns come first although the
    // busy account's jobs are older, until it runs as many.
    let second = store::job_fetch_available(&pool, &fetch(14, "n2", true)).await.unwrap();
    let got = per_account(&second);
    assert_eq!(got.get("quiet"), Some(&12), "{got:?}");
    assert_eq!(got.get("busy"), Some(&2), "{got:?}");
}

#[tokio::test]
async fn successive_claims_rotate_through_more_accounts_than_one_claim_reads() {
    let f = fleet().await;
    let pool = f.router.shards()[0].pool.clone();
    for i in 0..100 {
        due_jobs(&pool, &format!("acct-{i:03}"), 2, 60.0).await;
    }
    // Claims of 10 read a window of 32 accounts; resuming after the last
    // account served, ten claims serve each of the 100 accounts once.
    let mut after: Option<String> = None;
    let mut served = BTreeMap::new();
    for _ in 0..10 {
        let mut p = fetch(10, "n1", true);
        p.after = after.as_deref();
        let claimed = store::job_fetch_available(&pool, &p).await.unwrap();
        assert_eq!(claimed.len(), 10);
        after = store::fair_rotation_after(after.as_deref(), &claimed);
        for (a, n) in per_account(&claimed) {
            *served.entry(a).or_insert(0) += n;
        }
    }
    assert_eq!(served.len(), 100, "every account was served: {served:?}");
    assert!(served.values().all(|n| *n == 1), "{served:?}");
}

#[tokio::test]
async fn neither_claim_takes_the_jobs_of_an_account_fenced_off_the_shard() {
    let f = fleet().await;
    let pool = f.router.shards()[0].pool.clone();
    due_jobs(&pool, "staying", 5, 60.0).await;
    due_jobs(&pool, "leaving", 5, 120.0).await;
    sqlx::query(
        "INSERT INTO shardq.fences (account, moved_to, epoch, fenced_at) VALUES ('leaving', 'elsewhere', 2, now())",
    )
    .execute(&pool)
    .await
    .unwrap();
    for fair in [false, true] {
        let mut tx = pool.begin().await.unwrap();
        let claimed = store::job_fetch_available(&mut *tx, &fetch(20, "n1", fair))
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        assert_eq!(
            per_account(&claimed),
            BTreeMap::from([("staying".to_string(), 5)]),
            "fair: {fair}"
        );
    }
}

#[tokio::test]
async fn a_claim_beside_another_that_took_the_small_accounts_fills_up_from_the_backlog() {
    let f = fleet().await;
    let pool = f.router.shards()[0].pool.clone();
    // A backlog older than ten small accounts' one due job each: the head
    // in strict order is the backlog's, so the turns decide.
    due_jobs(&pool, "big", 500, 120.0).await;
    for i in 0..10 {
        due_jobs(&pool, &format!("small-{i}"), 1, 60.0).await;
    }
    // The first claim takes every small account's job and ten of the
    // backlog's, and has not committed yet (a producer's two claims in
    // flight, or two nodes).
    let mut first_tx = pool.begin().await.unwrap();
    let first = store::job_fetch_available(&mut *first_tx, &fetch(20, "n1", true))
        .await
        .unwrap();
    let got = per_account(&first);
    assert_eq!(first.len(), 20, "{got:?}");
    assert_eq!(got.get("big"), Some(&10), "{got:?}");
    // The second finds the small accounts' jobs locked. The backlog has
    // 480 more due jobs, so it must not come back short.
    let second = store::job_fetch_available(&pool, &fetch(20, "n1", true)).await.unwrap();
    let got = per_account(&second);
    assert_eq!(
        got,
        BTreeMap::from([("big".to_string(), 20)]),
        "a full claim of the backlog beside the locked small jobs"
    );
    let firsts: std::collections::HashSet<i64> = first.iter().map(|j| j.id).collect();
    assert!(second.iter().all(|j| !firsts.contains(&j.id)), "no job claimed twice");
    first_tx.commit().await.unwrap();
}
