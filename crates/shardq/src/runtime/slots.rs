//! [`QueueSlots`]: a queue's concurrency limit on this node, shared fairly by
//! the producers of every shard.
//!
//! Each shard's producer reserves slots before it fetches and releases them
//! when a run ends. A shard is *hungry* when its last fetch came back full or
//! it found no free slot: it likely has more work. While other shards are
//! hungry, a shard may hold at most its fair share (limit / hungry shards,
//! rounded up), so a shard with a 100k backlog cannot starve another shard's
//! jobs on the same queue; when no one else is hungry it may use every slot.
//! A shard whose fetch fails is not hungry ([`QueueSlots::set_failing`]):
//! a shard that is down must not keep a share of the slots for its outage.
//!
//! With adaptive concurrency on for the queue, the limit moves between a
//! least one and the configured one as the `adaptive` limiter decides from
//! the runs that end ([`QueueSlots::finished`]) and whether claimed jobs
//! waited for a slot (a reservation that found too few).
//!
//! Shards are known by their *position* on this node (`ShardWork::index`):
//! the tables grow when a unit starts at a position not seen yet
//! ([`QueueSlots::waker`]), and a position whose unit stopped
//! ([`QueueSlots::forget`]) serves the next unit started, so a node whose
//! router gains shards later never runs out.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::adaptive::Limiter;
use crate::observe::metrics;

/// Slots of one queue on this node.
pub(crate) struct QueueSlots {
    /// The queue's name, for its metrics.
    queue: Arc<str>,
    /// Written by reserve/release/set_hungry, under the lock.
    state: Mutex<SlotState>,
}

/// The limit and, per position, the tables below (one entry per position seen).
struct SlotState {
    /// The node's limit for this queue now: the configured one, or where
    /// the limiter put it.
    limit: usize,
    /// Sizes the limit when adaptive concurrency is on for the queue; fed
    /// by reservations and ended runs.
    limiter: Option<Limiter>,
    /// One wake-up per shard producer of this queue (index = position);
    /// released slots call `notify_one` on the hungry ones, which stores a
    /// permit.
    wakers: Vec<Arc<Notify>>,
    running: Vec<usize>,
    hungry: Vec<bool>,
    /// Set when a shard's fetch failed, cleared by its next successful
    /// claim: a failing shard finding no slot is not hungry.
    failing: Vec<bool>,
}

impl QueueSlots {
    /// Slots of `queue` for `limit` concurrent runs, no position known yet;
    /// with a `limiter`, the limit is the limiter's (its most is `limit`).
    pub(crate) fn new(queue: Arc<str>, limit: usize, limiter: Option<Limiter>) -> QueueSlots {
        let limit = limiter.as_ref().map_or(limit, Limiter::limit);
        metrics::queue_concurrency(&queue, limit);
        QueueSlots {
            queue,
            state: Mutex::new(SlotState {
                limit,
                limiter,
                wakers: Vec::new(),
                running: Vec::new(),
                hungry: Vec::new(),
                failing: Vec::new(),
            }),
        }
    }

    /// The wake-up of the producer at `position` (the tables grow to hold
    /// it): released slots notify it while it is hungry.
    pub(crate) fn waker(&self, position: usize) -> Arc<Notify> {
        match self.state.lock() {
            Ok(mut s) => {
                s.grow(position);
                s.wakers[position].clone()
            }
            Err(_) => Arc::new(Notify::new()),
        }
    }

    /// Reserves up to `max` slots for `shard`; returns how many it got. A
    /// shard that gets none is marked hungry and woken by the next release.
    pub(crate) fn reserve(&self, shard: usize, max: usize) -> usize {
        let Ok(mut s) = self.state.lock() else { return 0 };
        s.grow(shard);
        let got = self.allowed(&s, shard).min(max);
        s.running[shard] += got;
        // Claimed jobs wait for a slot the limit holds back: a backlog.
        if got < max && s.limiter.is_some() && s.running.iter().sum::<usize>() >= s.limit {
            if let Some(l) = &mut s.limiter {
                l.saturated();
            }
        }
        if got == 0 && !s.failing[shard] {
            s.hungry[shard] = true;
        }
        got
    }

    /// The queue's limit on this node now.
    pub(crate) fn limit(&self) -> usize {
        self.state.lock().map(|s| s.limit).unwrap_or(1)
    }

    /// The adaptive range (least, most) when the limit is adaptive.
    pub(crate) fn adaptive_range(&self) -> Option<(usize, usize)> {
        let s = self.state.lock().ok()?;
        s.limiter.as_ref().map(|l| (l.min(), l.max()))
    }

    /// Whether `shard` could reserve a slot now; when it could not, it is
    /// marked hungry and woken by the next release, as by [`Self::reserve`].
    #[cfg(test)]
    pub(crate) fn has_free(&self, shard: usize) -> bool {
        let Ok(mut s) = self.state.lock() else { return false };
        s.grow(shard);
        let free = self.allowed(&s, shard) > 0;
        if !free && !s.failing[shard] {
            s.hungry[shard] = true;
        }
        free
    }

    /// Slots `shard` may take now: the free ones, bounded by its fair share
    /// while other shards are hungry.
    fn allowed(&self, s: &SlotState, shard: usize) -> usize {
        let total: usize = s.running.iter().sum();
        let free = s.limit.saturating_sub(total);
        let others_hungry = s.hungry.iter().enumerate().filter(|(i, h)| **h && *i != shard).count();
        if others_hungry == 0 {
            free
        } else {
            let share = s.limit.div_ceil(others_hungry + 1);
            free.min(share.saturating_sub(s.running[shard]))
        }
    }

    /// Returns `n` slots of `shard` after runs ended and wakes the hungry
    /// producers of the queue (those likely to have work waiting); the
    /// runtime frees slots through [`Self::finished`].
    #[cfg(test)]
    pub(crate) fn release(&self, shard: usize, n: usize) {
        let Ok(mut s) = self.state.lock() else { return };
        s.grow(shard);
        s.running[shard] = s.running[shard].saturating_sub(n);
        s.wake_hungry(None);
    }

    /// A run of `shard` that held a slot ended after `latency` (`failed`:
    /// its handler failed): frees the slot as [`Self::release`] does, and
    /// feeds the limiter, whose decision applies at once.
    pub(crate) fn finished(&self, shard: usize, latency: Duration, failed: bool) {
        let Ok(mut s) = self.state.lock() else { return };
        s.grow(shard);
        s.running[shard] = s.running[shard].saturating_sub(1);
        let decided = s
            .limiter
            .as_mut()
            .and_then(|l| l.ended(Instant::now(), latency, failed));
        if let Some(limit) = decided {
            tracing::debug!(queue = %self.queue, from = s.limit, to = limit, "adaptive concurrency moved the limit");
            s.limit = limit;
            metrics::queue_concurrency(&self.queue, limit);
        }
        s.wake_hungry(None);
    }

    /// Returns `n` reserved slots that a fetch did not fill, and wakes the
    /// other hungry producers of the queue: one that found no free slot
    /// while this fetch held them would otherwise wait for a run to end (or
    /// the poll) with slots free.
    pub(crate) fn unreserve(&self, shard: usize, n: usize) {
        let Ok(mut s) = self.state.lock() else { return };
        s.grow(shard);
        s.running[shard] = s.running[shard].saturating_sub(n);
        if n == 0 {
            return;
        }
        s.wake_hungry(Some(shard));
    }

    /// Records whether `shard` likely has more work waiting.
    pub(crate) fn set_hungry(&self, shard: usize, hungry: bool) {
        if let Ok(mut s) = self.state.lock() {
            s.grow(shard);
            s.hungry[shard] = hungry;
            s.failing[shard] = false;
        }
    }

    /// Records that `shard` cannot be fetched from (its server is down or
    /// not answering): it is not hungry, so the other shards' fair share no
    /// longer counts it, and their hungry producers are woken to take the
    /// slots it leaves.
    pub(crate) fn set_failing(&self, shard: usize) {
        let Ok(mut s) = self.state.lock() else { return };
        s.grow(shard);
        s.failing[shard] = true;
        let was_hungry = std::mem::replace(&mut s.hungry[shard], false);
        if was_hungry {
            s.wake_hungry(Some(shard));
        }
    }

    /// `shard` is about to wait on its database for a connection, holding
    /// no slot: while it waits it does not count as hungry (a shard that
    /// does not answer must not cap the others at a share), and the
    /// reservation after the wait marks it hungry again if it finds none.
    pub(crate) fn waiting_on_shard(&self, shard: usize) {
        if let Ok(mut s) = self.state.lock() {
            s.grow(shard);
            s.hungry[shard] = false;
        }
    }

    /// `shard`'s work stopped on this node (its runs ended or were handed
    /// back, aborted without releasing): its slots are free and it is
    /// neither hungry nor failing, so the position can serve another shard.
    /// Wakes the hungry producers of the queue.
    pub(crate) fn forget(&self, shard: usize) {
        let Ok(mut s) = self.state.lock() else { return };
        s.grow(shard);
        s.running[shard] = 0;
        s.hungry[shard] = false;
        s.failing[shard] = false;
        s.wake_hungry(None);
    }

    /// Slots neither running nor reserved on any shard (read by the sampler).
    pub(crate) fn free(&self) -> usize {
        self.state
            .lock()
            .map(|s| s.limit.saturating_sub(s.running.iter().sum()))
            .unwrap_or(0)
    }

    /// Runs in progress for `shard`.
    #[cfg(test)]
    fn running(&self, shard: usize) -> usize {
        self.state
            .lock()
            .map(|s| s.running.get(shard).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl SlotState {
    /// Makes room for `position` in every table.
    fn grow(&mut self, position: usize) {
        if position < self.running.len() {
            return;
        }
        let n = position + 1;
        self.wakers.resize_with(n, || Arc::new(Notify::new()));
        self.running.resize(n, 0);
        self.hungry.resize(n, false);
        self.failing.resize(n, false);
    }

    /// Wakes the hungry producers, but `except`.
    fn wake_hungry(&self, except: Option<usize>) {
        for (i, (w, hungry)) in self.wakers.iter().zip(&self.hungry).enumerate() {
            if *hungry && Some(i) != except {
                w.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(limit: usize, shards: usize) -> QueueSlots {
        let s = QueueSlots::new(Arc::from("q"), limit, None);
        for position in 0..shards {
            s.waker(position);
        }
        s
    }

    #[test]
    fn an_adaptive_limit_starts_at_its_least_and_grows_with_a_backlog() {
        let limiter = Limiter::new(1, 8, Duration::ZERO, 1.5, Instant::now());
        let s = QueueSlots::new(Arc::from("q"), 8, Some(limiter));
        assert_eq!((s.limit(), s.adaptive_range()), (1, Some((1, 8))));
        let mut seen = Vec::new();
        for _ in 0..40 {
            let got = s.reserve(0, 8); // more claimed than fits: saturated
            for _ in 0..got.max(1) {
                s.finished(0, Duration::from_millis(10), false);
            }
            seen.push(s.limit());
        }
        assert!(seen.iter().all(|n| (1..=8).contains(n)), "{seen:?}");
        assert_eq!(s.limit(), 8, "{seen:?}");
    }

    #[test]
    fn positions_grow_past_any_initial_count_and_keep_their_wakers() {
        let s = slots(4, 2);
        let far = s.waker(100);
        assert!(Arc::ptr_eq(&far, &s.waker(100)), "one waker per position");
        assert_eq!(s.reserve(100, 4), 4);
        assert_eq!(s.reserve(0, 4), 0, "the limit holds across grown positions");
        s.release(100, 4);
        assert_eq!(s.free(), 4);
    }

    #[test]
    fn a_forgotten_shard_frees_its_slots_and_share() {
        let s = slots(4, 2);
        assert_eq!(s.reserve(0, 4), 4);
        s.set_hungry(0, true);
        assert_eq!(s.reserve(1, 4), 0);
        s.forget(0); // shard 0 stopped here; its aborted runs released nothing
        assert_eq!(s.free(), 4);
        assert_eq!(s.reserve(1, 4), 4, "no share kept for a stopped shard");
    }

    #[test]
    fn a_lone_shard_may_use_every_slot() {
        let s = slots(10, 2);
        assert_eq!(s.reserve(0, 100), 10);
        assert_eq!(s.reserve(0, 1), 0);
        s.release(0, 3);
        assert_eq!(s.reserve(0, 100), 3);
    }

    #[test]
    fn a_backlogged_shard_cannot_starve_another() {
        let s = slots(10, 2);
        assert_eq!(s.reserve(0, 10), 10);
        s.set_hungry(0, true); // full batch: shard 0 has a backlog
        assert_eq!(s.reserve(1, 10), 0, "no slot free yet"); // marks shard 1 hungry
        s.release(0, 10);
        // Now both are hungry: shard 0 may only refill to its half.
        assert_eq!(s.reserve(0, 10), 5);
        assert_eq!(s.reserve(1, 10), 5);
        assert_eq!(s.running(1), 5);
    }

    #[test]
    fn slots_a_fetch_did_not_fill_wake_a_producer_that_found_none() {
        let s = slots(4, 2);
        assert_eq!(s.reserve(0, 4), 4); // shard 0 reserves every slot and fetches
        assert_eq!(s.reserve(1, 4), 0); // shard 1 finds none: hungry
        s.unreserve(0, 4); // shard 0's fetch found nothing
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(5), s.waker(1).notified())
                .await
                .expect("shard 1 woken");
        });
        assert_eq!(s.reserve(1, 4), 4);
    }

    #[test]
    fn a_failing_shard_gives_up_its_share() {
        let s = slots(6, 3);
        for shard in 0..3 {
            assert_eq!(s.reserve(shard, 2), 2);
            s.set_hungry(shard, true);
        }
        s.release(0, 2); // shard 0's runs ended; then its fetch fails
        s.set_failing(0);
        assert_eq!(s.reserve(1, 6), 1, "shard 1 may grow to half the limit");
        assert_eq!(s.reserve(2, 6), 1);
        assert_eq!(s.running(0), 0);
    }

    #[test]
    fn a_shard_that_keeps_failing_is_never_counted_hungry() {
        let s = slots(6, 3);
        s.set_failing(0);
        assert_eq!(s.reserve(1, 6), 6);
        assert!(!s.has_free(0), "no slot free");
        s.release(1, 6);
        // Shard 0 is not hungry: shard 1 may take every slot again.
        assert_eq!(s.reserve(1, 6), 6);
        s.set_hungry(0, false); // shard 0 answered again
        s.release(1, 6);
        assert!(s.has_free(0));
    }

    #[test]
    fn release_wakes_the_hungry_producers_of_the_queue() {
        let s = slots(1, 2);
        assert_eq!(s.reserve(0, 1), 1);
        s.set_hungry(0, true);
        assert_eq!(s.reserve(1, 1), 0); // shard 1 found no slot: hungry
        s.release(0, 1);
        // notify_one stores a permit, so a producer that was not waiting yet still wakes.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            for w in [s.waker(0), s.waker(1)] {
                tokio::time::timeout(std::time::Duration::from_secs(5), w.notified())
                    .await
                    .expect("woken");
            }
        });
    }
}
