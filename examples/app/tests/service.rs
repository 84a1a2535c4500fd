//! The example service end to end, against the real test bed: migrate the
//! platform and the example's own migrations, run the service in-process on
//! a free port, drive it over HTTP, and check every row and job in the
//! databases themselves; then move one account to another shard while the
//! service keeps serving it.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use shardq::moves::{MoveOptions, Mover, Step};
use shardq::{Account, Backoff, Config, Router, RuntimeOptions};
use shardq_example_app::fenced::{is_fenced, retry_fenced};
use shardq_example_app::jobs::process_document::{analyse, SUMMARY_WORDS};
use shardq_example_app::jobs::{CleanupOptions, QueueLimits};
use shardq_example_app::service::check_schema;
use shardq_example_app::store::account_tables;
use shardq_example_app::{ApiError, App, AppOptions};
use shardq_router::Migrator;
use shardq_testbed::TestBed;
use uuid::Uuid;

/// Accounts the test creates. The ring proposes shard_2, shard_1, shard_3,
/// shard_2, shard_1, shard_3 for them on a bed of three shards.
const ACCOUNTS: [&str; 6] = ["acme", "wonka", "aperture", "globex", "tyrell", "massive"];

/// Jobs each account ends with: its provisioning, four documents processed
/// (two by its user, one without author, the welcome document) and the two
/// follow-ups of its user's documents.
const JOBS_PER_ACCOUNT: usize = 7;

/// How long any awaited condition may take.
const DEADLINE: Duration = Duration::from_secs(60);

/// Documents acknowledged before the test starts moving their account.
const WRITES_BEFORE_MOVE: usize = 3;
/// Documents written once the move is done, before the writer stops.
const WRITES_AFTER_MOVE: usize = 3;

/// Where the test's move is: not started, running, done.
const BEFORE_MOVE: u8 = 0;
const MOVING: u8 = 1;
const MOVED: u8 = 2;

/// Polls `check` every 20 ms until it returns true; panics naming `what`
/// after [`DEADLINE`]. For waiting on conditions, never on time.
async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + DEADLINE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < until,
            "timed out after {DEADLINE:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Fresh, empty databases on the shared bed.
async fn fresh_fleet() -> Config {
    let bed = tokio::task::spawn_blocking(TestBed::shared)
        .await
        .expect("join")
        .expect("shared test bed");
    let dbs = bed.fresh_fleet().await.expect("fresh databases");
    let shards: Vec<(&str, &str)> = dbs.shards.iter().map(|s| (s.name.as_str(), s.url.as_str())).collect();
    Config::from_urls(&dbs.master.url, &shards).expect("config")
}

/// Fresh databases on the shared bed, migrated with the platform's and the
/// example's migrations (the folders its `shards.toml` declares).
async fn migrated_fleet() -> Config {
    let mut config = fresh_fleet().await;
    let declared =
        Config::load(concat!(env!("CARGO_MANIFEST_DIR"), "/shards.toml")).expect("the example's shards.toml");
    for folder in [&declared.migrations.master, &declared.migrations.shard] {
        let folder = folder.as_ref().expect("shards.toml declares both migration folders");
        assert!(folder.is_dir(), "{} is not a folder", folder.display());
    }
    assert_eq!(
        declared.account_tables,
        account_tables(),
        "shards.toml declares the tables store::account_tables() lists"
    );
    config.migrations = declared.migrations;
    let before = check_schema(&config)
        .await
        .expect_err("the example's schema is not applied yet");
    assert!(before.to_string().contains("shardq migrate --config"), "{before}");
    let report = Migrator::new(&config).run().await.expect("migrate");
    assert!(!report.failed(), "migration failed:\n{report}");
    check_schema(&config)
        .await
        .expect("the service accepts the migrated fleet");
    config
}

/// The service's options for a test: fast polling and leases, the cleanup
/// every second for documents deleted at any time.
fn test_options() -> AppOptions {
    AppOptions {
        runtime: RuntimeOptions {
            poll_interval: Duration::from_millis(200),
            backoff: Backoff {
                base: Duration::from_millis(10),
                max: Duration::from_millis(50),
            },
            lease: Duration::from_secs(2),
            heartbeat_interval: Duration::from_millis(500),
            rescue_interval: Duration::from_millis(200),
            ..RuntimeOptions::default()
        },
        queues: QueueLimits::default(),
        cleanup: CleanupOptions {
            schedule: "* * * * * *".into(),
            older_than: Duration::ZERO,
        },
        grace: Duration::from_secs(5),
    }
}

/// The service's HTTP API.
#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    async fn send(&self, request: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let response = request.send().await.expect("request");
        let status = response.status();
        let text = response.text().await.expect("body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
        };
        (status, body)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.http.get(format!("{}{path}", self.base))).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(self.http.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.http.delete(format!("{}{path}", self.base))).await
    }
}

/// Asserts an error answer: `status`, and a message containing `needle`.
fn assert_error(answer: &(StatusCode, Value), status: StatusCode, needle: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    let message = answer.1["error"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "error {message:?} lacks {needle:?}");
}

/// Rows of `table` (or `shardq.jobs`) with `account = $1` on `shard`.
async fn count_rows(router: &Router, shard: &str, table: &str, account: &str) -> i64 {
    let db = router.shard(shard).expect("shard");
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE account = $1"))
        .bind(account)
        .fetch_one(&db.pool)
        .await
        .expect("count")
}

/// A job as its shard stores it: (account, kind, args).
async fn job_row(router: &Router, job: &str) -> (String, String, Value) {
    let (shard, id) = job.rsplit_once(':').expect("SHARD:ID");
    let db = router.shard(shard).expect("job's shard");
    sqlx::query_as("SELECT account, kind, args FROM shardq.jobs WHERE id = $1")
        .bind(id.parse::<i64>().expect("job id"))
        .fetch_optional(&db.pool)
        .await
        .expect("job")
        .unwrap_or_else(|| panic!("job {job} is not on its shard"))
}

/// Checks on every shard that the example declares all of its
/// account-scoped tables ([`account_tables`]: every table of `public` with an
/// account column) and that their keys stay unique when a move copies an
/// account's rows to another shard: every unique index (the primary key
/// too) starts with the account column, and no column takes its values from
/// a per-shard sequence.
async fn assert_account_tables_move_safely(router: &Router) {
    let declared: BTreeSet<String> = account_tables().into_iter().map(|t| t.table).collect();
    for db in router.shards() {
        let with_account: BTreeSet<String> = sqlx::query_scalar(
            "SELECT table_name::text FROM information_schema.columns
              WHERE table_schema = 'public' AND column_name = 'account'",
        )
        .fetch_all(&db.pool)
        .await
        .expect("tables")
        .into_iter()
        .collect();
        assert_eq!(declared, with_account, "account-scoped tables on {}", db.name);
        for t in account_tables() {
            let unique: Vec<(String, Option<String>)> = sqlx::query_as(
                "SELECT i.indexrelid::regclass::text, a.attname::text
                   FROM pg_index i
                   LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                  WHERE i.indrelid = to_regclass($1) AND i.indisunique",
            )
            .bind(&t.table)
            .fetch_all(&db.pool)
            .await
            .expect("unique indexes");
            assert!(!unique.is_empty(), "{} has no primary key on {}", t.table, db.name);
            for (index, first) in unique {
                assert_eq!(
                    first.as_deref(),
                    Some(t.column.as_str()),
                    "unique index {index} of {} on {} does not start with {}",
                    t.table,
                    db.name,
                    t.column
                );
            }
            let sequenced: Vec<String> = sqlx::query_scalar(
                "SELECT column_name::text FROM information_schema.columns
                  WHERE table_schema = 'public' AND table_name = $1
                    AND (column_default LIKE 'nextval(%' OR is_identity = 'YES')",
            )
            .bind(&t.table)
            .fetch_all(&db.pool)
            .await
            .expect("columns");
            assert!(
                sequenced.is_empty(),
                "{}.{sequenced:?} on {} come from a per-shard sequence",
                t.table,
                db.name
            );
        }
    }
}

/// A document the API acknowledged while the test moved its account.
struct Acked {
    id: Uuid,
    body: String,
    /// The shard the answer named.
    shard: String,
    /// Its `process_document` job, `SHARD:ID`, as answered.
    job: String,
    /// Where the move was when the request was sent, and when it was answered.
    sent: u8,
    answered: u8,
}

/// Writes documents by `author` for `account` one after the other, each of
/// which must be answered 201, and sends each acknowledged one on `acked`;
/// stops after [`WRITES_AFTER_MOVE`] documents sent once `phase` is
/// [`MOVED`].
async fn keep_writing(
    api: Api,
    account: String,
    author: Uuid,
    phase: Arc<AtomicU8>,
    acked: tokio::sync::mpsc::UnboundedSender<Acked>,
) {
    let mut after_move = 0;
    for i in 0u32.. {
        let body = format!("written while {account} may be moving, number {i}");
        let sent = phase.load(Ordering::SeqCst);
        let (status, created) = api
            .post(
                &format!("/accounts/{account}/documents"),
                json!({"author": author, "title": format!("moving {i}"), "body": body}),
            )
            .await;
        let answered = phase.load(Ordering::SeqCst);
        assert_eq!(
            status,
            StatusCode::CREATED,
            "document {i} of {account} (move phase {sent} when sent, {answered} when answered): {created}"
        );
        let id = created["document"]["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("document id");
        let ack = Acked {
            id,
            body,
            shard: created["shard"].as_str().expect("shard").to_string(),
            job: created["job"].as_str().expect("job").to_string(),
            sent,
            answered,
        };
        if acked.send(ack).is_err() {
            return; // the test is gone
        }
        if sent == MOVED {
            after_move += 1;
            if after_move == WRITES_AFTER_MOVE {
                return;
            }
        }
    }
}

/// What the test wrote for one account.
struct Written {
    shard: String,
    user: Uuid,
    /// Document id → its body.
    documents: HashMap<Uuid, String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_keeps_each_accounts_rows_and_jobs_on_its_shard() {
    let config = migrated_fleet().await;
    let router = Arc::new(Router::connect(&config).await.expect("router"));
    for db in router.shards() {
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' AND tablename IN ('users', 'documents') ORDER BY 1",
        )
        .fetch_all(&db.pool)
        .await
        .expect("tables");
        assert_eq!(
            tables,
            ["documents", "users"],
            "the example's shard migration on {}",
            db.name
        );
    }

    assert_account_tables_move_safely(&router).await;

    let app = App::start(router.clone(), test_options()).expect("start the service");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.serve(listener, async {
        let _ = stopped.await;
    }));
    let api = Api {
        http: reqwest::Client::new(),
        base: format!("http://{addr}"),
    };

    // Bad account ids and bodies are refused with a clear message.
    let long = "x".repeat(300);
    assert_error(
        &api.post("/accounts", json!({"id": "_shardq", "name": "System"})).await,
        StatusCode::BAD_REQUEST,
        "reserved",
    );
    assert_error(
        &api.post("/accounts", json!({"id": long, "name": "Long"})).await,
        StatusCode::BAD_REQUEST,
        "is 300 bytes long",
    );
    assert_error(
        &api.post("/accounts", json!({"id": "acme", "name": "  "})).await,
        StatusCode::BAD_REQUEST,
        "name must not be empty",
    );
    let missing = api.post("/accounts", json!({"id": "acme"})).await;
    assert!(missing.0.is_client_error(), "{missing:?}");
    assert!(
        missing.1["error"].as_str().unwrap_or_default().contains("name"),
        "{missing:?}"
    );
    assert_error(
        &api.get(&format!("/accounts/{long}/documents")).await,
        StatusCode::BAD_REQUEST,
        "invalid account id",
    );
    assert_error(
        &api.get("/accounts/nobody/documents").await,
        StatusCode::NOT_FOUND,
        "does not exist",
    );

    // Accounts: a directory row in the master, a placement, and a unique
    // provisioning job on the account's shard.
    let master = router.master();
    let mut written: HashMap<&str, Written> = HashMap::new();
    for account in ACCOUNTS {
        let (status, created) = api
            .post("/accounts", json!({"id": account, "name": format!("{account} Inc.")}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        assert_eq!(created["created"], true);
        let shard = created["shard"].as_str().expect("shard").to_string();
        let placed: String = sqlx::query_scalar("SELECT shard FROM shardq.placements WHERE account = $1")
            .bind(account)
            .fetch_one(&master.pool)
            .await
            .expect("placement");
        assert_eq!(placed, shard, "{account}: the API's shard is the placement");
        let name: String = sqlx::query_scalar("SELECT name FROM accounts WHERE account = $1")
            .bind(account)
            .fetch_one(&master.pool)
            .await
            .expect("directory row");
        assert_eq!(name, format!("{account} Inc."));
        let provision = created["provision_job"].as_str().expect("provision job").to_string();
        assert!(provision.starts_with(&format!("{shard}:")), "{provision} on {shard}");
        let (job_account, kind, _) = job_row(&router, &provision).await;
        assert_eq!((job_account.as_str(), kind.as_str()), (account, "provision_account"));

        // Creating it again changes nothing and finds the same unique job.
        let (status, again) = api
            .post("/accounts", json!({"id": account, "name": "another name"}))
            .await;
        assert_eq!(status, StatusCode::OK, "{again}");
        assert_eq!(again["created"], false);
        assert_eq!(again["name"], format!("{account} Inc."));
        assert_eq!(again["provision_duplicate"], true);
        assert_eq!(again["provision_job"].as_str(), Some(provision.as_str()));

        let (status, shown) = api.get(&format!("/accounts/{account}")).await;
        assert_eq!(status, StatusCode::OK, "{shown}");
        assert_eq!(shown["shard"].as_str(), Some(shard.as_str()));

        written.insert(
            account,
            Written {
                shard,
                user: Uuid::nil(),
                documents: HashMap::new(),
            },
        );
    }
    let used: BTreeSet<&str> = written.values().map(|w| w.shard.as_str()).collect();
    assert!(
        used.len() >= 2,
        "the accounts should spread over shards, all are on {used:?}"
    );

    // Users and documents: each row, and each document's job, on the account's shard.
    for account in ACCOUNTS {
        let w = written.get_mut(account).expect("written");
        let db = router.shard(&w.shard).expect("shard");
        let email = format!("ada@{account}.test");
        let (status, user) = api
            .post(
                &format!("/accounts/{account}/users"),
                json!({"email": email, "name": "Ada"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{user}");
        assert_eq!(user["shard"].as_str(), Some(w.shard.as_str()));
        w.user = user["user"]["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("user id");
        let stored: String = sqlx::query_scalar("SELECT email FROM users WHERE account = $1 AND id = $2")
            .bind(account)
            .bind(w.user)
            .fetch_one(&db.pool)
            .await
            .expect("the user's row on the account's shard");
        assert_eq!(stored, email);
        assert_error(
            &api.post(
                &format!("/accounts/{account}/users"),
                json!({"email": email, "name": "Ada again"}),
            )
            .await,
            StatusCode::CONFLICT,
            "already has a user",
        );

        let bodies = [
            (
                Some(w.user),
                format!("Notes of {account}: the quick brown fox jumps over the lazy dog"),
            ),
            (
                Some(w.user),
                (1..=30).map(|i| format!("word{i}")).collect::<Vec<_>>().join(" "),
            ),
            (None, "an anonymous memo".to_string()),
        ];
        for (i, (author, body)) in bodies.into_iter().enumerate() {
            let (status, created) = api
                .post(
                    &format!("/accounts/{account}/documents"),
                    json!({"author": author, "title": format!("doc {i}"), "body": body}),
                )
                .await;
            assert_eq!(status, StatusCode::CREATED, "{created}");
            assert_eq!(created["shard"].as_str(), Some(w.shard.as_str()));
            let id: Uuid = created["document"]["id"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("document id");
            let stored: String = sqlx::query_scalar("SELECT body FROM documents WHERE account = $1 AND id = $2")
                .bind(account)
                .bind(id)
                .fetch_one(&db.pool)
                .await
                .expect("the document's row on the account's shard");
            assert_eq!(stored, body);
            let job = created["job"].as_str().expect("job id");
            assert!(job.starts_with(&format!("{}:", w.shard)), "{job} on {}", w.shard);
            let (job_account, kind, args) = job_row(&router, job).await;
            assert_eq!((job_account.as_str(), kind.as_str()), (account, "process_document"));
            assert_eq!(args["document"].as_str(), Some(id.to_string().as_str()));
            w.documents.insert(id, body);
        }
    }

    // Every job of every account completes, first time.
    for account in ACCOUNTS {
        let path = format!("/accounts/{account}/jobs?state=completed");
        wait_for(&format!("{JOBS_PER_ACCOUNT} completed jobs of {account}"), || async {
            let (status, jobs) = api.get(&path).await;
            status == StatusCode::OK && jobs.as_array().is_some_and(|j| j.len() == JOBS_PER_ACCOUNT)
        })
        .await;
        let (_, jobs) = api.get(&format!("/accounts/{account}/jobs")).await;
        let jobs = jobs.as_array().expect("jobs");
        assert_eq!(jobs.len(), JOBS_PER_ACCOUNT, "{jobs:?}");
        let shard = &written[account].shard;
        let mut kinds: Vec<&str> = Vec::new();
        for job in jobs {
            assert_eq!(job["state"], "completed", "{job}");
            assert_eq!(job["attempt"], 1, "{job}");
            assert_eq!(job["errors"], json!([]), "{job}");
            assert!(
                job["id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with(&format!("{shard}:"))),
                "{job}"
            );
            kinds.push(job["kind"].as_str().expect("kind"));
        }
        kinds.sort_unstable();
        assert_eq!(
            kinds,
            [
                "process_document",
                "process_document",
                "process_document",
                "process_document",
                "provision_account",
                "refresh_user_stats",
                "refresh_user_stats",
            ]
        );
    }

    // The jobs' effects: each document processed, the welcome document
    // written and processed, the user's count kept by the follow-ups.
    for account in ACCOUNTS {
        let w = &written[account];
        for (id, body) in &w.documents {
            let (status, shown) = api.get(&format!("/accounts/{account}/documents/{id}")).await;
            assert_eq!(status, StatusCode::OK, "{shown}");
            let doc = &shown["document"];
            let (words, summary) = analyse(body);
            assert_eq!(doc["status"], "processed", "{doc}");
            assert_eq!(doc["word_count"], words, "{doc}");
            assert_eq!(doc["summary"].as_str(), Some(summary.as_str()), "{doc}");
            assert!(summary.split(' ').count() <= SUMMARY_WORDS);
        }
        let (status, list) = api.get(&format!("/accounts/{account}/documents")).await;
        assert_eq!(status, StatusCode::OK, "{list}");
        let list = list.as_array().expect("documents");
        assert_eq!(list.len(), 4, "{list:?}");
        let welcome: Vec<&Value> = list.iter().filter(|d| d["welcome"] == true).collect();
        assert_eq!(welcome.len(), 1, "{list:?}");
        assert_eq!(welcome[0]["status"], "processed");
        assert!(welcome[0]["body"]
            .as_str()
            .is_some_and(|b| b.contains(&format!("{account} Inc."))));
        let (status, user) = api.get(&format!("/accounts/{account}/users/{}", w.user)).await;
        assert_eq!(status, StatusCode::OK, "{user}");
        assert_eq!(user["user"]["documents_processed"], 2, "{user}");
    }

    // Nothing of an account is on any shard but its own.
    for account in ACCOUNTS {
        let home = &written[account].shard;
        for db in router.shards() {
            let expected = |n: i64| if &db.name == home { n } else { 0 };
            assert_eq!(count_rows(&router, &db.name, "users", account).await, expected(1));
            assert_eq!(count_rows(&router, &db.name, "documents", account).await, expected(4));
            assert_eq!(
                count_rows(&router, &db.name, "shardq.jobs", account).await,
                expected(JOBS_PER_ACCOUNT as i64),
                "{account}'s jobs on {}",
                db.name
            );
        }
    }

    // A document by an unknown author is refused, and neither the row nor
    // its job is written (they share one transaction).
    let account = ACCOUNTS[0];
    let home = written[account].shard.clone();
    let (status, _) = api
        .post(
            &format!("/accounts/{account}/documents"),
            json!({"author": Uuid::from_u128(0x5eed), "title": "orphan", "body": "no one wrote this"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(count_rows(&router, &home, "documents", account).await, 4);
    assert_eq!(
        count_rows(&router, &home, "shardq.jobs", account).await,
        JOBS_PER_ACCOUNT as i64
    );
    assert_error(
        &api.get(&format!("/accounts/{account}/documents/not-a-uuid")).await,
        StatusCode::BAD_REQUEST,
        "UUID",
    );
    assert_error(
        &api.get(&format!("/accounts/{account}/jobs?state=finished")).await,
        StatusCode::BAD_REQUEST,
        "unknown job state",
    );
    assert_error(
        &api.get(&format!("/accounts/{account}/jobs?limit=0")).await,
        StatusCode::BAD_REQUEST,
        "limit must be",
    );

    // Deleting a document hides it at once; the periodic per-shard cleanup
    // removes the row.
    let doomed = *written[account].documents.keys().next().expect("a document");
    let (status, _) = api.delete(&format!("/accounts/{account}/documents/{doomed}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_error(
        &api.get(&format!("/accounts/{account}/documents/{doomed}")).await,
        StatusCode::NOT_FOUND,
        "has no document",
    );
    let db = router.shard(&home).expect("shard");
    wait_for("the cleanup job to remove the deleted document", || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM documents WHERE account = $1 AND id = $2")
            .bind(account)
            .bind(doomed)
            .fetch_one(&db.pool)
            .await
            .expect("count");
        left == 0
    })
    .await;
    for db in router.shards() {
        wait_for(&format!("a completed cleanup job on {}", db.name), || async {
            let done: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM shardq.jobs
                  WHERE kind = 'purge_deleted_documents' AND account = '_shardq' AND state = 'completed'",
            )
            .fetch_one(&db.pool)
            .await
            .expect("count");
            done > 0
        })
        .await;
    }

    // Moving an account while the service keeps serving it: a writer keeps
    // POSTing its documents before, during and after the move, and every
    // one of them must be acknowledged.
    let account = ACCOUNTS[1];
    let (from, user) = (written[account].shard.clone(), written[account].user);
    let to = router
        .shards()
        .iter()
        .map(|db| db.name.clone())
        .find(|name| *name != from)
        .expect("another shard");
    let phase = Arc::new(AtomicU8::new(BEFORE_MOVE));
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel();
    let writer = tokio::spawn(keep_writing(
        api.clone(),
        account.to_string(),
        user,
        phase.clone(),
        acked_tx,
    ));
    let mut acked: Vec<Acked> = Vec::new();
    while acked.len() < WRITES_BEFORE_MOVE {
        let ack = tokio::time::timeout(DEADLINE, acked_rx.recv())
            .await
            .expect("documents acknowledged before the move")
            .expect("the writer stopped early");
        acked.push(ack);
    }
    let mover = Mover::new(
        router.clone(),
        MoveOptions {
            tables: account_tables(),
            ..MoveOptions::default()
        },
    );
    phase.store(MOVING, Ordering::SeqCst);
    let moved = tokio::time::timeout(
        DEADLINE,
        mover.move_account(&Account::new(account).expect("account id"), &to),
    )
    .await
    .expect("the move ends within the deadline")
    .unwrap_or_else(|e| {
        panic!(
            "moving {account} from {from} to {to}: {}",
            shardq::error::ErrorChain(&e)
        )
    });
    phase.store(MOVED, Ordering::SeqCst);
    assert_eq!(
        (moved.step, moved.from.as_str(), moved.to.as_str()),
        (Step::Done, from.as_str(), to.as_str())
    );
    tokio::time::timeout(DEADLINE, writer)
        .await
        .expect("the writer ends within the deadline")
        .expect("every write during the move is acknowledged");
    while let Ok(ack) = acked_rx.try_recv() {
        acked.push(ack);
    }
    let overlapping = acked
        .iter()
        .filter(|a| a.sent <= MOVING && a.answered >= MOVING)
        .count();
    assert!(overlapping > 0, "no write was in flight during the move");
    for ack in acked.iter().filter(|a| a.sent == MOVED) {
        assert_eq!(ack.shard, to, "a document written after the move");
        assert!(ack.job.starts_with(&format!("{to}:")), "{} on {to}", ack.job);
        let (job_account, kind, args) = job_row(&router, &ack.job).await;
        assert_eq!((job_account.as_str(), kind.as_str()), (account, "process_document"));
        assert_eq!(args["document"].as_str(), Some(ack.id.to_string().as_str()));
    }
    eprintln!(
        "moved {account} from {from} to {to}: {} documents acknowledged, {overlapping} of them in flight during the move",
        acked.len()
    );

    // Every acknowledged document exists exactly once, on the new shard only;
    // so do the account's earlier rows, and all of its jobs.
    let ids: Vec<Uuid> = acked.iter().map(|a| a.id).collect();
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        ids.len(),
        "document ids repeat"
    );
    let documents = 4 + ids.len() as i64;
    let jobs = (JOBS_PER_ACCOUNT + 2 * ids.len()) as i64; // each: processing and its follow-up
    for db in router.shards() {
        let here = db.name == to;
        let found: i64 = sqlx::query_scalar("SELECT count(*) FROM documents WHERE account = $1 AND id = ANY($2)")
            .bind(account)
            .bind(&ids)
            .fetch_one(&db.pool)
            .await
            .expect("count");
        assert_eq!(
            found,
            if here { ids.len() as i64 } else { 0 },
            "acknowledged documents of {account} on {}",
            db.name
        );
        let expected = |n: i64| if here { n } else { 0 };
        assert_eq!(count_rows(&router, &db.name, "users", account).await, expected(1));
        assert_eq!(
            count_rows(&router, &db.name, "documents", account).await,
            expected(documents),
            "{account}'s documents on {}",
            db.name
        );
        if !here {
            assert_eq!(
                count_rows(&router, &db.name, "shardq.jobs", account).await,
                0,
                "{account}'s jobs left on {}",
                db.name
            );
        }
    }
    let placed: String = sqlx::query_scalar("SELECT shard FROM shardq.placements WHERE account = $1")
        .bind(account)
        .fetch_one(&master.pool)
        .await
        .expect("placement");
    assert_eq!(placed, to);

    // The processing of every document written before, during and after
    // the move completes on the new shard, with its follow-up.
    let target = router.shard(&to).expect("shard");
    wait_for(&format!("{jobs} completed jobs of {account} on {to}"), || async {
        let (all, completed): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE state = 'completed') FROM shardq.jobs WHERE account = $1",
        )
        .bind(account)
        .fetch_one(&target.pool)
        .await
        .expect("count");
        assert!(all <= jobs, "{all} jobs of {account} on {to}, expected {jobs}");
        completed == jobs
    })
    .await;
    let failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM shardq.jobs WHERE account = $1 AND jsonb_array_length(errors) > 0")
            .bind(account)
            .fetch_one(&target.pool)
            .await
            .expect("count");
    assert_eq!(failed, 0, "jobs of {account} failed an attempt on {to}");
    let id_texts: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    let processing: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM shardq.jobs
          WHERE account = $1 AND kind = 'process_document' AND args ->> 'document' = ANY($2)",
    )
    .bind(account)
    .bind(&id_texts)
    .fetch_one(&target.pool)
    .await
    .expect("count");
    assert_eq!(
        processing,
        ids.len() as i64,
        "one processing job per acknowledged document"
    );
    for db in router.shards().iter().filter(|db| db.name != to) {
        assert_eq!(count_rows(&router, &db.name, "shardq.jobs", account).await, 0);
    }

    // The API serves the account from its new shard: the account, every
    // document (processed), its user's count, its jobs.
    let (status, shown) = api.get(&format!("/accounts/{account}")).await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!(shown["shard"].as_str(), Some(to.as_str()));
    let bodies = written[account]
        .documents
        .iter()
        .map(|(id, body)| (*id, body.as_str()))
        .chain(acked.iter().map(|a| (a.id, a.body.as_str())));
    for (id, body) in bodies {
        let (status, shown) = api.get(&format!("/accounts/{account}/documents/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{shown}");
        assert_eq!(shown["shard"].as_str(), Some(to.as_str()), "{shown}");
        let (words, summary) = analyse(body);
        assert_eq!(shown["document"]["status"], "processed", "{shown}");
        assert_eq!(shown["document"]["word_count"], words, "{shown}");
        assert_eq!(shown["document"]["summary"].as_str(), Some(summary.as_str()), "{shown}");
    }
    let (status, list) = api.get(&format!("/accounts/{account}/documents?limit=500")).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list.as_array().map(Vec::len), Some(documents as usize));
    let (status, shown) = api.get(&format!("/accounts/{account}/users/{user}")).await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!(shown["shard"].as_str(), Some(to.as_str()));
    assert_eq!(shown["user"]["documents_processed"], 2 + ids.len(), "{shown}");
    let (status, listed) = api.get(&format!("/accounts/{account}/jobs?limit=500")).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let listed = listed.as_array().expect("jobs");
    assert!(!listed.is_empty());
    for job in listed {
        assert_eq!(job["state"], "completed", "{job}");
        assert!(
            job["id"].as_str().is_some_and(|id| id.starts_with(&format!("{to}:"))),
            "{job}"
        );
    }

    // One signal stops the server and the worker node together.
    stop.send(()).expect("the service is running");
    tokio::time::timeout(DEADLINE, server)
        .await
        .expect("the service stops within the deadline")
        .expect("join")
        .expect("the service stops cleanly");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the server still accepts connections after shutdown"
    );
    for db in router.shards() {
        let running: i64 = sqlx::query_scalar("SELECT count(*) FROM shardq.jobs WHERE state = 'running'")
            .fetch_one(&db.pool)
            .await
            .expect("count");
        assert_eq!(running, 0, "jobs left running on {} after shutdown", db.name);
    }
}

/// A shard's refusal of a moved account's write (SQLSTATE `SQ001`) is
/// recognised in every error the example's writes return it in, and
/// `retry_fenced` runs such a write exactly once more (other errors: never).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_write_is_recognised_and_retried_once() {
    let router = Router::connect(&fresh_fleet().await).await.expect("router");
    let db = &router.shards()[0];
    // What a shard's fence raises (the trigger's own statement).
    let refused = || async {
        let e = sqlx::query(
            "DO $$ BEGIN RAISE EXCEPTION 'account acme has moved to shard shard_2'
                 USING ERRCODE = 'SQ001', DETAIL = 'acme', HINT = 'shard_2'; END $$",
        )
        .execute(&db.pool)
        .await
        .expect_err("the statement raises");
        db.error(e)
    };
    let failed = || async {
        db.error(
            sqlx::query("SELECT 1 / 0")
                .execute(&db.pool)
                .await
                .expect_err("division by zero"),
        )
    };

    assert!(is_fenced(&refused().await), "a router error");
    assert!(is_fenced(&shardq::Error::from(refused().await)), "a shardq error");
    assert!(is_fenced(&ApiError::from(refused().await)), "an API error");
    assert!(is_fenced(&ApiError::from(shardq::Error::from(refused().await))));
    assert!(!is_fenced(&ApiError::from(failed().await)));

    let calls = AtomicUsize::new(0);
    let refused_twice: Result<(), ApiError> = retry_fenced(|| async {
        calls.fetch_add(1, Ordering::SeqCst);
        Err(refused().await.into())
    })
    .await;
    assert!(refused_twice.is_err_and(|e| is_fenced(&e)));
    assert_eq!(calls.swap(0, Ordering::SeqCst), 2, "a refused write runs twice");

    let second_try: Result<&str, ApiError> = retry_fenced(|| async {
        match calls.fetch_add(1, Ordering::SeqCst) {
            0 => Err(refused().await.into()),
            _ => Ok("written"),
        }
    })
    .await;
    assert_eq!(second_try.expect("the retry succeeds"), "written");
    assert_eq!(calls.swap(0, Ordering::SeqCst), 2);

    let other: Result<(), ApiError> = retry_fenced(|| async {
        calls.fetch_add(1, Ordering::SeqCst);
        Err(failed().await.into())
    })
    .await;
    assert!(other.is_err_and(|e| !is_fenced(&e)));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "other errors are not retried");
}
