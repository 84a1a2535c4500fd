//! The one error type of the dashboard. Every error renders as an error
//! page with a status code that says whose fault it is.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

/// Result alias of the dashboard.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong serving a page or an action.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A job call failed (names the job or shard).
    #[error(transparent)]
    Jobs(#[from] shardq::Error),
    /// Routing or a database call through the router failed (names the shard).
    #[error(transparent)]
    Router(#[from] shardq_router::Error),
    /// A database read failed.
    #[error("{database}: {message}")]
    Database {
        /// `master` or `shard NAME`.
        database: String,
        /// What the database said, password-free.
        message: String,
    },
    /// A query or form field was rejected; nothing changed.
    #[error("{field}: {message}")]
    BadInput {
        /// The field (`id`, `state`, `shard`, `cursor`, `queue`, ...).
        field: &'static str,
        /// What is wrong, naming the value.
        message: String,
    },
    /// Nothing has this id or name.
    #[error("{0} not found")]
    NotFound(String),
    /// The dashboard was started read-only: actions are refused.
    #[error("this dashboard is read-only: start it with a token (--token or SHARDQ_DASHBOARD_TOKEN) to allow actions")]
    ReadOnly,
    /// An action came with a missing or wrong token.
    #[error("the token is missing or wrong; nothing was changed")]
    BadToken,
    /// A page's template failed to render.
    #[error("rendering the {page} page: {source}")]
    Render {
        /// The page.
        page: &'static str,
        /// The template error.
        source: askama::Error,
    },
    /// The address could not be listened on, or serving failed.
    #[error("dashboard on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

impl Error {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadInput { .. } => StatusCode::BAD_REQUEST,
            Error::NotFound(_) | Error::Jobs(shardq::Error::JobNotFound(_)) => StatusCode::NOT_FOUND,
            Error::ReadOnly | Error::BadToken => StatusCode::FORBIDDEN,
            Error::Jobs(
                shardq::Error::JobState { .. }
                | shardq::Error::UniqueConflict { .. }
                | shardq::Error::InvalidJobId(_)
                | shardq::Error::InvalidQueue { .. }
                | shardq::Error::InvalidJob { .. },
            ) => StatusCode::BAD_REQUEST,
            Error::Jobs(shardq::Error::Router(
                shardq_router::Error::UnknownShard { .. } | shardq_router::Error::InvalidAccount { .. },
            ))
            | Error::Router(shardq_router::Error::UnknownShard { .. } | shardq_router::Error::InvalidAccount { .. }) => {
                StatusCode::BAD_REQUEST
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The error page.
#[derive(askama::Template)]
#[template(path = "error.html")]
struct ErrorPage {
    title: String,
    message: String,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        let page = ErrorPage {
            title: status.canonical_reason().unwrap_or("error").to_string(),
            message: crate::display::error_chain(&self),
        };
        match askama::Template::render(&page) {
            Ok(html) => (status, Html(html)).into_response(),
            Err(_) => (status, page.message).into_response(),
        }
    }
}
