//! Unique jobs and serial keys as values: [`UniqueOpts`], and the key texts
//! the store writes (the I/O, `ON CONFLICT` and the duplicate lookup, is in
//! `store::insert`). Used by `job` (options) and the store (keys).
//!
//! [`UniqueOpts`] on a `NewJob` makes a
//! duplicate enqueue return the existing job instead of inserting another.
//!
//! The database decides, so uniqueness holds across nodes and races: the
//! job's `unique_key` column (a hex SHA-256 of kind, queue, account, the key
//! and the period's bucket) is covered by a unique partial index
//! (`jobs_unique_idx`, shard migration V5), and the insert is
//! `INSERT .. ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING`;
//! when it inserts nothing, the existing job's id is read and returned.
//!
//! Scope: uniqueness is per account (an account's jobs all live on one
//! shard, whose index enforces it): two accounts enqueueing the same kind
//! and args get two jobs.
//!
//! States: a job keeps its key only while it is in one of its unique states
//! ([`UniqueStates`]); every statement that moves it to a state outside the
//! set (completion, discard, cancellation, rescue to discarded) clears the
//! key in the same UPDATE, so a new job with the same key can be enqueued
//! from then on. Moves between unique states keep it: a retry after an
//! error, a snooze, a rescue of an expired lease and a hand-back at shutdown
//! all make a running job `available`, which every set contains. With
//! [`UniqueStates::Any`] the key lives as long as the row, i.e. until the
//! pruner deletes the finished job (`RuntimeOptions::retain_*`).
//!
//! Manual retry (`Client::retry`): the hash is also kept in `unique_hash`
//! for the life of the row (shard migration V6), and a retry puts it back in
//! `unique_key` in the same UPDATE that makes the job available, so the
//! retried job is deduplicated against again. When another job holds the
//! key by then, the unique index refuses that UPDATE and the retry fails
//! with `Error::UniqueConflict` naming the holder, changing nothing (as
//! River refuses it with a unique conflict): the retried job would
//! otherwise duplicate the holder. Jobs whose key was cleared before V6 have
//! no `unique_hash` and are retried without a key.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// The states a unique job is unique among.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UniqueStates {
    /// Not yet finished: `available` (due, scheduled or retrying) and
    /// `running`. Once the job completes, is discarded or cancelled, a new
    /// job with the same key can be enqueued. The default.
    #[default]
    Incomplete,
    /// Every state, finished ones included, for as long as the row is kept.
    Any,
}

impl UniqueStates {
    /// The state names of the set, as stored in `unique_states`.
    pub fn as_slice(self) -> &'static [&'static str] {
        match self {
            UniqueStates::Incomplete => &["available", "running"],
            UniqueStates::Any => &["available", "running", "completed", "discarded", "cancelled"],
        }
    }
}

/// What makes two jobs duplicates: same kind, queue, account and key, among
/// `states`, within the same `period` bucket when one is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UniqueOpts {
    /// The key; `None` uses the job's args as JSON text (object keys sorted).
    pub key: Option<String>,
    /// The states the job is unique among.
    pub states: UniqueStates,
    /// When set, jobs are unique only within one period: the bucket is the
    /// job's `run_at` (or now) rounded down to a multiple of the period since
    /// the Unix epoch, so with one hour, a job at 10:59 and one at 11:00 are
    /// different jobs.
    pub period: Option<Duration>,
}

impl UniqueOpts {
    /// Unique by args among incomplete jobs, without a period.
    pub fn new() -> UniqueOpts {
        UniqueOpts::default()
    }

    /// Unique by `key` instead of the args.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Unique among `states`.
    pub fn states(mut self, states: UniqueStates) -> Self {
        self.states = states;
        self
    }

    /// Unique within each `period` bucket.
    pub fn period(mut self, period: Duration) -> Self {
        self.period = Some(period);
        self
    }
}

/// The text hashed into `unique_key` (the database stores its SHA-256):
/// fields separated by U+001F, which cannot be confused with their content
/// in practice and is never a NUL.
pub(crate) fn key_text(
    kind: &str,
    queue: &str,
    account: &str,
    opts: &UniqueOpts,
    args_json: &str,
    run_at: Option<DateTime<Utc>>,
) -> String {
    let key = opts.key.as_deref().unwrap_or(args_json);
    let mut text = format!("{kind}\u{1f}{queue}\u{1f}{account}\u{1f}{key}");
    if let Some(period) = opts.period {
        text.push('\u{1f}');
        text.push_str(&bucket_start(period, run_at.unwrap_or_else(Utc::now)).to_string());
    }
    text
}

/// The start of the period bucket holding `at`, in whole milliseconds since the epoch.
pub(crate) fn bucket_start(period: Duration, at: DateTime<Utc>) -> i64 {
    let p = i64::try_from(period.as_millis()).unwrap_or(i64::MAX).max(1);
    at.timestamp_millis().div_euclid(p) * p
}

/// The stored serial key: the account and the ordering key, so ordering
/// groups are per account.
pub(crate) fn serial_text(account: &str, key: &str) -> String {
    format!("{account}\u{1f}{key}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_rounds_down_to_the_period() {
        let hour = Duration::from_secs(3600);
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap_or_default();
        assert_eq!(
            bucket_start(hour, at("2026-01-01T10:59:59Z")),
            bucket_start(hour, at("2026-01-01T10:00:00Z"))
        );
        assert_ne!(
            bucket_start(hour, at("2026-01-01T10:59:59Z")),
            bucket_start(hour, at("2026-01-01T11:00:00Z"))
        );
    }

    #[test]
    fn the_key_names_kind_queue_account_and_key() {
        let opts = UniqueOpts::new().key("k");
        let a = key_text("kind", "q", "acct", &opts, "{}", None);
        assert_ne!(a, key_text("kind", "q", "other", &opts, "{}", None));
        assert_ne!(a, key_text("kind2", "q", "acct", &opts, "{}", None));
        assert_eq!(a, key_text("kind", "q", "acct", &opts, "{\"x\":1}", None));
        let by_args = UniqueOpts::new();
        assert_ne!(
            key_text("kind", "q", "acct", &by_args, "{\"x\":1}", None),
            key_text("kind", "q", "acct", &by_args, "{\"x\":2}", None)
        );
    }
}
