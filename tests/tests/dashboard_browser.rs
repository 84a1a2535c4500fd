//! The dashboard in a real browser: headless Chromium (the Debian
//! `chromium` package; `.ci/run` installs it) loads every page of a
//! dashboard over a test bed whose third shard is stopped, the DOM it
//! built is checked for the expected rows and for the down shard, a cancel
//! is confirmed and submitted through the browser, and screenshots are
//! saved under `target/dashboard-screenshots/`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use shardq::{Account, NewJob};
use shardq_dashboard::{Actions, Dashboard, DashboardOptions};
use shardq_testbed::Server;
use shardq_tests::{fleet_on, on_server, private_bed};

const TOKEN: &str = "browser-token";

/// The Chromium binary: `$CHROMIUM`, or `chromium` on the PATH.
fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".to_string())
}

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs headless Chromium on `url` with `args`; returns its stdout.
async fn browse(url: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(chromium());
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1360,900",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let output = tokio::time::timeout(Duration::from_secs(90), command.output())
        .await
        .unwrap_or_else(|_| panic!("chromium did not finish within 90 s on {url}"))
        .unwrap_or_else(|e| panic!("cannot run {} (install the Debian package chromium): {e}", chromium()));
    assert!(
        output.status.success(),
        "chromium failed on {url}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The DOM Chromium built for `url`, after a screenshot of it named `name`.
async fn page(url: &str, name: &str) -> String {
    let shot = screenshots().join(format!("{name}.png"));
    let _ = std::fs::remove_file(&shot);
    let dom = browse(url, &[&format!("--screenshot={}", shot.display()), "--dump-dom"]).await;
    assert!(
        shot.metadata().map(|m| m.len() > 1000).unwrap_or(false),
        "no screenshot of {url}"
    );
    dom
}

/// The hidden inputs of the form `form_id` in a DOM, as (name, value).
fn hidden_fields(dom: &str, form_id: &str) -> Vec<(String, String)> {
    let form = dom.split(&format!("id=\"{form_id}\"")).nth(1).unwrap();
    let form = form.split("</form>").next().unwrap();
    form.split("<input type=\"hidden\" ")
        .skip(1)
        .map(|input| {
            let attr = |name: &str| {
                input
                    .split(&format!("{name}=\""))
                    .nth(1)
                    .unwrap()
                    .split('"')
                    .next()
                    .unwrap()
                    .to_string()
            };
            (attr("name"), attr("value"))
        })
        .collect()
}

/// Finished jobs over the last hour on a shard, for the charts: `n` jobs,
/// about one in eight discarded.
const HISTORY_SQL: &str =
    "INSERT INTO shardq.jobs (account, queue, kind, state, attempt, created_at, attempted_at, finalized_at)
     SELECT $2, (ARRAY['default', 'mail'])[g % 2 + 1], 'send_email',
            CASE WHEN g % 8 = 0 OR (g % 3 = 0 AND g % 400 < 40) THEN 'discarded' ELSE 'completed' END, 1, t.f, t.f, t.f
       FROM generate_series(1, $1::int) AS g
      CROSS JOIN LATERAL (SELECT now() - interval '1 second' * 3599 * power(g::float8 / $1, 0.8) AS f) AS t";

#[tokio::test]
async fn a_browser_renders_every_page_confirms_an_action_and_sees_the_down_shard() {
    let bed = private_bed(3).await;
    let f = fleet_on(&bed).await;
    let names: Vec<String> = f.router.shards().iter().map(|db| db.name.clone()).collect();
    assert_eq!(names[2], "shard_3");
    let mut jobs = Vec::new();
    for (i, shard) in names.iter().enumerate() {
        let account = Account::new(format!("customer-{}", i + 1)).unwrap();
        f.router.place(&account, shard).await.unwrap();
        // The last hour's history first, so ids grow with enqueue time.
        if i < 2 {
            let db = f.router.shard(shard).unwrap();
            sqlx::query(HISTORY_SQL)
                .bind(1500 + 900 * i as i32)
                .bind(account.as_str())
                .execute(&db.pool)
                .await
                .unwrap();
        }
        for n in 0..4 {
            let job = NewJob::from_json("send_email", serde_json::json!({"to": format!("user{n}@example.com")}))
                .queue("mail");
            jobs.push(f.client.enqueue(&account, job).await.unwrap());
        }
        let report = NewJob::from_json("build_report", serde_json::json!({"month": "2026-11"})).queue("reports");
        jobs.push(f.client.enqueue(&account, report).await.unwrap());
    }
    f.client.pause_queue(&names[1], "reports", "operator").await.unwrap();

    let dashboard = Dashboard::new(
        f.router.clone(),
        DashboardOptions {
            actions: Actions::Token(TOKEN.into()),
            shard_timeout: Duration::from_secs(2),
            ..DashboardOptions::default()
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(shardq_dashboard::serve_on(listener, dashboard, std::future::pending()));
    on_server(&bed, "shard_3", Server::stop).await;

    // Fleet: two shards up with charts, the third down with its error.
    let dom = page(&format!("{base}/"), "fleet").await;
    assert!(dom.contains("data-name=\"shard_1\" data-state=\"up\""), "{dom}");
    assert!(dom.contains("data-name=\"shard_2\" data-state=\"up\""), "{dom}");
    assert!(dom.contains("data-name=\"shard_3\" data-state=\"down\""), "{dom}");
    assert!(dom.matches("class=\"done\"").count() > 20, "charts have bars:\n{dom}");

    // Queues: the rows of the live shards, the paused queue, the down shard.
    let dom = page(&format!("{base}/queues"), "queues").await;
    assert!(dom.contains("data-shard=\"shard_1\" data-queue=\"mail\""), "{dom}");
    assert!(
        dom.contains("class=\"down shard-down\" data-shard=\"shard_3\""),
        "{dom}"
    );
    let paused_row = dom
        .split("data-shard=\"shard_2\" data-queue=\"reports\"")
        .nth(1)
        .unwrap();
    assert!(paused_row.split("</tr>").next().unwrap().contains(">paused<"), "{dom}");

    // Jobs: the live shards' jobs, newest first; the down shard named.
    let dom = page(&format!("{base}/jobs"), "jobs").await;
    for id in jobs.iter().filter(|id| id.shard != "shard_3") {
        assert!(dom.contains(&format!("data-id=\"{id}\"")), "{id} missing:\n{dom}");
    }
    assert!(dom.contains("shard shard_3 not searched"), "{dom}");

    // One job, the accounts.
    let target = jobs[0].clone();
    let dom = page(&format!("{base}/jobs/{target}"), "job").await;
    assert!(dom.contains("user0@example.com"), "{dom}");
    assert!(dom.contains("<button id=\"action\">cancel</button>"), "{dom}");
    let dom = page(&format!("{base}/accounts"), "accounts").await;
    assert!(dom.contains("data-account=\"customer-2\""), "{dom}");

    // Cancel through the browser: the confirmation page it rendered, its
    // form submitted with the token.
    let confirm = page(&format!("{base}/actions/confirm?action=cancel&job={target}"), "confirm").await;
    assert!(confirm.contains(&format!("cancel job {target}?")), "{confirm}");
    let fields = hidden_fields(&confirm, "confirm");
    assert_eq!(
        fields,
        vec![
            ("action".to_string(), "cancel".to_string()),
            ("job".to_string(), target.to_string())
        ]
    );
    let dir = tempfile::tempdir().unwrap();
    let submit = dir.path().join("submit.html");
    let inputs: String = fields
        .iter()
        .chain(std::iter::once(&("token".to_string(), TOKEN.to_string())))
        .map(|(n, v)| format!("<input type=\"hidden\" name=\"{n}\" value=\"{v}\">"))
        .collect();
    std::fs::write(
        &submit,
        format!(
            "<!doctype html><form id=\"f\" method=\"post\" action=\"{base}/actions\">{inputs}</form>\
             <script>document.getElementById('f').submit()</script>"
        ),
    )
    .unwrap();
    let done = browse(
        &format!("file://{}", submit.display()),
        &["--virtual-time-budget=5000", "--dump-dom"],
    )
    .await;
    assert!(done.contains(&format!("job {target} is cancelled")), "{done}");
    assert_eq!(f.client.job(&target).await.unwrap().state, "cancelled");
    on_server(&bed, "shard_3", Server::start).await;
}
