//! The pages and their routes. Each page module owns its handler and its
//! template's view; `layout` holds what they share.
//!
//! | route | page |
//! |---|---|
//! | `GET /` | fleet: master and every shard |
//! | `GET /queues` | queues per shard and summed |
//! | `GET /jobs` | job search (`id`, `account`, `kind`, `state`, `queue`, `shard`, `cursor`) |
//! | `GET /jobs/{id}` | one job (`SHARD:ID`) |
//! | `GET /accounts`, `GET /accounts/{account}` | placements, counts, moves |
//! | `GET /actions/confirm` | the confirmation form of an action |
//! | `POST /actions` | run a confirmed action |
//!
//! There is no nodes page: the master has no node registry yet.

mod accounts;
mod actions;
mod fleet;
mod job;
mod jobs;
mod layout;
mod queues;

use axum::routing::{get, post};

use crate::state::Dashboard;

/// Every route, over `dashboard`.
pub fn routes(dashboard: Dashboard) -> axum::Router {
    axum::Router::new()
        .route("/", get(fleet::page))
        .route("/queues", get(queues::page))
        .route("/jobs", get(jobs::page))
        .route("/jobs/{id}", get(job::page))
        .route("/accounts", get(accounts::list))
        .route("/accounts/{account}", get(accounts::one))
        .route("/actions/confirm", get(actions::confirm))
        .route("/actions", post(actions::run))
        .with_state(dashboard)
}
