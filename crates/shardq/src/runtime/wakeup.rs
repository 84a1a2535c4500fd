//! A producer's next wake-up: scheduled jobs without a busy loop. Called by
//! the producer only.
//!
//! When a producer's fetch comes back
//! short, it reads when the earliest available job of its queue on its shard
//! is due ([`store::job_next_due`]) and sleeps until then instead of a whole
//! poll interval (never longer than the poll interval, which stays the
//! fallback).
//!
//! What wakes a producer whose schedule changed: every insert notifies its
//! queue, scheduled jobs included (shard migration V3), so a producer re-reads
//! the next due time after a job is scheduled; a retry or snooze written by
//! any node notifies its queue too ([`store::job_finish_many`]), as does a
//! manual retry.

use std::time::Duration;

use tokio::time::Instant;

use super::node::ShardWork;
use crate::store;

/// Shortest sleep before a due-looking job is fetched again. A job that looks
/// due but was not fetched is held by another node's claim in flight (or by
/// another transaction's row lock); this keeps such a job from turning the
/// producer into a busy loop.
pub(crate) const MIN_WAIT: Duration = Duration::from_millis(10);

/// When the earliest available job of `queue` on `shard` is due, as an
/// instant on this node's clock (the database's clock decides what is due;
/// only the remaining time is carried over). `None` when the queue has no
/// available job or the lookup failed or took longer than `timeout` (the
/// poll covers it).
pub(crate) async fn next_due(shard: &ShardWork, queue: &str, timeout: Duration) -> Option<Instant> {
    let Ok(found) = tokio::time::timeout(timeout, store::job_next_due(&shard.db, queue)).await else {
        tracing::debug!(shard = %shard.db.name, queue, "next due time unknown (shard not answering); polling");
        return None;
    };
    match found {
        Ok(Some(secs)) => {
            let wait = Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(Duration::MAX);
            Instant::now().checked_add(wait)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::debug!(shard = %shard.db.name, queue, error = %shard.db.error(e), "next due time unknown; polling");
            None
        }
    }
}

/// How long a producer sleeps: until `due` (at least [`MIN_WAIT`]), never
/// longer than `poll`.
pub(crate) fn sleep_for(poll: Duration, due: Option<Instant>, now: Instant) -> Duration {
    match due {
        Some(at) => at.saturating_duration_since(now).max(MIN_WAIT).min(poll),
        None => poll,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleeps_until_the_next_due_job_bounded_by_the_poll() {
        let now = Instant::now();
        let poll = Duration::from_secs(1);
        assert_eq!(sleep_for(poll, None, now), poll);
        assert_eq!(
            sleep_for(poll, Some(now + Duration::from_millis(300)), now),
            Duration::from_millis(300)
        );
        assert_eq!(sleep_for(poll, Some(now + Duration::from_secs(5)), now), poll);
        assert_eq!(
            sleep_for(poll, Some(now), now),
            MIN_WAIT,
            "a due job is refetched, not spun on"
        );
    }
}
