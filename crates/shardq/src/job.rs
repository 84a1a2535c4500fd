//! Jobs as the application sees them: [`NewJob`] to enqueue, [`JobId`] to
//! name one (`SHARD:ID`), [`Enqueued`] to learn whether an enqueue inserted,
//! [`JobState`] and [`JobRecord`] to inspect one. Plain values: no I/O here.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::unique::UniqueOpts;

/// Largest accepted args document, in bytes of JSON text.
pub const MAX_ARGS_BYTES: usize = 256 * 1024;
/// Longest queue name, in bytes.
pub const MAX_QUEUE_BYTES: usize = 128;
/// Longest kind name, in bytes.
pub const MAX_KIND_BYTES: usize = 255;
/// Queue used when none is given.
pub const DEFAULT_QUEUE: &str = "default";
/// Attempts allowed when none is given.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 20;
/// Longest serial (ordering) key, in bytes.
pub const MAX_SERIAL_KEY_BYTES: usize = 255;

pub use crate::job_id::{InvalidJobId, JobId};

/// Where a job is in its life. Stored as text in the `state` column; the
/// store maps it at the boundary, nothing else sees the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting to run: due now, scheduled for later, or retrying after a backoff.
    Available,
    /// Claimed by a node, which holds its lease.
    Running,
    /// Ran to completion (final).
    Completed,
    /// Failed on its last attempt, kept with its errors (final).
    Discarded,
    /// Cancelled on request or by its handler, kept with its errors (final).
    Cancelled,
}

impl JobState {
    /// Every state, in life order.
    pub const ALL: [JobState; 5] = [
        JobState::Available,
        JobState::Running,
        JobState::Completed,
        JobState::Discarded,
        JobState::Cancelled,
    ];

    /// The state's name, as stored and printed.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Available => "available",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Discarded => "discarded",
            JobState::Cancelled => "cancelled",
        }
    }

    /// The state named `name`, if it is one.
    pub fn parse(name: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Whether the job reached a final state (completed, discarded, cancelled).
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Completed | JobState::Discarded | JobState::Cancelled)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for JobState {
    type Err = Error;
    fn from_str(s: &str) -> Result<JobState> {
        JobState::parse(s).ok_or_else(|| Error::InvalidJob {
            field: "state",
            message: format!("{s:?} is not a job state (one of: available, running, completed, discarded, cancelled)"),
        })
    }
}

impl PartialEq<str> for JobState {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for JobState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// The result of `Client::enqueue_unique`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Enqueued {
    /// The new job, or the existing job it duplicates.
    pub id: JobId,
    /// True when nothing was inserted because an equal unique job exists.
    pub duplicate: bool,
}

/// A job to enqueue: kind, JSON args and options.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub(crate) queue: String,
    pub(crate) kind: String,
    /// The args as JSON text, written once when the job is built (object
    /// keys sorted, as `serde_json::Value` writes them): the text a unique
    /// key is taken from, and what a batch sends, shared by every clone.
    pub(crate) args: Arc<str>,
    pub(crate) priority: i16,
    pub(crate) max_attempts: i32,
    pub(crate) run_at: Option<DateTime<Utc>>,
    /// Set by [`NewJob::delay`]: counted from the insert, on the shard's clock.
    pub(crate) delay: Option<Duration>,
    /// Set by [`NewJob::unique`].
    pub(crate) unique: Option<UniqueOpts>,
    /// Set by [`NewJob::serial_key`].
    pub(crate) serial_key: Option<String>,
    /// Set by [`NewJob::resources`]: the named resources the job uses.
    pub(crate) resources: Vec<String>,
}

impl NewJob {
    /// A job of `kind` with `args` serialized to JSON, on the default queue.
    pub fn new(kind: impl Into<String>, args: &impl Serialize) -> Result<NewJob> {
        let args = serde_json::to_value(args).map_err(|e| Error::InvalidJob {
            field: "args",
            message: format!("cannot serialize to JSON: {e}"),
        })?;
        Ok(Self::from_json(kind, args))
    }

    /// A job of `kind` with args given as JSON text; invalid JSON is an error.
    pub fn from_json_text(kind: impl Into<String>, args: &str) -> Result<NewJob> {
        let args = serde_json::from_str(args).map_err(|e| Error::InvalidJob {
            field: "args",
            message: format!("not valid JSON: {e}"),
        })?;
        Ok(Self::from_json(kind, args))
    }

    /// A job of `kind` with JSON args.
    pub fn from_json(kind: impl Into<String>, args: serde_json::Value) -> NewJob {
        NewJob {
            queue: DEFAULT_QUEUE.to_string(),
            kind: kind.into(),
            args: args.to_string().into(),
            priority: 0,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            run_at: None,
            delay: None,
            unique: None,
            serial_key: None,
            resources: Vec::new(),
        }
    }

    /// Puts the job on `queue`.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Priority within the queue: lower runs first (default 0).
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    /// Attempts before the job is discarded (default 20).
    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = n;
        self
    }

    /// Runs the job no earlier than `at`.
    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self.delay = None;
        self
    }

    /// Runs the job no earlier than `delay` after it is inserted, by the
    /// shard's clock (`now() + delay` in the insert), so a client whose
    /// clock is off does not shift it.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self.run_at = None;
        self
    }

    /// When the job is due as far as a unique period's bucket goes: its
    /// `run_at`, or now plus its delay by this process's clock (the bucket
    /// is chosen before the insert), or `None` for now.
    pub(crate) fn bucket_time(&self) -> Option<DateTime<Utc>> {
        self.run_at.or_else(|| {
            self.delay
                .and_then(|d| chrono::Duration::from_std(d).ok())
                .map(|d| Utc::now() + d)
        })
    }

    /// The delay in seconds, for the insert.
    pub(crate) fn delay_secs(&self) -> Option<f64> {
        self.delay.map(|d| d.as_secs_f64())
    }

    /// Makes the job unique (see [`crate::unique`]): while an equal job
    /// exists in one of `opts.states`, enqueueing this one inserts nothing
    /// and returns the existing job's id.
    pub fn unique(mut self, opts: UniqueOpts) -> Self {
        self.unique = Some(opts);
        self
    }

    /// Runs the job in order with the account's other jobs of the same
    /// ordering `key`: one at a time across all nodes and queues, in enqueue
    /// (id) order; jobs of different keys run in parallel.
    ///
    /// A job is claimable only while no earlier job of its key is
    /// `available` or `running`, so a failing job holds its key through its
    /// retries (and their backoff) until it completes, is discarded or is
    /// cancelled; a job scheduled for later holds it until it has run. Two
    /// enqueues of one key from concurrent transactions run in the order
    /// their ids were allocated.
    pub fn serial_key(mut self, key: impl Into<String>) -> Self {
        self.serial_key = Some(key.into());
        self
    }

    /// Names the global resources the job uses (declared in the master
    /// with `Client::set_resource` or `shardq resources set`): its handler
    /// starts only while holding a permit of each, so at most a resource's
    /// concurrency of such jobs run at once across every node and shard. A
    /// name is 1 to 64 letters, digits, `_`, `.` or `-`. A job naming a
    /// resource that is not declared waits until it is.
    pub fn resources<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.resources = names.into_iter().map(Into::into).collect();
        self.resources.sort();
        self.resources.dedup();
        self
    }

    /// The resources as stored: `None` when the job uses none.
    pub(crate) fn resource_names(&self) -> Option<&[String]> {
        (!self.resources.is_empty()).then_some(self.resources.as_slice())
    }

    /// Whether the job needs the keyed insert (unique or serial).
    pub(crate) fn is_keyed(&self) -> bool {
        self.unique.is_some() || self.serial_key.is_some()
    }

    /// Checks the fields and returns the args as JSON text.
    pub(crate) fn validate(&self) -> Result<&str> {
        let bad = |field, message: String| Err(Error::InvalidJob { field, message });
        if self.queue.is_empty() || self.queue.len() > MAX_QUEUE_BYTES || self.queue.contains('\0') {
            return bad(
                "queue",
                format!(
                    "must be 1 to {MAX_QUEUE_BYTES} bytes without NUL, got {} bytes",
                    self.queue.len()
                ),
            );
        }
        if self.kind.is_empty() || self.kind.len() > MAX_KIND_BYTES || self.kind.contains('\0') {
            return bad(
                "kind",
                format!(
                    "must be 1 to {MAX_KIND_BYTES} bytes without NUL, got {} bytes",
                    self.kind.len()
                ),
            );
        }
        if self.max_attempts < 1 {
            return bad("max_attempts", format!("must be at least 1, got {}", self.max_attempts));
        }
        if let Some(key) = &self.serial_key {
            if key.is_empty() || key.len() > MAX_SERIAL_KEY_BYTES || key.contains('\0') {
                return bad(
                    "serial_key",
                    format!(
                        "must be 1 to {MAX_SERIAL_KEY_BYTES} bytes without NUL, got {} bytes",
                        key.len()
                    ),
                );
            }
        }
        if let Some(unique) = &self.unique {
            if unique.key.as_deref().is_some_and(|k| k.contains('\0')) {
                return bad("unique.key", "must not contain NUL".into());
            }
            if unique.period.is_some_and(|p| p.as_millis() == 0) {
                return bad("unique.period", "must be at least 1 ms".into());
            }
        }
        if let Some(name) = self.resources.iter().find(|n| !resource_name_ok(n)) {
            return bad(
                "resources",
                format!("{name:?} is not a resource name (1 to 64 letters, digits, '_', '.' or '-')"),
            );
        }
        let text = &self.args;
        if text.len() > MAX_ARGS_BYTES {
            return bad(
                "args",
                format!("{} bytes of JSON exceed the cap of {MAX_ARGS_BYTES}", text.len()),
            );
        }
        if text.contains("\\u0000") {
            return bad(
                "args",
                "JSON strings must not contain NUL (\\u0000); Postgres jsonb cannot store it".into(),
            );
        }
        Ok(text)
    }
}

/// Whether `name` is a resource name: 1 to 64 ASCII letters, digits, `_`,
/// `.` or `-` (the master's `shardq.resources` check).
pub(crate) fn resource_name_ok(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// A job as stored, for inspection (`shardq jobs show`).
#[derive(Debug, Clone, Serialize)]
pub struct JobRecord {
    /// Its id.
    pub id: JobId,
    /// The account it belongs to.
    pub account: String,
    /// Its queue.
    pub queue: String,
    /// Its kind.
    pub kind: String,
    /// Its args.
    pub args: serde_json::Value,
    /// Where it is in its life.
    pub state: JobState,
    /// Priority (lower first).
    pub priority: i16,
    /// Attempts started so far.
    pub attempt: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// When it may run (next).
    pub run_at: DateTime<Utc>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// When its last attempt started.
    pub attempted_at: Option<DateTime<Utc>>,
    /// When it reached a final state.
    pub finalized_at: Option<DateTime<Utc>>,
    /// The node holding its lease, while running.
    pub locked_by: Option<String>,
    /// One entry per failed attempt: `{"attempt", "at", "error"}`.
    pub errors: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_id_round_trips_and_rejects_garbage() {
        let id: JobId = "shard_1:42".parse().expect("valid id");
        assert_eq!(
            id,
            JobId {
                shard: "shard_1".into(),
                id: 42
            }
        );
        assert_eq!(id.to_string(), "shard_1:42");
        for bad in ["", "shard_1", ":4", "shard_1:x", "shard_1:-3", "shard_1:0"] {
            assert!(bad.parse::<JobId>().is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn job_states_round_trip_through_their_names() {
        for s in JobState::ALL {
            assert_eq!(JobState::parse(s.as_str()), Some(s));
            assert_eq!(s, s.as_str());
        }
        assert_eq!(JobState::parse("Completed"), None);
        let err = "done".parse::<JobState>().unwrap_err().to_string();
        assert!(err.contains("state") && err.contains("done"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let big = serde_json::json!({ "s": "x".repeat(MAX_ARGS_BYTES) });
        let err = NewJob::from_json("k", big).validate().unwrap_err().to_string();
        assert!(err.contains("args") && err.contains("exceed"), "{err}");
        let err = NewJob::from_json_text("k", "{not json").unwrap_err().to_string();
        assert!(err.contains("args") && err.contains("not valid JSON"), "{err}");
        let err = NewJob::from_json("k", serde_json::json!({}))
            .queue("")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("queue"), "{err}");
        let err = NewJob::from_json("k", serde_json::json!({}))
            .max_attempts(0)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_attempts"), "{err}");
        assert!(NewJob::from_json("k", serde_json::json!({"q": "'; DROP TABLE x; --"}))
            .queue("é\"q;")
            .validate()
            .is_ok());
    }
}
