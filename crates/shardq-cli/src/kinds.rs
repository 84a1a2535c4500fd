//! Built-in job kinds for trying things out and benchmarking.

use std::time::Duration;

use serde::Deserialize;
use shardq::{JobContext, JobError, RuntimeBuilder, Worker};

/// `noop`: completes at once.
pub struct Noop;

impl Worker for Noop {
    type Args = serde_json::Value;
    const KIND: &'static str = "noop";
    async fn work(&self, _: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        Ok(())
    }
}

/// Args of `sleep`.
#[derive(Deserialize)]
pub struct SleepArgs {
    /// How long to sleep, in milliseconds.
    pub ms: u64,
}

/// `sleep {"ms": N}`: sleeps N ms, then completes.
pub struct Sleep;

impl Worker for Sleep {
    type Args = SleepArgs;
    const KIND: &'static str = "sleep";
    async fn work(&self, _: JobContext, args: SleepArgs) -> Result<(), JobError> {
        tokio::time::sleep(Duration::from_millis(args.ms)).await;
        Ok(())
    }
}

/// Args of `fail`.
#[derive(Deserialize)]
pub struct FailArgs {
    /// Attempts that fail before one succeeds.
    pub times: i32,
}

/// `fail {"times": N}`: fails its first N attempts, then completes.
pub struct Fail;

impl Worker for Fail {
    type Args = FailArgs;
    const KIND: &'static str = "fail";
    async fn work(&self, ctx: JobContext, args: FailArgs) -> Result<(), JobError> {
        if ctx.attempt <= args.times {
            return Err(JobError::failed(format!(
                "failing on purpose: attempt {} of the first {}",
                ctx.attempt, args.times
            )));
        }
        Ok(())
    }
}

/// `panic`: panics.
pub struct Panic;

impl Worker for Panic {
    type Args = serde_json::Value;
    const KIND: &'static str = "panic";
    async fn work(&self, ctx: JobContext, _: serde_json::Value) -> Result<(), JobError> {
        panic!("panic kind ran (job {})", ctx.id)
    }
}

/// Registers every built-in kind.
pub fn register(b: RuntimeBuilder) -> RuntimeBuilder {
    b.register(Noop).register(Sleep).register(Fail).register(Panic)
}
