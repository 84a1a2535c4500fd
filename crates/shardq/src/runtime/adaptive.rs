//! Adaptive concurrency: a queue's limit on this node sized from what its
//! runs show, between a least limit and the queue's configured one (off by
//! default; see `RuntimeOptions::adaptive`).
//!
//! [`Limiter`] is a gradient limiter in the manner of Netflix's
//! concurrency-limits: runs that end are gathered into windows (at least
//! `window` long and [`MIN_SAMPLES`] runs). At the end of a window it
//! compares the window's mean handler latency with the *baseline*, the
//! lowest window mean seen; a window run at the least limit sets the
//! baseline to its mean (nothing runs slower for this node's sake there),
//! so a handler that got slower for good is not judged against an old best:
//!
//! - `gradient = clamp(tolerance × baseline / mean, 0.5, 1)`: 1 while the
//!   handlers run about as fast as they can, less when running more at once
//!   made each slower (a contended lock, pool or provider);
//! - the new limit is `limit × gradient`, plus `√limit` when the window
//!   was *saturated* (claimed jobs waited for a slot: there is a backlog);
//!   a window where more than [`ERROR_SHARE`] of the runs failed instead
//!   cuts the limit to [`ERROR_BACKOFF`] of itself;
//! - always within `[min, max]`.
//!
//! So with fast handlers and a backlog the limit climbs to the max by
//! `√limit` a window; when latency rises with concurrency it falls (by at
//! most half a window) to where the handlers keep their pace; and without a
//! backlog it stays where it is. The limiter is pure: the queue's slots
//! feed it and apply its answers.

use std::time::Duration;

use tokio::time::Instant;

/// Fewest runs a window gathers before it is judged.
pub(crate) const MIN_SAMPLES: u32 = 4;

/// Latencies below this count as this (a no-op handler's microseconds are
/// noise, not contention).
const LATENCY_FLOOR_SECS: f64 = 0.001;

/// Share of failed runs in a window above which the limit is cut.
pub(crate) const ERROR_SHARE: f64 = 0.25;

/// What a window with too many failures leaves of the limit.
pub(crate) const ERROR_BACKOFF: f64 = 0.8;

/// The least gradient: a window at most halves the limit.
const MIN_GRADIENT: f64 = 0.5;

/// One queue's adaptive limit on this node.
#[derive(Debug)]
pub(crate) struct Limiter {
    /// Least limit.
    min: usize,
    /// Most limit (the queue's configured limit).
    max: usize,
    /// Shortest window.
    window: Duration,
    /// How much slower than the baseline a window may be before the limit
    /// comes down.
    tolerance: f64,
    /// The limit now, fractional between decisions.
    limit: f64,
    /// Lowest window mean latency seen (reset by a window at the least
    /// limit), in seconds.
    baseline: Option<f64>,
    /// When the current window opened.
    opened: Instant,
    /// Runs ended in the window.
    samples: u32,
    /// Their latencies summed, in seconds.
    latency_sum: f64,
    /// Failed runs among them.
    failed: u32,
    /// Whether a run waited for a slot during the window.
    saturated: bool,
}

impl Limiter {
    /// A limiter between `min` and `max` (`min` raised to 1 and lowered to
    /// `max` if need be), starting at `min`.
    pub(crate) fn new(min: usize, max: usize, window: Duration, tolerance: f64, now: Instant) -> Limiter {
        let max = max.max(1);
        let min = min.clamp(1, max);
        Limiter {
            min,
            max,
            window,
            tolerance: tolerance.max(1.0),
            limit: min as f64,
            baseline: None,
            opened: now,
            samples: 0,
            latency_sum: 0.0,
            failed: 0,
            saturated: false,
        }
    }

    /// The limit now.
    pub(crate) fn limit(&self) -> usize {
        (self.limit.floor() as usize).clamp(self.min, self.max)
    }

    /// The least limit.
    pub(crate) fn min(&self) -> usize {
        self.min
    }

    /// The most limit.
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// Records that claimed work waited for a slot (a backlog).
    pub(crate) fn saturated(&mut self) {
        self.saturated = true;
    }

    /// Records a run that took `latency` (and whether it failed) and, when
    /// that closes a window, decides: returns the new limit if it changed.
    pub(crate) fn ended(&mut self, now: Instant, latency: Duration, failed: bool) -> Option<usize> {
        self.samples += 1;
        self.latency_sum += latency.as_secs_f64();
        self.failed += u32::from(failed);
        if self.samples < MIN_SAMPLES || now.duration_since(self.opened) < self.window {
            return None;
        }
        let before = self.limit();
        let mean = (self.latency_sum / f64::from(self.samples)).max(LATENCY_FLOOR_SECS);
        let baseline = self.baseline.unwrap_or(mean);
        let errors = f64::from(self.failed) / f64::from(self.samples);
        let target = if errors > ERROR_SHARE {
            self.limit * ERROR_BACKOFF
        } else {
            let gradient = (self.tolerance * baseline / mean).clamp(MIN_GRADIENT, 1.0);
            let grow = if self.saturated { self.limit.sqrt() } else { 0.0 };
            self.limit * gradient + grow
        };
        self.limit = target.clamp(self.min as f64, self.max as f64);
        self.baseline = Some(if before == self.min { mean } else { baseline.min(mean) });
        self.opened = now;
        self.samples = 0;
        self.latency_sum = 0.0;
        self.failed = 0;
        self.saturated = false;
        let after = self.limit();
        (after != before).then_some(after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_millis(100);

    /// Feeds `windows` windows of `MIN_SAMPLES` runs whose latency is
    /// `latency(limit)`, saturated or not; returns the limits after each.
    /// The clock is the limiter's: each window ends one `WINDOW` after the
    /// last one opened.
    fn run(l: &mut Limiter, windows: usize, saturated: bool, latency: impl Fn(usize) -> Duration) -> Vec<usize> {
        let mut out = Vec::new();
        for _ in 0..windows {
            let now = l.opened + WINDOW;
            if saturated {
                l.saturated();
            }
            let lat = latency(l.limit());
            for _ in 0..MIN_SAMPLES {
                l.ended(now, lat, false);
            }
            out.push(l.limit());
        }
        out
    }

    #[test]
    fn fast_handlers_with_a_backlog_climb_to_the_max_and_stay() {
        let mut l = Limiter::new(2, 32, WINDOW, 1.5, Instant::now());
        let limits = run(&mut l, 30, true, |_| Duration::from_millis(10));
        assert!(limits.windows(2).all(|w| w[0] <= w[1]), "never down: {limits:?}");
        assert_eq!(l.limit(), 32, "{limits:?}");
    }

    #[test]
    fn without_a_backlog_the_limit_stays() {
        let mut l = Limiter::new(3, 32, WINDOW, 1.5, Instant::now());
        run(&mut l, 20, false, |_| Duration::from_millis(10));
        assert_eq!(l.limit(), 3);
    }

    #[test]
    fn latency_that_rises_with_concurrency_brings_the_limit_down_not_below_min() {
        let mut l = Limiter::new(2, 64, WINDOW, 1.5, Instant::now());
        run(&mut l, 30, true, |_| Duration::from_millis(10));
        assert_eq!(l.limit(), 64);
        // A lock two runs can hold at once, 10 ms each: latency grows with the limit.
        let limits = run(&mut l, 20, true, |n| Duration::from_millis(5 * n.max(2) as u64));
        assert!(limits.iter().all(|n| (2..=64).contains(n)), "{limits:?}");
        assert!(*limits.last().unwrap_or(&64) <= 12, "{limits:?}");
    }

    #[test]
    fn a_window_of_failures_cuts_the_limit() {
        let mut l = Limiter::new(1, 10, WINDOW, 1.5, Instant::now());
        run(&mut l, 20, true, |_| Duration::from_millis(10));
        assert_eq!(l.limit(), 10);
        let now = l.opened + WINDOW;
        let mut changed = None;
        for _ in 0..MIN_SAMPLES {
            changed = l.ended(now, Duration::from_millis(10), true);
        }
        assert_eq!(changed, Some(8));
    }

    #[test]
    fn bounds_are_sane_whatever_is_asked() {
        let l = Limiter::new(0, 0, WINDOW, 0.1, Instant::now());
        assert_eq!((l.min(), l.max(), l.limit()), (1, 1, 1));
        let l = Limiter::new(50, 10, WINDOW, 1.5, Instant::now());
        assert_eq!((l.min(), l.max(), l.limit()), (10, 10, 10));
    }
}
