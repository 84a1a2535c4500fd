//! The queues page: per shard and summed over the fleet, jobs available,
//! scheduled and running, the oldest wait, completed and failed in the last
//! minute, and whether the queue is paused on the shard (with pause and
//! resume buttons when actions are on). Depths are counted up to
//! `shardq::observe::status::DEPTH_CAP` per queue and shard.

use std::collections::BTreeMap;

use askama::Template;
use axum::extract::State;
use axum::response::Html;
use shardq::observe::status::{self, QueueStatus};
use shardq_router::router::Database;

use super::layout::{self, Nav};
use crate::display;
use crate::error::Result;
use crate::state::Dashboard;

#[derive(Template)]
#[template(path = "queues.html")]
struct QueuesPage {
    nav: Nav,
    title: String,
    actions: bool,
    totals: Vec<QueueRow>,
    rows: Vec<QueueRow>,
    down: Vec<Down>,
}

struct Down {
    shard: String,
    error: String,
}

struct QueueRow {
    shard: String,
    queue: String,
    available: String,
    scheduled: String,
    running: String,
    oldest: String,
    completed_1m: String,
    failed_1m: String,
    paused: String,
}

/// A queue's numbers, summed over shards.
#[derive(Default)]
struct Sum {
    q: QueueStatus,
    paused_on: Vec<String>,
}

/// `GET /queues`.
pub async fn page(State(dashboard): State<Dashboard>) -> Result<Html<String>> {
    let shards = futures::future::join_all(dashboard.router().shards().iter().map(|db| shard(&dashboard, db))).await;
    let mut rows = Vec::new();
    let mut down = Vec::new();
    let mut sums: BTreeMap<String, Sum> = BTreeMap::new();
    for (name, read) in shards {
        let (queues, paused) = match read {
            Ok(read) => read,
            Err(error) => {
                down.push(Down { shard: name, error });
                continue;
            }
        };
        for q in &queues {
            let is_paused = paused.contains(&q.queue);
            rows.push(row(&name, q, if is_paused { "paused" } else { "" }));
            let sum = sums.entry(q.queue.clone()).or_default();
            sum.q.available += q.available;
            sum.q.scheduled += q.scheduled;
            sum.q.capped |= q.capped;
            sum.q.running += q.running;
            sum.q.oldest_available_secs = sum.q.oldest_available_secs.max(q.oldest_available_secs);
            sum.q.completed_1m += q.completed_1m;
            sum.q.failed_1m += q.failed_1m;
            if is_paused {
                sum.paused_on.push(name.clone());
            }
        }
    }
    let totals = sums
        .into_iter()
        .map(|(queue, sum)| {
            let paused = if sum.paused_on.is_empty() {
                String::new()
            } else {
                format!("paused on {}", sum.paused_on.join(", "))
            };
            row("all shards", &QueueStatus { queue, ..sum.q }, &paused)
        })
        .collect();
    let page = QueuesPage {
        nav: Nav::of(&dashboard),
        title: "Queues".to_string(),
        actions: dashboard.actions_enabled(),
        totals,
        rows,
        down,
    };
    layout::render("queues", &page)
}

fn row(shard: &str, q: &QueueStatus, paused: &str) -> QueueRow {
    QueueRow {
        shard: shard.to_string(),
        queue: q.queue.clone(),
        available: display::count(q.available, q.capped),
        scheduled: display::count(q.scheduled, q.capped),
        running: display::count(q.running, false),
        oldest: display::age(q.oldest_available_secs),
        completed_1m: display::count(q.completed_1m, false),
        failed_1m: display::count(q.failed_1m, false),
        paused: paused.to_string(),
    }
}

/// One shard's queues (a paused queue without jobs included) and its
/// paused queue names, or why they could not be read.
async fn shard(dashboard: &Dashboard, db: &Database) -> (String, Result<(Vec<QueueStatus>, Vec<String>), String>) {
    let timeout = dashboard.options().shard_timeout;
    let (st, paused) = futures::join!(
        status::shard(db, timeout),
        tokio::time::timeout(timeout, dashboard.client().paused_queues(&db.name))
    );
    if let Some(error) = st
        .health
        .error
        .clone()
        .filter(|_| !st.health.reachable || st.listeners.is_none())
    {
        return (db.name.clone(), Err(error));
    }
    let paused: Vec<String> = match paused {
        Ok(Ok(p)) => p.into_iter().map(|p| p.queue).collect(),
        Ok(Err(e)) => return (db.name.clone(), Err(display::error_chain(&e))),
        Err(_) => {
            return (
                db.name.clone(),
                Err(format!("{} ({}): no answer within {timeout:?}", db.name, db.target)),
            )
        }
    };
    let mut queues = st.queues;
    for name in &paused {
        if !queues.iter().any(|q| &q.queue == name) {
            queues.push(QueueStatus {
                queue: name.clone(),
                ..QueueStatus::default()
            });
        }
    }
    queues.sort_by(|a, b| a.queue.cmp(&b.queue));
    (db.name.clone(), Ok((queues, paused)))
}
