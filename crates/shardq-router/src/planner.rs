//! The rebalance planner: which accounts to move, from where to where, so
//! that every shard carries about its weight's share of the load. Pure (no
//! database): the caller measures the load of each account (one each, its
//! jobs, or its bytes) and runs the moves.
//!
//! Rules:
//! - A shard's role decides what the plan may do with it: a [`Role::Target`]
//!   (weight > 0, accepting new accounts) gets its weight's share of the
//!   load; a [`Role::Empty`] shard (draining) gives away every unpinned
//!   account; a [`Role::Keep`] shard (weight 0, or not migrated) keeps what
//!   it has and receives nothing.
//! - Pinned accounts never move; their load counts where they are.
//! - An account moves at most once per plan. The accounts of an emptied
//!   shard go first, largest first, each to the target shard furthest below
//!   its share; then, while a target shard is above its share by more than
//!   the tolerance (or one below it by more), the account of the shard
//!   furthest above whose move to the shard furthest below lowers the
//!   total distance from the shares the most is moved.
//!   A move that would not lower that distance is never planned, so the
//!   plan ends.
//! - Deterministic: the same input gives the same plan (shards and
//!   accounts are ordered by name; ties are broken by name).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// What a plan may do with a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Receives and gives accounts to reach its weight's share.
    Target,
    /// Gives away every unpinned account, receives none (a draining shard).
    Empty,
    /// Neither gives nor receives (weight 0, or a schema behind this
    /// version).
    Keep,
}

/// A shard as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanShard {
    /// Its name.
    pub name: String,
    /// Its weight in shards.toml (its share among the target shards).
    pub weight: u32,
    /// What the plan may do with it.
    pub role: Role,
}

/// An account as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanAccount {
    /// The account.
    pub account: String,
    /// The shard it lives on.
    pub shard: String,
    /// Its load in the plan's unit (1, its jobs, its bytes).
    pub load: u64,
    /// Pinned accounts never move.
    pub pinned: bool,
}

/// One planned move.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PlannedMove {
    /// The account.
    pub account: String,
    /// The shard it leaves.
    pub from: String,
    /// The shard it goes to.
    pub to: String,
    /// Its load in the plan's unit (its estimated size with `bytes`).
    pub load: u64,
}

/// A shard's load before and after the plan, and its share.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ShardShare {
    /// The shard.
    pub shard: String,
    /// Its load now.
    pub before: u64,
    /// Its load once the plan ran.
    pub after: u64,
    /// Its weight's share of the load (0 for an emptied shard; for a kept
    /// shard, what it has).
    pub target: f64,
}

/// The moves that even the load, and the shards' loads around them.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Plan {
    /// The moves, in the order they were planned.
    pub moves: Vec<PlannedMove>,
    /// Every shard, in name order.
    pub shards: Vec<ShardShare>,
}

/// Default tolerance: a target shard within 5 % of its share is left alone.
pub const DEFAULT_TOLERANCE: f64 = 0.05;

/// Plans the moves that bring every target shard within `tolerance` (a
/// fraction of its share, e.g. 0.05) of its weight's share of the load, with
/// few moves. Accounts on shards missing from `shards` are left alone.
pub fn plan(shards: &[PlanShard], accounts: &[PlanAccount], tolerance: f64) -> Plan {
    let mut shards: Vec<&PlanShard> = shards.iter().collect();
    shards.sort_by(|a, b| a.name.cmp(&b.name));
    let role = |name: &str| shards.iter().find(|s| s.name == name).map(|s| s.role);
    let mut load: BTreeMap<&str, u64> = shards.iter().map(|s| (s.name.as_str(), 0)).collect();
    for a in accounts {
        if let Some(l) = load.get_mut(a.shard.as_str()) {
            *l += a.load;
        }
    }
    let before = load.clone();
    let targets: Vec<&PlanShard> = shards
        .iter()
        .copied()
        .filter(|s| s.role == Role::Target && s.weight > 0)
        .collect();
    let weights: u64 = targets.iter().map(|s| u64::from(s.weight)).sum();
    // The load the target shards share: theirs, plus what emptied shards give.
    let shared: u64 = accounts
        .iter()
        .filter(|a| match role(&a.shard) {
            Some(Role::Target) => true,
            Some(Role::Empty) => !a.pinned,
            _ => false,
        })
        .map(|a| a.load)
        .sum();
    let share: BTreeMap<&str, f64> = targets
        .iter()
        .map(|s| {
            let t = if weights == 0 {
                0.0
            } else {
                shared as f64 * f64::from(s.weight) / weights as f64
            };
            (s.name.as_str(), t)
        })
        .collect();
    // Candidates, largest first, then by name.
    let mut movable: Vec<&PlanAccount> = accounts.iter().filter(|a| !a.pinned).collect();
    movable.sort_by(|a, b| b.load.cmp(&a.load).then_with(|| a.account.cmp(&b.account)));
    let mut moved: HashSet<&str> = HashSet::new();
    let mut moves = Vec::new();
    let deficit = |load: &BTreeMap<&str, u64>, s: &str| share[s] - load[s] as f64;
    // The target shard furthest below its share (ties: by name).
    let neediest = |load: &BTreeMap<&str, u64>| -> Option<&str> {
        let mut best: Option<(&str, f64)> = None;
        for s in share.keys() {
            let d = deficit(load, s);
            if best.is_none_or(|(_, bd)| d > bd) {
                best = Some((s, d));
            }
        }
        best.map(|(s, _)| s)
    };

    // 1. Empty the draining shards.
    if !share.is_empty() {
        for a in movable.iter().filter(|a| role(&a.shard) == Some(Role::Empty)) {
            let Some(to) = neediest(&load) else { break };
            if let Some(l) = load.get_mut(a.shard.as_str()) {
                *l -= a.load;
            }
            if let Some(l) = load.get_mut(to) {
                *l += a.load;
            }
            moved.insert(a.account.as_str());
            moves.push(PlannedMove {
                account: a.account.clone(),
                from: a.shard.clone(),
                to: to.to_string(),
                load: a.load,
            });
        }
    }

    // 2. Even the target shards. Candidates per target shard, by load and
    // then by rank in `movable` (reversed, so that the greatest key of a
    // load is the first account of that load by name).
    let rank_of: HashMap<&str, usize> = movable
        .iter()
        .enumerate()
        .map(|(i, a)| (a.account.as_str(), i))
        .collect();
    let mut candidates: BTreeMap<&str, BTreeSet<(u64, Reverse<usize>)>> = BTreeMap::new();
    for (i, a) in movable.iter().enumerate() {
        if share.contains_key(a.shard.as_str()) && !moved.contains(a.account.as_str()) {
            candidates
                .entry(a.shard.as_str())
                .or_default()
                .insert((a.load, Reverse(i)));
        }
    }
    loop {
        // The target shard furthest above its share and the one furthest
        // below; go on while either is beyond the tolerance.
        let mut over: Option<(&str, f64)> = None;
        for (s, t) in &share {
            let excess = load[s] as f64 - t;
            if over.is_none_or(|(_, e)| excess > e) {
                over = Some((s, excess));
            }
        }
        let Some((from, excess)) = over else { break };
        let Some(to) = neediest(&load) else { break };
        if to == from {
            break;
        }
        let short = deficit(&load, to);
        if excess <= tolerance * share[from] && short <= tolerance * share[to] {
            break;
        }
        let Some(a) = pick(candidates.get(from), excess, short).map(|rank| movable[rank]) else {
            break;
        };
        if let Some(c) = candidates.get_mut(from) {
            c.remove(&(a.load, Reverse(rank_of[a.account.as_str()])));
        }
        if let Some(l) = load.get_mut(from) {
            *l -= a.load;
        }
        if let Some(l) = load.get_mut(to) {
            *l += a.load;
        }
        moved.insert(a.account.as_str());
        moves.push(PlannedMove {
            account: a.account.clone(),
            from: from.to_string(),
            to: to.to_string(),
            load: a.load,
        });
    }

    let shards = shards
        .iter()
        .map(|s| {
            let name = s.name.as_str();
            ShardShare {
                shard: s.name.clone(),
                before: before[name],
                after: load[name],
                target: match s.role {
                    Role::Target => share.get(name).copied().unwrap_or(0.0),
                    Role::Empty => (load[name]) as f64,
                    Role::Keep => before[name] as f64,
                },
            }
        })
        .collect();
    Plan { moves, shards }
}

/// The candidate (its rank) whose move from a shard `excess` above its
/// share to one `short` below lowers the sum of both distances the most;
/// `None` when no move lowers it. Moving `x` lowers it by `2x` up to
/// `min(excess, short)`, by `2 min` between the two, and by
/// `2 (excess + short - x)` beyond the larger: so the best is the largest
/// load not above the larger, unless that one is below the smaller and the
/// smallest load above the larger gains more. Among equal loads, the first
/// by name.
fn pick(candidates: Option<&BTreeSet<(u64, Reverse<usize>)>>, excess: f64, short: f64) -> Option<usize> {
    let candidates = candidates?;
    if excess <= 0.0 || short <= 0.0 {
        return None;
    }
    let (lo, hi) = (excess.min(short), excess.max(short));
    let cap = hi.floor() as u64;
    let below = candidates.range(..=(cap, Reverse(0))).next_back().copied();
    if let Some((x, Reverse(rank))) = below {
        if x as f64 >= lo {
            return Some(rank);
        }
    }
    let above = candidates
        .range((cap.saturating_add(1), Reverse(usize::MAX))..)
        .next()
        .and_then(|(x, _)| candidates.range(..=(*x, Reverse(0))).next_back().copied());
    let gain_below = below.map(|(x, _)| 2.0 * x as f64).unwrap_or(0.0);
    let gain_above = above.map(|(x, _)| 2.0 * (excess + short - x as f64)).unwrap_or(0.0);
    if gain_below <= 1e-9 && gain_above <= 1e-9 {
        None
    } else if gain_below >= gain_above {
        below.map(|(_, Reverse(r))| r)
    } else {
        above.map(|(_, Reverse(r))| r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(name: &str, weight: u32, role: Role) -> PlanShard {
        PlanShard {
            name: name.into(),
            weight,
            role,
        }
    }

    fn accounts(shard: &str, n: usize, load: u64) -> Vec<PlanAccount> {
        (0..n)
            .map(|i| PlanAccount {
                account: format!("{shard}-a{i:03}"),
                shard: shard.into(),
                load,
                pinned: false,
            })
            .collect()
    }

    fn after(plan: &Plan, shard: &str) -> u64 {
        plan.shards
            .iter()
            .find(|s| s.shard == shard)
            .map(|s| s.after)
            .unwrap_or(0)
    }

    #[test]
    fn a_new_shard_gets_its_share_from_the_others() {
        let shards = [
            shard("s1", 1, Role::Target),
            shard("s2", 1, Role::Target),
            shard("s3", 1, Role::Target),
            shard("s4", 1, Role::Target),
        ];
        let mut all = accounts("s1", 40, 1);
        all.extend(accounts("s2", 40, 1));
        all.extend(accounts("s3", 40, 1));
        let p = plan(&shards, &all, 0.0);
        for s in ["s1", "s2", "s3", "s4"] {
            assert_eq!(after(&p, s), 30, "{s}: {p:?}");
        }
        assert_eq!(p.moves.len(), 30, "only what the new shard needs moves");
        assert!(p.moves.iter().all(|m| m.to == "s4"));
        // With a tolerance, every shard ends within it, in fewer moves.
        let p = plan(&shards, &all, 0.1);
        for s in ["s1", "s2", "s3", "s4"] {
            assert!(after(&p, s).abs_diff(30) <= 3, "{s}: {p:?}");
        }
        assert!(p.moves.len() <= 30);
    }

    #[test]
    fn weights_set_the_shares() {
        let shards = [shard("a", 1, Role::Target), shard("b", 3, Role::Target)];
        let p = plan(&shards, &accounts("a", 100, 1), 0.0);
        assert_eq!((after(&p, "a"), after(&p, "b")), (25, 75));
    }

    #[test]
    fn pinned_accounts_never_move() {
        let shards = [shard("a", 1, Role::Target), shard("b", 1, Role::Target)];
        let mut all = accounts("a", 10, 1);
        for a in &mut all {
            a.pinned = true;
        }
        let p = plan(&shards, &all, 0.0);
        assert!(p.moves.is_empty(), "{p:?}");
        all[0].pinned = false;
        all[1].pinned = false;
        let p = plan(&shards, &all, 0.0);
        let moved: Vec<&str> = p.moves.iter().map(|m| m.account.as_str()).collect();
        assert_eq!(moved, ["a-a000", "a-a001"]);
    }

    #[test]
    fn a_draining_shard_is_emptied_of_unpinned_accounts_only() {
        let shards = [
            shard("a", 1, Role::Target),
            shard("b", 1, Role::Target),
            shard("d", 1, Role::Empty),
        ];
        let mut all = accounts("d", 9, 1);
        all[4].pinned = true;
        all.extend(accounts("a", 4, 1));
        let p = plan(&shards, &all, DEFAULT_TOLERANCE);
        assert_eq!(after(&p, "d"), 1, "the pinned account stays");
        assert_eq!(after(&p, "a") + after(&p, "b"), 12);
        assert!(after(&p, "a").abs_diff(after(&p, "b")) <= 1, "{p:?}");
        assert!(p.moves.iter().all(|m| m.to != "d"));
        assert!(!p.moves.iter().any(|m| m.account == "d-a004"));
    }

    #[test]
    fn kept_shards_neither_give_nor_receive() {
        let shards = [
            shard("a", 1, Role::Target),
            shard("b", 1, Role::Target),
            shard("k", 0, Role::Keep),
        ];
        let mut all = accounts("a", 10, 1);
        all.extend(accounts("k", 10, 1));
        let p = plan(&shards, &all, DEFAULT_TOLERANCE);
        assert_eq!((after(&p, "a"), after(&p, "b"), after(&p, "k")), (5, 5, 10));
    }

    #[test]
    fn big_accounts_move_whole_and_the_plan_stops_when_no_move_helps() {
        // One account of 100 and ten of 1 on `a`; `b` empty: moving the big
        // one overshoots (b 100, a 10 vs shares 55): still better than now.
        let shards = [shard("a", 1, Role::Target), shard("b", 1, Role::Target)];
        let mut all = accounts("a", 10, 1);
        all.push(PlanAccount {
            account: "big".into(),
            shard: "a".into(),
            load: 100,
            pinned: false,
        });
        let p = plan(&shards, &all, DEFAULT_TOLERANCE);
        let total: u64 = p.shards.iter().map(|s| s.after).sum();
        assert_eq!(total, 110);
        let distance: f64 = p.shards.iter().map(|s| (s.after as f64 - s.target).abs()).sum();
        assert!(distance < 110.0, "{p:?}");
        let mut seen = HashSet::new();
        assert!(
            p.moves.iter().all(|m| seen.insert(m.account.clone())),
            "an account moves once"
        );
    }

    #[test]
    fn a_balanced_fleet_needs_no_moves_and_plans_are_deterministic() {
        let shards = [shard("a", 1, Role::Target), shard("b", 1, Role::Target)];
        let mut all = accounts("a", 5, 1);
        all.extend(accounts("b", 6, 1));
        assert!(plan(&shards, &all, DEFAULT_TOLERANCE).moves.is_empty());
        let mut uneven = accounts("a", 17, 3);
        uneven.extend(accounts("b", 2, 7));
        let first = plan(&shards, &uneven, DEFAULT_TOLERANCE);
        uneven.reverse();
        let mut reordered = shards.to_vec();
        reordered.reverse();
        assert_eq!(first, plan(&reordered, &uneven, DEFAULT_TOLERANCE));
    }
}
