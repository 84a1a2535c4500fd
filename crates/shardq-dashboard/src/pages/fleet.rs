//! The fleet page: the master and every shard, up or down (with the
//! error), schema version, LISTEN connections (the nodes working the shard:
//! there is no node registry yet to name owners), and the last hour's
//! throughput and failure rate with a per-minute chart.

use askama::Template;
use axum::extract::State;
use axum::response::Html;
use shardq::observe::health::{self, DatabaseHealth};
use shardq::observe::status;
use shardq_router::migrator::Role;
use shardq_router::router::Database;

use super::layout::{self, Nav};
use crate::chart::{self, Chart};
use crate::display;
use crate::error::Result;
use crate::state::Dashboard;
use crate::store;

#[derive(Template)]
#[template(path = "fleet.html")]
struct FleetPage {
    nav: Nav,
    title: String,
    readiness: String,
    master: DatabaseView,
    shards: Vec<ShardView>,
}

/// One database's line.
struct DatabaseView {
    name: String,
    target: String,
    /// `up`, `down` or `not migrated`.
    state: &'static str,
    version: String,
    error: String,
}

impl DatabaseView {
    fn of(h: &DatabaseHealth) -> DatabaseView {
        DatabaseView {
            name: h.name.clone(),
            target: h.target.clone(),
            state: if h.ok() {
                "up"
            } else if h.reachable {
                "degraded"
            } else {
                "down"
            },
            version: match (h.version, h.expected) {
                (Some(v), Some(e)) if i64::from(v) >= i64::from(e) => format!("V{v}"),
                (Some(v), Some(e)) => format!("V{v}, needs V{e}"),
                (Some(v), None) => format!("V{v}"),
                (None, _) => "-".to_string(),
            },
            error: h.error.clone().unwrap_or_default(),
        }
    }
}

struct ShardView {
    db: DatabaseView,
    listeners: String,
    completed_1h: String,
    failed_1h: String,
    failure_rate: String,
    chart: Option<Chart>,
    chart_error: String,
}

/// `GET /`.
pub async fn page(State(dashboard): State<Dashboard>) -> Result<Html<String>> {
    let timeout = dashboard.options().shard_timeout;
    let router = dashboard.router();
    let master = health::database(router.master(), Role::Master, timeout);
    let shards = futures::future::join_all(router.shards().iter().map(|db| shard(&dashboard, db)));
    let (master, shards) = futures::join!(master, shards);
    let healths: Vec<DatabaseHealth> = shards.iter().map(|(h, _)| h.clone()).collect();
    let readiness = health::summarize(&master, &healths).to_string();
    let page = FleetPage {
        nav: Nav::of(&dashboard),
        title: "Fleet".to_string(),
        readiness,
        master: DatabaseView::of(&master),
        shards: shards.into_iter().map(|(_, view)| view).collect(),
    };
    layout::render("fleet", &page)
}

/// One shard's health and view: its status and its last hour, read
/// concurrently, each within the shard timeout.
async fn shard(dashboard: &Dashboard, db: &Database) -> (DatabaseHealth, ShardView) {
    let timeout = dashboard.options().shard_timeout;
    let (st, minutes) = futures::join!(
        status::shard(db, timeout),
        dashboard.within(db, store::throughput_last_hour(&db.pool))
    );
    let (completed, failed) = st
        .queues
        .iter()
        .fold((0, 0), |(c, f), q| (c + q.completed_1h, f + q.failed_1h));
    let up = st.health.reachable;
    let (chart, chart_error) = match (up, minutes) {
        (false, _) => (None, String::new()),
        (true, Ok(m)) => (Some(chart::last_hour(&m)), String::new()),
        (true, Err(e)) => (None, e),
    };
    let view = ShardView {
        db: DatabaseView::of(&st.health),
        listeners: st.listeners.map_or("-".to_string(), |n| n.to_string()),
        completed_1h: if up {
            display::count(completed, false)
        } else {
            "-".into()
        },
        failed_1h: if up { display::count(failed, false) } else { "-".into() },
        failure_rate: if up {
            display::rate(failed, completed)
        } else {
            "-".into()
        },
        chart,
        chart_error,
    };
    (st.health, view)
}
