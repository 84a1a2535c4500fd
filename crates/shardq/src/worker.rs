//! The handler side: the [`Worker`] trait an application implements per job
//! kind, what a handler receives ([`JobContext`]) and returns ([`JobError`]),
//! how a run ended (`Outcome`), and the registry that maps kinds to
//! type-erased handlers. Read by the runtime's executor and completer.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::job::JobId;

/// Default handler timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// What a handler knows about the job it runs.
#[derive(Debug, Clone)]
pub struct JobContext {
    /// The job's id.
    pub id: JobId,
    /// The account it belongs to.
    pub account: String,
    /// Its queue.
    pub queue: String,
    /// Its kind.
    pub kind: String,
    /// This attempt's number, from 1.
    pub attempt: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// Set when the run must stop: the job was cancelled, or this node lost its lease.
    pub(crate) cancelled: watch::Receiver<Option<CancelReason>>,
}

/// Why a running job's handler is asked to stop ([`JobContext::cancel_reason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// The job was cancelled (`Client::cancel`); it ends `cancelled`.
    Requested,
    /// This node lost the job's lease (renewals failed past the lease, or
    /// the job was rescued): another node may be running it now. Whatever
    /// the handler returns is not written.
    LeaseLost,
}

impl JobContext {
    /// Whether the job has been cancelled (`Client::cancel`) while it runs.
    /// Cheap: reads a local flag.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.borrow().is_some()
    }

    /// Why the run was asked to stop, once it was (see [`CancelReason`]).
    pub fn cancel_reason(&self) -> Option<CancelReason> {
        *self.cancelled.borrow()
    }

    /// Resolves when the job is cancelled while it runs, or this node lost
    /// its lease ([`JobContext::cancel_reason`] tells which); never resolves
    /// otherwise. Race it against the work, e.g. with `tokio::select!`, to
    /// stop early. The signal is cooperative: a handler that ignores it runs
    /// on (up to its timeout); a cancelled job ends `cancelled` whatever it
    /// returns, and a run whose lease was lost writes no outcome.
    pub async fn cancelled(&self) {
        let mut rx = self.cancelled.clone();
        if rx.wait_for(|c| c.is_some()).await.is_err() {
            // The run's lease is gone (its outcome is written): no cancel can come.
            std::future::pending::<()>().await;
        }
    }
}

/// Why a handler did not complete its job.
#[derive(Debug)]
pub enum JobError {
    /// A failure: retried with backoff until `max_attempts`, then discarded.
    Failed(String),
    /// Run again after this long, without counting a failure.
    Snooze(Duration),
    /// Stop for good: the job ends cancelled, with this reason recorded.
    Cancel(String),
}

impl JobError {
    /// A failure with a message.
    pub fn failed(message: impl Into<String>) -> JobError {
        JobError::Failed(message.into())
    }
}

/// Any error converts into a failure whose message is the error and its causes.
impl<E: std::error::Error> From<E> for JobError {
    fn from(e: E) -> JobError {
        let mut message = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            message.push_str(": ");
            message.push_str(&c.to_string());
            cause = c.source();
        }
        JobError::Failed(message)
    }
}

/// How a run ended, as the executor saw it; the completer writes it.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The handler returned `Ok`.
    Completed,
    /// The handler failed (error, panic, timeout, bad args, no handler).
    Failed(String),
    /// Run again after this long, without counting a failure.
    Snooze(Duration),
    /// Stop for good, with this reason.
    Cancel(String),
    /// This node lost the lease during the run: nothing is written.
    LeaseLost,
}

/// A handler for one job kind, with typed args.
///
/// ```
/// use shardq::{JobContext, JobError, Worker};
/// #[derive(serde::Deserialize, serde::Serialize)]
/// struct Welcome { email: String }
/// struct SendWelcome;
/// impl Worker for SendWelcome {
///     type Args = Welcome;
///     const KIND: &'static str = "send_welcome";
///     async fn work(&self, _ctx: JobContext, args: Welcome) -> Result<(), JobError> {
///         if args.email.is_empty() { return Err(JobError::failed("no address")); }
///         Ok(())
///     }
/// }
/// ```
pub trait Worker: Send + Sync + 'static {
    /// The args type, deserialized from the job's JSON.
    type Args: DeserializeOwned + Send + 'static;
    /// The kind name jobs are enqueued with.
    const KIND: &'static str;

    /// Longest a run may take; past it the run is a failure.
    fn timeout(&self) -> Duration {
        DEFAULT_TIMEOUT
    }

    /// Runs one job.
    fn work(&self, ctx: JobContext, args: Self::Args) -> impl Future<Output = Result<(), JobError>> + Send;
}

/// A handler with its args type erased: `Err` before running means the args
/// did not deserialize.
pub(crate) type ErasedRun = Arc<
    dyn Fn(JobContext, serde_json::Value) -> Result<BoxFuture<'static, Result<(), JobError>>, String> + Send + Sync,
>;

/// A registered kind.
#[derive(Clone)]
pub(crate) struct Handler {
    pub run: ErasedRun,
    pub timeout: Duration,
}

/// Kinds this node can run.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Handler>,
}

impl Registry {
    /// Registers `worker` for `W::KIND`; a second registration of a kind replaces the first.
    pub fn register<W: Worker>(&mut self, worker: W) {
        let worker = Arc::new(worker);
        let timeout = worker.timeout();
        let run: ErasedRun = Arc::new(move |ctx, args| {
            let args: W::Args = serde_json::from_value(args)
                .map_err(|e| format!("args do not match the {} handler's type: {e}", W::KIND))?;
            let worker = worker.clone();
            Ok(Box::pin(async move { worker.work(ctx, args).await }))
        });
        self.handlers.insert(W::KIND.to_string(), Handler { run, timeout });
    }

    pub(crate) fn get(&self, kind: &str) -> Option<&Handler> {
        self.handlers.get(kind)
    }

    /// The registered kinds, sorted.
    pub fn kinds(&self) -> Vec<&str> {
        let mut k: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
        k.sort_unstable();
        k
    }
}
