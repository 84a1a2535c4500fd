//! The HTTP API (axum). Every per-account route checks the account
//! directory, then works on the account's shard: writes in one fenced
//! transaction from `router.begin(&account)` (their jobs enqueued inside
//! it, see [`crate::fenced`]), so they follow the account when it moves;
//! reads through `router.pool_for(&account)`.
//!
//! | route | handler |
//! |---|---|
//! | `POST /accounts` | [`accounts::create`]: directory row, placement, the unique provisioning job |
//! | `GET /accounts/{account}` | [`accounts::show`] |
//! | `GET /accounts/{account}/jobs?state=&limit=` | [`jobs::list`]: the account's jobs, newest first |
//! | `POST /accounts/{account}/users` | [`users::create`] |
//! | `GET /accounts/{account}/users/{id}` | [`users::show`] |
//! | `POST /accounts/{account}/documents` | [`documents::create`]: the row and its `process_document` job, one transaction |
//! | `GET /accounts/{account}/documents` | [`documents::list`] |
//! | `GET /accounts/{account}/documents/{id}` | [`documents::show`] |
//! | `DELETE /accounts/{account}/documents/{id}` | [`documents::delete`]: marks it; the cleanup job removes it |
//!
//! Errors answer `{"error": message}` ([`crate::error::ApiError`]).

pub mod accounts;
pub mod documents;
pub mod extract;
pub mod jobs;
pub mod users;

use std::sync::Arc;

use axum::routing::{get, post};
use shardq::{Client, Router};

use crate::directory::Directory;
use crate::error::ApiError;

/// What every handler shares.
pub struct AppState {
    /// Routes accounts to shards; read by every handler.
    pub router: Arc<Router>,
    /// Enqueues and lists jobs.
    pub client: Client,
    /// The accounts known to exist.
    pub directory: Directory,
}

/// The API's routes over `state`.
pub fn routes(state: Arc<AppState>) -> axum::Router {
    axum::Router::new()
        .route("/accounts", post(accounts::create))
        .route("/accounts/{account}", get(accounts::show))
        .route("/accounts/{account}/jobs", get(jobs::list))
        .route("/accounts/{account}/users", post(users::create))
        .route("/accounts/{account}/users/{id}", get(users::show))
        .route(
            "/accounts/{account}/documents",
            post(documents::create).get(documents::list),
        )
        .route(
            "/accounts/{account}/documents/{id}",
            get(documents::show).delete(documents::delete),
        )
        .with_state(state)
}

/// A required text field: not blank, at most `max_bytes` bytes.
fn required<'a>(field: &str, value: &'a str, max_bytes: usize) -> Result<&'a str, ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::bad_request(format!("{field} must not be empty")));
    }
    if value.len() > max_bytes {
        return Err(ApiError::bad_request(format!(
            "{field} is {} bytes long; at most {max_bytes} are allowed",
            value.len()
        )));
    }
    Ok(value)
}

/// A `limit` query parameter: `default` when absent, else 1 to `max`.
fn limit(value: Option<i64>, default: i64, max: i64) -> Result<i64, ApiError> {
    match value {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad_request(format!("limit must be 1 to {max}, got {n}"))),
    }
}
