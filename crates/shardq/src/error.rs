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
    #[error("invalid job id {text:?}: expected SHARD:ID, e.g. shard_1:42")]
    InvalidJobId {
        /// The text given.
        text: String,
    },
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
    /// The worker runtime was configured wrongly.
    #[error("runtime: {0}")]
    Runtime(String),
}
