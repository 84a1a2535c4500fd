//! The web dashboard over HTTP against a real fleet: every page renders the
//! fleet's rows, searches filter and page without losing or repeating a
//! job, actions change what they say only with the token (and never on a
//! read-only dashboard), and a shard that is down is shown down while the
//! others render.
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shardq::{Account, NewJob};
use shardq_dashboard::{Actions, Dashboard, DashboardOptions};
use shardq_testbed::Server;
use shardq_tests::{fleet, fleet_on, on_server, private_bed, Fleet};
use tokio::sync::oneshot;

const TOKEN: &str = "s3cret-token";

/// A dashboard over `router`, served on a free loopback port until dropped.
struct Served {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

async fn serve(router: Arc<shardq::Router>, actions: Actions) -> Served {
    let dashboard = Dashboard::new(
        router,
        DashboardOptions {
            actions,
            shard_timeout: Duration::from_secs(2),
            ..DashboardOptions::default()
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(shardq_dashboard::serve_on(listener, dashboard, async {
        let _ = stopped.await;
    }));
    Served { addr, _stop: stop }
}

async fn get(s: &Served, path: &str) -> (u16, String) {
    let response = reqwest::get(format!("http://{}{path}", s.addr)).await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

async fn post(s: &Served, pairs: &[(&str, &str)]) -> (u16, String) {
    let body: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    let response = reqwest::Client::new()
        .post(format!("http://{}/actions", s.addr))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

fn enc(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// The `data-id`s of the job rows of a jobs page, in page order.
fn job_ids(html: &str) -> Vec<String> {
    html.split("<tr class=\"job\" data-id=\"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap().to_string())
        .collect()
}

/// The next page's link of a jobs page (HTML-unescaped), if any.
fn next_link(html: &str) -> Option<String> {
    let rest = html.split("<a id=\"next\" href=\"").nth(1)?;
    Some(rest.split('"').next().unwrap().replace("&amp;", "&"))
}

/// The cells of the table row that starts with `start`.
fn row_cells(html: &str, start: &str) -> Vec<String> {
    let row = html
        .split(start)
        .nth(1)
        .unwrap_or_else(|| panic!("no row {start} in:\n{html}"));
    let row = row.split("</tr>").next().unwrap();
    row.split("<td")
        .skip(1)
        .map(|cell| {
            let inner = cell.split_once('>').unwrap().1;
            let text = inner.split("</td>").next().unwrap();
            // Strip tags inside the cell.
            let mut out = String::new();
            let mut in_tag = false;
            for c in text.chars() {
                match c {
                    '<' => in_tag = true,
                    '>' => in_tag = false,
                    c if !in_tag => out.push(c),
                    _ => {}
                }
            }
            out.trim().to_string()
        })
        .collect()
}

fn account(n: u64) -> Account {
    Account::new(format!("acct-{n}")).unwrap()
}

/// Enqueues `n` jobs of `kind` on `queue` for `account`.
async fn enqueue(f: &Fleet, account: &Account, queue: &str, kind: &str, n: usize) -> Vec<shardq::JobId> {
    let jobs = (0..n).map(|i| {
        (
            account.clone(),
            NewJob::from_json(kind, serde_json::json!({ "n": i })).queue(queue),
        )
    });
    f.client.enqueue_many(jobs).await.unwrap()
}

/// Places `account` on `shard`.
async fn place(f: &Fleet, account: &Account, shard: &str) {
    f.router.place(account, shard).await.unwrap();
}

#[tokio::test]
async fn the_fleet_page_shows_the_master_and_every_shard_up_with_its_schema() {
    let f = fleet().await;
    let s = serve(f.router.clone(), Actions::ReadOnly).await;
    let (code, html) = get(&s, "/").await;
    assert_eq!(code, 200, "{html}");
    assert!(
        html.contains("<span id=\"readiness\" class=\"up\">ready</span>"),
        "{html}"
    );
    assert!(html.contains("data-name=\"master\""), "{html}");
    for db in f.router.shards() {
        let start = format!("data-name=\"{}\" data-state=\"up\"", db.name);
        assert!(html.contains(&start), "shard {} not up:\n{html}", db.name);
        let cells = row_cells(&html, &start);
        assert!(cells[3].starts_with('V'), "schema version of {}: {cells:?}", db.name);
    }
    assert!(html.contains("<svg"), "no chart:\n{html}");
}

#[tokio::test]
async fn the_queues_page_counts_per_shard_and_sums_over_the_fleet() {
    let f = fleet().await;
    let shards: Vec<String> = f.router.shards().iter().map(|db| db.name.clone()).collect();
    let (a, b) = (account(1), account(2));
    place(&f, &a, &shards[0]).await;
    place(&f, &b, &shards[1]).await;
    enqueue(&f, &a, "mail", "send", 3).await;
    enqueue(&f, &b, "mail", "send", 4).await;
    let s = serve(f.router.clone(), Actions::ReadOnly).await;
    let (code, html) = get(&s, "/queues").await;
    assert_eq!(code, 200, "{html}");
    let first = row_cells(&html, &format!("data-shard=\"{}\" data-queue=\"mail\">", shards[0]));
    let second = row_cells(&html, &format!("data-shard=\"{}\" data-queue=\"mail\">", shards[1]));
    let total = row_cells(&html, "<tr class=\"total\" data-queue=\"mail\">");
    assert_eq!(first[2], "3", "{first:?}");
    assert_eq!(second[2], "4", "{second:?}");
    assert_eq!(total[1], "7", "{total:?}");
    // Read-only: no pause buttons.
    assert!(!html.contains("name=\"action\""), "{html}");
}

#[tokio::test]
async fn job_search_filters_and_pages_through_every_shard_without_losing_or_repeating_a_job() {
    let f = fleet().await;
    let shards: Vec<String> = f.router.shards().iter().map(|db| db.name.clone()).collect();
    let mut all = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        let a = account(10 + i as u64);
        place(&f, &a, shard).await;
        all.extend(enqueue(&f, &a, "default", "alpha", 30).await);
        all.extend(enqueue(&f, &a, "other", "beta", 10).await);
    }
    let s = serve(f.router.clone(), Actions::ReadOnly).await;

    // Every job exactly once, newest first within each shard, over pages.
    let mut seen = Vec::new();
    let mut path = "/jobs".to_string();
    let mut pages = 0;
    loop {
        let (code, html) = get(&s, &path).await;
        assert_eq!(code, 200, "{html}");
        let ids = job_ids(&html);
        assert!(ids.len() <= 50, "a page holds at most 50 jobs");
        seen.extend(ids);
        pages += 1;
        match next_link(&html) {
            Some(next) => path = next,
            None => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    let mut expected: Vec<String> = all.iter().map(|id| id.to_string()).collect();
    let mut got = seen.clone();
    expected.sort();
    got.sort();
    assert_eq!(got, expected, "every job exactly once");
    assert!(pages >= 3, "120 jobs take 3 pages of 50, got {pages}");

    // Filters: kind and queue and account, and shard.
    let (_, html) = get(&s, "/jobs?kind=beta").await;
    let ids = job_ids(&html);
    assert_eq!(ids.len(), 30, "{html}");
    let (_, html) = get(&s, &format!("/jobs?queue=other&shard={}", enc(&shards[1]))).await;
    let ids = job_ids(&html);
    assert_eq!(ids.len(), 10);
    assert!(
        ids.iter().all(|id| id.starts_with(&format!("{}:", shards[1]))),
        "{ids:?}"
    );
    let (_, html) = get(&s, &format!("/jobs?account={}&kind=alpha", account(10))).await;
    assert_eq!(job_ids(&html).len(), 30);
    let (_, html) = get(&s, "/jobs?state=completed").await;
    assert!(job_ids(&html).is_empty());

    // Bad input names the field and the value.
    let (code, html) = get(&s, "/jobs?state=finished").await;
    assert_eq!(code, 400);
    assert!(
        html.contains("state: unknown job state &#34;finished&#34;") || html.contains("unknown job state"),
        "{html}"
    );
    let (code, html) = get(&s, "/jobs?id=nocolon").await;
    assert_eq!(code, 400);
    assert!(html.contains("id:"), "{html}");
    let (code, _) = get(&s, "/jobs?shard=nowhere").await;
    assert_eq!(code, 400);

    // Search by id opens the job.
    let (code, html) = get(&s, &format!("/jobs?id={}", enc(&all[0].to_string()))).await;
    assert_eq!(code, 200);
    assert!(
        html.contains(&format!("<span id=\"job-id\">{}</span>", all[0])),
        "{html}"
    );
}

#[tokio::test]
async fn the_job_page_shows_args_attempts_errors_and_timestamps() {
    let f = fleet().await;
    let a = account(20);
    let id = f
        .client
        .enqueue(
            &a,
            NewJob::from_json("report", serde_json::json!({"month": "2026-01", "note": "<b>x</b>"})),
        )
        .await
        .unwrap();
    // The job failed twice for good: as the completer writes it.
    let db = f.router.shard(&id.shard).unwrap();
    sqlx::query(
        "UPDATE shardq.jobs SET state = 'discarded', attempt = 2, max_attempts = 2, finalized_at = now(),
                errors = '[{\"attempt\": 1, \"at\": \"2026-01-01T00:00:00Z\", \"error\": \"timeout talking to <bank>\"},
                           {\"attempt\": 2, \"at\": \"2026-01-01T00:01:00Z\", \"error\": \"gave up\"}]'
          WHERE id = $1",
    )
    .bind(id.id)
    .execute(&db.pool)
    .await
    .unwrap();
    let s = serve(f.router.clone(), Actions::ReadOnly).await;
    let (code, html) = get(&s, &format!("/jobs/{}", enc(&id.to_string()))).await;
    assert_eq!(code, 200, "{html}");
    assert!(
        html.contains("id=\"job-state\" class=\"state-discarded\">discarded"),
        "{html}"
    );
    assert!(html.contains("2 of 2"), "{html}");
    assert!(
        html.contains("&#34;month&#34;: &#34;2026-01&#34;"),
        "args, escaped:\n{html}"
    );
    // Text from the job is escaped, never markup.
    assert!(!html.contains("<b>x</b>") && !html.contains("<bank>"), "{html}");
    assert!(html.contains("timeout talking to &#60;bank&#62;"), "{html}");
    assert_eq!(html.matches("class=\"job-error\"").count(), 2);
    // Read-only: no action button.
    assert!(!html.contains("id=\"action\""), "{html}");
    let (code, _) = get(&s, "/jobs/nowhere:1").await;
    assert_eq!(code, 400);
    let (code, _) = get(&s, &format!("/jobs/{}", enc(&format!("{}:999999", id.shard)))).await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn the_accounts_pages_show_placements_epochs_counts_and_moves() {
    let f = fleet().await;
    let shard = f.router.shards()[1].name.clone();
    let a = account(30);
    place(&f, &a, &shard).await;
    enqueue(&f, &a, "default", "alpha", 5).await;
    let s = serve(f.router.clone(), Actions::ReadOnly).await;
    let (code, html) = get(&s, "/accounts").await;
    assert_eq!(code, 200, "{html}");
    let cells = row_cells(&html, &format!("data-account=\"{a}\">"));
    assert_eq!(cells[1], shard);
    assert_eq!(cells[2], "1", "epoch");
    assert!(html.contains("id=\"no-moves\""), "{html}");
    let (code, html) = get(&s, &format!("/accounts/{a}")).await;
    assert_eq!(code, 200, "{html}");
    assert!(html.contains(&format!("<td id=\"shard\">{shard}</td>")), "{html}");
    let cells = row_cells(&html, "data-state=\"available\">");
    assert_eq!(cells[1], "5");
    let (code, _) = get(&s, "/accounts/never-seen").await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn a_read_only_dashboard_refuses_every_action_and_shows_no_button() {
    let f = fleet().await;
    let a = account(40);
    let id = enqueue(&f, &a, "default", "alpha", 1).await.remove(0);
    let s = serve(f.router.clone(), Actions::ReadOnly).await;
    let (code, _) = get(
        &s,
        &format!("/actions/confirm?action=cancel&job={}", enc(&id.to_string())),
    )
    .await;
    assert_eq!(code, 403);
    for token in ["", TOKEN] {
        let (code, html) = post(&s, &[("action", "cancel"), ("job", &id.to_string()), ("token", token)]).await;
        assert_eq!(code, 403, "{html}");
        assert!(html.contains("read-only"), "{html}");
    }
    assert_eq!(f.client.job(&id).await.unwrap().state, "available");
    let (code, _) = post(&s, &[("action", "pause"), ("shard", &id.shard), ("queue", "default")]).await;
    assert_eq!(code, 403);
    assert!(f.client.paused_queues(&id.shard).await.unwrap().is_empty());
}

#[tokio::test]
async fn actions_with_the_token_cancel_retry_and_pause_and_nothing_changes_without_it() {
    let f = fleet().await;
    let a = account(50);
    let shard = f.router.shard_for(&a).await.unwrap().shard;
    let id = enqueue(&f, &a, "default", "alpha", 1).await.remove(0);
    let s = serve(f.router.clone(), Actions::Token(TOKEN.into())).await;
    let job = id.to_string();

    // The job page offers cancel; the confirmation asks for the token.
    let (_, html) = get(&s, &format!("/jobs/{}", enc(&job))).await;
    assert!(html.contains("<button id=\"action\">cancel</button>"), "{html}");
    let (code, html) = get(&s, &format!("/actions/confirm?action=cancel&job={}", enc(&job))).await;
    assert_eq!(code, 200, "{html}");
    assert!(html.contains(&format!("cancel job {job}?")), "{html}");
    assert!(html.contains("name=\"token\""), "{html}");

    // A wrong or missing token changes nothing.
    for token in ["", "wrong"] {
        let (code, _) = post(&s, &[("action", "cancel"), ("job", &job), ("token", token)]).await;
        assert_eq!(code, 403);
    }
    assert_eq!(f.client.job(&id).await.unwrap().state, "available");

    // Cancel, then retry.
    let (code, html) = post(&s, &[("action", "cancel"), ("job", &job), ("token", TOKEN)]).await;
    assert_eq!(code, 200, "{html}");
    assert!(html.contains(&format!("job {job} is cancelled")), "{html}");
    assert_eq!(f.client.job(&id).await.unwrap().state, "cancelled");
    let (code, html) = post(&s, &[("action", "retry"), ("job", &job), ("token", TOKEN)]).await;
    assert_eq!(code, 200, "{html}");
    assert_eq!(f.client.job(&id).await.unwrap().state, "available");
    // A refused state change is a clear 400 naming the job.
    let (code, html) = post(&s, &[("action", "retry"), ("job", &job), ("token", TOKEN)]).await;
    assert_eq!(code, 400, "{html}");
    assert!(html.contains(&job), "{html}");

    // Retry every discarded job of a kind on the shard (and no other).
    let ids = enqueue(&f, &a, "default", "flaky", 3).await;
    let other = enqueue(&f, &a, "default", "steady", 1).await.remove(0);
    let db = f.router.shard(&shard).unwrap();
    sqlx::query("UPDATE shardq.jobs SET state = 'discarded', finalized_at = now(), attempt = 1, max_attempts = 1 WHERE kind IN ('flaky', 'steady')")
        .execute(&db.pool)
        .await
        .unwrap();
    let (_, html) = get(&s, &format!("/jobs?state=discarded&kind=flaky&shard={}", enc(&shard))).await;
    assert!(html.contains("id=\"retry-discarded\""), "{html}");
    let (code, html) = post(
        &s,
        &[
            ("action", "retry-discarded"),
            ("shard", &shard),
            ("kind", "flaky"),
            ("token", TOKEN),
        ],
    )
    .await;
    assert_eq!(code, 200, "{html}");
    assert!(html.contains("retried 3 discarded jobs"), "{html}");
    for id in &ids {
        assert_eq!(f.client.job(id).await.unwrap().state, "available");
    }
    assert_eq!(f.client.job(&other).await.unwrap().state, "discarded");

    // Pause and resume the queue on the shard.
    let (code, html) = post(
        &s,
        &[
            ("action", "pause"),
            ("shard", &shard),
            ("queue", "default"),
            ("token", TOKEN),
        ],
    )
    .await;
    assert_eq!(code, 200, "{html}");
    let paused = f.client.paused_queues(&shard).await.unwrap();
    assert_eq!(paused.len(), 1);
    assert_eq!(paused[0].queue, "default");
    assert_eq!(paused[0].paused_by, "dashboard");
    let (_, html) = get(&s, "/queues").await;
    let cells = row_cells(&html, &format!("data-shard=\"{shard}\" data-queue=\"default\">"));
    assert_eq!(cells[8], "paused", "{cells:?}");
    assert!(html.contains("<button>resume</button>"), "{html}");
    let (code, _) = post(
        &s,
        &[
            ("action", "resume"),
            ("shard", &shard),
            ("queue", "default"),
            ("token", TOKEN),
        ],
    )
    .await;
    assert_eq!(code, 200);
    assert!(f.client.paused_queues(&shard).await.unwrap().is_empty());

    // Bad input is named and changes nothing.
    let (code, html) = post(
        &s,
        &[
            ("action", "pause"),
            ("shard", "nowhere"),
            ("queue", "q"),
            ("token", TOKEN),
        ],
    )
    .await;
    assert_eq!(code, 400, "{html}");
    assert!(html.contains("nowhere"), "{html}");
    let (code, html) = post(&s, &[("action", "explode"), ("token", TOKEN)]).await;
    assert_eq!(code, 400);
    assert!(html.contains("unknown action"), "{html}");
}

#[tokio::test]
async fn a_down_shard_is_shown_down_with_its_error_and_every_other_shard_renders() {
    let bed = private_bed(2).await;
    let f = fleet_on(&bed).await;
    let (up, down) = (f.router.shards()[0].name.clone(), f.router.shards()[1].name.clone());
    let (a, b) = (account(60), account(61));
    place(&f, &a, &up).await;
    place(&f, &b, &down).await;
    let kept = enqueue(&f, &a, "default", "alpha", 2).await;
    enqueue(&f, &b, "default", "alpha", 2).await;
    let s = serve(f.router.clone(), Actions::ReadOnly).await;
    assert_eq!(down, "shard_2", "the bed's second shard server");
    on_server(&bed, "shard_2", Server::stop).await;

    let (code, html) = get(&s, "/").await;
    assert_eq!(code, 200, "{html}");
    assert!(
        html.contains(&format!("data-name=\"{down}\" data-state=\"down\"")),
        "{html}"
    );
    assert!(
        html.contains(&format!("data-name=\"{up}\" data-state=\"up\"")),
        "{html}"
    );
    let cells = row_cells(&html, &format!("data-name=\"{down}\" data-state=\"down\">"));
    assert!(
        cells[2].starts_with("down") && cells[2].len() > "down".len(),
        "the error is shown: {cells:?}"
    );

    let (code, html) = get(&s, "/queues").await;
    assert_eq!(code, 200, "{html}");
    assert!(
        html.contains(&format!("class=\"down shard-down\" data-shard=\"{down}\"")),
        "{html}"
    );
    assert_eq!(
        row_cells(&html, &format!("data-shard=\"{up}\" data-queue=\"default\">"))[2],
        "2"
    );

    let (code, html) = get(&s, "/jobs").await;
    assert_eq!(code, 200, "{html}");
    assert!(html.contains(&format!("data-shard=\"{down}\"")), "{html}");
    let mut ids = job_ids(&html);
    ids.sort();
    let mut expected: Vec<String> = kept.iter().map(|id| id.to_string()).collect();
    expected.sort();
    assert_eq!(ids, expected);
    on_server(&bed, "shard_2", Server::start).await;
}

#[tokio::test]
async fn mounted_behind_an_application_with_trusted_actions_its_links_and_actions_work_under_the_prefix() {
    let f = fleet().await;
    let a = account(70);
    let id = enqueue(&f, &a, "default", "alpha", 1).await.remove(0);
    let dashboard = Dashboard::new(
        f.router.clone(),
        DashboardOptions {
            actions: Actions::Trusted,
            base: "/admin/jobs".into(),
            ..DashboardOptions::default()
        },
    );
    let app = axum::Router::new().nest("/admin/jobs", shardq_dashboard::router(dashboard));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let s = Served {
        addr,
        _stop: oneshot::channel().0,
    };
    let (code, html) = get(&s, "/admin/jobs").await;
    assert_eq!(code, 200, "{html}");
    assert!(html.contains("href=\"/admin/jobs/queues\""), "{html}");
    assert!(html.contains("class=\"brand\" href=\"/admin/jobs\""), "{html}");
    let (code, html) = get(&s, &format!("/admin/jobs/jobs?id={}", enc(&id.to_string()))).await;
    assert_eq!(code, 200, "the id search redirects under the prefix: {html}");
    // Trusted: no token asked, and the action runs without one.
    let (code, html) = get(
        &s,
        &format!("/admin/jobs/actions/confirm?action=cancel&job={}", enc(&id.to_string())),
    )
    .await;
    assert_eq!(code, 200, "{html}");
    assert!(!html.contains("name=\"token\""), "{html}");
    assert!(html.contains("action=\"/admin/jobs/actions\""), "{html}");
    let body = format!("action=cancel&job={}", enc(&id.to_string()));
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/admin/jobs/actions"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(f.client.job(&id).await.unwrap().state, "cancelled");
}
