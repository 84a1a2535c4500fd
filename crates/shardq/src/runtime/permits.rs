//! Permits of named resources (issue 16): global concurrency limits held
//! across every node and shard, without a round trip to the master per job.
//!
//! The master declares each resource once (`shardq.resources`: name,
//! concurrency). A node leases permits of a resource in batches
//! (`shardq.resource_leases`: node, permits, expiry): the leaser below asks
//! every heartbeat for what its runs hold plus what its buffered jobs wait
//! for (at least a batch when its producers saw work waiting), and gets at most what the other nodes' unexpired
//! leases leave. Every lease is renewed with that request, so the permits of
//! a node that died come back once its lease runs out. The node trusts a
//! grant until the lease less a heartbeat from when it asked, so it never
//! counts on permits the master has already given back to others; a node
//! that cannot renew stops starting such jobs (those already running go
//! on). Shrinking takes effect locally before it is asked for, so a grant
//! in flight never covers more than the node runs.
//!
//! Producers claim jobs that use resources by their own statement ahead of
//! the permits, as they claim other jobs ahead of the slots: while the
//! node's claimed and running jobs of each of a job's resources are fewer
//! than twice its grant (a grant of permits that run, and as many jobs
//! waiting in the buffer for them). A buffered job starts once it takes a
//! permit of every resource it names (all or none; and a token of each
//! rated one); the permits come back when the run has ended on the node,
//! which wakes every producer of the node at once (a watch channel, so no
//! wake-up is lost), so a freed permit goes to a job already claimed
//! instead of waiting for a claim's round trip. A handler therefore starts
//! only holding a permit of every resource its job names. A job that
//! waited in the buffer for its permits longer than [`WAIT_MOST`] is
//! handed back (the node may have lost its grant). A resource declared
//! without a concurrency limit has unlimited permits; a job naming an
//! undeclared resource waits until it is declared.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use shardq_router::router::Database;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::error::ErrorChain;
use crate::store;

/// A run that holds permits: (shard position, job id, attempt).
pub(crate) type HoldKey = (usize, i64, i32);

/// How long a claimed job waits in the buffer for its permits before it
/// is handed back.
pub(crate) const WAIT_MOST: Duration = Duration::from_secs(10);

/// A claimed job of some resources on this node.
struct Hold {
    /// The resources it uses.
    names: Vec<String>,
    /// Whether it took their permits (it started); else it waits for them.
    started: bool,
    /// When it was claimed.
    since: Instant,
}

/// Permits of one resource on this node.
#[derive(Debug)]
struct Pool {
    /// Permits the master granted this node (`None`: unlimited, the
    /// resource has no concurrency limit).
    granted: Option<u32>,
    /// Permits taken by runs on this node (started and not ended).
    in_use: u32,
    /// Jobs of it claimed onto this node and waiting for a permit.
    queued: u32,
    /// Until when the grant holds on this node's clock.
    valid_until: Instant,
    /// Whether a producer saw jobs of it waiting for a permit since the
    /// last lease request.
    wanted: bool,
    /// Whether the resource has a rate: each start then also takes a token.
    rated: bool,
    /// Tokens taken from the master's bucket and not used yet.
    tokens: u32,
    /// Until when they may be used (unused ones are dropped, so a node
    /// never saves tokens up beyond the bucket's burst).
    tokens_until: Instant,
    /// Tokens one request asks for: a tenth of a second of the rate.
    batch_tokens: u32,
}

/// How long tokens taken from a bucket stay usable on the node.
const TOKENS_LAST: Duration = Duration::from_secs(1);

impl Pool {
    /// How many more jobs of it this node may claim now: twice the grant
    /// less the jobs running and waiting (tokens: a batch more than it
    /// holds, less those waiting).
    fn claimable(&self, now: Instant) -> u32 {
        if now >= self.valid_until {
            return 0;
        }
        let ahead = self.in_use + self.queued;
        let permits = match self.granted {
            None => u32::MAX,
            Some(g) => g.saturating_mul(2).saturating_sub(ahead),
        };
        if !self.rated {
            return permits;
        }
        let tokens = if now < self.tokens_until { self.tokens } else { 0 };
        permits.min((tokens + self.batch_tokens).saturating_sub(self.queued))
    }

    /// How many jobs of it may start now.
    fn free(&self, now: Instant) -> u32 {
        if now >= self.valid_until {
            return 0;
        }
        let permits = match self.granted {
            None => u32::MAX,
            Some(g) => g.saturating_sub(self.in_use),
        };
        if !self.rated {
            return permits;
        }
        let tokens = if now < self.tokens_until { self.tokens } else { 0 };
        permits.min(tokens)
    }
}

#[derive(Default)]
struct State {
    pools: BTreeMap<String, Pool>,
    holds: HashMap<HoldKey, Hold>,
}

/// The node's permits: read and taken by producers, renewed by the leaser.
pub(crate) struct Permits {
    /// The master, where resources are declared and leases kept.
    master: Database,
    state: Mutex<State>,
    /// Bumped when permits were granted or given back on this node, so
    /// every producer starts its buffered jobs and claims again.
    changed: watch::Sender<u64>,
    /// Notified when a producer saw jobs waiting without a permit, so the
    /// leaser asks at once instead of at its next beat.
    demand: Notify,
}

impl Permits {
    /// No permits yet; the leaser fills them.
    pub(crate) fn new(master: Database) -> Permits {
        Permits {
            master,
            state: Mutex::new(State::default()),
            changed: watch::channel(0).0,
            demand: Notify::new(),
        }
    }

    /// Whether any resource is declared (as of the last lease round): only
    /// then do producers claim jobs that use resources.
    pub(crate) fn any(&self) -> bool {
        self.state.lock().map(|s| !s.pools.is_empty()).unwrap_or(false)
    }

    /// The resources this node may claim jobs of now, and how many at most
    /// (the most of one resource): see [`Pool::claimable`].
    pub(crate) fn claimable(&self) -> (Vec<String>, u32) {
        let now = Instant::now();
        let Ok(s) = self.state.lock() else {
            return (Vec::new(), 0);
        };
        let mut names = Vec::new();
        let mut most = 0;
        for (name, pool) in &s.pools {
            let free = pool.claimable(now);
            if free > 0 {
                names.push(name.clone());
                most = most.max(free);
            }
        }
        (names, most)
    }

    /// Records the job `key`, claimed onto this node, as waiting for
    /// permits of `names`.
    pub(crate) fn claimed(&self, key: HoldKey, names: Vec<String>) {
        let Ok(mut s) = self.state.lock() else { return };
        for n in &names {
            if let Some(p) = s.pools.get_mut(n) {
                p.queued += 1;
            }
        }
        let hold = Hold {
            names,
            started: false,
            since: Instant::now(),
        };
        if let Some(old) = s.holds.insert(key, hold) {
            // Not expected (a key is claimed once); keep the counts right.
            Self::forget(&mut s, &old);
        }
    }

    /// Takes a permit (and a token, when rated) of each resource of the
    /// claimed job `key`, all or none: whether it may start. A job not
    /// recorded by [`Self::claimed`] uses none and may. When it may not, the
    /// leaser is asked for more.
    pub(crate) fn start(&self, key: HoldKey) -> bool {
        let now = Instant::now();
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        let State { pools, holds } = &mut *s;
        let Some(hold) = holds.get_mut(&key) else {
            return true;
        };
        if hold.started {
            return true;
        }
        let all = hold.names.iter().all(|n| pools.get(n).is_some_and(|p| p.free(now) > 0));
        if !all {
            for n in &hold.names {
                if let Some(p) = pools.get_mut(n) {
                    p.wanted = true;
                }
            }
            drop(s);
            self.demand.notify_one();
            return false;
        }
        for n in &hold.names {
            if let Some(p) = pools.get_mut(n) {
                p.in_use += 1;
                p.queued = p.queued.saturating_sub(1);
                if p.rated {
                    p.tokens -= 1;
                    if p.tokens == 0 {
                        p.wanted = true;
                    }
                }
            }
        }
        hold.started = true;
        true
    }

    /// Undoes [`Self::start`] of `key` (it found no slot): its permits and
    /// tokens go back and it waits again.
    pub(crate) fn unstart(&self, key: HoldKey) {
        let Ok(mut s) = self.state.lock() else { return };
        let State { pools, holds } = &mut *s;
        let Some(hold) = holds.get_mut(&key).filter(|h| h.started) else {
            return;
        };
        for n in &hold.names {
            if let Some(p) = pools.get_mut(n) {
                p.in_use = p.in_use.saturating_sub(1);
                p.queued += 1;
                if p.rated {
                    p.tokens += 1;
                }
            }
        }
        hold.started = false;
    }

    /// The claimed jobs of shard `shard` that waited for their permits
    /// longer than [`WAIT_MOST`]: (job id, attempt).
    pub(crate) fn overdue(&self, shard: usize) -> Vec<(i64, i32)> {
        let Ok(s) = self.state.lock() else {
            return Vec::new();
        };
        s.holds
            .iter()
            .filter(|(k, h)| k.0 == shard && !h.started && h.since.elapsed() > WAIT_MOST)
            .map(|(k, _)| (k.1, k.2))
            .collect()
    }

    /// Takes `hold` out of its pools' counts.
    fn forget(s: &mut State, hold: &Hold) {
        for n in &hold.names {
            if let Some(p) = s.pools.get_mut(n) {
                if hold.started {
                    p.in_use = p.in_use.saturating_sub(1);
                } else {
                    p.queued = p.queued.saturating_sub(1);
                }
            }
        }
    }

    /// Gives back the permits the job `key` took, or its place among the
    /// waiting, if any (its run ended, or it was handed back).
    pub(crate) fn release(&self, key: HoldKey) {
        let freed = self.state.lock().ok().and_then(|mut s| {
            let hold = s.holds.remove(&key)?;
            Self::forget(&mut s, &hold);
            Some(hold.started)
        });
        if freed == Some(true) {
            self.changed.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Records that jobs of `names` wait for permits; the leaser asks for more.
    pub(crate) fn want(&self, names: &[String]) {
        if let Ok(mut s) = self.state.lock() {
            for n in names {
                if let Some(p) = s.pools.get_mut(n) {
                    p.wanted = true;
                }
            }
        }
        self.demand.notify_one();
    }

    /// Whether jobs wait for permits of a concurrency limit (not tokens).
    fn permits_wanted(&self) -> bool {
        self.state
            .lock()
            .map(|s| s.pools.values().any(|p| p.wanted && p.granted.is_some()))
            .unwrap_or(false)
    }

    /// A receiver that sees a change whenever permits were granted or
    /// given back on this node.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// How many permits of `name` this node may use now (granted and
    /// valid), for status and tests; `None` when not declared or unlimited.
    pub(crate) fn granted(&self, name: &str) -> Option<u32> {
        let s = self.state.lock().ok()?;
        let p = s.pools.get(name)?;
        if Instant::now() >= p.valid_until {
            return Some(0);
        }
        p.granted
    }

    /// Ends this node's leases in the master (a clean shutdown, once its
    /// runs ended); bounded by `timeout`, else they run out by themselves.
    pub(crate) async fn end(&self, node: &str, timeout: Duration) {
        match tokio::time::timeout(timeout, store::resource_leases_end(&self.master, node)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %ErrorChain(&e), "ending resource leases failed; they expire by themselves")
            }
            Err(_) => tracing::warn!("ending resource leases did not answer; they expire by themselves"),
        }
    }

    /// Takes tokens of the rated resources whose jobs wait for them: a
    /// tenth of a second's worth (at least 1) per resource, usable for
    /// [`TOKENS_LAST`]. One statement per resource on the master.
    /// Returns when to try again for a bucket that was empty.
    async fn tokens_round(&self) -> sqlx::Result<Option<Duration>> {
        let asks: Vec<(String, u32)> = {
            let Ok(s) = self.state.lock() else {
                return Ok(None);
            };
            let now = Instant::now();
            s.pools
                .iter()
                .filter(|(_, p)| p.rated && p.wanted && (p.tokens == 0 || now >= p.tokens_until))
                .map(|(n, p)| (n.clone(), p.batch_tokens))
                .collect()
        };
        let mut got = false;
        let mut retry = None;
        for (name, want) in asks {
            let granted = store::resource_tokens_take(&self.master, &name, want as i32).await?;
            if let (Some(g), Ok(mut s)) = (granted, self.state.lock()) {
                if let Some(p) = s.pools.get_mut(&name) {
                    if g > 0 {
                        p.tokens = g as u32;
                        p.tokens_until = Instant::now() + TOKENS_LAST;
                        p.wanted = false;
                        got = true;
                    } else {
                        // Empty: one batch refills in a tenth of a second.
                        retry = Some(Duration::from_millis(100));
                    }
                }
            }
        }
        if got {
            self.changed.send_modify(|v| *v = v.wrapping_add(1));
        }
        Ok(retry)
    }

    /// One lease round: reads the declared resources and sets this node's
    /// lease of each to what its runs hold, plus what its buffered jobs
    /// wait for or, when more, a batch (a quarter of the resource's
    /// concurrency, at least 1) when jobs waited for permits.
    async fn lease_round(&self, node: &str, lease: Duration, heartbeat: Duration) -> sqlx::Result<()> {
        let declared = store::resources_list(&self.master).await?;
        // What to ask for, shrinking the local grant first.
        let mut asks: Vec<(String, Option<i32>, u32)> = Vec::new();
        {
            let Ok(mut s) = self.state.lock() else {
                return Ok(());
            };
            s.pools.retain(|name, _| declared.iter().any(|d| &d.name == name));
            for d in &declared {
                let pool = s.pools.entry(d.name.clone()).or_insert(Pool {
                    granted: Some(0),
                    in_use: 0,
                    queued: 0,
                    valid_until: Instant::now(),
                    wanted: false,
                    rated: false,
                    tokens: 0,
                    tokens_until: Instant::now(),
                    batch_tokens: 1,
                });
                pool.rated = d.rate.is_some();
                pool.batch_tokens = d.rate.map_or(1, |r| (r / 10.0).ceil().max(1.0) as u32);
                let want = match d.concurrency {
                    None => None,
                    Some(c) => {
                        let c = c.max(0) as u32;
                        let extra = if pool.wanted { c.div_ceil(4).max(1) } else { 0 };
                        Some((pool.in_use + pool.queued.max(extra)).min(c))
                    }
                };
                if let (Some(w), Some(g)) = (want, pool.granted) {
                    if w < g {
                        pool.granted = Some(w);
                    }
                }
                if !pool.rated {
                    pool.wanted = false;
                }
                asks.push((d.name.clone(), d.concurrency, want.unwrap_or(0)));
            }
        }
        let mut grew = false;
        for (name, concurrency, want) in asks {
            let sent_at = Instant::now();
            let valid_until = sent_at + lease.saturating_sub(heartbeat);
            let granted = match concurrency {
                None => None,
                Some(_) => store::resource_lease(&self.master, &name, node, want as i32, lease.as_secs_f64())
                    .await?
                    .map(|g| g.max(0) as u32),
            };
            if let Ok(mut s) = self.state.lock() {
                if let Some(p) = s.pools.get_mut(&name) {
                    grew |= match (p.granted, granted) {
                        (Some(old), Some(new)) => new > old,
                        (Some(_), None) => true,
                        _ => false,
                    };
                    p.granted = granted;
                    p.valid_until = valid_until;
                }
            }
        }
        if grew {
            self.changed.send_modify(|v| *v = v.wrapping_add(1));
        }
        Ok(())
    }
}

/// The leaser: a lease round every `heartbeat`, or at once (at most every
/// 20 ms) when a producer saw jobs waiting for permits, until `stop` (the
/// end of shutdown, once every run ended: the leases cover the runs of the
/// grace period).
pub(crate) async fn run(
    permits: std::sync::Arc<Permits>,
    node: String,
    lease: Duration,
    heartbeat: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut next_beat = Instant::now();
    loop {
        if Instant::now() >= next_beat {
            next_beat = Instant::now() + heartbeat;
            if let Err(e) = permits.lease_round(&node, lease, heartbeat).await {
                tracing::warn!(error = %ErrorChain(&e), "leasing resource permits failed; trying again at the next beat");
            }
        }
        let retry = match permits.tokens_round().await {
            Ok(retry) => retry,
            Err(e) => {
                tracing::warn!(error = %ErrorChain(&e), "taking resource tokens failed; trying again");
                Some(Duration::from_millis(100))
            }
        };
        let until = retry.map_or(next_beat, |r| next_beat.min(Instant::now() + r));
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep_until(until) => {}
            _ = permits.demand.notified() => {
                // Demand of a concurrency limit waits for the next lease
                // round unless this one is soon; tokens are asked for now.
                tokio::time::sleep(Duration::from_millis(10)).await;
                if permits.permits_wanted() {
                    next_beat = next_beat.min(Instant::now() + Duration::from_millis(10));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Permits with one resource `api` granted `granted` permits, no master.
    fn granted(granted: u32) -> Permits {
        let master = Database {
            name: "master".into(),
            pool: sqlx::postgres::PgPoolOptions::new()
                .connect_lazy("postgres://127.0.0.1:1/none")
                .unwrap(),
            target: "127.0.0.1:1".into(),
            pooler: shardq_router::config::Pooler::None,
            direct: None,
        };
        let permits = Permits::new(master);
        let pool = Pool {
            granted: Some(granted),
            in_use: 0,
            queued: 0,
            valid_until: Instant::now() + Duration::from_secs(60),
            wanted: false,
            rated: false,
            tokens: 0,
            tokens_until: Instant::now(),
            batch_tokens: 1,
        };
        permits.state.lock().unwrap().pools.insert("api".into(), pool);
        permits
    }

    #[tokio::test]
    async fn jobs_are_claimed_ahead_of_the_permits_and_start_as_they_free() {
        let p = granted(2);
        let api = vec!["api".to_string()];
        assert_eq!(p.claimable(), (api.clone(), 4), "twice the grant may be claimed");
        for id in 1..=4 {
            p.claimed((0, id, 1), api.clone());
        }
        assert_eq!(p.claimable().1, 0, "running and buffered at twice the grant");
        let mut changed = p.subscribe();
        assert!(p.start((0, 1, 1)) && p.start((0, 2, 1)), "two start on the grant");
        assert!(!p.start((0, 3, 1)), "the third waits for a permit");
        assert!(p.start((0, 9, 1)), "a job of no resource always starts");
        p.unstart((0, 2, 1));
        assert!(p.start((0, 3, 1)), "a permit given back by unstart is taken");
        p.release((0, 1, 1));
        assert!(
            changed.has_changed().unwrap(),
            "a permit given back is seen by the producers"
        );
        changed.borrow_and_update();
        assert!(p.start((0, 4, 1)), "the freed permit starts a buffered job");
        assert!(!p.start((0, 2, 1)));
        p.release((0, 2, 1));
        assert!(
            !changed.has_changed().unwrap(),
            "handing back a waiting job frees no permit"
        );
        assert_eq!(p.claimable().1, 2, "two run, none waits: two more may be claimed");
        assert!(p.overdue(0).is_empty());
    }
}
