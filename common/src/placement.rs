//! Placement: which storage nodes hold a placement group, as a pure function of the cluster map.
//!
//! A chunk id hashes to a placement group ([`pg_of`]); a PG maps to an ordered acting set of
//! nodes ([`acting_set`]) by weighted rendezvous (HRW) hashing, spread across zones before nodes.
//! Every client and storage node computes the same answer from the same [`ClusterMap`], so
//! nothing here may depend on anything but its arguments: no randomness, no clock, no order of
//! `map.nodes`.
//!
//! Changing the hash inputs or the scoring moves (almost) every chunk in every cluster: treat it
//! like a stored format and pin it with the known-answer test below.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

/// Domain separation for the rendezvous hash, so its scores cannot collide with any other
/// blake3 use of the same bytes (and a later scheme can use a new tag).
const HRW_DOMAIN_V1: &[u8] = b"sov-placement-hrw-v1\0";

/// Whether a node takes part in placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Serving I/O.
    Up,
    /// Missing for a while: stays in acting sets (I/O goes around it) so a short outage moves
    /// no data.
    Down,
    /// Gone for good: excluded from placement, its PGs move to other nodes.
    Out,
}

/// One storage node as the cluster map knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Unique node id; it is part of the placement hash, so renaming a node moves its data.
    pub id: String,
    /// Availability zone; acting sets spread across zones before they double up in one.
    pub zone: String,
    /// Capacity in bytes; placement is proportional to it, and 0 takes nothing.
    pub weight: u64,
    /// Whether the node takes part in placement.
    pub state: NodeState,
}

impl NodeInfo {
    /// True when the node can be a member of an acting set: not `Out` and a non-zero weight.
    pub fn is_eligible(&self) -> bool {
        self.state != NodeState::Out && self.weight > 0
    }
}

/// The set of storage nodes at one epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// Version of the map in metad; a peer with an older epoch refreshes. Not a placement input.
    pub epoch: u64,
    /// Every known node, in no particular order.
    pub nodes: Vec<NodeInfo>,
}

/// A pool's redundancy profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Redundancy {
    /// `size` full copies.
    Replicated {
        /// Number of copies.
        size: u8,
    },
    /// Reed-Solomon erasure coding: `k` data shards and `m` parity shards.
    Ec {
        /// Data shards.
        k: u8,
        /// Parity shards.
        m: u8,
    },
}

impl Redundancy {
    /// Members of an acting set: `size` for replicas, `k + m` for erasure coding.
    pub fn width(&self) -> usize {
        match *self {
            Self::Replicated { size } => usize::from(size),
            Self::Ec { k, m } => usize::from(k) + usize::from(m),
        }
    }

    /// The fewest live members a write may land on: `size - 1` (at least 1) for replicas,
    /// `k + 1` for erasure coding.
    pub fn min_size(&self) -> usize {
        match *self {
            Self::Replicated { size } => usize::from(size.saturating_sub(1).max(1)),
            Self::Ec { k, .. } => usize::from(k) + 1,
        }
    }
}

impl fmt::Display for Redundancy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Replicated { size } => write!(f, "replicated{{{size}}}"),
            Self::Ec { k, m } => write!(f, "ec{{{k},{m}}}"),
        }
    }
}

/// Why a redundancy profile cannot be placed on a cluster.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// The profile cannot work on any cluster.
    #[error("{profile} is not a usable profile: {reason}")]
    InvalidProfile {
        /// The profile, as `replicated{3}` or `ec{4,2}`.
        profile: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The cluster has fewer eligible nodes than the profile has members.
    #[error("{profile} needs {needed} nodes, the cluster has {eligible} eligible")]
    NotEnoughNodes {
        /// The profile, as `replicated{3}` or `ec{4,2}`.
        profile: String,
        /// The profile's width.
        needed: usize,
        /// Distinct eligible nodes (not `Out`, weight > 0) in the map.
        eligible: usize,
    },
}

/// The placement group of a chunk: blake3 of the chunk id, reduced to `0..pg_count`.
///
/// Taking a `u64` from the hash modulo a `u32` leaves a bias below 2^-32, far under the noise.
///
/// # Panics
///
/// If `pg_count` is 0: a pool always has at least one PG.
pub fn pg_of(chunk_id: &[u8], pg_count: u32) -> u32 {
    assert!(pg_count > 0, "a pool has at least one placement group");
    let hash = blake3::hash(chunk_id);
    let pg = first_u64(hash.as_bytes()) % u64::from(pg_count);
    u32::try_from(pg).expect("a value modulo a u32 fits a u32")
}

/// The ordered acting set of PG `pg` in pool `pool_id`: distinct node ids, the first is the
/// primary, and position `i` holds replica or shard `i`.
///
/// At most `width` long; shorter only when the map has fewer eligible nodes. Members are
/// chosen by weighted rendezvous hashing, zone by zone: every zone first contributes its
/// best-scoring node (zones in the order of those scores), and a zone gets a second member
/// only once every zone has one, and so on. So with at least `width` zones no two members
/// share a zone, and removing a node changes only the sets it was in.
///
/// Scores use `f64::ln`; two hosts whose `ln` differs in the last bit could disagree only on
/// nodes whose scores agree to about 1e-16, which the 52-bit hash makes vanishingly rare.
pub fn acting_set(pool_id: u64, pg: u32, width: usize, map: &ClusterMap) -> Vec<String> {
    // One candidate per distinct id. A well-formed map has unique ids; if it does not, keep
    // the entry that ranks first so the answer still does not depend on the order of `nodes`
    // and no node can hold two members of one set.
    let mut by_id: BTreeMap<&str, Candidate<'_>> = BTreeMap::new();
    for node in map.nodes.iter().filter(|n| n.is_eligible()) {
        let candidate = Candidate {
            score: hrw_score(pool_id, pg, node),
            id: &node.id,
            zone: &node.zone,
        };
        by_id
            .entry(&node.id)
            .and_modify(|kept| {
                if candidate.rank(kept) == Ordering::Less {
                    *kept = candidate;
                }
            })
            .or_insert(candidate);
    }

    let mut zones: BTreeMap<&str, Vec<Candidate<'_>>> = BTreeMap::new();
    for candidate in by_id.into_values() {
        zones.entry(candidate.zone).or_default().push(candidate);
    }
    for members in zones.values_mut() {
        members.sort_by(Candidate::rank);
    }

    let mut set = Vec::with_capacity(width.min(map.nodes.len()));
    // Round r takes every zone's r-th best node, best first, until the set is full.
    for round in 0.. {
        if set.len() >= width {
            break;
        }
        let mut picks: Vec<&Candidate<'_>> = zones
            .values()
            .filter_map(|members| members.get(round))
            .collect();
        if picks.is_empty() {
            break;
        }
        picks.sort_by(|a, b| a.rank(b));
        let room = width - set.len();
        set.extend(picks.into_iter().take(room).map(|c| c.id.to_owned()));
    }
    set
}

/// Which node holds each position `0..width` of a PG whose acting set is `set`.
///
/// With a full set, position `i` is `set[i]`. A short set (fewer eligible nodes than the
/// profile is wide, e.g. a zone out) leaves the missing positions empty (`None`), except for
/// erasure coding when the set can still carry every shard with no node holding more than `m`
/// of one stripe: then positions wrap round the set (position `i` on `set[i % n]`), so the
/// stripe keeps full width and losing any one node still leaves `k` shards. This departs from
/// "one shard per node" only while the cluster is short of nodes (see ARCHITECTURE.md).
pub fn slots(r: &Redundancy, set: &[String]) -> Vec<Option<String>> {
    let width = r.width();
    let n = set.len();
    let wrap = match *r {
        Redundancy::Ec { m, .. } => n > 0 && n < width && width.div_ceil(n) <= usize::from(m),
        Redundancy::Replicated { .. } => false,
    };
    (0..width)
        .map(|i| {
            if wrap {
                Some(set[i % n].clone())
            } else {
                set.get(i).cloned()
            }
        })
        .collect()
}

/// Refuses a profile that cannot be placed on `map`: one that is unusable in itself, or one
/// wider than the number of eligible nodes.
///
/// A profile that fits but has fewer zones than members is accepted; [`zone_shortfall`] says
/// so for a warning.
pub fn check_profile(r: &Redundancy, map: &ClusterMap) -> Result<(), PlacementError> {
    let invalid = |reason| PlacementError::InvalidProfile {
        profile: r.to_string(),
        reason,
    };
    match *r {
        Redundancy::Replicated { size: 0 } => return Err(invalid("it keeps no copy")),
        Redundancy::Ec { k: 0, .. } => return Err(invalid("it has no data shard")),
        // min_size k + 1 cannot be met by k members.
        Redundancy::Ec { m: 0, .. } => return Err(invalid("it has no parity shard")),
        _ => {}
    }
    let eligible = eligible_ids(map).len();
    if eligible < r.width() {
        return Err(PlacementError::NotEnoughNodes {
            profile: r.to_string(),
            needed: r.width(),
            eligible,
        });
    }
    Ok(())
}

/// A warning when the map has fewer zones (with eligible nodes) than the profile has members:
/// then some PGs put two members in one zone, and losing that zone loses both.
pub fn zone_shortfall(r: &Redundancy, map: &ClusterMap) -> Option<String> {
    let zones: BTreeSet<&str> = map
        .nodes
        .iter()
        .filter(|n| n.is_eligible())
        .map(|n| n.zone.as_str())
        .collect();
    if zones.len() >= r.width() {
        return None;
    }
    Some(format!(
        "{r} has {} members but only {} zones have eligible nodes: some PGs keep two members \
         in one zone, and losing that zone loses both",
        r.width(),
        zones.len()
    ))
}

/// A node scored for one PG.
#[derive(Debug, Clone, Copy)]
struct Candidate<'a> {
    score: f64,
    id: &'a str,
    zone: &'a str,
}

impl Candidate<'_> {
    /// Best first: higher score, then (for an exact tie) the smaller id, then the smaller zone,
    /// so the order is total and does not depend on input order.
    fn rank(&self, other: &Self) -> Ordering {
        other
            .score
            .total_cmp(&self.score)
            .then_with(|| self.id.cmp(other.id))
            .then_with(|| self.zone.cmp(other.zone))
    }
}

/// Weighted rendezvous score of `node` for (`pool_id`, `pg`): `-weight / ln(u)` with `u`
/// uniform in (0, 1) from the hash. The best of several nodes is then each node's with
/// probability proportional to its weight.
fn hrw_score(pool_id: u64, pg: u32, node: &NodeInfo) -> f64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(HRW_DOMAIN_V1);
    hasher.update(&pool_id.to_le_bytes());
    hasher.update(&pg.to_le_bytes());
    // The id is the only variable-length input and comes last, so the encoding is unambiguous.
    hasher.update(node.id.as_bytes());
    let bits = first_u64(hasher.finalize().as_bytes()) >> 12;
    // 52 bits plus one half, over 2^52: every value is exact in an f64 and lies in
    // [2^-53, 1 - 2^-53], so ln(u) is finite and never 0. (53 bits would round the top value
    // up to exactly 1.)
    let u = (bits as f64 + 0.5) / (1u64 << 52) as f64;
    -(node.weight as f64) / u.ln()
}

/// The first eight bytes of a hash as a little-endian `u64`.
fn first_u64(hash: &[u8; 32]) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&hash[..8]);
    u64::from_le_bytes(bytes)
}

/// Distinct ids of the eligible nodes.
fn eligible_ids(map: &ClusterMap) -> BTreeSet<&str> {
    map.nodes
        .iter()
        .filter(|n| n.is_eligible())
        .map(|n| n.id.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TB: u64 = 1 << 40;

    fn node(id: &str, zone: &str, weight: u64, state: NodeState) -> NodeInfo {
        NodeInfo {
            id: id.to_owned(),
            zone: zone.to_owned(),
            weight,
            state,
        }
    }

    fn map(nodes: Vec<NodeInfo>) -> ClusterMap {
        ClusterMap { epoch: 7, nodes }
    }

    /// `zones` zones of `per_zone` Up nodes each, equal weights; node `n{i}` is in zone
    /// `z{i % zones}`.
    fn grid(zones: usize, per_zone: usize) -> ClusterMap {
        map((0..zones * per_zone)
            .map(|i| {
                node(
                    &format!("n{i}"),
                    &format!("z{}", i % zones),
                    TB,
                    NodeState::Up,
                )
            })
            .collect())
    }

    fn zone_of<'a>(map: &'a ClusterMap, id: &str) -> &'a str {
        &map.nodes
            .iter()
            .find(|n| n.id == id)
            .expect("member is in the map")
            .zone
    }

    #[test]
    fn known_answer() {
        // Computed once and pinned: a change here moves data in every cluster, so it must be
        // a deliberate new placement version, never an accident.
        let m = grid(3, 2);
        let got: Vec<Vec<String>> = (0..4).map(|pg| acting_set(1, pg, 4, &m)).collect();
        let expected: [[&str; 4]; 4] = PINNED;
        assert_eq!(
            got,
            expected.map(|set| set.map(str::to_owned).to_vec()).to_vec()
        );
        assert_eq!(pg_of(b"chunk-1", 1024), PINNED_PG);
    }

    const PINNED: [[&str; 4]; 4] = [
        ["n1", "n2", "n3", "n4"],
        ["n1", "n3", "n2", "n4"],
        ["n2", "n1", "n3", "n0"],
        ["n4", "n2", "n3", "n1"],
    ];
    const PINNED_PG: u32 = 302;

    #[test]
    fn redundancy_width_and_min_size() {
        let cases = [
            (Redundancy::Replicated { size: 1 }, 1, 1, "replicated{1}"),
            (Redundancy::Replicated { size: 2 }, 2, 1, "replicated{2}"),
            (Redundancy::Replicated { size: 3 }, 3, 2, "replicated{3}"),
            (Redundancy::Ec { k: 4, m: 2 }, 6, 5, "ec{4,2}"),
            (Redundancy::Ec { k: 200, m: 100 }, 300, 201, "ec{200,100}"),
        ];
        for (r, width, min_size, shown) in cases {
            assert_eq!(r.width(), width, "{r}");
            assert_eq!(r.min_size(), min_size, "{r}");
            assert_eq!(r.to_string(), shown);
        }
    }

    proptest! {
        #[test]
        fn deterministic_and_independent_of_node_order(
            nodes in Just(grid(4, 3).nodes).prop_shuffle(),
            pool_id in any::<u64>(),
            width in 0usize..=13,
        ) {
            let reference = grid(4, 3);
            let shuffled = map(nodes);
            for pg in 0..32 {
                let expected = acting_set(pool_id, pg, width, &reference);
                prop_assert_eq!(&acting_set(pool_id, pg, width, &reference), &expected);
                prop_assert_eq!(&acting_set(pool_id, pg, width, &shuffled), &expected);
            }
        }

        #[test]
        fn spreads_across_zones_first(
            (zones, per_zone, width) in (3usize..=6, 1usize..=4)
                .prop_flat_map(|(z, n)| (Just(z), Just(n), 1..=z)),
            pool_id in any::<u64>(),
        ) {
            let m = grid(zones, per_zone);
            for pg in 0..64 {
                let set = acting_set(pool_id, pg, width, &m);
                prop_assert_eq!(set.len(), width);
                let ids: BTreeSet<&str> = set.iter().map(String::as_str).collect();
                prop_assert_eq!(ids.len(), width, "duplicate member in {:?}", set);
                let used: BTreeSet<&str> = set.iter().map(|id| zone_of(&m, id)).collect();
                prop_assert_eq!(used.len(), width, "two members in one zone: {:?}", set);
            }
        }

        #[test]
        fn more_members_than_zones_still_distinct(
            (zones, per_zone, width) in (1usize..=4, 1usize..=4)
                .prop_flat_map(|(z, n)| (Just(z), Just(n), 1..=z * n + 2)),
            pool_id in any::<u64>(),
        ) {
            let m = grid(zones, per_zone);
            for pg in 0..32 {
                let set = acting_set(pool_id, pg, width, &m);
                prop_assert_eq!(set.len(), width.min(zones * per_zone));
                let ids: BTreeSet<&str> = set.iter().map(String::as_str).collect();
                prop_assert_eq!(ids.len(), set.len());
                // No zone has r + 1 members before every zone has r.
                let mut per: BTreeMap<&str, usize> = BTreeMap::new();
                for id in &set {
                    *per.entry(zone_of(&m, id)).or_default() += 1;
                }
                let (lo, hi) = (per.values().min(), per.values().max());
                if set.len() >= zones {
                    prop_assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{:?}", per);
                }
            }
        }

        #[test]
        fn pg_of_is_in_range(id in proptest::collection::vec(any::<u8>(), 0..64),
                             pg_count in 1u32..) {
            prop_assert!(pg_of(&id, pg_count) < pg_count);
        }
    }

    #[test]
    fn members_follow_weights() {
        // Every zone holds the same weights (1 TB and 2 TB), so the zone rule cannot distort
        // the weights: the best node of a zone is independent of that zone's best score.
        let m = map(vec![
            node("a1", "za", TB, NodeState::Up),
            node("a2", "za", 2 * TB, NodeState::Up),
            node("b1", "zb", TB, NodeState::Up),
            node("b2", "zb", 2 * TB, NodeState::Up),
            node("c1", "zc", TB, NodeState::Up),
            node("c2", "zc", 2 * TB, NodeState::Up),
        ]);
        let pgs = 4096u32;
        let total_weight: u64 = m.nodes.iter().map(|n| n.weight).sum();
        for width in 1..=3usize {
            let mut count: BTreeMap<String, usize> = BTreeMap::new();
            for pg in 0..pgs {
                for id in acting_set(42, pg, width, &m) {
                    *count.entry(id).or_default() += 1;
                }
            }
            let members = (width * pgs as usize) as f64;
            let mut spread = 0.0f64;
            for n in &m.nodes {
                let expected = members * n.weight as f64 / total_weight as f64;
                let got = count.get(&n.id).copied().unwrap_or(0) as f64;
                spread = spread.max((got / expected - 1.0).abs());
            }
            // Binomial noise alone is about 1/sqrt(expected) (~5% for the smallest node at
            // width 1); 25% leaves room for that and nothing else.
            eprintln!("balance width {width}: max deviation from weight share {spread:.3}");
            assert!(
                spread <= 0.25,
                "width {width}: spread {spread:.3}, counts {count:?}"
            );
        }
    }

    #[test]
    fn adding_a_node_moves_little() {
        let pgs = 2048u32;
        let width = 3;
        for n in 6..=12usize {
            let before_map = map(grid(3, 4).nodes.into_iter().take(n).collect());
            let before: Vec<Vec<String>> = (0..pgs)
                .map(|pg| acting_set(3, pg, width, &before_map))
                .collect();
            for zone in 0..3 {
                let mut after_map = before_map.clone();
                after_map
                    .nodes
                    .push(node("new", &format!("z{zone}"), TB, NodeState::Up));
                let mut moved = 0usize;
                let mut moved_set = 0usize;
                for (pg, old) in (0..pgs).zip(&before) {
                    let new = acting_set(3, pg, width, &after_map);
                    moved += old.iter().zip(&new).filter(|(a, b)| a != b).count();
                    moved_set += new.iter().filter(|id| !old.contains(id)).count();
                }
                let total = width * pgs as usize;
                let bound = 2.0 * total as f64 / (n + 1) as f64;
                eprintln!(
                    "add to {n} nodes, zone z{zone}: {:.3} of (pg, slot) members moved, \
                     {:.3} new in their set, bound {:.3}",
                    moved as f64 / total as f64,
                    moved_set as f64 / total as f64,
                    bound / total as f64,
                );
                assert!(moved > 0, "the new node took nothing");
                assert!(moved as f64 <= bound, "{moved} of {total} moved (n = {n})");
            }
        }
    }

    #[test]
    fn removing_a_node_moves_only_its_sets() {
        let pgs = 2048u32;
        for n in 6..=12usize {
            let full = map(grid(3, 4).nodes.into_iter().take(n).collect());
            let before: Vec<Vec<String>> = (0..pgs).map(|pg| acting_set(3, pg, 3, &full)).collect();
            for gone in 0..n {
                let mut smaller = full.clone();
                let removed = smaller.nodes.remove(gone).id;
                let mut changed = 0usize;
                for (pg, old) in (0..pgs).zip(&before) {
                    let new = acting_set(3, pg, 3, &smaller);
                    if old.contains(&removed) {
                        changed += 1;
                        assert!(!new.contains(&removed));
                    } else {
                        assert_eq!(&new, old, "pg {pg} changed without {removed}");
                    }
                }
                if gone == 0 {
                    eprintln!(
                        "remove 1 of {n} nodes: {:.3} of PGs changed",
                        changed as f64 / f64::from(pgs)
                    );
                }
                assert!(changed > 0, "{removed} held no PG");
            }
        }
    }

    #[test]
    fn duplicate_ids_never_hold_two_members() {
        // A malformed map (one id twice) must still give distinct members, independent of
        // which entry comes first.
        let mut m = grid(3, 2);
        m.nodes.push(node("n0", "z9", 5 * TB, NodeState::Up));
        let mut reversed = m.clone();
        reversed.nodes.reverse();
        for pg in 0..256 {
            let set = acting_set(5, pg, 6, &m);
            let ids: BTreeSet<&str> = set.iter().map(String::as_str).collect();
            assert_eq!(ids.len(), 6, "{set:?}");
            assert_eq!(acting_set(5, pg, 6, &reversed), set);
        }
    }

    #[test]
    fn out_and_weightless_nodes_never_appear_down_nodes_do() {
        let m = map(vec![
            node("a1", "za", TB, NodeState::Up),
            node("a2", "za", TB, NodeState::Out),
            node("b1", "zb", TB, NodeState::Down),
            node("b2", "zb", 0, NodeState::Up),
            node("c1", "zc", TB, NodeState::Up),
            node("c2", "zc", TB, NodeState::Out),
            node("d1", "zd", TB, NodeState::Down),
        ]);
        let mut down_seen = 0;
        for pg in 0..256 {
            let set = acting_set(9, pg, 6, &m);
            assert_eq!(set.len(), 4, "four eligible nodes: {set:?}");
            for gone in ["a2", "c2", "b2"] {
                assert!(!set.iter().any(|id| id == gone), "{gone} in {set:?}");
            }
            down_seen += set.iter().filter(|id| *id == "b1" || *id == "d1").count();
        }
        assert_eq!(down_seen, 2 * 256);

        let all_out = map(vec![node("a1", "za", TB, NodeState::Out)]);
        assert!(acting_set(9, 0, 3, &all_out).is_empty());
        assert!(acting_set(9, 0, 0, &grid(3, 2)).is_empty());
    }

    #[test]
    fn check_profile_refuses_what_cannot_be_placed() {
        let three = grid(3, 1);
        let ec = Redundancy::Ec { k: 4, m: 2 };
        let err = check_profile(&ec, &three).expect_err("6 members on 3 nodes");
        assert_eq!(
            err.to_string(),
            "ec{4,2} needs 6 nodes, the cluster has 3 eligible"
        );

        let rep = Redundancy::Replicated { size: 3 };
        assert_eq!(check_profile(&rep, &three), Ok(()));
        assert_eq!(zone_shortfall(&rep, &three), None);

        // Out and weightless nodes do not count.
        let mut shrunk = grid(3, 1);
        shrunk.nodes[0].state = NodeState::Out;
        shrunk.nodes[1].weight = 0;
        shrunk.nodes.push(node("n2", "z0", TB, NodeState::Up)); // a duplicate id counts once
        let err = check_profile(&rep, &shrunk).expect_err("1 eligible");
        assert_eq!(
            err.to_string(),
            "replicated{3} needs 3 nodes, the cluster has 1 eligible"
        );

        for bad in [
            Redundancy::Replicated { size: 0 },
            Redundancy::Ec { k: 0, m: 2 },
            Redundancy::Ec { k: 2, m: 0 },
        ] {
            let err = check_profile(&bad, &grid(3, 3)).expect_err("unusable profile");
            assert!(
                matches!(err, PlacementError::InvalidProfile { .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn zone_shortfall_warns_when_zones_are_fewer_than_members() {
        let two_zones = grid(2, 3);
        let rep = Redundancy::Replicated { size: 3 };
        assert_eq!(check_profile(&rep, &two_zones), Ok(()));
        let warning = zone_shortfall(&rep, &two_zones).expect("2 zones for 3 members");
        assert!(warning.contains("3 members but only 2 zones"), "{warning}");
        assert_eq!(
            zone_shortfall(&Redundancy::Replicated { size: 2 }, &two_zones),
            None
        );
    }

    #[test]
    fn pg_of_is_roughly_uniform() {
        let pgs = 64u32;
        let ids = 64 * 1024u32;
        let mut count = vec![0u32; pgs as usize];
        for i in 0..ids {
            count[pg_of(format!("chunk-{i}").as_bytes(), pgs) as usize] += 1;
        }
        let expected = f64::from(ids / pgs);
        let chi2: f64 = count
            .iter()
            .map(|&c| (f64::from(c) - expected).powi(2) / expected)
            .sum();
        let lo = count.iter().min().copied().unwrap_or(0);
        let hi = count.iter().max().copied().unwrap_or(0);
        // 63 degrees of freedom: chi-square is about 63 +- 11 for a uniform hash.
        eprintln!("pg_of: {ids} ids over {pgs} PGs, min {lo} max {hi}, chi2 {chi2:.1}");
        for (pg, &c) in count.iter().enumerate() {
            let ratio = f64::from(c) / expected;
            assert!(
                (0.7..=1.3).contains(&ratio),
                "pg {pg} got {c}, expected {expected}"
            );
        }
    }

    #[test]
    fn slots_fill_wrap_or_leave_gaps() {
        let set = |n: usize| (0..n).map(|i| format!("n{i}")).collect::<Vec<_>>();
        let ec = Redundancy::Ec { k: 4, m: 2 };
        let full = slots(&ec, &set(6));
        assert_eq!(full, set(6).into_iter().map(Some).collect::<Vec<_>>());
        // 4 nodes for 6 shards: at most 2 per node, so they wrap.
        let wrapped = slots(&ec, &set(4));
        assert_eq!(wrapped[4].as_deref(), Some("n0"));
        assert_eq!(wrapped[5].as_deref(), Some("n1"));
        // 2 nodes would need 3 per node, more than m: positions stay empty.
        let short = slots(&ec, &set(2));
        assert_eq!(short.iter().filter(|s| s.is_none()).count(), 4);
        let rep = Redundancy::Replicated { size: 3 };
        assert_eq!(
            slots(&rep, &set(2)),
            vec![Some("n0".into()), Some("n1".into()), None]
        );
        assert!(slots(&rep, &[]).iter().all(Option::is_none));
    }
}
