//! An account's jobs, read through the job client (on the account's shard).

use std::sync::Arc;

use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shardq::{JobRecord, JobState};

use crate::api::extract::{Path, Query};
use crate::api::{limit, AppState};
use crate::directory::parse_account;
use crate::error::ApiError;

/// `GET /accounts/{account}/jobs` query.
#[derive(Debug, Deserialize)]
pub struct JobsQuery {
    /// Only jobs in this state (`available`, `running`, `completed`,
    /// `discarded`, `cancelled`).
    pub state: Option<String>,
    /// Most jobs returned (1 to 500, default 100).
    pub limit: Option<i64>,
}

/// A job as the API shows it.
#[derive(Debug, Serialize)]
pub struct JobView {
    /// `SHARD:ID`.
    pub id: String,
    /// Its kind.
    pub kind: String,
    /// Its queue.
    pub queue: String,
    /// Where it is in its life.
    pub state: JobState,
    /// Its args.
    pub args: serde_json::Value,
    /// Attempts started so far.
    pub attempt: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// One entry per failed attempt.
    pub errors: serde_json::Value,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// When it reached a final state.
    pub finalized_at: Option<DateTime<Utc>>,
}

impl From<JobRecord> for JobView {
    fn from(j: JobRecord) -> JobView {
        JobView {
            id: j.id.to_string(),
            kind: j.kind,
            queue: j.queue,
            state: j.state,
            args: j.args,
            attempt: j.attempt,
            max_attempts: j.max_attempts,
            errors: j.errors,
            created_at: j.created_at,
            finalized_at: j.finalized_at,
        }
    }
}

/// The account's most recent jobs, newest first.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    Query(query): Query<JobsQuery>,
) -> Result<axum::Json<Vec<JobView>>, ApiError> {
    let account = parse_account(&account)?;
    let job_state = match query.state.as_deref() {
        None => None,
        Some(name) => Some(JobState::parse(name).ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown job state {name:?}; one of available, running, completed, discarded, cancelled"
            ))
        })?),
    };
    let limit = limit(query.limit, 100, 500)?;
    state.directory.require(&state.router, &account).await?;
    let jobs = state
        .client
        .jobs_of(&account, job_state.map(JobState::as_str), limit)
        .await?;
    Ok(axum::Json(jobs.into_iter().map(JobView::from).collect()))
}
