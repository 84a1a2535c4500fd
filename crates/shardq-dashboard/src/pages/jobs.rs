//! The jobs page: search by id (`SHARD:ID`, which opens the job), account,
//! kind, state, queue and shard; newest first (per shard by id; shards
//! merged by enqueue time); paged by keyset.
//!
//! The cursor holds, per shard still to read, the id to read below
//! (`s1:1234,s2:99`); a shard missing from a cursor has no more matches.
//! Without kind, state or queue, a page is one index range per shard
//! (the primary key, or `shardq.account_jobs` with an account). With them, each
//! shard reads at most `store::SCAN_CAP` rows per page, and when that cap
//! stops a search the next page goes on from where it stopped.

use std::collections::BTreeMap;

use askama::Template;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use shardq::{JobId, JobState};
use shardq_router::router::Database;

use super::layout::{self, field, Nav};
use crate::display;
use crate::error::{Error, Result};
use crate::state::Dashboard;
use crate::store::{self, JobFilter, JobRow};

/// Jobs per page.
const PAGE: i64 = 50;

/// The search form's fields.
#[derive(Debug, Default, Deserialize)]
pub struct JobsQuery {
    id: Option<String>,
    account: Option<String>,
    kind: Option<String>,
    state: Option<String>,
    queue: Option<String>,
    shard: Option<String>,
    cursor: Option<String>,
}

#[derive(Template)]
#[template(path = "jobs.html")]
struct JobsPage {
    nav: Nav,
    title: String,
    form: Form,
    shards: Vec<String>,
    states: Vec<&'static str>,
    jobs: Vec<JobView>,
    skipped: Vec<Skipped>,
    next: String,
    scanned_note: String,
    /// Offer "retry the discarded jobs of this kind on this shard".
    retry_discarded: bool,
}

/// The form as submitted (for the inputs' values and the next page's link).
#[derive(Default)]
struct Form {
    account: String,
    kind: String,
    state: String,
    queue: String,
    shard: String,
}

struct Skipped {
    shard: String,
    error: String,
}

struct JobView {
    id: String,
    account: String,
    queue: String,
    kind: String,
    state: String,
    attempts: String,
    created: String,
    run_at: String,
    finalized: String,
}

/// What one shard gave for a page.
struct ShardPage {
    rows: Vec<JobRow>,
    /// Where to go on below when every row of `rows` is shown (`None`: no more).
    then: Option<i64>,
    /// Whether the scan cap stopped the search (more may match further down).
    capped: bool,
}

/// `GET /jobs`.
pub async fn page(State(dashboard): State<Dashboard>, Query(q): Query<JobsQuery>) -> Result<Response> {
    if let Some(id) = field(&q.id) {
        let parsed: JobId = id.parse().map_err(|e| Error::BadInput {
            field: "id",
            message: format!("{e}"),
        })?;
        let base = &dashboard.options().base;
        return Ok(Redirect::to(&format!("{base}/jobs/{}", encode(&parsed.to_string()))).into_response());
    }
    let state = field(&q.state);
    if let Some(s) = &state {
        s.parse::<JobState>().map_err(|_| Error::BadInput {
            field: "state",
            message: format!("unknown job state {s:?}; one of available, running, completed, discarded, cancelled"),
        })?;
    }
    let filter = JobFilter {
        account: field(&q.account),
        kind: field(&q.kind),
        state,
        queue: field(&q.queue),
    };
    let router = dashboard.router();
    let only = field(&q.shard);
    if let Some(name) = &only {
        router.shard(name)?;
    }
    // Which shards to read, and below which id.
    let cursors: Vec<(&Database, i64)> = match field(&q.cursor) {
        None => router
            .shards()
            .iter()
            .filter(|db| only.as_deref().is_none_or(|s| s == db.name))
            .map(|db| (db, i64::MAX))
            .collect(),
        Some(cursor) => parse_cursor(&cursor)?
            .into_iter()
            .map(|(shard, below)| Ok((router.shard(&shard).map_err(|_| bad_cursor(&cursor))?, below)))
            .collect::<Result<_>>()?,
    };
    let reads = cursors
        .iter()
        .map(|(db, below)| shard_page(&dashboard, db, &filter, *below));
    let results = futures::future::join_all(reads).await;

    let mut skipped = Vec::new();
    let mut pages: Vec<(&Database, i64, ShardPage)> = Vec::new();
    for ((db, below), result) in cursors.iter().zip(results) {
        match result {
            Ok(p) => pages.push((db, *below, p)),
            Err(error) => skipped.push(Skipped {
                shard: db.name.clone(),
                error,
            }),
        }
    }
    // Merge newest first across shards, keep a page, and work out each
    // shard's next cursor.
    let mut all: Vec<(usize, &JobRow)> = pages
        .iter()
        .enumerate()
        .flat_map(|(i, (_, _, p))| p.rows.iter().map(move |r| (i, r)))
        .collect();
    all.sort_by(|a, b| b.1.created_at.cmp(&a.1.created_at).then(b.1.id.cmp(&a.1.id)));
    all.truncate(PAGE as usize);
    let mut shown: BTreeMap<usize, (usize, i64)> = BTreeMap::new();
    for (i, row) in &all {
        let e = shown.entry(*i).or_insert((0, i64::MAX));
        e.0 += 1;
        e.1 = e.1.min(row.id);
    }
    let mut next: Vec<(String, i64)> = Vec::new();
    let mut any_capped = false;
    for (i, (db, below, p)) in pages.iter().enumerate() {
        let cont = match shown.get(&i) {
            Some((n, lowest)) if *n < p.rows.len() => Some(*lowest),
            Some(_) => p.then,
            None if p.rows.is_empty() => p.then,
            None => Some(*below),
        };
        any_capped |= p.capped;
        if let Some(c) = cont {
            next.push((db.name.clone(), c));
        }
    }
    // A down shard is retried from where it was.
    for s in &skipped {
        if let Some((_, below)) = cursors.iter().find(|(db, _)| db.name == s.shard) {
            next.push((s.shard.clone(), *below));
        }
    }
    let form = Form {
        account: filter.account.clone().unwrap_or_default(),
        kind: filter.kind.clone().unwrap_or_default(),
        state: filter.state.clone().unwrap_or_default(),
        queue: filter.queue.clone().unwrap_or_default(),
        shard: only.unwrap_or_default(),
    };
    let next = if next.is_empty() {
        String::new()
    } else {
        let cursor: Vec<String> = next.iter().map(|(s, id)| format!("{s}:{id}")).collect();
        next_link(&dashboard.options().base, &form, &cursor.join(","))
    };
    let page = JobsPage {
        nav: Nav::of(&dashboard),
        title: "Jobs".to_string(),
        shards: router.shards().iter().map(|db| db.name.clone()).collect(),
        states: vec!["available", "running", "completed", "discarded", "cancelled"],
        jobs: all.into_iter().map(|(i, r)| view(&pages[i].0.name, r)).collect(),
        skipped,
        next,
        scanned_note: if any_capped {
            format!(
                "Filtered searches read at most {} jobs per shard per page; the next page searches on.",
                display::count(store::SCAN_CAP, false)
            )
        } else {
            String::new()
        },
        retry_discarded: dashboard.actions_enabled()
            && form.state == "discarded"
            && !form.kind.is_empty()
            && !form.shard.is_empty(),
        form,
    };
    Ok(layout::render("jobs", &page)?.into_response())
}

/// One shard's page below `below`, within the shard timeout.
async fn shard_page(dashboard: &Dashboard, db: &Database, filter: &JobFilter, below: i64) -> Result<ShardPage, String> {
    let rows = dashboard
        .within(db, store::jobs_page(&db.pool, filter, below, PAGE))
        .await?;
    if rows.len() as i64 == PAGE {
        let then = rows.last().map(|r| r.id);
        return Ok(ShardPage {
            rows,
            then,
            capped: false,
        });
    }
    if !filter.narrows() {
        return Ok(ShardPage {
            rows,
            then: None,
            capped: false,
        });
    }
    // Fewer matches than a page: either no more rows, or the cap stopped it.
    let (lowest, read) = dashboard
        .within(db, store::jobs_frontier(&db.pool, filter.account.as_deref(), below))
        .await?;
    let capped = read >= store::SCAN_CAP;
    Ok(ShardPage {
        rows,
        then: if capped { lowest } else { None },
        capped,
    })
}

fn view(shard: &str, r: &JobRow) -> JobView {
    JobView {
        id: format!("{shard}:{}", r.id),
        account: r.account.clone(),
        queue: r.queue.clone(),
        kind: r.kind.clone(),
        state: r.state.clone(),
        attempts: format!("{}/{}", r.attempt, r.max_attempts),
        created: display::time(&r.created_at),
        run_at: display::time(&r.run_at),
        finalized: display::time_opt(r.finalized_at.as_ref()),
    }
}

fn bad_cursor(cursor: &str) -> Error {
    Error::BadInput {
        field: "cursor",
        message: format!("{cursor:?} is not a list of SHARD:ID of configured shards"),
    }
}

/// `s1:12,s2:34` as (shard, id) pairs.
fn parse_cursor(cursor: &str) -> Result<Vec<(String, i64)>> {
    cursor
        .split(',')
        .map(|part| {
            let (shard, id) = part.rsplit_once(':').ok_or_else(|| bad_cursor(cursor))?;
            let id: i64 = id.parse().map_err(|_| bad_cursor(cursor))?;
            Ok((shard.to_string(), id))
        })
        .collect()
}

/// The link to the next page, keeping the filters.
fn next_link(base: &str, form: &Form, cursor: &str) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.append_pair("cursor", cursor);
    for (name, value) in [
        ("account", &form.account),
        ("kind", &form.kind),
        ("state", &form.state),
        ("queue", &form.queue),
        ("shard", &form.shard),
    ] {
        if !value.is_empty() {
            query.append_pair(name, value);
        }
    }
    format!("{base}/jobs?{}", query.finish())
}

/// Percent-encodes `text` for a URL path segment or query value.
pub(super) fn encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        assert_eq!(
            parse_cursor("s1:12,s-2:34").unwrap_or_default(),
            vec![("s1".to_string(), 12), ("s-2".to_string(), 34)]
        );
        assert!(parse_cursor("s1").is_err());
        assert!(parse_cursor("s1:x").is_err());
    }

    #[test]
    fn encoding_keeps_job_ids_readable() {
        assert_eq!(encode("s1:42"), "s1%3A42");
        assert_eq!(encode("a b&c"), "a+b%26c");
    }
}
