//! The one error type of the job crate.

/// Result alias used throughout the job crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong when enqueueing, inspecting or running jobs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Routing or a database call through the router failed (names the shard).
    #[error(transparent)]
    Router(#[from] shardq_router::Error),
    /// A job's fields were rejected before anything was written.
    #[error("invalid job: {field}: {message}")]
    InvalidJob {
        /// The field (`args`, `queue`, `kind`, `max_attempts`, ...).
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A job id in text form (`SHARD:ID`) could not be parsed.
    #[error(transparent)]
    InvalidJobId(#[from] crate::job_id::InvalidJobId),
    /// No job has this id.
    #[error("job {0} not found")]
    JobNotFound(String),
    /// A job is not in a state that allows the operation.
    #[error("job {id} is {state}; {message}")]
    JobState {
        /// The job id.
        id: String,
        /// Its current state.
        state: String,
        /// Why the operation is refused.
        message: String,
    },
    /// A manual retry of a unique job was refused because another job holds
    /// its unique key now (enqueued after the job completed, was discarded
    /// or cancelled and released the key): retrying would duplicate that
    /// job. Nothing was changed. Retry again once the holder has left its
    /// unique states, or let the holder do the work.
    #[error(
        "job {id} is {state} and cannot be retried: job {holder} now holds its unique key, and retrying would duplicate it"
    )]
    UniqueConflict {
        /// The job whose retry was refused.
        id: crate::job_id::JobId,
        /// Its state (unchanged).
        state: String,
        /// The job holding the unique key.
        holder: crate::job_id::JobId,
    },
    /// A queue name given to pause or resume was rejected; nothing changed.
    #[error("queue {queue:?} on shard {shard}: {message}")]
    InvalidQueue {
        /// The shard.
        shard: String,
        /// The queue as given.
        queue: String,
        /// What is wrong.
        message: String,
    },
    /// An account's scheduling setting (its fair-share weight) is out of
    /// range, or cannot be written on its shard now.
    #[error("account {account:?} on shard {shard}: {message}")]
    AccountSetting {
        /// The account.
        account: String,
        /// Its shard.
        shard: String,
        /// What is wrong.
        message: String,
    },
    /// A named resource's declaration was refused; nothing changed.
    #[error("resource {name:?}: {message}")]
    Resource {
        /// The resource.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A move of an account cannot be started or its next step failed.
    #[error("move of account {account:?}: {message}")]
    Move {
        /// The account.
        account: String,
        /// What is wrong.
        message: String,
    },
    /// A drain of a shard cannot start or did not empty it.
    #[error("drain of shard {shard}: {message}")]
    Drain {
        /// The shard.
        shard: String,
        /// What is wrong.
        message: String,
    },
    /// The metrics recorder or the `/metrics` endpoint could not be set up.
    #[error("metrics: {0}")]
    Metrics(String),
    /// The worker runtime was configured wrongly.
    #[error("runtime: {0}")]
    Runtime(String),
    /// A unique job's existing duplicate could not be read.
    #[error("unique job of kind {kind:?}: {message}")]
    Unique {
        /// The job's kind.
        kind: String,
        /// What happened.
        message: String,
    },
    /// A periodic job was declared wrongly (bad cron expression, time zone,
    /// option), or its occurrence could not be enqueued.
    #[error("periodic job {name:?}: {message}")]
    Periodic {
        /// The periodic job's name.
        name: String,
        /// What is wrong.
        message: String,
    },
}

/// Displays an error with its cause chain (`outer: cause: root`), for logs.
/// A cause whose text the previous message already ends with is not repeated.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut last = self.0.to_string();
        f.write_str(&last)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !last.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            last = text;
            source = cause.source();
        }
        Ok(())
    }
}
