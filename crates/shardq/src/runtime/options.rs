//! [`RuntimeOptions`]: a worker node's tunables with their defaults and
//! `validate()`, and the retry [`Backoff`]. Read by every stage through
//! `Node::options`; set once by `RuntimeBuilder::options`.

use std::time::Duration;

use rand::Rng;

use crate::error::{Error, Result};

/// Tunables of a worker node. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Fallback poll of each producer, jittered ±10 % (default 1 s).
    pub poll_interval: Duration,
    /// Least time from the start of a fetch that came back short (the
    /// queue had no more due jobs for it) to the start of the next fetch of
    /// the same producer; wake-ups inside it coalesce into one fetch. A
    /// fetch that took longer than this is followed at once by the next
    /// wake-up; one that came back full is followed at once (default 0.5 ms).
    pub fetch_cooldown: Duration,
    /// Most jobs one fetch claims (default 1,000; free slots bound it too).
    pub max_batch: usize,
    /// How long a fetched job's lease lasts without renewal (default 30 s).
    pub lease: Duration,
    /// How often leases are renewed (default 10 s; must be under `lease`).
    pub heartbeat_interval: Duration,
    /// How often each shard is checked for expired leases (default 15 s, jittered).
    pub rescue_interval: Duration,
    /// Retry delays after failures.
    pub backoff: Backoff,
    /// This node's id (default `host-pid-random`).
    pub node_id: Option<String>,
    /// How long completed jobs are kept before the pruner deletes them (default 24 h).
    pub retain_completed: Duration,
    /// How long cancelled jobs are kept, with their errors (default 7 days).
    pub retain_cancelled: Duration,
    /// How long discarded jobs are kept, with their errors (default 7 days).
    pub retain_discarded: Duration,
    /// How often each shard's pruner deletes jobs past their retention
    /// (default 60 s, jittered ±20 %).
    pub prune_interval: Duration,
    /// Longest a producer waits on its shard for a connection or a claim
    /// before it counts the shard as failing (default 10 s). A shard that
    /// stopped answering (frozen, or cut off without a reset) costs this
    /// long per try, and holds none of the node's slots meanwhile.
    pub shard_timeout: Duration,
    /// Connections the engine opens per shard, apart from the router's pool
    /// that handlers use (default: the number of queues + 4, i.e. one per
    /// producer, the completer, the heartbeat, the notifier's LISTEN and one
    /// shared by rescuer, pruner, cancel sweeper and sampler). A node's
    /// budget per shard is this plus the shard's `pool.max_connections`.
    pub engine_connections: Option<u32>,
    /// Priority aging: a job due for longer than this is claimed ahead of
    /// younger jobs of any priority, oldest first, so a steady stream of
    /// higher-priority jobs cannot starve lower ones (default 5 min; `None`:
    /// strict priority order).
    pub priority_aging: Option<Duration>,
    /// How many live nodes work each shard (default 3; 0: every node works
    /// every shard, without the node registry). Each node registers in the
    /// master and works only the shards that rendezvous hashing over the
    /// live nodes gives it, so with at most this many nodes every node works
    /// every shard (as without ownership), and with more a node connects to
    /// about `shards × nodes_per_shard / nodes` shards. See `runtime::fleet`.
    pub nodes_per_shard: usize,
    /// How often this node renews its entry in the master's node registry
    /// and recomputes which shards it owns (default 2 s). An entry not
    /// renewed for three of these is gone: its shards go to other nodes.
    pub fleet_heartbeat: Duration,
    /// How long a shard this node stops owning lets its running jobs finish
    /// before handing the rest back (default 10 s).
    pub handover_grace: Duration,
    /// Queues that opt out of fair share and take due jobs in strict
    /// priority then run order, whichever account they belong to (strict
    /// FIFO across accounts). Every other queue's claims share due jobs
    /// fairly across accounts, weighted by `Client::set_account_weight`
    /// (README, "Fair scheduling"). Default: none.
    pub strict_queues: Vec<String>,
    /// Adaptive concurrency (default `None`: off): the queues it names are
    /// sized between a least limit and their configured one from what
    /// their runs show (handler latency against its best, failures, whether
    /// claimed jobs wait for slots). See [`AdaptiveConcurrency`].
    pub adaptive: Option<AdaptiveConcurrency>,
}

/// Adaptive concurrency for some queues of a node: a gradient limiter (see
/// `runtime::adaptive`) moves each queue's limit between `min` and the
/// limit the queue was given (`RuntimeBuilder::queue`), starting at `min`.
/// Fast handlers with a backlog raise it to that limit; handlers that get
/// slower when more run at once (a contended lock, pool or provider) bring
/// it down to where they keep their pace; a window where more than a
/// quarter of the runs failed cuts it to 0.8 of itself. Its decisions show
/// as the gauge `shardq_queue_concurrency{queue}`, in `Runtime::concurrency`
/// and in `shardq status` (the node's queues).
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveConcurrency {
    /// The queues sized adaptively (empty: every queue of the node).
    pub queues: Vec<String>,
    /// Least limit of each (default 1; at most the queue's limit).
    pub min: usize,
    /// Shortest stretch of ended runs judged at once (default 1 s; a window
    /// also waits for at least 4 runs).
    pub window: Duration,
    /// How much slower than its best a window's mean handler latency may
    /// be before the limit comes down (default 1.5, at least 1).
    pub tolerance: f64,
}

impl Default for AdaptiveConcurrency {
    fn default() -> Self {
        AdaptiveConcurrency {
            queues: Vec::new(),
            min: 1,
            window: Duration::from_secs(1),
            tolerance: 1.5,
        }
    }
}

impl AdaptiveConcurrency {
    /// Whether `queue` is sized adaptively.
    pub fn covers(&self, queue: &str) -> bool {
        self.queues.is_empty() || self.queues.iter().any(|q| q == queue)
    }
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            poll_interval: Duration::from_secs(1),
            fetch_cooldown: Duration::from_micros(500),
            max_batch: 1_000,
            lease: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(10),
            rescue_interval: Duration::from_secs(15),
            backoff: Backoff::default(),
            node_id: None,
            retain_completed: Duration::from_secs(24 * 3600),
            retain_cancelled: Duration::from_secs(7 * 24 * 3600),
            retain_discarded: Duration::from_secs(7 * 24 * 3600),
            prune_interval: Duration::from_secs(60),
            shard_timeout: Duration::from_secs(10),
            engine_connections: None,
            priority_aging: Some(Duration::from_secs(300)),
            nodes_per_shard: 3,
            fleet_heartbeat: Duration::from_secs(2),
            handover_grace: Duration::from_secs(10),
            strict_queues: Vec::new(),
            adaptive: None,
        }
    }
}

impl RuntimeOptions {
    /// Checks the options; messages name the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Runtime(m.to_string()));
        if self.poll_interval.is_zero() {
            return bad("poll_interval must be more than 0");
        }
        if self.max_batch == 0 {
            return bad("max_batch must be at least 1");
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval >= self.lease {
            return bad("heartbeat_interval must be more than 0 and less than lease");
        }
        if self.rescue_interval.is_zero() {
            return bad("rescue_interval must be more than 0");
        }
        if self.prune_interval.is_zero() {
            return bad("prune_interval must be more than 0");
        }
        if self.engine_connections.is_some_and(|n| n < 2) {
            return bad("engine_connections must be at least 2 (the LISTEN connection and one more)");
        }
        if self.shard_timeout.is_zero() {
            return bad("shard_timeout must be more than 0");
        }
        if self.fleet_heartbeat.is_zero() {
            return bad("fleet_heartbeat must be more than 0");
        }
        if let Some(a) = &self.adaptive {
            if a.min == 0 {
                return bad("adaptive.min must be at least 1");
            }
            if a.window.is_zero() {
                return bad("adaptive.window must be more than 0");
            }
            if !(a.tolerance.is_finite() && a.tolerance >= 1.0) {
                return bad("adaptive.tolerance must be a number of at least 1");
            }
        }
        Ok(())
    }
}

impl RuntimeOptions {
    /// How long a node's registry entry lives without renewal: three
    /// `fleet_heartbeat`s.
    pub fn node_ttl(&self) -> Duration {
        self.fleet_heartbeat * 3
    }
}

/// Retry backoff: `base · 2^(attempt-1)`, capped at `max`, ±20 % jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Delay after the first failure.
    pub base: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(3600),
        }
    }
}

impl Backoff {
    /// The delay before the run after failed attempt `attempt` (from 1).
    pub fn delay(&self, attempt: i32) -> Duration {
        let exp = attempt.clamp(1, 31) as u32 - 1;
        let d = self.base.saturating_mul(2u32.saturating_pow(exp)).min(self.max);
        d.mul_f64(rand::rng().random_range(0.8..1.2))
    }
}
