//! The application's errors: [`Error`] for starting and running the service,
//! and [`ApiError`], what an HTTP request answers when it fails.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The worker node or a periodic job was declared wrongly.
    #[error("starting the worker node: {0}")]
    Jobs(#[from] shardq::Error),
    /// The schema's versions could not be read.
    #[error("checking the schema: {0}")]
    Schema(#[source] shardq_router::Error),
    /// Some database is not at the schema the service's `shards.toml` declares.
    #[error(
        "the databases are not migrated (behind: [{behind}]; diverged: [{diverged}]); \
         run `shardq migrate --config {file}`"
    )]
    NotMigrated {
        /// The configuration file.
        file: String,
        /// Databases behind the latest migration, comma-separated.
        behind: String,
        /// Databases whose history no longer matches the files, comma-separated.
        diverged: String,
    },
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Http(#[source] std::io::Error),
}

/// What a failed request answers: the status and `{"error": message}`.
/// Client mistakes say what was wrong; internal failures are logged with
/// their cause chain and answer a generic message.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed (400), or its body or query was refused by
    /// an extractor (the extractor's status: 400, 415 or 422).
    #[error("{message}")]
    Invalid {
        /// The status to answer.
        status: StatusCode,
        /// What is wrong.
        message: String,
    },
    /// The account, user or document does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with existing data (409).
    #[error("{0}")]
    Conflict(String),
    /// The account is being moved to another shard and its write waited
    /// for the move longer than allowed (503): nothing was written; try again.
    #[error("{0}")]
    Unavailable(String),
    /// Something failed on our side (500).
    #[error("internal error: {0}")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    /// A 400 answer with `message`.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::Invalid {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    /// The status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid { status, .. } => *status,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<shardq_router::Error> for ApiError {
    fn from(e: shardq_router::Error) -> ApiError {
        match e {
            e @ shardq_router::Error::AccountMoving { .. } => ApiError::Unavailable(e.to_string()),
            e => ApiError::Internal(Box::new(e)),
        }
    }
}

impl From<shardq::Error> for ApiError {
    fn from(e: shardq::Error) -> ApiError {
        match e {
            shardq::Error::Router(e) => e.into(),
            e => ApiError::Internal(Box::new(e)),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        ApiError::Invalid {
            status: r.status(),
            message: r.body_text(),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> ApiError {
        ApiError::Invalid {
            status: StatusCode::BAD_REQUEST,
            message: r.body_text(),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> ApiError {
        ApiError::Invalid {
            status: StatusCode::BAD_REQUEST,
            message: r.body_text(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            ApiError::Internal(e) => {
                tracing::error!(error = %shardq::error::ErrorChain(e.as_ref()), "request failed");
                "internal error; the service log has the details".to_string()
            }
            other => other.to_string(),
        };
        (status, axum::Json(json!({ "error": message }))).into_response()
    }
}
