//! The job page: one job by id (`SHARD:ID`): args, state, attempts, every
//! error with its time, timestamps, the node running it, and the cancel or
//! retry button its state allows (when actions are on).

use askama::Template;
use axum::extract::{Path, State};
use axum::response::Html;
use shardq::{JobId, JobState};

use super::layout::{self, Nav};
use crate::display;
use crate::error::{Error, Result};
use crate::state::Dashboard;

#[derive(Template)]
#[template(path = "job.html")]
struct JobPage {
    nav: Nav,
    title: String,
    id: String,
    account: String,
    queue: String,
    kind: String,
    state: String,
    priority: i16,
    attempts: String,
    args: String,
    run_at: String,
    created: String,
    attempted: String,
    finalized: String,
    node: String,
    errors: Vec<ErrorView>,
    /// `cancel`, `retry` or empty: the action this state allows.
    action: &'static str,
}

struct ErrorView {
    attempt: String,
    at: String,
    error: String,
}

/// `GET /jobs/{id}`.
pub async fn page(State(dashboard): State<Dashboard>, Path(id): Path<String>) -> Result<Html<String>> {
    let id: JobId = id.parse().map_err(|e| Error::BadInput {
        field: "id",
        message: format!("{e}"),
    })?;
    let timeout = dashboard.options().shard_timeout;
    let job = tokio::time::timeout(timeout, dashboard.client().job(&id))
        .await
        .map_err(|_| Error::Database {
            database: format!("shard {}", id.shard),
            message: format!("no answer within {timeout:?}"),
        })??;
    let errors = job
        .errors
        .as_array()
        .map(|all| {
            all.iter()
                .map(|e| ErrorView {
                    attempt: e.get("attempt").map(|a| a.to_string()).unwrap_or_default(),
                    at: e.get("at").and_then(|a| a.as_str()).unwrap_or_default().to_string(),
                    error: e
                        .get("error")
                        .and_then(|a| a.as_str())
                        .map_or_else(|| e.to_string(), str::to_string),
                })
                .collect()
        })
        .unwrap_or_default();
    let action = if !dashboard.actions_enabled() {
        ""
    } else {
        match job.state {
            JobState::Available | JobState::Running => "cancel",
            JobState::Discarded | JobState::Cancelled => "retry",
            JobState::Completed => "",
        }
    };
    let page = JobPage {
        nav: Nav::of(&dashboard),
        title: format!("Job {id}"),
        id: id.to_string(),
        account: job.account,
        queue: job.queue,
        kind: job.kind,
        state: job.state.to_string(),
        priority: job.priority,
        attempts: format!("{} of {}", job.attempt, job.max_attempts),
        args: serde_json::to_string_pretty(&job.args).unwrap_or_else(|_| job.args.to_string()),
        run_at: display::time(&job.run_at),
        created: display::time(&job.created_at),
        attempted: display::time_opt(job.attempted_at.as_ref()),
        finalized: display::time_opt(job.finalized_at.as_ref()),
        node: job.locked_by.unwrap_or_else(|| "-".to_string()),
        errors,
        action,
    };
    layout::render("job", &page)
}
