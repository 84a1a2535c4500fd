//! The consistent-hash ring that *proposes* a shard for an account seen for
//! the first time (the master's placement table decides and remembers).
//!
//! Stability: positions are xxh3-64 of explicit little-endian bytes, never
//! std's `Hash` byte stream. The ring is given precomputed `u64` keys and a
//! [`RingHash`] that captures the `u64` instead of rehashing it, so neither
//! Rust releases nor `usize` width nor endianness can move an account.
//! Golden vectors in the tests pin the mapping.

use std::hash::{Hash, Hasher};

use consistent_hash::{Node, RingHash, StaticHashRing};
use xxhash_rust::xxh3::xxh3_64;

/// Virtual nodes per unit of weight.
pub const VNODES_PER_WEIGHT: usize = 128;

/// Position of an account on the ring: xxh3-64 of its UTF-8 bytes.
pub fn account_position(account: &str) -> u64 {
    xxh3_64(account.as_bytes())
}

/// Identity of a shard on the ring: xxh3-64 of its name's UTF-8 bytes.
fn shard_key(name: &str) -> u64 {
    xxh3_64(name.as_bytes())
}

/// A `Hasher` that only accepts one `u64` and returns it unchanged.
#[derive(Default)]
struct Capture(u64);

impl Hasher for Capture {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached for non-u64 keys, which this module never passes;
        // hash them stably anyway rather than panic.
        self.0 = xxh3_64(bytes);
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Hashes precomputed `u64` positions: items map to themselves, virtual node
/// `seq` of a shard maps to xxh3-64 of `shard_key ‖ seq` (both little-endian u64).
struct FixedHash;

impl RingHash for FixedHash {
    fn hash_item<T: Hash>(&self, item: &T) -> u64 {
        let mut h = Capture::default();
        item.hash(&mut h);
        h.finish()
    }

    fn hash_vnode<K: Hash>(&self, node_key: &K, vnode_seq: usize) -> u64 {
        let key = self.hash_item(node_key);
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&key.to_le_bytes());
        bytes[8..].copy_from_slice(&(vnode_seq as u64).to_le_bytes());
        xxh3_64(&bytes)
    }
}

/// The ring over the shards that accept new accounts (weight > 0).
pub struct Ring {
    ring: StaticHashRing<'static, u64, String, FixedHash>,
}

impl Ring {
    /// Builds the ring from `(shard name, weight)` pairs; shards with weight 0 are left out.
    pub fn new<'a>(shards: impl IntoIterator<Item = (&'a str, u32)>) -> Ring {
        let nodes = shards.into_iter().filter(|(_, w)| *w > 0).map(|(name, w)| {
            Node::new(shard_key(name))
                .value(name.to_string())
                .quantity(w as usize * VNODES_PER_WEIGHT)
        });
        Ring {
            ring: StaticHashRing::new(FixedHash, nodes),
        }
    }

    /// The shard proposed for `account`, or `None` when no shard has weight > 0.
    pub fn propose(&self, account: &str) -> Option<&str> {
        self.ring
            .calc_candidates(&account_position(account))
            .next()
            .map(|n| n.value.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Ring {
        Ring::new([("shard_1", 1), ("shard_2", 1), ("shard_3", 1)])
    }

    #[test]
    fn golden_vectors_pin_the_mapping() {
        // If this test fails, an upgrade changed where new accounts go.
        let ring = three();
        let got: Vec<(&str, &str)> = [
            "1",
            "42",
            "acme",
            "8f14e45f-ceea-467f-a0e6-7b8e3c2f1d0a",
            "émile",
            "' OR 1=1; --",
        ]
        .iter()
        .map(|a| (*a, ring.propose(a).unwrap_or("-")))
        .collect();
        assert_eq!(got, GOLDEN);
    }

    const GOLDEN: [(&str, &str); 6] = [
        ("1", "shard_2"),
        ("42", "shard_3"),
        ("acme", "shard_2"),
        ("8f14e45f-ceea-467f-a0e6-7b8e3c2f1d0a", "shard_1"),
        ("émile", "shard_3"),
        ("' OR 1=1; --", "shard_1"),
    ];

    #[test]
    fn positions_are_xxh3_of_the_bytes() {
        // Pins the hash function itself, independent of the ring.
        assert_eq!(account_position("acme"), 4948779126678378721);
        assert_eq!(account_position(""), 0x2D06_8005_38D3_94C2); // the published XXH3-64 of the empty input
    }

    #[test]
    fn weights_share_new_accounts() {
        let ring = Ring::new([("a", 1), ("b", 3), ("z", 0)]);
        let mut counts = std::collections::HashMap::new();
        for i in 0..20_000 {
            *counts
                .entry(ring.propose(&i.to_string()).unwrap_or("-").to_string())
                .or_insert(0u32) += 1;
        }
        assert_eq!(counts.get("z"), None, "weight 0 takes no new accounts");
        let (a, b) = (counts["a"] as f64, counts["b"] as f64);
        assert!(
            (2.4..3.6).contains(&(b / a)),
            "b should get about 3x a's share: a={a} b={b}"
        );
    }

    #[test]
    fn adding_a_shard_moves_only_its_share() {
        let before = three();
        let after = Ring::new([("shard_1", 1), ("shard_2", 1), ("shard_3", 1), ("shard_4", 1)]);
        let moved = (0..10_000)
            .filter(|i| before.propose(&i.to_string()) != after.propose(&i.to_string()))
            .count();
        // About a quarter of *proposals* change; placements keep existing accounts put.
        assert!((1_800..3_200).contains(&moved), "moved {moved}");
        for i in 0..10_000 {
            let a = i.to_string();
            if before.propose(&a) != after.propose(&a) {
                assert_eq!(
                    after.propose(&a),
                    Some("shard_4"),
                    "a proposal may only move to the new shard"
                );
            }
        }
    }

    #[test]
    fn no_weight_no_proposal() {
        assert_eq!(Ring::new([("a", 0)]).propose("x"), None);
    }
}
