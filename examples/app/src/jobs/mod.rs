//! The application's job handlers, run by the worker node in the same
//! binary as the HTTP API. Each does real work on the account's tables, in a
//! fenced transaction on the account's shard ([`crate::fenced`]), and is
//! safe to run twice (delivery is at least once):
//!
//! - [`process_document`]: counts a document's words, writes a summary, and
//!   enqueues the follow-up [`user_stats`] job in the same transaction.
//! - [`user_stats`]: recounts a user's processed documents.
//! - [`provision`]: the one job per account (unique): writes the account's
//!   welcome document and enqueues its processing.
//! - [`cleanup`]: a periodic job on every shard that removes documents
//!   deleted long enough ago, for all accounts of that shard.
//!
//! [`install`] registers them all on a node's builder.

pub mod cleanup;
pub mod process_document;
pub mod provision;
pub mod user_stats;

use std::time::Duration;

use shardq::{Client, RuntimeBuilder};

pub use cleanup::PurgeDeletedDocuments;
pub use process_document::ProcessDocument;
pub use provision::ProvisionAccount;
pub use user_stats::RefreshUserStats;

/// The queue of document processing.
pub const QUEUE_DOCUMENTS: &str = "documents";
/// The queue of per-account bookkeeping: provisioning, statistics.
pub const QUEUE_ACCOUNTS: &str = "accounts";
/// The queue of periodic maintenance.
pub const QUEUE_MAINTENANCE: &str = "maintenance";

/// When and how the per-shard cleanup runs.
#[derive(Debug, Clone)]
pub struct CleanupOptions {
    /// Cron expression, in UTC (five fields, or six with seconds first).
    pub schedule: String,
    /// How long a deleted document is kept before the cleanup removes it.
    pub older_than: Duration,
}

impl Default for CleanupOptions {
    /// Every five minutes, documents deleted more than an hour ago.
    fn default() -> Self {
        CleanupOptions {
            schedule: "*/5 * * * *".into(),
            older_than: Duration::from_secs(3600),
        }
    }
}

/// Concurrency of each queue on this node.
#[derive(Debug, Clone)]
pub struct QueueLimits {
    /// [`QUEUE_DOCUMENTS`].
    pub documents: usize,
    /// [`QUEUE_ACCOUNTS`].
    pub accounts: usize,
    /// [`QUEUE_MAINTENANCE`].
    pub maintenance: usize,
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits {
            documents: 10,
            accounts: 5,
            maintenance: 1,
        }
    }
}

/// Registers every handler and queue, and the periodic cleanup, on `node`.
pub fn install(
    node: RuntimeBuilder,
    client: &Client,
    queues: &QueueLimits,
    cleanup: &CleanupOptions,
) -> shardq::Result<RuntimeBuilder> {
    Ok(node
        .queue(QUEUE_DOCUMENTS, queues.documents)
        .queue(QUEUE_ACCOUNTS, queues.accounts)
        .queue(QUEUE_MAINTENANCE, queues.maintenance)
        .register(ProcessDocument { client: client.clone() })
        .register(RefreshUserStats { client: client.clone() })
        .register(ProvisionAccount { client: client.clone() })
        .register(PurgeDeletedDocuments {
            router: client.router().clone(),
            older_than: cleanup.older_than,
        })
        .periodic(cleanup::schedule(cleanup)?))
}
