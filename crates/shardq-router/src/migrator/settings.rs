//! How patient the migrator is on each database: lock timeout, retries and
//! their backoff, statement timeout, deadline. Set through the builder
//! methods of the Migrator; the defaults are the constants here.

use std::time::Duration;

/// Default `lock_timeout` of the migrator's sessions: how long one
/// statement may wait for a lock before Postgres cancels it. While a
/// migration waits for a lock, every session that needs a conflicting lock
/// on the same table queues behind it, so this is also about how long
/// ordinary writes can be held up by one attempt.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// Default number of times a migration that hit the lock timeout is tried
/// again (so it is tried at most this many times plus one).
pub const DEFAULT_LOCK_RETRIES: u32 = 3;

/// Default pause before the first retry; it doubles at every retry, up to
/// [`MAX_RETRY_BACKOFF`].
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_secs(1);

/// Longest pause between two tries of a migration.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(30);

/// Default deadline of one database: the time from its start (connecting)
/// to its end (every migration done) after which it is reported as timed
/// out and its connection is cancelled.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30 * 60);

/// What a run does on each database.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    /// Stop the application history at this version.
    pub app_target: Option<u32>,
    /// Only compare; run nothing and take no lock.
    pub dry_run: bool,
    /// The sessions' `lock_timeout` (zero: none).
    pub lock_timeout: Duration,
    /// The sessions' `statement_timeout` (`None`: the server's).
    pub statement_timeout: Option<Duration>,
    /// Tries after the first on a lock timeout.
    pub lock_retries: u32,
    /// Pause before the first retry, doubled at each.
    pub retry_backoff: Duration,
    /// Per-database deadline (`None`: none).
    pub deadline: Option<Duration>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            app_target: None,
            dry_run: false,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            statement_timeout: None,
            lock_retries: DEFAULT_LOCK_RETRIES,
            retry_backoff: DEFAULT_RETRY_BACKOFF,
            deadline: Some(DEFAULT_DEADLINE),
        }
    }
}

impl Settings {
    /// The pause before retry number `retry` (1 for the first).
    pub fn backoff(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.saturating_sub(1));
        self.retry_backoff.saturating_mul(factor).min(MAX_RETRY_BACKOFF)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let s = Settings::default();
        let pauses: Vec<u64> = (1..=7).map(|r| s.backoff(r).as_secs()).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 30, 30]);
    }
}
