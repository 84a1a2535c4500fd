//! [`Dashboard`]: what every handler reads (the router, a job client, the
//! options), set once when the dashboard is built and never written after.

use std::sync::Arc;
use std::time::Duration;

use shardq::{Client, Router};

/// Whether and how actions (cancel, retry, pause, ...) are allowed.
#[derive(Clone, Default)]
pub enum Actions {
    /// Read-only: action endpoints answer 403 and no button is shown.
    #[default]
    ReadOnly,
    /// Actions need this token, typed into each confirmation form.
    Token(String),
    /// Actions need no token: the application mounting the router
    /// authenticates every request itself. If it authenticates by cookie,
    /// it must also refuse cross-site POSTs (e.g. `SameSite` cookies or a
    /// CSRF check), since the action forms carry no secret then.
    Trusted,
}

impl std::fmt::Debug for Actions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.write_str(match self {
            Actions::ReadOnly => "ReadOnly",
            Actions::Token(_) => "Token(..)",
            Actions::Trusted => "Trusted",
        })
    }
}

/// How the dashboard behaves.
#[derive(Debug, Clone)]
pub struct DashboardOptions {
    /// Whether actions are allowed (default: read-only).
    pub actions: Actions,
    /// How long a page waits for each database before showing it as down
    /// (default 2 s). Pages read every shard concurrently, so a page takes
    /// about this long at most, however many shards are slow.
    pub shard_timeout: Duration,
    /// The path the router is mounted at, without a trailing slash (default
    /// empty: the root). Every link and form starts with it.
    pub base: String,
}

impl Default for DashboardOptions {
    fn default() -> Self {
        DashboardOptions {
            actions: Actions::ReadOnly,
            shard_timeout: Duration::from_secs(2),
            base: String::new(),
        }
    }
}

/// The dashboard's shared state. Cheap to clone.
#[derive(Clone)]
pub struct Dashboard {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    options: DashboardOptions,
}

impl Dashboard {
    /// A dashboard over the fleet `router` connects to.
    pub fn new(router: Arc<Router>, options: DashboardOptions) -> Dashboard {
        Dashboard {
            inner: Arc::new(Inner {
                client: Client::new(router),
                options,
            }),
        }
    }

    /// The router over the fleet.
    pub fn router(&self) -> &Router {
        self.inner.client.router()
    }

    /// The job client.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The options.
    pub fn options(&self) -> &DashboardOptions {
        &self.inner.options
    }

    /// Whether actions are allowed at all (buttons are shown).
    pub fn actions_enabled(&self) -> bool {
        !matches!(self.inner.options.actions, Actions::ReadOnly)
    }

    /// Whether the confirmation form asks for a token.
    pub fn needs_token(&self) -> bool {
        matches!(self.inner.options.actions, Actions::Token(_))
    }

    /// Checks that an action may run with `token` (what the form sent).
    pub fn authorize(&self, token: Option<&str>) -> crate::error::Result<()> {
        match &self.inner.options.actions {
            Actions::ReadOnly => Err(crate::error::Error::ReadOnly),
            Actions::Trusted => Ok(()),
            Actions::Token(expected) => match token {
                Some(given) if same_secret(given.as_bytes(), expected.as_bytes()) => Ok(()),
                _ => Err(crate::error::Error::BadToken),
            },
        }
    }
}

/// Compares two secrets in time that depends only on their lengths.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Dashboard {
    /// Runs `read` against the database `db` names, waiting at most the
    /// shard timeout; a failure or a timeout becomes the text shown for it
    /// (password-free, naming the database).
    pub async fn within<T, F>(&self, db: &shardq_router::router::Database, read: F) -> Result<T, String>
    where
        F: std::future::Future<Output = sqlx::Result<T>>,
    {
        let timeout = self.inner.options.shard_timeout;
        match tokio::time::timeout(timeout, read).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(shardq::error::ErrorChain(&db.error(e)).to_string()),
            Err(_) => Err(format!("{} ({}): no answer within {timeout:?}", db.name, db.target)),
        }
    }
}
